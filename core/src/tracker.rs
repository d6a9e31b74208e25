//! The pending table made safe to share between threads, with pluggable waiting.
//!
//! A [`Tracker`] wraps a [`PendingTable`] in the shim's mutex and adds the two rules that make it
//! correct under concurrency:
//! - nothing user-visible runs under the lock: sync waiters are woken and async completions are
//!   handed out only after it is released;
//! - a synchronous requester blocks through a [`Waiter`] the host provides (a parked thread, a
//!   condvar, a futex, a spin loop). The waiter must remember a notification that arrives before
//!   it blocks; then a reply that races with the requester's own deadline can neither be lost nor
//!   delivered twice, because both paths end under the lock and only one finds the request open.
//!
//! This is the structure the loom tests check (`core/tests/loom_tracker.rs`).

use crate::message::{Fds, Message};
use crate::name::Name;
use crate::pending::Storage;
use crate::pending::{
    Answer, Cancelled, Completion, Finished, Notify, PendingError, PendingTable, Reply, ReplySink,
    RequestId, Waiting,
};
use crate::sync::{Mutex, RawMutex};
use crate::time::Instant;
use core::hash::Hash;

/// How a synchronous requester blocks.
pub trait Waiter {
    /// The handle stored in the table to wake this waiter.
    type Notify: Notify;
    /// A handle that wakes this waiter.
    fn notifier(&self) -> Self::Notify;
    /// Blocks until notified or until `deadline` passes (an early, spurious return is allowed),
    /// and returns the current time. A notification sent since the last return must make this
    /// return at once.
    fn wait_until(&self, deadline: Instant) -> Instant;
}

/// What happened to an answer given to [`Tracker::on_answer`].
pub enum AnswerOutcome<C, K, F> {
    /// It matched a pending request. If that completed an async request, here is its
    /// completion to run; a sync requester has already been woken. `overflow` is the reply
    /// itself when the request's sink was full.
    Matched {
        /// Completion of an async request, to run now.
        finished: Option<Finished<C, K>>,
        /// The refused reply, to drop and count.
        overflow: Option<Message<F>>,
    },
    /// Nobody waits for it; drop and count it.
    Unmatched(Message<F>),
}

/// A thread-safe pending table. See the module documentation.
pub struct Tracker<Raw, P, F, N, C, K, St: Storage<P, N, C, K>> {
    table: Mutex<Raw, PendingTable<P, F, N, C, K, St>>,
}

impl<Raw, P, F, N, C, K, St> Default for Tracker<Raw, P, F, N, C, K, St>
where
    Raw: RawMutex,
    P: Clone + Eq + Hash,
    F: Fds,
    N: Notify,
    K: ReplySink<P, F>,
    St: Storage<P, N, C, K>,
{
    fn default() -> Self {
        Self::new()
    }
}

/// Completions leave the table in batches of at most this many, delivered outside its lock.
const BATCH: usize = 16;

/// Runs a completion that left the table: wake a sync waiter here, return an async one.
fn deliver<N: Notify, C, K>(c: Completion<N, C, K>) -> Option<Finished<C, K>> {
    match c {
        Completion::Wake(n) => {
            n.notify();
            None
        }
        Completion::Async(f) => Some(f),
    }
}

