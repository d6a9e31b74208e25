//! `memplane mp bench ...`: memplane's side of the IPC benchmark against DPDK 22.11
//! (`bench/ipc.sh`, `interop/dpdk_bench.c`), with the same action names, the same method and the
//! same output lines as the DPDK program, so the two can be run in one go and compared.
//!
//! - `serve`: registers the benchmark actions (in a primary, or in a secondary for broadcasts);
//! - `rtt`: sync round trips from a secondary to the primary;
//! - `broadcast`: sync requests from the primary to every secondary (also prints the CPU time the
//!   broadcasting thread spends per request, `cpu_us_per_op`);
//! - `async`: async requests from a secondary, W in flight (one per name `bench_0..bench_{W-1}`,
//!   since one name may have only one pending request per peer);
//! - `oneway`: one-way messages from a secondary, counted and timed by the primary.
//!
//! Every result is one line starting `bench=`, `key=value` fields.

use std::error::Error as StdError;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use memplane_core::endpoint::EndpointError;
use memplane_core::{Message, SendError};
use memplane_unix::{Channel, Error, Fds, Incoming, MpChannel, PeerAddr, message};

use super::mp::{on_signal, out, pct, us};
use super::{ChannelOpts, parse_ms};

type Result<T> = std::result::Result<T, Box<dyn StdError>>;

/// Echoes: the round-trip action.
pub const PING: &str = "bench_ping";
/// Echoes: the broadcast action (registered in secondaries).
pub const BCAST: &str = "bench_bcast";
/// One-way messages, counted.
pub const ONEWAY: &str = "bench_oneway";
/// Request: resets the one-way count and clock.
pub const ONEWAY_START: &str = "bench_oneway_start";
/// Request: replies with the one-way count and the nanoseconds from the start to the last one.
pub const ONEWAY_END: &str = "bench_oneway_end";

/// The name of async window slot `i`.
pub fn window_name(i: usize) -> String {
    format!("bench_{i}")
}

/// `memplane mp bench` modes.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Register the benchmark actions and serve them until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Sync round trips of `bench_ping` from a secondary to the primary.
    Rtt(RttArgs),
    /// Sync broadcasts of `bench_bcast` from the primary to every secondary.
    Broadcast(BroadcastArgs),
    /// Async requests from a secondary to the primary, W in flight.
    Async(AsyncArgs),
    /// One-way messages from a secondary, rate measured at the primary.
    Oneway(OnewayArgs),
}

/// Options of every mode.
#[derive(Args, Debug)]
pub struct Common {
    #[command(flatten)]
    opts: ChannelOpts,
    /// Placement label for the output (default: from the CPU affinity: `cpuN` for one CPU,
    /// `float` for every online CPU).
    #[arg(long)]
    placement: Option<String>,
    /// Timeout of each request in milliseconds.
    #[arg(long, value_parser = parse_ms, default_value = "5000")]
    timeout: Duration,
}

/// `bench serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Async window names to register (`bench_0..bench_{W-1}`).
    #[arg(long, default_value = "16")]
    window: usize,
}

/// `bench rtt`.
#[derive(Args, Debug)]
pub struct RttArgs {
    #[command(flatten)]
    common: Common,
    /// Round trips to measure (at least 1).
    #[arg(long, default_value = "10000", value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Round trips to run first, unmeasured.
    #[arg(long, default_value = "1000")]
    warmup: u32,
    /// The echo action to call (`memplane_ping` to measure a `memplane primary`).
    #[arg(long, default_value = PING)]
    action: String,
}

/// `bench broadcast`.
#[derive(Args, Debug)]
pub struct BroadcastArgs {
    #[command(flatten)]
    common: Common,
    /// Secondaries to wait for before starting.
    #[arg(long)]
    peers: usize,
    /// Broadcasts to measure (at least 1).
    #[arg(long, default_value = "2000", value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Broadcasts to run first, unmeasured.
    #[arg(long, default_value = "200")]
    warmup: u32,
    /// Start only once this file exists (the go signal, once every secondary is ready); waits
    /// at most 600 s for it and for the secondaries.
    #[arg(long = "go-file")]
    go_file: Option<PathBuf>,
}

/// `bench async`.
#[derive(Args, Debug)]
pub struct AsyncArgs {
    #[command(flatten)]
    common: Common,
    /// Requests to measure.
    #[arg(long, default_value = "100000")]
    count: u64,
    /// Requests in flight (distinct names `bench_0..bench_{W-1}`, registered by `serve`).
    #[arg(long, default_value = "16")]
    window: usize,
    /// Requests to run first, unmeasured.
    #[arg(long, default_value = "10000")]
    warmup: u64,
}

