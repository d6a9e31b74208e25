//! The face of a channel that the memory layer and the heap use without knowing about sockets.
//!
//! A [`Channel`] registers actions, answers requests, and sends sync and async requests to given
//! peers. `memplane-unix` implements it over Unix datagram sockets; tests can implement it over
//! anything. Nothing here allocates: closures and reply collections are the implementor's types.

use core::fmt;
use core::hash::Hash;
use core::time::Duration;

use crate::message::{Fds, Message, MsgKind};
use crate::pending::Reply;

/// A message or request as an action receives it.
#[derive(Debug)]
pub struct Incoming<P, F: Fds> {
    /// [`MsgKind::Msg`] or [`MsgKind::Request`].
    pub kind: MsgKind,
    /// The message, with its fds.
    pub msg: Message<F>,
    /// Who sent it: answer there.
    pub from: P,
    /// The sender's process id as the kernel reported it (credentials passed with the
    /// datagram), in the receiver's pid namespace; 0 when the transport cannot tell.
    pub pid: u32,
}

impl<P, F: Fds> Incoming<P, F> {
    /// True for a request, which wants exactly one reply.
    pub fn is_request(&self) -> bool {
        self.kind == MsgKind::Request
    }
}

/// Which side of the deployment a process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The primary.
    Primary,
    /// A secondary.
    Secondary,
}

/// What the memory layer and the heap need from a channel.
pub trait Channel: Send + Sync + Sized + 'static {
    /// How a peer is addressed.
    type Peer: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static;
    /// The fds of a message.
    type Fds: Fds + Send + 'static;
    /// Where replies are collected: iterable as (peer, message).
    type Replies: IntoIterator<Item = (Self::Peer, Message<Self::Fds>)> + Send + 'static;
    /// The channel's error.
    type Error: fmt::Debug + fmt::Display + Send + Sync + 'static;

    /// This process's side.
    fn side(&self) -> Side;

    /// The primary's address (from a secondary; the primary's own from the primary).
    fn primary(&self) -> Self::Peer;

    /// Registers `handler` as the action `name`; it runs on the channel's receiving thread.
    fn register_action<H>(&self, name: &str, handler: H) -> Result<(), Self::Error>
    where
        H: Fn(&Self, Incoming<Self::Peer, Self::Fds>) + Send + Sync + 'static;

    /// Answers a request from `to`.
    fn reply_to(&self, to: &Self::Peer, msg: &Message<Self::Fds>) -> Result<(), Self::Error>;

    /// Sends a request to `peers` and waits for their replies or the timeout. Refused on the
    /// channel's own threads.
    fn request_peers(
        &self,
        peers: &[Self::Peer],
        msg: &Message<Self::Fds>,
        timeout: Duration,
    ) -> Result<Reply<Self::Replies>, Self::Error>;

    /// Sends a request to `peers`; `done` runs exactly once, on a channel thread, with the
    /// replies (also if none could be reached, and at the timeout).
    fn request_peers_async<D>(
        &self,
        peers: &[Self::Peer],
        msg: &Message<Self::Fds>,
        timeout: Duration,
        done: D,
    ) -> Result<(), Self::Error>
    where
        D: FnOnce(&Self, Reply<Self::Replies>) + Send + 'static;

    /// Whether the calling thread is one of the channel's own (where sync requests are refused).
    fn on_channel_thread(&self) -> bool;
}
