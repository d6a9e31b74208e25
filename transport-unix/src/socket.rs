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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
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

/// The address of a peer: its socket path. Cheap to clone. Equal when the paths are equal
/// component by component (`/run//x/./s` is `/run/x/s`), ordered by those components' bytes.
///
/// Made once per peer (the primary's peer list, the receiving thread's cache of senders): it
/// keeps the path in a canonical form and the socket address ready, so comparing, hashing and
/// sending to it do not walk the path's components again (they are on the path of every request
/// and answer).
#[derive(Clone)]
pub struct PeerAddr(Arc<PeerInner>);

struct PeerInner {
    /// The path as given.
    path: PathBuf,
    /// The components, joined by single `/`: equal exactly when the components are.
    key: Box<[u8]>,
    /// Where the file name starts in `key`.
    name_at: usize,
    /// A hash of the file name, made once: what `Hash` feeds a hasher (one word, not the
    /// name's bytes, on every lookup of the pending table and the outbox).
    name_hash: u64,
    /// The socket address, or why the path cannot be one (too long, a NUL byte).
    addr: Result<SocketAddrUnix, Errno>,
}

impl PartialEq for PeerAddr {
    fn eq(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.0, &o.0) || self.0.key == o.0.key
    }
}

impl Eq for PeerAddr {}

impl PartialOrd for PeerAddr {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for PeerAddr {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.key.cmp(&o.0.key)
    }
}

/// Hashes the socket's file name only (a hash of it made once): equal addresses have equal
/// file names, and every socket of a runtime directory has its own name, so this spreads keys
/// as well as the whole path would, for less.
impl std::hash::Hash for PeerAddr {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(self.0.name_hash);
    }
}

/// The control data that carries `fds` as `SCM_RIGHTS`, in `space`; none at all without fds.
/// DPDK attaches an empty SCM_RIGHTS then; a receiver (DPDK's or ours) takes a datagram
/// without control data the same way, and the kernel has no control message to copy and parse.
fn rights<'a>(
    space: &'a mut [MaybeUninit<u8>],
    fds: &'a [BorrowedFd<'a>],
) -> Result<SendAncillaryBuffer<'a, 'a, 'a>, Errno> {
    if fds.is_empty() {
        return Ok(SendAncillaryBuffer::default());
    }
    let mut c = SendAncillaryBuffer::new(space);
    if !c.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Errno::TOOMANYREFS);
    }
    Ok(c)
}

impl PeerAddr {
    /// The peer at `path`.
    pub fn new(path: impl AsRef<Path>) -> Self {
        let path = path.as_ref();
        let canon: PathBuf = path.components().collect();
        let key: Box<[u8]> = canon.as_os_str().as_bytes().into();
        let name_at = canon
            .file_name()
            .map_or(key.len(), |n| key.len() - n.as_bytes().len());
        let name_hash = {
            use std::hash::{BuildHasher, BuildHasherDefault};
            BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(&key[name_at..])
        };
        PeerAddr(Arc::new(PeerInner {
            path: path.to_owned(),
            key,
            name_at,
            name_hash,
            addr: SocketAddrUnix::new(path),
        }))
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// The socket's file name (`mp_socket`, `mp_socket_<pid>_<stamp>`).
    pub fn name(&self) -> &str {
        std::str::from_utf8(&self.0.key[self.0.name_at..]).unwrap_or("")
    }

    /// The socket address.
    fn addr(&self) -> Result<&SocketAddrUnix, Errno> {
        self.0.addr.as_ref().map_err(|e| *e)
    }
}

impl fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.path.display())
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.path.display())
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
    /// The peer the socket is connected to, if it is (see [`Socket::connect_to`]).
    peer: std::sync::OnceLock<PeerAddr>,
    /// Its receiving side was shut down ([`Socket::shut_read`]).
    read_shut: std::sync::atomic::AtomicBool,
}

