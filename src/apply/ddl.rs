//! Replaying captured DDL at its place in the stream.
//!
//! A row inserted into `walsync.ddl_log` on the upstream means a DDL statement ran there
//! at that point of the transaction. The applier runs the same statement here first (as
//! the role that ran it, with its search_path), then applies the row itself, so that the
//! log travels on (a star's hub forwards a branch's DDL to the other branches). The
//! session's `session_replication_role = replica` keeps the event trigger quiet: the
//! replayed statement is not captured again.

use super::{ApplyError, ApplyWorker, Gone};
use crate::ddl::{
    altered_table, columns_filled_per_node, created_sequence, probe, redact_secrets,
    statement_to_replay, verdict, DdlVerdict, PROBE_TABLE,
};
use crate::names::quote_written;
use crate::pgoutput::Insert;
use crate::sql_error::{Refusal, SqlError};

impl ApplyWorker {
    /// Tables here may have changed shape (a DDL replay, here or on another session of the
    /// link): their maps are checked against the catalog when next needed (and kept, with
    /// their statements, if their table is as it was), and the foreign keys into merged
    /// tables are read again.
    pub fn forget_maps(&mut self) {
        for e in self.relations.values_mut() {
            e.stale = e.map.is_some();
            if e.map.is_none() {
                e.gone = Gone::Nothing;
            }
            e.fks = None;
        }
        self.merge_targets.clear();
        self.references.forget_checks();
    }

    pub(super) fn is_ddl_log(&self, relation_id: u32) -> bool {
        self.relations
            .get(&relation_id)
            .is_some_and(|e| e.source.namespace == "walsync" && e.source.name == "ddl_log")
    }