impl<Raw, P, F, N, C, K, St> Tracker<Raw, P, F, N, C, K, St>
where
    Raw: RawMutex,
    P: Clone + Eq + Hash,
    F: Fds,
    N: Notify,
    K: ReplySink<P, F>,
    St: Storage<P, N, C, K>,
{
    /// An empty tracker.
    pub fn new() -> Self {
        Tracker {
            table: Mutex::new(PendingTable::new()),
        }
    }

    /// Enters a request; see [`PendingTable::begin`].
    pub fn begin(
        &self,
        name: Name,
        peers: &[P],
        deadline: Instant,
        waiting: Waiting<N, C>,
    ) -> Result<RequestId, (PendingError, Waiting<N, C>)> {
        self.table.lock().begin(name, peers, deadline, waiting)
    }

    /// Withdraws a peer whose send failed; see [`PendingTable::send_failed`].
    pub fn send_failed(&self, id: RequestId, peer: &P) -> bool {
        self.table.lock().send_failed(id, peer)
    }

    /// Withdraws every slot owed by `peer`, which is gone; see [`PendingTable::peer_gone`].
    /// Sync waiters of requests it completes are woken; async completions are handed to `run`
    /// one by one, outside the lock. Returns how many slots were withdrawn.
    pub fn peer_gone(&self, peer: &P, run: impl FnMut(Finished<C, K>)) -> usize {
        self.in_batches(|t, sink| t.peer_gone(peer, BATCH, sink), run)
    }

    /// Ends the sending phase; an async request that is complete already (all answered, or
    /// nothing sent: the "dummy request") comes back to be run.
    pub fn sending_done(
        &self,
        id: RequestId,
        now: Instant,
    ) -> Result<Option<Finished<C, K>>, PendingError> {
        let c = self.table.lock().sending_done(id, now)?;
        Ok(c.and_then(deliver))
    }

    /// Takes a reply (`reply = true`) or an ignore from `peer`.
    pub fn on_answer(&self, peer: &P, msg: Message<F>, reply: bool) -> AnswerOutcome<C, K, F> {
        let a = self.table.lock().on_answer(peer, msg, reply);
        match a {
            Answer::Matched {
                completion,
                overflow,
            } => AnswerOutcome::Matched {
                finished: completion.and_then(deliver),
                overflow,
            },
            Answer::Unmatched(m) => AnswerOutcome::Unmatched(m),
        }
    }

    /// Completes every request due at `now`: sync waiters are woken, async completions are handed
    /// to `run` one by one, outside the lock. Returns how many requests completed.
    pub fn expire(&self, now: Instant, run: impl FnMut(Finished<C, K>)) -> usize {
        self.in_batches(
            |t, sink| {
                let n = t.expire(now, BATCH, sink);
                (n, n == BATCH)
            },
            run,
        )
    }

    /// Calls `step` with the locked table and a sink for at most [`BATCH`] completions, until it
    /// says it is done; delivers each batch outside the lock (sync waiters woken, async
    /// completions handed to `run`). Returns the sum of `step`'s counts.
    fn in_batches(
        &self,
        mut step: impl FnMut(
            &mut PendingTable<P, F, N, C, K, St>,
            &mut dyn FnMut(Completion<N, C, K>),
        ) -> (usize, bool),
        mut run: impl FnMut(Finished<C, K>),
    ) -> usize {
        let mut total = 0;
        loop {
            let mut batch: heapless::Vec<Completion<N, C, K>, BATCH> = heapless::Vec::new();
            let (n, more) = step(&mut self.table.lock(), &mut |c| {
                // Capacity is BATCH and every step stops at BATCH: the push cannot fail.
                let _ = batch.push(c);
            });
            total += n;
            for c in batch {
                if let Some(f) = deliver(c) {
                    run(f);
                }
            }
            if !more {
                return total;
            }
        }
    }

    /// The earliest deadline of the open requests.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.table.lock().next_deadline()
    }

    /// Blocks through `waiter` until request `id` (entered with `waiter.notifier()`) completes
    /// or its deadline passes, then returns its reply. `now` is the current time.
    pub fn wait<W>(
        &self,
        id: RequestId,
        mut now: Instant,
        waiter: &W,
    ) -> Result<Reply<K>, PendingError>
    where
        W: Waiter<Notify = N>,
    {
        loop {
            let deadline = {
                let mut t = self.table.lock();
                if let Some(reply) = t.poll(id, now)? {
                    return Ok(reply);
                }
                t.deadline(id).ok_or(PendingError::Unknown)?
            };
            now = waiter.wait_until(deadline);
        }
    }

    /// Cancels request `id`; see [`PendingTable::cancel`].
    pub fn cancel(&self, id: RequestId) -> Result<Cancelled<N, C, K>, PendingError> {
        self.table.lock().cancel(id)
    }

    /// Requests in the table.
    pub fn len(&self) -> usize {
        self.table.lock().len()
    }

    /// True when no request is in the table.
    pub fn is_empty(&self) -> bool {
        self.table.lock().is_empty()
    }

    /// Counters of request `id`: (nb_sent, nb_received, outstanding).
    pub fn counters(&self, id: RequestId) -> Option<(u32, u32, u32)> {
        self.table.lock().counters(id)
    }
}
