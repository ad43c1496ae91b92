//! `walsync init`: prepares one node, idempotently.
//!
//! Order matters: every check runs before anything is created, so a refused init leaves the
//! node untouched. Then migrations, the node's identity, the publication, one slot per
//! outgoing link and one replication origin per peer. Each step creates only what is missing
//! and says so in the returned report; a second run reports nothing created.

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::config::{Config, NodeRef};
use crate::names::{PgName, PUBLICATION};
use crate::node::connect::{connect, ConnectError};
use crate::sql_error::SqlError;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("node {node} is not ready for walsync:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    NotReady { node: String, problems: Vec<String> },
    #[error("node {node}: this database was initialised as node {found_name:?} (id {found_id}, step {found_step}), but the config says {want_name:?} (id {want_id}, step {want_step}); check the dsn or the [node] section")]
    IdentityMismatch {
        node: String,
        found_name: String,
        found_id: i32,
        found_step: i32,
        want_name: String,
        want_id: u32,
        want_step: u32,
    },
    #[error("node {node}")]
    Sequence {
        node: String,
        #[source]
        source: crate::sequences::SequenceError,
    },
    #[error("node {node}")]
    Sql {
        node: String,
        #[source]
        source: SqlError,
    },
}

/// One migration of the `walsync` schema.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "walsync_schema",
        sql: include_str!("../../migrations/0001_walsync_schema.sql"),
    },
    Migration {
        version: 2,
        name: "conflicts",
        sql: include_str!("../../migrations/0002_conflicts.sql"),
    },
    Migration {
        version: 3,
        name: "link_status",
        sql: include_str!("../../migrations/0003_link_status.sql"),
    },
    Migration {
        version: 4,
        name: "ddl_capture",
        sql: include_str!("../../migrations/0004_ddl_capture.sql"),
    },
    Migration {
        version: 5,
        name: "ddl_skip",
        sql: include_str!("../../migrations/0005_ddl_skip.sql"),
    },
    Migration {
        version: 6,
        name: "ddl_warnings",
        sql: include_str!("../../migrations/0006_ddl_warnings.sql"),
    },
    Migration {
        version: 7,
        name: "conflict_outcomes",
        sql: include_str!("../../migrations/0007_conflict_outcomes.sql"),
    },
    Migration {
        version: 8,
        name: "settle_new_objects",
        sql: include_str!("../../migrations/0008_settle_new_objects.sql"),
    },
    Migration {
        version: 9,
        name: "dropped_objects",
        sql: include_str!("../../migrations/0009_dropped_objects.sql"),
    },
    Migration {
        version: 10,
        name: "spool",
        sql: include_str!("../../migrations/0010_spool.sql"),
    },
    Migration {
        version: 11,
        name: "parked_rows",
        sql: include_str!("../../migrations/0011_parked_rows.sql"),
    },
    Migration {
        version: 12,
        name: "liveness",
        sql: include_str!("../../migrations/0012_liveness.sql"),
    },
    Migration {
        version: 13,
        name: "capture_guards",
        sql: include_str!("../../migrations/0013_capture_guards.sql"),
    },
    Migration {
        version: 14,
        name: "removed_nodes",
        sql: include_str!("../../migrations/0014_removed_nodes.sql"),
    },
    Migration {
        version: 15,
        name: "warned_columns",
        sql: include_str!("../../migrations/0015_warned_columns.sql"),
    },
    Migration {
        version: 16,
        name: "merged_rows",
        sql: include_str!("../../migrations/0016_merged_rows.sql"),
    },
    Migration {
        version: 17,
        name: "announced_merges",
        sql: include_str!("../../migrations/0017_announced_merges.sql"),
    },
    Migration {
        version: 18,
        name: "tables_from_queries",
        sql: include_str!("../../migrations/0018_tables_from_queries.sql"),
    },
    Migration {
        version: 19,
        name: "accepted_ddl",
        sql: include_str!("../../migrations/0019_accepted_ddl.sql"),
    },
    Migration {
        version: 20,
        name: "set_aside",
        sql: include_str!("../../migrations/0020_set_aside.sql"),
    },
    Migration {
        version: 21,
        name: "tombstones",
        sql: include_str!("../../migrations/0021_tombstones.sql"),
    },
];

