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
//! heap blocks: a lock-free pop or push on the hot path; a cache refills or drains in batches
//! under one hold of the heap lock. Larger allocations go to the heap directly. Every free goes
//! back to whoever allocated the pointer: a pointer inside the shared address range is the
//! heap's, anything else the system allocator's, so memory allocated before `install` (or by the
//! fallback below) is freed correctly.
//!
//! The heap must never wait on itself: allocations made while the heap is already at work on
//! this thread (growing through IPC, which allocates) and allocations the heap cannot serve
//! (full, or growing from a channel thread would deadlock) fall back to the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, UnsafeCell};
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
/// Blocks a class may hold before half of them go back.
const CACHE_MAX: usize = 128;

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

static OPS: AtomicPtr<Box<dyn Ops>> = AtomicPtr::new(null_mut());
static START: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);
static ERRORS: AtomicU64 = AtomicU64::new(0);
static FALLBACKS: AtomicUsize = AtomicUsize::new(0);

/// Routes every allocation of the process to the shared heap once installed.
pub struct MemplaneAlloc;

struct Cache {
    heads: [*mut u8; CLASSES],
    counts: [usize; CLASSES],
}

struct Local {
    cache: UnsafeCell<Cache>,
    /// The heap is at work on this thread: allocate from the system meanwhile.
    busy: Cell<bool>,
    /// Heap blocks freed while the heap was at work on this thread (linked through their first
    /// 8 bytes), freed once it is done: freeing then could re-enter a lock this thread holds.
    deferred: Cell<*mut u8>,
}

impl Drop for Local {
    fn drop(&mut self) {
        // The thread ends: its cached blocks go back to the heap.
        let c = self.cache.get_mut();
        let Some(ops) = ops() else { return };
        self.busy.set(true);
        for k in 0..CLASSES {
            let mut v = Vec::new();
            let mut p = c.heads[k];
            while !p.is_null() {
                v.push(p);
                // SAFETY: cached blocks hold the next link in their first 8 bytes.
                p = unsafe { (p as *mut *mut u8).read() };
            }
            c.heads[k] = null_mut();
            c.counts[k] = 0;
            if !v.is_empty() {
                ops.free_batch(&v);
            }
        }
    }
}

thread_local! {
    static LOCAL: Local = const {
        Local {
            cache: UnsafeCell::new(Cache {
                heads: [null_mut(); CLASSES],
                counts: [0; CLASSES],
            }),
            busy: Cell::new(false),
            deferred: Cell::new(null_mut()),
        }
    };
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

fn ops() -> Option<&'static dyn Ops> {
    let p = OPS.load(Ordering::Acquire);
    // SAFETY: a non-null OPS points to a Box leaked by `install`, never freed.
    (!p.is_null()).then(|| unsafe { &**p })
}

fn in_heap(p: *mut u8) -> bool {
    let a = p as u64;
    a >= START.load(Ordering::Relaxed) && a < END.load(Ordering::Relaxed)
}

/// Makes `heap` the process's allocator from now on.
pub fn install<C: Channel>(heap: &Heap<C>)
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    let r = heap.memory().va_range();
    let b: Box<dyn Ops> = Box::new(HeapOps(heap.clone()));
    let p = Box::into_raw(Box::new(b));
    START.store(r.addr, Ordering::Relaxed);
    END.store(r.addr + r.len, Ordering::Relaxed);
    let old = OPS.swap(p, Ordering::AcqRel);
    // A previous installation stays leaked: pointers it handed out may still be freed through it.
    let _ = old;
}

/// New allocations go to the system allocator again; frees of heap pointers still reach the
/// heap (so keep the memory attached until they are all freed).
pub fn uninstall() {
    OPS.store(null_mut(), Ordering::Release);
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
    in_heap(p as *mut u8)
}

fn class_of(l: &Layout) -> Option<usize> {
    (l.size() <= SMALL_MAX && l.align() <= CLASS).then(|| l.size().max(1).div_ceil(CLASS) - 1)
}

