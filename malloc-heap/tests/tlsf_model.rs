//! Model-based test of [`memplane_heap::tlsf::HeapCore`], the TLSF allocator over raw regions.
//!
//! The heap runs over 1–3 regions (anonymous mappings, 64 KiB to 4 MiB, page-aligned).
//! Random sequences of operations drive it next to a plain model (live blocks with their
//! requested size, alignment, usable size and fill byte; the region table; the carved holes):
//! `alloc` (sizes skewed small up to 200 000, alignments 1 to 4096), `free`, a double free of the
//! pointer just freed, `carve` of whole pages out of the block a free returned (the region table
//! is updated as the caller must: the region splits, shrinks or disappears), `resize_in_place`
//! (absolute and relative sizes), `add_region` of a new arena or of a carved hole given back,
//! requests that are bad (size 0 or beyond `MAX_ALLOC`, alignment not a power of two) or valid
//! but impossible, and `rebuild` after the free lists and counters were overwritten with garbage.
//!
//! Every allocation is filled (its whole usable size, as `sizes` reports it) with a byte of its
//! own; the fill is verified before every free and resize and at the end, and a carved hole is
//! filled with a byte of its own that is verified when the hole is given back and at the end, so
//! a block that overlaps another, a header written into user data or the heap touching memory it
//! gave away all show.
//!
//! After every operation: each live block is aligned, inside a region, does not overlap another,
//! and `sizes` reports what the model recorded; `walk_region` over every region reports no
//! problem, its blocks tile the region exactly, its allocated blocks are exactly the model's live
//! blocks, and its sums match the counters (`free`, `free_count`, `alloc_count`, `requested`);
//! `total` and `regions` match the region table; `check_lists` reports no problem and counts
//! `free_count` blocks; `largest_free` is the largest free block of the walks. An allocation
//! that fails must be impossible (see [`fit_bound`]) and leave the heap untouched, as must a bad
//! request, a double free, and a resize that returns false (which must itself be impossible: the
//! next block is not free or too small); a resize that returns true keeps the contents. At the
//! end everything is freed and each region is one free block covering it exactly.
//!
//! Pinned tests: an overflow into the next block's header is reported as `Corrupt` (never a
//! panic, never a change to the heap); `rebuild` after garbage in, or a stale copy of, the heap
//! core restores a clean heap with every live block intact; `resize_in_place` grows into the
//! next free block, shrinks in place, and refuses (changing nothing) when it cannot grow; a
//! carved-out whole region disappears and comes back. Two regressions found while writing this
//! test: a free that reports damage two blocks on changes nothing, and every byte `sizes`
//! reports usable can be written (with `debug-cookies`, the cookie used to sit among them).

use memplane_heap::tlsf::{
    FL_COUNT, FreedBlock, GRAIN, HEADER, HeapCore, HeapCounters, HeapError, LINKS, MAX_ALLOC,
    MIN_BLOCK,
};
use proptest::prelude::*;
use proptest::sample::Index;

const PAGE: u64 = 4096;
/// Bytes after the user data reserved for the cookie in `debug-cookies` builds.
const COOKIE_LEN: u64 = if cfg!(feature = "debug-cookies") {
    8
} else {
    0
};
/// The byte carved holes are filled with: nothing may write there once carved.
const HOLE_BYTE: u8 = 0xc5;
/// At most this many arenas per case (initial regions included).
const MAX_ARENAS: usize = 6;

// `core_bytes` reads the heap core as bytes, which is sound only because it has no padding:
// `fl_bitmap: u64`, `sl_bitmap: [u32; FL_COUNT]`, `heads: [[u64; 32]; FL_COUNT]`, counters.
const _: () = assert!(
    size_of::<HeapCore>() == 8 + 4 * FL_COUNT + 8 * 32 * FL_COUNT + size_of::<HeapCounters>()
);

/// `len` bytes of private anonymous memory (zeroed, page-aligned, faulted in only where
/// touched: cheaper than zeroing a `Vec` of up to 4 MiB for every case), unmapped on drop.
struct Arena {
    base: u64,
    len: u64,
}

impl Arena {
    fn new(len: u64) -> Arena {
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {len} bytes failed");
        Arena {
            base: p as u64,
            len,
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the heap using it is dropped first
        // (`Harness` declares `core` before `arenas`) and nothing else points into it.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len as usize) };
    }
}

/// A block as `walk_region` visits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Block {
    addr: u64,
    size: u64,
    free: bool,
}

/// A live allocation of the model.
#[derive(Clone, Copy, Debug)]
struct Live {
    ptr: u64,
    req: u64,
    align: u64,
    usable: u64,
    /// The size of its block (header and cookie included).
    block: u64,
    fill: u8,
}

/// Everything a call that must not change the heap could change: the core, and the first 48
/// bytes (header and free-list links, or the start of the user data) of every block.
#[derive(PartialEq, Eq)]
struct Snapshot {
    core: Vec<u8>,
    blocks: Vec<(Block, [u64; 6])>,
}

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// The block size an allocation of `size` bytes needs (header, cookie, granularity).
fn need(size: u64) -> u64 {
    (round_up(size + COOKIE_LEN, GRAIN) + HEADER).max(MIN_BLOCK)
}