impl Socket {
    /// Creates a socket bound at `path`, replacing a leftover file there, and asks for the
    /// senders' credentials on every datagram. The socket itself blocks (so the receiving thread
    /// sleeps in `recvmmsg` and takes what is queued in one call); every send passes
    /// `MSG_DONTWAIT`.
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
            peer: std::sync::OnceLock::new(),
            read_shut: std::sync::atomic::AtomicBool::new(false),
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
        self.send_control(Some(&SocketAddrUnix::new(to)?), bytes, fds)
    }

    /// [`Socket::send_to`] the peer `to`, with its address made already; to the peer the
    /// socket is connected to, without an address (the kernel then skips the path lookup).
    pub fn send_to_peer(
        &self,
        to: &PeerAddr,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Errno> {
        if self.peer.get() == Some(to) {
            match self.send_control(None, bytes, fds) {
                // The peer closed its socket and the kernel dropped the connection (after
                // reporting ECONNREFUSED once): by path, to whoever is bound there now.
                Err(Errno::NOTCONN) => {}
                r => return r,
            }
        }
        self.send_control(Some(to.addr()?), bytes, fds)
    }

    /// Connects the socket to `to`, once: sends to `to` then go without an address, and the
    /// kernel takes datagrams from `to` alone (until `to`'s socket is closed; then from anyone
    /// again, and sends go by path).
    pub fn connect_to(&self, to: &PeerAddr) -> Result<(), Errno> {
        if self.peer.get().is_some() {
            return Err(Errno::ISCONN);
        }
        net::connect(&self.fd, to.addr()?)?;
        let _ = self.peer.set(to.clone());
        Ok(())
    }

    /// The peer the socket is connected to.
    pub fn connected_to(&self) -> Option<&PeerAddr> {
        self.peer.get()
    }

    /// Wakes a thread blocked receiving on this socket, from another thread: a datagram of no
    /// bytes from the socket to itself ([`Socket::is_wake`] tells it apart). A socket connected
    /// to a peer takes datagrams from that peer alone, and one whose path is gone cannot be
    /// sent to, so their receiving side is shut down instead: every receive then returns at
    /// once, and the socket must be given up ([`Socket::is_read_shut`]).
    pub fn wake_reader(&self) {
        let sent = self.peer.get().is_none()
            && match self.send_to(&self.path, &[], &[]) {
                // The queue is full: the reader has datagrams to wake for.
                Ok(()) | Err(Errno::AGAIN) => true,
                // The path is gone (the directory removed under us): shut down instead.
                Err(_) => false,
            };
        if !sent {
            let _ = self.shut_read();
        }
    }

    /// Whether the receiving side was shut down ([`Socket::wake_reader`],
    /// [`Socket::shut_read`]).
    pub fn is_read_shut(&self) -> bool {
        self.read_shut.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether `r`, received on this socket, is a wake-up from [`Socket::wake_reader`] rather
    /// than a datagram: no bytes, from the socket itself, or anything after a shutdown.
    pub fn is_wake(&self, r: &Received) -> bool {
        r.len == 0
            && (self.is_read_shut() || &r.from[..r.from_len] == self.path.as_os_str().as_bytes())
    }

    /// One `sendmsg` of `bytes` with `fds`, to `addr` or (`None`) to the connected peer.
    fn send_control(
        &self,
        addr: Option<&SocketAddrUnix>,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Errno> {
        let mut space = [MaybeUninit::<u8>::uninit(); CMSG_BUF];
        let mut control = rights(&mut space, fds)?;
        let iov = [io::IoSlice::new(bytes)];
        let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
        loop {
            let r = match addr {
                Some(a) => net::sendmsg_addr(&self.fd, a, &iov, &mut control, flags),
                None => net::sendmsg(&self.fd, &iov, &mut control, flags),
            };
            match r {
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => return Ok(()),
            }
        }
    }

    /// Sends `bytes` with `fds` to each of `to` in one `sendmmsg` (a broadcast costs one system
    /// call, and the sender is not preempted between its sends by the receivers it wakes).
    /// Returns how many leading destinations it was sent to; the error of the first one is
    /// returned only when it failed (`to[0]`): the caller retries the destination after the
    /// sent ones on its own to learn why it failed.
    pub fn send_many(
        &self,
        to: &[PeerAddr],
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<usize, Errno> {
        if to.is_empty() {
            return Ok(0);
        }
        let addrs = to
            .iter()
            .map(|p| p.addr().map(net::addr::SocketAddrArg::as_any))
            .collect::<Result<Vec<_>, _>>()?;
        let space_len = if fds.is_empty() {
            0
        } else {
            rustix::cmsg_space!(ScmRights(fds.len()))
        };
        let mut spaces = vec![MaybeUninit::<u8>::uninit(); space_len * to.len()];
        let mut rest = &mut spaces[..];
        let mut controls = Vec::with_capacity(to.len());
        for _ in to {
            let (space, tail) = std::mem::take(&mut rest).split_at_mut(space_len);
            rest = tail;
            controls.push(rights(space, fds)?);
        }
        let iov = [io::IoSlice::new(bytes)];
        let mut msgs: Vec<net::MMsgHdr<'_>> = addrs
            .iter()
            .zip(controls.iter_mut())
            .map(|(a, c)| net::MMsgHdr::new_with_addr(a, &iov, c))
            .collect();
        loop {
            match net::sendmmsg(
                &self.fd,
                &mut msgs,
                SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
            ) {
                Err(Errno::INTR) => continue,
                r => return r,
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

    /// Receives up to [`BATCH`] datagrams with one `recvmmsg`: waits for the first if `wait`,
    /// then takes what else is queued without waiting. Returns how many arrived (0 when nothing
    /// is waiting and `wait` is false); [`RecvBatch::take`] hands each out.
    pub fn recv_batch(&self, b: &mut RecvBatch, wait: bool) -> Result<usize, Errno> {
        b.clear();
        let flags = libc::MSG_CMSG_CLOEXEC
            | libc::MSG_TRUNC
            | if wait {
                libc::MSG_WAITFORONE
            } else {
                libc::MSG_DONTWAIT
            };
        // The headers point into `b`'s buffers, which outlive the call and are not touched
        // until it returns.
        let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: b.bufs[i].as_mut_ptr().cast(),
            iov_len: RECV_BUF,
        });
        // SAFETY: an all-zero mmsghdr is a valid value (null pointers, zero lengths); every
        // field the kernel reads is set below.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, h) in hdrs.iter_mut().enumerate() {
            h.msg_hdr.msg_name = (&raw mut b.addrs[i]).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_un>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &raw mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = b.ctrl[i].0.as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = CMSG_BUF as _;
        }
        let n = loop {
            // SAFETY: the BATCH headers' name, iovec and control pointers address live, exclusively
            // borrowed buffers of the stated sizes (sockaddr_un, RECV_BUF, CMSG_BUF bytes aligned
            // for cmsghdr); a null timeout is allowed.
            let r = unsafe {
                libc::recvmmsg(
                    self.fd.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    flags,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            match Errno::from_raw_os_error(io::Error::last_os_error().raw_os_error().unwrap_or(0)) {
                Errno::INTR => continue,
                Errno::AGAIN => return Ok(0),
                e => return Err(e),
            }
        };
        // msg_controllen is size_t with glibc and socklen_t with musl: the cast is needed there.
        #[allow(clippy::unnecessary_cast)]
        for (i, h) in hdrs.iter().take(n).enumerate() {
            b.meta[i] = Meta {
                len: h.msg_len as usize,
                flags: h.msg_hdr.msg_flags,
                namelen: h.msg_hdr.msg_namelen as usize,
                controllen: h.msg_hdr.msg_controllen as usize,
            };
        }
        b.n = n;
        Ok(n)
    }

    /// Sets how long a waiting receive blocks at most (`SO_RCVTIMEO`; zero is not allowed).
    pub fn set_recv_timeout(&self, d: std::time::Duration) -> Result<(), Errno> {
        let d = d.max(std::time::Duration::from_micros(1));
        net::sockopt::set_socket_timeout(&self.fd, net::sockopt::Timeout::Recv, Some(d))
    }

    /// Shuts the receiving side down for good: every receive returns at once, and a send to
    /// the socket fails at once (`EPIPE`) instead of filling a queue nobody reads, in which a
    /// peer with a blocking socket (DPDK's) would stall. For a socket only sent from, and for
    /// waking a reader of a connected one ([`Socket::wake_reader`]).
    pub fn shut_read(&self) -> Result<(), Errno> {
        self.read_shut
            .store(true, std::sync::atomic::Ordering::Release);
        net::shutdown(&self.fd, net::Shutdown::Read)
    }

    /// Removes the socket file.
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How many datagrams one [`Socket::recv_batch`] takes at most (the kernel queues 10 per socket
/// by default, `net.unix.max_dgram_qlen`).
pub const BATCH: usize = 16;

#[repr(C, align(8))]
struct Control([u8; CMSG_BUF]);

#[derive(Clone, Copy, Default)]
struct Meta {
    len: usize,
    flags: libc::c_int,
    namelen: usize,
    controllen: usize,
}

/// The buffers of a batched receive: [`BATCH`] datagrams with their senders and control data.
/// Allocated once per receiving thread.
pub struct RecvBatch {
    bufs: Box<[[u8; RECV_BUF]; BATCH]>,
    ctrl: Box<[Control; BATCH]>,
    addrs: [libc::sockaddr_un; BATCH],
    meta: [Meta; BATCH],
    n: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch::new()
    }
}

impl RecvBatch {
    /// Empty buffers.
    pub fn new() -> Self {
        RecvBatch {
            bufs: vec![[0u8; RECV_BUF]; BATCH]
                .into_boxed_slice()
                .try_into()
                .unwrap_or_else(|_| unreachable!("BATCH buffers")),
            ctrl: (0..BATCH)
                .map(|_| Control([0; CMSG_BUF]))
                .collect::<Vec<_>>()
                .into_boxed_slice()
                .try_into()
                .unwrap_or_else(|_| unreachable!("BATCH control buffers")),
            // SAFETY: sockaddr_un is plain data; all zeroes is a valid (unnamed) address.
            addrs: unsafe { std::mem::zeroed() },
            meta: [Meta::default(); BATCH],
            n: 0,
        }
    }

    /// Closes the fds of datagrams not taken yet and forgets them.
    fn clear(&mut self) {
        for i in 0..self.n {
            // Only the fds need closing (a taken datagram's control length is already 0).
            drop(self.take_control(i));
        }
        self.n = 0;
    }

    /// Datagram `i` of the last receive (`i` < what it returned): its metadata, fds (owned
    /// from here on; a second call for the same `i` has none) and bytes.
    pub fn take(&mut self, i: usize) -> (Received, &[u8]) {
        let m = self.meta[i];
        let fds = self.take_control(i);
        let mut from = [0u8; 108];
        let mut from_len = 0;
        let off = std::mem::offset_of!(libc::sockaddr_un, sun_path);
        if m.namelen > off {
            let path = &self.addrs[i].sun_path[..(m.namelen - off).min(108)];
            for (d, &c) in from.iter_mut().zip(path) {
                if c == 0 {
                    break;
                }
                *d = c as u8;
                from_len += 1;
            }
        }
        let r = Received {
            len: m.len.min(RECV_BUF),
            truncated: m.flags & libc::MSG_TRUNC != 0 || m.len > RECV_BUF,
            control_truncated: m.flags & libc::MSG_CTRUNC != 0,
            from,
            from_len,
            creds: fds.1,
            fds: Fds(fds.0),
        };
        (r, &self.bufs[i][..m.len.min(RECV_BUF)])
    }

    /// Parses datagram `i`'s control data: owns its fds, reads its credentials; marks it taken.
    fn take_control(&mut self, i: usize) -> (Vec<OwnedFd>, Option<UCred>) {
        let len = std::mem::take(&mut self.meta[i].controllen).min(CMSG_BUF);
        let buf = &self.ctrl[i].0[..len];
        let align = |n: usize| n.next_multiple_of(size_of::<usize>());
        let hdr = align(size_of::<libc::cmsghdr>());
        let mut fds = Vec::new();
        let mut creds = None;
        let mut at = 0;
        while at + hdr <= buf.len() {
            // SAFETY: `at + hdr <= buf.len()` bytes are there to read, cmsghdr is plain data
            // (any bit pattern is a value), and read_unaligned needs no alignment.
            let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            let (cmsg_len, level, kind) = (h.cmsg_len as usize, h.cmsg_level, h.cmsg_type);
            if cmsg_len < hdr || at + cmsg_len > buf.len() {
                break;
            }
            let data = &buf[at + hdr..at + cmsg_len];
            if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
                for c in data.chunks_exact(4) {
                    let raw = i32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                    // SAFETY: the kernel installed this fd in our table for this datagram
                    // (SCM_RIGHTS), and nothing else owns it: this is its only owner.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            } else if level == libc::SOL_SOCKET && kind == libc::SCM_CREDENTIALS && data.len() >= 12
            {
                let f =
                    |o: usize| u32::from_ne_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
                creds = Some(UCred {
                    pid: rustix::process::Pid::from_raw(f(0) as i32)
                        .unwrap_or(rustix::process::Pid::INIT),
                    uid: rustix::process::Uid::from_raw(f(4)),
                    gid: rustix::process::Gid::from_raw(f(8)),
                });
            }
            at += align(cmsg_len);
        }
        (fds, creds)
    }
}

impl Drop for RecvBatch {
    fn drop(&mut self) {
        self.clear();
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh directory for one test's sockets.
    pub(crate) fn dir(tag: &str) -> PathBuf {
        let d = PathBuf::from(format!("/tmp/mps-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn peer_addresses_equal_by_components_hash_alike() {
        let a = PeerAddr::new("/tmp//mp-x/./mp_socket_1_2");
        let b = PeerAddr::new("/tmp/mp-x/mp_socket_1_2");
        assert_eq!(a, b);
        let set: std::collections::HashSet<PeerAddr> = [a].into_iter().collect();
        assert!(set.contains(&b));
        assert!(!set.contains(&PeerAddr::new("/tmp/mp-x/mp_socket_1_3")));
    }

    /// The sender of the datagram waiting on `s`, by file name (waits for it).
    pub(crate) fn sender(s: &Socket) -> String {
        let mut buf = [0u8; 64];
        let r = s.recv(&mut buf, true).unwrap().unwrap();
        String::from_utf8_lossy(&r.from[..r.from_len])
            .rsplit('/')
            .next()
            .unwrap()
            .to_owned()
    }

    /// A connected socket sends to its peer without an address and takes datagrams from it
    /// alone; when the peer's socket is closed it reports the peer gone once, then sends by
    /// path to whoever binds there next and takes datagrams from anyone again.
    #[test]
    fn a_connected_socket_talks_to_its_peer_only_until_the_peer_goes() {
        let d = dir("connected");
        let me = Socket::bind(&d.join("me")).unwrap();
        let primary = Socket::bind(&d.join("primary")).unwrap();
        let other = Socket::bind(&d.join("other")).unwrap();
        let to = PeerAddr::new(d.join("primary"));
        me.connect_to(&to).unwrap();
        assert_eq!(me.connected_to(), Some(&to));
        assert_eq!(me.connect_to(&to), Err(Errno::ISCONN));
        me.send_to_peer(&to, b"req", &[]).unwrap();
        assert_eq!(sender(&primary), "me");
        primary.send_to(me.path(), b"rep", &[]).unwrap();
        assert_eq!(sender(&me), "primary");
        // Anyone else is refused by the kernel.
        assert_eq!(other.send_to(me.path(), b"x", &[]), Err(Errno::PERM));
        // The peer goes: refused once, then by path (nobody there), then a new peer.
        drop(primary);
        assert_eq!(me.send_to_peer(&to, b"req", &[]), Err(Errno::CONNREFUSED));
        assert!(matches!(
            me.send_to_peer(&to, b"req", &[]),
            Err(Errno::CONNREFUSED | Errno::NOENT)
        ));
        let again = Socket::bind(&d.join("primary")).unwrap();
        me.send_to_peer(&to, b"req", &[]).unwrap();
        assert_eq!(sender(&again), "me");
        other.send_to(me.path(), b"x", &[]).unwrap();
        assert_eq!(sender(&me), "other");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A send-only socket (connected, receiving side shut) refuses its own peer at once with
    /// `EPIPE` (and anyone else with `EPERM`), never queueing what nobody would read, and
    /// still sends.
    #[test]
    fn a_socket_with_its_receiving_side_shut_refuses_datagrams_at_once() {
        let d = dir("shut");
        let primary = Socket::bind(&d.join("primary")).unwrap();
        let to = PeerAddr::new(d.join("primary"));
        let me = Socket::bind(&d.join("me")).unwrap();
        me.connect_to(&to).unwrap();
        me.shut_read().unwrap();
        for _ in 0..20 {
            assert_eq!(primary.send_to(me.path(), b"rep", &[]), Err(Errno::PIPE));
        }
        me.send_to_peer(&to, b"msg", &[]).unwrap();
        assert_eq!(sender(&primary), "me");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// `wake_reader` from another thread ends a blocking receive: by a datagram of no bytes to
    /// itself on an unconnected socket (which stays usable), by shutting the receiving side down
    /// on a connected one (which nothing else may send to).
    #[test]
    fn a_blocked_reader_is_woken_on_either_kind_of_socket() {
        let d = dir("wake");
        let primary = Socket::bind(&d.join("primary")).unwrap();
        let to = PeerAddr::new(d.join("primary"));
        for connected in [false, true] {
            let me = Arc::new(Socket::bind(&d.join(format!("me{connected}"))).unwrap());
            if connected {
                me.connect_to(&to).unwrap();
            }
            let waker = {
                let me = me.clone();
                std::thread::spawn(move || me.wake_reader())
            };
            let mut buf = [0u8; 64];
            let r = me
                .recv(&mut buf, true)
                .unwrap()
                .expect("a blocking receive returns");
            waker.join().unwrap();
            assert!(me.is_wake(&r));
            assert_eq!(me.is_read_shut(), connected);
            // A real datagram is not a wake-up; after a shutdown nothing more comes in.
            if connected {
                let again = me.recv(&mut buf, true).unwrap().expect("returns at once");
                assert!(me.is_wake(&again));
            } else {
                primary.send_to(me.path(), b"rep", &[]).unwrap();
                let r = me.recv(&mut buf, true).unwrap().unwrap();
                assert!(!me.is_wake(&r));
                assert_eq!(&buf[..r.len], b"rep");
            }
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn batch_takes_everything_queued_in_order_with_fds_and_credentials() {
        let d = dir("batch");
        let rx = Socket::bind(&d.join("rx")).unwrap();
        let tx = Socket::bind(&d.join("tx")).unwrap();
        let (r, w) = rustix::pipe::pipe().unwrap();
        for i in 0..5u8 {
            let fds = if i == 2 { vec![w.as_fd()] } else { vec![] };
            tx.send_to(rx.path(), &[i; 7], &fds).unwrap();
        }
        let mut b = RecvBatch::new();
        assert_eq!(rx.recv_batch(&mut b, true).unwrap(), 5);
        for i in 0..5u8 {
            let (m, bytes) = b.take(i as usize);
            assert_eq!(bytes, &[i; 7]);
            assert!(!m.truncated && !m.control_truncated);
            assert_eq!(
                &m.from[..m.from_len],
                tx.path().as_os_str().as_encoded_bytes()
            );
            let c = m.creds.expect("credentials");
            assert_eq!(c.uid, rustix::process::getuid());
            assert_eq!(c.pid, rustix::process::getpid());
            assert_eq!(m.fds.0.len(), usize::from(i == 2));
        }
        // Taking again gives no fds a second time.
        assert!(b.take(2).0.fds.0.is_empty());
        assert_eq!(rx.recv_batch(&mut b, false).unwrap(), 0);
        drop((r, w));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_datagram_without_fds_carries_no_control_data() {
        // A receiver without SO_PASSCRED gets no control data from a send without fds (single
        // and batched), and SCM_RIGHTS from one with them. (The kernel would drop an empty
        // SCM_RIGHTS too: what not attaching one saves is the sender's kernel work, seen in
        // `strace`/`perf`, not something the receiver can tell.)
        let d = dir("nocontrol");
        let rx = std::os::unix::net::UnixDatagram::bind(d.join("rx")).unwrap();
        let tx = Socket::bind(&d.join("tx")).unwrap();
        let (_r, w) = rustix::pipe::pipe().unwrap();
        let to = [PeerAddr::new(d.join("rx")), PeerAddr::new(d.join("rx"))];
        tx.send_to(&d.join("rx"), b"single", &[]).unwrap();
        assert_eq!(tx.send_many(&to, b"batch", &[]).unwrap(), 2);
        tx.send_to(&d.join("rx"), b"fd", &[w.as_fd()]).unwrap();
        for (want, controls) in [("single", 0), ("batch", 0), ("batch", 0), ("fd", 1)] {
            let mut buf = [0u8; 16];
            let mut space = [MaybeUninit::<u8>::uninit(); CMSG_BUF];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let r = net::recvmsg(
                &rx,
                &mut [io::IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::empty(),
            )
            .unwrap();
            assert_eq!(&buf[..r.bytes], want.as_bytes());
            assert_eq!(control.drain().count(), controls, "{want}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn fds_not_taken_are_closed_and_long_datagrams_are_marked() {
        let d = dir("close");
        let rx = Socket::bind(&d.join("rx")).unwrap();
        let tx = Socket::bind(&d.join("tx")).unwrap();
        let (r, w) = rustix::pipe::pipe().unwrap();
        tx.send_to(rx.path(), b"a", &[w.as_fd(), w.as_fd()])
            .unwrap();
        tx.send_to(rx.path(), &vec![1u8; RECV_BUF + 1], &[])
            .unwrap();
        drop(w);
        let mut b = RecvBatch::new();
        assert_eq!(rx.recv_batch(&mut b, true).unwrap(), 2);
        let (m, bytes) = b.take(1);
        assert!(m.truncated);
        assert_eq!(bytes.len(), RECV_BUF);
        // Datagram 0's two write ends were never taken: the next receive closes them, so the
        // pipe reads end-of-file (every write end is closed) instead of blocking.
        assert_eq!(rx.recv_batch(&mut b, false).unwrap(), 0);
        let mut one = [0u8; 1];
        assert_eq!(rustix::io::read(&r, &mut one).unwrap(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }
}
