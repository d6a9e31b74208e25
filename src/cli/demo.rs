//! `memplane demo`: the main job, on its embedded defaults, runnable anywhere.
//!
//! A primary (this process) and three secondary processes (this binary again, `demo --worker`):
//! - the channel: a broadcast request with a memfd each way, an async broadcast, a request from
//!   a secondary, round-trip latency;
//! - the shared heap: a secondary allocates an object and names it with a memzone, another
//!   finds it by name and reads it at the same address, the primary reads it too; a secondary
//!   makes the heap grow (pages allocated by the primary, mapped by everyone), another process
//!   frees it and the pages go back to the kernel; objects freed by a process that did not
//!   allocate them; final statistics and a heap validation.
//!
//! It uses hugepages when free ones are reserved and ordinary shared memory otherwise, in a fresh
//! runtime directory that is removed at the end. No root needed.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::ptr::NonNull;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;

use memplane_heap::ZoneSpec;
use memplane_unix::{Fds, Incoming, MpChannel, ProcType, Replies, message};

use super::mp::{memfd_with, peek_fd};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// `memplane demo` options.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of secondary processes (at least 2).
    #[arg(long, default_value = "3")]
    secondaries: usize,
    /// Runtime directory (default: a fresh one under /tmp, removed at the end).
    #[arg(long = "runtime-dir")]
    runtime_dir: Option<PathBuf>,
    /// Run without hugepages even if some are free.
    #[arg(long = "no-huge")]
    no_huge: bool,
    /// Internal: run as one of the demo's secondaries.
    #[arg(long, hide = true)]
    worker: bool,
}

/// A secondary process of the demo, driven by line commands.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    pid: u32,
}

