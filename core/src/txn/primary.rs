//! The primary's side of memory transactions: one [`Coordinator`] runs them one at a time.
//!
//! Transactions are serialised: at most one is active, the others wait in a fixed-size queue
//! (a full queue answers [`TxnStatus::Busy`] at once). One at a time is what keeps every
//! process's view consistent: a segment freed by one transaction cannot be reused by the next
//! before every secondary has synced. Events come in through methods; the work to do comes out
//! of [`Coordinator::poll_action`], and the next deadline out of [`Coordinator::poll_timeout`].
//! Each must be polled after every event.

use heapless::Deque;

use super::payload::{AllocFlags, AllocRequest, MemRange, MemRequest, TxnId, TxnStatus};
use super::{SyncOutcome, Timeouts};
use crate::time::Instant;

/// Who asked for a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin<P> {
    /// The primary itself (its own heap grows or shrinks); the token is the caller's.
    Local(u64),
    /// A secondary, answered over the channel.
    Peer(P),
}

/// Work the coordinator asks its executor to do. Each ends with the matching event, except
/// [`Action::Reply`], which ends the transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action<P> {
    /// Allocate pages for `req` in the shared map (and map them here, fire ALLOC events, map
    /// DMA). Report with [`Coordinator::pages_allocated`].
    AllocatePages {
        /// Transaction.
        id: TxnId,
        /// What to allocate.
        req: AllocRequest,
    },
    /// Free `range` in the shared map (fire FREE events, unmap DMA, unmap here, release the
    /// pages). `rollback` says this undoes this transaction's own allocation. Report with
    /// [`Coordinator::pages_freed`].
    FreePages {
        /// Transaction.
        id: TxnId,
        /// Heap the pages belong to.
        heap: u32,
        /// The pages.
        range: MemRange,
        /// Whether this is a rollback.
        rollback: bool,
    },
    /// Ask every secondary to sync (`ACTION_SYNC`, a [`TxnMsg::Sync`] to which the executor
    /// adds its change counter of the part of the map holding `range`, as it is after the
    /// `AllocatePages` or `FreePages` just done). Report with [`Coordinator::sync_done`].
    ///
    /// [`TxnMsg::Sync`]: super::TxnMsg::Sync
    BroadcastSync {
        /// Transaction.
        id: TxnId,
        /// What changed.
        range: MemRange,
        /// A secondary not to ask: the requester of an allocation with
        /// [`AllocFlags::REQUESTER_MAPS`], which maps the pages itself after the reply.
        ///
        /// [`AllocFlags::REQUESTER_MAPS`]: super::AllocFlags::REQUESTER_MAPS
        skip: Option<P>,
    },
    /// Ask every secondary to sync after a rollback (`ACTION_ROLLBACK`, with the change counter
    /// as for [`Action::BroadcastSync`]). Report with [`Coordinator::rollback_done`].
    BroadcastRollback {
        /// Transaction.
        id: TxnId,
        /// What was undone.
        range: MemRange,
    },
    /// Every process maps the new pages (but the requester, when `held`): add them to heap
    /// `heap`. Report with [`Coordinator::published`].
    Publish {
        /// Transaction.
        id: TxnId,
        /// The heap.
        heap: u32,
        /// The pages.
        range: MemRange,
        /// The requester has not mapped them yet ([`AllocFlags::REQUESTER_MAPS`]): they join
        /// the heap as one block held for it, not as free memory, until it hands them over.
        ///
        /// [`AllocFlags::REQUESTER_MAPS`]: super::AllocFlags::REQUESTER_MAPS
        held: bool,
    },
    /// A free did not happen (refused, or the local free failed): put `range` back into heap
    /// `heap`, where the requester took it from. Nothing is reported back. Doing this here,
    /// not in the requester, means the pages come back even if the requester died meanwhile.
    Restore {
        /// Transaction.
        id: TxnId,
        /// The heap.
        heap: u32,
        /// The pages.
        range: MemRange,
    },
    /// Send the final answer. The transaction is over; nothing more comes for it.
    Reply {
        /// The requester.
        to: Origin<P>,
        /// Transaction.
        id: TxnId,
        /// Result.
        status: TxnStatus,
        /// Pages allocated or freed (empty on failure).
        range: MemRange,
    },
}

/// An event for a transaction that is not active or not in the step the event belongs to.
/// It is ignored; the caller may count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stale;

