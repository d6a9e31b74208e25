//! The message model: what a process sends to another, independent of any wire layout.
//!
//! A [`Message`] is a validated [`Name`], a [`Param`] blob of at most 256 bytes and a set of fds.
//! The fds belong to the transport: the core only sees them through the [`Fds`] trait, which
//! counts them. Dropping a message drops its fds (for the Unix transport: closes them).
//! The four [`MsgKind`]s are DPDK's.

use core::fmt;

use crate::limits::{MAX_FDS, MAX_NAME_LEN, MAX_PARAM_LEN};
use crate::name::Name;

/// What a datagram is, DPDK's `mp_type` codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum MsgKind {
    /// One-way message; no reply is expected.
    Msg = 0,
    /// Request: the receiving action answers with exactly one [`MsgKind::Reply`].
    Request = 1,
    /// Reply to a request, matched to it by (peer, name).
    Reply = 2,
    /// "Ignore me": sent by a process that has no action for a request yet (still initialising);
    /// the requester stops expecting a reply from it.
    Ignore = 3,
}

impl MsgKind {
    /// The kind for a wire code, if it is one of the four.
    pub const fn from_code(code: i32) -> Option<Self> {
        match code {
            0 => Some(MsgKind::Msg),
            1 => Some(MsgKind::Request),
            2 => Some(MsgKind::Reply),
            3 => Some(MsgKind::Ignore),
            _ => None,
        }
    }

    /// The wire code.
    pub const fn code(self) -> i32 {
        self as i32
    }

    /// True for the kinds that answer a request (reply and ignore).
    pub const fn is_answer(self) -> bool {
        matches!(self, MsgKind::Reply | MsgKind::Ignore)
    }
}

/// Why a message (or a piece of one) is not valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageError {
    /// The name is empty.
    EmptyName,
    /// The name is longer than 63 bytes.
    NameTooLong {
        /// Its length.
        len: usize,
    },
    /// The name holds a byte outside printable ASCII (0x20..=0x7e).
    NameNotPrintable {
        /// Offset of the first bad byte.
        offset: usize,
        /// The byte.
        byte: u8,
    },
    /// The parameter is longer than 256 bytes.
    ParamTooLong {
        /// Its length.
        len: usize,
    },
    /// More fds than any ABI can carry (253, the kernel's `SCM_MAX_FD`).
    TooManyFds {
        /// How many were given.
        count: usize,
    },
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MessageError::EmptyName => f.write_str("action name is empty"),
            MessageError::NameTooLong { len } => write!(
                f,
                "action name is {len} bytes long, the limit is {MAX_NAME_LEN}"
            ),
            MessageError::NameNotPrintable { offset, byte } => write!(
                f,
                "action name has byte {byte:#04x} at offset {offset}, only printable ASCII is allowed"
            ),
            MessageError::ParamTooLong { len } => write!(
                f,
                "parameter is {len} bytes long, the limit is {MAX_PARAM_LEN}"
            ),
            MessageError::TooManyFds { count } => write!(
                f,
                "{count} fds attached, a message carries at most {MAX_FDS}"
            ),
        }
    }
}

impl core::error::Error for MessageError {}

/// A parameter blob of 0..=256 bytes, stored inline.
#[derive(Clone, Copy)]
pub struct Param {
    len: u16,
    bytes: [u8; MAX_PARAM_LEN],
}

impl Param {
    /// An empty parameter.
    pub const EMPTY: Param = Param {
        len: 0,
        bytes: [0; MAX_PARAM_LEN],
    };

    /// Copies `b` into a parameter, refusing more than 256 bytes.
    pub fn new(b: &[u8]) -> Result<Self, MessageError> {
        if b.len() > MAX_PARAM_LEN {
            return Err(MessageError::ParamTooLong { len: b.len() });
        }
        let mut bytes = [0u8; MAX_PARAM_LEN];
        bytes[..b.len()].copy_from_slice(b);
        Ok(Param {
            len: b.len() as u16,
            bytes,
        })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The full 256-byte field as sent: the bytes, then zeros.
    pub(crate) fn field(&self) -> &[u8; MAX_PARAM_LEN] {
        &self.bytes
    }
}

impl Default for Param {
    fn default() -> Self {
        Param::EMPTY
    }
}

impl PartialEq for Param {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}
impl Eq for Param {}

impl fmt::Debug for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Param({} bytes: ", self.len)?;
        for b in self.as_slice().iter().take(32) {
            write!(f, "{b:02x}")?;
        }
        if self.len() > 32 {
            f.write_str("..")?;
        }
        f.write_str(")")
    }
}

