//! The shared heap between real processes.
//!
//! The test process is the primary; secondaries are this test binary re-executed (see
//! `memplane-testkit`), attached to the same memory and heap, driven by line commands. Checked:
//! objects allocated in a secondary are read and freed by the primary and the reverse; two
//! processes with two threads each allocate, fill, check and free concurrently; a secondary grows
//! the heap while other secondaries are attached, and they see the new memory; freeing
//! everything gives every page back (kernel free-page count back to its baseline with hugepages);
//! a growth whose sync fails in one secondary is rolled back and reported; a process killed
//! while holding the heap lock does not hang the others (the heap is repaired and validates);
//! memzones (DPDK's memzone test cases, lookup from another process); `validate()` finds a
//! trampled header.

use std::path::Path;
use std::ptr::NonNull;

use memplane_heap::memzone::IOVA_CONTIG;
use memplane_heap::{AllocError, Heap, HeapError, MemzoneError, ZoneSpec};
use memplane_hugepage::memory::{default_hugepage_size, free_hugepages};
use memplane_hugepage::{Backing, MemOptions, Memory};
use memplane_testkit::{Child, TestDir, child_dir, hex, hexnum, serve, unhex};

mod common;
use common::{Primary, primary, timeouts};
use memplane_unix::{Channel, ChannelConfig, MpChannel, ProcType};

fn write(p: u64, b: &[u8]) {
    // SAFETY: test code writing into a live heap allocation of at least `b.len()` bytes.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), p as *mut u8, b.len()) }
}

fn read(p: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // SAFETY: test code reading a live heap allocation of at least `n` bytes.
    unsafe { std::ptr::copy_nonoverlapping(p as *const u8, v.as_mut_ptr(), n) }
    v
}

/// The tests that count the kernel's free hugepages run one at a time.
static HUGE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn nn(p: u64) -> NonNull<u8> {
    NonNull::new(p as *mut u8).unwrap()
}

/// The child: attach memory and heap, then obey commands.
#[test]
fn child() {
    let Some(dir) = child_dir() else { return };
    let ch = Channel::open(
        ChannelConfig::new()
            .runtime_dir(&dir)
            .proc_type(ProcType::Secondary),
    )
    .unwrap();
    let mem = Memory::secondary(ch.shared(), Path::new(&dir), timeouts()).unwrap();
    let heap = Heap::secondary(mem).unwrap();
    memplane_testkit::say(format!("ready {}", std::process::id()));
    serve(|w| match w[0] {
        "malloc" => match heap.malloc(hexnum(w[1]) as usize, hexnum(w[2]) as usize) {
            Ok(p) => format!("{:x}", p.as_ptr() as u64),
            Err(e) => format!("error {e}"),
        },
        "free" => match heap.free(nn(hexnum(w[1]))) {
            Ok(()) => "ok".into(),
            Err(e) => format!("error {e}"),
        },
        "write" => {
            write(hexnum(w[1]), &unhex(w[2]));
            "ok".into()
        }
        "read" => hex(&read(hexnum(w[1]), hexnum(w[2]) as usize)),
        "failsync" => {
            heap.memory().fail_next_syncs(hexnum(w[1]) as u32);
            "ok".into()
        }
        "mz" => match heap.memzone_lookup(w[1]) {
            Some(z) => format!("{:x} {:x}", z.addr, z.len),
            None => "none".into(),
        },
        "hold" => {
            // Take the heap lock and never give it back: the parent kills us.
            let _ = heap.with_lock(0, || {
                memplane_testkit::say("holding");
                loop {
                    std::thread::park();
                }
            });
            "unreachable".into()
        }
        "threads" => {
            // Two threads allocate, fill, check and free N blocks each.
            let n = hexnum(w[1]) as usize;
            let hs: Vec<_> = (0..2u8)
                .map(|t| {
                    let h = heap.clone();
                    std::thread::spawn(move || churn(&h, n, 0x40 + t))
                })
                .collect();
            let ok = hs.into_iter().all(|t| t.join().unwrap());
            ok.to_string()
        }
        "validate" => match heap.validate() {
            Ok(()) => "clean".into(),
            Err(p) => p.join("; "),
        },
        x => format!("unknown {x}"),
    });
}

