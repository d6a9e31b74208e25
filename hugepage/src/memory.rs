//! One process's shared memory: the primary that owns the map, or a secondary that follows it.
//!
//! The primary runs the core's transaction [`Coordinator`]: a secondary's request to grow or
//! shrink, or the primary's own, becomes actions executed here (allocate or free pages in the
//! [`MemMap`], broadcast a sync to every attached secondary, roll back, publish to the heap,
//! reply). A secondary registers the sync and rollback actions, asks the primary for pages over
//! the channel, and attaches by reserving the primary's address range, receiving the memfds,
//! joining the sync broadcasts and syncing once.
//!
//! Only processes that attached their memory take part in syncs: IPC-only peers (a DPDK
//! secondary, `memplane mp ...`) are never waited for.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use memplane_core::channel::{Channel, Incoming, Side};
use memplane_core::message::{Fds as _, Message, Param};
use memplane_core::name::Name;
use memplane_core::pending::Reply;
use memplane_core::time::Instant;
use memplane_core::txn::{
    ACTION_REQUEST, ACTION_ROLLBACK, ACTION_SYNC, Action, AllocFlags, AllocRequest, Coordinator,
    FreeRequest, MemRange, MemRequest, Origin, Outcome, Requester, SyncJob, SyncOutcome, Timeouts,
    TxnId, TxnMsg, TxnStatus,
};

use crate::backing::PageStore;
use crate::error::MemError;
use crate::events::{EventFn, MemEvent};
use crate::iova::{IovaMode, Pagemap};
use crate::memseg::{ListInfo, MemMap, default_populate_threads};
use crate::options::{Backing, IovaChoice, MemOptions};
use crate::shared::{HeaderSpec, ListSpec, SharedConfig, backing_code, iova_code};
use crate::va::{DEFAULT_BASE, Reservation};
use crate::vfio::DmaMapper;

/// A secondary joins the sync broadcasts (an async request, so it leaves from the secondary's
/// own socket, which the primary then addresses).
pub const ACTION_ATTACH: &str = "memplane_mem_attach";
/// A secondary asks for the memfds of the lists (param: first list index, u32 LE).
pub const ACTION_FDS: &str = "memplane_mem_fds";

/// What the heap layer does when pages join or come back (primary only).
pub trait HeapHooks: Send + Sync {
    /// New pages, mapped everywhere: add them to heap `heap`. They come straight from the
    /// kernel, populated and so zero-filled, and nothing has written them yet (DMA mapping and
    /// memory-event callbacks only see their addresses).
    ///
    /// With `held`, the requester (a secondary that asked with
    /// [`AllocSpec::requester_maps`]) has not mapped them yet: they must join the heap as one
    /// allocated block that the requester releases once it has mapped them, so that nothing
    /// hands any of them out before (and a requester that dies first leaves them accounted as
    /// its own, like any block of a dead process).
    fn publish(&self, heap: u32, range: MemRange, held: bool) -> Result<(), TxnStatus>;
    /// A free did not happen: put the pages back into heap `heap`.
    fn restore(&self, heap: u32, range: MemRange);
}

/// A peer and its process id as the kernel reported it (0: unknown): a requester as the
/// coordinator knows it, and an attached secondary; the pid tells which participant a requester
/// is.
type Who<P> = (P, u32);

struct Primary<P> {
    coord: Mutex<Coordinator<Who<P>>>,
    participants: Mutex<Vec<Who<P>>>,
    results: Mutex<HashMap<u64, Result<MemRange, TxnStatus>>>,
    done: Condvar,
    timer: Arc<TimerShared>,
    hooks: Mutex<Option<Arc<dyn HeapHooks>>>,
    vfio: Mutex<Option<Arc<OwnedFd>>>,
}

/// What the primary's timer thread sleeps on; it holds no strong reference to the memory while
/// asleep, so dropping the memory is never delayed by it.
#[derive(Default)]
struct TimerShared {
    state: Mutex<TimerState>,
    wake: Condvar,
}

/// The timer thread's state. A transaction wakes the thread only when it has a deadline earlier
/// than the one the thread sleeps until: with transactions back to back, the thread wakes about
/// once per step timeout, not once per transaction.
struct TimerState {
    stop: bool,
    /// When the sleeping thread wakes by itself; [`Instant::NEVER`] while it is awake (so every
    /// deadline set meanwhile kicks it) or sleeps without a deadline.
    armed: Instant,
    /// A deadline was set after the thread last read them: read them again before sleeping.
    kicked: bool,
}

impl Default for TimerState {
    fn default() -> Self {
        TimerState {
            stop: false,
            armed: Instant::NEVER,
            kicked: false,
        }
    }
}

struct Inner<C: Channel> {
    ch: Arc<C>,
    map: MemMap,
    timeouts: Timeouts,
    primary: Option<Primary<C::Peer>>,
    next_id: AtomicU64,
    stop: AtomicBool,
    timer_thread: Mutex<Option<JoinHandle<()>>>,
    dir: PathBuf,
    /// One request to the primary at a time from this process: replies are matched by
    /// (peer, name), and every transaction uses the same name.
    requests: Mutex<()>,
}

/// This process's shared memory.
pub struct Memory<C: Channel> {
    inner: Arc<Inner<C>>,
}

