//! Action names: 1..=63 bytes of printable ASCII.
//!
//! A [`Name`] is validated once, at construction; everything that holds one can rely on it. On the
//! wire it occupies a 64-byte field, NUL-terminated, with zeros after the NUL.

use core::fmt;
use core::hash::{Hash, Hasher};

use crate::limits::{MAX_NAME_LEN, NAME_FIELD_LEN};
use crate::message::MessageError;

/// A validated action name.
#[derive(Clone, Copy)]
pub struct Name {
    len: u8,
    bytes: [u8; MAX_NAME_LEN],
}

impl Name {
    /// Validates `s` as an action name.
    pub fn new(s: &str) -> Result<Self, MessageError> {
        Self::from_bytes(s.as_bytes())
    }

    /// Validates raw bytes (without a NUL) as an action name.
    pub fn from_bytes(b: &[u8]) -> Result<Self, MessageError> {
        if b.is_empty() {
            return Err(MessageError::EmptyName);
        }
        if b.len() > MAX_NAME_LEN {
            return Err(MessageError::NameTooLong { len: b.len() });
        }
        if let Some(offset) = b.iter().position(|&c| !is_printable(c)) {
            return Err(MessageError::NameNotPrintable {
                offset,
                byte: b[offset],
            });
        }
        let mut bytes = [0u8; MAX_NAME_LEN];
        bytes[..b.len()].copy_from_slice(b);
        Ok(Name {
            len: b.len() as u8,
            bytes,
        })
    }

    /// A name from bytes the caller has checked already: non-empty printable ASCII, at most
    /// `MAX_NAME_LEN` bytes (a decoded datagram's name field, validated while parsing).
    #[inline]
    pub(crate) fn from_checked(b: &[u8]) -> Self {
        debug_assert!(Self::from_bytes(b).is_ok());
        let len = b.len().min(MAX_NAME_LEN);
        let mut bytes = [0u8; MAX_NAME_LEN];
        bytes[..len].copy_from_slice(&b[..len]);
        Name {
            len: len as u8,
            bytes,
        }
    }

    /// The name's bytes (no NUL).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        // Printable ASCII is valid UTF-8; the fallback is unreachable but keeps this panic-free.
        core::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    /// Length in bytes.
    #[allow(clippy::len_without_is_empty)] // a Name is never empty
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// The 64-byte wire field: the name, a NUL, zeros.
    pub fn to_field(&self) -> [u8; NAME_FIELD_LEN] {
        let mut f = [0u8; NAME_FIELD_LEN];
        f[..self.len()].copy_from_slice(self.as_bytes());
        f
    }
}

/// Printable ASCII: space through tilde.
pub(crate) const fn is_printable(c: u8) -> bool {
    c >= 0x20 && c <= 0x7e
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl Eq for Name {}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Name {
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<&str> for Name {
    type Error = MessageError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Name::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(Name::new(""), Err(MessageError::EmptyName));
        let long = [b'a'; 64];
        assert_eq!(
            Name::from_bytes(&long),
            Err(MessageError::NameTooLong { len: 64 })
        );
        assert!(Name::from_bytes(&long[..63]).is_ok());
        assert_eq!(
            Name::new("a\u{7f}"),
            Err(MessageError::NameNotPrintable {
                offset: 1,
                byte: 0x7f
            })
        );
        assert_eq!(
            Name::from_bytes(b"ab\0"),
            Err(MessageError::NameNotPrintable { offset: 2, byte: 0 })
        );
        let n = Name::new("mp_malloc_sync").unwrap();
        assert_eq!(n.as_str(), "mp_malloc_sync");
        let f = n.to_field();
        assert_eq!(&f[..14], b"mp_malloc_sync");
        assert!(f[14..].iter().all(|&b| b == 0));
    }
}
