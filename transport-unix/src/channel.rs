//! The channel: an [`Endpoint`] over the Unix transport, with its two threads.
//!
//! - The *receiving thread* reads datagrams, drops those from a sender with another uid, feeds
//!   the rest to the core, and runs what the core dispatches: action handlers, and async
//!   completions triggered by a reply. What it had to queue for a busy peer it delivers itself,
//!   watching that peer's room while it waits for datagrams.
//! - The *service thread* keeps time: it expires requests at their deadlines (running async
//!   completions that timed out), runs completions that finished during the call that started
//!   them (DPDK's "dummy request"), and drains the outbox when busy peers have room again (what
//!   other threads queued).
//!
//! Between memplane processes a third thread serves what comes through shared memory instead
//! of a datagram (see [`crate::lane`]): in a secondary the *lane thread* (`mp-lane`, the
//! primary's sync requests), in the primary `mp-lanes` (secondaries' sync requests and one-way
//! messages).
//!
//! A synchronous requester parks its own thread until its replies are in or its deadline passes.
//! Handlers and callbacks run on the channel's threads and may send, reply and start async
//! requests; a synchronous request from there is refused with [`Error::WouldDeadlock`].

use std::cell::Cell;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use parking_lot::Mutex;
use rustix::event::{PollFd, PollFlags};

use memplane_core::endpoint::{Dispatch, Endpoint, FinishedOf, Host, SendReport};
use memplane_core::message::{Message, MsgKind};
use memplane_core::pending::{Notify, Record, Reply, ReplySink, RequestId, Slot, Storage, Waiting};
use memplane_core::stats::StatsSnapshot;
use memplane_core::time::Instant;
use memplane_core::tracker::Waiter;
use memplane_core::wire::RecvFlags;
use memplane_core::{Abi, Name};

use crate::clock::now;
use crate::error::Error;
use crate::lane::{
    Answered, Board, LaneRequest, LaneWake, PrimaryLanes, SecondaryLane, UpRequest, UpWake,
};
use crate::rundir::{self, PrimaryLock};
use crate::socket::{Fds, PeerAddr, RECV_BUF, Socket};
use crate::spin::{SpinStats, Spinner};
use crate::transport::{OutboxStats, Role, UnixTransport};

/// Which role to take, DPDK's `--proc-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProcType {
    /// Be the primary; fail if one runs.
    Primary,
    /// Be a secondary; fail at once if no primary runs.
    Secondary,
    /// Secondary if a live primary holds the directory, else primary.
    #[default]
    Auto,
}

impl FromStr for ProcType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "primary" => Ok(ProcType::Primary),
            "secondary" => Ok(ProcType::Secondary),
            "auto" => Ok(ProcType::Auto),
            _ => Err(format!(
                "invalid --proc-type {s:?}: expected primary, secondary or auto"
            )),
        }
    }
}

/// How to open a channel. Names follow DPDK's EAL options.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// `--file-prefix`: names the deployment (default `rte`).
    pub file_prefix: String,
    /// `--runtime-dir`: overrides DPDK's runtime directory rules.
    pub runtime_dir: Option<PathBuf>,
    /// `--proc-type`.
    pub proc_type: ProcType,
    /// Wire ABI (default 25.11).
    pub abi: Abi,
    /// Accept datagrams from root as well as from our own uid.
    pub allow_root: bool,
    /// How long a one-way message or reply may wait for a busy peer.
    pub send_timeout: Duration,
    /// Mark initialisation complete at once (else call [`MpChannel::set_ready`]; until then a
    /// request for an unregistered action is answered with "ignore").
    pub ready: bool,
    /// Run the channel's own threads under `SCHED_BATCH`: a datagram that wakes them does not
    /// preempt the thread running on that CPU, so a burst is received as a burst (one wake-up
    /// for many datagrams). Raises message throughput when peers share a CPU; costs wake-up
    /// latency when the channel's CPU is busy (the thread waits for the running one to sleep or
    /// for the scheduler tick). Off by default, as DPDK's control thread.
    pub batch_scheduling: bool,
    /// The longest a thread waiting for a datagram it expects soon polls its socket before it
    /// blocks (the receiving thread, and a synchronous requester waiting for its answers). The
    /// window adapts between zero and this (see `spin.rs`): it opens while datagrams keep
    /// arriving within it and closes when they stop. Never used by a thread that may run on
    /// one CPU only. Zero turns polling off.
    pub busy_poll: Duration,
    /// Carry sync requests (both ways) and a secondary's one-way messages through shared
    /// memory ([`crate::lane`]) where both ends are memplane processes (on by default): a
    /// broadcast then costs each secondary no datagram. Off, every message goes over the
    /// sockets, as with DPDK peers.
    pub lanes: bool,
}

/// The default longest busy-polling window ([`ChannelConfig::busy_poll`]).
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            file_prefix: rundir::DEFAULT_PREFIX.to_owned(),
            runtime_dir: None,
            proc_type: ProcType::Auto,
            abi: Abi::default(),
            allow_root: true,
            send_timeout: Duration::from_secs(1),
            ready: true,
            batch_scheduling: false,
            busy_poll: DEFAULT_BUSY_POLL,
            lanes: true,
        }
    }
}

impl ChannelConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets `--file-prefix`.
    pub fn file_prefix(mut self, p: impl Into<String>) -> Self {
        self.file_prefix = p.into();
        self
    }
    /// Sets `--runtime-dir`.
    pub fn runtime_dir(mut self, d: impl Into<PathBuf>) -> Self {
        self.runtime_dir = Some(d.into());
        self
    }
    /// Sets `--proc-type`.
    pub fn proc_type(mut self, t: ProcType) -> Self {
        self.proc_type = t;
        self
    }
    /// Sets the wire ABI.
    pub fn abi(mut self, a: Abi) -> Self {
        self.abi = a;
        self
    }
    /// Accept root senders or not.
    pub fn allow_root(mut self, yes: bool) -> Self {
        self.allow_root = yes;
        self
    }
    /// Mark ready at open or not.
    pub fn ready(mut self, yes: bool) -> Self {
        self.ready = yes;
        self
    }
    /// Whether to use shared-memory lanes; see [`ChannelConfig::lanes`].
    pub fn lanes(mut self, yes: bool) -> Self {
        self.lanes = yes;
        self
    }

    /// Runs the channel's threads under `SCHED_BATCH`; see [`ChannelConfig::batch_scheduling`].
    pub fn batch_scheduling(mut self, yes: bool) -> Self {
        self.batch_scheduling = yes;
        self
    }
    /// Sets the longest busy-polling window; see [`ChannelConfig::busy_poll`].
    pub fn busy_poll(mut self, max: Duration) -> Self {
        self.busy_poll = max;
        self
    }
    /// The runtime directory these options name, made absolute against the working
    /// directory. A socket's address is its path as bound: a relative one names another file
    /// in a peer with another working directory, and an answer from `/run/x/mp_socket` would
    /// not match a request sent to `x/mp_socket`. Symbolic links are kept, as DPDK keeps them.
    pub fn dir(&self) -> PathBuf {
        let d = self
            .runtime_dir
            .clone()
            .unwrap_or_else(|| rundir::default_dir(&self.file_prefix));
        std::path::absolute(&d).unwrap_or(d)
    }
}

/// A received message or request, as an action sees it.
pub type Incoming = memplane_core::channel::Incoming<PeerAddr, Fds>;

/// One reply to a request.
#[derive(Debug)]
pub struct ReplyMsg {
    /// Who answered.
    pub from: PeerAddr,
    /// The reply, with its fds.
    pub msg: Message<Fds>,
}

/// The replies to a request, counted as DPDK's `rte_mp_reply`.
#[derive(Debug)]
pub struct Replies {
    /// Peers the request reached, minus those that answered "ignore".
    pub nb_sent: u32,
    /// Replies received.
    pub nb_received: u32,
    /// The deadline passed before every peer answered.
    pub timed_out: bool,
    /// The replies.
    pub msgs: Vec<ReplyMsg>,
}

/// The reply store of the core's pending table.
#[derive(Default, Debug)]
pub struct ReplyList(Vec<ReplyMsg>);

impl IntoIterator for ReplyList {
    type Item = (PeerAddr, Message<Fds>);
    type IntoIter =
        std::iter::Map<std::vec::IntoIter<ReplyMsg>, fn(ReplyMsg) -> (PeerAddr, Message<Fds>)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter().map(|r| (r.from, r.msg))
    }
}

impl ReplySink<PeerAddr, Fds> for ReplyList {
    fn push(&mut self, from: PeerAddr, msg: Message<Fds>) -> Result<(), Message<Fds>> {
        self.0.push(ReplyMsg { from, msg });
        Ok(())
    }
}

