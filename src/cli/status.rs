//! `walsync status --config FILE [--json]`: this node at a glance — its links in and
//! their state, its slots (what peers have not taken yet), conflicts, clock offsets and
//! sequence headroom. Exits 1 when something needs a human: a stopped link, a slot that
//! lost its WAL, a sequence with under 10 % of its ids left.

use std::process::ExitCode;

use serde_json::Value as Json;

use super::{CliResult, ConfigArg};
use crate::node::connect::connect;
use crate::report::gather;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

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
    println!(
        "\nslots on this node (changes kept for peers; max_slot_wal_keep_size = {}):",
        r["max_slot_wal_keep_size"].as_str().unwrap_or("?")
    );
    for s in r["slots"].as_array().cloned().unwrap_or_default() {
        let safe = match s["safe_wal_bytes"].as_i64() {
            Some(b) => format!(", {b} bytes more before it loses WAL"),
            None => String::new(),
        };
        println!(
            "  {:<28} {:<9} WAL retained {:>12} bytes, peer behind by {:>12} bytes  ({}{safe})",
            s["slot"].as_str().unwrap_or(""),
            if s["active"] == true {
                "active"
            } else {
                "inactive"
            },
            s["retained_wal_bytes"],
            s["lag_bytes"],
            s["wal_status"].as_str().unwrap_or("")
        );
    }
    let kinds: Vec<String> = r["conflicts"]["by_kind"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    println!(
        "\nconflicts: {} in total{}, {} in the last 24 h (walsync conflicts --config ...)",
        r["conflicts"]["total"],
        if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", kinds.join(", "))
        },
        r["conflicts"]["last_24h"]
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
