//! The requesting side of a transaction, and the secondaries' side of a sync.
//!
//! A [`Requester`] is one request to the primary: it produces the message to send and turns
//! whatever comes back (the response, a timeout, a failed send) into exactly one [`Outcome`].
//! A [`SyncJob`] is what a secondary must do when a sync or rollback arrives, and builds its ack.

use super::Timeouts;
use super::payload::{MemRange, MemRequest, PayloadError, TxnId, TxnMsg, TxnStatus};
use crate::time::Instant;

/// The one final result of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The primary answered.
    Done {
        /// Its status.
        status: TxnStatus,
        /// Pages allocated or freed.
        range: MemRange,
        /// The change counter after the change (see [`TxnMsg::Response`]).
        seq: u64,
    },
    /// No answer before the deadline.
    TimedOut,
    /// The request could not be sent: the primary is gone.
    Unreachable,
}

impl Outcome {
    /// True for a successful answer.
    pub fn is_ok(&self) -> bool {
        matches!(
            self,
            Outcome::Done {
                status: TxnStatus::Ok,
                ..
            }
        )
    }
}

/// One request to the primary, from send to final outcome.
#[derive(Clone, Copy, Debug)]
pub struct Requester {
    id: TxnId,
    deadline: Instant,
    finished: bool,
}

impl Requester {
    /// Starts request `id` for `req` at `now`; returns the state and the message to send (as
    /// a request named [`super::ACTION_REQUEST`]).
    pub fn new(id: TxnId, req: MemRequest, now: Instant, timeouts: &Timeouts) -> (Self, TxnMsg) {
        (
            Requester {
                id,
                deadline: now.saturating_add(timeouts.requester()),
                finished: false,
            },
            TxnMsg::Request { id, req },
        )
    }

    /// The transaction id.
    pub fn id(&self) -> TxnId {
        self.id
    }

    /// When the requester gives up.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether the outcome has been produced.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn finish(&mut self, o: Outcome) -> Option<Outcome> {
        if self.finished {
            return None;
        }
        self.finished = true;
        Some(o)
    }

    /// A message arrived; only the response to this transaction finishes it.
    pub fn on_message(&mut self, msg: &TxnMsg) -> Option<Outcome> {
        match *msg {
            TxnMsg::Response {
                id,
                status,
                range,
                seq,
            } if id == self.id => self.finish(Outcome::Done { status, range, seq }),
            _ => None,
        }
    }

    /// Raw reply bytes arrived; undecodable ones are ignored.
    pub fn on_payload(&mut self, param: &[u8]) -> Result<Option<Outcome>, PayloadError> {
        let m = TxnMsg::decode(param)?;
        Ok(self.on_message(&m))
    }

    /// Time passed.
    pub fn on_timeout(&mut self, now: Instant) -> Option<Outcome> {
        if now >= self.deadline {
            self.finish(Outcome::TimedOut)
        } else {
            None
        }
    }

    /// The request could not be sent.
    pub fn on_send_failed(&mut self) -> Option<Outcome> {
        self.finish(Outcome::Unreachable)
    }
}

/// A sync or rollback a secondary must carry out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncJob {
    /// Transaction.
    pub id: TxnId,
    /// What changed.
    pub range: MemRange,
    /// The change counter after the change (see [`TxnMsg::Sync`]; 0: unknown, bring the whole
    /// local map in line).
    pub seq: u64,
    /// Whether this is a rollback.
    pub rollback: bool,
}

impl SyncJob {
    /// The job in a received payload; only syncs and rollbacks are jobs.
    pub fn decode(param: &[u8]) -> Result<SyncJob, PayloadError> {
        match TxnMsg::decode(param)? {
            TxnMsg::Sync { id, range, seq } => Ok(SyncJob {
                id,
                range,
                seq,
                rollback: false,
            }),
            TxnMsg::Rollback { id, range, seq } => Ok(SyncJob {
                id,
                range,
                seq,
                rollback: true,
            }),
            _ => Err(PayloadError::BadValue("op (expected sync or rollback)")),
        }
    }

    /// The ack to send back.
    pub fn ack(&self, status: TxnStatus) -> TxnMsg {
        TxnMsg::SyncAck {
            id: self.id,
            status,
        }
    }
}
