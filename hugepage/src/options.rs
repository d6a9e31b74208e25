//! Memory options, with DPDK's EAL names: `-m`, `--socket-mem`, `--socket-limit`,
//! `--base-virtaddr`, `--no-huge`, `--in-memory`, `--single-file-segments`, `--huge-dir`,
//! `--iova-mode`.

use std::path::PathBuf;
use std::str::FromStr;

use crate::MemError;

/// The largest size in MiB any memory option may name: 128 TiB, a process's address space on
/// x86-64.
pub const MAX_MIB: u64 = 1 << 27;

/// Where pages come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Hugepages when free ones exist, else no-huge (said once in the log).
    Auto,
    /// One memfd per memseg list with `MFD_HUGETLB`; secondaries get the fds over the channel
    /// (`--in-memory`; memplane's default when hugepages are free). Nothing is left on disk.
    Memfd,
    /// One hugetlbfs file per page in `--huge-dir` (DPDK's default).
    FilePerPage(Option<PathBuf>),
    /// One hugetlbfs file per memseg list (`--single-file-segments`).
    SingleFile(Option<PathBuf>),
    /// Ordinary shared memory (a plain memfd per list), in 2 MiB segments (`--no-huge`).
    NoHuge,
}

/// How device addresses are derived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IovaChoice {
    /// Physical addresses when `/proc/self/pagemap` gives them and pages are hugepages, else
    /// virtual addresses.
    #[default]
    Auto,
    /// IOVA = physical address (fails at init if unavailable).
    Pa,
    /// IOVA = virtual address.
    Va,
}

impl FromStr for IovaChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pa" => Ok(IovaChoice::Pa),
            "va" => Ok(IovaChoice::Va),
            "auto" => Ok(IovaChoice::Auto),
            _ => Err(format!(
                "invalid --iova-mode {s:?}: expected pa, va or auto"
            )),
        }
    }
}

/// The memory options of a primary (secondaries follow what the primary chose).
#[derive(Clone, Debug)]
pub struct MemOptions {
    /// `-m`: total memory limit in MiB (`None`: per-list VA size only).
    pub total_mb: Option<u64>,
    /// `--socket-mem`: MiB to allocate up front on each node (index = node).
    pub socket_mem: Vec<u64>,
    /// `--socket-limit`: per-node limit in MiB (0 = none).
    pub socket_limit: Vec<u64>,
    /// `--base-virtaddr`: where to start the address reservation.
    pub base_virtaddr: Option<u64>,
    /// The page backing.
    pub backing: Backing,
    /// `--iova-mode`.
    pub iova: IovaChoice,
    /// Address space reserved per memseg list (default 32 GiB; for no-huge 4 GiB), capped by
    /// the limits above.
    pub list_va: u64,
    /// Page size to use with hugepages (default: the system's default hugepage size).
    pub page_size: Option<u64>,
    /// With memfd backing, a hugetlbfs directory whose page size the memfds take
    /// (`--in-memory --huge-dir DIR`, as in DPDK); checked when the primary starts.
    pub size_from: Option<PathBuf>,
    /// `--populate-threads`: the most threads that fault a growth's new pages in at once, the
    /// growing thread included (1: it alone). `None`: `MEMPLANE_POPULATE_THREADS` from the
    /// environment, else 4. Never more than the CPUs the growing thread may run on.
    pub populate_threads: Option<usize>,
}

impl Default for MemOptions {
    fn default() -> Self {
        MemOptions {
            total_mb: None,
            socket_mem: Vec::new(),
            socket_limit: Vec::new(),
            base_virtaddr: None,
            backing: Backing::Auto,
            iova: IovaChoice::Auto,
            list_va: 32 << 30,
            page_size: None,
            size_from: None,
            populate_threads: None,
        }
    }
}

impl MemOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }
    /// `-m`.
    pub fn total_mb(mut self, mb: u64) -> Self {
        self.total_mb = Some(mb);
        self
    }
    /// `--no-huge`.
    pub fn no_huge(mut self) -> Self {
        self.backing = Backing::NoHuge;
        self
    }
    /// Sets the backing.
    pub fn backing(mut self, b: Backing) -> Self {
        self.backing = b;
        self
    }
    /// `--base-virtaddr`.
    pub fn base_virtaddr(mut self, va: u64) -> Self {
        self.base_virtaddr = Some(va);
        self
    }
    /// `--iova-mode`.
    pub fn iova(mut self, i: IovaChoice) -> Self {
        self.iova = i;
        self
    }
    /// `--socket-mem`.
    pub fn socket_mem(mut self, per_node_mb: Vec<u64>) -> Self {
        self.socket_mem = per_node_mb;
        self
    }
    /// `--socket-limit`.
    pub fn socket_limit(mut self, per_node_mb: Vec<u64>) -> Self {
        self.socket_limit = per_node_mb;
        self
    }
    /// `--populate-threads`: see [`MemOptions::populate_threads`].
    pub fn populate_threads(mut self, n: usize) -> Self {
        self.populate_threads = Some(n.max(1));
        self
    }
    /// Address space per list.
    pub fn list_va(mut self, bytes: u64) -> Self {
        self.list_va = bytes;
        self
    }

    /// Checks that every size in MiB (`-m`, `--socket-mem`, `--socket-limit`) fits in a
    /// process's address space (128 TiB on x86-64): the byte counts made of them cannot
    /// overflow then.
    pub fn check_sizes(&self) -> Result<(), MemError> {
        let sized = [("-m", self.total_mb.unwrap_or(0))]
            .into_iter()
            .chain(self.socket_mem.iter().map(|&mb| ("--socket-mem", mb)))
            .chain(self.socket_limit.iter().map(|&mb| ("--socket-limit", mb)));
        for (opt, mb) in sized {
            if mb > MAX_MIB {
                return Err(MemError::Invalid(format!(
                    "{opt} {mb} MiB is more than a process's address space ({MAX_MIB} MiB)"
                )));
            }
        }
        Ok(())
    }

    /// `node`'s `--socket-limit` in bytes, `None` for no limit.
    pub fn node_limit(&self, node: u32) -> Option<u64> {
        self.socket_limit
            .get(node as usize)
            .copied()
            .filter(|&mb| mb > 0)
            .map(|mb| mb << 20)
    }
}

/// Parses DPDK's comma-separated per-node MiB lists (`--socket-mem 512,512`).
pub fn parse_node_list(s: &str) -> Result<Vec<u64>, String> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<u64>()
                .map_err(|e| format!("bad per-node size {x:?} in {s:?}: {e}"))
        })
        .collect()
}

/// Parses an address like `0x100000000`.
pub fn parse_addr(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|e| format!("bad address {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        assert_eq!(parse_node_list("512, 256").unwrap(), vec![512, 256]);
        assert!(parse_node_list("x").is_err());
        assert_eq!(parse_addr("0x100000000").unwrap(), 1 << 32);
        assert_eq!(parse_addr("4096").unwrap(), 4096);
        assert_eq!("va".parse::<IovaChoice>().unwrap(), IovaChoice::Va);
        let o = MemOptions::new().socket_limit(vec![0, 128]);
        assert_eq!(o.node_limit(0), None);
        assert_eq!(o.node_limit(1), Some(128 << 20));
        assert_eq!(o.node_limit(7), None);
    }
}
