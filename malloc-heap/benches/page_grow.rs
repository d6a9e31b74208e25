//! Issue 4: allocating and publishing one 2 MiB page, and freeing it, in the primary (0, 1 and 3
//! secondaries attached) and from a secondary (0 and 3 other secondaries), against the kernel's
//! floor and against DPDK 22.11's heap growth and shrink.
//!
//! Each round times one growth and one free, alone:
//! - `memplane-mem`: `Memory::alloc` of 2 MiB and `Memory::free` of that range (the memory
//!   layer; no heap, so publishing is the transaction's own: mapped in every attached process
//!   before the answer);
//! - `memplane-heap`: `Heap::malloc(1 MiB)` on an empty heap (it must grow by exactly one page:
//!   `Memory::alloc`, then the page joins the heap) and `Heap::free` (the page falls free and
//!   goes back through `Memory::free`) -- the same operation as DPDK's row;
//! - `dpdk`: `rte_malloc(1 MiB)` with no free block that size (the heap grows by exactly one
//!   2 MB page) and `rte_free` (it shrinks by that page), `interop/dpdk_malloc_bench.c grow`;
//! - `floor`: `memfd_create(MFD_HUGETLB)` + `ftruncate(2 MiB)` + `mmap` + first touch, and
//!   `munmap` + `close`; `floor-fd`: the same on one long-lived hugetlb memfd (mmap at an offset +
//!   touch, `munmap` + `fallocate(PUNCH_HOLE)`), which is what memplane's memfd backing does.
//!
//! Every round checks that exactly one page came and went (shared `total_used`, DPDK's heap
//! size); rounds where not are counted as `bad`. Secondaries are this binary re-executed
//! (`--child`), attached to memory (and heap), obeying `run N W` on stdin.
//!
//! With `--busy`, the primary's rounds with no secondary run once more while another thread of
//! the same process spins on CPU 1 (a polling dataplane core) and the measuring thread runs on
//! CPU 0; DPDK's the same way (`-l 0-1`, its worker lcore spinning: `grow --busy 1`). Changing a
//! mapping then may have to interrupt that CPU to flush its TLB (row "primary, busy CPU 1").
//!
//! `cargo bench -p memplane-heap --bench page_grow -- [--count N] [--warmup W] [--reps R]
//! [--dpdk-bin PATH] [--list-va-mib M] [--busy]` (`--list-va-mib` adds `memplane-mem-listvaMm`
//! rows: the memory layer with memseg lists of M MiB instead of the default 32 GiB, to show what
//! a sync's scan of the list costs).

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::process::Command;
use std::ptr::NonNull;
use std::time::Instant;

use common::{
    Args, MpPrimary, MpSecondary, Proc, RunDir, dpdk_cleanup, dpdk_cmd, field, mean, median,
    parse_kv, quantile,
};
use memplane_heap::Heap;
use memplane_hugepage::{AllocSpec, Memory};
use memplane_unix::MpChannel;

const PAGE: u64 = 2 << 20;
const GROW_SIZE: usize = 1 << 20;

/// p50, mean, p90 of microsecond samples, as `name_p50_us=.. name_mean_us=.. name_p90_us=..`.
fn summary(name: &str, v: &mut [f64]) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "{name}_p50_us={:.1} {name}_mean_us={:.1} {name}_p90_us={:.1}",
        quantile(v, 0.5),
        mean(v),
        quantile(v, 0.9)
    )
}

