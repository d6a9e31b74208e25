//! Allocation + free pairs of 16, 64 and 256 bytes, with a working set of 16 live blocks per
//! thread (each pair frees the oldest block and allocates a new one, then writes its first
//! byte), on 1 and 2 threads (pinned to CPUs 0 and 1, as DPDK's lcores `-l 0-1`), for:
//!
//! - `memplane-global`: memplane's global allocator (`MemplaneAlloc` installed as the
//!   `#[global_allocator]` of the `global_pairs` bench binary, which this one runs: `--global-bin`);
//!   every call goes through `std::alloc::alloc` / `dealloc`, which since Rust 1.88 also make an
//!   indirect call to the empty `__rust_no_alloc_shim_is_unstable_v2` per allocation;
//! - `memplane-global-direct`: the same allocator (installed on this process's heap with
//!   `global::install`, its thread caches and all) called through its `GlobalAlloc` impl, as the
//!   jemalloc and mimalloc rows are: the like-for-like comparison with them;
//! - `memplane-heap`: the shared heap directly (`Heap::malloc` / `Heap::free`);
//! - `glibc`: the system allocator; `jemalloc` (`tikv_jemallocator::Jemalloc`) and `mimalloc`
//!   (`mimalloc::MiMalloc`), each called through its `GlobalAlloc` impl, not installed;
//! - `dpdk`: DPDK 22.11's `rte_malloc` / `rte_free` in a DPDK primary with hugepages
//!   (`interop/dpdk_malloc_bench.c`, `--dpdk-bin`);
//! - `control`: no allocator at all, a per-thread stack of blocks (a free pops, an allocation
//!   pushes): the same loop with the least work a thread cache could do. Its two-thread
//!   speedup is what this machine gives the loop, the ceiling for every allocator's.
//!
//! Every implementation runs `--reps` times (interleaved); the table shows medians of the
//! nanoseconds per pair (the slowest thread's time / pairs per thread) and of the two-thread
//! speedup in throughput. `bench=pairs ...` lines carry every sample.
//!
//! `cargo bench -p memplane-heap --bench alloc_pairs -- [--reps R] [--global-bin PATH]
//! [--dpdk-bin PATH] [--no-huge] [--only NAME] [--threads N]`

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::ptr::{NonNull, null_mut};
use std::sync::Barrier;
use std::time::Instant;

use common::{Args, MpPrimary, Proc, RunDir, dpdk_cleanup, dpdk_cmd, median, parse_kv, pin_to_cpu};
use memplane_heap::Heap;
use memplane_heap::global::{self, MemplaneAlloc};
use memplane_unix::MpChannel;

const RING: usize = 16;
const SIZES: [usize; 3] = [16, 64, 256];

/// One allocator under test.
trait Alloc: Sync {
    fn alloc(&self, size: usize) -> *mut u8;
    /// # Safety
    /// `p` came from `alloc(size)` of this allocator and is live.
    unsafe fn free(&self, p: *mut u8, size: usize);
}

struct Via<A: GlobalAlloc + Sync>(A);

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

struct Direct<'a>(&'a Heap<MpChannel>);

impl Alloc for Direct<'_> {
    #[inline]
    fn alloc(&self, size: usize) -> *mut u8 {
        self.0.malloc(size, 8).map_or(null_mut(), |p| p.as_ptr())
    }
    #[inline]
    unsafe fn free(&self, p: *mut u8, _size: usize) {
        if let Some(p) = NonNull::new(p) {
            self.0.free(p).expect("heap free");
        }
    }
}

/// The control: each thread keeps its freed blocks on a stack of its own and takes them back
/// from it; the blocks themselves come from the system allocator once, at the start of the
/// loop, and stay on the stack at the end (a few KiB per thread, for the whole run).
struct Control;

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
    for p in ring {
        // SAFETY: live blocks of `size` bytes from `a`.
        unsafe { a.free(p, size) };
    }
    ns
}

/// Runs `threads` workers (thread t pinned to CPU t); returns (ns per pair of the slowest
/// thread, million pairs per second in total).
fn run<A: Alloc>(a: &A, size: usize, threads: usize, n: u64) -> (f64, f64) {
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
    (
        slowest / n as f64,
        threads as f64 * n as f64 / (slowest / 1e9) / 1e6,
    )
}

type Samples = BTreeMap<(String, usize, usize), Vec<(f64, f64)>>;

