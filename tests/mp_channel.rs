//! The Unix channel between real processes.
//!
//! The test process plays one role through the library (`memplane::unix`), and `memplane`
//! child processes play the others. Checked here: a primary with four secondaries exchanging
//! one-way messages, sync, async and broadcast requests in both directions; fds (memfds whose
//! contents the receiver reads) both ways; a secondary killed with SIGKILL mid-request; stale
//! socket files; a second primary refused and a secondary without primary failing at once;
//! malformed datagrams (the primary survives, leaks no fd, counts each rejection); a sender with
//! another uid rejected; 1,000 async requests in flight; many threads sharing one receiving
//! thread; every ABI on the wire; answers to a peer that reads late waiting in order (or dropped
//! at the send timeout) while others are served; requests whose datagram waits in the outbox
//! for a peer that dies end at once, not at their deadline; a relative runtime directory given
//! from different working directories names one deployment; processes whose runtime directory
//! was removed still stop. Each test has its own runtime
//! directory and reaps its children.

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{LONG, Proc, TestDir, primary, primary_with, run_in, test_dir};
use memplane::unix::socket::Socket;
use memplane::unix::{
    Abi, Channel, ChannelConfig, Fds, Incoming, MpChannel, ProcType, Replies, message,
};

fn lib(dir: &TestDir, t: ProcType) -> Channel {
    Channel::open(ChannelConfig::new().runtime_dir(dir.path()).proc_type(t)).expect("open channel")
}

fn memfd(text: &str) -> OwnedFd {
    memplane::cli::mp::memfd_with(text).unwrap()
}

fn read_fd(fd: impl AsFd) -> String {
    memplane::cli::mp::peek_fd(fd)
}