/// Checks what `sizes` reports for a block of `block` bytes holding `req` requested ones: the
/// usable bytes cover the request and stay inside the block (before the cookie, which needs
/// `COOKIE_LEN` bytes of it), all the block's bytes without cookies; the block is what the
/// request needs, or 32 bytes more when the rest was too small to split off.
fn check_sizes(req: u64, usable: u64, block: u64) {
    assert!(usable >= req, "usable {usable} < requested {req}");
    if COOKIE_LEN == 0 {
        assert_eq!(
            usable + HEADER,
            block,
            "usable bytes of a {block}-byte block"
        );
    } else {
        assert!(
            usable + HEADER + COOKIE_LEN <= block,
            "usable {usable} of {block} bytes"
        );
    }
    assert!(
        need(req) <= block && block <= need(req) + GRAIN,
        "a block of {block} for a need of {}",
        need(req)
    );
}

/// A free block at least this big is always found for `alloc(size, align)`, so a failing
/// allocation is only allowed while `largest_free() < fit_bound(size, align)`.
///
/// Why this bound: TLSF is a good fit, not a best fit. It looks for the block size the request
/// needs (`need`, plus room for a free block of at least `MIN_BLOCK` in front of an aligned
/// pointer: `align + MIN_BLOCK` more when `align > GRAIN`), rounded up to the next size class so
/// that any block of the classes it searches fits without walking a list. Classes below 1024
/// bytes are exact (32 bytes apart); above, each power of two is split in 32 classes, so the
/// rounding adds less than 2^(log2(size) - 5), at most 1/32 of the size. A block of the rounded
/// size or more lies in a class at or above the one searched, so it is found. The bound is thus
/// exact for what TLSF promises, and a failure with a bigger block free is a bug.
fn fit_bound(size: u64, align: u64) -> u64 {
    let need = need(size);
    let search = if align > GRAIN {
        need + align + MIN_BLOCK
    } else {
        need
    };
    let slack = if search >= 1024 {
        1 << (search.ilog2() - 5)
    } else {
        0
    };
    search + slack
}

/// Panics unless `[ptr, ptr + len)` holds only `byte`.
fn verify_fill(ptr: u64, len: u64, byte: u8, what: &str) {
    let pattern = [byte; 4096];
    // SAFETY: callers pass a range inside one of the harness' arenas (a live block's usable
    // bytes or a carved hole): mapped, initialized (zeroed at creation), nothing writes it
    // concurrently.
    let s = unsafe { std::slice::from_raw_parts(ptr as *const u8, len as usize) };
    for (k, chunk) in s.chunks(4096).enumerate() {
        if chunk != &pattern[..chunk.len()] {
            let off = k * 4096 + chunk.iter().position(|&b| b != byte).unwrap();
            panic!(
                "{what} at {ptr:#x} (len {len}): byte {off} is {:#04x}, expected {byte:#04x}",
                s[off]
            );
        }
    }
}

/// Fills `[ptr, ptr + len)` with `byte`.
fn fill(ptr: u64, len: u64, byte: u8) {
    // SAFETY: callers pass a range inside one of the harness' arenas, mapped read-write and
    // owned by the harness: a live block's usable bytes, a carved hole, or (in the pinned tests)
    // header bytes damaged on purpose, which breaks the heap's checks, not memory safety.
    unsafe { std::ptr::write_bytes(ptr as *mut u8, byte, len as usize) }
}

/// The heap, its memory, and the model.
struct Harness {
    core: Box<HeapCore>,
    arenas: Vec<Arena>,
    /// The region table, as the caller of `carve` keeps it: `[start, end)`.
    regions: Vec<(u64, u64)>,
    /// Ranges carved out, filled with `HOLE_BYTE`, not part of the heap.
    holes: Vec<(u64, u64)>,
    live: Vec<Live>,
    next_fill: u8,
}

impl Harness {
    fn new(region_pages: &[u64]) -> Harness {
        // SAFETY: `HeapCore` is `#[repr(C)]` integers only, so all-zero is a valid value (and an
        // empty heap); `init` then makes it empty explicitly.
        let mut core = unsafe { Box::<HeapCore>::new_zeroed().assume_init() };
        core.init();
        let mut h = Harness {
            core,
            arenas: Vec::new(),
            regions: Vec::new(),
            holes: Vec::new(),
            live: Vec::new(),
            next_fill: 0,
        };
        for &p in region_pages {
            h.add_arena(p * PAGE);
        }
        h
    }

    // --- safe wrappers over the heap: the preconditions are the harness' invariants --------

    fn add_arena(&mut self, len: u64) {
        let a = Arena::new(len);
        let (base, len) = (a.base, a.len);
        self.arenas.push(a);
        // SAFETY: the arena is ours, mapped read-write, page-aligned, used by nothing else, and
        // kept (in `self.arenas`) as long as the heap; fresh anonymous memory: all zero.
        unsafe { self.core.add_region(base, len, true) };
        self.regions.push((base, base + len));
    }

    fn region_of(&self, addr: u64) -> Option<usize> {
        self.regions
            .iter()
            .position(|&(s, e)| (s..e).contains(&addr))
    }

    fn h_alloc(&mut self, size: u64, align: u64) -> Result<Option<u64>, HeapError> {
        // SAFETY: every region is inside an arena we own, still mapped; one thread.
        let r = unsafe { self.core.alloc_z(size, align) }?;
        if let Some((p, true)) = r {
            // The heap says the data is zero past its links: check every byte of it.
            let skip = LINKS.min(size);
            // SAFETY: a fresh allocation of `size` bytes inside an arena we own.
            let data = unsafe {
                std::slice::from_raw_parts((p + skip) as *const u8, (size - skip) as usize)
            };
            assert!(
                data.iter().all(|&b| b == 0),
                "block {p:#x} ({size} bytes) said zeroed but is not"
            );
        }
        Ok(r.map(|(p, _)| p))
    }

