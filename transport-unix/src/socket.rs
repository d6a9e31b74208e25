//! One Unix datagram socket: bind, send with `SCM_RIGHTS`, receive with fds and credentials.
//!
//! Sends never block (`MSG_DONTWAIT`): a full peer queue comes back as `EAGAIN` for the caller to
//! queue. Receives ask for close-on-exec fds and the sender's credentials (`SO_PASSCRED`); the
//! control buffer holds the most fds the kernel can pass (253) plus the credentials, so fds are
//! never silently cut off unless a sender exceeds that, which the kernel reports as `MSG_CTRUNC`.
//! Received fds are `OwnedFd`s from the first moment: whatever path drops them closes them.

use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::io::Errno;
use rustix::net::{
    self, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
    UCred,
};

use memplane_core::limits::MAX_FDS;

use crate::error::Error;

/// The address of a peer: its socket path. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr(Arc<Path>);

impl PeerAddr {
    /// The peer at `path`.
    pub fn new(path: impl AsRef<Path>) -> Self {
        PeerAddr(Arc::from(path.as_ref()))
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The socket's file name (`mp_socket`, `mp_socket_<pid>_<stamp>`).
    pub fn name(&self) -> &str {
        self.0.file_name().and_then(|n| n.to_str()).unwrap_or("")
    }
}

impl fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.display())
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.display())
    }
}

/// The fds attached to a message, owned: dropping them closes them.
#[derive(Debug, Default)]
pub struct Fds(pub Vec<OwnedFd>);

impl memplane_core::Fds for Fds {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn empty() -> Self {
        Fds(Vec::new())
    }
}

impl Fds {
    /// No fds.
    pub fn none() -> Self {
        Fds(Vec::new())
    }

    /// Borrowed views for sending.
    pub fn borrowed(&self) -> Vec<BorrowedFd<'_>> {
        self.0.iter().map(|f| f.as_fd()).collect()
    }

    /// Duplicates every fd (close-on-exec), for a send that has to wait.
    pub fn try_clone(&self) -> io::Result<Fds> {
        self.0
            .iter()
            .map(|f| f.try_clone())
            .collect::<io::Result<Vec<_>>>()
            .map(Fds)
    }
}

impl From<Vec<OwnedFd>> for Fds {
    fn from(v: Vec<OwnedFd>) -> Self {
        Fds(v)
    }
}

impl From<Fds> for Vec<OwnedFd> {
    fn from(f: Fds) -> Self {
        f.0
    }
}

impl From<OwnedFd> for Fds {
    fn from(f: OwnedFd) -> Self {
        Fds(vec![f])
    }
}

/// Largest datagram we read whole; longer ones are reported truncated.
pub const RECV_BUF: usize = 4096;
/// Control-buffer size: 253 fds and one set of credentials.
pub const CMSG_BUF: usize = rustix::cmsg_space!(ScmRights(MAX_FDS), ScmCredentials(1));

/// One received datagram.
pub struct Received {
    /// Bytes received (at most [`RECV_BUF`]).
    pub len: usize,
    /// The datagram was longer than the buffer.
    pub truncated: bool,
    /// Some fds did not fit and were discarded by the kernel.
    pub control_truncated: bool,
    /// The sender's socket path bytes (empty for an unnamed sender), without allocating.
    pub from: [u8; 108],
    /// Length of `from`.
    pub from_len: usize,
    /// The sender's credentials, as the kernel saw them at send time.
    pub creds: Option<UCred>,
    /// The fds that came with it.
    pub fds: Fds,
}

/// A bound datagram socket.
pub struct Socket {
    fd: OwnedFd,
    path: PathBuf,
}

