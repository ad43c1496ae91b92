//! `walsync ddl-replay`: the captured DDL this node has not applied yet, and a way past a
//! statement that cannot run here.
//!
//! `walsync ddl-replay --config F` (the default view, a dry run) lists, per peer, the DDL
//! captured there that this node has not applied, oldest first, with the statement each
//! will run. `--skip ORIGIN/SEQ` tells this node's applier to record that statement
//! without running it (after an operator made the change by hand): the stopped link
//! resumes at its next retry. `--apply` runs every pending statement now, in capture
//! order (a node restored from an old backup: its schema catches up before its links
//! start; they skip what is already here).

use std::collections::HashSet;
use std::process::ExitCode;

use super::{CliResult, ConfigArg};
use crate::ddl::statement_to_replay;
use crate::node::connect::connect;

#[derive(Debug, clap::Args)]
pub struct DdlReplayArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Skip the captured statement ORIGIN/SEQ on this node (as named in the link's error).
    #[arg(long, value_name = "ORIGIN/SEQ")]
    pub skip: Option<String>,
    /// Close the DDL warning ORIGIN/SEQ on this node (after the repair UPDATE on the
    /// author has replicated): status stops showing it and its columns count again when
    /// telling conflicts from sequential edits.
    #[arg(long, value_name = "ORIGIN/SEQ", conflicts_with_all = ["apply", "skip"])]
    pub resolve_warning: Option<String>,
    /// Accept the schema change ORIGIN/SEQ that this node refused (its author is not in
    /// `ddl_from`; in a star, a store's DDL recorded on main): run it here now, and send
    /// it on to every node as this node's.
    #[arg(long, value_name = "ORIGIN/SEQ", conflicts_with_all = ["apply", "skip", "resolve_warning"])]
    pub accept: Option<String>,
    /// Show what would be applied (the default).
    #[arg(long, conflicts_with_all = ["apply", "skip"])]
    pub dry_run: bool,
    /// Apply every pending statement now, in capture order, without waiting for the
    /// links: for a node restored from an old backup, whose schema is behind.
    #[arg(long, conflicts_with = "skip")]
    pub apply: bool,
}

