//! One node's state for operators: links into it, slots on it, conflicts, clock offsets,
//! sequence headroom, and the problems that need a person. `walsync status` prints it;
//! the sidecar's `/metrics` endpoint renders it for Prometheus.

use serde_json::{json, Value as Json};
use tokio_postgres::Client;

use crate::sequences::ids_left;
use crate::status::link::HEARTBEAT_STALE_S;

/// A sequence needs attention below this share of its ids left.
const HEADROOM_WARN: f64 = 0.10;

/// The report of the node `client` is connected to (see `walsync status --json`).
///
/// Link states are derived from facts that age out: a link whose runner has not stamped
/// its heartbeat for [`HEARTBEAT_STALE_S`] is `down` (since its last heartbeat), whatever
/// it last wrote. A link down or retrying, or a slot without a reader, for longer than
/// `alert_after_s` is a problem, as is a stopped link or a parked row.
pub async fn gather(
    client: &Client,
    config: &crate::config::Config,
) -> Result<Json, Box<dyn std::error::Error + Send + Sync>> {
    let (step, alert_after_s) = (config.cluster.step, config.status.alert_after_s);
    let tombstone_s = u64::from(config.cluster.tombstone_days) * 86_400;
    let mut problems: Vec<String> = Vec::new();
    let initialised: bool = client
        .query_one("SELECT to_regclass('walsync.node') IS NOT NULL", &[])
        .await?
        .get(0);
    if !initialised {
        return Err("this node has no walsync schema: it was never initialised (run walsync init with its config first)".into());
    }
    let node = client
        .query_one("SELECT name, id, step FROM walsync.node", &[])
        .await?;
    if let Some(removal) = crate::node::fence::removed(client, &[node.get::<_, &str>(0)]).await? {
        problems.push(removal.to_string());
    }
    let links: Vec<Json> = client
        .query(
            "SELECT p.link, \
                    CASE WHEN s.state IS NULL THEN 'unknown' WHEN l.down THEN 'down' ELSE s.state END, \
                    CASE WHEN l.down AND s.state <> 'down' \
                         THEN 'no sidecar has run this link since ' || coalesce(s.heartbeat_at::text, 'an older walsync') \
                              || ': the sidecar that runs it is stopped or cannot reach this node' \
                         ELSE s.detail END, \
                    (CASE WHEN l.down AND s.state <> 'down' THEN coalesce(s.heartbeat_at, s.since) ELSE s.since END)::text, \
                    p.source_lsn::text, \
                    p.source_commit_time::text, p.transactions, s.clock_offset_ms, \
                    extract(epoch FROM now() - p.source_commit_time)::float8, \
                    extract(epoch FROM now() - CASE WHEN l.down AND s.state <> 'down' \
                                                    THEN coalesce(s.heartbeat_at, s.since) ELSE s.since END)::float8, \
                    (SELECT bool_and(t.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl t USING (pid) \
                     WHERE a.application_name = 'walsync ' || p.link || ' apply'), \
                    s.heartbeat_at::text, \
                    (SELECT bool_and(a.client_addr IS NULL) FROM pg_stat_activity a \
                     WHERE a.application_name = 'walsync ' || p.link || ' apply'), \
                    a.n, a.waits_for \
             FROM walsync.link_progress p LEFT JOIN walsync.link_status s USING (link) \
             CROSS JOIN LATERAL (SELECT s.state IS NOT NULL AND (s.state = 'down' OR s.heartbeat_at IS NULL \
                                  OR s.heartbeat_at < now() - make_interval(secs => $1)) AS down) l \
             CROSS JOIN LATERAL (SELECT count(*) AS n, string_agg(DISTINCT w.waits_for, ', ') AS waits_for \
                                 FROM walsync.set_aside w WHERE w.link = p.link) a \
             WHERE p.link NOT LIKE '% set aside' \
             ORDER BY 1",
            &[&(HEARTBEAT_STALE_S as f64)],
        )
        .await?
        .iter()
        .map(|r| {
            json!({
                "link": r.get::<_, String>(0), "state": r.get::<_, String>(1), "detail": r.get::<_, Option<String>>(2),
                "since": r.get::<_, Option<String>>(3), "source_lsn": r.get::<_, String>(4),
                "last_source_commit": r.get::<_, Option<String>>(5), "transactions": r.get::<_, i64>(6),
                "clock_offset_ms": r.get::<_, Option<f64>>(7), "seconds_since_last_source_commit": r.get::<_, Option<f64>>(8),
                "seconds_in_state": r.get::<_, Option<f64>>(9),
                // Whether the link's apply session into this node is encrypted (TLS), as
                // the server sees it; null while no apply session is connected.
                "apply_tls": r.get::<_, Option<bool>>(10),
                "heartbeat_at": r.get::<_, Option<String>>(11),
                // Whether that session came through a Unix socket (no network to encrypt).
                "apply_local": r.get::<_, Option<bool>>(12),
                // Source transactions set aside until their table is here (runtime::set_aside).
                "set_aside": r.get::<_, i64>(13),
                "set_aside_waits_for": r.get::<_, Option<String>>(14),
            })
        })
        .collect();
    for l in &links {
        if let Some(offset) = l["clock_offset_ms"].as_f64() {
            if offset.abs() > crate::status::link::CLOCK_OFFSET_WARN_MS {
                problems.push(format!(
                    "link {}: the upstream's clock is {:.1} s {} this sidecar's: last-writer-wins decides by these clocks; synchronise them (NTP)",
                    l["link"].as_str().unwrap_or(""),
                    offset.abs() / 1000.0,
                    if offset > 0.0 { "ahead of" } else { "behind" }
                ));
            }
        }
        let link = l["link"].as_str().unwrap_or("");
        let detail = l["detail"].as_str().unwrap_or("");
        if let Some(n) = l["set_aside"].as_i64().filter(|n| *n > 0) {
            let waits = l["set_aside_waits_for"].as_str().unwrap_or("");
            problems.push(format!(
                "link {link}: {n} transaction(s) set aside, waiting for {waits}: they apply by themselves, in order, \
                 once it is here and their rows fit (create or change it, or accept the DDL that does: walsync ddl-replay \
                 --accept, see the DDL warnings); later changes to the tables they change wait behind them \
                 (walsync conflicts set-aside)"
            ));
        }
        let for_s = l["seconds_in_state"].as_f64().unwrap_or(0.0);
        match l["state"].as_str() {
            Some("stopped") => problems.push(format!("link {link} is stopped: {detail}")),
            Some("down") if for_s > alert_after_s as f64 => problems.push(format!(
                "link {link} has been down for {for_s:.0} s: {detail}"
            )),
            Some("retrying") if for_s > alert_after_s as f64 => problems.push(format!(
                "link {link} has been retrying for {for_s:.0} s: {detail}"
            )),
            _ => {}
        }
    }
    let slots: Vec<Json> = client
        .query(
            "SELECT slot_name::text, active, coalesce(wal_status, '-'), \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, confirmed_flush_lsn::text, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8, safe_wal_size, \
                    g.segments, g.bytes, g.since, \
                    EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = s.active_pid \
                            AND a.application_name LIKE 'walsync spool %'), \
                    (SELECT t.ssl FROM pg_stat_ssl t WHERE t.pid = s.active_pid), \
                    (SELECT a.client_addr IS NULL FROM pg_stat_activity a WHERE a.pid = s.active_pid), \
                    (SELECT extract(epoch FROM now() - a.inactive_since)::float8 \
                     FROM walsync.slot_activity a WHERE a.slot = s.slot_name AND NOT s.active) \
             FROM pg_replication_slots s \
             CROSS JOIN LATERAL (SELECT count(*) AS segments, coalesce(sum(bytes), 0)::int8 AS bytes, \
                                        min(created_at)::text AS since \
                                 FROM walsync.spool_segments WHERE slot = s.slot_name) g \
             WHERE slot_name LIKE 'walsync\\_to\\_%' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            json!({
                "slot": r.get::<_, String>(0), "active": r.get::<_, bool>(1), "wal_status": r.get::<_, String>(2),
                "retained_wal_bytes": r.get::<_, Option<i64>>(3), "confirmed_flush_lsn": r.get::<_, Option<String>>(4),
                "lag_bytes": r.get::<_, Option<i64>>(5), "safe_wal_bytes": r.get::<_, Option<i64>>(6),
                "spool_segments": r.get::<_, i64>(7), "spool_bytes": r.get::<_, i64>(8),
                "spool_since": r.get::<_, Option<String>>(9), "spooling": r.get::<_, bool>(10),
                // Whether the stream reading this slot is encrypted; null while none reads it.
                "stream_tls": r.get::<_, Option<bool>>(11),
                // Seconds without a reader, as this node's sidecar saw it (null: active,
                // or no sidecar has watched it since it became inactive).
                "inactive_seconds": r.get::<_, Option<f64>>(13),
                "stream_local": r.get::<_, Option<bool>>(12),
            })
        })
        .collect();
    for s in &slots {
        if let Some(idle) = s["inactive_seconds"]
            .as_f64()
            .filter(|&i| i > alert_after_s as f64)
        {
            problems.push(format!(
                "slot {} has had no reader for {idle:.0} s: its peer's link is down (see that node's status)",
                s["slot"].as_str().unwrap_or("")
            ));
        }
        if s["inactive_seconds"]
            .as_f64()
            .is_some_and(|i| i > tombstone_s as f64)
        {
            problems.push(format!(
                "slot {} has had no reader for longer than [cluster] tombstone_days ({} days): the keys of rows \
                 deleted here since are forgotten, so its peer's updates of them will be recorded as update_missing \
                 instead of being decided by time (decision 0016); raise tombstone_days before it returns, or join \
                 it again (walsync remove-node, then walsync join) if what it wrote meanwhile is not needed",
                s["slot"].as_str().unwrap_or(""),
                config.cluster.tombstone_days
            ));
        }
        if s["wal_status"] == "unreserved" {
            problems.push(format!(
                "slot {} holds more WAL than max_wal_size; {} more bytes of WAL and it loses what its peer needs",
                s["slot"].as_str().unwrap_or(""),
                s["safe_wal_bytes"]
            ));
        }
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
    let parked: i64 = client
        .query_one(
            "SELECT count(*) FROM walsync.conflicts WHERE outcome = 'parked' AND reapplied_at IS NULL",
            &[],
        )
        .await?
        .get(0);
    if parked > 0 {
        problems.push(format!(
            "{parked} row(s) parked: they collide on a unique key no rule settles and were not written here; \
             see them with `walsync conflicts --outcome parked`, settle the two rows by hand, then \
             `walsync conflicts reapply ID` (or `walsync conflicts resolve ID` if nothing needs writing)"
        ));
    }
    let by_kind: serde_json::Map<String, Json> = client
        .query(
            "SELECT kind, count(*) FROM walsync.conflicts GROUP BY kind ORDER BY kind",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(0), json!(r.get::<_, i64>(1))))
        .collect();
    let max_slot_wal_keep: String = client
        .query_one("SELECT current_setting('max_slot_wal_keep_size')", &[])
        .await?
        .get(0);

    let ddl_warnings: Vec<Json> = client
        .query(
            "SELECT origin || '/' || seq, detected_at::text, warning, statement FROM walsync.ddl_warnings \
             WHERE resolved_at IS NULL ORDER BY detected_at DESC LIMIT 20",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            json!({ "ddl": r.get::<_, String>(0), "detected_at": r.get::<_, String>(1),
                    "warning": r.get::<_, String>(2), "statement": r.get::<_, String>(3) })
        })
        .collect();

    // Each sequence as the sequence itself shows it (`pg_sequences.last_value` hides one
    // not called since its restart: a copy of another node's, crate::sequences).
    let my_id = node.get::<_, i32>(1) as u32;
    let mut sequences = Vec::new();
    for s in crate::sequences::read_all(client).await? {
        let next = s.next();
        let left = next.map_or(0, |n| ids_left(n, s.increment, s.max_value));
        let total = ids_left(1, s.increment.max(1), s.max_value).max(1);
        let share = left as f64 / total as f64;
        let partitioned = s.serves(my_id, step);
        let name = &s.name;
        match next {
            None => problems.push(format!(
                "sequence {name} cannot be read by this role, so it is not known to hand out this node's ids: \
                 GRANT SELECT ON SEQUENCE {name} to it (or run walsync init --grant-to ROLE again)"
            )),
            Some(n) if !partitioned => problems.push(format!(
                "sequence {name} hands out {n} next by {}, not only this node's ids (\u{2261} {} mod {step}): \
                 the sidecar's guard restarts it within seconds; if this stays, run walsync init",
                s.increment,
                my_id % step
            )),
            Some(_) if share < HEADROOM_WARN => problems.push(format!(
                "sequence {name} has {left} ids left on this node ({:.1} %)",
                share * 100.0
            )),
            Some(_) => {}
        }
        sequences.push(json!({ "sequence": name, "next": next, "increment": s.increment, "ids_left": left, "share_left": share, "partitioned": partitioned }));
    }
    sequences.sort_by(|a, b| {
        a["share_left"]
            .as_f64()
            .partial_cmp(&b["share_left"].as_f64())
            .unwrap_or(std::cmp::Ordering::Equal)
    });

    Ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node": { "name": node.get::<_, String>(0), "id": node.get::<_, i32>(1), "step": node.get::<_, i32>(2) },
        "links_in": links,
        "slots": slots,
        "conflicts": { "total": conflicts, "last_24h": conflicts_24h, "by_kind": by_kind },
        "max_slot_wal_keep_size": max_slot_wal_keep,
        "sequences": sequences,
        "ddl_warnings": ddl_warnings,
        "problems": problems,
    }))
}
