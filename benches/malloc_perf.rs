//! DPDK's `malloc_perf_autotest` protocol (app/test/test_malloc_perf.c, described in
//! shared/reference/dpdk-multiprocess.md section 7.5) on memplane's shared heap, next to DPDK
//! 22.11's own run of that test, with the ratios memplane / DPDK.
//!
//! memplane runs as a primary made by `memplane::Config::new().runtime_dir(..)
//! .proc_type(ProcType::Primary)`: with hugepages (memfds, memplane's default when hugepages are
//! free) and with `--no-huge`. For each of the sizes 64 B .. 1 GiB: time allocating up to the
//! maximum number of runs (10000 for malloc and zmalloc, 2559 for memzones; stop at the first
//! failure, runs = successes), time a memset of every block (memzones: estimated from the
//! reference memset speed), time freeing them all; each column is microseconds per operation.
//! A table stops at the first size where nothing could be allocated ("Interrupted: out of
//! memory."), as DPDK's does. Alignment 0 everywhere (each allocator's default: 32 bytes for
//! memplane, 64 for DPDK). Memzones: unique names `test-mz-<hex>`, flags 1GB | SIZE_HINT_ONLY,
//! any node.
//!
//! DPDK: `echo malloc_perf_autotest | dpdk-test -l 0-1 --no-pci --file-prefix=<prefix>`, its
//! tables parsed from its output. With `--reps R` everything runs R times (interleaved) and the
//! combined tables show medians per cell.
//!
//! Both heaps start alike: DPDK's holds EAL's own allocations (156 KB in one 2 MiB page) when
//! its test starts, so memplane's holds a block of that size for the whole run (see
//! `DPDK_START_HELD`); `--empty-start` runs memplane from an empty heap instead.
//!
//! With `--socket-mem MB` both sides start with that much hugepage memory allocated up front
//! and kept (DPDK's `--socket-mem`, memplane's `Config::socket_mem`), so the rows that fit in it
//! grow nothing: the allocators without the kernel's clearing of new pages (`--modes huge`
//! only, as DPDK's run is on hugepages).
//!
//! After each row, the same process measures the kernel's floor for it: the least number of
//! pages the row takes from the kernel whatever the allocator (its blocks' data less what was
//! free in the heap when it started), faulted in on a fresh memfd in steps of one page per
//! thread (the CPUs here, at most memplane's default of 4 populating threads), with no
//! allocator work. A last table sets that floor against each target's line (the target's ratio
//! times DPDK's time): where the floor is above the line, no allocator that hands out memory
//! it has faulted in meets the target here.
//!
//! `cargo bench -p memplane --bench malloc_perf -- [--reps R] [--modes huge,nohuge]
//! [--dpdk-test PATH | --no-dpdk] [--empty-start] [--max-size BYTES] [--socket-mem MB]`;
//! `--max-size` stops memplane's tables after that size (DPDK's test always runs every size),
//! for quick looks at the small rows.

#[path = "../malloc-heap/benches/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::ptr::NonNull;
use std::time::Instant;

use common::{Args, RunDir, dpdk_cleanup, median};
use memplane::heap::ZoneSpec;
use memplane::unix::{MpChannel, ProcType};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;
const SIZES: [usize; 10] = [
    64,
    128,
    KIB,
    4 * KIB,
    64 * KIB,
    MIB,
    2 * MIB,
    4 * MIB,
    16 * MIB,
    GIB,
];
const MAX_RUNS: usize = 10_000;
const MZ_MAX_RUNS: usize = 2559;
/// RTE_MEMZONE_1GB | RTE_MEMZONE_SIZE_HINT_ONLY, as DPDK's test asks.
const MZ_FLAGS: u32 = 0x2 | 0x4;

type Heap = memplane::heap::Heap<MpChannel>;

/// One row: runs, alloc, free, total, memset (us per op); `pages` and `floor` are memplane's
/// only (see [`clearing_floor`]).
#[derive(Clone, Copy, Debug, Default)]
struct Row {
    runs: f64,
    alloc: f64,
    free: f64,
    total: f64,
    memset: f64,
    /// Pages the row must take from the kernel at least.
    pages: f64,
    /// The kernel's time to hand that many fresh pages over, us per operation.
    floor: f64,
}