/// `n` measured rounds (after `warm`) of one growth and one free; returns the result fields.
fn rounds(mem: &Memory<MpChannel>, heap: Option<&Heap<MpChannel>>, n: u64, warm: u64) -> String {
    let (mut g, mut f, mut bad) = (Vec::new(), Vec::new(), 0);
    for i in 0..warm + n {
        let used0 = mem.total_used();
        let t0 = Instant::now();
        let addr = match heap {
            Some(h) => h.malloc(GROW_SIZE, 1).expect("heap growth").as_ptr() as u64,
            None => {
                mem.alloc(&AllocSpec {
                    bytes: PAGE,
                    heap: 0,
                    ..AllocSpec::default()
                })
                .expect("Memory::alloc")
                .addr
            }
        };
        let grow = t0.elapsed();
        // SAFETY: the block (or page) was just allocated and is mapped here.
        unsafe { (addr as *mut u8).write_volatile(1) };
        let used1 = mem.total_used();
        let t0 = Instant::now();
        match heap {
            Some(h) => h
                .free(NonNull::new(addr as *mut u8).expect("non-null"))
                .expect("heap free"),
            None => mem
                .free(
                    memplane_hugepage::MemRange { addr, len: PAGE },
                    mem.node_at(addr).unwrap_or(0),
                )
                .expect("Memory::free"),
        }
        let free = t0.elapsed();
        let used2 = mem.total_used();
        if i >= warm {
            g.push(grow.as_secs_f64() * 1e6);
            f.push(free.as_secs_f64() * 1e6);
            bad += (used1.wrapping_sub(used0) != PAGE) as u64;
            bad += (used1.wrapping_sub(used2) != PAGE) as u64;
        }
    }
    format!(
        "n={n} {} {} page={PAGE} bad={bad}",
        summary("grow", &mut g),
        summary("free", &mut f)
    )
}

/// The kernel's floor: a fresh hugetlb memfd per page, or one long-lived memfd.
fn floor(n: u64, warm: u64, fresh: bool) -> Option<String> {
    let (mut g, mut f) = (Vec::new(), Vec::new());
    let len = PAGE as usize;
    // SAFETY: plain syscalls on fds and mappings this function owns; the mapping is written
    // only inside its 2 MiB and unmapped before the fd is closed or punched.
    unsafe {
        let name = c"mpb-floor";
        let keep = if fresh {
            -1
        } else {
            let fd = libc::memfd_create(name.as_ptr(), libc::MFD_HUGETLB | libc::MFD_CLOEXEC);
            if fd < 0 || libc::ftruncate(fd, 64 << 20) != 0 {
                return None;
            }
            fd
        };
        for i in 0..warm + n {
            let off = if fresh { 0 } else { ((i % 32) * PAGE) as i64 };
            let t0 = Instant::now();
            let fd = if fresh {
                let fd = libc::memfd_create(name.as_ptr(), libc::MFD_HUGETLB | libc::MFD_CLOEXEC);
                if fd < 0 || libc::ftruncate(fd, len as i64) != 0 {
                    return None;
                }
                fd
            } else {
                keep
            };
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                off,
            );
            if p == libc::MAP_FAILED {
                return None;
            }
            (p as *mut u8).write_volatile(1);
            let grow = t0.elapsed();
            let t0 = Instant::now();
            libc::munmap(p, len);
            if fresh {
                libc::close(fd);
            } else {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len as i64,
                );
            }
            let free = t0.elapsed();
            if i >= warm {
                g.push(grow.as_secs_f64() * 1e6);
                f.push(free.as_secs_f64() * 1e6);
            }
        }
        if !fresh {
            libc::close(keep);
        }
    }
    Some(format!(
        "n={n} {} {} page={PAGE} bad=0",
        summary("grow", &mut g),
        summary("free", &mut f)
    ))
}

/// A secondary: attach, say `ready`, then run `run N W` commands until stdin closes.
fn child(dir: &Path, with_heap: bool) {
    let s = MpSecondary::attach(dir, with_heap);
    println!("ready {}", std::process::id());
    for l in std::io::stdin().lock().lines().map_while(Result::ok) {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.first() == Some(&"run") {
            let n = w[1].parse().expect("N");
            let warm = w[2].parse().expect("W");
            println!("bench=grow {}", rounds(&s.mem, s.heap.as_ref(), n, warm));
        } else {
            break;
        }
    }
    drop(s);
}

fn spawn_child(dir: &Path, mode: &str) -> Proc {
    let mut c = Command::new(std::env::current_exe().expect("own path"));
    c.args(["--child", &dir.display().to_string(), "--mode", mode]);
    let mut p = Proc::start(c, "memplane secondary");
    p.expect("ready", 60);
    p
}

/// Samples: (impl, op, role, others) -> (p50 per rep, mean per rep).
type Samples = BTreeMap<(String, String, String, u64), Vec<(f64, f64)>>;

