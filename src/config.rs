//! `Config`: one process's options, with DPDK's EAL names, and [`init`], which turns them into a
//! running primary or secondary (channel and shared memory).
//!
//! ```no_run
//! let p = memplane::Config::new()
//!     .file_prefix("app")
//!     .no_huge()
//!     .memory_mb(256)
//!     .init()?;
//! # Ok::<(), memplane::InitError>(())
//! ```

use std::fmt;
use std::path::PathBuf;

use memplane_core::txn::Timeouts;
use memplane_heap::Heap;
use memplane_hugepage::{Backing, IovaChoice, MemError, MemOptions, MemSetup, Memory};
use memplane_unix::{Abi, Channel, ChannelConfig, MpChannel, ProcType, Role};

/// A process's options. Every setter is named after the EAL option it mirrors.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// The channel's options (`--file-prefix`, `--runtime-dir`, `--proc-type`, ABI).
    pub channel: ChannelConfig,
    /// The memory options (`-m`, `--socket-mem`, `--no-huge`...).
    pub memory: MemOptions,
    /// Attach shared memory (default). Off: IPC only.
    pub no_memory: bool,
}

impl Config {
    /// The defaults: `--file-prefix rte`, `--proc-type auto`, memory on, hugepages when free.
    pub fn new() -> Self {
        Self::default()
    }
    /// `--file-prefix`.
    pub fn file_prefix(mut self, p: impl Into<String>) -> Self {
        self.channel = self.channel.file_prefix(p);
        self
    }
    /// `--runtime-dir` (memplane's; DPDK derives it).
    pub fn runtime_dir(mut self, d: impl Into<PathBuf>) -> Self {
        self.channel = self.channel.runtime_dir(d);
        self
    }
    /// `--proc-type`.
    pub fn proc_type(mut self, t: ProcType) -> Self {
        self.channel = self.channel.proc_type(t);
        self
    }
    /// The wire ABI (`22.11`, `24.11`, `25.11`).
    pub fn abi(mut self, a: Abi) -> Self {
        self.channel = self.channel.abi(a);
        self
    }
    /// `-m`: total memory in MiB.
    pub fn memory_mb(mut self, mb: u64) -> Self {
        self.memory.total_mb = Some(mb);
        self
    }
    /// `--socket-mem`: MiB to allocate up front per node.
    pub fn socket_mem(mut self, per_node_mb: Vec<u64>) -> Self {
        self.memory.socket_mem = per_node_mb;
        self
    }
    /// `--socket-limit`: MiB per node at most.
    pub fn socket_limit(mut self, per_node_mb: Vec<u64>) -> Self {
        self.memory.socket_limit = per_node_mb;
        self
    }
    /// `--populate-threads`: the most threads that fault a growth's new pages in at once
    /// (1: the growing thread alone; default 4, never more than the CPUs it may run on).
    pub fn populate_threads(mut self, n: usize) -> Self {
        self.memory = self.memory.populate_threads(n);
        self
    }
    /// `--base-virtaddr`.
    pub fn base_virtaddr(mut self, va: u64) -> Self {
        self.memory.base_virtaddr = Some(va);
        self
    }
    /// `--no-huge`.
    pub fn no_huge(mut self) -> Self {
        self.memory.backing = Backing::NoHuge;
        self
    }
    /// `--in-memory`: hugepage memfds, nothing on disk. With `--huge-dir` or
    /// `--single-file-segments` too (in either order), as in DPDK, nothing goes on disk still:
    /// the directory's hugetlbfs gives the page size (checked when the primary starts).
    pub fn in_memory(mut self) -> Self {
        if let Backing::FilePerPage(Some(d)) | Backing::SingleFile(Some(d)) = &self.memory.backing {
            self.memory.size_from = Some(d.clone());
        }
        self.memory.backing = Backing::Memfd;
        self
    }
    /// `--single-file-segments` (in `--huge-dir`, default `/dev/hugepages`). With
    /// `--in-memory` it changes nothing: its memfds are one per list already.
    pub fn single_file_segments(mut self) -> Self {
        if matches!(self.memory.backing, Backing::Memfd) {
            return self;
        }
        let dir = match &self.memory.backing {
            Backing::FilePerPage(d) | Backing::SingleFile(d) => d.clone(),
            _ => None,
        };
        self.memory.backing = Backing::SingleFile(dir);
        self
    }
    /// `--huge-dir`: hugetlbfs files (one per page unless `--single-file-segments`).
    pub fn huge_dir(mut self, d: impl Into<PathBuf>) -> Self {
        if matches!(self.memory.backing, Backing::Memfd) {
            // `--in-memory` stays: see `in_memory`.
            self.memory.size_from = Some(d.into());
            return self;
        }
        self.memory.backing = match self.memory.backing {
            Backing::SingleFile(_) => Backing::SingleFile(Some(d.into())),
            _ => Backing::FilePerPage(Some(d.into())),
        };
        self
    }
    /// `--iova-mode`.
    pub fn iova_mode(mut self, i: IovaChoice) -> Self {
        self.memory.iova = i;
        self
    }
    /// IPC only: no shared memory.
    pub fn without_memory(mut self) -> Self {
        self.no_memory = true;
        self
    }
    /// Starts the process: see [`init`].
    pub fn init(self) -> Result<Process, InitError> {
        init(self)
    }
}