/// One run of the three tables: (table, size) -> row.
type Tables = BTreeMap<(&'static str, usize), Row>;

const TABLES: [&str; 3] = ["malloc", "zmalloc", "memzone"];

fn us(t: Instant, runs: usize) -> f64 {
    t.elapsed().as_secs_f64() * 1e6 / runs as f64
}

/// Free bytes in the heap (every node).
fn heap_free(h: &Heap) -> u64 {
    h.all_stats().iter().map(|s| s.free).sum()
}

/// The least number of pages a row of `runs` blocks of `size` bytes takes from the kernel,
/// whatever the allocator: the blocks' data alone, less what was free in the heap when the row
/// started, in pages of the memory's smallest size.
fn pages_at_least(h: &Heap, runs: usize, size: usize, free_before: u64) -> u64 {
    let ps = min_page(h);
    ((runs * size) as u64)
        .saturating_sub(free_before)
        .div_ceil(ps)
}

/// [`clearing_floor`] for `pages` pages of the heap's memory, per operation of a row of `runs`
/// (NaN when the pages could not be had).
fn floor_per_op(h: &Heap, pages: u64, runs: usize) -> f64 {
    let huge = h.memory().backing_name() != "no-huge";
    clearing_floor(pages, min_page(h), huge).map_or(f64::NAN, |f| f / runs as f64)
}

fn min_page(h: &Heap) -> u64 {
    h.memory()
        .lists()
        .iter()
        .map(|l| l.page_size)
        .min()
        .unwrap_or(4096)
}

/// The kernel's floor for handing `pages` new pages of `page` bytes to a process: a fresh memfd
/// (hugetlb when `huge`, else ordinary shared memory, as memplane's `--no-huge`) of that size,
/// mapped, and faulted in for writing
/// (`MADV_POPULATE_WRITE`, where the kernel clears each page) in one go, shared out by whole
/// pages between as many threads as memplane may use for a growth (the CPUs here, at most its
/// default of 4): no allocator, no growth in steps. Microseconds, or `None` if the pages
/// cannot be had.
fn clearing_floor(pages: u64, page: u64, huge: bool) -> Option<f64> {
    if pages == 0 {
        return Some(0.0);
    }
    let flags = if huge {
        // MFD_HUGETLB with the page size's log2 in the size bits.
        libc::MFD_CLOEXEC | libc::MFD_HUGETLB | ((page.trailing_zeros()) << 26)
    } else {
        libc::MFD_CLOEXEC
    };
    // SAFETY: a valid C string and flags; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c"mpb-floor".as_ptr(), flags) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created and is owned here only.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let len = pages * page;
    // SAFETY: a plain ftruncate of our own memfd.
    if unsafe { libc::ftruncate(std::os::fd::AsRawFd::as_raw_fd(&fd), len as i64) } != 0 {
        return None;
    }
    // SAFETY: a new shared mapping of our own memfd, chosen by the kernel; unmapped below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cpus.min(4) as u64).min(pages);
    let base = base as usize;
    // In steps of one page a thread, as a heap that keeps growing takes them; the threads wait
    // for each other after each step.
    let step = std::sync::Barrier::new(threads as usize);
    let t = Instant::now();
    let ok = std::thread::scope(|sc| {
        let parts: Vec<_> = (0..threads)
            .map(|k| {
                let step = &step;
                sc.spawn(move || {
                    let mut ok = true;
                    for first in (0..pages).step_by(threads as usize) {
                        let p = first + k;
                        if p < pages {
                            let at = (base + (p * page) as usize) as *mut libc::c_void;
                            // SAFETY: a page of our own mapping above, alive until after the
                            // scope.
                            let r = unsafe {
                                libc::madvise(at, page as usize, libc::MADV_POPULATE_WRITE)
                            };
                            ok &= r == 0;
                        }
                        step.wait();
                    }
                    ok
                })
            })
            .collect();
        parts.into_iter().all(|p| p.join().unwrap_or(false))
    });
    let us = t.elapsed().as_secs_f64() * 1e6;
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(base as *mut _, len as usize) };
    ok.then_some(us)
}

