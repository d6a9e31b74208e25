//! The `memplane` command line: DPDK EAL option names, one subcommand per job.
//!
//! - `memplane primary`: run a primary that answers `memplane_ping` until SIGINT/SIGTERM;
//! - `memplane mp listen|send|request|ping|peers`: poke a running DPDK or memplane channel;
//! - `memplane mp bench ...`: IPC benchmarks comparable with DPDK's (`bench/ipc.sh`).

pub mod bench;
pub mod demo;
pub mod hugepages;
pub mod info;
pub mod mp;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use memplane_unix::{Abi, ChannelConfig, ProcType};

/// The built-in action a `memplane primary` answers: it replies with the request's parameter.
pub const PING_ACTION: &str = "memplane_ping";

/// memplane: DPDK-style multi-process IPC for Rust dataplanes.
#[derive(Parser, Debug)]
#[command(name = "memplane", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a primary (channel and shared memory) that answers `memplane_ping` until SIGINT or
    /// SIGTERM.
    Primary(PrimaryArgs),
    /// Talk to a running channel (DPDK's or memplane's).
    #[command(subcommand)]
    Mp(mp::MpCommand),
    /// The main job: a primary and secondary processes at work, no hugepages needed.
    Demo(demo::DemoArgs),
    /// Attach as a secondary and print memory lists, heaps, memzones and peers.
    Info(info::InfoArgs),
    /// Hugepages: sizes, counts per NUMA node, mounts; reserve and mount (root).
    Hugepages(hugepages::HugepagesArgs),
}

/// `memplane primary`.
#[derive(Args, Debug, Clone)]
pub struct PrimaryArgs {
    /// Channel options.
    #[command(flatten)]
    pub channel: ChannelOpts,
    /// Memory options.
    #[command(flatten)]
    pub mem: MemOpts,
}

/// Options that pick the channel, with DPDK's EAL names.
#[derive(Args, Debug, Clone)]
pub struct ChannelOpts {
    /// Prefix naming the deployment (its runtime directory).
    #[arg(long = "file-prefix", default_value = "rte")]
    pub file_prefix: String,
    /// Runtime directory (default: DPDK's rules, e.g. /var/run/dpdk/<prefix> for root).
    #[arg(long = "runtime-dir")]
    pub runtime_dir: Option<PathBuf>,
    /// Wire ABI: 22.11, 24.11 or 25.11.
    #[arg(long, default_value = "25.11", value_parser = parse_abi)]
    pub abi: Abi,
    /// primary, secondary or auto.
    #[arg(long = "proc-type", default_value = "auto")]
    pub proc_type: ProcType,
    /// Run the channel's threads under SCHED_BATCH (more throughput when processes share a
    /// CPU, slower wake-ups when the CPU is busy).
    #[arg(long = "batch-sched")]
    pub batch_sched: bool,
    /// Longest time, in microseconds, a thread expecting a datagram polls its socket before it
    /// blocks (adaptive; never on a thread bound to one CPU; 0: off).
    #[arg(long = "busy-poll", value_name = "US", default_value_t = memplane_unix::channel::DEFAULT_BUSY_POLL.as_micros() as u64)]
    pub busy_poll_us: u64,
    /// Send every message over the sockets: no shared-memory lanes between memplane
    /// processes.
    #[arg(long = "no-lanes")]
    pub no_lanes: bool,
}

fn parse_abi(s: &str) -> Result<Abi, String> {
    Abi::parse(s).ok_or_else(|| format!("unknown ABI {s:?}: expected 22.11, 24.11 or 25.11"))
}

