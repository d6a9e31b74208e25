//! The allocator: a two-level segregated fit (TLSF) heap over regions of memory, O(1) for
//! allocation and free.
//!
//! [`HeapCore`] is `#[repr(C)]` plain data meant to live in shared memory: two bitmaps and a
//! table of free-list heads. Blocks live in the regions themselves and are linked by absolute
//! addresses, valid in every process because the memory is mapped at the same address
//! everywhere. Nothing here locks: callers hold the heap's lock.
//!
//! A block starts with a 32-byte header: the previous block's address (0 for the first of a
//! region), the size with flags (free, previous free, last of region, zeroed), a check word
//! derived from the address and the size word, and the size the user asked for. A free block adds
//! the two free-list links. A free block marked *zeroed* holds only zeroes after its links: it
//! is memory the kernel handed out cleared and nobody has written since (a new region, and the
//! pieces split off it), so a zeroed allocation from it clears only the 16 bytes of the old links
//! (DPDK gets the same effect by clearing memory at every free). Any block freed by a user is
//! not zeroed, and neither is a block merged with one. Every header read is verified against its
//! check word, so an overflow that tramples the next header, a free of a wild pointer, or a
//! double free is reported as a [`HeapError`] instead of corrupting the heap further. Regions
//! carry no sentinel: a fully free region is one free block covering it exactly, so its pages
//! can go back to the kernel whole.
//!
//! The two operations that matter most have a path of their own, in one piece: an allocation
//! that splits the first block found into its block and a free tail staying in the same class,
//! and a free whose next block is allocated (the block becomes free, or grows the free block in
//! front of it). Each reads and verifies every header it will write before writing any, and
//! hands anything else (and anything that looks wrong) to the general path, which does it or
//! reports it. A free also checks that the next block names it as its previous one, so a stale
//! header inside a free block is never taken for a live one.
//!
//! With the `debug-cookies` feature, every allocation also gets a cookie after its data, checked
//! at free and by validation.

use std::fmt;

/// Bytes of a block header; user data starts right after it.
pub const HEADER: u64 = 32;
/// Granularity of block addresses and sizes.
pub const GRAIN: u64 = 32;
/// Smallest block (a free block needs its header and two links).
pub const MIN_BLOCK: u64 = 64;
const SL_LOG2: u32 = 5;
const SL_COUNT: usize = 1 << SL_LOG2;
const GRAIN_LOG2: u32 = 5;
/// Sizes below this are mapped linearly (first level 0).
const SMALL: u64 = 1 << (SL_LOG2 + GRAIN_LOG2);
/// First-level classes: blocks up to 2^(FL_COUNT + 9) bytes (far beyond any memseg list).
pub const FL_COUNT: usize = 40;
/// The largest size the heap accepts for one allocation.
pub const MAX_ALLOC: u64 = 1 << 46;
/// At most this many blocks of one class are looked at when no whole class is big enough.
const CLASS_SCAN: usize = 32;

const F_FREE: u64 = 1;
const F_PREV_FREE: u64 = 2;
const F_LAST: u64 = 4;
/// A free block whose bytes after its header and links are all zero (see the module doc).
const F_ZERO: u64 = 8;
const F_MASK: u64 = 15;
/// Bytes at the start of a zeroed free block's data that are not zero: its free-list links.
pub const LINKS: u64 = 16;
const CHECK_KEY: u64 = 0x6d70_6c6e_6865_6170; // "mplnheap"

#[cfg(feature = "debug-cookies")]
const COOKIE: u64 = 0xadd2_e55b_adba_dbad;
#[cfg(feature = "debug-cookies")]
const COOKIE_LEN: u64 = 8;
#[cfg(not(feature = "debug-cookies"))]
const COOKIE_LEN: u64 = 0;

/// Something wrong with a block or a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeapError {
    /// A header's check word does not match: something wrote over it.
    Corrupt {
        /// The block.
        block: u64,
    },
    /// The block is already free.
    DoubleFree {
        /// The pointer freed.
        ptr: u64,
    },
    /// The pointer is not one this heap handed out.
    InvalidPointer {
        /// The pointer.
        ptr: u64,
    },
    /// The cookie after an allocation was overwritten (`debug-cookies`).
    Overflow {
        /// The pointer.
        ptr: u64,
    },
    /// Size zero or beyond [`MAX_ALLOC`], or an alignment that is not a power of two.
    BadRequest {
        /// Size asked.
        size: u64,
        /// Alignment asked.
        align: u64,
    },
}

impl fmt::Display for HeapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            HeapError::Corrupt { block } => write!(
                f,
                "heap corruption: the header of the block at {block:#x} was overwritten \
                 (a write past the end of the block before it?)"
            ),
            HeapError::DoubleFree { ptr } => write!(f, "double free of {ptr:#x}"),
            HeapError::InvalidPointer { ptr } => {
                write!(f, "{ptr:#x} was not allocated from this heap")
            }
            HeapError::Overflow { ptr } => {
                write!(f, "write past the end of the allocation at {ptr:#x}")
            }
            HeapError::BadRequest { size, align } => write!(
                f,
                "cannot allocate {size} bytes aligned to {align}: size must be 1..={MAX_ALLOC} \
                 and alignment a power of two"
            ),
        }
    }
}

impl std::error::Error for HeapError {}

/// Counters kept with the heap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapCounters {
    /// Bytes in all regions.
    pub total: u64,
    /// Bytes in free blocks (headers included).
    pub free: u64,
    /// Allocated blocks.
    pub alloc_count: u64,
    /// Free blocks.
    pub free_count: u64,
    /// Bytes the users asked for, in allocated blocks.
    pub requested: u64,
    /// Regions.
    pub regions: u64,
}

/// The heap's free lists and counters. Plain data: lives in shared memory.
#[repr(C)]
pub struct HeapCore {
    fl_bitmap: u64,
    sl_bitmap: [u32; FL_COUNT],
    heads: [[u64; SL_COUNT]; FL_COUNT],
    /// Counters.
    pub counters: HeapCounters,
}

/// A free block that came out of a free, after merging with its neighbours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreedBlock {
    /// Its address.
    pub addr: u64,
    /// Its size.
    pub size: u64,
}

// --- raw access ----------------------------------------------------------------------------

/// Reads the u64 at `addr`.
///
/// # Safety
/// `addr` must be 8-aligned and lie in memory mapped readable in this process for the heap
/// (a block header of one of its regions).
///
/// Plain (not volatile) accesses: the heap's memory changes only under its lock, whose
/// acquisition makes every earlier holder's writes visible here, so the compiler may merge or
/// drop repeated reads of one header within a lock hold.
#[inline(always)]
unsafe fn rd(addr: u64) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe { (addr as *const u64).read() }
}

/// Writes the u64 at `addr`.
///
/// # Safety
/// As [`rd`], and writable.
#[inline(always)]
unsafe fn wr(addr: u64, v: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { (addr as *mut u64).write(v) }
}

/// The check word of the header at `addr`. Each field enters rotated by its own amount, so a
/// change to any one of the three words (or to where the header is) always changes it, and a
/// value moved from one field to another does too; a fill pattern or a copied header fails
/// because the block's own address is mixed in. No multiply: every allocation and free
/// computes several of these (a keyed hash cost ~4 ns a pair more in the 64 B loop and
/// caught nothing more that a bug would do).
#[inline(always)]
fn check_word(addr: u64, size_flags: u64, prev: u64) -> u64 {
    addr ^ size_flags.rotate_left(17) ^ prev.rotate_left(41) ^ CHECK_KEY
}

