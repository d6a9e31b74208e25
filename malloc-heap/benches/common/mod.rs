//! Helpers shared by the heap benchmarks: argument parsing, child processes driven by lines
//! (memplane secondaries, the DPDK C program), `bench=` result lines, medians, CPU pinning, and
//! the cleanup of DPDK's runtime files.
#![allow(dead_code)]

pub mod installed;
pub mod pairs;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

/// The command line: `--name value` options and `--flag` switches (cargo's `--bench` ignored).
pub struct Args(Vec<String>);

impl Args {
    /// This process's arguments.
    pub fn get() -> Args {
        Args(std::env::args().skip(1).collect())
    }

    /// Whether `--name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }

    /// The value after `--name`.
    pub fn value(&self, name: &str) -> Option<String> {
        let i = self.0.iter().position(|a| a == name)?;
        self.0.get(i + 1).cloned()
    }

    /// The value after `--name` as a number, or `default`.
    pub fn num(&self, name: &str, default: u64) -> u64 {
        self.value(name)
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name}: not a number: {v}"))
            })
            .unwrap_or(default)
    }
}

/// The median of `v` (sorted in place); NaN when empty.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q`-quantile of sorted `v` (nearest rank below).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// The mean of `v`.
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// A `bench=... key=value ...` line as a map.
pub fn parse_kv(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A number field of a parsed result line.
pub fn field(m: &BTreeMap<String, String>, k: &str) -> f64 {
    m.get(k)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("result line without a numeric {k}: {m:?}"))
}

/// Pins the calling thread to `cpu`, if it exists.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it; the call reads
    // it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The calling thread's CPU set.
pub fn cpu_affinity() -> libc::cpu_set_t {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, which the call fills for the calling
    // thread (pid 0) within the size given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        set
    }
}

/// Sets the calling thread's CPU set (one [`cpu_affinity`] returned).
pub fn set_cpu_affinity(set: &libc::cpu_set_t) {
    // SAFETY: the call reads the set, a valid cpu_set_t, for the calling thread (pid 0).
    unsafe {
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set);
    }
}

/// A child process driven by line commands on stdin, answering with lines on stdout; killed
/// and reaped on drop.
pub struct Proc {
    child: std::process::Child,
    stdin: Option<ChildStdin>,
    out: Receiver<String>,
    what: String,
}

impl Proc {
    /// Starts `cmd` with piped stdin and stdout (stderr inherited).
    pub fn start(mut cmd: Command, what: &str) -> Proc {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("child stdout");
        let (tx, out) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            stdin,
            out,
            what: what.to_owned(),
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line that starts with `prefix` (others are echoed to stderr), waiting at most
    /// `secs` seconds.
    pub fn expect(&mut self, prefix: &str, secs: u64) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.out.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(l) => eprintln!("  [{}] {l}", self.what),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{}: no `{prefix}` line within {secs} s", self.what)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait();
                    panic!("{}: exited ({st:?}) before a `{prefix}` line", self.what)
                }
            }
        }
    }

    /// Sends one line.
    pub fn send(&mut self, line: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = writeln!(s, "{line}");
            let _ = s.flush();
        }
    }

    /// Closes stdin and waits up to `secs` seconds for a clean exit, then kills.
    pub fn finish(mut self, secs: u64) {
        self.stdin.take();
        for _ in 0..secs * 100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stdin.take();
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        for _ in 0..300 {
            std::thread::sleep(Duration::from_millis(10));
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether memplane's channel threads run under `SCHED_BATCH` (`MPB_BATCH_SCHED=1`, as `memplane
/// mp bench --batch-sched`): off by default, as DPDK's control thread.
pub fn batch_sched() -> bool {
    std::env::var_os("MPB_BATCH_SCHED").is_some_and(|v| v == "1")
}

/// The DPDK C program (`interop/dpdk_malloc_bench.c`, built by `bench/heap.sh`), if given with
/// `--dpdk-bin` and present.
pub fn dpdk_bin(args: &Args) -> Option<PathBuf> {
    let p = PathBuf::from(args.value("--dpdk-bin")?);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "--dpdk-bin {}: no such file; DPDK rows skipped",
            p.display()
        );
        None
    }
}

/// A DPDK process of the C program: EAL arguments for `prefix`, then `--`, then `mode`.
pub fn dpdk_cmd(bin: &Path, prefix: &str, secondary: bool, mode: &[&str]) -> Command {
    // `-l 0-1` (two lcores, as the pairs need), or `$MPB_DPDK_LCORES`: a core list (`0` when
    // `bench/heap.sh` runs everything on CPU 0) or a whole EAL option (`--lcores=0@(0-1)`: one
    // lcore whose threads float over CPUs 0 and 1).
    let lcores = std::env::var("MPB_DPDK_LCORES").unwrap_or_else(|_| "0-1".into());
    dpdk_cmd_on(bin, prefix, secondary, &lcores, mode)
}

/// [`dpdk_cmd`] with the lcores given: a core list for `-l`, or a whole EAL option.
pub fn dpdk_cmd_on(
    bin: &Path,
    prefix: &str,
    secondary: bool,
    lcores: &str,
    mode: &[&str],
) -> Command {
    let mut c = Command::new(bin);
    if lcores.starts_with("--") {
        c.arg(lcores);
    } else {
        c.args(["-l", lcores]);
    }
    c.args(["--no-pci", "--log-level", "lib.eal:error"]);
    c.arg(format!("--file-prefix={prefix}"));
    if secondary {
        c.arg("--proc-type=secondary");
    }
    c.arg("--");
    c.args(mode);
    c
}

