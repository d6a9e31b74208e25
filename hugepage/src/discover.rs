//! Hugepage discovery: the page sizes the kernel offers, how many pages of each are reserved,
//! free and in use (globally and per NUMA node), where hugetlbfs is mounted, and reserving more.
//!
//! This is what DPDK's `eal_hugepage_info_init` and `dpdk-hugepages.py` look at, read from:
//!
//! - `/sys/kernel/mm/hugepages/hugepages-<kB>kB/{nr,free,resv,surplus}_hugepages`;
//! - `/sys/devices/system/node/online` (or the `node<N>` directories) and
//!   `/sys/devices/system/node/node<N>/hugepages/hugepages-<kB>kB/{nr,free,surplus}_hugepages`;
//! - `/proc/mounts` (the `hugetlbfs` entries and their `pagesize=` option) and `/proc/meminfo`
//!   (`Hugepagesize:`, the default size of a mount without `pagesize=`).
//!
//! Discovery never fails and never panics: a missing or malformed file is skipped, its numbers
//! count as 0, and the problem is listed in [`HugepageInfo::issues`]. A machine without NUMA
//! sysfs is node 0; a kernel without hugetlbfs has no sizes (memplane then runs in no-huge mode).
//! [`discover`] reads the live system, [`discover_at`] a copy of the tree (for tests).
//!
//! [`reserve`] writes `nr_hugepages` (root only) and reads back what the kernel actually did;
//! [`mount_hugetlbfs`] mounts a hugetlbfs. Both report failures as [`DiscoverError`]s whose
//! messages say what to do.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Node ids at or above this in a node list make the list malformed (Linux allows at most 1024
/// nodes; this only bounds what a garbage file can make us allocate).
const NODE_ID_LIMIT: u32 = 1 << 16;

/// The longest file content quoted in an error message.
const QUOTE_MAX: usize = 64;

/// The magic number of a hugetlbfs (`statfs.f_type`).
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

/// A page size in bytes (never 0).
///
/// Parsed from `"2M"`, `"2048k"`, `"2048 kB"`, `"1G"`, `"2097152"` (bytes) or a sysfs directory
/// name such as `"hugepages-2048kB"`; units are K, M, G (also `KB`, `KiB`, any case, each meaning
/// a power of 1024). Displayed in the largest unit that divides it: `"4K"`, `"2M"`, `"1G"`, or in
/// plain bytes when it is not a multiple of 1 KiB; display and parse round-trip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageSize(u64);

impl PageSize {
    /// The system page size of x86-64 and most others: 4 KiB.
    pub const SIZE_4K: PageSize = PageSize(4 * KIB);
    /// The usual hugepage size: 2 MiB.
    pub const SIZE_2M: PageSize = PageSize(2 * MIB);
    /// The gigantic hugepage size of x86-64: 1 GiB.
    pub const SIZE_1G: PageSize = PageSize(GIB);

