//! `memplane mp ...` and `memplane primary`: the channel from a shell.
//!
//! Every line these commands print is meant to be read by people and by tests alike: one event
//! per line, `key=value` fields, parameters in hex.

use std::error::Error as StdError;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use memplane_unix::{Channel, Fds, Incoming, Message, MpChannel, PeerAddr, Replies, message};

use super::{ChannelOpts, HexBytes, PING_ACTION, hex, parse_hex_arg, parse_ms};

type Result<T> = std::result::Result<T, Box<dyn StdError>>;

/// `memplane mp` subcommands.
#[derive(Subcommand, Debug)]
pub enum MpCommand {
    /// Register actions and print every message they receive; answer requests.
    Listen(ListenArgs),
    /// Send a one-way message (to every secondary from a primary, to the primary otherwise).
    Send(SendArgs),
    /// Send a request and print every reply.
    Request(RequestArgs),
    /// Measure round trips of `memplane_ping` requests.
    Ping(PingArgs),
    /// List the peers a message would reach.
    Peers(ChannelOpts),
    /// IPC benchmarks, comparable with `interop/dpdk_bench.c` (see `bench/ipc.sh`).
    #[command(subcommand)]
    Bench(super::bench::BenchCommand),
}

/// `mp listen`.
#[derive(Args, Debug)]
pub struct ListenArgs {
    #[command(flatten)]
    opts: ChannelOpts,
    /// An action to register (repeat for more).
    #[arg(long = "action", required = true)]
    actions: Vec<String>,
    /// Reply parameter (hex); default: echo the request's parameter.
    #[arg(long = "reply", value_parser = parse_hex_arg)]
    reply: Option<HexBytes>,
    /// Attach a memfd holding this text to every reply (repeat for more fds).
    #[arg(long = "reply-memfd")]
    reply_memfds: Vec<String>,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Print the first bytes of every received fd.
    #[arg(long = "show-fds")]
    show_fds: bool,
    /// Never answer requests (to see how requesters cope with a silent peer).
    #[arg(long = "no-reply")]
    no_reply: bool,
    /// Hold every reply until a message (one-way or request) with this action name arrives,
    /// then send them all at once and answer later requests at once (to see how requesters
    /// cope with many requests in flight and a burst of answers). The action is registered.
    #[arg(long = "hold-replies-until", conflicts_with = "no_reply")]
    hold_until: Option<String>,
}

/// `mp send`.
#[derive(Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    opts: ChannelOpts,
    /// Action name.
    name: String,
    /// Parameter (hex).
    #[arg(long, value_parser = parse_hex_arg, default_value = "")]
    param: HexBytes,
    /// Attach a memfd holding this text (repeat for more fds).
    #[arg(long = "memfd")]
    memfds: Vec<String>,
}

/// `mp request`.
#[derive(Args, Debug)]
pub struct RequestArgs {
    #[command(flatten)]
    opts: ChannelOpts,
    /// Action name.
    name: String,
    /// Parameter (hex).
    #[arg(long, value_parser = parse_hex_arg, default_value = "")]
    param: HexBytes,
    /// Timeout in milliseconds.
    #[arg(long, value_parser = parse_ms, default_value = "5000")]
    timeout: Duration,
    /// Attach a memfd holding this text (repeat for more fds).
    #[arg(long = "memfd")]
    memfds: Vec<String>,
    /// Print the first bytes of every fd in the replies.
    #[arg(long = "show-fds")]
    show_fds: bool,
    /// Send asynchronously and wait for the callback (same output).
    #[arg(long = "async")]
    asynchronous: bool,
}

/// `mp ping`.
#[derive(Args, Debug)]
pub struct PingArgs {
    #[command(flatten)]
    opts: ChannelOpts,
    /// Round trips to measure (at least 1).
    #[arg(long, default_value = "1000", value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Round trips to run first, unmeasured.
    #[arg(long, default_value = "100")]
    warmup: u32,
    /// Timeout of each request in milliseconds.
    #[arg(long, value_parser = parse_ms, default_value = "1000")]
    timeout: Duration,
}

