//! Memzone lookup with 2000 zones: memplane's `Heap::memzone_lookup` against DPDK 22.11's
//! `rte_memzone_lookup` (`interop/dpdk_malloc_bench.c memzone`, `--dpdk-bin`).
//!
//! Protocol (both sides): reserve K zones of 64 bytes named `mzb-0` .. `mzb-(K-1)`, then time N
//! lookups of the last name reserved, and N lookups of a name that does not exist; report the
//! mean per lookup. Every implementation runs `--reps` times; the table shows medians.
//!
//! `cargo bench -p memplane-heap --bench memzone_lookup -- [--zones K] [--count N] [--reps R]
//! [--dpdk-bin PATH] [--no-huge]`

mod common;

use std::time::Instant;

use common::{Args, MpPrimary, Proc, RunDir, dpdk_cleanup, dpdk_cmd, field, median, parse_kv};
use memplane_heap::ZoneSpec;

fn main() {
    let args = Args::get();
    let zones = args.num("--zones", 2000);
    let n = args.num("--count", 1_000_000);
    let dpdk_n = args.num("--dpdk-count", 10_000);
    let reps = args.num("--reps", 5);
    let dpdk = common::dpdk_bin(&args);
    let (mut mp_last, mut mp_missing, mut d_last, mut d_missing) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        eprintln!("memzone_lookup: rep {}/{reps}", rep + 1);
        {
            let dir = RunDir::new("mpb-mz");
            let p = MpPrimary::start(&dir.0, args.flag("--no-huge"), true);
            let h = p.heap();
            for i in 0..zones {
                h.memzone_reserve(
                    &format!("mzb-{i}"),
                    ZoneSpec {
                        len: 64,
                        ..ZoneSpec::default()
                    },
                )
                .expect("memzone_reserve");
            }
            let last = format!("mzb-{}", zones - 1);
            let want = h.memzone_lookup(&last).expect("the last zone").addr;
            for _ in 0..n / 10 {
                std::hint::black_box(h.memzone_lookup(std::hint::black_box(&last)));
            }
            let t0 = Instant::now();
            let mut found = 0;
            for _ in 0..n {
                if let Some(z) = h.memzone_lookup(std::hint::black_box(&last)) {
                    found = z.addr;
                }
            }
            let last_ns = t0.elapsed().as_nanos() as f64 / n as f64;
            assert_eq!(found, want);
            let t0 = Instant::now();
            let mut hits = 0;
            for _ in 0..n {
                hits += h
                    .memzone_lookup(std::hint::black_box("mzb-missing"))
                    .is_some() as u64;
            }
            let missing_ns = t0.elapsed().as_nanos() as f64 / n as f64;
            assert_eq!(hits, 0);
            println!(
                "bench=mz_lookup impl=memplane zones={zones} n={n} last_ns={last_ns:.1} \
                 missing_ns={missing_ns:.1} backing={}",
                p.setup.backing.split_whitespace().next().unwrap_or("?")
            );
            mp_last.push(last_ns);
            mp_missing.push(missing_ns);
            for i in 0..zones {
                h.memzone_free(&format!("mzb-{i}")).expect("memzone_free");
            }
        }
        if let Some(bin) = &dpdk {
            let prefix = common::dpdk_prefix("mz");
            let (z, c) = (zones.to_string(), dpdk_n.to_string());
            let mode = ["memzone", "--zones", &z, "--count", &c];
            let mut d = Proc::start(dpdk_cmd(bin, &prefix, false, &mode), "dpdk memzone");
            let l = d.expect("bench=mz_lookup", 300);
            println!("{l}");
            let m = parse_kv(&l);
            d_last.push(field(&m, "last_ns"));
            d_missing.push(field(&m, "missing_ns"));
            d.finish(10);
            dpdk_cleanup(&prefix);
        }
    }
    let (ml, mm) = (median(&mut mp_last), median(&mut mp_missing));
    println!();
    println!(
        "## Memzone lookup, {zones} zones, placement {} (median of {reps} runs, ns per lookup)",
        common::placement(&args)
    );
    println!();
    println!("| lookup | memplane (ns) | DPDK 22.11 (ns) | memplane / DPDK |");
    println!("|---|---|---|---|");
    for (what, m, d) in [
        ("last reserved name", ml, median(&mut d_last)),
        ("missing name", mm, median(&mut d_missing)),
    ] {
        println!(
            "| {what} | {m:.1} | {} | {} |",
            if d.is_nan() {
                "-".into()
            } else {
                format!("{d:.0}")
            },
            if d.is_nan() {
                "-".into()
            } else {
                format!("{:.5}x", m / d)
            }
        );
    }
    println!();
    println!(
        "target ({}): memplane lookup of the last name <= 100 ns: {:.1} ns -> {}",
        common::placement(&args),
        ml,
        if ml <= 100.0 { "met" } else { "NOT met" }
    );
}