impl SetupError {
    /// The connection to the node failed under a statement (the node restarting, the
    /// path cut): nothing the operator must fix, the links retry.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, SetupError::Sql { source, .. } if source.is_connection_lost())
    }
}

/// What init did, one line per action, for the operator.
#[derive(Debug, Default)]
pub struct SetupReport {
    pub actions: Vec<String>,
}

fn sql_err(
    node: &NodeRef,
    what: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> SetupError {
    let node = node.name.to_string();
    let what = what.into();
    move |source| SetupError::Sql {
        node,
        source: SqlError::new(what, source),
    }
}

pub async fn init_node(config: &Config) -> Result<SetupReport, SetupError> {
    let me = config.this_node();
    let client = connect(&me.dsn, "walsync init").await?;
    check_server(&client, &me, config.peers.len()).await?;
    check_superuser_needed(&client, &me).await?;

    let mut report = SetupReport::default();
    run_migrations(&client, &me, &mut report).await?;
    record_identity(&client, config, &me, &mut report).await?;
    // From here on, what init changes is this node's own setup: keep the DDL capture
    // trigger quiet (it does not fire in replica mode), or peers would replay it.
    client
        .batch_execute("SET session_replication_role = replica")
        .await
        .map_err(sql_err(&me, "setting session_replication_role"))?;

    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&PUBLICATION],
        )
        .await
        .map_err(sql_err(&me, "reading pg_publication"))?
        .get(0);
    if !exists {
        client
            .batch_execute(&format!("CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES"))
            .await
            .map_err(sql_err(&me, "creating the publication"))?;
        report.actions.push(format!(
            "created publication {PUBLICATION} (FOR ALL TABLES)"
        ));
    }

    let full = set_replica_identity_full(&client, &me).await?;
    if full > 0 {
        report.actions.push(format!(
            "set REPLICA IDENTITY FULL on {full} table(s): updates and deletes carry the row they were made on, so conflicts are told apart from edits made one after the other"
        ));
    }

    let kept = keep_tombstones(&client, &me).await?;
    if kept > 0 {
        report.actions.push(format!(
            "keeping tombstones of deleted rows on {kept} table(s): an update that arrives for a row deleted here is decided by time against the delete"
        ));
    }

    let step = config.cluster.step;
    let changed = crate::sequences::partition_all(&client, me.id, step)
        .await
        .map_err(|e| SetupError::Sequence {
            node: me.name.to_string(),
            source: e,
        })?;
    if changed > 0 {
        report.actions.push(format!(
            "partitioned {changed} sequence(s): this node now hands out ids \u{2261} {} (mod {step})",
            me.id % step
        ));
    }

    for (peer, _) in config.peer_nodes() {
        let slot = PgName::slot_to(&peer.name);
        let created = client
            .query_opt(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput') \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&slot],
            )
            .await;
        match created {
            Ok(Some(_)) => report
                .actions
                .push(format!("created slot {slot} (changes for {})", peer.name)),
            Ok(None) => {}
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
            Err(e) => return Err(sql_err(&me, format!("creating slot {slot}"))(e)),
        }
        let origin = PgName::origin_of(&peer.name);
        if ensure_origin(&client, &origin)
            .await
            .map_err(sql_err(&me, format!("creating origin {origin}")))?
        {
            report
                .actions
                .push(format!("created replication origin {origin}"));
        }
    }
    Ok(report)
}

