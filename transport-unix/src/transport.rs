//! The core's [`Transport`] over a Unix datagram socket, with an outbox for busy peers.
//!
//! A send is tried at once without blocking. If the peer's queue is full (`EAGAIN`), the datagram
//! (with duplicates of its fds) goes to the outbox, and the send reports success: the service
//! thread delivers it as soon as the peer reads, or drops it at its deadline. So no thread ever
//! blocks on a peer: not the user's, not the receiving thread (DPDK 22.11's blocking sends
//! deadlock two processes that fill each other's queues). Datagrams to one peer keep their order:
//! while a peer has queued datagrams, new ones queue behind them.
//!
//! Dead peers: a socket file with nobody bound (`ECONNREFUSED`) or no file at all (`ENOENT`) is
//! [`SendError::PeerGone`]; the primary removes such a secondary socket file, as DPDK does.
//!
//! The primary finds its secondaries in the runtime directory, as DPDK does, but does not read
//! the directory for every broadcast: it keeps the list and reads the directory again only
//! after inotify reports a secondary socket created, removed or renamed there (or lost events).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use rustix::io::Errno;

use memplane_core::message::MsgKind;
use memplane_core::time::Instant;
use memplane_core::transport::{SendDone, SendError, Transport};
use memplane_core::wire::MAX_DATAGRAM_LEN;

use crate::rundir;
use crate::socket::{Fds, PeerAddr, Socket, probe};

/// Most datagrams the outbox holds across all peers.
pub const OUTBOX_LIMIT: usize = 16 * 1024;

/// Process roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Owns the runtime directory; talks to every secondary.
    Primary,
    /// Talks to the primary.
    Secondary,
}

struct Queued {
    bytes: [u8; MAX_DATAGRAM_LEN],
    len: usize,
    fds: Fds,
    deadline: Instant,
    /// The socket to send from (so replies go there); the channel's own when `None`.
    from: Option<Arc<Socket>>,
}

#[derive(Default)]
struct PeerQueue {
    items: VecDeque<Queued>,
    probe: Option<Arc<OwnedFd>>,
}

/// Counters of the outbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Datagrams that had to wait for a busy peer.
    pub queued: u64,
    /// Waiting datagrams delivered later.
    pub delivered: u64,
    /// Waiting datagrams dropped: deadline passed or peer gone.
    pub dropped: u64,
    /// Datagrams waiting now.
    pub waiting: usize,
}

#[derive(Default)]
struct Outbox {
    peers: HashMap<PeerAddr, PeerQueue>,
    total: usize,
    stats: OutboxStats,
    /// Probe sockets of peers that callers waited for, kept for the next wait.
    wait_probes: HashMap<PeerAddr, Arc<OwnedFd>>,
}

/// Most destinations of one `sendmmsg`.
pub const SEND_BATCH: usize = 64;

/// At most this many cached wait probes (then the cache starts again).
const WAIT_PROBES: usize = 64;

/// The Unix datagram transport of one process.
pub struct UnixTransport {
    sock: Socket,
    /// In a secondary: the socket its one-way messages to the primary leave from
    /// (`mp_tx_<pid>_<stamp>`, see [`rundir::ONE_WAY_SOCKET_PREFIX`]), connected to the primary
    /// so the kernel skips the path lookup each send to a path costs (a third of the sender's
    /// time); `None` when it could not be made (they then leave from `sock`).
    one_way: Option<Arc<Socket>>,
    /// The primary is memplane's (it holds memplane's lock, not DPDK's): it takes datagrams
    /// from the one-way socket as from this secondary's own, answers included, so requests
    /// may leave from there too. A DPDK primary would answer the one-way socket itself.
    primary_maps_senders: bool,
    role: Role,
    dir: PathBuf,
    primary: PeerAddr,
    outbox: Mutex<Outbox>,
    /// The outbox's datagram count, readable without its lock: while it is zero a send goes
    /// straight to the socket, and no lock is held across the system call (a sender preempted
    /// inside `sendmsg`, as a wake-up of the receiver on the same CPU does, would otherwise
    /// make every other thread of the process that sends wait for it to run again).
    waiting: AtomicUsize,
    /// Wakes the service thread (an eventfd).
    wake: OwnedFd,
    /// The primary's list of secondary sockets.
    peers: Mutex<PeerDir>,
    /// Told of each datagram the kernel accepted, and for whom (see
    /// [`UnixTransport::on_accepted`]).
    accepted: std::sync::OnceLock<AcceptedHook>,
}

