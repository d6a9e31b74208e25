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
//! - `jemalloc-installed`: jemalloc as the `#[global_allocator]` of the `jemalloc_pairs` bench
//!   binary (`--jemalloc-bin`), the same loop as `global_pairs`: the like-for-like comparison
//!   with `memplane-global` (both through `std::alloc`, each in a process of its own);
//! - `memplane-heap`: the shared heap directly (`Heap::malloc` / `Heap::free`);
//! - `glibc`: the system allocator; `jemalloc` (`tikv_jemallocator::Jemalloc`) and `mimalloc`
//!   (`mimalloc::MiMalloc`), each called through its `GlobalAlloc` impl, not installed;
//! - `dpdk`: DPDK 22.11's `rte_malloc` / `rte_free` in a DPDK primary with hugepages
//!   (`interop/dpdk_malloc_bench.c`, `--dpdk-bin`);
//! - `control`: no allocator at all, a per-thread stack of blocks (a free pops, an allocation
//!   pushes): the same loop with the least work a thread cache could do. Its two-thread
//!   speedup is what this machine gives the loop, the ceiling for every allocator's.
//!
//! Repetitions: `--reps` (31) short runs of every fast row (`--count` 2,000,000 pairs per thread,
//! about 15 ms), interleaved; the slow rows (the heap directly and DPDK, `--slow-count` pairs)
//! run in the first `--slow-reps` (5) of them only. This VM's speed changes by up to 2x for a
//! second or so at a time (a thread alone sometimes runs a pair in half its usual time, two
//! threads never do), so a figure is the median of many short runs, each ratio against jemalloc
//! is the median of the per-repetition ratios of runs taken a moment apart, and each fast
//! allocator's 1- and 2-thread runs are bracketed by the control's (`common::pairs::bracket`):
//! the two-thread speedup is reported over every bracket and over the brackets in which the
//! machine gave the control loop at least 1.8x. The table shows medians of the nanoseconds per
//! pair (the slowest thread's time / pairs per thread) and of the throughput ratio;
//! `bench=pairs` and `bench=bracket` lines carry every sample.
//!
//! `cargo bench -p memplane-heap --bench alloc_pairs -- [--reps R] [--slow-reps S] [--count N]
//! [--slow-count N] [--global-bin PATH] [--jemalloc-bin PATH] [--dpdk-bin PATH] [--no-huge]
//! [--only A,B] [--threads N]`

mod common;

use std::alloc::System;
use std::collections::BTreeMap;
use std::ptr::{NonNull, null_mut};

use common::pairs::{Alloc, Control, Sample, Via, bracket, line, run};
use common::{Args, MpPrimary, Proc, RunDir, dpdk_cleanup, dpdk_cmd, median, parse_kv};
use memplane_heap::Heap;
use memplane_heap::global::{self, MemplaneAlloc};
use memplane_unix::MpChannel;

const SIZES: [usize; 3] = [16, 64, 256];
/// The two-thread speedup the issue asks for, and the control's that makes a bracket count.
const TARGET_SPEEDUP: f64 = 1.8;
/// Brackets needed before the speedup verdict is given.
const MIN_BRACKETS: usize = 5;

/// The shared heap directly.
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

/// Everything measured.
#[derive(Default)]
struct Results {
    /// The runs, by (allocator, size, threads).
    runs: BTreeMap<(String, usize, usize), Vec<Sample>>,
    /// The brackets, by (allocator, size): (its speedup, the control's).
    brackets: BTreeMap<(String, usize), Vec<(f64, f64)>>,
}