/// Allocates, fills and checks `n` blocks of varied sizes, freeing as it goes; true if every
/// block kept its contents.
fn churn(h: &Heap<MpChannel>, n: usize, tag: u8) -> bool {
    let mut live: Vec<(NonNull<u8>, usize, u8)> = Vec::new();
    let mut ok = true;
    for i in 0..n {
        let size = [16usize, 64, 200, 1000, 5000, 70000][i % 6];
        let p = h.malloc(size, 8 << (i % 5)).unwrap();
        let fill = tag.wrapping_add(i as u8);
        // SAFETY: a fresh allocation of `size` bytes.
        unsafe { std::ptr::write_bytes(p.as_ptr(), fill, size) };
        live.push((p, size, fill));
        if i % 3 == 2 {
            let (q, s, f) = live.remove(i % live.len());
            // SAFETY: a live allocation of `s` bytes.
            ok &= unsafe { std::slice::from_raw_parts(q.as_ptr(), s) }
                .iter()
                .all(|&b| b == f);
            h.free(q).unwrap();
        }
    }
    for (q, s, f) in live {
        // SAFETY: a live allocation of `s` bytes.
        ok &= unsafe { std::slice::from_raw_parts(q.as_ptr(), s) }
            .iter()
            .all(|&b| b == f);
        h.free(q).unwrap();
    }
    ok
}

fn start(dir: &TestDir) -> Child {
    let mut c = Child::start("child", dir.path(), &[]);
    assert!(c.line().starts_with("ready"));
    c
}

fn scenario(opts: MemOptions) {
    let dir = TestDir::new("mph");
    let p = primary(&dir, opts);
    let mut a = start(&dir);
    let mut b = start(&dir);

    // Allocated in a secondary, read and freed by the primary.
    let x = hexnum(&a.cmd("malloc 3e8 40"));
    assert_eq!(x % 64, 0);
    assert_eq!(
        a.cmd(&format!("write {x:x} {}", hex(b"from secondary a"))),
        "ok"
    );
    assert_eq!(read(x, 16), b"from secondary a");
    assert_eq!(b.cmd(&format!("read {x:x} 10")), hex(b"from secondary a"));
    p.heap.free(nn(x)).unwrap();

    // Allocated by the primary, freed by a secondary.
    let y = p.heap.malloc(5000, 4096).unwrap().as_ptr() as u64;
    assert_eq!(y % 4096, 0);
    write(y, b"from the primary");
    assert_eq!(b.cmd(&format!("read {y:x} 10")), hex(b"from the primary"));
    assert_eq!(b.cmd(&format!("free {y:x}")), "ok");
    assert!(
        b.cmd(&format!("free {y:x}")).starts_with("error"),
        "double free detected"
    );

    // A secondary grows the heap with another attached: 3 MiB at once.
    let big = hexnum(&a.cmd("malloc 300000 1000"));
    assert_eq!(
        a.cmd(&format!("write {:x} {}", big + 0x2f0000, hex(b"far out"))),
        "ok"
    );
    assert_eq!(
        b.cmd(&format!("read {:x} 7", big + 0x2f0000)),
        hex(b"far out")
    );
    assert_eq!(read(big + 0x2f0000, 7), b"far out");

    // Two processes, two threads each, at once.
    a.send("threads 1f4");
    b.send("threads 1f4");
    assert_eq!(a.line(), "true");
    assert_eq!(b.line(), "true");
    assert_eq!(a.cmd(&format!("free {big:x}")), "ok");

    // Everything freed: every page back.
    assert_eq!(p.heap.validate(), Ok(()));
    let s = p.heap.stats(0).unwrap();
    assert_eq!((s.alloc_count, s.heap_size), (0, 0), "{s:?}");
    assert_eq!(p.heap.memory().total_used(), 0);
    assert!(s.grows > 0 && s.shrinks > 0, "{s:?}");
    assert_eq!(a.cmd("validate"), "clean");
}

