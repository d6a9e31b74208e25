//! Shared-memory lanes (`memplane_unix::lane`): a memplane primary's sync requests to memplane
//! secondaries go through the board in the runtime directory instead of a datagram each way.
//! Real processes (`memplane mp listen` secondaries), each test in its own runtime directory.
//! What is checked: the lane is used where both ends are memplane processes with lanes on, the
//! rest go by socket in the same request; replies carrying fds still arrive; an unanswered
//! lane request times out and frees its slot; a dead secondary's lane is not waited for and
//! goes to the next secondary; a board scribbled over by a peer costs the lanes, never the
//! answers; a message sent before a request is handled before it; handlers never run at once.

mod common;

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use common::{LONG, Proc, TestDir, test_dir};
use memplane::unix::lane::BOARD_FILE;
use memplane::unix::{Channel, ChannelConfig, Fds, MpChannel, ProcType, message};

/// A channel of this process in `dir`, as `role`.
fn lib(dir: &TestDir, role: ProcType) -> Channel {
    Channel::open(ChannelConfig::new().runtime_dir(dir.path()).proc_type(role))
        .expect("open channel")
}

fn primary(dir: &TestDir) -> Channel {
    lib(dir, ProcType::Primary)
}

/// `memplane mp listen` in `dir` as `role` (`primary` or `secondary`) with `extra` options,
/// ready.
fn listen(dir: &TestDir, role: &str, extra: &[&str]) -> Proc {
    let d = dir.arg();
    let mut args = vec!["mp", "listen", "--runtime-dir", &d, "--proc-type", role];
    args.extend_from_slice(extra);
    let mut p = Proc::memplane(&args);
    p.expect_line("ready role=", LONG);
    p
}

/// A secondary `memplane mp listen` in `dir` with `extra` options, ready.
fn listener(dir: &TestDir, extra: &[&str]) -> Proc {
    listen(dir, "secondary", extra)
}

fn read_fd(fd: impl AsFd) -> String {
    memplane::cli::mp::peek_fd(fd)
}

fn memfd(text: &str) -> OwnedFd {
    memplane::cli::mp::memfd_with(text).unwrap()
}

/// (requests posted to lanes, answers taken from them) so far.
fn lane_counts(ch: &MpChannel) -> (u64, u64) {
    let s = ch.stats().lanes;
    (s.requests, s.replies)
}

#[test]
fn broadcast_uses_the_lanes_of_memplane_secondaries_and_sockets_for_the_rest() {
    let dir = test_dir();
    let ch = primary(&dir);
    let mut lanes: Vec<Proc> = (0..3).map(|_| listener(&dir, &["--action", "q"])).collect();
    let mut socket_only = listener(&dir, &["--action", "q", "--no-lanes"]);
    for round in 0..20u32 {
        let r = ch
            .request(
                &message("q", &round.to_le_bytes(), Fds::none()).unwrap(),
                LONG,
            )
            .unwrap();
        assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (4, 4, false));
        assert!(r.msgs.iter().all(|m| m.msg.param() == round.to_le_bytes()));
        // Three through their lanes, the fourth through its socket, every round.
        assert_eq!(
            lane_counts(&ch),
            (3 * u64::from(round + 1), 3 * u64::from(round + 1))
        );
    }
    // Every secondary's handler saw the requests, from the primary.
    for p in lanes.iter_mut().chain([&mut socket_only]) {
        p.expect_line(&format!("name=q param={}", hex(&19u32.to_le_bytes())), LONG);
    }
    // A request with fds goes by socket to everyone.
    let r = ch
        .request(&message("q", b"f", Fds::from(memfd("x"))).unwrap(), LONG)
        .unwrap();
    assert_eq!((r.nb_sent, r.nb_received), (4, 4));
    assert_eq!(lane_counts(&ch), (60, 60));
    assert_eq!(ch.stats().endpoint.rx_rejected(), 0);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_reply_with_fds_to_a_lane_request_arrives_with_its_fds() {
    let dir = test_dir();
    let ch = primary(&dir);
    let _a = listener(&dir, &["--action", "q", "--reply-memfd", "from-a"]);
    let _b = listener(&dir, &["--action", "q"]);
    for _ in 0..5 {
        let r = ch
            .request(&message("q", b"p", Fds::none()).unwrap(), LONG)
            .unwrap();
        assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (2, 2, false));
        let with_fd: Vec<String> = r
            .msgs
            .iter()
            .flat_map(|m| m.msg.fds().0.iter().map(read_fd))
            .collect();
        assert_eq!(with_fd, ["from-a"]);
    }
    // Both requests went through the lanes; one answer came back by socket each time.
    assert_eq!(lane_counts(&ch), (10, 5));
}