fn record(s: &mut Samples, imp: &str, size: usize, threads: usize, n: u64, r: (f64, f64)) {
    println!(
        "bench=pairs impl={imp} size={size} threads={threads} n={n} ns_per_pair={:.2} \
         mpairs_per_s={:.3}",
        r.0, r.1
    );
    s.entry((imp.to_owned(), size, threads))
        .or_default()
        .push(r);
}

fn collect(s: &mut Samples, line: &str) {
    let m = parse_kv(line);
    if m.get("bench").map(String::as_str) != Some("pairs") {
        return;
    }
    let imp = m["impl"].clone();
    let size = common::field(&m, "size") as usize;
    let threads = common::field(&m, "threads") as usize;
    let n = common::field(&m, "n") as u64;
    let r = (
        common::field(&m, "ns_per_pair"),
        common::field(&m, "mpairs_per_s"),
    );
    record(s, &imp, size, threads, n, r);
}

fn main() {
    let args = Args::get();
    let reps = args.num("--reps", 5) as usize;
    let fast_n = args.num("--count", 10_000_000);
    let slow_n = args.num("--slow-count", 1_000_000);
    let dpdk = common::dpdk_bin(&args);
    let global = args.value("--global-bin");
    // `--only NAME` runs one allocator, `--threads N` one thread count (for profiling).
    let only = args.value("--only");
    let want = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let thread_counts: Vec<usize> = match args.value("--threads") {
        Some(t) => vec![t.parse().expect("--threads: a number")],
        None => vec![1, 2],
    };
    let dir = RunDir::new("mpb-pairs");
    let p = MpPrimary::start(&dir.0, args.flag("--no-huge"), true);
    println!(
        "# alloc_pairs: memplane backing {}, page size {} KiB; reps {reps}; {fast_n} pairs per \
         thread (heap direct and DPDK: {slow_n})",
        p.setup.backing,
        p.setup.page_size >> 10
    );
    // The caches serve this process's direct calls from now on (its `#[global_allocator]` stays
    // the system's: only the `memplane-global-direct` rows call `MemplaneAlloc`).
    global::install(p.heap());
    let mut s = Samples::new();
    for rep in 0..reps {
        eprintln!("alloc_pairs: rep {}/{reps}", rep + 1);
        // One allocator's 1- and 2-thread runs of a size are back to back (in either order,
        // turn about): the speedup divides two figures taken a moment apart. This VM's speed
        // shifts by a third for seconds at a time; all 1-thread runs first, then all 2-thread
        // ones, put seconds between the two halves of each speedup.
        let mut threads_order = thread_counts.clone();
        if rep % 2 == 1 {
            threads_order.reverse();
        }
        for size in SIZES {
            // Every other repetition runs the allocators in the opposite order, so that a
            // drift of the machine's speed during a repetition favours none of them.
            let mut order = [
                "glibc",
                "jemalloc",
                "mimalloc",
                "memplane-global-direct",
                "memplane-heap",
                "control",
            ];
            if rep % 2 == 1 {
                order.reverse();
            }
            for name in order.into_iter().filter(|n| want(n)) {
                for &threads in &threads_order {
                    let (n, r) = match name {
                        "glibc" => (fast_n, run(&Via(System), size, threads, fast_n)),
                        "jemalloc" => (
                            fast_n,
                            run(&Via(tikv_jemallocator::Jemalloc), size, threads, fast_n),
                        ),
                        "mimalloc" => {
                            (fast_n, run(&Via(mimalloc::MiMalloc), size, threads, fast_n))
                        }
                        "memplane-global-direct" => {
                            (fast_n, run(&Via(MemplaneAlloc), size, threads, fast_n))
                        }
                        "control" => (fast_n, run(&Control, size, threads, fast_n)),
                        _ => (slow_n, run(&Direct(p.heap()), size, threads, slow_n)),
                    };
                    record(&mut s, name, size, threads, n, r);
                }
            }
        }
        if let Some(g) = &global {
            let mut c = std::process::Command::new(g);
            // In this repetition's order of thread counts.
            let order: Vec<String> = threads_order.iter().map(usize::to_string).collect();
            c.args(["--reps", "1", "--count", &fast_n.to_string()]);
            c.args(["--threads", &order.join(",")]);
            if args.flag("--no-huge") {
                c.arg("--no-huge");
            }
            let out = c.output().expect("run global_pairs");
            assert!(out.status.success(), "global_pairs failed");
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                collect(&mut s, l);
            }
        }
        if let Some(bin) = &dpdk {
            let prefix = common::dpdk_prefix("pairs");
            for threads in ["1", "2"] {
                for size in SIZES {
                    let size = size.to_string();
                    let count = slow_n.to_string();
                    let mode = [
                        "pairs",
                        "--size",
                        &size,
                        "--threads",
                        threads,
                        "--count",
                        &count,
                        "--reps",
                        "1",
                    ];
                    let mut d = Proc::start(dpdk_cmd(bin, &prefix, false, &mode), "dpdk pairs");
                    let l = d.expect("bench=pairs", 120);
                    collect(&mut s, &l);
                    d.finish(10);
                    dpdk_cleanup(&prefix);
                }
            }
        }
    }
    // The workers' caches went back to the heap when their threads ended.
    global::uninstall();
    drop(p);
    table(&s);
}