    /// A page size of `bytes` bytes; `None` for 0.
    pub const fn new(bytes: u64) -> Option<PageSize> {
        if bytes == 0 {
            None
        } else {
            Some(PageSize(bytes))
        }
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// The size in KiB (rounded down), as sysfs names it.
    pub const fn kib(self) -> u64 {
        self.0 / KIB
    }

    /// The name of this size's sysfs directory: `hugepages-2048kB`.
    pub fn sysfs_name(self) -> String {
        format!("hugepages-{}kB", self.kib())
    }

    /// The size a sysfs directory name stands for (`hugepages-2048kB` is 2 MiB); `None` for any
    /// other name.
    pub fn from_sysfs_name(name: &str) -> Option<PageSize> {
        let kib = name.strip_prefix("hugepages-")?.strip_suffix("kB")?;
        if kib.is_empty() || !kib.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        PageSize::new(kib.parse::<u64>().ok()?.checked_mul(KIB)?)
    }

    /// Parses a page size (see the type's documentation for the forms accepted).
    pub fn parse(text: &str) -> Result<PageSize, DiscoverError> {
        let bad = |reason: &'static str| DiscoverError::BadPageSize {
            text: quote(text),
            reason,
        };
        let t = text.trim();
        let t = t.strip_prefix("hugepages-").unwrap_or(t);
        let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(end);
        if number.is_empty() {
            return Err(bad("it does not start with a number"));
        }
        let n: u64 = number.parse().map_err(|_| bad("the number is too large"))?;
        let multiplier = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => KIB,
            "m" | "mb" | "mib" => MIB,
            "g" | "gb" | "gib" => GIB,
            _ => return Err(bad("unknown unit (use K, M or G)")),
        };
        let bytes = n
            .checked_mul(multiplier)
            .ok_or_else(|| bad("the size is too large"))?;
        PageSize::new(bytes).ok_or_else(|| bad("a page size cannot be 0"))
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        let s = if b.is_multiple_of(GIB) {
            format!("{}G", b / GIB)
        } else if b.is_multiple_of(MIB) {
            format!("{}M", b / MIB)
        } else if b.is_multiple_of(KIB) {
            format!("{}K", b / KIB)
        } else {
            format!("{b}")
        };
        f.pad(&s)
    }
}

impl FromStr for PageSize {
    type Err = DiscoverError;

    fn from_str(s: &str) -> Result<PageSize, DiscoverError> {
        PageSize::parse(s)
    }
}

/// One hugetlbfs mount from `/proc/mounts`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HugetlbMount {
    /// Where it is mounted (octal escapes such as `\040` decoded).
    pub path: PathBuf,
    /// The size of its pages: the `pagesize=` option, else the default hugepage size.
    pub page_size: PageSize,
    /// Whether the page size came from a `pagesize=` option (not from the default size).
    pub explicit_size: bool,
    /// Permissions of its root directory (`mode=`, octal; the kernel's default is 0755).
    pub mode: u32,
    /// Owner of its root directory (`uid=`; default 0).
    pub uid: u32,
    /// Group of its root directory (`gid=`; default 0).
    pub gid: u32,
    /// Mounted read-only (`ro`): no page files can be created in it.
    pub read_only: bool,
    /// Most bytes its files may hold (`size=`), if limited.
    pub size_limit: Option<u64>,
}

/// The pages of one size on one NUMA node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeCount {
    /// The node.
    pub node: u32,
    /// Pages on this node (`nr_hugepages`, surplus pages included).
    pub total: u64,
    /// Pages not in use (`free_hugepages`).
    pub free: u64,
    /// Surplus pages (`surplus_hugepages`).
    pub surplus: u64,
}

/// The pages of one size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeInfo {
    /// The page size.
    pub size: PageSize,
    /// Pages the kernel holds (`nr_hugepages`, surplus pages included).
    pub total: u64,
    /// Pages not in use (`free_hugepages`); reserved pages count as free.
    pub free: u64,
    /// Pages promised to mappings but not yet faulted in (`resv_hugepages`).
    pub reserved: u64,
    /// Pages above the persistent pool, from overcommit (`surplus_hugepages`).
    pub surplus: u64,
    /// The same per NUMA node; empty when sysfs has no per-node data.
    pub per_node: Vec<NodeCount>,
}

impl SizeInfo {
    /// Free pages nobody has reserved yet: what a new allocation can really get.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }

    /// Bytes held by the kernel for this size.
    pub fn total_bytes(&self) -> u64 {
        self.total.saturating_mul(self.size.bytes())
    }
}

/// What [`discover`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HugepageInfo {
    /// Every page size the kernel offers, smallest first (also those with no pages).
    pub sizes: Vec<SizeInfo>,
    /// hugetlbfs mounts, in `/proc/mounts` order.
    pub mounts: Vec<HugetlbMount>,
    /// The default hugepage size (`Hugepagesize:` in `/proc/meminfo`).
    pub default_size: Option<PageSize>,
    /// The online NUMA nodes, ascending; `[0]` without NUMA sysfs.
    pub nodes: Vec<u32>,
    /// Files that were missing or malformed (their numbers count as 0), and other findings that
    /// leave the result incomplete. Empty on a healthy system.
    pub issues: Vec<DiscoverError>,
}

