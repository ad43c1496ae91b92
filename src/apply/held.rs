//! Small transactions in one request ([decision 0013](../../docs/decisions/0013-small-transactions-in-one-statement.md)).
//!
//! A source transaction that is nothing but runs of fast-path inserts and guarded
//! updates or deletes, no two of them on one row and [`HELD_ROWS`] rows in all, is not
//! opened with `BEGIN`: its runs are held until its commit and then sent as one
//! statement, with the link's progress and the origin's commit LSN and time, which
//! PostgreSQL runs as a transaction of its own (an implicit one: no `BEGIN`, no
//! `COMMIT`). The target thus answers one request per such transaction instead of four
//! to seven, and the sidecar sends one. On one of several sessions (parallel apply) the
//! statement, once it has written the runs, also waits for the predecessor's order lock
//! and sets up the origin, and one more request resets the origin and releases the lock
//! ([decision 0011](../../docs/decisions/0011-parallel-apply.md)).
//!
//! Anything else the transaction needs (a run on a row a held run writes, or on a table
//! with unique keys besides its primary key that a held run writes, a run too long, a
//! change that reads its row first, DDL, a merge, a truncate, a COPY) opens the
//! transaction as usual first (`BEGIN`, then the held runs as their own statements): what
//! a held transaction writes, and in which transaction, never differs from the usual way.
//!
//! Within one statement the parts see the rows as they were before it and run in an
//! order of PostgreSQL's choosing; they write different rows, a value of a unique key
//! cannot move between two of them (two runs of one table only where the primary key is
//! its one unique key), and foreign keys are not checked (the session is in replica
//! mode), so no part can see or miss what another wrote. A part that fails (an insert meets a key, a guarded write finds its row
//! changed) fails the statement and so the transaction: it is applied again carefully.

use tokio_postgres::Statement;

use super::fast_hash::{FastMap, FastSet};
use super::guarded::GuardedRun;
use super::inserts::InsertRun;
use super::pipeline::Tag;
use super::{ApplyError, ApplyWorker, Mapped, OrderLock, RemoteTxn};
use crate::lsn::Lsn;
use crate::merge::statements::{combined_ctes, RowWrite, Shape};
use crate::pgoutput::{Tuple, Value};
use crate::sql_error::SqlError;

/// A transaction is held while its runs hold at most this many rows...
const HELD_ROWS: usize = 256;
/// ... and this many statement parameters.
const HELD_PARAMS: usize = 16_384;
/// Combined statements kept prepared at most, the least recently used going first: each
/// takes about 200 kB of the target backend's memory (a sale's: three runs and the
/// progress), so at most about 13 MB.
const COMBINED_STATEMENTS: usize = 64;
/// Combinations remembered as seen once at most (then they are forgotten).
const SEEN_ONCE: usize = 4096;

/// The runs of the open source transaction, kept back until its commit (while this
/// exists, the target transaction is not open).
#[derive(Default)]
pub(super) struct Held {
    runs: Vec<HeldRun>,
    rows: usize,
    params: usize,
}

pub(super) enum HeldRun {
    Insert(InsertRun),
    Guarded(GuardedRun),
}

impl HeldRun {
    fn mapped(&self) -> &Mapped {
        match self {
            HeldRun::Insert(r) => &r.mapped,
            HeldRun::Guarded(r) => r.mapped(),
        }
    }

    fn rows(&self) -> usize {
        match self {
            HeldRun::Insert(r) => r.rows,
            HeldRun::Guarded(r) => r.rows(),
        }
    }

    fn params(&self) -> usize {
        match self {
            HeldRun::Insert(r) => r.values.len(),
            HeldRun::Guarded(r) => r.params(),
        }
    }

    /// The keys of the rows it finds or writes.
    fn keys(&self) -> Vec<Vec<Value>> {
        match self {
            HeldRun::Insert(r) => r.keys(),
            HeldRun::Guarded(r) => r.keys().cloned().collect(),
        }
    }

    /// Whether it finds or writes the row with this key.
    fn finds(&self, key: &[Value]) -> bool {
        match self {
            HeldRun::Insert(r) => r.has_key(key),
            HeldRun::Guarded(r) => r.finds(key),
        }
    }

    fn batches(self) -> (Mapped, Vec<(RowWrite, Tag)>) {
        let mapped = self.mapped().clone();
        let batches = match self {
            HeldRun::Insert(r) => r.batches(),
            HeldRun::Guarded(r) => r.batches(),
        };
        (mapped, batches)
    }
}