/// Runs an `mp` subcommand.
pub fn run(c: MpCommand) -> Result<()> {
    match c {
        MpCommand::Listen(a) => listen(a),
        MpCommand::Send(a) => send(a),
        MpCommand::Request(a) => request(a),
        MpCommand::Ping(a) => ping(a),
        MpCommand::Peers(o) => peers(&o),
        MpCommand::Bench(c) => super::bench::run(c),
    }
}

/// A memfd holding `text`.
pub fn memfd_with(text: &str) -> Result<OwnedFd> {
    let fd = rustix::fs::memfd_create("memplane-mp", rustix::fs::MemfdFlags::CLOEXEC)?;
    let mut done = 0;
    while done < text.len() {
        done += rustix::io::write(&fd, &text.as_bytes()[done..])?;
    }
    Ok(fd)
}

fn memfds(texts: &[String]) -> Result<Fds> {
    Ok(Fds(texts
        .iter()
        .map(|t| memfd_with(t))
        .collect::<Result<Vec<_>>>()?))
}

/// The first bytes of what `fd` holds (read from offset 0), escaped for one line.
pub fn peek_fd(fd: impl AsFd) -> String {
    let mut b = [0u8; 64];
    match rustix::io::pread(fd, &mut b, 0) {
        Ok(n) => b[..n].escape_ascii().to_string(),
        Err(e) => format!("<{e}>"),
    }
}

fn fds_line(fds: &Fds, show: bool) -> String {
    let mut s = format!(" fds={}", fds.0.len());
    if show {
        for (i, f) in fds.0.iter().enumerate() {
            s += &format!(" fd{i}=\"{}\"", peek_fd(f));
        }
    }
    s
}

pub(super) fn out(line: String) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

fn open(o: &ChannelOpts) -> Result<Channel> {
    let ch = Channel::open(o.config())?;
    Ok(ch)
}

fn listen(a: ListenArgs) -> Result<()> {
    // A reply that could never be sent is refused now, not reported at every request.
    if let Some(r) = &a.reply {
        memplane_core::message::Param::new(&r.0).map_err(|e| format!("--reply: {e}"))?;
    }
    // Not ready until every action is registered: a request that arrives in between is
    // answered with "ignore" rather than left to time out.
    let ch = Channel::open(a.opts.config().ready(false))?;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let seen = Arc::new(AtomicU64::new(0));
    let count = a.count;
    let reply = a.reply.clone();
    let reply_memfds = a.reply_memfds.clone();
    let show = a.show_fds;
    let no_reply = a.no_reply;
    let held = Arc::new(Held::new(a.hold_until.clone()));
    let mut actions = a.actions.clone();
    if let Some(h) = &a.hold_until
        && !actions.contains(h)
    {
        actions.push(h.clone());
    }
    let busy = Arc::new(AtomicBool::new(false));
    for name in &actions {
        let seen = seen.clone();
        let done_tx = done_tx.clone();
        let reply = reply.clone();
        let reply_memfds = reply_memfds.clone();
        let held = held.clone();
        let busy = busy.clone();
        ch.register(name, move |ch: &MpChannel, m: Incoming| {
            // Handlers run one at a time, as on DPDK's one thread: say so if they ever do not.
            let _busy = HandlerRunning::enter(&busy, m.msg.name().as_str());
            let kind = if m.is_request() { "request" } else { "message" };
            out(format!(
                "{kind} from={} name={} param={}{}",
                m.from,
                m.msg.name(),
                hex(m.msg.param()),
                fds_line(m.msg.fds(), show)
            ));
            if m.is_request() && !no_reply {
                let param = reply
                    .clone()
                    .map_or_else(|| m.msg.param().to_vec(), |h| h.0);
                let sent = memfds(&reply_memfds)
                    .and_then(|fds| Ok(message(m.msg.name().as_str(), &param, fds)?))
                    .and_then(|msg| match held.hold(&m.from, msg) {
                        Some(msg) => Ok(ch.reply(&m.from, &msg)?),
                        None => Ok(()),
                    });
                if let Err(e) = sent {
                    out(format!("reply-error name={} error={e}", m.msg.name()));
                }
            }
            held.release_on(ch, m.msg.name().as_str());
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            if count.is_some_and(|c| n >= c) {
                let _ = done_tx.send(());
            }
        })?;
    }
    ch.set_ready();
    // The signal handler is in place before "ready": a SIGTERM sent on seeing that line is
    // handled (closing the channel), not the default action.
    on_signal(done_tx)?;
    out(format!(
        "ready role={:?} socket={} abi={}",
        ch.role(),
        ch.socket_path().display(),
        ch.abi()
    ));
    let _ = done_rx.recv();
    ch.close();
    Ok(())
}

