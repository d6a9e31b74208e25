//! Hugepage discovery: a fake sysfs/procfs tree with two sizes and two nodes (every number
//! checked), malformed and missing files (skipped and reported, never a panic), page size
//! parsing, a consistency check of the live system and, as root, a real reservation that is
//! undone afterwards.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use memplane_hugepage::discover::{
    self, DiscoverError, HugepageInfo, NodeCount, PageSize, parse_default_size, parse_mounts,
    parse_node_list,
};

/// Tests that read or change the live hugepage pool run one at a time.
static LIVE: Mutex<()> = Mutex::new(());

fn live_lock() -> std::sync::MutexGuard<'static, ()> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A temporary directory, removed when dropped (also when the test fails).
struct TempTree(PathBuf);

impl TempTree {
    fn new(tag: &str) -> TempTree {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "memplane-discover-{tag}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("create temp dir");
        TempTree(dir)
    }

    fn sys(&self) -> PathBuf {
        self.0.join("sys")
    }

    fn proc(&self) -> PathBuf {
        self.0.join("proc")
    }

    /// Writes `content` to `rel` (relative to the tree), creating directories.
    fn put(&self, rel: &str, content: &str) {
        let p = self.0.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, content).expect("write");
    }

    fn remove(&self, rel: &str) {
        fs::remove_file(self.0.join(rel)).expect("remove");
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.0.join(rel)).expect("read")
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const SIZE_2M: &str = "sys/kernel/mm/hugepages/hugepages-2048kB";
const SIZE_1G: &str = "sys/kernel/mm/hugepages/hugepages-1048576kB";

fn node_dir(node: u32, kb: u64) -> String {
    format!("sys/devices/system/node/node{node}/hugepages/hugepages-{kb}kB")
}

const MOUNTS: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0
nodev /mnt/huge1G hugetlbfs rw,relatime,pagesize=1024M,size=4294967296 0 0
nodev /mnt/huge\\040default hugetlbfs rw,relatime,uid=1000,gid=1001,mode=1770 0 0
nodev /mnt/ro hugetlbfs ro,relatime,pagesize=1G 0 0
tmpfs /run tmpfs rw,nosuid,nodev,mode=755 0 0
";

const MEMINFO: &str = "\
MemTotal:        8000000 kB
HugePages_Total:     512
HugePages_Free:      500
HugePages_Rsvd:        3
HugePages_Surp:        1
Hugepagesize:       2048 kB
Hugetlb:         5242880 kB
";

/// Two sizes (2M: 512 pages, 1G: 4 pages), two nodes, four hugetlbfs mounts.
fn full_tree() -> TempTree {
    let t = TempTree::new("full");
    for (file, value) in [
        ("nr_hugepages", "512\n"),
        ("free_hugepages", "500\n"),
        ("resv_hugepages", "3\n"),
        ("surplus_hugepages", "1\n"),
        ("nr_overcommit_hugepages", "8\n"),
    ] {
        t.put(&format!("{SIZE_2M}/{file}"), value);
    }
    for (file, value) in [
        ("nr_hugepages", "4\n"),
        ("free_hugepages", "2\n"),
        ("resv_hugepages", "0\n"),
        ("surplus_hugepages", "0\n"),
    ] {
        t.put(&format!("{SIZE_1G}/{file}"), value);
    }
    for (node, kb, nr, free, surplus) in [
        (0, 2048, 300, 290, 1),
        (1, 2048, 212, 210, 0),
        (0, 1048576, 4, 2, 0),
        (1, 1048576, 0, 0, 0),
    ] {
        let d = node_dir(node, kb);
        t.put(&format!("{d}/nr_hugepages"), &format!("{nr}\n"));
        t.put(&format!("{d}/free_hugepages"), &format!("{free}\n"));
        t.put(&format!("{d}/surplus_hugepages"), &format!("{surplus}\n"));
    }
    t.put("sys/devices/system/node/online", "0-1\n");
    t.put("sys/devices/system/node/possible", "0-1\n");
    t.put("proc/mounts", MOUNTS);
    t.put("proc/meminfo", MEMINFO);
    t
}