/// DPDK's reference: 20 memsets of 1 GiB; microseconds per GiB.
fn reference_memset(h: &Heap) -> f64 {
    let mut size = GIB;
    let p = loop {
        match h.malloc(size, 0) {
            Ok(p) => break p,
            Err(_) if size > 64 * MIB => size /= 2,
            Err(e) => panic!("reference block: {e}"),
        }
    };
    let t = Instant::now();
    for _ in 0..20 {
        // SAFETY: a live block of `size` bytes.
        unsafe { std::ptr::write_bytes(std::hint::black_box(p.as_ptr()), 0, size) };
    }
    let per_gib = t.elapsed().as_secs_f64() * 1e6 / 20.0 * (GIB as f64 / size as f64);
    h.free(p).expect("free the reference block");
    println!(
        "Reference memset: {:.2} GiB/s ({:.4} us/MiB), 20 memsets of a {} MiB block{}",
        1e6 / per_gib,
        per_gib / 1024.0,
        size / MIB,
        if size < GIB {
            " (1 GiB could not be allocated)"
        } else {
            ""
        }
    );
    per_gib
}

/// What the heap and the memory hold when an allocation failed (not in DPDK's output).
fn oom_note(h: &Heap) -> String {
    let st = h.all_stats();
    let (size, free, largest, regions) = st.iter().fold((0, 0, 0, 0), |a, s| {
        (
            a.0 + s.heap_size,
            a.1 + s.free,
            a.2.max(s.largest_free),
            a.3 + s.regions,
        )
    });
    format!(
        "heap {} MiB in {regions} regions, {} MiB free, largest free block {} MiB; pages in use \
         {} MiB; free hugepages {}",
        size >> 20,
        free >> 20,
        largest >> 20,
        h.memory().total_used() >> 20,
        common::free_hugepages()
    )
}

fn header(name: &str, memset: &str) {
    println!(
        "{name:<18} {:>10} {:>11} {:>11} {:>11} {:>11} {:>15}",
        "Size (B)", "Runs", "Alloc (us)", "Free (us)", "Total (us)", memset
    );
}

fn print_row(size: usize, r: &Row) {
    println!(
        "{:<18} {size:>10} {:>11} {:>11.2} {:>11.2} {:>11.2} {:>15.2}",
        "", r.runs as u64, r.alloc, r.free, r.total, r.memset
    );
}

fn malloc_table(h: &Heap, zero: bool, max: usize, out: &mut Tables) {
    let name = if zero { "zmalloc" } else { "malloc" };
    header(name, "memset (us)");
    let mut ptrs: Vec<NonNull<u8>> = Vec::with_capacity(MAX_RUNS);
    let mut last_err = String::new();
    for size in SIZES.into_iter().filter(|&s| s <= max) {
        ptrs.clear();
        let free_before = heap_free(h);
        let t = Instant::now();
        for _ in 0..MAX_RUNS {
            let r = if zero {
                h.zmalloc(size, 0)
            } else {
                h.malloc(size, 0)
            };
            match r {
                Ok(p) => ptrs.push(p),
                Err(e) => {
                    last_err = e.to_string();
                    break;
                }
            }
        }
        let runs = ptrs.len();
        if runs == 0 {
            println!("Interrupted: out of memory. ({last_err}; {})", oom_note(h));
            break;
        }
        let alloc = us(t, runs);
        let t = Instant::now();
        for p in &ptrs {
            // SAFETY: a live block of `size` bytes.
            unsafe { std::ptr::write_bytes(p.as_ptr(), 0, size) };
        }
        let memset = us(t, runs);
        let t = Instant::now();
        for p in &ptrs {
            h.free(*p).expect("free");
        }
        let free = us(t, runs);
        let pages = pages_at_least(h, runs, size, free_before);
        let r = Row {
            runs: runs as f64,
            alloc,
            free,
            total: alloc + free,
            memset,
            pages: pages as f64,
            floor: floor_per_op(h, pages, runs),
        };
        print_row(size, &r);
        out.insert((name, size), r);
    }
}

