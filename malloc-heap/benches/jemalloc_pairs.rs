//! jemalloc installed as the `#[global_allocator]`: the same allocation + free pairs through
//! `std::alloc::alloc` / `dealloc` as `global_pairs` (memplane's allocator installed), so that
//! the two installed allocators pay the same calls (`__rust_alloc`, `__rust_dealloc`) and are
//! compared like for like. `alloc_pairs` runs this binary (`--jemalloc-bin`) in every repetition.
//!
//! `cargo bench -p memplane-heap --bench jemalloc_pairs -- [--reps R] [--count N]
//! [--sizes 16,64,256] [--threads N] [--flip]`

mod common;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    println!("# jemalloc_pairs: jemalloc installed as the global allocator");
    // Every block comes from jemalloc: nothing else serves this process.
    common::installed::main(&common::Args::get(), "jemalloc-installed", |p| !p.is_null());
}
