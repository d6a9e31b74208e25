//! The endpoint: one process's end of the channel, without the IO.
//!
//! It owns the action registry, the request tracker and the counters, and holds the transport.
//! The host (the Unix transport, a test harness) feeds it every received datagram through
//! [`Endpoint::receive`] and gets back a [`Dispatch`]: run this action, run this async completion,
//! or nothing (the datagram was dropped, and counted). User calls come in through
//! [`Endpoint::send`], [`Endpoint::reply`], [`Endpoint::request_sync`] and
//! [`Endpoint::request_async`]; the endpoint encodes once, sends through the transport, and keeps
//! the books. Deadlines are driven by the host calling [`Endpoint::expire`] at
//! [`Endpoint::next_deadline`].
//!
//! Broadcast semantics improve on DPDK's: a request to many peers is sent to all of them first
//! and then waited for once, under one deadline, so one slow peer delays nobody else and every
//! peer gets the request even if an earlier one times out.

use core::fmt;
use core::time::Duration;

use crate::limits::{DEFAULT_ACTIONS, MAX_PEERS};
use crate::message::{Message, MsgKind, Param};
use crate::name::Name;
use crate::pending::{
    Cancelled, Finished, Notify, PendingError, Reply, ReplySink, RequestId, Waiting,
};
use crate::registry::{ActionRegistry, RegistryError};
use crate::stats::{Stats, bump};
use crate::sync::{AtomicBool, Mutex, Ordering, RawMutex};
use crate::time::Instant;
use crate::tracker::{AnswerOutcome, Tracker, Waiter};
use crate::transport::{SendError, Transport};
use crate::wire::{self, Abi, Datagram, DecodeError, EncodeError, RecvFlags};

/// The types a host plugs into an [`Endpoint`].
pub trait Host {
    /// The transport.
    type Transport: Transport;
    /// What an action is (cloned out of the registry before it runs).
    type Handler: Clone;
    /// Wakes a thread blocked in a sync request.
    type Notify: Notify;
    /// What an async request runs when it completes.
    type Callback;
    /// Where replies are collected.
    type Replies: ReplySink<PeerOf<Self>, FdsOf<Self>>;
    /// The raw lock of the registry and the pending table.
    type RawMutex: RawMutex;
    /// Where the pending table lives, and so how many requests and (request, peer) slots it
    /// holds: [`crate::pending::Inline`] arrays, or host-allocated storage.
    type Storage: crate::pending::Storage<PeerOf<Self>, Self::Notify, Self::Callback, Self::Replies>;
}

/// The peer address type of a host.
pub type PeerOf<X> = <<X as Host>::Transport as Transport>::Peer;
/// The fd set type of a host.
pub type FdsOf<X> = <<X as Host>::Transport as Transport>::Fds;
/// A completed async request of a host.
pub type FinishedOf<X> = Finished<<X as Host>::Callback, <X as Host>::Replies>;
/// What cancelling a request of a host hands back.
pub type CancelledOf<X> =
    Cancelled<<X as Host>::Notify, <X as Host>::Callback, <X as Host>::Replies>;
type TrackerOf<X> = Tracker<
    <X as Host>::RawMutex,
    PeerOf<X>,
    FdsOf<X>,
    <X as Host>::Notify,
    <X as Host>::Callback,
    <X as Host>::Replies,
    <X as Host>::Storage,
>;

/// Why an endpoint call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointError {
    /// The message cannot be encoded for this channel's ABI.
    Encode(EncodeError),
    /// The request table refused the request.
    Pending(PendingError),
    /// The transport failed (listing peers, or sending to a single peer).
    Transport(SendError),
    /// More peers than one broadcast can address.
    TooManyPeers {
        /// The limit.
        max: usize,
    },
    /// A registry operation failed.
    Registry(RegistryError),
}

