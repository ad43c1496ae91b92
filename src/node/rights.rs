//! The least rights a sidecar's role needs on PostgreSQL 15+, when it is not a superuser
//! (docs/security.md, "Rights"):
//!
//! - pulling: `REPLICATION` (the slot and the publication exist already: init made them);
//! - applying: `SET` on `session_replication_role` (replica mode: triggers and foreign
//!   keys were the author's business), `EXECUTE` on the replication-origin functions,
//!   and the rights of the roles that own the replicated tables, by membership: their
//!   rows are written, their sequences partitioned, and captured DDL is replayed as the
//!   role that ran it;
//! - its own bookkeeping: everything in schema `walsync`.
//!
//! `walsync init` runs as a superuser once per node (event triggers and a publication
//! `FOR ALL TABLES` need one) and, with `--grant-to ROLE`, grants these to the sidecar's
//! role and prints them; `walsync run` as a non-superuser checks them first and names
//! what is missing with the statement that grants it.

use tokio_postgres::Client;

use crate::names::quote_ident;

/// The replication-origin functions the applier calls (and remove-node / init).
pub const ORIGIN_FUNCTIONS: [&str; 6] = [
    "pg_replication_origin_session_setup(text)",
    "pg_replication_origin_session_reset()",
    "pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone)",
    "pg_replication_origin_create(text)",
    "pg_replication_origin_drop(text)",
    "pg_replication_origin_advance(text, pg_lsn)",
];

/// The statements that give `role` what a sidecar needs on this node, whose replicated
/// tables are owned by `app_roles`.
pub fn grant_statements(role: &str, app_roles: &[String]) -> Vec<String> {
    let r = quote_ident(role);
    let mut out = vec![
        format!("ALTER ROLE {r} REPLICATION"),
        format!("GRANT SET ON PARAMETER session_replication_role TO {r}"),
        format!(
            "GRANT EXECUTE ON FUNCTION {} TO {r}",
            ORIGIN_FUNCTIONS.join(", ")
        ),
        format!("GRANT USAGE ON SCHEMA walsync TO {r}"),
        // The guard gives tables made without the event trigger their tombstone trigger.
        format!("GRANT EXECUTE ON FUNCTION walsync.keep_tombstones_everywhere() TO {r}"),
        format!("GRANT ALL ON ALL TABLES IN SCHEMA walsync TO {r}"),
        format!("GRANT ALL ON ALL SEQUENCES IN SCHEMA walsync TO {r}"),
        // What later migrations create (an upgrade's init, run by this same superuser).
        format!("ALTER DEFAULT PRIVILEGES IN SCHEMA walsync GRANT ALL ON TABLES TO {r}"),
        format!("ALTER DEFAULT PRIVILEGES IN SCHEMA walsync GRANT ALL ON SEQUENCES TO {r}"),
    ];
    for app in app_roles {
        if app != role {
            out.push(format!("GRANT {} TO {r}", quote_ident(app)));
        }
    }
    out
}

/// The roles that own tables walsync replicates here (not superusers: their rights are
/// not passed on by membership anyway, and a sidecar must not become one).
pub async fn app_roles(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT DISTINCT r.rolname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_roles r ON r.oid = c.relowner \
             WHERE c.relkind IN ('r', 'p') AND NOT r.rolsuper \
               AND n.nspname NOT IN ('walsync', 'pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' \
             ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// What the connected role lacks to run a sidecar here, each with the statement that
/// grants it (run by a superuser). Empty for a superuser.
pub async fn missing(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let me = client
        .query_one(
            "SELECT current_user::text, r.rolsuper, r.rolreplication FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let (role, superuser, replication): (String, bool, bool) = (me.get(0), me.get(1), me.get(2));
    if superuser {
        return Ok(Vec::new());
    }
    let r = quote_ident(&role);
    let mut missing = Vec::new();
    if !replication {
        missing.push(format!("REPLICATION: ALTER ROLE {r} REPLICATION"));
    }
    let may_set: bool = client
        .query_one(
            "SELECT has_parameter_privilege('session_replication_role', 'SET')",
            &[],
        )
        .await?
        .get(0);
    if !may_set {
        missing.push(format!(
            "SET on session_replication_role: GRANT SET ON PARAMETER session_replication_role TO {r}"
        ));
    }
    for f in ORIGIN_FUNCTIONS {
        let may: bool = client
            .query_one("SELECT has_function_privilege($1, 'EXECUTE')", &[&f])
            .await?
            .get(0);
        if !may {
            missing.push(format!(
                "EXECUTE on {f}: GRANT EXECUTE ON FUNCTION {f} TO {r}"
            ));
        }
    }
    let own: Option<String> = client
        .query_opt(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'walsync' AND c.relkind IN ('r', 'S') \
               AND NOT (has_schema_privilege('walsync', 'USAGE') \
                        AND CASE c.relkind WHEN 'r' THEN has_table_privilege(c.oid, 'SELECT,INSERT,UPDATE,DELETE') \
                                           ELSE has_sequence_privilege(c.oid, 'USAGE,UPDATE') END) \
             LIMIT 1",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    if let Some(t) = own {
        missing.push(format!(
            "its own bookkeeping (walsync.{t}): GRANT USAGE ON SCHEMA walsync TO {r}; \
             GRANT ALL ON ALL TABLES IN SCHEMA walsync TO {r}; GRANT ALL ON ALL SEQUENCES IN SCHEMA walsync TO {r}"
        ));
    }
    for app in app_roles(client).await? {
        let member: bool = client
            .query_one("SELECT pg_has_role($1, 'USAGE')", &[&app])
            .await?
            .get(0);
        if !member {
            missing.push(format!(
                "the rights of {app}, which owns replicated tables (their rows, sequences and DDL): GRANT {} TO {r}",
                quote_ident(&app)
            ));
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grants_name_the_role_quoted_and_each_application_role() {
        let g = grant_statements("walsync", &["odoo".into(), "Shop \"B\"".into()]);
        assert_eq!(g[0], "ALTER ROLE \"walsync\" REPLICATION");
        assert!(g.iter().any(|s| s == "GRANT \"odoo\" TO \"walsync\""));
        assert!(g
            .iter()
            .any(|s| s == "GRANT \"Shop \"\"B\"\"\" TO \"walsync\""));
        assert!(g[2].contains("pg_replication_origin_session_setup(text)"));
    }
}
