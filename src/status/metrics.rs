//! The sidecar's HTTP endpoint (`[metrics] listen`): `/metrics` in Prometheus' text format,
//! `/healthz` (the sidecar answers) and `/readyz` (its node's database answers, walsync
//! is initialised there and nothing needs a person). Both read the node's report
//! ([`crate::status::report`]), the figures `walsync status` shows, from a cache at most
//! [`REPORT_MAX_AGE`] old, filled over one database connection kept for it: however many
//! scrapers ask, the node sees at most one walsync metrics session and one report per
//! interval. A bare HTTP/1.1 server: one request per connection, GET only, no dependency
//! for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::config::Config;
use crate::node::connect::connect;
use crate::status::report::gather;

/// A 0/1 gauge per slot: metric name, help, and when it is 1.
type SlotFlag = (&'static str, &'static str, fn(&Json) -> bool);

/// A request must arrive whole within this, and fit in this many bytes.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
const REQUEST_MAX: usize = 8192;

/// A report this recent is served again rather than read anew.
pub const REPORT_MAX_AGE: Duration = Duration::from_secs(2);

/// The last report read, and the one connection it is read over.
#[derive(Default)]
struct Cache {
    client: Option<tokio_postgres::Client>,
    report: Option<(Instant, Result<Json, String>)>,
}

/// Shared by every request. A tokio mutex, held across the report's queries on purpose:
/// a request that finds the report stale reads it while the others wait for that read,
/// so one connection and one read serve them all.
type SharedCache = Arc<tokio::sync::Mutex<Cache>>;

/// The node's report, at most [`REPORT_MAX_AGE`] old.
async fn report(config: &Config, cache: &SharedCache) -> Result<Json, String> {
    let mut cache = cache.lock().await;
    if let Some((at, r)) = &cache.report {
        if at.elapsed() < REPORT_MAX_AGE {
            return r.clone();
        }
    }
    if cache.client.as_ref().is_none_or(|c| c.is_closed()) {
        let me = config.this_node();
        cache.client = connect(&me.dsn, "walsync metrics").await.ok();
    }
    let r = match &cache.client {
        Some(client) => gather(client, config).await.map_err(|e| e.to_string()),
        None => Err(format!(
            "cannot reach node {}'s database",
            config.this_node().name
        )),
    };
    if r.is_err() {
        cache.client = None;
    }
    cache.report = Some((Instant::now(), r.clone()));
    r
}

pub async fn serve(
    listener: TcpListener,
    config: Config,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let cache = SharedCache::default();
    loop {
        let (socket, _) = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "metrics endpoint: accept failed");
                    continue;
                }
            },
        };
        let config = config.clone();
        let cache = cache.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(socket, &config, &cache).await {
                debug!(error = %e, "metrics endpoint: request failed");
            }
        });
    }
}