/// Checks, before a sidecar starts, that its node was initialised as the node its config
/// names. A node that cannot be reached is not an error here: its links retry.
pub async fn check_initialised(config: &Config) -> Result<(), SetupError> {
    let me = config.this_node();
    let client = match connect(&me.dsn, "walsync run check").await {
        Ok(c) => c,
        Err(e) if !e.is_permanent() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let joining: bool = client
        .query_one("SELECT to_regclass('walsync.join_state') IS NOT NULL", &[])
        .await
        .map_err(sql_err(&me, "checking for a walsync join"))?
        .get(0);
    if joining {
        let unfinished = client
            .query_opt(
                "SELECT source FROM walsync.join_state WHERE finished_at IS NULL",
                &[],
            )
            .await
            .map_err(sql_err(&me, "reading walsync.join_state"))?;
        if let Some(r) = unfinished {
            return Err(SetupError::NotReady {
                node: me.name.to_string(),
                problems: vec![format!(
                    "walsync join from {} did not finish, so this node holds a partial copy: run walsync join --restart",
                    r.get::<_, String>(0)
                )],
            });
        }
    }
    let initialised: bool = client
        .query_one("SELECT to_regclass('walsync.node') IS NOT NULL", &[])
        .await
        .map_err(sql_err(&me, "checking for schema walsync"))?
        .get(0);
    if !initialised {
        return Err(SetupError::NotReady {
            node: me.name.to_string(),
            problems: vec![format!(
                "the database at {} has no walsync schema: run walsync init with this config first",
                me.dsn
            )],
        });
    }
    // A newer sidecar on a node whose schema walsync is older: its links would fail on
    // what is missing.
    let applied: i32 = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM walsync.schema_migrations",
            &[],
        )
        .await
        .map_err(sql_err(&me, "reading walsync.schema_migrations"))?
        .get(0);
    let latest = MIGRATIONS.last().map_or(0, |m| m.version);
    if applied < latest {
        return Err(SetupError::NotReady {
            node: me.name.to_string(),
            problems: vec![format!(
                "schema walsync is at migration {applied}, this walsync needs {latest}: run walsync init with this config (it applies the new migrations and changes nothing else)"
            )],
        });
    }
    let mut report = SetupReport::default();
    record_identity(&client, config, &me, &mut report).await?;
    if !report.actions.is_empty() {
        return Err(SetupError::NotReady {
            node: me.name.to_string(),
            problems: vec!["walsync init did not finish on this node: run it again".into()],
        });
    }
    Ok(())
}

