//! Apply: one target transaction per source transaction.
//!
//! Guarantees, for each source transaction that the merge step lets through:
//! - it runs in exactly one target transaction, in source commit order, rows written as
//!   they arrive, or for a small one (at most 256 rows) held until its commit and sent as
//!   one statement that is its transaction (`held`): memory does not grow with its size;
//! - that transaction carries the author's replication origin and the author's commit LSN
//!   and time (`pg_replication_origin_session_setup` + `pg_replication_origin_xact_setup`),
//!   so the row keeps its first author and the change is never sent back to it;
//! - it also moves `walsync.link_progress` to the source commit's end LSN, so rows and
//!   progress commit together and a crash at any point neither loses nor doubles it.
//!
//! The session runs with `session_replication_role = replica`, as PostgreSQL's own apply
//! worker does: user triggers, foreign-key triggers and event triggers stay quiet for
//! changes that were already checked on their author.
//!
//! This file holds the session, the transaction lifecycle and the request pipeline's
//! answers; each other job has its file: the relations and their statements
//! (`relations`), inserts in runs and COPY (`inserts`), guarded updates and deletes in
//! runs (`guarded`), small transactions held and sent as one statement (`held`), which
//! commits are durable (`durability`), the careful paths that read the local row and
//! carry out what `merge::conflict` decides (`conflict`), merging one entity's two rows
//! (`merged`), DDL replay (`ddl`), rows for what this node dropped (`dropped`).

mod applier;
pub use applier::Applier;
mod change;
pub use change::Change;
pub mod catalog;
mod conflict;
mod ddl;
pub(crate) use ddl::run_captured_ddl;
mod dropped;
mod durability;
mod fast_hash;
mod guarded;
mod held;
mod inserts;
mod keyless;
pub mod merged;
pub mod parallel;
mod param;
pub mod pipeline;
mod references;
mod relations;
mod renamed;
mod scope;
mod set_aside;
mod unique_index;
pub use set_aside::SetAsideTxn;

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

use crate::config::TablePolicy;
use crate::lsn::Lsn;
use crate::merge::keys::{MergeEntry, TableName};
use crate::merge::statements::{RowWrite, Shape, StatementError};
pub use crate::merge::RemoteTxn;
use crate::names::quote_literal;
use crate::node::setup::ensure_origin;
use crate::pgoutput::{Truncate, Value};
use crate::sql_error::{Refusal, SqlError};
use durability::Durability;
use inserts::InsertRun;
use param::Param;
use pipeline::{Answer, Pipeline, Tag};
use relations::{Gone, Mapped, RelationEntry, RelationPolicy, Target};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error(transparent)]
    Statement(#[from] StatementError),
    #[error("table {table} does not exist on this node; the schemas differ (create it, or apply the missing DDL), then the link resumes")]
    MissingTable { table: String },
    #[error("column {column:?} of {table} exists on the upstream but not here; the schemas differ (apply the missing DDL here, then the link resumes)")]
    MissingColumn { table: String, column: String },
    /// A row's values do not fit the table here (a type narrowed, a NOT NULL or CHECK
    /// added while its author was cut off): its transaction is set aside.
    #[error("a row of {table} does not fit the table here: {reason}")]
    DoesNotFit { table: String, reason: String },
    #[error("{0}")]
    Protocol(String),
    /// A captured DDL statement could not be replayed here: the link stops on it.
    #[error("ddl {id} failed here: {reason}; statement: {statement}. Fix it by hand on this node and the link resumes, or after fixing run walsync ddl-replay --skip {id}")]
    Ddl {
        id: String,
        statement: String,
        reason: String,
    },
    /// An insert or update on the fast path met an existing key: its transaction is
    /// applied again in careful mode, where the conflict is decided and recorded.
    #[error(
        "{table}: a change met an existing key ({detail}); re-applying its transaction row by row"
    )]
    FastPathHitUniqueKey { table: String, detail: String },
    /// An update or delete on the fast path found its row missing, or last written
    /// elsewhere and not as the change's author saw it: its transaction is applied again
    /// in careful mode, where the conflict is decided and recorded.
    #[error(
        "{table}: an {change} found its row missing, or changed here since its author read it; re-applying its transaction row by row"
    )]
    FastPathUndecided { table: String, change: &'static str },
    #[error(
        "a change names relation id {0} that the upstream never described (no Relation message)"
    )]
    UnknownRelation(u32),
    /// The progress guard refused a commit: the link's progress row on the target is not
    /// at the transaction before it.
    #[error("the link's progress on the target is not at {previous} when the transaction ending at {end} commits: \
             the transaction before it did not commit (its error is the cause), or another sidecar runs this link \
             (run each link in one sidecar only); the link restarts from its recorded progress")]
    OutOfOrder { previous: Lsn, end: Lsn },
    /// Parallel apply: a commit waited too long for the transaction before it to start
    /// on another session (which waits on the target): applied again one at a time.
    #[error("a transaction waited {after} s for the one before it to start on another apply session, which waits on the target \
             (a local writer may hold what it needs); re-applying the next transactions one at a time")]
    OrderStalled { after: u64 },
    /// A conflict no rule settles (the link waits for a person).
    #[error("{table}: {}: {detail}", kind.as_str())]
    Conflict {
        table: String,
        kind: crate::merge::conflict::ConflictKind,
        detail: String,
    },
}

impl ApplyError {
    /// The source table (`schema.table`, as the upstream calls it) a change needs and
    /// this node lacks, or lacks a column of, with what is missing.
    pub fn missing(&self) -> Option<(&str, String)> {
        match self {
            ApplyError::MissingTable { table } => Some((table, table.clone())),
            ApplyError::MissingColumn { table, column } => {
                Some((table, format!("{table} (its column {column})")))
            }
            ApplyError::DoesNotFit { table, reason } => {
                Some((table, format!("{table} (a row does not fit: {reason})")))
            }
            _ => None,
        }
    }