impl Results {
    /// Prints a result line (of this process or of a child) and records it.
    fn take(&mut self, l: &str) {
        let m = parse_kv(l);
        let (imp, size) = match (m.get("impl"), m.get("size")) {
            (Some(i), Some(_)) => (i.clone(), common::field(&m, "size") as usize),
            _ => return,
        };
        match m.get("bench").map(String::as_str) {
            Some("pairs") => {
                let threads = common::field(&m, "threads") as usize;
                let r = Sample {
                    ns: common::field(&m, "ns_per_pair"),
                    mpps: common::field(&m, "mpairs_per_s"),
                };
                self.runs.entry((imp, size, threads)).or_default().push(r);
            }
            Some("bracket") => {
                let b = (
                    common::field(&m, "speedup"),
                    common::field(&m, "control_speedup"),
                );
                self.brackets.entry((imp, size)).or_default().push(b);
            }
            _ => return,
        }
        println!("{l}");
    }

    /// Median ns per pair and Mpairs/s of (imp, size, threads).
    fn median(&self, imp: &str, size: usize, threads: usize) -> Option<Sample> {
        let v = self.runs.get(&(imp.to_owned(), size, threads))?;
        let mut a: Vec<f64> = v.iter().map(|x| x.ns).collect();
        let mut b: Vec<f64> = v.iter().map(|x| x.mpps).collect();
        Some(Sample {
            ns: median(&mut a),
            mpps: median(&mut b),
        })
    }

    fn samples(&self, imp: &str, size: usize, threads: usize) -> &[Sample] {
        self.runs
            .get(&(imp.to_owned(), size, threads))
            .map_or(&[], Vec::as_slice)
    }
}

/// The result lines of `a`'s runs of a size: bracketed by the control's when both thread counts
/// run (`fast`), back to back otherwise (in the order `threads`).
fn pairs<A: Alloc>(
    name: &str,
    a: &A,
    size: usize,
    n: u64,
    threads: &[usize],
    fast: bool,
) -> Vec<String> {
    if fast && threads.len() == 2 {
        return bracket(name, a, size, n, threads[0] == 2);
    }
    threads
        .iter()
        .map(|&t| line(name, size, t, n, run(a, size, t, n)))
        .collect()
}

