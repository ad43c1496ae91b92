//! One link `A -> B`, run until shutdown: connect, resume from B's recorded progress,
//! stream, filter, apply, acknowledge; on any error roll back, wait, and start over.
//!
//! Invariant: A's slot is acknowledged only up to the end LSN of a source transaction
//! that B has committed (or that B never needs: filtered out, or already applied), and
//! progress is read back from B at every (re)start, so a link can fail anywhere and
//! resume with nothing skipped and nothing applied twice.

use std::time::Duration;

use futures_util::FutureExt;
use pgwire_replication::ReplicationEvent;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::apply::merged::SharedKeys;
use crate::apply::parallel::Parallel;
use crate::apply::{Applier, ApplyError, ApplyWorker, Change, RemoteTxn, FLUSH_CHECK_EVERY};
use crate::config::{ApplyConfig, LinkSpec, TablePolicy};
use crate::lsn::Lsn;
use crate::merge::{self, MergeError, OriginFilter};
use crate::names::PgName;
use crate::node::connect::{connect, ConnectError};
use crate::node::slots;
use crate::observability::error_chain;
use crate::pgoutput::{self, DecodeError, Message};
use crate::runtime::backoff::Backoff;
use crate::runtime::set_aside::{self, Hint, Route, SetAside, SetAsideNeeded};
use crate::spool::{self, SpoolError};
use crate::sql_error::SqlError;
use crate::status::link::{LinkState, StatusReporter, HEARTBEAT_EVERY};
use crate::stream::{NodeStream, StreamError};

/// One change in this many gives a sample of the upstream's clock (keepalives always do).
const OFFSET_SAMPLE_EVERY: u32 = 16;

/// On a clean stop, how long the link may take to acknowledge what it applied: the
/// commits in flight settle and flush, and the acknowledgement reaches the upstream with
/// the stream's next status report (every 500 ms). A restart then starts after it.
const FINAL_ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// Transactions applied carefully after a fast-path conflict: a burst of conflicting
/// inserts (ids written on two nodes during a cut) costs one restart, not one each.
const CAREFUL_TXNS: u32 = 1000;
/// How often a link with set-aside transactions tries them again.
const REAPPLY_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("undecodable message from the upstream")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Merge(#[from] MergeError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// A statement of the link's own (slot ownership, the removal check) failed.
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error("a change arrived outside a transaction")]
    OutsideTransaction,
    #[error("the link session panicked: {0}")]
    Panicked(String),
    #[error("no answer while {what} within {} s (the path to the peer may be cut)", .after.as_secs())]
    Unresponsive { what: &'static str, after: Duration },
    #[error("slot {slot} does not exist on {node}: run walsync init on {node}")]
    NoSlot { slot: String, node: String },
    /// One end of the link was removed from the cluster: the link is not run.
    #[error("{0}")]
    Removed(crate::node::fence::Removal),
    /// The upstream answers, but not on this stream's connection (it died in a cut that
    /// healed before anyone noticed): the stream is opened again.
    #[error("the upstream answers, but its walsender for this link {0}; reconnecting")]
    DeadStream(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// A transaction must be set aside (it changes a table that waits), but some of it
    /// was applied already: the session starts over and sets it aside whole.
    #[error("{}", if .0.too_large {
        format!("the transaction ending after {} changes a table that is not here, and it is larger than {} MiB: too large to set aside; create the table (or apply the missing DDL) and the link resumes", .0.final_lsn, set_aside::SET_ASIDE_BYTES >> 20)
    } else {
        format!("the transaction at {} waits for {}: setting it aside whole", .0.final_lsn, .0.waits_for)
    })]
    SetAside(SetAsideNeeded),
}

/// What an error means for the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Likely to pass by itself (network, restart): retry soon.
    Retry,
    /// A conflict the fast path cannot decide: apply the same transactions again, at
    /// once, checking each insert ([`ApplyWorker::set_careful`]).
    RetryCarefully,
    /// Needs a human (schema difference, credentials, setup): the link waits at the
    /// longest backoff, retrying so that it resumes by itself once fixed.
    HaltPeer,
    /// One end was removed from the cluster: the link ends for good (a fresh join of
    /// that node and a restart of this sidecar bring it back).
    Fenced,
    /// A transaction changes a table that is not here: start over at once, told to set
    /// it aside ([`set_aside`]).
    SetAside,
}

