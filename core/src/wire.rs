//! DPDK's multi-process datagram, byte for byte, for each ABI.
//!
//! One datagram is DPDK's internal message (a kind code followed by `rte_mp_msg`) cut just before
//! the fd array; the fds travel as `SCM_RIGHTS`. Three layouts exist (reference section 1.2):
//!
//! | field        | 22.11 | 24.11 | 25.11+ |
//! |--------------|-------|-------|--------|
//! | kind (i32)   | 0     | 0     | 0      |
//! | name[64]     | 4     | 4     | 8      |
//! | len_param    | 68    | 68    | 72     |
//! | num_fds      | 72    | 72    | 76     |
//! | param[256]   | 76    | 76    | 80     |
//! | length       | 332   | 332   | 340    |
//! | max fds      | 8     | 253   | 253    |
//!
//! Integers are in host byte order, as DPDK sends them. The encoder zeroes every byte it does not
//! define (padding, name after the NUL, param after `len_param`, the 25.11 trailing `fds[0]`); the
//! decoder ignores those bytes, since DPDK senders may leave garbage there. Everything else is
//! checked strictly, each failure with its own [`DecodeError`]. The decoder never panics and
//! never reads out of bounds: every field access goes through [`Layout`]'s fixed ranges after the
//! length has been checked.

use core::fmt;
use core::ops::Range;

use crate::limits::{MAX_FDS, MAX_FDS_22_11, MAX_PARAM_LEN, NAME_FIELD_LEN};
use crate::message::{Fds, Message, MessageError, MsgKind, Param};
use crate::name::{Name, is_printable};

/// Longest datagram of any ABI.
pub const MAX_DATAGRAM_LEN: usize = 340;

/// A DPDK multi-process ABI: which datagram layout and fd limit a channel speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Abi {
    /// DPDK 22.11 (and 23.x): 332-byte datagrams, at most 8 fds.
    V22_11,
    /// DPDK 24.11: the same 332 bytes, at most 253 fds.
    V24_11,
    /// DPDK 25.11 and later: `param` 8-byte aligned, 340-byte datagrams, at most 253 fds.
    #[default]
    V25_11,
}

/// Byte ranges of each field of one ABI's datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The kind code (i32).
    pub kind: Range<usize>,
    /// The 64-byte name field.
    pub name: Range<usize>,
    /// `len_param` (i32).
    pub len_param: Range<usize>,
    /// `num_fds` (i32).
    pub num_fds: Range<usize>,
    /// The 256-byte parameter field.
    pub param: Range<usize>,
    /// Total datagram length.
    pub len: usize,
}

const LAYOUT_332: Layout = Layout {
    kind: 0..4,
    name: 4..68,
    len_param: 68..72,
    num_fds: 72..76,
    param: 76..332,
    len: 332,
};

const LAYOUT_340: Layout = Layout {
    kind: 0..4,
    name: 8..72,
    len_param: 72..76,
    num_fds: 76..80,
    param: 80..336,
    len: 340,
};

impl Abi {
    /// Every ABI, oldest first.
    pub const ALL: [Abi; 3] = [Abi::V22_11, Abi::V24_11, Abi::V25_11];

    /// The field ranges of this ABI.
    pub const fn layout(self) -> &'static Layout {
        match self {
            Abi::V22_11 | Abi::V24_11 => &LAYOUT_332,
            Abi::V25_11 => &LAYOUT_340,
        }
    }

    /// Length of every datagram of this ABI.
    pub const fn datagram_len(self) -> usize {
        self.layout().len
    }

    /// Most fds one message may carry.
    pub const fn max_fds(self) -> usize {
        match self {
            Abi::V22_11 => MAX_FDS_22_11,
            Abi::V24_11 | Abi::V25_11 => MAX_FDS,
        }
    }

    /// The version string users type (`22.11`, `24.11`, `25.11`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Abi::V22_11 => "22.11",
            Abi::V24_11 => "24.11",
            Abi::V25_11 => "25.11",
        }
    }

    /// Parses `22.11`, `24.11` or `25.11` (also `v22.11`, and any later DPDK version maps to the
    /// newest layout it shares, e.g. `23.11` is 22.11's layout and `26.07` is 25.11's).
    pub fn parse(s: &str) -> Option<Abi> {
        let s = s.strip_prefix('v').unwrap_or(s);
        let (major, minor) = s.split_once('.')?;
        let major: u32 = major.parse().ok()?;
        let minor: u32 = minor.parse().ok()?;
        match (major, minor) {
            (22, 11) | (23, _) | (24, 0..=10) => Some(Abi::V22_11),
            (24, _) | (25, 0..=10) => Some(Abi::V24_11),
            (25, _) | (26..=99, _) => Some(Abi::V25_11),
            _ => None,
        }
    }
}

