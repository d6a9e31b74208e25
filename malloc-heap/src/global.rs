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
//! heap blocks: a pop or a push on a per-thread array stack (the freed block itself is not
//! touched) on the hot path; a cache refills or drains in batches under one hold of the heap
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
/// Blocks a class may hold; a free into a full class first gives the older half back to the
/// heap.
const CACHE_MAX: usize = 128;
/// Blocks handed to the heap per `free_batch` call when draining or flushing.
const CHUNK: usize = 64;
const _: () = assert!(BATCH <= CACHE_MAX && CACHE_MAX / 2 <= CHUNK);

/// What the global allocator needs from the heap, without its type parameters.
trait Ops: Send + Sync {
    /// A block of `size` bytes, zero-filled if `zero`; null if the heap cannot serve it.
    fn alloc(&self, size: usize, align: usize, zero: bool) -> *mut u8;
    fn alloc_batch(&self, size: usize, out: &mut [*mut u8]) -> usize;
    fn free(&self, p: *mut u8);
    fn free_batch(&self, ps: &[*mut u8]);
}

struct HeapOps<C: Channel>(Heap<C>);

impl<C: Channel> Ops for HeapOps<C>
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    fn alloc(&self, size: usize, align: usize, zero: bool) -> *mut u8 {
        let p = if zero {
            self.0.zmalloc(size, align)
        } else {
            self.0.malloc(size, align)
        };
        p.map_or(null_mut(), |p| p.as_ptr())
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

/// One size class of a thread's cache: a stack of free blocks in an array of the thread's own.
/// A cached block itself is not touched (no link is written into a freed block, none read from
/// an allocated one), and a push or a pop is one index update.
struct Bin {
    /// 0 while the cache is not in use (not yet registered, or flushed at thread exit), so
    /// that every pop and push takes the slow path; `1 + n` while it holds `n` blocks in
    /// `slots[..n]`. Zero is the initial state, so that the whole thread state is zero
    /// (`.tbss`: nothing to copy when a thread starts).
    mark: Cell<usize>,
    slots: [Cell<*mut u8>; CACHE_MAX],
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
                    mark: Cell::new(0),
                    slots: [const { Cell::new(null_mut()) }; CACHE_MAX],
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
    /// Takes the block pushed last; `None` if the stack is empty or not in use.
    #[inline(always)]
    fn pop(&self) -> Option<*mut u8> {
        // The top block's index, n - 1: out of range when empty (mark 1) or not in use (mark 0).
        let i = self.mark.get().wrapping_sub(2);
        if i < CACHE_MAX {
            self.mark.set(i + 1);
            // SAFETY: i < CACHE_MAX, the length of `slots`.
            Some(unsafe { self.slots.get_unchecked(i) }.get())
        } else {
            None
        }
    }

    /// Puts `p` (a free heap block of this class, owned by the caller) on the stack; false if
    /// the stack is full or not in use.
    #[inline(always)]
    fn push(&self, p: *mut u8) -> bool {
        // The next free index, n: out of range when full (mark CACHE_MAX + 1) or not in use.
        let i = self.mark.get().wrapping_sub(1);
        if i < CACHE_MAX {
            // SAFETY: i < CACHE_MAX, the length of `slots`.
            unsafe { self.slots.get_unchecked(i) }.set(p);
            self.mark.set(i + 2);
            true
        } else {
            false
        }
    }

    /// The number of blocks held (0 when not in use).
    fn len(&self) -> usize {
        self.mark.get().saturating_sub(1)
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

/// The first `CHUNK` (at most) of a bin's slots, copied out.
fn copied(slots: &[Cell<*mut u8>]) -> [*mut u8; CHUNK] {
    let mut buf = [null_mut(); CHUNK];
    for (b, c) in buf.iter_mut().zip(slots) {
        *b = c.get();
    }
    buf
}

/// Frees `blocks` (a bin's slots, no longer in the bin) to the heap, in batches.
fn free_slots(ops: &dyn Ops, blocks: &[Cell<*mut u8>]) {
    for chunk in blocks.chunks(CHUNK) {
        ops.free_batch(&copied(chunk)[..chunk.len()]);
    }
}

/// The thread ends: its cached blocks go back to the heap, and it caches nothing any more.
fn flush(local: &Local) {
    let was = local.state.replace(EXITED);
    // Every bin out of use first (a free to the heap may allocate or free on this thread: those
    // take the slow paths then, which see EXITED), then their blocks go back.
    let held = local.bins.each_ref().map(|b| {
        let n = b.len();
        b.mark.set(0);
        n
    });
    if was != LIVE {
        return;
    }
    let Some(ops) = ops() else { return };
    busy(ops, local, || {
        for (b, n) in local.bins.iter().zip(held) {
            free_slots(ops, &b.slots[..n]);
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
        // In use, empty.
        b.mark.set(1);
    }
}

/// Everything but a pop from the thread's cache.
#[cold]
#[inline(never)]
fn alloc_slow(l: Layout) -> *mut u8 {
    alloc_slow_with(l, false)
}

/// [`alloc_slow`], zero-filled when `zero`: a block beyond the thread caches comes from the
/// heap's `zmalloc` (memory fresh from the kernel is not cleared again), a cached class is
/// cleared here, and the system allocator's `alloc_zeroed` serves its share.
#[inline(always)]
fn alloc_slow_with(l: Layout, zero: bool) -> *mut u8 {
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
                    return Some(busy(ops, local, || ops.alloc(l.size(), l.align(), zero)));
                }
                if local.state.get() == FRESH {
                    busy(ops, local, || register(local));
                }
                if local.state.get() != LIVE {
                    return None;
                }
                let p = refill(ops, local, k);
                if zero && !p.is_null() {
                    // SAFETY: a block of class k (at least l.size() bytes), ours now.
                    unsafe { std::ptr::write_bytes(p, 0, l.size()) };
                }
                Some(p)
            })
            .unwrap_or(None),
        _ => None,
    };
    let system = || {
        // SAFETY: a valid layout, forwarded to the system allocator.
        unsafe {
            if zero {
                System.alloc_zeroed(l)
            } else {
                System.alloc(l)
            }
        }
    };
    match p {
        Some(p) if !p.is_null() => p,
        Some(_) => {
            FALLBACKS.fetch_add(1, Ordering::Relaxed);
            system()
        }
        None => system(),
    }
}

#[cold]
#[inline(never)]
fn alloc_zeroed_slow(l: Layout) -> *mut u8 {
    alloc_slow_with(l, true)
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
    // The bin is empty (its pop missed; what this thread frees meanwhile is deferred, not
    // cached) and holds CACHE_MAX >= BATCH blocks: every push fits.
    let push = |b| {
        let fits = bin.push(b);
        debug_assert!(fits, "a refill into an empty bin fits");
    };
    if n < 4 {
        buf[1..n].iter().copied().for_each(push);
        return buf[0];
    }
    // The heap carves a batch from one free block, in ascending addresses: its first and last
    // blocks may share a cache line with memory another thread uses (the neighbouring batches).
    // They are handed out last, so that a thread whose working set fits in the rest of the
    // batch never writes a line another thread writes (false sharing doubled the time of a
    // pair on two threads).
    push(buf[n - 1]);
    push(buf[0]);
    buf[2..n - 1].iter().rev().copied().for_each(push);
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
            if !bin.push(p) {
                drain(ops, local, bin);
                let fits = bin.push(p);
                debug_assert!(fits, "a drained bin has room");
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

/// Gives the older half of a full `bin` back to the heap; the newer half (the blocks most
/// likely still in this CPU's cache) stays, moved down.
fn drain(ops: &dyn Ops, local: &Local, bin: &Bin) {
    let n = bin.len();
    let give = n.min(CACHE_MAX / 2);
    let buf = copied(&bin.slots[..give]);
    for i in give..n {
        bin.slots[i - give].set(bin.slots[i].get());
    }
    // The bin is consistent before the heap is entered (which may allocate on this thread).
    bin.mark.set(n - give + 1);
    busy(ops, local, || ops.free_batch(&buf[..give]));
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
            if let Some(p) = LOCAL.with(|local| unsafe { local.bin(k) }.pop()) {
                return p;
            }
        }
        alloc_slow(l)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let k = class_index(l.size(), l.align());
        if k < SHARED.classes.load(Ordering::Relaxed) {
            // SAFETY: k < classes <= CLASSES.
            if let Some(p) = LOCAL.with(|local| unsafe { local.bin(k) }.pop()) {
                // SAFETY: a cached block of class k (at least l.size() bytes), ours now.
                unsafe { std::ptr::write_bytes(p, 0, l.size()) };
                return p;
            }
        }
        alloc_zeroed_slow(l)
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
                unsafe { local.bin(k) }.push(p)
            });
            if cached {
                return;
            }
        }
        dealloc_slow(p, l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(i: usize) -> *mut u8 {
        // Distinct non-null values; the bin never dereferences what it holds.
        (0x1000 + 16 * i) as *mut u8
    }

    #[test]
    fn a_bin_not_in_use_takes_and_gives_nothing() {
        let b = Bin {
            mark: Cell::new(0),
            slots: [const { Cell::new(null_mut()) }; CACHE_MAX],
        };
        assert_eq!(b.pop(), None);
        assert!(!b.push(block(1)));
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn a_bin_is_a_bounded_stack() {
        let b = Bin {
            mark: Cell::new(1),
            slots: [const { Cell::new(null_mut()) }; CACHE_MAX],
        };
        assert_eq!(b.pop(), None, "empty");
        for i in 0..CACHE_MAX {
            assert!(b.push(block(i)), "room for block {i}");
        }
        assert_eq!(b.len(), CACHE_MAX);
        assert!(!b.push(block(CACHE_MAX)), "full");
        for i in (0..CACHE_MAX).rev() {
            assert_eq!(b.pop(), Some(block(i)), "last in, first out");
        }
        assert_eq!(b.pop(), None);
        assert_eq!(b.len(), 0);
        assert!(b.push(block(7)));
        assert_eq!(b.pop(), Some(block(7)));
    }
}