fn replies(r: Reply<ReplyList>) -> Replies {
    Replies {
        nb_sent: r.nb_sent,
        nb_received: r.nb_received,
        timed_out: r.timed_out,
        msgs: r.replies.0,
    }
}

/// An action: runs on the receiving thread for every message or request with its name.
pub type Handler = Arc<dyn Fn(&MpChannel, Incoming) + Send + Sync>;
/// An async completion: runs once, on a channel thread.
pub type Callback = Box<dyn FnOnce(&MpChannel, Replies) + Send>;

/// Sender paths seen lately and the peers they stand for (see [`MpChannel::peer_of`]).
#[derive(Default)]
struct PeersSeen {
    /// The last sender looked up.
    last: Option<(Arc<[u8]>, PeerAddr)>,
    /// Every sender seen since the map was last cleared (at 1,024 entries).
    map: std::collections::HashMap<Arc<[u8]>, PeerAddr>,
}

/// Wakes a synchronous requester: it blocks receiving on its request socket (it never parks),
/// so a completion from another thread reaches it through that socket.
pub struct Unpark {
    /// The waiting thread.
    thread: thread::ThreadId,
    /// Where the waiter blocks, woken there when another thread completes the request (a
    /// peer found dead, the deadline).
    wake: Option<Wake>,
}

/// Where a synchronous requester blocks.
enum Wake {
    /// On its request socket: see [`Socket::wake_reader`].
    Socket(SocketWake),
    /// On its lane request's wake word.
    Lane(LaneWake),
    /// On its request-to-the-primary's slot.
    Up(UpWake),
}

/// What [`Unpark`] needs to wake a waiter blocked on its request socket, and only while that
/// waiter still waits for this very request: the socket goes back to the pool afterwards, and
/// a late wake-up must not hit the next request on it.
struct SocketWake {
    sock: Arc<Socket>,
    /// The socket's request number and whether a waiter waits for it; see [`WakeGate`].
    gate: Arc<WakeGate>,
    /// The request this wake-up is for.
    seq: u64,
}

/// A request socket's current request number, and whether its waiter is still waiting.
#[derive(Default)]
struct WakeGate(Mutex<(u64, bool)>);

impl WakeGate {
    /// A waiter starts waiting for a new request; returns its number.
    fn open(&self) -> u64 {
        let mut g = self.0.lock();
        g.0 += 1;
        g.1 = true;
        g.0
    }
    /// The waiter is done: no wake-up reaches the socket from here on.
    fn close(&self) {
        self.0.lock().1 = false;
    }
}

impl Unpark {
    /// Wakes the calling thread, blocked on `wake` if given.
    fn current(wake: Option<Wake>) -> Self {
        Unpark {
            thread: thread::current().id(),
            wake,
        }
    }
}

impl Notify for Unpark {
    fn notify(&self) {
        // The waiter's own thread completes its request while it handles the last answer:
        // nothing to wake then.
        if thread::current().id() == self.thread {
            return;
        }
        match &self.wake {
            Some(Wake::Socket(w)) => {
                // Under the gate's lock: the waiter cannot leave (and the socket be reused)
                // while it is being woken.
                let g = w.gate.0.lock();
                if *g == (w.seq, true) {
                    w.sock.wake_reader();
                }
            }
            Some(Wake::Lane(w)) => w.wake(),
            Some(Wake::Up(w)) => w.wake(),
            None => {}
        }
    }
}

/// How many requests may wait for replies at once.
pub const REQUESTS: usize = 2048;
/// How many (request, peer) slots: a broadcast to n secondaries takes n.
pub const SLOTS: usize = 8192;

/// The pending table's storage: boxed slices, built element by element so the table never sits
/// whole on a stack (it is hundreds of kilobytes).
pub struct HeapStorage;

impl Storage<PeerAddr, Unpark, Callback, ReplyList> for HeapStorage {
    type Records = Box<[Record<Unpark, Callback, ReplyList>]>;
    type Slots = Box<[Slot<PeerAddr>]>;
    type Buckets = Box<[u32]>;
    fn allocate() -> (Self::Records, Self::Slots, Self::Buckets) {
        (
            (0..REQUESTS).map(|_| Record::vacant()).collect(),
            (0..SLOTS).map(|_| Slot::vacant()).collect(),
            vec![0; SLOTS].into_boxed_slice(),
        )
    }
}

/// The host types of the Unix channel.
pub struct UnixHost;
impl Host for UnixHost {
    type Transport = UnixTransport;
    type Handler = Handler;
    type Notify = Unpark;
    type Callback = Callback;
    type Replies = ReplyList;
    type RawMutex = parking_lot::RawMutex;
    type Storage = HeapStorage;
}

/// How many actions one channel can register (DPDK has no limit; memplane's registry is a
/// fixed hash table, so it has one, and says so when it is reached).
pub const ACTIONS: usize = 1024;

thread_local! {
    static CHANNEL_THREAD: Cell<bool> = const { Cell::new(false) };
    /// On a receiving thread: the address of the transport it receives for (0 elsewhere).
    static RECEIVES_FOR: Cell<usize> = const { Cell::new(0) };
}

/// Names thread `h` (at most 15 bytes, as the kernel keeps).
fn set_thread_name<T>(h: &thread::JoinHandle<T>, name: &str) {
    use std::os::unix::thread::JoinHandleExt;
    let Ok(c) = std::ffi::CString::new(&name.as_bytes()[..name.len().min(15)]) else {
        return;
    };
    // SAFETY: `h` is not joined, so its pthread_t is valid; `c` is a NUL-terminated string of
    // at most 15 bytes plus the NUL (the kernel's limit) that outlives the call.
    unsafe { libc::pthread_setname_np(h.as_pthread_t(), c.as_ptr()) };
}

/// Puts thread `h` under `SCHED_BATCH` (static priority 0, as that policy requires).
fn set_batch_policy<T>(h: &thread::JoinHandle<T>) -> std::io::Result<()> {
    use std::os::unix::thread::JoinHandleExt;
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `h` is not joined yet, so its pthread_t names a live (or finished but unjoined,
    // still valid) thread; `param` is an initialised sched_param that outlives the call, and
    // SCHED_BATCH with priority 0 is a valid combination.
    let r = unsafe { libc::pthread_setschedparam(h.as_pthread_t(), libc::SCHED_BATCH, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(r))
    }
}

/// A channel thread's wait: until one of `own` (its wake-ups: its socket, the stop and wake
/// fds) is readable, a busy peer of `ob` has room (its probe polled for `POLLOUT`), or
/// `deadline` passes. While datagrams wait in the outbox it wakes at least every 50 ms (a
/// safety net: room wakes the probe), and every millisecond when `stalled`: a probe said
/// "room" last time yet nothing went out (our own send buffer is full), so the probes are left
/// out, not to spin, and the send is retried soon. Returns whether a peer's room woke it, and
/// sets `ready[i]` to whether `own[i]` did.
fn wait_for_room(
    own: &[BorrowedFd<'_>],
    ob: &crate::transport::OutboxPoll,
    stalled: bool,
    deadline: Option<Instant>,
    ready: &mut Vec<bool>,
) -> bool {
    let mut pfds: Vec<PollFd<'_>> = own.iter().map(|f| PollFd::new(f, PollFlags::IN)).collect();
    // Only the busy peers' probes: our own unconnected socket is nearly always writable, and
    // polling it would make the wait spin (and starve the peers it waits for).
    if !stalled {
        pfds.extend(
            ob.probes
                .iter()
                .map(|(_, p)| PollFd::new(p, PollFlags::OUT)),
        );
    }
    let mut left = deadline.map(|d| d.saturating_duration_since(now()));
    if !ob.probes.is_empty() {
        let cap = Duration::from_millis(if stalled { 1 } else { 50 });
        left = Some(left.map_or(cap, |l| l.min(cap)));
    }
    let timeout = left.map(|l| rustix::time::Timespec {
        tv_sec: l.as_secs() as i64,
        tv_nsec: l.subsec_nanos() as i64,
    });
    let n = rustix::event::poll(&mut pfds, timeout.as_ref()).unwrap_or(0);
    ready.clear();
    ready.extend(
        pfds[..own.len()]
            .iter()
            .map(|p| n > 0 && !p.revents().is_empty()),
    );
    n > 0 && pfds[own.len()..].iter().any(|p| !p.revents().is_empty())
}

/// Whether the calling thread is one of a channel's own threads (which must never block).
pub(crate) fn on_channel_thread() -> bool {
    CHANNEL_THREAD.with(|c| c.get())
}

/// Whether the calling thread is the receiving thread of transport `t`, which delivers what it
/// queues for busy peers itself (see `MpChannel::receive_loop`).
pub(crate) fn receives_for(t: &UnixTransport) -> bool {
    RECEIVES_FOR.with(|c| c.get()) == std::ptr::from_ref(t) as usize
}

/// Counters of a channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// The endpoint's counters.
    pub endpoint: StatsSnapshot,
    /// The outbox's counters.
    pub outbox: OutboxStats,
    /// Handlers or callbacks that panicked (the channel survives them).
    pub panics: u64,
    /// Failed receives (the receiving thread goes on).
    pub receive_errors: u64,
    /// Peer processes watched for their exit now (a pidfd each): in a primary its verified
    /// secondaries, in a secondary the primary.
    pub watched_processes: usize,
    /// Peers whose exit ended the wait of pending requests, since the channel opened.
    pub peers_exited: u64,
    /// What busy polling did ([`ChannelConfig::busy_poll`]).
    pub busy_poll: BusyPollStats,
    /// What went through shared-memory lanes ([`ChannelConfig::lanes`]).
    pub lanes: LaneStats,
}

/// What went through shared-memory lanes; see [`ChannelStats::lanes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaneStats {
    /// This process has lanes: a primary made its board, a secondary holds a lane on it.
    pub active: bool,
    /// Requests this process posted to lanes (a primary's broadcast: one per secondary).
    pub requests: u64,
    /// Answers to them taken from the lanes (not those that came over a socket).
    pub replies: u64,
    /// Answers this process gave through lanes, to the other side's requests.
    pub answered: u64,
    /// One-way messages this process sent through its lane's ring (a secondary's to the
    /// primary).
    pub messages: u64,
    /// A secondary's messages and requests the primary has not yet taken from the ring or
    /// handled from the socket; while it is not zero, new ones go by socket behind them.
    pub up_behind: u64,
}

