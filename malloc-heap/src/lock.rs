//! A lock in shared memory that survives the death of its holder.
//!
//! A `pthread_mutex_t` made process-shared and robust: if a process dies holding it, the next
//! locker is told (`EOWNERDEAD`), repairs what the lock protects, and marks it consistent.
//! Nobody hangs behind a dead holder (DPDK's heap spinlock deadlocks every process then).

use std::cell::UnsafeCell;
use std::fmt;

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

/// A robust, process-shared mutex. Lives in shared memory, `#[repr(C)]`.
#[repr(C)]
pub struct RobustMutex {
    m: UnsafeCell<libc::pthread_mutex_t>,
}

// SAFETY: a process-shared pthread mutex is made to be used concurrently from many threads and
// processes; all access goes through pthread calls.
unsafe impl Sync for RobustMutex {}
// SAFETY: as above; the value only names shared memory.
unsafe impl Send for RobustMutex {}

impl RobustMutex {
    /// Initialises the mutex in place.
    ///
    /// # Safety
    /// `this` must point to writable memory for a `RobustMutex`, that no process uses as a lock
    /// yet (typically a freshly created shared file).
    pub unsafe fn init(this: *mut RobustMutex) -> Result<(), LockError> {
        // SAFETY: attribute object on our stack, initialised before use, destroyed after; the
        // mutex memory is ours to initialise (caller's guarantee).
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            let r = libc::pthread_mutexattr_init(&mut attr);
            if r != 0 {
                return Err(LockError::Os(r));
            }
            let r1 = libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            let r2 = libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            let r3 = libc::pthread_mutex_init((*this).m.get(), &attr);
            libc::pthread_mutexattr_destroy(&mut attr);
            for r in [r1, r2, r3] {
                if r != 0 {
                    return Err(LockError::Os(r));
                }
            }
        }
        Ok(())
    }

    /// Locks. The guard says whether the previous holder died holding it: then the caller must
    /// repair the protected state and call [`Guard::mark_consistent`] before dropping it.
    pub fn lock(&self) -> Result<Guard<'_>, LockError> {
        // SAFETY: the mutex was initialised by `init` (a precondition of placing it in the
        // shared file), and lives as long as `self`.
        let r = unsafe { libc::pthread_mutex_lock(self.m.get()) };
        match r {
            0 => Ok(Guard {
                m: self,
                recovered: false,
            }),
            libc::EOWNERDEAD => Ok(Guard {
                m: self,
                recovered: true,
            }),
            libc::ENOTRECOVERABLE => Err(LockError::NotRecoverable),
            e => Err(LockError::Os(e)),
        }
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
        if self.recovered {
            // SAFETY: we hold the mutex, which came back EOWNERDEAD.
            unsafe {
                libc::pthread_mutex_consistent(self.m.m.get());
            }
            self.recovered = false;
        }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        // SAFETY: we hold the mutex (a guard exists only while locked). If the state was not
        // marked consistent after a recovery, unlocking makes it not-recoverable, on purpose.
        unsafe {
            libc::pthread_mutex_unlock(self.m.m.get());
        }
    }
}
