//! Inserts on the fast path: consecutive inserts into one relation gathered into runs,
//! sent as multi-row INSERTs or one COPY, never waited for one by one.

use bytes::BytesMut;
use futures_util::SinkExt;

use super::pipeline::Tag;
use super::{ApplyError, ApplyWorker, Mapped, Target};
use crate::merge::conflict::ConflictKind;
use crate::merge::statements::{batch_sizes, copy_text_row, RowWrite, Shape};
use crate::pgoutput::{Insert, Value};

/// Consecutive inserts into one relation with the same columns. Up to [`SMALL_RUN_ROWS`]
/// they are kept as rows and sent as multi-row INSERTs: one request each, nothing to wait
/// for. A longer run switches to COPY, whose server-side batching wins once the round trip
/// it must wait for (CopyInResponse, during which nothing else can be sent) is spread over
/// enough rows. Either way a run ends at the next other change; a COPY run also when it
/// holds [`COPY_RUN_BYTES`].
pub(super) struct InsertRun {
    pub(super) mapped: Mapped,
    pub(super) columns: Vec<usize>,
    /// The values of the rows kept so far, row after row (`columns.len()` each).
    pub(super) values: Vec<Value>,
    pub(super) rows: usize,
    /// COPY text of the run once it is long enough; empty before.
    pub(super) copy: BytesMut,
}

const SMALL_RUN_ROWS: usize = 256;

/// Rows of one transaction that may wait for their table's DDL later in it (64 MiB of
/// values: a `CREATE TABLE ... AS` of a few hundred thousand rows); beyond, the link
/// stops naming the table, as it does for a table that never comes.
pub(super) const WAIT_FOR_TABLE_BYTES: usize = 64 * 1024 * 1024;

/// A COPY run is sent once it holds this much (4 MiB).
const COPY_RUN_BYTES: usize = 4 * 1024 * 1024;

impl ApplyWorker {
    pub async fn insert(&mut self, ins: &Insert) -> Result<(), ApplyError> {
        let id = ins.relation_id;
        if self.is_ddl_log(id) {
            if !self.replay_ddl(ins).await? {
                return Ok(());
            }
            self.insert_waiting_rows().await?;
        }
        if self.is_merged_keys(id) {
            return self.learn_merge(ins).await;
        }
        self.insert_into_target(ins).await
    }

    /// An insert into its relation's target here; into a table not here yet, kept for a
    /// DDL later in the transaction ([`ApplyWorker::insert_waiting_rows`]).
    async fn insert_into_target(&mut self, ins: &Insert) -> Result<(), ApplyError> {
        let id = ins.relation_id;
        // A table found missing earlier in the transaction stays so until its next DDL:
        // its further rows are not looked up in the catalog one by one.
        let known_missing = self.waiting_relations.contains(&id);
        let found = if known_missing {
            Err(ApplyError::MissingTable {
                table: self.table_name(id),
            })
        } else {
            self.ensure_map(id).await
        };
        let target = match found {
            Err(ApplyError::MissingTable { table }) => {
                let bytes = ins
                    .new
                    .0
                    .iter()
                    .map(|v| v.as_bytes_len() + 8)
                    .sum::<usize>();
                if self.waiting_bytes + bytes > WAIT_FOR_TABLE_BYTES {
                    return Err(ApplyError::MissingTable { table });
                }
                self.waiting_bytes += bytes;
                self.waiting_for_table.push(ins.clone());
                if !known_missing {
                    self.waiting_relations.push(id);
                }
                return Ok(());
            }
            other => other?,
        };
        match target {
            Target::Whole(m) => self.insert_mapped(&m, ins).await,
            Target::WithoutColumns(m, gone) => self.insert_without_columns(&m, ins, &gone).await,
            Target::Dropped => {
                self.record_dropped(id, ConflictKind::TableDropped, &ins.new, &[])
                    .await
            }
        }
    }

    /// The rows kept for a table that was not here, now that a DDL ran: inserted in
    /// their order (those whose table is still missing are kept again).
    async fn insert_waiting_rows(&mut self) -> Result<(), ApplyError> {
        if self.waiting_for_table.is_empty() {
            return Ok(());
        }
        let waiting = std::mem::take(&mut self.waiting_for_table);
        self.waiting_bytes = 0;
        self.waiting_relations.clear();
        for ins in &waiting {
            self.insert_into_target(ins).await?;
        }
        Ok(())
    }

    /// At commit: no row may still wait for its table (its DDL never came in the
    /// transaction). The link stops naming the table, as for any row of a missing table.
    pub(super) fn no_rows_waiting_for_a_table(&self) -> Result<(), ApplyError> {
        match self.waiting_for_table.first() {
            None => Ok(()),
            Some(ins) => Err(ApplyError::MissingTable {
                table: self.table_name(ins.relation_id),
            }),
        }
    }

