//! The shared heap: `malloc`/`free` from any process, on memory every process maps at the same
//! address, growing and shrinking through the memory layer's transactions.
//!
//! One heap per NUMA node, each behind a robust process-shared lock. Allocation takes the lock,
//! asks the O(1) allocator, and releases the lock. When nothing fits, the lock is released and
//! the memory layer is asked for pages (the primary allocates them, every attached process maps
//! them, and the primary's hook adds them to the heap, all before the answer comes back); then
//! the allocation is tried again. The lock is never held across IPC. A free that leaves whole
//! pages unused takes them out of the heap under the lock, then gives them back through the
//! memory layer (if that fails, the primary puts them back into the heap itself).
//!
//! A process that dies holding a heap's lock does not hang the others: the next locker rebuilds
//! the heap's free lists from the blocks themselves and goes on.

use std::fmt::Write as _;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memplane_core::channel::Channel;
use memplane_core::txn::{MemRange, TxnStatus};
use memplane_hugepage::va::Spread;
use memplane_hugepage::{AllocSpec, HeapHooks, MemError, Memory};

use crate::lock::{Guard, LockError};
use crate::state::{HeapData, HeapMap, MAX_HEAPS, Region, StateError};
use crate::tlsf::{GRAIN, HEADER, HeapError, LINKS, MAX_ALLOC, MIN_BLOCK};

/// Why an allocation or free failed.
#[derive(Debug)]
pub enum AllocError {
    /// Size zero, absurd, or an alignment that is not a power of two.
    BadRequest {
        /// Size asked.
        size: u64,
        /// Alignment asked.
        align: u64,
    },
    /// No memory: the heap is full and could not grow.
    OutOfMemory {
        /// Size asked.
        size: u64,
        /// Why growing failed.
        why: String,
    },
    /// The heap refused a pointer or found corruption.
    Heap(HeapError),
    /// The heap's lock is unusable.
    Lock(LockError),
    /// No heap serves this NUMA node.
    NoHeap(u32),
}

impl std::fmt::Display for AllocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllocError::BadRequest { size, align } => write!(
                f,
                "cannot allocate {size} bytes aligned to {align}: the size must be 1..={MAX_ALLOC} \
                 and the alignment a power of two"
            ),
            AllocError::OutOfMemory { size, why } => {
                write!(f, "out of memory allocating {size} bytes: {why}")
            }
            AllocError::Heap(e) => write!(f, "{e}"),
            AllocError::Lock(e) => write!(f, "{e}"),
            AllocError::NoHeap(n) => write!(f, "no heap on NUMA node {n}"),
        }
    }
}

impl std::error::Error for AllocError {}

impl From<HeapError> for AllocError {
    fn from(e: HeapError) -> Self {
        AllocError::Heap(e)
    }
}

impl From<LockError> for AllocError {
    fn from(e: LockError) -> Self {
        AllocError::Lock(e)
    }
}

/// Per-heap statistics (DPDK's `rte_malloc_get_socket_stats`, plus a few).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// NUMA node.
    pub node: u32,
    /// Bytes in the heap (all regions).
    pub heap_size: u64,
    /// Bytes in free blocks (headers included).
    pub free: u64,
    /// Bytes in allocated blocks (`heap_size - free`).
    pub allocated: u64,
    /// The largest free block (header included).
    pub largest_free: u64,
    /// Allocated blocks.
    pub alloc_count: u64,
    /// Free blocks.
    pub free_count: u64,
    /// Bytes users asked for in allocated blocks.
    pub requested: u64,
    /// Regions.
    pub regions: u64,
    /// Growths so far.
    pub grows: u64,
    /// Shrinks so far.
    pub shrinks: u64,
    /// Recoveries from a dead lock holder.
    pub recoveries: u64,
}

pub(crate) struct Shared {
    pub(crate) map: HeapMap,
    pub(crate) recoveries_seen: AtomicU64,
    /// The smallest page of any memory list: a free block below it holds no page to give back.
    pub(crate) min_page: u64,
    /// Whether the region starting at an address may be walked here (see `Heap::mapped_here`).
    pub(crate) walkable: Box<dyn Fn(u64) -> bool + Send + Sync>,
}

impl Shared {
    /// The index of the heap on NUMA node `node`.
    pub(crate) fn index(&self, node: u32) -> Result<usize, AllocError> {
        self.map.heap_of(node).ok_or(AllocError::NoHeap(node))
    }

    /// Locks heap `i`, repairing it first if its last holder died. The data reference is tied to
    /// the guard's lifetime: it is exclusive while the lock is held.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    pub(crate) fn lock(&self, i: usize) -> Result<(Guard<'_>, &mut HeapData), AllocError> {
        let h = &self.map.file().heaps[i];
        let mut g = h.lock.lock()?;
        // SAFETY: we hold heap i's lock.
        let hm = unsafe { self.map.heap_mut(i) };
        if g.recovered() {
            self.repair(i, hm);
            g.mark_consistent();
        }
        Ok((g, hm))
    }

    /// Rebuilds heap `i` (`hm`, whose lock the caller took over from a holder that died) from
    /// its regions, and reports what it found.
    #[cold]
    #[inline(never)]
    fn repair(&self, i: usize, hm: &mut HeapData) {
        let mut problems = Vec::new();
        let regions: Vec<(u64, u64)> = hm
            .regions()
            .iter()
            .filter(|r| {
                let ok = (self.walkable)(r.start);
                if !ok {
                    problems.push(format!(
                        "region [{:#x}, {:#x}) is not mapped here: left out of the repair",
                        r.start, r.end
                    ));
                }
                ok
            })
            .map(|r| (r.start, r.end))
            .collect();
        // SAFETY: the caller holds the lock; the regions are the heap's, mapped in every
        // process.
        unsafe { hm.core.rebuild(&regions, &mut problems) };
        hm.recoveries += 1;
        self.recoveries_seen.fetch_add(1, Ordering::Relaxed);
        for p in problems {
            eprintln!("memplane heap {i}: after a holder died: {p}");
        }
    }
}