    fn h_free(&mut self, ptr: u64) -> Result<FreedBlock, HeapError> {
        assert!(self.region_of(ptr - HEADER).is_some());
        // SAFETY: `ptr - HEADER` lies in a region of the heap (just checked).
        unsafe { self.core.free(ptr) }
    }

    fn h_sizes(&self, ptr: u64) -> Result<(u64, u64), HeapError> {
        assert!(self.region_of(ptr - HEADER).is_some());
        // SAFETY: as in `h_free`.
        unsafe { self.core.sizes(ptr) }
    }

    fn h_resize(&mut self, ptr: u64, size: u64) -> Result<bool, HeapError> {
        assert!(self.region_of(ptr - HEADER).is_some());
        // SAFETY: as in `h_free`.
        unsafe { self.core.resize_in_place(ptr, size) }
    }

    fn walk(&self, region: (u64, u64), problems: &mut Vec<String>) -> (Vec<Block>, [u64; 4]) {
        let mut blocks = Vec::new();
        // SAFETY: the region is one of the heap's, inside an arena we own.
        let (free, nfree, nalloc, req) = unsafe {
            self.core
                .walk_region(region.0, region.1, problems, |addr, size, free| {
                    blocks.push(Block { addr, size, free })
                })
        };
        (blocks, [free, nfree, nalloc, req])
    }

    /// The size of the allocated block whose user pointer is `ptr`, as the walk sees it.
    fn block_of(&self, ptr: u64) -> u64 {
        let r = self.regions[self.region_of(ptr - HEADER).expect("block in no region")];
        let mut problems = Vec::new();
        let blocks = self.walk(r, &mut problems).0;
        assert!(problems.is_empty(), "walk: {problems:?}");
        let b = blocks
            .iter()
            .find(|b| b.addr == ptr - HEADER)
            .expect("no block at the pointer");
        assert!(!b.free, "block of {ptr:#x} is free");
        b.size
    }

    fn check_lists(&self, problems: &mut Vec<String>) -> u64 {
        // SAFETY: all regions are mapped.
        unsafe { self.core.check_lists(problems) }
    }

    fn rebuild(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        // SAFETY: the regions are the heap's, mapped; one thread.
        unsafe { self.core.rebuild(&self.regions, &mut problems) };
        problems
    }

    /// Overwrites the whole heap core with `byte` (any bytes are a valid `HeapCore`: it is
    /// integers only).
    fn scramble_core(&mut self, byte: u8) {
        // SAFETY: writes exactly the `HeapCore` the box owns; every field is an integer, so any
        // byte pattern is a valid value.
        unsafe { std::ptr::write_bytes(&mut *self.core as *mut HeapCore, byte, 1) }
    }

    fn core_bytes(&self) -> Vec<u8> {
        let p = (&*self.core as *const HeapCore).cast::<u8>();
        // SAFETY: `HeapCore` has no padding (asserted at the top of the file), so all its bytes
        // are initialized; the borrow of `self` keeps it alive and unchanged.
        unsafe { std::slice::from_raw_parts(p, size_of::<HeapCore>()) }.to_vec()
    }

    fn restore_core(&mut self, bytes: &[u8]) {
        assert_eq!(bytes.len(), size_of::<HeapCore>());
        let p = (&mut *self.core as *mut HeapCore).cast::<u8>();
        // SAFETY: writes exactly the `HeapCore` the box owns, with bytes read from a `HeapCore`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) }
    }

    fn snapshot(&self) -> Snapshot {
        let mut blocks = Vec::new();
        for &r in &self.regions {
            let mut problems = Vec::new();
            for b in self.walk(r, &mut problems).0 {
                let mut words = [0u64; 6];
                for (k, w) in words.iter_mut().enumerate() {
                    // SAFETY: every block is at least MIN_BLOCK = 64 > 48 bytes, inside an arena
                    // we own, 32-aligned.
                    *w = unsafe { ((b.addr + 8 * k as u64) as *const u64).read() };
                }
                blocks.push((b, words));
            }
        }
        Snapshot {
            core: self.core_bytes(),
            blocks,
        }
    }

    fn assert_unchanged(&self, before: &Snapshot, what: &str) {
        let now = self.snapshot();
        if now.core != before.core {
            let off = now.core.iter().zip(&before.core).position(|(a, b)| a != b);
            panic!("{what} changed the heap core (first differing byte {off:?})");
        }
        if now.blocks != before.blocks {
            let k = now
                .blocks
                .iter()
                .zip(&before.blocks)
                .position(|(a, b)| a != b);
            panic!(
                "{what} changed the blocks: {:?} -> {:?}",
                k.map(|k| before.blocks[k]),
                k.map(|k| now.blocks[k])
            );
        }
    }

    fn new_fill(&mut self) -> u8 {
        loop {
            self.next_fill = self.next_fill.wrapping_add(1);
            if self.next_fill != 0 && self.next_fill != HOLE_BYTE {
                return self.next_fill;
            }
        }
    }

    fn verify_live(&self, l: &Live) {
        verify_fill(l.ptr, l.usable, l.fill, "live block");
    }

    // --- operations -----------------------------------------------------------------------