/// `bench oneway`.
#[derive(Args, Debug)]
pub struct OnewayArgs {
    #[command(flatten)]
    common: Common,
    /// Messages to send (at least 1).
    #[arg(long, default_value = "200000", value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
}

/// Runs a `bench` mode.
pub fn run(c: BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Serve(a) => serve(a),
        BenchCommand::Rtt(a) => rtt(a),
        BenchCommand::Broadcast(a) => broadcast(a),
        BenchCommand::Async(a) => async_bench(a),
        BenchCommand::Oneway(a) => oneway(a),
    }
}

/// The online CPUs, from `/sys/devices/system/cpu/online` (`0-1`, `0,2-3`).
fn online_cpus() -> Option<u32> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    let mut n = 0;
    for part in s.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>().ok()? - a.parse::<u32>().ok()? + 1,
            None => part.parse::<u32>().map(|_| 1).ok()?,
        };
    }
    Some(n)
}

/// `cpuN` when this thread may run on one CPU only, `float` when on every online CPU, else
/// `cpusA,B,...`.
fn detect_placement() -> String {
    let Ok(set) = rustix::thread::sched_getaffinity(None) else {
        return "unknown".into();
    };
    let n = set.count();
    if n > 1 && Some(n) == online_cpus() {
        return "float".into();
    }
    let cpus: Vec<String> = (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .map(|c| c.to_string())
        .collect();
    format!("{}{}", if n == 1 { "cpu" } else { "cpus" }, cpus.join(","))
}

impl Common {
    fn placement(&self) -> String {
        self.placement.clone().unwrap_or_else(detect_placement)
    }
}

/// `n=.. min_us=.. p50_us=.. p90_us=.. p99_us=.. max_us=..` of the samples (sorted here).
fn latency_fields(samples: &mut [Duration]) -> String {
    samples.sort();
    format!(
        "n={} min_us={} p50_us={} p90_us={} p99_us={} max_us={}",
        samples.len(),
        us(pct(samples, 0.0)),
        us(pct(samples, 0.50)),
        us(pct(samples, 0.90)),
        us(pct(samples, 0.99)),
        us(pct(samples, 1.0)),
    )
}

/// The channel's counters, one line (`stats ...`; not a result line).
fn stats(ch: &MpChannel, mode: &str) {
    let s = ch.stats();
    out(format!(
        "stats mode={mode} role={:?} rx_ok={} tx_ok={} tx_failed={} outbox_queued={} outbox_delivered={} outbox_dropped={} timed_out={} busy_polls={} busy_caught={} busy_polled_us={}",
        ch.role(),
        s.endpoint.rx_ok,
        s.endpoint.tx_ok,
        s.endpoint.tx_failed,
        s.outbox.queued,
        s.outbox.delivered,
        s.outbox.dropped,
        s.endpoint.requests_timed_out,
        s.busy_poll.polls,
        s.busy_poll.caught,
        s.busy_poll.polled_us
    ));
}

// ---- serve ----------------------------------------------------------------------------------

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Nanoseconds on a process-wide monotonic clock.
fn clock_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Replies to a request with its own name and parameter.
fn echo(ch: &MpChannel, m: Incoming) {
    if m.is_request() {
        let (name, param, fds) = m.msg.into_parts();
        if let Ok(reply) = Message::from_parts(name, param, fds) {
            let _ = ch.reply(&m.from, &reply);
        }
    }
}

#[derive(Default)]
struct OnewayCounter {
    count: AtomicU64,
    t0: AtomicU64,
    last: AtomicU64,
}

fn serve(a: ServeArgs) -> Result<()> {
    let (tx, stop) = mpsc::channel();
    on_signal(tx)?;
    // Ready only once every action is registered (an early request is answered "ignore").
    let ch = Channel::open(a.common.opts.config().ready(false))?;
    ch.register(PING, echo)?;
    ch.register(BCAST, echo)?;
    for i in 0..a.window {
        ch.register(&window_name(i), echo)?;
    }
    let c = Arc::new(OnewayCounter::default());
    let c1 = c.clone();
    ch.register(ONEWAY, move |_: &MpChannel, _: Incoming| {
        c1.last.store(clock_ns(), Ordering::Relaxed);
        c1.count.fetch_add(1, Ordering::Relaxed);
    })?;
    let c2 = c.clone();
    ch.register(ONEWAY_START, move |ch: &MpChannel, m: Incoming| {
        let t = clock_ns();
        c2.count.store(0, Ordering::SeqCst);
        c2.t0.store(t, Ordering::SeqCst);
        c2.last.store(t, Ordering::SeqCst);
        echo(ch, m);
    })?;
    ch.register(ONEWAY_END, move |ch: &MpChannel, m: Incoming| {
        if !m.is_request() {
            return;
        }
        let count = c.count.load(Ordering::SeqCst);
        let elapsed = c
            .last
            .load(Ordering::SeqCst)
            .saturating_sub(c.t0.load(Ordering::SeqCst));
        let mut param = [0u8; 16];
        param[..8].copy_from_slice(&count.to_le_bytes());
        param[8..].copy_from_slice(&elapsed.to_le_bytes());
        if let Ok(reply) = message(m.msg.name().as_str(), &param, Fds::none()) {
            let _ = ch.reply(&m.from, &reply);
        }
    })?;
    ch.set_ready();
    out(format!(
        "ready role={:?} dir={} pid={}",
        ch.role(),
        ch.dir().display(),
        std::process::id()
    ));
    let _ = stop.recv();
    stats(&ch, "serve");
    ch.close();
    Ok(())
}

// ---- rtt and broadcast ----------------------------------------------------------------------

fn rtt(a: RttArgs) -> Result<()> {
    let placement = a.common.placement();
    let ch = Channel::open(a.common.opts.config())?;
    let mut samples = Vec::with_capacity(a.count as usize);
    for i in 0..a.warmup + a.count {
        let msg = message(&a.action, &i.to_le_bytes(), Fds::none())?;
        let t0 = Instant::now();
        let r = ch.request(&msg, a.common.timeout)?;
        let dt = t0.elapsed();
        if r.nb_received != 1 {
            return Err(format!("no reply to ping {i} (nb_sent={})", r.nb_sent).into());
        }
        if i >= a.warmup {
            samples.push(dt);
        }
    }
    out(format!(
        "bench=rtt impl=memplane placement={placement} {}",
        latency_fields(&mut samples)
    ));
    stats(&ch, "rtt");
    Ok(())
}

fn broadcast(a: BroadcastArgs) -> Result<()> {
    let placement = a.common.placement();
    let ch = Channel::open(a.common.opts.config())?;
    if ch.role() != memplane_unix::Role::Primary {
        return Err("bench broadcast must run as the primary (--proc-type primary)".into());
    }
    out(format!(
        "ready role=Primary dir={} pid={}",
        ch.dir().display(),
        std::process::id()
    ));
    let give_up = Instant::now() + Duration::from_secs(600);
    while ch.peers()?.len() < a.peers || a.go_file.as_ref().is_some_and(|f| !f.exists()) {
        if Instant::now() > give_up {
            return Err(format!(
                "gave up after 600 s waiting for {} secondaries (found {}) and the go file",
                a.peers,
                ch.peers()?.len()
            )
            .into());
        }
        thread::sleep(Duration::from_millis(1));
    }
    let mut samples = Vec::with_capacity(a.count as usize);
    let mut incomplete = 0;
    let cpu0 = thread_cpu_ns();
    for i in 0..a.warmup + a.count {
        let msg = message(BCAST, &i.to_le_bytes(), Fds::none())?;
        let t0 = Instant::now();
        let r = ch.request(&msg, a.common.timeout)?;
        let dt = t0.elapsed();
        if i >= a.warmup {
            samples.push(dt);
            if r.nb_received as usize != a.peers {
                incomplete += 1;
            }
        }
    }
    let cpu = thread_cpu_ns() - cpu0;
    out(format!(
        "bench=broadcast impl=memplane placement={placement} secondaries={} {} incomplete={incomplete} cpu_us_per_op={:.1}",
        a.peers,
        latency_fields(&mut samples),
        cpu as f64 / 1e3 / (a.warmup + a.count) as f64
    ));
    stats(&ch, "broadcast");
    if incomplete > 0 {
        return Err(format!("{incomplete} broadcasts missed a reply").into());
    }
    Ok(())
}

// ---- async ----------------------------------------------------------------------------------

/// One run of async requests; callbacks hold it, so a finished run is never touched by the next.
struct AsyncRun {
    names: Vec<String>,
    total: u64,
    timeout: Duration,
    issued: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    done: mpsc::Sender<()>,
}

impl AsyncRun {
    fn fail(&self, what: String) {
        if self.failed.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("memplane bench: {what}");
        }
    }

    fn complete(&self) {
        if self.completed.fetch_add(1, Ordering::AcqRel) + 1 == self.total {
            let _ = self.done.send(());
        }
    }
}