fn discover_tree(t: &TempTree) -> HugepageInfo {
    discover::discover_at(&t.sys(), &t.proc())
}

/// Whether some issue names `path_part` in its message.
fn reported(info: &HugepageInfo, path_part: &str) -> bool {
    info.issues
        .iter()
        .any(|i| i.to_string().contains(path_part))
}

#[test]
fn fake_tree_every_number() {
    let t = full_tree();
    let info = discover_tree(&t);
    assert!(info.issues.is_empty(), "issues: {:?}", info.issues);
    assert_eq!(info.default_size, Some(PageSize::SIZE_2M));
    assert_eq!(info.nodes, vec![0, 1]);

    assert_eq!(info.sizes.len(), 2);
    let m2 = &info.sizes[0];
    assert_eq!(m2.size, PageSize::SIZE_2M);
    assert_eq!(
        (m2.total, m2.free, m2.reserved, m2.surplus),
        (512, 500, 3, 1)
    );
    assert_eq!(m2.available(), 497);
    assert_eq!(m2.total_bytes(), 512 << 21);
    assert_eq!(
        m2.per_node,
        vec![
            NodeCount {
                node: 0,
                total: 300,
                free: 290,
                surplus: 1
            },
            NodeCount {
                node: 1,
                total: 212,
                free: 210,
                surplus: 0
            },
        ]
    );
    let g1 = &info.sizes[1];
    assert_eq!(g1.size, PageSize::SIZE_1G);
    assert_eq!((g1.total, g1.free, g1.reserved, g1.surplus), (4, 2, 0, 0));
    assert_eq!(g1.per_node.len(), 2);
    assert_eq!((g1.per_node[0].total, g1.per_node[0].free), (4, 2));
    assert_eq!((g1.per_node[1].total, g1.per_node[1].free), (0, 0));

    // Mounts: pagesize=2M, pagesize=1024M (= 1G, as the kernel writes it), the default size for
    // the one without pagesize=, and a read-only one.
    let paths: Vec<&Path> = info.mounts.iter().map(|m| m.path.as_path()).collect();
    assert_eq!(
        paths,
        [
            Path::new("/dev/hugepages"),
            Path::new("/mnt/huge1G"),
            Path::new("/mnt/huge default"),
            Path::new("/mnt/ro"),
        ]
    );
    let m = &info.mounts[0];
    assert_eq!(m.page_size, PageSize::SIZE_2M);
    assert!(m.explicit_size && !m.read_only);
    assert_eq!((m.mode, m.uid, m.gid, m.size_limit), (0o755, 0, 0, None));
    let m = &info.mounts[1];
    assert_eq!(m.page_size, PageSize::SIZE_1G);
    assert_eq!(m.size_limit, Some(4 << 30));
    let m = &info.mounts[2];
    assert_eq!(m.page_size, PageSize::SIZE_2M);
    assert!(!m.explicit_size);
    assert_eq!((m.mode, m.uid, m.gid), (0o1770, 1000, 1001));
    assert!(info.mounts[3].read_only);

    // Helpers.
    assert_eq!(info.free_pages(PageSize::SIZE_2M), 500);
    assert_eq!(info.free_pages(PageSize::SIZE_1G), 2);
    assert_eq!(info.free_pages(PageSize::SIZE_4K), 0);
    assert_eq!(
        info.best_mount_for(PageSize::SIZE_2M)
            .map(|m| m.path.clone()),
        Some(PathBuf::from("/dev/hugepages"))
    );
    assert_eq!(
        info.best_mount_for(PageSize::SIZE_1G)
            .map(|m| m.path.clone()),
        Some(PathBuf::from("/mnt/huge1G"))
    );
    assert!(info.best_mount_for(PageSize::SIZE_4K).is_none());
    assert_eq!(
        info.usable_sizes(),
        vec![PageSize::SIZE_2M, PageSize::SIZE_1G]
    );
    assert!(info.any_reserved());
    assert_eq!(info.size(PageSize::SIZE_1G), Some(g1));
}

