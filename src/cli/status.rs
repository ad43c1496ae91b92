//! `walsync status --config FILE [--json]`: this node at a glance — its links in and
//! their state, its slots (what peers have not taken yet), conflicts, clock offsets and
//! sequence headroom. Exits 1 when something needs a human: a stopped link, a slot that
//! lost its WAL, a sequence with under 10 % of its ids left.

use std::process::ExitCode;

use serde_json::{json, Value as Json};
use tokio_postgres::Client;

use super::{CliResult, ConfigArg};
use crate::node::connect::connect;
use crate::sequences::ids_left;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A sequence needs attention below this share of its ids left.
const HEADROOM_WARN: f64 = 0.10;

pub async fn run(args: StatusArgs) -> CliResult {
    let config = args.config.load()?;
    let me = config.this_node();
    let client = connect(&me.dsn, "walsync status").await?;
    let report = gather(&client, config.cluster.step).await?;
    let needs_human = report["problems"].as_array().is_some_and(|p| !p.is_empty());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&me.name.to_string(), &report);
    }
    Ok(if needs_human {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn gather(
    client: &Client,
    step: u32,
) -> Result<Json, Box<dyn std::error::Error + Send + Sync>> {
    let mut problems: Vec<String> = Vec::new();
    let node = client
        .query_one("SELECT name, id, step FROM walsync.node", &[])
        .await?;
    let links: Vec<Json> = client
        .query(
            "SELECT p.link, coalesce(s.state, 'unknown'), s.detail, s.since::text, p.source_lsn::text, \
                    p.source_commit_time::text, p.transactions, s.clock_offset_ms, \
                    extract(epoch FROM now() - p.source_commit_time)::float8 \
             FROM walsync.link_progress p LEFT JOIN walsync.link_status s USING (link) ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            json!({
                "link": r.get::<_, String>(0), "state": r.get::<_, String>(1), "detail": r.get::<_, Option<String>>(2),
                "since": r.get::<_, Option<String>>(3), "source_lsn": r.get::<_, String>(4),
                "last_source_commit": r.get::<_, Option<String>>(5), "transactions": r.get::<_, i64>(6),
                "clock_offset_ms": r.get::<_, Option<f64>>(7), "seconds_since_last_source_commit": r.get::<_, Option<f64>>(8),
            })
        })
        .collect();
    for l in &links {
        if l["state"] == "stopped" {
            problems.push(format!(
                "link {} is stopped: {}",
                l["link"].as_str().unwrap_or(""),
                l["detail"].as_str().unwrap_or("")
            ));
        }
    }
    let slots: Vec<Json> = client
        .query(
            "SELECT slot_name::text, active, coalesce(wal_status, '-'), \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, confirmed_flush_lsn::text \
             FROM pg_replication_slots WHERE slot_name LIKE 'walsync\\_to\\_%' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            json!({
                "slot": r.get::<_, String>(0), "active": r.get::<_, bool>(1), "wal_status": r.get::<_, String>(2),
                "retained_wal_bytes": r.get::<_, Option<i64>>(3), "confirmed_flush_lsn": r.get::<_, Option<String>>(4),
            })
        })
        .collect();
    for s in &slots {
        if s["wal_status"] == "lost" {
            problems.push(format!(
                "slot {} lost the WAL its peer still needed: that peer must be cloned again",
                s["slot"].as_str().unwrap_or("")
            ));
        }
    }
    let c = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE detected_at > now() - interval '24 hours') FROM walsync.conflicts",
            &[],
        )
        .await?;
    let (conflicts, conflicts_24h): (i64, i64) = (c.get(0), c.get(1));

    let ddl_warnings: Vec<Json> = client
        .query(
            "SELECT origin || '/' || seq, detected_at::text, warning, statement FROM walsync.ddl_warnings \
             ORDER BY detected_at DESC LIMIT 20",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            json!({ "ddl": r.get::<_, String>(0), "detected_at": r.get::<_, String>(1),
                    "warning": r.get::<_, String>(2), "statement": r.get::<_, String>(3) })
        })
        .collect();

    let mut sequences = Vec::new();
    for r in client
        .query(
            "SELECT format('%I.%I', schemaname, sequencename), increment_by, max_value FROM pg_sequences \
             WHERE schemaname <> 'walsync' ORDER BY 1",
            &[],
        )
        .await?
    {
        let name: String = r.get(0);
        let (increment, max_value): (i64, i64) = (r.get(1), r.get(2));
        let s = client.query_one(&format!("SELECT last_value, is_called FROM {name}"), &[]).await?;
        let (last, called): (i64, bool) = (s.get(0), s.get(1));
        let next = if called { last.saturating_add(increment) } else { last };
        let left = ids_left(next, increment, max_value);
        let total = ids_left(1, increment.max(1), max_value).max(1);
        let share = left as f64 / total as f64;
        let partitioned = increment == step as i64;
        if share < HEADROOM_WARN {
            problems.push(format!("sequence {name} has {left} ids left on this node ({:.1} %)", share * 100.0));
        }
        sequences.push(json!({ "sequence": name, "next": next, "increment": increment, "ids_left": left, "share_left": share, "partitioned": partitioned }));
    }
    sequences.sort_by(|a, b| {
        a["share_left"]
            .as_f64()
            .partial_cmp(&b["share_left"].as_f64())
            .unwrap_or(std::cmp::Ordering::Equal)
    });

    Ok(json!({
        "node": { "name": node.get::<_, String>(0), "id": node.get::<_, i32>(1), "step": node.get::<_, i32>(2) },
        "links_in": links,
        "slots": slots,
        "conflicts": { "total": conflicts, "last_24h": conflicts_24h },
        "sequences": sequences,
        "ddl_warnings": ddl_warnings,
        "problems": problems,
    }))
}