    /// Allocates and records the block; `None` when the heap is (legitimately) full.
    fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let largest = self.core.largest_free();
        let before = self.core_bytes();
        match self.h_alloc(size, align) {
            Ok(Some(ptr)) => {
                let (req, usable) = self.h_sizes(ptr).expect("sizes of a new block");
                assert_eq!(req, size);
                let block = self.block_of(ptr);
                check_sizes(size, usable, block);
                let fill_byte = self.new_fill();
                fill(ptr, usable, fill_byte);
                self.live.push(Live {
                    ptr,
                    req: size,
                    align,
                    usable,
                    block,
                    fill: fill_byte,
                });
                Some(ptr)
            }
            Ok(None) => {
                assert!(
                    largest < fit_bound(size, align),
                    "alloc({size}, {align}) failed with a free block of {largest} (a block of \
                     {} always fits)",
                    fit_bound(size, align)
                );
                assert!(
                    self.core_bytes() == before,
                    "a failed alloc changed the heap core"
                );
                None
            }
            Err(e) => panic!("alloc({size}, {align}): {e}"),
        }
    }

    /// Frees live block `i` (after verifying its fill); optionally tries a double free.
    fn free(&mut self, i: usize, double: bool) -> FreedBlock {
        let l = self.live.swap_remove(i);
        self.verify_live(&l);
        let f = self
            .h_free(l.ptr)
            .unwrap_or_else(|e| panic!("free({:#x}): {e}", l.ptr));
        assert!(
            f.addr <= l.ptr - HEADER && l.ptr - HEADER + l.block <= f.addr + f.size,
            "freed block {f:?} does not cover {:#x}+{}",
            l.ptr - HEADER,
            l.block
        );
        // The block returned is a free block of its region, exactly.
        let r = self.regions[self.region_of(f.addr).expect("freed block in no region")];
        let mut problems = Vec::new();
        let blocks = self.walk(r, &mut problems).0;
        assert!(problems.is_empty(), "after free: {problems:?}");
        assert!(
            blocks.contains(&Block {
                addr: f.addr,
                size: f.size,
                free: true
            }),
            "free returned {f:?}, which is not a block of the walk"
        );
        if double {
            let before = self.snapshot();
            match self.h_free(l.ptr) {
                Err(HeapError::DoubleFree { ptr }) if ptr == l.ptr => {}
                Err(HeapError::Corrupt { .. }) => {}
                other => panic!("double free of {:#x}: {other:?}", l.ptr),
            }
            assert!(matches!(
                self.h_sizes(l.ptr),
                Err(HeapError::DoubleFree { .. } | HeapError::Corrupt { .. })
            ));
            assert!(matches!(
                self.h_resize(l.ptr, l.req),
                Err(HeapError::DoubleFree { .. } | HeapError::Corrupt { .. })
            ));
            self.assert_unchanged(&before, "a double free");
        }
        f
    }

    /// Carves whole pages out of the block `f` that a free just returned: all of them (`None`),
    /// or the range the indices pick; 0 or at least `MIN_BLOCK` bytes stay on each side.
    fn carve(&mut self, f: FreedBlock, pick: Option<(&Index, &Index)>) {
        let fend = f.addr + f.size;
        let mut lo = f.addr.next_multiple_of(PAGE);
        if lo - f.addr != 0 && lo - f.addr < MIN_BLOCK {
            lo += PAGE;
        }
        let mut hi = fend / PAGE * PAGE;
        if fend - hi != 0 && fend - hi < MIN_BLOCK {
            hi -= PAGE;
        }
        if lo >= hi {
            return;
        }
        let pages = (hi - lo) / PAGE;
        let (start, end) = match pick {
            None => (lo, hi),
            Some((from, to)) => {
                let i = from.index(pages as usize) as u64;
                let j = i + 1 + to.index((pages - i) as usize) as u64;
                (lo + i * PAGE, lo + j * PAGE)
            }
        };
        let r = self.region_of(f.addr).unwrap();
        let (rs, re) = self.regions[r];
        assert!(rs <= start && end <= re);
        let total = self.core.counters.total;
        // SAFETY: `f` is the block the free just returned (nothing ran on the heap since but
        // checks and a failed double free); `start..end` is page-aligned inside it and leaves 0
        // or at least MIN_BLOCK bytes on each side.
        unsafe { self.core.carve(f, start, end) }
            .unwrap_or_else(|e| panic!("carve({f:?}, {start:#x}, {end:#x}): {e}"));
        assert_eq!(self.core.counters.total, total - (end - start));
        // Update the region table and count as the caller must.
        match (start == rs, end == re) {
            (true, true) => {
                self.regions.remove(r);
                self.core.counters.regions -= 1;
            }
            (true, false) => self.regions[r] = (end, re),
            (false, true) => self.regions[r] = (rs, start),
            (false, false) => {
                self.regions[r] = (rs, start);
                self.regions.push((end, re));
                self.core.counters.regions += 1;
            }
        }
        fill(start, end - start, HOLE_BYTE);
        self.holes.push((start, end));
    }

    /// Resizes live block `i` in place; returns whether it did.
    fn resize(&mut self, i: usize, size: u64) -> bool {
        let l = self.live[i];
        self.verify_live(&l);
        let need = need(size);
        // The block after this one, if the region has one.
        let r = self.regions[self.region_of(l.ptr).unwrap()];
        let mut problems = Vec::new();
        let blocks = self.walk(r, &mut problems).0;
        let next = blocks
            .iter()
            .find(|b| b.addr == l.ptr - HEADER + l.block)
            .copied();
        let before = self.snapshot();
        let done = self
            .h_resize(l.ptr, size)
            .unwrap_or_else(|e| panic!("resize_in_place({:#x}, {size}): {e}", l.ptr));
        if done {
            if need > l.block {
                let n = next.expect("grew without a next block");
                assert!(n.free && l.block + n.size >= need, "grew into {n:?}");
            }
            let (req, usable) = self.h_sizes(l.ptr).expect("sizes after resize");
            assert_eq!(req, size);
            let block = self.block_of(l.ptr);
            check_sizes(size, usable, block);
            verify_fill(l.ptr, l.usable.min(usable), l.fill, "resized block");
            let fill_byte = self.new_fill();
            fill(l.ptr, usable, fill_byte);
            self.live[i] = Live {
                req: size,
                usable,
                block,
                fill: fill_byte,
                ..l
            };
        } else {
            assert!(need > l.block, "resize to a smaller need refused");
            if let Some(n) = next {
                assert!(
                    !n.free || l.block + n.size < need,
                    "resize of a {}-byte block to need {need} refused though {n:?} follows",
                    l.block
                );
            }
            self.assert_unchanged(&before, "a refused resize");
        }
        done
    }

    /// Bad requests fail with `BadRequest`, valid but impossible ones with `Ok(None)`/`false`;
    /// none changes anything.
    fn bad_requests(&mut self) {
        let before = self.snapshot();
        let bad = [
            (0, 1),
            (0, 64),
            (MAX_ALLOC + 1, 1),
            (u64::MAX, 8),
            (1, 0),
            (1, 3),
            (100, 48),
            (100, u64::MAX),
            ((1 << 63) + 1, 3),
        ];
        for (size, align) in bad {
            assert_eq!(
                self.h_alloc(size, align),
                Err(HeapError::BadRequest { size, align }),
                "alloc({size}, {align})"
            );
        }
        for (size, align) in [
            (MAX_ALLOC, 1),
            (1, 1 << 40),
            (1, 1 << 63),
            (MAX_ALLOC, 1 << 63),
        ] {
            assert_eq!(
                self.h_alloc(size, align),
                Ok(None),
                "alloc({size}, {align})"
            );
        }
        if let Some(l) = self.live.first().copied() {
            for size in [0, MAX_ALLOC + 1, u64::MAX] {
                assert_eq!(
                    self.h_resize(l.ptr, size),
                    Err(HeapError::BadRequest { size, align: 1 })
                );
            }
            assert_eq!(self.h_resize(l.ptr, MAX_ALLOC), Ok(false));
        }
        self.assert_unchanged(&before, "a bad request");
    }

    /// Gives a carved hole back to the heap as a new region.
    fn readd_hole(&mut self, i: usize) {
        let (s, e) = self.holes.swap_remove(i);
        verify_fill(s, e - s, HOLE_BYTE, "carved hole");
        // SAFETY: the hole is part of an arena we own and the heap no longer uses it.
        unsafe { self.core.add_region(s, e - s, false) };
        self.regions.push((s, e));
    }

    // --- checks ---------------------------------------------------------------------------

    /// Checks every invariant; returns the blocks of all regions.
    fn check(&self) -> Vec<Block> {
        let c = self.core.counters;
        let mut live = self.live.clone();
        live.sort_by_key(|l| l.ptr);
        for l in &live {
            assert_eq!(l.ptr % l.align.max(GRAIN), 0, "misaligned {l:?}");
            assert_eq!(self.h_sizes(l.ptr), Ok((l.req, l.usable)), "sizes of {l:?}");
            let (_, end) = self.regions[self.region_of(l.ptr - HEADER).unwrap()];
            assert!(
                l.ptr - HEADER + l.block <= end,
                "{l:?} runs past its region"
            );
        }
        for w in live.windows(2) {
            assert!(
                w[0].ptr - HEADER + w[0].block <= w[1].ptr - HEADER,
                "overlap: {:?} and {:?}",
                w[0],
                w[1]
            );
        }
        assert_eq!(c.alloc_count, live.len() as u64);
        assert_eq!(c.requested, live.iter().map(|l| l.req).sum::<u64>());
        assert_eq!(
            c.total,
            self.regions.iter().map(|(s, e)| e - s).sum::<u64>()
        );
        assert_eq!(c.regions, self.regions.len() as u64);

        let mut problems = Vec::new();
        let mut all = Vec::new();
        let mut sums = [0u64; 4];
        for &(s, e) in &self.regions {
            let (blocks, r) = self.walk((s, e), &mut problems);
            let mut at = s;
            for b in &blocks {
                assert_eq!(b.addr, at, "blocks of [{s:#x}, {e:#x}) do not tile it");
                at += b.size;
            }
            assert_eq!(at, e, "blocks of [{s:#x}, {e:#x}) do not cover it");
            for (sum, x) in sums.iter_mut().zip(r) {
                *sum += x;
            }
            all.extend(blocks);
        }
        assert!(problems.is_empty(), "walk: {problems:?}");
        assert_eq!(sums, [c.free, c.free_count, c.alloc_count, c.requested]);
        let allocated: Vec<(u64, u64)> = {
            let mut v: Vec<_> = all
                .iter()
                .filter(|b| !b.free)
                .map(|b| (b.addr + HEADER, b.size))
                .collect();
            v.sort();
            v
        };
        let model: Vec<(u64, u64)> = live.iter().map(|l| (l.ptr, l.block)).collect();
        assert_eq!(allocated, model, "allocated blocks differ from the model");

        let n = self.check_lists(&mut problems);
        assert!(problems.is_empty(), "check_lists: {problems:?}");
        assert_eq!(n, c.free_count);
        let largest = all
            .iter()
            .filter(|b| b.free)
            .map(|b| b.size)
            .max()
            .unwrap_or(0);
        assert_eq!(self.core.largest_free(), largest);
        all
    }

    /// Frees everything (verifying the fills) and checks each region is one free block.
    fn finish(&mut self) {
        while !self.live.is_empty() {
            self.free(self.live.len() - 1, false);
        }
        self.check();
        for &(s, e) in &self.regions {
            let mut problems = Vec::new();
            let (blocks, _) = self.walk((s, e), &mut problems);
            assert!(problems.is_empty(), "{problems:?}");
            assert_eq!(
                blocks,
                [Block {
                    addr: s,
                    size: e - s,
                    free: true
                }],
                "region [{s:#x}, {e:#x}) is not one free block when all is freed"
            );
        }
        let c = self.core.counters;
        assert_eq!(c.free, c.total);
        assert_eq!(c.free_count, self.regions.len() as u64);
        for &(s, e) in &self.holes {
            verify_fill(s, e - s, HOLE_BYTE, "carved hole");
        }
    }
}

