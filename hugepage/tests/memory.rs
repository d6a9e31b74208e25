//! Shared memory between real processes, in both modes: no hugepages (always runs) and
//! hugepages (runs when free ones are reserved, as in CI; says SKIPPED otherwise).
//!
//! The test process is the primary. Secondaries are this same test binary re-executed in
//! "child" mode (DPDK's `test_mp_secondary` does the same): a child attaches and then obeys
//! line commands on stdin (`read`, `write`, `alloc`, `free`, `mapped`, `events`...), answering
//! on stdout. Checked: bytes written at an address by one process read back at the same address
//! by another; an allocation made after a secondary attached is mapped there by the sync; a free
//! unmaps everywhere; the kernel's free hugepage count returns to its baseline after teardown; a
//! secondary whose addresses are taken gets the clear `--base-virtaddr` error; a secondary that
//! fails its sync makes the primary roll back, after which every process agrees and no page is
//! leaked; IOVAs; event callbacks; limits; stale files of a dead primary.

use std::io::BufRead;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use memplane_core::txn::{Timeouts, TxnStatus};
use memplane_hugepage::memory::{default_hugepage_size, free_hugepages};
use memplane_hugepage::{AllocSpec, Backing, IovaMode, MemError, MemOptions, Memory};
use memplane_testkit::{Child, TestDir, child_dir, hex, map_perms, say, unhex};
use memplane_unix::{Channel, ChannelConfig, MpChannel, ProcType};

/// The file prefix of this test process's primaries: its hugepage files, and the stale ones it
/// plants, never collide with another run's on the same host.
fn prefix() -> String {
    format!("mpt{}", std::process::id())
}

fn timeouts() -> Timeouts {
    Timeouts {
        step: Duration::from_secs(2),
        margin: Duration::from_millis(500),
    }
}

struct Primary {
    mem: Memory<MpChannel>,
    _ch: Channel,
}

fn primary(dir: &Dir, opts: MemOptions) -> Primary {
    let ch = Channel::open(
        ChannelConfig::new()
            .runtime_dir(dir.path())
            .proc_type(ProcType::Primary),
    )
    .unwrap();
    let (mem, _setup) =
        Memory::primary(ch.shared(), dir.path(), &prefix(), &opts, timeouts()).unwrap();
    Primary { mem, _ch: ch }
}

type Dir = TestDir;
type Secondary = Child;

fn new_dir() -> Dir {
    TestDir::new("mpm")
}

fn secondary(dir: &Dir, env: &[(&str, &str)]) -> Secondary {
    Child::start("child_process", dir.path(), env)
}

/// Asks `mem` for `bytes` bytes of pages.
fn alloc(mem: &Memory<MpChannel>, bytes: u64) -> Result<memplane_core::txn::MemRange, MemError> {
    mem.alloc(&AllocSpec {
        bytes,
        ..AllocSpec::default()
    })
}

fn write_at(va: u64, data: &[u8]) {
    // SAFETY: test code writing into pages the memory layer mapped in this process and that
    // this test allocated; `va..va+len` lies inside them.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), va as *mut u8, data.len()) }
}

fn read_at(va: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: as in write_at, for reading.
    unsafe { std::ptr::copy_nonoverlapping(va as *const u8, v.as_mut_ptr(), len) }
    v
}

