//! The core's synchronisation shim.
//!
//! Every lock and atomic the core uses comes from here. Normally the lock is a
//! [`lock_api::Mutex`] over a raw mutex the host picks (`R`): a spin lock in `no_std`,
//! `parking_lot`'s futex-based one in the std transport. Under `cfg(loom)` the same names
//! resolve to loom's instrumented types so the model checker sees every interleaving; `R` is
//! then ignored. Loom types are never placed in shared memory: this module is for process-local
//! state only.

use core::marker::PhantomData;

pub use lock_api::RawMutex;

#[cfg(not(loom))]
pub use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The default raw lock of `no_std` users: a spinning mutex.
pub type SpinRawMutex = spin::mutex::SpinMutex<()>;

/// A mutex over `T` whose raw lock is `R` (loom's mutex under `cfg(loom)`).
pub struct Mutex<R, T> {
    #[cfg(not(loom))]
    inner: lock_api::Mutex<R, T>,
    #[cfg(loom)]
    inner: loom::sync::Mutex<T>,
    _raw: PhantomData<fn() -> R>,
}

/// The guard of [`Mutex`].
#[cfg(not(loom))]
pub type MutexGuard<'a, R, T> = lock_api::MutexGuard<'a, R, T>;
/// The guard of [`Mutex`].
#[cfg(loom)]
pub type MutexGuard<'a, R, T> = LoomGuard<'a, R, T>;

/// Under loom, a guard that carries the unused raw-lock parameter.
#[cfg(loom)]
pub struct LoomGuard<'a, R, T> {
    guard: loom::sync::MutexGuard<'a, T>,
    _raw: PhantomData<fn() -> R>,
}

#[cfg(loom)]
impl<R, T> core::ops::Deref for LoomGuard<'_, R, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

#[cfg(loom)]
impl<R, T> core::ops::DerefMut for LoomGuard<'_, R, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<R: RawMutex, T> Mutex<R, T> {
    /// A new unlocked mutex.
    pub fn new(value: T) -> Self {
        Mutex {
            #[cfg(not(loom))]
            inner: lock_api::Mutex::new(value),
            #[cfg(loom)]
            inner: loom::sync::Mutex::new(value),
            _raw: PhantomData,
        }
    }

    /// Locks, waiting as the raw lock waits.
    #[cfg(not(loom))]
    pub fn lock(&self) -> MutexGuard<'_, R, T> {
        self.inner.lock()
    }

    /// Locks, waiting as the raw lock waits.
    #[cfg(loom)]
    pub fn lock(&self) -> MutexGuard<'_, R, T> {
        LoomGuard {
            guard: self.inner.lock().unwrap_or_else(|e| e.into_inner()),
            _raw: PhantomData,
        }
    }
}
