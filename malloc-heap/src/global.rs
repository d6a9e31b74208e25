//! A global allocator on the shared heap, for dataplane processes.
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: memplane_heap::global::MemplaneAlloc = memplane_heap::global::MemplaneAlloc;
//! // ... after memplane's init:
//! memplane_heap::global::install(&heap);
//! ```
//!
//! Before [`install`] every allocation goes to the system allocator. After it, small
//! allocations (up to [`SMALL_MAX`] bytes, alignment up to 16) come from a per-thread cache of
//! heap blocks: a pop or a push on a per-thread singly linked list (the link lives in the free
//! block itself) on the hot path; a cache refills or drains in batches under one hold of the heap
//! lock. Larger allocations go to the heap directly. Every free goes back to whoever allocated
//! the pointer: a pointer inside the shared address range is the heap's, anything else the
//! system allocator's, so memory allocated before `install` (or by the fallback below) is freed
//! correctly. A thread's cached blocks go back to the heap when the thread ends.
//!
//! The heap must never wait on itself: allocations that need the heap while the heap is already
//! at work on this thread (growing through IPC, which allocates) and allocations the heap cannot
//! serve (full, or growing from a channel thread would deadlock) fall back to the system
//! allocator; heap frees that would need the heap meanwhile are deferred until it is done. Pops
//! and pushes on the thread's own cache never touch the heap, so they are served at any time.
//!
//! The hot path is kept small on purpose: everything it does not need (refills, drains, frees to
//! the heap, the system fallback, thread-exit bookkeeping) lives in `#[cold]` functions that are
//! never inlined into it, and the per-thread state is a `const`-initialised thread-local without
//! a destructor (no registration check on access); the flush at thread exit is a separate
//! thread-local guard, registered on the thread's first slow path.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::fd::OwnedFd;
use std::ptr::{NonNull, null_mut};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use memplane_core::channel::Channel;

use crate::heap::Heap;

/// Largest size served from the per-thread caches.
pub const SMALL_MAX: usize = 256;
const CLASS: usize = 16;
const CLASSES: usize = SMALL_MAX / CLASS;
/// Blocks fetched from the heap per refill.
const BATCH: usize = 32;
/// Blocks a class may hold before half of them go back. Also the count a class shows while its
/// thread's cache is not in use (not yet registered, or flushed at thread exit), so that every
/// push takes the slow path then.
const CACHE_MAX: usize = 128;
/// Blocks handed to the heap per `free_batch` call when draining or flushing.
const CHUNK: usize = 64;

/// What the global allocator needs from the heap, without its type parameters.
trait Ops: Send + Sync {
    fn alloc(&self, size: usize, align: usize) -> *mut u8;
    fn alloc_batch(&self, size: usize, out: &mut [*mut u8]) -> usize;
    fn free(&self, p: *mut u8);
    fn free_batch(&self, ps: &[*mut u8]);
}

struct HeapOps<C: Channel>(Heap<C>);

impl<C: Channel> Ops for HeapOps<C>
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    fn alloc(&self, size: usize, align: usize) -> *mut u8 {
        self.0
            .malloc(size, align)
            .map_or(null_mut(), |p| p.as_ptr())
    }
    fn alloc_batch(&self, size: usize, out: &mut [*mut u8]) -> usize {
        let node = self.0.current_node();
        self.0.malloc_batch(node, size, CLASS, out).unwrap_or(0)
    }
    fn free(&self, p: *mut u8) {
        if let Some(p) = NonNull::new(p)
            && let Err(e) = self.0.free(p)
        {
            report(&e);
        }
    }
    fn free_batch(&self, ps: &[*mut u8]) {
        if let Err(e) = self.0.free_batch(ps) {
            report(&e);
        }
    }
}

fn report(e: &dyn std::fmt::Display) {
    ERRORS.fetch_add(1, Ordering::Relaxed);
    // Reporting must not allocate from the heap: eprintln formats into a stack buffer and
    // writes to the unbuffered stderr; it runs with the re-entry guard set.
    eprintln!("memplane global allocator: {e}");
}

/// What the hot paths read, in one cache line of its own (written only by `install` and
/// `uninstall`, so it stays shared in every CPU's cache).
#[repr(C, align(64))]
struct Shared {
    /// Start of the shared address range: a pointer `p` is the heap's iff
    /// `p - base < len` (wrapping).
    base: AtomicUsize,
    /// Length of the shared address range (0 before `install`: no pointer is the heap's).
    len: AtomicUsize,
    /// `CLASSES` while installed, 0 otherwise: the caches serve class `k` iff `k < classes`.
    classes: AtomicUsize,
}