/// The primary's hooks: new pages join the heap, refused frees come back.
struct Hooks {
    shared: Arc<Shared>,
}

/// How pages join a heap.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Join {
    /// As free memory whose bytes are all zero.
    Zeroed,
    /// As free memory holding whatever users last wrote.
    Dirty,
    /// As one block held for the requester, which has not mapped them yet.
    Held,
}

impl Hooks {
    /// Adds `range` to heap `heap` as a new region, counted as a growth.
    fn add(&self, heap: u32, range: MemRange, how: Join) -> Result<(), TxnStatus> {
        self.join(heap, range, how, true)
    }

    /// Adds `range` to heap `heap` as a new region; a growth if `grown` (else memory the heap
    /// starts with).
    fn join(&self, heap: u32, range: MemRange, how: Join, grown: bool) -> Result<(), TxnStatus> {
        let i = self.shared.map.heap_of(heap).ok_or(TxnStatus::Invalid)?;
        let (_g, h) = self.shared.lock(i).map_err(|_| TxnStatus::Failed)?;
        // SAFETY: lock held; the pages are mapped in every attached process (but the
        // requester, for a held block, which nothing reads until it releases it) and belong to
        // nobody; zero when the caller says so.
        let added = unsafe {
            match how {
                Join::Held => h.add_range_held(range.addr, range.len),
                _ => h.add_range(range.addr, range.len, how == Join::Zeroed),
            }
        };
        if !added {
            return Err(TxnStatus::LimitExceeded);
        }
        h.grows += u64::from(grown);
        Ok(())
    }
}

impl HeapHooks for Hooks {
    fn publish(&self, heap: u32, range: MemRange, held: bool) -> Result<(), TxnStatus> {
        // New pages are zero-filled by the kernel (see `HeapHooks::publish`).
        self.add(heap, range, if held { Join::Held } else { Join::Zeroed })
    }

    fn restore(&self, heap: u32, range: MemRange) {
        // Pages that were free heap memory: whatever users last wrote there.
        let _ = self.add(heap, range, Join::Dirty);
    }
}

/// A request's size and alignment as the heap takes them (alignment 0 means 1), or why they
/// cannot be served.
#[inline]
fn checked(size: usize, align: usize) -> Result<(u64, u64), AllocError> {
    let (size, align) = (size as u64, align.max(1) as u64);
    if size == 0 || size > MAX_ALLOC || !align.is_power_of_two() {
        return Err(AllocError::BadRequest { size, align });
    }
    Ok((size, align))
}

/// Whether `e` says the memory (or a limit on it) is exhausted.
fn out_of_memory(e: &MemError) -> bool {
    matches!(
        e,
        MemError::NoMemory { .. }
            | MemError::LimitExceeded { .. }
            | MemError::Txn(TxnStatus::NoMemory | TxnStatus::LimitExceeded)
    )
}

/// The most threads' worth a growth takes ahead of the need (one per CPU).
const AHEAD_PAGES: u64 = 4;
/// The most bytes a growth takes ahead of the need (with pages this large, a growth is exact).
const AHEAD_MAX: u64 = 32 << 20;

/// The shared heap of this process.
pub struct Heap<C: Channel> {
    pub(crate) mem: Memory<C>,
    pub(crate) shared: Arc<Shared>,
    shrink: AtomicBool,
    /// Per heap: its shrink count when this process last grew it (`None`: never), which says
    /// whether the next growth is one in a row (see `grow_ahead`). A fixed array: the growth
    /// path must not allocate, the global allocator may be what is growing.
    last_growth: Arc<parking_lot::Mutex<[Option<u64>; MAX_HEAPS]>>,
}

impl<C: Channel> Clone for Heap<C> {
    fn clone(&self) -> Self {
        Heap {
            mem: self.mem.clone(),
            shared: self.shared.clone(),
            shrink: AtomicBool::new(self.shrink.load(Ordering::Relaxed)),
            last_growth: self.last_growth.clone(),
        }
    }
}

/// The NUMA node of each CPU, from sysfs, read once per process (node 0 for a CPU it does not
/// list, and for all of them on a machine without NUMA information).
fn cpu_nodes() -> &'static [u32] {
    static NODES: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    NODES.get_or_init(|| {
        let mut map = Vec::new();
        let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") else {
            return map;
        };
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(node) = name
                .to_str()
                .and_then(|n| n.strip_prefix("node"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let list = std::fs::read_to_string(e.path().join("cpulist")).unwrap_or_default();
            for cpu in parse_cpu_list(list.trim()) {
                let cpu = cpu as usize;
                if map.len() <= cpu {
                    map.resize(cpu + 1, 0);
                }
                map[cpu] = node;
            }
        }
        map
    })
}