impl LinkError {
    pub fn disposition(&self) -> Disposition {
        match self {
            LinkError::Apply(
                ApplyError::FastPathHitUniqueKey { .. }
                | ApplyError::FastPathUndecided { .. }
                | ApplyError::OrderStalled { .. },
            ) => Disposition::RetryCarefully,
            // Two of the link's sessions (or one and a local writer) waited on each
            // other and the server ended one: careful mode applies one at a time.
            LinkError::Apply(e) if e.sqlstate() == Some(DEADLOCK_DETECTED) => {
                Disposition::RetryCarefully
            }
            LinkError::Removed(_) => Disposition::Fenced,
            LinkError::SetAside(n) if !n.too_large => Disposition::SetAside,
            LinkError::Connect(e) if e.is_permanent() => Disposition::HaltPeer,
            LinkError::Stream(e) if e.is_auth() || matches!(e, StreamError::Dsn(_)) => {
                Disposition::HaltPeer
            }
            LinkError::Apply(
                ApplyError::Ddl { .. }
                | ApplyError::MissingTable { .. }
                | ApplyError::MissingColumn { .. }
                | ApplyError::DoesNotFit { .. }
                | ApplyError::Statement(_)
                | ApplyError::Conflict { .. },
            ) => Disposition::HaltPeer,
            LinkError::Decode(_)
            | LinkError::Merge(_)
            | LinkError::NoSlot { .. }
            | LinkError::Spool(SpoolError::Damaged { .. }) => Disposition::HaltPeer,
            _ => Disposition::Retry,
        }
    }
}

/// SQLSTATE `deadlock_detected`.
const DEADLOCK_DETECTED: &str = "40P01";

