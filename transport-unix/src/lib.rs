//! # memplane-unix
//!
//! memplane's multi-process channel over Unix datagram sockets, speaking DPDK's wire format so
//! memplane and DPDK processes can share one deployment.
//!
//! - [`rundir`]: the runtime directory, socket names and the primary's lock, as DPDK names them;
//! - [`socket`]: one datagram socket with `SCM_RIGHTS` fds and `SO_PASSCRED` credentials;
//! - [`transport`]: the core's `Transport` over that socket, with an outbox so that no thread
//!   ever blocks on a busy peer;
//! - [`lane`]: shared-memory lanes for sync requests and messages between memplane
//!   processes;
//! - [`channel`]: the process's channel, its receiving and service threads, and the API
//!   (actions, messages, sync and async requests, replies).
//!
//! The protocol itself (decoding, dispatch, request bookkeeping) is `memplane-core`'s; this
//! crate moves bytes, fds and time.

pub mod channel;
pub mod clock;
pub mod error;
pub mod lane;
pub mod rundir;
pub mod socket;
mod spin;
pub mod transport;

pub use channel::{
    BusyPollStats, Callback, Channel, ChannelConfig, ChannelStats, Handler, Incoming, LaneStats,
    MpChannel, ProcType, Replies, ReplyMsg,
};
pub use error::Error;
pub use socket::{Fds, PeerAddr};
pub use transport::Role;

pub use memplane_core::{Abi, Message, MsgKind};

/// Builds a message with `fds` attached.
pub fn message(name: &str, param: &[u8], fds: Fds) -> Result<Message<Fds>, Error> {
    Ok(Message::new(name, param)?.with_fds(fds)?)
}