/// What [`UnixTransport::on_accepted`] installs.
pub type AcceptedHook = Box<dyn Fn(&PeerAddr, &[u8]) + Send + Sync>;

/// The primary's list of secondary sockets, sorted, read from the runtime directory again only
/// when inotify says it changed.
struct PeerDir {
    /// An inotify instance watching the directory (non-blocking); without one (inotify
    /// unavailable, or its per-user limit reached) every look reads the directory.
    watch: Option<Arc<OwnedFd>>,
    list: Arc<[PeerAddr]>,
    /// The list must be read again before use.
    stale: bool,
    /// A pidfd of each listed secondary's process (its pid is in its socket's name), to learn
    /// of its death while requests wait for it; taken out once its exit is reported.
    exits: Vec<(PeerAddr, Arc<OwnedFd>)>,
    /// Secondaries not to watch (again) while their file stays: their exit was reported, or
    /// their process could not be watched (see [`watch_owner`]).
    unwatched: std::collections::HashSet<PeerAddr>,
    /// The set of watched pidfds changed since [`UnixTransport::exit_watch_changes`] last
    /// looked.
    exits_changed: bool,
}

impl PeerDir {
    fn new(role: Role, dir: &Path) -> PeerDir {
        use rustix::fs::inotify::{CreateFlags, WatchFlags, add_watch, init};
        let watch = (role == Role::Primary)
            .then(|| {
                let fd = init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).ok()?;
                let what = WatchFlags::CREATE
                    | WatchFlags::DELETE
                    | WatchFlags::MOVED_FROM
                    | WatchFlags::MOVED_TO
                    | WatchFlags::DELETE_SELF
                    | WatchFlags::MOVE_SELF
                    | WatchFlags::ONLYDIR;
                add_watch(&fd, dir, what).ok()?;
                Some(Arc::new(fd))
            })
            .flatten();
        PeerDir {
            watch,
            list: Arc::from([]),
            stale: true,
            exits: Vec::new(),
            unwatched: std::collections::HashSet::new(),
            exits_changed: false,
        }
    }

    /// Reads the pending inotify events; marks the list stale if one concerns a secondary
    /// socket, events were lost, or the watch ended (then the watch is given up: from here on
    /// the directory is read every time).
    fn catch_up(&mut self) {
        use rustix::fs::inotify::{ReadFlags, Reader};
        let Some(w) = &self.watch else {
            self.stale = true;
            return;
        };
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut r = Reader::new(w, &mut buf);
        let mut give_up = false;
        loop {
            match r.next() {
                Ok(ev) => {
                    let f = ev.events();
                    if f.intersects(
                        ReadFlags::QUEUE_OVERFLOW
                            | ReadFlags::IGNORED
                            | ReadFlags::DELETE_SELF
                            | ReadFlags::MOVE_SELF,
                    ) {
                        self.stale = true;
                        give_up |= !f.contains(ReadFlags::QUEUE_OVERFLOW);
                    } else if ev.file_name().is_none_or(|n| {
                        rundir::is_secondary_socket(std::ffi::OsStr::from_bytes(n.to_bytes()))
                    }) {
                        self.stale = true;
                    }
                }
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => continue,
                Err(_) => {
                    self.stale = true;
                    give_up = true;
                    break;
                }
            }
        }
        if give_up {
            self.watch = None;
        }
    }

    /// The secondary sockets in `dir` now, sorted.
    fn current(&mut self, dir: &Path) -> Result<Arc<[PeerAddr]>, SendError> {
        self.catch_up();
        if self.stale {
            let rd =
                std::fs::read_dir(dir).map_err(|e| SendError::Os(e.raw_os_error().unwrap_or(0)))?;
            let mut v: Vec<PeerAddr> = rd
                .flatten()
                .filter(|e| rundir::is_secondary_socket(&e.file_name()))
                .map(|e| PeerAddr::new(e.path()))
                .collect();
            v.sort();
            self.list = v.into();
            self.stale = false;
            self.watch_exits();
        }
        Ok(self.list.clone())
    }

    /// In a secondary: watches the primary's process (`pid`, from the lock it holds on the
    /// runtime directory), so requests waiting for it end when it dies.
    fn watch_primary(&mut self, primary: &PeerAddr, pid: Option<u32>) {
        if let Some(fd) = pid.and_then(|p| watch_owner(primary, p as i32)) {
            self.exits.push((primary.clone(), Arc::new(fd)));
            self.exits_changed = true;
        }
    }

    /// Watches the process of every listed secondary not watched yet (a pidfd each), and stops
    /// watching those no longer listed.
    fn watch_exits(&mut self) {
        let list = self.list.clone();
        let before = self.exits.len();
        self.exits.retain(|(p, _)| list.binary_search(p).is_ok());
        self.unwatched.retain(|p| list.binary_search(p).is_ok());
        let mut changed = self.exits.len() != before;
        for p in list.iter() {
            if self.unwatched.contains(p) || self.exits.iter().any(|(q, _)| q == p) {
                continue;
            }
            let pid = p.path().file_name().and_then(rundir::secondary_pid);
            // No pidfd (no such process: its socket is stale; another pid namespace; no pidfd
            // support): it is found dead when a send is refused, as without this watch.
            match pid.and_then(|pid| watch_owner(p, pid)) {
                Some(fd) => {
                    self.exits.push((p.clone(), Arc::new(fd)));
                    changed = true;
                }
                None => {
                    self.unwatched.insert(p.clone());
                }
            }
        }
        self.exits_changed |= changed;
    }

    /// Stops watching the peers whose pidfd is among `fired` (their process exited) and
    /// returns them.
    fn take_exited(&mut self, fired: &[Arc<OwnedFd>]) -> Vec<PeerAddr> {
        let mut gone = Vec::new();
        self.exits.retain(|(p, fd)| {
            let exited = fired.iter().any(|f| Arc::ptr_eq(f, fd));
            if exited {
                gone.push(p.clone());
            }
            !exited
        });
        self.unwatched.extend(gone.iter().cloned());
        self.exits_changed |= !gone.is_empty();
        gone
    }
}