impl Worker {
    fn start(dir: &str) -> Result<Worker> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["demo", "--worker", "--runtime-dir", dir])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let pid = child.id();
        let mut w = Worker {
            child,
            stdin,
            lines,
            pid,
        };
        let r = w.answer()?;
        if !r.starts_with("ready") {
            return Err(format!("worker {pid} failed to start: {r}").into());
        }
        Ok(w)
    }

    fn answer(&mut self) -> Result<String> {
        Ok(self.lines.recv_timeout(Duration::from_secs(30))?)
    }

    fn ask(&mut self, cmd: &str) -> Result<String> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let r = self.answer()?;
        if let Some(e) = r.strip_prefix("error ") {
            return Err(format!("worker {}: {cmd}: {e}", self.pid).into());
        }
        Ok(r)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        // A clean exit detaches it from the memory; give it a moment, then make sure.
        for _ in 0..200 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn say(s: impl AsRef<str>) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{}", s.as_ref());
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// Runs the demo (or, with `--worker`, one of its secondaries).
pub fn run(a: DemoArgs) -> Result<()> {
    if a.worker {
        let dir = a.runtime_dir.ok_or("--worker needs --runtime-dir")?;
        return worker(&dir);
    }
    let (dir, temporary) = match a.runtime_dir {
        Some(d) => (d, false),
        None => (
            PathBuf::from(format!("/tmp/memplane-demo-{}", std::process::id())),
            true,
        ),
    };
    let r = demo(&dir, a.secondaries.max(2), a.no_huge);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

fn hugepages_free() -> Option<(u64, u64)> {
    let size = memplane_hugepage::memory::default_hugepage_size()?;
    Some((size, memplane_hugepage::memory::free_hugepages(size)))
}

fn demo(dir: &Path, n: usize, no_huge: bool) -> Result<()> {
    let d = dir.display().to_string();
    let huge_before = hugepages_free();
    let mut cfg = crate::Config::new()
        .runtime_dir(dir)
        .proc_type(ProcType::Primary);
    if no_huge {
        cfg = cfg.no_huge();
    }
    let p = cfg.init()?;
    let (ch, mem, heap) = (&p.channel, p.mem(), p.heap());
    say(format!(
        "memplane demo: primary pid {} in {d}",
        std::process::id()
    ));
    if let Some(s) = &p.setup {
        if let Some(note) = &s.note {
            say(format!("  {note}"));
        }
        say(format!(
            "  memory: {}, {} KiB pages, IOVA as {}, address range [{:#x}, {:#x})",
            s.backing,
            s.page_size >> 10,
            s.iova,
            s.va_base,
            s.va_base + s.va_len
        ));
    }
    let (tx, rx) = mpsc::channel::<String>();
    let tx = std::sync::Mutex::new(tx);
    ch.register("demo_hello", move |ch: &MpChannel, m: Incoming| {
        let fds: Vec<String> = m.msg.fds().0.iter().map(peek_fd).collect();
        let _ = tx
            .lock()
            .map(|t| t.send(format!("{} {:?}", m.from.name(), fds)));
        if m.is_request()
            && let Ok(fd) = memfd_with("hello from the primary")
            && let Ok(r) = message("demo_hello", b"ok", Fds::from(fd))
        {
            let _ = ch.reply(&m.from, &r);
        }
    })?;
    ch.register(super::PING_ACTION, |ch: &MpChannel, m: Incoming| {
        if m.is_request() {
            let (name, param, fds) = m.msg.into_parts();
            if let Ok(r) = memplane_core::Message::from_parts(name, param, fds) {
                let _ = ch.reply(&m.from, &r);
            }
        }
    })?;

    let mut ws = Vec::new();
    for _ in 0..n {
        ws.push(Worker::start(&d)?);
    }
    say(format!(
        "{n} secondaries attached (pids {:?}), {} in the memory broadcasts",
        ws.iter().map(|w| w.pid).collect::<Vec<_>>(),
        mem.participants_count()
    ));

    say("\n-- the channel --");
    let req = message(
        "demo_work",
        b"job-1",
        Fds::from(memfd_with("work order from the primary")?),
    )?;
    let t0 = Instant::now();
    let r = ch.request(&req, Duration::from_secs(5))?;
    say(format!(
        "broadcast request with a memfd: nb_sent={} nb_received={} in {:?}",
        r.nb_sent,
        r.nb_received,
        t0.elapsed()
    ));
    for m in &r.msgs {
        let fds: Vec<String> = m.msg.fds().0.iter().map(peek_fd).collect();
        say(format!("  reply from {}: fd says {:?}", m.from.name(), fds));
    }
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
        "async broadcast: callback ran once with nb_sent={s} nb_received={rcv}"
    ));
    let answer = ws[0].ask("hello")?;
    say(format!("secondary -> primary request: {answer}"));
    say(format!(
        "  the primary saw: {}",
        rx.recv_timeout(Duration::from_secs(5))?
    ));

    say("\n-- the shared heap --");
    let obj = ws[0].ask("zone demo_object 10000 hello from a secondary")?;
    say(format!(
        "secondary {} reserved memzone demo_object at {obj}",
        ws[0].pid
    ));
    let seen = ws[1].ask("zread demo_object")?;
    say(format!(
        "secondary {} found it by name and read: {seen:?}",
        ws[1].pid
    ));
    let z = heap
        .memzone_lookup("demo_object")
        .ok_or("memzone not found in the primary")?;
    // SAFETY: the zone is live (reserved above, freed below) and at least 10000 bytes long.
    let text = unsafe { std::slice::from_raw_parts(z.addr as *const u8, 22) };
    say(format!(
        "the primary reads it at the same address {:#x}: {:?}",
        z.addr,
        String::from_utf8_lossy(text)
    ));

    let before = heap.stats(0)?;
    let big = ws[2 % n].ask("malloc 8388608")?;
    let after = heap.stats(0)?;
    say(format!(
        "secondary {} allocated 8 MiB at {big}: the heap grew from {} to {} ({} growths); \
         every process maps the new pages",
        ws[2 % n].pid,
        mib(before.heap_size),
        mib(after.heap_size),
        after.grows
    ));
    let check = ws[1].ask(&format!("touch {big} 8388608"))?;
    say(format!(
        "  secondary {} wrote all of it: {check}",
        ws[1].pid
    ));
    let addr = u64::from_str_radix(big.trim_start_matches("0x"), 16)?;
    heap.free(NonNull::new(addr as *mut u8).ok_or("null")?)?;
    let shrunk = heap.stats(0)?;
    say(format!(
        "the primary freed it (allocated by another process): the heap shrank to {} ({} \
         shrinks), {} of memory in use",
        mib(shrunk.heap_size),
        shrunk.shrinks,
        mib(mem.total_used())
    ));
    let objs: Vec<String> = (0..100)
        .map(|i| ws[0].ask(&format!("malloc {}", 64 + i * 40)))
        .collect::<Result<_>>()?;
    for o in &objs {
        ws[1].ask(&format!("free {o}"))?;
    }
    say(format!(
        "secondary {} allocated 100 objects, secondary {} freed them",
        ws[0].pid, ws[1].pid
    ));
    ws[1].ask("zfree demo_object")?;

    let out = Command::new(std::env::current_exe()?)
        .args(["mp", "ping", "--count", "2000", "--runtime-dir", &d])
        .output()?;
    say(format!(
        "\nround trips from an IPC-only secondary: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    ));

    drop(ws);
    say("\n-- at the end --");
    for s in heap.all_stats() {
        say(format!(
            "heap node {}: size {} free {} allocated blocks {} growths {} shrinks {} \
             recovered locks {}",
            s.node,
            mib(s.heap_size),
            mib(s.free),
            s.alloc_count,
            s.grows,
            s.shrinks,
            s.recoveries
        ));
    }
    say(format!(
        "memory in use: {}; heap validation: {}",
        mib(mem.total_used()),
        match heap.validate() {
            Ok(()) => "clean".to_owned(),
            Err(ps) => format!("{} problems: {:?}", ps.len(), ps),
        }
    ));
    let st = ch.stats().endpoint;
    say(format!(
        "primary channel: {} datagrams received, {} rejected, {} sent, {} requests timed out",
        st.rx_ok,
        st.rx_rejected(),
        st.tx_ok,
        st.requests_timed_out
    ));
    drop(p);
    if let (Some((size, free)), Some(now)) = (huge_before, hugepages_free().map(|(_, f)| f))
        && free > 0
    {
        say(format!(
            "free {} KiB hugepages: {free} before, {now} after",
            size >> 10
        ));
    }
    say("demo done: every process reaped, runtime directory cleaned");
    Ok(())
}

/// A demo secondary: attaches (channel, memory, heap) and obeys commands on stdin.
fn worker(dir: &Path) -> Result<()> {
    let p = crate::Config::new()
        .runtime_dir(dir)
        .proc_type(ProcType::Secondary)
        .init()?;
    let (ch, heap) = (&p.channel, p.heap());
    ch.register("demo_work", |ch: &MpChannel, m: Incoming| {
        if m.is_request()
            && let Ok(fd) = memfd_with(&format!("result from secondary {}", std::process::id()))
            && let Ok(r) = message("demo_work", m.msg.param(), Fds::from(fd))
        {
            let _ = ch.reply(&m.from, &r);
        }
    })?;
    let reply = |s: String| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    };
    reply(format!("ready {}", std::process::id()));
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16);
    for l in std::io::stdin().lock().lines().map_while(|l| l.ok()) {
        let w: Vec<&str> = l.splitn(4, ' ').collect();
        let r: Result<String> = (|| {
            Ok(match w[0] {
                "hello" => {
                    let m = message(
                        "demo_hello",
                        b"",
                        Fds::from(memfd_with("greetings from a secondary")?),
                    )?;
                    let r = ch.request(&m, Duration::from_secs(5))?;
                    let m = r.msgs.first().ok_or("no reply")?;
                    let fds: Vec<String> = m.msg.fds().0.iter().map(peek_fd).collect();
                    format!(
                        "reply {:?} with fd {:?}",
                        String::from_utf8_lossy(m.msg.param()),
                        fds
                    )
                }
                "malloc" => format!("{:#x}", heap.malloc(w[1].parse()?, 64)?.as_ptr() as u64),
                "free" => {
                    heap.free(NonNull::new(hex(w[1])? as *mut u8).ok_or("null")?)?;
                    "ok".into()
                }
                "touch" => {
                    let (a, n) = (hex(w[1])?, w[2].parse::<usize>()?);
                    // SAFETY: the demo allocated this range in the shared heap; it is live.
                    unsafe { std::ptr::write_bytes(a as *mut u8, 0xab, n) };
                    "ok".into()
                }
                "zone" => {
                    let z = heap.memzone_reserve(
                        w[1],
                        ZoneSpec {
                            len: w[2].parse()?,
                            ..ZoneSpec::default()
                        },
                    )?;
                    let text = w.get(3).copied().unwrap_or("");
                    // SAFETY: a fresh zone of at least `len` bytes; the text is shorter.
                    unsafe {
                        std::ptr::copy_nonoverlapping(text.as_ptr(), z.addr as *mut u8, text.len())
                    };
                    format!("{:#x}", z.addr)
                }
                "zread" => {
                    let z = heap.memzone_lookup(w[1]).ok_or("no such memzone")?;
                    // SAFETY: the zone is live and at least 22 bytes long.
                    let b = unsafe { std::slice::from_raw_parts(z.addr as *const u8, 22) };
                    String::from_utf8_lossy(b).into_owned()
                }
                "zfree" => {
                    heap.memzone_free(w[1])?;
                    "ok".into()
                }
                "quit" => return Err("quit".into()),
                x => return Err(format!("unknown command {x}").into()),
            })
        })();
        match r {
            Ok(s) => reply(s),
            Err(e) if e.to_string() == "quit" => break,
            Err(e) => reply(format!("error {e}")),
        }
    }
    Ok(())
}
