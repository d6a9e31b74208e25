//! Counters an endpoint keeps about what it received and sent, readable at any time.
//!
//! Every datagram the endpoint rejects or drops is counted here under its reason, so an operator
//! (or a test) can see that bad input was refused rather than silently lost.

use crate::sync::{AtomicU64, Ordering};
use crate::wire::DecodeError;

/// Live counters of one endpoint.
#[derive(Default)]
pub struct Stats {
    /// Datagrams that decoded and were dispatched (to an action or a pending request).
    pub rx_ok: AtomicU64,
    /// Datagrams rejected by the decoder (wrong length, bad kind, bad name, bad counts...).
    pub rx_malformed: AtomicU64,
    /// Datagrams whose fds were cut short by the kernel (`MSG_CTRUNC`) or payload truncated.
    pub rx_truncated: AtomicU64,
    /// Datagrams whose `num_fds` disagreed with the fds received.
    pub rx_fd_mismatch: AtomicU64,
    /// Messages and requests for a name with no registered action.
    pub rx_no_action: AtomicU64,
    /// Replies nobody waits for: late, duplicate or unknown.
    pub rx_unmatched_reply: AtomicU64,
    /// Datagrams refused because of the sender's credentials (checked by the transport).
    pub rx_rejected_sender: AtomicU64,
    /// Datagrams handed to the transport.
    pub tx_ok: AtomicU64,
    /// Sends that found the peer gone (its socket dead or removed).
    pub tx_peer_gone: AtomicU64,
    /// Sends that failed otherwise (queue full past the deadline, IO errors).
    pub tx_failed: AtomicU64,
    /// Requests that completed with fewer replies than peers (deadline passed).
    pub requests_timed_out: AtomicU64,
}

/// A plain copy of [`Stats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`Stats::rx_ok`].
    pub rx_ok: u64,
    /// See [`Stats::rx_malformed`].
    pub rx_malformed: u64,
    /// See [`Stats::rx_truncated`].
    pub rx_truncated: u64,
    /// See [`Stats::rx_fd_mismatch`].
    pub rx_fd_mismatch: u64,
    /// See [`Stats::rx_no_action`].
    pub rx_no_action: u64,
    /// See [`Stats::rx_unmatched_reply`].
    pub rx_unmatched_reply: u64,
    /// See [`Stats::rx_rejected_sender`].
    pub rx_rejected_sender: u64,
    /// See [`Stats::tx_ok`].
    pub tx_ok: u64,
    /// See [`Stats::tx_peer_gone`].
    pub tx_peer_gone: u64,
    /// See [`Stats::tx_failed`].
    pub tx_failed: u64,
    /// See [`Stats::requests_timed_out`].
    pub requests_timed_out: u64,
}

impl StatsSnapshot {
    /// Every datagram rejected on receipt, whatever the reason.
    pub fn rx_rejected(&self) -> u64 {
        self.rx_malformed + self.rx_truncated + self.rx_fd_mismatch + self.rx_rejected_sender
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    /// Counts one rejected datagram under the counter its error belongs to.
    pub fn count_decode_error(&self, e: &DecodeError) {
        bump(match e {
            DecodeError::Truncated | DecodeError::ControlTruncated => &self.rx_truncated,
            DecodeError::FdCountMismatch { .. } => &self.rx_fd_mismatch,
            _ => &self.rx_malformed,
        });
    }

    /// Counts one datagram refused because of who sent it.
    pub fn count_rejected_sender(&self) {
        bump(&self.rx_rejected_sender);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            rx_ok: r(&self.rx_ok),
            rx_malformed: r(&self.rx_malformed),
            rx_truncated: r(&self.rx_truncated),
            rx_fd_mismatch: r(&self.rx_fd_mismatch),
            rx_no_action: r(&self.rx_no_action),
            rx_unmatched_reply: r(&self.rx_unmatched_reply),
            rx_rejected_sender: r(&self.rx_rejected_sender),
            tx_ok: r(&self.tx_ok),
            tx_peer_gone: r(&self.tx_peer_gone),
            tx_failed: r(&self.tx_failed),
            requests_timed_out: r(&self.requests_timed_out),
        }
    }
}