/// A secondary's one-way socket (see `UnixTransport::one_way`): bound beside `main`,
/// connected to the primary, its receiving side shut (the primary never sends to it: it takes
/// the messages as coming from `main`). `None`, and nothing left behind, when any step fails.
fn one_way_socket(main: &Socket, primary: &PeerAddr) -> Option<Arc<Socket>> {
    let s = Socket::bind(&rundir::one_way_socket(main.path())?).ok()?;
    if s.connect_to(primary).is_err() || s.shut_read().is_err() {
        s.unlink();
        return None;
    }
    Some(Arc::new(s))
}

/// A pidfd of process `pid`, if it is the one that holds `peer`'s socket. Checked after the
/// pidfd is open: the pidfd pins the process, so a pid reused in between fails the check
/// rather than passing it.
fn watch_owner(peer: &PeerAddr, pid: i32) -> Option<OwnedFd> {
    let fd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid)?,
        rustix::process::PidfdFlags::empty(),
    )
    .ok()?;
    rundir::socket_owned_by(peer.path(), pid).then_some(fd)
}

/// What the service thread should poll for the outbox.
pub struct OutboxPoll {
    /// Probe sockets of the busy peers (poll for `POLLOUT`).
    pub probes: Vec<(PeerAddr, Arc<OwnedFd>)>,
    /// The earliest deadline of a waiting datagram.
    pub deadline: Option<Instant>,
    /// Datagrams delivered by this flush.
    pub delivered: usize,
    /// Peers found gone by this flush (their socket has no process): the pending requests
    /// must stop waiting for them ([`memplane_core::endpoint::Endpoint::peer_gone`]).
    pub gone: Vec<PeerAddr>,
}

impl OutboxPoll {
    /// Notes `peer` in [`OutboxPoll::gone`] (once) when a refused send or probe says it is gone.
    fn judge(&mut self, peer: &PeerAddr, verdict: SendError) {
        if verdict == SendError::PeerGone && self.gone.last() != Some(peer) {
            self.gone.push(peer.clone());
        }
    }
}

