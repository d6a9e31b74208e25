//! The endpoint over an in-process loopback transport, with real threads.
//!
//! Each node (one primary, several secondaries) has an endpoint, a receiving thread that feeds
//! it datagrams and runs the actions it dispatches, and a timer thread that expires requests.
//! Synchronous requesters park their thread; async callbacks run once. Fds are tokens whose
//! live count is tracked, so a dropped datagram that leaked its fds would show.
//!
//! Checks: broadcast request from the primary to every secondary and a request from a secondary
//! to the primary; a silent peer costs only its timeout and does not delay the others; "ignore"
//! from a process still initialising lowers `nb_sent`; an unknown action after init gets no
//! answer; async completions fire exactly once, also with no peer at all; malformed datagrams are
//! dropped, counted, and their fds released; many requesters hand off through one receiving thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use memplane_core::endpoint::{Dispatch, Endpoint, Host};
use memplane_core::message::{Fds, Message, MsgKind};
use memplane_core::pending::{Finished, Inline, Notify, Reply, ReplySink};
use memplane_core::sync::SpinRawMutex;
use memplane_core::time::Instant;
use memplane_core::tracker::Waiter;
use memplane_core::transport::{SendError, Transport};
use memplane_core::wire::RecvFlags;
use memplane_core::{Abi, Name};

/// Live stand-in fds of one test.
type Live = Arc<AtomicUsize>;

