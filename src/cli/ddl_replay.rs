//! `walsync ddl-replay`: the captured DDL this node has not applied yet, and a way past a
//! statement that cannot run here.
//!
//! `walsync ddl-replay --config F` (the default view, a dry run) lists, per peer, the DDL
//! captured there that this node has not applied, oldest first, with the statement each
//! will run. `--skip ORIGIN/SEQ` tells this node's applier to record that statement
//! without running it (after an operator made the change by hand): the stopped link
//! resumes at its next retry.

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
    /// Show what would be applied (the default; nothing else runs without --skip).
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(args: DdlReplayArgs) -> CliResult {
    let config = args.config.load()?;
    let me = config.this_node();
    let local = connect(&me.dsn, "walsync ddl-replay").await?;
    if let Some(id) = &args.skip {
        let (origin, seq) = id
            .split_once('/')
            .and_then(|(o, s)| Some((o.to_string(), s.parse::<i64>().ok()?)))
            .ok_or_else(|| {
                format!(
                    "--skip {id}: expected ORIGIN/SEQ, e.g. main/42, as the link's error names it"
                )
            })?;
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
    let mut pending = 0;
    let mut seen = HashSet::new();
    for (peer, _) in config.peer_nodes() {
        let client = match connect(&peer.dsn, "walsync ddl-replay").await {
            Ok(c) => c,
            Err(e) => {
                println!(
                    "peer {}: unreachable ({e}); its pending DDL is not known",
                    peer.name
                );
                continue;
            }
        };
        let rows = client
            .query(
                "SELECT origin, seq, captured_at::text, command_tag, query, statement_index FROM walsync.ddl_log \
                 WHERE origin <> $1 ORDER BY captured_at, origin, seq",
                &[&me.name.as_str()],
            )
            .await?;
        for r in rows {
            let key: (String, i64) = (r.get(0), r.get(1));
            if applied.contains(&key) || !seen.insert(key.clone()) {
                continue;
            }
            pending += 1;
            let statement = statement_to_replay(r.get(4), r.get(5))
                .unwrap_or_else(|e| format!("(cannot replay: {e})"));
            let mark = if skipped.contains(&key) {
                "  [to skip]"
            } else {
                ""
            };
            println!(
                "{}/{}  from {}  {}  {}{mark}",
                key.0,
                key.1,
                peer.name,
                r.get::<_, String>(2),
                r.get::<_, String>(3)
            );
            println!("    {statement}");
        }
    }
    if pending == 0 {
        println!(
            "node {}: no captured DDL waiting to be applied here",
            me.name
        );
    } else {
        println!("\n{pending} statement(s) not applied on node {} yet: they run when its links deliver them", me.name);
    }
    Ok(ExitCode::SUCCESS)
}