impl HugepageInfo {
    /// The information on one page size, if the kernel offers it.
    pub fn size(&self, size: PageSize) -> Option<&SizeInfo> {
        self.sizes.iter().find(|s| s.size == size)
    }

    /// Free pages of `size` (0 when the kernel does not offer it).
    pub fn free_pages(&self, size: PageSize) -> u64 {
        self.size(size).map_or(0, |s| s.free)
    }

    /// The mount to create `size` page files in: the first writable mount with that page size
    /// that no later mount on the same path hides.
    pub fn best_mount_for(&self, size: PageSize) -> Option<&HugetlbMount> {
        self.mounts.iter().enumerate().find_map(|(i, m)| {
            let hidden = self.mounts[i + 1..].iter().any(|l| l.path == m.path);
            (m.page_size == size && !m.read_only && !hidden).then_some(m)
        })
    }

    /// The sizes with free pages, smallest first.
    pub fn usable_sizes(&self) -> Vec<PageSize> {
        self.sizes
            .iter()
            .filter(|s| s.free > 0)
            .map(|s| s.size)
            .collect()
    }

    /// Whether any pages of any size are reserved; if not, memplane runs in no-huge mode.
    pub fn any_reserved(&self) -> bool {
        self.sizes.iter().any(|s| s.total > 0)
    }
}

/// A failure of discovery, reservation or mounting. Each message says what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DiscoverError {
    /// A page size that does not parse.
    BadPageSize {
        /// The text given (quoted, shortened).
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file or directory that could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
    /// A file whose content is not what the kernel writes there.
    Malformed {
        /// The file (or directory entry).
        path: PathBuf,
        /// What it holds (quoted, shortened).
        content: String,
        /// What was expected.
        expected: &'static str,
    },
    /// The kernel has no hugetlbfs (`/sys/kernel/mm/hugepages` does not exist).
    NoHugepageSupport {
        /// The directory that is missing.
        path: PathBuf,
    },
    /// A hugetlbfs mount without `pagesize=` while the default hugepage size is unknown.
    MountPageSizeUnknown {
        /// The mount point.
        path: PathBuf,
    },
    /// The kernel does not offer this page size (on this node).
    UnsupportedSize {
        /// The size asked for.
        size: PageSize,
        /// The node asked for, if any.
        node: Option<u32>,
        /// The sizes that are offered.
        offered: Vec<PageSize>,
    },
    /// No such NUMA node.
    NoSuchNode {
        /// The node asked for.
        node: u32,
        /// The nodes there are.
        nodes: Vec<u32>,
    },
    /// Not allowed: reserving hugepages and mounting need root.
    PermissionDenied {
        /// The file or mount point.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
    },
    /// Writing a sysfs file failed for another reason than permissions.
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
    /// More pages asked for than the machine has memory.
    TooLarge {
        /// The page size.
        size: PageSize,
        /// Pages asked for.
        count: u64,
        /// The machine's RAM in bytes.
        ram: u64,
    },
    /// The kernel holds fewer pages than asked for (memory too fragmented or too small). The
    /// pages it did get stay reserved.
    Fewer {
        /// The page size.
        size: PageSize,
        /// The node, if the reservation was for one.
        node: Option<u32>,
        /// Pages asked for.
        requested: u64,
        /// Pages the kernel holds now.
        got: u64,
    },
    /// Mounting a hugetlbfs failed.
    Mount {
        /// The mount point.
        path: PathBuf,
        /// What `mount` said.
        message: String,
    },
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".to_string();
    }
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn on_node(node: Option<u32>) -> String {
    node.map(|n| format!(" on node {n}")).unwrap_or_default()
}

