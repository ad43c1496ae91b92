//! Apply: one target transaction per source transaction.
//!
//! Guarantees, for each source transaction that the merge step lets through:
//! - it runs in exactly one target transaction, in source commit order, rows written as
//!   they arrive (nothing collected first, so memory does not grow with its size);
//! - that transaction carries the author's replication origin and the author's commit LSN
//!   and time (`pg_replication_origin_session_setup` + `pg_replication_origin_xact_setup`),
//!   so the row keeps its first author and the change is never sent back to it;
//! - it also moves `walsync.link_progress` to the source commit's end LSN, so rows and
//!   progress commit together and a crash at any point neither loses nor doubles it.
//!
//! The session runs with `session_replication_role = replica`, as PostgreSQL's own apply
//! worker does: user triggers, foreign-key triggers and event triggers stay quiet for
//! changes that were already checked on their author.

pub mod catalog;
mod conflict;
mod ddl;
pub(crate) use ddl::run_captured_ddl;
mod dropped;
mod durability;
pub mod merged;
mod param;
pub mod pipeline;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use futures_util::SinkExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use crate::config::{MergeMode, TablePolicy};
use crate::lsn::Lsn;
use crate::merge::conflict::Rule;
use crate::merge::keys::{ForeignKey, TableName};
use crate::merge::relation_travels;
use crate::merge::statements::{
    batch_sizes, copy_text_row, RelationMap, RowWrite, Shape, StatementError,
};
pub use crate::merge::RemoteTxn;
use crate::names::quote_literal;
use crate::node::setup::ensure_origin;
use crate::pgoutput::{Insert, Relation, Truncate, Value};
use durability::Durability;
use param::Param;
use pipeline::{Answer, Pipeline, Tag};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{what}")]
    Sql {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Statement(#[from] StatementError),
    #[error("table {table} does not exist on this node; the schemas differ (create it, or apply the missing DDL), then the link resumes")]
    MissingTable { table: String },
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
    #[error(
        "a change names relation id {0} that the upstream never described (no Relation message)"
    )]
    UnknownRelation(u32),
    #[error("{table}: {kind}: {detail}")]
    Conflict {
        table: String,
        kind: &'static str,
        detail: String,
    },
}

impl ApplyError {
    fn sql(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
        let what = what.into();
        move |source| ApplyError::Sql { what, source }
    }

    /// SQLSTATE of the underlying server error, if any.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ApplyError::Sql { source, .. } => source.code().map(|c| c.code()),
            _ => None,
        }
    }
}

/// What the applier knows about one source relation.
struct RelationEntry {
    source: Relation,
    /// `None` until the first change needs it (the target catalog is read then).
    map: Option<RelationMap>,
    /// How its conflicts are decided (from the table policy, set with the map).
    policy: RelationPolicy,
    /// What this node dropped of it (found with the map): its changes are recorded, not
    /// applied, for the dropped part.
    gone: Gone,
    /// Its foreign keys into other tables' primary keys: read the first time a change
    /// of it is applied while any merge is known (decision 0008).
    fks: Option<Vec<ForeignKey>>,
}

/// A relation the upstream still sends, that this node dropped (wholly or some columns).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Gone {
    #[default]
    Nothing,
    Table,
    /// Source column indexes of the dropped columns, ascending.
    Columns(Vec<usize>),
}

/// A table policy resolved against one source relation.
#[derive(Debug, Clone, Default)]
struct RelationPolicy {
    /// Source column indexes of the counter columns.
    counters: Vec<usize>,
    /// Source column indexes of the node-local columns.
    local_columns: Vec<usize>,
    /// Source column indexes of columns an open DDL warning says each node filled with
    /// its own values: left out when telling a sequential edit from a conflict.
    per_node_columns: Vec<usize>,
    /// Unique indexes whose collisions park the incoming row rather than settle it.
    park_unique: Vec<String>,
    /// Unique indexes whose collisions merge the two rows although they could rename.
    merge_unique: Vec<String>,
    /// Target columns (and their values, as text) the losing row of a rename also gets.
    on_rename: Vec<(usize, String)>,
    rule: Rule,
    merge_columns: bool,
}