/// What the channel's busy polling did since it opened, summed over its waiting threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BusyPollStats {
    /// Polls before a blocking receive (a closed window that did not probe is none).
    pub polls: u64,
    /// Polls that caught a datagram: waits that ended without sleeping.
    pub caught: u64,
    /// Microseconds spent polling: the CPU time busy polling cost.
    pub polled_us: u64,
}

/// The channel's working part; [`Channel`] owns it. Handlers and callbacks get a reference.
pub struct MpChannel {
    ep: Endpoint<UnixHost, ACTIONS>,
    config: ChannelConfig,
    lock: Option<PrimaryLock>,
    uid: u32,
    stop: AtomicBool,
    stop_fd: OwnedFd,
    deferred: Mutex<Vec<FinishedOf<UnixHost>>>,
    /// When the service thread plans to wake (0: it is deciding right now).
    sleep_until: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    panics: AtomicU64,
    receive_errors: AtomicU64,
    /// Peers whose process exit the service thread reported to the pending requests.
    peers_exited: AtomicU64,
    /// The busy polls of the receiving thread and the request sockets.
    spin_stats: Arc<SpinStats>,
    /// Request sockets not in use (see [`RequestSocket`]).
    request_sockets: Mutex<Vec<RequestSocket>>,
    /// Sender paths seen lately, and their addresses.
    peers_seen: Mutex<PeersSeen>,
    request_seq: AtomicU64,
    /// A primary's lanes to its memplane secondaries.
    lanes: Option<Arc<PrimaryLanes>>,
    /// Polling windows of lane requesters not waiting now (see [`MpChannel::take_spinner`]).
    spinners: Mutex<Vec<Spinner>>,
    /// With lanes: held while a handler runs, on the receiving thread or a lane thread, so
    /// handlers run one at a time, as on DPDK's one thread.
    dispatch: Mutex<()>,
    /// A secondary's lane from its primary.
    lane: Option<Arc<SecondaryLane>>,
    /// What went through lanes (see [`LaneStats`]).
    lane_requests: AtomicU64,
    lane_replies: AtomicU64,
    lane_answered: AtomicU64,
    lane_messages: AtomicU64,
}

/// A socket a synchronous requester sends from and receives its replies on, directly: no
/// hand-off through the receiving thread, so a round trip costs two wake-ups, as a bare
/// ping-pong does. Named `mp_req_<pid>_<n>` (not `mp_socket_*`, so no broadcast takes it for a
/// secondary); pooled by the channel; removed when the channel closes. In a secondary, those for
/// requests to the primary alone are connected to it: the kernel skips the path lookup of each
/// send, and takes datagrams on them from the primary only.
struct RequestSocket {
    sock: Arc<Socket>,
    buf: Vec<u8>,
    /// Buffers for taking several answers with one `recvmmsg`, made on the socket's first
    /// request to more than one peer (the answers of a broadcast mostly arrive together).
    batch: Option<Box<crate::socket::RecvBatch>>,
    /// The receive timeout set on the socket now.
    timeout: Duration,
    /// A request on it ended before every answer came: late ones may be queued.
    dirty: bool,
    /// Its busy-polling window.
    spin: Spinner,
    /// Lets other threads wake its waiter (see [`SocketWake`]).
    gate: Arc<WakeGate>,
}

impl Drop for RequestSocket {
    fn drop(&mut self) {
        self.sock.unlink();
    }
}

/// Waits for a sync request's replies by receiving them on its own request socket.
struct SocketWaiter<'a> {
    ch: &'a MpChannel,
    rs: std::cell::RefCell<&'a mut RequestSocket>,
    /// The request went to more than one peer: take its answers with the socket's batch.
    many: bool,
}

impl Waiter for SocketWaiter<'_> {
    type Notify = Unpark;
    fn notifier(&self) -> Unpark {
        Unpark::current(None)
    }
    /// One blocking receive, bounded by the deadline through `SO_RCVTIMEO`, which is changed
    /// only when it would overshoot the deadline by more than a little: a round trip costs one
    /// `sendmsg` and one `recvmsg`, as a bare ping-pong does.
    fn wait_until(&self, deadline: Instant) -> Instant {
        let mut rs = self.rs.borrow_mut();
        let n = now();
        if deadline <= n {
            return n;
        }
        let left = deadline.saturating_duration_since(n);
        let slack = (left / 64).max(Duration::from_millis(1));
        if rs.timeout > left + slack || rs.timeout.is_zero() {
            if rs.sock.set_recv_timeout(left).is_err() {
                return now();
            }
            rs.timeout = left;
        }
        let RequestSocket {
            sock,
            buf,
            batch,
            spin,
            ..
        } = &mut **rs;
        let past = |t: Instant| t >= deadline;
        match batch {
            Some(b) if self.many => {
                let n = match spin.poll(|| sock.recv_batch(b, false).ok().filter(|&n| n > 0), past)
                {
                    Some(n) => Ok(n),
                    None => sock.recv_batch(b, true),
                };
                if let Ok(n) = n {
                    for i in 0..n {
                        let (r, bytes) = b.take(i);
                        if !sock.is_wake(&r) {
                            self.ch.handle(r, bytes, false);
                        }
                    }
                }
            }
            _ => {
                let r = match spin.poll(|| sock.recv(buf, false).ok().flatten(), past) {
                    Some(r) => Some(r),
                    None => sock.recv(buf, true).ok().flatten(),
                };
                if let Some(r) = r
                    && !sock.is_wake(&r)
                {
                    self.ch.handle(r, buf, false);
                }
            }
        }
        now()
    }
}

/// Waits for a lane request's answers: sleeps on its wake word, takes the answers from the
/// lanes.
struct LaneWaiter<'a> {
    ch: &'a MpChannel,
    peers: &'a [PeerAddr],
    lr: std::cell::RefCell<&'a mut LaneRequest>,
    spin: std::cell::RefCell<&'a mut Spinner>,
}

impl Waiter for LaneWaiter<'_> {
    type Notify = Unpark;
    fn notifier(&self) -> Unpark {
        Unpark::current(None)
    }
    fn wait_until(&self, deadline: Instant) -> Instant {
        let mut lr = self.lr.borrow_mut();
        let n = now();
        if deadline <= n {
            return n;
        }
        let mut buf = [0u8; crate::lane::BUF_LEN];
        let seen = lr.wake_seen();
        let take = |lr: &mut LaneRequest, buf: &mut [u8]| {
            lr.harvest(buf, |i, bytes| self.ch.lane_answer(&self.peers[i], bytes))
        };
        if take(&mut lr, &mut buf) > 0 {
            return now();
        }
        // Where it may, poll for the last answer a while before sleeping.
        let past = |t: Instant| t >= deadline;
        let done = || lr.all_answered().then_some(());
        if self.spin.borrow_mut().poll(done, past).is_none() {
            lr.sleep(seen, deadline.saturating_duration_since(n));
        }
        take(&mut lr, &mut buf);
        now()
    }
}

/// Answers a request that came through a lane with the encoded reply.
type AnswerThrough<'a> = dyn Fn(&[u8]) -> Answered + 'a;