// --- the property test ------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum NewSize {
    Abs(u64),
    Rel(i64),
}

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        size: u64,
        align: u64,
    },
    Free {
        which: Index,
        double: bool,
        /// (all pages, first page, last page)
        carve: Option<(bool, Index, Index)>,
    },
    Resize {
        which: Index,
        to: NewSize,
    },
    AddRegion {
        pages: u64,
    },
    ReAddHole {
        which: Index,
    },
    BadRequests,
    Rebuild {
        garbage: u8,
    },
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 1u64..=128,
        6 => 1u64..=2048,
        3 => 1u64..=32_768,
        1 => 1u64..=200_000,
    ]
}

fn align() -> impl Strategy<Value = u64> {
    prop_oneof![5 => Just(0u32), 3 => 1u32..=5, 2 => 6u32..13].prop_map(|l| 1u64 << l)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (size(), align()).prop_map(|(size, align)| Op::Alloc { size, align }),
        6 => (
            any::<Index>(),
            prop::bool::weighted(0.25),
            prop::option::weighted(0.25, (any::<bool>(), any::<Index>(), any::<Index>())),
        )
            .prop_map(|(which, double, carve)| Op::Free { which, double, carve }),
        3 => (
            any::<Index>(),
            prop_oneof![
                size().prop_map(NewSize::Abs),
                (-2048i64..=2048).prop_map(NewSize::Rel)
            ],
        )
            .prop_map(|(which, to)| Op::Resize { which, to }),
        1 => (16u64..=256).prop_map(|pages| Op::AddRegion { pages }),
        1 => any::<Index>().prop_map(|which| Op::ReAddHole { which }),
        1 => Just(Op::BadRequests),
        1 => any::<u8>().prop_map(|garbage| Op::Rebuild { garbage }),
    ]
}

