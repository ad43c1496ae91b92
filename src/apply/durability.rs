//! Which source transactions are durable on the target: the flush tracker.
//!
//! Commits are sent with `synchronous_commit = off` and do not wait for their WAL flush;
//! the upstream may only be acknowledged up to a transaction whose target commit is
//! flushed (ARCHITECTURE.md, invariant 2). A confirmed commit's WAL position is not known, so it is
//! bounded by a later read of the target's insert position (every commit answered before
//! that read lies at or before it), and released once a read of the flush position
//! reaches that bound. No I/O here: the applier feeds the answers in.

use std::collections::VecDeque;

use crate::lsn::Lsn;

#[derive(Debug, Default)]
pub struct Durability {
    /// End LSN (on the upstream) of the newest source transaction whose target commit is
    /// durable, not yet taken.
    committed: Option<Lsn>,
    /// Source end LSNs of commits confirmed by the target, whose WAL position is not
    /// known yet, oldest first.
    unbounded: VecDeque<Lsn>,
    /// The same, with a target WAL position known to be at or past their commit records.
    bounded: VecDeque<(u64, Lsn)>,
    /// A read of the positions is on its way.
    check_in_flight: bool,
}

impl Durability {
    /// The target confirmed the commit of the source transaction ending at `end`.
    pub fn confirmed(&mut self, end: Lsn) {
        self.unbounded.push_back(end);
    }

    /// A check was sent: an insert position read, then a flush position read.
    pub fn check_sent(&mut self) {
        self.check_in_flight = true;
    }

    /// The target's insert position, read after every commit confirmed so far.
    pub fn insert_position(&mut self, position: u64) {
        self.bounded
            .extend(self.unbounded.drain(..).map(|end| (position, end)));
    }

    /// The target's flushed position: every commit bounded at or before it is durable.
    pub fn flushed(&mut self, flushed: u64) {
        self.check_in_flight = false;
        while let Some(&(bound, end)) = self.bounded.front() {
            if bound > flushed {
                break;
            }
            self.committed = Some(end);
            self.bounded.pop_front();
        }
    }

    /// The newest source end LSN whose target commit is durable, once.
    pub fn take_committed(&mut self) -> Option<Lsn> {
        self.committed.take()
    }

    /// Confirmed commits wait for their flush.
    pub fn waiting(&self) -> bool {
        !self.unbounded.is_empty() || !self.bounded.is_empty()
    }

    /// Commits wait and no check is under way.
    pub fn needs_check(&self) -> bool {
        self.waiting() && !self.check_in_flight
    }

    /// Commits are bounded, so only the flush (the WAL writer) is awaited.
    pub fn awaits_flush(&self) -> bool {
        !self.bounded.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(n: u64) -> Lsn {
        Lsn(n)
    }

    #[test]
    fn a_commit_is_durable_only_once_a_flush_passes_a_position_read_after_it() {
        let mut d = Durability::default();
        d.confirmed(lsn(100));
        assert!(d.needs_check());
        d.check_sent();
        assert!(!d.needs_check(), "one check at a time");
        // A flush read that answers before any insert position bounds nothing.
        d.flushed(10_000);
        assert_eq!(d.take_committed(), None);
        d.check_sent();
        d.insert_position(500);
        d.flushed(499);
        assert_eq!(d.take_committed(), None, "flushed short of the bound");
        assert!(d.awaits_flush());
        d.check_sent();
        d.insert_position(600);
        d.flushed(500);
        assert_eq!(d.take_committed(), Some(lsn(100)));
        assert_eq!(d.take_committed(), None, "reported once");
        assert!(!d.waiting());
    }

    #[test]
    fn commits_are_released_in_order_up_to_the_flush() {
        let mut d = Durability::default();
        d.confirmed(lsn(1));
        d.confirmed(lsn(2));
        d.insert_position(50);
        d.confirmed(lsn(3));
        d.insert_position(90);
        d.flushed(60);
        assert_eq!(d.take_committed(), Some(lsn(2)), "both bounded by 50");
        assert!(d.waiting());
        d.flushed(90);
        assert_eq!(d.take_committed(), Some(lsn(3)));
        assert!(!d.waiting());
    }
}