/// A reply kept back, with whom it goes to.
type HeldReply = (PeerAddr, Message<Fds>);

/// Replies `mp listen --hold-replies-until` keeps back, and whether it still does.
struct Held {
    until: Option<String>,
    /// `None` once released (or when nothing is held back).
    replies: std::sync::Mutex<Option<Vec<HeldReply>>>,
}

impl Held {
    fn new(until: Option<String>) -> Self {
        let replies = std::sync::Mutex::new(until.as_ref().map(|_| Vec::new()));
        Held { until, replies }
    }

    /// Keeps `msg` back while holding; otherwise gives it back to be sent now.
    fn hold(&self, to: &PeerAddr, msg: Message<Fds>) -> Option<Message<Fds>> {
        let mut r = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        match r.as_mut() {
            Some(v) => {
                v.push((to.clone(), msg));
                None
            }
            None => Some(msg),
        }
    }

    /// Sends every held reply, in arrival order, when `name` is the release action.
    fn release_on(&self, ch: &MpChannel, name: &str) {
        if self.until.as_deref() != Some(name) {
            return;
        }
        let Some(v) = self
            .replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        out(format!("releasing replies={}", v.len()));
        for (to, msg) in v {
            if let Err(e) = ch.reply(&to, &msg) {
                out(format!("reply-error name={} error={e}", msg.name()));
            }
        }
    }
}

fn send(a: SendArgs) -> Result<()> {
    let ch = open(&a.opts)?;
    let msg = message(&a.name, &a.param.0, memfds(&a.memfds)?)?;
    let r = ch.send(&msg)?;
    out(format!(
        "sent name={} peers={} gone={} failed={}",
        a.name, r.sent, r.gone, r.failed
    ));
    Ok(())
}

fn print_replies(name: &str, r: &Replies, show: bool) {
    let mut msgs: Vec<_> = r.msgs.iter().collect();
    msgs.sort_by(|a, b| a.from.cmp(&b.from));
    for m in msgs {
        out(format!(
            "reply from={} name={} param={}{}",
            m.from,
            m.msg.name(),
            hex(m.msg.param()),
            fds_line(m.msg.fds(), show)
        ));
    }
    out(format!(
        "done name={name} nb_sent={} nb_received={} timed_out={}",
        r.nb_sent, r.nb_received, r.timed_out
    ));
}

fn request(a: RequestArgs) -> Result<()> {
    let ch = open(&a.opts)?;
    let msg = message(&a.name, &a.param.0, memfds(&a.memfds)?)?;
    let r = if a.asynchronous {
        let (tx, rx) = mpsc::channel();
        ch.request_async(&msg, a.timeout, move |_: &MpChannel, r: Replies| {
            let _ = tx.send(r);
        })?;
        rx.recv()?
    } else {
        ch.request(&msg, a.timeout)?
    };
    print_replies(&a.name, &r, a.show_fds);
    Ok(())
}

