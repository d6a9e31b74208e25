//! Address space: the reservation every process makes at the same address, and the page
//! mappings placed inside it.
//!
//! This module holds the memory layer's `mmap` calls. A [`Reservation`] is a `PROT_NONE`
//! anonymous mapping that owns a range: pages are mapped over it with `MAP_FIXED` (safe because
//! the range is ours), and an unmapped page is replaced by `PROT_NONE` again, so the hole never
//! opens for some other `mmap` of this process to take. A secondary reserves the primary's exact
//! range with `MAP_FIXED_NOREPLACE` and checks the address it got; it never clobbers a mapping
//! it already has.

use std::os::fd::BorrowedFd;

use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};

use crate::error::MemError;

/// The default start of the reservation (DPDK's, on 64-bit: 4 GiB).
pub const DEFAULT_BASE: u64 = 1 << 32;

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
            if start == want.next_multiple_of(align) || attempt == 4 {
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
        .map_err(|e| {
            let e: std::io::Error = e.into();
            if e.raw_os_error() == Some(libc::ENOMEM) {
                MemError::NoMemory {
                    what: format!("no page to map at {va:#x} ({len} bytes)"),
                }
            } else {
                MemError::io(format!("map {len} bytes at {va:#x}"), e)
            }
        })?;
        debug_assert_eq!(p as u64, va);
        Ok(())
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
        .map_err(|e| MemError::io(format!("unmap {len} bytes at {va:#x}"), e.into()))?;
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