    /// Runs the DDL statement a `walsync.ddl_log` row describes. `false`: the row is here
    /// already (`walsync ddl-replay --apply` ran it ahead of the stream), so neither the
    /// statement nor the row is applied again.
    pub(super) async fn replay_ddl(&mut self, ins: &Insert) -> Result<bool, ApplyError> {
        let field = |name: &str| self.field_of(ins, name);
        let missing =
            |what: &str| ApplyError::Protocol(format!("a walsync.ddl_log row without {what}"));
        let query = field("query").ok_or_else(|| missing("query"))?;
        let index: i32 = field("statement_index")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| missing("statement_index"))?;
        let search_path = field("search_path").ok_or_else(|| missing("search_path"))?;
        let role = field("role").ok_or_else(|| missing("role"))?;
        let (origin, seq) = (
            field("origin").unwrap_or_default(),
            field("seq").unwrap_or_default(),
        );
        let accepts = field("accepts");
        let id = format!("{origin}/{seq}");
        let statement = statement_to_replay(&query, index).map_err(|e| ApplyError::Ddl {
            id: id.clone(),
            statement: redact_secrets(&query),
            reason: e.to_string(),
        })?;
        // Everything before the DDL, in stream order, first.
        self.flush_runs().await?;
        self.flush().await?;
        let seq_num: i64 = seq.parse().unwrap_or(-1);
        let here = self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM walsync.ddl_log WHERE origin = $1 AND seq = $2), \
                        EXISTS (SELECT 1 FROM walsync.ddl_skip WHERE origin = $1 AND seq = $2)",
                &[&origin, &seq_num],
            )
            .await
            .map_err(SqlError::of("reading walsync.ddl_log and walsync.ddl_skip"))?;
        let (applied, skipped): (bool, bool) = (here.get(0), here.get(1));
        if applied {
            tracing::info!(link = %self.link, ddl = %id, "ddl applied here already (walsync ddl-replay --apply)");
            return Ok(false);
        }
        if skipped {
            tracing::warn!(link = %self.link, ddl = %id, "skipping ddl as the operator asked (walsync ddl-replay --skip)");
            return Ok(true);
        }
        let author = self.open_txn().origin;
        let author = author
            .strip_prefix("walsync_")
            .unwrap_or(&author)
            .to_string();
        let accepts_origin = accepts
            .as_deref()
            .and_then(|a| a.split_once('/'))
            .map(|(o, _)| o);
        let here = self.node_name().to_string();
        let refusal = match verdict(&origin, &author, &here, self.ddl_from.as_deref(), accepts_origin) {
            DdlVerdict::Run => None,
            DdlVerdict::RanHereAlready => {
                tracing::info!(link = %self.link, ddl = %id, "an accepted ddl made here: nothing to run");
                return Ok(true);
            }
            DdlVerdict::Refused => Some((true, format!(
                "not run here: [cluster] ddl_from accepts schema changes only from {} (in a star, the hub, unless \
                 ddl_from names more); if the change is wanted, accept it on the hub with walsync ddl-replay --accept \
                 {id} (it then replicates from there), or undo it on {origin}. Rows that need it are set aside here \
                 (walsync.set_aside) and apply by themselves once it runs here",
                self.ddl_from.as_deref().unwrap_or_default().join(", ")
            ))),
            // A forged row is not kept: the real author's row of that number may come.
            DdlVerdict::Forged => Some((false, format!(
                "refused: a walsync.ddl_log row claiming to be {origin}'s DDL arrived in a transaction written by \
                 {author}; a node writes only its own DDL rows, so it was neither run nor kept. {author} may be \
                 compromised (docs/security.md)"
            ))),
        };
        if let Some((keep_row, warning)) = refusal {
            tracing::warn!(link = %self.link, ddl = %id, %warning, "ddl not run");
            self.client
                .execute(
                    "INSERT INTO walsync.ddl_warnings (origin, seq, statement, warning) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT DO NOTHING",
                    &[&origin, &seq_num, &redact_secrets(&statement), &warning],
                )
                .await
                .map_err(SqlError::of("recording a refused ddl"))?;
            return Ok(keep_row);
        }
        // `[cluster] ddl_role`, where set, instead of whoever ran it on its author.
        let replay_role = self.ddl_role.clone().unwrap_or(role);
        let replay_role = replay_role.as_str();
        tracing::info!(link = %self.link, ddl = %id, role = %replay_role, statement = %redact_secrets(&statement), "replaying ddl");
        let savepoint = SqlError::of("setting a savepoint for the ddl");
        self.client
            .batch_execute("SAVEPOINT walsync_ddl")
            .await
            .map_err(savepoint)?;
        let mut outcome =
            run_captured_ddl(&self.client, &search_path, replay_role, &statement).await;
        // Another session here made the same object at the same moment (two links
        // replaying one module's install), or the two deadlocked: once the other one is
        // through, the statement runs, or finds the object there.
        for _ in 0..RACE_RETRIES {
            match &outcome {
                Err(e) if Refusal::RacedAnotherSession.is(e) => {
                    tracing::info!(link = %self.link, ddl = %id, error = %super::server_message(e), "ddl raced another session here; running it again");
                    self.client
                        .batch_execute("ROLLBACK TO SAVEPOINT walsync_ddl")
                        .await
                        .map_err(SqlError::of("rolling back the failed ddl"))?;
                    outcome =
                        run_captured_ddl(&self.client, &search_path, replay_role, &statement).await;
                }
                _ => break,
            }
        }
        match outcome {
            Ok(()) => {}
            Err(e) if Refusal::Exists.is(&e) => {
                // Two nodes made the same object while cut off (one module installed on
                // two stores): if its effect is here already, the statement is done.
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT walsync_ddl")
                    .await
                    .map_err(SqlError::of("rolling back the failed ddl"))?;
                let refused = ApplyError::Ddl {
                    id: id.clone(),
                    statement: redact_secrets(&statement),
                    reason: super::server_message(&e),
                };
                if !already_here(&self.client, &search_path, replay_role, &statement).await? {
                    return Err(refused);
                }
                let note = format!(
                    "already here: {}; what the statement makes exists on this node with the same definition \
                     (the same change made here too), so it was not run again",
                    super::server_message(&e)
                );
                tracing::info!(link = %self.link, ddl = %id, "ddl already applied here (the same object exists); going on");
                self.client
                    .execute(
                        "INSERT INTO walsync.ddl_warnings (origin, seq, statement, warning, resolved_at) \
                         VALUES ($1, $2, $3, $4, now()) ON CONFLICT DO NOTHING",
                        &[&origin, &seq_num, &redact_secrets(&statement), &note],
                    )
                    .await
                    .map_err(SqlError::of("recording a ddl found here already"))?;
            }
            Err(e) if Refusal::Duplicate.is(&e) => {
                // A unique index over rows this node wrote while cut off: settled as its
                // author settled them, then built (`unique_index`).
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT walsync_ddl")
                    .await
                    .map_err(SqlError::of("rolling back the failed ddl"))?;
                let failed = |reason: String| ApplyError::Ddl {
                    id: id.clone(),
                    statement: redact_secrets(&statement),
                    reason,
                };
                let first = super::server_message(&e);
                let Some(index) = crate::ddl::unique_index(&statement) else {
                    return Err(failed(first));
                };
                let renamed = match self.settle_for_unique_index(&search_path, &index).await? {
                    Ok(n) => n,
                    Err(why) => return Err(failed(format!("{first}; not settled here: {why}"))),
                };
                if let Err(e) =
                    run_captured_ddl(&self.client, &search_path, replay_role, &statement).await
                {
                    return Err(failed(format!(
                        "{first}; after renaming {renamed} duplicated value(s): {}",
                        super::server_message(&e)
                    )));
                }
                tracing::info!(link = %self.link, ddl = %id, renamed, "unique index built after renaming duplicated values (walsync conflicts)");
            }
            Err(e) => {
                return Err(ApplyError::Ddl {
                    id: id.clone(),
                    statement: redact_secrets(&statement),
                    reason: super::server_message(&e),
                })
            }
        }
        self.client
            .batch_execute("RELEASE SAVEPOINT walsync_ddl")
            .await
            .map_err(SqlError::of("releasing the ddl's savepoint"))?;
        let accepted = accepts
            .as_deref()
            .and_then(|a| a.split_once('/'))
            .and_then(|(o, s)| Some((o, s.parse::<i64>().ok()?)));
        if let Some((o, s)) = accepted {
            // Accepted where it was refused: this node's own record of the refusal is done.
            self.client
                .execute(
                    "UPDATE walsync.ddl_warnings SET resolved_at = now() \
                     WHERE origin = $1 AND seq = $2 AND resolved_at IS NULL",
                    &[&o, &s],
                )
                .await
                .map_err(SqlError::of("closing the record of an accepted ddl"))?;
        }
        self.forget_maps();
        let columns = columns_filled_per_node(&statement);
        if !columns.is_empty() {
            let warning = format!(
                "column(s) {} were filled by this node with its own values (a volatile default or a serial type), \
                 so existing rows differ from the author's: run an UPDATE that sets them to themselves on the author \
                 (it replicates as data; until this warning is resolved those columns do not count as conflicts), \
                 then walsync ddl-replay --resolve-warning {id} on this node",
                columns.join(", ")
            );
            tracing::warn!(link = %self.link, ddl = %id, %warning, "ddl leaves rows different from the author's");
            // The table as the statement named it, found with the captured search_path.
            let table = altered_table(&statement)
                .map(|(schema, name)| quote_written(schema.as_deref(), &name))
                .unwrap_or_default();
            self.client
                .execute(
                    "SELECT pg_catalog.set_config('search_path', $1, true)",
                    &[&search_path],
                )
                .await
                .map_err(SqlError::of("setting the captured search_path"))?;
            self.client
                .execute(
                    "INSERT INTO walsync.ddl_warnings (origin, seq, statement, warning, table_schema, table_name, columns) \
                     SELECT $1, $2, $3, $4, n.nspname, c.relname, $6 \
                     FROM (SELECT pg_catalog.to_regclass(nullif($5, '')) AS oid) t \
                     LEFT JOIN pg_catalog.pg_class c ON c.oid = t.oid \
                     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     ON CONFLICT DO NOTHING",
                    &[&origin, &seq_num, &statement, &warning, &table, &columns],
                )
                .await
                .map_err(SqlError::of("recording a ddl warning"))?;
            self.client
                .batch_execute("RESET search_path")
                .await
                .map_err(SqlError::of("resetting the search_path"))?;
        }
        Ok(true)
    }
}