fn print_text(name: &str, r: &Json) {
    println!(
        "node {name} (id {} of {})",
        r["node"]["id"], r["node"]["step"]
    );
    println!("\nlinks into this node:");
    let links = r["links_in"].as_array().cloned().unwrap_or_default();
    if links.is_empty() {
        println!("  none yet (a link appears once its sidecar has connected)");
    }
    for l in &links {
        let offset = l["clock_offset_ms"]
            .as_f64()
            .map(|o| format!("{o:+.0} ms"))
            .unwrap_or_else(|| "-".into());
        println!(
            "  {:<24} {:<10} since {:<32} applied {:>8} transactions, last source commit {}  clock offset {}",
            l["link"].as_str().unwrap_or(""),
            l["state"].as_str().unwrap_or(""),
            l["since"].as_str().unwrap_or("-"),
            l["transactions"],
            l["last_source_commit"].as_str().unwrap_or("-"),
            offset
        );
        if let Some(d) = l["detail"].as_str() {
            println!("      {d}");
        }
    }
    println!("\nslots on this node (changes kept for peers):");
    for s in r["slots"].as_array().cloned().unwrap_or_default() {
        println!(
            "  {:<28} {:<9} WAL retained {:>12} bytes  ({})",
            s["slot"].as_str().unwrap_or(""),
            if s["active"] == true {
                "active"
            } else {
                "inactive"
            },
            s["retained_wal_bytes"],
            s["wal_status"].as_str().unwrap_or("")
        );
    }
    println!(
        "\nconflicts: {} in total, {} in the last 24 h (walsync conflicts --config ...)",
        r["conflicts"]["total"], r["conflicts"]["last_24h"]
    );
    let seqs = r["sequences"].as_array().cloned().unwrap_or_default();
    let unpartitioned = seqs.iter().filter(|s| s["partitioned"] == false).count();
    println!(
        "\nsequences: {} ({} not partitioned for this node); least headroom:",
        seqs.len(),
        unpartitioned
    );
    for s in seqs.iter().take(3) {
        println!(
            "  {:<40} {:>14} ids left ({:.1} %)",
            s["sequence"].as_str().unwrap_or(""),
            s["ids_left"],
            s["share_left"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    for w in r["ddl_warnings"].as_array().cloned().unwrap_or_default() {
        println!(
            "\nddl {} ({}): {}",
            w["ddl"].as_str().unwrap_or(""),
            w["detected_at"].as_str().unwrap_or(""),
            w["warning"].as_str().unwrap_or("")
        );
        println!("  {}", w["statement"].as_str().unwrap_or(""));
    }
    let problems = r["problems"].as_array().cloned().unwrap_or_default();
    if problems.is_empty() {
        println!("\nnothing needs attention");
    } else {
        println!("\nNEEDS ATTENTION:");
        for p in problems {
            println!("  - {}", p.as_str().unwrap_or(""));
        }
    }
}