fn now() -> Instant {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    Instant::from_nanos(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// What the answers to a sync or rollback broadcast of transaction `id` say.
fn sync_outcome<C: Channel>(id: TxnId, r: Reply<C::Replies>) -> SyncOutcome {
    let params: Vec<Param> = r
        .replies
        .into_iter()
        .map(|(_, m)| m.into_parts().1)
        .collect();
    SyncOutcome::from_answers(id, r.nb_sent, params.iter().map(|p| p.as_slice()))
}

fn msg<F: memplane_core::Fds>(name: &str, m: &TxnMsg) -> Message<F> {
    // The names are constants that validate; a payload is at most 56 bytes.
    let name = Name::new(name).unwrap_or_else(|_| unreachable!("valid action name"));
    Message::with_param(name, m.to_param())
}

/// The system's default hugepage size, from `/proc/meminfo`.
pub fn default_hugepage_size() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    crate::discover::parse_default_size(&m).map(|p| p.bytes())
}

/// Free hugepages of `size` bytes, system-wide.
pub fn free_hugepages(size: u64) -> u64 {
    std::fs::read_to_string(format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/free_hugepages",
        size >> 10
    ))
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

/// The NUMA nodes with memory (node 0 when the machine has no NUMA sysfs).
pub fn memory_nodes() -> Vec<u32> {
    std::fs::read_to_string("/sys/devices/system/node/has_memory")
        .or_else(|_| std::fs::read_to_string("/sys/devices/system/node/online"))
        .ok()
        .and_then(|s| crate::discover::parse_node_list(&s))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| vec![0])
}

impl<C: Channel> Clone for Memory<C> {
    fn clone(&self) -> Self {
        Memory {
            inner: self.inner.clone(),
        }
    }
}

/// The decisions of a primary's initialisation, reported to the user once.
#[derive(Clone, Debug)]
pub struct MemSetup {
    /// The backing in use.
    pub backing: &'static str,
    /// Page size of the lists.
    pub page_size: u64,
    /// IOVA mode.
    pub iova: IovaMode,
    /// Start of the shared address range.
    pub va_base: u64,
    /// Its length.
    pub va_len: u64,
    /// Why the backing was chosen, when it was chosen automatically.
    pub note: Option<String>,
}

