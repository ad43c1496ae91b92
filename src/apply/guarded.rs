//! Updates and deletes on the fast path ([decision 0012](../../docs/decisions/0012-guarded-fast-path-for-updates-and-deletes.md)):
//! consecutive guarded changes of one relation with one shape gathered into runs, each
//! sent as few multi-row statements (`UPDATE … FROM (VALUES …)`), never waited for one
//! by one.

use super::fast_hash::FastSet;
use super::pipeline::Tag;
use super::{ApplyError, ApplyWorker, Mapped};
use crate::merge::statements::{batch_sizes, RowWrite, Shape};
use crate::pgoutput::Value;

/// A run is sent once it holds this many changes.
const GUARDED_RUN_ROWS: usize = 128;

/// Consecutive guarded updates (or deletes) of one relation that set the same columns and
/// compare the same ones, in one source transaction, each on a row no other change of the
/// run finds or writes: one statement changes them all, in any order, as one after the
/// other would.
pub(super) struct GuardedRun {
    mapped: Mapped,
    /// The one-row shape every change of the run has.
    shape: Shape,
    /// The parameters its rows share (the changes' origin id and commit time).
    shared: Vec<Value>,
    /// Each row's parameters, row after row.
    values: Vec<Value>,
    rows: usize,
    /// The keys of the rows the run's changes find or write: a change naming one of them
    /// comes after the run is sent.
    keys: FastSet<Vec<Value>>,
}

impl ApplyWorker {
    /// Adds one guarded change (`write`, from `RelationMap::guarded`) to the pending run,
    /// sending that run first if the change cannot join it. `keys`: the keys of the rows
    /// the change finds or writes (an update that changes its key names both).
    pub(super) async fn push_guarded(
        &mut self,
        m: &Mapped,
        write: RowWrite,
        keys: Vec<Vec<Value>>,
    ) -> Result<(), ApplyError> {
        let shared = write.shape.shared_params();
        let joins = matches!(&self.guarded_run, Some(run)
            if run.mapped.id == m.id
                && run.shape == write.shape
                && run.shared[..] == write.params[..shared]
                && !keys.iter().any(|k| run.keys.contains(k)));
        if joins {
            let run = self.guarded_run.as_mut().expect("a run to join");
            run.values.extend(write.params.into_iter().skip(shared));
            run.rows += 1;
            run.keys.extend(keys);
        } else {
            self.end_runs().await?;
            let mut shared_params = write.params;
            let values = shared_params.split_off(shared);
            self.guarded_run = Some(GuardedRun {
                mapped: m.clone(),
                shape: write.shape,
                shared: shared_params,
                values,
                rows: 1,
                keys: keys.into_iter().collect(),
            });
        }
        self.rows_in_txn += 1;
        if self
            .guarded_run
            .as_ref()
            .is_some_and(|r| r.rows >= GUARDED_RUN_ROWS)
        {
            self.send_guarded_run().await?;
        }
        Ok(())
    }

    /// Sends the pending run of guarded changes, if any, in a bounded number of statement
    /// sizes (as insert runs are).
    pub(super) async fn send_guarded_run(&mut self) -> Result<(), ApplyError> {
        let Some(run) = self.guarded_run.take() else {
            return Ok(());
        };
        let mapped = run.mapped.clone();
        for (write, tag) in run.batches() {
            self.send_write(&mapped, write, tag).await?;
        }
        Ok(())
    }
}

impl GuardedRun {
    pub(super) fn mapped(&self) -> &Mapped {
        &self.mapped
    }

    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// The keys of the rows its changes find or write.
    pub(super) fn keys(&self) -> impl Iterator<Item = &Vec<Value>> {
        self.keys.iter()
    }

    /// Whether one of its changes finds or writes the row with this key.
    pub(super) fn finds(&self, key: &[Value]) -> bool {
        self.keys.contains(key)
    }

    /// Parameters of its statements, all told.
    pub(super) fn params(&self) -> usize {
        let width = self.values.len() / self.rows;
        let batches = batch_sizes(self.rows, width + self.shared.len()).len();
        self.values.len() + self.shared.len() * batches
    }

    /// Whether its changes delete (else they update).
    pub(super) fn deletes(&self) -> bool {
        matches!(&self.shape, Shape::Guarded { write, .. } if matches!(**write, Shape::Delete))
    }

    /// The run as statements of a bounded number of sizes, in order.
    pub(super) fn batches(self) -> Vec<(RowWrite, Tag)> {
        let tag = Tag::Guarded {
            relation_id: self.mapped.id,
            delete: self.deletes(),
        };
        let Shape::Guarded {
            write, compared, ..
        } = self.shape
        else {
            unreachable!("a guarded run holds Shape::Guarded changes");
        };
        let width = self.values.len() / self.rows;
        let mut values = self.values.into_iter();
        batch_sizes(self.rows, width + self.shared.len())
            .into_iter()
            .map(|rows| {
                let mut params = self.shared.clone();
                params.extend(values.by_ref().take(rows * width));
                let shape = Shape::Guarded {
                    write: write.clone(),
                    compared: compared.clone(),
                    rows,
                };
                (RowWrite { shape, params }, tag.clone())
            })
            .collect()
    }
}
