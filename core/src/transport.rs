//! The trait a transport implements to carry the core's datagrams.
//!
//! A transport moves bytes and fds between processes and knows who the peers are. It makes no
//! protocol decision: what to send, to whom, and what a received datagram means is the
//! [`crate::Endpoint`]'s job. The Unix datagram transport (`memplane-unix`) and the in-process
//! loopback used by tests both implement this.

use core::fmt;
use core::hash::Hash;

use crate::message::{Fds, MsgKind};
use crate::time::Instant;

/// Why a send did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// The peer is gone: its socket is dead or removed (`ECONNREFUSED`, `ENOENT`). A request does
    /// not count it as sent.
    PeerGone,
    /// The peer did not take the datagram before the deadline (its queue stayed full).
    Timeout,
    /// The transport cannot carry this many fds.
    TooManyFds,
    /// Any other failure, with the OS error code when there is one.
    Os(i32),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::PeerGone => f.write_str("peer is gone"),
            SendError::Timeout => f.write_str("peer did not take the datagram before the deadline"),
            SendError::TooManyFds => f.write_str("too many fds for this transport"),
            SendError::Os(e) => write!(f, "send failed with OS error {e}"),
        }
    }
}

impl core::error::Error for SendError {}

/// Where [`Transport::send_each`] reports how the send to each peer went.
pub type SendDone<'a, P> = dyn FnMut(&P, Result<(), SendError>) + 'a;

/// A carrier of datagrams between processes.
pub trait Transport {
    /// How a peer is addressed (a socket path, a process index...).
    type Peer: Clone + Eq + Hash + fmt::Debug;
    /// The fds attached to a message, owned; dropping them releases them.
    type Fds: Fds;

    /// Sends one datagram with `fds` to `to`. The transport may wait (or queue) until `deadline`
    /// for a busy peer, but must never block past it; it must never block at all when called
    /// from its own receiving thread with a deadline already past. The fds stay the caller's.
    fn send(
        &self,
        to: &Self::Peer,
        datagram: &[u8],
        fds: &Self::Fds,
        deadline: Instant,
    ) -> Result<(), SendError>;

    /// Sends to the only peer of an operation (a one-way message or a request to one peer, an
    /// answer) for a caller that may wait: the transport may then wait here, until `deadline`,
    /// for a busy peer to make room instead of queueing the datagram, as a blocking socket
    /// does. It must not wait on its own receiving thread. By default the same as
    /// [`Transport::send`].
    fn send_one(
        &self,
        to: &Self::Peer,
        datagram: &[u8],
        fds: &Self::Fds,
        deadline: Instant,
    ) -> Result<(), SendError> {
        self.send(to, datagram, fds, deadline)
    }

    /// [`Transport::send_one`] of a datagram of kind `kind`. A transport may send it from
    /// another of this process's sockets than the one answers come to, as long as the receiver
    /// still takes it as from this process's own address: always for a one-way message
    /// (nothing answers it), and for a request only to a peer known to map that socket back
    /// (its answers must reach the requester). The Unix transport sends a secondary's
    /// one-way messages, and its requests to a memplane primary, from a socket connected to
    /// the primary, which skips the kernel's path lookup. Datagrams to one peer must stay in
    /// the order they were sent, whichever socket each leaves from. By default
    /// [`Transport::send_one`].
    fn send_one_kind(
        &self,
        to: &Self::Peer,
        kind: MsgKind,
        datagram: &[u8],
        fds: &Self::Fds,
        deadline: Instant,
    ) -> Result<(), SendError> {
        let _ = kind;
        self.send_one(to, datagram, fds, deadline)
    }

    /// Sends one datagram to each of several peers (a broadcast) and reports each result to
    /// `done`, in any order, exactly once per peer. A busy peer must not hold up the others (as
    /// with [`Transport::send`]). By default [`Transport::send`] to each in turn; a transport
    /// that can hand the kernel all of them at once (`sendmmsg`) does.
    fn send_each(
        &self,
        to: &[Self::Peer],
        datagram: &[u8],
        fds: &Self::Fds,
        deadline: Instant,
        done: &mut SendDone<'_, Self::Peer>,
    ) {
        for p in to {
            done(p, self.send(p, datagram, fds, deadline));
        }
    }

    /// Calls `f` with every peer a broadcast goes to: from a primary, each live secondary; from a
    /// secondary, the primary.
    fn for_each_peer(&self, f: &mut dyn FnMut(&Self::Peer)) -> Result<(), SendError>;
}
