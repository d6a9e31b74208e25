//! Interop with real DPDK 22.11: the C peer `interop/dpdk_peer.c`, built here with cc and
//! pkg-config, runs as the DPDK primary and the `memplane` binary talks to it as a secondary over
//! DPDK's own `rte_mp` channel: requests (sync and async) with fds both ways, a DPDK broadcast
//! answered by `memplane mp listen`, one-way messages, role detection (and `memplane info`
//! refusing to attach to DPDK's memory), and the 22.11 ABI's 8-fd limit.
//!
//! Every test is skipped (it passes and prints a `SKIPPED:` line to stderr) when DPDK 22.11's
//! development files (libdpdk-dev) or a C compiler are missing, or when not running as root
//! (DPDK's runtime directory is /var/run/dpdk). Each test uses its own `--file-prefix`, kills
//! and reaps every process it starts, and removes its runtime directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::Proc;

const MEMPLANE: &str = env!("CARGO_BIN_EXE_memplane");
const PEER_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/dpdk_peer.c");
/// The DPDK version these tests speak (and the `--abi` memplane is given).
const DPDK_ABI: &str = "22.11";

/// How long a DPDK process may take to initialise.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a one-shot memplane command or an expected line may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

// ---- environment and the C peer -------------------------------------------------------------

use memplane_testkit::skip;

