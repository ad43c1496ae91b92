//! One change of a source transaction: the vocabulary the link hands to an applier
//! (`Applier::change`), whether one session applies it or several (`parallel`).

use crate::pgoutput::{Delete, Insert, Truncate, Update};

/// One change of a source transaction.
#[derive(Debug, Clone)]
pub enum Change {
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    /// The whole source transaction, kept in `walsync.set_aside` (`apply::set_aside`).
    SetAside(Box<super::SetAsideTxn>),
}

impl Change {
    /// About how much memory it holds (a held transaction is bounded by it).
    pub(super) fn bytes(&self) -> usize {
        let tuple = |t: &crate::pgoutput::Tuple| -> usize {
            t.0.iter().map(|v| v.as_bytes_len() + 8).sum()
        };
        let old = |o: &crate::pgoutput::OldTuple| match o {
            crate::pgoutput::OldTuple::Key(t) | crate::pgoutput::OldTuple::Full(t) => tuple(t),
        };
        64 + match self {
            Change::Insert(i) => tuple(&i.new),
            Change::Update(u) => tuple(&u.new) + u.old.as_ref().map_or(0, old),
            Change::Delete(d) => old(&d.old),
            Change::Truncate(t) => t.relation_ids.len() * 4,
            Change::SetAside(t) => t.bytes(),
        }
    }
}