/// A stand-in fd: counted while alive.
struct Token(Live);
impl Token {
    fn new(live: &Live) -> Self {
        live.fetch_add(1, Ordering::SeqCst);
        Token(live.clone())
    }
}
impl Drop for Token {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Tokens(Vec<Token>);
impl Fds for Tokens {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn empty() -> Self {
        Tokens(Vec::new())
    }
}
impl Tokens {
    fn new(n: usize, live: &Live) -> Self {
        Tokens((0..n).map(|_| Token::new(live)).collect())
    }
}

fn clock() -> Instant {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let s = START.get_or_init(std::time::Instant::now);
    Instant::from_nanos(s.elapsed().as_nanos() as u64 + 1)
}

/// A datagram in flight: sender, bytes, how many fds.
type Wire = (u32, Vec<u8>, usize);

struct Loopback {
    me: u32,
    primary: bool,
    net: Arc<Mutex<HashMap<u32, Sender<Wire>>>>,
    live: Live,
}

impl Transport for Loopback {
    type Peer = u32;
    type Fds = Tokens;
    fn send(&self, to: &u32, d: &[u8], fds: &Tokens, _deadline: Instant) -> Result<(), SendError> {
        let net = self.net.lock().unwrap();
        let tx = net.get(to).ok_or(SendError::PeerGone)?;
        tx.send((self.me, d.to_vec(), fds.count()))
            .map_err(|_| SendError::PeerGone)
    }
    fn for_each_peer(&self, f: &mut dyn FnMut(&u32)) -> Result<(), SendError> {
        let net = self.net.lock().unwrap();
        let mut ids: Vec<u32> = net.keys().copied().filter(|&i| i != self.me).collect();
        ids.sort();
        for i in ids {
            if self.primary || i == 0 {
                f(&i);
            }
        }
        Ok(())
    }
}

struct Unpark(thread::Thread);
impl Notify for Unpark {
    fn notify(&self) {
        self.0.unpark();
    }
}

struct Park;
impl Waiter for Park {
    type Notify = Unpark;
    fn notifier(&self) -> Unpark {
        Unpark(thread::current())
    }
    fn wait_until(&self, deadline: Instant) -> Instant {
        let now = clock();
        if deadline > now {
            thread::park_timeout(deadline.saturating_duration_since(now));
        }
        clock()
    }
}

#[derive(Default)]
struct Replies(Vec<(u32, Message<Tokens>)>);
impl ReplySink<u32, Tokens> for Replies {
    fn push(&mut self, from: u32, msg: Message<Tokens>) -> Result<(), Message<Tokens>> {
        self.0.push((from, msg));
        Ok(())
    }
}

type Handler = Arc<dyn Fn(&Node, MsgKind, Message<Tokens>, u32) + Send + Sync>;
type Callback = Box<dyn FnOnce(Reply<Replies>) + Send>;

struct Test;
impl Host for Test {
    type Transport = Loopback;
    type Handler = Handler;
    type Notify = Unpark;
    type Callback = Callback;
    type Replies = Replies;
    type RawMutex = SpinRawMutex;
    type Storage = Inline<256, 1024>;
}

type Ep = Endpoint<Test, 16>;

struct Node {
    ep: Ep,
    stop: AtomicBool,
}

impl Node {
    fn reply(&self, to: u32, name: &Name, param: &[u8], fds: usize) {
        let m = Message::new(name.as_str(), param)
            .unwrap()
            .with_fds(Tokens::new(fds, &self.ep.transport().live))
            .unwrap();
        self.ep.reply(&to, &m, clock()).unwrap();
    }
}

fn run(f: Finished<Callback, Replies>) {
    (f.callback)(f.reply)
}

struct Cluster {
    live: Live,
    net: Arc<Mutex<HashMap<u32, Sender<Wire>>>>,
    nodes: Vec<Arc<Node>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Cluster {
    /// Node 0 is the primary; 1..=n are secondaries.
    fn new(n: u32) -> Self {
        let net = Arc::new(Mutex::new(HashMap::new()));
        let live = Live::default();
        let mut c = Cluster {
            live: live.clone(),
            net: net.clone(),
            nodes: Vec::new(),
            threads: Vec::new(),
        };
        for me in 0..=n {
            let (tx, rx) = channel();
            net.lock().unwrap().insert(me, tx);
            let node = Arc::new(Node {
                ep: Ep::new(
                    Loopback {
                        me,
                        primary: me == 0,
                        net: net.clone(),
                        live: live.clone(),
                    },
                    Abi::V25_11,
                ),
                stop: AtomicBool::new(false),
            });
            c.spawn(node.clone(), rx);
            c.nodes.push(node);
        }
        c
    }

    fn spawn(&mut self, node: Arc<Node>, rx: Receiver<Wire>) {
        let n = node.clone();
        let live = self.live.clone();
        self.threads.push(thread::spawn(move || {
            while let Ok((from, bytes, nfds)) = rx.recv() {
                if n.stop.load(Ordering::SeqCst) {
                    break;
                }
                let d = n.ep.receive(
                    from,
                    &bytes,
                    Tokens::new(nfds, &live),
                    RecvFlags::default(),
                    clock(),
                );
                match d {
                    Dispatch::Action {
                        handler,
                        kind,
                        msg,
                        from,
                    } => handler(&n, kind, msg, from),
                    Dispatch::Answered(Some(f)) => run(f),
                    Dispatch::Answered(None) | Dispatch::Dropped(_) => {}
                }
            }
        }));
        let n = node;
        self.threads.push(thread::spawn(move || {
            while !n.stop.load(Ordering::SeqCst) {
                n.ep.expire(clock(), run);
                thread::sleep(Duration::from_millis(1));
            }
        }));
    }

    fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    fn msg(&self, name: &str, param: &[u8], fds: usize) -> Message<Tokens> {
        Message::new(name, param)
            .unwrap()
            .with_fds(Tokens::new(fds, &self.live))
            .unwrap()
    }

    fn register(&self, i: usize, name: &str, h: Handler) {
        self.nodes[i]
            .ep
            .register(Name::new(name).unwrap(), h)
            .unwrap();
    }

    /// On every node, registers an [`echo`] action for each of `names`, then completes init.
    fn echo_everywhere(&self, names: &[&str]) {
        for (i, n) in self.nodes.iter().enumerate() {
            for name in names {
                self.register(i, name, echo());
            }
            n.ep.set_init_complete();
        }
    }

    /// A sync request from node `from`, started at `now`, that must be accepted; its reply.
    fn request_at(
        &self,
        from: usize,
        msg: &Message<Tokens>,
        now: Instant,
        timeout: Duration,
    ) -> Reply<Replies> {
        self.nodes[from]
            .ep
            .request_sync(msg, now, timeout, &Park)
            .unwrap()
    }

    /// A sync request from node `from`, started now, that must be accepted; its reply.
    fn request(&self, from: usize, msg: &Message<Tokens>, timeout: Duration) -> Reply<Replies> {
        self.request_at(from, msg, clock(), timeout)
    }

    /// Sends raw bytes to node `to` as if from node `from`.
    fn raw(&self, from: u32, to: u32, bytes: Vec<u8>, nfds: usize) {
        let tx = self.net.lock().unwrap().get(&to).unwrap().clone();
        tx.send((from, bytes, nfds)).unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.stop.store(true, Ordering::SeqCst);
        }
        self.net.lock().unwrap().clear();
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

fn echo() -> Handler {
    Arc::new(|n: &Node, kind, msg: Message<Tokens>, from| {
        if kind == MsgKind::Request {
            let fds = msg.num_fds();
            n.reply(from, msg.name(), msg.param(), fds);
        }
    })
}

#[test]
fn broadcast_and_request_to_primary() {
    let c = Cluster::new(4);
    c.echo_everywhere(&["echo"]);
    // Primary to every secondary.
    let r = c.request(0, &c.msg("echo", b"hi", 2), Duration::from_secs(5));
    assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (4, 4, false));
    let mut from: Vec<u32> = r.replies.0.iter().map(|(p, _)| *p).collect();
    from.sort();
    assert_eq!(from, [1, 2, 3, 4]);
    for (_, m) in &r.replies.0 {
        assert_eq!(m.param(), b"hi");
        assert_eq!(m.num_fds(), 2);
    }
    // A secondary to the primary.
    let r = c.request(3, &c.msg("echo", b"up", 0), Duration::from_secs(5));
    assert_eq!((r.nb_sent, r.nb_received), (1, 1));
    assert_eq!(r.replies.0[0].0, 0);
}

#[test]
fn silent_peer_costs_only_its_timeout() {
    let c = Cluster::new(3);
    for i in 0..=3 {
        c.node(i).ep.set_init_complete();
    }
    for i in 1..=2 {
        c.register(i, "q", echo());
    }
    // Node 3 has no action "q" and has finished init: it answers nothing.
    let t0 = clock();
    let r = c.request_at(0, &c.msg("q", b"", 0), t0, Duration::from_millis(200));
    let took = clock().saturating_duration_since(t0);
    assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (3, 2, true));
    assert!(took >= Duration::from_millis(200));
    assert_eq!(c.node(3).ep.stats().snapshot().rx_no_action, 1);
    assert_eq!(c.node(0).ep.stats().snapshot().requests_timed_out, 1);
}

#[test]
fn ignore_from_initialising_peer() {
    let c = Cluster::new(2);
    c.node(0).ep.set_init_complete();
    c.register(1, "q", echo());
    // Node 2 is still initialising and has no action: it sends "ignore".
    let r = c.request(0, &c.msg("q", b"", 0), Duration::from_secs(5));
    assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (1, 1, false));
}

