//! The payload of memory-transaction messages, and its strict codec.
//!
//! These bytes travel in the `param` of the channel's messages. The layout is memplane's own
//! (DPDK's `malloc_mp` payload describes DPDK's heap internals, which we do not share), little
//! endian, versioned, and checked field by field on decode:
//!
//! ```text
//! offset size field
//!  0      4   magic "MPTX"
//!  4      1   version (3)
//!  5      1   op: 1 alloc request, 2 free request, 3 sync, 4 rollback, 5 sync ack, 6 response
//!  6      2   reserved, zero
//!  8      8   transaction id
//! 16      ..  body, by op:
//!   alloc    heap u32, node i32 (-1 = any), page_size u64 (0 = any), bytes u64, align u64,
//!            flags u32, reserved u32                                      (total 56)
//!   free     heap u32, reserved u32, addr u64, len u64                    (total 40)
//!   sync     addr u64, len u64, seq u64                                   (total 40)
//!   rollback addr u64, len u64, seq u64                                   (total 40)
//!   ack      status u32, reserved u32                                     (total 24)
//!   response status u32, reserved u32, addr u64, len u64, seq u64         (total 48)
//! ```
//!
//! Decoding refuses a wrong length for the op, a wrong magic or version, an unknown op or status,
//! non-zero reserved bytes, and values out of range (zero sizes, alignments or page sizes that
//! are not powers of two, unknown flag bits, ranges that wrap around). It never panics.
//!
//! Version 2 added `seq` to sync and rollback (version 1 had no such field; its syncs were 32
//! bytes): the sender's change counter of the part of the map holding `range`, after the change,
//! so a secondary can bring only `range` in line when it saw every earlier change (see
//! [`TxnMsg::Sync`]). Version 3 added the same `seq` to the response, for a requester that maps
//! its new pages itself ([`AllocFlags::REQUESTER_MAPS`]), and that flag.

use core::fmt;

use crate::limits::MAX_PARAM_LEN;
use crate::message::{MessageError, Param};

/// The payload's magic, first four bytes.
pub const MAGIC: [u8; 4] = *b"MPTX";
/// The payload layout version this code speaks.
pub const VERSION: u8 = 3;

/// Identifies one transaction; chosen by the requester, echoed in every message of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId(pub u64);

/// A range of virtual addresses (valid in every process: memory is mapped at the same address
/// everywhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MemRange {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

impl MemRange {
    /// The range `[addr, addr + len)`, if it does not wrap around.
    pub fn new(addr: u64, len: u64) -> Option<Self> {
        addr.checked_add(len).map(|_| MemRange { addr, len })
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.len)
    }
}

/// Flags of an allocation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AllocFlags(u32);

impl AllocFlags {
    /// The pages must be contiguous in IOVA space, not only in virtual addresses.
    pub const IOVA_CONTIG: AllocFlags = AllocFlags(1);
    /// The requester maps the new pages itself once it has the answer (with the answer's
    /// `seq`), so the primary does not ask it to sync with the other secondaries: one round
    /// trip fewer on the requester's critical path. The pages then join the heap as one block
    /// held for the requester (see [`Action::Publish`]), which it hands to the heap once mapped,
    /// so that no other thread of its process can be given memory it has not mapped yet.
    ///
    /// [`Action::Publish`]: super::Action::Publish
    pub const REQUESTER_MAPS: AllocFlags = AllocFlags(2);
    /// Every known flag bit.
    pub const ALL: u32 = 3;

    /// Flags from raw bits, refusing unknown ones.
    pub fn from_bits(bits: u32) -> Option<Self> {
        (bits & !Self::ALL == 0).then_some(AllocFlags(bits))
    }
    /// The raw bits.
    pub fn bits(self) -> u32 {
        self.0
    }
    /// Whether every flag of `other` is set.
    pub fn contains(self, other: AllocFlags) -> bool {
        self.0 & other.0 == other.0
    }
    /// These flags and, when `on`, those of `other`.
    pub const fn with(self, other: AllocFlags, on: bool) -> AllocFlags {
        if on {
            AllocFlags(self.0 | other.0)
        } else {
            self
        }
    }
}