/// Creates replication origin `name` if missing; true when it was created.
pub async fn ensure_origin(client: &Client, name: &str) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT pg_replication_origin_create($1) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
            &[&name],
        )
        .await;
    match row {
        Ok(r) => Ok(r.is_some()),
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Refuses, with every problem listed and its fix, a server walsync cannot work with.
async fn check_server(client: &Client, me: &NodeRef, peers: usize) -> Result<(), SetupError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_setting('track_commit_timestamp'), \
                    current_setting('max_replication_slots')::int, current_setting('max_wal_senders')::int, \
                    (SELECT count(*)::int FROM pg_replication_slots WHERE slot_name NOT LIKE 'walsync\\_%'), \
                    r.rolsuper, r.rolreplication, \
                    has_function_privilege('pg_replication_origin_session_setup(text)', 'EXECUTE'), \
                    current_setting('server_version_num')::int, current_user \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(sql_err(me, "reading server settings"))?;
    let wal_level: String = row.get(0);
    let track: String = row.get(1);
    let max_slots: i32 = row.get(2);
    let max_senders: i32 = row.get(3);
    let other_slots: i32 = row.get(4);
    let superuser: bool = row.get(5);
    let replication: bool = row.get(6);
    let origin_grant: bool = row.get(7);
    let version: i32 = row.get(8);
    let user: String = row.get(9);

    let mut problems = Vec::new();
    if version < 150000 {
        problems.push(format!(
            "server_version_num is {version}: walsync needs PostgreSQL 15 or later"
        ));
    }
    if wal_level != "logical" {
        problems.push(format!(
            "wal_level is {wal_level:?}: set wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
        ));
    }
    if track != "on" {
        problems.push(format!(
            "track_commit_timestamp is {track:?}: set track_commit_timestamp = on (ALTER SYSTEM SET track_commit_timestamp = on) and restart PostgreSQL; conflicts are decided on commit times"
        ));
    }
    let needed = peers as i32 + other_slots;
    if max_slots < needed {
        problems.push(format!(
            "max_replication_slots is {max_slots}: walsync needs one slot per peer ({peers}) besides the {other_slots} already in use; set max_replication_slots = {} or more and restart PostgreSQL",
            needed + 2
        ));
    }
    if max_senders < peers as i32 {
        problems.push(format!(
            "max_wal_senders is {max_senders}: walsync needs one per peer ({peers}); set max_wal_senders = {} or more and restart PostgreSQL",
            peers + 2
        ));
    }
    if !superuser && (!replication || !origin_grant) {
        problems.push(format!(
            "role {user:?} is not a superuser: run walsync init once with a superuser's dsn (WALSYNC_NODE_DSN=...) \
             and --grant-to {user}, which grants {user} everything a sidecar needs; or grant what is named below"
        ));
    }
    if !superuser {
        if !replication {
            problems.push(format!(
                "role {user:?} lacks REPLICATION: ALTER ROLE {user} REPLICATION"
            ));
        }
        if !origin_grant {
            problems.push(format!(
                "role {user:?} may not use replication origins: run as a superuser, or GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text), pg_replication_origin_session_reset(), pg_replication_origin_xact_setup(pg_lsn, timestamptz), pg_replication_origin_create(text) TO {user}"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SetupError::NotReady {
            node: me.name.to_string(),
            problems,
        })
    }
}

/// The first init of a node and each upgrade need a superuser: they create event triggers
/// and a publication `FOR ALL TABLES`. Refused before anything is changed when that is
/// needed and the role is not one; a node already set up can be initialised again by the
/// sidecar's own role (the container's entrypoint does so at every start).
async fn check_superuser_needed(client: &Client, me: &NodeRef) -> Result<(), SetupError> {
    let row = client
        .query_one(
            "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), \
                    to_regclass('walsync.schema_migrations') IS NOT NULL, \
                    EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&PUBLICATION],
        )
        .await
        .map_err(sql_err(me, "checking what init has to create"))?;
    let (superuser, has_schema, has_publication): (bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2));
    if superuser {
        return Ok(());
    }
    let latest = MIGRATIONS.last().map_or(0, |m| m.version);
    let applied: i32 = if has_schema {
        client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM walsync.schema_migrations",
                &[],
            )
            .await
            .map_err(sql_err(me, "reading walsync.schema_migrations"))?
            .get(0)
    } else {
        0
    };
    if applied < latest || !has_publication {
        return Err(SetupError::NotReady {
            node: me.name.to_string(),
            problems: vec![
                "setting this node up (or upgrading it) needs a superuser once: it creates event triggers and a \
                 publication FOR ALL TABLES. Run walsync init with a superuser's dsn (WALSYNC_NODE_DSN=...) and \
                 --grant-to ROLE for the sidecar's own role; nothing was changed"
                    .to_string(),
            ],
        });
    }
    Ok(())
}

/// Every replicated table sends its whole old row with updates and deletes.
pub async fn set_replica_identity_full(client: &Client, me: &NodeRef) -> Result<usize, SetupError> {
    let rows = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND c.relreplident <> 'f' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'walsync') \
               AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1",
            &[],
        )
        .await
        .map_err(sql_err(me, "listing tables"))?;
    for r in &rows {
        let table: String = r.get(0);
        client
            .batch_execute(&format!("ALTER TABLE {table} REPLICA IDENTITY FULL"))
            .await
            .map_err(sql_err(
                me,
                format!("setting REPLICA IDENTITY FULL on {table}"),
            ))?;
    }
    Ok(rows.len())
}

/// Every replicated table keeps the keys of rows deleted from it (`walsync.tombstones`,
/// decision 0016); returns on how many tables that was set up now.
pub async fn keep_tombstones(client: &Client, me: &NodeRef) -> Result<usize, SetupError> {
    let n: i32 = client
        .query_one(
            // A sidecar role granted its rights before tombstones existed may not run it:
            // the superuser's init and the event trigger have set the tables up.
            "SELECT CASE WHEN pg_catalog.has_function_privilege('walsync.keep_tombstones_everywhere()', 'EXECUTE') \
                    THEN walsync.keep_tombstones_everywhere() ELSE 0 END",
            &[],
        )
        .await
        .map_err(sql_err(me, "setting up tombstones of deleted rows"))?
        .get(0);
    Ok(n as usize)
}

