//! Memory events: callbacks every process can register to hear about pages that were just
//! mapped ("allocated") or are about to be unmapped ("about to free").
//!
//! The list is copy-on-write: firing takes a snapshot and calls it without holding any lock, so
//! registering or unregistering is safe at any moment, even while memory changes or from inside
//! a callback. Callbacks run on the thread that changes the memory map, while the memory layer
//! holds its own lock: like DPDK's, they must not allocate from or free to the memory layer.

use std::sync::Arc;

use parking_lot::Mutex;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemEvent {
    /// `[addr, addr + len)` has just been mapped in this process.
    Alloc,
    /// `[addr, addr + len)` is about to be unmapped in this process.
    Free,
}

/// A memory event callback.
pub type EventFn = Arc<dyn Fn(MemEvent, u64, u64) + Send + Sync>;

/// The callbacks of one process.
#[derive(Default)]
pub struct EventRegistry {
    cbs: Mutex<Arc<Vec<(String, EventFn)>>>,
}

impl EventRegistry {
    /// Registers `f` under `name`; a name already registered is refused.
    pub fn register(&self, name: &str, f: EventFn) -> Result<(), String> {
        let mut g = self.cbs.lock();
        if g.iter().any(|(n, _)| n == name) {
            return Err(format!(
                "memory event callback {name:?} is already registered"
            ));
        }
        let mut v = (**g).clone();
        v.push((name.to_owned(), f));
        *g = Arc::new(v);
        Ok(())
    }

    /// Unregisters `name`; false if it was not registered.
    pub fn unregister(&self, name: &str) -> bool {
        let mut g = self.cbs.lock();
        let before = g.len();
        let v: Vec<_> = g.iter().filter(|(n, _)| n != name).cloned().collect();
        let removed = v.len() != before;
        *g = Arc::new(v);
        removed
    }

    /// Calls every callback registered now, in registration order.
    pub fn fire(&self, ev: MemEvent, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let snapshot = self.cbs.lock().clone();
        for (_, f) in snapshot.iter() {
            f(ev, addr, len);
        }
    }
}
