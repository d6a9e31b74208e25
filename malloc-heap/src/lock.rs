//! A lock in shared memory that survives the death of its holder, and costs one atomic
//! compare-and-swap to take and a plain store to release when nobody else wants it.
//!
//! The lock word holds the holder's identity: its pid and its process start time (so a new
//! process that reuses a dead holder's pid is not taken for it). Taking a free lock is one
//! compare-and-swap. A waiter spins briefly, then sleeps on a futex with a short timeout; each
//! time it wakes without the lock it asks the kernel whether the holder still lives. If not, it
//! takes the lock over and is told so (as `EOWNERDEAD` tells a robust pthread mutex's locker):
//! it repairs what the lock protects and calls [`Guard::mark_consistent`]; dropping the guard
//! without that makes the lock unusable, on purpose. Nobody hangs behind a dead holder (DPDK's
//! heap spinlock deadlocks every process then), and nobody pays for a robust pthread mutex's
//! bookkeeping (about 20 ns a lock and unlock here, against a few for this one).
//!
//! Releasing is a store of 0 and a look at the waiter count. Those two must not be reordered
//! (else a waiter that registers in between sleeps through the release), which on x86 costs a
//! locked instruction, as much as the compare-and-swap that took the lock. Here the waiter pays
//! instead, as userspace RCU does: every process that takes the lock registers for the
//! kernel's global expedited `membarrier(2)`, and a waiter, once it has counted itself, runs
//! one, which puts a full barrier into every thread of those processes that is running. After
//! it, a release either shows its 0 to the waiter or sees the waiter counted. A process that
//! cannot register (a kernel before 4.16, a seccomp filter) releases with a full barrier of
//! its own, and a waiter whose `membarrier` fails sleeps in short slices instead, so a missed
//! wake costs it a slice, never a hang.
//!
//! A holder is a process, not a thread: the lock is not recursive, and a thread must not exit
//! holding it (a Rust thread that panics drops its guard).
//!
//! Under `cfg(loom)` the lock's atomics are loom's, a futex is a loom condition variable with
//! no timeout (so that a wake-up the protocol loses is a deadlock loom reports, not a 10 ms
//! delay), and releases take the fenced path: `malloc-heap/tests/loom_lock.rs` checks the
//! protocol under every interleaving. Loom cannot model `membarrier(2)`, so the fenceless
//! release rests on the argument above, as userspace RCU's does.

#[cfg(loom)]
use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::fmt;
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::Duration;

/// Why a lock could not be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockError {
    /// A holder died and the state was never repaired: the lock is unusable.
    NotRecoverable,
    /// Another error from the lock (errno).
    Os(i32),
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::NotRecoverable => f.write_str(
                "a process died holding the heap lock and the heap could not be repaired",
            ),
            LockError::Os(e) => write!(f, "heap lock failed with errno {e}"),
        }
    }
}

impl std::error::Error for LockError {}

/// Bits of the owner word that hold the pid (Linux pids are below 2^22).
const PID_BITS: u32 = 22;
const PID_MASK: u64 = (1 << PID_BITS) - 1;
/// Spins before sleeping: a heap operation holds the lock for well under a microsecond (one
/// under loom, where every spin is a step of the model).
const SPINS: u32 = if cfg!(loom) { 1 } else { 200 };
/// How long a waiter sleeps before it checks that the holder still lives.
const CHECK_EVERY: Duration = Duration::from_millis(10);
/// How long a waiter sleeps at a time when it could not run its `membarrier` (a release may
/// then miss it: it finds out after this long).
const SLICE_WITHOUT_BARRIER: Duration = Duration::from_micros(200);

/// Waits that timed out although the lock had been released without a wake (tests only).
#[cfg(test)]
static MISSED_WAKES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

const CONSISTENT: u32 = 0;
const NOT_RECOVERABLE: u32 = 1;

