//! Memory segment lists: the shared map of which pages exist, and this process's mappings of
//! them.
//!
//! Only the primary changes the shared map ([`MemMap::allocate`], [`MemMap::free`]); every
//! process brings its own mappings in line with it ([`MemMap::sync`]). A segment carries a
//! generation, bumped each time it is allocated, so a process that still maps an older page at
//! that address (it missed the free) maps the new one instead of keeping the stale page.
//!
//! Each list also carries a version, bumped by every allocation or free in it; a process records
//! the version its mappings are in line with. A sync message names the range one transaction
//! changed and the version that change produced ([`MemMap::change_seq`]): a process one version
//! behind brings only that range in line ([`MemMap::sync_change`]); one further behind walks the
//! whole map.
//!
//! Order of a primary allocation: map and populate the pages here (zeroed by the kernel), compute
//! their IOVAs, map them for DMA, then publish them in the shared map and fire ALLOC. A free goes
//! the other way: FREE, DMA unmap, unpublish, unmap, give the pages back to the kernel.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::{Mutex, RwLock};

use memplane_core::txn::{AllocFlags, AllocRequest, MemRange};

use crate::backing::PageStore;
use crate::error::MemError;
use crate::events::{EventRegistry, MemEvent};
use crate::iova::{IovaMode, Pagemap};
use crate::shared::{SEG_PINNED, SharedConfig, backing_code, seg_state};
use crate::va::{Reservation, Spread, WindowOp};
use crate::vfio::DmaMapper;

/// What this process knows of its own mappings.
struct Local {
    /// Per list, per segment: the generation mapped here (0: not mapped).
    gens: Vec<Vec<u64>>,
    /// Per list: the shared version last synced. Version `v` here means every segment's mapping
    /// is in line with the segment's state at version `v` or later.
    versions: Vec<u64>,
}

/// A read-only view of one list, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListInfo {
    /// Index.
    pub index: usize,
    /// Page size.
    pub page_size: u64,
    /// NUMA node.
    pub node: u32,
    /// Address of segment 0.
    pub base: u64,
    /// Segments.
    pub n_segs: u32,
    /// Segments in use.
    pub used: u32,
    /// Segments mapped in this process.
    pub mapped_here: u32,
}

/// The shared map and this process's view of it.
pub struct MemMap {
    cfg: SharedConfig,
    res: Reservation,
    store: PageStore,
    iova_mode: IovaMode,
    pagemap: Option<Pagemap>,
    local: Mutex<Local>,
    events: EventRegistry,
    dma: RwLock<Option<Arc<dyn DmaMapper>>>,
    /// Syncs still to fail on purpose (fault-injection tests of the rollback path).
    fail_syncs: std::sync::atomic::AtomicU32,
    /// Each list's file is mapped whole over the list as a window ([`Reservation::map_window`]):
    /// pages are opened and closed in it (see [`WindowOp`]) instead of mapped one by one.
    windows: bool,
    /// The kernel populates ranges on request (`MADV_POPULATE_WRITE`).
    can_populate: bool,
    /// The most threads that fault a growth's new pages in (see `MemOptions::populate_threads`).
    populate_threads: usize,
}

/// Maps each list's file over the list as a window, when the store has one file per list and
/// the kernel can populate on request; otherwise (or if one mapping fails, after putting the
/// placeholders back) pages are mapped one by one. `MEMPLANE_NO_WINDOWS` in the environment
/// forces the page-by-page way, for comparisons; the choice is this process's own (every
/// process maps the same pages at the same addresses either way).
fn map_windows(cfg: &SharedConfig, res: &Reservation, store: &PageStore) -> bool {
    if std::env::var_os("MEMPLANE_NO_WINDOWS").is_some() || !crate::va::can_populate() {
        return false;
    }
    let lists = (0..cfg.nlists()).map(|i| {
        let l = cfg.list(i);
        (i, l.base, l.n_segs as u64 * l.page_size)
    });
    for (i, base, len) in lists.clone() {
        let ok = store
            .list_fd(i)
            .is_some_and(|fd| res.map_window(base, len, fd).is_ok());
        if !ok {
            for (_, base, len) in lists.take(i) {
                let _ = res.unmap(base, len);
            }
            return false;
        }
    }
    true
}