#[test]
fn no_huge_heap_between_processes() {
    scenario(MemOptions::new().no_huge());
}

/// Runs `f` on hugepage (memfd) memory, one such test at a time, and checks that the kernel's
/// free-hugepage count comes back to where it was; says it skips `test` without 32 free pages.
fn on_hugepages(test: &str, f: impl FnOnce(MemOptions)) {
    let Some(size) = default_hugepage_size().filter(|&s| free_hugepages(s) >= 32) else {
        memplane_testkit::skip(&format!("{test}: fewer than 32 free hugepages"));
        return;
    };
    let _serial = HUGE.lock().unwrap_or_else(|e| e.into_inner());
    let before = free_hugepages(size);
    f(MemOptions::new().backing(Backing::Memfd));
    assert_eq!(
        memplane_testkit::settles_at(before, || free_hugepages(size)),
        before,
        "hugepages leaked"
    );
}

#[test]
fn hugepage_heap_between_processes() {
    on_hugepages("hugepage_heap_between_processes", scenario);
}

/// Memory allocated up front (`--socket-mem`) is the heap's from the start, as DPDK's
/// preallocated memory is: allocations inside it grow nothing, frees give none of it back, and
/// it cannot be freed as pages; growth past it and shrink back to it work as without it.
fn up_front(opts: MemOptions) {
    const MIB: u64 = 1 << 20;
    let dir = TestDir::new("mph");
    let p = primary(&dir, opts.socket_mem(vec![8]));
    let h = &p.heap;
    let mem = h.memory();
    assert_eq!(mem.total_used(), 8 * MIB);
    let s = h.stats(0).unwrap();
    assert_eq!(
        (s.heap_size, s.free, s.regions),
        (8 * MIB, 8 * MIB, 1),
        "{s:?}"
    );
    assert_eq!((s.grows, s.alloc_count), (0, 0), "{s:?}");
    let pinned = mem.pinned_ranges();
    assert_eq!(pinned.len(), 1, "{pinned:?}");
    assert_eq!((pinned[0].0, pinned[0].1.len), (0, 8 * MIB));

    // A secondary allocates inside it and the primary frees: nothing grows or shrinks.
    let mut a = start(&dir);
    let x = hexnum(&a.cmd("malloc 100000 40"));
    assert!(
        pinned[0].1.addr <= x && x < pinned[0].1.addr + 8 * MIB,
        "{x:#x}"
    );
    assert_eq!(a.cmd(&format!("write {x:x} {}", hex(b"early"))), "ok");
    assert_eq!(read(x, 5), b"early");
    h.free(nn(x)).unwrap();
    let s = h.stats(0).unwrap();
    assert_eq!((s.grows, s.shrinks, s.alloc_count), (0, 0, 0), "{s:?}");
    assert_eq!(mem.total_used(), 8 * MIB);

    // Past it the heap grows, and freeing gives back exactly what it grew by.
    let big = h.malloc((12 * MIB) as usize, 64).unwrap();
    assert!(mem.total_used() > 8 * MIB);
    assert_eq!(h.stats(0).unwrap().grows, 1);
    h.free(big).unwrap();
    let s = h.stats(0).unwrap();
    assert_eq!(mem.total_used(), 8 * MIB, "{s:?}");
    assert_eq!((s.heap_size, s.shrinks), (8 * MIB, 1), "{s:?}");

    // Its pages cannot be freed as pages, from either side.
    let e = mem.free(pinned[0].1, 0).unwrap_err().to_string();
    assert!(e.contains("--socket-mem"), "{e}");
    assert_eq!(mem.total_used(), 8 * MIB);
    assert_eq!(h.validate(), Ok(()));
    assert_eq!(a.cmd("validate"), "clean");
}