impl fmt::Display for EndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointError::Encode(e) => write!(f, "cannot encode message: {e}"),
            EndpointError::Pending(e) => write!(f, "cannot start request: {e}"),
            EndpointError::Transport(e) => write!(f, "transport: {e}"),
            EndpointError::TooManyPeers { max } => write!(f, "more than {max} peers"),
            EndpointError::Registry(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for EndpointError {}

impl From<EncodeError> for EndpointError {
    fn from(e: EncodeError) -> Self {
        EndpointError::Encode(e)
    }
}
impl From<PendingError> for EndpointError {
    fn from(e: PendingError) -> Self {
        EndpointError::Pending(e)
    }
}
impl From<RegistryError> for EndpointError {
    fn from(e: RegistryError) -> Self {
        EndpointError::Registry(e)
    }
}

/// Why a received datagram went no further. Its fds have been released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The decoder refused it.
    Malformed(DecodeError),
    /// A message or request for a name with no action. `ignore_sent` tells whether an "ignore"
    /// answer went back (a request received before initialisation completed).
    NoAction {
        /// The name.
        name: Name,
        /// Whether an ignore was sent back.
        ignore_sent: bool,
    },
    /// A reply or ignore nobody waits for (late, duplicate, unknown).
    UnmatchedAnswer(Name),
    /// A reply whose request's reply store was full.
    ReplyOverflow(Name),
}

/// What the host must do with a received datagram.
// The message travels inline (no allocator to box it in); each dispatch is moved once.
#[allow(clippy::large_enum_variant)]
pub enum Dispatch<X: Host> {
    /// Run `handler` for this message or request from `from`. For a request, the handler (or
    /// whoever it hands the job to) answers with [`Endpoint::reply`].
    Action {
        /// The action.
        handler: X::Handler,
        /// [`MsgKind::Msg`] or [`MsgKind::Request`].
        kind: MsgKind,
        /// The message, with its fds.
        msg: Message<FdsOf<X>>,
        /// The sender.
        from: PeerOf<X>,
    },
    /// An answer matched a pending request. If it completed an async request, run this.
    Answered(Option<FinishedOf<X>>),
    /// Nothing to do; the datagram was dropped and counted.
    Dropped(Dropped),
}

/// Outcome of a one-way send to every peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Peers the message was handed to.
    pub sent: u32,
    /// Peers found gone (not an error: they left).
    pub gone: u32,
    /// Peers the send failed for otherwise.
    pub failed: u32,
    /// The first such failure.
    pub first_error: Option<SendError>,
}

/// A request entered but not sent yet; see [`Endpoint::prepare_request`].
#[derive(Debug)]
pub struct Prepared {
    /// Its id.
    pub id: RequestId,
    /// The datagram to send to each peer.
    pub datagram: Datagram,
    /// When it is due; a send may wait for a busy peer until then.
    pub deadline: Instant,
}

/// A started async request.
pub struct Started<C, K> {
    /// Its id, for [`Endpoint::cancel`].
    pub id: RequestId,
    /// Set when the request completed during the call (no peer reached, or every peer already
    /// answered): run it. Otherwise the completion comes from [`Endpoint::receive`] or
    /// [`Endpoint::expire`].
    pub finished: Option<Finished<C, K>>,
}

/// One process's end of the channel. See the module documentation.
pub struct Endpoint<X: Host, const A: usize = DEFAULT_ACTIONS> {
    abi: Abi,
    transport: X::Transport,
    actions: Mutex<X::RawMutex, ActionRegistry<X::Handler, A>>,
    tracker: TrackerOf<X>,
    stats: Stats,
    init_complete: AtomicBool,
}

type PeerList<P> = heapless::Vec<P, MAX_PEERS>;

impl<X: Host, const A: usize> Endpoint<X, A> {
    /// An endpoint speaking `abi` over `transport`.
    pub fn new(transport: X::Transport, abi: Abi) -> Self {
        Endpoint {
            abi,
            transport,
            actions: Mutex::new(ActionRegistry::new()),
            tracker: Tracker::new(),
            stats: Stats::default(),
            init_complete: AtomicBool::new(false),
        }
    }

