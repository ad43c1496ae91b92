//! The replication connection of one link: `START_REPLICATION` on the upstream's slot with
//! pgoutput (protocol v1, through pgwire-replication), events out, acknowledgements in.
//!
//! Guarantee: the slot is acknowledged only up to what the caller passes to [`NodeStream::ack`],
//! which the applier calls with a source commit's end LSN once that transaction is
//! committed on the target. Until the first ack the worker reports the start LSN, which
//! is itself a committed position (the target's recorded progress), so nothing is skipped.

use std::time::Duration;

use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent};

use crate::config::Dsn;
use crate::lsn::Lsn;
use crate::names::PUBLICATION;
use crate::node::connect::SESSION_OPTIONS;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("config: {0}")]
    Dsn(#[from] crate::dsn::DsnError),
    /// The TLS handshake failed or the server offers no TLS the dsn requires.
    #[error("replication stream from {dsn}: {explained}")]
    Tls { dsn: String, explained: String },
    #[error("replication stream from {dsn}")]
    Wire {
        dsn: String,
        #[source]
        source: PgWireError,
    },
}

impl StreamError {
    /// Credentials or certificates: retrying soon will not help.
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            StreamError::Wire {
                source: PgWireError::Auth(_),
                ..
            } | StreamError::Tls { .. }
        )
    }
}

/// Events buffered between the wire worker and the applier. Each is one pgoutput message
/// (one row at most, bounded by `max_message_size`), so the buffer holds at most
/// 1024 x (largest row) bytes: with Odoo's rows (< 8 kB each, TOAST aside) about 8 MiB.
const BUFFER_EVENTS: usize = 1024;
/// Largest single message accepted (one row, its TOASTed values included).
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
/// How long a closing stream may take to say goodbye.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct NodeStream {
    client: ReplicationClient,
    dsn: String,
    /// The newest position acknowledged (`ack`), as a u64.
    acked: std::sync::atomic::AtomicU64,
}

impl NodeStream {
    /// Starts streaming `slot` at `start` (0/0 means the slot's confirmed position).
    pub async fn open(
        dsn: &Dsn,
        slot: &str,
        start: Lsn,
        application_name: &str,
    ) -> Result<NodeStream, StreamError> {
        let shown = dsn.to_string();
        let rcfg = replication_config(dsn, slot, start, application_name)?;
        let wire = |source| StreamError::Wire {
            dsn: shown.clone(),
            source,
        };
        let client = match ReplicationClient::connect(rcfg).await {
            Ok(client) => client,
            Err(PgWireError::Tls(failure)) => {
                let (cfg, tls) = dsn.parts()?;
                let host = crate::dsn::host_of(&cfg);
                return Err(StreamError::Tls {
                    dsn: shown,
                    explained: tls.explain(&host, &failure),
                });
            }
            Err(e) => return Err(wire(e)),
        };
        client_started(client, shown).await
    }

    pub async fn recv(&mut self) -> Result<Option<ReplicationEvent>, StreamError> {
        self.client
            .recv()
            .await
            .map_err(|source| StreamError::Wire {
                dsn: self.dsn.clone(),
                source,
            })
    }

    /// Everything up to `lsn` is committed downstream; the slot may let it go.
    pub fn ack(&self, lsn: Lsn) {
        self.acked
            .fetch_max(lsn.0, std::sync::atomic::Ordering::Relaxed);
        self.client.update_applied_lsn(lsn.into());
    }

    /// Waits (at most `timeout`) until the upstream was told everything acknowledged:
    /// status reports go out every 500 ms, and closing the stream does not send one.
    pub async fn wait_reported(&self, timeout: Duration) {
        let metrics = self.client.metrics();
        let want = Lsn(self.acked.load(std::sync::atomic::Ordering::Relaxed));
        let until = tokio::time::Instant::now() + timeout;
        while Lsn::from(metrics.last_applied_lsn()) < want && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ends the stream politely (CopyDone) if the upstream answers within
    /// [`CLOSE_TIMEOUT`]; a connection that died in a cut never answers, so it is then
    /// dropped as it is. Waiting for it would hold the link for ever.
    pub async fn close(mut self) {
        if tokio::time::timeout(CLOSE_TIMEOUT, self.client.shutdown())
            .await
            .is_err()
        {
            tracing::info!(dsn = %self.dsn, "the stream did not close within {} s (its connection is dead): dropped", CLOSE_TIMEOUT.as_secs());
            self.client.abort();
        }
    }
}

async fn client_started(
    mut client: ReplicationClient,
    dsn: String,
) -> Result<NodeStream, StreamError> {
    client
        .wait_started()
        .await
        .map_err(|source| StreamError::Wire {
            dsn: dsn.clone(),
            source,
        })?;
    Ok(NodeStream {
        client,
        dsn,
        acked: Default::default(),
    })
}

/// The replication session settings for `slot` on `dsn`, streaming from `start`.
pub fn replication_config(
    dsn: &Dsn,
    slot: &str,
    start: Lsn,
    application_name: &str,
) -> Result<ReplicationConfig, StreamError> {
    let (cfg, tls) = dsn.parts()?;
    let host = crate::dsn::host_of(&cfg);
    let tls = tls.replication(&host);
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres").to_string();
    let password = cfg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = cfg.get_dbname().unwrap_or(&user).to_string();
    let rcfg = ReplicationConfig::new(host, user, password, database, slot, PUBLICATION)
        .with_port(port)
        .with_start_lsn(start.into())
        .with_status_interval(Duration::from_millis(500))
        .with_wakeup_interval(Duration::from_secs(5))
        .with_buffer_size(BUFFER_EVENTS)
        .with_max_message_size(MAX_MESSAGE_BYTES)
        .with_options(SESSION_OPTIONS.replace(" -c client_encoding=UTF8", ""))
        .with_application_name(application_name)
        .with_tls(tls);
    Ok(rcfg)
}