impl fmt::Display for DiscoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiscoverError::BadPageSize { text, reason } => write!(
                f,
                "bad page size {text}: {reason}; write it like 2M, 1G, 2048k, 2097152 (bytes) \
                 or hugepages-2048kB"
            ),
            DiscoverError::Read { path, message } => write!(
                f,
                "cannot read {}: {message}; it was skipped (is sysfs mounted on /sys and procfs \
                 on /proc?)",
                path.display()
            ),
            DiscoverError::Malformed {
                path,
                content,
                expected,
            } => write!(
                f,
                "{} holds {content}, expected {expected}; it was skipped (its numbers count as \
                 0)",
                path.display()
            ),
            DiscoverError::NoHugepageSupport { path } => write!(
                f,
                "{} does not exist: this kernel has no hugepage support (CONFIG_HUGETLBFS); \
                 memplane runs without hugepages (no-huge mode)",
                path.display()
            ),
            DiscoverError::MountPageSizeUnknown { path } => write!(
                f,
                "the hugetlbfs on {} has no pagesize= option and the default hugepage size is \
                 unknown (no Hugepagesize: in /proc/meminfo); it was skipped; remount it with \
                 -o pagesize=2M",
                path.display()
            ),
            DiscoverError::UnsupportedSize {
                size,
                node,
                offered,
            } => write!(
                f,
                "the kernel offers no {size} hugepages{}; sizes offered: {}; pick one of those \
                 (1G pages may need hugepagesz=1G on the kernel command line)",
                on_node(*node),
                list(offered)
            ),
            DiscoverError::NoSuchNode { node, nodes } => write!(
                f,
                "NUMA node {node} does not exist; nodes: {}; pick one of those or leave the \
                 node out",
                list(nodes)
            ),
            DiscoverError::PermissionDenied { path, action } => write!(
                f,
                "permission denied {action} {}: this needs root; run it as root (e.g. with sudo)",
                path.display()
            ),
            DiscoverError::Write { path, message } => write!(
                f,
                "cannot write {}: {message}; if sysfs is read-only here (a container), reserve \
                 hugepages on the host",
                path.display()
            ),
            DiscoverError::TooLarge { size, count, ram } => write!(
                f,
                "refusing to reserve {count} pages of {size}: more than the machine's {} MiB of \
                 RAM; ask for fewer pages",
                ram / MIB
            ),
            DiscoverError::Fewer {
                size,
                node,
                requested,
                got,
            } => write!(
                f,
                "asked the kernel for {requested} pages of {size}{}, it holds {got}: not enough \
                 free contiguous memory; the {got} pages stay reserved; free memory \
                 (echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory) and \
                 retry, ask for fewer, or reserve at boot (hugepages=N on the kernel command \
                 line)",
                on_node(*node)
            ),
            DiscoverError::Mount { path, message } => write!(
                f,
                "cannot mount hugetlbfs on {}: {message}; by hand: mkdir -p {0} && mount -t \
                 hugetlbfs nodev {0}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for DiscoverError {}

/// Quotes (and shortens) text for an error message.
fn quote(text: &str) -> String {
    if text.chars().count() > QUOTE_MAX {
        let short: String = text.chars().take(QUOTE_MAX).collect();
        format!("{short:?}...")
    } else {
        format!("{text:?}")
    }
}

fn read_error(path: &Path, e: &io::Error) -> DiscoverError {
    DiscoverError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn read_text(path: &Path) -> Result<String, DiscoverError> {
    fs::read_to_string(path).map_err(|e| read_error(path, &e))
}

/// Reads a file holding one unsigned number, as sysfs counts are.
fn read_u64(path: &Path) -> Result<u64, DiscoverError> {
    let text = read_text(path)?;
    text.trim().parse().map_err(|_| DiscoverError::Malformed {
        path: path.to_path_buf(),
        content: quote(&text),
        expected: "one unsigned number",
    })
}

/// Reads a count; a problem is recorded and counts as 0.
fn read_count(path: &Path, issues: &mut Vec<DiscoverError>) -> u64 {
    read_u64(path).unwrap_or_else(|e| {
        issues.push(e);
        0
    })
}

/// Parses a NUMA node list as in `/sys/devices/system/node/online`: `"0"`, `"0-1,3"`. Returns
/// the nodes ascending, or `None` if the text is empty or malformed.
pub fn parse_node_list(text: &str) -> Option<Vec<u32>> {
    fn number(s: &str) -> Option<u32> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok().filter(|&n| n < NODE_ID_LIMIT)
    }
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let mut nodes = Vec::new();
    for part in text.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(part)?;
                (n, n)
            }
        };
        if first > last {
            return None;
        }
        nodes.extend(first..=last);
        if nodes.len() > NODE_ID_LIMIT as usize {
            return None;
        }
    }
    nodes.sort_unstable();
    nodes.dedup();
    Some(nodes)
}

