//! The heap's shared state: the file `memplane_heap` in the runtime directory, mapped by every
//! process (anywhere: it holds no pointer into itself).
//!
//! It holds, `#[repr(C)]` and versioned like the memory configuration: one [`SharedHeap`] per
//! NUMA node (robust lock, allocator core, region table), and the memzone table with its hash
//! index. The primary creates and initialises it; secondaries validate it on attach.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use memplane_hugepage::shared::SharedFile;

use crate::lock::RobustMutex;
use crate::tlsf::{HEADER, HeapCore, HeapError};

/// The file's name in the runtime directory.
pub const FILE_NAME: &str = "memplane_heap";
/// Magic, written last.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MPLNHEAP");
/// Layout version (2: memzone free-slot bitmap; 3: the "zeroed" block flag, which an older
/// process would take for a corrupt header).
pub const VERSION: u32 = 3;
/// Heaps (NUMA nodes) at most.
pub const MAX_HEAPS: usize = 8;
/// Regions per heap at most.
pub const MAX_REGIONS: usize = 2048;
/// Memzones at most (DPDK's default `rte_memzone_max_get()`).
pub const MAX_MEMZONES: usize = 2560;
/// Memzone name field (31 characters and a NUL, as DPDK's).
pub const MZ_NAME_LEN: usize = 32;
/// Slots of the memzone name index (a power of two, above twice the table).
pub const MZ_INDEX: usize = 8192;

/// One region of a heap: memory added by a growth.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// One heap: its lock, the data the lock protects, and the growth lock.
#[repr(C)]
pub struct SharedHeap {
    /// The heap's lock (never held across IPC).
    pub lock: RobustMutex,
    /// Serialises growth across processes: whoever takes it first tries the heap again (another
    /// process may just have grown it) before asking for pages, so the heap never grows twice
    /// for one shortage. Held across the growth transaction; robust like the heap lock.
    pub grow_lock: RobustMutex,
    data: std::cell::UnsafeCell<HeapData>,
}

/// What a heap's lock protects.
#[repr(C)]
pub struct HeapData {
    /// Its NUMA node (set at creation, never changed).
    pub node: u32,
    /// 1 once initialised.
    pub active: u32,
    /// Growths so far.
    pub grows: u64,
    /// Shrinks so far.
    pub shrinks: u64,
    /// Times a dead holder's lock was recovered.
    pub recoveries: u64,
    /// The allocator.
    pub core: HeapCore,
    /// Regions in use.
    pub nregions: u64,
    /// The regions, sorted by address.
    pub regions: [Region; MAX_REGIONS],
}

/// One memzone.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemzoneEntry {
    /// Name, NUL-terminated.
    pub name: [u8; MZ_NAME_LEN],
    /// Address.
    pub addr: u64,
    /// IOVA.
    pub iova: u64,
    /// Length.
    pub len: u64,
    /// Page size of the memory under it.
    pub page_size: u64,
    /// NUMA node.
    pub node: i32,
    /// Flags given at reservation.
    pub flags: u32,
    /// 1 when in use.
    pub used: u32,
    /// Padding.
    pub _pad: u32,
}

/// The head of the file.
#[repr(C)]
pub struct HeapFile {
    /// [`MAGIC`] once initialised.
    pub magic: AtomicU64,
    /// [`VERSION`].
    pub version: u32,
    /// `size_of::<HeapFile>()` of the writer.
    pub size: u32,
    /// `size_of::<SharedHeap>()` of the writer.
    pub heap_size: u32,
    /// Heaps in use.
    pub nheaps: u32,
    /// The heaps.
    pub heaps: [SharedHeap; MAX_HEAPS],
    /// The memzone table's lock.
    pub mz_lock: RobustMutex,
    mz: std::cell::UnsafeCell<MemzoneTable>,
}

/// The memzone table (protected by [`HeapFile::mz_lock`]).
#[repr(C)]
pub struct MemzoneTable {
    /// Memzones in use.
    pub count: u32,
    /// Deleted slots in the index.
    pub tombs: u32,
    /// Name index: entry index + 1, 0 = empty, `u32::MAX` = deleted.
    pub index: [u32; MZ_INDEX],
    /// One bit per entry, set while it is in use: a free entry is found in 40 words, not by
    /// reading up to 2560 entries.
    pub used_map: [u64; MAX_MEMZONES / 64],
    /// The memzones.
    pub entries: [MemzoneEntry; MAX_MEMZONES],
}

/// The heap file, mapped in this process.
pub struct HeapMap {
    ptr: *mut HeapFile,
    file: SharedFile,
}

// SAFETY: the mapping is shared memory; every mutable access goes through the robust locks it
// contains (or is a write-once initialisation before the magic is published).
unsafe impl Send for HeapMap {}
// SAFETY: as above.
unsafe impl Sync for HeapMap {}