/// A robust, process-shared mutex. Lives in shared memory, `#[repr(C)]`; all zeroes is an
/// unlocked, consistent lock.
#[repr(C)]
pub struct RobustMutex {
    /// 0 when free; else the holder's identity (`pid | start time << 22`).
    owner: AtomicU64,
    /// How many wait (or are about to): an unlock wakes one when this is not zero.
    waiters: AtomicU32,
    /// Bumped by every unlock that wakes someone: the futex word the waiters sleep on.
    seq: AtomicU32,
    /// [`CONSISTENT`], or [`NOT_RECOVERABLE`] once a recovery was not completed.
    state: AtomicU32,
    _pad: u32,
}

impl RobustMutex {
    /// Initialises the mutex in place.
    ///
    /// # Safety
    /// `this` must point to writable memory for a `RobustMutex`, that no process uses as a lock
    /// yet (typically a freshly created shared file).
    pub unsafe fn init(this: *mut RobustMutex) -> Result<(), LockError> {
        // SAFETY: the memory is writable and unused (caller's guarantee); the fields are plain
        // atomics, for which all zeroes is the unlocked, consistent state.
        unsafe {
            this.write(RobustMutex {
                owner: AtomicU64::new(0),
                waiters: AtomicU32::new(0),
                seq: AtomicU32::new(0),
                state: AtomicU32::new(CONSISTENT),
                _pad: 0,
            })
        };
        Ok(())
    }

    /// Locks. The guard says whether the previous holder died holding it: then the caller must
    /// repair the protected state and call [`Guard::mark_consistent`] before dropping it.
    #[inline]
    pub fn lock(&self) -> Result<Guard<'_>, LockError> {
        self.lock_as(identity::own())
    }

    /// [`RobustMutex::lock`] as the holder `me` (a loom model's threads stand for processes).
    #[cfg(loom)]
    #[doc(hidden)]
    pub fn lock_as_holder(&self, me: u64) -> Result<Guard<'_>, LockError> {
        self.lock_as(me)
    }

    #[inline]
    fn lock_as(&self, me: u64) -> Result<Guard<'_>, LockError> {
        if self
            .owner
            .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return self.taken(false);
        }
        self.lock_slow(me)
    }

    #[inline]
    fn taken(&self, recovered: bool) -> Result<Guard<'_>, LockError> {
        if !recovered && self.state.load(Ordering::Relaxed) == NOT_RECOVERABLE {
            self.unlock();
            return Err(LockError::NotRecoverable);
        }
        Ok(Guard { m: self, recovered })
    }

    #[cold]
    #[inline(never)]
    fn lock_slow(&self, me: u64) -> Result<Guard<'_>, LockError> {
        for _ in 0..SPINS {
            std::hint::spin_loop();
            if self.owner.load(Ordering::Relaxed) == 0
                && self
                    .owner
                    .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return self.taken(false);
            }
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence of a release that has one: either that release sees us counted,
        // or we see its 0 below. A release without one is ordered by the `membarrier` below.
        fence(Ordering::SeqCst);
        // Every release from now on sees us counted; one already under way has its 0 visible
        // once this returns (see the module doc).
        let nap = if barrier::heavy() {
            CHECK_EVERY
        } else {
            SLICE_WITHOUT_BARRIER
        };
        let r = loop {
            let seq = self.seq.load(Ordering::SeqCst);
            let cur = self.owner.load(Ordering::SeqCst);
            if cur == 0 {
                if self
                    .owner
                    .compare_exchange(0, me, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
                {
                    break self.taken(false);
                }
                continue;
            }
            let woken = futex::wait(&self.seq, seq, nap);
            #[cfg(test)]
            if !woken
                && self.owner.load(Ordering::SeqCst) == 0
                && self.seq.load(Ordering::SeqCst) == seq
            {
                // Slept a whole slice, and the lock is free with nobody having woken us: a
                // release did not see us counted.
                MISSED_WAKES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if !woken && !identity::alive(cur) {
                // The holder is gone: whoever swaps its identity for their own recovers.
                if self
                    .owner
                    .compare_exchange(cur, me, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
                {
                    break self.taken(true);
                }
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        r
    }

    #[inline]
    fn unlock(&self) {
        if barrier::light() {
            // Registered for membarrier: a waiter's barrier orders this store and the load
            // below for us; only the compiler must keep them in order.
            self.owner.store(0, Ordering::Release);
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
        } else {
            // The store must be visible before the look at the waiters: a full fence, which
            // pairs with the one a waiter runs once it has counted itself.
            self.owner.store(0, Ordering::Release);
            fence(Ordering::SeqCst);
        }
        if self.waiters.load(Ordering::SeqCst) != 0 {
            self.wake();
        }
    }

    #[cold]
    fn wake(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        futex::wake_one(&self.seq);
    }
}

/// A held [`RobustMutex`]; unlocks on drop.
pub struct Guard<'a> {
    m: &'a RobustMutex,
    recovered: bool,
}

impl Guard<'_> {
    /// Whether the previous holder died holding the lock.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// Declares the protected state repaired (after a recovery).
    pub fn mark_consistent(&mut self) {
        self.recovered = false;
    }
}

impl Drop for Guard<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.recovered {
            // Not repaired: nobody may trust the state again.
            self.m.state.store(NOT_RECOVERABLE, Ordering::Relaxed);
        }
        self.m.unlock();
    }
}

