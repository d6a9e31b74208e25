//! The shared heap against a model, under proptest: random sequences of malloc, zmalloc,
//! realloc and free with random sizes (from 1 byte to a few MiB, so the heap grows and shrinks)
//! and alignments. After every step: no two live blocks overlap, alignments hold, every block
//! keeps the pattern written into it (realloc preserves contents up to the smaller size), zmalloc
//! memory reads zero, and the heap's counters match the model. After each sequence everything is
//! freed: `validate()` is clean and every page went back (heap size 0, no memory in use).

use std::ptr::NonNull;

use memplane_heap::Heap;
use memplane_hugepage::MemOptions;
use memplane_testkit::TestDir;
use memplane_unix::MpChannel;
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseError, TestRunner};

mod common;

#[derive(Clone, Debug)]
enum Op {
    Malloc {
        size: usize,
        align_log: u8,
        zero: bool,
    },
    Realloc {
        pick: usize,
        size: usize,
        align_log: u8,
    },
    Free {
        pick: usize,
    },
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 1usize..=256,
        3 => 257usize..=65536,
        1 => 65537usize..=(3 << 20),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (size(), 0u8..13, any::<bool>()).prop_map(|(size, align_log, zero)| Op::Malloc { size, align_log, zero }),
        2 => (any::<usize>(), size(), 0u8..13).prop_map(|(pick, size, align_log)| Op::Realloc { pick, size, align_log }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
    ]
}

struct Live {
    ptr: NonNull<u8>,
    size: usize,
    align: usize,
    fill: u8,
}

fn filled(l: &Live) -> bool {
    // SAFETY: a live allocation of `l.size` bytes.
    unsafe { std::slice::from_raw_parts(l.ptr.as_ptr(), l.size) }
        .iter()
        .all(|&b| b == l.fill)
}

fn fill(l: &Live) {
    // SAFETY: a live allocation of `l.size` bytes.
    unsafe { std::ptr::write_bytes(l.ptr.as_ptr(), l.fill, l.size) };
}

/// Fills a fresh block with `tag` and adds it to the live ones.
fn add_live(live: &mut Vec<Live>, ptr: NonNull<u8>, size: usize, align: usize, tag: u8) {
    let l = Live {
        ptr,
        size,
        align,
        fill: tag,
    };
    fill(&l);
    live.push(l);
}

/// A case's live blocks; whatever a failed case leaves is freed when it drops, so the next case
/// (and each shrinking step) starts from an empty heap.
struct Lives<'a> {
    h: &'a Heap<MpChannel>,
    v: Vec<Live>,
}

impl Drop for Lives<'_> {
    fn drop(&mut self) {
        for l in self.v.drain(..) {
            let _ = self.h.free(l.ptr);
        }
    }
}

/// One heap for every case (a primary per case would dominate the run), owned by the test so
/// that its runtime directory goes when the test ends.
#[test]
fn heap_matches_its_model() {
    let dir = TestDir::new("mphm");
    let p = common::primary(&dir, MemOptions::new().no_huge());
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 150,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    });
    let r = runner.run(&proptest::collection::vec(op(), 1..60), |ops| {
        run_case(&p.heap, ops)
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

fn run_case(h: &Heap<MpChannel>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        h.stats(0).unwrap().alloc_count,
        0,
        "a case starts on an empty heap"
    );
    let mut lives = Lives { h, v: Vec::new() };
    let live = &mut lives.v;
    let mut tag = 1u8;
    for o in ops {
        tag = tag.wrapping_add(1).max(1);
        match o {
            Op::Malloc {
                size,
                align_log,
                zero,
            } => {
                let align = 1usize << align_log;
                let p = if zero {
                    h.zmalloc(size, align)
                } else {
                    h.malloc(size, align)
                }
                .unwrap();
                if zero {
                    // SAFETY: a fresh allocation of `size` bytes.
                    let s = unsafe { std::slice::from_raw_parts(p.as_ptr(), size) };
                    prop_assert!(s.iter().all(|&b| b == 0), "zmalloc not zeroed");
                }
                add_live(live, p, size, align, tag);
            }
            Op::Realloc {
                pick,
                size,
                align_log,
            } if !live.is_empty() => {
                let i = pick % live.len();
                let align = 1usize << align_log;
                let old = live.swap_remove(i);
                prop_assert!(filled(&old), "block lost its contents before realloc");
                let p = h.realloc(Some(old.ptr), size, align).unwrap();
                let keep = old.size.min(size);
                // SAFETY: the block holds at least `keep` bytes.
                let s = unsafe { std::slice::from_raw_parts(p.as_ptr(), keep) };
                prop_assert!(s.iter().all(|&b| b == old.fill), "realloc lost contents");
                add_live(live, p, size, align, tag);
            }
            Op::Free { pick } if !live.is_empty() => {
                let l = live.swap_remove(pick % live.len());
                prop_assert!(filled(&l), "block lost its contents");
                h.free(l.ptr).unwrap();
            }
            _ => {}
        }
        // Invariants after every step.
        let mut spans: Vec<(usize, usize)> = live
            .iter()
            .map(|l| (l.ptr.as_ptr() as usize, l.size))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            prop_assert!(w[0].0 + w[0].1 <= w[1].0, "overlap {:x?}", w);
        }
        for l in live.iter() {
            prop_assert_eq!(l.ptr.as_ptr() as usize % l.align.max(32), 0);
        }
        let st = h.stats(0).unwrap();
        prop_assert_eq!(st.alloc_count as usize, live.len());
        prop_assert_eq!(
            st.requested as usize,
            live.iter().map(|l| l.size).sum::<usize>()
        );
    }
    for l in live.iter() {
        prop_assert!(filled(l));
    }
    for l in std::mem::take(live) {
        h.free(l.ptr).unwrap();
    }
    prop_assert_eq!(h.validate(), Ok(()));
    let st = h.stats(0).unwrap();
    prop_assert_eq!(
        (st.alloc_count, st.heap_size, st.regions),
        (0, 0, 0),
        "{:?}",
        st
    );
    prop_assert_eq!(h.memory().total_used(), 0);
    Ok(())
}