/// Runs one captured DDL statement in the open transaction of `client`, as the role that
/// ran it and with its search_path, then puts both back.
///
/// Nothing captured is pasted into SQL text (the capture is written by whoever may run DDL
/// on a peer, and this session may be a superuser): the search_path and the role travel
/// as bound parameters of `set_config`, and the statement, which is one piece of
/// pg_query's split and nothing else, goes alone through the extended protocol, which
/// refuses a string with more than one statement in it. The resets are calls of their
/// own, so a trailing `--` comment in the statement cannot reach them.
pub(crate) async fn run_captured_ddl(
    client: &tokio_postgres::Client,
    search_path: &str,
    role: &str,
    statement: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_catalog.set_config('search_path', $1, true), \
                    pg_catalog.set_config('role', $2, true)",
            &[&search_path, &role],
        )
        .await?;
    client.execute(statement, &[]).await?;
    client.batch_execute("RESET ROLE").await?;
    client.batch_execute("RESET search_path").await?;
    Ok(())
}

/// How many times a DDL that raced another session here is run again.
const RACE_RETRIES: usize = 3;

/// Columns, constraints and indexes of table `$1` (a name resolved with the session's
/// search_path), each as one line of text.
const TABLE_ITEMS: &str = "WITH t AS (SELECT $1::text::regclass AS oid) \
    SELECT pg_catalog.format('column %I %s%s%s', a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), \
             CASE WHEN a.attnotnull THEN ' not null' ELSE '' END, \
             ' default ' || pg_catalog.pg_get_expr(d.adbin, d.adrelid)) \
      FROM t JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped \
      LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
    UNION ALL \
    SELECT pg_catalog.format('constraint %I %s', c.conname, pg_catalog.pg_get_constraintdef(c.oid)) \
      FROM t JOIN pg_catalog.pg_constraint c ON c.conrelid = t.oid \
    UNION ALL \
    SELECT pg_catalog.pg_get_indexdef(i.indexrelid) FROM t JOIN pg_catalog.pg_index i ON i.indrelid = t.oid";