#[test]
fn an_unanswered_lane_request_times_out_and_frees_its_slot() {
    let dir = test_dir();
    let ch = primary(&dir);
    let _silent = listener(&dir, &["--action", "q", "--no-reply"]);
    unanswered_rounds(&ch, "q");
    assert_eq!(ch.pending_requests(), 0);
}

/// Twenty requests of `action`, which is never answered, through `ch`'s lane: more rounds
/// than a lane has slots, so each one must find a free slot again.
fn unanswered_rounds(ch: &Channel, action: &str) {
    for round in 1..=20u64 {
        let r = ch
            .request(
                &message(action, b"", Fds::none()).unwrap(),
                Duration::from_millis(20),
            )
            .unwrap();
        assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (1, 0, true));
        assert_eq!(lane_counts(ch), (round, 0));
    }
}

#[test]
fn a_dead_secondarys_lane_is_not_waited_for_and_goes_to_the_next() {
    let dir = test_dir();
    let ch = primary(&dir);
    let _good = listener(&dir, &["--action", "q"]);
    let mut silent = listener(&dir, &["--action", "q", "--no-reply"]);
    let (tx, rx) = std::sync::mpsc::channel();
    let c = ch.shared();
    let waiter = std::thread::spawn(move || {
        let r = c.request(
            &message("q", b"", Fds::none()).unwrap(),
            Duration::from_secs(60),
        );
        tx.send(r.map(|r| (r.nb_sent, r.nb_received, r.timed_out)))
            .unwrap();
    });
    silent.expect_line("request from=", LONG);
    // Killed and not reaped yet: a zombie, whose pid still answers kill(pid, 0). Its exit is
    // what counts (the primary's pidfd of it fires at once).
    silent.signal(libc::SIGKILL);
    // The good secondary answered through its lane; the dead one is dropped from the request
    // (and not counted as reached) when its exit is seen, not at the minute's deadline.
    assert_eq!(rx.recv_timeout(LONG).unwrap().unwrap(), (1, 1, false));
    waiter.join().unwrap();
    // The dead secondary's socket is found dead at the next request and not counted.
    let r = ch
        .request(&message("q", b"", Fds::none()).unwrap(), LONG)
        .unwrap();
    assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (1, 1, false));
    // A new secondary gets a lane (the dead one's is free again) and is served through it.
    let _next = listener(&dir, &["--action", "q"]);
    let before = lane_counts(&ch);
    let r = ch
        .request(&message("q", b"", Fds::none()).unwrap(), LONG)
        .unwrap();
    assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (2, 2, false));
    assert_eq!(lane_counts(&ch), (before.0 + 2, before.1 + 2));
}

#[test]
fn a_scribbled_board_costs_the_lanes_not_the_answers() {
    let dir = test_dir();
    let ch = primary(&dir);
    let mut secs: Vec<Proc> = (0..2).map(|_| listener(&dir, &["--action", "q"])).collect();
    let r = ch
        .request(&message("q", b"", Fds::none()).unwrap(), LONG)
        .unwrap();
    assert_eq!((r.nb_sent, r.nb_received), (2, 2));
    assert_eq!(lane_counts(&ch), (2, 2));
    // A peer (same user) writes garbage over the whole board.
    let path = dir.path().join(BOARD_FILE);
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all(&vec![0xa5; len])
        .unwrap();
    // Every request is still answered (by socket), and every process lives on.
    for _ in 0..10 {
        let r = ch
            .request(&message("q", b"", Fds::none()).unwrap(), LONG)
            .unwrap();
        assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (2, 2, false));
    }
    assert_eq!(lane_counts(&ch).1, 2);
    for s in &mut secs {
        s.terminate_ok(LONG);
    }
}

#[test]
fn a_message_sent_before_a_request_is_handled_first() {
    // Over one socket, as in DPDK, a secondary handles what the primary sent in the order it
    // was sent. A lane request could overtake a message still queued in the secondary's
    // socket: the primary posts to a lane only while every message and request it sent that
    // secondary by socket has been handled there.
    let dir = test_dir();
    let ch = primary(&dir);
    let mut l = listener(&dir, &["--action", "m", "--action", "q"]);
    message_then_request(&ch, &mut l);
}