/// The child role: attach as a secondary, then obey commands. Runs only when re-executed.
#[test]
fn child_process() {
    let Some(dir) = child_dir() else {
        return;
    };
    if let Ok(va) = std::env::var("MEMPLANE_TEST_OCCUPY") {
        // Take the primary's address range first, so the attach must fail.
        let va: u64 = va.parse().unwrap();
        // SAFETY: maps fresh anonymous memory at a fixed address in this child before anything
        // else lives there (the child has mapped no shared memory yet).
        let p = unsafe {
            libc::mmap(
                va as *mut _,
                1 << 21,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        assert_eq!(p as u64, va);
    }
    let ch = Channel::open(
        ChannelConfig::new()
            .runtime_dir(&dir)
            .proc_type(ProcType::Secondary),
    )
    .unwrap();
    let mem = match Memory::secondary(ch.shared(), Path::new(&dir), timeouts()) {
        Ok(m) => m,
        Err(e) => {
            say(format!("attach-error {e}"));
            return;
        }
    };
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let ev = events.clone();
    mem.on_event("test", move |e, a, l| {
        ev.lock().unwrap().push(format!("{e:?}:{a:x}:{l:x}"));
    })
    .unwrap();
    say(format!("ready {}", std::process::id()));
    for l in std::io::stdin().lock().lines().map_while(Result::ok) {
        let w: Vec<&str> = l.split_whitespace().collect();
        let num = |i: usize| u64::from_str_radix(w[i], 16).unwrap();
        let out = match w.first().copied() {
            Some("read") => hex(&read_at(num(1), num(2) as usize)),
            Some("write") => {
                write_at(num(1), &unhex(w[2]));
                "ok".into()
            }
            Some("mapped") => mem.is_mapped_here(num(1)).to_string(),
            Some("alloc") => match mem.alloc(&AllocSpec {
                bytes: num(1),
                ..AllocSpec::default()
            }) {
                Ok(r) => format!("range {:x} {:x}", r.addr, r.len),
                Err(e) => format!("error {e}"),
            },
            Some("free") => match mem.free(
                memplane_core::txn::MemRange {
                    addr: num(1),
                    len: num(2),
                },
                0,
            ) {
                Ok(()) => "ok".into(),
                Err(e) => format!("error {e}"),
            },
            Some("failsync") => {
                mem.fail_next_syncs(num(1) as u32);
                "ok".into()
            }
            Some("iova") => format!("{:x?}", mem.virt2iova(num(1))),
            Some("vfio") => match mem.vfio_container() {
                Ok(fd) => {
                    let mut b = [0u8; 32];
                    let n = rustix::io::pread(&fd, &mut b, 0).unwrap_or(0);
                    String::from_utf8_lossy(&b[..n]).into_owned()
                }
                Err(e) => format!("error {e}"),
            },
            Some("events") => events.lock().unwrap().join(","),
            Some("quit") | None => break,
            Some(x) => format!("unknown {x}"),
        };
        say(out);
    }
}

fn parse_range(s: &str) -> (u64, u64) {
    let w: Vec<&str> = s.split_whitespace().collect();
    assert_eq!(w[0], "range", "{s}");
    (
        u64::from_str_radix(w[1], 16).unwrap(),
        u64::from_str_radix(w[2], 16).unwrap(),
    )
}

/// The scenario both modes run.
fn shared_memory_scenario(opts: MemOptions) {
    let dir = new_dir();
    let p = primary(&dir, opts);
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let ev = events.clone();
    p.mem
        .on_event("test", move |e, a, l| {
            ev.lock().unwrap().push(format!("{e:?}:{a:x}:{l:x}"))
        })
        .unwrap();

    // Memory the primary allocates before the secondary exists.
    let a = alloc(&p.mem, 3 << 20).unwrap();
    write_at(a.addr + 100, b"written by the primary");
    let mut s = secondary(&dir, &[]);
    assert!(s.line().starts_with("ready"));
    assert_eq!(p.mem.participants_count(), 1);
    assert_eq!(
        unhex(&s.cmd(&format!("read {:x} {:x}", a.addr + 100, 22))),
        b"written by the primary"
    );

    // Allocated after the secondary attached: the sync maps it there.
    let b = alloc(&p.mem, 1 << 20).unwrap();
    assert_eq!(s.cmd(&format!("mapped {:x}", b.addr)), "true");
    assert_eq!(
        s.cmd(&format!(
            "write {:x} {}",
            b.addr,
            hex(b"from the secondary")
        )),
        "ok"
    );
    assert_eq!(read_at(b.addr, 18), b"from the secondary");

    // The secondary grows memory through the primary.
    let (ca, cl) = parse_range(&s.cmd("alloc 1000"));
    assert!(p.mem.is_mapped_here(ca));
    assert_eq!(
        s.cmd(&format!("write {ca:x} {}", hex(b"secondary-grown"))),
        "ok"
    );
    assert_eq!(read_at(ca, 15), b"secondary-grown");

    // Frees unmap everywhere: one by the primary, one asked by the secondary.
    p.mem.free(b, 0).unwrap();
    assert_eq!(s.cmd(&format!("mapped {:x}", b.addr)), "false");
    assert!(!p.mem.is_mapped_here(b.addr));
    assert_eq!(s.cmd(&format!("free {ca:x} {cl:x}")), "ok");
    assert!(!p.mem.is_mapped_here(ca));
    assert_eq!(s.cmd(&format!("mapped {ca:x}")), "false");

    // Events, in order, exactly once each, in both processes.
    let pe = events.lock().unwrap().clone();
    let ps = |k: &str, r: (u64, u64)| format!("{k}:{:x}:{:x}", r.0, r.1);
    assert_eq!(
        pe,
        vec![
            ps("Alloc", (a.addr, a.len)),
            ps("Alloc", (b.addr, b.len)),
            ps("Alloc", (ca, cl)),
            ps("Free", (b.addr, b.len)),
            ps("Free", (ca, cl)),
        ]
    );
    // The secondary's callback was registered after its first sync (which mapped `a`).
    let se = s.cmd("events");
    assert_eq!(
        se,
        [
            ps("Alloc", (b.addr, b.len)),
            ps("Alloc", (ca, cl)),
            ps("Free", (b.addr, b.len)),
            ps("Free", (ca, cl)),
        ]
        .join(",")
    );

    // IOVA: page aligned and stable; VA mode gives the address back.
    let i1 = p.mem.virt2iova(a.addr).unwrap();
    assert_eq!(p.mem.virt2iova(a.addr), Some(i1));
    let ps_a = p.mem.page_size_at(a.addr).unwrap();
    assert_eq!(i1 % ps_a, 0);
    assert_eq!(p.mem.virt2iova(a.addr + 5), Some(i1 + 5));
    if p.mem.iova_mode() == IovaMode::Va {
        assert_eq!(i1, a.addr);
    }
    assert_eq!(
        s.cmd(&format!("iova {:x}", a.addr)),
        format!("Some({i1:x})")
    );
    drop(s);
}

#[test]
fn windows_and_page_by_page_mappings_agree() {
    // One secondary maps each list's memfd as a window (the default), another page by page
    // (MEMPLANE_NO_WINDOWS): the mapping is each process's own business, the memory the same.
    let dir = new_dir();
    let p = primary(&dir, MemOptions::new().no_huge());
    let mut w = secondary(&dir, &[]);
    let mut n = secondary(&dir, &[("MEMPLANE_NO_WINDOWS", "1")]);
    let wpid = w.line().strip_prefix("ready ").unwrap().to_owned();
    let npid = n.line().strip_prefix("ready ").unwrap().to_owned();
    let r = alloc(&p.mem, 2 << 20).unwrap();
    assert_eq!(
        w.cmd(&format!(
            "write {:x} {}",
            r.addr + 8,
            hex(b"through a window")
        )),
        "ok"
    );
    assert_eq!(
        unhex(&n.cmd(&format!("read {:x} 10", r.addr + 8))),
        b"through a window"
    );
    assert_eq!(
        n.cmd(&format!("write {:x} {}", r.addr + 64, hex(b"page by page"))),
        "ok"
    );
    assert_eq!(
        unhex(&w.cmd(&format!("read {:x} c", r.addr + 64))),
        b"page by page"
    );
    assert_eq!(read_at(r.addr + 64, 12), b"page by page");
    assert_eq!(map_perms(&wpid, r.addr), "rw-s");
    assert_eq!(map_perms(&npid, r.addr), "rw-s");
    // Freed: inaccessible in both, a closed window in one (on kernels that can populate on
    // request; page by page on older ones), a private placeholder in the other.
    p.mem.free(r, 0).unwrap();
    let windows = memplane_hugepage::va::can_populate();
    assert_eq!(
        map_perms(&wpid, r.addr),
        if windows { "---s" } else { "---p" }
    );
    assert_eq!(map_perms(&npid, r.addr), "---p");
    assert_eq!(w.cmd(&format!("mapped {:x}", r.addr)), "false");
    assert_eq!(n.cmd(&format!("mapped {:x}", r.addr)), "false");
}

#[test]
fn no_huge_shared_memory() {
    shared_memory_scenario(MemOptions::new().no_huge());
}

fn hugepages_free() -> Option<u64> {
    let size = default_hugepage_size()?;
    (free_hugepages(size) >= 16).then_some(size)
}

#[test]
fn hugepage_shared_memory_and_pages_return() {
    let Some(size) = hugepages_free() else {
        memplane_testkit::skip(
            "hugepage_shared_memory_and_pages_return: fewer than 16 free hugepages",
        );
        return;
    };
    let _serial = HUGE.lock().unwrap_or_else(|e| e.into_inner());
    let before = free_hugepages(size);
    shared_memory_scenario(MemOptions::new().backing(Backing::Memfd));
    assert_eq!(
        memplane_testkit::settles_at(before, || free_hugepages(size)),
        before,
        "hugepages leaked"
    );
}

#[test]
fn hugepage_files_per_page_and_stale_files_cleaned() {
    let Some(size) = hugepages_free() else {
        memplane_testkit::skip(
            "hugepage_files_per_page_and_stale_files_cleaned: no free hugepages",
        );
        return;
    };
    let mnt = Path::new("/dev/hugepages");
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(" /dev/hugepages hugetlbfs "));
    if !mounted {
        memplane_testkit::skip(
            "hugepage_files_per_page_and_stale_files_cleaned: /dev/hugepages not mounted",
        );
        return;
    }
    let _serial = HUGE.lock().unwrap_or_else(|e| e.into_inner());
    let before = free_hugepages(size);
    // A stale file of a dead primary with our prefix is removed at start.
    let stale = mnt.join(format!("{}map_0_999", prefix()));
    std::fs::write(&stale, b"").unwrap();
    shared_memory_scenario(MemOptions::new().backing(Backing::FilePerPage(Some(mnt.to_owned()))));
    assert!(!stale.exists());
    assert!(
        !std::fs::read_dir(mnt).unwrap().flatten().any(|e| e
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{}map_", prefix()))),
        "page files left behind"
    );
    assert_eq!(
        memplane_testkit::settles_at(before, || free_hugepages(size)),
        before,
        "hugepages leaked"
    );
}

/// Hugepage tests count the system's free pages: run them one at a time.
static HUGE: Mutex<()> = Mutex::new(());

#[test]
fn growth_without_a_free_hugepage_fails_cleanly() {
    let Some(size) = hugepages_free() else {
        memplane_testkit::skip(
            "growth_without_a_free_hugepage_fails_cleanly: fewer than 16 free hugepages",
        );
        return;
    };
    let _serial = HUGE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = new_dir();
    let p = primary(&dir, MemOptions::new().backing(Backing::Memfd));
    let mut s = secondary(&dir, &[]);
    assert!(s.line().starts_with("ready"));
    let before = free_hugepages(size);
    // Another user of the machine takes every free hugepage.
    let hog = rustix::fs::memfd_create(
        "hog",
        rustix::fs::MemfdFlags::CLOEXEC
            | rustix::fs::MemfdFlags::HUGETLB
            | rustix::fs::MemfdFlags::from_bits_retain(size.trailing_zeros() << 26),
    )
    .unwrap();
    rustix::fs::ftruncate(&hog, before * size).unwrap();
    rustix::fs::fallocate(&hog, rustix::fs::FallocateFlags::empty(), 0, before * size).unwrap();
    assert_eq!(free_hugepages(size), 0);
    // Growth in the primary and from the secondary: a clear out-of-memory error, nothing
    // half-done (no page counted, nothing mapped anywhere).
    match alloc(&p.mem, size) {
        Err(MemError::Txn(TxnStatus::NoMemory)) | Err(MemError::NoMemory { .. }) => {}
        other => panic!("primary growth without pages: {other:?}"),
    }
    let r = s.cmd(&format!("alloc {:x}", size));
    assert!(r.starts_with("error") && r.contains("memory"), "{r}");
    assert_eq!(p.mem.total_used(), 0);
    // The pages come back: growth works again, and every page returns at the end.
    drop(hog);
    assert_eq!(
        memplane_testkit::settles_at(before, || free_hugepages(size)),
        before
    );
    let r = alloc(&p.mem, size).unwrap();
    assert_eq!(s.cmd(&format!("mapped {:x}", r.addr)), "true");
    p.mem.free(r, 0).unwrap();
    drop(s);
    drop(p);
    assert_eq!(
        memplane_testkit::settles_at(before, || free_hugepages(size)),
        before,
        "hugepages leaked"
    );
}

#[test]
fn secondary_with_taken_addresses_gets_a_clear_error() {
    let dir = new_dir();
    let p = primary(&dir, MemOptions::new().no_huge());
    let base = p.mem.va_range().addr;
    let mut s = secondary(&dir, &[("MEMPLANE_TEST_OCCUPY", &base.to_string())]);
    let l = s.line();
    assert!(l.starts_with("attach-error"), "{l}");
    assert!(l.contains("--base-virtaddr"), "{l}");
    assert!(l.contains(&format!("{base:#x}")), "{l}");
}

#[test]
fn failed_sync_rolls_back_everywhere() {
    let dir = new_dir();
    let p = primary(&dir, MemOptions::new().no_huge());
    let mut good = secondary(&dir, &[]);
    let mut bad = secondary(&dir, &[]);
    good.line();
    bad.line();
    assert_eq!(bad.cmd("failsync 1"), "ok");
    let used_before = p.mem.total_used();
    let r = alloc(&p.mem, 4 << 20);
    match r {
        Err(MemError::Txn(s)) => assert_eq!(s, memplane_core::txn::TxnStatus::SyncFailed),
        other => panic!("expected a rolled back allocation, got {other:?}"),
    }
    // Everyone agrees: nothing allocated, nothing mapped, the pages went back.
    assert_eq!(p.mem.total_used(), used_before);
    assert!(
        p.mem
            .lists()
            .iter()
            .all(|l| l.used == 0 && l.mapped_here == 0)
    );
    let base = p.mem.va_range().addr;
    assert_eq!(good.cmd(&format!("mapped {base:x}")), "false");
    assert_eq!(bad.cmd(&format!("mapped {base:x}")), "false");
    // The good secondary saw the pages come and go, exactly once each.
    let ev = good.cmd("events");
    assert_eq!(ev.matches("Alloc").count(), 1, "{ev}");
    assert_eq!(ev.matches("Free").count(), 1, "{ev}");
    // And the next allocation works.
    let r = alloc(&p.mem, 4 << 20).unwrap();
    assert_eq!(bad.cmd(&format!("mapped {:x}", r.addr)), "true");
}

#[test]
fn limits_are_enforced_without_partial_state() {
    let dir = new_dir();
    let p = primary(&dir, MemOptions::new().no_huge().total_mb(8));
    let a = alloc(&p.mem, 6 << 20).unwrap();
    match alloc(&p.mem, 4 << 20) {
        Err(MemError::Txn(s)) => assert_eq!(s, memplane_core::txn::TxnStatus::LimitExceeded),
        other => panic!("expected the -m limit, got {other:?}"),
    }
    assert_eq!(p.mem.total_used(), a.len);
    p.mem.free(a, 0).unwrap();
    assert_eq!(p.mem.total_used(), 0);
}

#[test]
fn free_of_bad_ranges_is_refused() {
    let dir = new_dir();
    let p = primary(&dir, MemOptions::new().no_huge());
    let a = alloc(&p.mem, 2 << 20).unwrap();
    for bad in [
        memplane_core::txn::MemRange {
            addr: a.addr + 4096,
            len: a.len,
        },
        memplane_core::txn::MemRange {
            addr: a.addr,
            len: a.len * 2,
        },
        memplane_core::txn::MemRange { addr: 1, len: 1 },
    ] {
        assert!(
            matches!(p.mem.free(bad, 0), Err(MemError::Invalid(_))),
            "{bad:?}"
        );
    }
    p.mem.free(a, 0).unwrap();
    assert!(matches!(p.mem.free(a, 0), Err(MemError::Invalid(_))));
}

#[test]
fn dma_mapper_sees_every_page_before_and_after() {
    use memplane_hugepage::vfio::{DmaCall, FakeContainer};
    let dir = new_dir();
    let p = primary(&dir, MemOptions::new().no_huge());
    let early = alloc(&p.mem, 2 << 20).unwrap();
    let fake = Arc::new(FakeContainer::new());
    p.mem.set_dma_mapper(Some(fake.clone())).unwrap();
    let r = alloc(&p.mem, 4 << 20).unwrap();
    p.mem.free(r, 0).unwrap();
    let ps = 2 << 20;
    let want = vec![
        DmaCall::Map {
            vaddr: early.addr,
            iova: p.mem.virt2iova(early.addr).unwrap(),
            len: ps,
        },
        DmaCall::Map {
            vaddr: r.addr,
            iova: r.addr,
            len: ps,
        },
        DmaCall::Map {
            vaddr: r.addr + ps,
            iova: r.addr + ps,
            len: ps,
        },
        DmaCall::Unmap {
            iova: r.addr,
            len: ps,
        },
        DmaCall::Unmap {
            iova: r.addr + ps,
            len: ps,
        },
    ];
    assert_eq!(fake.calls(), want);
    assert_eq!(fake.mapped_bytes(), ps);
}

#[test]
fn hugepage_single_file_segments() {
    let Some(size) = hugepages_free() else {
        memplane_testkit::skip("hugepage_single_file_segments: no free hugepages");
        return;
    };
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(" /dev/hugepages hugetlbfs "));
    if !mounted {
        memplane_testkit::skip("hugepage_single_file_segments: /dev/hugepages not mounted");
        return;
    }
    let _serial = HUGE.lock().unwrap_or_else(|e| e.into_inner());
    let before = free_hugepages(size);
    shared_memory_scenario(
        MemOptions::new().backing(Backing::SingleFile(Some("/dev/hugepages".into()))),
    );
    assert_eq!(
        memplane_testkit::settles_at(before, || free_hugepages(size)),
        before,
        "hugepages leaked"
    );
}

/// The VFIO container reaches a secondary over the channel (a memfd stands in for the
/// container: there is no VFIO device here; the fd's identity is what is checked).
#[test]
fn vfio_container_fd_reaches_secondaries() {
    let dir = new_dir();
    let p = primary(&dir, MemOptions::new().no_huge());
    let mut s = secondary(&dir, &[]);
    s.line();
    assert!(
        s.cmd("vfio").starts_with("error"),
        "no container served yet"
    );
    let fd =
        rustix::fs::memfd_create("fake-vfio-container", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::io::write(&fd, b"container-42").unwrap();
    p.mem.serve_vfio_container(fd).unwrap();
    assert_eq!(s.cmd("vfio"), "container-42");
}

#[test]
fn secondary_of_another_layout_refuses_to_attach() {
    let dir = new_dir();
    let p = primary(&dir, MemOptions::new().no_huge());
    // Make the shared configuration look like another build's: a different layout version.
    let f = dir.path().join(memplane_hugepage::shared::FILE_NAME);
    let mut bytes = std::fs::read(&f).unwrap();
    let saved = bytes.clone();
    bytes[8] = bytes[8].wrapping_add(1); // `version` follows the 8-byte magic
    std::fs::write(&f, &bytes).unwrap();
    let mut s = secondary(&dir, &[]);
    let l = s.line();
    assert!(l.starts_with("attach-error"), "{l}");
    assert!(l.contains("layout version"), "{l}");
    assert!(l.contains("same memplane version"), "{l}");
    std::fs::write(&f, &saved).unwrap();
    drop(p);
}

#[test]
fn per_node_limit_is_enforced() {
    let dir = new_dir();
    let p = primary(
        &dir,
        MemOptions::new()
            .backing(Backing::NoHuge)
            .socket_limit(vec![6]),
    );
    let a = alloc(&p.mem, 4 << 20).unwrap();
    match alloc(&p.mem, 4 << 20) {
        Err(MemError::Txn(s)) => assert_eq!(s, memplane_core::txn::TxnStatus::LimitExceeded),
        other => panic!("expected the --socket-limit, got {other:?}"),
    }
    assert_eq!(p.mem.total_used(), a.len);
}

/// A sync brings only the changed range in line when the secondary saw every change before it;
/// a secondary that missed a change (its sync failed) walks the whole map at the next sync and
/// drops the page it missed the free of, not only the one that sync names.
#[test]
fn secondary_that_missed_a_change_catches_up() {
    let dir = new_dir();
    let p = primary(&dir, MemOptions::new().no_huge());
    let mut good = secondary(&dir, &[]);
    let mut late = secondary(&dir, &[]);
    good.line();
    late.line();
    let a = alloc(&p.mem, 2 << 20).unwrap();
    let b = alloc(&p.mem, 2 << 20).unwrap();
    for s in [&mut good, &mut late] {
        assert_eq!(s.cmd(&format!("mapped {:x}", a.addr)), "true");
        assert_eq!(s.cmd(&format!("mapped {:x}", b.addr)), "true");
    }
    // `late` misses the free of `a`: the free happens (it cannot be undone) but reports the
    // failed sync, and `late` still maps `a`.
    assert_eq!(late.cmd("failsync 1"), "ok");
    match p.mem.free(a, 0) {
        Err(MemError::Txn(s)) => assert_eq!(s, memplane_core::txn::TxnStatus::SyncFailed),
        other => panic!("expected the failed sync to be reported, got {other:?}"),
    }
    assert_eq!(good.cmd(&format!("mapped {:x}", a.addr)), "false");
    assert_eq!(late.cmd(&format!("mapped {:x}", a.addr)), "true");
    // The next change names `b` only; `late` is two versions behind and syncs everything.
    p.mem.free(b, 0).unwrap();
    for s in [&mut good, &mut late] {
        assert_eq!(s.cmd(&format!("mapped {:x}", a.addr)), "false");
        assert_eq!(s.cmd(&format!("mapped {:x}", b.addr)), "false");
    }
    // And both follow the next allocations, the requester's own included.
    let c = alloc(&p.mem, 4 << 20).unwrap();
    let (d, _) = parse_range(&late.cmd("alloc 1000"));
    for s in [&mut good, &mut late] {
        assert_eq!(s.cmd(&format!("mapped {:x}", c.addr)), "true");
        assert_eq!(s.cmd(&format!("mapped {:x}", c.addr + (2 << 20))), "true");
        assert_eq!(s.cmd(&format!("mapped {d:x}")), "true");
    }
    assert!(p.mem.is_mapped_here(d));
}

/// A no-huge primary and two secondaries that both take part in its transactions.
fn primary_and_two_secondaries(dir: &Dir) -> (Primary, Secondary, Secondary) {
    let p = primary(dir, MemOptions::new().no_huge());
    let mut a = secondary(dir, &[]);
    let mut b = secondary(dir, &[]);
    a.line();
    b.line();
    assert_eq!(p.mem.participants_count(), 2);
    (p, a, b)
}

/// Runs a 2 MiB allocation `f` that a dead secondary must not hold up: it succeeds within half
/// a transaction step (the time a secondary is waited for).
fn within_half_a_step(
    f: impl FnOnce() -> Result<memplane_core::txn::MemRange, MemError>,
) -> memplane_core::txn::MemRange {
    let t = std::time::Instant::now();
    let a = f().unwrap();
    assert!(
        t.elapsed() < timeouts().step / 2,
        "the allocation waited {:?} for a dead secondary",
        t.elapsed()
    );
    a
}

/// A secondary that dies in the middle of a transaction (the sync reached its queue; stopped,
/// it never answered) is not waited for either: the primary watches each secondary's process
/// (a pidfd), and its death ends the sync's wait for it at once, long before the step timeout.
#[test]
fn secondary_dying_mid_sync_costs_no_timeout() {
    let dir = new_dir();
    let (p, mut live, mut dying) = primary_and_two_secondaries(&dir);
    // The primary's service thread has seen both sockets appear and watches both processes.
    let start = std::time::Instant::now();
    while p._ch.stats().watched_processes < 2 {
        assert!(
            start.elapsed() < memplane_testkit::ANSWER,
            "the secondaries are not watched"
        );
        std::thread::yield_now();
    }
    memplane_testkit::stop(dying.pid());
    let sent = p._ch.stats().endpoint.tx_ok;
    let a = within_half_a_step(|| {
        std::thread::scope(|s| {
            let grow = s.spawn(|| alloc(&p.mem, 2 << 20));
            // The sync sits in both secondaries' queues (two more datagrams sent; nothing else
            // sends meanwhile), and the stopped one will never answer it.
            while p._ch.stats().endpoint.tx_ok < sent + 2 {
                assert!(
                    !grow.is_finished(),
                    "the allocation did not wait for the stopped secondary"
                );
                std::thread::yield_now();
            }
            dying.kill();
            grow.join().unwrap()
        })
    });
    assert_eq!(live.cmd(&format!("mapped {:x}", a.addr)), "true");
    assert!(p.mem.is_mapped_here(a.addr));
    assert_eq!(p.mem.participants_count(), 1);
    let st = p._ch.stats();
    assert_eq!((st.watched_processes, st.peers_exited), (1, 1));
}

/// A secondary that died is not waited for (its socket is closed: the sync cannot be sent to
/// it), and is dropped from the participants after the transaction that found it gone.
#[test]
fn dead_secondary_costs_no_timeout() {
    let dir = new_dir();
    let (p, mut live, mut dead) = primary_and_two_secondaries(&dir);
    dead.kill();
    let a = within_half_a_step(|| alloc(&p.mem, 2 << 20));
    assert_eq!(live.cmd(&format!("mapped {:x}", a.addr)), "true");
    assert_eq!(p.mem.participants_count(), 1);
    let (b, bl) = parse_range(&live.cmd("alloc 1000"));
    assert!(p.mem.is_mapped_here(b));
    assert_eq!(live.cmd(&format!("free {b:x} {bl:x}")), "ok");
}