#[test]
fn usable_sizes_skip_sizes_without_free_pages() {
    let t = full_tree();
    t.put(&format!("{SIZE_1G}/free_hugepages"), "0\n");
    let info = discover_tree(&t);
    assert_eq!(info.usable_sizes(), vec![PageSize::SIZE_2M]);
    t.put(&format!("{SIZE_2M}/nr_hugepages"), "0\n");
    t.put(&format!("{SIZE_2M}/free_hugepages"), "0\n");
    t.put(&format!("{SIZE_1G}/nr_hugepages"), "0\n");
    let info = discover_tree(&t);
    assert!(info.usable_sizes().is_empty());
    assert!(!info.any_reserved());
}

#[test]
fn a_later_mount_on_the_same_path_hides_the_earlier() {
    let text = "\
a /dev/hugepages hugetlbfs rw,pagesize=2M 0 0
b /mnt/second hugetlbfs rw,pagesize=2M 0 0
c /dev/hugepages hugetlbfs rw,pagesize=1G 0 0
";
    let (mounts, issues) = parse_mounts(text, None);
    assert!(issues.is_empty());
    let info = HugepageInfo {
        mounts,
        ..HugepageInfo::default()
    };
    assert_eq!(
        info.best_mount_for(PageSize::SIZE_2M)
            .map(|m| m.path.clone()),
        Some(PathBuf::from("/mnt/second"))
    );
    assert_eq!(
        info.best_mount_for(PageSize::SIZE_1G)
            .map(|m| m.path.clone()),
        Some(PathBuf::from("/dev/hugepages"))
    );
}

#[test]
fn malformed_files_are_reported_and_count_as_zero() {
    let t = full_tree();
    t.put(&format!("{SIZE_2M}/free_hugepages"), "garbage\n");
    t.put(&format!("{SIZE_2M}/resv_hugepages"), "");
    t.remove(&format!("{SIZE_2M}/surplus_hugepages"));
    t.put(&format!("{SIZE_1G}/nr_hugepages"), "-4\n");
    t.put(
        &format!("{}/free_hugepages", node_dir(1, 2048)),
        "\u{0}\u{ff}x",
    );
    t.put(
        "sys/kernel/mm/hugepages/hugepages-xyzkB/nr_hugepages",
        "1\n",
    );
    t.put("sys/kernel/mm/hugepages/hugepages-0kB/nr_hugepages", "1\n");
    t.put(
        "sys/kernel/mm/hugepages/hugepages-99999999999999999999kB/nr_hugepages",
        "1\n",
    );
    t.put("sys/kernel/mm/hugepages/unrelated", "x");
    let info = discover_tree(&t);

    // Everything readable is still there.
    assert_eq!(info.sizes.len(), 2);
    let m2 = &info.sizes[0];
    assert_eq!((m2.total, m2.free, m2.reserved, m2.surplus), (512, 0, 0, 0));
    assert_eq!((m2.per_node[1].total, m2.per_node[1].free), (212, 0));
    assert_eq!(info.sizes[1].total, 0);
    assert_eq!(info.sizes[1].free, 2);
    assert_eq!(info.mounts.len(), 4);

    // And every problem is reported, naming its file.
    assert!(reported(&info, "hugepages-2048kB/free_hugepages"));
    assert!(reported(&info, "hugepages-2048kB/resv_hugepages"));
    assert!(reported(&info, "hugepages-2048kB/surplus_hugepages"));
    assert!(reported(&info, "hugepages-1048576kB/nr_hugepages"));
    assert!(reported(
        &info,
        "node1/hugepages/hugepages-2048kB/free_hugepages"
    ));
    assert!(reported(&info, "hugepages-xyzkB"));
    assert!(reported(&info, "hugepages-0kB"));
    assert!(reported(&info, "hugepages-99999999999999999999kB"));
    assert!(!reported(&info, "unrelated"));
    assert_eq!(info.issues.len(), 8, "issues: {:#?}", info.issues);
    assert!(
        info.issues
            .iter()
            .any(|i| matches!(i, DiscoverError::Read { .. })),
        "a missing file is a read error"
    );
    for issue in &info.issues {
        assert!(!issue.to_string().is_empty());
    }
}