/// Percentile of sorted samples.
pub(super) fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(super) fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn ping(a: PingArgs) -> Result<()> {
    let ch = open(&a.opts)?;
    let mut samples = Vec::with_capacity(a.count as usize);
    for i in 0..a.warmup + a.count {
        let msg = message(PING_ACTION, &i.to_le_bytes(), Fds::none())?;
        let t0 = Instant::now();
        let r = ch.request(&msg, a.timeout)?;
        let dt = t0.elapsed();
        if r.nb_received == 0 {
            return Err(format!("no reply to ping {i} (nb_sent={})", r.nb_sent).into());
        }
        if i >= a.warmup {
            samples.push(dt);
        }
    }
    samples.sort();
    out(format!(
        "ping count={} min_us={} p50_us={} p90_us={} p99_us={} max_us={}",
        samples.len(),
        us(samples[0]),
        us(pct(&samples, 0.50)),
        us(pct(&samples, 0.90)),
        us(pct(&samples, 0.99)),
        us(*samples.last().unwrap_or(&Duration::ZERO)),
    ));
    Ok(())
}

fn peers(o: &ChannelOpts) -> Result<()> {
    let ch = open(o)?;
    out(format!(
        "role={:?} dir={} socket={}",
        ch.role(),
        ch.dir().display(),
        ch.socket_path().display()
    ));
    for p in ch.peers()? {
        let alive = memplane_unix::rundir::socket_alive(p.path());
        out(format!("peer {} alive={alive}", p));
    }
    Ok(())
}

/// Marks a handler of `mp listen` running; prints `overlap name=...` when another one already
/// is (the channel runs handlers one at a time, so this line means a bug).
struct HandlerRunning<'a>(&'a AtomicBool);

impl<'a> HandlerRunning<'a> {
    fn enter(busy: &'a AtomicBool, name: &str) -> Self {
        if busy.swap(true, Ordering::AcqRel) {
            out(format!("overlap name={name}"));
        }
        HandlerRunning(busy)
    }
}

impl Drop for HandlerRunning<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Sends on `tx` when SIGINT or SIGTERM arrives.
pub(super) fn on_signal(tx: mpsc::Sender<()>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                let _ = tx.send(());
            }
        })?;
    Ok(())
}

/// `memplane primary`: sets up the shared memory (unless `--no-memory`) and answers
/// `memplane_ping` with the request's parameter (and its fds) until SIGINT or SIGTERM, then
/// closes, removing its socket, lock and memory files.
pub fn primary(a: &super::PrimaryArgs) -> Result<()> {
    let mut o = a.channel.clone();
    if o.proc_type == memplane_unix::ProcType::Auto {
        o.proc_type = memplane_unix::ProcType::Primary;
    }
    let (tx, stop) = mpsc::channel();
    on_signal(tx)?;
    let cfg = a.mem.apply(crate::Config {
        // Ready once the ping action is there: an early ping is answered "ignore", not lost.
        channel: o.config().ready(false),
        ..crate::Config::default()
    });
    let p = cfg.init()?;
    let ch = &p.channel;
    ch.register(PING_ACTION, |ch: &MpChannel, m: Incoming| {
        if m.is_request() {
            let (name, param, fds) = m.msg.into_parts();
            if let Ok(reply) = memplane_core::Message::from_parts(name, param, fds) {
                let _ = ch.reply(&m.from, &reply);
            }
        }
    })?;
    ch.set_ready();
    if let Some(s) = &p.setup {
        if let Some(n) = &s.note {
            eprintln!("memplane: {n}");
        }
        out(format!(
            "memory backing={:?} page_size={} iova={} va={:#x}+{:#x}",
            s.backing, s.page_size, s.iova, s.va_base, s.va_len
        ));
    }
    out(format!(
        "primary ready dir={} socket={} abi={}",
        ch.dir().display(),
        ch.socket_path().display(),
        ch.abi()
    ));
    let _ = stop.recv();
    let s = ch.stats();
    ch.close();
    drop(p);
    out(format!(
        "primary stopped rx_ok={} rejected={} no_action={}",
        s.endpoint.rx_ok,
        s.endpoint.rx_rejected(),
        s.endpoint.rx_no_action
    ));
    Ok(())
}