/// Memory options, with DPDK's EAL names.
#[derive(Args, Debug, Clone, Default)]
pub struct MemOpts {
    /// Total memory limit in MiB.
    #[arg(short = 'm', long = "memory")]
    pub memory_mb: Option<u64>,
    /// MiB to allocate up front per NUMA node (comma-separated).
    #[arg(long = "socket-mem", value_parser = memplane_hugepage::options::parse_node_list)]
    pub socket_mem: Option<NodeList>,
    /// MiB per NUMA node at most (comma-separated, 0 = no limit).
    #[arg(long = "socket-limit", value_parser = memplane_hugepage::options::parse_node_list)]
    pub socket_limit: Option<NodeList>,
    /// Where to place the shared address range (e.g. 0x100000000).
    #[arg(long = "base-virtaddr", value_parser = memplane_hugepage::options::parse_addr)]
    pub base_virtaddr: Option<u64>,
    /// Run without hugepages (ordinary shared memory).
    #[arg(long = "no-huge")]
    pub no_huge: bool,
    /// Hugepage memfds, nothing on disk.
    #[arg(long = "in-memory")]
    pub in_memory: bool,
    /// One hugetlbfs file per memseg list.
    #[arg(long = "single-file-segments")]
    pub single_file_segments: bool,
    /// Hugetlbfs directory for page files.
    #[arg(long = "huge-dir")]
    pub huge_dir: Option<PathBuf>,
    /// IOVA mode: pa, va or auto.
    #[arg(long = "iova-mode", default_value = "auto")]
    pub iova_mode: memplane_hugepage::IovaChoice,
    /// IPC only: no shared memory.
    #[arg(long = "no-memory")]
    pub no_memory: bool,
    /// The most threads that fault a growth's new pages in at once (1: the growing thread
    /// alone; default 4, or MEMPLANE_POPULATE_THREADS).
    #[arg(long = "populate-threads", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub populate_threads: Option<u32>,
}

/// MiB per NUMA node, as `--socket-mem 512,512` spells them. An alias, not `Vec<u64>` written
/// out: clap takes a field of type `Vec` for an option given several times, one element each,
/// and would hand `parse_node_list`'s whole list to a field of elements (a panic at runtime).
pub type NodeList = Vec<u64>;

impl MemOpts {
    /// Applies these options to `c`.
    pub fn apply(&self, mut c: crate::Config) -> crate::Config {
        if let Some(m) = self.memory_mb {
            c = c.memory_mb(m);
        }
        if let Some(v) = &self.socket_mem {
            c = c.socket_mem(v.clone());
        }
        if let Some(v) = &self.socket_limit {
            c = c.socket_limit(v.clone());
        }
        if let Some(b) = self.base_virtaddr {
            c = c.base_virtaddr(b);
        }
        if let Some(n) = self.populate_threads {
            c = c.populate_threads(n as usize);
        }
        if self.in_memory {
            c = c.in_memory();
        }
        if let Some(d) = &self.huge_dir {
            c = c.huge_dir(d.clone());
        }
        if self.single_file_segments {
            c = c.single_file_segments();
        }
        if self.no_huge {
            c = c.no_huge();
        }
        c = c.iova_mode(self.iova_mode);
        if self.no_memory {
            c = c.without_memory();
        }
        c
    }
}

impl ChannelOpts {
    /// The channel configuration these options name.
    pub fn config(&self) -> ChannelConfig {
        let mut c = ChannelConfig::new()
            .file_prefix(self.file_prefix.clone())
            .proc_type(self.proc_type)
            .abi(self.abi)
            .batch_scheduling(self.batch_sched)
            .lanes(!self.no_lanes)
            .busy_poll(std::time::Duration::from_micros(self.busy_poll_us));
        if let Some(d) = &self.runtime_dir {
            c = c.runtime_dir(d.clone());
        }
        c
    }
}

/// Bytes given in hex on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HexBytes(pub Vec<u8>);

/// Parses a hex argument.
pub fn parse_hex_arg(s: &str) -> Result<HexBytes, String> {
    parse_hex(s).map(HexBytes)
}

/// Parses a hex string (`0a1b`, also with spaces or a `0x` prefix) into bytes.
pub fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let t: String = s
        .trim_start_matches("0x")
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    if !t.len().is_multiple_of(2) {
        return Err(format!("hex string {s:?} has an odd number of digits"));
    }
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&t[i..i + 2], 16).map_err(|e| format!("bad hex {s:?}: {e}")))
        .collect()
}

/// Bytes as lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses a duration in milliseconds.
pub fn parse_ms(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| format!("bad milliseconds {s:?}: {e}"))
}

/// Runs the command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let r = match cli.command {
        Command::Primary(o) => mp::primary(&o),
        Command::Mp(c) => mp::run(c),
        Command::Demo(a) => demo::run(a),
        Command::Info(a) => info::run(a),
        Command::Hugepages(a) => hugepages::run(a),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("memplane: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        assert_eq!(parse_hex("0x0a1B ff").unwrap(), vec![0x0a, 0x1b, 0xff]);
        assert!(parse_hex("abc").is_err());
        assert!(parse_hex("zz").is_err());
        assert_eq!(hex(&[1, 0xab]), "01ab");
    }
}