/// Finds the default hugepage size (`Hugepagesize:       2048 kB`) in the text of
/// `/proc/meminfo`; `None` if the line is missing or malformed.
pub fn parse_default_size(meminfo: &str) -> Option<PageSize> {
    meminfo_default_size(meminfo).and_then(Result::ok)
}

/// The `Hugepagesize:` line's value: `None` if missing, `Some(Err(value))` if malformed.
fn meminfo_default_size(meminfo: &str) -> Option<Result<PageSize, String>> {
    let value = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Hugepagesize:"))?
        .trim();
    Some(PageSize::parse(value).map_err(|_| value.to_string()))
}

/// Decodes the octal escapes (`\040` for a space) of a `/proc/mounts` field.
fn unescape_mount_field(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (u32::from(b[i + 1] - b'0') << 6)
                | (u32::from(b[i + 2] - b'0') << 3)
                | u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Parses the text of `/proc/mounts` and returns its hugetlbfs mounts. A mount without a
/// `pagesize=` option gets `default_size` (the `Hugepagesize:` of `/proc/meminfo`, see
/// [`parse_default_size`]). Malformed lines and hugetlbfs entries whose page size cannot be
/// known are skipped and returned as issues.
pub fn parse_mounts(
    text: &str,
    default_size: Option<PageSize>,
) -> (Vec<HugetlbMount>, Vec<DiscoverError>) {
    parse_mounts_from(text, default_size, Path::new("/proc/mounts"))
}

fn parse_mounts_from(
    text: &str,
    default_size: Option<PageSize>,
    source: &Path,
) -> (Vec<HugetlbMount>, Vec<DiscoverError>) {
    let mut mounts = Vec::new();
    let mut issues = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let malformed = |expected| DiscoverError::Malformed {
            path: PathBuf::from(format!("{}:{}", source.display(), index + 1)),
            content: quote(line),
            expected,
        };
        let mut fields = line.split_ascii_whitespace();
        let (Some(_device), Some(path), Some(fstype), Some(options)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            if !line.trim().is_empty() {
                issues.push(malformed("a mount line: device path type options"));
            }
            continue;
        };
        if fstype != "hugetlbfs" {
            continue;
        }
        let path = unescape_mount_field(path);
        let mut mount = HugetlbMount {
            path,
            page_size: PageSize::SIZE_2M,
            explicit_size: false,
            mode: 0o755,
            uid: 0,
            gid: 0,
            read_only: false,
            size_limit: None,
        };
        let mut size = None;
        let mut bad_size = false;
        for option in options.split(',') {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            match key {
                "ro" => mount.read_only = true,
                "pagesize" => match PageSize::parse(value) {
                    Ok(s) => size = Some(s),
                    Err(_) => bad_size = true,
                },
                "mode" => match u32::from_str_radix(value, 8) {
                    Ok(m) => mount.mode = m,
                    Err(_) => issues.push(malformed("mode= in octal")),
                },
                "uid" => match value.parse() {
                    Ok(u) => mount.uid = u,
                    Err(_) => issues.push(malformed("a numeric uid=")),
                },
                "gid" => match value.parse() {
                    Ok(g) => mount.gid = g,
                    Err(_) => issues.push(malformed("a numeric gid=")),
                },
                "size" => match PageSize::parse(value) {
                    Ok(s) => mount.size_limit = Some(s.bytes()),
                    Err(_) => issues.push(malformed("size= in bytes")),
                },
                _ => {}
            }
        }
        if bad_size {
            issues.push(malformed("pagesize= with a size such as 2M"));
            continue;
        }
        match (size, default_size) {
            (Some(s), _) => {
                mount.page_size = s;
                mount.explicit_size = true;
            }
            (None, Some(d)) => mount.page_size = d,
            (None, None) => {
                issues.push(DiscoverError::MountPageSizeUnknown { path: mount.path });
                continue;
            }
        }
        mounts.push(mount);
    }
    (mounts, issues)
}