    /// An insert into a relation whose target is known and complete.
    pub(super) async fn insert_mapped(
        &mut self,
        m: &Mapped,
        ins: &Insert,
    ) -> Result<(), ApplyError> {
        let id = m.id;
        // References to rows merged away name the rows they merged into (decision 0008).
        let redirected;
        let ins = match self.redirected(m, &ins.new).await? {
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
            return self.insert_carefully(m, ins).await;
        }
        let columns = m.insert_columns();
        let same_run =
            matches!(&self.run, Some(run) if run.mapped.id == id && run.columns == columns);
        if !same_run {
            self.end_runs().await?;
            // Room for as many rows as the run before had: runs of a backlog are alike,
            // so the values are not regrown (and copied) row after row.
            let rows = self.last_run_rows.clamp(1, SMALL_RUN_ROWS);
            self.run = Some(InsertRun {
                mapped: m.clone(),
                columns: columns.to_vec(),
                values: Vec::with_capacity(rows * columns.len()),
                rows: 0,
                copy: BytesMut::new(),
            });
        }
        let run = self.run.as_mut().expect("a run was just ensured");
        if run.copy.is_empty() {
            m.insert_values(&ins.new, &mut run.values)?;
            run.rows += 1;
            self.last_run_rows = run.rows;
            self.rows_in_txn += 1;
            if run.rows >= SMALL_RUN_ROWS {
                let mut copy = BytesMut::new();
                let width = run.columns.len().max(1);
                if run
                    .values
                    .chunks(width)
                    .all(|r| copy_text_row(r, &mut copy))
                {
                    run.values.clear();
                    run.copy = copy;
                } else {
                    // A binary value cannot travel in a text COPY: INSERTs then.
                    self.flush_runs().await?;
                }
            }
            return Ok(());
        }
        let write = m.insert(&ins.new)?;
        if !copy_text_row(&write.params, &mut run.copy) {
            return self
                .execute(m, write, Tag::Insert { relation_id: id })
                .await;
        }
        self.rows_in_txn += 1;
        if run.copy.len() >= COPY_RUN_BYTES {
            self.flush_runs().await?;
        }
        Ok(())
    }

    /// Sends the pending run of inserts, if any: as multi-row INSERTs or as one COPY.
    pub(super) async fn send_insert_run(&mut self) -> Result<(), ApplyError> {
        let Some(run) = self.run.take() else {
            return Ok(());
        };
        let relation_id = run.mapped.id;
        if run.copy.is_empty() {
            let mapped = run.mapped.clone();
            for (write, tag) in run.batches() {
                self.send_write(&mapped, write, tag).await?;
            }
            return Ok(());
        }
        let stmt = self
            .statement(
                &run.mapped,
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
}

impl InsertRun {
    /// The run's rows as multi-row INSERTs of a bounded number of sizes, in order (a run
    /// kept as rows, not yet COPY text).
    pub(super) fn batches(self) -> Vec<(RowWrite, Tag)> {
        let relation_id = self.mapped.id;
        let width = self.columns.len();
        let mut values = self.values.into_iter();
        batch_sizes(self.rows, width)
            .into_iter()
            .map(|n| {
                let params: Vec<Value> = values.by_ref().take(n * width).collect();
                let shape = Shape::Insert {
                    columns: self.columns.clone(),
                    rows: n,
                };
                (RowWrite { shape, params }, Tag::Insert { relation_id })
            })
            .collect()
    }

    /// Where the row with this key (target key order) is in the run, if it is.
    fn row_index(&self, key: &[Value]) -> Option<usize> {
        let at = self.mapped.key_in_source();
        self.values
            .chunks(self.columns.len().max(1))
            .position(|row| at.iter().zip(key).all(|(&i, k)| row[i] == *k))
    }

    /// The row of the run with this key (target key order), if any.
    pub(super) fn row_with_key(&mut self, key: &[Value]) -> Option<&mut [Value]> {
        let width = self.columns.len().max(1);
        let i = self.row_index(key)?;
        Some(&mut self.values[i * width..(i + 1) * width])
    }

    /// Whether the run inserts a row with this key (target key order).
    pub(super) fn has_key(&self, key: &[Value]) -> bool {
        self.row_index(key).is_some()
    }

    /// The keys of the rows it inserts (target key order).
    pub(super) fn keys(&self) -> Vec<Vec<Value>> {
        let width = self.columns.len().max(1);
        let at = self.mapped.key_in_source();
        self.values
            .chunks(width)
            .map(|row| at.iter().map(|&i| row[i].clone()).collect())
            .collect()
    }
}