impl fmt::Display for Abi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the transport observed when it received a datagram, besides its bytes and fds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvFlags {
    /// The payload did not fit the receive buffer (`MSG_TRUNC`).
    pub truncated: bool,
    /// The control data did not fit: some fds were discarded by the kernel (`MSG_CTRUNC`).
    pub control_truncated: bool,
}

/// Why a received datagram was rejected. Each cause has its own variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload was larger than the receive buffer (`MSG_TRUNC`).
    Truncated,
    /// The kernel discarded fds that did not fit the control buffer (`MSG_CTRUNC`).
    ControlTruncated,
    /// The datagram is not exactly the ABI's length.
    WrongLength {
        /// The ABI's datagram length.
        expected: usize,
        /// What arrived.
        got: usize,
    },
    /// The kind code is not 0..=3.
    UnknownKind(i32),
    /// The name field holds no NUL.
    NameNotTerminated,
    /// The name field starts with NUL.
    EmptyName,
    /// A name byte before the NUL is outside printable ASCII.
    NameNotPrintable {
        /// Offset within the name.
        offset: usize,
        /// The byte.
        byte: u8,
    },
    /// `len_param` is negative or above 256.
    ParamLenOutOfRange(i32),
    /// `num_fds` is negative or above the ABI's maximum.
    FdCountOutOfRange {
        /// The header's value.
        count: i32,
        /// The ABI's maximum.
        max: usize,
    },
    /// `num_fds` disagrees with the number of fds the transport actually received.
    FdCountMismatch {
        /// The header's value.
        header: usize,
        /// What arrived with `SCM_RIGHTS`.
        received: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DecodeError::Truncated => f.write_str("datagram larger than any valid message"),
            DecodeError::ControlTruncated => {
                f.write_str("fds discarded by the kernel: more than the control buffer holds")
            }
            DecodeError::WrongLength { expected, got } => {
                write!(f, "datagram is {got} bytes, the ABI's length is {expected}")
            }
            DecodeError::UnknownKind(k) => write!(f, "unknown message kind {k}"),
            DecodeError::NameNotTerminated => f.write_str("name field has no NUL terminator"),
            DecodeError::EmptyName => f.write_str("name is empty"),
            DecodeError::NameNotPrintable { offset, byte } => write!(
                f,
                "name byte {byte:#04x} at offset {offset} is not printable ASCII"
            ),
            DecodeError::ParamLenOutOfRange(n) => {
                write!(f, "len_param {n} outside 0..={MAX_PARAM_LEN}")
            }
            DecodeError::FdCountOutOfRange { count, max } => {
                write!(f, "num_fds {count} outside 0..={max}")
            }
            DecodeError::FdCountMismatch { header, received } => {
                write!(f, "header announces {header} fds but {received} arrived")
            }
        }
    }
}

impl core::error::Error for DecodeError {}

/// Why a message cannot be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The output buffer is shorter than the ABI's datagram.
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        got: usize,
    },
    /// The message carries more fds than this ABI allows.
    TooManyFds {
        /// The ABI.
        abi: Abi,
        /// Its limit.
        max: usize,
        /// The message's fd count.
        count: usize,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EncodeError::BufferTooSmall { need, got } => {
                write!(f, "buffer of {got} bytes, a datagram needs {need}")
            }
            EncodeError::TooManyFds { abi, max, count } => write!(
                f,
                "{count} fds attached, the {abi} ABI carries at most {max}"
            ),
        }
    }
}

impl core::error::Error for EncodeError {}

impl From<MessageError> for DecodeError {
    fn from(e: MessageError) -> Self {
        // Only name errors can come out of a decoded header; map them one to one.
        match e {
            MessageError::EmptyName => DecodeError::EmptyName,
            MessageError::NameNotPrintable { offset, byte } => {
                DecodeError::NameNotPrintable { offset, byte }
            }
            MessageError::NameTooLong { .. } => DecodeError::NameNotTerminated,
            MessageError::ParamTooLong { len } => DecodeError::ParamLenOutOfRange(len as i32),
            MessageError::TooManyFds { count } => DecodeError::FdCountOutOfRange {
                count: count as i32,
                max: MAX_FDS,
            },
        }
    }
}