/// Ask the primary for more memory: pages enough for `bytes` bytes aligned to `align`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllocRequest {
    /// Which heap the pages are for.
    pub heap: u32,
    /// NUMA node, `None` for any.
    pub node: Option<u32>,
    /// Page size in bytes, 0 for any.
    pub page_size: u64,
    /// Bytes needed (the primary rounds up to whole pages).
    pub bytes: u64,
    /// Alignment of the range, a power of two (0: the page size).
    pub align: u64,
    /// Flags.
    pub flags: AllocFlags,
}

/// Give pages back: `range` (whole pages, already taken out of the heap by the requester).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FreeRequest {
    /// Which heap the pages came from.
    pub heap: u32,
    /// The pages.
    pub range: MemRange,
}

/// What a requester asks of the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemRequest {
    /// Grow: allocate pages.
    Alloc(AllocRequest),
    /// Shrink: free pages.
    Free(FreeRequest),
}

/// Result code of a step or of a whole transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum TxnStatus {
    /// Done.
    Ok = 0,
    /// Not enough pages.
    NoMemory = 1,
    /// A memory limit (total or per node) would be exceeded.
    LimitExceeded = 2,
    /// The request is not valid (unknown heap, bad range, duplicate id...).
    Invalid = 3,
    /// A secondary could not follow; everything was rolled back.
    SyncFailed = 4,
    /// A step did not finish in time.
    Timeout = 5,
    /// The primary's transaction queue is full; try again.
    Busy = 6,
    /// The primary failed to carry out a step.
    Failed = 7,
    /// Not supported by this primary.
    Unsupported = 8,
}

impl TxnStatus {
    /// The status for a wire code.
    pub fn from_code(c: u32) -> Option<Self> {
        use TxnStatus::*;
        Some(match c {
            0 => Ok,
            1 => NoMemory,
            2 => LimitExceeded,
            3 => Invalid,
            4 => SyncFailed,
            5 => Timeout,
            6 => Busy,
            7 => Failed,
            8 => Unsupported,
            _ => return None,
        })
    }

    /// True for [`TxnStatus::Ok`].
    pub fn is_ok(self) -> bool {
        self == TxnStatus::Ok
    }
}

impl fmt::Display for TxnStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TxnStatus::Ok => "ok",
            TxnStatus::NoMemory => "out of memory",
            TxnStatus::LimitExceeded => "memory limit exceeded",
            TxnStatus::Invalid => "invalid request",
            TxnStatus::SyncFailed => "a secondary failed to sync; rolled back",
            TxnStatus::Timeout => "timed out",
            TxnStatus::Busy => "primary busy",
            TxnStatus::Failed => "primary failed",
            TxnStatus::Unsupported => "not supported",
        })
    }
}

/// One transaction message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TxnMsg {
    /// Requester to primary.
    Request {
        /// Transaction id.
        id: TxnId,
        /// What is asked.
        req: MemRequest,
    },
    /// Primary to every secondary: bring your mappings in line with the shared map.
    ///
    /// `range` is what this transaction changed and `seq` the change counter of the part of the
    /// map holding it (a memseg list) after the change, which changed nothing else: a secondary
    /// whose own counter for that part is `seq - 1` needs to look at `range` only; one that is
    /// further behind brings everything in line; one already at `seq` or past it has nothing to
    /// do. `seq` 0 means unknown (bring everything in line).
    Sync {
        /// Transaction id.
        id: TxnId,
        /// What changed.
        range: MemRange,
        /// The change counter after this change (0: unknown).
        seq: u64,
    },
    /// Primary to every secondary: the transaction was undone, sync again (`range` and `seq` as
    /// for [`TxnMsg::Sync`], `seq` being the counter after the undoing).
    Rollback {
        /// Transaction id.
        id: TxnId,
        /// What was undone.
        range: MemRange,
        /// The change counter after the undoing (0: unknown).
        seq: u64,
    },
    /// Secondary to primary: result of a sync or rollback.
    SyncAck {
        /// Transaction id.
        id: TxnId,
        /// Result.
        status: TxnStatus,
    },
    /// Primary to requester: the final answer.
    Response {
        /// Transaction id.
        id: TxnId,
        /// Result.
        status: TxnStatus,
        /// The pages allocated (alloc success) or freed; empty otherwise.
        range: MemRange,
        /// The change counter of the part of the map holding `range` after this transaction, as
        /// in [`TxnMsg::Sync`] (0: unknown).
        seq: u64,
    },
}