fn run(region_pages: &[u64], ops: &[Op]) {
    let mut h = Harness::new(region_pages);
    h.check();
    for op in ops {
        match *op {
            Op::Alloc { size, align } => {
                h.alloc(size, align);
            }
            Op::Free {
                ref which,
                double,
                ref carve,
            } => {
                if !h.live.is_empty() {
                    let f = h.free(which.index(h.live.len()), double);
                    if let Some((all, from, to)) = carve {
                        h.carve(f, (!all).then_some((from, to)));
                    }
                }
            }
            Op::Resize { ref which, to } => {
                if !h.live.is_empty() {
                    let i = which.index(h.live.len());
                    let size = match to {
                        NewSize::Abs(s) => s,
                        NewSize::Rel(d) => h.live[i].req.saturating_add_signed(d).max(1),
                    };
                    h.resize(i, size);
                }
            }
            Op::AddRegion { pages } => {
                if h.arenas.len() < MAX_ARENAS {
                    h.add_arena(pages * PAGE);
                }
            }
            Op::ReAddHole { ref which } => {
                if !h.holes.is_empty() {
                    h.readd_hole(which.index(h.holes.len()));
                }
            }
            Op::BadRequests => h.bad_requests(),
            Op::Rebuild { garbage } => {
                h.scramble_core(garbage);
                let problems = h.rebuild();
                assert!(problems.is_empty(), "rebuild: {problems:?}");
            }
        }
        h.check();
    }
    h.finish();
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        // The default ChaCha generator is a quarter of the run time in debug builds.
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..ProptestConfig::default()
    })]

    #[test]
    fn heap_matches_model(
        region_pages in prop::collection::vec(16u64..=1024, 1..=3),
        ops in prop::collection::vec(op(), 0..200),
    ) {
        run(&region_pages, &ops);
    }
}

// --- pinned tests -----------------------------------------------------------------------------

/// A live block's index by pointer.
fn idx(h: &Harness, ptr: u64) -> usize {
    h.live.iter().position(|l| l.ptr == ptr).unwrap()
}