fn memzone_table(h: &Heap, us_per_gib: f64, max: usize, out: &mut Tables) {
    header("memzone", "est.memset (us)");
    let mut names: Vec<String> = (0..MZ_MAX_RUNS)
        .map(|_| String::with_capacity(32))
        .collect();
    let mut serial = 0u64;
    let mut last_err = String::new();
    for size in SIZES.into_iter().filter(|&s| s <= max) {
        let free_before = heap_free(h);
        let t = Instant::now();
        let mut runs = 0;
        for n in names.iter_mut() {
            n.clear();
            serial += 1;
            let _ = write!(n, "test-mz-{serial:x}");
            let spec = ZoneSpec {
                len: size as u64,
                flags: MZ_FLAGS,
                ..ZoneSpec::default()
            };
            if let Err(e) = h.memzone_reserve(n, spec) {
                last_err = e.to_string();
                break;
            }
            runs += 1;
        }
        if runs == 0 {
            println!("Interrupted: out of memory. ({last_err}; {})", oom_note(h));
            break;
        }
        let alloc = us(t, runs);
        let t = Instant::now();
        for n in &names[..runs] {
            h.memzone_free(n).expect("memzone_free");
        }
        let free = us(t, runs);
        let r = Row {
            runs: runs as f64,
            alloc,
            free,
            total: alloc + free,
            memset: us_per_gib * size as f64 / GIB as f64,
            pages: 0.0,
            floor: 0.0,
        };
        let pages = pages_at_least(h, runs, size, free_before);
        let r = Row {
            pages: pages as f64,
            floor: floor_per_op(h, pages, runs),
            ..r
        };
        print_row(size, &r);
        out.insert(("memzone", size), r);
    }
}

/// What DPDK 22.11's heap holds when `malloc_perf_autotest` starts: EAL's own allocations,
/// 155,904 bytes in the one 2 MiB page it has grown by then (measured here with
/// `rte_malloc_get_socket_stats` right after `rte_eal_init`: total 2,097,152, free 1,941,248).
/// memplane's heap starts empty, so its first row would grow a cold page that DPDK's does not;
/// holding a block of this size for the whole run starts both heaps alike (`--empty-start`
/// does not).
const DPDK_START_HELD: usize = 155_904;

fn memplane_run(no_huge: bool, held: usize, max: usize, socket_mem: u64) -> (String, Tables) {
    let dir = RunDir::new(if no_huge { "mpb-perf-nh" } else { "mpb-perf" });
    let mut cfg = memplane::Config::new()
        .runtime_dir(&dir.0)
        .proc_type(ProcType::Primary);
    if no_huge {
        cfg = cfg.no_huge();
    }
    if socket_mem > 0 {
        cfg = cfg.socket_mem(vec![socket_mem]);
    }
    let p = cfg.init().expect("memplane primary");
    let mut backing = p
        .setup
        .as_ref()
        .map_or("?".to_owned(), |s| s.backing.to_owned());
    if socket_mem > 0 {
        write!(backing, ", --socket-mem {socket_mem}").unwrap();
    }
    println!("== memplane malloc_perf ({backing})");
    let h = p.heap();
    let per_gib = reference_memset(h);
    let start = (held > 0).then(|| h.malloc(held, 0).expect("the start block"));
    if held > 0 {
        println!(
            "Start: a {held}-byte block held for the whole run (DPDK's heap starts with EAL's \
             allocations of that size in one page; --empty-start to start empty)"
        );
    }
    let mut t = Tables::new();
    malloc_table(h, false, max, &mut t);
    malloc_table(h, true, max, &mut t);
    memzone_table(h, per_gib, max, &mut t);
    if let Some(b) = start {
        h.free(b).expect("free the start block");
    }
    assert_eq!(h.validate(), Ok(()));
    drop(p);
    (backing, t)
}