const OP_ALLOC: u8 = 1;
const OP_FREE: u8 = 2;
const OP_SYNC: u8 = 3;
const OP_ROLLBACK: u8 = 4;
const OP_ACK: u8 = 5;
const OP_RESPONSE: u8 = 6;

const fn op_len(op: u8) -> usize {
    match op {
        OP_ALLOC => 56,
        OP_FREE | OP_SYNC | OP_ROLLBACK => 40,
        OP_RESPONSE => 48,
        OP_ACK => 24,
        _ => 0,
    }
}

/// Longest payload.
pub const MAX_PAYLOAD_LEN: usize = 56;
const _: () = assert!(MAX_PAYLOAD_LEN <= MAX_PARAM_LEN);

/// Why a payload was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadError {
    /// Shorter than the common header (16 bytes).
    TooShort(usize),
    /// The magic is not "MPTX".
    BadMagic([u8; 4]),
    /// A layout version this code does not speak.
    BadVersion(u8),
    /// Unknown op code.
    UnknownOp(u8),
    /// The length does not match the op.
    WrongLength {
        /// The op.
        op: u8,
        /// Its length.
        expected: usize,
        /// What arrived.
        got: usize,
    },
    /// A reserved byte is not zero.
    ReservedNotZero {
        /// Offset of the field.
        offset: usize,
    },
    /// Unknown status code.
    UnknownStatus(u32),
    /// A field holds a value out of range.
    BadValue(&'static str),
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PayloadError::TooShort(n) => write!(f, "transaction payload of {n} bytes is too short"),
            PayloadError::BadMagic(m) => write!(f, "bad transaction magic {m:02x?}"),
            PayloadError::BadVersion(v) => {
                write!(
                    f,
                    "transaction payload version {v}, this build speaks {VERSION}"
                )
            }
            PayloadError::UnknownOp(o) => write!(f, "unknown transaction op {o}"),
            PayloadError::WrongLength { op, expected, got } => {
                write!(f, "transaction op {op} must be {expected} bytes, got {got}")
            }
            PayloadError::ReservedNotZero { offset } => {
                write!(f, "reserved field at offset {offset} is not zero")
            }
            PayloadError::UnknownStatus(s) => write!(f, "unknown transaction status {s}"),
            PayloadError::BadValue(what) => write!(f, "invalid {what}"),
        }
    }
}

impl core::error::Error for PayloadError {}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_le_bytes(b)
    }
    fn u64(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_le_bytes(b)
    }
    fn zero32(&self, at: usize) -> Result<(), PayloadError> {
        if self.u32(at) != 0 {
            return Err(PayloadError::ReservedNotZero { offset: at });
        }
        Ok(())
    }
    fn range(&self, at: usize) -> Result<MemRange, PayloadError> {
        MemRange::new(self.u64(at), self.u64(at + 8)).ok_or(PayloadError::BadValue("range"))
    }
    fn status(&self, at: usize) -> Result<TxnStatus, PayloadError> {
        let s = self.u32(at);
        TxnStatus::from_code(s).ok_or(PayloadError::UnknownStatus(s))
    }
}

fn pow2_or_zero(v: u64) -> bool {
    v == 0 || v.is_power_of_two()
}

impl TxnMsg {
    /// The transaction id.
    pub fn id(&self) -> TxnId {
        match *self {
            TxnMsg::Request { id, .. }
            | TxnMsg::Sync { id, .. }
            | TxnMsg::Rollback { id, .. }
            | TxnMsg::SyncAck { id, .. }
            | TxnMsg::Response { id, .. } => id,
        }
    }

    fn op(&self) -> u8 {
        match self {
            TxnMsg::Request {
                req: MemRequest::Alloc(_),
                ..
            } => OP_ALLOC,
            TxnMsg::Request {
                req: MemRequest::Free(_),
                ..
            } => OP_FREE,
            TxnMsg::Sync { .. } => OP_SYNC,
            TxnMsg::Rollback { .. } => OP_ROLLBACK,
            TxnMsg::SyncAck { .. } => OP_ACK,
            TxnMsg::Response { .. } => OP_RESPONSE,
        }
    }

