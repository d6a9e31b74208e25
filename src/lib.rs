//! memplane: DPDK-style multi-process IPC and shared memory for Rust dataplane processes.
//!
//! This facade re-exports the workspace's crates and holds the `memplane` command line:
//! - [`core`] (`memplane-core`): the `no_std` protocol core: wire codec, actions, requests,
//!   memory transactions;
//! - [`unix`] (`memplane-unix`): the channel over Unix datagram sockets, DPDK-compatible.
pub use memplane_core as core;
pub use memplane_unix as unix;

pub mod cli;