/// Runs DPDK's own test and parses its three tables (DPDK logs them on stderr, as `USER1:`
/// lines: `Performance: rte_malloc`, then a header and one line of six numbers per size).
fn dpdk_run(bin: &str, socket_mem: u64) -> Option<Tables> {
    let prefix = common::dpdk_prefix("perf");
    let mut c = Command::new(bin);
    c.args(["-l", "0-1", "--no-pci"])
        .arg(format!("--file-prefix={prefix}"));
    if socket_mem > 0 {
        c.arg(format!("--socket-mem={socket_mem}"));
    }
    let mut c = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| eprintln!("malloc_perf: cannot run {bin}: {e}"))
        .ok()?;
    if let Some(mut i) = c.stdin.take() {
        let _ = writeln!(i, "malloc_perf_autotest");
    }
    let out = c.wait_with_output().ok()?;
    dpdk_cleanup(&prefix);
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("== DPDK 22.11 malloc_perf_autotest (dpdk-test)");
    let mut t = Tables::new();
    let mut table = None;
    for l in text.lines() {
        let lt = l
            .trim_start_matches("RTE>>")
            .trim_start_matches("USER1:")
            .trim();
        if let Some(name) = lt.strip_prefix("Performance: ") {
            table = match name.trim() {
                "rte_malloc" => Some("malloc"),
                "rte_zmalloc" => Some("zmalloc"),
                "rte_memzone_reserve" => Some("memzone"),
                _ => None,
            };
            println!("{lt}");
            continue;
        }
        if lt.starts_with("Result") || lt.contains("Size (B)") || lt.contains("Interrupted") {
            println!("{lt}");
        }
        let nums: Vec<f64> = lt
            .split_whitespace()
            .map_while(|w| w.parse().ok())
            .collect();
        if let (Some(tb), 6) = (table, nums.len()) {
            println!("{lt}");
            t.insert(
                (tb, nums[0] as usize),
                Row {
                    runs: nums[1],
                    alloc: nums[2],
                    free: nums[3],
                    total: nums[4],
                    memset: nums[5],
                    ..Row::default()
                },
            );
        }
    }
    if t.is_empty() {
        eprintln!("malloc_perf: no table in dpdk-test's output:\n{text}");
        return None;
    }
    Some(t)
}

fn med(runs: &[Tables], table: &'static str, size: usize) -> Option<Row> {
    let rows: Vec<Row> = runs
        .iter()
        .filter_map(|t| t.get(&(table, size)).copied())
        .collect();
    if rows.is_empty() {
        return None;
    }
    let m = |f: fn(&Row) -> f64| median(&mut rows.iter().map(f).collect::<Vec<_>>());
    Some(Row {
        runs: m(|r| r.runs),
        alloc: m(|r| r.alloc),
        free: m(|r| r.free),
        total: m(|r| r.total),
        memset: m(|r| r.memset),
        pages: m(|r| r.pages),
        floor: m(|r| r.floor),
    })
}

fn combined(label: &str, mp: &[Tables], dpdk: &[Tables]) {
    println!();
    println!(
        "## malloc_perf: memplane ({label}) vs DPDK 22.11 (median of {} memplane / {} DPDK runs; \
         us per operation; ratio = memplane / DPDK)",
        mp.len(),
        dpdk.len()
    );
    for table in TABLES {
        println!();
        println!("### {table}");
        println!();
        println!(
            "| size | runs mp / DPDK | alloc mp | alloc DPDK | free mp | free DPDK | total mp | \
             total DPDK | alloc ratio | free ratio | total ratio | target | |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for size in SIZES {
            let (a, d) = (med(mp, table, size), med(dpdk, table, size));
            let Some(a) = a else {
                if let Some(d) = d {
                    // memplane could not allocate a single block of this size.
                    println!(
                        "| {} | 0 / {} | out of memory | {:.2} | - | {:.2} | - | {:.2} | - | - | - \
                         | {} | NOT met (memplane: Interrupted: out of memory) |",
                        human(size),
                        d.runs,
                        d.alloc,
                        d.free,
                        d.total,
                        if table == "memzone" {
                            "<= 0.1x (alloc)"
                        } else {
                            "<= 0.8x (total)"
                        }
                    );
                }
                continue;
            };
            let r = |x: f64, y: Option<f64>| y.map_or("-".to_owned(), |y| format!("{:.3}", x / y));
            // memzones: the reservation; heap rows: alloc + free.
            let (lim, val) = if table == "memzone" {
                (0.1, d.map(|d| a.alloc / d.alloc))
            } else if size <= 64 * KIB {
                (0.5, d.map(|d| a.total / d.total))
            } else {
                (0.8, d.map(|d| a.total / d.total))
            };
            println!(
                "| {} | {} / {} | {:.2} | {} | {:.2} | {} | {:.2} | {} | {} | {} | {} | <= {lim}x {} | {} |",
                human(size),
                a.runs,
                d.map_or("-".into(), |d| format!("{}", d.runs)),
                a.alloc,
                d.map_or("-".into(), |d| format!("{:.2}", d.alloc)),
                a.free,
                d.map_or("-".into(), |d| format!("{:.2}", d.free)),
                a.total,
                d.map_or("-".into(), |d| format!("{:.2}", d.total)),
                r(a.alloc, d.map(|d| d.alloc)),
                r(a.free, d.map(|d| d.free)),
                r(a.total, d.map(|d| d.total)),
                if table == "memzone" {
                    "(alloc)"
                } else {
                    "(total)"
                },
                match val {
                    Some(v) if v <= lim => "met",
                    Some(_) => "NOT met",
                    None => "-",
                }
            );
        }
    }
}