fn record(s: &mut Samples, imp: &str, role: &str, others: u64, fields: &str) {
    let line = format!("bench=grow impl={imp} role={role} others={others} {fields}");
    println!("{line}");
    let m = parse_kv(&line);
    for op in ["grow", "free"] {
        s.entry((imp.to_owned(), op.to_owned(), role.to_owned(), others))
            .or_default()
            .push((
                field(&m, &format!("{op}_p50_us")),
                field(&m, &format!("{op}_mean_us")),
            ));
    }
    if field(&m, "bad") != 0.0 {
        eprintln!(
            "page_grow: WARNING: {imp} {role} others={others}: rounds without exactly one page"
        );
    }
}

/// Runs `f` on CPU 0 while another thread of this process spins on CPU 1, then gives this
/// thread its CPU set back.
fn with_busy_cpu1<T>(f: impl FnOnce() -> T) -> T {
    use std::sync::atomic::{AtomicBool, Ordering};
    static STOP: AtomicBool = AtomicBool::new(false);
    STOP.store(false, Ordering::Relaxed);
    let saved = common::cpu_affinity();
    let spinner = std::thread::spawn(|| {
        common::pin_to_cpu(1);
        while !STOP.load(Ordering::Relaxed) {
            std::hint::spin_loop();
        }
    });
    common::pin_to_cpu(0);
    let r = f();
    STOP.store(true, Ordering::Relaxed);
    spinner.join().expect("the spinning thread");
    common::set_cpu_affinity(&saved);
    r
}

fn memplane_rep(s: &mut Samples, mode: &str, n: u64, warm: u64, list_va: Option<u64>, busy: bool) {
    let with_heap = mode == "heap";
    let imp = match list_va {
        None => format!("memplane-{mode}"),
        Some(v) => format!("memplane-{mode}-listva{}m", v >> 20),
    };
    let dir = RunDir::new(&format!("mpb-grow-{mode}"));
    let mut opts = memplane_hugepage::MemOptions::new();
    if let Some(v) = list_va {
        opts = opts.list_va(v);
    }
    let p = MpPrimary::start_with(&dir.0, &opts, with_heap);
    assert!(
        p.setup.backing.starts_with("memfd"),
        "page_grow needs free hugepages (memplane fell back to {})",
        p.setup.backing
    );
    let run_primary = |s: &mut Samples, k: usize| {
        assert_eq!(p.mem.participants_count(), k);
        let r = rounds(&p.mem, p.heap.as_ref(), n, warm);
        record(s, &imp, "primary", k as u64, &r);
    };
    let run_secondary = |s: &mut Samples, c: &mut Proc, others: u64| {
        c.send(&format!("run {n} {warm}"));
        let l = c.expect("bench=grow", 600);
        record(
            s,
            &imp,
            "secondary",
            others,
            l.trim_start_matches("bench=grow "),
        );
    };
    run_primary(s, 0);
    if busy {
        let r = with_busy_cpu1(|| rounds(&p.mem, p.heap.as_ref(), n, warm));
        record(s, &imp, "primary-busy", 0, &r);
    }
    let mut kids = vec![spawn_child(&dir.0, mode)];
    run_primary(s, 1);
    run_secondary(s, &mut kids[0], 0);
    kids.push(spawn_child(&dir.0, mode));
    kids.push(spawn_child(&dir.0, mode));
    run_primary(s, 3);
    kids.push(spawn_child(&dir.0, mode));
    run_secondary(s, &mut kids[0], 3);
    for k in kids {
        k.finish(10);
    }
    drop(p);
}

/// Records the result line of DPDK's `grow` run `p` (its own `role` and `others` fields
/// dropped) as scenario (`role`, `others`).
fn record_dpdk(s: &mut Samples, p: &mut Proc, role: &str, others: u64) {
    let l = p.expect("bench=grow", 600);
    let fields = l
        .split_whitespace()
        .filter(|w| {
            !["bench=", "impl=", "role=", "others="]
                .iter()
                .any(|k| w.starts_with(k))
        })
        .collect::<Vec<_>>()
        .join(" ");
    record(s, "dpdk", role, others, &fields);
}