/// How [`Coordinator::submit`] took a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// Started at once.
    Started,
    /// Queued behind the active transaction.
    Queued,
    /// Refused; a [`Action::Reply`] with this status is queued.
    Refused(TxnStatus),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Allocating,
    Freeing,
    Syncing,
    Publishing,
    RollbackFreeing,
    RollingBack,
}

#[derive(Clone, Copy, Debug)]
struct Active<P> {
    id: TxnId,
    origin: Origin<P>,
    req: MemRequest,
    phase: Phase,
    range: MemRange,
    deadline: Instant,
    failure: TxnStatus,
    /// The pages of a free request are gone from the shared map.
    freed: bool,
}

#[derive(Clone, Copy, Debug)]
struct Queued<P> {
    origin: Origin<P>,
    id: TxnId,
    req: MemRequest,
    expires: Instant,
}

/// Room for queued actions. One event emits at most a restore, a reply and the next
/// transaction's first action; expired queue entries (a restore and a reply each) are refused
/// only while room remains for them and one more such event.
const ACTION_QUEUE: usize = 8;

/// Counters of a coordinator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoordinatorStats {
    /// Transactions that ended with success.
    pub committed: u64,
    /// Allocations undone after a failed or timed-out sync or publish.
    pub rolled_back: u64,
    /// Transactions that ended with a failure (including rollbacks and refusals).
    pub failed: u64,
    /// Events ignored as stale.
    pub stale_events: u64,
}

/// Runs memory transactions in the primary. `P` is the peer address; `Q` the queue length.
pub struct Coordinator<P, const Q: usize = 32> {
    timeouts: Timeouts,
    active: Option<Active<P>>,
    queue: Deque<Queued<P>, Q>,
    actions: Deque<Action<P>, ACTION_QUEUE>,
    stats: CoordinatorStats,
}

