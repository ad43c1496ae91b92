//! What a link applies with: one target session ([`ApplyWorker`], transactions one at a
//! time, pipelined) or several ([`Parallel`], `[apply] sessions` > 1). The link talks
//! to either the same way.

use super::parallel::Parallel;
use super::Change;
use super::{ApplyError, ApplyWorker, RemoteTxn};
use crate::lsn::Lsn;
use crate::pgoutput::Relation;

pub enum Applier {
    Serial(Box<ApplyWorker>),
    Parallel(Box<Parallel>),
}

impl Applier {
    pub fn is_open(&self) -> bool {
        match self {
            Applier::Serial(w) => w.is_open(),
            Applier::Parallel(p) => p.is_open(),
        }
    }

    pub async fn on_relation(&mut self, rel: Relation) -> Result<(), ApplyError> {
        match self {
            Applier::Serial(w) => w.on_relation(rel).await,
            Applier::Parallel(p) => p.on_relation(rel).await,
        }
    }

    pub fn replicates(&self, relation_id: u32) -> Result<bool, ApplyError> {
        match self {
            Applier::Serial(w) => w.replicates(relation_id),
            Applier::Parallel(p) => p.replicates(relation_id),
        }
    }

    pub async fn begin(&mut self, txn: &RemoteTxn) -> Result<(), ApplyError> {
        match self {
            Applier::Serial(w) => w.begin(txn).await,
            Applier::Parallel(p) => {
                p.begin(txn);
                Ok(())
            }
        }
    }

    pub async fn change(&mut self, change: Change) -> Result<(), ApplyError> {
        match self {
            Applier::Serial(w) => w.apply_change(&change).await,
            Applier::Parallel(p) => p.change(change).await,
        }
    }

    pub async fn commit(&mut self, end: Lsn) -> Result<u64, ApplyError> {
        match self {
            Applier::Serial(w) => w.commit(end).await,
            Applier::Parallel(p) => p.commit(end).await,
        }
    }

    /// Something may be answered: [`Applier::settle_next`] is worth awaiting.
    pub fn has_in_flight(&self) -> bool {
        match self {
            Applier::Serial(w) => w.has_in_flight(),
            // The sessions report whenever they have something.
            Applier::Parallel(_) => true,
        }
    }

    /// Waits for the next answer (serial) or report of a session (parallel) and takes it.
    pub async fn settle_next(&mut self) -> Result<(), ApplyError> {
        match self {
            Applier::Serial(w) => w.settle_next().await,
            Applier::Parallel(p) => p.next_report().await,
        }
    }

    /// Commits wait for their flush and no check is under way (serial; the parallel
    /// sessions check on their own).
    pub fn needs_flush_check(&self) -> bool {
        match self {
            Applier::Serial(w) => w.needs_flush_check(),
            Applier::Parallel(_) => false,
        }
    }

    pub async fn check_flush(&mut self) -> Result<(), ApplyError> {
        match self {
            Applier::Serial(w) => w.check_flush().await,
            Applier::Parallel(_) => Ok(()),
        }
    }

    pub fn take_committed(&mut self) -> Option<Lsn> {
        match self {
            Applier::Serial(w) => w.take_committed(),
            Applier::Parallel(p) => p.take_committed(),
        }
    }

    pub fn is_settled(&self) -> bool {
        match self {
            Applier::Serial(w) => w.is_settled(),
            Applier::Parallel(p) => p.is_settled(),
        }
    }

    pub async fn wait_durable(&mut self) -> Result<(), ApplyError> {
        match self {
            Applier::Serial(w) => w.wait_durable().await,
            Applier::Parallel(p) => p.wait_durable().await,
        }
    }

    /// Whether changes are applied as they are handed over (one session): an error of a
    /// change is then the handed-over transaction's.
    pub fn is_serial(&self) -> bool {
        matches!(self, Applier::Serial(_))
    }

    /// Lets go of the author's replication origin this applier's session holds between
    /// transactions (PostgreSQL lets one session at a time have an origin set up), so
    /// that another session may apply as that author. Parallel sessions hold one only
    /// during a commit.
    pub async fn release_origin(&mut self) -> Result<(), ApplyError> {
        match self {
            Applier::Serial(w) => w.release_origin().await,
            Applier::Parallel(_) => Ok(()),
        }
    }
}
