//! # memplane-heap
//!
//! An `rte_malloc`-like heap in memplane's shared memory: any process allocates, any process
//! frees, pointers are valid everywhere. It grows through the memory layer's transactions when
//! it runs out and gives whole free pages back when they fall free.
//!
//! - [`tlsf`]: the O(1) allocator over regions, with checked headers;
//! - [`lock`]: a robust, process-shared lock (a dead holder never hangs the others);
//! - [`state`]: the shared heap file (heaps, regions, memzones), versioned and validated;
//! - [`heap`]: `malloc`/`free`/`realloc`, growth and shrink, stats, `validate`, `dump`;
//! - [`memzone`]: named zones, O(1) lookup from any process;
//! - [`boxed`]: `HeapBox`, an owner that frees on drop;
//! - [`global`]: `#[global_allocator]` on the shared heap, with per-thread caches;
//! - `zero`: zero-filling reused blocks (streaming stores for blocks past the last-level cache).

pub mod boxed;
pub mod global;
pub mod heap;
pub mod lock;
pub mod memzone;
pub mod state;
pub mod tlsf;
mod zero;

pub use heap::{AllocError, Heap, HeapStats};
pub use memzone::{Memzone, MemzoneError, ZoneSpec};
pub use tlsf::HeapError;