impl UnixTransport {
    pub(crate) fn new(sock: Socket, role: Role, dir: PathBuf) -> Result<Self, crate::Error> {
        let primary = PeerAddr::new(dir.join(rundir::PRIMARY_SOCKET));
        let wake = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| crate::Error::io("eventfd", e.into()))?;
        let mut peers = PeerDir::new(role, &dir);
        let (mut one_way, mut primary_maps_senders) = (None, false);
        if role == Role::Secondary {
            let holder = rundir::live_primary(&dir);
            peers.watch_primary(&primary, holder.and_then(|i| i.pid));
            one_way = one_way_socket(&sock, &primary);
            primary_maps_senders = holder.is_some_and(|i| !i.dpdk);
        }
        let peers = Mutex::new(peers);
        Ok(UnixTransport {
            sock,
            one_way,
            primary_maps_senders,
            role,
            dir,
            primary,
            outbox: Mutex::new(Outbox::default()),
            waiting: AtomicUsize::new(0),
            wake,
            peers,
            accepted: std::sync::OnceLock::new(),
        })
    }

    /// Installs `f`, told of each datagram the kernel accepts from here on (the first call
    /// wins): the channel counts a primary's messages and requests to each secondary with a
    /// lane ([`crate::lane`]).
    pub fn on_accepted(&self, f: AcceptedHook) {
        let _ = self.accepted.set(f);
    }

    fn note_accepted(&self, to: &PeerAddr, datagram: &[u8]) {
        if let Some(f) = self.accepted.get() {
            f(to, datagram);
        }
    }

    /// Removes this process's socket files (at close).
    pub fn unlink(&self) {
        self.sock.unlink();
        if let Some(s) = &self.one_way {
            s.unlink();
        }
    }

    /// Wakes the service thread.
    pub fn wake(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    /// In a primary: reads the runtime directory's changes (inotify) and watches the process
    /// of every secondary that appeared, so that a request to it can stop waiting when it dies
    /// even if nothing listed the peers since it came (requests to peers named by the caller).
    /// Returns the inotify fd to wait on for the next change, if there is one.
    pub(crate) fn refresh_peer_watch(&self) -> Option<Arc<OwnedFd>> {
        if self.role != Role::Primary {
            return None;
        }
        let mut d = self.peers.lock();
        let _ = d.current(&self.dir);
        d.watch.clone()
    }

    /// How many peer processes are watched for their exit now.
    pub fn watched_processes(&self) -> usize {
        self.peers.lock().exits.len()
    }

    /// The pidfds of the peers watched for their exit (see [`UnixTransport::take_exited`]), for
    /// the service thread to wait on; `None` when unchanged since the last call.
    pub(crate) fn exit_watch_changes(&self) -> Option<Vec<Arc<OwnedFd>>> {
        let mut d = self.peers.lock();
        if !std::mem::take(&mut d.exits_changed) {
            return None;
        }
        Some(d.exits.iter().map(|(_, fd)| fd.clone()).collect())
    }

    /// The peers whose pidfd (from [`UnixTransport::exit_watch_changes`]) is among `fired`, a
    /// wait having found it readable: their process exited, and requests still waiting for
    /// them must stop ([`memplane_core::endpoint::Endpoint::peer_gone`]). They are watched no
    /// more.
    pub(crate) fn take_exited(&self, fired: &[Arc<OwnedFd>]) -> Vec<PeerAddr> {
        self.peers.lock().take_exited(fired)
    }

    /// The service thread's wake-up fd, and clears it.
    pub(crate) fn wake_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Clears pending wake-ups.
    pub(crate) fn drain_wake(&self) {
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.wake, &mut b);
    }

    /// This process's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The runtime directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bound socket.
    pub fn socket(&self) -> &Socket {
        &self.sock
    }

    /// The primary's address.
    pub fn primary(&self) -> &PeerAddr {
        &self.primary
    }

    /// Outbox counters.
    pub fn outbox_stats(&self) -> OutboxStats {
        let o = self.outbox.lock();
        OutboxStats {
            waiting: o.total,
            ..o.stats
        }
    }

    fn classify(&self, to: &PeerAddr, e: Errno) -> SendError {
        match e {
            Errno::CONNREFUSED | Errno::NOENT | Errno::NOTSOCK => {
                // The peer died and left its socket file: the primary removes a secondary's.
                if e == Errno::CONNREFUSED
                    && self.role == Role::Primary
                    && to.path().parent() == Some(self.dir.as_path())
                    && rundir::is_secondary_socket(to.path().file_name().unwrap_or_default())
                {
                    let _ = std::fs::remove_file(to.path());
                }
                SendError::PeerGone
            }
            Errno::TOOMANYREFS => SendError::TooManyFds,
            e => SendError::Os(e.raw_os_error()),
        }
    }

    /// Delivers what the outbox holds for peers that have room, drops what is past its
    /// deadline; returns what to poll for next.
    pub fn flush(&self, now: Instant) -> OutboxPoll {
        let mut o = self.outbox.lock();
        let mut poll = OutboxPoll {
            probes: Vec::new(),
            deadline: None,
            delivered: 0,
            gone: Vec::new(),
        };
        let Outbox {
            peers,
            total,
            stats,
            ..
        } = &mut *o;
        peers.retain(|peer, q| {
            while let Some(item) = q.items.front() {
                if item.deadline <= now {
                    q.items.pop_front();
                    *total -= 1;
                    stats.dropped += 1;
                    continue;
                }
                let from = item.from.as_deref().unwrap_or(&self.sock);
                match from.send_to_peer(peer, &item.bytes[..item.len], &item.fds.borrowed()) {
                    Ok(()) => {
                        self.note_accepted(peer, &item.bytes[..item.len]);
                        q.items.pop_front();
                        *total -= 1;
                        stats.delivered += 1;
                        poll.delivered += 1;
                    }
                    Err(Errno::AGAIN) => break,
                    Err(e) => {
                        // Gone, or refuses this datagram: drop it (a gone peer drops the rest
                        // one by one on the next turns of this loop).
                        poll.judge(peer, self.classify(peer, e));
                        q.items.pop_front();
                        *total -= 1;
                        stats.dropped += 1;
                    }
                }
            }
            if q.items.is_empty() {
                return false;
            }
            if q.probe.is_none() {
                match probe(peer.path()) {
                    Ok(p) => q.probe = Some(Arc::new(p)),
                    Err(e) => {
                        // The same verdict, and the same stale-file clean-up, as a send's.
                        poll.judge(peer, self.classify(peer, e));
                        *total -= q.items.len();
                        stats.dropped += q.items.len() as u64;
                        return false;
                    }
                }
            }
            // Shared, not duplicated: a flush per service-thread turn costs no system call per
            // busy peer.
            if let Some(p) = &q.probe {
                poll.probes.push((peer.clone(), p.clone()));
            }
            let d = q.items.front().map(|i| i.deadline);
            poll.deadline = match (poll.deadline, d) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            true
        });
        self.waiting.store(*total, Ordering::Release);
        poll
    }

    /// Sends `datagram` to `to` from socket `from` (the channel's own when `None`). A busy
    /// peer's datagram waits in the outbox until `deadline`; with `wait` (a caller that may
    /// block, sending to one peer) the caller waits for room itself instead, as a blocking
    /// socket would, unless datagrams for that peer wait in the outbox already (order).
    pub fn send_from(
        &self,
        from: Option<&Arc<Socket>>,
        to: &PeerAddr,
        datagram: &[u8],
        fds: &Fds,
        deadline: Instant,
        wait: bool,
    ) -> Result<(), SendError> {
        let sock = from.map_or(&self.sock, |s| &**s);
        // An empty outbox (the common case) needs neither the lock nor a lookup. A datagram
        // queued by another thread meanwhile is concurrent with this one: no order between
        // them to keep. This thread's own queued datagrams are counted, so they are not
        // overtaken.
        let tried = self.waiting.load(Ordering::Acquire) == 0;
        if tried && let Some(r) = self.send_now(sock, to, datagram, fds) {
            return r;
        }
        let mut o = self.outbox.lock();
        if o.total == 0 || !o.peers.contains_key(to) {
            if !tried && let Some(r) = self.send_now(sock, to, datagram, fds) {
                return r;
            }
            if wait {
                let probe = match o.wait_probes.get(to) {
                    Some(p) => p.clone(),
                    None => {
                        let p = Arc::new(probe(to.path()).map_err(|e| self.classify(to, e))?);
                        if o.wait_probes.len() >= WAIT_PROBES {
                            o.wait_probes.clear();
                        }
                        o.wait_probes.insert(to.clone(), p.clone());
                        p
                    }
                };
                drop(o);
                return self.wait_and_send(sock, &probe, to, datagram, fds, deadline);
            }
        }
        // The peer is busy (or has datagrams waiting already): queue behind them.
        if deadline <= crate::clock::now() {
            return Err(SendError::Timeout);
        }
        if o.total >= OUTBOX_LIMIT {
            return Err(SendError::Os(libc::ENOBUFS));
        }
        if datagram.len() > MAX_DATAGRAM_LEN {
            return Err(SendError::Os(libc::EMSGSIZE));
        }
        let fds = fds
            .try_clone()
            .map_err(|e| SendError::Os(e.raw_os_error().unwrap_or(0)))?;
        let mut bytes = [0u8; MAX_DATAGRAM_LEN];
        bytes[..datagram.len()].copy_from_slice(datagram);
        let q = o.peers.entry(to.clone()).or_default();
        // The service thread learns of a newly busy peer (a probe to poll, the front deadline)
        // only when woken; a queue that already waits is watched already (its front expires
        // first, the datagrams to one peer stay in order).
        let wake = q.items.is_empty();
        q.items.push_back(Queued {
            bytes,
            len: datagram.len(),
            fds,
            deadline,
            from: from.cloned(),
        });
        o.total += 1;
        self.waiting.store(o.total, Ordering::Release);
        o.stats.queued += 1;
        drop(o);
        // The receiving thread delivers what it queues itself (it watches the outbox between
        // its receives); anyone else hands the new busy peer to the service thread.
        if wake && !crate::channel::receives_for(self) {
            self.wake();
        }
        Ok(())
    }

    /// One send attempt from `sock`: its result, or `None` when `to`'s queue is full.
    fn send_now(
        &self,
        sock: &Socket,
        to: &PeerAddr,
        datagram: &[u8],
        fds: &Fds,
    ) -> Option<Result<(), SendError>> {
        match sock.send_to_peer(to, datagram, &fds.borrowed()) {
            Ok(()) => {
                self.note_accepted(to, datagram);
                Some(Ok(()))
            }
            Err(Errno::AGAIN) => None,
            Err(e) => Some(Err(self.classify(to, e))),
        }
    }

    /// Sends `datagram` to each of `peers` from socket `from` (the channel's own when `None`),
    /// as [`UnixTransport::send_from`] without waiting does for each, and reports each result
    /// to `done`. While the outbox is empty, one `sendmmsg` takes up to [`SEND_BATCH`] peers;
    /// the first peer it could not send to goes through `send_from`, which tells why (gone,
    /// busy: queued) and goes on.
    pub fn send_from_many(
        &self,
        from: Option<&Arc<Socket>>,
        peers: &[PeerAddr],
        datagram: &[u8],
        fds: &Fds,
        deadline: Instant,
        done: &mut SendDone<'_, PeerAddr>,
    ) {
        let sock = from.map_or(&self.sock, |s| &**s);
        let mut rest = peers;
        while rest.len() > 1 && self.waiting.load(Ordering::Acquire) == 0 {
            let chunk = &rest[..rest.len().min(SEND_BATCH)];
            let n = sock
                .send_many(chunk, datagram, &fds.borrowed())
                .unwrap_or(0);
            for p in &chunk[..n] {
                self.note_accepted(p, datagram);
                done(p, Ok(()));
            }
            rest = &rest[n..];
            if n < chunk.len() {
                let p = &rest[0];
                done(p, self.send_from(from, p, datagram, fds, deadline, false));
                rest = &rest[1..];
            }
        }
        for p in rest {
            done(p, self.send_from(from, p, datagram, fds, deadline, false));
        }
    }

    /// Waits (until `deadline`) for `to` to have room, polling its probe, and sends.
    fn wait_and_send(
        &self,
        sock: &Socket,
        probe: &OwnedFd,
        to: &PeerAddr,
        datagram: &[u8],
        fds: &Fds,
        deadline: Instant,
    ) -> Result<(), SendError> {
        use rustix::event::{PollFd, PollFlags};
        // The probe said "room" and the send still found none (our own send buffer is full, or
        // the probe is connected to an older socket at that path): poll in 1 ms steps then,
        // rather than spin on a probe that keeps saying "room".
        let mut refused = false;
        loop {
            let mut left = deadline.saturating_duration_since(crate::clock::now());
            if left.is_zero() {
                return Err(SendError::Timeout);
            }
            if refused {
                left = left.min(std::time::Duration::from_millis(1));
            }
            let timeout = rustix::time::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: left.subsec_nanos() as i64,
            };
            let mut p = [PollFd::new(probe, PollFlags::OUT)];
            let ready = match rustix::event::poll(&mut p, Some(&timeout)) {
                Ok(n) => n > 0,
                Err(Errno::INTR) => false,
                Err(e) => return Err(SendError::Os(e.raw_os_error())),
            };
            if p[0].revents().intersects(PollFlags::ERR | PollFlags::HUP) {
                // A probe of a socket that is gone: the next send makes a fresh one.
                self.outbox.lock().wait_probes.remove(to);
            }
            match sock.send_to_peer(to, datagram, &fds.borrowed()) {
                Ok(()) => {
                    self.note_accepted(to, datagram);
                    return Ok(());
                }
                Err(Errno::AGAIN) => refused = ready,
                Err(e) => {
                    self.outbox.lock().wait_probes.remove(to);
                    return Err(self.classify(to, e));
                }
            }
        }
    }

    /// Whether anything waits in the outbox.
    pub fn outbox_waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }
}