static SHARED: Shared = Shared {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    classes: AtomicUsize::new(0),
};
/// The heap, for the slow paths. Set by `install` and never cleared: heap pointers are freed
/// through it also after `uninstall`.
static OPS: AtomicPtr<Box<dyn Ops>> = AtomicPtr::new(null_mut());
static ERRORS: AtomicU64 = AtomicU64::new(0);
static FALLBACKS: AtomicUsize = AtomicUsize::new(0);

/// Routes every allocation of the process to the shared heap once installed.
pub struct MemplaneAlloc;

/// One size class of a thread's cache: a singly linked list of free blocks, each holding the
/// next one's address in its first 8 bytes.
struct Bin {
    head: Cell<*mut u8>,
    /// Blocks in the list while the cache is in use; `CACHE_MAX` (with an empty list) while it is
    /// not.
    count: Cell<usize>,
}

/// The cache is not in use yet on this thread (no exit guard registered).
const FRESH: u8 = 0;
/// The cache is in use: the exit guard is registered.
const LIVE: u8 = 1;
/// The thread's exit guard has flushed the cache: no caching any more on this thread.
const EXITED: u8 = 2;

/// A thread's state. No destructor, so that accessing it costs no state check: the flush at
/// thread exit is done by [`ExitGuard`].
struct Local {
    bins: [Bin; CLASSES],
    /// The heap is at work on this thread: anything that needs the heap meanwhile goes to the
    /// system allocator (allocations) or waits in `deferred` (frees).
    busy: Cell<bool>,
    /// Heap blocks freed while the heap was at work on this thread (linked through their first
    /// 8 bytes), freed once it is done: freeing then could re-enter a lock this thread holds.
    deferred: Cell<*mut u8>,
    /// `FRESH`, `LIVE` or `EXITED`.
    state: Cell<u8>,
}

thread_local! {
    static LOCAL: Local = const {
        Local {
            bins: [const {
                Bin {
                    head: Cell::new(null_mut()),
                    count: Cell::new(CACHE_MAX),
                }
            }; CLASSES],
            busy: Cell::new(false),
            deferred: Cell::new(null_mut()),
            state: Cell::new(FRESH),
        }
    };
    static EXIT: ExitGuard = const { ExitGuard };
}

/// Returns the thread's cached blocks to the heap when the thread ends (registered by the
/// thread's first use of its cache).
struct ExitGuard;

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let _ = LOCAL.try_with(flush);
    }
}

/// The cache size class of a layout: `k` with `16 k < size <= 16 (k + 1)` for sizes up to
/// `SMALL_MAX` and alignments up to 16, and `CLASSES` or more for everything else (size 0
/// included).
#[inline(always)]
fn class_index(size: usize, align: usize) -> usize {
    (size.wrapping_sub(1) / CLASS) | (usize::from(align > CLASS) * CLASSES)
}

impl Bin {
    /// Takes a block off the list, or returns null if it is empty.
    #[inline(always)]
    fn pop(&self) -> *mut u8 {
        let p = self.head.get();
        if !p.is_null() {
            // SAFETY: a cached block: a free heap block of at least 16 bytes, 8-aligned, owned
            // by this list, whose first 8 bytes hold the next link.
            self.head.set(unsafe { (p as *mut *mut u8).read() });
            self.count.set(self.count.get() - 1);
        }
        p
    }

    /// Puts `p` on the list (a free heap block of this class, owned by the caller).
    #[inline(always)]
    fn push(&self, p: *mut u8) {
        // SAFETY: `p` is a heap block of this class (at least 16 bytes, 32-aligned) that nobody
        // else uses any more: room for the link.
        unsafe { (p as *mut *mut u8).write(self.head.get()) };
        self.head.set(p);
        self.count.set(self.count.get() + 1);
    }

    /// Empties the list, marking it not in use, and returns its first block.
    fn take(&self) -> *mut u8 {
        self.count.set(CACHE_MAX);
        self.head.replace(null_mut())
    }
}

impl Local {
    /// The bin of class `k`.
    ///
    /// # Safety
    /// `k < CLASSES`.
    #[inline(always)]
    unsafe fn bin(&self, k: usize) -> &Bin {
        debug_assert!(k < CLASSES);
        // SAFETY: `k < CLASSES` (caller's guarantee).
        unsafe { self.bins.get_unchecked(k) }
    }
}

/// The installed heap, if any.
fn ops() -> Option<&'static dyn Ops> {
    let p = OPS.load(Ordering::Acquire);
    // SAFETY: a non-null OPS points to a Box leaked by `install`, never freed.
    (!p.is_null()).then(|| unsafe { &**p })
}

/// Whether `p` lies in the shared address range: one compare.
#[inline(always)]
fn in_heap(p: *const u8) -> bool {
    // `len` first (Acquire, paired with `install`'s Release): whoever sees a range sees its
    // base. Plain loads on x86-64.
    let len = SHARED.len.load(Ordering::Acquire);
    (p as usize).wrapping_sub(SHARED.base.load(Ordering::Relaxed)) < len
}