#[test]
fn malformed_node_list_falls_back_to_node_dirs() {
    let t = full_tree();
    t.put("sys/devices/system/node/online", "zero-one\n");
    let info = discover_tree(&t);
    assert_eq!(info.nodes, vec![0, 1]);
    assert!(reported(&info, "online"));
    assert_eq!(info.sizes[0].per_node.len(), 2);

    t.put("sys/devices/system/node/online", "");
    let info = discover_tree(&t);
    assert_eq!(info.nodes, vec![0, 1]);
    assert!(reported(&info, "online"));

    t.remove("sys/devices/system/node/online");
    let info = discover_tree(&t);
    assert_eq!(info.nodes, vec![0, 1]);
    assert!(info.issues.is_empty(), "issues: {:?}", info.issues);
}

#[test]
fn no_numa_sysfs_is_node_zero() {
    let t = full_tree();
    fs::remove_dir_all(t.0.join("sys/devices")).expect("rm");
    let info = discover_tree(&t);
    assert_eq!(info.nodes, vec![0]);
    assert!(info.issues.is_empty(), "issues: {:?}", info.issues);
    assert!(info.sizes.iter().all(|s| s.per_node.is_empty()));
    assert_eq!(info.sizes[0].total, 512);
}

#[test]
fn missing_meminfo_and_mounts_are_reported() {
    let t = full_tree();
    t.remove("proc/meminfo");
    t.remove("proc/mounts");
    let info = discover_tree(&t);
    assert_eq!(info.default_size, None);
    assert!(info.mounts.is_empty());
    assert!(reported(&info, "meminfo"));
    assert!(reported(&info, "mounts"));
    assert_eq!(info.sizes.len(), 2);
}

#[test]
fn mount_without_pagesize_and_without_default_is_skipped() {
    let t = full_tree();
    t.put("proc/meminfo", "MemTotal: 1 kB\nHugepagesize: lots\n");
    let info = discover_tree(&t);
    assert_eq!(info.default_size, None);
    assert!(reported(&info, "meminfo"));
    assert_eq!(info.mounts.len(), 3);
    assert!(info.issues.iter().any(|i| matches!(
        i,
        DiscoverError::MountPageSizeUnknown { path } if path == Path::new("/mnt/huge default")
    )));
}

#[test]
fn malformed_mount_lines() {
    let text = "\
just-two fields
nodev /a hugetlbfs rw,pagesize=banana 0 0
nodev /b hugetlbfs rw,pagesize=2M,mode=999,uid=x,gid=-1,size=lots 0 0

nodev /c hugetlbfs rw 0 0
nodev /d hugetlbfs
";
    let (mounts, issues) = parse_mounts(text, Some(PageSize::SIZE_1G));
    let paths: Vec<&Path> = mounts.iter().map(|m| m.path.as_path()).collect();
    assert_eq!(paths, [Path::new("/b"), Path::new("/c")]);
    // Bad options keep the kernel's defaults.
    assert_eq!(
        (mounts[0].mode, mounts[0].uid, mounts[0].gid),
        (0o755, 0, 0)
    );
    assert_eq!(mounts[0].size_limit, None);
    assert_eq!(mounts[1].page_size, PageSize::SIZE_1G);
    // The short lines, pagesize=banana, and the four bad options of /b.
    assert_eq!(issues.len(), 7, "issues: {issues:#?}");
    assert!(issues[0].to_string().contains("/proc/mounts:1"));
}