fn table(s: &Samples) {
    let m = |imp: &str, size: usize, threads: usize| -> Option<(f64, f64)> {
        let v = s.get(&(imp.to_owned(), size, threads))?;
        let mut a: Vec<f64> = v.iter().map(|x| x.0).collect();
        let mut b: Vec<f64> = v.iter().map(|x| x.1).collect();
        Some((median(&mut a), median(&mut b)))
    };
    println!();
    println!("## Allocation + free pairs (median ns per pair; working set 16 blocks per thread)");
    println!();
    println!(
        "| allocator | size (B) | 1 thread (ns) | 2 threads (ns, per thread) | 2-thread speedup | \
         vs jemalloc (1 thr) | vs DPDK (1 thr) | vs DPDK (2 thr) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let imps = [
        "memplane-global",
        "memplane-global-direct",
        "memplane-heap",
        "glibc",
        "jemalloc",
        "mimalloc",
        "dpdk",
        "control",
    ];
    for imp in imps {
        for size in SIZES {
            let (Some(one), two) = (m(imp, size, 1), m(imp, size, 2)) else {
                continue;
            };
            let je = m("jemalloc", size, 1);
            let d1 = m("dpdk", size, 1);
            let d2 = m("dpdk", size, 2);
            let ratio = |a: f64, b: Option<(f64, f64)>| {
                b.map_or("-".to_owned(), |b| format!("{:.2}x", a / b.0))
            };
            println!(
                "| {imp} | {size} | {:.2} | {} | {} | {} | {} | {} |",
                one.0,
                two.map_or("-".into(), |t| format!("{:.2}", t.0)),
                two.map_or("-".into(), |t| format!("{:.2}x", t.1 / one.1)),
                ratio(one.0, je),
                ratio(one.0, d1),
                two.map_or("-".into(), |t| ratio(t.0, d2)),
            );
        }
    }
    println!();
    // The verdicts use per-repetition ratios: within a repetition jemalloc and memplane run
    // a moment apart, and this VM's speed drifts by up to 1.6x between moments (both
    // allocators' pairs go from ~5.5 to ~9 ns and back), more than the difference measured.
    let per_rep = |a: &[(f64, f64)], b: &[(f64, f64)], f: fn(&(f64, f64), &(f64, f64)) -> f64| {
        let mut v: Vec<f64> = a.iter().zip(b).map(|(x, y)| f(x, y)).collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    for size in SIZES {
        let Some(je) = m("jemalloc", size, 1) else {
            continue;
        };
        let je_s = s
            .get(&("jemalloc".to_owned(), size, 1))
            .cloned()
            .unwrap_or_default();
        for (imp, how) in [
            ("memplane-global-direct", "through GlobalAlloc, as jemalloc"),
            ("memplane-global", "installed, through std::alloc"),
        ] {
            let Some(g1) = m(imp, size, 1) else { continue };
            let one = s
                .get(&(imp.to_owned(), size, 1))
                .cloned()
                .unwrap_or_default();
            let two = s
                .get(&(imp.to_owned(), size, 2))
                .cloned()
                .unwrap_or_default();
            let ratio = per_rep(&one, &je_s, |x, y| x.0 / y.0).unwrap_or(g1.0 / je.0);
            let speedup = per_rep(&two, &one, |x, y| x.1 / y.1);
            println!(
                "target {size} B: global allocator ({how}) 1 thread {:.2} ns vs jemalloc {:.2} ns \
                 (medians); median per-repetition ratio {:.2}x -> {} (<= 1x jemalloc); 2 threads \
                 speedup (median per repetition) {} -> {} (>= 1.8x)",
                g1.0,
                je.0,
                ratio,
                if ratio <= 1.0 { "met" } else { "NOT met" },
                speedup.map_or("-".into(), |t| format!("{t:.2}x")),
                match speedup {
                    Some(t) if t >= 1.8 => "met",
                    Some(_) => "NOT met",
                    None => "-",
                }
            );
        }
    }
}