fn dpdk_rep(s: &mut Samples, bin: &Path, n: u64, warm: u64, busy: bool) {
    let prefix = common::dpdk_prefix("grow");
    let (ns, ws) = (n.to_string(), warm.to_string());
    let idle = |what: &str| {
        let mut p = Proc::start(dpdk_cmd(bin, &prefix, true, &["idle"]), what);
        p.expect("ready", 120);
        p
    };
    // In the primary, with 0, 1 and 3 secondaries attached.
    for k in [0u64, 1, 3] {
        let ks = k.to_string();
        let mode = [
            "grow", "--count", &ns, "--warmup", &ws, "--others", &ks, "--wait", "1",
        ];
        let mut prim = Proc::start(dpdk_cmd(bin, &prefix, false, &mode), "dpdk primary");
        prim.expect("ready", 120);
        let others: Vec<Proc> = (0..k).map(|_| idle("dpdk secondary")).collect();
        prim.send("go");
        record_dpdk(s, &mut prim, "primary", k);
        for o in others {
            o.finish(10);
        }
        prim.finish(10);
        dpdk_cleanup(&prefix);
    }
    // In the primary, its worker lcore spinning on CPU 1, the main one on CPU 0.
    if busy {
        let mode = ["grow", "--count", &ns, "--warmup", &ws, "--busy", "1"];
        let mut prim = Proc::start(
            common::dpdk_cmd_on(bin, &prefix, false, "0-1", &mode),
            "dpdk primary",
        );
        record_dpdk(s, &mut prim, "primary-busy", 0);
        prim.finish(10);
        dpdk_cleanup(&prefix);
    }
    // From a secondary, with 0 and 3 other secondaries attached.
    for k in [0u64, 3] {
        let mut prim = Proc::start(dpdk_cmd(bin, &prefix, false, &["idle"]), "dpdk primary");
        prim.expect("ready", 120);
        let others: Vec<Proc> = (0..k).map(|_| idle("dpdk secondary")).collect();
        let ks = k.to_string();
        let mode = ["grow", "--count", &ns, "--warmup", &ws, "--others", &ks];
        let mut req = Proc::start(dpdk_cmd(bin, &prefix, true, &mode), "dpdk requester");
        record_dpdk(s, &mut req, "secondary", k);
        req.finish(10);
        for o in others {
            o.finish(10);
        }
        prim.finish(10);
        dpdk_cleanup(&prefix);
    }
}

fn main() {
    let args = Args::get();
    if let Some(dir) = args.value("--child") {
        child(
            Path::new(&dir),
            args.value("--mode").as_deref() == Some("heap"),
        );
        return;
    }
    let n = args.num("--count", 200);
    let warm = args.num("--warmup", 20);
    let reps = args.num("--reps", 3);
    let busy = args.flag("--busy");
    let dpdk = common::dpdk_bin(&args);
    let list_va_diag = args
        .value("--list-va-mib")
        .map(|v| v.parse::<u64>().expect("MiB"));
    println!(
        "# page_grow: {n} rounds (+{warm} warm-up) per scenario, {reps} reps; {} free 2 MiB \
         hugepages at start",
        common::free_hugepages()
    );
    let mut s = Samples::new();
    for rep in 0..reps {
        eprintln!("page_grow: rep {}/{reps}", rep + 1);
        for (imp, fresh) in [("floor", true), ("floor-fd", false)] {
            match floor(n, warm, fresh) {
                Some(r) => record(&mut s, imp, "primary", 0, &r),
                None => eprintln!("page_grow: {imp}: no hugetlb memfd (no free hugepages?)"),
            }
        }
        memplane_rep(&mut s, "mem", n, warm, None, busy);
        memplane_rep(&mut s, "heap", n, warm, None, busy);
        // Diagnosis: the same with a smaller memseg list (fewer segments to scan per sync).
        if let Some(mib) = list_va_diag {
            memplane_rep(&mut s, "mem", n, warm, Some(mib << 20), false);
        }
        if let Some(bin) = &dpdk {
            dpdk_rep(&mut s, bin, n, warm, busy);
        }
    }
    table(&s, reps, &common::placement(&args));
}

