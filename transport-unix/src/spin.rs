//! Adaptive busy polling before a blocking receive.
//!
//! Waking a thread that sleeps on an idle CPU is slow on a virtual machine whose guest does not
//! halt-poll: the sleeping vCPU has halted and the host must run it again (a bare AF_UNIX
//! ping-pong between two processes free to use both CPUs of the project's VM takes 90-120 us a
//! round trip, against 5 us when both sides poll instead of sleeping, and the sleeping version
//! also burns more CPU: 35 us against 6 us a round trip). A thread that expects a datagram soon
//! (the receiving thread, a synchronous requester) therefore first polls its socket without
//! blocking, for a short window, and blocks only if nothing came.
//!
//! The window adapts, so that a channel that is quiet does not burn CPU:
//! - a datagram caught while polling opens the window to its maximum;
//! - a poll that ends empty halves it, down to closed;
//! - while it is closed, one wait in [`PROBE_EVERY`] polls for the maximum again, to notice
//!   that datagrams come close together again;
//! - a poll that finds it lost its CPU for a while (another thread, maybe the very peer it is
//!   waiting for, needed it: more runnable threads than CPUs) stops and closes the window.
//!
//! A thread that may run on one CPU only never polls: there, polling would only keep the peer
//! it waits for off the CPU.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use memplane_core::time::Instant;

use crate::clock::now;

/// How often a thread's CPU affinity is read again.
const AFFINITY_RECHECK: Duration = Duration::from_secs(1);

thread_local! {
    /// This thread may run on more than one CPU, and when that was last read.
    static MULTI_CPU: Cell<Option<(bool, Instant)>> = const { Cell::new(None) };
}

/// Whether the calling thread may run on more than one CPU (read at most once a second).
fn may_use_two_cpus(at: Instant) -> bool {
    MULTI_CPU.with(|c| match c.get() {
        Some((yes, when)) if at.saturating_duration_since(when) < AFFINITY_RECHECK => yes,
        _ => {
            let yes = rustix::thread::sched_getaffinity(None).is_ok_and(|s| s.count() >= 2);
            c.set(Some((yes, at)));
            yes
        }
    })
}

/// While the window is closed, every this many waits one polls for the whole maximum, to see
/// whether datagrams come close together again.
const PROBE_EVERY: u32 = 8;

/// A gap this long between two looks at the socket means the polling thread was preempted.
const PREEMPTED: Duration = Duration::from_micros(10);

/// What the polls of a channel's waiting sites did, summed over all of them.
#[derive(Debug, Default)]
pub(crate) struct SpinStats {
    /// Polls started (a closed window that did not probe is none).
    pub(crate) polls: AtomicU64,
    /// Polls that caught a datagram (the wait ended without sleeping).
    pub(crate) caught: AtomicU64,
    /// Time spent polling, in nanoseconds: CPU time the waits would otherwise have slept.
    pub(crate) nanos: AtomicU64,
}

/// One waiting site's polling window (the receiving thread's, or a request socket's).
#[derive(Debug)]
pub(crate) struct Spinner {
    /// The longest window; zero turns polling off.
    max: Duration,
    /// The window now.
    window: Duration,
    /// Waits since the window closed or since the last probe.
    closed_waits: u32,
    /// A gap between two looks this long means the thread was preempted ([`PREEMPTED`]).
    preempted: Duration,
    /// Where its polls are counted.
    stats: Arc<SpinStats>,
}

impl Spinner {
    /// A spinner whose window never exceeds `max` (zero: never poll); it starts open. Its polls
    /// are counted in `stats`.
    pub(crate) fn new(max: Duration, stats: Arc<SpinStats>) -> Self {
        Spinner {
            stats,
            max,
            window: max,
            closed_waits: 0,
            preempted: PREEMPTED,
        }
    }

    /// Polls `try_once` until it returns `Some`, the window ends or `stop` says so (given the
    /// time the loop just read), and adapts the window: a catch opens it fully, a miss halves
    /// it. Returns what it got; on `None` the caller blocks.
    pub(crate) fn poll<T>(
        &mut self,
        try_once: impl FnMut() -> Option<T>,
        stop: impl Fn(Instant) -> bool,
    ) -> Option<T> {
        let (got, spent) = self.poll_counted(try_once, stop);
        if let Some(spent) = spent {
            let st = &self.stats;
            st.polls.fetch_add(1, Ordering::Relaxed);
            if got.is_some() {
                st.caught.fetch_add(1, Ordering::Relaxed);
            }
            st.nanos
                .fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
        }
        got
    }

    /// [`Spinner::poll`], also saying how long it polled (`None`: it did not poll), from the
    /// clock readings the loop takes anyway (a catch counts up to the look before it).
    fn poll_counted<T>(
        &mut self,
        mut try_once: impl FnMut() -> Option<T>,
        stop: impl Fn(Instant) -> bool,
    ) -> (Option<T>, Option<Duration>) {
        if self.max.is_zero() {
            return (None, None);
        }
        let mut window = self.window;
        if window.is_zero() {
            self.closed_waits += 1;
            if self.closed_waits < PROBE_EVERY {
                return (None, None);
            }
            self.closed_waits = 0;
            window = self.max;
        }
        let start = now();
        if !may_use_two_cpus(start) {
            return (None, None);
        }
        let end = start.saturating_add(window);
        let mut last = start;
        loop {
            if let Some(v) = try_once() {
                self.window = self.max;
                return (Some(v), Some(last.saturating_duration_since(start)));
            }
            let t = now();
            if stop(t) {
                return (None, Some(t.saturating_duration_since(start)));
            }
            if t.saturating_duration_since(last) >= self.preempted {
                // The thread lost its CPU while polling: another thread wanted it, maybe the
                // very peer it polls for. Polling keeps others off the CPUs here: stop.
                self.window = Duration::ZERO;
                self.closed_waits = 0;
                return (None, Some(t.saturating_duration_since(start)));
            }
            last = t;
            if t >= end {
                self.window = if self.window < Duration::from_micros(2) {
                    Duration::ZERO
                } else {
                    self.window / 2
                };
                return (None, Some(t.saturating_duration_since(start)));
            }
            std::hint::spin_loop();
        }
    }