/// Who holds a lock: this process's identity, and whether a holder still lives.
mod identity {
    use super::{PID_BITS, PID_MASK};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// This process's identity, computed once (and again in a forked child).
    static OWN: AtomicU64 = AtomicU64::new(0);
    static OWN_PID: AtomicU64 = AtomicU64::new(0);

    /// The identity a lock held by this process carries.
    #[inline]
    pub fn own() -> u64 {
        let id = OWN.load(Ordering::Relaxed);
        if id != 0 {
            return id;
        }
        compute()
    }

    #[cold]
    fn compute() -> u64 {
        let pid = std::process::id();
        // Without /proc the start time is unknown: the lock then still works, but a dead
        // holder is never recognised (see `alive`).
        let start = start_time(pid).unwrap_or(0);
        let id = u64::from(pid) | start << PID_BITS;
        // Before the first lock: this process's releases may then skip their fence.
        super::barrier::register();
        OWN.store(id, Ordering::Relaxed);
        if OWN_PID.swap(u64::from(pid), Ordering::Relaxed) == 0 {
            // A forked child must not lock with its parent's identity.
            // SAFETY: `forget` is a plain extern "C" fn with no arguments, safe to run in the
            // child after fork (it only stores to atomics).
            unsafe { libc::pthread_atfork(None, None, Some(forget)) };
        }
        id
    }

    extern "C" fn forget() {
        OWN.store(0, Ordering::Relaxed);
        // A new process: registered again (if it can) at its first lock.
        super::barrier::forget();
    }

    /// The state letter and start time of process `pid` (`/proc/<pid>/stat` fields 3 and 22;
    /// the start time in clock ticks after boot).
    fn stat(pid: u32) -> Option<(u8, u64)> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
        let mut f = s[s.rfind(')')? + 1..].split_ascii_whitespace();
        let state = *f.next()?.as_bytes().first()?;
        Some((state, f.nth(18)?.parse().ok()?))
    }

    /// The start time of process `pid`.
    pub(super) fn start_time(pid: u32) -> Option<u64> {
        stat(pid).map(|(_, t)| t)
    }

    /// Whether the process `id` names still lives: the same process (not one reusing its pid),
    /// and not a zombie (dead, not reaped yet) unless other threads of it still run.
    pub fn alive(id: u64) -> bool {
        let pid = (id & PID_MASK) as u32;
        let start = id >> PID_BITS;
        match stat(pid) {
            Some((state, s)) if s == start => {
                !(matches!(state, b'Z' | b'X')
                    && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()) <= 1)
            }
            Some(_) => false,
            // No /proc entry: gone, unless /proc itself is unreadable (then assume alive, and
            // never take a live holder's lock).
            None => !std::path::Path::new("/proc/self/stat").exists(),
        }
    }
}

