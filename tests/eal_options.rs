//! DPDK's EAL memory options on the `memplane` command line, as DPDK users spell them:
//! `--socket-mem` and `--socket-limit` (per-node MiB lists) take effect; a bad list, memory
//! asked on a node without any or past the address space is refused with a message;
//! `--base-virtaddr` is a hint (rounded to the page size, moved with a note when taken); a
//! `--file-prefix` that is not a file name part and a `--huge-dir` off hugetlbfs are refused at
//! start; `--in-memory` keeps nothing on disk whatever it is combined with; and a relative
//! `--huge-dir` (hugetlbfs page files) names the same files for a secondary started in another
//! working directory. Real `memplane primary` and `memplane info` processes; each test has its
//! own runtime directory and reaps its children.

mod common;

use std::path::Path;

use common::{LONG, Proc, TestDir, run_at, run_in, test_dir};
use memplane::hugepage::discover::hugetlbfs_page_size;
use memplane::hugepage::memory::{default_hugepage_size, free_hugepages};

/// Starts `memplane primary` in `dir` with `extra` options, in working directory `cwd`.
fn primary_at(cwd: Option<&Path>, dir: &TestDir, extra: &[&str]) -> Proc {
    let d = dir.arg();
    let mut args = vec!["--runtime-dir", &d];
    args.extend_from_slice(extra);
    common::primary_at(cwd, &args)
}

/// `memplane info` of the deployment in `dir`, from working directory `cwd`: its stdout.
fn info_at(cwd: Option<&Path>, dir: &TestDir) -> String {
    let d = dir.arg();
    let (code, out, err) = run_at(cwd, &["info", "--runtime-dir", &d]);
    assert_eq!(code, 0, "memplane info: {err}");
    out.join("\n")
}

/// What `memplane info` says of a primary started with `extra` options in a fresh runtime
/// directory (stopped afterwards).
fn info_of(extra: &[&str]) -> String {
    let dir = test_dir();
    let mut p = primary_at(None, &dir, extra);
    let info = info_at(None, &dir);
    p.terminate_ok(LONG);
    info
}