/// Asks the CPU to bring the cache line of `addr` in, for writing. Only a hint: it never
/// faults, whatever `addr` is.
#[inline(always)]
fn prefetch_write(addr: u64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch does not access memory in the program's sense: it cannot fault and
    // changes no value, for any address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_ET0 }>(addr as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

#[inline]
fn fls(x: u64) -> u32 {
    63 - x.leading_zeros()
}

#[inline]
fn mapping(size: u64) -> (usize, usize) {
    if size < SMALL {
        (0, (size / GRAIN) as usize)
    } else {
        let f = fls(size);
        let sl = ((size >> (f - SL_LOG2)) as usize) & (SL_COUNT - 1);
        ((f - (SL_LOG2 + GRAIN_LOG2) + 1) as usize, sl)
    }
}

/// The class to search so that any block found is big enough for `size`.
#[inline]
fn mapping_search(size: u64) -> (usize, usize) {
    let size = if size >= SMALL {
        size + (1u64 << (fls(size) - SL_LOG2)) - 1
    } else {
        size
    };
    mapping(size)
}

#[inline]
fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// A view of one block's header.
#[derive(Clone, Copy, Debug)]
struct Hdr {
    addr: u64,
    prev: u64,
    size: u64,
    flags: u64,
}

impl Hdr {
    fn free(&self) -> bool {
        self.flags & F_FREE != 0
    }
    fn last(&self) -> bool {
        self.flags & F_LAST != 0
    }
    fn prev_free(&self) -> bool {
        self.flags & F_PREV_FREE != 0
    }
    fn next(&self) -> Option<u64> {
        (!self.last()).then_some(self.addr + self.size)
    }
}

impl HeapCore {
    /// An empty heap (all zero is also a valid empty heap, as in a fresh shared file).
    pub fn init(&mut self) {
        self.fl_bitmap = 0;
        self.sl_bitmap = [0; FL_COUNT];
        self.heads = [[0; SL_COUNT]; FL_COUNT];
        self.counters = HeapCounters::default();
    }

    /// Reads and verifies the header at `addr`.
    ///
    /// # Safety
    /// `addr` must be a 32-aligned address inside a region of this heap.
    unsafe fn hdr(&self, addr: u64) -> Result<Hdr, HeapError> {
        // SAFETY: the caller guarantees `addr` is inside a region, which is mapped.
        let (prev, sf, chk) = unsafe { (rd(addr), rd(addr + 8), rd(addr + 16)) };
        if chk != check_word(addr, sf, prev) {
            return Err(HeapError::Corrupt { block: addr });
        }
        let size = sf & !F_MASK;
        if size < MIN_BLOCK || !size.is_multiple_of(GRAIN) {
            return Err(HeapError::Corrupt { block: addr });
        }
        Ok(Hdr {
            addr,
            prev,
            size,
            flags: sf & F_MASK,
        })
    }

    /// Writes a header.
    ///
    /// # Safety
    /// As [`HeapCore::hdr`].
    #[inline]
    unsafe fn set_hdr(&self, addr: u64, prev: u64, size: u64, flags: u64) {
        let sf = size | flags;
        // SAFETY: as guaranteed by the caller.
        unsafe {
            wr(addr, prev);
            wr(addr + 8, sf);
            wr(addr + 16, check_word(addr, sf, prev));
        }
    }

    /// Changes only the flags of a verified header.
    unsafe fn set_flags(&self, h: &Hdr, flags: u64) {
        // SAFETY: `h` came from a verified header inside a region.
        unsafe { self.set_hdr(h.addr, h.prev, h.size, flags) }
    }

    unsafe fn set_prev(&self, h: &Hdr, prev: u64) {
        // SAFETY: as above.
        unsafe { self.set_hdr(h.addr, prev, h.size, h.flags) }
    }

    #[inline]
    unsafe fn insert(&mut self, addr: u64, size: u64) {
        let (fl, sl) = mapping(size);
        let head = self.heads[fl][sl];
        // SAFETY: `addr` is a free block of a region (at least MIN_BLOCK bytes); `head` is 0 or
        // another free block of the heap.
        unsafe {
            wr(addr + 32, head);
            wr(addr + 40, 0);
            if head != 0 {
                wr(head + 40, addr);
            }
        }
        self.heads[fl][sl] = addr;
        self.fl_bitmap |= 1 << fl;
        self.sl_bitmap[fl] |= 1 << sl;
        self.counters.free += size;
        self.counters.free_count += 1;
    }

    #[inline]
    unsafe fn unlink(&mut self, addr: u64, size: u64) {
        let (fl, sl) = mapping(size);
        // SAFETY: `addr` is a free block linked in list (fl, sl); its neighbours are free blocks.
        unsafe {
            let next = rd(addr + 32);
            let prev = rd(addr + 40);
            if prev != 0 {
                wr(prev + 32, next);
            } else {
                self.heads[fl][sl] = next;
            }
            if next != 0 {
                wr(next + 40, prev);
            }
        }
        if self.heads[fl][sl] == 0 {
            self.sl_bitmap[fl] &= !(1 << sl);
            if self.sl_bitmap[fl] == 0 {
                self.fl_bitmap &= !(1 << fl);
            }
        }
        self.counters.free -= size;
        self.counters.free_count -= 1;
    }

    /// Moves the list node of free block `from` (of `old_size` bytes) to `to`, now a free block
    /// of `new_size` bytes in the same class: it takes `from`'s place in its list, so the
    /// bitmaps do not change (a split off the front mostly stays in its class: classes are
    /// 1/32 wide above `SMALL`).
    ///
    /// # Safety
    /// `from` is linked in list `mapping(old_size)`, which is `mapping(new_size)`; `to` is
    /// inside the same free memory, past `from`'s links, and at least `MIN_BLOCK` long.
    #[inline]
    unsafe fn relink(&mut self, from: u64, old_size: u64, to: u64, new_size: u64) {
        debug_assert_eq!(mapping(old_size), mapping(new_size));
        // SAFETY: `from` is a linked free block; its neighbours in the list are free blocks.
        unsafe {
            let next = rd(from + 32);
            let prev = rd(from + 40);
            wr(to + 32, next);
            wr(to + 40, prev);
            if prev != 0 {
                wr(prev + 32, to);
            } else {
                let (fl, sl) = mapping(new_size);
                self.heads[fl][sl] = to;
            }
            if next != 0 {
                wr(next + 40, to);
            }
        }
        self.counters.free = self.counters.free - old_size + new_size;
    }

    #[inline]
    fn find(&self, size: u64) -> Option<(usize, usize)> {
        let (fl, sl) = mapping_search(size);
        if fl >= FL_COUNT {
            return None;
        }
        let sl_map = self.sl_bitmap[fl] & (!0u32 << sl);
        if sl_map != 0 {
            return Some((fl, sl_map.trailing_zeros() as usize));
        }
        let fl_map = self.fl_bitmap & (!0u64).checked_shl(fl as u32 + 1).unwrap_or(0);
        if fl_map == 0 {
            return None;
        }
        let fl = fl_map.trailing_zeros() as usize;
        Some((fl, self.sl_bitmap[fl].trailing_zeros() as usize))
    }

    /// A free block of at least `size` bytes. First the head of the first non-empty list whose
    /// blocks are all big enough (O(1): two bitmap searches); failing that, a big enough block
    /// in `size`'s own class, whose list holds blocks both smaller and larger than `size` (only
    /// above `SMALL`, where classes are ranges). That second look, bounded to
    /// [`CLASS_SCAN`] blocks, finds a region grown for exactly one large request: rounded up to
    /// the next class boundary (up to 1/32 more), the request would otherwise need more than
    /// the region holds.
    ///
    /// # Safety
    /// Every region added must still be mapped; the caller holds the heap's lock.
    unsafe fn find_block(&self, size: u64) -> Result<Option<u64>, HeapError> {
        if let Some((fl, sl)) = self.find(size) {
            return match self.heads[fl][sl] {
                // A bitmap bit without a list behind it: the heap's own table was overwritten.
                0 => Err(HeapError::Corrupt { block: 0 }),
                b => Ok(Some(b)),
            };
        }
        let (fl, sl) = mapping(size);
        if size < SMALL || fl >= FL_COUNT {
            return Ok(None);
        }
        let mut b = self.heads[fl][sl];
        for _ in 0..CLASS_SCAN {
            if b == 0 {
                break;
            }
            // SAFETY: `b` is on a free list: a free block inside a mapped region.
            let h = unsafe { self.hdr(b)? };
            if !h.free() {
                return Err(HeapError::Corrupt { block: b });
            }
            if h.size >= size {
                return Ok(Some(b));
            }
            // SAFETY: a free block's next-free link is at +32 (written by `insert`).
            b = unsafe { rd(b + 32) };
        }
        Ok(None)
    }

    /// Adds `[addr, addr + len)` as a new region: one free block. `zeroed`: every byte of the
    /// range is zero (pages fresh from the kernel), so zeroed allocations from it need not
    /// clear it again.
    ///
    /// # Safety
    /// The range must be mapped read-write in this process (and, for a shared heap, in every
    /// process that uses it), belong to nobody else, and be `GRAIN`-aligned; with `zeroed`, all
    /// its bytes must be zero.
    pub unsafe fn add_region(&mut self, addr: u64, len: u64, zeroed: bool) {
        debug_assert!(addr.is_multiple_of(GRAIN) && len.is_multiple_of(GRAIN) && len >= MIN_BLOCK);
        let z = if zeroed { F_ZERO } else { 0 };
        // SAFETY: the range is ours (caller's guarantee).
        unsafe {
            self.set_hdr(addr, 0, len, F_FREE | F_LAST | z);
            self.insert(addr, len);
        }
        self.counters.total += len;
        self.counters.regions += 1;
    }

    /// The bytes a held region's block says its holder asked for (the whole block's data).
    pub const fn held_request(len: u64) -> u64 {
        len - HEADER - COOKIE_LEN
    }

    /// Adds the region `[addr, addr + len)` as one allocated block, held for a process that has
    /// not mapped it yet (see [`HeapCore::release_held`]); returns the block's user pointer.
    /// Nothing but this header is written, and nothing reads the block until it is released.
    ///
    /// # Safety
    /// As [`HeapCore::add_region`]; the pages are zero-filled.
    pub unsafe fn add_region_held(&mut self, addr: u64, len: u64) -> u64 {
        debug_assert!(addr.is_multiple_of(GRAIN) && len.is_multiple_of(GRAIN) && len >= MIN_BLOCK);
        let req = Self::held_request(len);
        // SAFETY: the range is ours (caller's guarantee).
        unsafe {
            self.set_hdr(addr, 0, len, F_LAST);
            wr(addr + 24, req);
            #[cfg(feature = "debug-cookies")]
            wr(round_up(addr + HEADER + req, 8), COOKIE);
        }
        self.counters.total += len;
        self.counters.regions += 1;
        self.counters.alloc_count += 1;
        self.counters.requested += req;
        addr + HEADER
    }

    /// Turns the held block at `ptr` (made by [`HeapCore::add_region_held`], still the whole
    /// region) into free memory known to be zero, as a fresh region would be.
    ///
    /// # Safety
    /// `ptr - HEADER` must be the start of a region of this heap, mapped here; the caller holds
    /// the lock.
    pub unsafe fn release_held(&mut self, ptr: u64) -> Result<(), HeapError> {
        // SAFETY: caller's guarantee.
        let h = unsafe { self.allocated(ptr)? };
        // SAFETY: verified header.
        let req = unsafe { rd(h.addr + 24) };
        if h.prev != 0 || !h.last() || req != Self::held_request(h.size) {
            return Err(HeapError::Corrupt { block: h.addr });
        }
        // SAFETY: the whole region is this block: its header, then data nobody wrote but the
        // cookie (cleared again), so it is as zero as the kernel gave it.
        unsafe {
            #[cfg(feature = "debug-cookies")]
            wr(round_up(ptr + req, 8), 0);
            self.set_hdr(h.addr, 0, h.size, F_FREE | F_LAST | F_ZERO);
            self.insert(h.addr, h.size);
        }
        self.counters.alloc_count -= 1;
        self.counters.requested -= req;
        Ok(())
    }

    /// Forgets the held block of the region `[addr, addr + len)` without reading it (its holder
    /// could not map it): the counters drop the region; the caller drops it from its table and
    /// gives the pages back.
    pub fn forget_held(&mut self, len: u64) {
        self.counters.total -= len;
        self.counters.regions -= 1;
        self.counters.alloc_count -= 1;
        self.counters.requested -= Self::held_request(len);
    }

    /// Allocates `size` bytes aligned to `align`; returns the user pointer.
    ///
    /// # Safety
    /// Every region added must still be mapped; the caller holds the heap's lock.
    pub unsafe fn alloc(&mut self, size: u64, align: u64) -> Result<Option<u64>, HeapError> {
        // SAFETY: the caller's guarantees.
        Ok(unsafe { self.alloc_z(size, align)? }.map(|(p, _)| p))
    }

    /// [`HeapCore::alloc`], also telling whether the block's data is known to be zero past its
    /// first [`LINKS`] bytes (it came from a zeroed free block).
    ///
    /// # Safety
    /// As [`HeapCore::alloc`].
    #[inline]
    pub unsafe fn alloc_z(
        &mut self,
        size: u64,
        align: u64,
    ) -> Result<Option<(u64, bool)>, HeapError> {
        // SAFETY: the caller's guarantees.
        if let Some(r) = unsafe { self.alloc_split(size, align) } {
            return Ok(Some(r));
        }
        // SAFETY: the caller's guarantees.
        unsafe { self.alloc_general(size, align) }
    }

    /// The common allocation in one piece: no alignment beyond [`GRAIN`], and the first block
    /// found splits into ours and a free tail that stays in the block's class, so the tail
    /// takes the block's place in its list. Changes nothing and returns `None` when that is
    /// not the case (or anything looks wrong): [`HeapCore::alloc_general`] then does, or
    /// reports, the rest.
    ///
    /// # Safety
    /// As [`HeapCore::alloc`].
    #[inline(always)]
    unsafe fn alloc_split(&mut self, size: u64, align: u64) -> Option<(u64, bool)> {
        if cfg!(feature = "debug-cookies")
            || align > GRAIN
            || !align.is_power_of_two()
            || size.wrapping_sub(1) >= MAX_ALLOC
        {
            return None;
        }
        let need = round_up(size, GRAIN).max(MIN_BLOCK - HEADER) + HEADER;
        let (fl, sl) = self.find(need)?;
        let blk = self.heads[fl][sl];
        if blk == 0 {
            // The bitmap says the list holds a block and it does not: the general path reports it.
            return None;
        }
        // SAFETY: `blk` heads a free list: a free block inside a mapped region (caller).
        let (prev, sf, chk) = unsafe { (rd(blk), rd(blk + 8), rd(blk + 16)) };
        let bsize = sf & !F_MASK;
        if chk != check_word(blk, sf, prev) || sf & (F_FREE | 16) != F_FREE || bsize < need {
            return None;
        }
        let remain = bsize - need;
        if remain < MIN_BLOCK || mapping(remain) != (fl, sl) {
            return None;
        }
        let taddr = blk + need;
        // The block after the free one (if any) gets the tail as its previous block: verify it
        // before anything changes.
        let after = if sf & F_LAST == 0 {
            let n = blk + bsize;
            // SAFETY: the free block is not last: its successor is inside the region.
            let (np, nsf, nchk) = unsafe { (rd(n), rd(n + 8), rd(n + 16)) };
            if nchk != check_word(n, nsf, np)
                || np != blk
                || nsf & (F_FREE | F_PREV_FREE) != F_PREV_FREE
            {
                return None;
            }
            Some((n, nsf))
        } else {
            None
        };
        // SAFETY: [blk, blk + bsize) is the free block we take, in a mapped region; `after` is
        // its verified successor.
        unsafe {
            self.set_hdr(blk, prev, need, sf & F_PREV_FREE);
            wr(blk + 24, size);
            // The tail's header and links lie past our data; the rest was the free block's:
            // zeroed if that was.
            self.set_hdr(taddr, blk, remain, sf & (F_FREE | F_LAST | F_ZERO));
            self.relink(blk, bsize, taddr, remain);
            if remain >= 2 * need {
                // A run of same-size allocations writes the next tail's header and links
                // there: start fetching those lines now (a first touch of memory the kernel
                // has just cleared is a cache miss each), while this one is handed out.
                prefetch_write(taddr + need);
                prefetch_write(taddr + need + HEADER);
            }
            if let Some((n, nsf)) = after {
                self.set_hdr(n, taddr, nsf & !F_MASK, nsf & F_MASK);
            }
        }
        self.counters.alloc_count += 1;
        self.counters.requested += size;
        Some((blk + HEADER, sf & F_ZERO != 0))
    }

    /// Every allocation [`HeapCore::alloc_split`] does not do: alignment, a whole block taken,
    /// a tail in another class, and every error.
    ///
    /// # Safety
    /// As [`HeapCore::alloc`].
    #[inline(never)]
    unsafe fn alloc_general(
        &mut self,
        size: u64,
        align: u64,
    ) -> Result<Option<(u64, bool)>, HeapError> {
        if size == 0 || size > MAX_ALLOC || !align.is_power_of_two() {
            return Err(HeapError::BadRequest { size, align });
        }
        let align = align.max(GRAIN);
        let need = round_up(size + COOKIE_LEN, GRAIN)
            .saturating_add(HEADER)
            .max(MIN_BLOCK);
        let search = if align > GRAIN {
            need + align + MIN_BLOCK
        } else {
            need
        };
        // SAFETY: the lists hold free blocks of mapped regions (caller's guarantee).
        let Some(blk) = (unsafe { self.find_block(search)? }) else {
            return Ok(None);
        };
        // SAFETY: `blk` is on a free list: a free block inside a region.
        let h = unsafe { self.hdr(blk)? };
        if !h.free() {
            return Err(HeapError::Corrupt { block: blk });
        }
        // A split that leaves the tail in the block's class moves the list node instead of
        // unlinking and inserting (see below); otherwise the block leaves its list now.
        let plain = align <= GRAIN && {
            let remain = h.size - need;
            remain >= MIN_BLOCK && mapping(remain) == mapping(h.size)
        };
        if !plain {
            // SAFETY: as above.
            unsafe { self.unlink(blk, h.size) };
        }
        let mut start = blk;
        let mut avail = h.size;
        let mut prev = h.prev;
        let mut prev_free = h.prev_free();
        // Alignment: a free block in front, at least MIN_BLOCK long.
        if align > GRAIN {
            let mut user = round_up(blk + HEADER, align);
            while user - HEADER - blk != 0 && user - HEADER - blk < MIN_BLOCK {
                user += align;
            }
            let gap = user - HEADER - blk;
            if gap > 0 {
                // SAFETY: [blk, blk + gap) is the front of our free block.
                unsafe {
                    // Its data past the links was the front of ours: zeroed if ours was.
                    let fl = F_FREE | (h.flags & (F_PREV_FREE | F_ZERO));
                    self.set_hdr(blk, h.prev, gap, fl);
                    self.insert(blk, gap);
                }
                start = blk + gap;
                avail -= gap;
                prev = blk;
                prev_free = true;
            }
        }
        let last = h.last();
        let remain = avail - need;
        let (bsize, tail) = if remain >= MIN_BLOCK {
            (need, Some(remain))
        } else {
            (avail, None)
        };
        let mut flags = if prev_free { F_PREV_FREE } else { 0 };
        if tail.is_none() && last {
            flags |= F_LAST;
        }
        // SAFETY: [start, start + avail) lies in the block we took.
        unsafe {
            self.set_hdr(start, prev, bsize, flags);
            wr(start + 24, size);
        }
        if let Some(t) = tail {
            let taddr = start + bsize;
            // SAFETY: the tail of the block we took.
            unsafe {
                // Its header and links lie past our data; the rest was ours: zeroed if ours was.
                let fl = F_FREE | (h.flags & F_ZERO) | if last { F_LAST } else { 0 };
                self.set_hdr(taddr, start, t, fl);
                if plain {
                    // `blk` is still linked; the tail takes its place.
                    self.relink(blk, h.size, taddr, t);
                } else {
                    self.insert(taddr, t);
                }
            }
            if !last {
                // SAFETY: the block after ours is inside the region (ours was not last).
                unsafe {
                    let n = self.hdr(taddr + t)?;
                    self.set_hdr(n.addr, taddr, n.size, n.flags | F_PREV_FREE);
                }
            }
        } else if !last {
            // SAFETY: the block after ours is inside the region.
            unsafe {
                let n = self.hdr(start + bsize)?;
                self.set_hdr(n.addr, start, n.size, n.flags & !F_PREV_FREE);
            }
        }
        #[cfg(feature = "debug-cookies")]
        // SAFETY: the cookie slot lies inside the block (need counted COOKIE_LEN), 8-aligned
        // because size is rounded to 8 first.
        unsafe {
            wr(round_up(start + HEADER + size, 8), COOKIE);
        }
        self.counters.alloc_count += 1;
        self.counters.requested += size;
        // The data starts past our header: inside the old block's links when there is no gap
        // in front (hence LINKS to clear), past them otherwise.
        Ok(Some((start + HEADER, h.flags & F_ZERO != 0)))
    }

    /// Verifies that `ptr` is an allocated block's user pointer; returns its header.
    ///
    /// # Safety
    /// `ptr - HEADER` must lie inside a region of this heap (the caller checked the region).
    unsafe fn allocated(&self, ptr: u64) -> Result<Hdr, HeapError> {
        if !ptr.is_multiple_of(GRAIN) || ptr < HEADER {
            return Err(HeapError::InvalidPointer { ptr });
        }
        // SAFETY: inside a region (caller).
        let h = unsafe { self.hdr(ptr - HEADER)? };
        if h.free() {
            return Err(HeapError::DoubleFree { ptr });
        }
        #[cfg(feature = "debug-cookies")]
        {
            // SAFETY: the requested size is in the verified header; the cookie lies inside.
            let req = unsafe { rd(h.addr + 24) };
            let c = round_up(ptr + req, 8);
            // SAFETY: c < h.addr + h.size by construction in alloc.
            if c + 8 > h.addr + h.size || unsafe { rd(c) } != COOKIE {
                return Err(HeapError::Overflow { ptr });
            }
        }
        Ok(h)
    }

    /// The size the user asked for at `ptr`, and how many bytes it may really use.
    ///
    /// # Safety
    /// As [`HeapCore::free`].
    pub unsafe fn sizes(&self, ptr: u64) -> Result<(u64, u64), HeapError> {
        // SAFETY: caller's guarantee.
        let h = unsafe { self.allocated(ptr)? };
        // SAFETY: verified header.
        let req = unsafe { rd(h.addr + 24) };
        // With cookies, the cookie sits right after the requested bytes (rounded to 8), not at
        // the end of the block: only the bytes before it may be used.
        let usable = if cfg!(feature = "debug-cookies") {
            round_up(req, 8)
        } else {
            h.size - HEADER - COOKIE_LEN
        };
        Ok((req, usable))
    }

    /// Frees the allocation at `ptr`, merging with free neighbours; returns the free block it
    /// became part of.
    ///
    /// # Safety
    /// `ptr - HEADER` must lie inside a region of this heap; the caller holds the lock.
    #[inline]
    pub unsafe fn free(&mut self, ptr: u64) -> Result<FreedBlock, HeapError> {
        // SAFETY: the caller's guarantees.
        if let Some(f) = unsafe { self.free_beside_allocated(ptr) } {
            return Ok(f);
        }
        // SAFETY: the caller's guarantees.
        unsafe { self.free_general(ptr) }
    }

    /// The common free in one piece: the block is followed by an allocated block in its region,
    /// so it either becomes a free block of its own or grows the free block in front of it.
    /// Reads and verifies the three headers involved before it writes; changes nothing and
    /// returns `None` when the case is another one (or anything looks wrong):
    /// [`HeapCore::free_general`] then does, or reports, the rest.
    ///
    /// # Safety
    /// As [`HeapCore::free`].
    #[inline(always)]
    unsafe fn free_beside_allocated(&mut self, ptr: u64) -> Option<FreedBlock> {
        if cfg!(feature = "debug-cookies") || !ptr.is_multiple_of(GRAIN) || ptr < HEADER {
            return None;
        }
        let b = ptr - HEADER;
        // SAFETY: `b` lies inside a region of this heap (caller).
        let (bp, bsf, bchk) = unsafe { (rd(b), rd(b + 8), rd(b + 16)) };
        let bsize = bsf & !F_MASK;
        if bchk != check_word(b, bsf, bp) || bsf & (F_FREE | F_LAST | 16) != 0 || bsize < MIN_BLOCK
        {
            return None;
        }
        let n = b + bsize;
        // SAFETY: `b` is not last: the next block is inside the region.
        let (np, nsf, nchk) = unsafe { (rd(n), rd(n + 8), rd(n + 16)) };
        if nchk != check_word(n, nsf, np) || np != b || nsf & (F_FREE | F_PREV_FREE) != 0 {
            return None;
        }
        // SAFETY: verified allocated header.
        let req = unsafe { rd(b + 24) };
        let nsf = nsf | F_PREV_FREE;
        let freed = if bsf & F_PREV_FREE == 0 {
            // SAFETY: our verified block becomes free and joins its list; the next one, verified,
            // records that its previous block is free.
            unsafe {
                self.set_hdr(b, bp, bsize, F_FREE);
                self.insert(b, bsize);
                wr(n + 8, nsf);
                wr(n + 16, check_word(n, nsf, b));
            }
            FreedBlock {
                addr: b,
                size: bsize,
            }
        } else {
            let p = bp;
            // SAFETY: the previous block of a verified header lies in the region.
            let (pp, psf, pchk) = unsafe { (rd(p), rd(p + 8), rd(p + 16)) };
            let psize = psf & !F_MASK;
            if pchk != check_word(p, psf, pp)
                || psf & (F_FREE | F_LAST | 16) != F_FREE
                || p.wrapping_add(psize) != b
            {
                return None;
            }
            let merged = psize + bsize;
            let msf = merged | F_FREE | (psf & F_PREV_FREE);
            // SAFETY: the free block in front grows over ours; our header, buried inside it, is
            // left marked free (a second free of `ptr` is then the double free it is); the next
            // block's previous block is now the merged one.
            unsafe {
                if mapping(merged) == mapping(psize) {
                    self.counters.free += bsize;
                } else {
                    self.unlink(p, psize);
                    self.insert(p, merged);
                }
                wr(p + 8, msf);
                wr(p + 16, check_word(p, msf, pp));
                let fsf = bsize | F_FREE;
                wr(b + 8, fsf);
                wr(b + 16, check_word(b, fsf, bp));
                wr(n, p);
                wr(n + 8, nsf);
                wr(n + 16, check_word(n, nsf, p));
            }
            FreedBlock {
                addr: p,
                size: merged,
            }
        };
        self.counters.alloc_count -= 1;
        self.counters.requested -= req;
        Some(freed)
    }

    /// Every free [`HeapCore::free_beside_allocated`] does not do: the last block of a region,
    /// a free block after ours, and every error.
    ///
    /// # Safety
    /// As [`HeapCore::free`].
    #[inline(never)]
    unsafe fn free_general(&mut self, ptr: u64) -> Result<FreedBlock, HeapError> {
        // SAFETY: caller's guarantee.
        let h = unsafe { self.allocated(ptr)? };
        // SAFETY: verified header.
        let req = unsafe { rd(h.addr + 24) };
        let mut addr = h.addr;
        let mut size = h.size;
        let mut last = h.last();
        let mut prev = h.prev;
        let mut prev_free = h.prev_free();
        // Verify the neighbours before changing anything.
        let next = match h.next() {
            Some(n) => {
                // SAFETY: not last: the next block is inside the region.
                let n = unsafe { self.hdr(n)? };
                if n.prev != h.addr {
                    return Err(HeapError::Corrupt { block: n.addr });
                }
                Some(n)
            }
            None => None,
        };
        // The block that will follow the merged one (a free next block is merged, so the one
        // after it): verified now, relinked at the end. Nothing in between writes its header.
        let follow = match next {
            Some(n) if n.free() => match n.next() {
                // SAFETY: `n` is not last: the block after it is inside the region.
                Some(a) => Some(unsafe { self.hdr(a)? }),
                None => None,
            },
            other => other,
        };
        let before = if prev_free {
            // SAFETY: prev_phys of a verified header points inside the region.
            let p = unsafe { self.hdr(h.prev)? };
            if !p.free() || p.addr + p.size != h.addr {
                return Err(HeapError::Corrupt { block: h.prev });
            }
            Some(p)
        } else {
            None
        };
        if let Some(n) = next.filter(|n| n.free()) {
            // SAFETY: a verified free block.
            unsafe { self.unlink(n.addr, n.size) };
            size += n.size;
            last = n.last();
        }
        // Merged into the free block in front, which stays in its class: it keeps its place in
        // its list (same address), only its size grows.
        let mut in_place = None;
        if let Some(p) = before {
            let merged = size + p.size;
            // SAFETY: a verified free block; then our own header, which is about to be buried
            // inside the merged block, is left marked free, so a second free of `ptr` is seen
            // as the double free it is.
            unsafe {
                if mapping(merged) == mapping(p.size) {
                    in_place = Some(p.size);
                } else {
                    self.unlink(p.addr, p.size);
                }
                self.set_hdr(h.addr, h.prev, h.size, F_FREE);
            }
            addr = p.addr;
            size = merged;
            prev = p.prev;
            prev_free = p.prev_free();
        }
        // SAFETY: [addr, addr + size) is the merged block, inside the region.
        unsafe {
            self.set_hdr(
                addr,
                prev,
                size,
                F_FREE | if last { F_LAST } else { 0 } | if prev_free { F_PREV_FREE } else { 0 },
            );
            match in_place {
                // The block in front stays linked where it is; only the free bytes grow.
                Some(old) => self.counters.free += size - old,
                None => self.insert(addr, size),
            }
        }
        if let Some(n) = follow {
            // SAFETY: the block after the merged one, verified above, inside the region.
            unsafe { self.set_hdr(n.addr, addr, n.size, n.flags | F_PREV_FREE) };
        }
        self.counters.alloc_count -= 1;
        self.counters.requested -= req;
        Ok(FreedBlock { addr, size })
    }

    /// Tries to resize the allocation at `ptr` to `size` bytes in place (shrinking, or growing
    /// into a free block right after it). Returns whether it did.
    ///
    /// # Safety
    /// As [`HeapCore::free`].
    pub unsafe fn resize_in_place(&mut self, ptr: u64, size: u64) -> Result<bool, HeapError> {
        if size == 0 || size > MAX_ALLOC {
            return Err(HeapError::BadRequest { size, align: 1 });
        }
        // SAFETY: caller's guarantee.
        let h = unsafe { self.allocated(ptr)? };
        // SAFETY: verified header.
        let old_req = unsafe { rd(h.addr + 24) };
        let need = round_up(size + COOKIE_LEN, GRAIN)
            .saturating_add(HEADER)
            .max(MIN_BLOCK);
        let mut avail = h.size;
        let mut last = h.last();
        if need > avail {
            let Some(n) = h.next() else {
                return Ok(false);
            };
            // SAFETY: not last: the next block is in the region.
            let n = unsafe { self.hdr(n)? };
            if !n.free() || avail + n.size < need {
                return Ok(false);
            }
            // SAFETY: verified free block.
            unsafe { self.unlink(n.addr, n.size) };
            avail += n.size;
            last = n.last();
        }
        let remain = avail - need;
        let (bsize, tail) = if remain >= MIN_BLOCK {
            (need, Some(remain))
        } else {
            (avail, None)
        };
        let flags = (h.flags & F_PREV_FREE) | if tail.is_none() && last { F_LAST } else { 0 };
        // SAFETY: our block, possibly extended over the next free one.
        unsafe {
            self.set_hdr(h.addr, h.prev, bsize, flags);
            wr(h.addr + 24, size);
        }
        if let Some(t) = tail {
            let taddr = h.addr + bsize;
            let mut tsize = t;
            let mut tlast = last;
            // The tail may touch a free block after it: merge so no two free blocks are adjacent.
            if !last {
                // SAFETY: inside the region.
                let n = unsafe { self.hdr(taddr + t)? };
                if n.free() {
                    // SAFETY: verified free block.
                    unsafe { self.unlink(n.addr, n.size) };
                    tsize += n.size;
                    tlast = n.last();
                }
            }
            // SAFETY: the tail lies in our old extent (or the absorbed one).
            unsafe {
                self.set_hdr(
                    taddr,
                    h.addr,
                    tsize,
                    F_FREE | if tlast { F_LAST } else { 0 },
                );
                self.insert(taddr, tsize);
            }
            if !tlast {
                // SAFETY: inside the region.
                unsafe {
                    let n = self.hdr(taddr + tsize)?;
                    self.set_hdr(n.addr, taddr, n.size, n.flags | F_PREV_FREE);
                }
            }
        } else if !last {
            // SAFETY: inside the region.
            unsafe {
                let n = self.hdr(h.addr + bsize)?;
                self.set_hdr(n.addr, h.addr, n.size, n.flags & !F_PREV_FREE);
            }
        }
        #[cfg(feature = "debug-cookies")]
        // SAFETY: inside the block, as in alloc.
        unsafe {
            wr(round_up(ptr + size, 8), COOKIE);
        }
        self.counters.requested = self.counters.requested - old_req + size;
        Ok(true)
    }

    /// Takes `[start, end)` (whole pages) out of the free block `f`, which must be free and
    /// cover it: the parts before and after stay free blocks, and the region splits around the
    /// hole (the caller updates its region table and [`HeapCounters::regions`]).
    ///
    /// # Safety
    /// `f` must be a free block of this heap returned by [`HeapCore::free`] under the same lock
    /// hold; `start..end` must be `GRAIN`-aligned, inside it, and leave 0 or >= [`MIN_BLOCK`]
    /// bytes on each side.
    pub unsafe fn carve(&mut self, f: FreedBlock, start: u64, end: u64) -> Result<(), HeapError> {
        // SAFETY: `f` is a verified free block (caller).
        let h = unsafe { self.hdr(f.addr)? };
        if !h.free() || h.size != f.size || start < f.addr || end > f.addr + f.size {
            return Err(HeapError::Corrupt { block: f.addr });
        }
        // SAFETY: verified free block.
        unsafe { self.unlink(h.addr, h.size) };
        let front = start - h.addr;
        let back = h.addr + h.size - end;
        if front > 0 {
            // SAFETY: the front part of our free block; it now ends its region.
            unsafe {
                self.set_hdr(
                    h.addr,
                    h.prev,
                    front,
                    F_FREE | F_LAST | (h.flags & (F_PREV_FREE | F_ZERO)),
                );
                self.insert(h.addr, front);
            }
        } else if h.prev != 0 {
            // The block before becomes the last of its region.
            // SAFETY: prev_phys of a verified header lies in the region.
            unsafe {
                let p = self.hdr(h.prev)?;
                self.set_flags(&p, p.flags | F_LAST);
            }
        }
        if back > 0 {
            // SAFETY: the tail part of our free block: first of a new region.
            unsafe {
                let fl = F_FREE | (h.flags & F_ZERO) | if h.last() { F_LAST } else { 0 };
                self.set_hdr(end, 0, back, fl);
                self.insert(end, back);
            }
        }
        if !h.last() {
            let nb = h.addr + h.size;
            // SAFETY: the block after ours is inside the region.
            unsafe {
                let n = self.hdr(nb)?;
                if back > 0 {
                    self.set_prev(&n, end);
                } else {
                    // It now starts a region: no previous block.
                    self.set_hdr(n.addr, 0, n.size, n.flags & !F_PREV_FREE);
                }
            }
        }
        // The caller keeps the region table (and the region count).
        self.counters.total -= end - start;
        Ok(())
    }

    /// If the region `[addr, addr + len)` is one free block (nobody uses any of it), that block.
    ///
    /// # Safety
    /// The region must be one of this heap's, mapped; the caller holds the lock.
    pub unsafe fn unused_region(&self, addr: u64, len: u64) -> Option<FreedBlock> {
        // SAFETY: the first block of a region starts at its first byte.
        let h = unsafe { self.hdr(addr) }.ok()?;
        (h.free() && h.size == len).then_some(FreedBlock { addr, size: len })
    }

    /// The largest free block's size (headers included), by looking at the highest non-empty
    /// class.
    pub fn largest_free(&self) -> u64 {
        if self.fl_bitmap == 0 {
            return 0;
        }
        let fl = fls(self.fl_bitmap) as usize;
        let sl = 31 - self.sl_bitmap[fl].leading_zeros() as usize;
        let mut best = 0;
        let mut b = self.heads[fl][sl];
        let mut guard = 0;
        while b != 0 && guard < 1 << 20 {
            // SAFETY: free-list members are free blocks inside regions.
            unsafe {
                best = best.max(rd(b + 8) & !F_MASK);
                b = rd(b + 32);
            }
            guard += 1;
        }
        best
    }

    /// Walks the region `[start, end)` block by block and checks every invariant; appends what
    /// is wrong to `problems`. Returns (free bytes, free blocks, allocated blocks, requested).
    ///
    /// # Safety
    /// The region must be one of this heap's, mapped.
    pub unsafe fn walk_region(
        &self,
        start: u64,
        end: u64,
        problems: &mut Vec<String>,
        mut visit: impl FnMut(u64, u64, bool),
    ) -> (u64, u64, u64, u64) {
        let (mut free, mut nfree, mut nalloc, mut req) = (0, 0, 0, 0);
        let mut addr = start;
        let mut prev = 0u64;
        let mut prev_was_free = false;
        while addr < end {
            // SAFETY: inside the region.
            let h = match unsafe { self.hdr(addr) } {
                Ok(h) => h,
                Err(e) => {
                    problems.push(e.to_string());
                    return (free, nfree, nalloc, req);
                }
            };
            if h.prev != prev {
                problems.push(format!(
                    "block {addr:#x}: previous block recorded as {:#x}, is {prev:#x}",
                    h.prev
                ));
            }
            if h.prev_free() != prev_was_free {
                problems.push(format!("block {addr:#x}: stale previous-free flag"));
            }
            if h.free() && prev_was_free {
                problems.push(format!("block {addr:#x}: two adjacent free blocks"));
            }
            if h.addr + h.size > end {
                problems.push(format!("block {addr:#x} runs past its region end {end:#x}"));
                return (free, nfree, nalloc, req);
            }
            if h.last() != (h.addr + h.size == end) {
                problems.push(format!("block {addr:#x}: wrong last-of-region flag"));
            }
            if h.free() {
                free += h.size;
                nfree += 1;
            } else {
                nalloc += 1;
                // SAFETY: a verified allocated header.
                req += unsafe { rd(addr + 24) };
                // SAFETY: allocated block inside the region.
                if let Err(e) = unsafe { self.allocated(addr + HEADER) } {
                    problems.push(e.to_string());
                }
            }
            visit(addr, h.size, h.free());
            prev_was_free = h.free();
            prev = addr;
            addr += h.size;
        }
        (free, nfree, nalloc, req)
    }

    /// Checks the free lists against the bitmaps and the block classes; appends problems.
    ///
    /// # Safety
    /// The heap's regions must be mapped.
    pub unsafe fn check_lists(&self, problems: &mut Vec<String>) -> u64 {
        let mut n = 0;
        for fl in 0..FL_COUNT {
            for sl in 0..SL_COUNT {
                let has = self.sl_bitmap[fl] & (1 << sl) != 0;
                let head = self.heads[fl][sl];
                if has != (head != 0) {
                    problems.push(format!("free list ({fl},{sl}): bitmap disagrees"));
                }
                let mut b = head;
                let mut prev = 0;
                let mut guard = 0u64;
                while b != 0 {
                    guard += 1;
                    if guard > 1 << 26 {
                        problems.push(format!("free list ({fl},{sl}) loops"));
                        break;
                    }
                    // SAFETY: free-list members are free blocks inside regions.
                    match unsafe { self.hdr(b) } {
                        Ok(h) if h.free() && mapping(h.size) == (fl, sl) => {}
                        Ok(_) => problems.push(format!("block {b:#x} in the wrong free list")),
                        Err(e) => {
                            problems.push(e.to_string());
                            break;
                        }
                    }
                    // SAFETY: as above.
                    unsafe {
                        if rd(b + 40) != prev {
                            problems.push(format!("block {b:#x}: broken back link"));
                        }
                        prev = b;
                        b = rd(b + 32);
                    }
                    n += 1;
                }
            }
            if (self.fl_bitmap & (1 << fl) != 0) != (self.sl_bitmap[fl] != 0) {
                problems.push(format!("first-level bitmap disagrees at {fl}"));
            }
        }
        n
    }

    /// Rebuilds the free lists and counters from the blocks themselves (after a process died
    /// holding the lock): walks each region, merges adjacent free blocks, relinks. Regions
    /// whose headers are damaged are reported in `problems` and left out.
    ///
    /// # Safety
    /// The regions must be this heap's, mapped; the caller holds the lock.
    pub unsafe fn rebuild(&mut self, regions: &[(u64, u64)], problems: &mut Vec<String>) {
        self.fl_bitmap = 0;
        self.sl_bitmap = [0; FL_COUNT];
        self.heads = [[0; SL_COUNT]; FL_COUNT];
        let total: u64 = regions.iter().map(|(s, e)| e - s).sum();
        self.counters = HeapCounters {
            total,
            regions: regions.len() as u64,
            ..HeapCounters::default()
        };
        for &(start, end) in regions {
            let mut addr = start;
            let mut prev = 0u64;
            let mut run: Option<(u64, u64, u64)> = None; // (addr, size, prev) of a free run
            while addr < end {
                // SAFETY: inside the region.
                let h = match unsafe { self.hdr(addr) } {
                    Ok(h) if h.addr + h.size <= end => h,
                    _ => {
                        problems.push(format!(
                            "region [{start:#x}, {end:#x}): damaged block at {addr:#x}; its \
                             rest is left out of the heap"
                        ));
                        break;
                    }
                };
                if h.free() {
                    run = Some(match run {
                        Some((a, s, p)) => (a, s + h.size, p),
                        None => (addr, h.size, prev),
                    });
                } else {
                    if let Some((a, s, p)) = run.take() {
                        // SAFETY: the run lies in the region.
                        // A free run always follows an allocated block or starts the region.
                        unsafe {
                            self.set_hdr(a, p, s, F_FREE);
                            self.insert(a, s);
                            self.set_hdr(addr, a, h.size, h.flags | F_PREV_FREE);
                        }
                    } else {
                        // SAFETY: inside the region.
                        unsafe { self.set_hdr(addr, prev, h.size, h.flags & !F_PREV_FREE) };
                    }
                    self.counters.alloc_count += 1;
                    // SAFETY: verified allocated header.
                    self.counters.requested += unsafe { rd(addr + 24) };
                }
                prev = if h.free() {
                    run.map_or(addr, |r| r.0)
                } else {
                    addr
                };
                addr += h.size;
            }
            if let Some((a, s, p)) = run {
                // SAFETY: the final run lies in the region.
                unsafe {
                    self.set_hdr(a, p, s, F_FREE | F_LAST);
                    self.insert(a, s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 MiB of 4096-aligned memory, on the heap.
    struct Arena(Vec<u8>);
    impl Arena {
        fn base(&self) -> u64 {
            (self.0.as_ptr() as u64).next_multiple_of(4096)
        }
    }

    fn heap() -> (Box<HeapCore>, Arena) {
        // SAFETY: HeapCore is plain integers: all-zero is a valid empty heap.
        let mut h: Box<HeapCore> = unsafe { Box::new(std::mem::zeroed()) };
        h.init();
        (h, Arena(vec![0; (1 << 20) + 4096]))
    }

    #[test]
    fn mapping_classes() {
        assert_eq!(mapping(64), (0, 2));
        assert_eq!(mapping(1023), (0, 31));
        assert_eq!(mapping(1024), (1, 0));
        let (f, s) = mapping_search(1025);
        assert!(f > 1 || s > 0);
    }

    #[test]
    fn a_region_just_big_enough_for_a_large_request_serves_it() {
        // A region grown for one large request is the request plus the header, less than the
        // next class boundary the O(1) search rounds up to: the class scan must find it.
        let (mut h, a) = heap();
        let base = a.base();
        let size: u64 = 600 * 1024 + 100;
        let len = round_up(size + COOKIE_LEN, GRAIN) + HEADER;
        assert!(
            mapping_search(len) > mapping(len),
            "not a case for the scan"
        );
        // SAFETY: the arena is ours, mapped, 4096-aligned, and outlives the heap use here.
        unsafe {
            h.add_region(base, len, true);
            let p = h
                .alloc(size, 1)
                .unwrap()
                .expect("the region fits the request");
            assert_eq!(p, base + HEADER);
            assert_eq!(h.alloc(64, 1).unwrap(), None);
            h.free(p).unwrap();
            // Smaller than the region, in the same class: found as well.
            let q = h.alloc(size - 4096, 1).unwrap().expect("fits");
            h.free(q).unwrap();
            // Bigger than the region: still none, and no corruption.
            assert_eq!(h.alloc(size + 4096, 1).unwrap(), None);
            let mut problems = Vec::new();
            h.check_lists(&mut problems);
            assert!(problems.is_empty(), "{problems:?}");
        }
    }

    #[test]
    fn alloc_free_merge_and_validate() {
        let (mut h, a) = heap();
        let base = a.base();
        let mut problems = Vec::new();
        // SAFETY: the arena is ours, mapped, 4096-aligned, and outlives the heap use here.
        unsafe {
            h.add_region(base, 1 << 20, true);
            let p1 = h.alloc(100, 1).unwrap().unwrap();
            let p2 = h.alloc(5000, 4096).unwrap().unwrap();
            assert_eq!(p2 % 4096, 0);
            let p3 = h.alloc(33, 64).unwrap().unwrap();
            assert_eq!(p3 % 64, 0);
            h.walk_region(base, base + (1 << 20), &mut problems, |_, _, _| {});
            h.check_lists(&mut problems);
            assert!(problems.is_empty(), "{problems:?}");
            assert_eq!(h.free(p2).unwrap().size % GRAIN, 0);
            assert_eq!(h.free(p2), Err(HeapError::DoubleFree { ptr: p2 }));
            h.free(p1).unwrap();
            let f = h.free(p3).unwrap();
            assert_eq!(
                f,
                FreedBlock {
                    addr: base,
                    size: 1 << 20
                }
            );
            assert_eq!(h.counters.free, 1 << 20);
            assert_eq!(h.counters.alloc_count, 0);
        }
    }

    /// Walks the region and the free lists: no problem, and the counters agree with the walk.
    ///
    /// # Safety
    /// `[base, base + len)` is the heap's one region, mapped.
    unsafe fn check_whole(h: &HeapCore, base: u64, len: u64) {
        let mut problems = Vec::new();
        // SAFETY: the caller's guarantee.
        let walked = unsafe { h.walk_region(base, base + len, &mut problems, |_, _, _| {}) };
        let (free, nfree, nalloc, req) = walked;
        // SAFETY: as above.
        let listed = unsafe { h.check_lists(&mut problems) };
        assert!(problems.is_empty(), "{problems:?}");
        let c = &h.counters;
        assert_eq!(
            (c.free, c.free_count, c.alloc_count, c.requested),
            (free, nfree, nalloc, req)
        );
        assert_eq!(listed, nfree);
    }

    #[test]
    fn the_common_allocation_and_free_keep_the_heap_whole_in_every_case() {
        // Sizes across classes (below and above SMALL) so that merges and splits both stay in
        // their class and leave it; frees forward (each grows the free block in front), every
        // other (each becomes a free block of its own), then the rest (each joins a free block
        // after it, or both neighbours: the general path).
        let (mut h, a) = heap();
        let base = a.base();
        let len = 1 << 20;
        let sizes = [1u64, 48, 64, 100, 1000, 2000, 4000];
        // SAFETY: the arena is ours, mapped, 4096-aligned, and outlives the heap use here.
        unsafe {
            h.add_region(base, len, true);
            for round in 0..3 {
                let mut ptrs = Vec::new();
                for i in 0..120 {
                    let size = sizes[i % sizes.len()];
                    let p = h.alloc(size, 1).unwrap().expect("room");
                    assert!(p.is_multiple_of(GRAIN));
                    ptrs.push(p);
                    check_whole(&h, base, len);
                }
                let order: Vec<u64> = match round {
                    0 => ptrs.clone(),
                    1 => ptrs
                        .iter()
                        .step_by(2)
                        .chain(ptrs.iter().skip(1).step_by(2))
                        .copied()
                        .collect(),
                    _ => ptrs.iter().rev().copied().collect(),
                };
                for p in order {
                    h.free(p).unwrap();
                    assert_eq!(h.free(p), Err(HeapError::DoubleFree { ptr: p }));
                    check_whole(&h, base, len);
                }
                assert_eq!(h.counters.free, len);
                assert_eq!(h.counters.free_count, 1);
            }
            // A hole between allocated blocks, carved from its front: the block after it must
            // learn each new tail as its previous block.
            let big = h.alloc(8000, 1).unwrap().unwrap();
            let fence = h.alloc(64, 1).unwrap().unwrap();
            h.free(big).unwrap();
            let mut small = Vec::new();
            for _ in 0..40 {
                let p = h.alloc(1, 1).unwrap().unwrap();
                assert!(p < fence, "served from the hole");
                small.push(p);
                check_whole(&h, base, len);
            }
            for p in small.into_iter().chain([fence]) {
                h.free(p).unwrap();
                check_whole(&h, base, len);
            }
            assert_eq!(h.counters.free, len);
        }
    }

    /// A heap of one 1 MiB region holding two 64 B blocks, side by side at its start.
    fn heap_with_two_blocks() -> (Box<HeapCore>, Arena, u64, u64) {
        let (mut h, a) = heap();
        // SAFETY: the arena is ours, mapped, 4096-aligned, and lives as long as the heap (both
        // are returned together).
        let (p1, p2) = unsafe {
            h.add_region(a.base(), 1 << 20, true);
            (
                h.alloc(64, 1).unwrap().unwrap(),
                h.alloc(64, 1).unwrap().unwrap(),
            )
        };
        (h, a, p1, p2)
    }

    #[test]
    fn a_list_bit_without_a_list_is_reported_not_followed() {
        let (mut h, a) = heap();
        // SAFETY: as above.
        unsafe { h.add_region(a.base(), 1 << 20, true) };
        // The region's list is emptied behind the bitmap's back, as a stray write would.
        let (fl, sl) = mapping(1 << 20);
        h.heads[fl][sl] = 0;
        // SAFETY: the heap's one region is mapped; the corrupt list is never followed.
        let r = unsafe { h.alloc(64, 1) };
        assert_eq!(r, Err(HeapError::Corrupt { block: 0 }));
    }

    #[test]
    fn a_free_whose_next_block_does_not_point_back_is_refused() {
        let (mut h, a, p1, p2) = heap_with_two_blocks();
        let base = a.base();
        // SAFETY: as above; the test rewrites p2's header (with a valid check word) to name
        // another previous block, as a stale header inside a free block would.
        unsafe {
            let n = h.hdr(p2 - HEADER).unwrap();
            h.set_hdr(n.addr, n.addr - 4096, n.size, n.flags);
            let before = h.counters;
            assert_eq!(h.free(p1), Err(HeapError::Corrupt { block: n.addr }));
            assert_eq!(h.counters, before);
            // Put right, the free goes through.
            h.set_hdr(n.addr, p1 - HEADER, n.size, n.flags);
            h.free(p1).unwrap();
            h.free(p2).unwrap();
            check_whole(&h, base, 1 << 20);
        }
    }

    #[test]
    fn only_memory_nobody_wrote_is_reported_zeroed() {
        let (mut h, a) = heap();
        let base = a.base();
        // SAFETY: as above; the arena is fresh anonymous memory, all zero.
        unsafe {
            h.add_region(base, 1 << 20, true);
            // Carved from the new region: zero past the old links (the data starts where the
            // region's links were).
            let (p1, z1) = h.alloc_z(200, 1).unwrap().unwrap();
            assert!(z1);
            assert_eq!(p1, base + HEADER);
            // Aligned with a gap in front: the data lies past any links.
            let (p2, z2) = h.alloc_z(300, 4096).unwrap().unwrap();
            assert!(z2);
            let data = std::slice::from_raw_parts(p2 as *const u8, 300);
            assert!(data.iter().all(|&b| b == 0));
            // Written, freed, merged with the free tail: never zeroed again.
            std::ptr::write_bytes(p1 as *mut u8, 0x5a, 200);
            h.free(p1).unwrap();
            let (p3, z3) = h.alloc_z(200, 1).unwrap().unwrap();
            assert_eq!(p3, p1);
            assert!(!z3);
            h.free(p3).unwrap();
            h.free(p2).unwrap();
            assert!(!h.alloc_z(100, 1).unwrap().unwrap().1);
            // A region said not to be zero is not.
            let (mut h2, a2) = heap();
            h2.add_region(a2.base(), 1 << 20, false);
            assert!(!h2.alloc_z(64, 1).unwrap().unwrap().1);
        }
    }

    #[test]
    fn overflow_into_next_header_is_caught() {
        let (mut h, _a, p1, p2) = heap_with_two_blocks();
        // SAFETY: as above; the test deliberately writes past p1's block into p2's header.
        unsafe {
            let (_, usable) = h.sizes(p1).unwrap();
            std::ptr::write_bytes((p1 + usable) as *mut u8, 0xab, 8);
            if cfg!(feature = "debug-cookies") {
                // The first bytes past the usable size are p1's cookie.
                assert_eq!(h.free(p1), Err(HeapError::Overflow { ptr: p1 }));
            } else {
                assert!(matches!(h.free(p2), Err(HeapError::Corrupt { .. })));
            }
        }
    }

    #[test]
    fn carve_whole_region_and_middle() {
        let (mut h, a) = heap();
        let base = a.base();
        // SAFETY: as above.
        unsafe {
            h.add_region(base, 1 << 20, true);
            let p = h.alloc(100, 1).unwrap().unwrap();
            let f = h.free(p).unwrap();
            h.carve(f, base + 65536, base + 131072).unwrap();
            assert_eq!(h.counters.total, (1 << 20) - 65536);
            let mut problems = Vec::new();
            h.walk_region(base, base + 65536, &mut problems, |_, _, _| {});
            h.walk_region(base + 131072, base + (1 << 20), &mut problems, |_, _, _| {});
            h.check_lists(&mut problems);
            assert!(problems.is_empty(), "{problems:?}");
        }
    }
}