/// Waits for the answer to a secondary's request through its lane.
struct UpWaiter<'a> {
    ch: &'a MpChannel,
    req: &'a UpRequest,
    spin: std::cell::RefCell<&'a mut Spinner>,
}

impl Waiter for UpWaiter<'_> {
    type Notify = Unpark;
    fn notifier(&self) -> Unpark {
        Unpark::current(None)
    }
    fn wait_until(&self, deadline: Instant) -> Instant {
        let n = now();
        if deadline <= n {
            return n;
        }
        let mut buf = [0u8; crate::lane::BUF_LEN];
        let seen = self.req.wake_seen();
        if let Some(len) = self.req.take(&mut buf) {
            self.ch.up_answer(&buf[..len]);
            return now();
        }
        // Where it may, poll for the answer a while before sleeping.
        let past = |t: Instant| t >= deadline;
        let got = self
            .spin
            .borrow_mut()
            .poll(|| self.req.take(&mut buf), past);
        let got = got.or_else(|| {
            self.req.sleep(seen, deadline.saturating_duration_since(n));
            self.req.take(&mut buf)
        });
        if let Some(len) = got {
            self.ch.up_answer(&buf[..len]);
        }
        now()
    }
}

impl MpChannel {
    /// This process's role.
    pub fn role(&self) -> Role {
        self.ep.transport().role()
    }

    /// The runtime directory.
    pub fn dir(&self) -> &Path {
        self.ep.transport().dir()
    }

    /// This process's socket path.
    pub fn socket_path(&self) -> &Path {
        self.ep.transport().socket().path()
    }

    /// The wire ABI.
    pub fn abi(&self) -> Abi {
        self.ep.abi()
    }

    /// The options the channel was opened with.
    pub fn config(&self) -> &ChannelConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> ChannelStats {
        ChannelStats {
            endpoint: self.ep.stats().snapshot(),
            outbox: self.ep.transport().outbox_stats(),
            panics: self.panics.load(Ordering::Relaxed),
            receive_errors: self.receive_errors.load(Ordering::Relaxed),
            watched_processes: self.ep.transport().watched_processes(),
            peers_exited: self.peers_exited.load(Ordering::Relaxed),
            busy_poll: BusyPollStats {
                polls: self.spin_stats.polls.load(Ordering::Relaxed),
                caught: self.spin_stats.caught.load(Ordering::Relaxed),
                polled_us: self.spin_stats.nanos.load(Ordering::Relaxed) / 1000,
            },
            lanes: LaneStats {
                active: self.lane.is_some() || self.lanes.is_some(),
                requests: self.lane_requests.load(Ordering::Relaxed),
                replies: self.lane_replies.load(Ordering::Relaxed),
                answered: self.lane_answered.load(Ordering::Relaxed),
                messages: self.lane_messages.load(Ordering::Relaxed),
                up_behind: self.lane.as_ref().map_or(0, |l| l.up_behind()),
            },
        }
    }

    /// Marks initialisation complete (see [`ChannelConfig::ready`]).
    pub fn set_ready(&self) {
        self.ep.set_init_complete();
    }

    /// The primary lock (and memory-configuration file), in the primary.
    pub fn primary_lock(&self) -> Option<&PrimaryLock> {
        self.lock.as_ref()
    }

    /// Registers `f` as the action `name`.
    pub fn register(
        &self,
        name: &str,
        f: impl Fn(&MpChannel, Incoming) + Send + Sync + 'static,
    ) -> Result<(), Error> {
        Ok(self.ep.register(Name::new(name)?, Arc::new(f))?)
    }

    /// Unregisters the action `name`.
    pub fn unregister(&self, name: &str) -> Result<(), Error> {
        self.ep.unregister(&Name::new(name)?)?;
        Ok(())
    }

    /// The peers a send or request goes to: every secondary from the primary, the primary from
    /// a secondary.
    pub fn peers(&self) -> Result<Vec<PeerAddr>, Error> {
        // The transport gives them sorted already.
        let mut v = Vec::new();
        memplane_core::Transport::for_each_peer(self.ep.transport(), &mut |p| v.push(p.clone()))?;
        Ok(v)
    }

    fn send_deadline(&self) -> Instant {
        now().saturating_add(self.config.send_timeout)
    }

    /// Sends a one-way message to every peer: from a secondary, to the primary alone, which it
    /// may wait for as [`MpChannel::send_to`] does; from the primary, never waiting on one
    /// secondary at the others' expense (a busy one's datagram waits in the outbox).
    pub fn send(&self, msg: &Message<Fds>) -> Result<SendReport, Error> {
        if self.role() == Role::Secondary && self.send_up(msg) {
            return Ok(SendReport {
                sent: 1,
                ..SendReport::default()
            });
        }
        let r = self.ep.send(msg, self.send_deadline())?;
        if self.role() == Role::Secondary && r.sent == 0 {
            // The primary is there but did not take it in time (stopped, or not reading): say
            // that, not "gone".
            return Err(match r.first_error {
                Some(e) if r.gone == 0 => {
                    Error::Endpoint(memplane_core::EndpointError::Transport(e))
                }
                _ => Error::PrimaryGone,
            });
        }
        Ok(r)
    }

    /// Sends a one-way message to one peer. When the peer's queue is full, a thread that may
    /// block waits for room, at most [`ChannelConfig::send_timeout`] (then
    /// [`SendError::Timeout`](memplane_core::transport::SendError::Timeout)), as DPDK's blocking
    /// socket does but bounded; on the channel's own threads the datagram waits in the outbox
    /// instead, so a handler never stalls the channel.
    pub fn send_to(&self, to: &PeerAddr, msg: &Message<Fds>) -> Result<(), Error> {
        if to == self.ep.transport().primary() && self.send_up(msg) {
            return Ok(());
        }
        Ok(self
            .ep
            .send_to(to, MsgKind::Msg, msg, self.send_deadline())?)
    }