#[test]
fn async_fires_once_including_dummy() {
    let c = Cluster::new(2);
    c.echo_everywhere(&["q"]);
    let (tx, rx) = channel();
    let tx2 = tx.clone();
    let s = c
        .node(0)
        .ep
        .request_async(
            &c.msg("q", b"a", 1),
            clock(),
            Duration::from_secs(5),
            Box::new(move |r: Reply<Replies>| tx2.send((r.nb_sent, r.nb_received)).unwrap()),
        )
        .unwrap();
    if let Some(f) = s.finished {
        run(f);
    }
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (2, 2));
    // No peer at all: the completion still fires, once.
    let s = c
        .node(0)
        .ep
        .request_async_to(
            &[],
            &c.msg("q", b"a", 0),
            clock(),
            Duration::from_secs(5),
            Box::new(move |r: Reply<Replies>| tx.send((r.nb_sent, r.nb_received)).unwrap()),
        )
        .unwrap();
    run(s.finished.expect("dummy request completes at once"));
    assert_eq!(rx.recv_timeout(Duration::from_secs(1)).unwrap(), (0, 0));
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
}

#[test]
fn malformed_datagrams_are_counted_and_release_fds() {
    let c = Cluster::new(1);
    c.register(0, "q", echo());
    c.node(0).ep.set_init_complete();
    c.node(1).ep.set_init_complete();
    let good =
        memplane_core::wire::Datagram::encode(Abi::V25_11, MsgKind::Request, &c.msg("q", b"", 0))
            .unwrap()
            .as_bytes()
            .to_vec();
    let mut bad_kind = good.clone();
    bad_kind[0] = 9;
    c.raw(1, 0, vec![0; 10], 3);
    c.raw(1, 0, bad_kind, 0);
    c.raw(1, 0, good.clone(), 2); // num_fds says 0, two arrived
    c.raw(1, 0, good[..332].to_vec(), 0);
    // The primary still answers a good request afterwards.
    let r = c.request(1, &c.msg("q", b"x", 0), Duration::from_secs(5));
    assert_eq!(r.nb_received, 1);
    let s = c.node(0).ep.stats().snapshot();
    assert_eq!(s.rx_malformed, 3);
    assert_eq!(s.rx_fd_mismatch, 1);
    drop(r);
    let live = c.live.clone();
    drop(c);
    assert_eq!(live.load(Ordering::SeqCst), 0, "fds leaked");
}

#[test]
fn many_requesters_through_one_receiving_thread() {
    let c = Arc::new(Cluster::new(2));
    c.echo_everywhere(&["q0", "q1", "q2", "q3"]);
    let mut ts = Vec::new();
    for t in 0..4 {
        let c = c.clone();
        ts.push(thread::spawn(move || {
            let name = format!("q{t}");
            for k in 0..200u32 {
                let r = c.request(
                    0,
                    &c.msg(&name, &k.to_le_bytes(), 0),
                    Duration::from_secs(10),
                );
                assert_eq!((r.nb_sent, r.nb_received), (2, 2));
                for (_, m) in &r.replies.0 {
                    assert_eq!(m.param(), k.to_le_bytes());
                }
            }
        }));
    }
    for t in ts {
        t.join().unwrap();
    }
    assert_eq!(c.node(0).ep.pending_requests(), 0);
}