/// The transport's set of file descriptors attached to one message.
///
/// The core never touches an fd: it only needs to know how many there are (to write `num_fds` and
/// to check it against what was received) and how to make an empty set. Dropping the set must
/// release the fds (for Unix: close them), so a rejected message never leaks one.
pub trait Fds {
    /// How many fds the set holds.
    fn count(&self) -> usize;
    /// An empty set.
    fn empty() -> Self;
}

/// The fd set of a transport that carries none (and of tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoFds;

impl Fds for NoFds {
    fn count(&self) -> usize {
        0
    }
    fn empty() -> Self {
        NoFds
    }
}

/// A count of fds standing for fds that live elsewhere (simulations, fuzzing, tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdCount(pub usize);

impl Fds for FdCount {
    fn count(&self) -> usize {
        self.0
    }
    fn empty() -> Self {
        FdCount(0)
    }
}

impl<T, const N: usize> Fds for heapless::Vec<T, N> {
    fn count(&self) -> usize {
        self.len()
    }
    fn empty() -> Self {
        heapless::Vec::new()
    }
}

/// One message: a name, a parameter blob and attached fds.
#[derive(Clone, PartialEq, Eq)]
pub struct Message<F = NoFds> {
    name: Name,
    param: Param,
    fds: F,
}

impl Message<NoFds> {
    /// A message without fds, validating the name and the parameter length.
    pub fn new(name: &str, param: &[u8]) -> Result<Self, MessageError> {
        Ok(Message {
            name: Name::new(name)?,
            param: Param::new(param)?,
            fds: NoFds,
        })
    }
}

impl<F: Fds> Message<F> {
    /// A message from already validated parts; refuses more than 253 fds.
    pub fn from_parts(name: Name, param: Param, fds: F) -> Result<Self, MessageError> {
        let count = fds.count();
        if count > MAX_FDS {
            return Err(MessageError::TooManyFds { count });
        }
        Ok(Message { name, param, fds })
    }

    /// A message with `name` and `param` and no fds.
    pub fn with_param(name: Name, param: Param) -> Self {
        Message {
            name,
            param,
            fds: F::empty(),
        }
    }

    /// The same name and parameter with another fd set; refuses more than 253 fds.
    pub fn with_fds<G: Fds>(self, fds: G) -> Result<Message<G>, MessageError> {
        Message::from_parts(self.name, self.param, fds)
    }

    /// The action name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// The parameter blob.
    pub fn param(&self) -> &[u8] {
        self.param.as_slice()
    }

    /// The parameter as a [`Param`].
    pub fn param_block(&self) -> &Param {
        &self.param
    }

    /// The attached fds.
    pub fn fds(&self) -> &F {
        &self.fds
    }

    /// Number of attached fds.
    pub fn num_fds(&self) -> usize {
        self.fds.count()
    }

    /// Takes the message apart.
    pub fn into_parts(self) -> (Name, Param, F) {
        (self.name, self.param, self.fds)
    }
}

impl<F: Fds> fmt::Debug for Message<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("name", &self.name)
            .field("param", &self.param)
            .field("fds", &self.fds.count())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_validate() {
        assert!(Message::new("x", &[0; 256]).is_ok());
        assert_eq!(
            Message::new("x", &[0; 257]).unwrap_err(),
            MessageError::ParamTooLong { len: 257 }
        );
        assert_eq!(Message::new("", &[]).unwrap_err(), MessageError::EmptyName);
        let m = Message::new("x", b"abc").unwrap();
        assert_eq!(
            m.clone().with_fds(FdCount(254)).unwrap_err(),
            MessageError::TooManyFds { count: 254 }
        );
        let m = m.with_fds(FdCount(253)).unwrap();
        assert_eq!(m.num_fds(), 253);
        assert_eq!(m.param(), b"abc");
    }

    #[test]
    fn kinds() {
        for c in 0..4 {
            assert_eq!(MsgKind::from_code(c).unwrap().code(), c);
        }
        assert_eq!(MsgKind::from_code(4), None);
        assert_eq!(MsgKind::from_code(-1), None);
    }
}