/// The CPUs of a sysfs list such as `0-3,8,10-11`; malformed parts are skipped.
fn parse_cpu_list(s: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>())
            && a <= b
            && b < 1 << 16
        {
            v.extend(a..=b);
        }
    }
    v
}

/// The smallest page size of `mem`'s lists (4 KiB if it has none).
fn min_page<C: Channel>(mem: &Memory<C>) -> u64
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    mem.lists()
        .iter()
        .map(|l| l.page_size)
        .min()
        .unwrap_or(4096)
}

fn state_err(e: StateError) -> MemError {
    MemError::Invalid(e.to_string())
}

impl<C: Channel> Heap<C>
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    /// Creates the heaps (primary): one per NUMA node with memory, empty; memory joins them as
    /// they grow.
    pub fn primary(mem: Memory<C>) -> Result<Heap<C>, MemError> {
        let nodes = mem.nodes();
        let map = HeapMap::create(mem.dir(), &nodes).map_err(state_err)?;
        let shared = Arc::new(Shared {
            map,
            recoveries_seen: AtomicU64::new(0),
            min_page: min_page(&mem),
            // The primary maps every page it publishes before it publishes it.
            walkable: Box::new(|_| true),
        });
        let hooks = Hooks {
            shared: shared.clone(),
        };
        // Memory allocated up front (`--socket-mem`) is the heaps' from the start, as DPDK's
        // preallocated memory is: nobody has written it since the kernel cleared it, and it is
        // never given back (see `shrink`).
        for (node, r) in mem.pinned_ranges() {
            hooks.join(node, r, Join::Zeroed, false).map_err(|s| {
                MemError::Invalid(format!(
                    "memory allocated up front at [{:#x}, {:#x}) could not join heap {node}: {s:?}",
                    r.addr,
                    r.addr + r.len
                ))
            })?;
        }
        mem.set_heap_hooks(Arc::new(hooks));
        Ok(Heap {
            mem,
            shared,
            shrink: AtomicBool::new(true),
            last_growth: Default::default(),
        })
    }

    /// Attaches to the primary's heaps (secondary).
    pub fn secondary(mem: Memory<C>) -> Result<Heap<C>, MemError> {
        let map = HeapMap::attach(mem.dir()).map_err(state_err)?;
        let min_page = min_page(&mem);
        // A region joins a heap once every attached process maps it, but for the secondary
        // whose growth made it: there it is one block held for that secondary until its growing
        // thread has mapped it. Another thread of that process that walks the heap meanwhile
        // (validate, dump, the repair after a holder died) maps it first: a sync is idempotent.
        let m = mem.clone();
        let walkable =
            Box::new(move |va| m.is_mapped_here(va) || (m.sync().is_ok() && m.is_mapped_here(va)));
        Ok(Heap {
            mem,
            shared: Arc::new(Shared {
                map,
                recoveries_seen: AtomicU64::new(0),
                min_page,
                walkable,
            }),
            shrink: AtomicBool::new(true),
            last_growth: Default::default(),
        })
    }

    /// The memory under the heap.
    pub fn memory(&self) -> &Memory<C> {
        &self.mem
    }

    /// Returns whole free pages to the kernel as soon as a free leaves them unused (default),
    /// or keeps them in the heap.
    pub fn set_shrink(&self, on: bool) {
        self.shrink.store(on, Ordering::Relaxed);
    }

    /// The NUMA node of the calling thread's CPU (node 0 when unknown).
    pub fn current_node(&self) -> u32 {
        let map = &self.shared.map;
        if map.nheaps() == 1 {
            return map.node_of(0);
        }
        // SAFETY: sched_getcpu has no preconditions; it reads the CPU from the vDSO/rseq area
        // (no system call, unlike getcpu(2) through syscall()).
        let cpu = unsafe { libc::sched_getcpu() };
        match usize::try_from(cpu)
            .ok()
            .and_then(|c| cpu_nodes().get(c).copied())
        {
            Some(node) if map.heap_of(node).is_some() => node,
            _ => map.node_of(0),
        }
    }

    /// The heap serving the caller's node: the one heap without a lookup, else the heap of the
    /// node of the CPU it runs on (heap 0 for a node without one).
    #[inline]
    fn current_heap(&self) -> usize {
        if self.shared.map.nheaps() == 1 {
            return 0;
        }
        self.shared.map.heap_of(self.current_node()).unwrap_or(0)
    }

    /// Allocates `size` bytes aligned to `align` on the caller's node (others if it is full).
    #[inline]
    pub fn malloc(&self, size: usize, align: usize) -> Result<NonNull<u8>, AllocError> {
        // The common case in one piece: a valid request that the caller's heap serves at once.
        // Anything else (a bad request, a full heap that must grow, an error to report) takes
        // the general path, which checks and reports everything again.
        if let Some((p, _)) = self.alloc_fast(size, align) {
            return Ok(p);
        }
        self.alloc_any(size, align, false)
    }

    /// One lock hold on the caller's heap: the block, and whether its data is zero past
    /// [`LINKS`] bytes; `None` when that does not simply succeed.
    #[inline]
    fn alloc_fast(&self, size: usize, align: usize) -> Option<(NonNull<u8>, bool)> {
        let (size, align) = checked(size, align).ok()?;
        self.try_alloc(self.current_heap(), size, align).ok()?
    }

    /// Zero-fills the first `size` bytes of the fresh block `p`: only its old links when the
    /// rest is known to be zero; a large block past the caches with streaming stores (see
    /// [`crate::zero`]). A small block is cleared in whole grains (its usable bytes
    /// reach the next [`GRAIN`] multiple: see `HeapCore::sizes`), by stores of a known length
    /// rather than a call to `memset`.
    #[inline]
    fn clear(p: NonNull<u8>, size: usize, known_zero: bool) {
        const G: usize = GRAIN as usize;
        let n = if known_zero {
            size.min(LINKS as usize)
        } else {
            size
        };
        // With cookies, the cookie sits right after the requested bytes: clear exactly those.
        let whole_grains = !cfg!(feature = "debug-cookies");
        // SAFETY: `p` is a fresh allocation of `size` bytes, ours alone, whose usable bytes
        // run to `size` rounded up to GRAIN (and n <= size).
        unsafe {
            match n {
                _ if !whole_grains => crate::zero::zero(p.as_ptr(), n),
                0..=G => std::ptr::write_bytes(p.as_ptr(), 0, G),
                _ if n <= 2 * G => std::ptr::write_bytes(p.as_ptr(), 0, 2 * G),
                _ => crate::zero::zero(p.as_ptr(), n),
            }
        }
    }

    /// [`Heap::malloc`], zero-filled when `zero`.
    #[cold]
    #[inline(never)]
    fn alloc_any(&self, size: usize, align: usize, zero: bool) -> Result<NonNull<u8>, AllocError> {
        let node = self.current_node();
        match self.alloc_on(node, size, align, zero) {
            Err(AllocError::OutOfMemory { .. }) if self.shared.map.nheaps() > 1 => {
                for i in 0..self.shared.map.nheaps() {
                    let n = self.shared.map.node_of(i);
                    if n != node
                        && let Ok(p) = self.alloc_on(n, size, align, zero)
                    {
                        return Ok(p);
                    }
                }
                self.alloc_on(node, size, align, zero)
            }
            r => r,
        }
    }

    /// Allocates on NUMA node `node` only.
    pub fn malloc_on(
        &self,
        node: u32,
        size: usize,
        align: usize,
    ) -> Result<NonNull<u8>, AllocError> {
        self.alloc_on(node, size, align, false)
    }

    /// [`Heap::malloc_on`], zero-filled when `zero`: a block carved from memory nobody has
    /// written since the kernel cleared it needs only its first [`LINKS`] bytes cleared.
    fn alloc_on(
        &self,
        node: u32,
        size: usize,
        align: usize,
        zero: bool,
    ) -> Result<NonNull<u8>, AllocError> {
        let (p, known_zero) = self.alloc_on_raw(node, size, align)?;
        if zero {
            Self::clear(p, size, known_zero);
        }
        Ok(p)
    }

    /// The allocation itself: the block, and whether its data is zero past [`LINKS`] bytes.
    fn alloc_on_raw(
        &self,
        node: u32,
        size: usize,
        align: usize,
    ) -> Result<(NonNull<u8>, bool), AllocError> {
        let (size, align) = checked(size, align)?;
        let i = self.shared.index(node)?;
        if let Some(p) = self.try_alloc(i, size, align)? {
            return Ok(p);
        }
        let mut why = String::new();
        for _ in 0..3 {
            // One grower at a time across processes; it tries the heap again first.
            let mut g = self.shared.map.file().heaps[i].grow_lock.lock()?;
            g.mark_consistent();
            if let Some(p) = self.try_alloc(i, size, align)? {
                return Ok(p);
            }
            // Enough for the block, its alignment and a split; more while the heap keeps
            // growing (see `grow_ahead`).
            let need = size + align.max(64) + HEADER + MIN_BLOCK;
            let ahead = self.grow_ahead(i)?;
            // A secondary maps the new pages itself: they come back held for it in the heap,
            // and join it as free memory once mapped here.
            let spec = |bytes| AllocSpec {
                bytes,
                node: Some(node),
                heap: node,
                requester_maps: true,
                ..AllocSpec::default()
            };
            let grown = match self.mem.alloc(&spec(need.max(ahead))) {
                // What is taken ahead is not worth an out-of-memory error: the need alone may fit.
                Err(e) if ahead > need && out_of_memory(&e) => self.mem.alloc(&spec(need)),
                r => r,
            };
            let grown = match grown.and_then(|r| self.take_held(i, r).map(|()| r)) {
                Ok(r) => r,
                Err(e) => {
                    if let MemError::MapFailed { start, len } = e {
                        self.drop_unmapped(i, start, len);
                    }
                    drop(g);
                    why = e.to_string();
                    break;
                }
            };
            drop(g);
            let p = self.try_alloc(i, size, align)?;
            // Space freed elsewhere meanwhile may have served us: then nobody will ever use (or
            // free into) the new region, so it goes back now rather than never.
            self.release_if_unused(i, grown)?;
            if let Some(p) = p {
                return Ok(p);
            }
            why = format!(
                "grew the heap by {} bytes three times, and other allocations took it each time",
                grown.len
            );
        }
        Err(AllocError::OutOfMemory { size, why })
    }

    /// How much heap `i` grows at least, the caller holding its grow lock: on a first growth
    /// or after a shrink, nothing beyond the need; on a growth in a row, for each thread that
    /// may populate it (the CPUs the calling thread may run on, and the memory's
    /// `populate_threads`, up to `AHEAD_PAGES`; nothing if that is one), what one thread
    /// populates (a part of `Spread::pages`: a page of the smallest size, or whole pages of at
    /// least `MIN_PART` bytes, so ordinary 4 KiB pages by 2 MiB), at most `AHEAD_MAX` in all.
    ///
    /// Most of a growth is the kernel clearing the new pages, and the memory layer shares out
    /// the population of several pages between that many threads (see
    /// `memplane_hugepage::va::Spread`): a heap that keeps growing grows by pages it can clear at
    /// once, as glibc's `M_TOP_PAD` takes more than the need. What it takes ahead is free heap
    /// memory: a free that leaves whole pages unused gives it back as before, and that shrink
    /// makes the next growth exact again, so a heap that grows and shrinks by turns takes no
    /// more than it asks for.
    fn grow_ahead(&self, i: usize) -> Result<u64, AllocError> {
        let shrinks = self.shared.lock(i)?.1.shrinks;
        let Some(last) = self
            .last_growth
            .lock()
            .get_mut(i)
            .map(|l| l.replace(shrinks))
        else {
            return Ok(0);
        };
        if last != Some(shrinks) {
            return Ok(0);
        }
        let cpus = memplane_hugepage::va::cpus_here();
        let threads = cpus
            .min(self.mem.populate_threads())
            .min(AHEAD_PAGES as usize) as u64;
        if threads < 2 {
            // Nobody to clear the extra pages beside the growing thread: no gain in them.
            return Ok(0);
        }
        // What one thread populates: the memory layer's own part size.
        let unit = Spread::pages(self.shared.min_page, 1).chunk;
        Ok((threads * unit).min(AHEAD_MAX))
    }

    /// After growth from a secondary: the new region `r` of heap `i` holds one block held for
    /// this process, which has just mapped it; it becomes free memory. In the primary (which
    /// never asks for held pages) there is nothing to do. When this process could not map the
    /// pages, the region leaves the heap unread and the pages go back to the primary.
    fn take_held(&self, i: usize, r: MemRange) -> Result<(), MemError> {
        if self.mem.is_primary() {
            return Ok(());
        }
        let (_g, h) = self
            .shared
            .lock(i)
            .map_err(|e| MemError::Invalid(e.to_string()))?;
        // SAFETY: lock held; the region was made for this process's request, which mapped it
        // (Memory::alloc returned it).
        unsafe { h.core.release_held(r.addr + HEADER) }
            .map_err(|e| MemError::Invalid(format!("new heap region {r:?}: {e}")))
    }

    /// The growth of heap `i` gave this process pages `[start, start + len)` it could not map:
    /// they are held for it in the heap; take the region out without reading it and give the
    /// pages back.
    fn drop_unmapped(&self, i: usize, start: u64, len: u64) {
        let dropped = match self.shared.lock(i) {
            Ok((_g, h)) => h.drop_held(start, len),
            Err(_) => false,
        };
        if !dropped
            || self
                .mem
                .free(MemRange { addr: start, len }, self.shared.map.node_of(i))
                .is_err()
        {
            eprintln!(
                "memplane heap {i}: [{start:#x}, {:#x}), not mapped here after growth, could not be \
                 given back",
                start + len
            );
        }
    }

    /// Gives region `r` back if it is still entirely free.
    fn release_if_unused(&self, i: usize, r: MemRange) -> Result<(), AllocError> {
        if !self.shrink.load(Ordering::Relaxed) || self.mem.channel().on_channel_thread() {
            return Ok(());
        }
        let back = {
            let (_g, h) = self.shared.lock(i)?;
            let whole = h.region_of(r.addr)
                == Some(Region {
                    start: r.addr,
                    end: r.addr + r.len,
                });
            let unused = if whole {
                // SAFETY: lock held; `r` is one of the heap's regions (checked).
                unsafe { h.core.unused_region(r.addr, r.len) }
            } else {
                None
            };
            unused.and_then(|f| self.carve_pages(h, f))
        };
        if let Some(b) = back {
            self.give_back(i, self.shared.map.node_of(i), b)?;
        }
        Ok(())
    }

    #[inline]
    fn try_alloc(
        &self,
        i: usize,
        size: u64,
        align: u64,
    ) -> Result<Option<(NonNull<u8>, bool)>, AllocError> {
        let (_g, h) = self.shared.lock(i)?;
        // SAFETY: we hold the heap's lock; its regions are mapped here (a region joins a heap
        // only once every attached process maps it).
        let p = unsafe { h.core.alloc_z(size, align)? };
        Ok(p.and_then(|(p, z)| Some((NonNull::new(p as *mut u8)?, z))))
    }

    /// Allocates up to `out.len()` blocks of `size` bytes aligned to `align` on `node` under one
    /// hold of the lock (growing once if the heap is empty); returns how many were stored.
    pub fn malloc_batch(
        &self,
        node: u32,
        size: usize,
        align: usize,
        out: &mut [*mut u8],
    ) -> Result<usize, AllocError> {
        if out.is_empty() {
            return Ok(0);
        }
        let i = self.shared.index(node)?;
        // The common case: the heap has room, one lock hold serves the whole batch.
        let n = self.fill_batch(i, size, align, out, 0)?;
        if n > 0 {
            return Ok(n);
        }
        // Nothing fits: the single-block path grows the heap (or says why it cannot), then the
        // rest of the batch comes from what the growth brought.
        out[0] = self.malloc_on(node, size, align)?.as_ptr();
        self.fill_batch(i, size, align, out, 1)
    }

    /// Fills `out[n..]` from heap `i` under one hold of its lock, until it is full or the heap
    /// has no fitting block; returns how many of `out` are filled.
    fn fill_batch(
        &self,
        i: usize,
        size: usize,
        align: usize,
        out: &mut [*mut u8],
        mut n: usize,
    ) -> Result<usize, AllocError> {
        let (size, align) = checked(size, align)?;
        let (_g, h) = self.shared.lock(i)?;
        while n < out.len() {
            // SAFETY: lock held; the heap's regions are mapped here.
            match unsafe { h.core.alloc(size, align)? } {
                Some(p) => out[n] = p as *mut u8,
                None => break,
            }
            n += 1;
        }
        Ok(n)
    }

    /// Frees every pointer of `ptrs`, holding each heap's lock once per run of its pointers;
    /// whole pages left unused go back to the kernel. Stops at the first bad pointer.
    pub fn free_batch(&self, ptrs: &[*mut u8]) -> Result<(), AllocError> {
        let shrink = self.shrink.load(Ordering::Relaxed);
        let mut rest = ptrs;
        while let Some(&first) = rest.first() {
            // One lock hold per run of pointers of the same heap.
            let i = self.heap_index_of(first as u64)?;
            let mut give_back = Vec::new();
            let mut done = 0;
            {
                let (_g, h) = self.shared.lock(i)?;
                for &p in rest {
                    let p = p as u64;
                    // The heap's own region table answers both "which heap" and "valid": a
                    // pointer outside it ends this run (the next looks up its heap), or is
                    // invalid if it starts the run.
                    if let Err(e) = h.check_ptr(p) {
                        if done == 0 {
                            return Err(e.into());
                        }
                        break;
                    }
                    if let Some(r) = self.free_locked(h, p, shrink)? {
                        give_back.push(r);
                    }
                    done += 1;
                }
            }
            let node = self.shared.map.node_of(i);
            for r in give_back {
                self.give_back(i, node, r)?;
            }
            rest = &rest[done..];
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn give_back(&self, i: usize, node: u32, range: MemRange) -> Result<(), AllocError> {
        if let Err(e) = self.mem.free(range, node) {
            // The primary restores refused frees itself; a request that never reached it leaves
            // the pages out of the heap but still mapped: put them back.
            if matches!(
                e,
                MemError::Channel(_) | MemError::NoAnswer | MemError::Invalid(_)
            ) {
                let (_g, h) = self.shared.lock(i)?;
                // SAFETY: lock held; the pages are still mapped (the free did not happen) and
                // belong to nobody since we took them out; not known to be zero.
                unsafe { h.add_range(range.addr, range.len, false) };
            }
        }
        Ok(())
    }

    /// [`Heap::malloc`], zero-filled. Memory fresh from the kernel is not cleared again (the
    /// heap knows which free blocks nobody has written since: see [`crate::tlsf`]).
    pub fn zmalloc(&self, size: usize, align: usize) -> Result<NonNull<u8>, AllocError> {
        if let Some((p, z)) = self.alloc_fast(size, align) {
            Self::clear(p, size, z);
            return Ok(p);
        }
        self.alloc_any(size, align, true)
    }

    /// `n` elements of `size` bytes, zero-filled; the product's overflow is an error (DPDK's
    /// `rte_calloc` does not check it).
    pub fn calloc(&self, n: usize, size: usize, align: usize) -> Result<NonNull<u8>, AllocError> {
        let total = n.checked_mul(size).ok_or(AllocError::BadRequest {
            size: u64::MAX,
            align: align as u64,
        })?;
        self.zmalloc(total, align)
    }

    #[inline]
    fn heap_index_of(&self, ptr: u64) -> Result<usize, AllocError> {
        // One heap: no lookup (the caller still checks the pointer against its regions).
        if self.shared.map.nheaps() == 1 {
            return Ok(0);
        }
        self.heap_index_by_node(ptr)
    }

    /// [`Heap::heap_index_of`] with several heaps: the node of the page `ptr` lies in.
    #[cold]
    #[inline(never)]
    fn heap_index_by_node(&self, ptr: u64) -> Result<usize, AllocError> {
        let node = self
            .mem
            .node_at(ptr)
            .ok_or(AllocError::Heap(HeapError::InvalidPointer { ptr }))?;
        self.shared.index(node)
    }

    /// The size asked for at `ptr` and the bytes usable there.
    pub fn sizes(&self, ptr: NonNull<u8>) -> Result<(usize, usize), AllocError> {
        let p = ptr.as_ptr() as u64;
        let i = self.heap_index_of(p)?;
        let (_g, h) = self.shared.lock(i)?;
        h.check_ptr(p)?;
        // SAFETY: lock held; the block lies in one of the heap's regions (checked).
        let (r, u) = unsafe { h.core.sizes(p)? };
        Ok((r as usize, u as usize))
    }

    /// Resizes `ptr` to `size` bytes, in place when it can (shrinking, or into a free block
    /// after it), else by moving (the old contents are copied, the old block freed). `None`
    /// allocates. On failure the old block is untouched.
    pub fn realloc(
        &self,
        ptr: Option<NonNull<u8>>,
        size: usize,
        align: usize,
    ) -> Result<NonNull<u8>, AllocError> {
        let Some(ptr) = ptr else {
            return self.malloc(size, align);
        };
        let p = ptr.as_ptr() as u64;
        let align = checked(size, align)?.1 as usize;
        let i = self.heap_index_of(p)?;
        let old = {
            let (_g, h) = self.shared.lock(i)?;
            h.check_ptr(p)?;
            // SAFETY: lock held; the block is in one of the heap's regions.
            let (old, _) = unsafe { h.core.sizes(p)? };
            // SAFETY: as above.
            if p.is_multiple_of(align as u64) && unsafe { h.core.resize_in_place(p, size as u64)? }
            {
                return Ok(ptr);
            }
            old
        };
        let node = self.mem.node_at(p).unwrap_or(0);
        let n = self
            .malloc_on(node, size, align)
            .or_else(|_| self.malloc(size, align))?;
        // SAFETY: both blocks are live allocations of at least min(old, size) bytes and do not
        // overlap (the new one was just allocated).
        unsafe {
            std::ptr::copy_nonoverlapping(ptr.as_ptr(), n.as_ptr(), (old as usize).min(size));
        }
        self.free(ptr)?;
        Ok(n)
    }

    /// Frees `ptr` (allocated by any process). Whole pages left unused go back to the kernel.
    #[inline]
    pub fn free(&self, ptr: NonNull<u8>) -> Result<(), AllocError> {
        let p = ptr.as_ptr() as u64;
        let i = self.heap_index_of(p)?;
        let back = {
            let (_g, h) = self.shared.lock(i)?;
            // The heap's own region table says whether the pointer is one of its blocks.
            h.check_ptr(p)?;
            self.free_locked(h, p, self.shrink.load(Ordering::Relaxed))?
        };
        match back {
            Some(r) => self.give_back(i, self.shared.map.node_of(i), r),
            None => Ok(()),
        }
    }

    /// Frees the block at `p` (checked to lie in a region of `h`, whose lock is held); with
    /// `shrink`, returns the whole pages it left free, taken out of the heap, to give back.
    /// Pages go back through a transaction, which a channel thread must not wait for: then
    /// they stay in the heap (see `carve_pages`).
    #[inline]
    fn free_locked(
        &self,
        h: &mut HeapData,
        p: u64,
        shrink: bool,
    ) -> Result<Option<MemRange>, AllocError> {
        // SAFETY: lock held; the block is in one of the heap's regions (caller's check).
        let f = unsafe { h.core.free(p)? };
        Ok(if shrink { self.carve_pages(h, f) } else { None })
    }

    /// If the free block `f` holds whole pages (not allocated up front), takes them out of the
    /// heap and returns them, to give back after the lock is released.
    #[inline]
    fn carve_pages(&self, h: &mut HeapData, f: crate::tlsf::FreedBlock) -> Option<MemRange> {
        // No page fits in a smaller block: skip the page-size lookup.
        if f.size < self.shared.min_page {
            return None;
        }
        self.carve_whole_pages(h, f)
    }

    /// [`Heap::carve_pages`] for a block of at least one page.
    #[cold]
    #[inline(never)]
    fn carve_whole_pages(&self, h: &mut HeapData, f: crate::tlsf::FreedBlock) -> Option<MemRange> {
        if self.mem.channel().on_channel_thread() {
            return None;
        }
        let ps = self.mem.page_size_at(f.addr)?;
        let end = f.addr + f.size;
        let mut s = f.addr.next_multiple_of(ps);
        let mut e = end / ps * ps;
        if s > f.addr && s - f.addr < MIN_BLOCK {
            s += ps;
        }
        if e < end && end - e < MIN_BLOCK {
            e = e.saturating_sub(ps);
        }
        if e <= s {
            return None;
        }
        let range = MemRange {
            addr: s,
            len: e - s,
        };
        if self.mem.is_pinned(&range) {
            return None;
        }
        // A split needs a slot in the region table.
        if !h.cut_region(s, e) {
            return None;
        }
        // SAFETY: `f` came from `free` under this lock hold; [s, e) is page-aligned inside it
        // with leftovers of 0 or >= MIN_BLOCK on both sides (checked above).
        if unsafe { h.core.carve(f, s, e) }.is_err() {
            // Undo the table change: the block is intact.
            h.insert_region(Region { start: s, end: e });
            return None;
        }
        h.core.counters.regions = h.nregions;
        h.shrinks += 1;
        Some(range)
    }

    /// Statistics of the heap on `node`.
    pub fn stats(&self, node: u32) -> Result<HeapStats, AllocError> {
        let i = self.shared.index(node)?;
        let (_g, h) = self.shared.lock(i)?;
        let c = h.core.counters;
        Ok(HeapStats {
            node,
            heap_size: c.total,
            free: c.free,
            allocated: c.total - c.free,
            largest_free: h.core.largest_free(),
            alloc_count: c.alloc_count,
            free_count: c.free_count,
            requested: c.requested,
            regions: h.nregions,
            grows: h.grows,
            shrinks: h.shrinks,
            recoveries: h.recoveries,
        })
    }

    /// Statistics of every heap.
    pub fn all_stats(&self) -> Vec<HeapStats> {
        (0..self.shared.map.nheaps())
            .filter_map(|i| self.stats(self.shared.map.node_of(i)).ok())
            .collect()
    }

    /// Whether region `r` may be walked here (see `Shared::walkable`).
    fn mapped_here(&self, r: &Region) -> bool {
        (self.shared.walkable)(r.start)
    }

    /// Walks every heap and checks every block and list; returns what is wrong.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        for i in 0..self.shared.map.nheaps() {
            let (_g, h) = match self.shared.lock(i) {
                Ok(x) => x,
                Err(e) => {
                    problems.push(format!("heap {i}: {e}"));
                    continue;
                }
            };
            let (mut free, mut nfree, mut nalloc, mut req, mut total) = (0, 0, 0, 0, 0);
            let mut ps = Vec::new();
            for r in h.regions() {
                total += r.end - r.start;
                if !self.mapped_here(r) {
                    ps.push(format!(
                        "region [{:#x}, {:#x}) is not mapped in this process",
                        r.start, r.end
                    ));
                    continue;
                }
                // SAFETY: lock held; the region is the heap's and mapped here (checked).
                let walked = unsafe { h.core.walk_region(r.start, r.end, &mut ps, |_, _, _| {}) };
                let (f, nf, na, rq) = walked;
                free += f;
                nfree += nf;
                nalloc += na;
                req += rq;
            }
            // SAFETY: lock held.
            let listed = unsafe { h.core.check_lists(&mut ps) };
            let c = h.core.counters;
            if listed != nfree {
                ps.push(format!(
                    "{listed} blocks in free lists, {nfree} free blocks in the heap"
                ));
            }
            if (c.total, c.free, c.free_count, c.alloc_count, c.requested)
                != (total, free, nfree, nalloc, req)
            {
                ps.push(format!(
                    "counters {c:?} disagree with the blocks (total {total}, free {free}, free \
                     blocks {nfree}, allocated {nalloc}, requested {req})"
                ));
            }
            for p in ps {
                problems.push(format!("heap {i}: {p}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// A human-readable dump of every heap: stats and each region's blocks.
    pub fn dump(&self, blocks: bool) -> String {
        let mut out = String::new();
        for i in 0..self.shared.map.nheaps() {
            let Ok((_g, h)) = self.shared.lock(i) else {
                continue;
            };
            let c = h.core.counters;
            let _ = writeln!(
                out,
                "heap {i} (node {}): size {} free {} allocated {} blocks {} free blocks {} \
                 largest free {} regions {} grows {} shrinks {} recoveries {}",
                h.node,
                c.total,
                c.free,
                c.total - c.free,
                c.alloc_count,
                c.free_count,
                h.core.largest_free(),
                h.nregions,
                h.grows,
                h.shrinks,
                h.recoveries
            );
            for r in h.regions() {
                let _ = writeln!(out, "  region [{:#x}, {:#x})", r.start, r.end);
                if blocks && self.mapped_here(r) {
                    let mut ps = Vec::new();
                    // SAFETY: lock held; the region is the heap's and mapped here (checked).
                    unsafe {
                        h.core.walk_region(r.start, r.end, &mut ps, |a, s, free| {
                            let _ = writeln!(
                                out,
                                "    {a:#x} {s:>10} {}",
                                if free { "free" } else { "busy" }
                            );
                        });
                    }
                }
            }
        }
        out
    }

    /// Runs `f` while holding the lock of the heap on `node` (for a consistent view from tools,
    /// and for tests that kill a process holding the lock). `f` must not allocate from this heap.
    pub fn with_lock<R>(&self, node: u32, f: impl FnOnce() -> R) -> Result<R, AllocError> {
        let i = self.shared.index(node)?;
        let (_g, _h) = self.shared.lock(i)?;
        Ok(f())
    }

    /// Times this process found a heap's lock abandoned by a dead process and repaired it.
    pub fn recoveries_seen(&self) -> u64 {
        self.shared.recoveries_seen.load(Ordering::Relaxed)
    }

    /// Removes the heap's file (the primary, when it shuts down).
    pub fn remove_file(&self) {
        self.shared.map.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_as_sysfs_writes_them() {
        assert_eq!(parse_cpu_list("0-3,8,10-11"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list(""), Vec::<u32>::new());
        assert_eq!(parse_cpu_list("5"), vec![5]);
        assert_eq!(parse_cpu_list("3-1,x,2"), vec![2]);
    }

    #[test]
    fn this_machine_maps_every_online_cpu() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let nodes = cpu_nodes();
        // No NUMA information at all is allowed (node 0 for every CPU); otherwise every CPU we
        // may run on is listed.
        if !nodes.is_empty() {
            // SAFETY: sched_getcpu has no preconditions.
            let cpu = unsafe { libc::sched_getcpu() };
            assert!(
                (cpu as usize) < nodes.len(),
                "cpu {cpu} of {n} not in {nodes:?}"
            );
        }
    }
}