/// Under loom: no `membarrier`, every release takes the fenced path.
#[cfg(loom)]
mod barrier {
    pub fn register() {}
    pub fn forget() {}
    pub fn light() -> bool {
        false
    }
    pub fn heavy() -> bool {
        true
    }
}

/// The asymmetric fence: releases that cost a compiler fence, and a waiter that pays with
/// `membarrier(2)` (see the module doc).
#[cfg(not(loom))]
mod barrier {
    use std::sync::atomic::{AtomicBool, Ordering};

    // The kernel's command numbers (include/uapi/linux/membarrier.h).
    const CMD_QUERY: libc::c_long = 0;
    const CMD_GLOBAL_EXPEDITED: libc::c_long = 1 << 1;
    const CMD_REGISTER_GLOBAL_EXPEDITED: libc::c_long = 1 << 2;

    /// Whether this process is registered: its releases skip the fence.
    static REGISTERED: AtomicBool = AtomicBool::new(false);

    fn membarrier(cmd: libc::c_long) -> libc::c_long {
        // SAFETY: membarrier takes two integer arguments and touches no memory of ours.
        unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_long) }
    }

    /// The commands the kernel offers (negative if none).
    pub fn query() -> libc::c_long {
        membarrier(CMD_QUERY)
    }

    /// Registers this process for global expedited barriers, if the kernel offers them.
    pub fn register() {
        let cmds = query();
        let ok = cmds >= 0
            && cmds & (CMD_GLOBAL_EXPEDITED | CMD_REGISTER_GLOBAL_EXPEDITED)
                == CMD_GLOBAL_EXPEDITED | CMD_REGISTER_GLOBAL_EXPEDITED
            && membarrier(CMD_REGISTER_GLOBAL_EXPEDITED) == 0;
        REGISTERED.store(ok, Ordering::SeqCst);
    }

    /// After a fork: the child has not registered (yet).
    pub fn forget() {
        REGISTERED.store(false, Ordering::SeqCst);
    }

    /// Whether a release may skip its fence.
    #[inline(always)]
    pub fn light() -> bool {
        REGISTERED.load(Ordering::Relaxed)
    }

    /// A full barrier in every running thread of every registered process; false if the
    /// kernel refused (then no release can be relied on to be seen or to see us).
    pub fn heavy() -> bool {
        membarrier(CMD_GLOBAL_EXPEDITED) == 0
    }
}

/// Under loom: how many times a waiter went to sleep, over all of a model's runs (so that a
/// test can tell it explored the sleeping path).
#[cfg(loom)]
#[doc(hidden)]
pub static SLEPT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Under loom, the futex: one sleeping place (a loom mutex and condition variable) for the
/// model's one lock. A waiter checks the word and sleeps under that mutex, and a waker takes it
/// to notify, so a wake-up after the check always finds the waiter asleep, as with a futex.
/// No timeout: a waiter nobody wakes sleeps forever, and loom reports the deadlock.
#[cfg(loom)]
mod futex {
    use loom::sync::atomic::{AtomicU32, Ordering};
    use loom::sync::{Condvar, Mutex};
    use std::time::Duration;

    loom::lazy_static! {
        static ref PARK: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());
    }

    /// Sleeps while `word` holds `expected`, until woken; always true (woken or changed).
    pub fn wait(word: &AtomicU32, expected: u32, _timeout: Duration) -> bool {
        let (m, cv) = &*PARK;
        let g = m.lock().unwrap();
        if word.load(Ordering::SeqCst) == expected {
            super::SLEPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(cv.wait(g).unwrap());
        }
        true
    }

    /// Wakes one sleeper.
    pub fn wake_one(_word: &AtomicU32) {
        let (m, cv) = &*PARK;
        let _g = m.lock().unwrap();
        cv.notify_one();
    }
}

