//! The global allocator's path: allocation + free pairs through `std::alloc::alloc` /
//! `dealloc` in a program whose `#[global_allocator]` is memplane's `MemplaneAlloc`, installed
//! on the shared heap of a primary (hugepages when free) right after the memory is set up.
//!
//! Same protocol as `alloc_pairs` (which runs this binary and puts its lines in one table):
//! 16, 64 and 256 bytes (alignment 8, so every size is served by the per-thread caches),
//! 16 live blocks per thread, each pair frees the oldest and allocates a new one and writes its
//! first byte; 1 and 2 threads pinned to CPUs 0 and 1. Prints `bench=pairs impl=memplane-global
//! ...` lines, checks afterwards that the blocks were the heap's, and prints how many allocations
//! fell back to the system allocator.
//!
//! `cargo bench -p memplane-heap --bench global_pairs -- [--reps R] [--count N] [--no-huge]
//! [--sizes 16,64,256] [--threads 1,2]`

mod common;

use std::alloc::{Layout, alloc, dealloc};
use std::ptr::null_mut;
use std::sync::Barrier;
use std::time::Instant;

use common::{Args, MpPrimary, RunDir, pin_to_cpu};
use memplane_heap::global::{self, MemplaneAlloc, is_heap_pointer};

#[global_allocator]
static ALLOC: MemplaneAlloc = MemplaneAlloc;

const RING: usize = 16;

fn worker(size: usize, n: u64, start: &Barrier) -> (u64, bool) {
    let l = Layout::from_size_align(size, 8).expect("layout");
    let mut ring = [null_mut::<u8>(); RING];
    let pair = |ring: &mut [*mut u8; RING], i: u64| {
        let k = i as usize % RING;
        // SAFETY: ring[k] was allocated with `l` and is live.
        unsafe { dealloc(ring[k], l) };
        // SAFETY: `l` has a non-zero size.
        let p = std::hint::black_box(unsafe { alloc(l) });
        assert!(!p.is_null(), "allocation failed");
        // SAFETY: a fresh block of at least 1 byte.
        unsafe { p.write_volatile(i as u8) };
        ring[k] = p;
    };
    for r in ring.iter_mut() {
        // SAFETY: `l` has a non-zero size.
        *r = unsafe { alloc(l) };
        assert!(!r.is_null(), "allocation failed");
    }
    for i in 0..n / 10 {
        pair(&mut ring, i);
    }
    start.wait();
    let t0 = Instant::now();
    for i in 0..n {
        pair(&mut ring, i);
    }
    let ns = t0.elapsed().as_nanos() as u64;
    let on_heap = ring.iter().all(|&p| is_heap_pointer(p));
    for p in ring {
        // SAFETY: live blocks allocated with `l`.
        unsafe { dealloc(p, l) };
    }
    (ns, on_heap)
}

fn list(args: &Args, name: &str, default: &str) -> Vec<usize> {
    args.value(name)
        .unwrap_or_else(|| default.to_owned())
        .split(',')
        .map(|x| x.parse().expect("a number"))
        .collect()
}

fn main() {
    let args = Args::get();
    let reps = args.num("--reps", 3);
    let n = args.num("--count", 10_000_000);
    let sizes = list(&args, "--sizes", "16,64,256");
    let threads_list = list(&args, "--threads", "1,2");
    let dir = RunDir::new("mpb-global");
    let p = MpPrimary::start(&dir.0, args.flag("--no-huge"), true);
    global::install(p.heap());
    println!(
        "# global_pairs: memplane backing {}, global allocator installed",
        p.setup.backing
    );
    for rep in 0..reps {
        // A size's 1- and 2-thread runs back to back, in either order turn about (see
        // `alloc_pairs`: the speedup divides two figures taken a moment apart).
        let mut threads_order = threads_list.clone();
        if rep % 2 == 1 {
            threads_order.reverse();
        }
        for &size in &sizes {
            for &threads in &threads_order {
                let start = Barrier::new(threads);
                let r: Vec<(u64, bool)> = std::thread::scope(|s| {
                    let hs: Vec<_> = (0..threads)
                        .map(|t| {
                            let start = &start;
                            s.spawn(move || {
                                pin_to_cpu(t);
                                worker(size, n, start)
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().expect("worker")).collect()
                });
                assert!(r.iter().all(|x| x.1), "blocks not from the shared heap");
                let slowest = r.iter().map(|x| x.0).max().expect("a thread") as f64;
                println!(
                    "bench=pairs impl=memplane-global size={size} threads={threads} n={n} \
                     ns_per_pair={:.2} mpairs_per_s={:.3}",
                    slowest / n as f64,
                    threads as f64 * n as f64 / (slowest / 1e9) / 1e6
                );
            }
        }
    }
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