impl<C: Channel> Memory<C>
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    /// Sets up the primary's memory in runtime directory `dir` (which the channel's primary
    /// lock holds), with file prefix `prefix`.
    pub fn primary(
        ch: Arc<C>,
        dir: &Path,
        prefix: &str,
        opts: &MemOptions,
        timeouts: Timeouts,
    ) -> Result<(Memory<C>, MemSetup), MemError> {
        if ch.side() != Side::Primary {
            return Err(MemError::Invalid(
                "Memory::primary on a secondary channel".into(),
            ));
        }
        opts.check_sizes()?;
        let root = rustix::process::geteuid().is_root();
        let huge_size = opts.page_size.or_else(default_hugepage_size);
        let mut note = None;
        let (code, huge_dir) = match &opts.backing {
            Backing::Auto => match huge_size {
                Some(s) if free_hugepages(s) > 0 => (backing_code::MEMFD, None),
                _ => {
                    note = Some(
                        "no free hugepages: running without hugepages (no-huge mode, ordinary \
                         shared memory)"
                            .to_owned(),
                    );
                    (backing_code::NO_HUGE, None)
                }
            },
            Backing::Memfd => (backing_code::MEMFD, None),
            Backing::NoHuge => (backing_code::NO_HUGE, None),
            Backing::FilePerPage(d) => (
                backing_code::FILE_PER_PAGE,
                Some(d.clone().unwrap_or_else(|| PathBuf::from("/dev/hugepages"))),
            ),
            Backing::SingleFile(d) => (
                backing_code::SINGLE_FILE,
                Some(d.clone().unwrap_or_else(|| PathBuf::from("/dev/hugepages"))),
            ),
        };
        // Secondaries open the page files by the path the shared header gives them: a relative
        // `--huge-dir` would name other files in a process with another working directory.
        let huge_dir = huge_dir.map(|d| std::path::absolute(&d).unwrap_or(d));
        // Page files take the page size of the hugetlbfs they are on, whatever was asked (and
        // memfds that of the directory `--in-memory --huge-dir` names): a directory that is not
        // one (or missing) is refused now, not at the first page.
        let size_dir = match (&huge_dir, &opts.backing) {
            (Some(d), _) => Some(d.clone()),
            (None, Backing::Memfd) => opts.size_from.clone(),
            (None, _) => None,
        };
        let huge_size = match &size_dir {
            None => huge_size,
            Some(d) => {
                let Some(mount) = crate::discover::hugetlbfs_page_size(d) else {
                    return Err(MemError::Invalid(format!(
                        "--huge-dir {}: not a directory on a hugetlbfs mount",
                        d.display()
                    )));
                };
                if let Some(asked) = opts.page_size.filter(|&p| p != mount) {
                    return Err(MemError::Invalid(format!(
                        "--huge-dir {} holds {} KiB pages, not the {} KiB asked for",
                        d.display(),
                        mount >> 10,
                        asked >> 10
                    )));
                }
                Some(mount)
            }
        };
        let huge = code != backing_code::NO_HUGE;
        let page_size = if huge {
            huge_size.ok_or_else(|| {
                MemError::Invalid("hugepages asked for but the kernel reports no size".into())
            })?
        } else {
            2 << 20
        };
        let nodes = if huge { memory_nodes() } else { vec![0] };
        // Memory asked up front on a node without memory could never be had: say so now, as
        // DPDK's start does, rather than as a failed allocation.
        if let Some((node, mb)) = opts
            .socket_mem
            .iter()
            .enumerate()
            .find(|&(n, &mb)| mb > 0 && !nodes.contains(&(n as u32)))
        {
            return Err(MemError::Invalid(format!(
                "--socket-mem asks {mb} MiB on NUMA node {node}, which has no {} memory here \
                 (nodes {nodes:?})",
                if huge { "hugepage" } else { "shared" }
            )));
        }
        let total_limit = opts.total_mb.map_or(0, |m| m << 20);
        let mut per_list = if huge {
            opts.list_va
        } else {
            opts.list_va.min(4 << 30)
        };
        if total_limit != 0 {
            per_list = per_list.min(total_limit.next_multiple_of(page_size));
        }
        let mut specs = Vec::new();
        let mut off = 0u64;
        for &node in &nodes {
            let limit = opts.node_limit(node).unwrap_or(0);
            let len = if limit != 0 {
                per_list.min(limit.next_multiple_of(page_size))
            } else {
                per_list
            };
            let n_segs = (len / page_size).clamp(1, 32768) as u32;
            specs.push(ListSpec {
                page_size,
                node,
                n_segs,
                base: off,
                node_limit: limit,
            });
            off += n_segs as u64 * page_size;
        }
        let mut res =
            Reservation::anywhere(opts.base_virtaddr.unwrap_or(DEFAULT_BASE), off, page_size)?;
        if let Some(b) = opts.base_virtaddr
            && b.checked_next_multiple_of(page_size) != Some(res.base())
        {
            // A hint, as in DPDK: the range goes elsewhere, and every secondary follows it.
            // Where a primary without the option goes, low, rather than where the kernel put
            // it: high addresses are where it puts libraries and stacks, which would be in the
            // way of the secondaries' mappings.
            drop(res);
            res = Reservation::anywhere(DEFAULT_BASE, off, page_size)?;
            let moved = format!(
                "--base-virtaddr {b:#x} is not free or not usable here: the shared address \
                 range is at {:#x} instead",
                res.base()
            );
            note = Some(match note {
                Some(n) => format!("{n}; {moved}"),
                None => moved,
            });
        }
        for s in &mut specs {
            s.base += res.base();
        }
        let iova = match (opts.iova, huge) {
            (IovaChoice::Va, _) | (IovaChoice::Auto, false) => IovaMode::Va,
            (IovaChoice::Pa, _) | (IovaChoice::Auto, true) => {
                let probe = 0u64;
                let visible = Pagemap::open()
                    .map(|p| p.available(&probe as *const u64 as u64))
                    .unwrap_or(false);
                match (opts.iova, visible && root) {
                    (_, true) => IovaMode::Pa,
                    (IovaChoice::Pa, false) => {
                        return Err(MemError::Invalid(
                            "--iova-mode pa: physical addresses are not visible (needs root); \
                             use --iova-mode va"
                                .into(),
                        ));
                    }
                    _ => IovaMode::Va,
                }
            }
        };
        let cfg = SharedConfig::create(
            dir,
            &HeaderSpec {
                backing: code,
                iova_mode: match iova {
                    IovaMode::Pa => iova_code::PA,
                    IovaMode::Va => iova_code::VA,
                },
                va_base: res.base(),
                va_len: res.len(),
                total_limit,
                huge_dir: huge_dir.as_deref(),
                prefix,
                lists: &specs,
            },
        )?;
        // A start that fails from here on must not leave a valid-looking config behind for a
        // secondary to attach to.
        let cfg_path = cfg.path().to_owned();
        let lists: Vec<(u64, u32)> = specs.iter().map(|s| (s.page_size, s.n_segs)).collect();
        let map = PageStore::create(code, &lists, huge_dir.as_deref(), prefix)
            .and_then(|store| {
                let threads = opts
                    .populate_threads
                    .unwrap_or_else(default_populate_threads);
                MemMap::new(cfg, res, store, iova, threads)
            })
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&cfg_path);
            })?;
        let setup = MemSetup {
            backing: match code {
                backing_code::MEMFD => "memfd (hugepages)",
                backing_code::FILE_PER_PAGE => "hugetlbfs file per page",
                backing_code::SINGLE_FILE => "hugetlbfs file per list",
                _ => "no-huge (shared memory)",
            },
            page_size,
            iova,
            va_base: map.reservation().base(),
            va_len: map.reservation().len(),
            note,
        };
        let primary = Primary {
            coord: Mutex::new(Coordinator::new(timeouts)),
            participants: Mutex::new(Vec::new()),
            results: Mutex::new(HashMap::new()),
            done: Condvar::new(),
            timer: Arc::new(TimerShared::default()),
            hooks: Mutex::new(None),
            vfio: Mutex::new(None),
        };
        let mem = Memory::assemble(ch, map, timeouts, Some(primary), dir);
        mem.register_primary_actions()?;
        mem.start_timer()?;
        for (node, &mb) in opts.socket_mem.iter().enumerate() {
            if mb > 0 {
                mem.alloc_pinned(node as u32, mb << 20)?;
            }
        }
        Ok((mem, setup))
    }

    /// The parts of a primary's or a secondary's memory, before its actions are registered.
    fn assemble(
        ch: Arc<C>,
        map: MemMap,
        timeouts: Timeouts,
        primary: Option<Primary<C::Peer>>,
        dir: &Path,
    ) -> Memory<C> {
        Memory {
            inner: Arc::new(Inner {
                ch,
                map,
                timeouts,
                primary,
                next_id: AtomicU64::new(1),
                stop: AtomicBool::new(false),
                timer_thread: Mutex::new(None),
                dir: dir.to_owned(),
                requests: Mutex::new(()),
            }),
        }
    }

    /// Attaches a secondary to the primary's memory in `dir`.
    pub fn secondary(ch: Arc<C>, dir: &Path, timeouts: Timeouts) -> Result<Memory<C>, MemError> {
        if ch.side() != Side::Secondary {
            return Err(MemError::Invalid(
                "Memory::secondary on a primary channel".into(),
            ));
        }
        let cfg = SharedConfig::attach(dir)?;
        let h = cfg.header();
        let res = Reservation::exact(h.va_base, h.va_len)?;
        let nlists = cfg.nlists();
        let code = h.backing;
        let memfds = if code == backing_code::MEMFD || code == backing_code::NO_HUGE {
            fetch_fds(&*ch, nlists)?
        } else {
            Vec::new()
        };
        let store = PageStore::attach(code, nlists, cfg.huge_dir(), cfg.prefix(), memfds)?;
        let iova = if h.iova_mode == iova_code::PA {
            IovaMode::Pa
        } else {
            IovaMode::Va
        };
        let map = MemMap::new(cfg, res, store, iova, default_populate_threads())?;
        let mem = Memory::assemble(ch, map, timeouts, None, dir);
        mem.register_secondary_actions()?;
        mem.join()?;
        mem.inner.map.sync().map_err(|r| MemError::SyncFailed {
            start: r.addr,
            len: r.len,
        })?;
        Ok(mem)
    }
}