impl<P: Clone + PartialEq, const Q: usize> Coordinator<P, Q> {
    /// An idle coordinator.
    pub fn new(timeouts: Timeouts) -> Self {
        Coordinator {
            timeouts,
            active: None,
            queue: Deque::new(),
            actions: Deque::new(),
            stats: CoordinatorStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> CoordinatorStats {
        self.stats
    }

    /// True when no transaction is active or queued.
    pub fn is_idle(&self) -> bool {
        self.active.is_none() && self.queue.is_empty()
    }

    /// The id of the active transaction.
    pub fn active(&self) -> Option<TxnId> {
        self.active.as_ref().map(|a| a.id)
    }

    /// Transactions waiting behind the active one.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The next piece of work, if any.
    pub fn poll_action(&mut self) -> Option<Action<P>> {
        self.actions.pop_front()
    }

    /// When [`Coordinator::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let active = self
            .active
            .as_ref()
            .filter(|a| a.deadline != Instant::NEVER)
            .map(|a| a.deadline);
        let queued = self.queue.iter().map(|q| q.expires).min();
        match (active, queued) {
            (Some(a), Some(q)) => Some(a.min(q)),
            (a, q) => a.or(q),
        }
    }

    fn emit(&mut self, a: Action<P>) {
        // Room is kept by construction when the caller drains the actions after every event, as
        // documented. Should a caller not, the action that does not fit is lost: the transaction
        // then times out at its requester instead of this panicking.
        let _ = self.actions.push_back(a);
    }

    /// A request arrived from `origin`.
    pub fn submit(
        &mut self,
        origin: Origin<P>,
        id: TxnId,
        req: MemRequest,
        now: Instant,
    ) -> Submitted {
        let dup_active = self
            .active
            .as_ref()
            .is_some_and(|a| a.id == id && a.origin == origin);
        let dup_queued = self.queue.iter().any(|q| q.id == id && q.origin == origin);
        if dup_active || dup_queued {
            // The first copy of this request carries its pages; this one restores nothing.
            return self.refuse(origin, id, None, TxnStatus::Invalid);
        }
        if self.active.is_none() {
            self.start(origin, id, req, now);
            return Submitted::Started;
        }
        let expires = now.saturating_add(self.timeouts.queue_wait());
        let q = Queued {
            origin: origin.clone(),
            id,
            req,
            expires,
        };
        match self.queue.push_back(q) {
            Ok(()) => Submitted::Queued,
            Err(_) => self.refuse(origin, id, Some(req), TxnStatus::Busy),
        }
    }

    fn restore(&mut self, id: TxnId, req: &MemRequest) {
        if let MemRequest::Free(f) = req {
            self.emit(Action::Restore {
                id,
                heap: f.heap,
                range: f.range,
            });
        }
    }

    fn refuse(
        &mut self,
        to: Origin<P>,
        id: TxnId,
        req: Option<MemRequest>,
        status: TxnStatus,
    ) -> Submitted {
        self.stats.failed += 1;
        if let Some(req) = req {
            self.restore(id, &req);
        }
        self.emit(Action::Reply {
            to,
            id,
            status,
            range: MemRange::default(),
        });
        Submitted::Refused(status)
    }

    fn start(&mut self, origin: Origin<P>, id: TxnId, req: MemRequest, _now: Instant) {
        let (phase, range, action) = match req {
            MemRequest::Alloc(a) => (
                Phase::Allocating,
                MemRange::default(),
                Action::AllocatePages { id, req: a },
            ),
            MemRequest::Free(f) => (
                Phase::Freeing,
                f.range,
                Action::FreePages {
                    id,
                    heap: f.heap,
                    range: f.range,
                    rollback: false,
                },
            ),
        };
        self.active = Some(Active {
            id,
            origin,
            req,
            phase,
            range,
            deadline: Instant::NEVER,
            failure: TxnStatus::Failed,
            freed: false,
        });
        self.emit(action);
    }

    fn heap(req: &MemRequest) -> u32 {
        match req {
            MemRequest::Alloc(a) => a.heap,
            MemRequest::Free(f) => f.heap,
        }
    }

    /// Ends the active transaction with `status` and starts the next queued one.
    fn finish(&mut self, status: TxnStatus, now: Instant) {
        let Some(a) = self.active.take() else {
            return;
        };
        if status.is_ok() {
            self.stats.committed += 1;
        } else {
            self.stats.failed += 1;
        }
        // The range says what changed: the pages of a successful allocation, the pages a free
        // took out of the shared map (even if a secondary then failed to unmap them), or nothing.
        let range = match a.req {
            MemRequest::Alloc(_) if status.is_ok() => a.range,
            MemRequest::Free(_) if a.freed => a.range,
            _ => MemRange::default(),
        };
        self.emit(Action::Reply {
            to: a.origin,
            id: a.id,
            status,
            range,
        });
        if let Some(q) = self.queue.pop_front() {
            self.start(q.origin, q.id, q.req, now);
        }
    }

    fn active_in(&mut self, id: TxnId, phases: &[Phase]) -> Result<&mut Active<P>, Stale> {
        match self.active.as_mut() {
            Some(a) if a.id == id && phases.contains(&a.phase) => Ok(a),
            _ => {
                self.stats.stale_events += 1;
                Err(Stale)
            }
        }
    }

    /// Begins the rollback of the active allocation: free its pages, then tell everyone.
    fn roll_back(&mut self, failure: TxnStatus) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        a.failure = failure;
        a.phase = Phase::RollbackFreeing;
        a.deadline = Instant::NEVER;
        let (id, heap, range) = (a.id, Self::heap(&a.req), a.range);
        self.stats.rolled_back += 1;
        self.emit(Action::FreePages {
            id,
            heap,
            range,
            rollback: true,
        });
    }

    /// The secondary that maps the pages of the active allocation itself, if any.
    fn mapping_requester(a: &Active<P>) -> Option<P> {
        match (&a.req, &a.origin) {
            (MemRequest::Alloc(r), Origin::Peer(p))
                if r.flags.contains(AllocFlags::REQUESTER_MAPS) =>
            {
                Some(p.clone())
            }
            _ => None,
        }
    }

    fn broadcast_sync(&mut self, now: Instant) {
        let step = self.timeouts.coordinator_step();
        if let Some(a) = self.active.as_mut() {
            a.phase = Phase::Syncing;
            a.deadline = now.saturating_add(step);
            let (id, range) = (a.id, a.range);
            let skip = if a.freed {
                None
            } else {
                Self::mapping_requester(a)
            };
            self.emit(Action::BroadcastSync { id, range, skip });
        }
    }

    /// The executor allocated the pages (`Ok(range)`) or could not (`Err(status)`).
    pub fn pages_allocated(
        &mut self,
        id: TxnId,
        result: Result<MemRange, TxnStatus>,
        now: Instant,
    ) -> Result<(), Stale> {
        let a = self.active_in(id, &[Phase::Allocating])?;
        match result {
            Ok(range) if range.len > 0 => {
                a.range = range;
                self.broadcast_sync(now);
            }
            Ok(_) => self.finish(TxnStatus::Failed, now),
            Err(TxnStatus::Ok) => self.finish(TxnStatus::Failed, now),
            Err(status) => self.finish(status, now),
        }
        Ok(())
    }

