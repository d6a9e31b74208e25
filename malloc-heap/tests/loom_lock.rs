//! Loom model checks of the heap's robust lock ([`memplane_heap::lock::RobustMutex`]): its
//! taking, waiting and release protocol under every interleaving of a few contenders.
//!
//! What is checked, whatever the interleaving: no two holders at once (the protected counter is
//! a loom cell, which fails the model on any overlapping access), every holder's increment is
//! kept, and no contender sleeps through a release (a futex here has no timeout, so a lost
//! wake-up is a deadlock, which loom reports). Each test also counts, outside the model, how
//! often a contender went to sleep, so it cannot pass without exploring the sleeping path.
//!
//! Loom cannot model `membarrier(2)`: under `cfg(loom)` every release takes the fenced path
//! (the one a process that cannot register uses). A dead holder's recovery needs real
//! processes and is checked by `tests/heap.rs` (a process killed while holding the lock).
//! Only compiled under `--cfg loom`:
//!
//! `RUSTFLAGS="--cfg loom" cargo test -p memplane-heap --release --test loom_lock` (3 preemptions,
//! set in the test)
#![cfg(loom)]

use std::sync::atomic::Ordering::Relaxed;

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

use memplane_heap::lock::{RobustMutex, SLEPT};

/// Preemptions explored (CI's `LOOM_MAX_PREEMPTIONS` is 2 for the larger pending-table model).
const PREEMPTIONS: usize = 3;

/// A lock and the counter it protects.
struct Shared {
    m: Box<RobustMutex>,
    count: UnsafeCell<u32>,
}

// SAFETY: `count` is only touched under `m` (what the model checks).
unsafe impl Sync for Shared {}
// SAFETY: as above.
unsafe impl Send for Shared {}

fn shared() -> Arc<Shared> {
    let mut b = Box::<RobustMutex>::new_uninit();
    // SAFETY: fresh, writable memory for one RobustMutex that nothing uses yet.
    let m = unsafe {
        RobustMutex::init(b.as_mut_ptr()).unwrap();
        b.assume_init()
    };
    Arc::new(Shared {
        m,
        count: UnsafeCell::new(0),
    })
}

/// Takes the lock as holder `me` `times` times, adding one to the counter each time.
fn bump(s: &Shared, me: u64, times: u32) {
    for _ in 0..times {
        let g = s.m.lock_as_holder(me).unwrap();
        assert!(!g.recovered());
        // SAFETY: the lock is held (loom fails the model if another holder touches it now).
        s.count.with_mut(|c| unsafe { *c += 1 });
        drop(g);
    }
}

/// Runs `contenders` (holder id, times) against one lock and checks the count at the end.
fn run(contenders: &'static [(u64, u32)]) {
    SLEPT.store(0, Relaxed);
    // The lock's model is small: explore more preemptions than CI's default of 2.
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(PREEMPTIONS);
    b.check(move || {
        let s = shared();
        let (first, rest) = contenders.split_first().unwrap();
        let others: Vec<_> = rest
            .iter()
            .map(|&(me, times)| {
                let s = s.clone();
                thread::spawn(move || bump(&s, me, times))
            })
            .collect();
        bump(&s, first.0, first.1);
        for t in others {
            t.join().unwrap();
        }
        let total: u32 = contenders.iter().map(|c| c.1).sum();
        // SAFETY: every contender has finished.
        assert_eq!(s.count.with(|c| unsafe { *c }), total);
    });
    assert!(
        SLEPT.load(Relaxed) > 0,
        "no interleaving had a contender sleep: the waiting path was not explored"
    );
}

#[test]
fn two_holders_exclude_each_other_and_the_waiter_is_woken() {
    run(&[(1, 1), (2, 1)]);
}

#[test]
fn a_holder_that_takes_it_again_at_once_still_wakes_the_waiter() {
    run(&[(1, 2), (2, 1)]);
}

#[test]
fn three_holders_each_get_it() {
    run(&[(1, 1), (2, 1), (3, 1)]);
}