fn fetch_fds<C: Channel>(ch: &C, nlists: usize) -> Result<Vec<OwnedFd>, MemError>
where
    C::Fds: Into<Vec<OwnedFd>>,
{
    let mut fds = Vec::new();
    while fds.len() < nlists {
        let param = (fds.len() as u32).to_le_bytes();
        let m: Message<C::Fds> = Message::new(ACTION_FDS, &param)
            .map_err(|e| MemError::Invalid(e.to_string()))?
            .with_fds(C::Fds::empty())
            .map_err(|e| MemError::Invalid(e.to_string()))?;
        let r = ch
            .request_peers(&[ch.primary()], &m, Duration::from_secs(5))
            .map_err(|e| MemError::Channel(e.to_string()))?;
        let Some((_, reply)) = r.replies.into_iter().next() else {
            return Err(MemError::NoAnswer);
        };
        let (_, _, got) = reply.into_parts();
        let got: Vec<OwnedFd> = got.into();
        if got.is_empty() {
            return Err(MemError::Layout {
                what: "the primary sent no memfd".into(),
            });
        }
        fds.extend(got);
    }
    fds.truncate(nlists);
    Ok(fds)
}

impl<C: Channel> Memory<C>
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    fn weak(&self) -> Weak<Inner<C>> {
        Arc::downgrade(&self.inner)
    }

    fn register_primary_actions(&self) -> Result<(), MemError> {
        let ch = &self.inner.ch;
        let w = self.weak();
        ch.register_action(
            ACTION_REQUEST,
            move |ch: &C, inc: Incoming<C::Peer, C::Fds>| {
                let Some(inner) = w.upgrade() else { return };
                match TxnMsg::decode(inc.msg.param()) {
                    Ok(TxnMsg::Request { id, req }) => {
                        Memory { inner }.drive(|c| {
                            c.submit(Origin::Peer((inc.from.clone(), inc.pid)), id, req, now());
                        });
                    }
                    _ => {
                        let resp = TxnMsg::Response {
                            id: TxnId(0),
                            status: TxnStatus::Invalid,
                            range: MemRange::default(),
                            seq: 0,
                        };
                        let _ = ch.reply_to(&inc.from, &msg(ACTION_REQUEST, &resp));
                    }
                }
            },
        )
        .map_err(|e| MemError::Channel(e.to_string()))?;

        let w = self.weak();
        ch.register_action(
            ACTION_ATTACH,
            move |ch: &C, inc: Incoming<C::Peer, C::Fds>| {
                let Some(inner) = w.upgrade() else { return };
                let p = inc.msg.param();
                // The kernel's word for who this is, when the transport has it: it is what a
                // requester's pid is compared with (see `participants`), in this namespace.
                let pid = if p.len() != 4 {
                    0
                } else if inc.pid != 0 {
                    inc.pid
                } else {
                    u32::from_le_bytes([p[0], p[1], p[2], p[3]])
                };
                let status = if pid == 0 {
                    TxnStatus::Invalid
                } else if let Some(pr) = &inner.primary {
                    let mut v = pr.participants.lock();
                    v.retain(|(peer, _)| *peer != inc.from);
                    v.push((inc.from.clone(), pid));
                    TxnStatus::Ok
                } else {
                    TxnStatus::Unsupported
                };
                let ack = TxnMsg::SyncAck {
                    id: TxnId(pid as u64),
                    status,
                };
                let _ = ch.reply_to(&inc.from, &msg(ACTION_ATTACH, &ack));
            },
        )
        .map_err(|e| MemError::Channel(e.to_string()))?;

        let w = self.weak();
        ch.register_action(ACTION_FDS, move |ch: &C, inc: Incoming<C::Peer, C::Fds>| {
            let Some(inner) = w.upgrade() else { return };
            let p = inc.msg.param();
            let first = if p.len() == 4 {
                u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize
            } else {
                usize::MAX
            };
            // At most 8 per reply: the 22.11 ABI's limit, so any channel can carry them.
            let fds: Vec<OwnedFd> = inner
                .map
                .store()
                .shareable_fds()
                .and_then(|all| {
                    // All or none: one failed clone must not shift the others to the wrong
                    // lists (none makes the secondary fail cleanly, "no memfd").
                    all.iter()
                        .skip(first)
                        .take(8)
                        .map(|f| f.try_clone())
                        .collect::<Result<Vec<_>, _>>()
                        .ok()
                })
                .unwrap_or_default();
            let name = Name::new(ACTION_FDS).unwrap_or_else(|_| unreachable!());
            if let Ok(m) = Message::from_parts(name, Param::EMPTY, C::Fds::from(fds)) {
                let _ = ch.reply_to(&inc.from, &m);
            }
        })
        .map_err(|e| MemError::Channel(e.to_string()))?;

        // The VFIO container: answered "no fd" until one is served.
        let w = self.weak();
        ch.register_action(
            crate::vfio::ACTION_VFIO,
            move |ch: &C, inc: Incoming<C::Peer, C::Fds>| {
                use crate::vfio::{
                    VfioReply, VfioRequest, VfioResult, decode_request, encode_reply,
                };
                let Some(inner) = w.upgrade() else { return };
                if !inc.is_request() {
                    return;
                }
                let served = inner.primary.as_ref().and_then(|p| p.vfio.lock().clone());
                let (result, fds) = match (decode_request(inc.msg.param()), served) {
                    (Ok(VfioRequest::ContainerFd), Some(c)) => match c.try_clone() {
                        Ok(fd) => (VfioResult::Ok, vec![fd]),
                        Err(_) => (VfioResult::Err, Vec::new()),
                    },
                    (Ok(VfioRequest::ContainerFd), None) => (VfioResult::NoFd, Vec::new()),
                    (Err(_), _) => (VfioResult::Err, Vec::new()),
                };
                let param = encode_reply(VfioReply {
                    req: VfioRequest::ContainerFd,
                    result,
                });
                let name = Name::new(crate::vfio::ACTION_VFIO).unwrap_or_else(|_| unreachable!());
                if let Ok(p) = Param::new(&param)
                    && let Ok(m) = Message::from_parts(name, p, C::Fds::from(fds))
                {
                    let _ = ch.reply_to(&inc.from, &m);
                }
            },
        )
        .map_err(|e| MemError::Channel(e.to_string()))?;
        Ok(())
    }

    fn register_secondary_actions(&self) -> Result<(), MemError> {
        for name in [ACTION_SYNC, ACTION_ROLLBACK] {
            let w = self.weak();
            self.inner
                .ch
                .register_action(name, move |ch: &C, inc: Incoming<C::Peer, C::Fds>| {
                    let Some(inner) = w.upgrade() else { return };
                    let job = match SyncJob::decode(inc.msg.param()) {
                        Ok(j) => j,
                        Err(_) => return, // not ours to answer: the primary times out
                    };
                    // Only the range this transaction changed, when nothing else changed since
                    // this process last synced; the whole map otherwise.
                    let status = match inner.map.sync_change(&job.range, job.seq) {
                        Ok(()) => TxnStatus::Ok,
                        Err(_) => TxnStatus::Failed,
                    };
                    let _ = ch.reply_to(&inc.from, &msg(name, &job.ack(status)));
                })
                .map_err(|e| MemError::Channel(e.to_string()))?;
        }
        Ok(())
    }

    fn join(&self) -> Result<(), MemError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let pid = std::process::id();
        let m: Message<C::Fds> = Message::new(ACTION_ATTACH, &pid.to_le_bytes())
            .map_err(|e| MemError::Invalid(e.to_string()))?
            .with_fds(C::Fds::empty())
            .map_err(|e| MemError::Invalid(e.to_string()))?;
        let ch = &self.inner.ch;
        ch.request_peers_async(&[ch.primary()], &m, Duration::from_secs(5), move |_, r| {
            let ok = r.replies.into_iter().any(|(_, m)| {
                matches!(
                    TxnMsg::decode(m.param()),
                    Ok(TxnMsg::SyncAck {
                        status: TxnStatus::Ok,
                        ..
                    })
                )
            });
            let _ = tx.send(ok);
        })
        .map_err(|e| MemError::Channel(e.to_string()))?;
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(true) => Ok(()),
            Ok(false) => Err(MemError::NoAnswer),
            Err(_) => Err(MemError::NoAnswer),
        }
    }

    fn start_timer(&self) -> Result<(), MemError> {
        let Some(pr) = &self.inner.primary else {
            return Ok(());
        };
        let shared = pr.timer.clone();
        // With no deadline, the thread still wakes after this long: a transaction's step
        // deadline (set later) is then never earlier than the thread's own wake-up, and does not
        // need to wake it.
        let idle = self.inner.timeouts.coordinator_step();
        let w = self.weak();
        let t = std::thread::Builder::new()
            .name("mem-timer".into())
            .spawn(move || {
                loop {
                    let next = match w.upgrade() {
                        Some(inner) => inner
                            .primary
                            .as_ref()
                            .and_then(|p| p.coord.lock().poll_timeout()),
                        None => return,
                    };
                    {
                        let mut st = shared.state.lock();
                        if st.stop {
                            return;
                        }
                        if std::mem::take(&mut st.kicked) {
                            // A deadline came after `next` was read: read again.
                            continue;
                        }
                        let n = now();
                        let until = next.unwrap_or_else(|| n.saturating_add(idle));
                        if until > n {
                            st.armed = until;
                            shared
                                .wake
                                .wait_for(&mut st, until.saturating_duration_since(n));
                        }
                        st.armed = Instant::NEVER;
                        st.kicked = false;
                        if st.stop {
                            return;
                        }
                    }
                    let Some(inner) = w.upgrade() else { return };
                    Memory { inner }.drive(|c| c.handle_timeout(now()));
                }
            })
            .map_err(|e| MemError::io("spawn mem-timer", e))?;
        *self.inner.timer_thread.lock() = Some(t);
        Ok(())
    }

    /// Runs `f` on the coordinator, then every action it queued.
    fn drive(&self, f: impl FnOnce(&mut Coordinator<Who<C::Peer>>)) {
        let Some(pr) = &self.inner.primary else {
            return;
        };
        let mut c = pr.coord.lock();
        f(&mut c);
        while let Some(a) = c.poll_action() {
            self.execute(&mut c, a);
        }
        if let Some(d) = c.poll_timeout() {
            let mut st = pr.timer.state.lock();
            if d < st.armed {
                st.kicked = true;
                pr.timer.wake.notify_one();
            }
        }
    }

    fn execute(&self, c: &mut Coordinator<Who<C::Peer>>, a: Action<Who<C::Peer>>) {
        let inner = &self.inner;
        let Some(pr) = &inner.primary else { return };
        match a {
            Action::AllocatePages { id, req } => {
                let r = inner.map.allocate(&req, false).map_err(|e| e.status());
                let _ = c.pages_allocated(id, r, now());
            }
            Action::FreePages { id, range, .. } => {
                let r = inner.map.free(&range).map_err(|e| e.status());
                let _ = c.pages_freed(id, r, now());
            }
            // The list's version now is the one this transaction's change produced: changes
            // are made only here and in `alloc_pinned`, all under the coordinator's lock.
            Action::BroadcastSync { id, range, skip } => {
                let seq = inner.map.change_seq(&range);
                let m = TxnMsg::Sync { id, range, seq };
                self.broadcast(c, id, m, ACTION_SYNC, false, skip.map_or(0, |(_, pid)| pid))
            }
            Action::BroadcastRollback { id, range } => {
                let seq = inner.map.change_seq(&range);
                let m = TxnMsg::Rollback { id, range, seq };
                self.broadcast(c, id, m, ACTION_ROLLBACK, true, 0)
            }
            Action::Publish {
                id,
                heap,
                range,
                held,
            } => {
                let hooks = pr.hooks.lock().clone();
                let r = hooks.map_or(Ok(()), |h| h.publish(heap, range, held));
                let _ = c.published(id, r, now());
            }
            Action::Restore { heap, range, .. } => {
                if let Some(h) = pr.hooks.lock().clone() {
                    h.restore(heap, range);
                }
            }
            Action::Reply {
                to,
                id,
                status,
                range,
            } => match to {
                Origin::Local(tok) => {
                    let r = if status.is_ok() {
                        Ok(range)
                    } else {
                        Err(status)
                    };
                    pr.results.lock().insert(tok, r);
                    pr.done.notify_all();
                }
                Origin::Peer((p, _)) => {
                    // The map's version after this change, for a requester that maps its pages
                    // itself (nothing else changed the list since: changes happen only under
                    // the coordinator's lock, which is held here).
                    let seq = if status.is_ok() && range.len > 0 {
                        inner.map.change_seq(&range)
                    } else {
                        0
                    };
                    let resp = TxnMsg::Response {
                        id,
                        status,
                        range,
                        seq,
                    };
                    let _ = inner.ch.reply_to(&p, &msg(ACTION_REQUEST, &resp));
                }
            },
        }
    }

    /// The attached secondaries, as they are (no liveness check here: a broadcast to a process
    /// that is gone fails to send at once, its socket being closed, and costs no timeout).
    /// `except` (a pid, 0 for none) is left out: a requester that maps its pages itself.
    fn participants(&self, except: u32) -> Vec<C::Peer> {
        let Some(pr) = &self.inner.primary else {
            return Vec::new();
        };
        pr.participants
            .lock()
            .iter()
            .filter(|(_, pid)| except == 0 || *pid != except)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Drops the participants whose process is gone; returns how many are left. Called when a
    /// broadcast did not reach or hear from every participant, and for the count: not on every
    /// transaction (a `kill(pid, 0)` per participant each time).
    fn prune_participants(&self) -> usize {
        let Some(pr) = &self.inner.primary else {
            return 0;
        };
        let mut v = pr.participants.lock();
        v.retain(|(_, pid)| {
            rustix::process::test_kill_process(
                rustix::process::Pid::from_raw(*pid as i32).unwrap_or(rustix::process::Pid::INIT),
            )
            .is_ok()
        });
        v.len()
    }

    /// After a broadcast to `asked` participants: if some could not be reached or did not answer
    /// ok, drop those whose process is gone, so the next transaction does not try them.
    fn after_broadcast(&self, asked: usize, o: &SyncOutcome) {
        if (o.sent as usize) < asked || !o.is_success() {
            self.prune_participants();
        }
    }

    /// Asks every participant but the one of pid `except` (0: none) to sync (`name`), and
    /// reports the outcome to the coordinator.
    fn broadcast(
        &self,
        c: &mut Coordinator<Who<C::Peer>>,
        id: TxnId,
        m: TxnMsg,
        name: &'static str,
        rollback: bool,
        except: u32,
    ) {
        let peers = self.participants(except);
        let report = |c: &mut Coordinator<Who<C::Peer>>, o: SyncOutcome| {
            let _ = if rollback {
                c.rollback_done(id, o, now())
            } else {
                c.sync_done(id, o, now())
            };
        };
        if peers.is_empty() {
            report(c, SyncOutcome::default());
            return;
        }
        let ch = &self.inner.ch;
        let message: Message<C::Fds> = msg(name, &m);
        let step = self.inner.timeouts.step;
        if !ch.on_channel_thread() {
            // A user thread drives this transaction: wait right here, replies come straight
            // to this thread's request socket.
            let o = match ch.request_peers(&peers, &message, step) {
                Ok(r) => sync_outcome::<C>(id, r),
                Err(_) => SyncOutcome {
                    sent: 0,
                    ok: 0,
                    failed: 1,
                },
            };
            self.after_broadcast(peers.len(), &o);
            report(c, o);
            return;
        }
        let w = self.weak();
        let asked = peers.len();
        let r = ch.request_peers_async(&peers, &message, step, move |_, r| {
            let Some(inner) = w.upgrade() else { return };
            let o = sync_outcome::<C>(id, r);
            let mem = Memory { inner };
            mem.after_broadcast(asked, &o);
            mem.drive(|c| {
                let _ = if rollback {
                    c.rollback_done(id, o, now())
                } else {
                    c.sync_done(id, o, now())
                };
            });
        });
        if r.is_err() {
            // The broadcast could not even start: fail the step now (a sync rolls back).
            report(
                c,
                SyncOutcome {
                    sent: 0,
                    ok: 0,
                    failed: 1,
                },
            );
        }
    }

    fn new_id(&self) -> TxnId {
        TxnId(
            ((std::process::id() as u64) << 32)
                | self.inner.next_id.fetch_add(1, Ordering::Relaxed),
        )
    }

    /// Runs `req` (here in the primary, through the primary in a secondary); the range it
    /// allocated or freed, and the map's change counter after it (0 from the primary itself).
    fn transact(&self, req: MemRequest) -> Result<(MemRange, u64), MemError> {
        let inner = &self.inner;
        match &inner.primary {
            Some(pr) => {
                if inner.ch.on_channel_thread() && self.prune_participants() != 0 {
                    return Err(MemError::Channel(
                        "growing or shrinking memory from a channel thread would wait for \
                         replies only that thread can receive"
                            .into(),
                    ));
                }
                let id = self.new_id();
                self.drive(|c| {
                    c.submit(Origin::Local(id.0), id, req, now());
                });
                let deadline = std::time::Instant::now() + inner.timeouts.requester();
                let mut g = pr.results.lock();
                loop {
                    if let Some(r) = g.remove(&id.0) {
                        return r.map(|r| (r, 0)).map_err(MemError::Txn);
                    }
                    if pr.done.wait_until(&mut g, deadline).timed_out() {
                        return Err(MemError::NoAnswer);
                    }
                }
            }
            None => {
                let _one_at_a_time = inner.requests.lock();
                let (mut rq, m) = Requester::new(self.new_id(), req, now(), &inner.timeouts);
                let message: Message<C::Fds> = msg(ACTION_REQUEST, &m);
                let r = inner
                    .ch
                    .request_peers(&[inner.ch.primary()], &message, inner.timeouts.requester())
                    .map_err(|e| MemError::Channel(e.to_string()))?;
                let nb_sent = r.nb_sent;
                let mut outcome = None;
                for (_, reply) in r.replies {
                    if let Ok(Some(o)) = rq.on_payload(reply.param()) {
                        outcome = Some(o);
                    }
                }
                let outcome = outcome
                    .or_else(|| {
                        if nb_sent == 0 {
                            rq.on_send_failed()
                        } else {
                            rq.on_timeout(Instant::NEVER)
                        }
                    })
                    .unwrap_or(Outcome::TimedOut);
                match outcome {
                    Outcome::Done {
                        status: TxnStatus::Ok,
                        range,
                        seq,
                    } => Ok((range, seq)),
                    Outcome::Done { status, .. } => Err(MemError::Txn(status)),
                    Outcome::TimedOut | Outcome::Unreachable => Err(MemError::NoAnswer),
                }
            }
        }
    }

    /// Allocates pages for at least `bytes` bytes (through the primary: it maps them, every
    /// attached secondary maps them, then they are returned). They are mapped here on return.
    ///
    /// The pages are for heap `spec.heap`: where the primary runs the heap layer (it installed
    /// [`HeapHooks`]), they join that heap before this returns, which is how the heap grows.
    /// Pages for the caller's own use are then to be taken from the heap, not from here.
    ///
    /// With [`AllocSpec::requester_maps`] (a secondary), this process maps them itself from
    /// the primary's answer instead of being asked to sync: if it cannot, the pages are still
    /// allocated, and [`MemError::MapFailed`] names them for the caller to give back.
    pub fn alloc(&self, spec: &AllocSpec) -> Result<MemRange, MemError> {
        let maps_itself = spec.requester_maps && !self.is_primary();
        let flags = AllocFlags::default()
            .with(AllocFlags::IOVA_CONTIG, spec.iova_contig)
            .with(AllocFlags::REQUESTER_MAPS, maps_itself);
        let req = AllocRequest {
            heap: spec.heap,
            node: spec.node,
            page_size: spec.page_size,
            bytes: spec.bytes,
            align: spec.align,
            flags,
        };
        if req.bytes == 0 || (req.align != 0 && !req.align.is_power_of_two()) {
            return Err(MemError::Invalid(format!(
                "{} bytes aligned to {}",
                req.bytes, req.align
            )));
        }
        let (range, seq) = self.transact(MemRequest::Alloc(req))?;
        if maps_itself && self.inner.map.sync_change(&range, seq).is_err() {
            return Err(MemError::MapFailed {
                start: range.addr,
                len: range.len,
            });
        }
        Ok(range)
    }

    fn alloc_pinned(&self, node: u32, bytes: u64) -> Result<(), MemError> {
        let req = AllocRequest {
            heap: node,
            node: Some(node),
            page_size: 0,
            bytes,
            align: 0,
            flags: AllocFlags::default(),
        };
        // Under the coordinator's lock, like every change of the map: a transaction's sync then
        // names the version its own change produced.
        let _txn = self.inner.primary.as_ref().map(|pr| pr.coord.lock());
        self.inner.map.allocate(&req, true).map(drop)
    }

    /// Frees whole pages `range` (allocated by any process).
    pub fn free(&self, range: MemRange, heap: u32) -> Result<(), MemError> {
        self.inner.map.check_freeable(&range)?;
        self.transact(MemRequest::Free(FreeRequest { heap, range }))
            .map(|_| ())
    }

    /// Brings this process's mappings in line with the shared map now.
    pub fn sync(&self) -> Result<(), MemError> {
        self.inner.map.sync().map_err(|r| MemError::SyncFailed {
            start: r.addr,
            len: r.len,
        })
    }

    /// Registers a memory event callback.
    pub fn on_event(
        &self,
        name: &str,
        f: impl Fn(MemEvent, u64, u64) + Send + Sync + 'static,
    ) -> Result<(), MemError> {
        let f: EventFn = Arc::new(f);
        self.inner
            .map
            .events()
            .register(name, f)
            .map_err(MemError::Invalid)
    }

    /// Unregisters a memory event callback; false if unknown.
    pub fn off_event(&self, name: &str) -> bool {
        self.inner.map.events().unregister(name)
    }

    /// The IOVA of `va`.
    pub fn virt2iova(&self, va: u64) -> Option<u64> {
        self.inner.map.virt2iova(va)
    }

    /// The IOVA mode.
    pub fn iova_mode(&self) -> IovaMode {
        self.inner.map.iova_mode()
    }

    /// The most threads that fault a growth's new pages in at once, this process's setting
    /// (see [`MemOptions::populate_threads`]; the primary's is the one that applies).
    pub fn populate_threads(&self) -> usize {
        self.inner.map.populate_threads()
    }

    /// The memseg lists.
    pub fn lists(&self) -> Vec<ListInfo> {
        self.inner.map.lists()
    }

    /// Bytes allocated now.
    pub fn total_used(&self) -> u64 {
        self.inner.map.total_used()
    }

    /// The shared address range.
    pub fn va_range(&self) -> MemRange {
        let r = self.inner.map.reservation();
        MemRange {
            addr: r.base(),
            len: r.len(),
        }
    }

    /// Whether `va` is mapped in this process now.
    pub fn is_mapped_here(&self, va: u64) -> bool {
        self.inner.map.is_mapped_here(va)
    }

    /// Whether every page of `range` was allocated up front (`--socket-mem`).
    pub fn is_pinned(&self, range: &MemRange) -> bool {
        self.inner.map.is_pinned(range)
    }

    /// The memory allocated up front (`--socket-mem`), as (NUMA node, range) in address order,
    /// one contiguous range per run of pages: what the primary's heaps start with.
    pub fn pinned_ranges(&self) -> Vec<(u32, MemRange)> {
        let cfg = self.inner.map.config();
        self.inner
            .map
            .pinned_ranges()
            .into_iter()
            .map(|(li, r)| (cfg.list(li).node, r))
            .collect()
    }

    /// The backing in use, as a word (`memfd`, `file-per-page`, `single-file`, `no-huge`).
    pub fn backing_name(&self) -> &'static str {
        match self.inner.map.config().header().backing {
            backing_code::MEMFD => "memfd",
            backing_code::FILE_PER_PAGE => "file-per-page",
            backing_code::SINGLE_FILE => "single-file",
            _ => "no-huge",
        }
    }

    /// The primary's pid, as recorded in the shared configuration.
    pub fn primary_pid(&self) -> u32 {
        self.inner.map.config().header().primary_pid
    }

    /// The NUMA node of the list holding `va`.
    pub fn node_at(&self, va: u64) -> Option<u32> {
        self.inner
            .map
            .locate(va)
            .map(|(li, _)| self.inner.map.config().list(li).node)
    }

    /// The NUMA nodes that have memory lists.
    pub fn nodes(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.lists().iter().map(|l| l.node).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The page size of the list holding `va`.
    pub fn page_size_at(&self, va: u64) -> Option<u64> {
        self.inner
            .map
            .locate(va)
            .map(|(li, _)| self.inner.map.config().list(li).page_size)
    }

    /// Installs a DMA mapper (primary): existing pages are mapped now, new ones as they come.
    pub fn set_dma_mapper(&self, m: Option<Arc<dyn DmaMapper>>) -> Result<(), MemError> {
        if self.inner.primary.is_none() {
            return Err(MemError::Invalid(
                "only the primary maps DMA; secondaries share its container".into(),
            ));
        }
        self.inner.map.set_dma_mapper(m)
    }

    /// Serves the VFIO container to secondaries (primary): a secondary's
    /// [`Memory::vfio_container`] receives a duplicate of `container` over the channel, so DMA
    /// mappings made through the shared container are visible to every process.
    pub fn serve_vfio_container(&self, container: OwnedFd) -> Result<(), MemError> {
        let Some(pr) = &self.inner.primary else {
            return Err(MemError::Invalid(
                "only the primary serves the VFIO container".into(),
            ));
        };
        *pr.vfio.lock() = Some(Arc::new(container));
        Ok(())
    }

    /// Obtains the VFIO container fd from the primary (secondary).
    pub fn vfio_container(&self) -> Result<OwnedFd, MemError> {
        use crate::vfio::{
            ACTION_VFIO, VfioRequest, VfioResult, check_reply_fds, decode_reply, encode_request,
        };
        let ch = &self.inner.ch;
        let m: Message<C::Fds> =
            Message::new(ACTION_VFIO, &encode_request(VfioRequest::ContainerFd))
                .map_err(|e| MemError::Invalid(e.to_string()))?
                .with_fds(C::Fds::empty())
                .map_err(|e| MemError::Invalid(e.to_string()))?;
        let r = ch
            .request_peers(&[ch.primary()], &m, Duration::from_secs(5))
            .map_err(|e| MemError::Channel(e.to_string()))?;
        let Some((_, reply)) = r.replies.into_iter().next() else {
            return Err(MemError::NoAnswer);
        };
        let rep = decode_reply(reply.param()).map_err(|e| MemError::Dma(e.to_string()))?;
        check_reply_fds(&rep, reply.num_fds()).map_err(|e| MemError::Dma(e.to_string()))?;
        if rep.result != VfioResult::Ok {
            return Err(MemError::Dma(format!(
                "the primary has no container ({:?})",
                rep.result
            )));
        }
        let fds: Vec<OwnedFd> = reply.into_parts().2.into();
        fds.into_iter().next().ok_or(MemError::NoAnswer)
    }

    /// Installs the heap's hooks (primary).
    pub fn set_heap_hooks(&self, h: Arc<dyn HeapHooks>) {
        if let Some(pr) = &self.inner.primary {
            *pr.hooks.lock() = Some(h);
        }
    }

    /// Makes this process's next `n` syncs fail (fault injection, for tests of the rollback
    /// path).
    pub fn fail_next_syncs(&self, n: u32) {
        self.inner.map.fail_next_syncs(n);
    }

    /// Processes attached to the memory now (primary); those whose process is gone are dropped
    /// first.
    pub fn participants_count(&self) -> usize {
        self.prune_participants()
    }

    /// The runtime directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The channel.
    pub fn channel(&self) -> &Arc<C> {
        &self.inner.ch
    }

    /// Whether this is the primary's memory.
    pub fn is_primary(&self) -> bool {
        self.inner.primary.is_some()
    }
}

