//! Errors of the memory layer: one variant per thing that can go wrong, each message saying what
//! to do about it.

use std::fmt;
use std::io;
use std::path::PathBuf;

use memplane_core::txn::TxnStatus;

/// What went wrong in the memory layer.
#[derive(Debug)]
pub enum MemError {
    /// A system call failed.
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// The address range the primary uses is taken in this process.
    VaConflict {
        /// Start of the range.
        start: u64,
        /// Its length.
        len: u64,
        /// What the kernel said.
        detail: String,
    },
    /// The shared configuration does not match this build.
    Layout {
        /// Which check failed.
        what: String,
    },
    /// No memory for the request (no free pages, or no free run of segments).
    NoMemory {
        /// What was asked.
        what: String,
    },
    /// A limit (`-m`, `--socket-limit`) would be exceeded.
    LimitExceeded {
        /// Which limit.
        what: String,
    },
    /// The request is not valid.
    Invalid(String),
    /// A secondary could not sync; the primary rolled back.
    SyncFailed {
        /// The range, when known.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// The primary allocated these pages for this process, which could not map them itself
    /// ([`crate::AllocSpec::requester_maps`]). They are still allocated: the caller gives them
    /// back with [`crate::Memory::free`] (after taking them out of any heap holding them).
    MapFailed {
        /// First byte.
        start: u64,
        /// Length.
        len: u64,
    },
    /// The primary answered with a failure.
    Txn(TxnStatus),
    /// The channel failed.
    Channel(String),
    /// No primary answered (it is gone, or timed out).
    NoAnswer,
    /// DMA mapping failed.
    Dma(String),
    /// No primary memory configuration in this runtime directory.
    NotInitialised {
        /// The directory.
        dir: PathBuf,
    },
}

impl MemError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        MemError::Io {
            what: what.into(),
            source,
        }
    }

    /// The transaction status this error answers a requester with.
    pub fn status(&self) -> TxnStatus {
        match self {
            MemError::NoMemory { .. } => TxnStatus::NoMemory,
            MemError::LimitExceeded { .. } => TxnStatus::LimitExceeded,
            MemError::Invalid(_) => TxnStatus::Invalid,
            MemError::SyncFailed { .. } | MemError::MapFailed { .. } => TxnStatus::SyncFailed,
            MemError::Txn(s) => *s,
            _ => TxnStatus::Failed,
        }
    }
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemError::Io { what, source } => write!(f, "{what}: {source}"),
            MemError::VaConflict { start, len, detail } => write!(
                f,
                "cannot map the shared memory at [{start:#x}, {:#x}) in this process ({detail}); \
                 the primary must use another address: restart it with --base-virtaddr \
                 (e.g. --base-virtaddr {:#x})",
                start + len,
                (start + len + (1 << 32)) & !((1u64 << 30) - 1)
            ),
            MemError::Layout { what } => write!(
                f,
                "shared memory layout mismatch ({what}): primary and secondary must run the same \
                 memplane version"
            ),
            MemError::NoMemory { what } => write!(f, "out of memory: {what}"),
            MemError::LimitExceeded { what } => write!(f, "memory limit exceeded: {what}"),
            MemError::Invalid(s) => write!(f, "invalid request: {s}"),
            MemError::SyncFailed { start, len } => write!(
                f,
                "a secondary failed to map [{start:#x}, {:#x}); the allocation was rolled back",
                start + len
            ),
            MemError::MapFailed { start, len } => write!(
                f,
                "this process could not map the pages [{start:#x}, {:#x}) the primary allocated \
                 for it; they are to be given back",
                start + len
            ),
            MemError::Txn(s) => write!(f, "the primary refused: {s}"),
            MemError::Channel(s) => write!(f, "channel: {s}"),
            MemError::NoAnswer => f.write_str("the primary did not answer"),
            MemError::Dma(s) => write!(f, "DMA mapping: {s}"),
            MemError::NotInitialised { dir } => write!(
                f,
                "no primary memory configuration in {}; start the primary first",
                dir.display()
            ),
        }
    }
}

impl std::error::Error for MemError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MemError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
