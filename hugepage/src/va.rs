//! Address space: the reservation every process makes at the same address, and the page
//! mappings placed inside it.
//!
//! This module holds the memory layer's `mmap` calls. A [`Reservation`] is a `PROT_NONE`
//! anonymous mapping that owns a range: pages are mapped over it with `MAP_FIXED` (safe because
//! the range is ours), and an unmapped page is replaced by `PROT_NONE` again, so the hole never
//! opens for some other `mmap` of this process to take. Where a list's pages live in one file
//! (memfd, single-file segments), that file is mapped over the whole list once, inaccessible, as a
//! *window*, and a page is mapped and unmapped by opening and closing it (with `mprotect`, or for
//! hugetlb windows by mapping the window's own pages again over it: [`WindowOp`]). A secondary
//! reserves the primary's exact range with `MAP_FIXED_NOREPLACE` and checks the address it got;
//! it never clobbers a mapping it already has.

use std::os::fd::BorrowedFd;

use rustix::io::Errno;
use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};

use crate::error::MemError;

/// The default start of the reservation (DPDK's, on 64-bit: 4 GiB).
pub const DEFAULT_BASE: u64 = 1 << 32;

/// Whether the kernel can populate a range on request (`MADV_POPULATE_WRITE`, Linux 5.14), which
/// windows need: asked with an empty range at address 0, which the kernel checks and then skips.
pub fn can_populate() -> bool {
    // SAFETY: a zero-length madvise touches no memory; the kernel only validates the advice.
    unsafe { libc::madvise(std::ptr::null_mut(), 0, libc::MADV_POPULATE_WRITE) == 0 }
}

/// `e` from mapping or populating `[va, va + len)` (`what`): the area limit when that is what
/// the kernel ran into (see [`area_limit`]), out of memory when it had no page to give
/// (`ENOMEM`), an I/O error otherwise.
fn no_page_or(e: std::io::Error, what: &str, va: u64, len: u64) -> MemError {
    if let Some(limit) = area_limit(&e, what, va, len) {
        return limit;
    }
    if e.raw_os_error() == Some(libc::ENOMEM) {
        MemError::NoMemory {
            what: format!("no page to map at {va:#x} ({len} bytes)"),
        }
    } else {
        MemError::io(format!("{what} {len} bytes at {va:#x}"), e)
    }
}