/// How long opening a connection or the stream may take before the path counts as cut.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// Spool segments are read from the upstream this much at a time...
const PIECE_BYTES: i32 = 1 << 20;
/// ...and each piece may take this long (1 MiB over a 128 kbit/s line takes about 65 s).
const PIECE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a spooler may take to finish its transaction and hand the slot over.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(120);
/// A stream silent this long gets its path probed: an idle upstream sends nothing, and a
/// black-holed one (a lost NAT mapping, a dead WAN) sends nothing either.
const SILENCE_BEFORE_PROBE: Duration = Duration::from_secs(10);
/// The probe (`SELECT 1` on a side connection to the upstream) must answer within this.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// `fut`, or [`LinkError::Unresponsive`] once `after` has passed.
async fn within<T>(
    after: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, LinkError> {
    tokio::time::timeout(after, fut)
        .await
        .map_err(|_| LinkError::Unresponsive { what, after })
}

/// Tells a quiet stream from a dead path, and from a dead connection on a path that works
/// again: a black hole that healed leaves the stream's TCP connection silent for ever.
struct Liveness {
    dsn: crate::config::Dsn,
    app: String,
    /// The stream's own application_name, to find its walsender.
    stream_app: String,
    last_heard: tokio::time::Instant,
    tick: tokio::time::Interval,
    probe: Option<tokio_postgres::Client>,
}

impl Liveness {
    fn new(dsn: crate::config::Dsn, stream_app: String) -> Liveness {
        let app = format!("{stream_app} probe");
        let mut tick = tokio::time::interval(SILENCE_BEFORE_PROBE / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Liveness {
            dsn,
            app,
            stream_app,
            last_heard: tokio::time::Instant::now(),
            tick,
            probe: None,
        }
    }

    fn heard(&mut self) {
        self.last_heard = tokio::time::Instant::now();
    }

    async fn tick(&mut self) {
        self.tick.tick().await;
    }

    /// Probes the upstream if the stream has been silent; an unanswered probe ends the
    /// session (it is restarted from the recorded progress), and so does an upstream whose
    /// walsender for this stream is gone or has heard nothing from it lately (the client
    /// reports every 500 ms while it waits for data, which it does when silent).
    async fn check(&mut self) -> Result<(), LinkError> {
        let silent = self.last_heard.elapsed();
        debug!(stream = %self.stream_app, silent_ms = silent.as_millis() as u64, "liveness");
        if silent < SILENCE_BEFORE_PROBE {
            return Ok(());
        }
        let (dsn, app, mut probe) = (&self.dsn, &self.app, self.probe.take());
        let stream_app = self.stream_app.clone();
        let answered = within(PROBE_TIMEOUT, "probing the upstream", async {
            if probe.as_ref().is_none_or(|c| c.is_closed()) {
                probe = Some(connect(dsn, app).await.ok()?);
            }
            let row = probe
                .as_ref()?
                .query_one(
                    "SELECT count(*), min(extract(epoch FROM now() - reply_time))::float8 \
                     FROM pg_stat_replication WHERE application_name = $1",
                    &[&stream_app],
                )
                .await
                .ok()?;
            Some((row.get::<_, i64>(0), row.get::<_, Option<f64>>(1)))
        })
        .await?;
        debug!(stream = %self.stream_app, answer = ?answered, "probed the upstream (walsenders, seconds since its reply)");
        match answered {
            Some((0, _)) => Err(LinkError::DeadStream("is gone".into())),
            Some((_, Some(age))) if age > SILENCE_BEFORE_PROBE.as_secs_f64() => Err(
                LinkError::DeadStream(format!("has heard nothing from it for {age:.0} s")),
            ),
            Some(_) => {
                self.probe = probe;
                self.heard();
                Ok(())
            }
            None => Err(LinkError::Unresponsive {
                what: "probing the upstream",
                after: PROBE_TIMEOUT,
            }),
        }
    }
}

pub async fn run_link(
    spec: LinkSpec,
    cfg: ApplyConfig,
    tables: Vec<TablePolicy>,
    merges: SharedKeys,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = spec.name();
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.reconnect_min_ms),
        Duration::from_millis(cfg.reconnect_max_ms),
    );
    // After an insert met an existing key, the next transactions are applied carefully.
    let mut careful_txns = 0;
    let mut status = StatusReporter::new(name.clone(), spec.to.dsn.clone());
    // What the last session found must be set aside (`set_aside`).
    let mut hint = Hint::default();
    loop {
        let mut healthy = false;
        let given = std::mem::take(&mut hint);
        // A panic is a bug; it must not silently end the link: log it, and start over
        // from the recorded progress like after any failure.
        let with = ApplyWith {
            sessions: cfg.sessions,
            tables: &tables,
            merges: &merges,
        };
        let session = run_session(
            &spec,
            with,
            &mut shutdown,
            &mut healthy,
            careful_txns,
            given.clone(),
            &mut status,
        );
        let result = match std::panic::AssertUnwindSafe(session).catch_unwind().await {
            Ok(r) => r,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                error!(link = %name, panic = %what, "bug: the link session panicked; restarting it (please report this)");
                Err(LinkError::Panicked(what))
            }
        };
        careful_txns = 0;
        if *shutdown.borrow() {
            return stopped(&name, &mut status).await;
        }
        if healthy {
            backoff.reset();
        }
        let wait = match result {
            Ok(()) => backoff.next_wait(),
            Err(e) if e.disposition() == Disposition::Fenced => {
                error!(link = %name, error = %e, "link not run: one of its nodes was removed from the cluster");
                return;
            }
            Err(e) => {
                let d = match (&e, e.disposition()) {
                    // A table not here: the transaction is set aside by the next session,
                    // unless that was tried already.
                    (LinkError::Apply(a), _)
                        if a.missing()
                            .is_some_and(|(t, _)| !given.tables.contains_key(t)) =>
                    {
                        let (table, what) = a.missing().expect("matched above");
                        hint = given;
                        hint.tables.insert(table.to_string(), what);
                        Disposition::SetAside
                    }
                    (LinkError::SetAside(n), Disposition::SetAside)
                        if given.txn.as_ref().map(|t| t.final_lsn) != Some(n.final_lsn) =>
                    {
                        hint = given;
                        hint.txn = Some(n.told());
                        if let Some(table) = &n.table {
                            hint.tables.insert(table.clone(), n.waits_for.clone());
                        }
                        Disposition::SetAside
                    }
                    (_, Disposition::SetAside) => Disposition::HaltPeer,
                    (_, d) => d,
                };
                let wait = match d {
                    Disposition::HaltPeer => backoff.max(),
                    Disposition::Retry => backoff.next_wait(),
                    Disposition::RetryCarefully | Disposition::Fenced | Disposition::SetAside => {
                        Duration::ZERO
                    }
                };
                let state = match d {
                    Disposition::HaltPeer => Some(LinkState::Stopped),
                    Disposition::Retry => Some(LinkState::Retrying),
                    Disposition::RetryCarefully | Disposition::Fenced | Disposition::SetAside => {
                        None
                    }
                };
                if let Some(state) = state {
                    status.state(state, Some(&error_chain(&e))).await;
                }
                match d {
                    Disposition::RetryCarefully => {
                        info!(link = %name, error = %error_chain(&e), "conflict on the fast path (or a deadlock): the next transactions are applied carefully, one at a time");
                        careful_txns = CAREFUL_TXNS;
                    }
                    Disposition::Retry => {
                        warn!(link = %name, error = %error_chain(&e), retry_in_ms = wait.as_millis() as u64, "link interrupted")
                    }
                    Disposition::HaltPeer => {
                        error!(link = %name, error = %error_chain(&e), retry_in_ms = wait.as_millis() as u64, "link stopped: needs an operator")
                    }
                    Disposition::SetAside => {
                        info!(link = %name, error = %error_chain(&e), "starting over to set a transaction aside")
                    }
                    Disposition::Fenced => {} // returned above
                }
                wait
            }
        };
        // The wait is the link's life too: its heartbeat goes on (retrying, stopped).
        let until = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until.min(tokio::time::Instant::now() + HEARTBEAT_EVERY)) => {}
                _ = shutdown.changed() => break,
            }
            if tokio::time::Instant::now() >= until {
                break;
            }
            status.heartbeat().await;
        }
        if *shutdown.borrow() {
            return stopped(&name, &mut status).await;
        }
    }
}