    /// The executor freed the pages of a free request or of a rollback.
    pub fn pages_freed(
        &mut self,
        id: TxnId,
        result: Result<(), TxnStatus>,
        now: Instant,
    ) -> Result<(), Stale> {
        let step = self.timeouts.coordinator_step();
        let a = self.active_in(id, &[Phase::Freeing, Phase::RollbackFreeing])?;
        match (a.phase, result) {
            (Phase::Freeing, Ok(())) => {
                a.freed = true;
                self.broadcast_sync(now)
            }
            (Phase::Freeing, Err(s)) => {
                let s = if s.is_ok() { TxnStatus::Failed } else { s };
                let (id, req) = (a.id, a.req);
                self.restore(id, &req);
                self.finish(s, now)
            }
            _ => {
                // A rollback goes on whatever the local free said: the secondaries must drop
                // their mappings of pages that are no longer in the shared map.
                a.phase = Phase::RollingBack;
                a.deadline = now.saturating_add(step);
                let (id, range) = (a.id, a.range);
                self.emit(Action::BroadcastRollback { id, range });
            }
        }
        Ok(())
    }

    /// The sync broadcast completed with `outcome` (a broadcast that could not be sent at all is
    /// reported with `failed > 0`).
    pub fn sync_done(
        &mut self,
        id: TxnId,
        outcome: SyncOutcome,
        now: Instant,
    ) -> Result<(), Stale> {
        let a = self.active_in(id, &[Phase::Syncing])?;
        let ok = outcome.is_success();
        match a.req {
            MemRequest::Alloc(_) if ok => {
                a.phase = Phase::Publishing;
                a.deadline = Instant::NEVER;
                let (id, heap, range) = (a.id, Self::heap(&a.req), a.range);
                let held = Self::mapping_requester(a).is_some();
                self.emit(Action::Publish {
                    id,
                    heap,
                    range,
                    held,
                });
            }
            MemRequest::Alloc(_) => {
                let failure = if outcome.failed == 0 {
                    TxnStatus::Timeout
                } else {
                    TxnStatus::SyncFailed
                };
                self.roll_back(failure);
            }
            MemRequest::Free(_) => {
                let s = if ok {
                    TxnStatus::Ok
                } else {
                    TxnStatus::SyncFailed
                };
                self.finish(s, now);
            }
        }
        Ok(())
    }

    /// The executor added the pages to the heap (or failed to).
    pub fn published(
        &mut self,
        id: TxnId,
        result: Result<(), TxnStatus>,
        now: Instant,
    ) -> Result<(), Stale> {
        self.active_in(id, &[Phase::Publishing])?;
        match result {
            Ok(()) => self.finish(TxnStatus::Ok, now),
            Err(s) => self.roll_back(if s.is_ok() { TxnStatus::Failed } else { s }),
        }
        Ok(())
    }

    /// The rollback broadcast completed (its answers are not inspected).
    pub fn rollback_done(
        &mut self,
        id: TxnId,
        _outcome: SyncOutcome,
        now: Instant,
    ) -> Result<(), Stale> {
        let a = self.active_in(id, &[Phase::RollingBack])?;
        let failure = a.failure;
        self.finish(failure, now);
        Ok(())
    }

    /// Time passed: a sync or rollback step past its deadline ends as if it had failed, and
    /// requests that waited in the queue too long are refused as busy (a few per call: call
    /// again while [`Coordinator::poll_timeout`] is in the past).
    pub fn handle_timeout(&mut self, now: Instant) {
        let waiting = self.queue.len();
        for _ in 0..waiting {
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            if q.expires <= now && self.actions.len() + 4 <= ACTION_QUEUE {
                self.refuse(q.origin, q.id, Some(q.req), TxnStatus::Busy);
            } else {
                // Re-queue in order; the queue had room for it a moment ago.
                let _ = self.queue.push_back(q);
            }
        }
        let Some(a) = self.active.as_ref() else {
            return;
        };
        if a.deadline > now {
            return;
        }
        match (a.phase, a.req) {
            (Phase::Syncing, MemRequest::Alloc(_)) => self.roll_back(TxnStatus::Timeout),
            (Phase::Syncing, MemRequest::Free(_)) => self.finish(TxnStatus::Timeout, now),
            (Phase::RollingBack, _) => {
                let failure = a.failure;
                self.finish(failure, now)
            }
            _ => {}
        }
    }
}
