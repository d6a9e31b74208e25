//! The action registry: which handler answers which name.
//!
//! A fixed-capacity hash map from [`Name`] to a handler `H` (whatever the host calls: a boxed
//! closure, an index, a function pointer). Lookup hashes the name once and compares it with at
//! most a few candidates: O(1) expected, never a scan of every registered string. Registering a
//! name twice is refused ([`RegistryError::Duplicate`], DPDK's `EEXIST`); a full registry says so
//! ([`RegistryError::Full`]).

use core::fmt;

use heapless::index_map::FnvIndexMap;

use crate::name::Name;

/// Why a registration failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistryError {
    /// An action with this name is already registered.
    Duplicate(Name),
    /// The registry holds its maximum number of actions.
    Full {
        /// The capacity.
        capacity: usize,
    },
    /// No action with this name is registered.
    NotFound(Name),
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::Duplicate(n) => write!(f, "action {n} is already registered"),
            RegistryError::Full { capacity } => {
                write!(f, "action registry is full ({capacity} actions)")
            }
            RegistryError::NotFound(n) => write!(f, "no action named {n}"),
        }
    }
}

impl core::error::Error for RegistryError {}

/// A fixed-capacity map of action names to handlers. `N` must be a power of two.
pub struct ActionRegistry<H, const N: usize> {
    map: FnvIndexMap<Name, H, N>,
}

impl<H, const N: usize> Default for ActionRegistry<H, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<H, const N: usize> ActionRegistry<H, N> {
    /// An empty registry.
    pub const fn new() -> Self {
        ActionRegistry {
            map: FnvIndexMap::new(),
        }
    }

    /// Registers `handler` under `name`.
    pub fn register(&mut self, name: Name, handler: H) -> Result<(), RegistryError> {
        if self.map.contains_key(&name) {
            return Err(RegistryError::Duplicate(name));
        }
        match self.map.insert(name, handler) {
            Ok(_) => Ok(()),
            Err(_) => Err(RegistryError::Full { capacity: N }),
        }
    }

    /// Removes and returns the handler registered under `name`.
    pub fn unregister(&mut self, name: &Name) -> Result<H, RegistryError> {
        self.map
            .swap_remove(name)
            .ok_or(RegistryError::NotFound(*name))
    }

    /// The handler for `name`, if any.
    pub fn get(&self, name: &Name) -> Option<&H> {
        self.map.get(name)
    }

    /// Number of registered actions.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no action is registered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The capacity.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// The registered names, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &Name> {
        self.map.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn register_lookup_unregister() {
        let mut r: ActionRegistry<u32, 4> = ActionRegistry::new();
        r.register(n("a"), 1).unwrap();
        r.register(n("b"), 2).unwrap();
        assert_eq!(r.register(n("a"), 3), Err(RegistryError::Duplicate(n("a"))));
        assert_eq!(r.get(&n("a")), Some(&1));
        assert_eq!(r.get(&n("c")), None);
        r.register(n("c"), 3).unwrap();
        r.register(n("d"), 4).unwrap();
        assert_eq!(
            r.register(n("e"), 5),
            Err(RegistryError::Full { capacity: 4 })
        );
        assert_eq!(r.unregister(&n("b")), Ok(2));
        assert_eq!(r.unregister(&n("b")), Err(RegistryError::NotFound(n("b"))));
        r.register(n("e"), 5).unwrap();
        assert_eq!(r.get(&n("e")), Some(&5));
        assert_eq!(r.get(&n("d")), Some(&4));
        assert_eq!(r.len(), 4);
    }
}