/// The link's end on shutdown: its target shows it down at once, not after its
/// heartbeat ages.
async fn stopped(name: &str, status: &mut StatusReporter) {
    status
        .state(LinkState::Down, Some("its sidecar was stopped"))
        .await;
    info!(link = %name, "stopped");
}

/// The transaction being read from the stream.
struct SourceTxn {
    final_lsn: Lsn,
    commit_time_us: i64,
    origin: Option<(String, Lsn)>,
    /// Decided at the first change: apply it (`Some(txn)`) or let it pass (`None`).
    decision: Option<Option<RemoteTxn>>,
    /// Whether any of its changes was applied (then it can be set aside only by starting
    /// over).
    applied_any: bool,
    /// Whether a DDL of it was handed to the applier.
    ddl: bool,
}

/// How the link applies on its target: on how many sessions, with which table policies,
/// sharing merges with the node's other appliers.
#[derive(Clone, Copy)]
struct ApplyWith<'a> {
    sessions: usize,
    tables: &'a [TablePolicy],
    merges: &'a SharedKeys,
}

async fn run_session(
    spec: &LinkSpec,
    with: ApplyWith<'_>,
    shutdown: &mut watch::Receiver<bool>,
    healthy: &mut bool,
    careful_txns: u32,
    hint: Hint,
    status: &mut StatusReporter,
) -> Result<(), LinkError> {
    let link = spec.name();
    let app = format!("walsync {link}");
    let slot = PgName::slot_to(&spec.to.name);
    let filter = OriginFilter {
        upstream: spec.from.name.clone(),
        downstream: spec.to.name.clone(),
        upstream_forwards_others: spec.from_forwards_others,
    };

    let apply_app = format!("{app} apply");
    let target = within(
        OPEN_TIMEOUT,
        "connecting to the target",
        connect(&spec.to.dsn, &apply_app),
    )
    .await??;
    refuse_removed(&target, spec).await?;
    slots::end_stale_appliers(&target, &apply_app, &link).await?;
    let mut sa = SetAside::load(&target, &link, hint).await?;
    // A session of its own applies set-aside transactions again; it reads and deletes them.
    let set_aside_target = within(
        OPEN_TIMEOUT,
        "connecting to the target",
        connect(&spec.to.dsn, &apply_app),
    )
    .await??;
    let (mut apply, mut progress) =
        open_applier(spec, with, target, &link, &apply_app, careful_txns).await?;
    // A connection to the upstream for the whole session: it holds the slot's spool lock,
    // so no spooler reads the slot while this link does (crate::spool).
    let control_app = format!("{app} control");
    let control = within(
        OPEN_TIMEOUT,
        "reaching the upstream",
        connect(&spec.from.dsn, &control_app),
    )
    .await??;
    refuse_removed(&control, spec).await?;
    let taken = within(
        OPEN_TIMEOUT,
        "reaching the upstream",
        slots::try_take_over(&control, &control_app, &slot),
    )
    .await??;
    if !taken {
        info!(link = %link, "the upstream spools this link's slot; waiting for it to hand over");
        within(
            HANDOVER_TIMEOUT + OPEN_TIMEOUT,
            "taking the slot over from its spooler",
            slots::wait_for_spooler(&control, &slot, HANDOVER_TIMEOUT),
        )
        .await??;
    }
    replay_spool(
        &control,
        &slot,
        &filter,
        &mut apply,
        &mut sa,
        &mut progress,
        &link,
        status,
    )
    .await?;
    within(
        OPEN_TIMEOUT,
        "reaching the upstream",
        slots::end_stale_walsender(&control, &slot, &app, &link),
    )
    .await??
    .then_some(())
    .ok_or_else(|| LinkError::NoSlot {
        slot: slot.clone(),
        node: spec.from.name.to_string(),
    })?;
    let mut stream = within(
        OPEN_TIMEOUT,
        "starting the stream",
        NodeStream::open(&spec.from.dsn, &slot, progress, &app),
    )
    .await??;
    let mut liveness = Liveness::new(spec.from.dsn.clone(), app.clone());
    info!(link = %link, from_lsn = %progress, "streaming");
    *healthy = true;
    status.state(LinkState::Streaming, None).await;

    let mut txn: Option<SourceTxn> = None;
    // End LSN of a let-through (not applied) transaction, acknowledged once every commit
    // sent before it is confirmed.
    let mut skipped: Option<Lsn> = None;
    // The upstream's WAL end from its last keepalive: once nothing received is still
    // waiting to be applied or flushed, everything before it is done here, and saying so
    // lets the slot move on (and a shutting-down upstream finish: its walsender waits
    // for the receiver to confirm the end of the WAL), as PostgreSQL's own apply worker does.
    let mut idle_end: Option<Lsn> = None;
    let mut changes_seen: u32 = 0;
    // The target flushes its WAL every wal_writer_delay (200 ms by default); asking every
    // 100 ms keeps acknowledgements at most a few hundred ms behind.
    let mut flush_tick = tokio::time::interval(FLUSH_CHECK_EVERY);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set-aside transactions are tried again at the start and then this often.
    let mut reapply_tick = tokio::time::interval(REAPPLY_EVERY);
    reapply_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        let step = tokio::select! {
            biased;
            // 1. shutdown: the open target transaction is abandoned, nothing acknowledged past it
            _ = shutdown.changed() => break Ok(()),
            // 2. answers from the target: confirmed commits wait for their flush
            r = apply.settle_next(), if apply.has_in_flight() => r.map_err(LinkError::from),
            // 3. how far the target has flushed: durable commits get acknowledged
            _ = flush_tick.tick(), if apply.needs_flush_check() => apply.check_flush().await.map_err(LinkError::from),
            // 4. set-aside transactions, between transactions, once everything sent is
            //    settled (waited for here, so that a busy link does not starve them)
            _ = reapply_tick.tick(), if sa.pending() > 0 && txn.is_none() => {
                match apply.wait_durable().await {
                    Err(e) => Err(LinkError::from(e)),
                    Ok(()) => match reapply(spec, with, &set_aside_target, &apply_app, &mut apply, &mut sa).await {
                        Err(LinkError::Apply(e)) => {
                            set_aside::warn_reapply_failed(&link, &e);
                            Ok(())
                        }
                        other => other,
                    },
                }
            }
            // 5. every few seconds: is the upstream still reachable? and this link's heartbeat
            _ = liveness.tick() => {
                status.heartbeat().await;
                liveness.check().await
            }
            // 6. the next event of the stream
            ev = stream.recv() => match ev {
                Ok(Some(ev)) => {
                    // The upstream's clock, from the send time of every keepalive and of
                    // one change in OFFSET_SAMPLE_EVERY (reading ours costs; the offset
                    // kept is the best of a 10 s window).
                    match &ev {
                        ReplicationEvent::KeepAlive { server_time_micros, .. } => {
                            status.server_time(*server_time_micros).await;
                        }
                        ReplicationEvent::XLogData { server_time_micros, .. } => {
                            changes_seen = changes_seen.wrapping_add(1);
                            if changes_seen.is_multiple_of(OFFSET_SAMPLE_EVERY) {
                                status.server_time(*server_time_micros).await;
                            }
                        }
                        _ => {}
                    }
                    if let ReplicationEvent::KeepAlive { wal_end, .. } = &ev {
                        idle_end = Some((*wal_end).into());
                    }
                    let handled = handle_event(ev, &filter, &mut apply, &mut sa, &mut txn, &mut skipped, &mut progress, &link).await;
                    // Heard; and silence counts from here: time spent applying is not the
                    // stream's (nothing else is polled meanwhile).
                    liveness.heard();
                    handled
                }
                Ok(None) => break Ok(()),
                Err(e) => Err(LinkError::from(e)),
            },
        };
        if let Err(e) = step {
            break Err(e);
        }
        acknowledge(
            &mut apply,
            &stream,
            &mut skipped,
            &mut idle_end,
            txn.is_none(),
        );
    };
    if result.is_ok() && *shutdown.borrow() {
        // A clean stop: what was applied is acknowledged before the stream closes, so a
        // restart neither decodes nor sends it again. The open transaction is abandoned.
        let last = within(
            FINAL_ACK_TIMEOUT,
            "acknowledging what was applied before stopping",
            async {
                apply.wait_durable().await?;
                acknowledge(
                    &mut apply,
                    &stream,
                    &mut skipped,
                    &mut idle_end,
                    txn.is_none(),
                );
                stream.wait_reported(FINAL_ACK_TIMEOUT).await;
                Ok::<_, ApplyError>(())
            },
        )
        .await;
        if let Err(e) = last.and_then(|r| r.map_err(LinkError::from)) {
            info!(link = %link, error = %error_chain(&e), "stopping without acknowledging the last commits; a restart applies nothing twice but streams them again");
        }
    }
    // Dropping the target connection rolls back a transaction left open.
    drop(apply);
    stream.close().await;
    drop(control);
    result
}