/// The limit on this process's memory areas (`vm.max_map_count`), when a change of mappings
/// over `[va, va + len)` (`what`) failed with `ENOMEM` because of it: the kernel refuses a change
/// that would split an area past that count with the same error as a lack of memory. Hugetlb
/// areas never merge, so a window keeps an area per page boundary it ever opened, and a process
/// that has used some 30,000 distinct pages reaches the default limit (65,530):
/// `docs/heap-benchmark.md` section 4. Counted only on this error path, without allocating (the
/// process may be out of areas for the allocator's own mappings too).
fn area_limit(e: &std::io::Error, what: &str, va: u64, len: u64) -> Option<MemError> {
    use std::io::Read;
    if e.raw_os_error() != Some(libc::ENOMEM) {
        return None;
    }
    let mut buf = [0u8; 4096];
    let max = {
        let mut f = std::fs::File::open("/proc/sys/vm/max_map_count").ok()?;
        let n = f.read(&mut buf).ok()?;
        std::str::from_utf8(&buf[..n])
            .ok()?
            .trim()
            .parse::<usize>()
            .ok()?
    };
    let mut maps = std::fs::File::open("/proc/self/maps").ok()?;
    let mut areas = 0usize;
    loop {
        match maps.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => areas += buf[..n].iter().filter(|&&b| b == b'\n').count(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    // A change splits an area in three at most: within two of the limit, it is the limit.
    (areas + 2 >= max).then(|| MemError::LimitExceeded {
        what: format!(
            "this process has {areas} memory areas, and vm.max_map_count allows {max}: {what} \
             {len} bytes at {va:#x} needs more (hugetlb areas never merge; raise \
             vm.max_map_count)"
        ),
    })
}

/// `e` from a change of mappings over `[va, va + len)` (`what`): the area limit when that is
/// what the kernel ran into, an I/O error otherwise.
fn io_or_limit(e: Errno, what: &str, va: u64, len: u64) -> MemError {
    let e = e.into();
    area_limit(&e, what, va, len)
        .unwrap_or_else(|| MemError::io(format!("{what} {len} bytes at {va:#x}"), e))
}

/// `e` from populating `[va, va + len)`: a page the kernel cannot supply shows as `EFAULT`
/// there, and is out of memory.
fn populate_err(e: std::io::Error, va: u64, len: u64) -> MemError {
    let e = match e.raw_os_error() {
        Some(libc::EFAULT) => std::io::Error::from_raw_os_error(libc::ENOMEM),
        _ => e,
    };
    no_page_or(e, "populate", va, len)
}

/// How the population of a range may be shared out between threads.
///
/// The kernel clears each new hugepage in the thread that faults it in: 95% of a heap growth is
/// that clearing (`clear_page_erms`), a few hundred microseconds a 2 MiB page on the machines
/// measured. Pages are independent, so a range of several pages is cleared by several threads
/// at once: the caller takes one part, short-lived helpers the rest, as QEMU's preallocation
/// threads do. Helpers inherit the caller's CPU affinity; a caller pinned to one CPU gets none
/// (they would only take turns with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spread {
    /// The unit of division: whole pages (a part never splits one).
    pub chunk: u64,
    /// The most threads, the caller included (1: the caller alone).
    pub threads: usize,
}

impl Spread {
    /// The caller alone.
    pub const ALONE: Spread = Spread {
        chunk: u64::MAX,
        threads: 1,
    };

    /// Up to `max` threads (no more than the CPUs the calling thread may run on, counted when
    /// there is more than one part), by whole pages of `page` bytes and at least [`MIN_PART`]
    /// bytes a thread.
    pub fn pages(page: u64, max: usize) -> Spread {
        let page = page.max(1);
        Spread {
            chunk: page.saturating_mul(MIN_PART.div_ceil(page)),
            threads: max.max(1),
        }
    }
}

/// The CPUs the calling thread may run on (1 if the kernel does not say): one
/// `sched_getaffinity`, where `std::thread::available_parallelism` also reads cgroup files
/// (tens of microseconds, measured as a one-page growth 1.3x slower).
pub fn cpus_here() -> usize {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity writes at most
    // `size_of::<cpu_set_t>()` bytes into it, and CPU_COUNT only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 1;
        }
        (libc::CPU_COUNT(&set) as usize).max(1)
    }
}

/// The most threads one population uses, the caller included.
const MAX_POPULATE_THREADS: usize = 8;
/// The least [`Spread::pages`] gives a thread to populate: starting and joining a helper costs
/// tens of microseconds, clearing 2 MiB a hundred or more.
pub const MIN_PART: u64 = 2 << 20;

/// One thread's part of a population, and its result (an errno, 0 for success).
struct Part {
    va: u64,
    len: u64,
    errno: i32,
}