/// Why the heap file cannot be used.
#[derive(Debug)]
pub enum StateError {
    /// A system call failed.
    Io(String, std::io::Error),
    /// It does not match this build.
    Layout(String),
}

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateError::Io(w, e) => write!(f, "{w}: {e}"),
            StateError::Layout(w) => write!(
                f,
                "heap layout mismatch ({w}): primary and secondary must run the same memplane"
            ),
        }
    }
}

impl std::error::Error for StateError {}

impl HeapMap {
    /// Creates the file with `nheaps` heaps for `nodes` (primary).
    pub fn create(dir: &Path, nodes: &[u32]) -> Result<HeapMap, StateError> {
        if nodes.is_empty() || nodes.len() > MAX_HEAPS {
            return Err(StateError::Layout(format!("{} heaps", nodes.len())));
        }
        let path = dir.join(FILE_NAME);
        let file = SharedFile::create(&path, std::mem::size_of::<HeapFile>())
            .map_err(|e| StateError::Io(format!("create {}", path.display()), e))?;
        let m = HeapMap {
            ptr: file.as_ptr().cast(),
            file,
        };
        // SAFETY: the file is new, zero-filled and mapped only here; zero is a valid HeapFile
        // (integers, arrays, atomics; the mutexes are initialised below before use).
        unsafe {
            let f = &mut *m.ptr;
            f.version = VERSION;
            f.size = std::mem::size_of::<HeapFile>() as u32;
            f.heap_size = std::mem::size_of::<SharedHeap>() as u32;
            f.nheaps = nodes.len() as u32;
            for (i, &n) in nodes.iter().enumerate() {
                let h = &mut f.heaps[i];
                RobustMutex::init(&mut h.lock)
                    .map_err(|e| StateError::Layout(format!("heap lock: {e}")))?;
                RobustMutex::init(&mut h.grow_lock)
                    .map_err(|e| StateError::Layout(format!("heap growth lock: {e}")))?;
                let d = h.data.get_mut();
                d.node = n;
                d.core.init();
                d.active = 1;
            }
            RobustMutex::init(&mut f.mz_lock)
                .map_err(|e| StateError::Layout(format!("memzone lock: {e}")))?;
        }
        m.file().magic.store(MAGIC, Ordering::Release);
        Ok(m)
    }

    /// Maps the primary's file and checks it.
    pub fn attach(dir: &Path) -> Result<HeapMap, StateError> {
        let path = dir.join(FILE_NAME);
        let file = SharedFile::open(&path)
            .map_err(|e| StateError::Io(format!("open {}", path.display()), e))?;
        if file.len() != std::mem::size_of::<HeapFile>() {
            return Err(StateError::Layout(format!(
                "{} is {} bytes, this build expects {}",
                path.display(),
                file.len(),
                std::mem::size_of::<HeapFile>()
            )));
        }
        let m = HeapMap {
            ptr: file.as_ptr().cast(),
            file,
        };
        let f = m.file();
        if f.magic.load(Ordering::Acquire) != MAGIC {
            return Err(StateError::Layout("magic".into()));
        }
        if f.version != VERSION
            || f.size as usize != std::mem::size_of::<HeapFile>()
            || f.heap_size as usize != std::mem::size_of::<SharedHeap>()
            || f.nheaps == 0
            || f.nheaps as usize > MAX_HEAPS
        {
            return Err(StateError::Layout(format!(
                "version {} sizes {}/{} heaps {}",
                f.version, f.size, f.heap_size, f.nheaps
            )));
        }
        Ok(m)
    }

    /// The file's contents.
    #[inline]
    pub fn file(&self) -> &HeapFile {
        // SAFETY: the mapping is exactly one HeapFile, alive as long as `self`; fields are
        // integers, atomics and process-shared mutexes.
        unsafe { &*self.ptr }
    }

    /// Heap `i`'s data.
    ///
    /// # Safety
    /// The caller holds heap `i`'s lock, so no other reference to the data is in use.
    #[allow(clippy::mut_from_ref)]
    #[inline]
    pub unsafe fn heap_mut(&self, i: usize) -> &mut HeapData {
        // SAFETY: the data sits in an UnsafeCell; exclusive under the lock (caller).
        unsafe { &mut *self.file().heaps[i].data.get() }
    }

    /// The memzone table.
    ///
    /// # Safety
    /// The caller holds the memzone lock.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn memzones_mut(&self) -> &mut MemzoneTable {
        // SAFETY: the table sits in an UnsafeCell; exclusive under the lock (caller).
        unsafe { &mut *self.file().mz.get() }
    }

    /// The NUMA node of heap `i` (fixed at creation, read without the lock).
    pub fn node_of(&self, i: usize) -> u32 {
        // SAFETY: `node` is written once by the primary before the magic is published and never
        // again; reading it races with nothing.
        unsafe { std::ptr::addr_of!((*self.file().heaps[i].data.get()).node).read_volatile() }
    }

    /// The heap index serving `node`.
    pub fn heap_of(&self, node: u32) -> Option<usize> {
        (0..self.nheaps()).find(|&i| self.node_of(i) == node)
    }

    /// Heaps in use.
    #[inline]
    pub fn nheaps(&self) -> usize {
        self.file().nheaps as usize
    }

    /// Removes the file (primary at exit).
    pub fn remove(&self) {
        self.file.remove();
    }
}

