//! Errors of the Unix channel, one variant per thing that can go wrong, each with a message that
//! says what to do about it.

use std::fmt;
use std::io;
use std::path::PathBuf;

use memplane_core::endpoint::EndpointError;
use memplane_core::{MessageError, PendingError, RegistryError, SendError};

/// What went wrong in the channel.
#[derive(Debug)]
pub enum Error {
    /// A system call failed.
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// Another primary holds this runtime directory.
    PrimaryExists {
        /// The directory.
        dir: PathBuf,
        /// The other primary's pid, when known.
        pid: Option<u32>,
        /// It is a DPDK primary.
        dpdk: bool,
    },
    /// A secondary found no live primary.
    NoPrimary {
        /// The directory searched.
        dir: PathBuf,
    },
    /// A socket path does not fit `sun_path` (107 bytes).
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// A `--file-prefix` that is not one file name part.
    InvalidPrefix {
        /// The prefix given.
        prefix: String,
    },
    /// The message is not valid.
    Message(MessageError),
    /// The protocol core refused the operation.
    Endpoint(EndpointError),
    /// A synchronous request from the channel's own threads (an action handler or an async
    /// callback) would wait for a reply only that thread can receive.
    WouldDeadlock,
    /// The primary is gone: the request could not be delivered.
    PrimaryGone,
    /// The channel is closed.
    Closed,
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { what, source } => write!(f, "{what}: {source}"),
            Error::PrimaryExists { dir, pid, dpdk } => {
                let who = if *dpdk {
                    "a DPDK primary"
                } else {
                    "another primary"
                };
                match pid {
                    Some(p) => write!(
                        f,
                        "{who} (pid {p}) is running in {}; use another --file-prefix or \
                         --proc-type=secondary",
                        dir.display()
                    ),
                    None => write!(
                        f,
                        "{who} is running in {}; use another --file-prefix or \
                         --proc-type=secondary",
                        dir.display()
                    ),
                }
            }
            Error::NoPrimary { dir } => write!(
                f,
                "no primary process is running in {}; start one first or use \
                 --proc-type=primary (or auto)",
                dir.display()
            ),
            Error::PathTooLong { path, len } => write!(
                f,
                "socket path {} is {len} bytes, the limit is 107; use a shorter --runtime-dir \
                 or --file-prefix",
                path.display()
            ),
            Error::InvalidPrefix { prefix } => write!(
                f,
                "--file-prefix {prefix:?} is not a file name part: it must be non-empty, not \
                 \".\" or \"..\", and hold no '/', '%' or NUL (it names the runtime directory \
                 and every hugepage file)"
            ),
            Error::Message(e) => write!(f, "{e}"),
            Error::Endpoint(e) => write!(f, "{e}"),
            Error::WouldDeadlock => f.write_str(
                "synchronous request from an action handler or callback would deadlock; use \
                 an async request or a message",
            ),
            Error::PrimaryGone => f.write_str("the primary process is gone"),
            Error::Closed => f.write_str("channel is closed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Message(e) => Some(e),
            Error::Endpoint(e) => Some(e),
            _ => None,
        }
    }
}

impl From<MessageError> for Error {
    fn from(e: MessageError) -> Self {
        Error::Message(e)
    }
}

impl From<EndpointError> for Error {
    fn from(e: EndpointError) -> Self {
        Error::Endpoint(e)
    }
}

impl From<RegistryError> for Error {
    fn from(e: RegistryError) -> Self {
        Error::Endpoint(EndpointError::Registry(e))
    }
}

impl From<PendingError> for Error {
    fn from(e: PendingError) -> Self {
        Error::Endpoint(EndpointError::Pending(e))
    }
}

impl From<SendError> for Error {
    fn from(e: SendError) -> Self {
        Error::Endpoint(EndpointError::Transport(e))
    }
}