/// `ch` makes a request through its lane to the process `to` (whose `mp listen` answers `q`
/// and takes `m`); `to` stops reading; `ch` sends a message by socket (it carries an fd), then
/// a request: it must go by socket too, behind the message, and be handled after it. Once `to`
/// has handled both, requests take the lane again.
fn message_then_request(ch: &Channel, to: &mut Proc) {
    let r = ch
        .request(&message("q", b"\x00", Fds::none()).unwrap(), LONG)
        .unwrap();
    assert_eq!((r.nb_sent, r.nb_received), (1, 1));
    assert_eq!(lane_counts(ch), (1, 1));
    memplane_testkit::stop(to.pid());
    assert_eq!(
        ch.send(&message("m", b"\x01", Fds::from(memfd("x"))).unwrap())
            .unwrap()
            .sent,
        1
    );
    let r = ch
        .request(
            &message("q", b"\x02", Fds::none()).unwrap(),
            Duration::from_millis(50),
        )
        .unwrap();
    assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (1, 0, true));
    assert_eq!(lane_counts(ch), (1, 1), "the request went through the lane");
    to.signal(libc::SIGCONT);
    to.expect_line("name=q param=02", LONG);
    let out = to.output();
    let (m, q) = (out.find("name=m param=01"), out.find("name=q param=02"));
    assert!(m.is_some() && m < q, "{out}");
    let start = std::time::Instant::now();
    while lane_counts(ch).0 == 1 {
        assert!(start.elapsed() < LONG, "the lane was never used again");
        let r = ch
            .request(&message("q", b"\x03", Fds::none()).unwrap(), LONG)
            .unwrap();
        assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (1, 1, false));
    }
}

#[test]
fn handlers_of_lane_and_socket_requests_never_run_at_once() {
    let dir = test_dir();
    let ch = std::sync::Arc::new(primary(&dir));
    let l = listener(&dir, &["--action", "a", "--action", "b"]);
    requests_from_two_threads(ch, l);
}

/// Requests from `ch` to the process `to` (whose `mp listen` answers `a` and `b`) from two
/// threads: one by socket (it carries an fd), one through the lane when it may, over and
/// over. Handlers run under one lock, so `mp listen` never sees one start while another runs
/// (it prints `overlap` if it does).
fn requests_from_two_threads(ch: std::sync::Arc<Channel>, mut to: Proc) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (c, s) = (ch.clone(), stop.clone());
    let with_fd = std::thread::spawn(move || {
        while !s.load(std::sync::atomic::Ordering::Acquire) {
            let r = c
                .request(&message("a", b"", Fds::from(memfd("x"))).unwrap(), LONG)
                .unwrap();
            assert_eq!((r.nb_sent, r.nb_received), (1, 1));
        }
    });
    let start = std::time::Instant::now();
    let mut n = 0;
    while n < 300 || lane_counts(&ch).0 < 30 {
        assert!(
            start.elapsed() < LONG,
            "too few lane requests: {:?}",
            lane_counts(&ch)
        );
        let r = ch
            .request(&message("b", b"", Fds::none()).unwrap(), LONG)
            .unwrap();
        assert_eq!((r.nb_sent, r.nb_received), (1, 1));
        n += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    with_fd.join().unwrap();
    drop(ch);
    to.terminate_ok(LONG);
    assert!(!to.output().contains("overlap"), "{}", to.output());
}

// ---------------------------------------------------------------------------------------------
// Upstream: a secondary's sync requests to the primary.

fn secondary_lib(dir: &TestDir) -> Channel {
    lib(dir, ProcType::Secondary)
}

/// A primary `memplane mp listen` in `dir` answering each of `actions`, ready.
fn primary_listener(dir: &TestDir, actions: &[&str]) -> Proc {
    let args: Vec<&str> = actions.iter().flat_map(|a| ["--action", a]).collect();
    listen(dir, "primary", &args)
}