impl Held {
    /// Whether `run` can be kept back too: it is no COPY, it fits, and each run of its
    /// table already held writes other rows, on a table with no unique key but its
    /// primary key (parts of one statement run in any order: two writes of one row, or
    /// a unique value moved from one row to another, must not meet there).
    fn fits(&self, run: &HeldRun) -> bool {
        let copying = matches!(run, HeldRun::Insert(r) if !r.copy.is_empty());
        let mut same_table = self
            .runs
            .iter()
            .filter(|r| r.mapped().id == run.mapped().id)
            .peekable();
        let apart = same_table.peek().is_none()
            || (run.mapped().target.uniques.is_empty() && {
                let keys = run.keys();
                same_table.all(|r| !keys.iter().any(|k| r.finds(k)))
            });
        !copying
            && apart
            && self.rows + run.rows() <= HELD_ROWS
            && self.params + run.params() <= HELD_PARAMS
    }

    fn keep(&mut self, run: HeldRun) {
        self.rows += run.rows();
        self.params += run.params();
        self.runs.push(run);
    }
}

/// The prepared combined statements by the parts they are made of, and the combinations
/// seen once: a combination is prepared when it comes a second time, so that a one-off
/// transaction costs no statement the server keeps.
pub(super) struct Combined<S = Statement> {
    /// Each prepared statement with when it was last used.
    prepared: FastMap<Vec<(u32, Shape)>, (S, u64)>,
    seen_once: FastSet<Vec<(u32, Shape)>>,
    uses: u64,
}

impl<S> Default for Combined<S> {
    fn default() -> Self {
        Combined {
            prepared: Default::default(),
            seen_once: Default::default(),
            uses: 0,
        }
    }
}

impl<S: Clone> Combined<S> {
    /// The statement prepared for this combination, if any, now the most recently used.
    fn get(&mut self, key: &[(u32, Shape)]) -> Option<S> {
        self.uses += 1;
        let (stmt, used) = self.prepared.get_mut(key)?;
        *used = self.uses;
        Some(stmt.clone())
    }

    /// Remembers that this combination came; whether it came before.
    fn seen(&mut self, key: &[(u32, Shape)]) -> bool {
        if self.seen_once.contains(key) {
            return true;
        }
        if self.seen_once.len() >= SEEN_ONCE {
            self.seen_once.clear();
        }
        self.seen_once.insert(key.to_vec());
        false
    }

    /// Forgets every statement that writes `relation` (its description changed), or every
    /// one (`None`: tables here may have changed).
    pub(super) fn forget(&mut self, relation: Option<u32>) {
        let stale =
            |key: &Vec<(u32, Shape)>| relation.is_none_or(|r| key.iter().any(|(id, _)| *id == r));
        self.prepared.retain(|key, _| !stale(key));
        self.seen_once.retain(|key| !stale(key));
    }

    fn keep(&mut self, key: Vec<(u32, Shape)>, stmt: S) {
        if self.prepared.len() >= COMBINED_STATEMENTS {
            // Deallocated on the server once the last request using it is answered.
            let oldest = self.prepared.iter().min_by_key(|(_, (_, used))| *used);
            if let Some(oldest) = oldest.map(|(k, _)| k.clone()) {
                self.prepared.remove(&oldest);
            }
        }
        self.seen_once.remove(&key);
        self.prepared.insert(key, (stmt, self.uses));
    }
}

impl ApplyWorker {
    /// Whether a held run writes `relation`.
    pub(super) fn holds(&self, relation: u32) -> bool {
        self.held
            .as_ref()
            .is_some_and(|h| h.runs.iter().any(|r| r.mapped().id == relation))
    }

    /// Whether the transaction being begun can be held (see the module doc).
    pub(super) fn can_hold(&self) -> bool {
        !self.is_careful()
    }

    /// Ends the pending run before another starts: kept back while the transaction is
    /// held and it fits, sent otherwise.
    pub(super) async fn end_runs(&mut self) -> Result<(), ApplyError> {
        if let Some(held) = self.held.as_mut() {
            // At most one run is pending.
            let pending = (self.run.take().map(HeldRun::Insert))
                .or_else(|| self.guarded_run.take().map(HeldRun::Guarded));
            match pending {
                Some(run) if held.fits(&run) => held.keep(run),
                Some(HeldRun::Insert(run)) => self.run = Some(run),
                Some(HeldRun::Guarded(run)) => self.guarded_run = Some(run),
                None => {}
            }
        }
        if self.run.is_none() && self.guarded_run.is_none() {
            return Ok(());
        }
        self.flush_runs().await
    }