pub async fn run(args: DdlReplayArgs) -> CliResult {
    let config = args.config.load()?;
    let me = config.this_node();
    let local = connect(&me.dsn, "walsync ddl-replay").await?;
    if let Some(id) = &args.resolve_warning {
        let (origin, seq) = origin_seq(id, "--resolve-warning")?;
        let n = local
            .execute(
                "UPDATE walsync.ddl_warnings SET resolved_at = now() \
                 WHERE origin = $1 AND seq = $2 AND resolved_at IS NULL",
                &[&origin, &seq],
            )
            .await?;
        if n == 0 {
            return Err(format!(
                "node {}: no open ddl warning {id} (walsync status lists them)",
                me.name
            )
            .into());
        }
        println!("node {}: ddl warning {id} resolved", me.name);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(id) = &args.accept {
        let (origin, seq) = origin_seq(id, "--accept")?;
        accept(
            &local,
            me.name.as_str(),
            &origin,
            seq,
            config.cluster.ddl_role.as_deref(),
        )
        .await?;
        println!(
            "node {}: ddl {id} accepted: it ran here and goes to every node as {}'s",
            me.name, me.name
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(id) = &args.skip {
        let (origin, seq) = origin_seq(id, "--skip")?;
        local
            .execute(
                "INSERT INTO walsync.ddl_skip (origin, seq) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&origin, &seq],
            )
            .await?;
        println!("node {}: ddl {origin}/{seq} will be recorded without running; a link stopped on it resumes at its next retry", me.name);
        return Ok(ExitCode::SUCCESS);
    }
    let applied: HashSet<(String, i64)> = local
        .query("SELECT origin, seq FROM walsync.ddl_log", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let skipped: HashSet<(String, i64)> = local
        .query("SELECT origin, seq FROM walsync.ddl_skip", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut pending: Vec<Pending> = Vec::new();
    let mut unreachable = 0;
    for (peer, _) in config.peer_nodes() {
        let client = match connect(&peer.dsn, "walsync ddl-replay").await {
            Ok(c) => c,
            Err(e) => {
                println!(
                    "peer {}: unreachable ({e}); its pending DDL is not known",
                    peer.name
                );
                unreachable += 1;
                continue;
            }
        };
        let rows = client
            .query(
                "SELECT origin, seq, captured_at::text, command_tag, query, statement_index, \
                        object_identities, search_path, role \
                 FROM walsync.ddl_log WHERE origin <> $1 ORDER BY captured_at, origin, seq",
                &[&me.name.as_str()],
            )
            .await?;
        for r in rows {
            let key: (String, i64) = (r.get(0), r.get(1));
            if applied.contains(&key) || pending.iter().any(|p| p.key == key) {
                continue;
            }
            pending.push(Pending {
                skip: skipped.contains(&key),
                key,
                from: peer.name.to_string(),
                captured_at: r.get(2),
                command_tag: r.get(3),
                query: r.get(4),
                statement_index: r.get(5),
                object_identities: r.get(6),
                search_path: r.get(7),
                role: r.get(8),
            });
        }
    }
    pending.sort_by(|a, b| (&a.captured_at, &a.key).cmp(&(&b.captured_at, &b.key)));
    for p in &pending {
        let statement = statement_to_replay(&p.query, p.statement_index)
            .map(|s| crate::ddl::redact_secrets(&s))
            .unwrap_or_else(|e| format!("(cannot replay: {e})"));
        let mark = if p.skip { "  [to skip]" } else { "" };
        println!(
            "{}/{}  from {}  {}  {}{mark}",
            p.key.0, p.key.1, p.from, p.captured_at, p.command_tag
        );
        println!("    {statement}");
    }
    if pending.is_empty() {
        println!(
            "node {}: no captured DDL waiting to be applied here",
            me.name
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !args.apply {
        println!("\n{} statement(s) not applied on node {} yet: they run when its links deliver them, or now with --apply", pending.len(), me.name);
        return Ok(ExitCode::SUCCESS);
    }
    if unreachable > 0 {
        return Err(
            "--apply needs every peer reachable, to apply their DDL in order; nothing was applied"
                .into(),
        );
    }
    // `[cluster] ddl_from`: statements from other nodes are not run here (the links
    // record them the same way).
    let ddl_from = config.ddl_from();
    let accepted = |origin: &str| {
        ddl_from
            .as_ref()
            .is_none_or(|a| a.iter().any(|n| n == origin))
    };
    for p in pending.iter().filter(|p| !p.skip && accepted(&p.key.0)) {
        let id = format!("{}/{}", p.key.0, p.key.1);
        apply_one(&local, p, config.cluster.ddl_role.as_deref()).await.map_err(|e| {
            format!(
                "ddl {id} failed on node {}: {e}; nothing after it was applied. Fix it by hand, then \
                 `walsync ddl-replay --skip {id}` and --apply again",
                me.name
            )
        })?;
        println!("applied {id}");
    }
    println!(
        "node {}: schema up to date with its peers' captured DDL; the links skip these statements when they deliver them",
        me.name
    );
    Ok(ExitCode::SUCCESS)
}

/// `ORIGIN/SEQ` as the link's errors and status name a captured statement.
/// Runs the refused statement `origin/seq` here in one transaction with a `ddl_log` row
/// of this node's (`accepts` naming it, so that its author skips it and the nodes that
/// refused it close their record), and closes this node's record of the refusal. The
/// statement runs with its captured search_path, as `ddl_role` if given, else as its
/// captured role.
async fn accept(
    client: &tokio_postgres::Client,
    me: &str,
    origin: &str,
    seq: i64,
    ddl_role: Option<&str>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let row = client
        .query_opt(
            "SELECT l.query, l.statement_index, l.command_tag, l.object_identities, l.search_path, l.role \
             FROM walsync.ddl_log l JOIN walsync.ddl_warnings w USING (origin, seq) \
             WHERE l.origin = $1 AND l.seq = $2 AND w.resolved_at IS NULL",
            &[&origin, &seq],
        )
        .await?
        .ok_or_else(|| {
            format!(
                "node {me}: no refused ddl {origin}/{seq} here (walsync status lists the ddl this node did not run)"
            )
        })?;
    let (query, index): (String, i32) = (row.get(0), row.get(1));
    let (tag, objects): (String, Option<Vec<String>>) = (row.get(2), row.get(3));
    let (search_path, captured_role): (String, String) = (row.get(4), row.get(5));
    let role = ddl_role.unwrap_or(&captured_role).to_string();
    let statement = statement_to_replay(&query, index)?;
    let accepted = async {
        crate::apply::run_captured_ddl(client, &search_path, &role, &statement).await?;
        client
            .execute(
                "INSERT INTO walsync.ddl_log (origin, seq, statement_index, query, command_tag, \
                   object_identities, search_path, role, accepts) \
                 VALUES ($1, nextval('walsync.ddl_log_seq'), 1, $2, $3, $4, $5, $6, $7)",
                &[
                    &me,
                    &statement,
                    &tag,
                    &objects,
                    &search_path,
                    &role,
                    &format!("{origin}/{seq}"),
                ],
            )
            .await?;
        client
            .execute(
                "UPDATE walsync.ddl_warnings SET resolved_at = now() WHERE origin = $1 AND seq = $2",
                &[&origin, &seq],
            )
            .await?;
        Ok(())
    };
    in_replica_transaction(client, accepted)
        .await
        .map_err(|e| format!("ddl {origin}/{seq} failed here: {e}; nothing was changed").into())
}

fn origin_seq(id: &str, flag: &str) -> Result<(String, i64), String> {
    id.split_once('/')
        .and_then(|(o, s)| Some((o.to_string(), s.parse::<i64>().ok()?)))
        .ok_or_else(|| {
            format!("{flag} {id}: expected ORIGIN/SEQ, e.g. main/42, as status names it")
        })
}

/// A captured statement a peer has and this node has not applied.
struct Pending {
    key: (String, i64),
    from: String,
    captured_at: String,
    command_tag: String,
    query: String,
    statement_index: i32,
    object_identities: Option<Vec<String>>,
    search_path: String,
    role: String,
    skip: bool,
}

/// Runs one captured statement here and logs it, in one transaction, in replica mode
/// (not captured again): as the applier would when the link delivers it.
/// Runs one pending statement with its `ddl_log` row, as `role` if given (`[cluster]
/// ddl_role`) or else as the role that ran it on its author.
async fn apply_one(
    client: &tokio_postgres::Client,
    p: &Pending,
    role: Option<&str>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let statement = statement_to_replay(&p.query, p.statement_index)?;
    let applied = async {
        crate::apply::run_captured_ddl(client, &p.search_path, role.unwrap_or(&p.role), &statement)
            .await?;
        client
            .execute(
                "INSERT INTO walsync.ddl_log (origin, seq, statement_index, query, command_tag, \
                   object_identities, search_path, role, captured_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::timestamptz)",
                &[
                    &p.key.0,
                    &p.key.1,
                    &p.statement_index,
                    &p.query,
                    &p.command_tag,
                    &p.object_identities,
                    &p.search_path,
                    &p.role,
                    &p.captured_at,
                ],
            )
            .await?;
        Ok(())
    };
    Ok(in_replica_transaction(client, applied).await?)
}

/// Runs `work` in one transaction in replica mode (the capture trigger stays quiet: what
/// it runs is not captured again), committed if it succeeds and rolled back otherwise.
/// A failure is the server's message.
async fn in_replica_transaction(
    client: &tokio_postgres::Client,
    work: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>,
) -> Result<(), String> {
    let message = |e: tokio_postgres::Error| crate::apply::server_message(&e);
    client
        .batch_execute("BEGIN; SET LOCAL session_replication_role = replica")
        .await
        .map_err(message)?;
    match work.await {
        Ok(()) => client.batch_execute("COMMIT").await.map_err(message),
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(message(e))
        }
    }
}