/// Starts request `i` of `run`; its callback starts the next one of the same name.
fn fire(ch: &MpChannel, run: &Arc<AsyncRun>, i: usize) {
    let name = &run.names[i];
    let msg = match message(name, &[], Fds::none()) {
        Ok(m) => m,
        Err(e) => {
            run.fail(format!("{name}: {e}"));
            return run.complete();
        }
    };
    let r = run.clone();
    let started = ch.request_async(&msg, run.timeout, move |ch: &MpChannel, rep| {
        if rep.nb_received != 1 {
            r.fail(format!(
                "{}: nb_sent={} nb_received={}",
                r.names[i], rep.nb_sent, rep.nb_received
            ));
        }
        // Start the next request before counting this one, so the run is whole when done.
        if r.issued.fetch_add(1, Ordering::AcqRel) < r.total {
            fire(ch, &r, i);
        }
        r.complete();
    });
    if let Err(e) = started {
        run.fail(format!("request_async({name}): {e}"));
        run.complete();
    }
}

/// Runs `total` requests with `window` in flight; returns the time taken and the failures.
fn async_run(ch: &MpChannel, total: u64, window: usize, timeout: Duration) -> (Duration, u64) {
    let (done, finished) = mpsc::channel();
    let run = Arc::new(AsyncRun {
        names: (0..window).map(window_name).collect(),
        total,
        timeout,
        issued: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        done,
    });
    let t0 = Instant::now();
    for i in 0..window.min(total as usize) {
        run.issued.fetch_add(1, Ordering::AcqRel);
        fire(ch, &run, i);
    }
    let _ = finished.recv();
    (t0.elapsed(), run.failed.load(Ordering::Relaxed))
}

