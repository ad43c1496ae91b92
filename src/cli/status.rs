//! `walsync status --config FILE [--json]`: this node at a glance — its links in and
//! their state, its slots (what peers have not taken yet), conflicts, clock offsets and
//! sequence headroom. Exits 1 when something needs a human: a stopped link, a link down or
//! retrying or a slot without a reader for longer than `[status] alert_after_s`, a parked
//! row, a slot that lost its WAL, a sequence with under 10 % of its ids left.
//!
//! `--cluster`: every node this config reaches (from the hub of a star: all of them), one
//! block each — links in, slots out, conflicts, DDL it has not applied yet — and every
//! node's problems; a node that cannot be reached is shown as such (a cut-off branch:
//! the hub's links say since when).

use std::process::ExitCode;

use serde_json::Value as Json;

use std::collections::HashSet;

use serde_json::json;

use super::{CliResult, ConfigArg};
use crate::config::{Config, Dsn};
use crate::node::connect::connect;
use crate::status::report::gather;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Every node this config reaches, not just this one.
    #[arg(long)]
    pub cluster: bool,
}

pub async fn run(args: StatusArgs) -> CliResult {
    let config = args.config.load()?;
    if args.cluster {
        return cluster(&config, args.json).await;
    }
    let me = config.this_node();
    let client = connect(&me.dsn, "walsync status").await?;
    let mut report = gather(&client, &config).await?;
    report["setup"] = crate::advice::gather(&client, &config).await?;
    if let Some(removal) = removal_seen_by_peers(&config).await {
        let text = json!(removal.to_string());
        if let Some(problems) = report["problems"].as_array_mut() {
            if !problems.contains(&text) {
                problems.push(text);
            }
        }
    }
    let needs_human = report["problems"].as_array().is_some_and(|p| !p.is_empty());
    if args.json {
        super::print_out(&serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&me.name.to_string(), &report);
    }
    Ok(if needs_human {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// How long `status` waits for a peer's answer about this node's removal.
const PEER_ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The removal of this node as recorded on any peer this config reaches (a node removed
/// by `remove-node` on a main whose config did not list it holds no record itself).
/// Peers that cannot be reached in [`PEER_ASK_TIMEOUT`] are passed over; a star's hub
/// asks nobody.
async fn removal_seen_by_peers(config: &Config) -> Option<crate::node::fence::Removal> {
    let me = config.this_node();
    // The hub of a star is where nodes are removed from; it does not ask every store.
    if config.cluster.topology == crate::config::Topology::Star
        && config.cluster.hub.as_deref() == Some(me.name.as_str())
    {
        return None;
    }
    let peers: Vec<_> = config.peer_nodes().into_iter().map(|(p, _)| p).collect();
    crate::node::fence::removal_seen_by(
        &peers,
        me.name.as_str(),
        "walsync status",
        PEER_ASK_TIMEOUT,
    )
    .await
}

/// A connection's encryption as the server sees it (`pg_stat_ssl`).
/// `local`: a Unix-socket session, which crosses no network.
fn encryption(tls: &Json, local: &Json) -> &'static str {
    match (tls.as_bool(), local.as_bool()) {
        (Some(true), _) => "tls",
        (Some(false), Some(true)) => "local",
        (Some(false), _) => "plain",
        (None, _) => "",
    }
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
            "  {:<24} {:<10} since {:<32} applied {:>8} transactions, last source commit {}  clock offset {}  {}",
            l["link"].as_str().unwrap_or(""),
            l["state"].as_str().unwrap_or(""),
            l["since"].as_str().unwrap_or("-"),
            l["transactions"],
            l["last_source_commit"].as_str().unwrap_or("-"),
            offset,
            encryption(&l["apply_tls"], &l["apply_local"])
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
            "  {:<28} {:<9} WAL retained {:>12} bytes, peer behind by {:>12} bytes  ({}{safe})  {}",
            s["slot"].as_str().unwrap_or(""),
            match (s["active"] == true, s["spooling"] == true) {
                (true, true) => "spooling",
                (true, false) => "active",
                _ => "inactive",
            },
            s["retained_wal_bytes"],
            s["lag_bytes"],
            s["wal_status"].as_str().unwrap_or(""),
            encryption(&s["stream_tls"], &s["stream_local"])
        );
        if s["spool_segments"].as_i64().unwrap_or(0) > 0 {
            println!(
                "      spooled for its peer: {} segment(s), {} bytes, since {}",
                s["spool_segments"],
                s["spool_bytes"],
                s["spool_since"].as_str().unwrap_or("?")
            );
        }
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
    print_setup(&r["setup"]);
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

/// Setup warnings (what a cut will do) and how unique-key collisions will be settled.
pub fn print_setup(setup: &Json) {
    let keys = &setup["unique_keys"];
    let count = |k: &str| keys[k].as_array().map_or(0, |a| a.len());
    println!(
        "\nunique keys: {} settled by renaming the loser's value, {} by merging the two rows, {} parking the second row (status --json lists them)",
        count("renamed"),
        count("merged"),
        count("parked")
    );
    for w in setup["warnings"].as_array().cloned().unwrap_or_default() {
        println!("  setup: {}", w.as_str().unwrap_or(""));
    }
}

/// One node's block of the cluster view.
struct NodeView {
    name: String,
    /// The report, or why it could not be read and whether the node refused walsync
    /// (credentials, pg_hba, a certificate) rather than could not be reached.
    report: Result<Json, (String, bool)>,
    /// `origin/seq` of every DDL statement logged here.
    ddl: HashSet<String>,
}

async fn view(name: String, dsn: &Dsn, config: &Config) -> NodeView {
    let read = async {
        let client = connect(dsn, "walsync status").await?;
        let report = gather(&client, config).await?;
        let ddl: HashSet<String> = client
            .query("SELECT origin || '/' || seq FROM walsync.ddl_log", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((report, ddl))
    };
    match read.await {
        Ok((report, ddl)) => NodeView {
            name,
            report: Ok(report),
            ddl,
        },
        Err(e) => {
            let refused = e
                .downcast_ref::<crate::node::connect::ConnectError>()
                .is_some_and(|c| c.is_permanent());
            NodeView {
                name,
                report: Err((crate::observability::error_chain(e.as_ref()), refused)),
                ddl: HashSet::new(),
            }
        }
    }
}

async fn cluster(config: &Config, as_json: bool) -> CliResult {
    let me = config.this_node();
    let mut views = vec![view(me.name.to_string(), &me.dsn, config).await];
    for (p, _) in config.peer_nodes() {
        views.push(view(p.name.to_string(), &p.dsn, config).await);
    }
    // DDL a node lacks: logged on some reachable node, authored elsewhere, not here.
    let all: HashSet<&String> = views.iter().flat_map(|v| &v.ddl).collect();
    let mut problems = Vec::new();
    let mut nodes = Vec::new();
    for v in &views {
        let pending = match &v.report {
            Ok(_) => all
                .iter()
                .filter(|k| !k.starts_with(&format!("{}/", v.name)) && !v.ddl.contains(**k))
                .count(),
            Err(_) => 0,
        };
        match &v.report {
            Ok(r) => {
                for p in r["problems"].as_array().cloned().unwrap_or_default() {
                    problems.push(format!("{}: {}", v.name, p.as_str().unwrap_or("")));
                }
                nodes.push(
                    json!({"node": v.name, "reachable": true, "pending_ddl": pending, "report": r}),
                );
            }
            Err((e, refused)) => {
                let what = if *refused {
                    "refused walsync's connection"
                } else {
                    "unreachable"
                };
                problems.push(format!("{}: {what}: {e}", v.name));
                nodes.push(
                    json!({"node": v.name, "reachable": false, "refused": refused, "error": e}),
                );
            }
        }
    }
    // Nodes the reachable ones keep a slot for that this config does not name (a branch
    // that joined later and is not in this file): shown, so that none goes unseen.
    let known: HashSet<&str> = views.iter().map(|v| v.name.as_str()).collect();
    let mut unlisted: Vec<String> = views
        .iter()
        .filter_map(|v| v.report.as_ref().ok())
        .flat_map(|r| r["slots"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| {
            s["slot"]
                .as_str()
                .and_then(|n| n.strip_prefix("walsync_to_"))
                .map(str::to_string)
        })
        .filter(|n| !known.contains(n.as_str()))
        .collect();
    unlisted.sort();
    unlisted.dedup();
    if as_json {
        let out = json!({"nodes": nodes, "problems": problems, "not_in_this_config": unlisted});
        super::print_out(&serde_json::to_string_pretty(&out)?);
    } else {
        for n in &nodes {
            print_node_block(n);
        }
        for n in &unlisted {
            println!(
                "== {n}: in the cluster (a slot is kept for it) but not in this config: add it to [[peers]] (links = \"none\" if another sidecar runs its links) to see it here"
            );
        }
        if problems.is_empty() {
            println!("\nnothing needs attention");
        } else {
            println!("\nNEEDS ATTENTION:");
            for p in &problems {
                println!("  - {p}");
            }
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_node_block(n: &Json) {
    let name = n["node"].as_str().unwrap_or("");
    if n["reachable"] != true {
        println!(
            "== {name}: {} ({})",
            if n["refused"] == true {
                "refused walsync's connection"
            } else {
                "unreachable"
            },
            n["error"].as_str().unwrap_or("")
        );
        return;
    }
    let r = &n["report"];
    println!(
        "== {name} (id {}): {} conflict(s) in the last 24 h, {} DDL statement(s) not applied yet, {} problem(s)",
        r["node"]["id"],
        r["conflicts"]["last_24h"],
        n["pending_ddl"],
        r["problems"].as_array().map_or(0, |p| p.len())
    );
    for l in r["links_in"].as_array().cloned().unwrap_or_default() {
        let age = l["seconds_in_state"]
            .as_f64()
            .map(|s| format!("{s:.0} s"))
            .unwrap_or_else(|| "-".into());
        println!(
            "   in   {:<24} {:<10} for {age}, {} transactions applied",
            l["link"].as_str().unwrap_or(""),
            l["state"].as_str().unwrap_or(""),
            l["transactions"]
        );
    }
    for s in r["slots"].as_array().cloned().unwrap_or_default() {
        println!(
            "   out  {:<24} {:<10} peer behind by {} bytes, {} bytes of WAL kept",
            s["slot"].as_str().unwrap_or(""),
            if s["active"] == true {
                "active"
            } else {
                "inactive"
            },
            s["lag_bytes"],
            s["retained_wal_bytes"]
        );
    }
}