    /// SQLSTATE of the underlying server error, if any.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ApplyError::Sql(e) => e.source.code().map(|c| c.code()),
            _ => None,
        }
    }
}

pub struct ApplyWorker {
    client: Arc<Client>,
    link: String,
    relations: fast_hash::FastMap<u32, RelationEntry>,
    statements: fast_hash::FastMap<(u32, Shape), Statement>,
    /// Reads the target's catalog for a relation's map (its queries prepared here).
    catalog: catalog::CatalogReader,
    session_origin: Option<String>,
    open: Option<RemoteTxn>,
    rows_in_txn: u64,
    pipeline: Pipeline,
    /// Which confirmed commits are flushed on the target.
    durability: Durability,
    run: Option<InsertRun>,
    /// Rows of the insert run made last (a new run makes room for as many).
    last_run_rows: usize,
    /// Guarded updates or deletes not sent yet (at most one of `run` and this is pending).
    guarded_run: Option<guarded::GuardedRun>,
    /// The runs of the open transaction kept back until its commit, while it is held
    /// (`held`: its `BEGIN` is not sent yet).
    held: Option<held::Held>,
    /// Statements that apply a held transaction at once.
    combined: held::Combined,
    record_progress: Statement,
    record_conflict: Option<Statement>,
    /// Origin name of writes made on the target itself (`walsync_<target node>`).
    local_origin: String,
    /// Transactions still to apply in careful mode (inserts checked one by one).
    careful_txns: u32,
    /// `[cluster] ddl_from`: the nodes whose DDL is run here; None: every node.
    ddl_from: Option<Vec<String>>,
    /// `[cluster] ddl_role`: the role replayed DDL runs as here; None: the captured one.
    ddl_role: Option<String>,
    /// `[[peers]] writes`: what each author may change here (`scope`).
    writes: Arc<crate::merge::scope::WriteScopes>,
    /// The progress the next applied transaction builds on (see `record_progress`).
    last_progress: Lsn,
    /// The config's table policies per `(schema, table)`.
    policies: HashMap<(String, String), TablePolicy>,
    /// Every merge this node knows, shared with the node's other appliers here.
    merged: merged::SharedKeys,
    /// Rows of `walsync.merged_keys` when last read, and whether a later count differed
    /// (another sidecar merged): the map is read again before the next transaction.
    merged_count: i64,
    merged_stale: bool,
    /// Merges of the open transaction, and of sent commits not confirmed yet (with their
    /// end LSN): the shared map gets them once the commit is confirmed.
    merged_in_txn: Vec<MergeEntry>,
    merged_unconfirmed: std::collections::VecDeque<(Lsn, Vec<MergeEntry>)>,
    /// Tables merged into, with the foreign keys that point at them.
    merge_targets: HashMap<TableName, merged::MergeTarget>,
    /// Parallel apply (`parallel`): the order lock the next transaction takes as it begins.
    next_lock: Option<OrderLock>,
    /// Parallel apply: told of each granted order lock and confirmed commit as soon as
    /// the answer is read, even in the middle of a job that then waits on the server
    /// (a later report could close a wait cycle the server does not see).
    on_answer: Option<Box<dyn Fn(Answered) + Send + Sync>>,
    /// The order lock the open transaction holds, released after its commit.
    held_lock: Option<OrderLock>,
    /// Parallel apply: the author's origin is set up for each commit and reset after it
    /// (PostgreSQL 15 lets one session at a time have an origin set up), and these are
    /// the origins known to exist.
    origin_at_commit: bool,
    /// Each origin known to exist here, by name, with its `roident` (the guarded fast
    /// path compares it with a row's last writer).
    origin_ids: fast_hash::FastMap<String, u32>,
    /// Parallel apply: a held transaction's order lock, taken alone, and its release with
    /// the origin's reset, prepared at the first one.
    order_statements: Option<OrderStatements>,
    /// Inserts of the open transaction into a table not here yet, applied once a DDL
    /// later in the same transaction creates it: `CREATE TABLE ... AS` and `SELECT
    /// INTO` write their rows before the capture trigger logs the statement
    /// (`inserts::WAIT_FOR_TABLE_BYTES` bounds them).
    waiting_for_table: Vec<crate::pgoutput::Insert>,
    waiting_bytes: usize,
    /// The relations of `waiting_for_table` (a few): known missing until the next DDL.
    waiting_relations: Vec<u32>,
    /// Deletes of rows other rows may still refer to here (`references`).
    references: references::References,
}

/// See [`ApplyWorker::order_statements`].
#[derive(Clone)]
struct OrderStatements {
    lock: Statement,
    unlock: Statement,
}

/// An answer parallel apply's coordinator waits for ([`ApplyWorker::on_answer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// The order lock of the transaction with this sequence number was granted.
    Locked(u64),
    /// The commit of the source transaction ending here was confirmed.
    Confirmed(Lsn),
}

/// The advisory lock a transaction of a link applied on several sessions takes as it
/// begins and releases once it has committed (or rolled back) and reset its origin:
/// `(link, seq)`. Its successor waits for it before it sets up its origin and moves the
/// progress (decision 0011).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderLock {
    pub link: i32,
    pub seq: u64,
}

impl OrderLock {
    /// The lock's two int4 keys: the sequence number wraps, which only matters for
    /// transactions 2^32 apart, never both open.
    fn keys(&self) -> String {
        let (link, seq) = self.key_pair();
        format!("{link}, {seq}")
    }

    fn key_pair(&self) -> (i32, i32) {
        (self.link, self.seq as u32 as i32)
    }

    fn lock_sql(&self) -> String {
        format!("SELECT pg_advisory_lock({})", self.keys())
    }

