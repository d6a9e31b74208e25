//! `memplane info`: attach to a running deployment as a secondary and print what it holds,
//! like `dpdk-proc-info`: memory segment lists, heaps, memzones, peers.

use std::fmt::Write as _;

use clap::Args;

use super::ChannelOpts;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// `memplane info` options.
#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    opts: ChannelOpts,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also list every block of every heap.
    #[arg(long)]
    blocks: bool,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Runs `memplane info`.
pub fn run(a: InfoArgs) -> Result<()> {
    let mut o = a.opts.clone();
    o.proc_type = memplane_unix::ProcType::Secondary;
    let p = crate::Config {
        channel: o.config(),
        ..crate::Config::default()
    }
    .init()?;
    let mem = p.mem();
    let heap = p.heap();
    let peers = p.channel.peers().unwrap_or_default();
    let lists = mem.lists();
    let stats = heap.all_stats();
    let zones = heap.memzone_walk();
    let va = mem.va_range();
    let mut out = String::new();
    if a.json {
        let _ = write!(
            out,
            "{{\"dir\":\"{}\",\"primary_pid\":{},\"backing\":\"{}\",\"iova\":\"{}\",\
             \"va_base\":{},\"va_len\":{},\"total_used\":{},\"lists\":[",
            esc(&p.channel.dir().display().to_string()),
            mem.primary_pid(),
            mem.backing_name(),
            mem.iova_mode(),
            va.addr,
            va.len,
            mem.total_used()
        );
        for (i, l) in lists.iter().enumerate() {
            let _ = write!(
                out,
                "{}{{\"index\":{},\"node\":{},\"page_size\":{},\"base\":{},\"segments\":{},\"used\":{}}}",
                if i > 0 { "," } else { "" },
                l.index,
                l.node,
                l.page_size,
                l.base,
                l.n_segs,
                l.used
            );
        }
        out.push_str("],\"heaps\":[");
        for (i, s) in stats.iter().enumerate() {
            let _ = write!(
                out,
                "{}{{\"node\":{},\"heap_size\":{},\"free\":{},\"allocated\":{},\"largest_free\":{},\
                 \"alloc_count\":{},\"free_count\":{},\"regions\":{},\"grows\":{},\"shrinks\":{},\
                 \"recoveries\":{}}}",
                if i > 0 { "," } else { "" },
                s.node,
                s.heap_size,
                s.free,
                s.allocated,
                s.largest_free,
                s.alloc_count,
                s.free_count,
                s.regions,
                s.grows,
                s.shrinks,
                s.recoveries
            );
        }
        out.push_str("],\"memzones\":[");
        for (i, z) in zones.iter().enumerate() {
            let _ = write!(
                out,
                "{}{{\"name\":\"{}\",\"addr\":{},\"iova\":{},\"len\":{},\"node\":{},\"page_size\":{}}}",
                if i > 0 { "," } else { "" },
                esc(z.name.as_str()),
                z.addr,
                z.iova,
                z.len,
                z.node,
                z.page_size
            );
        }
        out.push_str("],\"peers\":[");
        for (i, pe) in peers.iter().enumerate() {
            let _ = write!(
                out,
                "{}\"{}\"",
                if i > 0 { "," } else { "" },
                esc(&pe.to_string())
            );
        }
        out.push_str("]}");
    } else {
        let _ = writeln!(
            out,
            "deployment {} (primary pid {})",
            p.channel.dir().display(),
            mem.primary_pid()
        );
        let _ = writeln!(
            out,
            "memory: backing {}, IOVA as {}, address range [{:#x}, {:#x}), {} bytes in use",
            mem.backing_name(),
            mem.iova_mode(),
            va.addr,
            va.addr + va.len,
            mem.total_used()
        );
        for l in &lists {
            let _ = writeln!(
                out,
                "  memseg list {}: node {} page {} KiB, {} segments at {:#x}, {} used",
                l.index,
                l.node,
                l.page_size >> 10,
                l.n_segs,
                l.base,
                l.used
            );
        }
        for s in &stats {
            let _ = writeln!(
                out,
                "heap node {}: size {} free {} allocated {} largest free {} blocks {} free blocks {} \
                 regions {} grows {} shrinks {} recoveries {}",
                s.node,
                s.heap_size,
                s.free,
                s.allocated,
                s.largest_free,
                s.alloc_count,
                s.free_count,
                s.regions,
                s.grows,
                s.shrinks,
                s.recoveries
            );
        }
        let _ = writeln!(out, "memzones: {}", zones.len());
        for z in &zones {
            let _ = writeln!(
                out,
                "  {:<31} addr {:#x} len {} iova {:#x} node {}",
                z.name.as_str(),
                z.addr,
                z.len,
                z.iova,
                z.node
            );
        }
        let _ = writeln!(out, "peers: {}", peers.len());
        for pe in &peers {
            let _ = writeln!(out, "  {pe}");
        }
        if a.blocks {
            out.push_str(&heap.dump(true));
        }
        match heap.validate() {
            Ok(()) => out.push_str("heap validation: clean\n"),
            Err(ps) => {
                let _ = writeln!(out, "heap validation: {} problems", ps.len());
                for pr in ps {
                    let _ = writeln!(out, "  {pr}");
                }
            }
        }
    }
    println!("{}", out.trim_end());
    Ok(())
}
