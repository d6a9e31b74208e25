//! memplane: DPDK-style multi-process IPC and shared memory for Rust dataplane processes.
//!
//! This facade re-exports the workspace's crates; see the README for the map.
pub use memplane_core as core;