    /// Opens the held transaction the usual way: `BEGIN`, then its runs, each as its own
    /// statements. Nothing if the transaction is not held.
    pub(super) async fn open_held(&mut self) -> Result<(), ApplyError> {
        match self.held.take() {
            Some(held) => self.begin_with(held.parts()).await,
            None => Ok(()),
        }
    }

    /// `BEGIN`, then `parts` as their own statements.
    async fn begin_with(&mut self, parts: Vec<Part>) -> Result<(), ApplyError> {
        let client = self.client.clone();
        let what = "opening the target transaction";
        self.push(Tag::Other { what }, 16, async move {
            client.batch_execute("BEGIN").await.map(|_| 0)
        })
        .await?;
        for (mapped, write, tag) in parts {
            self.push_write(&mapped, write, tag).await?;
        }
        Ok(())
    }

    /// An update of a row that an insert of this transaction still waiting in a run
    /// (pending or held) writes: the insert then writes the updated row, and the update
    /// is done. `key`: the row's key, unchanged by the update. As the insert and the
    /// update are of one source transaction, the row holds nothing else between them.
    pub(super) fn fold_into_insert(&mut self, m: &Mapped, key: &[Value], new: &Tuple) -> bool {
        let pending = self.run.as_mut().filter(|r| r.mapped.id == m.id);
        let held = self.held.as_mut().into_iter().flat_map(|h| {
            h.runs.iter_mut().filter_map(|r| match r {
                HeldRun::Insert(r) if r.mapped.id == m.id => Some(r),
                _ => None,
            })
        });
        for run in pending.into_iter().chain(held) {
            if !run.copy.is_empty() {
                continue;
            }
            if let Some(row) = run.row_with_key(key) {
                for (value, changed) in row.iter_mut().zip(&new.0) {
                    if !matches!(changed, Value::UnchangedToast) {
                        *value = changed.clone();
                    }
                }
                return true;
            }
        }
        false
    }

    /// Commits a held transaction: as one statement if its combination of runs was seen
    /// before (see [`Combined`]); otherwise opened the usual way, and `false` is returned
    /// for the caller to commit it so.
    pub(super) async fn commit_held(
        &mut self,
        txn: &RemoteTxn,
        end_lsn: Lsn,
        previous: Lsn,
        after: Option<OrderLock>,
    ) -> Result<bool, ApplyError> {
        let Some(held) = self.held.take() else {
            return Ok(false);
        };
        let parts = held.parts();
        let key: Vec<(u32, Shape)> = parts
            .iter()
            .map(|(m, w, _)| (m.id, w.shape.clone()))
            .collect();
        let stmt = match self.combined.get(&key) {
            Some(stmt) => stmt,
            None if self.combined.seen(&key) => {
                let stmt = self.prepare_combined(&parts).await?;
                self.combined.keep(key, stmt.clone());
                stmt
            }
            None => {
                self.begin_with(parts).await?;
                return Ok(false);
            }
        };
        let guarded = parts.iter().find_map(|(_, _, t)| match t {
            Tag::Guarded {
                relation_id,
                delete,
            } => Some((*relation_id, *delete)),
            _ => None,
        });
        let mut relations: Vec<u32> = parts.iter().map(|(m, _, _)| m.id).collect();
        relations.sort_unstable();
        relations.dedup();
        let mut params = super::progress_params(&self.link, txn, end_lsn, previous);
        // Room for every value at once (the order lock's too, if any), not regrown (and
        // copied) part after part.
        params.reserve(
            (super::ORDERED_PROGRESS_PARAMS - params.len())
                + parts.iter().map(|(_, w, _)| w.params.len()).sum::<usize>(),
        );
        // Parallel apply: the order lock waited for is the predecessor's, or, when that
        // ran on this session, this transaction's own (granted at once to its holder).
        let own = match self.origin_at_commit {
            true => Some(self.held_lock.take().ok_or_else(|| {
                ApplyError::Protocol(
                    "bug: a transaction on one of several apply sessions has no order lock".into(),
                )
            })?),
            false => None,
        };
        if let Some(own) = own {
            params.extend(super::order_params(after.unwrap_or(own), &txn.origin));
        }
        for (_, write, _) in parts {
            params.extend(write.params);
        }
        let client = self.client.clone();
        let bytes = params.iter().map(|v| v.as_bytes_len()).sum::<usize>() + 64;
        self.push(
            Tag::Whole {
                previous,
                end_lsn,
                guarded,
                relations,
            },
            bytes,
            async move {
                client
                    .execute_raw(&stmt, params.iter().map(super::Param))
                    .await
            },
        )
        .await?;
        if let Some(own) = own {
            // As after a COMMIT (`commit_ordered`): the origin is reset, then the lock
            // released.
            let release = self.order_statements().await?.unlock;
            let client = self.client.clone();
            let (link, seq) = own.key_pair();
            let what = "resetting the origin and releasing the order lock";
            self.push(Tag::Other { what }, 64, async move {
                client.execute(&release, &[&link, &seq]).await
            })
            .await?;
        }
        tracing::debug!(link = %self.link, lsn = %end_lsn, "sent in one statement");
        Ok(true)
    }
}