    fn unlock_sql(&self) -> String {
        format!("SELECT pg_advisory_unlock({})", self.keys())
    }

    /// Waits until the holder released it; the shared lock taken goes with this
    /// transaction.
    fn wait_sql(&self) -> String {
        format!("SELECT pg_advisory_xact_lock_shared({})", self.keys())
    }
}

impl ApplyWorker {
    pub async fn new(
        client: Client,
        link: String,
        local_origin: String,
    ) -> Result<ApplyWorker, ApplyError> {
        client
            .batch_execute("SET session_replication_role = replica")
            .await
            .map_err(SqlError::of(
                "setting session_replication_role = replica (walsync's role must be a superuser)",
            ))?;
        // The progress read next must be durable before the stream reports it as the
        // acknowledged start: a synchronous commit of a transaction with an xid flushes
        // all WAL before it, earlier asynchronous commits included.
        client
            .batch_execute("SET synchronous_commit = on; BEGIN; SELECT txid_current(); COMMIT")
            .await
            .map_err(SqlError::of("flushing the target's WAL"))?;
        // Commits need not wait for their flush: the upstream is acknowledged only up to
        // what pg_current_wal_flush_lsn() shows durable (ARCHITECTURE.md, invariant 2).
        // Every statement walsync prepares writes the values bound or finds rows by a key
        // or a unique index, so its plan does not depend on the values: planned once, at
        // its first execution, rather than for each of its first five (PostgreSQL's
        // default, `auto`), which for a wide table's guarded update costs more than the
        // execution.
        client
            .batch_execute("SET synchronous_commit = off; SET plan_cache_mode = force_generic_plan")
            .await
            .map_err(SqlError::of(
                "setting synchronous_commit = off, plan_cache_mode = force_generic_plan",
            ))?;
        client
            .execute(
                "INSERT INTO walsync.link_progress (link, source_lsn) VALUES ($1, '0/0') ON CONFLICT (link) DO NOTHING",
                &[&link],
            )
            .await
            .map_err(SqlError::of_bookkeeping("creating the link's progress row"))?;
        let record_progress = client
            .prepare(&format!(
                "WITH {} SELECT 1 / count(*)::int FROM u, o",
                progress_ctes()
            ))
            .await
            .map_err(SqlError::of("preparing the progress update"))?;
        Ok(ApplyWorker {
            client: Arc::new(client),
            link,
            relations: Default::default(),
            statements: Default::default(),
            catalog: Default::default(),
            session_origin: None,
            open: None,
            rows_in_txn: 0,
            pipeline: Pipeline::default(),
            durability: Durability::default(),
            run: None,
            last_run_rows: 0,
            guarded_run: None,
            held: None,
            combined: Default::default(),
            record_progress,
            record_conflict: None,
            local_origin,
            careful_txns: 0,
            ddl_from: None,
            ddl_role: None,
            writes: Default::default(),
            last_progress: Lsn::ZERO,
            policies: HashMap::new(),
            merged: merged::SharedKeys::default(),
            merged_count: 0,
            merged_stale: true,
            merged_in_txn: Vec::new(),
            merged_unconfirmed: Default::default(),
            merge_targets: HashMap::new(),
            next_lock: None,
            on_answer: None,
            held_lock: None,
            origin_at_commit: false,
            origin_ids: Default::default(),
            order_statements: None,
            waiting_for_table: Vec::new(),
            waiting_bytes: 0,
            waiting_relations: Vec::new(),
            references: Default::default(),
        })
    }