async fn answer(
    mut socket: TcpStream,
    config: &Config,
    cache: &SharedCache,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let read = tokio::time::timeout(REQUEST_DEADLINE, async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < REQUEST_MAX {
            let n = socket.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let line = String::from_utf8_lossy(&buf);
    let mut words = line.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET", "/healthz") => ("200 OK", "ok\n".to_string()),
        ("GET", "/readyz") => match ready(config, cache).await {
            Ok(()) => ("200 OK", "ready\n".to_string()),
            Err(why) => ("503 Service Unavailable", format!("not ready: {why}\n")),
        },
        ("GET", "/metrics") => ("200 OK", metrics(config, cache).await),
        ("GET", _) => (
            "404 Not Found",
            "not found: try /metrics, /healthz or /readyz\n".to_string(),
        ),
        _ => ("405 Method Not Allowed", "GET only\n".to_string()),
    };
    let content_type = if path == "/metrics" {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body.as_bytes()).await?;
    socket.shutdown().await
}

/// Ready: the node's database answers, walsync is initialised there, and nothing needs
/// a person (the problems `walsync status` lists, which age in: a link down or
/// retrying, or a slot without a reader, for longer than `[status] alert_after_s`).
async fn ready(config: &Config, cache: &SharedCache) -> Result<(), String> {
    let report = report(config, cache)
        .await
        .map_err(|e| format!("node {}: {e}", config.this_node().name))?;
    match report["problems"].as_array() {
        Some(problems) if !problems.is_empty() => Err(problems
            .iter()
            .map(|p| p.as_str().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")),
        _ => Ok(()),
    }
}

async fn metrics(config: &Config, cache: &SharedCache) -> String {
    let node = config.this_node().name.to_string();
    match report(config, cache).await {
        Ok(r) => render(&node, Some(&r)),
        Err(e) => {
            debug!(error = %e, "metrics: cannot read the node");
            render(&node, None)
        }
    }
}

/// Prometheus text for a node's report (`None`: the node could not be read).
pub fn render(node: &str, report: Option<&Json>) -> String {
    let mut out = Out::default();
    out.family(
        "walsync_node_up",
        "gauge",
        "1 when the sidecar could read its node's database for this scrape.",
    );
    out.sample(
        "walsync_node_up",
        &[("node", node)],
        report.is_some() as u8 as f64,
    );
    let Some(r) = report else {
        return out.0;
    };
    let arr = |k: &str| r[k].as_array().cloned().unwrap_or_default();
    let links = arr("links_in");
    out.family(
        "walsync_link_state",
        "gauge",
        "1 for the state each link into this node is in (streaming, replaying: applying what was spooled while it was away, retrying: cut off or failing, stopped: needs a person, down: no sidecar runs it).",
    );
    for l in &links {
        let link = l["link"].as_str().unwrap_or("");
        for state in ["streaming", "replaying", "retrying", "stopped", "down"] {
            let v = (l["state"].as_str() == Some(state)) as u8 as f64;
            out.sample("walsync_link_state", &[("link", link), ("state", state)], v);
        }
    }
    let per_link = [
        ("walsync_link_state_seconds", "gauge", "Seconds the link has been in its current state (how long a branch has been cut off).", "seconds_in_state", 1.0),
        ("walsync_link_transactions_total", "counter", "Source transactions applied on this node over the link.", "transactions", 1.0),
        ("walsync_link_last_source_commit_age_seconds", "gauge", "Seconds since the commit time (on its author) of the last transaction applied over the link.", "seconds_since_last_source_commit", 1.0),
        ("walsync_link_clock_offset_seconds", "gauge", "The upstream's clock minus this sidecar's, measured on the link.", "clock_offset_ms", 0.001),
        ("walsync_link_set_aside_transactions", "gauge", "Source transactions of the link set aside on this node until their table is here or their rows fit (walsync conflicts set-aside).", "set_aside", 1.0),
    ];
    for (name, kind, help, key, scale) in per_link {
        out.family(name, kind, help);
        for l in &links {
            if let Some(v) = l[key].as_f64() {
                out.sample(
                    name,
                    &[("link", l["link"].as_str().unwrap_or(""))],
                    v * scale,
                );
            }
        }
    }
    let slots = arr("slots");
    let per_slot = [
        ("walsync_slot_retained_wal_bytes", "WAL this node keeps for the slot's peer (from the slot's restart point)."),
        ("walsync_slot_lag_bytes", "WAL the slot's peer has not confirmed yet."),
        ("walsync_slot_safe_wal_bytes", "WAL that can still be written before the slot loses what its peer needs (set only with max_slot_wal_keep_size)."),
        ("walsync_slot_spooled_bytes", "Changes spooled for the slot's absent peer (walsync.spool_segments), waiting for it to return."),
    ];
    for (name, help) in per_slot {
        out.family(name, "gauge", help);
        let key = match name {
            "walsync_slot_retained_wal_bytes" => "retained_wal_bytes",
            "walsync_slot_lag_bytes" => "lag_bytes",
            "walsync_slot_spooled_bytes" => "spool_bytes",
            _ => "safe_wal_bytes",
        };
        for s in &slots {
            if let Some(v) = s[key].as_f64() {
                out.sample(name, &[("slot", s["slot"].as_str().unwrap_or(""))], v);
            }
        }
    }
    let flags: [SlotFlag; 3] = [
        (
            "walsync_slot_active",
            "1 while the slot is read: by its peer, or by this node's spooler while the peer is away.",
            |s| s["active"] == true,
        ),
        (
            "walsync_slot_spooling",
            "1 while this node's spooler reads the slot for its absent peer.",
            |s| s["spooling"] == true,
        ),
        (
            "walsync_slot_wal_lost",
            "1 when the slot lost WAL its peer needed (the peer must be copied again).",
            |s| s["wal_status"] == "lost",
        ),
    ];
    for (name, help, is_set) in flags {
        out.family(name, "gauge", help);
        for s in &slots {
            let v = is_set(s) as u8 as f64;
            out.sample(name, &[("slot", s["slot"].as_str().unwrap_or(""))], v);
        }
    }
    out.family(
        "walsync_conflicts_total",
        "counter",
        "Conflicts this node decided, by kind (walsync conflicts lists them).",
    );
    if let Some(kinds) = r["conflicts"]["by_kind"].as_object() {
        for (kind, n) in kinds {
            out.sample(
                "walsync_conflicts_total",
                &[("kind", kind)],
                n.as_f64().unwrap_or(0.0),
            );
        }
    }
    let sequences = arr("sequences");
    out.family(
        "walsync_sequence_headroom_ratio_min",
        "gauge",
        "The smallest share of ids left on this node among its sequences.",
    );
    if let Some(min) = sequences
        .iter()
        .filter_map(|s| s["share_left"].as_f64())
        .reduce(f64::min)
    {
        out.sample("walsync_sequence_headroom_ratio_min", &[], min);
    }
    out.family(
        "walsync_sequences_unpartitioned",
        "gauge",
        "Sequences that do not hand out this node's ids (should be 0).",
    );
    let unpartitioned = sequences
        .iter()
        .filter(|s| s["partitioned"] == false)
        .count();
    out.sample("walsync_sequences_unpartitioned", &[], unpartitioned as f64);
    out.family(
        "walsync_ddl_warnings",
        "gauge",
        "Replayed DDL that left rows different from their author's (walsync status shows them).",
    );
    out.sample(
        "walsync_ddl_warnings",
        &[],
        arr("ddl_warnings").len() as f64,
    );
    out.family(
        "walsync_problems",
        "gauge",
        "Things that need a person now (walsync status lists them and exits 1).",
    );
    out.sample("walsync_problems", &[], arr("problems").len() as f64);
    out.0
}

#[derive(Default)]
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.0
            .push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", labels.join(","))
        };
        self.0.push_str(&format!("{name}{labels} {value}\n"));
    }
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_report_renders_as_prometheus_text() {
        let report = json!({
            "links_in": [{"link": "branch1->main", "state": "retrying", "transactions": 42,
                          "seconds_in_state": 7200.5, "clock_offset_ms": -250.0, "set_aside": 2,
                          "seconds_since_last_source_commit": null}],
            "slots": [{"slot": "walsync_to_branch1", "active": false, "wal_status": "lost",
                       "retained_wal_bytes": 1048576, "lag_bytes": 4096, "safe_wal_bytes": null,
                       "spool_bytes": 65536, "spooling": true}],
            "conflicts": {"by_kind": {"insert_exists": 3}},
            "sequences": [{"share_left": 0.5, "partitioned": true}, {"share_left": 0.25, "partitioned": false}],
            "ddl_warnings": [], "problems": ["slot lost"],
        });
        let text = render("main", Some(&report));
        for line in [
            "walsync_node_up{node=\"main\"} 1",
            "walsync_link_state{link=\"branch1->main\",state=\"retrying\"} 1",
            "walsync_link_state{link=\"branch1->main\",state=\"streaming\"} 0",
            "walsync_link_state_seconds{link=\"branch1->main\"} 7200.5",
            "walsync_link_transactions_total{link=\"branch1->main\"} 42",
            "walsync_link_clock_offset_seconds{link=\"branch1->main\"} -0.25",
            "walsync_link_set_aside_transactions{link=\"branch1->main\"} 2",
            "walsync_slot_retained_wal_bytes{slot=\"walsync_to_branch1\"} 1048576",
            "walsync_slot_lag_bytes{slot=\"walsync_to_branch1\"} 4096",
            "walsync_slot_wal_lost{slot=\"walsync_to_branch1\"} 1",
            "walsync_slot_spooled_bytes{slot=\"walsync_to_branch1\"} 65536",
            "walsync_slot_spooling{slot=\"walsync_to_branch1\"} 1",
            "walsync_slot_active{slot=\"walsync_to_branch1\"} 0",
            "walsync_conflicts_total{kind=\"insert_exists\"} 3",
            "walsync_sequence_headroom_ratio_min 0.25",
            "walsync_sequences_unpartitioned 1",
            "walsync_problems 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(
            !text.contains("last_source_commit_age_seconds{"),
            "no sample for an unknown value"
        );
        // Every sample belongs to a family declared before it.
        let mut declared = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{name} has no TYPE line");
            }
        }
    }

    #[test]
    fn an_unreadable_node_is_reported_down_and_labels_are_escaped() {
        assert_eq!(
            render("a\"b", None).lines().last(),
            Some("walsync_node_up{node=\"a\\\"b\"} 0")
        );
    }
}