#[test]
fn empty_roots_mean_no_hugepage_support() {
    let t = TempTree::new("empty");
    let info = discover_tree(&t);
    assert!(info.sizes.is_empty());
    assert!(info.mounts.is_empty());
    assert_eq!(info.nodes, vec![0]);
    assert_eq!(info.default_size, None);
    assert!(!info.any_reserved());
    assert!(info.usable_sizes().is_empty());
    assert!(
        info.issues
            .iter()
            .any(|i| matches!(i, DiscoverError::NoHugepageSupport { .. }))
    );
    assert!(
        discover::discover_at(
            Path::new("/nonexistent/sys"),
            Path::new("/nonexistent/proc")
        )
        .sizes
        .is_empty()
    );
}

#[test]
fn page_size_parsing() {
    let m2 = Some(PageSize::SIZE_2M);
    for text in [
        "2M",
        "2m",
        "2MB",
        "2MiB",
        "2048k",
        "2048K",
        "2048kB",
        "2048 kB",
        " 2048kB\n",
        "2097152",
        "2097152B",
        "hugepages-2048kB",
    ] {
        assert_eq!(PageSize::parse(text).ok(), m2, "{text:?}");
    }
    assert_eq!("1G".parse::<PageSize>().ok(), Some(PageSize::SIZE_1G));
    assert_eq!(PageSize::parse("1024M").ok(), Some(PageSize::SIZE_1G));
    assert_eq!(
        PageSize::parse("hugepages-1048576kB").ok(),
        Some(PageSize::SIZE_1G)
    );
    assert_eq!(PageSize::parse("4k").ok(), Some(PageSize::SIZE_4K));
    for bad in [
        "",
        "0",
        "0M",
        "M",
        "-2M",
        "2X",
        "2 M B",
        "abc",
        "1.5G",
        "99999999999999999999",
        "18446744073709551615G",
        "hugepages-",
    ] {
        let e = PageSize::parse(bad).expect_err(bad);
        assert!(matches!(e, DiscoverError::BadPageSize { .. }), "{bad:?}");
        assert!(e.to_string().contains("2M"), "the message shows the form");
    }

    assert_eq!(PageSize::SIZE_2M.to_string(), "2M");
    assert_eq!(PageSize::SIZE_1G.to_string(), "1G");
    assert_eq!(PageSize::SIZE_4K.to_string(), "4K");
    assert_eq!(
        PageSize::new(16 << 30).map(|s| s.to_string()),
        Some("16G".into())
    );
    assert_eq!(
        PageSize::new(1000).map(|s| s.to_string()),
        Some("1000".into())
    );
    assert_eq!(format!("{:>4}|", PageSize::SIZE_2M), "  2M|");
    assert_eq!(PageSize::new(0), None);
    assert_eq!(PageSize::SIZE_2M.sysfs_name(), "hugepages-2048kB");
    assert_eq!(PageSize::SIZE_2M.kib(), 2048);
    assert_eq!(
        PageSize::from_sysfs_name("hugepages-1048576kB"),
        Some(PageSize::SIZE_1G)
    );
    for bad in [
        "hugepages-2048",
        "hugepages-kB",
        "hugepages-0kB",
        "hugepages-+1kB",
        "2048kB",
    ] {
        assert_eq!(PageSize::from_sysfs_name(bad), None, "{bad:?}");
    }

    // Display and parse round-trip, also for sizes that are no power of two.
    let mut bytes: Vec<u64> = vec![1, 1000, 1023, 4096, 3 << 30, u64::MAX, u64::MAX - 1023];
    bytes.extend((0..64).map(|s| 1u64 << s));
    bytes.extend((1..64).map(|s| (1u64 << s) + 1));
    bytes.extend((10..64).map(|s| 3u64 << (s - 2)));
    for b in bytes {
        let size = PageSize::new(b).expect("nonzero");
        let shown = size.to_string();
        assert_eq!(
            PageSize::parse(&shown).ok(),
            Some(size),
            "{b} shown as {shown}"
        );
        let sysfs = size.sysfs_name();
        if b % 1024 == 0 {
            assert_eq!(PageSize::from_sysfs_name(&sysfs), Some(size));
        }
    }
}