/// Whether a creating statement that failed because its object exists has its effect
/// here already: run on the probe's names (`crate::ddl::Probe`, as the captured role,
/// with the captured search_path, inside a savepoint rolled back at once), it makes
/// nothing the existing table lacks (`crate::ddl::already_here`). A `CREATE SEQUENCE`
/// has its effect here when a sequence of its name is here. Any failure of the probe
/// answers no: the caller sets the transaction aside.
async fn already_here(
    client: &tokio_postgres::Client,
    search_path: &str,
    role: &str,
    statement: &str,
) -> Result<bool, ApplyError> {
    if let Some((schema, name)) = created_sequence(statement) {
        let name = quote_written(schema.as_deref(), &name);
        let found = client
            .query_one(
                "SELECT pg_catalog.set_config('search_path', $1, true) IS NULL OR EXISTS \
                   (SELECT 1 FROM pg_catalog.pg_class WHERE oid = pg_catalog.to_regclass($2) AND relkind = 'S')",
                &[&search_path, &name],
            )
            .await
            .map_err(SqlError::of("looking for a sequence a ddl creates"))?
            .get::<_, bool>(0);
        client
            .batch_execute("RESET search_path")
            .await
            .map_err(SqlError::of("looking for a sequence a ddl creates"))?;
        return Ok(found);
    }
    let Some(p) = probe(statement) else {
        return Ok(false);
    };
    let qualified = |name: &str| quote_written(p.table.0.as_deref(), name);
    let (table, probe_table) = (qualified(&p.table.1), qualified(PROBE_TABLE));
    let items =
        |rows: Vec<tokio_postgres::Row>| -> Vec<String> { rows.iter().map(|r| r.get(0)).collect() };
    let probed = async {
        client.batch_execute("SAVEPOINT walsync_probe").await?;
        client
            .execute(
                "SELECT pg_catalog.set_config('search_path', $1, true), pg_catalog.set_config('role', $2, true)",
                &[&search_path, &role],
            )
            .await?;
        let existing = items(client.query(TABLE_ITEMS, &[&table]).await?);
        if p.needs_copy() {
            client
                .batch_execute(&format!(
                    "CREATE TABLE {probe_table} (LIKE {table} INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING IDENTITY)"
                ))
                .await?;
        }
        client.execute(p.statement.as_str(), &[]).await?;
        let probed = items(client.query(TABLE_ITEMS, &[&probe_table]).await?);
        Ok::<_, tokio_postgres::Error>((existing, probed))
    }
    .await;
    // Whatever the probe made or failed at goes, the role and search_path with it.
    client
        .batch_execute("ROLLBACK TO SAVEPOINT walsync_probe; RELEASE SAVEPOINT walsync_probe")
        .await
        .map_err(SqlError::of("rolling back the ddl probe"))?;
    Ok(match probed {
        Ok((existing, probed)) => crate::ddl::already_here(&probed, &existing, &p.renames()),
        Err(e) => {
            tracing::debug!(error = %e, "the ddl probe failed; the statement stays refused");
            false
        }
    })
}