fn main() {
    let args = Args::get();
    let reps = args.num("--reps", 31) as usize;
    let slow_reps = args.num("--slow-reps", 5) as usize;
    let fast_n = args.num("--count", 2_000_000);
    let slow_n = args.num("--slow-count", 1_000_000);
    let dpdk = common::dpdk_bin(&args);
    let global = args.value("--global-bin");
    let jemalloc_bin = args.value("--jemalloc-bin");
    // `--only A,B` runs these allocators, `--threads N` one thread count (for profiling).
    let only = args.value("--only");
    let want = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|o| o == name))
    };
    let thread_counts: Vec<usize> = match args.value("--threads") {
        Some(t) => vec![t.parse().expect("--threads: a number")],
        None => vec![1, 2],
    };
    let dir = RunDir::new("mpb-pairs");
    let p = MpPrimary::start(&dir.0, args.flag("--no-huge"), true);
    println!(
        "# alloc_pairs: memplane backing {}, page size {} KiB; reps {reps} (heap direct and \
         DPDK: {slow_reps}); {fast_n} pairs per thread (heap direct and DPDK: {slow_n})",
        p.setup.backing,
        p.setup.page_size >> 10
    );
    // The caches serve this process's direct calls from now on (its `#[global_allocator]` stays
    // the system's: only the `memplane-global-direct` rows call `MemplaneAlloc`).
    global::install(p.heap());
    let mut s = Results::default();
    for rep in 0..reps {
        eprintln!("alloc_pairs: rep {}/{reps}", rep + 1);
        // Every other repetition runs the thread counts and the allocators in the opposite
        // order, so that a drift of the machine's speed during a repetition favours none.
        let flip = rep % 2 == 1;
        let mut threads = thread_counts.clone();
        if flip {
            threads.reverse();
        }
        let slow = rep < slow_reps;
        for size in SIZES {
            let mut order = [
                "glibc",
                "jemalloc",
                "mimalloc",
                "memplane-global-direct",
                "memplane-heap",
                "control",
            ];
            if flip {
                order.reverse();
            }
            for name in order.into_iter().filter(|n| want(n)) {
                let t = &threads;
                let lines = match name {
                    "glibc" => pairs(name, &Via(System), size, fast_n, t, true),
                    "jemalloc" => pairs(
                        name,
                        &Via(tikv_jemallocator::Jemalloc),
                        size,
                        fast_n,
                        t,
                        true,
                    ),
                    "mimalloc" => pairs(name, &Via(mimalloc::MiMalloc), size, fast_n, t, true),
                    "memplane-global-direct" => {
                        pairs(name, &Via(MemplaneAlloc), size, fast_n, t, true)
                    }
                    "control" => pairs(name, &Control, size, fast_n, t, false),
                    _ if slow => pairs(name, &Direct(p.heap()), size, slow_n, t, false),
                    _ => continue,
                };
                for l in lines {
                    s.take(&l);
                }
            }
        }
        // The installed allocators, each in a process of its own, in this repetition's order
        // (memplane's and jemalloc's in either order, turn about).
        let mut installed = [&global, &jemalloc_bin];
        if flip {
            installed.reverse();
        }
        for g in installed.into_iter().flatten() {
            let mut c = std::process::Command::new(g);
            c.args(["--reps", "1", "--count", &fast_n.to_string()]);
            match thread_counts[..] {
                [t] => {
                    c.args(["--threads", &t.to_string()]);
                }
                _ if flip => {
                    c.arg("--flip");
                }
                _ => {}
            }
            if args.flag("--no-huge") {
                c.arg("--no-huge");
            }
            let out = c.output().expect("run an installed-allocator bench");
            assert!(out.status.success(), "{g} failed");
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                s.take(l);
            }
        }
        if !slow {
            continue;
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
                    s.take(&l);
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

fn table(s: &Results) {
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
        "jemalloc-installed",
        "mimalloc",
        "dpdk",
        "control",
    ];
    // An installed allocator is compared with jemalloc installed (both through std::alloc),
    // the others with jemalloc called through its GlobalAlloc impl.
    let reference = |imp: &str| {
        if imp == "memplane-global" && s.median("jemalloc-installed", 16, 1).is_some() {
            "jemalloc-installed"
        } else {
            "jemalloc"
        }
    };
    for imp in imps {
        for size in SIZES {
            let (Some(one), two) = (s.median(imp, size, 1), s.median(imp, size, 2)) else {
                continue;
            };
            let je = s.median(reference(imp), size, 1);
            let d1 = s.median("dpdk", size, 1);
            let d2 = s.median("dpdk", size, 2);
            let ratio = |a: f64, b: Option<Sample>| {
                b.map_or("-".to_owned(), |b| format!("{:.2}x", a / b.ns))
            };
            println!(
                "| {imp} | {size} | {:.2} | {} | {} | {} | {} | {} |",
                one.ns,
                two.map_or("-".into(), |t| format!("{:.2}", t.ns)),
                two.map_or("-".into(), |t| format!("{:.2}x", t.mpps / one.mpps)),
                ratio(one.ns, je),
                ratio(one.ns, d1),
                two.map_or("-".into(), |t| ratio(t.ns, d2)),
            );
        }
    }
    if !s.brackets.is_empty() {
        println!();
        println!(
            "## Two-thread speedup, each allocator's runs bracketed by the control's (medians)"
        );
        println!();
        println!(
            "| allocator | size (B) | brackets | speedup | control's speedup | speedup / \
             control's | brackets with control >= {TARGET_SPEEDUP}x | speedup in those |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for imp in imps {
            for size in SIZES {
                let Some(b) = s.brackets.get(&(imp.to_owned(), size)) else {
                    continue;
                };
                let st = BracketStats::of(b);
                println!(
                    "| {imp} | {size} | {} | {:.2}x | {:.2}x | {:.2} | {} | {} |",
                    b.len(),
                    st.all,
                    st.control,
                    st.relative,
                    st.good,
                    st.good_speedup.map_or("-".into(), |x| format!("{x:.2}x"))
                );
            }
        }
    }
    println!();
    // The verdicts use per-repetition ratios: within a repetition jemalloc and memplane run
    // a moment apart, and this VM's speed drifts by up to 2x between moments, more than the
    // difference measured.
    let per_rep = |a: &[Sample], b: &[Sample], f: fn(&Sample, &Sample) -> f64| {
        let mut v: Vec<f64> = a.iter().zip(b).map(|(x, y)| f(x, y)).collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    for size in SIZES {
        for (imp, how) in [
            ("memplane-global-direct", "through GlobalAlloc, as jemalloc"),
            ("memplane-global", "installed, through std::alloc"),
        ] {
            let je_name = reference(imp);
            let (Some(je), Some(g1)) = (s.median(je_name, size, 1), s.median(imp, size, 1)) else {
                continue;
            };
            let ratio = per_rep(
                s.samples(imp, size, 1),
                s.samples(je_name, size, 1),
                |x, y| x.ns / y.ns,
            )
            .unwrap_or(g1.ns / je.ns);
            let speedup = match s.brackets.get(&(imp.to_owned(), size)) {
                Some(b) => {
                    let st = BracketStats::of(b);
                    let verdict = match st.good_speedup {
                        _ if st.good < MIN_BRACKETS => format!(
                            "undecided: the machine gave the control {TARGET_SPEEDUP}x in only {} \
                             brackets",
                            st.good
                        ),
                        Some(x) if x >= TARGET_SPEEDUP => "met".to_owned(),
                        _ => "NOT met".to_owned(),
                    };
                    format!(
                        "2 threads speedup {:.2}x over all {} brackets (the control's {:.2}x, \
                         ratio {:.2}); in the {} brackets where the control scaled >= \
                         {TARGET_SPEEDUP}x: {} -> {verdict} (>= {TARGET_SPEEDUP}x)",
                        st.all,
                        b.len(),
                        st.control,
                        st.relative,
                        st.good,
                        st.good_speedup.map_or("-".into(), |x| format!("{x:.2}x")),
                    )
                }
                None => "2 threads: not bracketed".to_owned(),
            };
            println!(
                "target {size} B: global allocator ({how}) 1 thread {:.2} ns vs {je_name} {:.2} \
                 ns (medians); median per-repetition ratio {ratio:.2}x -> {} (<= 1x jemalloc); \
                 {speedup}",
                g1.ns,
                je.ns,
                if ratio <= 1.0 { "met" } else { "NOT met" },
            );
        }
    }
}

/// Medians of a set of brackets.
struct BracketStats {
    /// The allocator's speedup over every bracket.
    all: f64,
    /// The control's.
    control: f64,
    /// The allocator's speedup / the control's, bracket by bracket.
    relative: f64,
    /// Brackets in which the control scaled at least `TARGET_SPEEDUP`.
    good: usize,
    /// The allocator's speedup in those.
    good_speedup: Option<f64>,
}

impl BracketStats {
    fn of(b: &[(f64, f64)]) -> BracketStats {
        let mut all: Vec<f64> = b.iter().map(|x| x.0).collect();
        let mut control: Vec<f64> = b.iter().map(|x| x.1).collect();
        let mut relative: Vec<f64> = b.iter().map(|x| x.0 / x.1).collect();
        let mut good: Vec<f64> = b
            .iter()
            .filter(|x| x.1 >= TARGET_SPEEDUP)
            .map(|x| x.0)
            .collect();
        BracketStats {
            all: median(&mut all),
            control: median(&mut control),
            relative: median(&mut relative),
            good: good.len(),
            good_speedup: (!good.is_empty()).then(|| median(&mut good)),
        }
    }
}
