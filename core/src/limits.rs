//! The protocol's hard limits, in one place.
//!
//! The first three are fixed by DPDK's wire format and shared by every ABI; the fd limits differ
//! per ABI (see [`crate::wire::Abi::max_fds`]). The capacities are memplane's defaults for the
//! fixed-size tables; every table type takes its capacity as a const generic.

/// Size of the name field on the wire, including the terminating NUL.
pub const NAME_FIELD_LEN: usize = 64;
/// Longest valid action name, in bytes (the field minus its NUL).
pub const MAX_NAME_LEN: usize = NAME_FIELD_LEN - 1;
/// Largest parameter blob, in bytes.
pub const MAX_PARAM_LEN: usize = 256;
/// Most fds one message can carry on any ABI: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS: usize = 253;
/// Most fds one message can carry on the 22.11 ABI.
pub const MAX_FDS_22_11: usize = 8;

/// Default capacity of an action registry (a power of two).
pub const DEFAULT_ACTIONS: usize = 64;
/// Default number of requests that may wait for replies at once.
pub const DEFAULT_REQUESTS: usize = 1024;
/// Default number of (request, peer) slots: each request to n peers takes n slots.
pub const DEFAULT_SLOTS: usize = 4096;
/// Most peers one broadcast addresses (the primary plus its secondaries never need more).
pub const MAX_PEERS: usize = 256;