fn async_bench(a: AsyncArgs) -> Result<()> {
    if a.window == 0 || a.count == 0 {
        return Err("--window and --count must be at least 1".into());
    }
    let placement = a.common.placement();
    let ch = Channel::open(a.common.opts.config())?;
    if a.warmup > 0 {
        async_run(&ch, a.warmup, a.window, a.common.timeout);
    }
    let (dt, failed) = async_run(&ch, a.count, a.window, a.common.timeout);
    out(format!(
        "bench=async impl=memplane placement={placement} n={} window={} secs={:.3} per_s={:.0} failed={failed}",
        a.count,
        a.window,
        dt.as_secs_f64(),
        a.count as f64 / dt.as_secs_f64()
    ));
    stats(&ch, "async");
    if failed > 0 {
        return Err(format!("{failed} async requests failed").into());
    }
    Ok(())
}

// ---- oneway ---------------------------------------------------------------------------------

/// The outbox is full: wait for the service thread to drain it and try again.
fn is_backpressure(e: &Error) -> bool {
    matches!(
        e,
        Error::Endpoint(EndpointError::Transport(SendError::Os(c)))
            if *c == rustix::io::Errno::NOBUFS.raw_os_error()
    )
}

fn oneway(a: OnewayArgs) -> Result<()> {
    let placement = a.common.placement();
    let ch = Channel::open(a.common.opts.config())?;
    let primary: PeerAddr = ch
        .peers()?
        .into_iter()
        .next()
        .ok_or("no primary to send to")?;
    let start = message(ONEWAY_START, &[], Fds::none())?;
    if ch.request(&start, a.common.timeout)?.nb_received != 1 {
        return Err("no reply to bench_oneway_start".into());
    }
    let msg = message(ONEWAY, &[], Fds::none())?;
    let mut retries = 0u64;
    let t0 = Instant::now();
    for _ in 0..a.count {
        loop {
            match ch.send_to(&primary, &msg) {
                Ok(()) => break,
                Err(e) if is_backpressure(&e) => {
                    retries += 1;
                    thread::sleep(Duration::from_micros(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let sent = t0.elapsed();
    let end = message(ONEWAY_END, &[], Fds::none())?;
    let (mut count, mut elapsed) = (0u64, 0u64);
    let mut progress = Instant::now();
    loop {
        let r = ch.request(&end, a.common.timeout)?;
        let m = r.msgs.first().ok_or("no reply to bench_oneway_end")?;
        let p = m.msg.param();
        if p.len() == 16 {
            let before = count;
            count = u64::from_le_bytes(p[..8].try_into()?);
            elapsed = u64::from_le_bytes(p[8..].try_into()?);
            if count != before {
                progress = Instant::now();
            }
        }
        if count >= a.count || progress.elapsed() > Duration::from_secs(2) {
            break;
        }
        thread::sleep(Duration::from_millis(1));
    }
    let secs = elapsed as f64 / 1e9;
    out(format!(
        "bench=oneway impl=memplane placement={placement} n={} received={count} secs={secs:.3} per_s={:.0} send_per_s={:.0} send_retries={retries}",
        a.count,
        if secs > 0.0 { count as f64 / secs } else { 0.0 },
        a.count as f64 / sent.as_secs_f64()
    ));
    stats(&ch, "oneway");
    if count != a.count {
        return Err(format!("the primary counted {count} of {} messages", a.count).into());
    }
    Ok(())
}