impl Transport for UnixTransport {
    type Peer = PeerAddr;
    type Fds = Fds;

    fn send(
        &self,
        to: &PeerAddr,
        datagram: &[u8],
        fds: &Fds,
        deadline: Instant,
    ) -> Result<(), SendError> {
        self.send_from(None, to, datagram, fds, deadline, false)
    }

    fn send_each(
        &self,
        to: &[PeerAddr],
        datagram: &[u8],
        fds: &Fds,
        deadline: Instant,
        done: &mut SendDone<'_, PeerAddr>,
    ) {
        self.send_from_many(None, to, datagram, fds, deadline, done)
    }

    fn send_one(
        &self,
        to: &PeerAddr,
        datagram: &[u8],
        fds: &Fds,
        deadline: Instant,
    ) -> Result<(), SendError> {
        let wait = !crate::channel::on_channel_thread();
        self.send_from(None, to, datagram, fds, deadline, wait)
    }

    /// From a secondary to the primary, one-way messages (and requests, when the primary is
    /// memplane's, which takes them as from the secondary's own socket and answers there)
    /// leave from the one-way socket: connected, so the kernel skips the path lookup. Its
    /// datagrams and the main socket's share the outbox queue of their peer, so they stay in
    /// order.
    fn send_one_kind(
        &self,
        to: &PeerAddr,
        kind: MsgKind,
        datagram: &[u8],
        fds: &Fds,
        deadline: Instant,
    ) -> Result<(), SendError> {
        let wait = !crate::channel::on_channel_thread();
        let mapped = match kind {
            MsgKind::Msg => true,
            MsgKind::Request => self.primary_maps_senders,
            MsgKind::Reply | MsgKind::Ignore => false,
        };
        let from = self
            .one_way
            .as_ref()
            .filter(|s| mapped && s.connected_to() == Some(to));
        self.send_from(from, to, datagram, fds, deadline, wait)
    }