/// An overflow past a block's usable bytes into the next header (each of its three checked
/// words, the next block allocated or free) is reported as corruption by every call that reads
/// that header, none of which panics or changes anything; undoing the overflow heals the heap.
#[test]
fn overflow_into_next_header_is_reported() {
    for word in 0..3u64 {
        for next_free in [false, true] {
            let mut h = Harness::new(&[16]);
            let a = h.alloc(100, 1).unwrap();
            let b = h.alloc(100, 1).unwrap();
            let c = h.alloc(100, 1).unwrap();
            let _d = h.alloc(100, 1).unwrap();
            if next_free {
                h.free(idx(&h, b), false);
            }
            h.check();
            let la = h.live[idx(&h, a)];
            let hdr_b = a - HEADER + la.block;
            assert_eq!(hdr_b, b - HEADER);
            // The overflow: from the end of a's usable bytes into b's header, up to and including
            // the first byte of `word`.
            let from = a + la.usable;
            let len = hdr_b + 8 * word + 1 - from;
            let mut saved = vec![0u8; len as usize];
            // SAFETY: [from, from + len) is inside the arena (a's tail and b's header).
            unsafe {
                std::ptr::copy_nonoverlapping(from as *const u8, saved.as_mut_ptr(), saved.len())
            };
            fill(from, len, 0xab);
            let before = h.snapshot();

            let corrupt_b = Err(HeapError::Corrupt { block: hdr_b });
            let mut problems = Vec::new();
            h.walk(h.regions[0], &mut problems);
            assert!(
                problems.iter().any(|p| p.contains("corruption")),
                "walk: {problems:?}"
            );
            if cfg!(feature = "debug-cookies") {
                // The cookie after a's data goes first.
                assert!(matches!(
                    h.h_free(a),
                    Err(HeapError::Overflow { .. } | HeapError::Corrupt { .. })
                ));
            } else {
                assert_eq!(h.h_free(a).map(|_| ()), corrupt_b.map(|_: ()| ()));
                assert_eq!(
                    h.h_resize(a, 5000),
                    Err(HeapError::Corrupt { block: hdr_b })
                );
            }
            if next_free {
                let mut problems = Vec::new();
                h.check_lists(&mut problems);
                assert!(
                    !problems.is_empty(),
                    "check_lists missed the corrupt free block"
                );
                // c sits after the corrupt free block: its free must look at it.
                assert_eq!(
                    h.h_free(c).map(|_| ()),
                    Err(HeapError::Corrupt { block: hdr_b })
                );
                // An allocation that picks the corrupt block reports it.
                assert_eq!(
                    h.h_alloc(100, 1).map(|_| ()),
                    Err(HeapError::Corrupt { block: hdr_b })
                );
            } else {
                assert_eq!(
                    h.h_free(b).map(|_| ()),
                    Err(HeapError::Corrupt { block: hdr_b })
                );
                assert_eq!(h.h_sizes(b), Err(HeapError::Corrupt { block: hdr_b }));
            }
            h.assert_unchanged(&before, "a call on a corrupt heap");

            // Undo the overflow: the heap is whole again.
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(saved.as_ptr(), from as *mut u8, saved.len()) };
            fill(a, la.usable, la.fill);
            h.check();
            h.finish();
        }
    }
}

/// Regression: a free whose next block is free merges with it and then relinks the block after
/// that one. That block's header was read only after the merge, so when it was damaged the free
/// returned `Corrupt` with the heap already changed: the "failed" free had put the allocation
/// on a free list (the caller, told it failed, keeps using memory the heap will hand out again)
/// and left the counters behind. Now it is verified first, and the failing free changes nothing.
#[test]
fn failed_free_with_damage_two_blocks_on_changes_nothing() {
    let mut h = Harness::new(&[16]);
    let a = h.alloc(100, 1).unwrap();
    let n = h.alloc(100, 1).unwrap();
    let c = h.alloc(100, 1).unwrap();
    let _d = h.alloc(100, 1).unwrap();
    h.free(idx(&h, n), false);
    h.check();
    // Damage c's header (a stray write through n's dangling pointer, say).
    let hdr_c = c - HEADER;
    // SAFETY: c's header is inside the arena.
    let saved = unsafe { (hdr_c as *const u8).read() };
    fill(hdr_c, 1, !saved);
    let before = h.snapshot();
    assert_eq!(h.h_free(a), Err(HeapError::Corrupt { block: hdr_c }));
    h.assert_unchanged(&before, "a free that failed");
    // a is still allocated, with its contents.
    let la = h.live[idx(&h, a)];
    assert_eq!(h.h_sizes(a), Ok((la.req, la.usable)));
    h.verify_live(&la);
    // Repaired, the heap is whole and a frees normally.
    fill(hdr_c, 1, saved);
    h.check();
    h.finish();
}

/// Every byte `sizes` reports usable can be written (regression for `debug-cookies`, where the
/// cookie sat inside the bytes reported usable, so writing them made the free fail with
/// `Overflow`); with cookies, one byte more is reported as an overflow.
#[test]
fn all_usable_bytes_can_be_written() {
    let mut h = Harness::new(&[64]);
    for size in (1..=200).chain([1000, 4095, 4096, 4097, 65_535]) {
        // `alloc` fills all the usable bytes; `free` checks the fill, then frees.
        let p = h.alloc(size, 1).unwrap();
        h.check();
        if cfg!(feature = "debug-cookies") {
            let l = h.live[idx(&h, p)];
            // SAFETY: the byte after the usable ones is the cookie's, inside the block.
            let saved = unsafe { ((p + l.usable) as *const u8).read() };
            fill(p + l.usable, 1, !saved);
            let before = h.snapshot();
            assert_eq!(h.h_free(p).map(|_| ()), Err(HeapError::Overflow { ptr: p }));
            h.assert_unchanged(&before, "a free that found an overflow");
            fill(p + l.usable, 1, saved);
        }
        h.free(idx(&h, p), false);
        h.check();
    }
    h.finish();
}