/// The two futex operations the lock needs.
#[cfg(not(loom))]
mod futex {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    /// Sleeps while `word` holds `expected`, at most `timeout`; true if woken (or the word had
    /// changed), false on timeout.
    pub fn wait(word: &AtomicU32, expected: u32, timeout: Duration) -> bool {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `word` is a live, 4-byte aligned u32 in memory mapped by this process (shared
        // memory, hence no FUTEX_PRIVATE_FLAG); `ts` outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                &ts as *const libc::timespec,
            )
        };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ETIMEDOUT)
    }

    /// Wakes one sleeper on `word`.
    pub fn wake_one(word: &AtomicU32) {
        // SAFETY: as in `wait`; FUTEX_WAKE only reads the address.
        unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1) };
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn new_lock() -> Box<RobustMutex> {
        let mut b = Box::<RobustMutex>::new_uninit();
        // SAFETY: fresh, writable, unused memory for one RobustMutex.
        unsafe {
            RobustMutex::init(b.as_mut_ptr()).unwrap();
            b.assume_init()
        }
    }

    #[test]
    fn excludes_threads_and_wakes_them() {
        let m = Arc::new(new_lock());
        let count = Arc::new(AtomicU64::new(0));
        let ts: Vec<_> = (0..4)
            .map(|_| {
                let (m, count) = (m.clone(), count.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        let g = m.lock().unwrap();
                        // A non-atomic read-modify-write under the lock: lost updates would
                        // show in the total.
                        let v = count.load(Ordering::Relaxed);
                        count.store(v + 1, Ordering::Relaxed);
                        drop(g);
                    }
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        assert_eq!(count.load(Ordering::Relaxed), 80_000);
        assert_eq!(m.owner.load(Ordering::Relaxed), 0);
        // Every release saw its sleeping waiters (the asymmetric fence of the module doc).
        assert_eq!(MISSED_WAKES.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn releases_skip_their_fence_where_the_kernel_has_membarrier() {
        let m = new_lock();
        drop(m.lock().unwrap());
        let cmds = barrier::query();
        if cmds < 0 {
            assert!(!barrier::light());
            memplane_testkit::skip(
                "releases_skip_their_fence_where_the_kernel_has_membarrier: membarrier(2) is not \
                 available here (releases keep their fence)",
            );
            return;
        }
        // Linux 4.16 and later: global expedited barriers; the first lock registered us.
        assert!(
            barrier::light(),
            "membarrier commands {cmds:#x}, yet not registered"
        );
        assert!(barrier::heavy());
    }

    #[test]
    fn a_dead_holder_is_recovered_once_and_an_unrepaired_lock_is_refused() {
        let m = new_lock();
        // A holder that no longer exists: pid 0 is never a process.
        m.owner.store(12345 << PID_BITS, Ordering::Relaxed);
        let mut g = m.lock().unwrap();
        assert!(g.recovered());
        g.mark_consistent();
        drop(g);
        assert!(!m.lock().unwrap().recovered());
        // Recovered but not repaired: unusable from then on.
        m.owner.store(12345 << PID_BITS, Ordering::Relaxed);
        let g = m.lock().unwrap();
        assert!(g.recovered());
        drop(g);
        assert_eq!(m.lock().err(), Some(LockError::NotRecoverable));
    }

    #[test]
    fn a_dead_unreaped_holder_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = identity::start_time(pid).expect("child's start time");
        let id = u64::from(pid) | start << PID_BITS;
        // Wait for it to exit but leave it a zombie (WNOWAIT): its /proc entry stays.
        // SAFETY: waitid on our own child with a zeroed siginfo it fills in.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        assert_eq!(r, 0);
        assert!(std::path::Path::new(&format!("/proc/{pid}/stat")).exists());
        assert!(!identity::alive(id), "a zombie holder must count as dead");
        child.wait().unwrap();
        assert!(!identity::alive(id));
    }

    #[test]
    fn a_reused_pid_is_not_the_holder() {
        let me = identity::own();
        assert!(identity::alive(me));
        // Our pid with another start time: a process that died before we reused its pid.
        let other = (me & PID_MASK) | ((me >> PID_BITS) + 1) << PID_BITS;
        assert!(!identity::alive(other));
    }
}
