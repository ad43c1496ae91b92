//! Who holds a slot on an upstream, in one place: the link and the spooler hand a slot to
//! each other through an advisory lock (the spool lock), end what an earlier session of
//! theirs left behind (a walsender, an apply session) and wait for a walsender to let go.
//! Used by `runtime::link` and `spool`, which decide when.

use std::time::Duration;

use tokio_postgres::Client;
use tracing::warn;

use crate::sql_error::SqlError;

/// The advisory lock name of `slot`'s spool lock: whoever holds it reads the slot.
pub fn lock_name(slot: &str) -> String {
    format!("walsync spool {slot}")
}

/// Waits, up to `within`, until no walsender holds `slot` (one that was just ended, or
/// just closed, lets go a moment later). A slot that is gone counts as released.
pub async fn wait_released(
    client: &Client,
    slot: &str,
    within: Duration,
) -> Result<(), tokio_postgres::Error> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let active = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .is_some_and(|r| r.get::<_, bool>(0));
        if !active || tokio::time::Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ends a walsender of `slot` that carries this link's application name `app` (a
/// sidecar killed without closing its connection leaves one until `wal_sender_timeout`)
/// and waits for the slot to be free. Another tool's walsender stays: the stream's start
/// then fails with the server's "slot is active" error, which names the pid. `false`:
/// there is no such slot.
pub async fn end_stale_walsender(
    client: &Client,
    slot: &str,
    app: &str,
    link: &str,
) -> Result<bool, SqlError> {
    let row = client
        .query_opt(
            "SELECT s.active_pid, a.application_name FROM pg_replication_slots s \
             LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(SqlError::of(format!("reading slot {slot}")))?;
    let Some(row) = row else {
        return Ok(false);
    };
    let pid: Option<i32> = row.get(0);
    let holder: Option<String> = row.get(1);
    if let (Some(pid), true) = (pid, holder.as_deref() == Some(app)) {
        warn!(
            link,
            slot,
            pid,
            "terminating a stale walsender of this link (its sidecar went away without closing)"
        );
        client
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .map_err(SqlError::of(format!("terminating walsender {pid}")))?;
        wait_released(client, slot, Duration::from_secs(10))
            .await
            .map_err(SqlError::of(format!("reading slot {slot}")))?;
    }
    Ok(true)
}

/// Ends every other session on the target that applies this link (`apply_app`). A
/// previous session whose connection outlived it (a sidecar killed while its TCP
/// connection stayed open, a COPY abandoned half-way) may still hold an open transaction:
/// its row locks and its uncommitted keys would make this session wait for ever.
pub async fn end_stale_appliers(
    target: &Client,
    apply_app: &str,
    link: &str,
) -> Result<(), SqlError> {
    let what = "ending stale apply sessions of this link on the target";
    let pids: Vec<i32> = target
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 \
             AND pid <> pg_backend_pid() AND datname = current_database()",
            &[&apply_app],
        )
        .await
        .map_err(SqlError::of(what))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for pid in pids {
        warn!(link, pid, "ending a stale apply session of this link on the target (its sidecar or session went away without closing)");
        target
            .execute("SELECT pg_terminate_backend($1, 10000)", &[&pid])
            .await
            .map_err(SqlError::of(what))?;
    }
    Ok(())
}

/// Link side, first step: ends an earlier session of the same link that may still hold
/// the slot's spool lock on the upstream (its sidecar killed, or its connection lost in a
/// cut the upstream has not noticed; a link has one session at a time), then tries to
/// take the lock. `false`: a spooler holds it; [`wait_for_spooler`] waits for it.
pub async fn try_take_over(control: &Client, app: &str, slot: &str) -> Result<bool, SqlError> {
    control
        .execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid() AND datname = current_database()",
            &[&app],
        )
        .await
        .map_err(SqlError::of("ending a stale session of this link on the upstream"))?;
    take_lock(control, slot, "taking the slot's spool lock").await
}

/// Spooler side: takes `slot`'s spool lock if nobody holds it. `false`: a link holds it.
pub async fn take_lock(control: &Client, slot: &str, what: &str) -> Result<bool, SqlError> {
    Ok(control
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext($1))",
            &[&lock_name(slot)],
        )
        .await
        .map_err(SqlError::of(what))?
        .get(0))
}

/// Link side: waits up to `wait` for the spooler of `slot` to finish its transaction
/// and hand the slot over (it notices the waiting lock request within a second).
pub async fn wait_for_spooler(
    control: &Client,
    slot: &str,
    wait: Duration,
) -> Result<(), SqlError> {
    control
        .batch_execute(&format!("SET lock_timeout = '{}ms'", wait.as_millis()))
        .await
        .map_err(SqlError::of("setting lock_timeout"))?;
    control
        .execute("SELECT pg_advisory_lock(hashtext($1))", &[&lock_name(slot)])
        .await
        .map_err(SqlError::of(format!(
            "taking slot {slot} over from its spooler (it did not let go within {} s)",
            wait.as_secs()
        )))?;
    control
        .batch_execute("SET lock_timeout = 0")
        .await
        .map_err(SqlError::of("resetting lock_timeout"))?;
    Ok(())
}

/// Spooler side: whether a session waits for an advisory lock this session holds (the
/// link, for the spool lock: the only lock the spooler's session holds).
pub async fn handover_wanted(ctl: &Client) -> Result<bool, SqlError> {
    Ok(ctl
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks w JOIN pg_locks h \
               ON h.locktype = w.locktype AND h.database IS NOT DISTINCT FROM w.database \
              AND h.classid IS NOT DISTINCT FROM w.classid AND h.objid IS NOT DISTINCT FROM w.objid \
              AND h.objsubid IS NOT DISTINCT FROM w.objsubid \
             WHERE w.locktype = 'advisory' AND NOT w.granted AND h.granted \
               AND h.pid = pg_backend_pid())",
            &[],
        )
        .await
        .map_err(SqlError::of("looking for a link waiting for the slot"))?
        .get(0))
}