/// `rebuild` after the free lists and counters were overwritten (garbage, or a stale copy of the
/// core from before more allocations and frees, as when a process dies holding the lock)
/// restores a clean heap: walk and lists are clean, the counters right, every live block is
/// still allocated with its contents, and allocation and free work afterwards.
#[test]
fn rebuild_restores_the_heap() {
    for stale in [false, true] {
        let mut h = Harness::new(&[64, 16, 256]);
        // A region whose last block is allocated, one fully free, one with free runs between
        // allocations.
        let mut ptrs = Vec::new();
        for k in 0..40u64 {
            if let Some(p) = h.alloc(50 + 997 * (k % 7), 1 << (k % 9)) {
                ptrs.push(p);
            }
        }
        for (k, &p) in ptrs.iter().enumerate() {
            if k % 3 == 1 {
                h.free(idx(&h, p), false);
            }
        }
        let big = h.alloc(60 * 4096, 1).expect("a big block");
        let i = idx(&h, big);
        h.free(i, false);
        h.check();
        let copy = h.core_bytes();
        if stale {
            // More work after the copy: the copy's lists now point at allocated blocks.
            for k in 0..10u64 {
                h.alloc(3000 + 100 * k, 64);
            }
            let n = h.live.len();
            h.free(n / 2, false);
            h.free(0, false);
            h.check();
            h.restore_core(&copy);
        } else {
            h.scramble_core(0x5a);
        }
        let live_before: Vec<_> = h.live.iter().map(|l| (l.ptr, l.req, l.usable)).collect();
        let problems = h.rebuild();
        assert!(problems.is_empty(), "{problems:?}");
        // Every invariant, and every live block still allocated with its sizes and contents.
        h.check();
        for l in h.live.clone() {
            h.verify_live(&l);
        }
        let live_after: Vec<_> = h.live.iter().map(|l| (l.ptr, l.req, l.usable)).collect();
        assert_eq!(live_before, live_after);
        // The heap works.
        for k in 0..20u64 {
            h.alloc(1 + 500 * k, 32);
            h.check();
        }
        while h.live.len() > 5 {
            h.free(1, false);
            h.check();
        }
        h.finish();
    }
}

/// `resize_in_place`: grows into the free block after it (the rest stays a free block), shrinks
/// in place (the freed tail merges with the free block after it), and refuses with no change when
/// the next block is allocated, too small, or there is none.
#[test]
fn resize_in_place_grows_shrinks_and_refuses() {
    let mut h = Harness::new(&[16]);
    let a = h.alloc(100, 1).unwrap();
    let b = h.alloc(1000, 1).unwrap();
    let c = h.alloc(100, 1).unwrap();
    let block_a = h.live[idx(&h, a)].block;
    let block_b = h.live[idx(&h, b)].block;
    h.free(idx(&h, b), false);
    h.check();

    // Grow a into b's free block: the pointer stays, the rest of b's block is free after it.
    assert!(h.resize(idx(&h, a), 600));
    let blocks = h.check();
    let la = h.live[idx(&h, a)];
    assert_eq!(la.block, need(600));
    let rest = Block {
        addr: a - HEADER + need(600),
        size: block_a + block_b - need(600),
        free: true,
    };
    assert!(blocks.contains(&rest), "{blocks:?}");
    assert_eq!(rest.addr + rest.size, c - HEADER);

    // Too big for a plus the free block after it: refused, nothing changes.
    let too_big = block_a + block_b - HEADER + 1;
    assert!(!h.resize(idx(&h, a), too_big));
    // Exactly a plus the free block: taken whole.
    assert!(h.resize(idx(&h, a), block_a + block_b - HEADER - COOKIE_LEN));
    let blocks = h.check();
    assert_eq!(h.live[idx(&h, a)].block, block_a + block_b);
    assert!(!blocks.iter().any(|b| b.free && b.addr < c), "{blocks:?}");

    // Next block allocated: growing is refused.
    assert!(!h.resize(idx(&h, a), block_a + block_b));
    // Shrink in place: the tail becomes a free block before c.
    assert!(h.resize(idx(&h, a), 10));
    let blocks = h.check();
    assert_eq!(h.live[idx(&h, a)].block, MIN_BLOCK);
    assert!(blocks.contains(&Block {
        addr: a - HEADER + MIN_BLOCK,
        size: block_a + block_b - MIN_BLOCK,
        free: true
    }));
    // Shrink again, into a tail that merges with the free block after it.
    assert!(h.resize(idx(&h, a), 300));
    assert!(h.resize(idx(&h, a), 40));
    let blocks = h.check();
    assert!(blocks.contains(&Block {
        addr: a - HEADER + need(40),
        size: block_a + block_b - need(40),
        free: true
    }));
    // A shrink that leaves less than MIN_BLOCK keeps the block as it is.
    let lc = h.live[idx(&h, c)];
    assert!(h.resize(idx(&h, c), lc.req - 1));
    assert_eq!(h.live[idx(&h, c)].block, lc.block);

    h.finish();

    // The last block of a region cannot grow: here one block covering the whole region.
    let mut h = Harness::new(&[16]);
    let whole = 16 * PAGE - HEADER - COOKIE_LEN;
    let a = h.alloc(whole, 1).unwrap();
    assert_eq!(
        h.check(),
        [Block {
            addr: a - HEADER,
            size: 16 * PAGE,
            free: false
        }]
    );
    assert!(!h.resize(idx(&h, a), whole + 1));
    // Shrunk, it can grow back to the region's end but not past it.
    assert!(h.resize(idx(&h, a), 1000));
    h.check();
    assert!(!h.resize(idx(&h, a), whole + 1));
    assert!(h.resize(idx(&h, a), whole));
    h.finish();
}

/// Carving the whole of a fully free region makes it disappear; giving it back brings it back.
#[test]
fn carve_whole_region_and_give_it_back() {
    let mut h = Harness::new(&[16, 32]);
    let p = h.alloc(100, 1).unwrap();
    let i = idx(&h, p);
    let f = h.free(i, true);
    let r = h.regions[h.region_of(p).unwrap()];
    assert_eq!((f.addr, f.addr + f.size), r);
    h.carve(f, None);
    h.check();
    assert_eq!(h.regions.len(), 1);
    h.readd_hole(0);
    h.check();
    h.finish();
}