    /// The ABI on the wire.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// The transport.
    pub fn transport(&self) -> &X::Transport {
        &self.transport
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Marks initialisation complete. Before that, a request for an unknown action is answered
    /// with "ignore" (the requester stops waiting for us); after it, such a request is dropped.
    pub fn set_init_complete(&self) {
        self.init_complete.store(true, Ordering::Release);
    }

    /// Registers `handler` for `name`.
    pub fn register(&self, name: Name, handler: X::Handler) -> Result<(), RegistryError> {
        self.actions.lock().register(name, handler)
    }

    /// Unregisters the action `name` and returns its handler.
    pub fn unregister(&self, name: &Name) -> Result<X::Handler, RegistryError> {
        self.actions.lock().unregister(name)
    }

    /// Number of registered actions.
    pub fn action_count(&self) -> usize {
        self.actions.lock().len()
    }

    /// Requests in flight.
    pub fn pending_requests(&self) -> usize {
        self.tracker.len()
    }

    /// Handles one received datagram from `from`. `fds` are what arrived with it, `flags` what the
    /// kernel said about truncation. Never panics; every drop is counted in [`Endpoint::stats`].
    pub fn receive(
        &self,
        from: PeerOf<X>,
        datagram: &[u8],
        fds: FdsOf<X>,
        flags: RecvFlags,
        now: Instant,
    ) -> Dispatch<X> {
        let (kind, msg) = match wire::decode(self.abi, datagram, fds, flags) {
            Ok(x) => x,
            Err(e) => {
                self.stats.count_decode_error(&e);
                return Dispatch::Dropped(Dropped::Malformed(e));
            }
        };
        match kind {
            MsgKind::Reply | MsgKind::Ignore => {
                let name = *msg.name();
                match self.tracker.on_answer(&from, msg, kind == MsgKind::Reply) {
                    AnswerOutcome::Matched { finished, overflow } => {
                        bump(&self.stats.rx_ok);
                        if overflow.is_some() {
                            bump(&self.stats.rx_unmatched_reply);
                            if finished.is_none() {
                                return Dispatch::Dropped(Dropped::ReplyOverflow(name));
                            }
                        }
                        Dispatch::Answered(finished)
                    }
                    AnswerOutcome::Unmatched(_msg) => {
                        bump(&self.stats.rx_unmatched_reply);
                        Dispatch::Dropped(Dropped::UnmatchedAnswer(name))
                    }
                }
            }
            MsgKind::Msg | MsgKind::Request => {
                let handler = self.actions.lock().get(msg.name()).cloned();
                match handler {
                    Some(handler) => {
                        bump(&self.stats.rx_ok);
                        Dispatch::Action {
                            handler,
                            kind,
                            msg,
                            from,
                        }
                    }
                    None => {
                        bump(&self.stats.rx_no_action);
                        let name = *msg.name();
                        drop(msg);
                        let ignore_sent = kind == MsgKind::Request
                            && !self.init_complete.load(Ordering::Acquire)
                            && self.send_ignore(&from, name, now);
                        Dispatch::Dropped(Dropped::NoAction { name, ignore_sent })
                    }
                }
            }
        }
    }

    fn send_ignore(&self, to: &PeerOf<X>, name: Name, now: Instant) -> bool {
        let m: Message<FdsOf<X>> = Message::with_param(name, Param::EMPTY);
        self.send_to(to, MsgKind::Ignore, &m, now).is_ok()
    }

    fn count_send(&self, r: &Result<(), SendError>) {
        bump(match r {
            Ok(()) => &self.stats.tx_ok,
            Err(SendError::PeerGone) => &self.stats.tx_peer_gone,
            Err(_) => &self.stats.tx_failed,
        });
    }

    /// Sends (`kind`, `msg`) to one peer, waiting at most until `deadline` for a busy one.
    pub fn send_to(
        &self,
        to: &PeerOf<X>,
        kind: MsgKind,
        msg: &Message<FdsOf<X>>,
        deadline: Instant,
    ) -> Result<(), EndpointError> {
        let d = Datagram::encode(self.abi, kind, msg)?;
        let r = self
            .transport
            .send_one_kind(to, kind, d.as_bytes(), msg.fds(), deadline);
        self.count_send(&r);
        r.map_err(EndpointError::Transport)
    }

    /// Sends `datagram` to each of `peers`: to a single peer with [`Transport::send_one`] (the
    /// transport may wait for it), to several with [`Transport::send_each`] (a busy one must
    /// not hold up the others).
    fn send_each(
        &self,
        peers: &[PeerOf<X>],
        kind: MsgKind,
        datagram: &[u8],
        fds: &FdsOf<X>,
        deadline: Instant,
        mut done: impl FnMut(&PeerOf<X>, Result<(), SendError>),
    ) {
        if let [only] = peers {
            let r = self
                .transport
                .send_one_kind(only, kind, datagram, fds, deadline);
            done(only, r);
            return;
        }
        self.transport
            .send_each(peers, datagram, fds, deadline, &mut done);
    }

    /// Answers a request from `to` with `msg` (whose name should be the request's).
    pub fn reply(
        &self,
        to: &PeerOf<X>,
        msg: &Message<FdsOf<X>>,
        deadline: Instant,
    ) -> Result<(), EndpointError> {
        self.send_to(to, MsgKind::Reply, msg, deadline)
    }

    fn peers(&self) -> Result<PeerList<PeerOf<X>>, EndpointError> {
        let mut list = PeerList::new();
        let mut overflow = false;
        self.transport
            .for_each_peer(&mut |p| {
                if list.push(p.clone()).is_err() {
                    overflow = true;
                }
            })
            .map_err(EndpointError::Transport)?;
        if overflow {
            return Err(EndpointError::TooManyPeers { max: MAX_PEERS });
        }
        Ok(list)
    }

    /// Sends a one-way message to every peer (from a primary: every secondary; from a
    /// secondary: the primary). Peers found gone are skipped.
    pub fn send(
        &self,
        msg: &Message<FdsOf<X>>,
        deadline: Instant,
    ) -> Result<SendReport, EndpointError> {
        let peers = self.peers()?;
        self.send_to_each(&peers, msg, deadline)
    }

    /// Sends a one-way message to each of `peers`.
    pub fn send_to_each(
        &self,
        peers: &[PeerOf<X>],
        msg: &Message<FdsOf<X>>,
        deadline: Instant,
    ) -> Result<SendReport, EndpointError> {
        let d = Datagram::encode(self.abi, MsgKind::Msg, msg)?;
        let mut rep = SendReport::default();
        let mut done = |_: &PeerOf<X>, r: Result<(), SendError>| {
            self.count_send(&r);
            match r {
                Ok(()) => rep.sent += 1,
                Err(SendError::PeerGone) => rep.gone += 1,
                Err(e) => {
                    rep.failed += 1;
                    rep.first_error.get_or_insert(e);
                }
            }
        };
        self.send_each(
            peers,
            MsgKind::Msg,
            d.as_bytes(),
            msg.fds(),
            deadline,
            &mut done,
        );
        Ok(rep)
    }

    /// Enters the request, sends it to each peer, withdraws the failures, ends sending.
    fn start(
        &self,
        peers: &[PeerOf<X>],
        msg: &Message<FdsOf<X>>,
        now: Instant,
        timeout: Duration,
        waiting: Waiting<X::Notify, X::Callback>,
    ) -> Result<(RequestId, Option<FinishedOf<X>>), EndpointError> {
        let p = self.prepare_request(peers, msg, now, timeout, waiting)?;
        self.send_each(
            peers,
            MsgKind::Request,
            p.datagram.as_bytes(),
            msg.fds(),
            p.deadline,
            |peer, r| self.sent(p.id, peer, r),
        );
        let finished = self.sending_done(p.id, now)?;
        Ok((p.id, finished))
    }

    /// First step of a request whose sends the host makes itself (for instance from a socket of
    /// the requesting thread, so the replies come back there): enters the request for `peers`
    /// and encodes the datagram. Then: send it to each peer and report each result with
    /// [`Endpoint::sent`], call [`Endpoint::sending_done`], and for a sync request wait with
    /// [`Endpoint::wait`].
    pub fn prepare_request(
        &self,
        peers: &[PeerOf<X>],
        msg: &Message<FdsOf<X>>,
        now: Instant,
        timeout: Duration,
        waiting: Waiting<X::Notify, X::Callback>,
    ) -> Result<Prepared, EndpointError> {
        let datagram = Datagram::encode(self.abi, MsgKind::Request, msg)?;
        let deadline = now.saturating_add(timeout);
        let id = self
            .tracker
            .begin(*msg.name(), peers, deadline, waiting)
            .map_err(|(e, _waiting)| EndpointError::Pending(e))?;
        Ok(Prepared {
            id,
            datagram,
            deadline,
        })
    }

    /// Reports how the send of request `id` to `peer` went; a failed one is not counted in
    /// `nb_sent`.
    pub fn sent(&self, id: RequestId, peer: &PeerOf<X>, result: Result<(), SendError>) {
        self.count_send(&result);
        if result.is_err() {
            self.tracker.send_failed(id, peer);
        }
    }

    /// Tells the pending requests that `peer` is gone (a datagram to it was refused after
    /// their sending phase): none of them waits for it any more; see [`Tracker::peer_gone`].
    /// Async completions this causes are handed to `run`. Returns how many (request, peer)
    /// slots were withdrawn.
    pub fn peer_gone(&self, peer: &PeerOf<X>, run: impl FnMut(FinishedOf<X>)) -> usize {
        self.tracker.peer_gone(peer, run)
    }

    /// Ends the sending phase of request `id`; see [`Tracker::sending_done`].
    pub fn sending_done(
        &self,
        id: RequestId,
        now: Instant,
    ) -> Result<Option<FinishedOf<X>>, EndpointError> {
        let f = self.tracker.sending_done(id, now)?;
        if f.as_ref().is_some_and(|f| f.reply.timed_out) {
            bump(&self.stats.requests_timed_out);
        }
        Ok(f)
    }

    /// Waits through `waiter` for the sync request `id` (entered with `waiter.notifier()`).
    pub fn wait<W: Waiter<Notify = X::Notify>>(
        &self,
        id: RequestId,
        now: Instant,
        waiter: &W,
    ) -> Result<Reply<X::Replies>, EndpointError> {
        let r = self.tracker.wait(id, now, waiter)?;
        if r.timed_out {
            bump(&self.stats.requests_timed_out);
        }
        Ok(r)
    }

    /// Sends request `msg` to every peer and blocks through `waiter` until all answered or
    /// `timeout` passed. The reply says how many were reached (`nb_sent`), how many answered
    /// (`nb_received`) and whether the deadline cut it short. From a handler (the receiving
    /// thread) this would wait for replies only that thread can receive: hosts must refuse it.
    pub fn request_sync<W: Waiter<Notify = X::Notify>>(
        &self,
        msg: &Message<FdsOf<X>>,
        now: Instant,
        timeout: Duration,
        waiter: &W,
    ) -> Result<Reply<X::Replies>, EndpointError> {
        let peers = self.peers()?;
        self.request_sync_to(&peers, msg, now, timeout, waiter)
    }

    /// [`Endpoint::request_sync`] to the given peers only.
    pub fn request_sync_to<W: Waiter<Notify = X::Notify>>(
        &self,
        peers: &[PeerOf<X>],
        msg: &Message<FdsOf<X>>,
        now: Instant,
        timeout: Duration,
        waiter: &W,
    ) -> Result<Reply<X::Replies>, EndpointError> {
        let (id, _) = self.start(peers, msg, now, timeout, Waiting::Sync(waiter.notifier()))?;
        self.wait(id, now, waiter)
    }

    /// Sends request `msg` to every peer; `callback` runs exactly once, when all answered or
    /// `timeout` passed, also when no peer could be reached. On error the callback is dropped
    /// without running.
    pub fn request_async(
        &self,
        msg: &Message<FdsOf<X>>,
        now: Instant,
        timeout: Duration,
        callback: X::Callback,
    ) -> Result<Started<X::Callback, X::Replies>, EndpointError> {
        let peers = self.peers()?;
        self.request_async_to(&peers, msg, now, timeout, callback)
    }

    /// [`Endpoint::request_async`] to the given peers only.
    pub fn request_async_to(
        &self,
        peers: &[PeerOf<X>],
        msg: &Message<FdsOf<X>>,
        now: Instant,
        timeout: Duration,
        callback: X::Callback,
    ) -> Result<Started<X::Callback, X::Replies>, EndpointError> {
        let (id, finished) = self.start(peers, msg, now, timeout, Waiting::Async(callback))?;
        Ok(Started { id, finished })
    }

    /// Completes every request due at `now`; async completions are handed to `run`.
    pub fn expire(&self, now: Instant, mut run: impl FnMut(FinishedOf<X>)) -> usize {
        self.tracker.expire(now, |f| {
            if f.reply.timed_out {
                bump(&self.stats.requests_timed_out);
            }
            run(f)
        })
    }

    /// When [`Endpoint::expire`] must next be called.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.tracker.next_deadline()
    }

    /// Cancels a pending request; what had not run comes back.
    pub fn cancel(&self, id: RequestId) -> Result<CancelledOf<X>, EndpointError> {
        Ok(self.tracker.cancel(id)?)
    }
}
