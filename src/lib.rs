//! memplane: DPDK-style multi-process IPC and shared memory for Rust dataplane processes.
//!
//! This facade re-exports the workspace's crates and holds the `memplane` command line:
//! - [`core`] (`memplane-core`): the `no_std` protocol core: wire codec, actions, requests,
//!   memory transactions;
//! - [`unix`] (`memplane-unix`): the channel over Unix datagram sockets, DPDK-compatible;
//! - [`hugepage`] (`memplane-hugepage`): shared memory at the same address in every process;
//! - [`Config`] and [`init`]: a process from EAL-style options.
pub use memplane_core as core;
pub use memplane_heap as heap;
pub use memplane_hugepage as hugepage;
pub use memplane_unix as unix;

pub mod cli;
mod config;

pub use config::{Config, InitError, Process, init};
