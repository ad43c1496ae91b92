//! Parallel apply (decision 0011): a link's independent source transactions on several
//! target sessions at once, committed in source order.
//!
//! The link hands each source transaction to [`Parallel`], which holds it until its
//! commit while it is small ([`HOLD_CHANGES`], [`HOLD_BYTES`]) and works out its write
//! set: per change, its table and the primary key values it writes; a whole table when
//! the table has other unique keys; everything for DDL, merge notes, `TRUNCATE`, careful
//! mode, a table this node does not have as sent, and a transaction too large to hold
//! (barriers). It then goes to the one session whose unconfirmed transactions share a
//! key with it, or to the least busy session when none does; when it shares keys with
//! several, it waits until all but one have committed. Each session is a task of its own
//! with its [`ApplyWorker`], pipelining as the serial applier does.
//!
//! Order: each transaction takes an advisory lock of its own as it begins
//! ([`OrderLock`]) and releases it after its commit and origin reset; its successor,
//! when on another session, waits for that lock before it sets up its origin and moves
//! the progress, so it commits only after its predecessor ended, and its progress guard
//! (`source_lsn = previous`) then fails if the predecessor rolled back. The successor's
//! commit is held in the sidecar until the predecessor's lock is granted (at most
//! [`ORDER_WAIT`]). So progress, origins and exactly-once stay what they are with one
//! session. A small transaction is held on its session too (`apply::held`): its rows,
//! the wait, the origin set-up and the progress in one statement, in that order.
//!
//! The write-set bookkeeping ([`WriteSet`], [`InFlight`], [`place`]) and the choice of
//! the error to report ([`root_failure`]) are pure and tested without a server.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::change::Change;
use super::relations::travels;
use super::{catalog, Answered, ApplyError, ApplyWorker, OrderLock, RemoteTxn, FLUSH_CHECK_EVERY};
use crate::config::TablePolicy;
use crate::lsn::Lsn;
use crate::merge::statements::RelationMap;
use crate::pgoutput::{Relation, Value};

/// A transaction of more changes than this is not held: it runs alone, streamed.
pub const HOLD_CHANGES: usize = 256;
/// Nor one holding more data than this (1 MiB).
pub const HOLD_BYTES: usize = 1024 * 1024;
/// Jobs queued to one session at most; the link waits beyond.
const SESSION_QUEUE: usize = 1024;
/// After a session failed, how long the others may take to report theirs (the first
/// failure in source order is the one reported).
const FAILURE_GATHERING: std::time::Duration = std::time::Duration::from_secs(3);
/// How long a commit may wait in the sidecar for its predecessor (on another session)
/// to start. Its predecessor starts at once unless its session is busy with an earlier
/// transaction that waits on the target; a local writer that then waits for this commit
/// would close a cycle no deadlock detector sees, so past this the link restarts and
/// applies one transaction at a time (careful mode).
const ORDER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What a session is asked to do, in stream order.
#[derive(Debug)]
enum Job {
    Relation(Relation),
    /// A DDL replay on another session may have changed tables: read their maps again.
    ForgetMaps,
    Begin {
        txn: RemoteTxn,
        lock: OrderLock,
        careful: bool,
    },
    Change(Change),
    Commit {
        end: Lsn,
        previous: Lsn,
        after: Option<OrderLock>,
    },
    /// These, in order (a held transaction's begin and changes: one message, not one each).
    Batch(Vec<Job>),
}

/// What a session tells the link.
#[derive(Debug)]
enum Report {
    Locked { session: usize, seq: u64 },
    Confirmed { session: usize, end: Lsn },
    Durable { end: Lsn },
    Failed { session: usize, error: ApplyError },
}

/// What a source transaction writes, as far as its order against others goes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WriteSet {
    /// Everything: it runs alone (a barrier).
    pub all: bool,
    /// Rows: relation id and a hash of the row's key values.
    pub rows: Vec<(u32, u64)>,
    /// Relations written as a whole.
    pub relations: Vec<u32>,
}