/// The online NUMA nodes under `node_dir` (`/sys/devices/system/node`).
fn read_nodes(node_dir: &Path, issues: &mut Vec<DiscoverError>) -> Vec<u32> {
    let online = node_dir.join("online");
    match fs::read_to_string(&online) {
        Ok(text) => match parse_node_list(&text) {
            Some(nodes) if !nodes.is_empty() => return nodes,
            _ => issues.push(DiscoverError::Malformed {
                path: online,
                content: quote(&text),
                expected: "a node list such as 0-1,3",
            }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => issues.push(read_error(&online, &e)),
    }
    let mut nodes: Vec<u32> = fs::read_dir(node_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let digits = name.to_str()?.strip_prefix("node")?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok().filter(|&n| n < NODE_ID_LIMIT)
        })
        .collect();
    if nodes.is_empty() {
        nodes.push(0);
    }
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

/// The sizes listed in a `hugepages` directory, smallest first (no issues recorded).
fn list_sizes(dir: &Path) -> Vec<PageSize> {
    let mut sizes: Vec<PageSize> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| PageSize::from_sysfs_name(e.file_name().to_str()?))
        .collect();
    sizes.sort_unstable();
    sizes
}

fn read_sizes(sys_root: &Path, nodes: &[u32], issues: &mut Vec<DiscoverError>) -> Vec<SizeInfo> {
    let dir = sys_root.join("kernel/mm/hugepages");
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            issues.push(DiscoverError::NoHugepageSupport { path: dir });
            return Vec::new();
        }
        Err(e) => {
            issues.push(read_error(&dir, &e));
            return Vec::new();
        }
    };
    let node_dir = sys_root.join("devices/system/node");
    let mut sizes = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                issues.push(read_error(&dir, &e));
                continue;
            }
        };
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("hugepages-") {
            continue;
        }
        let Some(size) = PageSize::from_sysfs_name(&name) else {
            issues.push(DiscoverError::Malformed {
                path: entry.path(),
                content: quote(&name),
                expected: "a directory named hugepages-<size>kB",
            });
            continue;
        };
        let path = entry.path();
        let mut info = SizeInfo {
            size,
            total: read_count(&path.join("nr_hugepages"), issues),
            free: read_count(&path.join("free_hugepages"), issues),
            reserved: read_count(&path.join("resv_hugepages"), issues),
            surplus: read_count(&path.join("surplus_hugepages"), issues),
            per_node: Vec::new(),
        };
        for &node in nodes {
            let p = node_dir
                .join(format!("node{node}"))
                .join("hugepages")
                .join(size.sysfs_name());
            if !p.is_dir() {
                continue;
            }
            info.per_node.push(NodeCount {
                node,
                total: read_count(&p.join("nr_hugepages"), issues),
                free: read_count(&p.join("free_hugepages"), issues),
                surplus: read_count(&p.join("surplus_hugepages"), issues),
            });
        }
        sizes.push(info);
    }
    sizes.sort_by_key(|s| s.size);
    sizes
}

