//! Spooling the change stream of a peer that is away (docs/decisions/0006).
//!
//! The sidecar next to a slot `walsync_to_<peer>` watches it. Once the slot has been
//! inactive for `[spool] after_s` or retains `after_bytes` of WAL, the spooler streams it
//! like a link would, writes whole transactions into segments (large objects, cataloged
//! in `walsync.spool_segments`, committed synchronously) and acknowledges the slot up to
//! the last segment written: PostgreSQL then recycles that WAL. The returning link takes
//! the slot's spool lock, which asks the spooler to finish its segment and let go,
//! replays the segments through the same apply path as the live stream, deletes them
//! once applied and durable, and streams the slot from where the spool ended.
//!
//! Invariants:
//! - the slot is acknowledged by the spooler only up to the end of a segment committed in
//!   the catalog, so every transaction is in the spool or still in the slot, never lost
//!   in between;
//! - the spooler and the link never read the slot at once: both hold the slot's advisory
//!   lock (`walsync spool <slot>`, session level) while they do; the spooler starts only
//!   on an inactive slot it could lock, and gives the lock up at a transaction boundary as
//!   soon as a link waits for it;
//! - segments are deleted only below the link's durable progress, so replay after any
//!   crash starts from a segment that is still there (and `decide` skips what was applied).

pub mod format;

use std::collections::HashMap;
use std::time::Duration;

use pgwire_replication::ReplicationEvent;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::config::{Config, Dsn, SpoolConfig};
use crate::lsn::Lsn;
use crate::merge::replicates_relation;
use crate::node::connect::{connect, ConnectError};
use crate::node::slots;
use crate::pgoutput::{self, Message};
use crate::sql_error::SqlError;
use crate::stream::{NodeStream, StreamError};
use format::{FormatError, Relations, SegmentReader, SegmentWriter};

/// How often the slots are looked at.
const POLL: Duration = Duration::from_secs(5);
/// How often a running spooler checks whether a link waits for the slot.
const HANDOVER_CHECK: Duration = Duration::from_secs(1);
/// A segment with new changes is written at the next transaction boundary after this,
/// so a trickle of sales still releases WAL.
const SEGMENT_MAX_AGE: Duration = Duration::from_secs(30);
/// After a failure, the slot is left alone this long (it retains its WAL meanwhile).
const ERROR_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error("spool segment {end_lsn} of slot {slot}: {source}; the changes in it cannot be replayed: the peer must be joined again (walsync remove-node, then walsync join)")]
    Damaged {
        slot: String,
        end_lsn: String,
        #[source]
        source: format::FormatError,
    },
}

/// The advisory lock both the spooler and the link hold while they read `slot`.
/// Watches this node's `walsync_to_*` slots until shutdown; spools those whose peer is away.
pub async fn run_spooler(config: Config, mut shutdown: watch::Receiver<bool>) {
    if !config.spool.enabled {
        return;
    }
    let dsn = config.node.dsn.clone();
    let mut inactive_since: HashMap<String, Instant> = HashMap::new();
    let mut running: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut client: Option<Client> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep(POLL) => {}
        }
        running.retain(|_, task| !task.is_finished());
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = connect(&dsn, "walsync spool watch").await.ok();
        }
        let Some(c) = &client else { continue };
        let slots = match c
            .query(
                "SELECT slot_name::text, active, \
                   coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8 \
                 FROM pg_replication_slots \
                 WHERE slot_name LIKE 'walsync\\_to\\_%' AND database = current_database()",
                &[],
            )
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "spool: cannot read this node's slots");
                client = None;
                continue;
            }
        };
        for row in slots {
            let (slot, active, retained): (String, bool, i64) =
                (row.get(0), row.get(1), row.get(2));
            if active {
                inactive_since.remove(&slot);
                continue;
            }
            let since = *inactive_since
                .entry(slot.clone())
                .or_insert_with(Instant::now);
            let due = retained as u64 >= config.spool.after_bytes
                || since.elapsed() >= Duration::from_secs(config.spool.after_s);
            if due && !running.contains_key(&slot) {
                let (dsn, cfg, stop) = (dsn.clone(), config.spool.clone(), shutdown.clone());
                let name = slot.clone();
                running.insert(
                    slot,
                    tokio::spawn(async move {
                        if let Err(e) = spool_slot(&dsn, &name, &cfg, stop.clone()).await {
                            warn!(slot = %name, error = %crate::observability::error_chain(&e), retry_in_s = ERROR_BACKOFF.as_secs(), "spooling stopped");
                            let mut stop = stop;
                            tokio::select! {
                                _ = tokio::time::sleep(ERROR_BACKOFF) => {}
                                _ = stop.changed() => {}
                            }
                        }
                    }),
                );
            }
        }
    }
    for (_, task) in running {
        let _ = task.await;
    }
}

