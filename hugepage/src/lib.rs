//! # memplane-hugepage
//!
//! The memory every memplane process shares: hugepage discovery, memory segment lists whose
//! metadata lives in shared memory, pages mapped at the same virtual address in every process,
//! IOVA, memory events and VFIO DMA mapping. The primary owns the map; secondaries follow it when
//! the core's memory transactions tell them to.
//!
//! - [`discover`]: hugetlbfs mounts, page sizes, free/total pages per size and node;
//! - [`options`]: DPDK's memory options (`-m`, `--socket-mem`, `--no-huge`...);
//! - [`shared`]: the shared configuration file (`#[repr(C)]`, versioned, validated on attach);
//! - [`va`]: the address reservation at the same address everywhere, and page mappings in it;
//! - [`backing`]: where pages come from (memfd, hugetlbfs files, plain shared memory);
//! - [`memseg`]: the memseg lists, allocation, free and sync;
//! - [`iova`], [`events`], [`vfio`]: device addresses, memory callbacks, DMA mapping;
//! - [`memory`]: the primary's and secondaries' memory, wired to the core's transactions.

pub mod backing;
pub mod discover;
pub mod error;
pub mod events;
pub mod iova;
pub mod memory;
pub mod memseg;
pub mod options;
pub mod shared;
pub mod va;
pub mod vfio;

pub use error::MemError;
pub use events::MemEvent;
pub use iova::IovaMode;
pub use memory::{AllocSpec, HeapHooks, MemSetup, Memory};
pub use memplane_core::txn::MemRange;
pub use options::{Backing, IovaChoice, MemOptions};