#[test]
fn a_secondarys_requests_to_the_primary_go_through_its_lane() {
    let dir = test_dir();
    let ch = primary(&dir);
    ch.register("up", |ch: &MpChannel, m: memplane::unix::Incoming| {
        let mut p = m.msg.param().to_vec();
        p.reverse();
        ch.reply(&m.from, &message("up", &p, Fds::none()).unwrap())
            .unwrap();
    })
    .unwrap();
    ch.register("up_fd", |ch: &MpChannel, m: memplane::unix::Incoming| {
        let r = message("up_fd", b"", Fds::from(memfd("from-primary"))).unwrap();
        ch.reply(&m.from, &r).unwrap();
    })
    .unwrap();
    ch.register(
        "memplane_ping",
        |ch: &MpChannel, m: memplane::unix::Incoming| {
            let r = message("memplane_ping", m.msg.param(), Fds::none()).unwrap();
            ch.reply(&m.from, &r).unwrap();
        },
    )
    .unwrap();
    // `mp ping` makes sync requests to the primary, one after the other.
    let (code, _, err) = common::run_in(
        &dir,
        &[
            "mp",
            "ping",
            "--count",
            "50",
            "--warmup",
            "0",
            "--proc-type",
            "secondary",
        ],
    );
    assert_eq!(code, 0, "{err}");
    // (The primary counts an answer just after giving it: wait for the count to settle.)
    let answered = || ch.stats().lanes.answered;
    assert_eq!(memplane_testkit::settles_at(50, answered), 50);
    // A request and its answer, through the lane.
    let (code, out, err) = common::run_in(
        &dir,
        &[
            "mp",
            "request",
            "up",
            "--param",
            "0102",
            "--proc-type",
            "secondary",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.iter().any(|l| l.contains("name=up param=0201")),
        "{out:?}"
    );
    assert_eq!(memplane_testkit::settles_at(51, answered), 51);
    // An answer with an fd comes over the socket, with its fd.
    let (code, out, err) = common::run_in(
        &dir,
        &[
            "mp",
            "request",
            "up_fd",
            "--show-fds",
            "--proc-type",
            "secondary",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.iter()
            .any(|l| l.contains("name=up_fd param= fds=1 fd0=\"from-primary\"")),
        "{out:?}"
    );
    assert_eq!(ch.stats().lanes.answered, 51);
    assert_eq!(ch.stats().endpoint.rx_rejected(), 0);
}

#[test]
fn a_secondarys_message_sent_before_its_request_is_handled_first() {
    let dir = test_dir();
    let mut p = primary_listener(&dir, &["m", "q"]);
    let ch = secondary_lib(&dir);
    message_then_request(&ch, &mut p);
}

#[test]
fn the_primarys_handlers_of_lane_and_socket_requests_never_run_at_once() {
    let dir = test_dir();
    let p = primary_listener(&dir, &["a", "b"]);
    requests_from_two_threads(std::sync::Arc::new(secondary_lib(&dir)), p);
}

#[test]
fn unanswered_requests_to_the_primary_time_out_and_free_their_slots() {
    let dir = test_dir();
    let ch = primary(&dir);
    ch.register("silent", |_: &MpChannel, _: memplane::unix::Incoming| {})
        .unwrap();
    ch.register("up", |ch: &MpChannel, m: memplane::unix::Incoming| {
        ch.reply(&m.from, &message("up", b"", Fds::none()).unwrap())
            .unwrap();
    })
    .unwrap();
    let sec = secondary_lib(&dir);
    unanswered_rounds(&sec, "silent");
    let r = sec
        .request(&message("up", b"", Fds::none()).unwrap(), LONG)
        .unwrap();
    assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (1, 1, false));
    assert_eq!(lane_counts(&sec), (21, 1));
    assert_eq!(
        memplane_testkit::settles_at(1, || ch.stats().lanes.answered),
        1
    );
    assert_eq!(sec.pending_requests(), 0);
}

#[test]
fn a_secondarys_messages_go_through_its_ring_and_arrive_in_order() {
    // One-way messages from a secondary go through its lane's ring while there is room; when
    // the primary stops reading, the ring fills and the rest go by socket. Whatever way each
    // went, the primary handles them in the order they were sent.
    let dir = test_dir();
    let mut p = primary_listener(&dir, &["m"]);
    let ch = secondary_lib(&dir);
    let send = |i: u32| {
        let r = ch
            .send(&message("m", &i.to_le_bytes(), Fds::none()).unwrap())
            .unwrap();
        assert_eq!(r.sent, 1);
    };
    for i in 0..100 {
        send(i);
    }
    // Once the primary has handled them all, the ring is empty: the next 64 fill it, and
    // the rest go by socket (5 fit in the primary's socket queue while it is stopped).
    p.expect_line(&format!("param={}", hex(&99u32.to_le_bytes())), LONG);
    // Printed is not yet counted: the primary counts a socket datagram as handled after its
    // handler returns. Stopped before that, it would hold the lane shut.
    assert_eq!(
        memplane_testkit::settles_at(0, || ch.stats().lanes.up_behind),
        0
    );
    let before = ch.stats().lanes.messages;
    memplane_testkit::stop(p.pid());
    for i in 100..169 {
        send(i);
    }
    assert_eq!(ch.stats().lanes.messages - before, 64);
    p.signal(libc::SIGCONT);
    p.expect_line(&format!("param={}", hex(&168u32.to_le_bytes())), LONG);
    let seen: Vec<u32> = p
        .output()
        .lines()
        .filter(|l| l.starts_with("message "))
        .filter_map(|l| l.split("param=").nth(1))
        .map(|h| {
            let b: Vec<u8> = (0..4)
                .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            u32::from_le_bytes(b.try_into().unwrap())
        })
        .collect();
    assert_eq!(seen, (0..169).collect::<Vec<u32>>());
}