fn read_i32(b: &[u8], r: &Range<usize>) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[r.clone()]);
    i32::from_ne_bytes(a)
}

fn write_i32(b: &mut [u8], r: &Range<usize>, v: i32) {
    b[r.clone()].copy_from_slice(&v.to_ne_bytes());
}

/// The validated header of a datagram, before fds are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The kind.
    pub kind: MsgKind,
    /// The name.
    pub name: Name,
    /// The parameter (only its first `len_param` bytes).
    pub param: Param,
    /// The announced fd count.
    pub num_fds: usize,
}

/// A datagram's header fields, validated, borrowed from its bytes (nothing copied yet).
struct Fields<'a> {
    kind: MsgKind,
    /// Non-empty printable ASCII, at most `MAX_NAME_LEN` bytes (the field's bytes before NUL).
    name: &'a [u8],
    /// At most `MAX_PARAM_LEN` bytes.
    param: &'a [u8],
    num_fds: usize,
}

impl<'a> Fields<'a> {
    /// Checks the length, the kind, the name, `len_param` and `num_fds` of `datagram`.
    #[inline]
    fn check(abi: Abi, datagram: &'a [u8]) -> Result<Self, DecodeError> {
        let l = abi.layout();
        if datagram.len() != l.len {
            return Err(DecodeError::WrongLength {
                expected: l.len,
                got: datagram.len(),
            });
        }
        let code = read_i32(datagram, &l.kind);
        let kind = MsgKind::from_code(code).ok_or(DecodeError::UnknownKind(code))?;

        let field = &datagram[l.name.clone()];
        let nul = field
            .iter()
            .position(|&c| c == 0)
            .ok_or(DecodeError::NameNotTerminated)?;
        if nul == 0 {
            return Err(DecodeError::EmptyName);
        }
        if let Some(offset) = field[..nul].iter().position(|&c| !is_printable(c)) {
            return Err(DecodeError::NameNotPrintable {
                offset,
                byte: field[offset],
            });
        }

        let len_param = read_i32(datagram, &l.len_param);
        if !(0..=MAX_PARAM_LEN as i32).contains(&len_param) {
            return Err(DecodeError::ParamLenOutOfRange(len_param));
        }
        let num_fds = read_i32(datagram, &l.num_fds);
        if num_fds < 0 || num_fds as usize > abi.max_fds() {
            return Err(DecodeError::FdCountOutOfRange {
                count: num_fds,
                max: abi.max_fds(),
            });
        }
        let param_field = &datagram[l.param.clone()];
        Ok(Fields {
            kind,
            // The name field is MAX_NAME_LEN bytes with a NUL in it: at most MAX_NAME_LEN - 1.
            name: &field[..nul],
            param: &param_field[..len_param as usize],
            num_fds: num_fds as usize,
        })
    }
}

impl Header {
    /// Parses and validates a datagram's bytes for `abi`.
    pub fn parse(abi: Abi, datagram: &[u8]) -> Result<Header, DecodeError> {
        let f = Fields::check(abi, datagram)?;
        Ok(Header {
            kind: f.kind,
            name: Name::from_checked(f.name),
            param: Param::new(f.param)?,
            num_fds: f.num_fds,
        })
    }
}

/// Decodes a received datagram and attaches the fds that came with it.
///
/// Checks, in order: the receive flags, the length, the kind, the name, `len_param`, `num_fds`
/// against the ABI, and `num_fds` against `fds.count()`. On any error the fds are dropped (closed)
/// before returning.
pub fn decode<F: Fds>(
    abi: Abi,
    datagram: &[u8],
    fds: F,
    flags: RecvFlags,
) -> Result<(MsgKind, Message<F>), DecodeError> {
    if flags.truncated {
        return Err(DecodeError::Truncated);
    }
    if flags.control_truncated {
        return Err(DecodeError::ControlTruncated);
    }
    // Checked in place and copied once, into the message (the datagram path's hottest copy).
    let f = Fields::check(abi, datagram)?;
    let received = fds.count();
    if received != f.num_fds {
        return Err(DecodeError::FdCountMismatch {
            header: f.num_fds,
            received,
        });
    }
    let msg = Message::from_parts(Name::from_checked(f.name), Param::new(f.param)?, fds)?;
    Ok((f.kind, msg))
}