fn tool_runs(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Builds the C peer once per test binary; `Err` says why the tests must be skipped.
fn build_peer() -> Result<PathBuf, String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not root: DPDK's runtime directory /var/run/dpdk needs root".into());
    }
    if !tool_runs(Command::new("cc").arg("--version")) {
        return Err("no C compiler (cc) on PATH".into());
    }
    if !tool_runs(Command::new("pkg-config").args(["--exists", "libdpdk"])) {
        return Err(
            "DPDK 22.11 (libdpdk-dev) not installed: pkg-config --exists libdpdk failed".into(),
        );
    }
    let version = Command::new("pkg-config")
        .args(["--modversion", "libdpdk"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if version != DPDK_ABI && !version.starts_with(&format!("{DPDK_ABI}.")) {
        return Err(format!(
            "DPDK {DPDK_ABI} (libdpdk-dev) not installed: pkg-config finds libdpdk {version:?}"
        ));
    }
    let flags = Command::new("pkg-config")
        .args(["--cflags", "--libs", "libdpdk"])
        .output()
        .map_err(|e| format!("pkg-config: {e}"))?;
    if !flags.status.success() {
        return Err(format!(
            "pkg-config --cflags --libs libdpdk failed: {}",
            String::from_utf8_lossy(&flags.stderr)
        ));
    }
    let flags = String::from_utf8_lossy(&flags.stdout).into_owned();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dpdk_interop");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let out = dir.join("dpdk_peer");
    // Build under a private name and rename, so concurrent test runs never see a half-written
    // binary.
    let tmp = dir.join(format!("dpdk_peer.{}", std::process::id()));
    let cc = Command::new("cc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&tmp)
        .arg(PEER_SOURCE)
        .args(flags.split_whitespace())
        .output()
        .map_err(|e| format!("run cc: {e}"))?;
    // DPDK is installed and cc runs, so a failed build is a real failure, not a skip.
    assert!(
        cc.status.success(),
        "building {PEER_SOURCE} failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    std::fs::rename(&tmp, &out).map_err(|e| format!("rename to {}: {e}", out.display()))?;
    Ok(out)
}

/// The C peer, or `None` (after printing why) when this test must be skipped.
fn peer_binary() -> Option<&'static Path> {
    static PEER: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PEER.get_or_init(build_peer) {
        Ok(p) => Some(p),
        Err(reason) => {
            skip(reason);
            None
        }
    }
}

/// A unique DPDK `--file-prefix`; its runtime directory is removed on drop.
struct Prefix {
    name: String,
    dir: PathBuf,
}

impl Prefix {
    fn new() -> Prefix {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "mpint-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = Path::new("/var/run/dpdk").join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        Prefix { name, dir }
    }

    fn dir(&self) -> &str {
        self.dir.to_str().expect("utf-8 runtime dir")
    }

    /// The EAL arguments of a DPDK process in this deployment (no hugepages, no devices).
    fn eal_args(&self) -> Vec<String> {
        ["--no-huge", "-m", "64", "--no-pci", "-l", "0-1"]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("--file-prefix={}", self.name), "--".to_owned()])
            .collect()
    }

    /// memplane's channel options for a secondary in this deployment.
    fn memplane_secondary(&self) -> Vec<String> {
        [
            "--abi",
            DPDK_ABI,
            "--proc-type",
            "secondary",
            "--runtime-dir",
            self.dir(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- child processes ------------------------------------------------------------------------

/// Runs a one-shot `memplane` command to completion.
fn memplane(what: &str, args: &[String]) -> (ExitStatus, Proc) {
    let mut p = Proc::start(what, MEMPLANE, args);
    let st = p.finish(STEP_TIMEOUT);
    (st, p)
}

/// Runs a one-shot `memplane` command that must succeed.
fn memplane_ok(what: &str, args: &[String]) -> Proc {
    let mut p = Proc::start(what, MEMPLANE, args);
    p.finish_ok(STEP_TIMEOUT);
    p
}

/// Runs a one-shot `memplane` command that must fail, saying `why` on stderr.
fn memplane_refused(what: &str, args: &[String], why: &str) -> Proc {
    let (st, mp) = memplane(what, args);
    assert!(!st.success(), "{}", mp.report());
    assert!(mp.stderr_text().contains(why), "{}", mp.report());
    mp
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Runs `test` with the C peer and a fresh prefix, then says how long `what` took; skips (after
/// printing why) when the peer cannot be had.
fn interop(what: &str, test: impl FnOnce(&Path, &Prefix)) {
    let Some(peer) = peer_binary() else { return };
    let t0 = Instant::now();
    let prefix = Prefix::new();
    test(peer, &prefix);
    eprintln!("{what} checked in {:?}", t0.elapsed());
}

/// [`interop`] with the C peer serving as the DPDK primary for the whole of `test`, and stopped
/// cleanly after it.
fn against_dpdk_server(what: &str, test: impl FnOnce(&mut Proc, &Prefix)) {
    interop(what, |peer, prefix| {
        let mut dpdk = start_dpdk_server(peer, prefix);
        test(&mut dpdk, prefix);
        stop_dpdk_server(dpdk);
    });
}

/// Starts the C peer as the DPDK primary in `serve` mode and waits until it is ready.
fn start_dpdk_server(peer: &Path, prefix: &Prefix) -> Proc {
    let mut args = prefix.eal_args();
    args.push("serve".into());
    let mut p = Proc::start("dpdk-serve", peer, &args);
    let ready = p.ready(INIT_TIMEOUT);
    assert!(ready.contains("role=primary"), "{ready}");
    p
}

/// Stops the serving DPDK peer and checks it shut down cleanly.
fn stop_dpdk_server(mut p: Proc) {
    p.terminate_ok(STEP_TIMEOUT);
    assert!(p.output().contains("stopping signal=15"), "{}", p.report());
}

fn request_args(prefix: &Prefix, asynchronous: bool) -> Vec<String> {
    let mut a = strings(&[
        "mp",
        "request",
        "dpdk_echo",
        "--param",
        "68656c6c6f",
        "--memfd",
        "hello",
        "--show-fds",
    ]);
    a.extend(prefix.memplane_secondary());
    if asynchronous {
        a.push("--async".into());
    }
    a
}

fn check_request_round_trip(asynchronous: bool) {
    let what = format!("request (async={asynchronous}) round trip");
    against_dpdk_server(&what, |dpdk, prefix| {
        let mp = memplane_ok("memplane-request", &request_args(prefix, asynchronous));
        mp.assert_line(&format!(
            "reply from={}/mp_socket name=dpdk_echo param=68656c6c6f fds=1 fd0=\"from-dpdk\"",
            prefix.dir()
        ));
        assert!(
            mp.has_line(|l| l.contains("nb_sent=1 nb_received=1") && l.contains("timed_out=false")),
            "{}",
            mp.report()
        );

        dpdk.expect_exact("recv name=dpdk_echo param=68656c6c6f fds=1", STEP_TIMEOUT);
        dpdk.expect_exact("got fd0=\"hello\"", STEP_TIMEOUT);
        dpdk.expect_exact("replied rc=0", STEP_TIMEOUT);
    });
}

/// Starts the C peer as the DPDK primary in `mode` (`broadcast ...` or `send ...`), waiting for
/// one secondary and a go line, then `memplane mp listen` (`listen_args`, `--show-fds --count 1`)
/// as that secondary; once memplane is ready (its actions registered) and DPDK has seen its
/// socket, tells DPDK to go. Then both must exit successfully, DPDK having printed each line of
/// `dpdk_prints` and memplane the line `memplane_prints`.
fn check_dpdk_primary_to_memplane_listen(
    peer: &Path,
    prefix: &Prefix,
    mode: &[&str],
    listen_args: &[&str],
    dpdk_prints: &[&str],
    memplane_prints: &str,
) {
    let mut args = prefix.eal_args();
    args.extend(strings(mode));
    args.extend(strings(&["--wait-peers", "1", "--wait-stdin"]));
    let mut dpdk = Proc::start(&format!("dpdk-{}", mode[0]), peer, &args);
    dpdk.ready(INIT_TIMEOUT);

    let mut args = strings(&["mp", "listen", "--show-fds", "--count", "1"]);
    args.extend(strings(listen_args));
    args.extend(prefix.memplane_secondary());
    let mut listen = Proc::start("memplane-listen", MEMPLANE, &args);
    let ready = listen.ready(STEP_TIMEOUT);
    assert!(ready.contains("role=Secondary"), "{ready}");
    assert!(
        ready.contains(&format!("socket={}/mp_socket_", prefix.dir())),
        "{ready}"
    );

    // The DPDK peer sees memplane's socket with its own glob ...
    dpdk.expect_exact("peers=1", STEP_TIMEOUT);
    // ... and sends once memplane's action is registered (its `ready` line comes after that).
    dpdk.say("go");

    dpdk.finish_ok(STEP_TIMEOUT);
    for line in dpdk_prints {
        dpdk.assert_line(line);
    }
    listen.finish_ok(STEP_TIMEOUT);
    listen.assert_line(memplane_prints);
}

// ---- the tests ------------------------------------------------------------------------------

/// a. memplane (secondary) sends a sync request with a memfd to the DPDK primary; the DPDK
/// action sees the fd's contents and replies with its own memfd.
#[test]
fn memplane_requests_dpdk_primary() {
    check_request_round_trip(false);
}

/// a'. The same with an async request (the callback prints the same lines).
#[test]
fn memplane_requests_dpdk_primary_async() {
    check_request_round_trip(true);
}

/// memplane's `--proc-type auto` recognises a DPDK primary (by the lock it holds on `config`)
/// and becomes a secondary whose only peer is DPDK's `mp_socket`.
#[test]
fn memplane_auto_role_finds_dpdk_primary() {
    against_dpdk_server("auto role", |_, prefix| {
        let mut args = strings(&["mp", "peers", "--abi", DPDK_ABI, "--runtime-dir"]);
        args.push(prefix.dir().into());
        let mp = memplane_ok("memplane-peers", &args);
        assert!(
            mp.has_line(|l| l.starts_with("role=Secondary ")),
            "{}",
            mp.report()
        );
        mp.assert_line(&format!("peer {}/mp_socket alive=true", prefix.dir()));
        // A memplane primary must refuse the directory a DPDK primary holds.
        let mut args = strings(&["mp", "peers", "--proc-type", "primary", "--runtime-dir"]);
        args.push(prefix.dir().into());
        memplane_refused("memplane-primary", &args, "a DPDK primary");
        // Attaching to its memory (`memplane info` does) is refused, saying why: DPDK's
        // memory is not laid out as memplane's.
        let mut args = strings(&["info", "--abi", DPDK_ABI, "--runtime-dir"]);
        args.push(prefix.dir().into());
        memplane_refused("memplane-info", &args, "is a DPDK process");
    });
}

/// b. The DPDK primary broadcasts a request with a memfd (`rte_mp_request_sync` to every
/// `mp_socket_*`); `memplane mp listen` receives it and replies with its own memfd.
#[test]
fn dpdk_primary_broadcast_reaches_memplane() {
    interop("DPDK broadcast", |peer, prefix| {
        check_dpdk_primary_to_memplane_listen(
            peer,
            prefix,
            &["broadcast", "memplane_echo", "hello-memplane"],
            &[
                "--action",
                "memplane_echo",
                "--reply-memfd",
                "from-memplane",
            ],
            &[
                "nb_sent=1 nb_received=1",
                "reply name=memplane_echo param=70696e67 fds=1 fd0=\"from-memplane\"",
            ],
            &format!(
                "request from={}/mp_socket name=memplane_echo param=70696e67 fds=1 fd0=\"hello-memplane\"",
                prefix.dir()
            ),
        );
    });
}

/// c. A one-way message from memplane reaches the DPDK action with its fd.
#[test]
fn memplane_message_reaches_dpdk() {
    against_dpdk_server("one-way message", |dpdk, prefix| {
        let mut args = strings(&[
            "mp",
            "send",
            "dpdk_echo",
            "--param",
            "6f6e65776179",
            "--memfd",
            "one-way",
        ]);
        args.extend(prefix.memplane_secondary());
        let mp = memplane_ok("memplane-send", &args);
        mp.assert_line("sent name=dpdk_echo peers=1 gone=0 failed=0");
        dpdk.expect_exact("recv name=dpdk_echo param=6f6e65776179 fds=1", STEP_TIMEOUT);
        dpdk.expect_exact("got fd0=\"one-way\"", STEP_TIMEOUT);
    });
}

/// c'. The 22.11 ABI carries at most 8 fds: 8 memfds reach DPDK, 9 are refused by memplane
/// before anything is sent.
#[test]
fn abi_22_11_fd_limit_against_dpdk() {
    against_dpdk_server("22.11 fd limit", |dpdk, prefix| {
        let send = |param: &str, fds: usize| {
            let mut a = strings(&["mp", "send", "dpdk_echo", "--param", param]);
            for i in 1..=fds {
                a.push("--memfd".into());
                a.push(format!("m{i}"));
            }
            a.extend(prefix.memplane_secondary());
            a
        };

        memplane_ok("memplane-send-8", &send("08", 8));
        dpdk.expect_exact("recv name=dpdk_echo param=08 fds=8", STEP_TIMEOUT);
        for i in 0..8 {
            dpdk.expect_exact(&format!("got fd{i}=\"m{}\"", i + 1), STEP_TIMEOUT);
        }

        let mp = memplane_refused(
            "memplane-send-9",
            &send("09", 9),
            "9 fds attached, the 22.11 ABI carries at most 8",
        );
        assert!(!mp.output().contains("sent "), "{}", mp.report());

        // Nothing of the refused message reached DPDK: the next thing it receives is this marker.
        memplane_ok("memplane-send-marker", &send("ff", 1));
        let next = dpdk.expect_where(|l| l.starts_with("recv "), STEP_TIMEOUT);
        assert_eq!(
            next,
            "recv name=dpdk_echo param=ff fds=1",
            "{}",
            dpdk.report()
        );
    });
}

/// c''. The DPDK primary's one-way message (`rte_mp_sendmsg` to every `mp_socket_*`) with a
/// memfd reaches `memplane mp listen`.
#[test]
fn dpdk_primary_message_reaches_memplane() {
    interop("DPDK one-way message", |peer, prefix| {
        check_dpdk_primary_to_memplane_listen(
            peer,
            prefix,
            &["send", "memplane_note", "hello-note"],
            &["--action", "memplane_note"],
            &["sendmsg rc=0"],
            &format!(
                "message from={}/mp_socket name=memplane_note param=6e6f7465 fds=1 fd0=\"hello-note\"",
                prefix.dir()
            ),
        );
    });
}

/// An in-process memplane secondary that is not ready yet (its actions are not all registered)
/// answers the DPDK primary's request for an unknown action with "ignore" (`MP_IGN`), so DPDK
/// stops waiting at once and does not count it (`nb_sent=0`), as it does for its own
/// secondaries during `rte_eal_init`; once ready and registered, the same broadcast is answered.
#[test]
fn memplane_not_ready_is_ignored_by_dpdk() {
    use memplane::unix::{Abi, Channel, ChannelConfig, Fds, Incoming, MpChannel, ProcType};
    interop("not-ready ignore", |peer, prefix| {
        let broadcast = |what: &str| {
            let mut args = prefix.eal_args();
            args.extend(strings(&[
                "broadcast",
                "memplane_late",
                "too-early",
                "--wait-peers",
                "1",
                "--wait-stdin",
            ]));
            let mut dpdk = Proc::start(what, peer, &args);
            dpdk.ready(INIT_TIMEOUT);
            dpdk
        };

        let mut dpdk = broadcast("dpdk-broadcast-early");
        let cfg = ChannelConfig::new()
            .runtime_dir(prefix.dir())
            .proc_type(ProcType::Secondary)
            .abi(Abi::V22_11)
            .ready(false);
        let ch = Channel::open(cfg).expect("open memplane secondary");
        dpdk.expect_exact("peers=1", STEP_TIMEOUT);
        dpdk.say("go");
        // The request timeout is 5 s: an ignore ends it long before.
        let sent = Instant::now();
        // Timed up to DPDK's result line, not its EAL teardown.
        dpdk.expect_exact("nb_sent=0 nb_received=0", STEP_TIMEOUT);
        let took = sent.elapsed();
        let st = dpdk.finish(STEP_TIMEOUT);
        assert!(!st.success(), "nothing answered, yet: {}", dpdk.report());
        dpdk.assert_line("nb_sent=0 nb_received=0");
        assert!(
            took < Duration::from_secs(4),
            "DPDK waited {took:?}: the ignore did not reach it\n{}",
            dpdk.report()
        );
        drop(dpdk);

        // Register and become ready: the next DPDK primary's broadcast is answered.
        ch.register("memplane_late", |ch: &MpChannel, m: Incoming| {
            if m.is_request() {
                let reply = memplane::unix::message(m.msg.name().as_str(), b"late", Fds::none())
                    .expect("reply message");
                let _ = ch.reply(&m.from, &reply);
            }
        })
        .expect("register");
        ch.set_ready();
        let mut dpdk = broadcast("dpdk-broadcast-ready");
        dpdk.expect_exact("peers=1", STEP_TIMEOUT);
        dpdk.say("go");
        dpdk.finish_ok(STEP_TIMEOUT);
        dpdk.assert_line("reply name=memplane_late param=6c617465 fds=0");
        ch.close();
    });
}