#[test]
fn socket_mem_and_socket_limit_take_effect() {
    // 8 MiB up front on node 0: four 2 MiB segments in use before anyone allocates.
    let info = info_of(&["--no-huge", "--socket-mem", "8"]);
    assert!(info.contains("8388608 bytes in use"), "{info}");
    // At most 16 MiB on node 0: the address range reserved for it is that large.
    let info = info_of(&["--no-huge", "--socket-limit", "16"]);
    assert!(info.contains("8 segments at 0x"), "{info}");

    // A list that is not one is refused by the parser, with the culprit named.
    let dir = test_dir();
    for bad in [["--socket-mem", "x"], ["--socket-limit", "8,,8"]] {
        let (code, _, err) = run_in(&dir, &["primary", "--no-huge", bad[0], bad[1]]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("bad per-node size"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `--populate-threads` takes 1 to 64 (the heap's own tests check what it does).
#[test]
fn populate_threads_takes_a_count() {
    let info = info_of(&["--no-huge", "--socket-mem", "4", "--populate-threads", "2"]);
    assert!(info.contains("4194304 bytes in use"), "{info}");
    let dir = test_dir();
    for bad in ["0", "65", "x"] {
        let (code, _, err) = run_in(&dir, &["primary", "--no-huge", "--populate-threads", bad]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("--populate-threads"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Memory that cannot be had is refused at start, saying why: `--socket-mem` on a NUMA node
/// without memory (a no-huge primary has one node, 0), and sizes past the address space.
#[test]
fn memory_that_cannot_be_had_is_refused() {
    let dir = test_dir();
    let (code, out, err) = run_in(&dir, &["primary", "--no-huge", "--socket-mem", "0,8"]);
    assert_eq!(code, 1, "{out:?} {err}");
    assert!(
        err.contains("--socket-mem asks 8 MiB on NUMA node 1, which has no shared memory here"),
        "{err}"
    );
    // Sizes past a process's address space (they overflowed into a panic before).
    for (opt, mb) in [
        ("-m", "18446744073709551615"),
        ("--socket-mem", "17592186044415"),
        ("--socket-limit", "134217729"),
    ] {
        let (code, out, err) = run_in(&dir, &["primary", "--no-huge", opt, mb]);
        assert_eq!(code, 1, "{opt} {mb}: {out:?} {err}");
        assert!(
            err.contains(&format!(
                "{opt} {mb} MiB is more than a process's address space"
            )),
            "{err}"
        );
    }
}

/// `--base-virtaddr` is a hint, as in DPDK: rounded up to the page size; when the range
/// cannot go there, the primary says so and goes where it goes without the option, and a
/// secondary attaches there. (Where the kernel puts a range without a hint, among the
/// libraries and stacks, a secondary's own mappings were in the way now and then.)
#[test]
fn base_virtaddr_is_a_hint() {
    let info = info_of(&["--no-huge", "--base-virtaddr", "0x200000001"]);
    assert!(info.contains("address range [0x200200000, "), "{info}");

    // Kernel space is never free to a process; the top address cannot even be rounded up.
    for hint in ["0xffff800000000000", "0xffffffffffffffff"] {
        let dir = test_dir();
        let mut p = primary_at(None, &dir, &["--no-huge", "--base-virtaddr", hint]);
        // The note goes to stderr before "primary ready" goes to stdout; each pipe has its own
        // reader thread, so wait for it.
        let note = format!("--base-virtaddr {hint} is not free or not usable here");
        let t0 = std::time::Instant::now();
        while !p.stderr_text().contains(&note) && t0.elapsed() < LONG {
            std::thread::yield_now();
        }
        assert!(p.stderr_text().contains(&note), "{}", p.stderr_text());
        let info = info_at(None, &dir);
        assert!(info.contains("address range [0x"), "{info}");
        p.terminate_ok(LONG);
    }
}

/// A `--file-prefix` that is not one file name part (it names the runtime directory and
/// every hugepage file) is refused before anything is created: `a/b`, `..` and an empty one
/// would put files elsewhere, `%` DPDK refuses too.
#[test]
fn a_file_prefix_that_is_not_a_name_part_is_refused() {
    let dir = test_dir();
    for bad in ["a/b", "..", ".", "", "a%b"] {
        let (code, out, err) = run_in(&dir, &["primary", "--no-huge", "--file-prefix", bad]);
        assert_eq!(code, 1, "{bad:?}: {out:?} {err}");
        assert!(
            err.contains(&format!("--file-prefix {bad:?} is not a file name part")),
            "{err}"
        );
    }
    // Not even the runtime directory was made.
    assert!(!dir.path().exists(), "{}", dir.path().display());
}

/// A `--huge-dir` that is missing or not on a hugetlbfs is refused when the primary starts,
/// not when it first needs a page (its page files could not be hugepages), also when it only
/// names the page size of `--in-memory`.
#[test]
fn a_huge_dir_off_hugetlbfs_is_refused_at_start() {
    let dir = test_dir();
    let missing = dir.path().join("missing");
    for d in [dir.arg(), missing.to_string_lossy().into_owned()] {
        for extra in [&[][..], &["--in-memory"]] {
            let mut args = vec!["primary", "--huge-dir", &d];
            args.extend_from_slice(extra);
            let (code, out, err) = run_in(&dir, &args);
            assert_eq!(code, 1, "{args:?}: {out:?} {err}");
            assert!(
                err.contains(&format!(
                    "--huge-dir {d}: not a directory on a hugetlbfs mount"
                )),
                "{err}"
            );
        }
    }
}

/// Whether 2 MiB hugepages are free (4 at least) and a hugetlbfs is mounted at
/// `/dev/hugepages`; says why `test` is skipped when not.
fn hugetlbfs_here(test: &str) -> bool {
    if default_hugepage_size().is_none_or(|s| free_hugepages(s) < 4) {
        memplane_testkit::skip(&format!("{test}: fewer than 4 free hugepages"));
        return false;
    }
    if hugetlbfs_page_size(Path::new("/dev/hugepages")) != Some(2 << 20) {
        memplane_testkit::skip(&format!("{test}: no 2 MiB hugetlbfs at /dev/hugepages"));
        return false;
    }
    true
}

/// The names in `/dev/hugepages` that start with `prefix`.
fn page_files(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/dev/hugepages")
        .expect("read /dev/hugepages")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// `--in-memory` keeps nothing on disk whatever else is given, in either order: with
/// `--huge-dir` (which then only names the page size) and with `--single-file-segments`.
#[test]
fn in_memory_keeps_nothing_on_disk() {
    if !hugetlbfs_here("in_memory_keeps_nothing_on_disk") {
        return;
    }
    let prefix = format!("mptinm{}", std::process::id());
    for extra in [
        &["--in-memory", "--huge-dir", "/dev/hugepages"][..],
        &["--huge-dir", "/dev/hugepages", "--in-memory"],
        &["--in-memory", "--single-file-segments"],
        &["--single-file-segments", "--in-memory"],
    ] {
        let dir = test_dir();
        let mut args = extra.to_vec();
        args.extend(["--socket-mem", "2", "--file-prefix", &prefix]);
        let mut p = primary_at(None, &dir, &args);
        let info = info_at(None, &dir);
        assert!(info.contains("backing memfd"), "{extra:?}: {info}");
        assert!(info.contains("2097152 bytes in use"), "{extra:?}: {info}");
        assert_eq!(page_files(&prefix), Vec::<String>::new(), "{extra:?}");
        p.terminate_ok(LONG);
    }
}

#[test]
fn a_relative_huge_dir_names_the_same_files_everywhere() {
    if !hugetlbfs_here("a_relative_huge_dir_names_the_same_files_everywhere") {
        return;
    }
    let dir = test_dir();
    let prefix = format!("mpteal{}", std::process::id());
    // The primary runs in /dev and names its page directory `hugepages`; `memplane info`
    // attaches from the test's own working directory.
    let mut p = primary_at(
        Some(Path::new("/dev")),
        &dir,
        &[
            "--huge-dir",
            "hugepages",
            "--socket-mem",
            "4",
            "--file-prefix",
            &prefix,
        ],
    );
    let info = info_at(None, &dir);
    assert!(info.contains("backing file-per-page"), "{info}");
    assert!(info.contains("4194304 bytes in use"), "{info}");
    p.terminate_ok(LONG);
    let left = page_files(&prefix);
    assert!(left.is_empty(), "page files left behind: {left:?}");
}