#[test]
fn no_huge_memory_allocated_up_front_starts_the_heap_and_stays() {
    up_front(MemOptions::new().no_huge());
}

#[test]
fn hugepage_memory_allocated_up_front_starts_the_heap_and_stays() {
    on_hugepages(
        "hugepage_memory_allocated_up_front_starts_the_heap_and_stays",
        up_front,
    );
}

/// A failed growth left nothing behind: no pages allocated, an empty heap, a clean walk.
fn assert_nothing_grown(p: &Primary) {
    assert_eq!(p.heap.memory().total_used(), 0);
    let s = p.heap.stats(0).unwrap();
    assert_eq!((s.heap_size, s.alloc_count), (0, 0), "{s:?}");
    assert_eq!(p.heap.validate(), Ok(()));
}

#[test]
fn growth_rolled_back_when_a_secondary_fails_its_sync() {
    let dir = TestDir::new("mph");
    let p = primary(&dir, MemOptions::new().no_huge());
    let mut a = start(&dir);
    let mut bad = start(&dir);
    assert_eq!(bad.cmd("failsync 1"), "ok");
    let r = a.cmd("malloc 100000 40");
    assert!(r.starts_with("error out of memory"), "{r}");
    assert!(
        r.contains("secondary failed to sync") || r.contains("rolled back"),
        "{r}"
    );
    assert_nothing_grown(&p);
    // The next growth works.
    let x = hexnum(&a.cmd("malloc 100000 40"));
    assert_eq!(bad.cmd(&format!("read {x:x} 4")), "00000000");
}

/// A secondary that grows the heap maps the new pages itself, after the others synced and the
/// pages joined the heap held for it. If it cannot, the held region leaves the heap unread and
/// the pages go back: nothing is leaked or left half published, and the next growth works.
#[test]
fn a_requester_that_cannot_map_its_new_pages_gives_them_back() {
    let dir = TestDir::new("mph");
    let p = primary(&dir, MemOptions::new().no_huge());
    let mut a = start(&dir);
    let mut b = start(&dir);
    // The primary does not ask `a` to sync its own growth: this failure hits `a`'s own mapping.
    assert_eq!(a.cmd("failsync 1"), "ok");
    let r = a.cmd("malloc 100000 40");
    assert!(r.starts_with("error out of memory"), "{r}");
    assert!(r.contains("could not map"), "{r}");
    assert_nothing_grown(&p);
    assert_eq!(a.cmd("validate"), "clean");
    // The next growth works, and the other secondary sees it.
    let x = hexnum(&a.cmd("malloc 100000 40"));
    assert_eq!(a.cmd(&format!("write {x:x} {}", hex(b"mine"))), "ok");
    assert_eq!(b.cmd(&format!("read {x:x} 4")), hex(b"mine"));
    assert_eq!(a.cmd(&format!("free {x:x}")), "ok");
    assert_eq!(p.heap.memory().total_used(), 0);
    assert_eq!(b.cmd("validate"), "clean");
}

#[test]
fn killed_holder_of_the_heap_lock_hangs_nobody() {
    let dir = TestDir::new("mph");
    let p = primary(&dir, MemOptions::new().no_huge());
    let keep = p.heap.malloc(100, 8).unwrap();
    let mut a = start(&dir);
    let x = hexnum(&a.cmd("malloc 64 8"));
    a.send("hold");
    assert_eq!(a.line(), "holding");
    a.kill();
    // The next allocation repairs the heap and goes on.
    let y = p.heap.malloc(300, 8).unwrap();
    assert_eq!(p.heap.recoveries_seen(), 1);
    assert_eq!(p.heap.validate(), Ok(()));
    p.heap.free(nn(x)).unwrap();
    p.heap.free(y).unwrap();
    p.heap.free(keep).unwrap();
    assert_eq!(p.heap.stats(0).unwrap().alloc_count, 0);
}