/// Consecutive inserts into one relation with the same columns. Up to [`SMALL_RUN_ROWS`]
/// they are kept as rows and sent as multi-row INSERTs: one request each, nothing to wait
/// for. A longer run switches to COPY, whose server-side batching wins once the round trip
/// it must wait for (CopyInResponse, during which nothing else can be sent) is spread over
/// enough rows. Either way a run ends at the next other change; a COPY run also when it
/// holds [`COPY_RUN_BYTES`].
struct InsertRun {
    relation_id: u32,
    columns: Vec<usize>,
    rows: Vec<Vec<Value>>,
    /// COPY text of the run once it is long enough; empty before.
    copy: BytesMut,
}

const SMALL_RUN_ROWS: usize = 256;
/// A COPY run is sent once it holds this much (4 MiB).
const COPY_RUN_BYTES: usize = 4 * 1024 * 1024;

pub struct ApplyWorker {
    client: Arc<Client>,
    link: String,
    relations: HashMap<u32, RelationEntry>,
    statements: HashMap<(u32, Shape), Statement>,
    session_origin: Option<String>,
    open: Option<RemoteTxn>,
    rows_in_txn: u64,
    pipeline: Pipeline,
    /// Which confirmed commits are flushed on the target.
    durability: Durability,
    run: Option<InsertRun>,
    xact_setup: Statement,
    record_progress: Statement,
    record_conflict: Option<Statement>,
    /// Origin name of writes made on the target itself (`walsync_<target node>`).
    local_origin: String,
    /// Transactions still to apply in careful mode (inserts checked one by one).
    careful_txns: u32,
    /// `[cluster] ddl_from`: the nodes whose DDL is run here; None: every node.
    ddl_from: Option<Vec<String>>,
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
    /// Tables merged into, with the foreign keys that point at them.
    merge_targets: HashMap<TableName, merged::MergeTarget>,
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
            .map_err(ApplyError::sql(
                "setting session_replication_role = replica (walsync's role must be a superuser)",
            ))?;
        // The progress read next must be durable before the stream reports it as the
        // acknowledged start: a synchronous commit of a transaction with an xid flushes
        // all WAL before it, earlier asynchronous commits included.
        client
            .batch_execute("SET synchronous_commit = on; BEGIN; SELECT txid_current(); COMMIT")
            .await
            .map_err(ApplyError::sql("flushing the target's WAL"))?;
        // Commits need not wait for their flush: the upstream is acknowledged only up to
        // what pg_current_wal_flush_lsn() shows durable (DESIGN.md, "Apply").
        client
            .batch_execute("SET synchronous_commit = off")
            .await
            .map_err(ApplyError::sql("setting synchronous_commit = off"))?;
        let xact_setup = client
            .prepare_typed(
                &format!(
                    "SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, {})",
                    timestamp_sql("$2::int8")
                ),
                &[Type::TEXT, Type::INT8],
            )
            .await
            .map_err(ApplyError::sql(
                "preparing pg_replication_origin_xact_setup",
            ))?;
        client
            .execute(
                "INSERT INTO walsync.link_progress (link, source_lsn) VALUES ($1, '0/0') ON CONFLICT (link) DO NOTHING",
                &[&link],
            )
            .await
            .map_err(ApplyError::sql("creating the link's progress row (has walsync init run on this node?)"))?;
        let record_progress = client
            .prepare_typed(
                // The update only succeeds on top of the previous transaction's progress;
                // otherwise it fails (division by zero), so that after a failed source
                // transaction no later one commits: requests are pipelined, and PostgreSQL
                // turns the failed one's COMMIT into a ROLLBACK and would run the next.
                &format!(
                    "WITH u AS (UPDATE walsync.link_progress SET source_lsn = $2::text::pg_lsn, \
                       source_commit_time = {}, transactions = transactions + 1, applied_at = now() \
                       WHERE link = $1 AND source_lsn = $4::text::pg_lsn RETURNING 1) \
                     SELECT 1 / count(*)::int FROM u",
                    timestamp_sql("$3::int8")
                ),
                &[Type::TEXT, Type::TEXT, Type::INT8, Type::TEXT],
            )
            .await
            .map_err(ApplyError::sql("preparing the progress update"))?;
        Ok(ApplyWorker {
            client: Arc::new(client),
            link,
            relations: HashMap::new(),
            statements: HashMap::new(),
            session_origin: None,
            open: None,
            rows_in_txn: 0,
            pipeline: Pipeline::default(),
            durability: Durability::default(),
            run: None,
            xact_setup,
            record_progress,
            record_conflict: None,
            local_origin,
            careful_txns: 0,
            ddl_from: None,
            last_progress: Lsn::ZERO,
            policies: HashMap::new(),
            merged: merged::SharedKeys::default(),
            merged_count: 0,
            merged_stale: true,
            merge_targets: HashMap::new(),
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
            .map_err(ApplyError::sql(
                "reading walsync.link_progress (has walsync init run on this node?)",
            ))?;
        let lsn = match row {
            Some(r) => r.get::<_, String>(0).parse().unwrap_or(Lsn::ZERO),
            None => Lsn::ZERO,
        };
        self.last_progress = lsn;
        Ok(lsn)
    }

    /// A Relation message: (re)describes a source relation. Anything cached for it goes.
    /// Inserts decoded under the old description are sent first, with the old mapping.
    pub async fn on_relation(&mut self, rel: Relation) -> Result<(), ApplyError> {
        if self.run.as_ref().is_some_and(|r| r.relation_id == rel.id) {
            self.flush_inserts().await?;
        }
        self.statements.retain(|(id, _), _| *id != rel.id);
        self.relations.insert(
            rel.id,
            RelationEntry {
                policy: RelationPolicy::default(),
                gone: Gone::Nothing,
                source: rel,
                map: None,
                fks: None,
            },
        );
        Ok(())
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Whether changes to this relation are applied at all.
    pub fn replicates(&self, relation_id: u32) -> Result<bool, ApplyError> {
        let e = self
            .relations
            .get(&relation_id)
            .ok_or(ApplyError::UnknownRelation(relation_id))?;
        let (namespace, name) = (&e.source.namespace, &e.source.name);
        let local = self
            .policies
            .get(&(namespace.clone(), name.clone()))
            .is_some_and(|p| p.local);
        Ok(relation_travels(namespace, name, local))
    }

    /// Merges are known to every applier of `shared` (one target node's, in this process).
    pub fn share_merges(&mut self, shared: merged::SharedKeys) {
        self.merged = shared;
        self.merged_stale = true;
    }

    /// Opens the target transaction for `txn` (idempotent within one transaction).
    pub async fn begin(&mut self, txn: &RemoteTxn) -> Result<(), ApplyError> {
        if self.open.is_some() {
            return Ok(());
        }
        if self.merged_stale {
            self.reload_merged().await?;
        }
        if self.session_origin.as_deref() != Some(txn.origin.as_str()) {
            let mut sql = String::new();
            if self.session_origin.take().is_some() {
                sql.push_str("SELECT pg_replication_origin_session_reset(); ");
            }
            // A direct request must not queue behind a COPY whose data only a poll of the
            // pipeline would send: settle everything first (rare: once per origin switch).
            self.flush().await?;
            ensure_origin(&self.client, &txn.origin)
                .await
                .map_err(ApplyError::sql(format!(
                    "creating replication origin {}",
                    txn.origin
                )))?;
            sql.push_str(&format!(
                "SELECT pg_replication_origin_session_setup({})",
                quote_literal(&txn.origin)
            ));
            self.send_batch(sql, "setting up the replication origin")
                .await?;
            self.session_origin = Some(txn.origin.clone());
        }
        self.send_batch("BEGIN".into(), "opening the target transaction")
            .await?;
        let (client, stmt) = (self.client.clone(), self.xact_setup.clone());
        let (lsn, time) = (txn.origin_lsn.to_string(), txn.commit_time_us);
        self.send(
            Tag::Other {
                what: "setting the origin's lsn and commit time",
            },
            64,
            async move { client.execute(&stmt, &[&lsn, &time]).await },
        )
        .await?;
        self.open = Some(txn.clone());
        self.rows_in_txn = 0;
        Ok(())
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
    /// meanwhile.
    async fn send(
        &mut self,
        tag: Tag,
        bytes: usize,
        request: impl std::future::Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'static,
    ) -> Result<(), ApplyError> {
        let answers = self.pipeline.push(tag, bytes, request).await;
        self.settle(answers)
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
            (Tag::Commit { end_lsn }, Ok(_)) => self.durability.confirmed(end_lsn),
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
                    kind: "update_exists",
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
                Tag::Insert { relation_id }
                | Tag::Copy { relation_id }
                | Tag::Row { relation_id, .. },
                Err(source),
            ) => {
                return Err(ApplyError::Sql {
                    what: format!("applying a change to {}", self.table_name(relation_id)),
                    source,
                })
            }
            (Tag::Commit { .. }, Err(source)) => {
                return Err(ApplyError::Sql {
                    what: "committing the target transaction".into(),
                    source,
                })
            }
            (Tag::MergedKeys, Err(source)) => {
                return Err(ApplyError::Sql {
                    what: "counting walsync.merged_keys".into(),
                    source,
                })
            }
            (Tag::InsertPosition | Tag::FlushPosition, Err(source)) => {
                return Err(ApplyError::Sql {
                    what: "reading the target's WAL positions".into(),
                    source,
                })
            }
            (Tag::Other { what }, Err(source)) => {
                return Err(ApplyError::Sql {
                    what: what.into(),
                    source,
                })
            }
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
        let client = self.client.clone();
        self.send(Tag::MergedKeys, 64, async move {
            let row = client
                .query_one("SELECT count(*) FROM walsync.merged_keys", &[])
                .await?;
            Ok(row.get::<_, i64>(0) as u64)
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

    fn map_for(&self, relation_id: u32) -> Option<&RelationMap> {
        self.relations
            .get(&relation_id)
            .and_then(|e| e.map.as_ref())
    }

    async fn ensure_map(&mut self, relation_id: u32) -> Result<(), ApplyError> {
        let entry = self
            .relations
            .get(&relation_id)
            .ok_or(ApplyError::UnknownRelation(relation_id))?;
        if entry.map.is_some() || entry.gone == Gone::Table {
            return Ok(());
        }
        // Direct requests wait for everything in flight (see `begin`); once per relation.
        self.flush().await?;
        let entry = self
            .relations
            .get(&relation_id)
            .ok_or(ApplyError::UnknownRelation(relation_id))?;
        let (namespace, name) = (entry.source.namespace.clone(), entry.source.name.clone());
        let Some(target) = catalog::target_table(&self.client, &namespace, &name).await? else {
            if dropped::table_was_dropped(&self.client, &namespace, &name).await? {
                self.set_gone(relation_id, Gone::Table);
                return Ok(());
            }
            return Err(ApplyError::MissingTable {
                table: format!("{namespace}.{name}"),
            });
        };
        let entry = self.relations.get(&relation_id).expect("checked above");
        let (source, gone) =
            dropped::without_dropped_columns(&self.client, &entry.source, &target).await?;
        let map = RelationMap::new(&source, target)?;
        let key = (entry.source.namespace.clone(), entry.source.name.clone());
        let mut policy = match self.policies.get(&key) {
            Some(p) => RelationPolicy {
                counters: map.source_indexes_of(&p.counters),
                local_columns: map.source_indexes_of(&p.local_columns),
                per_node_columns: Vec::new(),
                park_unique: p.park_unique.clone(),
                merge_unique: p.merge_unique.clone(),
                on_rename: p
                    .on_rename
                    .iter()
                    .filter_map(|(name, value)| {
                        let column = map.target.columns.iter().position(|c| c == name);
                        if column.is_none() {
                            tracing::warn!(table = %map.target.qualified(), column = %name, "[[tables]] on_rename names a column this table does not have; ignored");
                        }
                        Some((column?, value.clone()))
                    })
                    .collect(),
                rule: Rule {
                    prefer: p.prefer.as_deref().map(|n| format!("walsync_{n}")),
                },
                merge_columns: p.merge == MergeMode::Columns,
            },
            None => RelationPolicy::default(),
        };
        let warned: Vec<String> = self
            .client
            .query_one(
                "SELECT coalesce(array_agg(DISTINCT c), '{}') FROM walsync.ddl_warnings w, unnest(w.columns) c \
                 WHERE w.resolved_at IS NULL AND w.table_schema = $1 AND w.table_name = $2",
                &[&map.target.schema, &map.target.name],
            )
            .await
            .map_err(ApplyError::sql("reading walsync.ddl_warnings"))?
            .get(0);
        policy.per_node_columns = map.source_indexes_of(&warned);
        if let Some(e) = self.relations.get_mut(&relation_id) {
            e.map = Some(map);
            e.policy = policy;
            e.gone = gone;
        }
        Ok(())
    }

    /// The prepared statement of `shape` on this relation. Prepared before it is pushed,
    /// so that pushing sends the request itself (a statement prepared inside the
    /// pushed future would let later requests overtake it).
    async fn statement(&mut self, relation_id: u32, shape: Shape) -> Result<Statement, ApplyError> {
        let key = (relation_id, shape);
        if let Some(stmt) = self.statements.get(&key) {
            return Ok(stmt.clone());
        }
        // Direct requests wait for everything in flight (see `begin`); once per shape.
        self.flush().await?;
        let map = self
            .map_for(relation_id)
            .expect("ensure_map ran before statement");
        let sql = map.sql(&key.1);
        let stmt = self
            .client
            .prepare(&sql)
            .await
            .map_err(ApplyError::sql(format!("preparing {sql}")))?;
        self.statements.insert(key, stmt.clone());
        Ok(stmt)
    }

    /// Sends one change after any pending inserts (which come before it in the source).
    async fn execute(
        &mut self,
        relation_id: u32,
        write: RowWrite,
        tag: Tag,
    ) -> Result<(), ApplyError> {
        self.flush_inserts().await?;
        self.rows_in_txn += 1;
        self.send_write(relation_id, write, tag).await
    }

    async fn send_write(
        &mut self,
        relation_id: u32,
        write: RowWrite,
        tag: Tag,
    ) -> Result<(), ApplyError> {
        let stmt = self.statement(relation_id, write.shape).await?;
        let client = self.client.clone();
        let params = write.params;
        let bytes = params.iter().map(|v| v.as_bytes_len()).sum::<usize>() + 64;
        self.send(tag, bytes, async move {
            client.execute_raw(&stmt, params.iter().map(Param)).await
        })
        .await
    }

    /// The nodes whose captured DDL runs here (`[cluster] ddl_from`; None: every node).
    pub fn set_ddl_from(&mut self, nodes: Option<Vec<String>>) {
        self.ddl_from = nodes;
    }

    /// The table policies this link applies with (the same on every node).
    pub fn set_policies(&mut self, tables: &[TablePolicy]) {
        self.policies = tables.iter().map(|t| (t.qualified(), t.clone())).collect();
    }

    fn policy_of(&self, relation_id: u32) -> RelationPolicy {
        self.relations
            .get(&relation_id)
            .map(|e| e.policy.clone())
            .unwrap_or_default()
    }

    fn is_careful(&self) -> bool {
        self.careful_txns > 0
    }

    /// Applies the next `n` transactions in careful mode: after an insert hit a unique key
    /// on the fast path, its transaction comes again and is checked row by row.
    pub fn set_careful(&mut self, n: u32) {
        self.careful_txns = n;
    }

    pub async fn insert(&mut self, ins: &Insert) -> Result<(), ApplyError> {
        let id = ins.relation_id;
        if self.is_ddl_log(id) && !self.replay_ddl(ins).await? {
            return Ok(());
        }
        if self.is_merged_keys(id) {
            return self.learn_merge(ins).await;
        }
        self.ensure_map(id).await?;
        match self.gone_of(id) {
            Gone::Nothing => self.insert_mapped(ins).await,
            gone => self.insert_into_dropped(ins, gone).await,
        }
    }

    /// An insert into a relation whose target is known and complete.
    async fn insert_mapped(&mut self, ins: &Insert) -> Result<(), ApplyError> {
        let id = ins.relation_id;
        // References to rows merged away name the rows they merged into (decision 0008).
        let redirected;
        let ins = match self.redirected(id, &ins.new).await? {
            Some(new) => {
                redirected = Insert {
                    relation_id: id,
                    new,
                };
                &redirected
            }
            None => ins,
        };
        if self.is_careful() {
            return self.insert_carefully(ins).await;
        }
        let write = self.map_for(id).expect("mapped").insert(&ins.new)?;
        let Shape::Insert { columns, .. } = &write.shape else {
            unreachable!("RelationMap::insert makes Shape::Insert");
        };
        let same_run =
            matches!(&self.run, Some(run) if run.relation_id == id && run.columns == *columns);
        if !same_run {
            self.flush_inserts().await?;
            self.run = Some(InsertRun {
                relation_id: id,
                columns: columns.clone(),
                rows: Vec::new(),
                copy: BytesMut::new(),
            });
        }
        let run = self.run.as_mut().expect("a run was just ensured");
        self.rows_in_txn += 1;
        if run.copy.is_empty() {
            run.rows.push(write.params);
            if run.rows.len() >= SMALL_RUN_ROWS {
                let mut copy = BytesMut::new();
                if run.rows.iter().all(|r| copy_text_row(r, &mut copy)) {
                    run.rows.clear();
                    run.copy = copy;
                } else {
                    // A binary value cannot travel in a text COPY: INSERTs then.
                    self.flush_inserts().await?;
                }
            }
            return Ok(());
        }
        if !copy_text_row(&write.params, &mut run.copy) {
            self.rows_in_txn -= 1;
            return self
                .execute(id, write, Tag::Insert { relation_id: id })
                .await;
        }
        if run.copy.len() >= COPY_RUN_BYTES {
            self.flush_inserts().await?;
        }
        Ok(())
    }

    /// Sends the pending run of inserts, if any: as multi-row INSERTs or as one COPY.
    async fn flush_inserts(&mut self) -> Result<(), ApplyError> {
        let Some(run) = self.run.take() else {
            return Ok(());
        };
        let relation_id = run.relation_id;
        if run.copy.is_empty() {
            let mut rows = run.rows.into_iter();
            for n in batch_sizes(rows.len(), run.columns.len()) {
                let params: Vec<Value> = rows.by_ref().take(n).flatten().collect();
                let shape = Shape::Insert {
                    columns: run.columns.clone(),
                    rows: n,
                };
                self.send_write(
                    relation_id,
                    RowWrite { shape, params },
                    Tag::Insert { relation_id },
                )
                .await?;
            }
            return Ok(());
        }
        let stmt = self
            .statement(
                relation_id,
                Shape::Copy {
                    columns: run.columns,
                },
            )
            .await?;
        let client = self.client.clone();
        let data = run.copy.freeze();
        self.send(Tag::Copy { relation_id }, data.len(), async move {
            let sink = client.copy_in::<_, bytes::Bytes>(&stmt).await?;
            futures_util::pin_mut!(sink);
            sink.send(data).await?;
            sink.finish().await
        })
        .await
    }

    pub async fn truncate(&mut self, t: &Truncate) -> Result<(), ApplyError> {
        self.flush_inserts().await?;
        let mut tables = Vec::new();
        for &id in &t.relation_ids {
            if self.replicates(id)? {
                self.ensure_map(id).await?;
                // A table dropped here has nothing left to truncate.
                if let Some(map) = self.map_for(id) {
                    tables.push(map.target.qualified());
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

    fn table_name(&self, relation_id: u32) -> String {
        self.relations
            .get(&relation_id)
            .map(|e| format!("{}.{}", e.source.namespace, e.source.name))
            .unwrap_or_else(|| format!("relation {relation_id}"))
    }

    /// Sends the commit of the open target transaction with the link's progress at
    /// `end_lsn`; [`ApplyWorker::take_committed`] reports it once confirmed. Returns the
    /// number of changes in it (0: nothing was open, nothing sent).
    pub async fn commit(&mut self, end_lsn: Lsn) -> Result<u64, ApplyError> {
        self.flush_inserts().await?;
        let Some(txn) = self.open.take() else {
            return Ok(0);
        };
        self.careful_txns = self.careful_txns.saturating_sub(1);
        let (client, stmt) = (self.client.clone(), self.record_progress.clone());
        let (link, end, time) = (self.link.clone(), end_lsn.to_string(), txn.commit_time_us);
        let previous = std::mem::replace(&mut self.last_progress, end_lsn).to_string();
        self.send(
            Tag::Other {
                what: "recording the link's progress",
            },
            128,
            async move {
                client
                    .execute(&stmt, &[&link, &end, &time, &previous])
                    .await
            },
        )
        .await?;
        let client = self.client.clone();
        self.send(Tag::Commit { end_lsn }, 64, async move {
            client.batch_execute("COMMIT").await.map(|_| 0)
        })
        .await?;
        Ok(self.rows_in_txn)
    }
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