impl MemplaneAlloc {
    #[cold]
    fn slow_alloc(&self, ops: &dyn Ops, l: &Layout, local: &Local) -> *mut u8 {
        let p = busy(ops, local, || match class_of(l) {
            Some(k) => {
                let mut buf = [null_mut(); BATCH];
                let n = ops.alloc_batch((k + 1) * CLASS, &mut buf);
                if n == 0 {
                    null_mut()
                } else {
                    // SAFETY: this thread's cache, touched only by this thread; `busy` keeps
                    // any nested allocation away from it.
                    let c = unsafe { &mut *local.cache.get() };
                    for &b in &buf[1..n] {
                        // SAFETY: b is a fresh block of at least 16 bytes: room for the link.
                        unsafe { (b as *mut *mut u8).write(c.heads[k]) };
                        c.heads[k] = b;
                    }
                    c.counts[k] += n - 1;
                    buf[0]
                }
            }
            None => ops.alloc(l.size(), l.align()),
        });
        if p.is_null() {
            FALLBACKS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: a valid layout, forwarded to the system allocator.
            unsafe { System.alloc(*l) }
        } else {
            p
        }
    }

    #[cold]
    fn drain(&self, ops: &dyn Ops, k: usize, local: &Local) {
        // SAFETY: this thread's cache, as above.
        let c = unsafe { &mut *local.cache.get() };
        busy(ops, local, || {
            let mut v = Vec::with_capacity(CACHE_MAX / 2);
            while c.counts[k] > CACHE_MAX / 2 {
                let p = c.heads[k];
                // SAFETY: a cached block: its first 8 bytes are the link.
                c.heads[k] = unsafe { (p as *mut *mut u8).read() };
                c.counts[k] -= 1;
                v.push(p);
            }
            ops.free_batch(&v);
        });
    }
}

// SAFETY: alloc returns either a system allocation for the layout, or a heap block of at least
// the layout's size and alignment (cache classes are multiples of 16 and served only for
// alignments up to 16; the heap's blocks are 32-aligned); dealloc routes each pointer back to the
// allocator that produced it by address range, and cached blocks are only reused for layouts of
// the same class.
unsafe impl GlobalAlloc for MemplaneAlloc {
    #[inline]
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let Some(ops) = ops() else {
            // SAFETY: forwarding a valid layout.
            return unsafe { System.alloc(l) };
        };
        LOCAL
            .try_with(|local| {
                if local.busy.get() {
                    // SAFETY: forwarding a valid layout.
                    return unsafe { System.alloc(l) };
                }
                if let Some(k) = class_of(&l) {
                    // SAFETY: this thread's cache; no other reference to it is live (`busy` is
                    // false, so we are not inside one of our own slow paths).
                    let c = unsafe { &mut *local.cache.get() };
                    let p = c.heads[k];
                    if !p.is_null() {
                        // SAFETY: a cached block: its first 8 bytes are the link.
                        c.heads[k] = unsafe { (p as *mut *mut u8).read() };
                        c.counts[k] -= 1;
                        return p;
                    }
                }
                self.slow_alloc(ops, &l, local)
            })
            // SAFETY: forwarding a valid layout (the thread is ending: no cache).
            .unwrap_or_else(|_| unsafe { System.alloc(l) })
    }

    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if !in_heap(p) {
            // SAFETY: a pointer outside the heap came from the system allocator with `l`.
            return unsafe { System.dealloc(p, l) };
        }
        let Some(ops) = ops() else {
            return;
        };
        let done = LOCAL.try_with(|local| {
            if local.busy.get() {
                // SAFETY: a heap block of at least 16 bytes (every heap block is): room for the
                // link of the deferred list.
                unsafe { (p as *mut *mut u8).write(local.deferred.get()) };
                local.deferred.set(p);
                return;
            }
            if let Some(k) = class_of(&l) {
                // SAFETY: this thread's cache; no other reference is live (`busy` is false).
                let c = unsafe { &mut *local.cache.get() };
                // SAFETY: `p` is a heap block of this class (at least 16 bytes): room for the link.
                unsafe { (p as *mut *mut u8).write(c.heads[k]) };
                c.heads[k] = p;
                c.counts[k] += 1;
                if c.counts[k] > CACHE_MAX {
                    self.drain(ops, k, local);
                }
                return;
            }
            busy(ops, local, || ops.free(p));
        });
        if done.is_err() {
            // The thread is ending and its cache is gone: free straight to the heap.
            ops.free(p);
        }
    }
}
