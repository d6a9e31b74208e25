//! `memplane demo`: the main job, on its embedded defaults, runnable anywhere.
//!
//! It starts a primary in this process and three secondary processes (this same binary, `mp
//! listen`), then shows the channel at work between real processes: a broadcast request with a
//! memfd each way, an async broadcast, requests from a secondary to the primary, a one-way
//! message, a secondary that dies, round trips, and the counters at the end. Everything lives in
//! a fresh runtime directory that is removed afterwards; no hugepages or root are needed.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;

use memplane_unix::{Channel, ChannelConfig, Fds, Incoming, MpChannel, ProcType, Replies, message};

use super::mp::{memfd_with, peek_fd};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// `memplane demo` options.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of secondary processes.
    #[arg(long, default_value = "3")]
    secondaries: usize,
    /// Runtime directory (default: a fresh one under /tmp, removed at the end).
    #[arg(long = "runtime-dir")]
    runtime_dir: Option<PathBuf>,
}

struct Secondary {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Secondary {
    fn start(dir: &str, i: usize) -> Result<Secondary> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args([
                "mp",
                "listen",
                "--runtime-dir",
                dir,
                "--proc-type",
                "secondary",
                "--action",
                "demo_work",
                "--reply-memfd",
                &format!("result from secondary {i}"),
                "--show-fds",
            ])
            .stdout(Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut s = Secondary { child, lines };
        s.wait_for("ready")?;
        Ok(s)
    }

    fn wait_for(&mut self, what: &str) -> Result<String> {
        loop {
            let l = self.lines.recv_timeout(Duration::from_secs(10))?;
            if l.contains(what) {
                return Ok(l);
            }
        }
    }
}

impl Drop for Secondary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn say(s: impl AsRef<str>) {
    println!("{}", s.as_ref());
}

/// Runs the demo.
pub fn run(a: DemoArgs) -> Result<()> {
    let (dir, temporary) = match a.runtime_dir {
        Some(d) => (d, false),
        None => (
            PathBuf::from(format!("/tmp/memplane-demo-{}", std::process::id())),
            true,
        ),
    };
    let r = demo(&dir, a.secondaries);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

fn demo(dir: &std::path::Path, n: usize) -> Result<()> {
    let d = dir.display().to_string();
    say(format!("memplane demo: runtime dir {d}"));
    let ch = Channel::open(
        ChannelConfig::new()
            .runtime_dir(dir)
            .proc_type(ProcType::Primary)
            .ready(false),
    )?;
    let (tx, rx) = mpsc::channel::<String>();
    let tx = std::sync::Mutex::new(tx);
    ch.register("demo_hello", move |ch: &MpChannel, m: Incoming| {
        let fds: Vec<String> = m.msg.fds().0.iter().map(peek_fd).collect();
        let _ = tx
            .lock()
            .map(|t| t.send(format!("{} {:?}", m.from.name(), fds)));
        if m.is_request() {
            let reply = memfd_with("hello from the primary")
                .map_err(|e| e.to_string())
                .and_then(|fd| {
                    message("demo_hello", b"ok", Fds::from(fd)).map_err(|e| e.to_string())
                });
            if let Ok(r) = reply {
                let _ = ch.reply(&m.from, &r);
            }
        }
    })?;
    ch.set_ready();
    say(format!(
        "primary: pid {} socket {}",
        std::process::id(),
        ch.socket_path().display()
    ));

    let mut secs = Vec::new();
    for i in 0..n {
        secs.push(Secondary::start(&d, i)?);
    }
    say(format!("{n} secondaries attached: {:?}", names(&ch)?));

    // 1. Broadcast request with an fd, replies with an fd each.
    let t0 = Instant::now();
    let req = message(
        "demo_work",
        b"job-1",
        Fds::from(memfd_with("work order from the primary")?),
    )?;
    let r = ch.request(&req, Duration::from_secs(5))?;
    say(format!(
        "broadcast request: nb_sent={} nb_received={} in {:?}",
        r.nb_sent,
        r.nb_received,
        t0.elapsed()
    ));
    for m in &r.msgs {
        let fds: Vec<String> = m.msg.fds().0.iter().map(peek_fd).collect();
        say(format!("  reply from {}: fd says {:?}", m.from.name(), fds));
    }
    for s in &mut secs {
        let l = s.wait_for("request from=")?;
        say(format!(
            "  a secondary saw: {}",
            l.split(" name=").nth(1).unwrap_or(&l)
        ));
    }

    // 2. Async broadcast: the callback runs once, on the channel's thread.
    let (atx, arx) = mpsc::channel();
    ch.request_async(
        &message("demo_work", b"job-2", Fds::none())?,
        Duration::from_secs(5),
        move |_: &MpChannel, r: Replies| {
            let _ = atx.send((r.nb_sent, r.nb_received));
        },
    )?;
    let (s, rcv) = arx.recv_timeout(Duration::from_secs(10))?;
    say(format!(
        "async broadcast: callback ran with nb_sent={s} nb_received={rcv}"
    ));

    // 3. A secondary asks the primary, with an fd.
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe)
        .args([
            "mp",
            "request",
            "demo_hello",
            "--memfd",
            "greetings from a secondary",
            "--show-fds",
            "--proc-type",
            "secondary",
            "--runtime-dir",
            &d,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    say(format!(
        "secondary -> primary: {}",
        text.lines().next().unwrap_or("no reply")
    ));
    say(format!(
        "  the primary saw: {}",
        rx.recv_timeout(Duration::from_secs(5))?
    ));

    // 4. One-way message to everyone.
    let rep = ch.send(&message("demo_work", b"note", Fds::none())?)?;
    say(format!("one-way message reached {} secondaries", rep.sent));

    // 5. A secondary dies: its dead socket is found at the next send, removed, not counted.
    if let Some(mut victim) = secs.pop() {
        let _ = victim.child.kill();
        let _ = victim.child.wait();
        let t0 = Instant::now();
        let r = ch.request(
            &message("demo_work", b"job-3", Fds::none())?,
            Duration::from_millis(500),
        )?;
        say(format!(
            "after killing one secondary: nb_sent={} nb_received={} timed_out={} in {:?} \
             (its socket was found dead and removed)",
            r.nb_sent,
            r.nb_received,
            r.timed_out,
            t0.elapsed()
        ));
    }

    // 6. Round trips from a secondary process.
    ch.register(super::PING_ACTION, |ch: &MpChannel, m: Incoming| {
        if m.is_request() {
            let (name, param, fds) = m.msg.into_parts();
            if let Ok(r) = memplane_core::Message::from_parts(name, param, fds) {
                let _ = ch.reply(&m.from, &r);
            }
        }
    })?;
    let out = Command::new(&exe)
        .args(["mp", "ping", "--count", "2000", "--runtime-dir", &d])
        .output()?;
    say(format!(
        "secondary -> primary round trips: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    ));

    drop(secs);
    let s = ch.stats();
    say(format!(
        "primary counters: received ok {}, rejected {}, unmatched replies {}, sent {}, peers \
         gone {}, timed-out requests {}",
        s.endpoint.rx_ok,
        s.endpoint.rx_rejected(),
        s.endpoint.rx_unmatched_reply,
        s.endpoint.tx_ok,
        s.endpoint.tx_peer_gone,
        s.endpoint.requests_timed_out
    ));
    ch.close();
    say("demo done: all processes reaped, runtime dir cleaned");
    Ok(())
}

fn names(ch: &MpChannel) -> Result<Vec<String>> {
    Ok(ch.peers()?.iter().map(|p| p.name().to_owned()).collect())
}