/// The rows that take new pages from the kernel: the least it needs to hand those pages over
/// (see [`clearing_floor`]) against the target's line. A floor above the line means no
/// allocator that gives out memory it has faulted in could meet the target on this machine in
/// that run; the memplane column is the time the target is judged by.
fn floor_table(mp: &[Tables], dpdk: &[Tables]) {
    println!();
    println!(
        "### The kernel's floor: the least time to clear the pages a row takes (us per operation)"
    );
    println!();
    println!(
        "| table | size | pages at least | kernel floor | line (target x DPDK) | memplane | \
         floor / line | memplane / floor |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for table in TABLES {
        for size in SIZES {
            let Some(a) = med(mp, table, size) else {
                continue;
            };
            if a.pages < 1.0 {
                continue;
            }
            let d = med(dpdk, table, size);
            let (lim, mine, theirs) = if table == "memzone" {
                (0.1, a.alloc, d.map(|d| d.alloc))
            } else if size <= 64 * KIB {
                (0.5, a.total, d.map(|d| d.total))
            } else {
                (0.8, a.total, d.map(|d| d.total))
            };
            let line = theirs.map(|t| t * lim);
            // A floor that could not be measured (the pages could not be had) is NaN.
            let floor = (!a.floor.is_nan()).then_some(a.floor);
            let opt = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
            println!(
                "| {table} | {} | {} | {} | {} | {:.3} | {} | {} |",
                human(size),
                a.pages,
                opt(floor, 3),
                opt(line, 3),
                mine,
                opt(floor.zip(line).map(|(f, l)| f / l), 2),
                opt(floor.map(|f| mine / f), 2),
            );
        }
    }
}

fn human(size: usize) -> String {
    match size {
        s if s >= GIB => format!("{} GiB", s / GIB),
        s if s >= MIB => format!("{} MiB", s / MIB),
        s if s >= KIB => format!("{} KiB", s / KIB),
        s => format!("{s} B"),
    }
}

fn main() {
    let args = Args::get();
    let reps = args.num("--reps", 1);
    let modes = args
        .value("--modes")
        .unwrap_or_else(|| "huge,nohuge".into());
    let dpdk_test = if args.flag("--no-dpdk") {
        None
    } else {
        Some(
            args.value("--dpdk-test")
                .unwrap_or_else(|| "dpdk-test".into()),
        )
    };
    let held = if args.flag("--empty-start") {
        0
    } else {
        DPDK_START_HELD
    };
    let max = args.num("--max-size", u64::MAX) as usize;
    let socket_mem = args.num("--socket-mem", 0);
    let mut huge = Vec::new();
    let mut nohuge = Vec::new();
    let mut huge_label = String::new();
    let mut dpdk = Vec::new();
    for rep in 0..reps {
        eprintln!("malloc_perf: rep {}/{reps}", rep + 1);
        if modes.split(',').any(|m| m == "huge") {
            let (b, t) = memplane_run(false, held, max, socket_mem);
            huge_label = b;
            huge.push(t);
        }
        if modes.split(',').any(|m| m == "nohuge") {
            nohuge.push(memplane_run(true, held, max, 0).1);
        }
        if let Some(d) = &dpdk_test
            && let Some(t) = dpdk_run(d, socket_mem)
        {
            dpdk.push(t);
        }
    }
    if !huge.is_empty() {
        combined(&huge_label, &huge, &dpdk);
        floor_table(&huge, &dpdk);
    }
    if !nohuge.is_empty() {
        combined("no-huge", &nohuge, &dpdk);
        floor_table(&nohuge, &dpdk);
    }
}
