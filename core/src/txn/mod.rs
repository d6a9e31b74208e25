//! Memory transactions: how the shared memory grows and shrinks when many processes map it.
//!
//! Only the primary changes the memory map. A secondary that needs pages (its heap ran out) or
//! frees whole pages asks the primary; the primary carries the change out, makes every secondary
//! bring its own mappings in line, and answers. If any secondary cannot follow an allocation, the
//! primary undoes it everywhere. The requester gets exactly one final answer.
//!
//! ```text
//! requester            primary (Coordinator)                    every secondary
//!   Request(alloc) -->  AllocatePages
//!                       ok: BroadcastSync ------------------->  sync mappings
//!                           <-------------------------------   SyncAck
//!                       all ok: Publish (pages join the heap)
//!   <-- Response(ok)    Reply
//!                       any failure or timeout:
//!                         FreePages (local rollback)
//!                         BroadcastRollback ---------------->  sync again (unmap)
//!                           <-------------------------------   SyncAck (not inspected)
//!   <-- Response(fail)  Reply
//! ```
//!
//! A free runs AllocatePages' mirror image: FreePages, BroadcastSync, Reply; it has no rollback
//! (pages already gone from the heap cannot be taken back, and a secondary that fails to unmap
//! holds a harmless stale mapping until its next successful sync).
//!
//! Compared with DPDK's `malloc_mp`: pages join the heap only after every secondary mapped them
//! (so no process can be handed memory that another cannot see yet), the primary never edits a
//! heap under someone else's lock, the requester waits longer than the primary's worst case
//! (see [`Timeouts`]), and a failure to send the sync rolls back instead of leaving pages behind.
//!
//! Everything here is sans-IO: [`Coordinator`] takes events and queues [`Action`]s; the hugepage
//! and heap crates execute them. [`Requester`] is the requesting side; [`SyncJob`] the
//! secondaries' side.

pub mod payload;
mod primary;
mod requester;

use core::time::Duration;

pub use payload::{
    AllocFlags, AllocRequest, FreeRequest, MemRange, MemRequest, PayloadError, TxnId, TxnMsg,
    TxnStatus,
};
pub use primary::{Action, Coordinator, CoordinatorStats, Origin, Stale, Submitted};
pub use requester::{Outcome, Requester, SyncJob};

/// Action name of requests to the primary (requester to primary, a request; the reply is the
/// final [`TxnMsg::Response`]).
pub const ACTION_REQUEST: &str = "memplane_mem_request";
/// Action name of syncs (primary to every secondary, a request answered by [`TxnMsg::SyncAck`]).
pub const ACTION_SYNC: &str = "memplane_mem_sync";
/// Action name of rollbacks (primary to every secondary, answered like a sync).
pub const ACTION_ROLLBACK: &str = "memplane_mem_rollback";

/// How long each step may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// How long the primary waits for the secondaries to answer a sync, and again a rollback.
    pub step: Duration,
    /// Slack for the primary's own work between steps.
    pub margin: Duration,
}

impl Default for Timeouts {
    /// DPDK's 5 s per step, with 1 s of slack.
    fn default() -> Self {
        Timeouts {
            step: Duration::from_secs(5),
            margin: Duration::from_secs(1),
        }
    }
}

impl Timeouts {
    /// How long a requester waits for the final answer: longer than the primary can take to
    /// give one (the longest wait in its queue, then a sync that times out and a rollback that
    /// times out), so the answer is never lost to a requester that gave up first (DPDK's
    /// requester waits 5 s against a primary that may take 10 s).
    pub fn requester(&self) -> Duration {
        self.queue_wait()
            .saturating_add(self.coordinator_step().saturating_mul(2))
            .saturating_add(self.margin)
    }

    /// The primary's backstop for a sync or rollback step.
    pub fn coordinator_step(&self) -> Duration {
        self.step.saturating_add(self.margin)
    }

    /// How long a request may wait in the primary's queue before it is refused as busy.
    pub fn queue_wait(&self) -> Duration {
        self.step
    }
}

/// What the secondaries answered to one sync or rollback broadcast.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Secondaries the broadcast reached.
    pub sent: u32,
    /// Acks with the right id and status ok.
    pub ok: u32,
    /// Answers that were failures, carried another id, or did not decode.
    pub failed: u32,
}

impl SyncOutcome {
    /// Counts the answers to the broadcast of transaction `id`: `sent` peers were reached, and
    /// `answers` are the parameters of their replies.
    pub fn from_answers<'a>(
        id: TxnId,
        sent: u32,
        answers: impl IntoIterator<Item = &'a [u8]>,
    ) -> Self {
        let mut o = SyncOutcome {
            sent,
            ..SyncOutcome::default()
        };
        for a in answers {
            match TxnMsg::decode(a) {
                Ok(TxnMsg::SyncAck {
                    id: got,
                    status: TxnStatus::Ok,
                }) if got == id => o.ok += 1,
                _ => o.failed += 1,
            }
        }
        o
    }

    /// Every secondary reached answered, and all said ok.
    pub fn is_success(&self) -> bool {
        self.failed == 0 && self.ok == self.sent
    }
}