/// The link's applier on `target` (a connection to it, stale apply sessions ended) and
/// the link's recorded progress: one session, or `with.sessions` and a catalog reader,
/// all under the name `apply_app`, so that a restart ends what a lost one left
/// (`end_stale_appliers`).
async fn open_applier(
    spec: &LinkSpec,
    with: ApplyWith<'_>,
    target: tokio_postgres::Client,
    link: &str,
    apply_app: &str,
    careful_txns: u32,
) -> Result<(Applier, Lsn), LinkError> {
    let worker = |client| new_worker(spec, with, client, link);
    let connect_target = || {
        within(
            OPEN_TIMEOUT,
            "connecting to the target",
            connect(&spec.to.dsn, apply_app),
        )
    };
    let mut first = worker(target).await?;
    let progress = first.progress().await?;
    if with.sessions <= 1 {
        first.set_careful(careful_txns);
        return Ok((Applier::Serial(Box::new(first)), progress));
    }
    let mut workers = vec![first];
    for _ in 1..with.sessions {
        workers.push(worker(connect_target().await??).await?);
    }
    let catalog = connect_target().await??;
    let parallel = Parallel::start(workers, catalog, link, progress, careful_txns, with.tables);
    Ok((Applier::Parallel(Box::new(parallel)), progress))
}