/// One statement of a held run: the relation, the write and what its answer means.
type Part = (Mapped, RowWrite, Tag);

impl Held {
    /// The held runs as statements, in order.
    fn parts(self) -> Vec<Part> {
        let mut parts = Vec::new();
        for run in self.runs {
            let (mapped, batches) = run.batches();
            parts.extend(batches.into_iter().map(|(w, t)| (mapped.clone(), w, t)));
        }
        parts
    }
}

impl ApplyWorker {
    /// Prepares the statement that applies `parts` with the link's progress.
    async fn prepare_combined(&mut self, parts: &[Part]) -> Result<Statement, ApplyError> {
        let refs: Vec<_> = parts.iter().map(|(m, w, _)| (&*m.map, w)).collect();
        let sql = match self.origin_at_commit {
            // On one of several sessions: the parts first, while the predecessor may
            // still run on another session; then the wait for it, which reads the check
            // of every part (`c`), and what comes after the wait.
            true => {
                let (ctes, check) = combined_ctes(&refs, super::ORDERED_PROGRESS_PARAMS, true);
                let parts = match ctes.is_empty() {
                    true => String::new(),
                    false => format!("{ctes}, "),
                };
                format!(
                    "WITH {parts}c AS (SELECT {check} AS ok), {} \
                     SELECT 1 / ((SELECT count(*) FROM u) = 1 AND (SELECT ok FROM c))::int FROM o",
                    super::ordered_progress_ctes("c")
                )
            }
            false => {
                let (ctes, check) = combined_ctes(&refs, super::PROGRESS_PARAMS, false);
                let mut with = super::progress_ctes();
                if !ctes.is_empty() {
                    with = format!("{with}, {ctes}");
                }
                format!(
                    "WITH {with} SELECT 1 / ((SELECT count(*) FROM u) = 1 AND {check})::int FROM o"
                )
            }
        };
        // Direct requests wait for everything in flight (see `begin`).
        self.flush().await?;
        self.client
            .prepare(&sql)
            .await
            .map_err(|e| SqlError::new(format!("preparing {sql}"), e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn combination(n: usize) -> Vec<(u32, Shape)> {
        vec![(
            1,
            Shape::Insert {
                columns: vec![0],
                rows: n,
            },
        )]
    }

    #[test]
    fn a_combination_is_prepared_on_its_second_sight_and_the_least_recently_used_goes_first() {
        let mut c = Combined::<usize>::default();
        assert!(!c.seen(&combination(1)), "first sight");
        assert!(c.seen(&combination(1)), "second sight");
        for n in 0..COMBINED_STATEMENTS {
            assert_eq!(c.get(&combination(n)), None);
            c.keep(combination(n), n);
        }
        assert_eq!(
            c.get(&combination(0)),
            Some(0),
            "used again: now the most recent"
        );
        c.keep(combination(1000), 1000);
        assert_eq!(c.prepared.len(), COMBINED_STATEMENTS);
        assert_eq!(c.get(&combination(1)), None, "the least recently used went");
        assert_eq!(c.get(&combination(0)), Some(0));
        assert_eq!(c.get(&combination(1000)), Some(1000));
    }

    #[test]
    fn a_relation_described_anew_takes_its_statements_and_sightings_with_it() {
        let mut c = Combined::<usize>::default();
        let other = vec![(
            2,
            Shape::Insert {
                columns: vec![0],
                rows: 1,
            },
        )];
        c.keep(combination(1), 1);
        c.keep(other.clone(), 2);
        assert!(!c.seen(&combination(2)));
        c.forget(Some(1));
        assert_eq!(c.get(&combination(1)), None);
        assert!(!c.seen(&combination(2)), "seen once before, forgotten");
        assert_eq!(c.get(&other), Some(2), "another relation's stays");
        c.forget(None);
        assert_eq!(c.get(&other), None);
    }
}