#[test]
fn node_lists() {
    assert_eq!(parse_node_list("0\n"), Some(vec![0]));
    assert_eq!(parse_node_list("0-1,3"), Some(vec![0, 1, 3]));
    assert_eq!(parse_node_list("3,0-1,1"), Some(vec![0, 1, 3]));
    assert_eq!(parse_node_list("2-2"), Some(vec![2]));
    for bad in [
        "",
        "\n",
        "x",
        "1-0",
        "0-",
        "-1",
        "0,,1",
        "0-4294967295",
        "+1",
    ] {
        assert_eq!(parse_node_list(bad), None, "{bad:?}");
    }
}

#[test]
fn default_size_from_meminfo() {
    assert_eq!(parse_default_size(MEMINFO), Some(PageSize::SIZE_2M));
    assert_eq!(
        parse_default_size("Hugepagesize:    1048576 kB\n"),
        Some(PageSize::SIZE_1G)
    );
    assert_eq!(parse_default_size("MemTotal: 1 kB\n"), None);
    assert_eq!(parse_default_size("Hugepagesize: x\n"), None);
}

#[test]
fn reserve_on_a_fake_tree() {
    let t = full_tree();
    let sys = t.sys();
    assert_eq!(
        discover::reserve_at(&sys, PageSize::SIZE_2M, 600, None),
        Ok(600)
    );
    assert_eq!(t.read(&format!("{SIZE_2M}/nr_hugepages")), "600\n");
    assert_eq!(
        discover::reserve_at(&sys, PageSize::SIZE_1G, 1, Some(1)),
        Ok(1)
    );
    assert_eq!(
        t.read(&format!("{}/nr_hugepages", node_dir(1, 1048576))),
        "1\n"
    );

    let e = discover::reserve_at(&sys, PageSize::SIZE_4K, 1, None).expect_err("4K");
    assert_eq!(
        e,
        DiscoverError::UnsupportedSize {
            size: PageSize::SIZE_4K,
            node: None,
            offered: vec![PageSize::SIZE_2M, PageSize::SIZE_1G],
        }
    );
    assert!(e.to_string().contains("2M, 1G"), "{e}");

    let e = discover::reserve_at(&sys, PageSize::SIZE_2M, 1, Some(7)).expect_err("node 7");
    assert_eq!(
        e,
        DiscoverError::NoSuchNode {
            node: 7,
            nodes: vec![0, 1]
        }
    );
    assert!(e.to_string().contains("node 7"), "{e}");

    fs::remove_dir_all(t.0.join(node_dir(1, 2048))).expect("rm");
    let e = discover::reserve_at(&sys, PageSize::SIZE_2M, 1, Some(1)).expect_err("no 2M on 1");
    assert!(matches!(
        e,
        DiscoverError::UnsupportedSize { node: Some(1), .. }
    ));

    let e = discover::reserve_at(&sys, PageSize::SIZE_1G, u64::MAX, None).expect_err("huge");
    assert!(matches!(e, DiscoverError::TooLarge { .. }), "{e:?}");
    let e = discover::reserve_at(&sys, PageSize::SIZE_1G, 1 << 40, None).expect_err("huge");
    assert!(matches!(e, DiscoverError::TooLarge { .. }), "{e:?}");

    // A file the kernel would not have: garbage read back is reported, no panic.
    fs::remove_file(t.0.join(format!("{SIZE_1G}/nr_hugepages"))).expect("rm");
    let e = discover::reserve_at(&sys, PageSize::SIZE_1G, 1, None).expect_err("no file");
    assert!(
        matches!(
            e,
            DiscoverError::Write { .. } | DiscoverError::PermissionDenied { .. }
        ),
        "{e:?}"
    );

    let empty = TempTree::new("reserve-empty");
    let e = discover::reserve_at(&empty.sys(), PageSize::SIZE_2M, 1, None).expect_err("none");
    assert!(matches!(e, DiscoverError::NoHugepageSupport { .. }));
}