fn table(s: &Samples, reps: u64, placement: &str) {
    // The median over reps of each rep's p50 (and of each rep's mean).
    let get = |imp: &str, op: &str, role: &str, k: u64| -> Option<(f64, f64)> {
        let v = s.get(&(imp.into(), op.into(), role.into(), k))?;
        let mut a: Vec<f64> = v.iter().map(|x| x.0).collect();
        let mut b: Vec<f64> = v.iter().map(|x| x.1).collect();
        Some((median(&mut a), median(&mut b)))
    };
    let cell =
        |x: Option<(f64, f64)>| x.map_or("-".to_owned(), |x| format!("{:.1} ({:.1})", x.0, x.1));
    let ratio = |a: Option<(f64, f64)>, b: Option<(f64, f64)>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}x", a.0 / b.0),
        _ => "-".to_owned(),
    };
    println!();
    println!(
        "## One 2 MiB page: growth and free, placement {placement} (median over {reps} reps of \
         the p50 per rep, us; mean in brackets)"
    );
    println!();
    println!(
        "| op | where | memplane Memory | memplane heap | DPDK 22.11 heap | floor (fresh memfd) | \
         heap / DPDK | Memory / floor | heap / floor |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let scen = [
        ("primary", 0, "primary, 0 secondaries"),
        ("primary-busy", 0, "primary, busy CPU 1"),
        ("primary", 1, "primary, 1 secondary"),
        ("primary", 3, "primary, 3 secondaries"),
        ("secondary", 0, "secondary, 0 others"),
        ("secondary", 3, "secondary, 3 others"),
    ];
    let mut targets = Vec::new();
    for op in ["grow", "free"] {
        let fl = get("floor", op, "primary", 0);
        for (role, k, what) in scen {
            let mm = get("memplane-mem", op, role, k);
            let mh = get("memplane-heap", op, role, k);
            let d = get("dpdk", op, role, k);
            if mm.is_none() && mh.is_none() && d.is_none() {
                continue;
            }
            println!(
                "| {op} | {what} | {} | {} | {} | {} | {} | {} | {} |",
                cell(mm),
                cell(mh),
                cell(d),
                cell(fl),
                ratio(mh, d),
                ratio(mm, fl),
                ratio(mh, fl)
            );
            if role == "primary" && k == 0 && op == "grow" {
                targets.push((
                    "primary grow (Memory::alloc) <= 1.3x floor".to_owned(),
                    mm,
                    fl,
                    1.3,
                ));
                targets.push(("primary grow (heap) <= 1.3x floor".to_owned(), mh, fl, 1.3));
            }
            if role == "secondary" && k == 3 {
                targets.push((format!("secondary+3 {op} (heap) <= 0.5x DPDK"), mh, d, 0.5));
                targets.push((
                    format!("secondary+3 {op} (Memory) <= 0.5x DPDK"),
                    mm,
                    d,
                    0.5,
                ));
            }
        }
    }
    let diag: Vec<String> = {
        let mut v: Vec<String> = s
            .keys()
            .filter(|k| k.0.contains("-listva"))
            .map(|k| k.0.clone())
            .collect();
        v.dedup();
        v
    };
    for imp in diag {
        println!();
        println!(
            "{imp} (diagnosis: smaller memseg lists), p50 us: {}",
            scen.iter()
                .flat_map(|(role, k, what)| ["grow", "free"].map(|op| {
                    format!(
                        "{op} {what} {}",
                        s.get(&(imp.clone(), op.into(), (*role).into(), *k)).map_or(
                            "-".to_owned(),
                            |v| {
                                let mut a: Vec<f64> = v.iter().map(|x| x.0).collect();
                                format!("{:.1}", median(&mut a))
                            }
                        )
                    )
                }))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let ff = get("floor-fd", "grow", "primary", 0);
    let ffr = get("floor-fd", "free", "primary", 0);
    println!();
    println!(
        "floor with one long-lived hugetlb memfd (mmap at an offset + touch / munmap + punch \
         hole): grow {} us, free {} us",
        cell(ff),
        cell(ffr)
    );
    println!();
    for (what, a, b, lim) in targets {
        if let (Some(a), Some(b)) = (a, b) {
            let r = a.0 / b.0;
            println!(
                "target ({placement}) {what}: {:.1} / {:.1} us = {r:.2}x -> {}",
                a.0,
                b.0,
                if r <= lim { "met" } else { "NOT met" }
            );
        }
    }
}