    /// Sets the gap that counts as preemption (tests, which may lose their CPU at any time).
    #[cfg(test)]
    fn preempted_after(mut self, d: Duration) -> Self {
        self.preempted = d;
        self
    }

    /// The window now (for tests).
    #[cfg(test)]
    pub(crate) fn window(&self) -> Duration {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `s` where a datagram is always there; returns how many looks it took (0 when it
    /// did not poll at all, and then it must have caught nothing).
    fn looks(s: &mut Spinner) -> usize {
        let mut calls = 0;
        let got = s.poll(
            || {
                calls += 1;
                Some(())
            },
            |_| false,
        );
        assert_eq!(got.is_some(), calls > 0);
        calls
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let mut s = Spinner::new(Duration::ZERO, Arc::default());
        for _ in 0..2 * PROBE_EVERY {
            assert_eq!(looks(&mut s), 0);
        }
    }

    /// Runs `f` on a thread that may use every CPU of this machine, or returns false when this
    /// machine (or the test's affinity) offers only one.
    fn on_two_cpus(f: impl FnOnce() + Send + 'static) -> bool {
        std::thread::spawn(move || {
            let mut all = rustix::thread::CpuSet::new();
            for i in 0..rustix::thread::CpuSet::MAX_CPU {
                all.set(i);
            }
            let _ = rustix::thread::sched_setaffinity(None, &all);
            if !may_use_two_cpus(now()) {
                return false;
            }
            f();
            true
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_catch_opens_the_window_and_empty_polls_close_it_until_a_probe() {
        let ran = on_two_cpus(|| {
            let max = Duration::from_millis(2);
            let stats = Arc::new(SpinStats::default());
            let mut s = Spinner::new(max, stats.clone()).preempted_after(Duration::from_secs(3600));
            let counted = || {
                (
                    stats.polls.load(Ordering::Relaxed),
                    stats.caught.load(Ordering::Relaxed),
                )
            };
            assert_eq!(s.window(), max, "starts open");
            // Something there on the third look is caught.
            let mut calls = 0;
            let got = s.poll(
                || {
                    calls += 1;
                    (calls == 3).then_some(7)
                },
                |_| false,
            );
            assert_eq!((got, calls), (Some(7), 3));
            assert_eq!(s.window(), max);
            assert_eq!(counted(), (1, 1));
            // Empty polls halve the window, down to closed.
            let mut rounds = 0;
            while !s.window().is_zero() {
                let before = s.window();
                assert!(s.poll(|| None::<()>, |_| false).is_none());
                assert_eq!(
                    s.window(),
                    before / 2 * u32::from(before >= Duration::from_micros(2))
                );
                rounds += 1;
                assert!(rounds < 40, "the window never closed");
            }
            assert_eq!(counted(), (1 + rounds, 1), "every empty poll is counted");
            assert!(stats.nanos.load(Ordering::Relaxed) >= max.as_nanos() as u64);
            // Closed: PROBE_EVERY - 1 waits do not look at all, the next polls (a probe), and
            // a catch on the probe opens the window again.
            for _ in 0..PROBE_EVERY - 1 {
                assert_eq!(looks(&mut s), 0, "a closed window does not poll");
            }
            assert_eq!(s.poll(|| Some(1), |_| false), Some(1), "the probe polls");
            assert_eq!(
                counted(),
                (2 + rounds, 2),
                "closed waits are not polls, the probe is"
            );
            assert_eq!(s.window(), max, "a caught probe reopens the window");
            // `stop` ends a poll at once and leaves the window as it was.
            assert!(s.poll(|| None::<()>, |_| true).is_none());
            assert_eq!(s.window(), max);
        });
        if !ran {
            eprintln!("SKIPPED (partly): one CPU only: polling is off here by design");
        }
    }

    #[test]
    fn a_poll_that_loses_its_cpu_closes_the_window() {
        let ran = on_two_cpus(|| {
            // Every gap counts as preemption here: the first empty look closes the window.
            let mut s = Spinner::new(Duration::from_millis(5), Arc::default())
                .preempted_after(Duration::ZERO);
            assert!(s.poll(|| None::<()>, |_| false).is_none());
            assert_eq!(s.window(), Duration::ZERO);
        });
        if !ran {
            eprintln!("SKIPPED: one CPU only: polling is off here by design");
        }
    }

    #[test]
    fn a_thread_bound_to_one_cpu_never_polls() {
        std::thread::spawn(|| {
            let mut one = rustix::thread::CpuSet::new();
            let cpu = rustix::thread::sched_getaffinity(None)
                .ok()
                .and_then(|s| (0..rustix::thread::CpuSet::MAX_CPU).find(|&i| s.is_set(i)))
                .unwrap_or(0);
            one.set(cpu);
            rustix::thread::sched_setaffinity(None, &one).unwrap();
            let mut s = Spinner::new(Duration::from_millis(1), Arc::default());
            assert_eq!(looks(&mut s), 0);
        })
        .join()
        .unwrap();
    }
}