#[test]
fn bad_requests_and_corruption_are_reported() {
    let dir = TestDir::new("mph");
    let p = primary(&dir, MemOptions::new().no_huge());
    let h = &p.heap;
    assert!(matches!(h.malloc(0, 8), Err(AllocError::BadRequest { .. })));
    assert!(matches!(
        h.malloc(64, 3),
        Err(AllocError::BadRequest { .. })
    ));
    assert!(matches!(
        h.malloc(usize::MAX - 8, 8),
        Err(AllocError::BadRequest { .. })
    ));
    assert!(matches!(
        h.calloc(usize::MAX / 2, 4, 8),
        Err(AllocError::BadRequest { .. })
    ));
    let a = h.malloc(100, 8).unwrap();
    let b = h.malloc(100, 8).unwrap();
    let (_, usable) = h.sizes(a).unwrap();
    // Write 16 bytes past a's usable size: into b's header, or with debug cookies into a's
    // cookie first.
    // SAFETY: deliberately writing past a's usable bytes, to test detection.
    unsafe { std::ptr::write_bytes(a.as_ptr().add(usable), 0x5a, 16) };
    assert!(h.validate().is_err());
    if cfg!(feature = "debug-cookies") {
        let r = h.free(a);
        assert!(
            matches!(r, Err(AllocError::Heap(HeapError::Overflow { .. }))),
            "{r:?}"
        );
    } else {
        let r = h.free(b);
        assert!(
            matches!(r, Err(AllocError::Heap(HeapError::Corrupt { .. }))),
            "{r:?}"
        );
    }
    // A pointer the heap never gave out.
    let mut local = 0u64;
    assert!(h.free(NonNull::from(&mut local).cast()).is_err());
}

#[test]
fn large_blocks_on_an_empty_heap_grow_it_exactly() {
    // From 128 MiB up the O(1) search rounds a request up by more than the growth adds; the
    // heap must still serve it from the memory grown for it, and give it back on free.
    let dir = TestDir::new("mph");
    let p = primary(&dir, MemOptions::new().no_huge());
    let h = &p.heap;
    for mib in [127usize, 128, 200] {
        let a = h
            .malloc(mib << 20, 64)
            .unwrap_or_else(|e| panic!("{mib} MiB: {e}"));
        assert!(
            h.stats(0).unwrap().heap_size < ((mib + 3) << 20) as u64,
            "{mib} MiB"
        );
        h.free(a).unwrap();
        assert_eq!(h.stats(0).unwrap().alloc_count, 0);
    }
    assert_eq!(h.validate(), Ok(()));
}

/// Growths in a row take memory ahead of the need (2 MiB per CPU the caller may use, up to 4),
/// whose population the memory layer shares out between threads; a shrink ends the streak, so
/// the next growth is exact again; freeing everything gives everything back.
fn growth_ahead(opts: MemOptions) {
    let dir = TestDir::new("mph");
    let p = primary(&dir, opts);
    let h = &p.heap;
    let page = h
        .memory()
        .lists()
        .iter()
        .map(|l| l.page_size)
        .min()
        .unwrap();
    let cpus = memplane_hugepage::va::cpus_here();
    // What one thread populates: a 2 MiB page, or 2 MiB of 4 KiB pages.
    let unit = page.max(2 << 20);
    let threads = cpus.min(h.memory().populate_threads()).min(4) as u64;
    // With one thread to clear pages, growths stay exact.
    let ahead = if threads > 1 { threads * unit } else { page };
    let size = (page / 8) as usize;
    let mut live = Vec::new();
    // Allocates blocks until the heap has grown once more; returns by how much it grew.
    let grow_once = |live: &mut Vec<NonNull<u8>>| {
        let before = h.stats(0).unwrap();
        loop {
            live.push(h.malloc(size, 64).unwrap());
            let s = h.stats(0).unwrap();
            if s.grows > before.grows {
                assert_eq!(s.grows, before.grows + 1);
                return s.heap_size - before.heap_size;
            }
        }
    };
    assert_eq!(grow_once(&mut live), page, "a first growth is exact");
    assert_eq!(
        grow_once(&mut live),
        ahead,
        "the second takes {cpus} CPUs' worth"
    );
    assert_eq!(grow_once(&mut live), ahead, "and so does the third");
    let s = h.stats(0).unwrap();
    assert_eq!(h.memory().total_used(), s.heap_size);
    for b in live.drain(..) {
        h.free(b).unwrap();
    }
    let s = h.stats(0).unwrap();
    assert_eq!((s.heap_size, h.memory().total_used()), (0, 0), "{s:?}");
    assert!(s.shrinks > 0);
    assert_eq!(grow_once(&mut live), page, "after a shrink, exact again");
    assert_eq!(grow_once(&mut live), ahead);
    for b in live.drain(..) {
        h.free(b).unwrap();
    }
    assert_eq!(h.memory().total_used(), 0);
    assert_eq!(h.validate(), Ok(()));
}