/// A DPDK `--file-prefix` for this process: `$MPB_DPDK_PREFIX` (set by `bench/heap.sh`, which
/// removes everything of that prefix at its exit) or `mpb`, then `tag` and the pid.
pub fn dpdk_prefix(tag: &str) -> DpdkPrefix {
    let base = std::env::var("MPB_DPDK_PREFIX").unwrap_or_else(|_| "mpb".into());
    DpdkPrefix(format!("{base}{tag}{}", std::process::id()))
}

/// A DPDK file prefix whose runtime directory and hugepage files are removed when it drops,
/// also when the benchmark panics (create it before the processes that use it).
pub struct DpdkPrefix(String);

impl std::ops::Deref for DpdkPrefix {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DpdkPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Drop for DpdkPrefix {
    fn drop(&mut self) {
        dpdk_cleanup(&self.0);
    }
}

/// Removes DPDK's runtime directory and hugepage files of `prefix`.
pub fn dpdk_cleanup(prefix: &str) {
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
    let want = format!("{prefix}map_");
    if let Ok(rd) = std::fs::read_dir("/dev/hugepages") {
        for e in rd.flatten() {
            if e.file_name().to_str().is_some_and(|n| n.starts_with(&want)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// A runtime directory for memplane under /tmp, removed on drop.
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// `<base>/<tag>-<pid>`, fresh; the base is `$MPB_RUNDIR_BASE` (set by `bench/heap.sh` to
    /// its temporary directory, removed at its exit) or `/tmp`.
    pub fn new(tag: &str) -> RunDir {
        let base = std::env::var("MPB_RUNDIR_BASE").unwrap_or_else(|_| "/tmp".into());
        let p = PathBuf::from(format!("{base}/{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        RunDir(p)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Free hugepages of the default size (2 MiB here), from /proc/meminfo.
pub fn free_hugepages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("HugePages_Free:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A memplane primary (channel, memory, optionally the heap), as `memplane::init` makes it.
pub struct MpPrimary {
    /// The heap (dropped first), if asked for.
    pub heap: Option<memplane_heap::Heap<memplane_unix::MpChannel>>,
    /// The memory.
    pub mem: memplane_hugepage::Memory<memplane_unix::MpChannel>,
    /// What the memory setup chose.
    pub setup: memplane_hugepage::MemSetup,
    /// The channel (dropped last).
    pub ch: memplane_unix::Channel,
}

impl MpPrimary {
    /// Starts a primary in `dir`: hugepage memfds when hugepages are free (memplane's default),
    /// or no-huge shared memory.
    pub fn start(dir: &Path, no_huge: bool, with_heap: bool) -> MpPrimary {
        let mut opts = memplane_hugepage::MemOptions::new();
        if no_huge {
            opts = opts.no_huge();
        }
        MpPrimary::start_with(dir, &opts, with_heap)
    }

    /// Starts a primary in `dir` with memory options `opts`.
    pub fn start_with(
        dir: &Path,
        opts: &memplane_hugepage::MemOptions,
        with_heap: bool,
    ) -> MpPrimary {
        use memplane_unix::{Channel, ChannelConfig, ProcType};
        let ch = Channel::open(
            ChannelConfig::new()
                .runtime_dir(dir)
                .proc_type(ProcType::Primary)
                .batch_scheduling(batch_sched()),
        )
        .expect("open the primary's channel");
        let (mem, setup) = memplane_hugepage::Memory::primary(
            ch.shared(),
            dir,
            "mpbench",
            opts,
            memplane_core::txn::Timeouts::default(),
        )
        .expect("set up the primary's memory");
        let heap =
            with_heap.then(|| memplane_heap::Heap::primary(mem.clone()).expect("create the heap"));
        MpPrimary {
            heap,
            mem,
            setup,
            ch,
        }
    }

    /// The heap (panics if started without it).
    pub fn heap(&self) -> &memplane_heap::Heap<memplane_unix::MpChannel> {
        self.heap.as_ref().expect("primary started without a heap")
    }
}

impl Drop for MpPrimary {
    fn drop(&mut self) {
        if let Some(h) = self.heap.take() {
            h.remove_file();
        }
    }
}

/// A memplane secondary attached to the primary in `dir` (memory, and the heap if asked).
pub struct MpSecondary {
    /// The heap, if asked for.
    pub heap: Option<memplane_heap::Heap<memplane_unix::MpChannel>>,
    /// The memory.
    pub mem: memplane_hugepage::Memory<memplane_unix::MpChannel>,
    /// The channel (dropped last).
    pub ch: memplane_unix::Channel,
}

impl MpSecondary {
    /// Attaches to the primary in `dir`.
    pub fn attach(dir: &Path, with_heap: bool) -> MpSecondary {
        use memplane_unix::{Channel, ChannelConfig, ProcType};
        let ch = Channel::open(
            ChannelConfig::new()
                .runtime_dir(dir)
                .proc_type(ProcType::Secondary)
                .batch_scheduling(batch_sched()),
        )
        .expect("open the secondary's channel");
        let mem = memplane_hugepage::Memory::secondary(
            ch.shared(),
            dir,
            memplane_core::txn::Timeouts::default(),
        )
        .expect("attach the secondary's memory");
        let heap = with_heap
            .then(|| memplane_heap::Heap::secondary(mem.clone()).expect("attach the heap"));
        MpSecondary { heap, mem, ch }
    }
}

/// The placement label for tables: `--placement NAME`, or `float`.
pub fn placement(args: &Args) -> String {
    args.value("--placement").unwrap_or_else(|| "float".into())
}