/// Starts `memplane mp listen` in `dir` as `proc_type` with `extra` options and waits for its
/// `ready` line (which names the role).
fn listen(dir: &TestDir, proc_type: &str, ready: &str, extra: &[&str]) -> Proc {
    let d = dir.arg();
    let mut args = vec![
        "mp",
        "listen",
        "--runtime-dir",
        &d,
        "--proc-type",
        proc_type,
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::memplane(&args);
    p.expect_line(ready, LONG);
    p
}

/// A secondary `memplane mp listen` in `dir` with `extra` options.
fn listener(dir: &TestDir, extra: &[&str]) -> Proc {
    listen(dir, "secondary", "ready role=Secondary", extra)
}

/// A primary `memplane mp listen` in `dir` answering each action of `names`.
fn primary_listener(dir: &TestDir, names: &[String]) -> Proc {
    primary_listener_with(dir, names, &[])
}

/// [`primary_listener`] with more `mp listen` options.
fn primary_listener_with(dir: &TestDir, names: &[String], extra: &[&str]) -> Proc {
    let mut args: Vec<&str> = names.iter().flat_map(|n| ["--action", n]).collect();
    args.extend(extra);
    listen(dir, "primary", "ready role=Primary", &args)
}

#[test]
fn primary_and_four_secondaries_both_directions() {
    let dir = test_dir();
    let ch = lib(&dir, ProcType::Primary);
    let (tx, rx) = mpsc::channel::<String>();
    let tx = Mutex::new(tx);
    ch.register("up_req", move |ch: &MpChannel, m: Incoming| {
        let fds: Vec<String> = m.msg.fds().0.iter().map(read_fd).collect();
        let _ = tx.lock().unwrap().send(format!("req fds={fds:?}"));
        let r = message("up_req", m.msg.param(), Fds::from(memfd("from-primary"))).unwrap();
        ch.reply(&m.from, &r).unwrap();
    })
    .unwrap();
    let (ntx, nrx) = mpsc::channel::<Vec<u8>>();
    let ntx = Mutex::new(ntx);
    ch.register("up_note", move |_: &MpChannel, m: Incoming| {
        assert!(!m.is_request());
        let _ = ntx.lock().unwrap().send(m.msg.param().to_vec());
    })
    .unwrap();

    let mut secs: Vec<Proc> = (0..4)
        .map(|_| {
            listener(
                &dir,
                &[
                    "--action",
                    "down",
                    "--reply-memfd",
                    "from-secondary",
                    "--show-fds",
                ],
            )
        })
        .collect();

    // Primary to every secondary: sync broadcast with an fd each way.
    let m = message("down", b"\x01\x02", Fds::from(memfd("to-secondaries"))).unwrap();
    let r = ch.request(&m, LONG).unwrap();
    assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (4, 4, false));
    for rep in &r.msgs {
        assert_eq!(rep.msg.param(), b"\x01\x02");
        assert_eq!(rep.msg.fds().0.len(), 1);
        assert_eq!(read_fd(&rep.msg.fds().0[0]), "from-secondary");
    }
    for s in &mut secs {
        let l = s.expect_line("request from=", LONG);
        assert!(
            l.contains("name=down param=0102 fds=1 fd0=\"to-secondaries\""),
            "{l}"
        );
    }

    // Async broadcast.
    let (atx, arx) = mpsc::channel();
    ch.request_async(
        &message("down", b"a", Fds::none()).unwrap(),
        LONG,
        move |_, r: Replies| {
            atx.send((r.nb_sent, r.nb_received)).unwrap();
        },
    )
    .unwrap();
    assert_eq!(arx.recv_timeout(LONG).unwrap(), (4, 4));

    // One-way broadcast.
    let rep = ch
        .send(&message("down", b"m", Fds::none()).unwrap())
        .unwrap();
    assert_eq!(rep.sent, 4);
    for s in &mut secs {
        s.expect_line("message from=", LONG);
    }

    // Secondaries to the primary: sync, async, one-way.
    let (code, out, err) = run_in(
        &dir,
        &[
            "mp",
            "request",
            "up_req",
            "--param",
            "beef",
            "--memfd",
            "hello",
            "--show-fds",
            "--proc-type",
            "secondary",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.iter()
            .any(|l| l.contains("name=up_req param=beef fds=1 fd0=\"from-primary\"")),
        "{out:?}"
    );
    assert!(out.iter().any(|l| l.contains("nb_sent=1 nb_received=1")));
    assert_eq!(rx.recv_timeout(LONG).unwrap(), "req fds=[\"hello\"]");
    let (code, out, err) = run_in(
        &dir,
        &[
            "mp",
            "request",
            "up_req",
            "--async",
            "--proc-type",
            "secondary",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.iter().any(|l| l.contains("nb_sent=1 nb_received=1")),
        "{out:?}"
    );
    let (code, _, err) = run_in(
        &dir,
        &[
            "mp",
            "send",
            "up_note",
            "--param",
            "ab",
            "--proc-type",
            "secondary",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(nrx.recv_timeout(LONG).unwrap(), vec![0xab]);
    assert_eq!(ch.stats().endpoint.rx_rejected(), 0);
}

/// A request's counters: (nb_sent, nb_received, timed_out).
type Counts = (u32, u32, bool);

fn counts(r: &Replies) -> Counts {
    (r.nb_sent, r.nb_received, r.timed_out)
}

/// Two requests with a minute's timeout, to whoever `ch` talks to: `async_name` through
/// `request_async`, `sync_name` through `request` on a thread of its own. Returns where each
/// one's outcome arrives, and the thread.
#[allow(clippy::type_complexity)]
fn request_both(
    ch: &Arc<Channel>,
    async_name: &str,
    sync_name: &str,
) -> (
    mpsc::Receiver<Counts>,
    mpsc::Receiver<Result<Counts, memplane::unix::Error>>,
    std::thread::JoinHandle<()>,
) {
    let minute = Duration::from_secs(60);
    let (atx, arx) = mpsc::channel();
    ch.request_async(
        &message(async_name, b"", Fds::none()).unwrap(),
        minute,
        move |_, r: Replies| atx.send(counts(&r)).unwrap(),
    )
    .unwrap();
    let (stx, srx) = mpsc::channel();
    let ch = ch.clone();
    let m = message(sync_name, b"", Fds::none()).unwrap();
    let waiter = std::thread::spawn(move || {
        stx.send(ch.request(&m, minute).map(|r| counts(&r)))
            .unwrap();
    });
    (arx, srx, waiter)
}

/// Waits until `p` printed requests named `a` and `b`, in either order.
fn expect_requests(p: &mut Proc, a: &str, b: &str) {
    let first = p.expect_line("request from=", LONG);
    let other = if first.contains(&format!("name={a} ")) {
        b
    } else {
        a
    };
    p.expect_line(&format!("name={other} "), LONG);
}

#[test]
fn secondary_killed_mid_request() {
    // A secondary dies while it owes answers (SIGKILL: its socket file stays behind). The
    // primary watches each secondary's process (a pidfd): the requests stop waiting for the
    // dead one at once, async and sync alike, instead of at their (minute-long) deadline, and
    // count it as not sent. DPDK waits out the timeout.
    let dir = test_dir();
    let ch = Arc::new(lib(&dir, ProcType::Primary));
    let _good = listener(&dir, &["--action", "slow", "--action", "slower"]);
    let mut silent = listener(
        &dir,
        &["--action", "slow", "--action", "slower", "--no-reply"],
    );
    let silent_socket = ch
        .peers()
        .unwrap()
        .into_iter()
        .find(|p| p.name().contains(&format!("_{}_", silent.pid())))
        .expect("silent secondary's socket");
    let (rx, srx, waiter) = request_both(&ch, "slow", "slower");
    // Both requests reached it before it dies.
    expect_requests(&mut silent, "slow", "slower");
    silent.kill();
    // The good secondary's answers are kept; the dead one is not waited for.
    assert_eq!(rx.recv_timeout(LONG).unwrap(), (1, 1, false));
    assert_eq!(srx.recv_timeout(LONG).unwrap().unwrap(), (1, 1, false));
    waiter.join().unwrap();
    assert_eq!(ch.pending_requests(), 0);
    // Next request: the dead socket is found, removed and not counted.
    let r = ch
        .request(&message("slow", b"", Fds::none()).unwrap(), LONG)
        .unwrap();
    assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (1, 1, false));
    assert!(!silent_socket.path().exists());
}

#[test]
fn primary_killed_mid_request() {
    // The primary dies while a secondary's requests wait for it. The secondary watches the
    // primary's process (a pidfd; its pid from the lock it holds on the runtime directory): the
    // requests end at once, not at their minute-long deadline, as if the primary had never
    // been reached. The sync one waits on a socket connected to the primary, which nothing
    // else may send to: it is woken by shutting its receiving side down, and given up.
    let dir = test_dir();
    let mut prim = listen(
        &dir,
        "primary",
        "ready role=Primary",
        &["--action", "slow", "--action", "slower", "--no-reply"],
    );
    let ch = Arc::new(lib(&dir, ProcType::Secondary));
    let (rx, srx, waiter) = request_both(&ch, "slow", "slower");
    expect_requests(&mut prim, "slow", "slower");
    prim.kill();
    // Nobody was reached in the end: the async callback says so, the sync request says
    // whom it missed.
    assert_eq!(rx.recv_timeout(LONG).unwrap(), (0, 0, false));
    let r = srx.recv_timeout(LONG).unwrap();
    assert!(
        matches!(r, Err(memplane::unix::Error::PrimaryGone)),
        "{r:?}"
    );
    waiter.join().unwrap();
    assert_eq!(ch.pending_requests(), 0);
    // One-way messages find it gone too, at once: the first from the socket connected to the
    // dead primary (refused), the next by path (the kernel dropped the connection).
    for _ in 0..2 {
        let r = ch.send(&message("slow", b"", Fds::none()).unwrap());
        assert!(
            matches!(r, Err(memplane::unix::Error::PrimaryGone)),
            "{r:?}"
        );
    }
}

/// Leaves a socket file at `path` that nobody is bound to any more.
fn stale_socket(path: &Path) {
    let s = Socket::bind(path).unwrap();
    drop(s); // the file stays
    // A child that another test forked (or spawned) while `s` was open holds a copy of it until
    // it execs or exits, and the socket lives on meanwhile. Wait until nobody holds it: a
    // connect to the path is refused.
    let probe = std::os::unix::net::UnixDatagram::unbound().unwrap();
    let start = Instant::now();
    while probe.connect(path).is_ok() {
        assert!(
            start.elapsed() < LONG,
            "{} is still bound somewhere",
            path.display()
        );
        std::thread::yield_now();
    }
    assert!(path.exists());
}

#[test]
fn stale_sockets_are_cleaned() {
    let dir = test_dir();
    std::fs::create_dir_all(dir.path()).unwrap();
    let old = dir.path().join("mp_socket_4242_dead");
    stale_socket(&old);
    let old_one_way = dir.path().join("mp_tx_4242_dead");
    stale_socket(&old_one_way);
    let ch = lib(&dir, ProcType::Primary);
    assert!(!old.exists(), "stale socket removed at primary start");
    assert!(
        !old_one_way.exists(),
        "stale one-way socket removed at primary start"
    );
    let later = dir.path().join("mp_socket_4243_dead");
    stale_socket(&later);
    let r = ch
        .request(&message("x", b"", Fds::none()).unwrap(), LONG)
        .unwrap();
    assert_eq!((r.nb_sent, r.nb_received), (0, 0));
    assert!(!later.exists(), "stale socket removed when found dead");
}

/// A secondary's one-way messages (and its requests to a memplane primary) leave from its
/// `mp_tx_<pid>_<stamp>` socket, connected to the primary (the kernel skips the path lookup),
/// yet the primary's handler sees the secondary's own socket as the sender, and what it sends
/// or answers there arrives. The one-way socket
/// comes and goes with the channel; its receiving side is shut, so a peer that sends to it
/// anyway (a DPDK handler answering a one-way message) is refused at once, never left blocked
/// on a queue nobody reads.
#[test]
fn one_way_messages_come_from_the_secondarys_own_socket() {
    let dir = test_dir();
    let p = lib(&dir, ProcType::Primary);
    let (tx, rx) = mpsc::channel::<std::path::PathBuf>();
    let tx = Mutex::new(tx);
    p.register("note", move |ch: &MpChannel, m: Incoming| {
        let back = message("back", m.msg.param(), Fds::none()).unwrap();
        ch.send_to(&m.from, &back).unwrap();
        let _ = tx.lock().unwrap().send(m.from.path().to_owned());
    })
    .unwrap();
    let s = lib(&dir, ProcType::Secondary);
    let (btx, brx) = mpsc::channel::<Vec<u8>>();
    let btx = Mutex::new(btx);
    s.register("back", move |_: &MpChannel, m: Incoming| {
        let _ = btx.lock().unwrap().send(m.msg.param().to_vec());
    })
    .unwrap();
    let main = s.socket_path().to_owned();
    let name = main.file_name().unwrap().to_str().unwrap();
    let one_way = main.with_file_name(name.replace("mp_socket_", "mp_tx_"));
    assert!(
        one_way.exists(),
        "{} made with the channel",
        one_way.display()
    );

    for i in 0..3u8 {
        let r = s
            .send(&message("note", &[i], Fds::none()).unwrap())
            .unwrap();
        assert_eq!(r.sent, 1);
        assert_eq!(
            rx.recv_timeout(LONG).unwrap(),
            main,
            "the sender is the secondary"
        );
        assert_eq!(
            brx.recv_timeout(LONG).unwrap(),
            vec![i],
            "the answer reached it"
        );
    }
    // Requests to a memplane primary leave from there too; the answer comes back.
    p.register("ask", move |ch: &MpChannel, m: Incoming| {
        let r = message(
            "ask",
            m.from.path().as_os_str().as_encoded_bytes(),
            Fds::none(),
        );
        ch.reply(&m.from, &r.unwrap()).unwrap();
    })
    .unwrap();
    let (atx, arx) = mpsc::channel();
    s.request_async(
        &message("ask", b"", Fds::none()).unwrap(),
        LONG,
        move |_, r: Replies| {
            let from = r.msgs.first().map(|m| m.msg.param().to_vec());
            atx.send((r.nb_sent, r.nb_received, from)).unwrap();
        },
    )
    .unwrap();
    let main_bytes = main.as_os_str().as_encoded_bytes().to_vec();
    assert_eq!(arx.recv_timeout(LONG).unwrap(), (1, 1, Some(main_bytes)));

    // Anyone else sending to the one-way socket itself is refused at once (the primary, its
    // peer, with EPIPE: the socket unit tests check that).
    let stranger = Socket::bind(&dir.path().join("stranger")).unwrap();
    assert_eq!(
        stranger.send_to(&one_way, b"x", &[]),
        Err(rustix::io::Errno::PERM)
    );
    stranger.unlink();
    s.close();
    assert!(!one_way.exists(), "removed with the channel");
    assert_eq!(p.stats().endpoint.rx_rejected(), 0);
}

#[test]
fn second_primary_refused_and_auto_becomes_secondary() {
    let dir = test_dir();
    let _ch = lib(&dir, ProcType::Primary);
    let (code, _, err) = run_in(&dir, &["primary"]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("another primary (pid {})", std::process::id())),
        "{err}"
    );
    let (code, out, err) = run_in(&dir, &["mp", "peers"]);
    assert_eq!(code, 0, "{err}");
    assert!(out[0].starts_with("role=Secondary"), "{out:?}");
}

/// A relative `--runtime-dir`, given from different working directories, names one
/// deployment: the primary (started in the directory's parent, `--runtime-dir NAME`) answers
/// a secondary started inside it (`--runtime-dir .`) and one started in the test's own
/// working directory (the absolute path). Before the directory was made absolute, the
/// primary's answer came from a path the requester did not send to, and the request timed out.
#[test]
fn relative_runtime_dirs_name_one_deployment() {
    let dir = test_dir();
    let parent = dir.path().parent().expect("a parent").to_owned();
    let name = dir.path().file_name().expect("a name").to_string_lossy();
    let mut p = common::primary_at(Some(&parent), &["--runtime-dir", &name]);
    let ask = |cwd: Option<&Path>, d: &str| {
        let (code, out, err) = common::run_at(
            cwd,
            &[
                "mp",
                "request",
                "memplane_ping",
                "--timeout",
                "5000",
                "--proc-type",
                "secondary",
                "--runtime-dir",
                d,
            ],
        );
        assert_eq!(code, 0, "{err}");
        assert!(
            out.iter()
                .any(|l| l.starts_with("done name=memplane_ping nb_sent=1 nb_received=1 ")),
            "{out:?} {err}"
        );
    };
    ask(Some(dir.path()), ".");
    ask(None, &dir.arg());
    p.terminate_ok(LONG);
}

/// A primary and a secondary whose runtime directory was removed under them (a clean-up
/// script, a tmpfiles run) still stop at SIGTERM: their receiving threads were woken by a
/// datagram to their own socket's path, which no longer existed, and they never stopped.
#[test]
fn processes_stop_after_their_runtime_dir_is_removed() {
    let dir = test_dir();
    let mut p = primary(&dir);
    let mut l = listener(&dir, &["--action", "x"]);
    std::fs::remove_dir_all(dir.path()).expect("remove the runtime dir");
    l.terminate_ok(LONG);
    p.terminate_ok(LONG);
}

/// Arguments that could never work are refused at start: counts that leave nothing to
/// measure (`mp ping --count 0` panicked on its empty sample list), a reply too long to send.
#[test]
fn impossible_arguments_are_refused() {
    let dir = test_dir();
    for args in [
        &["mp", "ping", "--count", "0"][..],
        &["mp", "bench", "rtt", "--count", "0"],
        &["mp", "bench", "oneway", "--count", "0"],
        &["mp", "bench", "broadcast", "--peers", "1", "--count", "0"],
    ] {
        let (code, _, err) = run_in(&dir, args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("invalid value '0' for '--count"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // A reply too long for any message is refused before the listener starts (it was
    // reported at every request).
    let long = "ab".repeat(300);
    let (code, out, err) = run_in(&dir, &["mp", "listen", "--action", "x", "--reply", &long]);
    assert_eq!(code, 1, "{out:?} {err}");
    assert!(
        err.contains("--reply: parameter is 300 bytes long, the limit is 256"),
        "{err}"
    );
}

#[test]
fn secondary_without_primary_fails_at_once() {
    let dir = test_dir();
    let request_fails_at_once = || {
        let t0 = Instant::now();
        let (code, _, err) = run_in(
            &dir,
            &[
                "mp",
                "request",
                "x",
                "--timeout",
                "60000",
                "--proc-type",
                "secondary",
            ],
        );
        assert_eq!(code, 1);
        assert!(err.contains("no primary process is running"), "{err}");
        // It did not wait for the 60 s timeout.
        assert!(t0.elapsed() < Duration::from_secs(30));
    };
    request_fails_at_once();
    // Nor does a primary that died: its lock is gone with it.
    let mut p = primary(&dir);
    p.kill();
    request_fails_at_once();
}

/// Sends raw bytes with `n` memfds from a socket of our own in `dir` to the primary.
fn raw(sock: &Socket, dir: &TestDir, bytes: &[u8], n: usize) -> Result<(), rustix::io::Errno> {
    let fds: Vec<OwnedFd> = (0..n).map(|_| memfd("x")).collect();
    let b: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    sock.send_to(&dir.path().join("mp_socket"), bytes, &b)
}

/// Sends `bytes` with `fds` split into two `SCM_RIGHTS` control messages, by hand; returns the
/// errno (0 on success).
fn send_in_two_blocks(sock: &Socket, to: &Path, bytes: &[u8], fds: &[OwnedFd]) -> i32 {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let (a, b) = raw.split_at(raw.len() / 2);
    let path = to.as_os_str().as_encoded_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is valid, then the path (shorter than sun_path,
    // checked) is copied in.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    assert!(path.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let space = |n: usize| {
        // SAFETY: CMSG_SPACE only computes a size.
        unsafe { libc::CMSG_SPACE((n * 4) as u32) as usize }
    };
    let mut control = vec![0u8; space(a.len()) + space(b.len())];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is valid before its fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_un).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    // SAFETY: the control buffer holds exactly two cmsg headers with room for `a` and `b`
    // (sized with CMSG_SPACE above); CMSG_FIRSTHDR/NXTHDR stay inside it, and each header's
    // data area is written with exactly CMSG_LEN's worth of fds. `msg` points at live buffers.
    unsafe {
        let c1 = libc::CMSG_FIRSTHDR(&msg);
        (*c1).cmsg_level = libc::SOL_SOCKET;
        (*c1).cmsg_type = libc::SCM_RIGHTS;
        (*c1).cmsg_len = libc::CMSG_LEN((a.len() * 4) as u32) as usize;
        std::ptr::copy_nonoverlapping(a.as_ptr(), libc::CMSG_DATA(c1).cast(), a.len());
        let c2 = libc::CMSG_NXTHDR(&msg, c1);
        (*c2).cmsg_level = libc::SOL_SOCKET;
        (*c2).cmsg_type = libc::SCM_RIGHTS;
        (*c2).cmsg_len = libc::CMSG_LEN((b.len() * 4) as u32) as usize;
        std::ptr::copy_nonoverlapping(b.as_ptr(), libc::CMSG_DATA(c2).cast(), b.len());
        if libc::sendmsg(sock.as_fd().as_raw_fd(), &msg, 0) < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }
}

fn good_datagram(abi: Abi) -> Vec<u8> {
    let m = memplane::core::Message::new("memplane_ping", b"").unwrap();
    memplane::core::wire::Datagram::encode(abi, memplane::core::MsgKind::Request, &m)
        .unwrap()
        .as_bytes()
        .to_vec()
}

#[test]
fn malformed_datagrams_rejected_without_leaks() {
    let dir = test_dir();
    let mut p = primary(&dir);
    let ping = || run_in(&dir, &["mp", "ping", "--count", "5", "--warmup", "0"]);
    let (code, _, err) = ping();
    assert_eq!(code, 0, "{err}");
    let fds_before = p.fd_count();

    let sock = Socket::bind(
        &dir.path()
            .join(format!("mp_socket_{}_raw", std::process::id())),
    )
    .unwrap();
    let good = good_datagram(Abi::V25_11);
    let mut bad_kind = good.clone();
    bad_kind[0] = 9;
    let mut bad_name = good.clone();
    bad_name[9] = 0x07;
    let mut unterminated = good.clone();
    unterminated[8..72].fill(b'a');
    let mut rejected = 0;
    for (bytes, fds) in [
        (vec![0u8; 10], 0),
        (vec![], 0),
        (bad_kind, 0),
        (bad_name, 2),
        (unterminated, 0),
        (good.clone(), 3), // header says 0 fds, 3 arrive
        (vec![1u8; 5], 4), // fds with a short message
        (good[..332].to_vec(), 0),
        (good.clone(), 253), // the most the kernel passes, none announced
    ] {
        raw(&sock, &dir, &bytes, fds).unwrap();
        rejected += 1;
    }
    // 300 fds in one message (two SCM_RIGHTS blocks of 150): the kernel refuses to carry more
    // than 253, so nothing reaches the primary; our own sender refuses before the kernel.
    assert_eq!(
        raw(&sock, &dir, &good, 300),
        Err(rustix::io::Errno::TOOMANYREFS)
    );
    let fds: Vec<OwnedFd> = (0..300).map(|_| memfd("x")).collect();
    let e = send_in_two_blocks(&sock, &dir.path().join("mp_socket"), &good, &fds);
    assert_eq!(e, libc::EINVAL, "the kernel carries at most 253 fds");

    // Still answering.
    let (code, out, err) = ping();
    assert_eq!(code, 0, "{err} {out:?}");
    // The pings go through the secondary's lane, which may overtake the receiving thread
    // still closing the bad datagrams' fds (datagrams of other senders keep no order with
    // them): the count must come back, a leak never does.
    let settled = memplane_testkit::settles_at(fds_before as u64, || p.fd_count() as u64);
    assert_eq!(settled, fds_before as u64, "the primary leaked fds");
    // Its pidfds follow the secondaries: the `mp ping` ones are gone, so only the process
    // holding the raw socket (this one) stays watched, once the primary has seen them go.
    let start = Instant::now();
    while p.pidfd_count() != 1 {
        assert!(start.elapsed() < LONG, "pidfds: {}", p.pidfd_count());
        std::thread::yield_now();
    }
    drop(sock);
    p.terminate_ok(LONG);
    let last = p.last_line();
    assert!(last.contains(&format!("rejected={rejected}")), "{last}");
}

#[test]
fn sender_with_another_uid_rejected() {
    if !rustix::process::geteuid().is_root() {
        memplane_testkit::skip("sender_with_another_uid_rejected needs root to setuid(65534)");
        return;
    }
    let dir = test_dir();
    let mut p = primary(&dir);
    // Connect as root (the directory is 0700), then drop to uid 65534 and send a valid request.
    let s = rustix::net::socket(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::DGRAM,
        None,
    )
    .unwrap();
    let addr = rustix::net::SocketAddrUnix::new(dir.path().join("mp_socket")).unwrap();
    rustix::net::connect(&s, &addr).unwrap();
    let dgram = good_datagram(Abi::V25_11);
    let fd = s.as_raw_fd();
    // SAFETY: fork in a test process; the child only makes async-signal-safe system calls
    // (setuid, send, _exit) on memory that was prepared before the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: in the forked child: plain system calls on a valid fd and buffer, then _exit.
        unsafe {
            if libc::setuid(65534) != 0 {
                libc::_exit(2);
            }
            let n = libc::send(fd, dgram.as_ptr().cast(), dgram.len(), 0);
            libc::_exit(if n == dgram.len() as isize { 0 } else { 3 });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for the child we just forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status}"
    );
    // The primary's one receiving thread takes its queue in order: once a later ping is
    // answered, the rejected datagram has been counted (no race with the stats at exit). The
    // ping goes by socket, behind it: through a lane it would keep no order with another
    // sender's datagram.
    let (code, _, err) = run_in(
        &dir,
        &["mp", "ping", "--count", "1", "--warmup", "0", "--no-lanes"],
    );
    assert_eq!(code, 0, "{err}");
    p.terminate_ok(LONG);
    let last = p.last_line();
    assert!(last.contains("rx_ok=1 rejected=1"), "{last}");
}

#[test]
fn thousand_async_requests_in_flight() {
    // The primary holds every reply until the "go" message, so all 1,000 requests are in
    // flight at once (no race with fast answers); then it answers them in one burst, far past
    // the secondary's queue of 10, from its receiving thread.
    let dir = test_dir();
    let names: Vec<String> = (0..1000).map(|i| format!("f{i}")).collect();
    let mut prim = primary_listener_with(&dir, &names, &["--hold-replies-until", "go"]);
    let ch = lib(&dir, ProcType::Secondary);
    let (tx, rx) = mpsc::channel();
    for n in &names {
        let tx = tx.clone();
        ch.request_async(
            &message(n, n.as_bytes(), Fds::none()).unwrap(),
            Duration::from_secs(60),
            move |_, r: Replies| {
                let ok =
                    r.nb_received == 1 && r.msgs[0].msg.param() == r.msgs[0].msg.name().as_bytes();
                tx.send(ok).unwrap();
            },
        )
        .unwrap();
    }
    // The primary has read them all (it prints each in order) and answered none.
    prim.expect_line("name=f999 ", LONG);
    assert_eq!(ch.pending_requests(), names.len());
    ch.send(&message("go", b"", Fds::none()).unwrap()).unwrap();
    prim.expect_line("releasing replies=1000", LONG);
    for _ in 0..names.len() {
        assert!(rx.recv_timeout(Duration::from_secs(60)).unwrap());
    }
    assert_eq!(ch.pending_requests(), 0);
}

#[test]
fn many_threads_share_one_receiving_thread() {
    let dir = test_dir();
    let names: Vec<String> = (0..4).map(|t| format!("t{t}")).collect();
    let _prim = primary_listener(&dir, &names);
    let ch = Arc::new(lib(&dir, ProcType::Secondary));
    let ts: Vec<_> = (0..4)
        .map(|t| {
            let ch = ch.clone();
            std::thread::spawn(move || {
                for k in 0..200u32 {
                    let r = ch
                        .request(
                            &message(&format!("t{t}"), &k.to_le_bytes(), Fds::none()).unwrap(),
                            LONG,
                        )
                        .unwrap();
                    assert_eq!((r.nb_sent, r.nb_received), (1, 1));
                    assert_eq!(r.msgs[0].msg.param(), k.to_le_bytes());
                }
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
}

#[test]
fn every_abi_on_the_wire_and_mismatch_rejected() {
    for abi in ["22.11", "24.11", "25.11"] {
        let dir = test_dir();
        let _p = primary_with(&dir, &["--abi", abi]);
        let (code, out, err) = run_in(
            &dir,
            &[
                "mp",
                "request",
                "memplane_ping",
                "--param",
                "0102",
                "--memfd",
                "a",
                "--abi",
                abi,
                "--show-fds",
            ],
        );
        assert_eq!(code, 0, "{err}");
        assert!(
            out.iter().any(|l| l.contains("param=0102 fds=1 fd0=\"a\"")),
            "{abi}: {out:?}"
        );
    }
    // 25.11 datagrams (340 bytes) to a 22.11 primary (332): rejected, counted, no answer.
    let dir = test_dir();
    let mut p = primary_with(&dir, &["--abi", "22.11"]);
    let (code, out, _) = run_in(
        &dir,
        &[
            "mp",
            "request",
            "memplane_ping",
            "--timeout",
            "300",
            "--abi",
            "25.11",
        ],
    );
    assert_eq!(code, 0);
    assert!(
        out.iter()
            .any(|l| l.contains("nb_sent=1 nb_received=0 timed_out=true")),
        "{out:?}"
    );
    p.terminate(LONG);
    assert!(p.last_line().contains("rejected=1"), "{}", p.report());
}

/// A primary whose datagrams wait a minute for a busy peer in the outbox (then they are
/// dropped): longer than any of these tests. Its sync requests go by datagram too (no lanes),
/// since these tests are about the outbox.
fn patient_primary(dir: &TestDir) -> Channel {
    let mut cfg = ChannelConfig::new()
        .runtime_dir(dir.path())
        .proc_type(ProcType::Primary)
        .lanes(false);
    cfg.send_timeout = Duration::from_secs(60);
    Channel::open(cfg).unwrap()
}

#[test]
fn stopped_peer_never_blocks_the_sender() {
    // A secondary that stops reading (SIGSTOP): its queue fills after 10 datagrams. The primary
    // keeps sending and requesting; nothing blocks, the stopped peer costs only its timeout, the
    // others answer, and when it resumes the queued datagrams reach it.
    let dir = test_dir();
    let ch = patient_primary(&dir);
    let _good = listener(&dir, &["--action", "q"]);
    let mut stopped = listener(&dir, &["--action", "q"]);
    memplane_testkit::stop(stopped.pid());
    let t0 = Instant::now();
    for i in 0..50u32 {
        let r = ch
            .send(&message("q", &i.to_le_bytes(), Fds::none()).unwrap())
            .unwrap();
        assert_eq!(r.sent, 2);
    }
    let r = ch
        .request(
            &message("q", b"req", Fds::none()).unwrap(),
            Duration::from_secs(2),
        )
        .unwrap();
    assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (2, 1, true));
    // Never blocked on the full queue: 50 sends and a request in about the request's timeout
    // (a send blocked on the stopped peer would wait without end).
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    assert!(ch.stats().outbox.queued > 0);
    stopped.signal(libc::SIGCONT);
    // The queued messages are delivered once it reads again (message 49 is the last one sent).
    stopped.expect_line(&format!("param={}", hex::encode(49u32.to_le_bytes())), LONG);
}

#[test]
fn a_peer_that_dies_with_requests_in_the_outbox_is_not_waited_for() {
    // A secondary stops reading (SIGSTOP) and its queue fills, so a broadcast's datagram to it
    // waits in the outbox; then it dies. The primary learns it from the secondary's pidfd or
    // from the outbox's next send being refused, whichever comes first: the pending requests
    // stop waiting for it at once, async and sync alike, instead of at their (minute-long)
    // deadline, and report it as not sent rather than timed out.
    let dir = test_dir();
    let ch = Arc::new(patient_primary(&dir));
    let mut good = listener(&dir, &["--action", "q", "--action", "r"]);
    let mut dying = listener(&dir, &["--action", "q", "--action", "r"]);
    memplane_testkit::stop(dying.pid());
    // More than its queue holds (10 here): the rest, and the requests below, wait in the outbox.
    for i in 0..20u32 {
        let r = ch
            .send(&message("q", &i.to_le_bytes(), Fds::none()).unwrap())
            .unwrap();
        assert_eq!(r.sent, 2);
    }
    // Once the live secondary has them all, what waits in the outbox is the stopped one's.
    good.expect_line(&format!("param={}", hex::encode(19u32.to_le_bytes())), LONG);
    let queued = ch.stats().outbox.waiting;
    assert!(queued > 0, "the stopped secondary's queue never filled");
    let (arx, srx, waiter) = request_both(&ch, "q", "r");
    // Both requests' datagrams to the stopped secondary wait behind the messages.
    let start = Instant::now();
    while ch.stats().outbox.waiting != queued + 2 {
        assert!(
            start.elapsed() < LONG,
            "the outbox never held both requests"
        );
        std::thread::yield_now();
    }
    dying.kill();
    assert_eq!(arx.recv_timeout(LONG).unwrap(), (1, 1, false));
    assert_eq!(srx.recv_timeout(LONG).unwrap().unwrap(), (1, 1, false));
    waiter.join().unwrap();
    assert_eq!(ch.pending_requests(), 0);
}

/// `err` says the send timed out: the peer is there but did not take the datagram in time.
fn assert_timed_out(err: &memplane::unix::Error) {
    assert!(
        matches!(
            err,
            memplane::unix::Error::Endpoint(memplane::core::endpoint::EndpointError::Transport(
                memplane::core::transport::SendError::Timeout
            ))
        ),
        "{err:?}"
    );
}

#[test]
fn one_peer_send_waits_for_room_then_times_out() {
    // A secondary's one-way messages go to one peer, the primary: a full queue makes the
    // sending thread wait for room (as a blocking socket would) instead of queueing, up to the
    // send timeout, and it says so with a typed error; once the primary reads again, sends go
    // through and everything that was accepted arrives in order.
    let dir = test_dir();
    let mut stopped = primary_listener(&dir, &["q".to_owned()]);
    let mut cfg = ChannelConfig::new()
        .runtime_dir(dir.path())
        .proc_type(ProcType::Secondary);
    cfg.send_timeout = Duration::from_millis(200);
    let ch = Channel::open(cfg).unwrap();
    let primary = ch.peers().unwrap().remove(0);
    stopped.signal(libc::SIGSTOP);
    let mut accepted = 0u32;
    let err = loop {
        match ch.send_to(
            &primary,
            &message("q", &accepted.to_le_bytes(), Fds::none()).unwrap(),
        ) {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(
            accepted < 10_000,
            "sends to a stopped peer never ran out of room"
        );
    };
    assert_timed_out(&err);
    // The broadcast form, whose one peer is the primary, says the same: the primary is
    // there, it did not take the message in time (not "gone").
    let err = ch
        .send(&message("q", b"late", Fds::none()).unwrap())
        .unwrap_err();
    assert_timed_out(&err);
    // Nothing went to the outbox: the caller waited itself.
    assert_eq!(ch.stats().outbox.queued, 0);
    stopped.signal(libc::SIGCONT);
    ch.send_to(
        &primary,
        &message("q", &accepted.to_le_bytes(), Fds::none()).unwrap(),
    )
    .unwrap();
    for i in 0..=accepted {
        stopped.expect_line(&format!("param={}", hex::encode(i.to_le_bytes())), LONG);
    }
}

/// The scheduling policy (`SCHED_*`) of each thread of process `pid`, by thread name.
fn thread_policies(pid: u32) -> Vec<(String, i32)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let tid: i32 = t.file_name().to_str().unwrap().parse().unwrap();
        // SAFETY: sched_getscheduler only reads the policy of thread `tid`.
        v.push((comm.trim_end().to_owned(), unsafe {
            libc::sched_getscheduler(tid)
        }));
    }
    v.sort();
    v
}

#[test]
fn batch_scheduling_applies_to_the_channel_threads_only() {
    let dir = test_dir();
    let _primary = primary(&dir);
    let plain = listener(&dir, &["--action", "q"]);
    let batch = listener(&dir, &["--action", "q", "--batch-sched"]);
    // Both are ready, so their threads run and are named.
    let policy = |p: &Proc, name: &str| {
        thread_policies(p.pid())
            .into_iter()
            .filter(|(n, _)| n == name)
            .map(|(_, pol)| pol)
            .collect::<Vec<_>>()
    };
    for name in ["mp-recv", "mp-service"] {
        assert_eq!(policy(&batch, name), vec![libc::SCHED_BATCH], "{name}");
        assert_eq!(policy(&plain, name), vec![libc::SCHED_OTHER], "{name}");
    }
    // Every other thread (main, signals; named or not yet) keeps the default policy.
    for (name, pol) in thread_policies(batch.pid()) {
        if !name.starts_with("mp-") {
            assert_eq!(pol, libc::SCHED_OTHER, "{name}");
        }
    }
}

#[test]
fn sync_request_from_a_handler_is_refused_not_a_hang() {
    let dir = test_dir();
    let ch = lib(&dir, ProcType::Primary);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    ch.register("nested", move |ch: &MpChannel, m: Incoming| {
        let inner = ch.request(&message("other", b"", Fds::none()).unwrap(), LONG);
        let _ = tx.lock().unwrap().send(format!("{:?}", inner.err()));
        let _ = ch.reply(&m.from, &message("nested", b"", Fds::none()).unwrap());
    })
    .unwrap();
    let (code, out, err) = run_in(
        &dir,
        &["mp", "request", "nested", "--proc-type", "secondary"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.iter().any(|l| l.contains("nb_received=1")), "{out:?}");
    assert_eq!(rx.recv_timeout(LONG).unwrap(), "Some(WouldDeadlock)");
}

mod hex {
    pub fn encode(b: impl AsRef<[u8]>) -> String {
        b.as_ref().iter().map(|x| format!("{x:02x}")).collect()
    }
}

/// Sends `n` requests `echo` (param: their index) from raw socket `s` to the primary, retrying
/// while the primary's queue is full.
fn raw_requests(s: &Socket, dir: &TestDir, abi: Abi, range: std::ops::Range<u32>) {
    for i in range {
        let m = memplane::core::Message::new("echo", &i.to_le_bytes()).unwrap();
        let d = memplane::core::wire::Datagram::encode(abi, memplane::core::MsgKind::Request, &m)
            .unwrap();
        let t0 = Instant::now();
        while let Err(e) = s.send_to(&dir.path().join("mp_socket"), d.as_bytes(), &[]) {
            assert_eq!(e, rustix::io::Errno::AGAIN, "request {i}");
            assert!(t0.elapsed() < LONG, "the primary stopped reading");
            std::thread::yield_now();
        }
    }
}

/// The params (as u32) of the answers waiting on `s`, in arrival order, waiting up to `LONG`
/// for `n` of them.
fn raw_answers(s: &Socket, abi: Abi, n: usize) -> Vec<u32> {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    s.set_recv_timeout(LONG).unwrap();
    while got.len() < n {
        let Ok(Some(r)) = s.recv(&mut buf, true) else {
            break;
        };
        let h = memplane::core::wire::Header::parse(abi, &buf[..r.len]).unwrap();
        got.push(u32::from_le_bytes(h.param.as_slice().try_into().unwrap()));
    }
    got
}

#[test]
fn answers_to_a_peer_that_reads_late_wait_in_order_and_others_are_served_meanwhile() {
    // A peer sends requests and reads nothing: its queue holds `net.unix.max_dgram_qlen` + 1
    // answers, the primary's receiving thread queues the 29 others in the outbox and delivers
    // them itself as the peer reads, in order. Meanwhile another peer gets its answers at once;
    // answers that wait past the send timeout are dropped and counted, and the receiving
    // thread goes on serving.
    let qlen: u32 = std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(10);
    let n = qlen + 1 + 29;
    for late in [false, true] {
        let dir = test_dir();
        let mut cfg = ChannelConfig::new()
            .runtime_dir(dir.path())
            .proc_type(ProcType::Primary);
        cfg.send_timeout = if late {
            Duration::from_millis(200)
        } else {
            LONG
        };
        let ch = Channel::open(cfg).unwrap();
        ch.register("echo", |ch: &MpChannel, inc: Incoming| {
            let m = message("echo", inc.msg.param(), Fds::none()).unwrap();
            let _ = ch.reply(&inc.from, &m);
        })
        .unwrap();
        let abi = ch.abi();
        let slow = Socket::bind(&dir.path().join("slow_peer")).unwrap();
        let quick = Socket::bind(&dir.path().join("quick_peer")).unwrap();
        raw_requests(&slow, &dir, abi, 0..n);
        // The primary read all n (the last send got through), so the answers past the slow
        // peer's queue wait in the outbox by now or soon; the quick peer is answered meanwhile.
        raw_requests(&quick, &dir, abi, 100..105);
        assert_eq!(raw_answers(&quick, abi, 5), (100..105).collect::<Vec<_>>());
        let t0 = Instant::now();
        while ch.stats().outbox.queued < 29 {
            assert!(t0.elapsed() < LONG, "{:?}", ch.stats().outbox);
            std::thread::yield_now();
        }
        if late {
            // Past the send timeout, the waiting answers are dropped by the receiving thread's
            // own watch (nothing else arrives to wake it).
            while ch.stats().outbox.dropped < 29 {
                assert!(t0.elapsed() < LONG, "{:?}", ch.stats().outbox);
                std::thread::yield_now();
            }
            let got = raw_answers(&slow, abi, (qlen + 1) as usize);
            assert_eq!(got, (0..got.len() as u32).collect::<Vec<_>>());
            // And it still serves.
            raw_requests(&quick, &dir, abi, 200..201);
            assert_eq!(raw_answers(&quick, abi, 1), [200]);
        } else {
            assert_eq!(
                raw_answers(&slow, abi, n as usize),
                (0..n).collect::<Vec<_>>()
            );
            let s = ch.stats().outbox;
            assert_eq!(
                (s.delivered, s.dropped, s.waiting),
                (s.queued, 0, 0),
                "{s:?}"
            );
        }
    }
}
