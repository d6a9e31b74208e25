//! The loop of the bench binaries whose allocator is installed as the process's
//! `#[global_allocator]` (`global_pairs`: memplane's; `jemalloc_pairs`: jemalloc's): every
//! allocation and free goes through `std::alloc::alloc` / `dealloc`, as in any Rust program.
//! `alloc_pairs` runs these binaries and puts their lines in its table.
//!
//! Same protocol as `alloc_pairs` (`super::pairs`): 16, 64 and 256 bytes (alignment 8), 1 and 2
//! threads, each size's two runs bracketed by the control's.

use super::Args;
use super::pairs::{Installed, bracket, line, run};

fn list(args: &Args, name: &str, default: &str) -> Vec<usize> {
    args.value(name)
        .unwrap_or_else(|| default.to_owned())
        .split(',')
        .map(|x| x.parse().expect("a number"))
        .collect()
}

/// Runs the pairs (`--reps R --count N --sizes 16,64,256 [--threads N] [--flip]`) and prints
/// the result lines as `impl=<name>`; `owned` tells the allocator's blocks from a fallback's.
/// Without `--threads`, each size's 1- and 2-thread runs are bracketed by the control's (the
/// other way round with `--flip`, and in every other repetition).
pub fn main(args: &Args, name: &str, owned: fn(*const u8) -> bool) {
    let reps = args.num("--reps", 3);
    let n = args.num("--count", 10_000_000);
    let sizes = list(args, "--sizes", "16,64,256");
    let threads = args
        .value("--threads")
        .map(|t| t.parse().expect("--threads: a number"));
    let a = Installed(owned);
    for rep in 0..reps {
        let flip = args.flag("--flip") ^ (rep % 2 == 1);
        for &size in &sizes {
            let lines = match threads {
                Some(t) => vec![line(name, size, t, n, run(&a, size, t, n))],
                None => bracket(name, &a, size, n, flip),
            };
            for l in lines {
                println!("{l}");
            }
        }
    }
}