/// Why a process could not start.
#[derive(Debug)]
pub enum InitError {
    /// The channel could not open.
    Channel(memplane_unix::Error),
    /// The memory could not be set up or attached.
    Memory(MemError),
    /// A secondary with memory, under a DPDK primary: DPDK's memory is laid out its own way.
    DpdkPrimary {
        /// The runtime directory.
        dir: PathBuf,
    },
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::Channel(e) => write!(f, "{e}"),
            InitError::Memory(e) => write!(f, "{e}"),
            InitError::DpdkPrimary { dir } => write!(
                f,
                "the primary of {} is a DPDK process: memplane talks to it over the channel \
                 (`memplane mp ...`, or a process without memory: `--no-memory`, \
                 `Config::without_memory`), but cannot attach to DPDK's memory",
                dir.display()
            ),
        }
    }
}

impl std::error::Error for InitError {}

/// A running memplane process: its channel and, unless disabled, its shared memory and heap.
pub struct Process {
    /// The shared heap (dropped first).
    pub heap: Option<Heap<MpChannel>>,
    /// The shared memory.
    pub memory: Option<Memory<MpChannel>>,
    /// The channel.
    pub channel: Channel,
    /// What the primary chose at setup (primary only).
    pub setup: Option<MemSetup>,
}

impl Process {
    /// Primary or secondary.
    pub fn role(&self) -> Role {
        self.channel.role()
    }

    /// The shared memory (panics if the process was started without memory).
    pub fn mem(&self) -> &Memory<MpChannel> {
        self.try_mem()
            .expect("process started with Config::without_memory")
    }

    /// The shared heap (panics if the process was started without memory).
    pub fn heap(&self) -> &Heap<MpChannel> {
        self.try_heap()
            .expect("process started with Config::without_memory")
    }

    /// The shared memory, `None` if the process was started without memory.
    pub fn try_mem(&self) -> Option<&Memory<MpChannel>> {
        self.memory.as_ref()
    }

    /// The shared heap, `None` if the process was started without memory.
    pub fn try_heap(&self) -> Option<&Heap<MpChannel>> {
        self.heap.as_ref()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let (Some(h), Role::Primary) = (&self.heap, self.channel.role()) {
            h.remove_file();
        }
    }
}

/// Starts a process from `cfg`: opens the channel (resolving the role), then sets up the shared
/// memory (primary) or attaches to it (secondary). The channel stays "not ready" until the
/// memory actions are registered, so early requests are answered with "ignore", as DPDK does;
/// with `ChannelConfig::ready(false)` it stays so until the caller, having registered its own
/// actions, calls `MpChannel::set_ready`.
pub fn init(cfg: Config) -> Result<Process, InitError> {
    let dir = cfg.channel.dir();
    let ch = Channel::open(cfg.channel.clone().ready(false)).map_err(InitError::Channel)?;
    let timeouts = Timeouts::default();
    let (memory, heap, setup) = if cfg.no_memory {
        (None, None, None)
    } else {
        match ch.role() {
            Role::Primary => {
                let (m, s) = Memory::primary(
                    ch.shared(),
                    &dir,
                    &cfg.channel.file_prefix,
                    &cfg.memory,
                    timeouts,
                )
                .map_err(InitError::Memory)?;
                let h = Heap::primary(m.clone()).map_err(InitError::Memory)?;
                (Some(m), Some(h), Some(s))
            }
            Role::Secondary => {
                if memplane_unix::rundir::live_primary(&dir).is_some_and(|i| i.dpdk) {
                    return Err(InitError::DpdkPrimary { dir });
                }
                let m =
                    Memory::secondary(ch.shared(), &dir, timeouts).map_err(InitError::Memory)?;
                let h = Heap::secondary(m.clone()).map_err(InitError::Memory)?;
                (Some(m), Some(h), None)
            }
        }
    };
    if cfg.channel.ready {
        ch.set_ready();
    }
    Ok(Process {
        heap,
        memory,
        channel: ch,
        setup,
    })
}