#[test]
fn no_huge_growths_in_a_row_take_pages_ahead() {
    growth_ahead(MemOptions::new().no_huge());
}

#[test]
fn no_huge_growths_stay_exact_with_one_populating_thread() {
    growth_ahead(MemOptions::new().no_huge().populate_threads(1));
}

#[test]
fn growth_ahead_gives_way_to_a_memory_limit() {
    // 12 MiB in all (`-m 12`): growths in a row take 2 MiB per CPU ahead, but the last ones
    // that fit only as the need are still made: the heap fills the limit, not less.
    const MIB: u64 = 1 << 20;
    let dir = TestDir::new("mph");
    let p = primary(&dir, MemOptions::new().no_huge().total_mb(12));
    let h = &p.heap;
    let mut live = Vec::new();
    while let Ok(b) = h.malloc(256 << 10, 64) {
        live.push(b);
    }
    let used = h.memory().total_used();
    assert!(used > 11 * MIB && used <= 12 * MIB, "{used}");
    assert!(
        live.len() >= 43,
        "{} blocks of 256 KiB in 12 MiB",
        live.len()
    );
    for b in live {
        h.free(b).unwrap();
    }
    assert_eq!(h.memory().total_used(), 0);
}

#[test]
fn hugepage_growths_in_a_row_take_pages_ahead() {
    on_hugepages("hugepage_growths_in_a_row_take_pages_ahead", growth_ahead);
}

#[test]
fn batches_fill_from_one_hold_and_grow_an_empty_heap() {
    let dir = TestDir::new("mph");
    let p = primary(&dir, MemOptions::new().no_huge());
    let h = &p.heap;
    let mut none: [*mut u8; 0] = [];
    assert_eq!(h.malloc_batch(0, 64, 16, &mut none).unwrap(), 0);
    assert!(matches!(
        h.malloc_batch(0, 0, 16, &mut [std::ptr::null_mut(); 4]),
        Err(AllocError::BadRequest { .. })
    ));
    // An empty heap grows once, then the batch comes out of the new memory.
    assert_eq!(h.stats(0).unwrap().heap_size, 0);
    let mut out = [std::ptr::null_mut(); 32];
    assert_eq!(h.malloc_batch(0, 64, 16, &mut out).unwrap(), 32);
    let grown = h.stats(0).unwrap().heap_size;
    assert!(grown > 0);
    // A heap with room serves the next batch without growing.
    let mut more = [std::ptr::null_mut(); 32];
    assert_eq!(h.malloc_batch(0, 64, 16, &mut more).unwrap(), 32);
    assert_eq!(h.stats(0).unwrap().heap_size, grown);
    let mut all: Vec<u64> = out.iter().chain(&more).map(|&p| p as u64).collect();
    assert!(all.iter().all(|p| p % 16 == 0));
    all.sort_unstable();
    assert!(all.windows(2).all(|w| w[1] - w[0] >= 64), "blocks overlap");
    assert_eq!(h.stats(0).unwrap().alloc_count, 64);
    h.free_batch(&out).unwrap();
    h.free_batch(&more).unwrap();
    assert_eq!(h.stats(0).unwrap().alloc_count, 0);
    assert_eq!(h.validate(), Ok(()));
}

