//! `memplane hugepages`: the report (text and JSON) against the live system, and reservations
//! that must fail cleanly (exit 1, a message, nothing changed), which is safe also as root.

use std::fs;
use std::process::{Command, Output};

fn memplane(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memplane"))
        .args(args)
        .output()
        .expect("run memplane")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The sizes the live kernel offers, as the report names them ("2Mb", "1Gb").
fn live_sizes() -> Vec<String> {
    let mut kib: Vec<u64> = fs::read_dir("/sys/kernel/mm/hugepages")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()
        })
        .collect();
    kib.sort_unstable();
    kib.into_iter()
        .map(|k| match k {
            k if k % (1 << 20) == 0 => format!("{}Gb", k >> 20),
            k if k % (1 << 10) == 0 => format!("{}Mb", k >> 10),
            k => format!("{k}Kb"),
        })
        .collect()
}

#[test]
fn report_shows_every_size() {
    let o = memplane(&["hugepages"]);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "exit {:?}: {out}{}",
        o.status,
        stderr(&o)
    );
    print!("{out}");
    let sizes = live_sizes();
    if sizes.is_empty() {
        assert!(out.contains("No hugepage sizes"), "{out}");
    } else {
        let header = out.lines().next().unwrap_or_default();
        for column in [
            "Node", "Pages", "Size", "Total", "Free", "Reserved", "Surplus",
        ] {
            assert!(header.contains(column), "header {header:?} lacks {column}");
        }
        for size in &sizes {
            assert!(
                out.lines()
                    .any(|l| l.split_whitespace().nth(2) == Some(size)),
                "no line for {size}:\n{out}"
            );
        }
    }
    assert!(out.contains("Default hugepage size:"), "{out}");
    assert!(out.contains("Hugepages mounted on") || out.contains("Hugepages not mounted"));
    let nothing_reserved = out.contains("no hugepages reserved");
    let json = stdout(&memplane(&["hugepages", "--json"]));
    assert_eq!(
        nothing_reserved,
        json.contains("\"no_huge\": true"),
        "{json}"
    );
}

/// Braces and brackets outside strings balance, and strings close.
fn balanced(json: &str) -> bool {
    let mut stack = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => stack.push(c),
            '}' if stack.pop() != Some('{') => return false,
            ']' if stack.pop() != Some('[') => return false,
            _ => {}
        }
    }
    stack.is_empty() && !in_string
}

#[test]
fn json_report() {
    let o = memplane(&["hugepages", "--json"]);
    let out = stdout(&o);
    assert!(o.status.success(), "exit {:?}: {}", o.status, stderr(&o));
    let t = out.trim();
    assert!(t.starts_with('{') && t.ends_with('}'), "{out}");
    assert!(balanced(t), "unbalanced: {out}");
    for key in [
        "\"default_size\":",
        "\"nodes\":",
        "\"sizes\":",
        "\"mounts\":",
        "\"usable\":",
        "\"no_huge\":",
        "\"issues\":",
    ] {
        assert!(out.contains(key), "no {key} in {out}");
    }
    let sizes = live_sizes();
    assert_eq!(
        out.matches("\"per_node\":").count(),
        sizes.len(),
        "one entry per size: {out}"
    );
    assert!(!out.contains("NaN") && !out.contains(",\n}") && !out.contains(",]"));
}

#[test]
fn reserving_an_unknown_size_fails_cleanly() {
    let o = memplane(&["hugepages", "--reserve", "1", "--size", "3K"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains("offers no 3K hugepages"), "{err}");
}

#[test]
fn reserving_on_a_missing_node_fails_cleanly() {
    let o = memplane(&[
        "hugepages",
        "--reserve",
        "1",
        "--size",
        "2M",
        "--node",
        "4000",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("node 4000") || err.contains("offers no 2M"),
        "{err}"
    );
}

#[test]
fn bad_arguments_are_refused() {
    let o = memplane(&["hugepages", "--size", "2M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--reserve"), "{}", stderr(&o));
    let o = memplane(&["hugepages", "--reserve", "1", "--size", "lots"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad page size"), "{}", stderr(&o));
    let o = memplane(&["hugepages", "--node", "0"]);
    assert!(!o.status.success());
}
