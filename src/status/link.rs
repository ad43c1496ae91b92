//! A link's state as the operator sees it (`walsync.link_status` on the link's target),
//! and the upstream's clock offset, measured from the send times the walsender stamps on
//! every message.
//!
//! Best effort: reporting never stops a link; a target that cannot be reached cannot
//! show the report anyway.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_postgres::Client;
use tracing::{debug, warn};

use crate::config::Dsn;
use crate::node::connect::connect;

/// An upstream clock this far from ours makes last-writer-wins pick by clock, not by
/// order: warn (once per session) so that the operator fixes NTP.
pub const CLOCK_OFFSET_WARN_MS: f64 = 1000.0;
/// How often the offset is recomputed and stored.
const OFFSET_EVERY: Duration = Duration::from_secs(10);
/// How often a running link stamps its heartbeat on its target.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A link whose heartbeat is older than this is shown `down`: three heartbeats missed.
pub const HEARTBEAT_STALE_S: u64 = 20;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// Offset of a server time stamp (µs since 2000-01-01) from our clock now, in ms;
/// positive when the upstream is ahead. Includes the one-way network delay.
pub fn clock_offset_ms(server_time_us: i64, now: SystemTime) -> f64 {
    let now_us = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
        - PG_EPOCH_US;
    (server_time_us - now_us) as f64 / 1000.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Streaming,
    Retrying,
    Stopped,
    /// Applying what a spooler kept while the link was away, before streaming.
    Replaying,
    /// Its sidecar stopped (written on a clean stop; a dead sidecar shows as down once
    /// its heartbeat is older than [`HEARTBEAT_STALE_S`]).
    Down,
}

impl LinkState {
    fn as_str(self) -> &'static str {
        match self {
            LinkState::Streaming => "streaming",
            LinkState::Retrying => "retrying",
            LinkState::Stopped => "stopped",
            LinkState::Replaying => "replaying",
            LinkState::Down => "down",
        }
    }
}

pub struct StatusReporter {
    link: String,
    target: Dsn,
    client: Option<Client>,
    /// When the current window of offset samples began, and the largest sample in it.
    offset_window: Option<(Instant, f64)>,
    last_heartbeat_at: Option<Instant>,
    warned: bool,
}

impl StatusReporter {
    pub fn new(link: String, target: Dsn) -> StatusReporter {
        StatusReporter {
            link,
            target,
            client: None,
            offset_window: None,
            last_heartbeat_at: None,
            warned: false,
        }
    }

    async fn client(&mut self) -> Option<&Client> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            self.client = connect(&self.target, &format!("walsync {} status", self.link))
                .await
                .ok();
        }
        self.client.as_ref()
    }

    /// Runs one statement on the target over the reporter's connection. Best effort: a
    /// failure is logged and the connection dropped, to be opened again next time.
    /// `false` when the target could not be reached at all.
    async fn write(
        &mut self,
        what: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> bool {
        let Some(client) = self.client().await else {
            return false;
        };
        if let Err(e) = client.execute(sql, params).await {
            debug!(link = %self.link, error = %e, "could not record {what}");
            self.client = None;
        }
        true
    }

    pub async fn state(&mut self, state: LinkState, detail: Option<&str>) {
        let link = self.link.clone();
        let written = self
            .write(
                "the link state",
                "INSERT INTO walsync.link_status AS s (link, state, detail, heartbeat_at) VALUES ($1, $2, $3, now()) \
                 ON CONFLICT (link) DO UPDATE SET state = excluded.state, detail = excluded.detail, \
                   since = CASE WHEN s.state = excluded.state \
                                 AND s.heartbeat_at > now() - make_interval(secs => $4) \
                                THEN s.since ELSE now() END, \
                   updated_at = now(), heartbeat_at = now()",
                &[&link, &state.as_str(), &detail, &(HEARTBEAT_STALE_S as f64)],
            )
            .await;
        if written {
            self.last_heartbeat_at = Some(Instant::now());
        }
    }

    /// Stamps that this link's runner is alive, at most every [`HEARTBEAT_EVERY`]:
    /// `walsync status` shows a link whose heartbeat went stale as `down`.
    pub async fn heartbeat(&mut self) {
        if self
            .last_heartbeat_at
            .is_some_and(|t| t.elapsed() < HEARTBEAT_EVERY)
        {
            return;
        }
        self.last_heartbeat_at = Some(Instant::now());
        let link = self.link.clone();
        self.write(
            "the link's heartbeat",
            "UPDATE walsync.link_status SET heartbeat_at = now() WHERE link = $1",
            &[&link],
        )
        .await;
    }

    /// Called with each message's send time; stores the offset once per [`OFFSET_EVERY`].
    ///
    /// A sample is the true offset minus the message's delay on the way, so the largest
    /// sample of a window is the best estimate: a message that sat in a buffer (the
    /// first ones after a cut heals were sent up to a minute before) reads as a clock far
    /// behind, and must not be what is stored.
    pub async fn server_time(&mut self, server_time_us: i64) {
        if server_time_us == 0 {
            return;
        }
        let sample = clock_offset_ms(server_time_us, SystemTime::now());
        let (since, best) = match self.offset_window {
            Some((since, best)) => (since, best.max(sample)),
            None => (Instant::now(), sample),
        };
        if since.elapsed() < OFFSET_EVERY {
            self.offset_window = Some((since, best));
            return;
        }
        self.offset_window = Some((Instant::now(), sample));
        let offset = best;
        if offset.abs() > CLOCK_OFFSET_WARN_MS && !self.warned {
            self.warned = true;
            warn!(link = %self.link, clock_offset_ms = offset, "the upstream's clock differs from ours by more than 1 s: last-writer-wins decides by these clocks; synchronise them (NTP)");
        }
        let link = self.link.clone();
        self.write(
            "the clock offset",
            "UPDATE walsync.link_status SET clock_offset_ms = $2, updated_at = now() WHERE link = $1",
            &[&link, &offset],
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_is_positive_when_the_upstream_is_ahead() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let server_now = 1_800_000_000_000_000 - PG_EPOCH_US;
        assert_eq!(clock_offset_ms(server_now, now), 0.0);
        assert_eq!(clock_offset_ms(server_now + 2_500_000, now), 2500.0);
        assert_eq!(clock_offset_ms(server_now - 1_000, now), -1.0);
    }
}