/// An applier session for `spec`'s target on `client`, recording its progress as `link`.
async fn new_worker(
    spec: &LinkSpec,
    with: ApplyWith<'_>,
    client: tokio_postgres::Client,
    link: &str,
) -> Result<ApplyWorker, LinkError> {
    let mut w =
        ApplyWorker::new(client, link.to_string(), PgName::origin_of(&spec.to.name)).await?;
    w.set_policies(with.tables);
    w.share_merges(with.merges.clone());
    w.set_ddl_from(spec.ddl_from.clone());
    w.set_ddl_role(spec.ddl_role.clone());
    w.set_write_scopes(spec.writes.clone());
    Ok(w)
}

/// Applies the link's set-aside transactions again on a session of their own (connected
/// as the link's applier, so that a restart ends it too), carefully, recording their
/// progress apart from the link's.
async fn reapply(
    spec: &LinkSpec,
    with: ApplyWith<'_>,
    target: &tokio_postgres::Client,
    apply_app: &str,
    live: &mut Applier,
    sa: &mut SetAside,
) -> Result<(), LinkError> {
    let client = within(
        OPEN_TIMEOUT,
        "connecting to the target",
        connect(&spec.to.dsn, apply_app),
    )
    .await??;
    let mut worker =
        new_worker(spec, with, client, &set_aside::progress_link(&spec.name())).await?;
    worker.progress().await?;
    worker.set_careful(u32::MAX);
    // Both sessions apply as the same authors: each sets an origin up only while it commits.
    worker.set_origin_at_commit();
    live.release_origin().await?;
    sa.reapply(target, worker).await?;
    Ok(())
}

/// Acknowledges on the stream what the target made durable: confirmed commits, and once
/// nothing is in flight, a let-through transaction's end and (with no source transaction
/// open) the WAL end of the upstream's last keepalive.
fn acknowledge(
    apply: &mut Applier,
    stream: &NodeStream,
    skipped: &mut Option<Lsn>,
    idle_end: &mut Option<Lsn>,
    no_txn_open: bool,
) {
    if let Some(end) = apply.take_committed() {
        stream.ack(end);
    }
    if apply.is_settled() {
        if let Some(end) = skipped.take() {
            stream.ack(end);
        }
        if no_txn_open {
            if let Some(end) = idle_end.take() {
                stream.ack(end);
            }
        }
    }
}