    /// Writes the payload into `out` and returns its length.
    pub fn encode(&self, out: &mut [u8; MAX_PAYLOAD_LEN]) -> usize {
        let op = self.op();
        let len = op_len(op);
        out.fill(0);
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = op;
        out[8..16].copy_from_slice(&self.id().0.to_le_bytes());
        let mut put32 = |at: usize, v: u32| out[at..at + 4].copy_from_slice(&v.to_le_bytes());
        match *self {
            TxnMsg::Request {
                req: MemRequest::Alloc(a),
                ..
            } => {
                put32(16, a.heap);
                put32(20, a.node.map_or(u32::MAX, |n| n));
                put32(48, a.flags.bits());
                out[24..32].copy_from_slice(&a.page_size.to_le_bytes());
                out[32..40].copy_from_slice(&a.bytes.to_le_bytes());
                out[40..48].copy_from_slice(&a.align.to_le_bytes());
            }
            TxnMsg::Request {
                req: MemRequest::Free(r),
                ..
            } => {
                put32(16, r.heap);
                out[24..32].copy_from_slice(&r.range.addr.to_le_bytes());
                out[32..40].copy_from_slice(&r.range.len.to_le_bytes());
            }
            TxnMsg::Sync { range, seq, .. } | TxnMsg::Rollback { range, seq, .. } => {
                out[16..24].copy_from_slice(&range.addr.to_le_bytes());
                out[24..32].copy_from_slice(&range.len.to_le_bytes());
                out[32..40].copy_from_slice(&seq.to_le_bytes());
            }
            TxnMsg::SyncAck { status, .. } => put32(16, status as u32),
            TxnMsg::Response {
                status, range, seq, ..
            } => {
                put32(16, status as u32);
                out[24..32].copy_from_slice(&range.addr.to_le_bytes());
                out[32..40].copy_from_slice(&range.len.to_le_bytes());
                out[40..48].copy_from_slice(&seq.to_le_bytes());
            }
        }
        len
    }

    /// The payload as a message parameter.
    pub fn to_param(&self) -> Param {
        let mut buf = [0u8; MAX_PAYLOAD_LEN];
        let n = self.encode(&mut buf);
        // At most 56 bytes: always fits the 256-byte parameter.
        Param::new(&buf[..n]).unwrap_or(Param::EMPTY)
    }

    /// Decodes and validates a payload.
    pub fn decode(b: &[u8]) -> Result<TxnMsg, PayloadError> {
        if b.len() < 16 {
            return Err(PayloadError::TooShort(b.len()));
        }
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(PayloadError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(PayloadError::BadVersion(b[4]));
        }
        let op = b[5];
        let expected = op_len(op);
        if expected == 0 {
            return Err(PayloadError::UnknownOp(op));
        }
        if b.len() != expected {
            return Err(PayloadError::WrongLength {
                op,
                expected,
                got: b.len(),
            });
        }
        if b[6] != 0 || b[7] != 0 {
            return Err(PayloadError::ReservedNotZero { offset: 6 });
        }
        let r = Reader(b);
        let id = TxnId(r.u64(8));
        Ok(match op {
            OP_ALLOC => {
                r.zero32(52)?;
                let node = match r.u32(20) as i32 {
                    -1 => None,
                    n if n >= 0 => Some(n as u32),
                    _ => return Err(PayloadError::BadValue("node")),
                };
                let page_size = r.u64(24);
                let bytes = r.u64(32);
                let align = r.u64(40);
                if !pow2_or_zero(page_size) {
                    return Err(PayloadError::BadValue("page size"));
                }
                if bytes == 0 {
                    return Err(PayloadError::BadValue("byte count"));
                }
                if !pow2_or_zero(align) {
                    return Err(PayloadError::BadValue("alignment"));
                }
                let flags =
                    AllocFlags::from_bits(r.u32(48)).ok_or(PayloadError::BadValue("flags"))?;
                TxnMsg::Request {
                    id,
                    req: MemRequest::Alloc(AllocRequest {
                        heap: r.u32(16),
                        node,
                        page_size,
                        bytes,
                        align,
                        flags,
                    }),
                }
            }
            OP_FREE => {
                r.zero32(20)?;
                let range = r.range(24)?;
                if range.len == 0 {
                    return Err(PayloadError::BadValue("free length"));
                }
                TxnMsg::Request {
                    id,
                    req: MemRequest::Free(FreeRequest {
                        heap: r.u32(16),
                        range,
                    }),
                }
            }
            OP_SYNC => TxnMsg::Sync {
                id,
                range: r.range(16)?,
                seq: r.u64(32),
            },
            OP_ROLLBACK => TxnMsg::Rollback {
                id,
                range: r.range(16)?,
                seq: r.u64(32),
            },
            OP_ACK => {
                r.zero32(20)?;
                TxnMsg::SyncAck {
                    id,
                    status: r.status(16)?,
                }
            }
            _ => {
                r.zero32(20)?;
                TxnMsg::Response {
                    id,
                    status: r.status(16)?,
                    range: r.range(24)?,
                    seq: r.u64(40),
                }
            }
        })
    }
}