    /// End LSN (on the upstream) of the last source transaction applied here, 0/0 if none.
    /// Read once per session, before anything is applied.
    pub async fn progress(&mut self) -> Result<Lsn, ApplyError> {
        let row = self
            .client
            .query_opt(
                "SELECT source_lsn::text FROM walsync.link_progress WHERE link = $1",
                &[&self.link],
            )
            .await
            .map_err(SqlError::of_bookkeeping("reading walsync.link_progress"))?;
        let lsn = match row {
            Some(r) => r.get::<_, String>(0).parse().unwrap_or(Lsn::ZERO),
            None => Lsn::ZERO,
        };
        self.last_progress = lsn;
        Ok(lsn)
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Merges are known to every applier of `shared` (one target node's, in this process).
    pub fn share_merges(&mut self, shared: merged::SharedKeys) {
        self.merged = shared;
        self.merged_stale = true;
    }

    /// See [`Applier::release_origin`]; between transactions only.
    pub async fn release_origin(&mut self) -> Result<(), ApplyError> {
        if self.session_origin.take().is_some() {
            self.send_batch(
                "SELECT pg_replication_origin_session_reset()".into(),
                "resetting the replication origin",
            )
            .await?;
            self.flush().await?;
        }
        Ok(())
    }

    /// Parallel apply: the origin is set up at each commit, not for the session.
    pub fn set_origin_at_commit(&mut self) {
        self.origin_at_commit = true;
    }

    /// The next transaction begun here takes `lock` first (parallel apply).
    pub fn lock_next(&mut self, lock: OrderLock) {
        self.next_lock = Some(lock);
    }

    /// `f` is told of every granted order lock and confirmed commit (parallel apply).
    pub fn on_answer(&mut self, f: Box<dyn Fn(Answered) + Send + Sync>) {
        self.on_answer = Some(f);
    }

    fn answered(&self, a: Answered) {
        if let Some(f) = &self.on_answer {
            f(a);
        }
    }

    /// Creates replication origin `origin` here if it does not exist, and learns its
    /// `roident`. A direct request, which must not queue behind a COPY whose data only a
    /// poll of the pipeline would send: everything is settled first (rare: once per
    /// origin for the session).
    async fn ensure_origin(&mut self, origin: &str) -> Result<(), ApplyError> {
        if self.origin_ids.contains_key(origin) {
            return Ok(());
        }
        self.flush().await?;
        let what = || format!("creating replication origin {origin}");
        ensure_origin(&self.client, origin)
            .await
            .map_err(SqlError::of(what()))?;
        let id: i64 = self
            .client
            .query_one(
                "SELECT roident::int8 FROM pg_replication_origin WHERE roname = $1",
                &[&origin],
            )
            .await
            .map_err(SqlError::of(what()))?
            .get(0);
        self.origin_ids.insert(origin.to_string(), id as u32);
        Ok(())
    }

    /// Applies one change of the open transaction.
    pub async fn apply_change(&mut self, change: &Change) -> Result<(), ApplyError> {
        if !self.writes.is_empty() {
            return match self.within_scope(change).await? {
                Some(c) => self.apply_in_scope(&c).await,
                None => Ok(()),
            };
        }
        self.apply_in_scope(change).await
    }

    async fn apply_in_scope(&mut self, change: &Change) -> Result<(), ApplyError> {
        match change {
            Change::Insert(i) => self.insert(i).await,
            Change::Update(u) => self.update(u).await,
            Change::Delete(d) => self.delete(d).await,
            Change::Truncate(t) => self.truncate(t).await,
            Change::SetAside(t) => self.set_aside(t).await,
        }
    }

    /// Opens the target transaction for `txn` (idempotent within one transaction).
    pub async fn begin(&mut self, txn: &RemoteTxn) -> Result<(), ApplyError> {
        if self.open.is_some() {
            return Ok(());
        }
        self.waiting_for_table.clear();
        self.references.forget_transaction();
        self.waiting_bytes = 0;
        self.waiting_relations.clear();
        if self.merged_stale {
            self.reload_merged().await?;
        }
        if self.origin_at_commit {
            // Parallel apply: the origin is set up for each commit only (below).
            self.ensure_origin(&txn.origin).await?;
        } else if self.session_origin.as_deref() != Some(txn.origin.as_str()) {
            let mut sql = String::new();
            if self.session_origin.take().is_some() {
                sql.push_str("SELECT pg_replication_origin_session_reset(); ");
            }
            self.ensure_origin(&txn.origin).await?;
            sql.push_str(&format!(
                "SELECT pg_replication_origin_session_setup({})",
                quote_literal(&txn.origin)
            ));
            self.send_batch(sql, "setting up the replication origin")
                .await?;
            self.session_origin = Some(txn.origin.clone());
        }
        // Held: opened by the first request that needs it, if any (`held`). Its order
        // lock, a session-level one, is taken at once, outside the transaction.
        let hold = self.can_hold();
        match self.next_lock.take() {
            None if hold => self.held = Some(Default::default()),
            None => {
                self.send_batch("BEGIN".into(), "opening the target transaction")
                    .await?
            }
            Some(lock) if hold => {
                self.held_lock = Some(lock);
                let take = self.order_statements().await?.lock;
                let client = self.client.clone();
                let (link, seq) = lock.key_pair();
                self.send(Tag::Locked { seq: lock.seq }, 64, async move {
                    client.execute(&take, &[&link, &seq]).await
                })
                .await?;
                self.held = Some(Default::default());
            }
            Some(lock) => {
                self.held_lock = Some(lock);
                let client = self.client.clone();
                let sql = format!("BEGIN; {}", lock.lock_sql());
                self.send(Tag::Locked { seq: lock.seq }, 64, async move {
                    client.batch_execute(&sql).await.map(|_| 0)
                })
                .await?;
            }
        }
        self.open = Some(txn.clone());
        self.rows_in_txn = 0;
        Ok(())
    }

    /// Parallel apply: the statements that take a held transaction's order lock (`$1`,
    /// `$2`: its keys) and release it after the origin's reset, prepared once.
    async fn order_statements(&mut self) -> Result<OrderStatements, ApplyError> {
        if let Some(s) = &self.order_statements {
            return Ok(s.clone());
        }
        // Direct requests wait for everything in flight (see `begin`).
        self.flush().await?;
        let lock = self
            .client
            .prepare("SELECT pg_advisory_lock($1::int4, $2::int4)")
            .await
            .map_err(SqlError::of("preparing the order lock"))?;
        // The origin is reset before the lock goes (the subquery runs first), so the
        // successor, which waits for the lock, can set it up.
        let unlock = self
            .client
            .prepare(
                "SELECT pg_advisory_unlock($1::int4, $2::int4) \
                 FROM (SELECT pg_replication_origin_session_reset()) r",
            )
            .await
            .map_err(SqlError::of("preparing the release of the order lock"))?;
        let s = OrderStatements { lock, unlock };
        self.order_statements = Some(s.clone());
        Ok(s)
    }

    async fn send_batch(&mut self, sql: String, what: &'static str) -> Result<(), ApplyError> {
        let client = self.client.clone();
        let bytes = sql.len();
        self.send(Tag::Other { what }, bytes, async move {
            client.batch_execute(&sql).await.map(|_| 0)
        })
        .await
    }

    /// Sends one request through the pipeline and interprets the answers that came back
    /// meanwhile. A held transaction is opened first, unless the request only reads.
    async fn send(
        &mut self,
        tag: Tag,
        bytes: usize,
        request: impl std::future::Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'static,
    ) -> Result<(), ApplyError> {
        if self.held.is_some() && !tag.only_reads() {
            self.open_held().await?;
        }
        self.push(tag, bytes, request).await
    }

    /// [`ApplyWorker::send`] as it is, into the transaction as it stands.
    async fn push(
        &mut self,
        tag: Tag,
        bytes: usize,
        request: impl std::future::Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'static,
    ) -> Result<(), ApplyError> {
        let answers = self.pipeline.push(tag, bytes, request).await;
        self.settle(answers)
    }

    /// Sends the pending run of inserts or of guarded changes (at most one is pending),
    /// opening a held transaction first: every other request, and every direct request
    /// (which the callers make next), comes after the changes the source sent before it,
    /// in the open target transaction.
    pub(super) async fn flush_runs(&mut self) -> Result<(), ApplyError> {
        self.open_held().await?;
        self.send_insert_run().await?;
        self.send_guarded_run().await
    }

    /// A change on the fast path met a unique key: its transaction goes again, carefully.
    fn fast_path_hit(&self, relation_id: u32, e: &tokio_postgres::Error) -> ApplyError {
        ApplyError::FastPathHitUniqueKey {
            table: self.table_name(relation_id),
            detail: server_message(e),
        }
    }

    /// Interprets answers: errors become [`ApplyError`]s, confirmed commits move `committed`.
    fn settle(&mut self, answers: Vec<Answer>) -> Result<(), ApplyError> {
        for answer in answers {
            self.settle_one(answer)?;
        }
        Ok(())
    }

    fn settle_one(&mut self, (tag, result): Answer) -> Result<(), ApplyError> {
        match (tag, result) {
            (Tag::InsertPosition | Tag::FlushPosition, Ok(UNREADABLE_LSN)) => {
                return Err(ApplyError::Protocol(
                    "the target answered a WAL position that does not parse".into(),
                ))
            }
            (Tag::Locked { seq }, Ok(_)) => self.answered(Answered::Locked(seq)),
            (Tag::Progress { previous, end }, Err(e))
                if e.code() == Some(&SqlState::DIVISION_BY_ZERO) =>
            {
                return Err(ApplyError::OutOfOrder { previous, end });
            }
            (Tag::Progress { .. }, Err(source)) => {
                return Err(SqlError::new(
                    "recording the link's progress and the origin's lsn and commit time",
                    source,
                )
                .into())
            }
            (Tag::Locked { .. }, Err(source)) => {
                return Err(SqlError::new(
                    "opening the target transaction with its order lock",
                    source,
                )
                .into())
            }
            (Tag::Commit { end_lsn } | Tag::Whole { end_lsn, .. }, Ok(_)) => {
                self.answered(Answered::Confirmed(end_lsn));
                self.durability.confirmed(end_lsn);
                self.publish_merges(end_lsn);
            }
            // Every commit answered before this read was executed before it: its commit
            // record lies at or before this position.
            (Tag::InsertPosition, Ok(position)) => self.durability.insert_position(position),
            (Tag::MergedKeys, Ok(count)) => {
                if count as i64 != self.merged_count {
                    self.merged_stale = true;
                }
            }
            (Tag::FlushPosition, Ok(flushed)) => self.durability.flushed(flushed),
            (_, Ok(_)) => {}
            // On the fast path, an update that hits a unique key is decided on a second,
            // careful pass; there it is settled before it is sent, so this is the end.
            (Tag::Row { relation_id, .. }, Err(e))
                if e.code() == Some(&SqlState::UNIQUE_VIOLATION) && !self.is_careful() =>
            {
                return Err(self.fast_path_hit(relation_id, &e));
            }
            (Tag::Row { relation_id, .. }, Err(e))
                if e.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
            {
                return Err(ApplyError::Conflict {
                    table: self.table_name(relation_id),
                    kind: crate::merge::conflict::ConflictKind::UpdateExists,
                    detail: format!(
                        "{}; the update would give this row a unique key another row here already has. \
                         Resolve it by hand (change one of the two rows), then the link resumes",
                        server_message(&e)
                    ),
                });
            }
            (Tag::Insert { relation_id } | Tag::Copy { relation_id }, Err(e))
                if e.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
            {
                return Err(self.fast_path_hit(relation_id, &e));
            }
            (
                Tag::Guarded {
                    relation_id,
                    delete,
                },
                Err(e),
            ) if e.code() == Some(&SqlState::DIVISION_BY_ZERO) => {
                return Err(ApplyError::FastPathUndecided {
                    table: self.table_name(relation_id),
                    change: if delete { "delete" } else { "update" },
                });
            }
            (Tag::Guarded { relation_id, .. }, Err(e))
                if e.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
            {
                return Err(self.fast_path_hit(relation_id, &e));
            }
            // In a held transaction the table is not known: applied again carefully,
            // change by change, where it is.
            (Tag::Whole { .. }, Err(e)) if Refusal::DoesNotFit.is(&e) => {
                return Err(ApplyError::FastPathHitUniqueKey {
                    table: "a table of the transaction".into(),
                    detail: server_message(&e),
                });
            }
            (
                Tag::Insert { relation_id }
                | Tag::Copy { relation_id }
                | Tag::Row { relation_id, .. }
                | Tag::Guarded { relation_id, .. },
                Err(source),
            ) => return Err(change_failed(self.table_name(relation_id), source)),
            // A held transaction in one statement: a guarded write that wrote too few rows
            // and a progress guard that refused both divide by zero. With a guarded write
            // in it, the transaction goes again carefully, where an out-of-order progress
            // shows as itself.
            (
                Tag::Whole {
                    guarded: Some((relation_id, delete)),
                    ..
                },
                Err(e),
            ) if e.code() == Some(&SqlState::DIVISION_BY_ZERO) => {
                return Err(ApplyError::FastPathUndecided {
                    table: self.table_name(relation_id),
                    change: if delete { "delete" } else { "update" },
                });
            }
            (
                Tag::Whole {
                    previous, end_lsn, ..
                },
                Err(e),
            ) if e.code() == Some(&SqlState::DIVISION_BY_ZERO) => {
                return Err(ApplyError::OutOfOrder {
                    previous,
                    end: end_lsn,
                });
            }
            (Tag::Whole { .. }, Err(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                let table = e
                    .as_db_error()
                    .and_then(|d| Some(format!("{}.{}", d.schema()?, d.table()?)))
                    .unwrap_or_else(|| "a table of the transaction".into());
                return Err(ApplyError::FastPathHitUniqueKey {
                    table,
                    detail: server_message(&e),
                });
            }
            (Tag::Whole { relations, .. }, Err(source)) => {
                let tables: Vec<String> = relations.iter().map(|&r| self.table_name(r)).collect();
                return Err(SqlError::new(
                    format!(
                        "applying a transaction to {} in one statement (its changes, the link's progress and the origin's commit)",
                        tables.join(", ")
                    ),
                    source,
                )
                .into());
            }
            (Tag::Commit { .. }, Err(source)) => {
                return Err(SqlError::new("committing the target transaction", source).into())
            }
            (Tag::MergedKeys, Err(source)) => {
                return Err(SqlError::new("counting walsync.merged_keys", source).into())
            }
            (Tag::InsertPosition | Tag::FlushPosition, Err(source)) => {
                return Err(SqlError::new("reading the target's WAL positions", source).into())
            }
            (Tag::Other { what }, Err(source)) => return Err(SqlError::new(what, source).into()),
        }
        Ok(())
    }

    /// The newest source end LSN whose target commit is confirmed, once.
    pub fn take_committed(&mut self) -> Option<Lsn> {
        self.durability.take_committed()
    }

    pub fn has_in_flight(&self) -> bool {
        !self.pipeline.is_empty()
    }

    /// Nothing in flight and every commit durable: a later position may be acknowledged.
    pub fn is_settled(&self) -> bool {
        self.pipeline.is_empty() && !self.durability.waiting()
    }

    /// Commits wait for their flush and no check of it is under way.
    pub fn needs_flush_check(&self) -> bool {
        self.durability.needs_check()
    }

    /// Asks the target how far its WAL is flushed; the answer releases durable commits.
    pub async fn check_flush(&mut self) -> Result<(), ApplyError> {
        self.durability.check_sent();
        let client = self.client.clone();
        self.send(Tag::InsertPosition, 64, async move {
            read_lsn(&client, "SELECT pg_current_wal_insert_lsn()::text").await
        })
        .await?;
        let client = self.client.clone();
        self.send(Tag::FlushPosition, 64, async move {
            read_lsn(&client, "SELECT pg_current_wal_flush_lsn()::text").await
        })
        .await?;
        // A merge another sidecar decided on this node: seen here within one check.
        // One simple-query request, like the position reads: nothing prepared on the way.
        let client = self.client.clone();
        self.send(Tag::MergedKeys, 64, async move {
            let messages = client
                .simple_query("SELECT count(*) FROM walsync.merged_keys")
                .await?;
            Ok(messages
                .iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
                    _ => None,
                })
                .unwrap_or(0))
        })
        .await
    }

    /// Waits until every commit sent is answered and flushed on the target.
    pub async fn wait_durable(&mut self) -> Result<(), ApplyError> {
        self.flush().await?;
        while self.durability.waiting() {
            self.check_flush().await?;
            self.flush().await?;
            if self.durability.awaits_flush() {
                // The WAL writer flushes every wal_writer_delay (200 ms by default).
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Waits for the oldest outstanding answer and interprets it.
    pub async fn settle_next(&mut self) -> Result<(), ApplyError> {
        match self.pipeline.next().await {
            Some(a) => self.settle_one(a),
            None => Ok(()),
        }
    }

    /// Waits for every outstanding answer.
    pub async fn flush(&mut self) -> Result<(), ApplyError> {
        let answers = self.pipeline.drain().await;
        self.settle(answers)
    }

    /// Sends one change after any pending inserts (which come before it in the source).
    async fn execute(
        &mut self,
        mapped: &Mapped,
        write: RowWrite,
        tag: Tag,
    ) -> Result<(), ApplyError> {
        self.flush_runs().await?;
        self.rows_in_txn += 1;
        self.send_write(mapped, write, tag).await
    }

    async fn send_write(
        &mut self,
        mapped: &Mapped,
        write: RowWrite,
        tag: Tag,
    ) -> Result<(), ApplyError> {
        self.open_held().await?;
        self.push_write(mapped, write, tag).await
    }

    /// [`ApplyWorker::send_write`] into the transaction as it stands.
    async fn push_write(
        &mut self,
        mapped: &Mapped,
        write: RowWrite,
        tag: Tag,
    ) -> Result<(), ApplyError> {
        let stmt = self.statement(mapped, write.shape).await?;
        let client = self.client.clone();
        let params = write.params;
        let bytes = params.iter().map(|v| v.as_bytes_len()).sum::<usize>() + 64;
        self.push(tag, bytes, async move {
            client.execute_raw(&stmt, params.iter().map(Param)).await
        })
        .await
    }

    /// The nodes whose captured DDL runs here (`[cluster] ddl_from`; None: every node).
    pub fn set_ddl_from(&mut self, nodes: Option<Vec<String>>) {
        self.ddl_from = nodes;
    }

    /// The role replayed DDL runs as here (`[cluster] ddl_role`; None: the captured one).
    pub fn set_ddl_role(&mut self, role: Option<String>) {
        self.ddl_role = role;
    }

    fn is_careful(&self) -> bool {
        self.careful_txns > 0
    }

    /// Applies the next `n` transactions in careful mode: after an insert hit a unique key
    /// on the fast path, its transaction comes again and is checked row by row.
    pub fn set_careful(&mut self, n: u32) {
        self.careful_txns = n;
    }

    pub async fn truncate(&mut self, t: &Truncate) -> Result<(), ApplyError> {
        self.flush_runs().await?;
        let mut tables = Vec::new();
        for &id in &t.relation_ids {
            if self.replicates(id)? {
                match self.ensure_map(id).await? {
                    Target::Whole(m) | Target::WithoutColumns(m, _) => {
                        tables.push(m.target.qualified())
                    }
                    // A table dropped here has nothing left to truncate.
                    Target::Dropped => {}
                }
            }
        }
        if tables.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "TRUNCATE ONLY {}{}{}",
            tables.join(", "),
            if t.restart_identity {
                " RESTART IDENTITY"
            } else {
                ""
            },
            if t.cascade { " CASCADE" } else { "" }
        );
        self.rows_in_txn += 1;
        self.send_batch(sql, "applying a TRUNCATE").await
    }

    /// Sends the commit of the open target transaction with the link's progress at
    /// `end_lsn`; [`ApplyWorker::take_committed`] reports it once confirmed. Returns the
    /// number of changes in it (0: nothing was open, nothing sent).
    pub async fn commit(&mut self, end_lsn: Lsn) -> Result<u64, ApplyError> {
        let previous = self.last_progress;
        self.commit_ordered(end_lsn, previous, None).await
    }

    /// [`ApplyWorker::commit`] of a transaction whose progress builds on `previous`, the
    /// end of the source transaction applied just before it, on whichever session; with
    /// `after`, the predecessor's order lock is awaited first, so that it has ended.
    pub async fn commit_ordered(
        &mut self,
        end_lsn: Lsn,
        previous: Lsn,
        after: Option<OrderLock>,
    ) -> Result<u64, ApplyError> {
        self.no_rows_waiting_for_a_table()?;
        if self.open.is_some() {
            self.keep_referenced_rows().await?;
        }
        self.end_runs().await?;
        let Some(txn) = self.open.take() else {
            return Ok(0);
        };
        self.commit_merges(end_lsn);
        self.careful_txns = self.careful_txns.saturating_sub(1);
        if self.commit_held(&txn, end_lsn, previous, after).await? {
            self.last_progress = end_lsn;
            return Ok(self.rows_in_txn);
        }
        // One statement: the wait for the predecessor's end (a shared lock held to this
        // transaction's end) in a subquery, which the planner keeps apart (it calls a
        // volatile function), so it is done before the origin is set up.
        let before = match (after, self.origin_at_commit) {
            (None, false) => String::new(),
            (None, true) => format!(
                "SELECT pg_replication_origin_session_setup({})",
                quote_literal(&txn.origin)
            ),
            (Some(lock), false) => lock.wait_sql(),
            (Some(lock), true) => format!(
                "SELECT pg_replication_origin_session_setup({}) FROM ({}) w",
                quote_literal(&txn.origin),
                lock.wait_sql()
            ),
        };
        if !before.is_empty() {
            let client = self.client.clone();
            self.send(
                Tag::Other {
                    what: "waiting for the previous transaction to end (its order lock) and setting up the origin",
                },
                64,
                async move { client.batch_execute(&before).await.map(|_| 0) },
            )
            .await?;
        }
        let (client, stmt) = (self.client.clone(), self.record_progress.clone());
        let params = progress_params(&self.link, &txn, end_lsn, previous);
        self.last_progress = end_lsn;
        self.send(
            Tag::Progress {
                previous,
                end: end_lsn,
            },
            160,
            async move { client.execute_raw(&stmt, params.iter().map(Param)).await },
        )
        .await?;
        // Parallel apply: the origin is reset and the order lock released in the same
        // request, after the COMMIT (an error there stops the session, whose connection
        // then releases the lock).
        let sql = match (self.held_lock.take(), self.origin_at_commit) {
            (None, false) => "COMMIT".to_string(),
            (None, true) => "COMMIT; SELECT pg_replication_origin_session_reset()".to_string(),
            (Some(lock), false) => format!("COMMIT; {}", lock.unlock_sql()),
            // The origin is reset before the lock goes (the subquery runs first), so the
            // successor, which waits for the lock, can set it up.
            (Some(lock), true) => format!(
                "COMMIT; {} FROM (SELECT pg_replication_origin_session_reset()) r",
                lock.unlock_sql()
            ),
        };
        let client = self.client.clone();
        self.send(Tag::Commit { end_lsn }, 64, async move {
            client.batch_execute(&sql).await.map(|_| 0)
        })
        .await?;
        self.resend_kept_rows(end_lsn).await?;
        Ok(self.rows_in_txn)
    }
}

/// The error of a change to `table` (as the upstream calls it) the target refused:
/// values this table no longer takes (its type or constraints changed here while the
/// author was cut off) set the transaction aside (`ApplyError::DoesNotFit`).
fn change_failed(table: String, e: tokio_postgres::Error) -> ApplyError {
    if Refusal::DoesNotFit.is(&e) {
        return ApplyError::DoesNotFit {
            table,
            reason: server_message(&e),
        };
    }
    SqlError::new(format!("applying a change ({table})"), e).into()
}

/// How often the target is asked how far it flushed while confirmed commits wait for it
/// (it flushes every wal_writer_delay, 200 ms by default).
pub const FLUSH_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Values as statement parameters of any type (see [`Param`]).
pub(super) fn as_params<'a>(
    params: &'a [Param<'a>],
) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

/// What a statement run by [`unless_duplicate`] did.
pub(super) enum Tried {
    Done(u64),
    /// A unique violation, rolled back: the index the server named, if any, and its
    /// message.
    Duplicate {
        index: Option<String>,
        message: String,
    },
}

/// Runs one statement inside a savepoint, in the open transaction: a unique violation
/// rolls it back (and releases the savepoint, so that none pile up as subtransactions)
/// and is returned, for the caller to settle; the transaction goes on. The careful path
/// parks a row that way, a merge finds the twin of a re-pointed row.
pub(super) async fn unless_duplicate<T>(
    client: &Client,
    statement: &T,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Tried, tokio_postgres::Error>
where
    T: ?Sized + tokio_postgres::ToStatement,
{
    client.batch_execute("SAVEPOINT walsync_row").await?;
    match client.execute(statement, params).await {
        Ok(n) => {
            client
                .batch_execute("RELEASE SAVEPOINT walsync_row")
                .await?;
            Ok(Tried::Done(n))
        }
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            client
                .batch_execute("ROLLBACK TO SAVEPOINT walsync_row; RELEASE SAVEPOINT walsync_row")
                .await?;
            Ok(Tried::Duplicate {
                index: e
                    .as_db_error()
                    .and_then(|d| d.constraint())
                    .map(str::to_string),
                message: server_message(&e),
            })
        }
        Err(e) => Err(e),
    }
}

/// The link's progress moved, only on top of the previous transaction's (`u`, one row
/// returned), and the transaction marked as replaying the author's (`o`: origin LSN and
/// commit time, read at commit). Parameters: [`progress_params`].
///
/// The update only succeeds on top of the previous transaction's progress; the statement
/// that carries it fails otherwise (division by zero), so that after a failed source
/// transaction no later one commits: requests are pipelined, and PostgreSQL turns the
/// failed one's COMMIT into a ROLLBACK and would run the next.
fn progress_ctes() -> String {
    format!(
        "u AS (UPDATE walsync.link_progress SET source_lsn = $2::text::pg_lsn, \
           source_commit_time = {time}, transactions = transactions + 1, applied_at = now() \
           WHERE link = $1 AND source_lsn = $4::text::pg_lsn RETURNING 1), \
         o AS (SELECT pg_replication_origin_xact_setup($5::text::pg_lsn, {time}))",
        time = timestamp_sql("$3::int8")
    )
}

/// How many parameters `progress_ctes` takes (`$1..$5`): a statement that carries it
/// numbers its own from `$6`.
const PROGRESS_PARAMS: usize = 5;

/// [`progress_ctes`] for a held transaction applied on one of several sessions, in the
/// statement that is the whole transaction (decision 0011). Each step reads the one
/// before, so they run in this order:
/// - CTE `after`, whose boolean column `ok` checks every write of the transaction (so
///   the writes come first);
/// - the wait for the predecessor's order lock (`w`; its first key is offset by `0 *`
///   `after.ok`);
/// - the author's origin set up on this session (`s`);
/// - the progress update (`m`, `u`) and the origin's commit (`o`), both reading `s`.
///
/// The statement's snapshot may be older than the predecessor's commit, so the update
/// (`m`) finds the link's row by its key alone and moves the progress only if it is the
/// previous one; `u` has a row if it moved. PostgreSQL computes the values written from
/// the newest version of the row once the predecessor has ended (READ COMMITTED re-reads
/// a row updated meanwhile): the progress moves if the predecessor committed, and if it
/// rolled back it does not and the statement divides by zero. (A guard that divided by
/// zero in the update itself would fail on the older version, before the re-read.)
/// Parameters: [`progress_params`], then [`order_params`].
fn ordered_progress_ctes(after: &str) -> String {
    format!(
        "w AS (SELECT pg_advisory_xact_lock_shared($6::int4 + 0 * {after}.ok::int, $7::int4) FROM {after}), \
         s AS (SELECT pg_replication_origin_session_setup($8::text) FROM w), \
         m AS (UPDATE walsync.link_progress p \
           SET source_lsn = CASE WHEN p.source_lsn = $4::text::pg_lsn THEN $2::text::pg_lsn ELSE p.source_lsn END, \
           source_commit_time = {time}, transactions = p.transactions + 1, applied_at = now() \
           FROM s WHERE p.link = $1 RETURNING p.source_lsn = $2::text::pg_lsn AS moved), \
         u AS (SELECT 1 FROM m WHERE moved), \
         o AS (SELECT pg_replication_origin_xact_setup($5::text::pg_lsn, {time}) FROM s)",
        time = timestamp_sql("$3::int8")
    )
}

/// How many parameters `ordered_progress_ctes` takes (`$1..$8`).
const ORDERED_PROGRESS_PARAMS: usize = 8;

/// Parameters of `ordered_progress_ctes` after [`progress_params`]: the order lock
/// waited for, the origin to set up.
fn order_params(wait: OrderLock, origin: &str) -> Vec<Value> {
    let (link, seq) = wait.key_pair();
    [link.to_string(), seq.to_string(), origin.to_string()]
        .into_iter()
        .map(|s| Value::Text(s.into()))
        .collect()
}

/// Parameters of `progress_ctes`: the link, the source commit's end LSN, its commit time
/// (µs since 2000-01-01), the progress it builds on, the origin's LSN.
fn progress_params(link: &str, txn: &RemoteTxn, end: Lsn, previous: Lsn) -> Vec<Value> {
    [
        link.to_string(),
        end.to_string(),
        txn.commit_time_us.to_string(),
        previous.to_string(),
        txn.origin_lsn.to_string(),
    ]
    .into_iter()
    .map(|s| Value::Text(s.into()))
    .collect()
}

/// A PostgreSQL timestamp (µs since 2000-01-01 UTC, an int8 SQL expression) as an exact
/// timestamptz expression.
fn timestamp_sql(us_since_2000: &str) -> String {
    format!("('2000-01-01 00:00:00+00'::timestamptz + {us_since_2000} * interval '1 microsecond')")
}

/// Answer of a request whose last result is one pg_lsn as text.
const UNREADABLE_LSN: u64 = u64::MAX;

async fn read_lsn(client: &Client, sql: &str) -> Result<u64, tokio_postgres::Error> {
    let messages = client.simple_query(sql).await?;
    let lsn = messages.iter().rev().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|s| s.parse::<Lsn>().ok()),
        _ => None,
    });
    Ok(lsn.map(|l| l.0).unwrap_or(UNREADABLE_LSN))
}

/// The server's own message of an error, or the client's description when there is none.
pub(crate) fn server_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}
