//! Loom model checks of the thread-safe pending table, [`memplane_core::tracker::Tracker`].
//!
//! Every test races a few threads on one request (replies, the timer's `expire`, `cancel`,
//! the sender's `sending_done`, a second `begin`) and loom explores their interleavings. What is
//! checked, whatever the interleaving: a request produces exactly one outcome (a sync waiter is
//! woken and returns once, an async completion runs once, or a cancel hands the callback back
//! unrun), a reply that loses the race is handed back as unmatched, the counters of the outcome
//! agree with what the racing threads saw, and the table ends empty. Each test also counts, outside
//! the model, which outcome every iteration produced and asserts that all possible outcomes were
//! explored, so a test cannot pass by exploring a single schedule.
//!
//! Time is not real here: deadlines are driven by a "timer" thread calling `expire` at the
//! deadline, and the test waiter reports a fixed time. Only compiled under `--cfg loom`:
//!
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p memplane-core --release --test loom_tracker`
//!
//! (add `LOOM_LOG=info` and `--nocapture` to see loom's iteration counts).
#![cfg(loom)]

use std::sync::atomic::AtomicUsize as StdAtomicUsize;
use std::sync::atomic::Ordering::Relaxed;

use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

use memplane_core::pending::{Cancelled, Finished, Inline, Notify, PendingError, Reply, Waiting};
use memplane_core::sync::SpinRawMutex;
use memplane_core::tracker::{AnswerOutcome, Tracker, Waiter};
use memplane_core::{Instant, Message, Name, NoFds, RequestId};

type Replies = heapless::Vec<(u32, Message<NoFds>), 2>;
type Tr<C> = Tracker<SpinRawMutex, u32, NoFds, Wake, C, Replies, Inline<4, 8>>;

/// The time every thread but the timer believes it is: before any deadline.
const BEFORE: Instant = Instant::from_nanos(0);
/// The deadline of every request; the timer thread expires at exactly this instant.
const DEADLINE: Instant = Instant::from_nanos(100);

/// Stack of every model thread. Loom's own threads get 32 KiB, too little for the tracker:
/// `expire` keeps a batch of completions (with their replies) on the stack.
const STACK: usize = 256 * 1024;

/// `loom::thread::spawn` with a [`STACK`]-sized stack.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    thread::Builder::new().stack_size(STACK).spawn(f).unwrap()
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn msg(s: &str) -> Message<NoFds> {
    Message::new(s, b"r").unwrap()
}

/// A one-shot wake-up flag: the sync waiter's notification, remembered until consumed.
struct Signal {
    flag: Mutex<bool>,
    cv: Condvar,
    /// How many notifications were sent, ever.
    sent: AtomicUsize,
}

/// The [`Notify`] handle stored in the table.
struct Wake(Arc<Signal>);

impl Notify for Wake {
    fn notify(&self) {
        self.0.sent.fetch_add(1, SeqCst);
        *self.0.flag.lock().unwrap() = true;
        self.0.cv.notify_one();
    }
}

/// How the test waiter behaves.
#[derive(Clone, Copy)]
enum Clock {
    /// The clock never reaches the deadline: block until notified, then report [`BEFORE`].
    Frozen,
    /// The deadline has passed: return at once, reporting the deadline as the time.
    Elapsed,
}

struct TestWaiter {
    signal: Arc<Signal>,
    clock: Clock,
}

impl TestWaiter {
    fn new(clock: Clock) -> Self {
        TestWaiter {
            signal: Arc::new(Signal {
                flag: Mutex::new(false),
                cv: Condvar::new(),
                sent: AtomicUsize::new(0),
            }),
            clock,
        }
    }

    fn notifications(&self) -> usize {
        self.signal.sent.load(SeqCst)
    }
}

impl Waiter for TestWaiter {
    type Notify = Wake;

    fn notifier(&self) -> Wake {
        Wake(self.signal.clone())
    }

    fn wait_until(&self, deadline: Instant) -> Instant {
        match self.clock {
            Clock::Frozen => {
                let mut woken = self.signal.flag.lock().unwrap();
                while !*woken {
                    woken = self.signal.cv.wait(woken).unwrap();
                }
                *woken = false;
                BEFORE
            }
            Clock::Elapsed => deadline,
        }
    }
}

/// What an async completion records when it runs.
#[derive(Default)]
struct Fired {
    runs: AtomicUsize,
    /// (nb_sent, nb_received, timed_out, replies stored) of the last run.
    reply: Mutex<Option<(u32, u32, bool, usize)>>,
}

/// The async completion: must run exactly once.
struct Callback(Arc<Fired>);

impl Callback {
    fn run(self, reply: Reply<Replies>) {
        self.0.runs.fetch_add(1, SeqCst);
        *self.0.reply.lock().unwrap() = Some((
            reply.nb_sent,
            reply.nb_received,
            reply.timed_out,
            reply.replies.len(),
        ));
    }
}

fn fired() -> (Arc<Fired>, Callback) {
    let f = Arc::new(Fired::default());
    let cb = Callback(f.clone());
    (f, cb)
}

fn run_finished(f: Finished<Callback, Replies>) {
    f.callback.run(f.reply)
}

/// Hands an answer to the tracker; returns whether it matched and whether it completed an async
/// request (whose completion is run right here).
fn answer(tr: &Tr<Callback>, peer: u32, reply: bool) -> (bool, bool) {
    match tr.on_answer(&peer, msg("q"), reply) {
        AnswerOutcome::Matched { finished, overflow } => {
            assert!(overflow.is_none());
            let completed = finished.is_some();
            if let Some(f) = finished {
                run_finished(f);
            }
            (true, completed)
        }
        AnswerOutcome::Unmatched(m) => {
            assert_eq!(m.name(), &name("q"));
            (false, false)
        }
    }
}

/// The timer: expires at the deadline, running async completions; returns how many completed.
fn timer(tr: &Tr<Callback>) -> usize {
    tr.expire(DEADLINE, run_finished)
}

fn begin(tr: &Tr<Callback>, peers: &[u32], waiting: Waiting<Wake, Callback>) -> RequestId {
    tr.begin(name("q"), peers, DEADLINE, waiting)
        .map_err(|(e, _)| e)
        .unwrap()
}

/// A new table holding one request "q" to `peers`, entered and sent (which completes nothing).
fn sent_request(peers: &[u32], waiting: Waiting<Wake, Callback>) -> (Arc<Tr<Callback>>, RequestId) {
    let tr: Arc<Tr<Callback>> = Arc::new(Tracker::new());
    let id = begin(&tr, peers, waiting);
    assert!(tr.sending_done(id, BEFORE).unwrap().is_none());
    (tr, id)
}

/// [`answer`] on a model thread of its own.
fn spawn_answer(
    tr: &Arc<Tr<Callback>>,
    peer: u32,
    reply: bool,
) -> thread::JoinHandle<(bool, bool)> {
    let tr = tr.clone();
    spawn(move || answer(&tr, peer, reply))
}

/// [`timer`] on a model thread of its own.
fn spawn_timer(tr: &Arc<Tr<Callback>>) -> thread::JoinHandle<usize> {
    let tr = tr.clone();
    spawn(move || timer(&tr))
}

/// What the threads of one sync race saw (see [`sync_race`]).
struct SyncRace {
    tr: Arc<Tr<Callback>>,
    id: RequestId,
    /// What the requester's `wait` returned.
    r: Reply<Replies>,
    /// The reply matched the request.
    matched: bool,
    /// The reply completed the request as an async one.
    completed: bool,
    /// How many requests the timer expired.
    expired: usize,
    /// How many times the waiter was notified.
    notifications: usize,
}

/// A sync request to peer 1, sent; then the requester waits with `clock` while one thread
/// delivers the reply and the timer expires the request at its deadline.
fn sync_race(clock: Clock) -> SyncRace {
    let w = TestWaiter::new(clock);
    let (tr, id) = sent_request(&[1], Waiting::Sync(w.notifier()));

    let replier = spawn_answer(&tr, 1, true);
    let timer_thread = spawn_timer(&tr);
    let r = tr.wait(id, BEFORE, &w).unwrap();
    let (matched, completed) = replier.join().unwrap();
    let expired = timer_thread.join().unwrap();
    SyncRace {
        tr,
        id,
        r,
        matched,
        completed,
        expired,
        notifications: w.notifications(),
    }
}

/// Counts model iterations and the outcome of each, outside the model.
struct Explored {
    iterations: StdAtomicUsize,
    outcomes: Vec<StdAtomicUsize>,
}

impl Explored {
    fn new(kinds: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Explored {
            iterations: StdAtomicUsize::new(0),
            outcomes: (0..kinds).map(|_| StdAtomicUsize::new(0)).collect(),
        })
    }

    fn record(&self, outcome: usize) {
        self.outcomes[outcome].fetch_add(1, Relaxed);
    }

    /// Every outcome happened in some iteration, and there were several iterations.
    fn assert_all_seen(&self, what: &str) {
        let its = self.iterations.load(Relaxed);
        let seen: Vec<usize> = self.outcomes.iter().map(|o| o.load(Relaxed)).collect();
        assert!(its > 1, "{what}: loom explored only {its} iteration(s)");
        assert_eq!(
            seen.iter().sum::<usize>(),
            its,
            "{what}: one outcome per iteration"
        );
        assert!(
            seen.iter().all(|&n| n > 0),
            "{what}: some outcome never explored: {seen:?} over {its} iterations"
        );
    }
}

/// Runs `f` under loom, counting iterations, then checks that every outcome was explored.
fn explore(what: &str, kinds: usize, f: impl Fn(&Explored) + Sync + Send + 'static) {
    let ex = Explored::new(kinds);
    let ex2 = ex.clone();
    let f = std::sync::Arc::new(f);
    loom::model(move || {
        ex2.iterations.fetch_add(1, Relaxed);
        // The model's first thread has a small fixed stack: run the scenario on a bigger one.
        let (ex, f) = (ex2.clone(), f.clone());
        spawn(move || f(&ex)).join().unwrap();
    });
    ex.assert_all_seen(what);
}

/// (a) A sync request to one peer: the requester blocks (its clock never reaches the deadline),
/// one thread delivers the reply, the timer expires the request at its deadline. Exactly one of
/// them completes it; the waiter is notified once and returns once, with the reply or with the
/// timeout; a reply that lost the race is unmatched; the table ends empty.
#[test]
fn sync_reply_races_timer() {
    const REPLY: usize = 0;
    const TIMER: usize = 1;
    explore("sync reply vs timer", 2, |ex| {
        let s = sync_race(Clock::Frozen);
        let r = &s.r;

        assert!(!s.completed, "a sync completion never leaves as async");
        assert_eq!(usize::from(s.matched) + s.expired, 1, "exactly one outcome");
        assert_eq!(s.notifications, 1, "the waiter is woken exactly once");
        if s.matched {
            assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (1, 1, false));
            assert_eq!(r.replies.len(), 1);
            assert_eq!(r.replies[0].0, 1);
        } else {
            assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (1, 0, true));
            assert!(r.replies.is_empty());
        }
        assert!(s.tr.is_empty());
        assert!(matches!(s.tr.cancel(s.id), Err(PendingError::Unknown)));
        ex.record(if s.matched { REPLY } else { TIMER });
    });
}

/// (a') Same race, but the requester's own clock has passed the deadline: it completes the
/// request itself when it polls. Reply, timer and waiter race; exactly one wins, the waiter is
/// notified only if someone else completed the request, and returns once.
#[test]
fn sync_reply_races_timer_and_own_deadline() {
    const REPLY: usize = 0;
    const TIMER: usize = 1;
    const WAITER: usize = 2;
    explore("sync reply vs timer vs waiter", 3, |ex| {
        let s = sync_race(Clock::Elapsed);
        let r = &s.r;

        let by_waiter = s.notifications == 0;
        assert_eq!(
            usize::from(s.matched) + s.expired + usize::from(by_waiter),
            1,
            "exactly one outcome"
        );
        assert_eq!(s.notifications, usize::from(s.matched) + s.expired);
        if s.matched {
            assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (1, 1, false));
        } else {
            assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (1, 0, true));
        }
        assert!(s.tr.is_empty());
        ex.record(if s.matched {
            REPLY
        } else if s.expired == 1 {
            TIMER
        } else {
            WAITER
        });
    });
}

/// (b) An async request to two peers; each peer's answer is delivered by its own thread and the
/// timer expires the request at its deadline. The completion runs exactly once, whoever ends the
/// request, and its counters agree with the answers that matched. With `ignore`, peer 2 answers
/// "ignore", which must leave `nb_sent` if it matched.
fn async_two_answers_race_timer(ignore: bool) {
    const FIRST: usize = 0;
    const SECOND: usize = 1;
    const TIMER: usize = 2;
    explore("async two answers vs timer", 3, move |ex| {
        let (fired, cb) = fired();
        let (tr, _) = sent_request(&[1, 2], Waiting::Async(cb));

        let first = spawn_answer(&tr, 1, true);
        let second = spawn_answer(&tr, 2, !ignore);
        let expired = timer(&tr);
        let (m1, c1) = first.join().unwrap();
        let (m2, c2) = second.join().unwrap();

        assert_eq!(
            fired.runs.load(SeqCst),
            1,
            "the completion runs exactly once"
        );
        assert_eq!(usize::from(c1) + usize::from(c2) + expired, 1);
        let (nb_sent, nb_received, timed_out, stored) = fired.reply.lock().unwrap().unwrap();
        let replies_matched = u32::from(m1) + u32::from(m2 && !ignore);
        assert_eq!(nb_received, replies_matched);
        assert_eq!(stored, nb_received as usize);
        assert_eq!(nb_sent, 2 - u32::from(m2 && ignore));
        assert_eq!(timed_out, expired == 1);
        assert_eq!(timed_out, !(m1 && m2));
        assert!(tr.is_empty());
        ex.record(if c1 {
            FIRST
        } else if c2 {
            SECOND
        } else {
            TIMER
        });
    });
}

#[test]
fn async_two_replies_race_timer() {
    async_two_answers_race_timer(false);
}

#[test]
fn async_reply_and_ignore_race_timer() {
    async_two_answers_race_timer(true);
}

/// (c) An async request raced by `cancel`, a reply and the timer: exactly one of {the completion
/// runs, `cancel` hands the callback back unrun} happens.
#[test]
fn async_cancel_races_reply_and_timer() {
    const CANCEL: usize = 0;
    const REPLY: usize = 1;
    const TIMER: usize = 2;
    explore("async cancel vs reply vs timer", 3, |ex| {
        let (fired, cb) = fired();
        let (tr, id) = sent_request(&[1], Waiting::Async(cb));

        let replier = spawn_answer(&tr, 1, true);
        let timer_thread = spawn_timer(&tr);
        let cancelled = match tr.cancel(id) {
            Ok(Cancelled::Pending(Waiting::Async(cb))) => {
                // Handed back, not run: dropping it here must not count as a run.
                drop(cb);
                true
            }
            Ok(Cancelled::Pending(Waiting::Sync(_))) => panic!("an async request came back sync"),
            Ok(Cancelled::Completed(_)) => panic!("an async request never waits to be taken"),
            Err(e) => {
                assert_eq!(e, PendingError::Unknown);
                false
            }
        };
        let (matched, by_reply) = replier.join().unwrap();
        let expired = timer_thread.join().unwrap();

        let runs = fired.runs.load(SeqCst);
        assert_eq!(runs + usize::from(cancelled), 1, "exactly one outcome");
        assert_eq!(usize::from(by_reply) + expired, runs);
        if cancelled {
            assert!(!matched, "a reply after cancel is unmatched");
        }
        if expired == 1 {
            assert!(!matched, "a reply after the timeout is unmatched");
        }
        assert!(tr.is_empty());
        ex.record(if cancelled {
            CANCEL
        } else if by_reply {
            REPLY
        } else {
            TIMER
        });
    });
}

/// (d) A "dummy" async request (no peer reached) completes at `sending_done`, exactly once, with
/// nothing sent and nothing timed out, even with the timer expiring concurrently. Two shapes: no
/// peer at all, and one peer whose send fails while its reply races in (then the reply either
/// overtook the sender and counts, or finds its slot withdrawn and is unmatched).
#[test]
fn dummy_async_completes_at_sending_done() {
    const SEND_FAILED: usize = 0;
    const REPLY_OVERTOOK: usize = 1;
    explore("dummy async request vs timer", 2, |ex| {
        let tr: Arc<Tr<Callback>> = Arc::new(Tracker::new());

        // No peer at all.
        let (fired0, cb) = fired();
        let id0 = tr
            .begin(name("d"), &[], DEADLINE, Waiting::Async(cb))
            .map_err(|(e, _)| e)
            .unwrap();
        // One peer whose send fails, while its reply races in.
        let (fired1, cb) = fired();
        let id1 = begin(&tr, &[1], Waiting::Async(cb));

        let timer_thread = spawn_timer(&tr);
        let replier = spawn_answer(&tr, 1, true);
        let f0 = tr
            .sending_done(id0, BEFORE)
            .unwrap()
            .expect("dummy completes");
        let withdrawn = tr.send_failed(id1, &1);
        let f1 = tr
            .sending_done(id1, BEFORE)
            .unwrap()
            .expect("nothing left owed: completes");
        let expired = timer_thread.join().unwrap();
        let (matched, by_reply) = replier.join().unwrap();

        assert_eq!(expired, 0, "nothing is due while sending, nothing after");
        assert!(
            !by_reply,
            "a request cannot complete while it is being sent"
        );
        assert_eq!(withdrawn, !matched);
        assert_eq!(
            (f0.reply.nb_sent, f0.reply.nb_received, f0.reply.timed_out),
            (0, 0, false)
        );
        let n = u32::from(matched);
        assert_eq!(
            (f1.reply.nb_sent, f1.reply.nb_received, f1.reply.timed_out),
            (n, n, false)
        );
        run_finished(f0);
        run_finished(f1);
        assert_eq!(fired0.runs.load(SeqCst), 1);
        assert_eq!(fired1.runs.load(SeqCst), 1);
        assert!(tr.is_empty());
        // The race between the timer and `sending_done` cannot be told from outside (both orders
        // give the same result); the race between the failed send and the reply can.
        ex.record(if matched { REPLY_OVERTOOK } else { SEND_FAILED });
    });
}

/// (e) Two threads enter requests with the same name and a common peer: exactly one is entered,
/// the other is refused with `InFlight` and gets its callback back.
#[test]
fn begin_races_same_key() {
    const FIRST: usize = 0;
    const SECOND: usize = 1;
    explore("begin vs begin", 2, |ex| {
        let tr: Arc<Tr<u32>> = Arc::new(Tracker::new());
        let other = {
            let tr = tr.clone();
            spawn(move || tr.begin(name("q"), &[3, 1], DEADLINE, Waiting::Async(2)))
        };
        let mine = tr.begin(name("q"), &[1, 2], DEADLINE, Waiting::Async(1));
        let other = other.join().unwrap();

        let (winner, refused) = match (mine, other) {
            (Ok(id), Err((e, w))) => {
                ex.record(FIRST);
                (id, (e, w, 2))
            }
            (Err((e, w)), Ok(id)) => {
                ex.record(SECOND);
                (id, (e, w, 1))
            }
            (Ok(_), Ok(_)) => panic!("both entered: replies could be mixed"),
            (Err(_), Err(_)) => panic!("both refused"),
        };
        let (e, w, tag) = refused;
        assert_eq!(e, PendingError::InFlight(name("q")));
        assert!(matches!(w, Waiting::Async(t) if t == tag));
        assert_eq!(tr.len(), 1);
        assert_eq!(tr.counters(winner), Some((2, 0, 2)));
        assert!(matches!(
            tr.cancel(winner),
            Ok(Cancelled::Pending(Waiting::Async(t))) if t != tag
        ));
        assert!(tr.is_empty());
    });
}

/// (e') A request's (peer, name) key is free again exactly when the request completes: a reply
/// that completes the first request races a second `begin` with the same key, which is entered
/// only if the reply came first (and the reply always goes to the first request).
#[test]
fn begin_races_completion_of_same_key() {
    const REFUSED: usize = 0;
    const ENTERED: usize = 1;
    explore("begin vs completion", 2, |ex| {
        let (fired1, cb) = fired();
        let (tr, first) = sent_request(&[1], Waiting::Async(cb));

        let replier = spawn_answer(&tr, 1, true);
        let (fired2, cb) = fired();
        let second = tr.begin(name("q"), &[1], DEADLINE, Waiting::Async(cb));
        let (matched, completed) = replier.join().unwrap();

        assert!(
            matched && completed,
            "the reply belongs to the first request"
        );
        assert_eq!(fired1.runs.load(SeqCst), 1);
        assert_eq!(*fired1.reply.lock().unwrap(), Some((1, 1, false, 1)));
        match second {
            Ok(id) => {
                assert_ne!(id, first);
                assert_eq!(tr.counters(id), Some((1, 0, 1)));
                assert!(tr.counters(first).is_none());
                assert!(matches!(
                    tr.cancel(id),
                    Ok(Cancelled::Pending(Waiting::Async(_)))
                ));
                ex.record(ENTERED);
            }
            Err((e, _)) => {
                assert_eq!(e, PendingError::InFlight(name("q")));
                ex.record(REFUSED);
            }
        }
        assert_eq!(fired2.runs.load(SeqCst), 0);
        assert!(tr.is_empty());
    });
}