impl Part {
    /// Populates the part here.
    ///
    /// # Safety
    ///
    /// As [`populate`]'s: the part lies in a range that function may populate.
    unsafe fn run(&mut self) {
        // SAFETY: the part lies in the caller's reservation under shared mappings of the memory
        // layer's page files (the contract): populating only faults pages of those files in,
        // the way a first write would, and changes no byte of any memory.
        let r = unsafe {
            libc::madvise(
                self.va as *mut _,
                self.len as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        self.errno = if r == 0 {
            0
        } else {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
    }
}

/// A helper thread's body: populates the [`Part`] `arg` points to.
extern "C" fn run_part(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `populate` passes a pointer to a `Part` of its own, which it neither touches nor
    // drops until it has joined this thread; the part is one `populate` may populate.
    unsafe { (*arg.cast::<Part>()).run() };
    std::ptr::null_mut()
}

/// Faults `[va, va + len)` in for writing (`MADV_POPULATE_WRITE`), shared out as `spread` says;
/// the first error of any part.
///
/// Helpers are bare `pthread`s, not `std` threads: a `std` thread allocates as it starts, and
/// with memplane's global allocator installed, an allocation while the heap grows (this is
/// the growth) would wait for that growth.
///
/// # Safety
///
/// The range lies inside the caller's reservation and is covered by shared mappings of the
/// memory layer's page files (a window, or pages mapped one by one).
unsafe fn populate(va: u64, len: u64, spread: Spread) -> std::io::Result<()> {
    let chunks = len.div_ceil(spread.chunk.max(1));
    let mut n = (spread.threads.min(MAX_POPULATE_THREADS) as u64)
        .min(chunks)
        .max(1) as usize;
    if n > 1 {
        // Helpers inherit the caller's affinity: no more of them than its CPUs.
        n = n.min(cpus_here());
    }
    // Whole chunks per part, the caller's part first: part k starts after the chunks of the
    // parts before it (the first `extra` parts take one more), the last ends with the range.
    let (per, extra) = (chunks / n as u64, chunks % n as u64);
    let mut parts: [Part; MAX_POPULATE_THREADS] = std::array::from_fn(|_| Part {
        va: 0,
        len: 0,
        errno: 0,
    });
    for (k, p) in parts.iter_mut().enumerate().take(n) {
        let k = k as u64;
        let start = (k * per + k.min(extra)).saturating_mul(spread.chunk);
        let count = per + u64::from(k < extra);
        (p.va, p.len) = (
            va + start,
            count.saturating_mul(spread.chunk).min(len - start),
        );
    }
    let (own, rest) = parts.split_at_mut(1);
    let mut threads: [Option<libc::pthread_t>; MAX_POPULATE_THREADS] = [None; MAX_POPULATE_THREADS];
    for (p, t) in rest.iter_mut().take(n - 1).zip(threads.iter_mut()) {
        let mut id: libc::pthread_t = 0;
        // SAFETY: `run_part` gets a pointer to `p`, which stays in place and untouched here
        // until the join below (every started thread is joined before `parts` goes away).
        let r = unsafe {
            libc::pthread_create(&mut id, std::ptr::null(), run_part, (p as *mut Part).cast())
        };
        // A helper that cannot start leaves its part to the caller.
        *t = (r == 0).then_some(id);
    }
    // SAFETY: the caller's part of the range (this function's contract).
    unsafe { own[0].run() };
    for (p, t) in rest.iter_mut().take(n - 1).zip(threads) {
        match t {
            // SAFETY: a thread started above and not yet joined; it returns a null pointer.
            Some(id) => unsafe {
                libc::pthread_join(id, std::ptr::null_mut());
            },
            // SAFETY: as above, a part of the caller's range.
            None => unsafe { p.run() },
        }
    }
    match parts.iter().take(n).find(|p| p.errno != 0) {
        Some(p) => Err(std::io::Error::from_raw_os_error(p.errno)),
        None => Ok(()),
    }
}

/// How a window's pages are opened and closed.
///
/// `mprotect` is the cheaper call when this process runs alone (3 against 6 us a 2 MiB page
/// here), but on a hugetlb mapping the kernel flushes the range from every CPU that runs a
/// thread of this process, whether or not anything was mapped there: an interrupt to each busy
/// worker and 26 us a page here with one busy thread on the other CPU. Mapping the window's
/// own file pages again over the range (`Remap`) changes the same access without that flush
/// when nothing was mapped (5-6 us, busy thread or not), and closes with one flush (28 against
/// 43 us). Hugetlb windows use `Remap`; windows of ordinary memory, where `mprotect` flushes
/// only what was mapped, use `Protect`.
#[derive(Clone, Copy, Debug)]
pub enum WindowOp<'a> {
    /// `mprotect` the range.
    Protect,
    /// Map `fd` at `offset` (the window's file, where the range starts in it) over the range.
    Remap {
        /// The window's file.
        fd: BorrowedFd<'a>,
        /// The range's offset in it.
        offset: u64,
    },
}

/// An address range reserved (`PROT_NONE`) in this process; unmapped when dropped.
pub struct Reservation {
    base: u64,
    len: u64,
}

// SAFETY: a reservation is an address range, not data; the mapping it names is process-wide and
// this type only hands out integers and maps/unmaps through its own methods.
unsafe impl Send for Reservation {}
// SAFETY: as above; every method takes the range by value and the kernel serialises mmap calls.
unsafe impl Sync for Reservation {}

fn anon_flags() -> MapFlags {
    MapFlags::PRIVATE | MapFlags::NORESERVE
}

impl Reservation {
    /// Reserves `len` bytes aligned to `align`, trying `hint` first (and a few ranges right
    /// after it, each one reservation further: what occupies the hint is often an earlier
    /// reservation of the same size), else wherever the kernel puts it.
    ///
    /// Staying near the hint matters: high addresses are where the kernel puts other processes'
    /// libraries and stacks, so a layout there is likely to collide with a secondary's own
    /// mappings.
    pub fn anywhere(hint: u64, len: u64, align: u64) -> Result<Reservation, MemError> {
        let align = align.max(4096);
        // An unaligned hint is rounded up (DPDK aligns `--base-virtaddr` to the page size too);
        // the kernel would take it for no hint at all.
        let hint = hint.checked_next_multiple_of(align).unwrap_or(hint);
        let span = len
            .checked_add(align)
            .ok_or_else(|| MemError::Invalid(format!("reservation of {len} bytes")))?;
        for attempt in 0..5u64 {
            let want = hint.saturating_add(attempt.saturating_mul(span));
            // SAFETY: an anonymous PROT_NONE mapping with a non-fixed hint cannot alter any
            // existing mapping; the kernel picks a free range.
            let p = unsafe {
                rustix::mm::mmap_anonymous(
                    want as *mut _,
                    span as usize,
                    ProtFlags::empty(),
                    anon_flags(),
                )
            }
            .map_err(|e| {
                MemError::io(format!("reserve {span} bytes of address space"), e.into())
            })?;
            let got = p as u64;
            let start = got.next_multiple_of(align);
            // Trim the over-reservation on both sides.
            // SAFETY: both ranges lie inside the mapping just created and nothing else uses
            // them yet.
            unsafe {
                if start > got {
                    let _ = rustix::mm::munmap(p, (start - got) as usize);
                }
                let end = start + len;
                let tail = got + span - end;
                if tail > 0 {
                    let _ = rustix::mm::munmap(end as *mut _, tail as usize);
                }
            }
            let r = Reservation { base: start, len };
            if want.checked_next_multiple_of(align) == Some(start) || attempt == 4 {
                return Ok(r);
            }
            // Not where we asked: try the next candidate (the kernel may honour it).
            drop(r);
        }
        unreachable!("the last attempt always returns")
    }

    /// Reserves exactly `[base, base + len)`, refusing to touch anything already mapped there.
    pub fn exact(base: u64, len: u64) -> Result<Reservation, MemError> {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping: it fails with EEXIST
        // instead, so no memory of this process is affected.
        let r = unsafe {
            rustix::mm::mmap_anonymous(
                base as *mut _,
                len as usize,
                ProtFlags::empty(),
                anon_flags() | MapFlags::FIXED_NOREPLACE,
            )
        };
        match r {
            Ok(p) if p as u64 == base => Ok(Reservation { base, len }),
            Ok(p) => {
                // An old kernel that ignores NOREPLACE treats it as a hint: undo and refuse.
                // SAFETY: `p` is the mapping just created, of `len` bytes, used by nobody.
                unsafe {
                    let _ = rustix::mm::munmap(p, len as usize);
                }
                Err(MemError::VaConflict {
                    start: base,
                    len,
                    detail: format!("the kernel placed it at {:#x}", p as u64),
                })
            }
            Err(Errno::EXIST) => Err(MemError::VaConflict {
                start: base,
                len,
                detail: "another mapping of this process overlaps it".into(),
            }),
            Err(e) => Err(MemError::io(
                format!("reserve [{base:#x}, {:#x})", base + len),
                e.into(),
            )),
        }
    }

    /// Start of the range.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Length of the range.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty reservation.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, va: u64, len: u64) -> Result<(), MemError> {
        if va < self.base || va.checked_add(len).is_none_or(|e| e > self.base + self.len) {
            return Err(MemError::Invalid(format!(
                "[{va:#x}, +{len:#x}) is outside the reservation"
            )));
        }
        Ok(())
    }

    /// Maps `len` bytes of `fd` at `offset` over `va` (shared, read-write), populating the
    /// pages so they exist (zeroed) before anyone is told about them.
    pub fn map_shared(
        &self,
        va: u64,
        len: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        populate: bool,
    ) -> Result<(), MemError> {
        self.check(va, len)?;
        let mut flags = MapFlags::SHARED | MapFlags::FIXED;
        if populate {
            flags |= MapFlags::POPULATE;
        }
        // SAFETY: [va, va+len) lies inside this reservation (checked above), which this process
        // owns exclusively: MAP_FIXED replaces only our own PROT_NONE placeholder or an earlier
        // mapping of the same page that the memory layer has already retired.
        let p = unsafe {
            rustix::mm::mmap(
                va as *mut _,
                len as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                flags,
                fd,
                offset,
            )
        }
        .map_err(|e| no_page_or(e.into(), "map", va, len))?;
        debug_assert_eq!(p as u64, va);
        Ok(())
    }

    /// Maps the whole of `fd` (from offset 0, `len` bytes) over `[va, va + len)` as a *window*:
    /// shared, without a hugepage reservation, and inaccessible (`PROT_NONE`) until
    /// [`Reservation::open_window`] opens a part of it. A page that is mapped and unmapped many
    /// times then costs an open and a close each way (see [`WindowOp`]) instead of replacing an
    /// anonymous placeholder by a new mapping and back, and touching a page that is not open
    /// still faults, as the placeholder does.
    pub fn map_window(&self, va: u64, len: u64, fd: BorrowedFd<'_>) -> Result<(), MemError> {
        self.check(va, len)?;
        // SAFETY: [va, va+len) lies inside this reservation (checked above), which this process
        // owns exclusively; nothing is mapped there yet but our own placeholder, which this
        // replaces.
        unsafe {
            rustix::mm::mmap(
                va as *mut _,
                len as usize,
                ProtFlags::empty(),
                MapFlags::SHARED | MapFlags::FIXED | MapFlags::NORESERVE,
                fd,
                0,
            )
        }
        .map_err(|e| io_or_limit(e, "map window of", va, len))?;
        Ok(())
    }

    /// Makes `[va, va + len)` of a window readable and writable and faults its pages in for
    /// writing (allocated in the file where they are holes, so zero-filled): a page the kernel
    /// cannot supply is [`MemError::NoMemory`] here, not a `SIGBUS` later.
    ///
    /// How the access changes is `how`'s: see [`WindowOp`].
    ///
    /// `spread` says how the population may be shared out between threads (see [`Spread`]).
    pub fn open_window(
        &self,
        va: u64,
        len: u64,
        how: WindowOp<'_>,
        spread: Spread,
    ) -> Result<(), MemError> {
        self.set_window(va, len, true, how, "open")?;
        // SAFETY: the range is inside our reservation (checked by `set_window`) and covered by
        // a window mapping of the memory layer's file (this method's use).
        if let Err(e) = unsafe { populate(va, len, spread) } {
            let _ = self.close_window(va, len, how);
            return Err(populate_err(e, va, len));
        }
        Ok(())
    }

    /// Faults in the pages mapped over `[va, va + len)` by [`Reservation::map_shared`] without
    /// populating them, shared out as `spread` says (see [`Reservation::open_window`]). The
    /// caller unmaps the range if this fails.
    pub fn populate(&self, va: u64, len: u64, spread: Spread) -> Result<(), MemError> {
        self.check(va, len)?;
        // SAFETY: the range is inside our reservation (checked above); the memory layer calls
        // this only over shared mappings of its own page files (this method's use).
        unsafe { populate(va, len, spread) }.map_err(|e| populate_err(e, va, len))
    }

    /// Makes `[va, va + len)` of a window inaccessible again (see [`WindowOp`]).
    pub fn close_window(&self, va: u64, len: u64, how: WindowOp<'_>) -> Result<(), MemError> {
        self.set_window(va, len, false, how, "close")
    }

    /// Opens (`open`) or closes `[va, va + len)` of a window, as `how` says (`what` names the
    /// step in errors).
    fn set_window(
        &self,
        va: u64,
        len: u64,
        open: bool,
        how: WindowOp<'_>,
        what: &str,
    ) -> Result<(), MemError> {
        self.check(va, len)?;
        let err = |e: Errno| io_or_limit(e, what, va, len);
        match how {
            WindowOp::Protect => {
                let prot = if open {
                    MprotectFlags::READ | MprotectFlags::WRITE
                } else {
                    MprotectFlags::empty()
                };
                // Opening changes no memory contents; closing happens only once the memory
                // layer has retired the pages (no user object lives in them).
                // SAFETY: the range is inside our reservation (checked above) and covered by a
                // window of the memory layer's file; revoking access cannot break a live
                // reference (above).
                unsafe { rustix::mm::mprotect(va as *mut _, len as usize, prot) }.map_err(err)
            }
            WindowOp::Remap { fd, offset } => {
                let prot = if open {
                    ProtFlags::READ | ProtFlags::WRITE
                } else {
                    ProtFlags::empty()
                };
                // Each call maps the window of `fd` at `offset` again over itself, with the
                // step's access (or closed, putting the window back): the same file pages at the
                // same addresses; closing happens only once the pages are retired (above).
                let remap = |prot| {
                    // SAFETY: the range is inside our reservation (checked above), and remapping
                    // its own file pages over it changes no live reference's meaning.
                    unsafe {
                        rustix::mm::mmap(
                            va as *mut _,
                            len as usize,
                            prot,
                            MapFlags::SHARED | MapFlags::FIXED | MapFlags::NORESERVE,
                            fd,
                            offset,
                        )
                    }
                };
                match remap(prot) {
                    Ok(p) => {
                        debug_assert_eq!(p as u64, va);
                        Ok(())
                    }
                    Err(e) => {
                        // A kernel before 6.12 may have taken the old mapping away before it
                        // failed: never leave a hole in the reservation (another mapping of
                        // this process could land there). Put the closed window back, or at
                        // least a placeholder.
                        if remap(ProtFlags::empty()).is_err() {
                            let _ = self.unmap(va, len);
                        }
                        Err(err(e))
                    }
                }
            }
        }
    }

    /// Replaces `[va, va + len)` by a fresh `PROT_NONE` placeholder: the pages are no longer
    /// mapped here, and the range stays reserved.
    pub fn unmap(&self, va: u64, len: u64) -> Result<(), MemError> {
        self.check(va, len)?;
        // SAFETY: the range is inside our reservation; whatever was mapped there belongs to the
        // memory layer, which has retired it (no user object lives in a freed page).
        unsafe {
            rustix::mm::mmap_anonymous(
                va as *mut _,
                len as usize,
                ProtFlags::empty(),
                anon_flags() | MapFlags::FIXED,
            )
        }
        .map_err(|e| io_or_limit(e, "unmap", va, len))?;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the whole range is this reservation's (placeholders and pages mapped into it);
        // it is being dropped, so nothing of the memory layer uses it any more.
        unsafe {
            let _ = rustix::mm::munmap(self.base as *mut _, self.len as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of opening and closing: only the range changes access, its pages are
    /// populated (zero) on opening, and what was written survives a close and a reopen (the
    /// same file pages come back).
    #[test]
    fn a_window_opens_populated_and_closes() {
        use std::os::fd::{AsFd, AsRawFd};
        let page = 4096u64;
        let len = 16 * page;
        if !can_populate() {
            memplane_testkit::skip("the kernel has no MADV_POPULATE_WRITE (Linux < 5.14)");
            return;
        }
        for remap in [false, true] {
            let r = Reservation::anywhere(DEFAULT_BASE << 5, len, 1 << 21).unwrap();
            let fd = rustix::fs::memfd_create("va-window-test", rustix::fs::MemfdFlags::CLOEXEC)
                .unwrap();
            rustix::fs::ftruncate(&fd, len).unwrap();
            r.map_window(r.base(), len, fd.as_fd()).unwrap();
            assert_eq!(memplane_testkit::map_perms("self", r.base()), "---s");
            let va = r.base() + 4 * page;
            let how = if remap {
                WindowOp::Remap {
                    fd: fd.as_fd(),
                    offset: 4 * page,
                }
            } else {
                WindowOp::Protect
            };
            r.open_window(va, 2 * page, how, Spread::ALONE).unwrap();
            assert_eq!(memplane_testkit::map_perms("self", va), "rw-s", "{how:?}");
            assert_eq!(
                memplane_testkit::map_perms("self", va - page),
                "---s",
                "only the opened pages are accessible ({how:?})"
            );
            assert_eq!(memplane_testkit::map_perms("self", va + 2 * page), "---s");
            // Populated: the file now holds those two pages, zero-filled.
            let st = rustix::fs::fstat(&fd).unwrap();
            assert_eq!(st.st_blocks as u64 * 512, 2 * page, "{how:?}");
            let second = (va + page) as *mut u64;
            // SAFETY: [va, va + 2 pages) was just opened read-write.
            unsafe {
                assert_eq!(std::ptr::read_volatile(va as *const u64), 0);
                std::ptr::write_volatile(second, 0x5eed);
            }
            r.close_window(va, 2 * page, how).unwrap();
            assert_eq!(memplane_testkit::map_perms("self", va), "---s", "{how:?}");
            r.open_window(va, 2 * page, how, Spread::ALONE).unwrap();
            // SAFETY: opened read-write again.
            let kept = unsafe { std::ptr::read_volatile(second) };
            assert_eq!(kept, 0x5eed, "{how:?}");
            r.close_window(va, 2 * page, how).unwrap();
            // Closed again, the window is one mapping again: opening and closing many times
            // does not pile up areas.
            let areas = std::fs::read_to_string("/proc/self/maps")
                .unwrap()
                .lines()
                .filter(|l| {
                    let start = l.split('-').next().unwrap_or("");
                    u64::from_str_radix(start, 16)
                        .is_ok_and(|a| a >= r.base() && a < r.base() + len)
                })
                .count();
            assert_eq!(areas, 1, "{how:?}");
            assert!(
                r.open_window(r.base() + len, page, how, Spread::ALONE)
                    .is_err(),
                "outside"
            );
        }

        // A remap the kernel refuses (a read-only descriptor cannot be mapped shared and
        // writable) fails with an error and leaves the range closed and still reserved: no hole.
        let r = Reservation::anywhere(DEFAULT_BASE << 5, len, 1 << 21).unwrap();
        let fd =
            rustix::fs::memfd_create("va-window-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, len).unwrap();
        r.map_window(r.base(), len, fd.as_fd()).unwrap();
        let ro = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd())).unwrap();
        let va = r.base() + 2 * page;
        let bad = WindowOp::Remap {
            fd: ro.as_fd(),
            offset: 2 * page,
        };
        let e = r
            .open_window(va, page, bad, Spread::ALONE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("open"), "{e}");
        assert_eq!(memplane_testkit::map_perms("self", va), "---s");
    }

    /// A population shared out between threads fills every page of the range and no other,
    /// whatever the split (7 pages on 3 threads: 3, 2 and 2); a part that fails in a helper
    /// fails the open, which closes the range again.
    #[test]
    fn a_window_populated_by_several_threads_gets_every_page_and_their_errors() {
        use std::os::fd::AsFd;
        let page = 4096u64;
        let len = 16 * page;
        if !can_populate() {
            memplane_testkit::skip("the kernel has no MADV_POPULATE_WRITE (Linux < 5.14)");
            return;
        }
        let spread = Spread {
            chunk: page,
            threads: 3,
        };
        let r = Reservation::anywhere(DEFAULT_BASE << 5, len, 1 << 21).unwrap();
        let fd =
            rustix::fs::memfd_create("va-window-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        // Only 12 pages of file: the window's last 4 pages have none behind them.
        rustix::fs::ftruncate(&fd, 12 * page).unwrap();
        r.map_window(r.base(), len, fd.as_fd()).unwrap();
        let va = r.base() + page;
        r.open_window(va, 7 * page, WindowOp::Protect, spread)
            .unwrap();
        let st = rustix::fs::fstat(&fd).unwrap();
        assert_eq!(st.st_blocks as u64 * 512, 7 * page);
        for k in 0..7 {
            assert_eq!(memplane_testkit::map_perms("self", va + k * page), "rw-s");
            // SAFETY: [va, va + 7 pages) was just opened read-write.
            let word = unsafe { std::ptr::read_volatile((va + k * page) as *const u64) };
            assert_eq!(word, 0);
        }
        assert_eq!(memplane_testkit::map_perms("self", r.base()), "---s");
        assert_eq!(memplane_testkit::map_perms("self", va + 7 * page), "---s");
        // Pages 9..15 in parts of 2: the caller's (9, 10) is fine, the helpers' (11, 12 and
        // 13, 14) reach past the end of the file.
        let va = r.base() + 9 * page;
        let e = r
            .open_window(va, 6 * page, WindowOp::Protect, spread)
            .unwrap_err();
        assert!(matches!(e, MemError::NoMemory { .. }), "{e}");
        for k in 0..6 {
            assert_eq!(memplane_testkit::map_perms("self", va + k * page), "---s");
        }
    }

    #[test]
    fn exact_refuses_an_overlap() {
        let a = Reservation::anywhere(DEFAULT_BASE << 4, 1 << 24, 1 << 21).unwrap();
        assert_eq!(a.base() % (1 << 21), 0);
        match Reservation::exact(a.base() + 4096, 1 << 20) {
            Err(MemError::VaConflict { start, .. }) => assert_eq!(start, a.base() + 4096),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("overlap accepted"),
        }
        let base = a.base();
        drop(a);
        let b = Reservation::exact(base, 1 << 24).unwrap();
        assert_eq!(b.base(), base);
    }
}
