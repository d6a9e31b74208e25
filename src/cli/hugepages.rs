//! `memplane hugepages`: what `dpdk-hugepages.py -s` shows, and more: per page size and NUMA
//! node the pages held, free, reserved and surplus; the hugetlbfs mounts with their page size;
//! the default size; what memplane can use. `--reserve N [--size 2M] [--node K] [--mount]`
//! reserves (root) and then shows the new state; `--json` prints the same as JSON.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use memplane_hugepage::discover::{self, DiscoverError, HugepageInfo, PageSize};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Where `--mount` mounts the first hugetlbfs (DPDK's and most distributions' place).
const DEFAULT_MOUNT: &str = "/dev/hugepages";

/// `memplane hugepages` options.
#[derive(Args, Debug)]
pub struct HugepagesArgs {
    /// Make the kernel hold N pages of the size in total (needs root).
    #[arg(long, value_name = "N")]
    pub reserve: Option<u64>,
    /// Page size for --reserve and --mount: 2M, 1G, 2048k... (default: the default hugepage
    /// size).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<PageSize>,
    /// NUMA node for --reserve (default: all nodes, spread by the kernel).
    #[arg(long, value_name = "K", requires = "reserve")]
    pub node: Option<u32>,
    /// Mount a hugetlbfs for the size on /dev/hugepages (or /dev/hugepages-SIZE when that is
    /// taken) unless one is mounted already (needs root).
    #[arg(long)]
    pub mount: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_size(s: &str) -> std::result::Result<PageSize, String> {
    PageSize::parse(s).map_err(|e| e.to_string())
}

/// Runs `memplane hugepages`.
pub fn run(a: HugepagesArgs) -> Result<()> {
    if a.size.is_some() && a.reserve.is_none() && !a.mount {
        return Err("--size needs --reserve N or --mount".into());
    }
    let mut actions = Vec::new();
    if a.reserve.is_some() || a.mount {
        let before = discover::discover();
        let size = a.size.or(before.default_size).ok_or(
            "the default hugepage size is unknown (no Hugepagesize: in /proc/meminfo): give --size",
        )?;
        if let Some(count) = a.reserve {
            let got = discover::reserve(size, count, a.node)?;
            let node = a.node.map(|n| format!(" on node {n}")).unwrap_or_default();
            actions.push(format!(
                "asked for {count} pages of {size}{node}: the kernel holds {got}"
            ));
        }
        if a.mount {
            actions.push(mount(&before, size)?);
        }
    }
    let info = discover::discover();
    if a.json {
        for line in &actions {
            eprintln!("{line}");
        }
        println!("{}", json(&info, &actions));
    } else {
        for line in &actions {
            println!("{line}");
        }
        print!("{}", text(&info));
        for issue in &info.issues {
            eprintln!("warning: {issue}");
        }
    }
    Ok(())
}

/// Mounts a hugetlbfs for `size` unless one serves it; says what was done.
fn mount(info: &HugepageInfo, size: PageSize) -> std::result::Result<String, DiscoverError> {
    if let Some(m) = info.best_mount_for(size) {
        return Ok(format!(
            "hugetlbfs for {size} already mounted on {}",
            m.path.display()
        ));
    }
    let default = PathBuf::from(DEFAULT_MOUNT);
    let path = if info.mounts.iter().any(|m| m.path == default) || discover::is_hugetlbfs(&default)
    {
        PathBuf::from(format!("{DEFAULT_MOUNT}-{size}"))
    } else {
        default
    };
    discover::mount_hugetlbfs(&path, size)?;
    Ok(format!(
        "mounted hugetlbfs on {} (pagesize={size})",
        path.display()
    ))
}

/// Memory in DPDK's style: `1Gb`, `512Mb`, `4Kb` (the largest unit that divides it exactly).
fn mem(bytes: u64) -> String {
    match PageSize::new(bytes) {
        None => "0".to_string(),
        Some(s) => format!("{s}b"),
    }
}

/// The mount's description: `/dev/hugepages (pagesize=2M, mode=0755, uid=0, gid=0)`.
fn describe_mount(m: &discover::HugetlbMount) -> String {
    let mut s = format!(
        "{} (pagesize={}{}, mode={:04o}, uid={}, gid={}",
        m.path.display(),
        m.page_size,
        if m.explicit_size { "" } else { " by default" },
        m.mode,
        m.uid,
        m.gid
    );
    if m.read_only {
        s.push_str(", read-only");
    }
    if let Some(limit) = m.size_limit {
        let _ = write!(s, ", size={}", mem(limit));
    }
    s.push(')');
    s
}

/// The text report.
fn text(info: &HugepageInfo) -> String {
    let mut out = String::new();
    if info.sizes.is_empty() {
        out.push_str("No hugepage sizes offered by this kernel\n");
    } else {
        let mut rows = vec![
            [
                "Node", "Pages", "Size", "Total", "Free", "Reserved", "Surplus",
            ]
            .map(String::from),
        ];
        for s in &info.sizes {
            let size = format!("{}b", s.size);
            for n in &s.per_node {
                rows.push([
                    n.node.to_string(),
                    n.total.to_string(),
                    size.clone(),
                    mem(n.total.saturating_mul(s.size.bytes())),
                    n.free.to_string(),
                    // sysfs counts reserved pages per size only; one node holds them all.
                    if s.per_node.len() == 1 {
                        s.reserved.to_string()
                    } else {
                        "-".to_string()
                    },
                    n.surplus.to_string(),
                ]);
            }
            if s.per_node.len() != 1 {
                rows.push([
                    "all".to_string(),
                    s.total.to_string(),
                    size,
                    mem(s.total_bytes()),
                    s.free.to_string(),
                    s.reserved.to_string(),
                    s.surplus.to_string(),
                ]);
            }
        }
        let mut widths = [0usize; 7];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        for row in &rows {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            let _ = writeln!(out, "{}", line.join(" ").trim_end());
        }
    }
    let offered: Vec<String> = info.sizes.iter().map(|s| s.size.to_string()).collect();
    let _ = writeln!(
        out,
        "Default hugepage size: {} (offered: {}; NUMA nodes: {})",
        info.default_size
            .map_or_else(|| "unknown".to_string(), |s| s.to_string()),
        if offered.is_empty() {
            "none".to_string()
        } else {
            offered.join(", ")
        },
        info.nodes
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    if info.mounts.is_empty() {
        let _ = writeln!(
            out,
            "Hugepages not mounted (memplane hugepages --mount, or: mkdir -p {DEFAULT_MOUNT} && \
             mount -t hugetlbfs nodev {DEFAULT_MOUNT})"
        );
    }
    for m in &info.mounts {
        let _ = writeln!(out, "Hugepages mounted on {}", describe_mount(m));
    }
    if !info.any_reserved() {
        let _ = writeln!(
            out,
            "note: no hugepages reserved: memplane will run without hugepages (no-huge mode); \
             reserve with: memplane hugepages --reserve 512 --mount (as root)"
        );
        return out;
    }
    for s in info.sizes.iter().filter(|s| s.total > 0) {
        match info.best_mount_for(s.size) {
            Some(m) if s.free > 0 => {
                let _ = writeln!(
                    out,
                    "Usable: {} pages: {} free ({} not yet promised), files in {}",
                    s.size,
                    s.free,
                    s.available(),
                    m.path.display()
                );
            }
            Some(_) => {
                let _ = writeln!(out, "note: all {} {} pages are in use", s.total, s.size);
            }
            None => {
                let _ = writeln!(
                    out,
                    "note: {} {} pages are reserved but no writable hugetlbfs has pagesize={}: \
                     memplane hugepages --mount --size {}",
                    s.total, s.size, s.size, s.size
                );
            }
        }
    }
    out
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON array of already-encoded values, one per line at `indent`.
fn json_array(items: &[String], indent: &str) -> String {
    if items.is_empty() {
        return "[]".to_string();
    }
    let inner: Vec<String> = items.iter().map(|i| format!("{indent}  {i}")).collect();
    format!("[\n{}\n{indent}]", inner.join(",\n"))
}

/// The JSON report.
fn json(info: &HugepageInfo, actions: &[String]) -> String {
    let size_str =
        |s: Option<PageSize>| s.map_or_else(|| "null".to_string(), |s| json_str(&s.to_string()));
    let sizes: Vec<String> = info
        .sizes
        .iter()
        .map(|s| {
            let nodes: Vec<String> = s
                .per_node
                .iter()
                .map(|n| {
                    format!(
                        "{{\"node\": {}, \"total\": {}, \"free\": {}, \"surplus\": {}}}",
                        n.node, n.total, n.free, n.surplus
                    )
                })
                .collect();
            format!(
                "{{\"size\": {}, \"bytes\": {}, \"total\": {}, \"free\": {}, \"reserved\": {}, \
                 \"surplus\": {}, \"available\": {}, \"per_node\": [{}]}}",
                json_str(&s.size.to_string()),
                s.size.bytes(),
                s.total,
                s.free,
                s.reserved,
                s.surplus,
                s.available(),
                nodes.join(", ")
            )
        })
        .collect();
    let mounts: Vec<String> = info
        .mounts
        .iter()
        .map(|m| {
            format!(
                "{{\"path\": {}, \"page_size\": {}, \"bytes\": {}, \"explicit_size\": {}, \
                 \"mode\": {}, \"uid\": {}, \"gid\": {}, \"read_only\": {}, \"size_limit\": {}}}",
                json_str(&m.path.to_string_lossy()),
                json_str(&m.page_size.to_string()),
                m.page_size.bytes(),
                m.explicit_size,
                json_str(&format!("{:04o}", m.mode)),
                m.uid,
                m.gid,
                m.read_only,
                m.size_limit
                    .map_or_else(|| "null".to_string(), |l| l.to_string())
            )
        })
        .collect();
    let usable: Vec<String> = info
        .usable_sizes()
        .into_iter()
        .map(|s| {
            let mount = info.best_mount_for(s).map_or_else(
                || "null".to_string(),
                |m| json_str(&m.path.to_string_lossy()),
            );
            format!(
                "{{\"size\": {}, \"free\": {}, \"mount\": {mount}}}",
                json_str(&s.to_string()),
                info.free_pages(s)
            )
        })
        .collect();
    let issues: Vec<String> = info
        .issues
        .iter()
        .map(|i| json_str(&i.to_string()))
        .collect();
    let actions: Vec<String> = actions.iter().map(|a| json_str(a)).collect();
    let nodes: Vec<String> = info.nodes.iter().map(u32::to_string).collect();
    format!(
        "{{\n  \"default_size\": {},\n  \"nodes\": [{}],\n  \"sizes\": {},\n  \"mounts\": {},\n  \
         \"usable\": {},\n  \"no_huge\": {},\n  \"actions\": {},\n  \"issues\": {}\n}}",
        size_str(info.default_size),
        nodes.join(", "),
        json_array(&sizes, "  "),
        json_array(&mounts, "  "),
        json_array(&usable, "  "),
        !info.any_reserved(),
        json_array(&actions, "  "),
        json_array(&issues, "  ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }

    #[test]
    fn nothing_reserved_is_no_huge_mode() {
        let info = HugepageInfo {
            nodes: vec![0],
            ..HugepageInfo::default()
        };
        let t = text(&info);
        assert!(t.contains("No hugepage sizes offered"), "{t}");
        assert!(t.contains("Hugepages not mounted"), "{t}");
        assert!(
            t.contains("no hugepages reserved: memplane will run without hugepages (no-huge mode)"),
            "{t}"
        );
        let j = json(&info, &[]);
        assert!(
            j.contains("\"no_huge\": true") && j.contains("\"default_size\": null"),
            "{j}"
        );
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(mem(0), "0");
        assert_eq!(mem(1 << 30), "1Gb");
        assert_eq!(mem(512 << 21), "1Gb");
        assert_eq!(mem(1100 << 21), "2200Mb");
    }
}