impl Socket {
    /// Creates a socket bound at `path`, replacing a leftover file there, and asks for the
    /// senders' credentials on every datagram. The socket itself blocks (so the receiving thread
    /// sleeps in `recvmsg`, one syscall per datagram); every send passes `MSG_DONTWAIT`.
    pub fn bind(path: &Path) -> Result<Socket, Error> {
        crate::rundir::check_socket_path(path)?;
        let fd = net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| Error::io("create socket", e.into()))?;
        let _ = std::fs::remove_file(path);
        let addr = SocketAddrUnix::new(path)
            .map_err(|e| Error::io(format!("address {}", path.display()), e.into()))?;
        net::bind(&fd, &addr)
            .map_err(|e| Error::io(format!("bind {}", path.display()), e.into()))?;
        net::sockopt::set_socket_passcred(&fd, true)
            .map_err(|e| Error::io("set SO_PASSCRED", e.into()))?;
        // A bigger send buffer keeps EAGAIN for full peers, not for our own buffer.
        let _ = net::sockopt::set_socket_send_buffer_size(&fd, 1 << 20);
        Ok(Socket {
            fd,
            path: path.to_owned(),
        })
    }

    /// The bound path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fd, for polling.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Sends one datagram with `fds` to the socket at `to`, without blocking.
    pub fn send_to(&self, to: &Path, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Errno> {
        let addr = SocketAddrUnix::new(to)?;
        let mut space = [MaybeUninit::<u8>::uninit(); CMSG_BUF];
        let mut control = SendAncillaryBuffer::new(&mut space);
        // DPDK always attaches SCM_RIGHTS, even empty; an empty one is legal and costs nothing.
        if !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(Errno::TOOMANYREFS);
        }
        loop {
            match net::sendmsg_addr(
                &self.fd,
                &addr,
                &[io::IoSlice::new(bytes)],
                &mut control,
                SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
            ) {
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => return Ok(()),
            }
        }
    }

    /// Receives one datagram into `buf`, waiting for one if `wait`; `None` when nothing is
    /// waiting and `wait` is false.
    pub fn recv(&self, buf: &mut [u8], wait: bool) -> Result<Option<Received>, Errno> {
        let mode = if wait {
            RecvFlags::empty()
        } else {
            RecvFlags::DONTWAIT
        };
        let mut space = [MaybeUninit::<u8>::uninit(); CMSG_BUF];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let r = loop {
            match net::recvmsg(
                &self.fd,
                &mut [io::IoSliceMut::new(buf)],
                &mut control,
                mode | RecvFlags::CMSG_CLOEXEC | RecvFlags::TRUNC,
            ) {
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(None),
                Err(e) => return Err(e),
                Ok(r) => break r,
            }
        };
        let mut fds = Vec::new();
        let mut creds = None;
        for m in control.drain() {
            match m {
                RecvAncillaryMessage::ScmRights(it) => fds.extend(it),
                RecvAncillaryMessage::ScmCredentials(c) => creds = Some(c),
                _ => {}
            }
        }
        let mut from = [0u8; 108];
        let mut from_len = 0;
        if let Some(u) = r.address.and_then(|a| SocketAddrUnix::try_from(a).ok())
            && let Some(b) = u.path_bytes()
        {
            let b = b.split(|&c| c == 0).next().unwrap_or(b);
            from_len = b.len().min(from.len());
            from[..from_len].copy_from_slice(&b[..from_len]);
        }
        Ok(Some(Received {
            len: r.bytes.min(buf.len()),
            truncated: r.flags.contains(ReturnFlags::TRUNC) || r.bytes > buf.len(),
            control_truncated: r.flags.contains(ReturnFlags::CTRUNC),
            from,
            from_len,
            creds,
            fds: Fds(fds),
        }))
    }

    /// Sets how long a waiting receive blocks at most (`SO_RCVTIMEO`; zero is not allowed).
    pub fn set_recv_timeout(&self, d: std::time::Duration) -> Result<(), Errno> {
        let d = d.max(std::time::Duration::from_micros(1));
        net::sockopt::set_socket_timeout(&self.fd, net::sockopt::Timeout::Recv, Some(d))
    }

    /// Removes the socket file.
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A socket connected to `to`, used only to learn (by polling for `POLLOUT`) when that peer's
/// receive queue has room again.
pub fn probe(to: &Path) -> Result<OwnedFd, Errno> {
    let fd = net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    net::connect(&fd, &SocketAddrUnix::new(to)?)?;
    Ok(fd)
}