    /// A secondary's one-way message to the primary through its lane's ring, if it can go
    /// there (a lane, no fds, nothing waiting in the outbox, room, and everything sent by
    /// socket handled; else it goes by socket, behind the ring's).
    fn send_up(&self, msg: &Message<Fds>) -> bool {
        let Some(lane) = &self.lane else { return false };
        if msg.num_fds() != 0 || self.ep.transport().outbox_waiting() || !lane.up_open() {
            return false;
        }
        let Ok(d) = memplane_core::wire::Datagram::encode(self.ep.abi(), MsgKind::Msg, msg) else {
            return false;
        };
        let sent = lane.push_up(d.as_bytes());
        if sent {
            self.lane_messages.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Answers a request from `to`.
    pub fn reply(&self, to: &PeerAddr, msg: &Message<Fds>) -> Result<(), Error> {
        // A request that came through a lane is answered there: a secondary's from the
        // primary (`to` is the primary), a primary's from a secondary (`to` names its socket).
        let through: Option<&AnswerThrough<'_>> = match (&self.lane, &self.lanes) {
            (Some(lane), _) if lane.owing() && to == self.ep.transport().primary() => {
                Some(&|b: &[u8]| lane.reply(msg.name(), b))
            }
            (_, Some(lanes)) if lanes.owing_up() => {
                Some(&|b: &[u8]| lanes.reply_up(to.name(), msg.name(), b))
            }
            _ => None,
        };
        if let Some(answer) = through {
            if msg.num_fds() == 0 {
                let d = memplane_core::wire::Datagram::encode(self.ep.abi(), MsgKind::Reply, msg)
                    .map_err(memplane_core::EndpointError::from)?;
                if let Answered::Lane = answer(d.as_bytes()) {
                    self.lane_answered.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
            } else {
                // fds cross only with a datagram: the answer goes over the socket, and the
                // lane is told it went there.
                let r = self.ep.reply(to, msg, self.send_deadline());
                answer(&[]);
                return Ok(r?);
            }
        }
        Ok(self.ep.reply(to, msg, self.send_deadline())?)
    }

    /// Sends a request to every peer and waits until all answered or `timeout` passed.
    pub fn request(&self, msg: &Message<Fds>, timeout: Duration) -> Result<Replies, Error> {
        self.with_peers(|peers| self.request_to(peers, msg, timeout))?
    }

    /// Runs `f` on the peers a message would reach ([`MpChannel::peers`]); a secondary's one
    /// peer, the primary, without building a list.
    fn with_peers<R>(&self, f: impl FnOnce(&[PeerAddr]) -> R) -> Result<R, Error> {
        if self.role() == Role::Secondary {
            let mut primary = None;
            memplane_core::Transport::for_each_peer(self.ep.transport(), &mut |p| {
                primary = Some(p.clone())
            })?;
            return Ok(f(primary.as_slice()));
        }
        Ok(f(&self.peers()?))
    }

    /// [`MpChannel::request`] to the given peers.
    pub fn request_to(
        &self,
        peers: &[PeerAddr],
        msg: &Message<Fds>,
        timeout: Duration,
    ) -> Result<Replies, Error> {
        let r = replies(self.request_pooled(peers, msg, timeout)?);
        if self.role() == Role::Secondary && r.nb_sent == 0 && !peers.is_empty() {
            return Err(Error::PrimaryGone);
        }
        Ok(r)
    }

    /// A sync request on a pooled request socket (refused on a channel thread).
    fn request_pooled(
        &self,
        peers: &[PeerAddr],
        msg: &Message<Fds>,
        timeout: Duration,
    ) -> Result<Reply<ReplyList>, Error> {
        if on_channel_thread() {
            return Err(Error::WouldDeadlock);
        }
        if let Some(r) = self.request_lanes(peers, msg, timeout) {
            return r;
        }
        if let Some(r) = self.request_up(peers, msg, timeout) {
            return r;
        }
        // A secondary's request to the primary alone (nearly all of them) goes from a socket
        // connected to the primary: its send skips the path lookup.
        let tr = self.ep.transport();
        let to_primary = tr.role() == Role::Secondary && matches!(peers, [p] if p == tr.primary());
        let mut rs = self.take_request_socket(to_primary)?;
        let r = self.request_via(&mut rs, peers, msg, timeout);
        self.put_request_socket(rs);
        r
    }

    fn request_via(
        &self,
        rs: &mut RequestSocket,
        peers: &[PeerAddr],
        msg: &Message<Fds>,
        timeout: Duration,
    ) -> Result<Reply<ReplyList>, Error> {
        if rs.dirty {
            // Whatever waits on the socket answers an earlier request that gave up: drop it.
            while let Ok(Some(_)) = rs.sock.recv(&mut rs.buf, false) {}
            rs.dirty = false;
        }
        let many = peers.len() > 1;
        if many && rs.batch.is_none() {
            rs.batch = Some(Box::default());
        }
        let t = now();
        let p = self.ep.prepare_request(
            peers,
            msg,
            t,
            timeout,
            Waiting::Sync(Unpark::current(Some(Wake::Socket(SocketWake {
                sock: rs.sock.clone(),
                gate: rs.gate.clone(),
                seq: rs.gate.open(),
            })))),
        )?;
        let tr = self.ep.transport();
        // This thread may block (it waits for the answers next): with one peer it waits for
        // room itself; with several a busy one must not hold up the others.
        if let [peer] = peers {
            let r = tr.send_from(
                Some(&rs.sock),
                peer,
                p.datagram.as_bytes(),
                msg.fds(),
                p.deadline,
                true,
            );
            self.ep.sent(p.id, peer, r);
        } else {
            tr.send_from_many(
                Some(&rs.sock),
                peers,
                p.datagram.as_bytes(),
                msg.fds(),
                p.deadline,
                &mut |peer, r| self.ep.sent(p.id, peer, r),
            );
        }
        self.ep.sending_done(p.id, t)?;
        let waiter = SocketWaiter {
            ch: self,
            rs: std::cell::RefCell::new(rs),
            many,
        };
        let r = self.ep.wait(p.id, t, &waiter);
        let rs = waiter.rs.into_inner();
        rs.gate.close();
        rs.dirty = r.as_ref().map_or(true, |r| r.timed_out);
        Ok(r?)
    }

    /// A primary's sync request to secondaries of which some serve a lane: posted to their
    /// lanes (the others get a datagram from the primary's socket, answered through the
    /// receiving thread); the requester sleeps once, until the last lane answer or a wake-up.
    /// `None`: no lane fits (no lanes, fds attached, no peer with a lane, every control
    /// entry in use): the caller goes by socket.
    fn request_lanes(
        &self,
        peers: &[PeerAddr],
        msg: &Message<Fds>,
        timeout: Duration,
    ) -> Option<Result<Reply<ReplyList>, Error>> {
        let lanes = self.lanes.as_ref()?;
        // Something waiting in the outbox may be for one of these peers: a lane request would
        // overtake it.
        if msg.num_fds() != 0 || peers.is_empty() || self.ep.transport().outbox_waiting() {
            return None;
        }
        let which = lanes.lanes_for(peers.iter().map(|p| p.name()))?;
        let mut lr = lanes.begin()?;
        let t = now();
        let p = match self.ep.prepare_request(
            peers,
            msg,
            t,
            timeout,
            Waiting::Sync(Unpark::current(Some(Wake::Lane(lr.waker())))),
        ) {
            Ok(p) => p,
            Err(e) => {
                lanes.finish(lr);
                return Some(Err(e.into()));
            }
        };
        let mut rest = Vec::new();
        for (i, (peer, lane)) in peers.iter().zip(&which).enumerate() {
            match lane {
                Some(l) if lr.post(i, *l, p.datagram.as_bytes()) => {
                    self.ep.sent(p.id, peer, Ok(()));
                }
                _ => rest.push(peer.clone()),
            }
        }
        self.lane_requests
            .fetch_add(lr.posted() as u64, Ordering::Relaxed);
        lr.ring();
        if !rest.is_empty() {
            self.ep.transport().send_from_many(
                None,
                &rest,
                p.datagram.as_bytes(),
                msg.fds(),
                p.deadline,
                &mut |peer, r| self.ep.sent(p.id, peer, r),
            );
        }
        let r = self
            .ep
            .sending_done(p.id, t)
            .map_err(Error::from)
            .and_then(|_| {
                let mut spin = self.take_spinner();
                let waiter = LaneWaiter {
                    ch: self,
                    peers,
                    lr: std::cell::RefCell::new(&mut lr),
                    spin: std::cell::RefCell::new(&mut spin),
                };
                let r = self.ep.wait(p.id, t, &waiter);
                self.spinners.lock().push(spin);
                Ok(r?)
            });
        lanes.finish(lr);
        Some(r)
    }

    /// A secondary's sync request to the primary alone, through its lane: posted to one of
    /// the lane's slots; the requester sleeps on the slot until the answer. `None`: the lane
    /// cannot take it (no lane, fds attached, not to the primary alone, the primary has not
    /// handled everything sent it by socket yet, no free slot): the caller goes by socket.
    fn request_up(
        &self,
        peers: &[PeerAddr],
        msg: &Message<Fds>,
        timeout: Duration,
    ) -> Option<Result<Reply<ReplyList>, Error>> {
        let lane = self.lane.as_ref()?;
        let tr = self.ep.transport();
        if msg.num_fds() != 0 || tr.outbox_waiting() || !matches!(peers, [p] if p == tr.primary()) {
            return None;
        }
        let slot = lane.reserve_up()?;
        let t = now();
        let p = match self.ep.prepare_request(
            peers,
            msg,
            t,
            timeout,
            Waiting::Sync(Unpark::current(Some(Wake::Up(slot.waker())))),
        ) {
            Ok(p) => p,
            Err(e) => {
                slot.cancel();
                return Some(Err(e.into()));
            }
        };
        let req = slot.post(p.datagram.as_bytes());
        self.ep.sent(p.id, tr.primary(), Ok(()));
        self.lane_requests.fetch_add(1, Ordering::Relaxed);
        let r = self
            .ep
            .sending_done(p.id, t)
            .map_err(Error::from)
            .and_then(|_| {
                let mut spin = self.take_spinner();
                let waiter = UpWaiter {
                    ch: self,
                    req: &req,
                    spin: std::cell::RefCell::new(&mut spin),
                };
                let r = self.ep.wait(p.id, t, &waiter);
                self.spinners.lock().push(spin);
                Ok(r?)
            });
        req.finish();
        Some(r)
    }

    /// Runs one of a secondary's requests to us that came through its lane (in the primary).
    fn up_dispatch(&self, pid: u32, name: &str, bytes: &[u8], owe: &dyn Fn(Name)) {
        // The sender is the secondary's own socket, as for its datagrams: its path, built on
        // the stack, looked up in the cache of senders (no allocation once seen).
        let dir = self.dir().as_os_str().as_bytes();
        let n = dir.len() + 1 + name.len();
        let (mut stack, mut heap) = ([0u8; 128], Vec::new());
        // A socket path fits in 108 bytes: the heap is for form's sake.
        let p: &mut [u8] = match stack.get_mut(..n) {
            Some(p) => p,
            None => {
                heap.resize(n, 0);
                &mut heap
            }
        };
        p[..dir.len()].copy_from_slice(dir);
        p[dir.len()] = b'/';
        p[dir.len() + 1..].copy_from_slice(name.as_bytes());
        let from = self.peer_of(p, pid);
        let d = self
            .ep
            .receive(from, bytes, Fds::default(), RecvFlags::default(), now());
        self.run_dispatched(d, pid, Some(owe));
    }

    /// The primary's lane thread: serves secondaries' requests and messages in their lanes.
    fn up_loop(self: &Arc<Self>) {
        CHANNEL_THREAD.with(|c| c.set(true));
        let Some(lanes) = &self.lanes else { return };
        let stop = || self.stop.load(Ordering::Acquire);
        let mut spin = Spinner::new(self.config().busy_poll, self.spin_stats.clone());
        lanes.run_up(&stop, Duration::from_secs(1), &mut spin, &mut |lane| {
            let _one_at_a_time = self.dispatch.lock();
            lanes.serve_up(lane, &mut |_, pid, name, bytes, owe| {
                self.up_dispatch(pid, name, bytes, owe)
            });
        });
    }

    /// A polling window for a lane requester, from the pool (each keeps what it learned).
    fn take_spinner(&self) -> Spinner {
        self.spinners
            .lock()
            .pop()
            .unwrap_or_else(|| Spinner::new(self.config().busy_poll, self.spin_stats.clone()))
    }

    /// Feeds the primary's answer taken from our lane to the pending requests (empty: it
    /// went over the socket).
    fn up_answer(&self, bytes: &[u8]) {
        let primary = self.ep.transport().primary().clone();
        self.lane_answer(&primary, bytes);
    }

    /// Feeds an answer taken from a lane to the pending requests (empty: it went over the
    /// socket).
    fn lane_answer(&self, from: &PeerAddr, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.lane_replies.fetch_add(1, Ordering::Relaxed);
        let d = self.ep.receive(
            from.clone(),
            bytes,
            Fds::default(),
            RecvFlags::default(),
            now(),
        );
        if let Dispatch::Answered(Some(f)) = d {
            self.run_callback(f);
        }
    }

    /// A secondary's lane thread: runs the handlers of the requests the primary posts.
    fn lane_loop(self: &Arc<Self>) {
        CHANNEL_THREAD.with(|c| c.set(true));
        let Some(lane) = &self.lane else { return };
        let stop = || self.stop.load(Ordering::Acquire);
        let mut spin = Spinner::new(self.config().busy_poll, self.spin_stats.clone());
        lane.run(&stop, Duration::from_secs(1), &mut spin, &mut || {
            let _one_at_a_time = self.dispatch.lock();
            lane.serve_posted(&mut |_, bytes, owe| self.lane_dispatch(bytes, owe));
        });
    }

    /// Runs one lane request of the primary's (`owe` tells the lane an answer is owed).
    fn lane_dispatch(&self, bytes: &[u8], owe: &dyn Fn(Name)) {
        let Some(lane) = &self.lane else { return };
        let d = self.ep.receive(
            self.ep.transport().primary().clone(),
            bytes,
            Fds::default(),
            RecvFlags::default(),
            now(),
        );
        self.run_dispatched(d, lane.primary_pid(), Some(owe));
    }

    /// A request socket from the pool, or a new one; connected to the primary when
    /// `to_primary` (best effort: without a primary to connect to, it goes by path).
    fn take_request_socket(&self, to_primary: bool) -> Result<RequestSocket, Error> {
        {
            let mut pool = self.request_sockets.lock();
            if let Some(i) = pool
                .iter()
                .rposition(|s| s.sock.connected_to().is_some() == to_primary)
            {
                return Ok(pool.swap_remove(i));
            }
        }
        let n = self.request_seq.fetch_add(1, Ordering::Relaxed);
        let path = self.dir().join(format!(
            "{}{}_{n}",
            rundir::REQUEST_SOCKET_PREFIX,
            std::process::id()
        ));
        let sock = Socket::bind(&path)?;
        if to_primary {
            let _ = sock.connect_to(self.ep.transport().primary());
        }
        Ok(RequestSocket {
            sock: Arc::new(sock),
            buf: vec![0u8; RECV_BUF],
            batch: None,
            timeout: Duration::ZERO,
            dirty: false,
            spin: Spinner::new(self.config().busy_poll, self.spin_stats.clone()),
            gate: Arc::default(),
        })
    }

    fn put_request_socket(&self, s: RequestSocket) {
        // A socket whose receiving side a wake-up shut down is given up (dropped: unlinked).
        if !self.stop.load(Ordering::Acquire) && !s.sock.is_read_shut() {
            self.request_sockets.lock().push(s);
        }
    }

    /// Sends a request to every peer; `cb` runs exactly once, on a channel thread, when all
    /// answered or `timeout` passed, also when no peer could be reached.
    pub fn request_async(
        &self,
        msg: &Message<Fds>,
        timeout: Duration,
        cb: impl FnOnce(&MpChannel, Replies) + Send + 'static,
    ) -> Result<RequestId, Error> {
        self.with_peers(|peers| self.request_async_to(peers, msg, timeout, cb))?
    }

    /// [`MpChannel::request_async`] to the given peers.
    pub fn request_async_to(
        &self,
        peers: &[PeerAddr],
        msg: &Message<Fds>,
        timeout: Duration,
        cb: impl FnOnce(&MpChannel, Replies) + Send + 'static,
    ) -> Result<RequestId, Error> {
        let t = now();
        let s = self
            .ep
            .request_async_to(peers, msg, t, timeout, Box::new(cb))?;
        match s.finished {
            Some(f) => {
                self.deferred.lock().push(f);
                self.ep.transport().wake();
            }
            None => self.deadline_added(t.saturating_add(timeout)),
        }
        Ok(s.id)
    }

    /// Cancels an async request; its callback will not run. Returns false if it already ran (or
    /// is running).
    pub fn cancel(&self, id: RequestId) -> bool {
        self.ep.cancel(id).is_ok()
    }

    /// Requests waiting for replies.
    pub fn pending_requests(&self) -> usize {
        self.ep.pending_requests()
    }

    fn deadline_added(&self, d: Instant) {
        let planned = self.sleep_until.load(Ordering::SeqCst);
        if planned == 0 || d.as_nanos() < planned {
            self.ep.transport().wake();
        }
    }

    fn run_callback(&self, f: FinishedOf<UnixHost>) {
        let cb = f.callback;
        let r = replies(f.reply);
        if catch_unwind(AssertUnwindSafe(|| cb(self, r))).is_err() {
            self.panics.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn receive_loop(self: &Arc<Self>) {
        CHANNEL_THREAD.with(|c| c.set(true));
        let tr = self.ep.transport();
        RECEIVES_FOR.with(|c| c.set(std::ptr::from_ref(tr) as usize));
        let mut batch = crate::socket::RecvBatch::new();
        let sock = tr.socket();
        // See `wait_for_room` for what "stalled" means.
        let mut woke_by_probe = false;
        let mut spin = Spinner::new(self.config().busy_poll, self.spin_stats.clone());
        let stopping = |_| self.stop.load(Ordering::Acquire);
        // Which of its own fds woke a wait for room (not needed here: it receives next anyway).
        let mut ready = Vec::new();
        'outer: while !self.stop.load(Ordering::Acquire) {
            // While nothing waits in the outbox, one blocking recvmmsg takes whatever is queued
            // (up to BATCH datagrams); `shutdown` wakes us with a datagram to ourselves.
            // What this thread had to queue for a busy peer (its answers, or requests from
            // callbacks), it delivers itself: it waits for that peer's room and for datagrams
            // at once, instead of waking the service thread to do it (on a shared CPU, two more
            // context switches for every burst past a peer's queue).
            let mut wait = true;
            if tr.outbox_waiting() {
                let ob = tr.flush(now());
                self.peers_gone(&ob);
                let stalled = woke_by_probe && ob.delivered == 0;
                if tr.outbox_waiting() {
                    wait = false;
                    let own = [sock.as_fd(), self.stop_fd.as_fd()];
                    woke_by_probe = wait_for_room(&own, &ob, stalled, ob.deadline, &mut ready);
                } else {
                    woke_by_probe = false;
                }
            }
            let got = if wait {
                let got = spin.poll(
                    || match sock.recv_batch(&mut batch, false) {
                        Ok(0) => None,
                        r => Some(r),
                    },
                    stopping,
                );
                got.unwrap_or_else(|| sock.recv_batch(&mut batch, true))
            } else {
                sock.recv_batch(&mut batch, false)
            };
            match got {
                Ok(n) => {
                    for i in 0..n {
                        if self.stop.load(Ordering::Acquire) {
                            break 'outer;
                        }
                        let (r, bytes) = batch.take(i);
                        self.handle(r, bytes, true);
                    }
                }
                // A receive error is never fatal: DPDK's thread exits here and the process
                // goes deaf. Count it and go on.
                Err(_) => {
                    self.receive_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The peer address for a sender's path bytes (of process `pid`), from a small cache so
    /// the hot path does not allocate. A secondary's one-way socket stands for the secondary:
    /// its messages come from the secondary's own socket, where answers and later messages go.
    fn peer_of(&self, b: &[u8], pid: u32) -> PeerAddr {
        let mut seen = self.peers_seen.lock();
        // Datagrams come in runs from one sender: a compare instead of a hash for those.
        if let Some((k, p)) = &seen.last
            && **k == *b
        {
            return p.clone();
        }
        let PeersSeen { last, map: c } = &mut *seen;
        if let Some((k, p)) = c.get_key_value(b) {
            *last = Some((k.clone(), p.clone()));
            return p.clone();
        }
        if c.len() >= 1024 {
            c.clear();
        }
        let path = Path::new(std::ffi::OsStr::from_bytes(b));
        let p = match rundir::owner_of_one_way(path, pid) {
            Some(owner) => PeerAddr::new(owner),
            None => PeerAddr::new(path),
        };
        let k: Arc<[u8]> = b.into();
        c.insert(k.clone(), p.clone());
        *last = Some((k, p.clone()));
        p
    }

    /// Handles one received datagram; `actions` is false on a request socket, where only
    /// answers belong (anything else is dropped and counted).
    fn handle(&self, r: crate::socket::Received, buf: &[u8], actions: bool) {
        let pid = r.creds.map_or(0, |c| c.pid.as_raw_nonzero().get() as u32);
        let trusted = match r.creds {
            Some(c) => {
                let uid = c.uid.as_raw();
                uid == self.uid || (uid == 0 && self.config.allow_root)
            }
            None => false,
        };
        if !trusted {
            self.ep.stats().count_rejected_sender();
            return; // the fds close here
        }
        let from = self.peer_of(&r.from[..r.from_len], pid);
        let flags = RecvFlags {
            truncated: r.truncated,
            control_truncated: r.control_truncated,
        };
        // With lanes, handlers run one at a time, as on DPDK's one thread (the lane threads
        // take the same lock), and requests posted to a lane before this datagram run first:
        // in a secondary, the primary's; in a primary, the sender's (see `lane`).
        let _one_at_a_time = (actions && (self.lane.is_some() || self.lanes.is_some()))
            .then(|| self.dispatch.lock());
        let lane = self
            .lane
            .as_deref()
            .filter(|l| actions && pid == l.primary_pid());
        if let Some(l) = lane {
            l.serve_posted(&mut |_, bytes, owe| self.lane_dispatch(bytes, owe));
        }
        let up = self
            .lanes
            .as_deref()
            .filter(|_| actions)
            .and_then(|l| Some((l, l.lane_of_pid(pid)?)));
        if let Some((l, i)) = up {
            l.serve_up(i, &mut |_, pid, name, bytes, owe| {
                self.up_dispatch(pid, name, bytes, owe)
            });
        }
        let counted = crate::lane::counted(&buf[..r.len]);
        self.dispatch_datagram(from, pid, &buf[..r.len], r.fds, flags, actions);
        if counted {
            if let Some(l) = lane {
                l.handled();
            }
            if let Some((l, i)) = up {
                l.handled_up(i);
            }
        }
    }

    /// Hands one received datagram to the core and runs what it dispatches.
    fn dispatch_datagram(
        &self,
        from: PeerAddr,
        pid: u32,
        bytes: &[u8],
        fds: Fds,
        flags: RecvFlags,
        actions: bool,
    ) {
        match self.ep.receive(from, bytes, fds, flags, now()) {
            Dispatch::Action { msg, .. } if !actions => {
                drop(msg);
                self.ep.stats().rx_no_action.fetch_add(1, Ordering::Relaxed);
            }
            d => self.run_dispatched(d, pid, None),
        }
    }

    /// Runs what the core dispatched from process `pid`: an action's handler (first telling
    /// `owe`, for a request that came through a lane, that its answer is owed there), or the
    /// callback of an async request it completed.
    fn run_dispatched(&self, d: Dispatch<UnixHost>, pid: u32, owe: Option<&dyn Fn(Name)>) {
        match d {
            Dispatch::Action {
                handler,
                kind,
                msg,
                from,
            } => {
                if kind == MsgKind::Request
                    && let Some(owe) = owe
                {
                    owe(*msg.name());
                }
                let inc = Incoming {
                    kind,
                    msg,
                    from,
                    pid,
                };
                if catch_unwind(AssertUnwindSafe(|| handler(self, inc))).is_err() {
                    self.panics.fetch_add(1, Ordering::Relaxed);
                }
            }
            Dispatch::Answered(Some(f)) => self.run_callback(f),
            Dispatch::Answered(None) | Dispatch::Dropped(_) => {}
        }
    }

    /// Tells the pending requests about the peers a flush found gone: none waits for them any
    /// more, and requests left waiting for nobody complete now instead of at their deadline.
    fn peers_gone(&self, ob: &crate::transport::OutboxPoll) {
        for p in &ob.gone {
            self.ep.peer_gone(p, |f| self.run_callback(f));
        }
        if !ob.gone.is_empty()
            && let Some(l) = &self.lanes
        {
            l.nudge();
        }
    }

    fn service_loop(self: &Arc<Self>) {
        CHANNEL_THREAD.with(|c| c.set(true));
        let tr = self.ep.transport();
        // See `wait_for_room` for what "stalled" means.
        let mut woke_by_probe = false;
        // The runtime directory's inotify fd (in a primary) and the watched peers' pidfds: a
        // secondary that appears, or a peer that exits, wakes this thread.
        let mut dir_watch = None;
        let mut exits: Vec<Arc<OwnedFd>> = Vec::new();
        // Which of them woke the last wait (the directory is read the first time round).
        let mut dir_changed = true;
        let mut fired: Vec<Arc<OwnedFd>> = Vec::new();
        let mut ready = Vec::new();
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            self.sleep_until.store(0, Ordering::SeqCst);
            tr.drain_wake();
            if dir_changed {
                dir_watch = tr.refresh_peer_watch();
            }
            if let Some(v) = tr.exit_watch_changes() {
                exits = v;
            }
            // A peer that died owes nothing any more: requests waiting for it end as soon as
            // the live peers have answered.
            for p in tr.take_exited(&std::mem::take(&mut fired)) {
                self.peers_exited.fetch_add(1, Ordering::Relaxed);
                if let Some(l) = &self.lanes {
                    l.gone(p.name());
                }
                if let Some(l) = &self.lane
                    && p == *tr.primary()
                {
                    l.set_primary_gone();
                }
                self.ep.peer_gone(&p, |f| self.run_callback(f));
                if let Some(l) = &self.lanes {
                    l.nudge();
                }
            }
            let deferred = std::mem::take(&mut *self.deferred.lock());
            for f in deferred {
                self.run_callback(f);
            }
            let t = now();
            self.ep.expire(t, |f| self.run_callback(f));
            let ob = tr.flush(t);
            self.peers_gone(&ob);
            let stalled = woke_by_probe && ob.delivered == 0;
            let next = [self.ep.next_deadline(), ob.deadline]
                .into_iter()
                .flatten()
                .min();
            self.sleep_until.store(
                next.map_or(u64::MAX, |d| d.as_nanos().max(1)),
                Ordering::SeqCst,
            );
            let mut own = vec![self.stop_fd.as_fd(), tr.wake_fd()];
            own.extend(dir_watch.as_deref().map(|f| f.as_fd()));
            let first_exit = own.len();
            own.extend(exits.iter().map(|f| f.as_fd()));
            woke_by_probe = wait_for_room(&own, &ob, stalled, next, &mut ready);
            dir_changed = dir_watch.is_some() && ready[2];
            fired.extend(
                exits
                    .iter()
                    .zip(&ready[first_exit..])
                    .filter(|&(_, &r)| r)
                    .map(|(f, _)| f.clone()),
            );
        }
    }

    fn shutdown(&self) {
        if self.stop.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = rustix::io::write(&self.stop_fd, &1u64.to_ne_bytes());
        self.ep.transport().wake();
        // Wake the receiving thread out of its recvmsg by shutting the socket's receiving side,
        // not by a datagram to the socket's path: the path may be gone (the runtime directory
        // removed under a running process) or name another socket by now, and the thread would
        // never wake. A peer's send from here on fails at once (EPIPE) instead of queueing a
        // datagram nobody reads.
        let _ = self.ep.transport().socket().shut_read();
        if let Some(l) = &self.lane {
            l.wake();
        }
        if let Some(l) = &self.lanes {
            l.wake_up_thread();
        }
        let me = thread::current().id();
        for t in self.threads.lock().drain(..) {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        self.ep.transport().unlink();
        self.request_sockets.lock().clear();
        if let Some(l) = &self.lane {
            l.release();
        }
        if self.lanes.is_some() {
            Board::remove(self.dir());
        }
        if let Some(l) = &self.lock {
            l.remove();
        }
    }
}

struct Guard(Arc<MpChannel>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// An open channel. Clones share it; when the last clone is dropped (or [`Channel::close`] is
/// called) the threads stop and this process's socket file (and, for the primary, its lock
/// file) is removed.
#[derive(Clone)]
pub struct Channel(Arc<Guard>);

impl std::ops::Deref for Channel {
    type Target = MpChannel;
    fn deref(&self) -> &MpChannel {
        &self.0.0
    }
}

fn resolve_role(cfg: &ChannelConfig, dir: &Path) -> Result<(Role, Option<PrimaryLock>), Error> {
    let primary_up = || {
        rundir::live_primary(dir).is_some()
            && rundir::socket_alive(&dir.join(rundir::PRIMARY_SOCKET))
    };
    match cfg.proc_type {
        ProcType::Primary => Ok((Role::Primary, Some(PrimaryLock::acquire(dir)?))),
        ProcType::Secondary => {
            if primary_up() {
                Ok((Role::Secondary, None))
            } else {
                Err(Error::NoPrimary {
                    dir: dir.to_owned(),
                })
            }
        }
        ProcType::Auto => {
            if primary_up() {
                return Ok((Role::Secondary, None));
            }
            match PrimaryLock::acquire(dir) {
                Ok(l) => Ok((Role::Primary, Some(l))),
                // Lost a race with another starting primary.
                Err(Error::PrimaryExists { .. }) if primary_up() => Ok((Role::Secondary, None)),
                Err(e) => Err(e),
            }
        }
    }
}

/// Whether this kernel gives pidfds. Lanes rely on them: a peer's death is learned from its
/// pidfd, where a socket would learn it from a refused send (which a lane never makes).
fn pidfds_work() -> bool {
    rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )
    .is_ok()
}

impl Channel {
    /// Opens the channel: resolves the role, binds the socket, starts the threads.
    pub fn open(cfg: ChannelConfig) -> Result<Channel, Error> {
        rundir::check_prefix(&cfg.file_prefix)?;
        let dir = cfg.dir();
        rundir::create(&dir)?;
        // Hold the directory while our socket appears, as DPDK processes do, so a DPDK primary
        // never broadcasts over a half-created peer.
        let dir_fd = std::fs::File::open(&dir)
            .map_err(|e| Error::io(format!("open {}", dir.display()), e))?;
        rustix::fs::flock(&dir_fd, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io("lock runtime dir", e.into()))?;
        let (role, lock) = resolve_role(&cfg, &dir)?;
        let uid = rustix::process::getuid().as_raw();
        let (sock, lanes, lane) = match role {
            Role::Primary => {
                rundir::clean_stale(&dir);
                let sock = Socket::bind(&dir.join(rundir::PRIMARY_SOCKET))?;
                let lanes = (cfg.lanes && pidfds_work())
                    .then(|| Board::create(&dir, std::process::id()).ok())
                    .flatten()
                    .map(|b| Arc::new(PrimaryLanes::new(b, uid, cfg.allow_root)));
                (sock, lanes, None)
            }
            Role::Secondary => {
                // The lane is claimed before the socket exists: every datagram the primary
                // sends to the socket is then counted against it (see `lane`).
                let path = rundir::secondary_socket(&dir);
                let name = path.file_name().and_then(|n| n.to_str());
                let lane = (cfg.lanes && pidfds_work())
                    .then(|| Board::open(&dir, uid))
                    .flatten()
                    .zip(name)
                    .and_then(|(b, n)| SecondaryLane::claim(b, n))
                    .map(Arc::new);
                let sock = Socket::bind(&path).inspect_err(|_| {
                    if let Some(l) = &lane {
                        l.release();
                    }
                })?;
                (sock, None, lane)
            }
        };
        drop(dir_fd);
        let transport = UnixTransport::new(sock, role, dir)?;
        if let Some(l) = &lanes {
            let l = l.clone();
            transport.on_accepted(Box::new(move |to, d| l.sent(to.name(), d)));
        }
        if let Some(l) = &lane {
            let (l, primary) = (l.clone(), transport.primary().clone());
            transport.on_accepted(Box::new(move |to, d| {
                if *to == primary {
                    l.sent_up(d);
                }
            }));
        }
        let stop_fd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| Error::io("eventfd", e.into()))?;
        let inner = Arc::new(MpChannel {
            ep: Endpoint::new(transport, cfg.abi),
            config: cfg.clone(),
            lock,
            uid,
            stop: AtomicBool::new(false),
            stop_fd,
            deferred: Mutex::new(Vec::new()),
            sleep_until: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
            panics: AtomicU64::new(0),
            receive_errors: AtomicU64::new(0),
            peers_exited: AtomicU64::new(0),
            spin_stats: Arc::default(),
            request_sockets: Mutex::new(Vec::new()),
            peers_seen: Mutex::new(PeersSeen::default()),
            request_seq: AtomicU64::new(0),
            lanes,
            lane,
            dispatch: Mutex::new(()),
            spinners: Mutex::new(Vec::new()),
            lane_requests: AtomicU64::new(0),
            lane_replies: AtomicU64::new(0),
            lane_answered: AtomicU64::new(0),
            lane_messages: AtomicU64::new(0),
        });
        let batch = cfg.batch_scheduling;
        let spawn = |name: &str, f: fn(&Arc<MpChannel>)| {
            let c = inner.clone();
            let h = thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || f(&c))
                .map_err(|e| Error::io("spawn channel thread", e))?;
            // Name and policy are set here, before `open` returns, not by the thread itself
            // (it may not have run yet, and tools look for these names). Best effort: a kernel
            // without SCHED_BATCH keeps the default policy.
            set_thread_name(&h, name);
            if batch {
                let _ = set_batch_policy(&h);
            }
            Ok::<_, Error>(h)
        };
        let r = spawn("mp-recv", MpChannel::receive_loop)?;
        let s = spawn("mp-service", MpChannel::service_loop)?;
        inner.threads.lock().extend([r, s]);
        if inner.lane.is_some() {
            let l = spawn("mp-lane", MpChannel::lane_loop)?;
            inner.threads.lock().push(l);
        }
        if inner.lanes.is_some() {
            let l = spawn("mp-lanes", MpChannel::up_loop)?;
            inner.threads.lock().push(l);
        }
        if cfg.ready {
            inner.ep.set_init_complete();
        }
        Ok(Channel(Arc::new(Guard(inner))))
    }

    /// The channel's working part, shared: what the memory layer and the heap hold. Holding it
    /// does not keep the channel open; dropping the last [`Channel`] still closes it.
    pub fn shared(&self) -> Arc<MpChannel> {
        self.0.0.clone()
    }

    /// Stops the channel now (also done when the last clone is dropped).
    pub fn close(&self) {
        self.0.0.shutdown();
    }
}

impl memplane_core::channel::Channel for MpChannel {
    type Peer = PeerAddr;
    type Fds = Fds;
    type Replies = ReplyList;
    type Error = Error;

    fn side(&self) -> memplane_core::channel::Side {
        match self.role() {
            Role::Primary => memplane_core::channel::Side::Primary,
            Role::Secondary => memplane_core::channel::Side::Secondary,
        }
    }

    fn primary(&self) -> PeerAddr {
        self.ep.transport().primary().clone()
    }

    fn register_action<H>(&self, name: &str, handler: H) -> Result<(), Error>
    where
        H: Fn(&Self, Incoming) + Send + Sync + 'static,
    {
        self.register(name, handler)
    }

    fn reply_to(&self, to: &PeerAddr, msg: &Message<Fds>) -> Result<(), Error> {
        self.reply(to, msg)
    }

    fn request_peers(
        &self,
        peers: &[PeerAddr],
        msg: &Message<Fds>,
        timeout: Duration,
    ) -> Result<Reply<ReplyList>, Error> {
        self.request_pooled(peers, msg, timeout)
    }

    fn request_peers_async<D>(
        &self,
        peers: &[PeerAddr],
        msg: &Message<Fds>,
        timeout: Duration,
        done: D,
    ) -> Result<(), Error>
    where
        D: FnOnce(&Self, Reply<ReplyList>) + Send + 'static,
    {
        self.request_async_to(peers, msg, timeout, move |ch: &MpChannel, r: Replies| {
            done(
                ch,
                Reply {
                    nb_sent: r.nb_sent,
                    nb_received: r.nb_received,
                    timed_out: r.timed_out,
                    replies: ReplyList(r.msgs),
                },
            )
        })
        .map(drop)
    }

    fn on_channel_thread(&self) -> bool {
        on_channel_thread()
    }
}