impl WriteSet {
    pub fn row(&mut self, relation: u32, key: &[Value]) {
        let mut h = DefaultHasher::new();
        for v in key {
            match v {
                Value::Text(b) => (0u8, b.as_ref()).hash(&mut h),
                Value::Binary(b) => (1u8, b.as_ref()).hash(&mut h),
                Value::Null => 2u8.hash(&mut h),
                Value::UnchangedToast => 3u8.hash(&mut h),
            }
        }
        self.rows.push((relation, h.finish()));
    }

    pub fn relation(&mut self, relation: u32) {
        if !self.relations.contains(&relation) {
            self.relations.push(relation);
        }
    }
}

/// The write sets of one session's transactions that the target has not confirmed yet.
#[derive(Debug, Default)]
pub struct InFlight {
    txns: VecDeque<(Lsn, WriteSet)>,
    rows: HashMap<(u32, u64), u32>,
    /// Relations written whole.
    whole: HashMap<u32, u32>,
    /// Relations written at all (rows or whole).
    touched: HashMap<u32, u32>,
    all: u32,
}

fn count<K: Hash + Eq>(map: &mut HashMap<K, u32>, key: K, up: bool) {
    if up {
        *map.entry(key).or_default() += 1;
    } else if let std::collections::hash_map::Entry::Occupied(mut e) = map.entry(key) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

impl InFlight {
    pub fn len(&self) -> usize {
        self.txns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.txns.is_empty()
    }

    fn account(&mut self, ws: &WriteSet, up: bool) {
        for &(r, h) in &ws.rows {
            count(&mut self.rows, (r, h), up);
            count(&mut self.touched, r, up);
        }
        for &r in &ws.relations {
            count(&mut self.whole, r, up);
            count(&mut self.touched, r, up);
        }
        if ws.all {
            if up {
                self.all += 1;
            } else {
                self.all -= 1;
            }
        }
    }

    /// A transaction ending at `end` was sent to this session.
    pub fn add(&mut self, end: Lsn, ws: WriteSet) {
        self.account(&ws, true);
        self.txns.push_back((end, ws));
    }

    /// The target confirmed this session's commits up to `end`.
    pub fn confirmed(&mut self, end: Lsn) {
        while self.txns.front().is_some_and(|(e, _)| *e <= end) {
            let (_, ws) = self.txns.pop_front().expect("checked");
            self.account(&ws, false);
        }
    }

    /// Whether a transaction writing `ws` must come after these.
    pub fn conflicts(&self, ws: &WriteSet) -> bool {
        if self.txns.is_empty() {
            return false;
        }
        ws.all
            || self.all > 0
            || ws
                .rows
                .iter()
                .any(|(r, h)| self.rows.contains_key(&(*r, *h)) || self.whole.contains_key(r))
            || ws.relations.iter().any(|r| self.touched.contains_key(r))
    }
}

/// The session a transaction writing `ws` goes to: the one whose unconfirmed
/// transactions it depends on, or the least busy one if it depends on none. `None`: it
/// depends on several, and must wait until all but one have committed.
pub fn place(sessions: &[&InFlight], ws: &WriteSet) -> Option<usize> {
    let mut depends = sessions.iter().enumerate().filter(|(_, s)| s.conflicts(ws));
    match (depends.next(), depends.next()) {
        (Some((i, _)), None) => Some(i),
        (Some(_), Some(_)) => None,
        (None, _) => sessions
            .iter()
            .enumerate()
            .min_by_key(|(i, s)| (s.len(), *i))
            .map(|(i, _)| i),
    }
}

/// Of the failures the sessions reported (in the order they arrived), the one to report:
/// the first that is a cause, not the progress guard refusing a successor of a
/// transaction that failed.
pub fn root_failure(failures: Vec<ApplyError>) -> Option<ApplyError> {
    let mut consequences = Vec::new();
    for f in failures {
        if matches!(f, ApplyError::OutOfOrder { .. }) {
            consequences.push(f);
        } else {
            return Some(f);
        }
    }
    consequences.into_iter().next()
}

/// How the coordinator tells one relation's rows apart.
#[derive(Clone)]
enum Keys {
    /// By the target's primary key, through the map.
    Rows(Arc<RelationMap>),
    /// It has other unique keys, or rows not told apart: the relation as a whole.
    Whole,
    /// walsync's own tables, and a table this node does not have as sent: alone.
    Barrier,
}

struct Rel {
    source: Relation,
    travels: bool,
    keys: Option<Keys>,
}

struct Session {
    jobs: mpsc::Sender<Job>,
    in_flight: InFlight,
    locked: Option<u64>,
    task: JoinHandle<()>,
}

/// What ended a wait in [`Parallel::next_report`].
enum Woke {
    Report(Option<Report>),
    /// The oldest held commit found room in its session's queue and was sent.
    Sent,
    Stalled,
}

/// A commit held until its predecessor (sequence number, session), on another session,
/// holds its order lock.
struct PendingCommit {
    since: tokio::time::Instant,
    session: usize,
    end: Lsn,
    previous: Lsn,
    after: Option<(u64, usize)>,
}

/// The source transaction being read.
struct Open {
    txn: RemoteTxn,
    held: Vec<Job>,
    bytes: usize,
    changes: usize,
    ws: WriteSet,
    /// It replays DDL: the other sessions read their maps again after it.
    ddl: bool,
    /// Sent as it comes, to this session, with this sequence number (a barrier).
    streaming: Option<(usize, u64)>,
}

/// One link's applier on several target sessions.
pub struct Parallel {
    sessions: Vec<Session>,
    reports: mpsc::UnboundedReceiver<Report>,
    /// A connection of its own to the target, to read the tables' keys.
    catalog: Client,
    catalog_reader: catalog::CatalogReader,
    relations: super::fast_hash::FastMap<u32, Rel>,
    policies: HashMap<(String, String), TablePolicy>,
    open: Option<Open>,
    link_lock: i32,
    next_seq: u64,
    /// Sequence number and session of the transaction sent last.
    previous: Option<(u64, usize)>,
    last_progress: Lsn,
    /// Transactions still to apply carefully (each alone).
    careful: u32,
    confirmed: Lsn,
    durable: Lsn,
    untaken: Option<Lsn>,
    /// Commits not sent yet, oldest first: each waits for its predecessor's lock.
    pending: VecDeque<PendingCommit>,
    /// Failures reported (session, error), and until when the others' are awaited.
    failures: Vec<(usize, ApplyError)>,
    gather_until: Option<tokio::time::Instant>,
}

impl Drop for Parallel {
    fn drop(&mut self) {
        // A session's connection rolls back what it left open when its task goes.
        for s in &self.sessions {
            s.task.abort();
        }
    }
}

impl Parallel {
    /// Starts one task per worker. `progress` is the link's recorded progress (read by
    /// one of them), `careful` the number of transactions to apply carefully first.
    pub fn start(
        workers: Vec<ApplyWorker>,
        catalog: Client,
        link: &str,
        progress: Lsn,
        careful: u32,
        tables: &[TablePolicy],
    ) -> Parallel {
        let (report_tx, reports) = mpsc::unbounded_channel();
        let sessions = workers
            .into_iter()
            .enumerate()
            .map(|(i, mut w)| {
                w.set_origin_at_commit();
                let (jobs, rx) = mpsc::channel(SESSION_QUEUE);
                let task = tokio::spawn(session(i, w, rx, report_tx.clone()));
                Session {
                    jobs,
                    in_flight: InFlight::default(),
                    locked: None,
                    task,
                }
            })
            .collect();
        let mut h = DefaultHasher::new();
        link.hash(&mut h);
        Parallel {
            sessions,
            reports,
            catalog,
            catalog_reader: Default::default(),
            relations: Default::default(),
            policies: tables.iter().map(|t| (t.qualified(), t.clone())).collect(),
            open: None,
            link_lock: h.finish() as i32,
            // Numbered from a fresh point each time, so that no order lock of an earlier
            // run of the link (a session not gone yet) is ever one of this run's.
            next_seq: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::from(d.subsec_nanos()) << 8),
            previous: None,
            last_progress: progress,
            careful,
            confirmed: Lsn::ZERO,
            durable: Lsn::ZERO,
            untaken: None,
            pending: VecDeque::new(),
            failures: Vec::new(),
            gather_until: None,
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    pub async fn on_relation(&mut self, rel: Relation) -> Result<(), ApplyError> {
        let travels = travels(&self.policies, &rel);
        self.relations.insert(
            rel.id,
            Rel {
                source: rel.clone(),
                travels,
                keys: None,
            },
        );
        match &mut self.open {
            Some(open) if open.streaming.is_none() => {
                open.held.push(Job::Relation(rel));
                Ok(())
            }
            _ => self.broadcast(|| Job::Relation(rel.clone())).await,
        }
    }

    pub fn replicates(&self, relation_id: u32) -> Result<bool, ApplyError> {
        self.relations
            .get(&relation_id)
            .map(|r| r.travels)
            .ok_or(ApplyError::UnknownRelation(relation_id))
    }

    pub fn begin(&mut self, txn: &RemoteTxn) {
        if self.open.is_none() {
            self.open = Some(Open {
                txn: txn.clone(),
                held: Vec::new(),
                bytes: 0,
                changes: 0,
                ws: WriteSet::default(),
                ddl: false,
                streaming: None,
            });
        }
    }

    /// One change of the open transaction.
    pub async fn change(&mut self, change: Change) -> Result<(), ApplyError> {
        let Some(mut open) = self.open.take() else {
            return Err(ApplyError::Protocol(
                "a change arrived with no transaction begun".into(),
            ));
        };
        let result = self.add_change(&mut open, change).await;
        self.open = Some(open);
        result
    }

    async fn add_change(&mut self, open: &mut Open, change: Change) -> Result<(), ApplyError> {
        if let Some((s, _)) = open.streaming {
            return self.send(s, Job::Change(change)).await;
        }
        self.write_set(open, &change).await?;
        open.changes += 1;
        open.bytes += change.bytes();
        open.held.push(Job::Change(change));
        if open.changes > HOLD_CHANGES || open.bytes > HOLD_BYTES {
            // Too large to hold: it runs alone, and the rest follows as it comes.
            open.ws.all = true;
            let (s, seq) = self.dispatch(open).await?;
            open.streaming = Some((s, seq));
        }
        Ok(())
    }

    /// Adds what `change` writes to the open transaction's write set.
    async fn write_set(&mut self, open: &mut Open, change: &Change) -> Result<(), ApplyError> {
        let id = match change {
            Change::Truncate(_) | Change::SetAside(_) => {
                open.ws.all = true;
                return Ok(());
            }
            Change::Insert(i) => i.relation_id,
            Change::Update(u) => u.relation_id,
            Change::Delete(d) => d.relation_id,
        };
        let rel = self
            .relations
            .get(&id)
            .ok_or(ApplyError::UnknownRelation(id))?;
        if rel.source.namespace == "walsync" {
            open.ws.all = true;
            open.ddl |= rel.source.name == "ddl_log";
            return Ok(());
        }
        let keys = match &rel.keys {
            Some(k) => k.clone(),
            None => self.read_keys(id).await?,
        };
        let map = match keys {
            Keys::Barrier => {
                open.ws.all = true;
                return Ok(());
            }
            Keys::Whole => {
                open.ws.relation(id);
                return Ok(());
            }
            Keys::Rows(map) => map,
        };
        let keys = match change {
            Change::Insert(i) => vec![map.key_values(None, Some(&i.new))],
            Change::Update(u) => vec![
                map.key_values(u.old.as_ref(), Some(&u.new)),
                map.key_values(None, Some(&u.new)),
            ],
            Change::Delete(d) => vec![map.key_values(Some(&d.old), None)],
            Change::Truncate(_) | Change::SetAside(_) => unreachable!("handled above"),
        };
        for key in keys {
            match key {
                Ok(key) => open.ws.row(id, &key),
                // Not told apart here: the worker says what is wrong, alone.
                Err(_) => open.ws.all = true,
            }
        }
        Ok(())
    }

    /// How the rows of relation `id` are told apart, from the target's catalog.
    async fn read_keys(&mut self, id: u32) -> Result<Keys, ApplyError> {
        let rel = self.relations.get(&id).expect("looked up by the caller");
        let (namespace, name) = (&rel.source.namespace, &rel.source.name);
        let found = self
            .catalog_reader
            .table(&self.catalog, namespace, name)
            .await?;
        let keys = match found.map(|e| e.table) {
            None => Keys::Barrier,
            // No unique key, or no key at all (rows found by their old image): the
            // table's changes keep their order.
            Some(t) if !t.uniques.is_empty() || t.key.is_empty() => Keys::Whole,
            Some(t) => match RelationMap::new(&rel.source, t) {
                Ok(map) => Keys::Rows(Arc::new(map)),
                // Columns this node dropped, or no key: the worker sorts it out, alone.
                Err(_) => Keys::Barrier,
            },
        };
        if let Some(r) = self.relations.get_mut(&id) {
            r.keys = Some(keys.clone());
        }
        Ok(keys)
    }

    /// Chooses the open transaction's session, waiting for commits as needed, and sends
    /// it what is held. Returns the session and the transaction's sequence number.
    async fn dispatch(&mut self, open: &mut Open) -> Result<(usize, u64), ApplyError> {
        if self.careful > 0 {
            open.ws.all = true;
        }
        let s = loop {
            self.take_ready_reports().await?;
            let in_flight: Vec<&InFlight> = self.sessions.iter().map(|s| &s.in_flight).collect();
            if let Some(s) = place(&in_flight, &open.ws) {
                break s;
            }
            self.next_report().await?;
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let lock = OrderLock {
            link: self.link_lock,
            seq,
        };
        let careful = self.careful > 0;
        let mut batch = Vec::with_capacity(open.held.len() + 1);
        batch.push(Job::Begin {
            txn: open.txn.clone(),
            lock,
            careful,
        });
        for job in std::mem::take(&mut open.held) {
            if let Job::Relation(rel) = &job {
                for other in (0..self.sessions.len()).filter(|&o| o != s) {
                    self.send(other, Job::Relation(rel.clone())).await?;
                }
            }
            batch.push(job);
        }
        self.send(s, Job::Batch(batch)).await?;
        Ok((s, seq))
    }

    /// Sends the commit of the open transaction (dispatching it first if it was held).
    /// Returns the number of changes in it (0: nothing was open).
    pub async fn commit(&mut self, end: Lsn) -> Result<u64, ApplyError> {
        let Some(mut open) = self.open.take() else {
            return Ok(0);
        };
        let (s, seq) = match open.streaming {
            Some(placed) => placed,
            None => self.dispatch(&mut open).await?,
        };
        // The commit waits for its predecessor's end only if that ran on another session;
        // it is sent once the predecessor holds its lock (`send_ready_commits`), so the
        // link reads on meanwhile.
        let after = self.previous.filter(|&(_, t)| t != s);
        self.pending.push_back(PendingCommit {
            since: tokio::time::Instant::now(),
            session: s,
            end,
            previous: self.last_progress,
            after,
        });
        self.send_ready_commits();
        tracing::debug!(apply_session = s, seq, end = %end, waits_for = ?after.map(|(p, _)| p), "transaction dispatched");
        self.sessions[s].in_flight.add(end, open.ws);
        self.previous = Some((seq, s));
        self.last_progress = end;
        self.careful = self.careful.saturating_sub(1);
        if open.ddl {
            for other in (0..self.sessions.len()).filter(|&o| o != s) {
                self.send(other, Job::ForgetMaps).await?;
            }
            for r in self.relations.values_mut() {
                r.keys = None;
            }
        }
        Ok(open.changes as u64)
    }

    /// Sends the held commits whose predecessor holds its lock, in order, without
    /// waiting (cancel-safe: called as reports are taken).
    fn send_ready_commits(&mut self) {
        while let Some(c) = self.pending.front() {
            if self.lock_awaited(c) {
                return;
            }
            match self.sessions[c.session].jobs.try_send(self.commit_job(c)) {
                Ok(()) => {
                    self.pending.pop_front();
                }
                // Full: sent once there is room (`next_report`). Closed: its failure is
                // reported.
                Err(_) => return,
            }
        }
    }

    /// Sends `job` to session `s` once the commits held for it are sent (its jobs stay in
    /// stream order).
    async fn send(&mut self, s: usize, job: Job) -> Result<(), ApplyError> {
        while self.pending.iter().any(|c| c.session == s) {
            self.next_report().await?;
        }
        if self.sessions[s].jobs.send(job).await.is_ok() {
            return Ok(());
        }
        // The session ended: its failure is on its way.
        loop {
            self.next_report().await?;
        }
    }

    async fn broadcast(&mut self, job: impl Fn() -> Job) -> Result<(), ApplyError> {
        for s in 0..self.sessions.len() {
            self.send(s, job()).await?;
        }
        Ok(())
    }

    /// Takes every report already there, without waiting.
    async fn take_ready_reports(&mut self) -> Result<(), ApplyError> {
        while let Ok(r) = self.reports.try_recv() {
            self.take(r);
        }
        if self.failures.is_empty() {
            return Ok(());
        }
        self.gather().await
    }

    /// Waits for the next report from a session and takes it. Cancel-safe (the link
    /// polls it beside its stream): every report received is accounted for in `self`
    /// before the next await.
    pub async fn next_report(&mut self) -> Result<(), ApplyError> {
        if self.failures.is_empty() {
            // The oldest held commit waits either for its predecessor's lock (at most
            // ORDER_WAIT) or for room in its session's queue (as long as it takes: that
            // session is busy with the transaction's own changes).
            let (waits_for_lock, queue_full) = match self.pending.front() {
                None => (None, None),
                Some(c) if self.lock_awaited(c) => (Some(c.since + ORDER_WAIT), None),
                Some(c) => (None, Some(c.session)),
            };
            let job = queue_full.and_then(|_| self.pending.front().map(|c| self.commit_job(c)));
            let (reports, sessions) = (&mut self.reports, &self.sessions);
            // Sends the job in the poll that gets the room, so it is never half done.
            let room = async {
                match (queue_full, job) {
                    (Some(s), Some(job)) => match sessions[s].jobs.reserve().await {
                        Ok(permit) => permit.send(job),
                        // Closed: that session's failure is the next report.
                        Err(_) => std::future::pending().await,
                    },
                    _ => std::future::pending().await,
                }
            };
            let stalled = async {
                match waits_for_lock {
                    Some(until) => tokio::time::sleep_until(until).await,
                    None => std::future::pending().await,
                }
            };
            // Every branch is cancel-safe: `recv` and `reserve` take nothing when dropped.
            let woke = tokio::select! {
                report = reports.recv() => Woke::Report(report),
                () = room => Woke::Sent,
                _ = stalled => Woke::Stalled,
            };
            match woke {
                Woke::Report(Some(r)) => self.take(r),
                Woke::Report(None) => {
                    return Err(ApplyError::Protocol("every apply session ended".into()))
                }
                Woke::Sent => {
                    self.pending.pop_front();
                    self.send_ready_commits();
                    return Ok(());
                }
                Woke::Stalled => {
                    return Err(ApplyError::OrderStalled {
                        after: ORDER_WAIT.as_secs(),
                    })
                }
            }
            if self.failures.is_empty() {
                return Ok(());
            }
        }
        self.gather().await
    }

    /// Whether held commit `c` still waits for its predecessor's lock.
    fn lock_awaited(&self, c: &PendingCommit) -> bool {
        c.after
            .is_some_and(|(p, t)| self.sessions[t].locked.is_none_or(|l| l < p))
    }

    fn commit_job(&self, c: &PendingCommit) -> Job {
        Job::Commit {
            end: c.end,
            previous: c.previous,
            after: c.after.map(|(seq, _)| OrderLock {
                link: self.link_lock,
                seq,
            }),
        }
    }

    /// Once a session failed: the failures of the others that follow from it (their
    /// progress guard refusing a successor) arrive too, within [`FAILURE_GATHERING`]; the
    /// cause is returned. Cancel-safe, as [`Parallel::next_report`].
    async fn gather(&mut self) -> Result<(), ApplyError> {
        let deadline = *self
            .gather_until
            .get_or_insert_with(|| tokio::time::Instant::now() + FAILURE_GATHERING);
        while self
            .sessions
            .iter()
            .enumerate()
            .any(|(i, s)| !s.in_flight.is_empty() && !self.failures.iter().any(|(f, _)| *f == i))
        {
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some(r)) => self.take(r),
                Ok(None) | Err(_) => break,
            }
        }
        let failures = std::mem::take(&mut self.failures);
        Err(root_failure(failures.into_iter().map(|(_, e)| e).collect())
            .expect("gathering starts with a failure"))
    }

    fn take(&mut self, report: Report) {
        match report {
            Report::Locked { session, seq } => self.sessions[session].locked = Some(seq),
            Report::Confirmed { session, end } => {
                self.sessions[session].in_flight.confirmed(end);
                self.confirmed = self.confirmed.max(end);
            }
            Report::Durable { end } => {
                if end > self.durable {
                    self.durable = end;
                    self.untaken = Some(end);
                }
            }
            Report::Failed { session, error } => self.failures.push((session, error)),
        }
        self.send_ready_commits();
    }

    /// The newest source end LSN whose target commit is durable, once.
    pub fn take_committed(&mut self) -> Option<Lsn> {
        self.untaken.take()
    }

    /// Nothing held or unconfirmed, and every commit durable.
    pub fn is_settled(&self) -> bool {
        self.pending.is_empty()
            && self.sessions.iter().all(|s| s.in_flight.is_empty())
            && self.durable >= self.confirmed
    }

    /// Waits until every commit sent is confirmed and durable.
    pub async fn wait_durable(&mut self) -> Result<(), ApplyError> {
        while !self.is_settled() {
            self.next_report().await?;
        }
        Ok(())
    }
}

/// One session's task: runs its jobs in order, takes the target's answers, checks how far
/// the target flushed, and reports. It ends at its first error, reporting it.
async fn session(
    index: usize,
    worker: ApplyWorker,
    jobs: mpsc::Receiver<Job>,
    reports: mpsc::UnboundedSender<Report>,
) {
    let run = std::panic::AssertUnwindSafe(session_loop(index, worker, jobs, &reports));
    if let Err(panic) = run.catch_unwind().await {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let _ = reports.send(Report::Failed {
            session: index,
            error: ApplyError::Protocol(format!(
                "bug: apply session {index} panicked: {what} (please report this)"
            )),
        });
    }
}

async fn session_loop(
    index: usize,
    mut w: ApplyWorker,
    mut jobs: mpsc::Receiver<Job>,
    reports: &mpsc::UnboundedSender<Report>,
) {
    // Granted locks and confirmed commits are reported as soon as they are read: a job
    // may then wait on the server for a while, and its successors' commits for them.
    let to_link = reports.clone();
    w.on_answer(Box::new(move |a| {
        let _ = to_link.send(match a {
            Answered::Locked(seq) => Report::Locked {
                session: index,
                seq,
            },
            Answered::Confirmed(end) => Report::Confirmed {
                session: index,
                end,
            },
        });
    }));
    let mut tick = tokio::time::interval(FLUSH_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let step = tokio::select! {
            biased;
            r = w.settle_next(), if w.has_in_flight() => r,
            _ = tick.tick(), if w.needs_flush_check() => w.check_flush().await,
            job = jobs.recv() => match job {
                Some(Job::Batch(batch)) => run_jobs(&mut w, batch).await,
                Some(job) => run_job(&mut w, job).await,
                None => return,
            },
        };
        if let Err(error) = step {
            let _ = reports.send(Report::Failed {
                session: index,
                error,
            });
            return;
        }
        if let Some(end) = w.take_committed() {
            let _ = reports.send(Report::Durable { end });
        }
    }
}

async fn run_jobs(w: &mut ApplyWorker, jobs: Vec<Job>) -> Result<(), ApplyError> {
    for job in jobs {
        run_job(w, job).await?;
    }
    Ok(())
}

async fn run_job(w: &mut ApplyWorker, job: Job) -> Result<(), ApplyError> {
    match job {
        Job::Relation(rel) => w.on_relation(rel).await,
        Job::ForgetMaps => {
            w.forget_maps();
            Ok(())
        }
        Job::Begin { txn, lock, careful } => {
            w.set_careful(careful as u32);
            w.lock_next(lock);
            w.begin(&txn).await
        }
        Job::Change(change) => w.apply_change(&change).await,
        Job::Commit {
            end,
            previous,
            after,
        } => w.commit_ordered(end, previous, after).await.map(|_| ()),
        Job::Batch(_) => Err(ApplyError::Protocol(
            "bug: a batch of apply jobs inside another".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ws_rows(rows: &[(u32, &str)]) -> WriteSet {
        let mut ws = WriteSet::default();
        for (r, k) in rows {
            ws.row(*r, &[Value::Text(Bytes::copy_from_slice(k.as_bytes()))]);
        }
        ws
    }

    fn whole(r: u32) -> WriteSet {
        let mut ws = WriteSet::default();
        ws.relation(r);
        ws
    }

    fn barrier() -> WriteSet {
        WriteSet {
            all: true,
            ..Default::default()
        }
    }

    #[test]
    fn independent_transactions_spread_over_idle_sessions() {
        let mut a = InFlight::default();
        let b = InFlight::default();
        a.add(Lsn(10), ws_rows(&[(1, "1")]));
        assert_eq!(place(&[&a, &b], &ws_rows(&[(1, "2")])), Some(1));
        assert_eq!(
            place(&[&a, &b], &ws_rows(&[(2, "1")])),
            Some(1),
            "another table"
        );
    }

    #[test]
    fn a_transaction_follows_the_one_session_it_depends_on() {
        let mut a = InFlight::default();
        let mut b = InFlight::default();
        a.add(Lsn(10), ws_rows(&[(1, "1")]));
        b.add(Lsn(20), ws_rows(&[(1, "2")]));
        b.add(Lsn(30), ws_rows(&[(1, "3")]));
        assert_eq!(place(&[&a, &b], &ws_rows(&[(1, "3"), (2, "9")])), Some(1));
        assert_eq!(place(&[&a, &b], &ws_rows(&[(1, "1")])), Some(0));
        // Depending on both: it waits until one has committed.
        assert_eq!(place(&[&a, &b], &ws_rows(&[(1, "1"), (1, "2")])), None);
        a.confirmed(Lsn(10));
        assert_eq!(place(&[&a, &b], &ws_rows(&[(1, "1"), (1, "2")])), Some(1));
    }

    #[test]
    fn whole_relations_and_barriers_depend_on_everything_they_may_touch() {
        let mut a = InFlight::default();
        let mut b = InFlight::default();
        a.add(Lsn(10), ws_rows(&[(1, "1")]));
        b.add(Lsn(20), whole(2));
        assert_eq!(place(&[&a, &b], &whole(1)), Some(0), "rows of 1 are on a");
        assert_eq!(
            place(&[&a, &b], &ws_rows(&[(2, "5")])),
            Some(1),
            "2 is whole on b"
        );
        assert_eq!(
            place(&[&a, &b], &barrier()),
            None,
            "a barrier waits for all but one"
        );
        b.confirmed(Lsn(20));
        assert_eq!(place(&[&a, &b], &barrier()), Some(0));
        a.add(Lsn(30), barrier());
        assert_eq!(
            place(&[&a, &b], &ws_rows(&[(9, "9")])),
            Some(0),
            "everything follows a barrier in flight"
        );
        a.confirmed(Lsn(30));
        assert!(a.is_empty() && a.rows.is_empty() && a.touched.is_empty() && a.all == 0);
    }

    #[test]
    fn confirmations_release_only_what_they_cover() {
        let mut a = InFlight::default();
        a.add(Lsn(10), ws_rows(&[(1, "1")]));
        a.add(Lsn(20), ws_rows(&[(1, "1")]));
        a.confirmed(Lsn(10));
        assert!(
            a.conflicts(&ws_rows(&[(1, "1")])),
            "the second still holds the key"
        );
        a.confirmed(Lsn(25));
        assert!(!a.conflicts(&ws_rows(&[(1, "1")])));
        assert!(a.rows.is_empty());
    }

    #[test]
    fn the_cause_is_reported_not_the_guard_refusing_its_successors() {
        let guard = || ApplyError::OutOfOrder {
            previous: Lsn(1),
            end: Lsn(2),
        };
        let cause = ApplyError::Protocol("the cause".into());
        let root = root_failure(vec![guard(), cause, guard()]).unwrap();
        assert!(matches!(root, ApplyError::Protocol(m) if m == "the cause"));
        assert!(matches!(
            root_failure(vec![guard()]),
            Some(ApplyError::OutOfOrder { .. })
        ));
    }
}
