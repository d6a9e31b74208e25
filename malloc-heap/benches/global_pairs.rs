//! The global allocator's path: allocation + free pairs through `std::alloc::alloc` /
//! `dealloc` in a program whose `#[global_allocator]` is memplane's `MemplaneAlloc`, installed
//! on the shared heap of a primary (hugepages when free) right after the memory is set up.
//!
//! Same protocol as `alloc_pairs`, which runs this binary and puts its lines in one table (the
//! loop is `common::installed`'s, shared with `jemalloc_pairs`): 16, 64 and 256 bytes (alignment
//! 8, so every size is served by the per-thread caches). Prints `bench=pairs
//! impl=memplane-global ...` lines, checks afterwards that the blocks were the heap's, and prints
//! how many allocations fell back to the system allocator.
//!
//! `cargo bench -p memplane-heap --bench global_pairs -- [--reps R] [--count N] [--no-huge]
//! [--sizes 16,64,256] [--threads N] [--flip]`

mod common;

use common::{Args, MpPrimary, RunDir};
use memplane_heap::global::{self, MemplaneAlloc, is_heap_pointer};

#[global_allocator]
static ALLOC: MemplaneAlloc = MemplaneAlloc;

fn main() {
    let args = Args::get();
    let dir = RunDir::new("mpb-global");
    let p = MpPrimary::start(&dir.0, args.flag("--no-huge"), true);
    global::install(p.heap());
    println!(
        "# global_pairs: memplane backing {}, global allocator installed",
        p.setup.backing
    );
    common::installed::main(&args, "memplane-global", is_heap_pointer);
    let st = global::stats();
    println!(
        "# global allocator: fallbacks {} errors {}",
        st.fallbacks, st.errors
    );
    global::uninstall();
    // Objects the heap handed out may still be referenced by the channel's threads: leave the
    // mappings alone and exit (the memfds go with the process), removing the runtime directory.
    drop(dir);
    std::mem::forget(p);
    std::process::exit(0);
}
