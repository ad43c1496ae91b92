//! Requests to the target, sent without waiting for each answer (pipelining), answers
//! taken back in order.
//!
//! tokio-postgres sends a request when its future is first polled and answers arrive in
//! request order (tokio-postgres docs, "Pipelining"), so [`Pipeline::push`] polls each
//! future once on arrival: requests leave in push order. At most [`MAX_IN_FLIGHT`] are
//! outstanding; a push beyond that waits for the oldest answer. A source transaction
//! of 100 rows thus costs about one round trip instead of a hundred.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use futures_util::stream::{FuturesOrdered, StreamExt};

use crate::lsn::Lsn;

/// Outstanding requests at most. Each holds its data until answered.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Outstanding request data at most: 32 MiB = 8 full COPY runs of 4 MiB, or the rows of
/// about 300,000 typical order lines; a push beyond it waits for answers.
pub const MAX_IN_FLIGHT_BYTES: usize = 32 * 1024 * 1024;

/// What a request was, so that its answer can be interpreted.
#[derive(Debug, Clone)]
pub enum Tag {
    /// An update or delete of a row already read and locked (see `apply::conflict`).
    Row { relation_id: u32 },
    /// An update or delete guarded on the fast path (`Shape::Guarded`): `division_by_zero`
    /// means it needs a decision.
    Guarded { relation_id: u32, delete: bool },
    /// An insert: a unique violation is `insert_exists`.
    Insert { relation_id: u32 },
    /// A COPY of consecutive inserts into one relation (a unique violation is `insert_exists`).
    Copy { relation_id: u32 },
    /// `BEGIN` and the transaction's order lock (parallel apply): answers once granted.
    Locked { seq: u64 },
    /// The progress update (and its guard) of the transaction ending at `end`.
    Progress { previous: Lsn, end: Lsn },
    /// The commit of the target transaction for the source commit ending at `end_lsn`.
    Commit { end_lsn: Lsn },
    /// A held transaction in one statement (`apply::held`): its changes, its progress on
    /// top of `previous` and its commit. `guarded`: its first guarded write's relation,
    /// and whether it deletes; `relations`: those it writes.
    Whole {
        previous: Lsn,
        end_lsn: Lsn,
        guarded: Option<(u32, bool)>,
        relations: Vec<u32>,
    },
    /// A read of the target's WAL insert position (answers it as a u64).
    InsertPosition,
    /// A read of the target's flushed WAL position (answers it as a u64).
    FlushPosition,
    /// A count of `walsync.merged_keys` (answers it as a u64).
    MergedKeys,
    /// Anything else (BEGIN, origin setup, TRUNCATE).
    Other { what: &'static str },
}

impl Tag {
    /// A request that reads and writes nothing of the open transaction's.
    pub fn only_reads(&self) -> bool {
        matches!(
            self,
            Tag::InsertPosition | Tag::FlushPosition | Tag::MergedKeys
        )
    }
}

pub type Answer = (Tag, Result<u64, tokio_postgres::Error>);
type Pending = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// A request already on its way (polled once) or already answered.
enum Sent {
    Waiting(Pending),
    Done(Option<Answer>),
}

impl Future for Sent {
    type Output = Answer;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        match self.get_mut() {
            Sent::Waiting(f) => f.as_mut().poll(cx),
            Sent::Done(a) => Poll::Ready(a.take().expect("a finished request is polled once")),
        }
    }
}

#[derive(Default)]
pub struct Pipeline {
    /// Only ever reached through `&mut self` (`Mutex::get_mut`, no locking): the Mutex is
    /// there to make the pipeline `Sync`, so the applier can be borrowed across awaits in
    /// a task that moves between threads.
    in_flight: Mutex<FuturesOrdered<Sent>>,
    /// Data size of each outstanding request, oldest first (answers come in this order).
    sizes: VecDeque<usize>,
    bytes: usize,
}

impl Pipeline {
    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn queue(&mut self) -> &mut FuturesOrdered<Sent> {
        // A poisoned lock only means a panic elsewhere; the queue itself is intact.
        self.in_flight.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `request`, which holds `bytes` of data, now. Returns the answers that had to
    /// be awaited to stay within [`MAX_IN_FLIGHT`] and [`MAX_IN_FLIGHT_BYTES`].
    pub async fn push(
        &mut self,
        tag: Tag,
        bytes: usize,
        request: impl Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'static,
    ) -> Vec<Answer> {
        let mut fut: Pending = Box::pin(async move { (tag, request.await) });
        // First poll: this is when tokio-postgres hands the request to the connection.
        let sent = match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(a) => Sent::Done(Some(a)),
            Poll::Pending => Sent::Waiting(fut),
        };
        self.queue().push_back(sent);
        self.sizes.push_back(bytes);
        self.bytes += bytes;
        let mut answers = Vec::new();
        while self.sizes.len() > MAX_IN_FLIGHT
            || (self.bytes > MAX_IN_FLIGHT_BYTES && self.sizes.len() > 1)
        {
            match self.next().await {
                Some(a) => answers.push(a),
                None => break,
            }
        }
        answers
    }

    /// The next answer, waiting for it; `None` when nothing is in flight.
    pub async fn next(&mut self) -> Option<Answer> {
        let answer = self.queue().next().await?;
        let size = self.sizes.pop_front().unwrap_or(0);
        self.bytes -= size;
        Some(answer)
    }

    /// Every outstanding answer, in order.
    pub async fn drain(&mut self) -> Vec<Answer> {
        let mut answers = Vec::with_capacity(self.sizes.len());
        while let Some(a) = self.next().await {
            answers.push(a);
        }
        answers
    }
}