/// Spools `slot` until a link wants it, shutdown, or an error.
async fn spool_slot(
    dsn: &Dsn,
    slot: &str,
    cfg: &SpoolConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SpoolError> {
    let app = format!("walsync spool {slot}");
    let mut ctl = connect(dsn, &app).await?;
    ctl.batch_execute("SET synchronous_commit = on")
        .await
        .map_err(SqlError::of("setting synchronous_commit"))?;
    let locked = slots::take_lock(&ctl, slot, "taking the spool lock").await?;
    if !locked {
        return Ok(()); // a link holds it: it streams or replays the slot
    }
    let active: bool = ctl
        .query_one(
            "SELECT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), true)",
            &[&slot],
        )
        .await
        .map_err(SqlError::of("reading the slot"))?
        .get(0);
    if active {
        return Ok(());
    }
    // The slot may not have heard the last acknowledgement (a sidecar killed just after a
    // segment was written): asked to start past its confirmed position, PostgreSQL skips
    // the transactions that commit before it, so nothing is spooled twice.
    let spooled: String = ctl
        .query_one(
            "SELECT coalesce(max(end_lsn), '0/0')::text FROM walsync.spool_segments WHERE slot = $1",
            &[&slot],
        )
        .await
        .map_err(SqlError::of("reading how far the slot was spooled"))?
        .get(0);
    let start: Lsn = spooled.parse().unwrap_or(Lsn::ZERO);
    let mut stream = NodeStream::open(dsn, slot, start, &format!("{app} stream")).await?;
    info!(slot, "spooling: the slot's peer is away; its changes go to walsync.spool_segments and the slot releases its WAL");
    let mut spool = Spool {
        rels: Relations::default(),
        names: HashMap::new(),
        seg: SegmentWriter::new([]),
        content: 0,
        txn_has_content: false,
        started: Instant::now(),
        object: None,
    };
    let mut idle_end: Option<Lsn> = None;
    // A link waits for the slot: the segment ends at the next transaction boundary.
    let mut wanted = false;
    let mut tick = tokio::time::interval(HANDOVER_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break Ok(()),
            _ = tick.tick() => {
                if !wanted {
                    wanted = match slots::handover_wanted(&ctl).await.map_err(SpoolError::from) {
                        Ok(w) => w,
                        Err(e) => break Err(e),
                    };
                }
                if spool.seg.in_transaction() {
                    continue; // the segment ends at this transaction's commit
                }
                // Only walsync's own bookkeeping since the last segment (this spool's
                // catalog rows among it), which no peer applies: let it pass, so the slot
                // can be acknowledged past it.
                if spool.content == 0 && !spool.seg.is_empty() {
                    if let Err(e) = spool.discard(&ctl).await {
                        break Err(e);
                    }
                }
                let old = spool.content > 0 && spool.started.elapsed() >= SEGMENT_MAX_AGE;
                if !spool.seg.is_empty() && (wanted || old) {
                    match spool.write(&mut ctl, slot).await {
                        Ok(end) => stream.ack(end),
                        Err(e) => break Err(e),
                    }
                }
                if spool.seg.is_empty() {
                    if let Some(end) = idle_end.take() {
                        stream.ack(end);
                    }
                }
                if wanted {
                    info!(slot, "spooling: the peer's link is back; handing the slot over");
                    break Ok(());
                }
            }
            ev = stream.recv() => match ev {
                Ok(Some(ev)) => {
                    if let ReplicationEvent::KeepAlive { wal_end, .. } = &ev {
                        idle_end = Some((*wal_end).into());
                    }
                    spool.observe(&ev);
                    if let Err(e) = spool.store_full_chunks(&ctl).await {
                        break Err(e);
                    }
                    if matches!(ev, ReplicationEvent::Commit { .. })
                        && (wanted || spool.seg.len() >= cfg.segment_bytes)
                    {
                        match spool.write(&mut ctl, slot).await {
                            Ok(end) => stream.ack(end),
                            Err(e) => break Err(e),
                        }
                        if wanted {
                            info!(slot, "spooling: the peer's link is back; handing the slot over");
                            break Ok(());
                        }
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.into()),
            },
        }
    };
    stream.close().await;
    // Let the walsender go before the lock does, so the waiting link can start at once.
    let _ = slots::wait_released(&ctl, slot, Duration::from_secs(10)).await;
    result
}

/// The segment being filled, and what is needed to open the next one.
struct Spool {
    rels: Relations,
    /// Relation id -> whether its changes are replicated (walsync's own tables are not).
    names: HashMap<u32, bool>,
    seg: SegmentWriter,
    /// Transactions in the segment that change replicated tables (walsync's own
    /// bookkeeping, this spool's catalog rows among them, does not make a segment due).
    content: u32,
    txn_has_content: bool,
    started: Instant,
    /// The segment's large object while it is written: its oid and how much is in it.
    /// It is written inside a transaction on the spooler's connection, committed with
    /// its catalog row.
    object: Option<(u32, i64)>,
}

impl Spool {
    fn observe(&mut self, ev: &ReplicationEvent) {
        match ev {
            ReplicationEvent::XLogData { data, .. } => {
                self.rels.observe(data);
                // Row changes are told apart by their header: no tuple is decoded here.
                match data.first() {
                    Some(b'R') => {
                        if let Ok(Message::Relation(r)) = pgoutput::decode(data) {
                            self.names
                                .insert(r.id, replicates_relation(&r.namespace, &r.name));
                        }
                    }
                    Some(b'T') => self.txn_has_content = true,
                    _ => {
                        if let Some(id) = pgoutput::changed_relation(data) {
                            self.touch(id);
                        }
                    }
                }
            }
            ReplicationEvent::Commit { .. } => {
                self.content += u32::from(std::mem::take(&mut self.txn_has_content));
            }
            _ => {}
        }
        self.seg.push(ev);
    }

    fn touch(&mut self, relation_id: u32) {
        if self.names.get(&relation_id).copied().unwrap_or(true) {
            self.txn_has_content = true;
        }
    }

    /// Appends `chunk` to the segment's large object, opening both the transaction and
    /// the object on the first chunk.
    async fn store(&mut self, ctl: &Client, chunk: &[u8]) -> Result<(), SpoolError> {
        let (oid, offset) = match self.object {
            Some(o) => o,
            None => {
                ctl.batch_execute("BEGIN")
                    .await
                    .map_err(SqlError::of("opening a spool transaction"))?;
                let oid: u32 = ctl
                    .query_one("SELECT lo_create(0)", &[])
                    .await
                    .map_err(SqlError::of("creating a spool segment"))?
                    .get(0);
                (oid, 0)
            }
        };
        ctl.execute("SELECT lo_put($1, $2, $3)", &[&oid, &offset, &chunk])
            .await
            .map_err(SqlError::of("writing a spool segment"))?;
        self.object = Some((oid, offset + chunk.len() as i64));
        Ok(())
    }

    /// Drops the segment being filled (and its large object, if one was started).
    async fn discard(&mut self, ctl: &Client) -> Result<(), SpoolError> {
        self.seg = SegmentWriter::new(self.rels.iter());
        self.started = Instant::now();
        if self.object.take().is_some() {
            ctl.batch_execute("ROLLBACK")
                .await
                .map_err(SqlError::of("dropping a spool segment of bookkeeping only"))?;
        }
        Ok(())
    }

    /// Stores the chunks the segment has filled: memory holds one chunk, whatever the
    /// size of a transaction.
    async fn store_full_chunks(&mut self, ctl: &Client) -> Result<(), SpoolError> {
        while let Some(chunk) = self.seg.take_chunk() {
            self.store(ctl, &chunk).await?;
        }
        Ok(())
    }

    /// Finishes the segment (whole transactions only) and commits it with its catalog row,
    /// synchronously; returns the LSN the slot may be acknowledged up to.
    async fn write(&mut self, ctl: &mut Client, slot: &str) -> Result<Lsn, SpoolError> {
        let seg = std::mem::replace(&mut self.seg, SegmentWriter::new(self.rels.iter()));
        self.content = 0;
        self.started = Instant::now();
        let Some((start, end)) = seg.range() else {
            unreachable!("written only with a committed transaction in it")
        };
        let txns = seg.transactions() as i32;
        let rest = seg.finish();
        self.store(ctl, &rest).await?;
        let (oid, bytes) = self.object.take().expect("stored just now");
        ctl.execute(
            "INSERT INTO walsync.spool_segments (slot, end_lsn, start_lsn, data, bytes, transactions) \
             VALUES ($1, $2::text::pg_lsn, $3::text::pg_lsn, $4, $5, $6)",
            &[&slot, &end.to_string(), &start.to_string(), &oid, &bytes, &txns],
        )
        .await
        .map_err(SqlError::of("cataloging a spool segment"))?;
        ctl.batch_execute("COMMIT")
            .await
            .map_err(SqlError::of("committing a spool segment"))?;
        tracing::debug!(slot, %end, bytes, txns, "spool segment written");
        Ok(end)
    }
}

/// A spooled segment still to replay.
pub struct Segment {
    pub end_lsn: Lsn,
    pub bytes: i64,
    oid: u32,
}

/// Segments of `slot` holding transactions that end after `progress`, in stream order.
pub async fn segments_after(
    control: &Client,
    slot: &str,
    progress: Lsn,
) -> Result<Vec<Segment>, SpoolError> {
    let rows = control
        .query(
            "SELECT end_lsn::text, data, bytes FROM walsync.spool_segments \
             WHERE slot = $1 AND end_lsn > $2::text::pg_lsn ORDER BY end_lsn",
            &[&slot, &progress.to_string()],
        )
        .await
        .map_err(SqlError::of(
            "listing spool segments (has walsync init run on the upstream?)",
        ))?;
    Ok(rows
        .iter()
        .map(|r| Segment {
            end_lsn: r.get::<_, String>(0).parse().unwrap_or(Lsn::ZERO),
            oid: r.get(1),
            bytes: r.get(2),
        })
        .collect())
}

impl Segment {
    /// The next `len` stored bytes of the segment from `offset`, read over `control`.
    pub async fn read(
        &self,
        control: &Client,
        offset: i64,
        len: i32,
    ) -> Result<Vec<u8>, SpoolError> {
        Ok(control
            .query_one("SELECT lo_get($1, $2, $3)", &[&self.oid, &offset, &len])
            .await
            .map_err(SqlError::of(format!(
                "reading spool segment {}",
                self.end_lsn
            )))?
            .get(0))
    }

    /// The error for damage found in this segment.
    pub fn damaged(&self, slot: &str, source: FormatError) -> SpoolError {
        SpoolError::Damaged {
            slot: slot.to_string(),
            end_lsn: self.end_lsn.to_string(),
            source,
        }
    }

    /// A reader for this segment's stored bytes.
    pub fn reader(&self) -> SegmentReader {
        SegmentReader::default()
    }
}

/// Deletes the segments of `slot` wholly applied downstream (`durable`: the target's
/// flushed progress); returns how many.
pub async fn forget_applied(control: &Client, slot: &str, durable: Lsn) -> Result<u64, SpoolError> {
    let row = control
        .query_one(
            "WITH d AS (DELETE FROM walsync.spool_segments \
                        WHERE slot = $1 AND end_lsn <= $2::text::pg_lsn RETURNING data) \
             SELECT count(lo_unlink(data))::int8 FROM d",
            &[&slot, &durable.to_string()],
        )
        .await
        .map_err(SqlError::of(
            "deleting applied spool segments (has walsync init run on the upstream with this version?)",
        ))?;
    Ok(row.get::<_, i64>(0) as u64)
}