/// Writes the datagram for (`kind`, `msg`) into `out` and returns its length.
pub fn encode<F: Fds>(
    abi: Abi,
    kind: MsgKind,
    msg: &Message<F>,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let l = abi.layout();
    if out.len() < l.len {
        return Err(EncodeError::BufferTooSmall {
            need: l.len,
            got: out.len(),
        });
    }
    let count = msg.num_fds();
    if count > abi.max_fds() {
        return Err(EncodeError::TooManyFds {
            abi,
            max: abi.max_fds(),
            count,
        });
    }
    let out = &mut out[..l.len];
    out.fill(0);
    write_i32(out, &l.kind, kind.code());
    out[l.name.clone()].copy_from_slice(&msg.name().to_field());
    write_i32(out, &l.len_param, msg.param().len() as i32);
    write_i32(out, &l.num_fds, count as i32);
    out[l.param.clone()].copy_from_slice(msg.param_block().field());
    Ok(l.len)
}

/// An encoded datagram in a fixed buffer, ready to hand to a transport.
#[derive(Clone)]
pub struct Datagram {
    len: usize,
    buf: [u8; MAX_DATAGRAM_LEN],
}

impl Datagram {
    /// Encodes (`kind`, `msg`) for `abi`.
    pub fn encode<F: Fds>(abi: Abi, kind: MsgKind, msg: &Message<F>) -> Result<Self, EncodeError> {
        let mut buf = [0u8; MAX_DATAGRAM_LEN];
        let len = encode(abi, kind, msg, &mut buf)?;
        Ok(Datagram { len, buf })
    }

    /// The bytes to send.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Debug for Datagram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Datagram({} bytes)", self.len)
    }
}

const _: () = {
    assert!(LAYOUT_332.name.end - LAYOUT_332.name.start == NAME_FIELD_LEN);
    assert!(LAYOUT_340.name.end - LAYOUT_340.name.start == NAME_FIELD_LEN);
    assert!(LAYOUT_332.param.end - LAYOUT_332.param.start == MAX_PARAM_LEN);
    assert!(LAYOUT_340.param.end - LAYOUT_340.param.start == MAX_PARAM_LEN);
    assert!(LAYOUT_332.param.end == LAYOUT_332.len);
    assert!(LAYOUT_340.param.end + 4 == LAYOUT_340.len);
    assert!(LAYOUT_340.param.start.is_multiple_of(8));
    assert!(MAX_DATAGRAM_LEN == LAYOUT_340.len);
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::FdCount;

    #[test]
    fn parse_versions() {
        assert_eq!(Abi::parse("22.11"), Some(Abi::V22_11));
        assert_eq!(Abi::parse("v23.11"), Some(Abi::V22_11));
        assert_eq!(Abi::parse("24.11"), Some(Abi::V24_11));
        assert_eq!(Abi::parse("25.07"), Some(Abi::V24_11));
        assert_eq!(Abi::parse("25.11"), Some(Abi::V25_11));
        assert_eq!(Abi::parse("26.07"), Some(Abi::V25_11));
        assert_eq!(Abi::parse("21.11"), None);
        assert_eq!(Abi::parse("x"), None);
        for abi in Abi::ALL {
            assert_eq!(Abi::parse(abi.as_str()), Some(abi));
        }
    }

    #[test]
    fn round_trip_each_abi() {
        for abi in Abi::ALL {
            let m = Message::new("hello", b"world")
                .unwrap()
                .with_fds(FdCount(abi.max_fds()))
                .unwrap();
            let d = Datagram::encode(abi, MsgKind::Request, &m).unwrap();
            assert_eq!(d.as_bytes().len(), abi.datagram_len());
            let (k, back) = decode(
                abi,
                d.as_bytes(),
                FdCount(abi.max_fds()),
                RecvFlags::default(),
            )
            .unwrap();
            assert_eq!(k, MsgKind::Request);
            assert_eq!(back, m);
        }
    }

    #[test]
    fn too_many_fds_for_22_11() {
        let m = Message::new("a", &[])
            .unwrap()
            .with_fds(FdCount(9))
            .unwrap();
        assert_eq!(
            Datagram::encode(Abi::V22_11, MsgKind::Msg, &m).unwrap_err(),
            EncodeError::TooManyFds {
                abi: Abi::V22_11,
                max: 8,
                count: 9
            }
        );
        assert!(Datagram::encode(Abi::V24_11, MsgKind::Msg, &m).is_ok());
    }
}