#[test]
fn error_messages_say_what_to_do() {
    let fewer = DiscoverError::Fewer {
        size: PageSize::SIZE_1G,
        node: Some(1),
        requested: 8,
        got: 3,
    };
    let s = fewer.to_string();
    assert!(
        s.contains("8 pages of 1G on node 1") && s.contains("holds 3"),
        "{s}"
    );
    let denied = DiscoverError::PermissionDenied {
        path: "/sys/x".into(),
        action: "writing",
    };
    assert!(denied.to_string().contains("root"));
}

/// Free pages never exceed the total and the nodes add up to the total. The pool can change
/// under us (other processes reserving), so an inconsistent read is retried a few times.
#[test]
fn live_system_is_consistent() {
    let _live = live_lock();
    let mut last = String::new();
    for _ in 0..5 {
        let info = discover::discover();
        assert!(!info.nodes.is_empty());
        for issue in &info.issues {
            eprintln!("live issue: {issue}");
        }
        let mut problems = Vec::new();
        for s in &info.sizes {
            if s.free > s.total {
                problems.push(format!("{}: free {} > total {}", s.size, s.free, s.total));
            }
            if !s.per_node.is_empty() {
                let total: u64 = s.per_node.iter().map(|n| n.total).sum();
                let free: u64 = s.per_node.iter().map(|n| n.free).sum();
                if total != s.total || free != s.free {
                    problems.push(format!(
                        "{}: nodes hold {total} ({free} free), globally {} ({} free)",
                        s.size, s.total, s.free
                    ));
                }
                for n in &s.per_node {
                    if n.free > n.total {
                        problems.push(format!("{} node {}: free > total", s.size, n.node));
                    }
                }
            }
        }
        for m in &info.mounts {
            assert!(
                info.size(m.page_size).is_some(),
                "mount {m:?} of an unknown size"
            );
        }
        if let Some(d) = info.default_size {
            assert!(info.size(d).is_some(), "default size {d} not offered");
        }
        if problems.is_empty() {
            eprintln!(
                "live: sizes {:?}, nodes {:?}, mounts {:?}",
                info.sizes
                    .iter()
                    .map(|s| (s.size.to_string(), s.total, s.free))
                    .collect::<Vec<_>>(),
                info.nodes,
                info.mounts.iter().map(|m| &m.path).collect::<Vec<_>>()
            );
            return;
        }
        last = problems.join("; ");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the live hugepage counts are inconsistent: {last}");
}

/// Puts the 2M pool back to its size when dropped, also when the test fails.
struct RestorePool {
    before: u64,
}

impl Drop for RestorePool {
    fn drop(&mut self) {
        match discover::reserve(PageSize::SIZE_2M, self.before, None) {
            Ok(n) => eprintln!("restored the 2M pool to {n} pages"),
            Err(e) => eprintln!("could not restore the 2M pool to {}: {e}", self.before),
        }
    }
}

#[test]
fn root_reserves_two_more_pages() {
    if !rustix::process::geteuid().is_root() {
        memplane_testkit::skip("reserving hugepages needs root");
        return;
    }
    let _live = live_lock();
    let info = discover::discover();
    let Some(before) = info.size(PageSize::SIZE_2M).map(|s| s.total - s.surplus) else {
        memplane_testkit::skip("this kernel offers no 2M hugepages");
        return;
    };
    let _restore = RestorePool { before };
    match discover::reserve(PageSize::SIZE_2M, before + 2, None) {
        Ok(now) => {
            assert!(now >= before + 2, "the pool grew by 2: {before} -> {now}");
            let after = discover::discover();
            let s = after.size(PageSize::SIZE_2M).expect("2M still offered");
            assert!(s.total >= before + 2, "discover sees {}", s.total);
            assert!(after.free_pages(PageSize::SIZE_2M) >= 2);
        }
        Err(DiscoverError::Fewer { requested, got, .. }) => {
            assert_eq!(requested, before + 2);
            assert!(got < requested);
            eprintln!("the kernel gave fewer pages: {got} of {requested} (memory is short)");
        }
        Err(e) => panic!("reserve failed: {e}"),
    }
}