/// zmalloc of memory that held data clears all of it, at sizes from a grain to several pages,
/// with unaligned ends. (Blocks past the last-level cache are cleared by streaming stores: their
/// test is `zero`'s own, in the library.)
#[test]
fn zmalloc_of_reused_memory_clears_it_at_every_size() {
    let dir = TestDir::new("mph");
    let p = primary(&dir, MemOptions::new().no_huge());
    let h = &p.heap;
    // Keep the pages in the heap once freed, so that they are reused dirty.
    h.set_shrink(false);
    for size in [
        100usize,
        4096 + 7,
        (1 << 20) + 3,
        (2 << 20) + 17,
        (8 << 20) + 13,
    ] {
        let a = h.malloc(size + 4096, 8).unwrap();
        // SAFETY: a live block of size + 4096 bytes.
        unsafe { std::ptr::write_bytes(a.as_ptr(), 0xee, size + 4096) };
        h.free(a).unwrap();
        // The same place: the memory just written.
        let z = h.zmalloc(size, 8).unwrap();
        assert_eq!(z, a, "{size}");
        let (_, usable) = h.sizes(z).unwrap();
        // SAFETY: a live block with `usable` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(z.as_ptr(), usable) };
        assert!(bytes[..size].iter().all(|&b| b == 0), "{size}");
        h.free(z).unwrap();
    }
    h.set_shrink(true);
    assert_eq!(h.validate(), Ok(()));
}

#[test]
fn realloc_in_place_and_moving() {
    let dir = TestDir::new("mph");
    let p = primary(&dir, MemOptions::new().no_huge());
    let h = &p.heap;
    let a = h.zmalloc(1024, 64).unwrap();
    write(a.as_ptr() as u64, b"keep me");
    // Shrinking keeps the pointer.
    assert_eq!(h.realloc(Some(a), 512, 64).unwrap(), a);
    // Growing into the free space after it keeps the pointer.
    let b = h.realloc(Some(a), 3072, 64).unwrap();
    assert_eq!(b, a);
    assert_eq!(read(b.as_ptr() as u64, 7), b"keep me");
    // A block right after it forces a move; the contents follow.
    let blocker = h.malloc(64, 8).unwrap();
    let (_, usable) = h.sizes(b).unwrap();
    let c = h.realloc(Some(b), usable + 100_000, 64).unwrap();
    assert_eq!(read(c.as_ptr() as u64, 7), b"keep me");
    // A bigger alignment than the block has moves it.
    let d = h.realloc(Some(c), 100, 1 << 16).unwrap();
    assert_eq!(d.as_ptr() as u64 % (1 << 16), 0);
    assert_eq!(read(d.as_ptr() as u64, 7), b"keep me");
    h.free(d).unwrap();
    h.free(blocker).unwrap();
    assert_eq!(h.validate(), Ok(()));
}