    fn for_each_peer(&self, f: &mut dyn FnMut(&PeerAddr)) -> Result<(), SendError> {
        match self.role {
            Role::Secondary => {
                f(&self.primary);
                Ok(())
            }
            Role::Primary => {
                // Sorted by path; the lock is not held while `f` runs.
                let (list, new_watch) = {
                    let mut d = self.peers.lock();
                    let list = d.current(&self.dir)?;
                    (list, d.exits_changed)
                };
                // The service thread waits on the secondaries' pidfds: let it see the new set.
                if new_watch {
                    self.wake();
                }
                list.iter().for_each(f);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::RecvBatch;
    use crate::socket::tests::dir;

    fn listed(t: &UnixTransport) -> Vec<String> {
        let mut v = Vec::new();
        t.for_each_peer(&mut |p| {
            v.push(p.path().file_name().unwrap().to_string_lossy().into_owned())
        })
        .unwrap();
        v
    }

    /// The primary's cached list follows the directory: a secondary socket created, removed
    /// or renamed is seen by the next look; other files are not secondaries. Without inotify
    /// (the fallback), every look reads the directory.
    #[test]
    fn the_primary_sees_secondaries_come_and_go_with_or_without_inotify() {
        for watched in [true, false] {
            let d = dir(&format!("peer-list-{watched}"));
            let t = UnixTransport::new(
                Socket::bind(&d.join("mp_socket")).unwrap(),
                Role::Primary,
                d.clone(),
            )
            .unwrap();
            if !watched {
                t.peers.lock().watch = None;
            } else {
                assert!(t.peers.lock().watch.is_some(), "inotify is available here");
            }
            assert!(listed(&t).is_empty());
            let b = Socket::bind(&d.join("mp_socket_2_b")).unwrap();
            let a = Socket::bind(&d.join("mp_socket_1_a")).unwrap();
            std::fs::write(d.join("mp_req_7_0"), b"").unwrap();
            assert_eq!(listed(&t), ["mp_socket_1_a", "mp_socket_2_b"]);
            // A file that is not a secondary's socket leaves the list as it is: watched, the
            // very same list (the directory was not read again); unwatched, an equal one.
            let first = t.peers.lock().current(&d).unwrap();
            std::fs::write(d.join("mp_req_8_0"), b"").unwrap();
            let second = t.peers.lock().current(&d).unwrap();
            assert_eq!(first, second);
            assert_eq!(Arc::ptr_eq(&first, &second), watched);
            a.unlink();
            assert_eq!(listed(&t), ["mp_socket_2_b"]);
            std::fs::rename(d.join("mp_socket_2_b"), d.join("mp_socket_3_c")).unwrap();
            assert_eq!(listed(&t), ["mp_socket_3_c"]);
            std::fs::rename(d.join("mp_socket_3_c"), d.join("elsewhere")).unwrap();
            assert!(listed(&t).is_empty());
            drop(b);
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    /// A secondary's one-way messages leave from its one-way socket whoever the primary is;
    /// its requests only when the primary is memplane's (which maps that socket back to the
    /// secondary's own), not to a DPDK primary (which would answer the one-way socket); its
    /// answers never. The socket goes with the transport's files.
    #[test]
    fn what_leaves_from_the_one_way_socket_depends_on_the_kind_and_the_primary() {
        for dpdk in [false, true] {
            let d = dir(&format!("one-way-{dpdk}"));
            let primary = Socket::bind(&d.join(rundir::PRIMARY_SOCKET)).unwrap();
            // The primary's lock: DPDK's record lock on `config`, or memplane's own.
            let mut dpdk_config = None;
            let mut memplane_lock = None;
            if dpdk {
                dpdk_config = Some(rundir::hold_dpdk_lock(&d.join(rundir::DPDK_CONFIG)));
            } else {
                memplane_lock = Some(rundir::PrimaryLock::acquire(&d).unwrap());
            }
            let t = UnixTransport::new(
                Socket::bind(&d.join("mp_socket_1_x")).unwrap(),
                Role::Secondary,
                d.clone(),
            )
            .unwrap();
            assert!(d.join("mp_tx_1_x").exists());
            let to = t.primary().clone();
            let deadline = crate::clock::now().saturating_add(std::time::Duration::from_secs(5));
            for (kind, one_way) in [
                (MsgKind::Msg, true),
                (MsgKind::Request, !dpdk),
                (MsgKind::Reply, false),
                (MsgKind::Ignore, false),
            ] {
                t.send_one_kind(&to, kind, b"x", &Fds::none(), deadline)
                    .unwrap();
                let want = if one_way {
                    "mp_tx_1_x"
                } else {
                    "mp_socket_1_x"
                };
                assert_eq!(
                    crate::socket::tests::sender(&primary),
                    want,
                    "{kind:?}, DPDK primary: {dpdk}"
                );
            }
            t.unlink();
            assert!(!d.join("mp_tx_1_x").exists());
            drop((dpdk_config, memplane_lock));
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    /// One `sendmmsg` for a broadcast; a gone peer and a full peer in the middle are each told
    /// apart (gone: an error, full: queued), and the peers after them still get the datagram,
    /// with its fd.
    #[test]
    fn a_broadcast_reaches_every_live_peer_past_a_gone_one_and_a_full_one() {
        let d = dir("broadcast-many");
        let t = UnixTransport::new(
            Socket::bind(&d.join("mp_socket")).unwrap(),
            Role::Primary,
            d.clone(),
        )
        .unwrap();
        let a = Socket::bind(&d.join("mp_socket_1_a")).unwrap();
        let full = Socket::bind(&d.join("mp_socket_2_b")).unwrap();
        let b = Socket::bind(&d.join("mp_socket_3_c")).unwrap();
        // Fill `full`'s queue (its length is the kernel's max_dgram_qlen).
        let filler = Socket::bind(&d.join("filler")).unwrap();
        while filler.send_to(full.path(), b"x", &[]).is_ok() {}
        let peers: Vec<PeerAddr> = [
            d.join("mp_socket_1_a"),
            d.join("mp_socket_9_gone"),
            d.join("mp_socket_2_b"),
            d.join("mp_socket_3_c"),
        ]
        .iter()
        .map(PeerAddr::new)
        .collect();
        let (r, w) = rustix::pipe::pipe().unwrap();
        let fds = Fds(vec![w]);
        let mut results = Vec::new();
        let deadline = crate::clock::now().saturating_add(std::time::Duration::from_secs(5));
        t.send_from_many(None, &peers, b"hello", &fds, deadline, &mut |p, r| {
            results.push((p.name().to_owned(), r))
        });
        assert_eq!(
            results,
            vec![
                ("mp_socket_1_a".to_owned(), Ok(())),
                ("mp_socket_9_gone".to_owned(), Err(SendError::PeerGone)),
                ("mp_socket_2_b".to_owned(), Ok(())),
                ("mp_socket_3_c".to_owned(), Ok(())),
            ]
        );
        assert_eq!(
            t.outbox_stats().waiting,
            1,
            "the full peer's datagram waits"
        );
        let mut batch = RecvBatch::new();
        for s in [&a, &b] {
            assert_eq!(s.recv_batch(&mut batch, false).unwrap(), 1);
            let (m, bytes) = batch.take(0);
            assert_eq!(bytes, b"hello");
            assert_eq!(m.fds.0.len(), 1);
        }
        drop((r, fds, filler));
        let _ = std::fs::remove_dir_all(&d);
    }
}