async fn run_migrations(
    client: &Client,
    me: &NodeRef,
    report: &mut SetupReport,
) -> Result<(), SetupError> {
    let has_schema: bool = client
        .query_one(
            "SELECT to_regclass('walsync.schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(sql_err(me, "checking for schema walsync"))?
        .get(0);
    // (Creating it, even IF NOT EXISTS, needs CREATE on the database, which a re-run by
    // the sidecar's own role has not.)
    if !has_schema {
        client
            .batch_execute(
                // Replica mode, as every migration: on a re-run (an upgrade) the event
                // triggers exist, and walsync's own schema is never DDL for the peers.
                "BEGIN; SET LOCAL session_replication_role = replica; \
             CREATE SCHEMA IF NOT EXISTS walsync; \
             CREATE TABLE IF NOT EXISTS walsync.schema_migrations ( \
                version integer PRIMARY KEY, name text NOT NULL, \
                applied_at timestamptz NOT NULL DEFAULT now()); \
             COMMIT",
            )
            .await
            .map_err(sql_err(me, "creating schema walsync"))?;
    }
    for m in MIGRATIONS {
        // One transaction per migration; the advisory lock keeps two inits from racing.
        // Replica mode: walsync's own objects are this node's, never DDL for the peers.
        let sql = format!(
            "BEGIN; SET LOCAL session_replication_role = replica; \
             SELECT pg_advisory_xact_lock(hashtext('walsync migrations')); \
             DO $walsync$ BEGIN IF EXISTS (SELECT 1 FROM walsync.schema_migrations WHERE version = {v}) \
             THEN RAISE EXCEPTION USING ERRCODE = 'WS001', MESSAGE = 'already applied'; END IF; END $walsync$; \
             {sql} \
             ; INSERT INTO walsync.schema_migrations (version, name) VALUES ({v}, '{name}'); COMMIT;",
            v = m.version,
            name = m.name,
            sql = m.sql
        );
        match client.batch_execute(&sql).await {
            Ok(()) => report
                .actions
                .push(format!("applied migration {:04}_{}", m.version, m.name)),
            Err(e) if e.code().map(|c| c.code()) == Some("WS001") => {
                client
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(sql_err(me, "rolling back"))?;
            }
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(sql_err(
                    me,
                    format!("migration {:04}_{}", m.version, m.name),
                )(e));
            }
        }
    }
    Ok(())
}

async fn record_identity(
    client: &Client,
    config: &Config,
    me: &NodeRef,
    report: &mut SetupReport,
) -> Result<(), SetupError> {
    let row = client
        .query_opt("SELECT name, id, step FROM walsync.node", &[])
        .await
        .map_err(sql_err(me, "reading walsync.node"))?;
    let step = config.cluster.step;
    match row {
        Some(r) => {
            let (name, id, found_step): (String, i32, i32) = (r.get(0), r.get(1), r.get(2));
            if name != me.name.as_str() || id as u32 != me.id || found_step as u32 != step {
                return Err(SetupError::IdentityMismatch {
                    node: me.name.to_string(),
                    found_name: name,
                    found_id: id,
                    found_step,
                    want_name: me.name.to_string(),
                    want_id: me.id,
                    want_step: step,
                });
            }
        }
        None => {
            client
                .execute(
                    "INSERT INTO walsync.node (name, id, step) VALUES ($1, $2, $3)",
                    &[&me.name.as_str(), &(me.id as i32), &(step as i32)],
                )
                .await
                .map_err(sql_err(me, "recording the node identity"))?;
            report.actions.push(format!(
                "recorded node identity {} (id {}, step {step})",
                me.name, me.id
            ));
        }
    }
    Ok(())
}
