//! `walsync remove-node --config FILE NAME`: forgets a node on this node and on every
//! peer this config reaches (run it on the hub of a star to reach every branch): its slot
//! (`walsync_to_NAME`, so no WAL is kept for it any more), its replication origin and its
//! links' bookkeeping, and records the removal so that its links are refused by name at
//! both ends from then on (crate::node::fence). Stop the removed node's sidecar first;
//! remove it from the configs. A fresh `walsync join` brings it back.
//! An applier session still holding the origin is ended; its link reconnects by itself.

use std::process::ExitCode;

use super::{CliResult, ConfigArg};
use crate::config::Dsn;
use crate::names::{NodeName, PgName};
use crate::node::connect::connect;

#[derive(Debug, clap::Args)]
pub struct RemoveNodeArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The node to remove.
    pub name: String,
}

pub async fn run(args: RemoveNodeArgs) -> CliResult {
    let config = args.config.load()?;
    let gone = NodeName::parse(&args.name).map_err(|e| format!("{}: {e}", args.name))?;
    let me = config.this_node();
    if gone == me.name {
        return Err("a node cannot remove itself: run remove-node on another node".into());
    }
    let mut nodes: Vec<(String, Dsn)> = vec![(me.name.to_string(), me.dsn.clone())];
    for (p, _) in config.peer_nodes() {
        if p.name != gone {
            nodes.push((p.name.to_string(), p.dsn.clone()));
        }
    }
    let (slot, origin) = (PgName::slot_to(&gone), PgName::origin_of(&gone));
    let mut failed = 0;
    for (name, dsn) in nodes {
        match forget(&dsn, &slot, &origin, gone.as_str(), me.name.as_str()).await {
            Ok(done) if done.is_empty() => println!("{name}: nothing of {gone} here"),
            Ok(done) => println!("{name}: {}", done.join(", ")),
            Err(e) => {
                failed += 1;
                println!("{name}: FAILED: {e}");
            }
        }
    }
    // The removed node itself, if this config reaches it: its sidecar then exits at its
    // next start even before it hears from a peer.
    if let Some((p, _)) = config
        .peer_nodes()
        .into_iter()
        .find(|(p, _)| p.name == gone)
    {
        let fenced = async {
            let client = connect(&p.dsn, "walsync remove-node").await?;
            crate::node::fence::record_removal(&client, gone.as_str(), me.name.as_str()).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        };
        match tokio::time::timeout(std::time::Duration::from_secs(20), fenced).await {
            Ok(Ok(())) => println!(
                "{gone}: recorded its removal there too (its sidecar will refuse to start)"
            ),
            _ => println!("{gone}: not reachable; its peers refuse its links all the same"),
        }
    }
    if failed > 0 {
        return Err(format!(
            "{failed} node(s) still hold {gone}'s slot or origin: fix what is named above and run this again"
        )
        .into());
    }
    println!(
        "{gone} is removed; take it out of every config ([[peers]]) and restart those sidecars"
    );
    Ok(ExitCode::SUCCESS)
}

/// Drops replication origin `origin`. An applier session that last applied a change of
/// that author still holds it: that session is ended (its link reconnects by itself and
/// re-applies anything it had not committed), then the drop is tried again.
async fn drop_origin(
    client: &tokio_postgres::Client,
    origin: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let err = match client
            .execute("SELECT pg_replication_origin_drop($1)", &[&origin])
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let message = crate::apply::server_message(&err);
        // "could not drop replication origin with ID 2, in use by PID 1234"
        let holder: Option<i32> = message
            .rsplit_once("in use by PID ")
            .and_then(|(_, pid)| pid.trim().parse().ok());
        match holder {
            Some(pid) if std::time::Instant::now() < deadline => {
                client
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await?;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            _ => return Err(format!("dropping origin {origin}: {message}").into()),
        }
    }
}

async fn forget(
    dsn: &Dsn,
    slot: &str,
    origin: &str,
    gone: &str,
    removed_on: &str,
) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    let client = connect(dsn, "walsync remove-node").await?;
    let mut done = Vec::new();
    // First the fence: from now on this node refuses the removed node's links.
    crate::node::fence::record_removal(&client, gone, removed_on).await?;
    done.push(format!("refuses {gone}'s links from now on"));
    // A spooler reading the slot for the absent node (crate::spool) lets go of it.
    let spooler: Option<i32> = client
        .query_opt(
            "SELECT s.active_pid FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid \
             WHERE s.slot_name = $1 AND a.application_name LIKE 'walsync spool %'",
            &[&slot],
        )
        .await?
        .map(|r| r.get(0));
    if let Some(pid) = spooler {
        client
            .execute("SELECT pg_terminate_backend($1, 10000)", &[&pid])
            .await?;
        done.push(format!("stopped the spooler of slot {slot}"));
    }
    let active: Option<bool> = client
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|r| r.get(0));
    match active {
        Some(true) => {
            return Err(format!("slot {slot} is in use: stop {gone}'s sidecar first").into())
        }
        Some(false) => {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await?;
            done.push(format!("dropped slot {slot}"));
        }
        None => {}
    }
    let spooled: i64 = client
        .query_one(
            "WITH d AS (DELETE FROM walsync.spool_segments WHERE slot = $1 RETURNING data) \
             SELECT count(lo_unlink(data))::int8 FROM d",
            &[&slot],
        )
        .await?
        .get(0);
    if spooled > 0 {
        done.push(format!("deleted {spooled} spool segment(s) kept for it"));
    }
    let has_origin: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
            &[&origin],
        )
        .await?
        .get(0);
    if has_origin {
        drop_origin(&client, origin).await?;
        done.push(format!("dropped origin {origin}"));
    }
    let links = client
        .execute(
            "WITH p AS (DELETE FROM walsync.link_progress WHERE link LIKE $1 OR link LIKE $2 RETURNING 1), \
                  s AS (DELETE FROM walsync.link_status WHERE link LIKE $1 OR link LIKE $2 RETURNING 1) \
             SELECT 1 FROM p UNION ALL SELECT 1 FROM s",
            &[&format!("{gone}->%"), &format!("%->{gone}")],
        )
        .await?;
    if links > 0 {
        done.push("forgot its links' progress".into());
    }
    Ok(done)
}