/// Applies what a spooler kept of the slot while this link was away (crate::spool), in
/// stream order and through the same path as the live stream, then deletes it once it is
/// durable here. The live stream then starts where the spool ended.
#[allow(clippy::too_many_arguments)]
async fn replay_spool(
    control: &tokio_postgres::Client,
    slot: &str,
    filter: &OriginFilter,
    apply: &mut Applier,
    sa: &mut SetAside,
    progress: &mut Lsn,
    link: &str,
    status: &mut StatusReporter,
) -> Result<(), LinkError> {
    // `progress` was read durable: segments below it were applied in an earlier session.
    let asking = "asking the upstream for spooled changes";
    within(
        OPEN_TIMEOUT,
        asking,
        spool::forget_applied(control, slot, *progress),
    )
    .await??;
    let segments = within(
        OPEN_TIMEOUT,
        asking,
        spool::segments_after(control, slot, *progress),
    )
    .await??;
    if segments.is_empty() {
        return Ok(());
    }
    let bytes: i64 = segments.iter().map(|s| s.bytes).sum();
    info!(link = %link, segments = segments.len(), bytes, from_lsn = %progress, "replaying what was spooled while this link was away");
    let detail = format!(
        "{} segment(s), {bytes} bytes spooled on the upstream while this link was away",
        segments.len()
    );
    status.state(LinkState::Replaying, Some(&detail)).await;
    let (mut txn, mut skipped) = (None, None);
    for segment in &segments {
        // A piece at a time: memory holds a piece and a chunk, whatever the segment's size.
        let mut reader = segment.reader();
        let mut offset = 0;
        while offset < segment.bytes {
            let piece = within(
                PIECE_TIMEOUT,
                "reading a spool segment from the upstream",
                segment.read(control, offset, PIECE_BYTES),
            )
            .await??;
            if piece.is_empty() {
                break; // shorter than cataloged: `finish` says it is truncated
            }
            offset += piece.len() as i64;
            status.heartbeat().await;
            let events = reader.feed(&piece).map_err(|e| segment.damaged(slot, e))?;
            for event in events {
                handle_event(
                    event,
                    filter,
                    apply,
                    sa,
                    &mut txn,
                    &mut skipped,
                    progress,
                    link,
                )
                .await?;
            }
        }
        reader.finish().map_err(|e| segment.damaged(slot, e))?;
    }
    apply.wait_durable().await?;
    let deleted = within(
        OPEN_TIMEOUT,
        asking,
        spool::forget_applied(control, slot, *progress),
    )
    .await??;
    info!(link = %link, segments = deleted, to_lsn = %progress, "spool replayed and deleted");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn handle_event(
    event: ReplicationEvent,
    filter: &OriginFilter,
    apply: &mut Applier,
    sa: &mut SetAside,
    txn: &mut Option<SourceTxn>,
    skipped: &mut Option<Lsn>,
    progress: &mut Lsn,
    link: &str,
) -> Result<(), LinkError> {
    match event {
        ReplicationEvent::Begin {
            final_lsn,
            commit_time_micros,
            ..
        } => {
            *txn = Some(SourceTxn {
                final_lsn: final_lsn.into(),
                commit_time_us: commit_time_micros,
                origin: None,
                decision: None,
                applied_any: false,
                ddl: false,
            });
        }
        ReplicationEvent::XLogData { data, .. } => {
            let (ids, change) = match pgoutput::decode(&data)? {
                Message::Origin(o) => {
                    let t = txn.as_mut().ok_or(LinkError::OutsideTransaction)?;
                    t.origin = Some((o.name, o.commit_lsn));
                    return Ok(());
                }
                Message::Relation(r) => {
                    sa.described(r.id, &data, &r.namespace, &r.name);
                    return Ok(apply.on_relation(r).await?);
                }
                Message::Type(_)
                | Message::Begin(_)
                | Message::Commit(_)
                | Message::LogicalMessage(_) => return Ok(()),
                Message::Insert(ins) => (vec![ins.relation_id], Change::Insert(ins)),
                Message::Update(upd) => (vec![upd.relation_id], Change::Update(upd)),
                Message::Delete(del) => (vec![del.relation_id], Change::Delete(del)),
                Message::Truncate(t) if t.relation_ids.is_empty() => return Ok(()),
                Message::Truncate(t) => (t.relation_ids.clone(), Change::Truncate(t)),
            };
            if !decide(txn, filter, apply, ids[0], *progress)? {
                return Ok(());
            }
            let t = txn.as_mut().ok_or(LinkError::OutsideTransaction)?;
            match sa
                .route(t.final_lsn, &ids, &data, t.applied_any)
                .map_err(LinkError::SetAside)?
            {
                Route::Kept => {}
                Route::Apply => {
                    t.applied_any = true;
                    t.ddl |= sa.is_ddl(&ids);
                    if let Some(Some(remote)) = &t.decision {
                        apply.begin(remote).await?;
                    }
                    let serial = apply.is_serial();
                    match apply.change(change).await {
                        Ok(()) => {}
                        Err(e) if serial => return Err(failed_ddl_set_aside(e, t.final_lsn)),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        ReplicationEvent::Commit { end_lsn, .. } => {
            let end: Lsn = end_lsn.into();
            if let Some(kept) = sa.finish(end) {
                let remote = txn
                    .as_ref()
                    .and_then(|t| t.decision.clone().flatten())
                    .ok_or(LinkError::OutsideTransaction)?;
                apply.begin(&remote).await?;
                apply.change(Change::SetAside(Box::new(kept))).await?;
            }
            if apply.is_open() {
                // On several sessions a DDL runs alone: waiting for it ties its failure to
                // its transaction, which is then set aside as with one session.
                let ddl = txn
                    .as_ref()
                    .filter(|t| t.ddl && !apply.is_serial())
                    .map(|t| t.final_lsn);
                let changes = match (apply.commit(end).await, ddl) {
                    (Ok(n), _) => n,
                    (Err(e), Some(final_lsn)) => return Err(failed_ddl_set_aside(e, final_lsn)),
                    (Err(e), None) => return Err(e.into()),
                };
                debug!(link = %link, lsn = %end, changes, "applied");
                if let Some(final_lsn) = ddl {
                    if let Err(e) = apply.wait_durable().await {
                        return Err(failed_ddl_set_aside(e, final_lsn));
                    }
                }
            } else {
                *skipped = Some(end);
            }
            *txn = None;
            if end > *progress {
                *progress = end;
            }
        }
        ReplicationEvent::Message { .. }
        | ReplicationEvent::KeepAlive { .. }
        | ReplicationEvent::StoppedAt { .. } => {}
    }
    Ok(())
}

/// A DDL that failed here (`e`), in the transaction at `final_lsn`: the transaction is
/// set aside with every later one of its table and every later DDL; the rest flows.
/// Any other error stays what it is.
fn failed_ddl_set_aside(e: ApplyError, final_lsn: Lsn) -> LinkError {
    match e {
        ApplyError::Ddl {
            id,
            statement,
            reason,
        } => LinkError::SetAside(SetAsideNeeded {
            final_lsn,
            table: crate::ddl::statement_table(&statement),
            waits_for: format!("ddl {id} to run here (it fails: {reason})"),
            with_ddl: true,
            too_large: false,
        }),
        e => e.into(),
    }
}

/// Whether a change is applied (or set aside) here: its transaction is decided at its
/// first change (`SourceTxn::decision`), and the change's relation must travel.
fn decide(
    txn: &mut Option<SourceTxn>,
    filter: &OriginFilter,
    apply: &Applier,
    relation_id: u32,
    progress: Lsn,
) -> Result<bool, LinkError> {
    let t = txn.as_mut().ok_or(LinkError::OutsideTransaction)?;
    if t.decision.is_none() {
        // Commit records are ordered: a transaction whose commit starts before the end of
        // the last one applied here was applied already (resume after a crash).
        let origin = t.origin.as_ref().map(|(n, l)| (n.as_str(), *l));
        t.decision = Some(merge::transaction(
            filter,
            origin,
            t.final_lsn,
            t.commit_time_us,
            progress,
        )?);
    }
    if !matches!(t.decision, Some(Some(_))) {
        return Ok(false);
    }
    Ok(apply.replicates(relation_id)?)
}

/// Refuses the link if the node `client` is connected to records either end as removed.
async fn refuse_removed(client: &tokio_postgres::Client, spec: &LinkSpec) -> Result<(), LinkError> {
    let names = [spec.from.name.as_str(), spec.to.name.as_str()];
    let removal = within(
        OPEN_TIMEOUT,
        "checking for removed nodes",
        crate::node::fence::removed(client, &names),
    )
    .await?
    .map_err(SqlError::of("reading walsync.removed_nodes"))?;
    match removal {
        Some(r) => Err(LinkError::Removed(r)),
        None => Ok(()),
    }
}