#[test]
fn memzones_like_dpdk() {
    let dir = TestDir::new("mph");
    let p = primary(&dir, MemOptions::new().no_huge());
    let h = &p.heap;
    let z = |len, align, bound| ZoneSpec {
        len,
        align,
        bound,
        ..ZoneSpec::default()
    };
    let z1 = h.memzone_reserve("testzone1", z(100, 0, 0)).unwrap();
    let z4 = h.memzone_reserve("testzone4", z(1024, 0, 0)).unwrap();
    assert_eq!((z1.len, z4.len), (128, 1024));
    assert_eq!(z1.addr % 64, 0);
    assert!(z1.addr + z1.len <= z4.addr || z4.addr + z4.len <= z1.addr);
    assert_eq!(h.memzone_lookup("testzone1"), Some(z1));
    assert!(matches!(
        h.memzone_reserve("testzone1", z(100, 0, 0)),
        Err(MemzoneError::Exists(_))
    ));
    assert!(matches!(
        h.memzone_reserve("", z(1, 0, 0)),
        Err(MemzoneError::BadName(_))
    ));
    assert!(matches!(
        h.memzone_reserve(&"x".repeat(32), z(1, 0, 0)),
        Err(MemzoneError::BadName(_))
    ));
    assert!(h.memzone_reserve(&"x".repeat(31), z(1, 0, 0)).is_ok());
    for a in [32u64, 128, 256, 512, 1024] {
        let m = h
            .memzone_reserve(&format!("align{a}"), z(100, a, 0))
            .unwrap();
        assert_eq!(m.addr % a.max(64), 0);
        assert_eq!(m.len % 64, 0);
    }
    assert!(matches!(
        h.memzone_reserve("al", z(100, 100, 0)),
        Err(MemzoneError::Invalid(_))
    ));
    assert!(matches!(
        h.memzone_reserve("b1", z(100, 0, u32::MAX as u64)),
        Err(MemzoneError::Invalid(_))
    ));
    assert!(matches!(
        h.memzone_reserve("b2", z(100, 0, 32)),
        Err(MemzoneError::Invalid(_))
    ));
    for (i, (len, align, bound)) in [
        (100, 128, 128),
        (100, 256, 128),
        (100, 64, 1024),
        (0, 64, 1024),
    ]
    .into_iter()
    .enumerate()
    {
        let m = h
            .memzone_reserve(&format!("bounded{i}"), z(len, align, bound))
            .unwrap();
        assert_eq!(m.addr % align, 0);
        assert!(m.len >= len.max(64));
        assert_eq!(
            m.addr / bound,
            (m.addr + m.len - 1) / bound,
            "crosses {bound}"
        );
    }
    assert!(matches!(
        h.memzone_reserve(
            "flags",
            ZoneSpec {
                len: 100,
                flags: IOVA_CONTIG << 1,
                ..ZoneSpec::default()
            }
        ),
        Err(MemzoneError::Invalid(_))
    ));
    assert!(matches!(
        h.memzone_reserve("huge", z(u64::MAX, 0, 0)),
        Err(MemzoneError::Invalid(_))
    ));
    // Visible from another process by name.
    let mut a = start(&dir);
    assert_eq!(a.cmd("mz testzone4"), format!("{:x} {:x}", z4.addr, z4.len));
    assert_eq!(a.cmd("mz nothere"), "none");
    // Free, lookup fails, the slot is reused; the table fills up and a freed slot serves again.
    let before = h.memzone_count();
    h.memzone_free("testzone1").unwrap();
    assert_eq!(h.memzone_lookup("testzone1"), None);
    assert_eq!(a.cmd("mz testzone1"), "none");
    assert!(matches!(
        h.memzone_free("testzone1"),
        Err(MemzoneError::NotFound(_))
    ));
    let mut n = 0;
    loop {
        match h.memzone_reserve(&format!("MZ_TEST_{n}"), z(1, 0, 0)) {
            Ok(_) => n += 1,
            Err(MemzoneError::TableFull) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(h.memzone_count(), memplane_heap::state::MAX_MEMZONES);
    h.memzone_free("MZ_TEST_0").unwrap();
    let zero = h.memzone_reserve("len0", z(0, 0, 0)).unwrap();
    assert!(zero.len >= 64);
    h.memzone_free("len0").unwrap();
    for i in 1..n {
        h.memzone_free(&format!("MZ_TEST_{i}")).unwrap();
    }
    assert_eq!(h.memzone_count(), before - 1);
    assert!(
        h.memzone_walk()
            .iter()
            .all(|m| !m.name.as_str().starts_with("MZ_TEST_"))
    );
}