/// What to allocate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocSpec {
    /// Bytes needed (rounded up to whole pages).
    pub bytes: u64,
    /// Page size (0: any).
    pub page_size: u64,
    /// NUMA node (`None`: any).
    pub node: Option<u32>,
    /// Alignment of the range (0: the page size).
    pub align: u64,
    /// Contiguous in IOVA space.
    pub iova_contig: bool,
    /// Heap the pages are for.
    pub heap: u32,
    /// A secondary maps the new pages itself from the primary's answer, rather than being asked
    /// to sync along with every other secondary: one round trip fewer on its way (see
    /// [`AllocFlags::REQUESTER_MAPS`]). Where the primary publishes new pages to a heap, they
    /// join it as one block held for this process (see [`HeapHooks::publish`]), which the
    /// caller must release once it has them: the heap layer's growth does. Ignored in the
    /// primary.
    pub requester_maps: bool,
}

impl<C: Channel> Drop for Inner<C> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(pr) = &self.primary {
            pr.timer.state.lock().stop = true;
            pr.timer.wake.notify_all();
        }
        if let Some(t) = self.timer_thread.lock().take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
        if self.primary.is_some() {
            // Pages go back to the kernel with the memfds / files and the mappings.
            self.map.store().remove_files();
            self.map.config().remove();
        } else {
            self.map.unmap_all();
        }
    }
}