// SAFETY: the data cell is only reached through `heap_mut`, under the heap's lock.
unsafe impl Sync for SharedHeap {}
// SAFETY: the memzone cell is only reached through `memzones_mut`, under its lock.
unsafe impl Sync for HeapFile {}

impl HeapData {
    /// The regions in use.
    #[inline]
    pub fn regions(&self) -> &[Region] {
        &self.regions[..(self.nregions as usize).min(MAX_REGIONS)]
    }

    /// The region holding `addr`.
    #[inline]
    pub fn region_of(&self, addr: u64) -> Option<Region> {
        let r = self.regions();
        let i = r.partition_point(|x| x.end <= addr);
        r.get(i).copied().filter(|x| x.start <= addr)
    }

    /// Whether `ptr` is a user pointer inside one of the regions (its header is).
    #[inline]
    pub fn check_ptr(&self, ptr: u64) -> Result<(), HeapError> {
        match self.region_of(ptr.saturating_sub(HEADER)) {
            Some(_) => Ok(()),
            None => Err(HeapError::InvalidPointer { ptr }),
        }
    }

    /// Makes `[start, start + len)` a new region of the heap: in the table and one free block.
    /// False (nothing changed) when the table is full.
    ///
    /// # Safety
    /// As [`HeapCore::add_region`], with the heap's lock held.
    pub unsafe fn add_range(&mut self, start: u64, len: u64, zeroed: bool) -> bool {
        if !self.insert_region(Region {
            start,
            end: start + len,
        }) {
            return false;
        }
        // SAFETY: the caller's guarantees.
        unsafe { self.core.add_region(start, len, zeroed) };
        self.core.counters.regions = self.nregions;
        true
    }

    /// Adds `[start, start + len)` as a region holding one allocated block for a process that
    /// has not mapped it yet (see `HeapCore::add_region_held`). False when the region table is
    /// full.
    ///
    /// # Safety
    /// As [`HeapData::add_range`], the pages zero-filled.
    pub unsafe fn add_range_held(&mut self, start: u64, len: u64) -> bool {
        if !self.insert_region(Region {
            start,
            end: start + len,
        }) {
            return false;
        }
        // SAFETY: the caller's guarantees.
        unsafe { self.core.add_region_held(start, len) };
        self.core.counters.regions = self.nregions;
        true
    }

    /// Drops the region `[start, start + len)` holding one held block, without reading it (its
    /// holder could not map it). False if no region is exactly that range.
    pub fn drop_held(&mut self, start: u64, len: u64) -> bool {
        let n = self.nregions as usize;
        if !self.regions[..n]
            .iter()
            .any(|r| r.start == start && r.end == start + len)
        {
            return false;
        }
        if !self.cut_region(start, start + len) {
            return false;
        }
        self.core.forget_held(len);
        self.core.counters.regions = self.nregions;
        true
    }

    /// Adds a region, keeping the table sorted. False when the table is full.
    pub fn insert_region(&mut self, reg: Region) -> bool {
        let n = self.nregions as usize;
        if n >= MAX_REGIONS {
            return false;
        }
        let i = self.regions[..n].partition_point(|x| x.start < reg.start);
        self.regions.copy_within(i..n, i + 1);
        self.regions[i] = reg;
        self.nregions += 1;
        true
    }

    /// Takes `[start, end)` out of the region containing it (which splits, shrinks or goes).
    /// False when the table is full (a split needs a slot).
    pub fn cut_region(&mut self, start: u64, end: u64) -> bool {
        let n = self.nregions as usize;
        let i = self.regions[..n].partition_point(|x| x.end <= start);
        if i >= n {
            return false;
        }
        let r = self.regions[i];
        let (front, back) = (start > r.start, end < r.end);
        match (front, back) {
            (false, false) => {
                self.regions.copy_within(i + 1..n, i);
                self.nregions -= 1;
            }
            (true, false) => self.regions[i].end = start,
            (false, true) => self.regions[i].start = end,
            (true, true) => {
                if n >= MAX_REGIONS {
                    return false;
                }
                self.regions.copy_within(i + 1..n, i + 2);
                self.regions[i].end = start;
                self.regions[i + 1] = Region {
                    start: end,
                    end: r.end,
                };
                self.nregions += 1;
            }
        }
        true
    }
}