/// Reads the live system: `/sys` and `/proc`.
pub fn discover() -> HugepageInfo {
    discover_at(Path::new("/sys"), Path::new("/proc"))
}

/// Reads a sysfs tree rooted at `sys_root` (in place of `/sys`) and a procfs at `proc_root` (in
/// place of `/proc`; only `mounts` and `meminfo` are read). Never fails: problems are listed in
/// [`HugepageInfo::issues`].
pub fn discover_at(sys_root: &Path, proc_root: &Path) -> HugepageInfo {
    let mut issues = Vec::new();
    let meminfo = proc_root.join("meminfo");
    let default_size = match read_text(&meminfo) {
        Ok(text) => match meminfo_default_size(&text) {
            None => None,
            Some(Ok(size)) => Some(size),
            Some(Err(value)) => {
                issues.push(DiscoverError::Malformed {
                    path: meminfo,
                    content: quote(&value),
                    expected: "Hugepagesize: <n> kB",
                });
                None
            }
        },
        Err(e) => {
            issues.push(e);
            None
        }
    };
    let nodes = read_nodes(&sys_root.join("devices/system/node"), &mut issues);
    let sizes = read_sizes(sys_root, &nodes, &mut issues);
    let mounts_file = proc_root.join("mounts");
    let mounts = match read_text(&mounts_file) {
        Ok(text) => {
            let (mounts, mut found) = parse_mounts_from(&text, default_size, &mounts_file);
            issues.append(&mut found);
            mounts
        }
        Err(e) => {
            issues.push(e);
            Vec::new()
        }
    };
    HugepageInfo {
        sizes,
        mounts,
        default_size,
        nodes,
        issues,
    }
}

/// The machine's RAM in bytes.
#[allow(clippy::useless_conversion)] // c_ulong is u64 only on 64-bit targets
fn ram_bytes() -> u64 {
    let info = rustix::system::sysinfo();
    u64::from(info.totalram).saturating_mul(u64::from(info.mem_unit.max(1)))
}

