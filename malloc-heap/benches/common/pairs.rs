//! The allocation + free pair loop shared by `alloc_pairs` and the installed-allocator binaries
//! (`global_pairs`, `jemalloc_pairs`), and the bracket that judges a two-thread speedup.
//!
//! A pair frees the oldest of 16 live blocks and allocates a new one, then writes its first
//! byte. Thread *t* is pinned to CPU *t*. ns per pair = the slowest thread's time / pairs per
//! thread; the throughput is threads x pairs / that time.
//!
//! The bracket: this VM's speed changes for a second or so at a time, and in some of those
//! moments one thread alone runs up to twice as fast as either of two threads (a loop that
//! allocates nothing at all then scales 1.0-1.5x; measured in docs/heap-benchmark.md, section
//! 2). So an allocator's 1- and 2-thread runs are taken back to back, between the two runs of
//! the no-allocator control loop (`Control`), and a `bench=bracket` line reports both speedups:
//! what the allocator got, and what the machine gave the loop in that moment.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::null_mut;
use std::sync::Barrier;
use std::time::Instant;

use super::pin_to_cpu;

/// Live blocks per thread.
pub const RING: usize = 16;

/// One allocator under test.
pub trait Alloc: Sync {
    fn alloc(&self, size: usize) -> *mut u8;
    /// # Safety
    /// `p` came from `alloc(size)` of this allocator and is live.
    unsafe fn free(&self, p: *mut u8, size: usize);
    /// Whether `p` (live, from `alloc`) was served by the allocator under test (and not by a
    /// fallback): checked on the blocks live at the end of every run.
    fn owns(&self, _p: *const u8) -> bool {
        true
    }
}

/// An allocator called through its `GlobalAlloc` impl (alignment 8).
pub struct Via<A: GlobalAlloc + Sync>(pub A);

impl<A: GlobalAlloc + Sync> Alloc for Via<A> {
    #[inline]
    fn alloc(&self, size: usize) -> *mut u8 {
        // SAFETY: a non-zero size with alignment 8 is a valid layout.
        unsafe { self.0.alloc(Layout::from_size_align_unchecked(size, 8)) }
    }
    #[inline]
    unsafe fn free(&self, p: *mut u8, size: usize) {
        // SAFETY: caller's guarantee: allocated here with this layout.
        unsafe {
            self.0
                .dealloc(p, Layout::from_size_align_unchecked(size, 8))
        }
    }
}

/// The process's `#[global_allocator]`, through `std::alloc::alloc` / `dealloc` (alignment 8),
/// as any Rust program calls it; `owns` tells its blocks from a fallback's.
pub struct Installed(pub fn(*const u8) -> bool);

impl Alloc for Installed {
    #[inline]
    fn alloc(&self, size: usize) -> *mut u8 {
        // SAFETY: a non-zero size with alignment 8 is a valid layout.
        unsafe { std::alloc::alloc(Layout::from_size_align_unchecked(size, 8)) }
    }
    #[inline]
    unsafe fn free(&self, p: *mut u8, size: usize) {
        // SAFETY: caller's guarantee: allocated here with this layout.
        unsafe { std::alloc::dealloc(p, Layout::from_size_align_unchecked(size, 8)) }
    }
    fn owns(&self, p: *const u8) -> bool {
        (self.0)(p)
    }
}

/// The control: each thread keeps its freed blocks on a stack of its own and takes them back
/// from it; the blocks themselves come from the system allocator once, at the start of the
/// loop, and stay on the stack at the end (a few KiB per thread, for the whole run). The same
/// loop with the least work a thread cache could do: its two-thread speedup is what the machine
/// gives the loop, the ceiling for every allocator's.
pub struct Control;

thread_local! {
    static STACK: std::cell::RefCell<Vec<*mut u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Alloc for Control {
    #[inline]
    fn alloc(&self, size: usize) -> *mut u8 {
        STACK.with_borrow_mut(|s| s.pop()).unwrap_or_else(|| {
            // SAFETY: a non-zero size with alignment 8 is a valid layout.
            unsafe { System.alloc(Layout::from_size_align_unchecked(size.max(256), 8)) }
        })
    }
    #[inline]
    unsafe fn free(&self, p: *mut u8, _size: usize) {
        STACK.with_borrow_mut(|s| s.push(p));
    }
}

/// One thread's loop: returns the nanoseconds of `n` measured pairs.
fn worker<A: Alloc>(a: &A, size: usize, n: u64, start: &Barrier) -> u64 {
    let mut ring = [null_mut::<u8>(); RING];
    let pair = |ring: &mut [*mut u8; RING], i: u64| {
        let k = i as usize % RING;
        // SAFETY: ring[k] is a live block of `size` bytes from `a`.
        unsafe { a.free(ring[k], size) };
        let p = std::hint::black_box(a.alloc(size));
        assert!(!p.is_null(), "allocation failed");
        // SAFETY: a fresh block of at least 1 byte.
        unsafe { p.write_volatile(i as u8) };
        ring[k] = p;
    };
    for r in ring.iter_mut() {
        *r = a.alloc(size);
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
    assert!(
        ring.iter().all(|&p| a.owns(p)),
        "blocks not from the allocator under test"
    );
    for p in ring {
        // SAFETY: live blocks of `size` bytes from `a`.
        unsafe { a.free(p, size) };
    }
    ns
}

/// One run: ns per pair and million pairs per second.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub ns: f64,
    pub mpps: f64,
}

/// Runs `threads` workers (thread t pinned to CPU t), `n` pairs each.
pub fn run<A: Alloc>(a: &A, size: usize, threads: usize, n: u64) -> Sample {
    let start = Barrier::new(threads);
    let times: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let start = &start;
                s.spawn(move || {
                    pin_to_cpu(t);
                    worker(a, size, n, start)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("worker")).collect()
    });
    let slowest = *times.iter().max().expect("a thread") as f64;
    Sample {
        ns: slowest / n as f64,
        mpps: threads as f64 * n as f64 / (slowest / 1e9) / 1e6,
    }
}

/// The result line of one run.
pub fn line(name: &str, size: usize, threads: usize, n: u64, r: Sample) -> String {
    format!(
        "bench=pairs impl={name} size={size} threads={threads} n={n} ns_per_pair={:.2} \
         mpairs_per_s={:.3}",
        r.ns, r.mpps
    )
}

/// Runs `a`'s 1- and 2-thread pairs back to back between the control's (control 1, `a` 1,
/// `a` 2, control 2; the other way round when `flip`), `n` pairs per thread each, and returns
/// the result lines: `a`'s two runs and a `bench=bracket` line with both speedups.
pub fn bracket<A: Alloc>(name: &str, a: &A, size: usize, n: u64, flip: bool) -> Vec<String> {
    let order: [usize; 2] = if flip { [2, 1] } else { [1, 2] };
    let mut ctl = [None; 3];
    let mut own = [None; 3];
    ctl[order[0]] = Some(run(&Control, size, order[0], n));
    for t in order {
        own[t] = Some(run(a, size, t, n));
    }
    ctl[order[1]] = Some(run(&Control, size, order[1], n));
    let [_, Some(a1), Some(a2)] = own else {
        unreachable!("both runs done")
    };
    let [_, Some(c1), Some(c2)] = ctl else {
        unreachable!("both runs done")
    };
    vec![
        line(name, size, 1, n, a1),
        line(name, size, 2, n, a2),
        format!(
            "bench=bracket impl={name} size={size} n={n} speedup={:.3} control_speedup={:.3}",
            a2.mpps / a1.mpps,
            c2.mpps / c1.mpps
        ),
    ]
}