impl From<MessageError> for PayloadError {
    fn from(_: MessageError) -> Self {
        PayloadError::BadValue("parameter length")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> [TxnMsg; 6] {
        let id = TxnId(0x0102_0304_0506_0708);
        let range = MemRange {
            addr: 0x1_0000_0000,
            len: 2 << 20,
        };
        [
            TxnMsg::Request {
                id,
                req: MemRequest::Alloc(AllocRequest {
                    heap: 1,
                    node: None,
                    page_size: 2 << 20,
                    bytes: 5000,
                    align: 64,
                    flags: AllocFlags::IOVA_CONTIG,
                }),
            },
            TxnMsg::Request {
                id,
                req: MemRequest::Free(FreeRequest { heap: 0, range }),
            },
            TxnMsg::Sync { id, range, seq: 7 },
            TxnMsg::Rollback {
                id,
                range,
                seq: u64::MAX,
            },
            TxnMsg::SyncAck {
                id,
                status: TxnStatus::SyncFailed,
            },
            TxnMsg::Response {
                id,
                status: TxnStatus::Ok,
                range,
                seq: 7,
            },
        ]
    }

    #[test]
    fn round_trip_and_lengths() {
        for (m, len) in all().into_iter().zip([56, 40, 40, 40, 24, 48]) {
            let mut b = [0u8; MAX_PAYLOAD_LEN];
            let n = m.encode(&mut b);
            assert_eq!(n, len);
            assert_eq!(&b[0..4], b"MPTX");
            assert_eq!(TxnMsg::decode(&b[..n]), Ok(m));
            assert!(matches!(
                TxnMsg::decode(&b[..n - 1]),
                Err(PayloadError::WrongLength { .. }) | Err(PayloadError::TooShort(_))
            ));
            let mut bad = b;
            bad[6] = 1;
            assert_eq!(
                TxnMsg::decode(&bad[..n]),
                Err(PayloadError::ReservedNotZero { offset: 6 })
            );
        }
    }

    #[test]
    fn value_checks() {
        let mut b = [0u8; MAX_PAYLOAD_LEN];
        let n = all()[0].encode(&mut b);
        let mut x = b;
        x[40..48].copy_from_slice(&3u64.to_le_bytes());
        assert_eq!(
            TxnMsg::decode(&x[..n]),
            Err(PayloadError::BadValue("alignment"))
        );
        let mut x = b;
        x[48] = 4;
        assert_eq!(
            TxnMsg::decode(&x[..n]),
            Err(PayloadError::BadValue("flags"))
        );
        let mut x = b;
        x[20..24].copy_from_slice(&(-2i32).to_le_bytes());
        assert_eq!(TxnMsg::decode(&x[..n]), Err(PayloadError::BadValue("node")));
        let mut x = b;
        x[5] = 9;
        assert_eq!(TxnMsg::decode(&x[..n]), Err(PayloadError::UnknownOp(9)));
        let mut x = b;
        x[4] = 4;
        assert_eq!(TxnMsg::decode(&x[..n]), Err(PayloadError::BadVersion(4)));
        // Versions 1 (syncs without `seq`) and 2 (responses without it) are refused, not
        // misread.
        for v in [1, 2] {
            let mut x = b;
            x[4] = v;
            assert_eq!(TxnMsg::decode(&x[..n]), Err(PayloadError::BadVersion(v)));
        }
        let n = all()[4].encode(&mut b);
        b[16] = 77;
        assert_eq!(
            TxnMsg::decode(&b[..n]),
            Err(PayloadError::UnknownStatus(77))
        );
    }
}