/// The most threads that fault new pages in at once (the caller included) when the options
/// do not say: `MEMPLANE_POPULATE_THREADS` from the environment (1: the caller alone), else 4.
/// Clearing pages is bound by memory bandwidth, which a few threads fill.
pub fn default_populate_threads() -> usize {
    std::env::var("MEMPLANE_POPULATE_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n >= 1)
        .unwrap_or(4)
}

fn range_pages(r: &MemRange, base: u64, ps: u64) -> (u32, u32) {
    (((r.addr - base) / ps) as u32, (r.len / ps) as u32)
}

impl MemMap {
    /// Puts the parts together. `res` must cover the configuration's address range;
    /// `populate_threads` is the most threads that fault a growth's new pages in at once.
    pub fn new(
        cfg: SharedConfig,
        res: Reservation,
        store: PageStore,
        iova_mode: IovaMode,
        populate_threads: usize,
    ) -> Result<MemMap, MemError> {
        let h = cfg.header();
        if res.base() != h.va_base || res.len() != h.va_len {
            return Err(MemError::Layout {
                what: "reservation does not match the shared range".into(),
            });
        }
        let n = cfg.nlists();
        let gens = (0..n)
            .map(|i| vec![0u64; cfg.list(i).n_segs as usize])
            .collect();
        let pagemap = if iova_mode == IovaMode::Pa {
            Some(Pagemap::open().map_err(|e| MemError::io("open /proc/self/pagemap", e))?)
        } else {
            None
        };
        let windows = map_windows(&cfg, &res, &store);
        Ok(MemMap {
            cfg,
            res,
            store,
            iova_mode,
            pagemap,
            local: Mutex::new(Local {
                gens,
                versions: vec![0; n],
            }),
            events: EventRegistry::default(),
            dma: RwLock::new(None),
            fail_syncs: std::sync::atomic::AtomicU32::new(0),
            windows,
            can_populate: crate::va::can_populate(),
            populate_threads: populate_threads.max(1),
        })
    }

    /// The most threads that fault a growth's new pages in at once.
    pub fn populate_threads(&self) -> usize {
        self.populate_threads
    }

    /// Maps pages `first..first + n` of list `li` here (the primary `creates` them: page files,
    /// and population allocates the pages), populated.
    fn map_pages(&self, li: usize, first: u32, n: u32, create: bool) -> Result<(), MemError> {
        let l = self.cfg.list(li);
        let ps = l.page_size;
        let va = l.base + first as u64 * ps;
        // New pages are cleared by the threads that fault them in: several at once. Pages
        // that exist already (a secondary's sync) only need their page tables filled.
        let spread = if create {
            Spread::pages(ps, self.populate_threads)
        } else {
            Spread::ALONE
        };
        if self.windows {
            return self
                .res
                .open_window(va, n as u64 * ps, self.window_op(li, va)?, spread);
        }
        // Page by page: each mapped populated, or, to share the population out, all mapped
        // first and then populated together.
        let later = self.can_populate && spread.threads > 1 && n > 1;
        for k in 0..n {
            let (src, off) = self.store.source(li, first + k, ps, create)?;
            if let Err(e) = self
                .res
                .map_shared(va + k as u64 * ps, ps, src.fd(), off, !later)
            {
                let _ = self.unmap_pages(li, va, k as u64 * ps);
                return Err(e);
            }
        }
        if later && let Err(e) = self.res.populate(va, n as u64 * ps, spread) {
            let _ = self.unmap_pages(li, va, n as u64 * ps);
            return Err(e);
        }
        Ok(())
    }

    /// Unmaps `[va, va + len)` of list `li` here (the range stays reserved).
    fn unmap_pages(&self, li: usize, va: u64, len: u64) -> Result<(), MemError> {
        if len == 0 {
            return Ok(());
        }
        if self.windows {
            self.res.close_window(va, len, self.window_op(li, va)?)
        } else {
            self.res.unmap(va, len)
        }
    }

    /// How list `li`'s window opens and closes at `va` (see [`WindowOp`]): hugetlb windows by
    /// mapping their file again, ordinary memory by `mprotect`.
    fn window_op(&self, li: usize, va: u64) -> Result<WindowOp<'_>, MemError> {
        if self.cfg.header().backing == backing_code::NO_HUGE {
            return Ok(WindowOp::Protect);
        }
        let fd = self.store.list_fd(li).ok_or_else(|| MemError::Layout {
            what: format!("no file for the window of list {li}"),
        })?;
        Ok(WindowOp::Remap {
            fd,
            offset: va - self.cfg.list(li).base,
        })
    }

    /// The shared configuration.
    pub fn config(&self) -> &SharedConfig {
        &self.cfg
    }

    /// The page store.
    pub fn store(&self) -> &PageStore {
        &self.store
    }

    /// The IOVA mode.
    pub fn iova_mode(&self) -> IovaMode {
        self.iova_mode
    }

    /// The event callbacks.
    pub fn events(&self) -> &EventRegistry {
        &self.events
    }

    /// The address reservation.
    pub fn reservation(&self) -> &Reservation {
        &self.res
    }

    /// Installs (or removes) the DMA mapper; with one installed, every page already in use is
    /// mapped now (primary only).
    pub fn set_dma_mapper(&self, m: Option<Arc<dyn DmaMapper>>) -> Result<(), MemError> {
        let _l = self.local.lock();
        if let Some(m) = &m {
            for li in 0..self.cfg.nlists() {
                let l = self.cfg.list(li);
                for (i, s) in self.cfg.segs(li).iter().enumerate() {
                    if s.state.load(Ordering::Acquire) == seg_state::USED {
                        let va = l.base + i as u64 * l.page_size;
                        m.map(va, s.iova.load(Ordering::Acquire), l.page_size)
                            .map_err(|e| MemError::Dma(e.to_string()))?;
                    }
                }
            }
        }
        *self.dma.write() = m;
        Ok(())
    }

    /// Lists, as they are now.
    pub fn lists(&self) -> Vec<ListInfo> {
        let local = self.local.lock();
        (0..self.cfg.nlists())
            .map(|i| {
                let l = self.cfg.list(i);
                ListInfo {
                    index: i,
                    page_size: l.page_size,
                    node: l.node,
                    base: l.base,
                    n_segs: l.n_segs,
                    used: l.used.load(Ordering::Acquire),
                    mapped_here: local.gens[i].iter().filter(|&&g| g != 0).count() as u32,
                }
            })
            .collect()
    }

    /// Bytes allocated across all lists.
    pub fn total_used(&self) -> u64 {
        self.cfg.header().total_used.load(Ordering::Acquire)
    }

    /// The list and first segment holding `va`.
    pub fn locate(&self, va: u64) -> Option<(usize, u32)> {
        (0..self.cfg.nlists()).find_map(|i| {
            let l = self.cfg.list(i);
            let end = l.base + l.n_segs as u64 * l.page_size;
            (va >= l.base && va < end).then(|| (i, ((va - l.base) / l.page_size) as u32))
        })
    }

    /// The IOVA of `va`, if it lies in an allocated segment.
    pub fn virt2iova(&self, va: u64) -> Option<u64> {
        let (li, seg) = self.locate(va)?;
        let l = self.cfg.list(li);
        let s = &self.cfg.segs(li)[seg as usize];
        if s.state.load(Ordering::Acquire) != seg_state::USED {
            return None;
        }
        let off = va - (l.base + seg as u64 * l.page_size);
        Some(s.iova.load(Ordering::Acquire) + off)
    }

    /// Whether `va` lies in a segment this process maps now.
    pub fn is_mapped_here(&self, va: u64) -> bool {
        self.locate(va)
            .is_some_and(|(li, s)| self.local.lock().gens[li][s as usize] != 0)
    }

    fn node_used(&self, node: u32) -> u64 {
        (0..self.cfg.nlists())
            .map(|i| self.cfg.list(i))
            .filter(|l| l.node == node)
            .map(|l| l.used.load(Ordering::Acquire) as u64 * l.page_size)
            .sum()
    }

    /// Allocates pages for `req` (primary): contiguous in VA, on the requested node and page
    /// size (any when unspecified), and contiguous in IOVA when asked. `pinned` marks them as
    /// allocated up front (`--socket-mem`).
    pub fn allocate(&self, req: &AllocRequest, pinned: bool) -> Result<MemRange, MemError> {
        if req.bytes == 0 {
            return Err(MemError::Invalid("zero bytes".into()));
        }
        let mut local = self.local.lock();
        let h = self.cfg.header();
        let mut last_err = None;
        for li in 0..self.cfg.nlists() {
            let l = self.cfg.list(li);
            if (req.page_size != 0 && l.page_size != req.page_size)
                || req.node.is_some_and(|n| n != l.node)
            {
                continue;
            }
            let ps = l.page_size;
            let n = req.bytes.div_ceil(ps);
            let bytes = n.saturating_mul(ps);
            if n > l.n_segs as u64 {
                // The list is sized by the limits: past it, say which limit.
                if (l.node_limit != 0 && bytes > l.node_limit)
                    || (h.total_limit != 0 && bytes > h.total_limit)
                {
                    return Err(MemError::LimitExceeded {
                        what: format!(
                            "{} MiB asked; -m {} MiB, --socket-limit on node {} {} MiB",
                            bytes >> 20,
                            h.total_limit >> 20,
                            l.node,
                            l.node_limit >> 20
                        ),
                    });
                }
                last_err = Some(MemError::NoMemory {
                    what: format!("{} bytes is more than the whole list {li}", req.bytes),
                });
                continue;
            }
            if h.total_limit != 0 && self.total_used() + bytes > h.total_limit {
                return Err(MemError::LimitExceeded {
                    what: format!(
                        "-m {} MiB: {} MiB in use, {} MiB more asked",
                        h.total_limit >> 20,
                        self.total_used() >> 20,
                        bytes >> 20
                    ),
                });
            }
            if l.node_limit != 0 && self.node_used(l.node) + bytes > l.node_limit {
                return Err(MemError::LimitExceeded {
                    what: format!(
                        "--socket-limit on node {}: {} MiB, {} MiB in use, {} MiB more asked",
                        l.node,
                        l.node_limit >> 20,
                        self.node_used(l.node) >> 20,
                        bytes >> 20
                    ),
                });
            }
            let align_segs = (req.align / ps).max(1);
            let mut from = 0u32;
            while let Some(first) = self.free_run(li, from, n as u32, align_segs) {
                match self.map_run(&mut local, li, first, n as u32, req.flags, pinned) {
                    Ok(r) => return Ok(r),
                    Err(None) => from = first + 1, // not IOVA-contiguous: try further on
                    Err(Some(e)) => {
                        last_err = Some(e);
                        break;
                    }
                }
            }
        }
        Err(last_err.unwrap_or_else(|| MemError::NoMemory {
            what: format!(
                "no free run of pages for {} bytes (page size {}, node {:?})",
                req.bytes, req.page_size, req.node
            ),
        }))
    }

    fn free_run(&self, li: usize, from: u32, n: u32, align_segs: u64) -> Option<u32> {
        let segs = self.cfg.segs(li);
        let mut i = from.next_multiple_of(align_segs as u32);
        while (i as u64) + n as u64 <= segs.len() as u64 {
            match (i..i + n).find(|&k| segs[k as usize].state.load(Ordering::Acquire) != 0) {
                None => return Some(i),
                Some(busy) => i = (busy + 1).next_multiple_of(align_segs as u32),
            }
        }
        None
    }

    /// Maps, checks and publishes `n` segments from `first`. `Err(None)`: not IOVA-contiguous.
    fn map_run(
        &self,
        local: &mut Local,
        li: usize,
        first: u32,
        n: u32,
        flags: AllocFlags,
        pinned: bool,
    ) -> Result<MemRange, Option<MemError>> {
        let l = self.cfg.list(li);
        let ps = l.page_size;
        let start = l.base + first as u64 * ps;
        let mut iovas = Vec::with_capacity(n as usize);
        let undo = |done: u32| {
            let _ = self.unmap_pages(li, start, done as u64 * ps);
            for k in 0..done {
                let _ = self.store.release(li, first + k, ps);
            }
        };
        if let Err(e) = self.map_pages(li, first, n, true) {
            // Population may have allocated some pages of the run before it failed.
            undo(n);
            return Err(Some(e));
        }
        for k in 0..n {
            let va = start + k as u64 * ps;
            let iova = match self.iova_mode {
                IovaMode::Va => va,
                IovaMode::Pa => match self.pagemap.as_ref().and_then(|p| p.phys(va)) {
                    Some(pa) => pa,
                    None => {
                        undo(k + 1);
                        return Err(Some(MemError::Invalid(
                            "IOVA-as-PA but /proc/self/pagemap hides physical addresses \
                             (needs root); use --iova-mode va"
                                .into(),
                        )));
                    }
                },
            };
            iovas.push(iova);
        }
        if flags.contains(AllocFlags::IOVA_CONTIG) && iovas.windows(2).any(|w| w[1] != w[0] + ps) {
            undo(n);
            return Err(None);
        }
        let dma = self.dma.read().clone();
        if let Some(m) = &dma {
            for (k, iova) in iovas.iter().enumerate() {
                if let Err(e) = m.map(start + k as u64 * ps, *iova, ps) {
                    for iova in &iovas[..k] {
                        let _ = m.unmap(*iova, ps);
                    }
                    undo(n);
                    return Err(Some(MemError::Dma(e.to_string())));
                }
            }
        }
        let segs = self.cfg.segs(li);
        for k in 0..n {
            let s = &segs[(first + k) as usize];
            s.iova.store(iovas[k as usize], Ordering::Relaxed);
            s.flags
                .store(if pinned { SEG_PINNED } else { 0 }, Ordering::Relaxed);
            let g = s.generation.fetch_add(1, Ordering::AcqRel) + 1;
            s.state.store(seg_state::USED, Ordering::Release);
            local.gens[li][(first + k) as usize] = g;
        }
        self.account(local, li, n, true);
        self.events.fire(MemEvent::Alloc, start, n as u64 * ps);
        Ok(MemRange {
            addr: start,
            len: n as u64 * ps,
        })
    }

    /// Checks that `r` is whole allocated pages of one list; returns (list, first, count).
    pub fn check_range(&self, r: &MemRange) -> Result<(usize, u32, u32), MemError> {
        let (li, first) = self
            .locate(r.addr)
            .ok_or_else(|| MemError::Invalid(format!("{:#x} is not in any memseg list", r.addr)))?;
        let l = self.cfg.list(li);
        let ps = l.page_size;
        if r.len == 0 || !r.addr.is_multiple_of(ps) || !r.len.is_multiple_of(ps) {
            return Err(MemError::Invalid(format!(
                "[{:#x}, +{:#x}) is not whole pages of {ps} bytes",
                r.addr, r.len
            )));
        }
        let (first2, n) = range_pages(r, l.base, ps);
        debug_assert_eq!(first, first2);
        if first as u64 + n as u64 > l.n_segs as u64 {
            return Err(MemError::Invalid(format!(
                "[{:#x}, +{:#x}) runs past the end of its list",
                r.addr, r.len
            )));
        }
        let segs = self.cfg.segs(li);
        if let Some(k) = (first..first + n)
            .find(|&k| segs[k as usize].state.load(Ordering::Acquire) != seg_state::USED)
        {
            return Err(MemError::Invalid(format!(
                "page at {:#x} is not allocated",
                l.base + k as u64 * ps
            )));
        }
        Ok((li, first, n))
    }

    /// Whether every page of `r` was allocated up front (`--socket-mem`).
    pub fn is_pinned(&self, r: &MemRange) -> bool {
        self.check_range(r).is_ok_and(|(li, first, n)| {
            let segs = self.cfg.segs(li);
            segs[first as usize..(first + n) as usize]
                .iter()
                .all(|s| s.pinned())
        })
    }

    /// The runs of pages allocated up front (`--socket-mem`), as (list, range), in address
    /// order: each run is one contiguous range of one list.
    pub fn pinned_ranges(&self) -> Vec<(usize, MemRange)> {
        let mut out = Vec::new();
        for li in 0..self.cfg.nlists() {
            let l = self.cfg.list(li);
            let pinned = |s: &crate::shared::Seg| {
                s.state.load(Ordering::Acquire) == seg_state::USED && s.pinned()
            };
            let mut k = 0u64;
            for run in self.cfg.segs(li).chunk_by(|a, b| pinned(a) == pinned(b)) {
                if pinned(&run[0]) {
                    let (addr, len) = (l.base + k * l.page_size, run.len() as u64 * l.page_size);
                    out.push((li, MemRange { addr, len }));
                }
                k += run.len() as u64;
            }
        }
        out
    }

    /// Checks that `r` is whole allocated pages of one list that may be freed: none of them
    /// allocated up front (those stay for the life of the memory, as DPDK's `--socket-mem`
    /// pages do). Returns (list, first, count).
    pub fn check_freeable(&self, r: &MemRange) -> Result<(usize, u32, u32), MemError> {
        let (li, first, n) = self.check_range(r)?;
        let segs = self.cfg.segs(li);
        if let Some(k) = (first..first + n).find(|&k| segs[k as usize].pinned()) {
            let l = self.cfg.list(li);
            return Err(MemError::Invalid(format!(
                "page at {:#x} was allocated up front (--socket-mem) and is kept for the life of \
                 the memory",
                l.base + k as u64 * l.page_size
            )));
        }
        Ok((li, first, n))
    }

    /// Frees `r` (primary): whole allocated pages of one list (see [`MemMap::check_freeable`]).
    pub fn free(&self, r: &MemRange) -> Result<(), MemError> {
        let (li, first, n) = self.check_freeable(r)?;
        let mut local = self.local.lock();
        let l = self.cfg.list(li);
        let ps = l.page_size;
        let segs = self.cfg.segs(li);
        self.events.fire(MemEvent::Free, r.addr, r.len);
        if let Some(m) = self.dma.read().clone() {
            for k in first..first + n {
                let iova = segs[k as usize].iova.load(Ordering::Acquire);
                // An unmap failure leaves a stale IOMMU entry but must not keep pages that the
                // heap has already let go of: report it after freeing.
                if let Err(e) = m.unmap(iova, ps) {
                    eprintln!("memplane: DMA unmap of {iova:#x} failed: {e}");
                }
            }
        }
        for k in first..first + n {
            segs[k as usize]
                .state
                .store(seg_state::FREE, Ordering::Release);
            local.gens[li][k as usize] = 0;
        }
        self.account(&mut local, li, n, false);
        self.unmap_pages(li, r.addr, r.len)?;
        let mut first_err = None;
        for k in first..first + n {
            if let Err(e) = self.store.release(li, k, ps) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Counts `n` pages of list `li` as allocated (`alloc`) or freed, and bumps the list's
    /// version; this process, if it was in line with the version before, is with the new one.
    fn account(&self, local: &mut Local, li: usize, n: u32, alloc: bool) {
        let l = self.cfg.list(li);
        let bytes = n as u64 * l.page_size;
        let total = &self.cfg.header().total_used;
        if alloc {
            l.used.fetch_add(n, Ordering::AcqRel);
            total.fetch_add(bytes, Ordering::AcqRel);
        } else {
            l.used.fetch_sub(n, Ordering::AcqRel);
            total.fetch_sub(bytes, Ordering::AcqRel);
        }
        let v = l.version.fetch_add(1, Ordering::AcqRel) + 1;
        if local.versions[li] + 1 == v {
            local.versions[li] = v;
        }
    }

    /// Brings this process's mappings in line with the shared map: maps what is allocated and
    /// not mapped here (or mapped from an older generation), unmaps what was freed. Idempotent.
    /// On failure, returns the range that could not be mapped; what was done stays done.
    pub fn sync(&self) -> Result<(), MemRange> {
        let mut local = self.local.lock();
        if self.injected_failure() {
            return Err(MemRange::default());
        }
        self.sync_all(&mut local)
    }

    /// The version of the list holding `range` (primary: read right after the allocation or
    /// free of `range`, under the transaction lock, it is the version that change produced);
    /// 0 when `range` lies in no list.
    pub fn change_seq(&self, range: &MemRange) -> u64 {
        self.locate(range.addr).map_or(0, |(li, _)| {
            self.cfg.list(li).version.load(Ordering::Acquire)
        })
    }

    /// Brings this process's mappings in line after one change: `range` was allocated or freed,
    /// taking its list to version `seq` (see [`MemMap::change_seq`]), and the change touched
    /// nothing else. When this process is in line with version `seq - 1` of that list, only
    /// `range` is looked at; when it is at `seq` or past it, nothing is; otherwise (it missed a
    /// change, or `seq` is 0 or does not fit the list) the whole map is synced, as by
    /// [`MemMap::sync`]. Errors as [`MemMap::sync`].
    pub fn sync_change(&self, range: &MemRange, seq: u64) -> Result<(), MemRange> {
        let mut local = self.local.lock();
        if self.injected_failure() {
            return Err(MemRange::default());
        }
        let Some((li, first)) = self
            .locate(range.addr)
            .filter(|_| seq != 0 && range.len > 0)
        else {
            return self.sync_all(&mut local);
        };
        let l = self.cfg.list(li);
        if local.versions[li] >= seq {
            return Ok(());
        }
        // The list must have reached `seq` (always so: the message leaves after the change);
        // loading the version first makes the segments' states of that change visible here.
        if local.versions[li] + 1 != seq || l.version.load(Ordering::Acquire) < seq {
            return self.sync_all(&mut local);
        }
        let end = range.end().min(l.base + l.n_segs as u64 * l.page_size);
        let last = (end - l.base).div_ceil(l.page_size) as usize;
        self.sync_segs(&mut local, li, first as usize, last)?;
        local.versions[li] = seq;
        Ok(())
    }

    /// Takes one injected failure, if any is left.
    fn injected_failure(&self) -> bool {
        self.fail_syncs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Walks every list that changed since this process last synced it.
    fn sync_all(&self, local: &mut Local) -> Result<(), MemRange> {
        for li in 0..self.cfg.nlists() {
            let l = self.cfg.list(li);
            for _ in 0..16 {
                let v0 = l.version.load(Ordering::Acquire);
                if v0 == local.versions[li] {
                    break;
                }
                self.sync_segs(local, li, 0, l.n_segs as usize)?;
                if l.version.load(Ordering::Acquire) == v0 {
                    local.versions[li] = v0;
                    break;
                }
                // The primary changed the list while we read it: read it again.
            }
        }
        Ok(())
    }

    /// Brings segments `from..to` of list `li` in line: maps what is allocated and not mapped
    /// here (or from an older generation), then unmaps what was freed, firing ALLOC and FREE per
    /// run.
    fn sync_segs(
        &self,
        local: &mut Local,
        li: usize,
        from: usize,
        to: usize,
    ) -> Result<(), MemRange> {
        let l = self.cfg.list(li);
        let ps = l.page_size;
        let segs = self.cfg.segs(li);
        let n = to.min(segs.len());
        // Pass 1: map pages allocated since, run by run.
        let mut i = from;
        while i < n {
            let want = |k: usize| {
                let s = &segs[k];
                (s.state.load(Ordering::Acquire) == seg_state::USED)
                    .then(|| s.generation.load(Ordering::Acquire))
                    .filter(|&g| g != local.gens[li][k])
            };
            if want(i).is_none() {
                i += 1;
                continue;
            }
            let start = i;
            let mut gens = Vec::new();
            while i < n {
                match want(i) {
                    Some(g) => gens.push(g),
                    None => break,
                }
                i += 1;
            }
            let va = l.base + start as u64 * ps;
            if self
                .map_pages(li, start as u32, gens.len() as u32, false)
                .is_err()
            {
                return Err(MemRange {
                    addr: va,
                    len: gens.len() as u64 * ps,
                });
            }
            local.gens[li][start..start + gens.len()].copy_from_slice(&gens);
            self.events
                .fire(MemEvent::Alloc, va, gens.len() as u64 * ps);
        }
        // Pass 2: unmap pages freed since.
        let mut i = from;
        while i < n {
            let stale = |k: usize| {
                local.gens[li][k] != 0 && segs[k].state.load(Ordering::Acquire) == seg_state::FREE
            };
            if !stale(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < n && stale(i) {
                i += 1;
            }
            let va = l.base + start as u64 * ps;
            let len = (i - start) as u64 * ps;
            self.events.fire(MemEvent::Free, va, len);
            if self.unmap_pages(li, va, len).is_err() {
                return Err(MemRange { addr: va, len });
            }
            for k in start..i {
                local.gens[li][k] = 0;
            }
        }
        Ok(())
    }

    /// Makes the next `n` syncs fail without doing anything (fault injection for tests of the
    /// rollback path: a real failure needs a full system).
    pub fn fail_next_syncs(&self, n: u32) {
        self.fail_syncs.store(n, Ordering::Release);
    }

    /// Unmaps everything this process maps (at detach), firing FREE for each run.
    pub fn unmap_all(&self) {
        let mut local = self.local.lock();
        for li in 0..self.cfg.nlists() {
            let l = self.cfg.list(li);
            let ps = l.page_size;
            let gens = &mut local.gens[li];
            let mut i = 0;
            while i < gens.len() {
                if gens[i] == 0 {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < gens.len() && gens[i] != 0 {
                    gens[i] = 0;
                    i += 1;
                }
                let va = l.base + start as u64 * ps;
                let len = (i - start) as u64 * ps;
                self.events.fire(MemEvent::Free, va, len);
                let _ = self.unmap_pages(li, va, len);
            }
        }
    }
}