/// Runs `f` with the heap marked busy on this thread, then frees what was deferred meanwhile.
fn busy<R>(ops: &dyn Ops, local: &Local, f: impl FnOnce() -> R) -> R {
    local.busy.set(true);
    let r = f();
    loop {
        let p = local.deferred.replace(null_mut());
        if p.is_null() {
            break;
        }
        let mut q = p;
        while !q.is_null() {
            // SAFETY: deferred blocks hold the next link in their first 8 bytes.
            let next = unsafe { (q as *mut *mut u8).read() };
            ops.free(q);
            q = next;
        }
    }
    local.busy.set(false);
    r
}

/// Frees the list starting at `p` (linked through the blocks' first 8 bytes) to the heap, in
/// batches.
fn free_list(ops: &dyn Ops, mut p: *mut u8) {
    let mut buf = [null_mut(); CHUNK];
    while !p.is_null() {
        let mut n = 0;
        while n < CHUNK && !p.is_null() {
            buf[n] = p;
            // SAFETY: a block of the list: its first 8 bytes are the link.
            p = unsafe { (p as *mut *mut u8).read() };
            n += 1;
        }
        ops.free_batch(&buf[..n]);
    }
}

/// The thread ends: its cached blocks go back to the heap, and it caches nothing any more.
fn flush(local: &Local) {
    let was = local.state.replace(EXITED);
    let lists = local.bins.each_ref().map(Bin::take);
    if was != LIVE {
        return;
    }
    let Some(ops) = ops() else { return };
    busy(ops, local, || {
        for p in lists {
            free_list(ops, p);
        }
    });
}

/// Puts the thread's cache in use: registers its exit guard. Call with the state `FRESH`.
fn register(local: &Local) {
    // Marked in use first: the registration may allocate, and that must not come back here.
    local.state.set(LIVE);
    if EXIT.try_with(|_| ()).is_err() {
        // The thread is already ending: no cache.
        local.state.set(EXITED);
        return;
    }
    for b in &local.bins {
        b.count.set(0);
    }
}

/// Everything but a pop from the thread's cache.
#[cold]
#[inline(never)]
fn alloc_slow(l: Layout) -> *mut u8 {
    let k = class_index(l.size(), l.align());
    let enabled = SHARED.classes.load(Ordering::Relaxed) != 0;
    // None: the system allocator serves (no heap, or the heap at work on this thread, or the
    // thread ending); Some(null): the heap could not serve (a fallback); Some(p): the heap's.
    let p = match ops() {
        Some(ops) if enabled => LOCAL
            .try_with(|local| {
                if local.busy.get() {
                    return None;
                }
                if k >= CLASSES {
                    return Some(busy(ops, local, || ops.alloc(l.size(), l.align())));
                }
                if local.state.get() == FRESH {
                    busy(ops, local, || register(local));
                }
                if local.state.get() != LIVE {
                    return None;
                }
                Some(refill(ops, local, k))
            })
            .unwrap_or(None),
        _ => None,
    };
    match p {
        Some(p) if !p.is_null() => p,
        Some(_) => {
            FALLBACKS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: a valid layout, forwarded to the system allocator.
            unsafe { System.alloc(l) }
        }
        // SAFETY: a valid layout, forwarded to the system allocator.
        None => unsafe { System.alloc(l) },
    }
}

/// Fetches a batch of class `k` from the heap: returns one block, caches the others (null if
/// the heap has none).
fn refill(ops: &dyn Ops, local: &Local, k: usize) -> *mut u8 {
    let mut buf = [null_mut(); BATCH];
    let n = busy(ops, local, || ops.alloc_batch((k + 1) * CLASS, &mut buf));
    if n == 0 {
        return null_mut();
    }
    // SAFETY: k < CLASSES (the caller's class).
    let bin = unsafe { local.bin(k) };
    if n < 4 {
        for &b in &buf[1..n] {
            bin.push(b);
        }
        return buf[0];
    }
    // The heap carves a batch from one free block, in ascending addresses: its first and last
    // blocks may share a cache line with memory another thread uses (the neighbouring batches).
    // They are handed out last, so that a thread whose working set fits in the rest of the
    // batch never writes a line another thread writes (false sharing doubled the time of a
    // pair on two threads).
    bin.push(buf[n - 1]);
    bin.push(buf[0]);
    for &b in buf[2..n - 1].iter().rev() {
        bin.push(b);
    }
    buf[1]
}

