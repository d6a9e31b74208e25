//! A window that cannot open or map because the process is out of memory areas
//! (`vm.max_map_count`) says so, as a limit, instead of "out of memory" or a bare `ENOMEM`; once
//! areas are free again the same calls succeed.
//!
//! Its own test binary: the test fills the process's areas up to the kernel's limit, which
//! would fail any other test's mappings running beside it.

use std::os::fd::AsFd;

use memplane_hugepage::MemError;
use memplane_hugepage::va::{DEFAULT_BASE, Reservation, Spread, WindowOp};

const PAGE: u64 = 4096;

fn areas() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

/// An anonymous `PROT_NONE` range whose every other page is then made readable, each change
/// splitting the range into two more areas, until the kernel refuses one: the process then has
/// as many areas as it may. Unmapped when dropped.
struct Filler {
    base: *mut libc::c_void,
    len: usize,
}

impl Filler {
    fn fill() -> Filler {
        let max: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let pages = max + 64;
        let len = pages * PAGE as usize;
        // SAFETY: a new private anonymous mapping chosen by the kernel, unmapped in `drop`.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let f = Filler { base, len };
        for k in (1..pages).step_by(2) {
            let at = (base as usize + k * PAGE as usize) as *mut libc::c_void;
            // SAFETY: a page of the mapping above, which nothing else uses.
            if unsafe { libc::mprotect(at, PAGE as usize, libc::PROT_READ) } != 0 {
                assert_eq!(
                    std::io::Error::last_os_error().raw_os_error(),
                    Some(libc::ENOMEM)
                );
                return f;
            }
        }
        panic!("{pages} splits did not reach vm.max_map_count ({max})");
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `fill`, used by nothing else.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

fn assert_area_limit(r: Result<(), MemError>, what: &str) {
    match r {
        Err(MemError::LimitExceeded { what: w }) => {
            assert!(w.contains("vm.max_map_count"), "{what}: {w}");
        }
        other => panic!("{what}: expected the area limit, got {other:?}"),
    }
}

#[test]
fn a_window_past_the_area_limit_says_so_and_works_again_after() {
    let len = 16 * PAGE;
    let r = Reservation::anywhere(DEFAULT_BASE << 6, len, 1 << 21).unwrap();
    let fd = rustix::fs::memfd_create("area-limit-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    r.map_window(r.base(), len, fd.as_fd()).unwrap();
    let before = areas();
    let va = r.base() + 4 * PAGE;
    let remap = WindowOp::Remap {
        fd: fd.as_fd(),
        offset: 4 * PAGE,
    };
    {
        let _filled = Filler::fill();
        // Opening a page inside the window splits its area in three: past the limit.
        assert_area_limit(
            r.open_window(va, PAGE, WindowOp::Protect, Spread::ALONE),
            "open (mprotect)",
        );
        assert_area_limit(
            r.open_window(va, PAGE, remap, Spread::ALONE),
            "open (remap)",
        );
        assert_area_limit(
            r.map_shared(va, PAGE, fd.as_fd(), 4 * PAGE, true),
            "map a page",
        );
    }
    // The filler is gone: the same calls work, and the failed ones left the window whole.
    assert_eq!(areas(), before);
    assert_eq!(memplane_testkit::map_perms("self", va), "---s");
    r.open_window(va, PAGE, WindowOp::Protect, Spread::ALONE)
        .unwrap();
    assert_eq!(memplane_testkit::map_perms("self", va), "rw-s");
    r.close_window(va, PAGE, WindowOp::Protect).unwrap();
}