fn write_error(path: &Path, e: &io::Error, action: &'static str) -> DiscoverError {
    if e.kind() == io::ErrorKind::PermissionDenied {
        DiscoverError::PermissionDenied {
            path: path.to_path_buf(),
            action,
        }
    } else {
        DiscoverError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// Asks the kernel to hold `count` pages of `size` in total (globally, or on `node`) by writing
/// `nr_hugepages`, as `echo N > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages` does.
/// `count` is the new total, not an increment; a smaller count gives pages back (pages in use
/// stay, as surplus). Returns the total the kernel holds now (the node's, with a node).
///
/// Needs root. Errors: [`DiscoverError::PermissionDenied`] without it,
/// [`DiscoverError::UnsupportedSize`], [`DiscoverError::NoSuchNode`],
/// [`DiscoverError::TooLarge`] for more than the RAM, and [`DiscoverError::Fewer`] (with the
/// number it got) when the kernel could not find enough memory; the pages it got stay reserved.
pub fn reserve(size: PageSize, count: u64, node: Option<u32>) -> Result<u64, DiscoverError> {
    reserve_at(Path::new("/sys"), size, count, node)
}

/// [`reserve`] on a sysfs tree rooted at `sys_root` (in place of `/sys`).
pub fn reserve_at(
    sys_root: &Path,
    size: PageSize,
    count: u64,
    node: Option<u32>,
) -> Result<u64, DiscoverError> {
    let ram = ram_bytes();
    if count
        .checked_mul(size.bytes())
        .is_none_or(|bytes| ram > 0 && bytes > ram)
    {
        return Err(DiscoverError::TooLarge { size, count, ram });
    }
    let global = sys_root.join("kernel/mm/hugepages");
    if !global.is_dir() {
        return Err(DiscoverError::NoHugepageSupport { path: global });
    }
    let size_dir = global.join(size.sysfs_name());
    if !size.bytes().is_multiple_of(KIB) || !size_dir.is_dir() {
        return Err(DiscoverError::UnsupportedSize {
            size,
            node: None,
            offered: list_sizes(&global),
        });
    }
    let dir = match node {
        None => size_dir,
        Some(n) => {
            let node_root = sys_root.join("devices/system/node");
            let node_dir = node_root.join(format!("node{n}"));
            if !node_dir.is_dir() {
                return Err(DiscoverError::NoSuchNode {
                    node: n,
                    nodes: read_nodes(&node_root, &mut Vec::new()),
                });
            }
            let dir = node_dir.join("hugepages").join(size.sysfs_name());
            if !dir.is_dir() {
                return Err(DiscoverError::UnsupportedSize {
                    size,
                    node: Some(n),
                    offered: list_sizes(&node_dir.join("hugepages")),
                });
            }
            dir
        }
    };
    let file = dir.join("nr_hugepages");
    let action = "reserving hugepages: writing";
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&file)
        .map_err(|e| write_error(&file, &e, action))?;
    f.write_all(format!("{count}\n").as_bytes())
        .map_err(|e| write_error(&file, &e, action))?;
    drop(f);
    let got = read_u64(&file)?;
    if got < count {
        return Err(DiscoverError::Fewer {
            size,
            node,
            requested: count,
            got,
        });
    }
    Ok(got)
}

/// The page size of the hugetlbfs that holds `path` (its `statfs` block size), `None` when
/// `path` cannot be read or is on another file system.
pub fn hugetlbfs_page_size(path: &Path) -> Option<u64> {
    rustix::fs::statfs(path)
        .ok()
        .filter(|s| s.f_type as u64 == HUGETLBFS_MAGIC)
        .map(|s| s.f_bsize as u64)
}

/// Whether `path` is the root of a hugetlbfs mount.
pub fn is_hugetlbfs(path: &Path) -> bool {
    hugetlbfs_page_size(path).is_some()
}

/// Mounts a hugetlbfs with pages of `size` on `path` (created if missing), as
/// `mkdir -p PATH && mount -t hugetlbfs -o pagesize=SIZE nodev PATH` does (it runs `mount`).
/// Needs root.
pub fn mount_hugetlbfs(path: &Path, size: PageSize) -> Result<(), DiscoverError> {
    let action = "mounting hugetlbfs on";
    if !rustix::process::geteuid().is_root() {
        return Err(DiscoverError::PermissionDenied {
            path: path.to_path_buf(),
            action,
        });
    }
    let mount_error = |message: String| DiscoverError::Mount {
        path: path.to_path_buf(),
        message,
    };
    fs::create_dir_all(path)
        .map_err(|e| mount_error(format!("cannot create the directory: {e}")))?;
    let out = Command::new("mount")
        .args(["-t", "hugetlbfs", "-o"])
        .arg(format!("pagesize={size}"))
        .arg("nodev")
        .arg(path)
        .output()
        .map_err(|e| mount_error(format!("cannot run mount: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(mount_error(if said.is_empty() {
            format!("mount exited with {}", out.status)
        } else {
            said
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(
            unescape_mount_field(r"/mnt/huge\040pages"),
            PathBuf::from("/mnt/huge pages")
        );
        assert_eq!(unescape_mount_field(r"/a\0"), PathBuf::from(r"/a\0"));
        assert_eq!(unescape_mount_field(r"/a\777b"), PathBuf::from(r"/a\777b"));
        assert_eq!(unescape_mount_field(r"\134x"), PathBuf::from(r"\x"));
    }

    #[test]
    fn quotes_are_short() {
        let long = "x".repeat(1000);
        assert!(quote(&long).len() < 80);
        assert_eq!(quote("ab"), "\"ab\"");
    }
}