/// Frees a heap pointer `p` without the thread cache's fast push: the cache is full or not in
/// use, the block is not of a cached class, or the heap is uninstalled.
#[cold]
#[inline(never)]
fn dealloc_slow(p: *mut u8, l: Layout) {
    let Some(ops) = ops() else {
        return;
    };
    let k = class_index(l.size(), l.align());
    let enabled = k < SHARED.classes.load(Ordering::Relaxed);
    let done = LOCAL.try_with(|local| {
        if local.busy.get() {
            // SAFETY: a heap block of at least 16 bytes (every heap block is) that the caller
            // gave up: room for the link of the deferred list.
            unsafe { (p as *mut *mut u8).write(local.deferred.get()) };
            local.deferred.set(p);
            return;
        }
        if enabled && local.state.get() == FRESH {
            busy(ops, local, || register(local));
        }
        if enabled && local.state.get() == LIVE {
            // SAFETY: `enabled` implies k < CLASSES.
            let bin = unsafe { local.bin(k) };
            bin.push(p);
            if bin.count.get() > CACHE_MAX {
                drain(ops, local, bin);
            }
            return;
        }
        busy(ops, local, || ops.free(p));
    });
    if done.is_err() {
        // No thread state any more: free straight to the heap.
        ops.free(p);
    }
}

/// Gives the blocks of `bin` beyond `CACHE_MAX / 2` back to the heap.
fn drain(ops: &dyn Ops, local: &Local, bin: &Bin) {
    busy(ops, local, || {
        while bin.count.get() > CACHE_MAX / 2 {
            let mut buf = [null_mut(); CHUNK];
            let mut n = 0;
            while n < CHUNK && bin.count.get() > CACHE_MAX / 2 {
                buf[n] = bin.pop();
                n += 1;
            }
            ops.free_batch(&buf[..n]);
        }
    });
}

/// Makes `heap` the process's allocator from now on.
pub fn install<C: Channel>(heap: &Heap<C>)
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    let r = heap.memory().va_range();
    let b: Box<dyn Ops> = Box::new(HeapOps(heap.clone()));
    let p = Box::into_raw(Box::new(b));
    // The range first (`len` last, Release: see `in_heap`): no pointer of it exists before the
    // heap is published below, and whoever gets one from the heap has seen both.
    SHARED.base.store(r.addr as usize, Ordering::Relaxed);
    SHARED.len.store(r.len as usize, Ordering::Release);
    // A previous installation stays leaked: pointers it handed out may still be freed through it.
    let _old = OPS.swap(p, Ordering::AcqRel);
    // Allocations last: a thread that sees `classes` set goes to the slow path (which reads OPS
    // with Acquire) before its cache holds anything.
    SHARED.classes.store(CLASSES, Ordering::Release);
}

/// New allocations go to the system allocator again; frees of heap pointers still reach the
/// heap (so keep the memory attached until they are all freed).
pub fn uninstall() {
    SHARED.classes.store(0, Ordering::Release);
}

/// Counters of the global allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalStats {
    /// Frees the heap refused (reported on stderr; the block is leaked, not corrupted).
    pub errors: u64,
    /// Allocations served by the system allocator although the heap was installed.
    pub fallbacks: usize,
}

/// The global allocator's counters.
pub fn stats() -> GlobalStats {
    GlobalStats {
        errors: ERRORS.load(Ordering::Relaxed),
        fallbacks: FALLBACKS.load(Ordering::Relaxed),
    }
}

/// Whether `p` is a pointer of the shared heap.
pub fn is_heap_pointer(p: *const u8) -> bool {
    in_heap(p)
}

// Cache classes are multiples of 16 bytes and serve only alignments up to 16; heap blocks are
// 32-aligned; cached blocks are reused only for layouts of the same class.
// SAFETY: alloc returns a system allocation for the layout or a heap block at least as large and
// aligned; dealloc routes each pointer back, by address range, to the allocator that produced it.
unsafe impl GlobalAlloc for MemplaneAlloc {
    #[inline]
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let k = class_index(l.size(), l.align());
        if k < SHARED.classes.load(Ordering::Relaxed) {
            // SAFETY: k < classes <= CLASSES.
            let p = LOCAL.with(|local| unsafe { local.bin(k) }.pop());
            if !p.is_null() {
                return p;
            }
        }
        alloc_slow(l)
    }

    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if !in_heap(p) {
            // SAFETY: a pointer outside the heap came from the system allocator with `l`.
            return unsafe { System.dealloc(p, l) };
        }
        let k = class_index(l.size(), l.align());
        if k < SHARED.classes.load(Ordering::Relaxed) {
            let cached = LOCAL.with(|local| {
                // SAFETY: k < classes <= CLASSES.
                let bin = unsafe { local.bin(k) };
                // Below CACHE_MAX only while the cache is in use (see `Bin::count`).
                if bin.count.get() < CACHE_MAX {
                    bin.push(p);
                    true
                } else {
                    false
                }
            });
            if cached {
                return;
            }
        }
        dealloc_slow(p, l);
    }
}
