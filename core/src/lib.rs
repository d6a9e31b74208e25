//! # memplane-core
//!
//! The transport-agnostic heart of memplane's multi-process channel. It is `#![no_std]`, uses no
//! allocator and performs no IO: it never touches a socket, a clock or a thread. Transports and
//! memory backends drive it and execute what it decides.
//!
//! What lives here:
//! - [`message`]: the message model (name, parameter blob, attached fds) and its validation;
//! - [`wire`]: the exact datagram layouts of DPDK's multi-process channel for the 22.11, 24.11 and
//!   25.11+ ABIs, with a strict decoder;
//! - [`registry`]: named actions with O(1) lookup and a fixed capacity;
//! - [`pending`]: the table of requests waiting for replies (sync and async, counted the way
//!   DPDK's `rte_mp_reply` counts them), and [`tracker`], its thread-safe face with pluggable
//!   waiting;
//! - [`transport`] and [`endpoint`]: the trait a transport implements and the endpoint logic that
//!   turns received datagrams into dispatch decisions and requests into sends;
//! - [`txn`]: the memory transactions (grow and shrink through the primary) as sans-IO state
//!   machines with their own payload codec.
//!
//! Time is always a parameter ([`Instant`]); fds are an opaque associated type counted by the
//! [`Fds`] trait; locks are `lock_api` mutexes whose raw lock the host chooses (a spin lock by
//! default, `parking_lot` in the std transport, loom's under `cfg(loom)`).
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod channel;
pub mod endpoint;
pub mod limits;
pub mod message;
pub mod name;
pub mod pending;
pub mod registry;
pub mod stats;
pub mod sync;
pub mod time;
pub mod tracker;
pub mod transport;
pub mod txn;
pub mod wire;

pub use endpoint::{Dispatch, Endpoint, EndpointError};
pub use message::{Fds, Message, MessageError, MsgKind, NoFds, Param};
pub use name::Name;
pub use pending::{PendingError, Reply, RequestId};
pub use registry::{ActionRegistry, RegistryError};
pub use time::Instant;
pub use transport::{SendError, Transport};
pub use wire::{Abi, DecodeError, EncodeError};
