//! Model-based test of [`memplane_core::pending::PendingTable`].
//!
//! Random sequences of operations (`begin` with a name from a small set and a random peer list,
//! `send_failed`, `sending_done`, replies and ignores from random peers with random names,
//! `expire` at a moving clock with a random limit, `poll`, `take`, `cancel`, on live and on stale
//! ids) drive a small table (8 records, 16 slots, replies sink of 3) and a plain `std` model
//! (`HashMap` from (peer, name) to request). After every step: each request's counters
//! (`nb_sent`, `nb_received`, outstanding), deadline, `len`, `free_slots` and `next_deadline`
//! match the model; every completion and reply that leaves the table is the one the model
//! predicts, with exactly the replies the model routed to it; a reply is delivered to at most one
//! request, once; every request has at most one terminal event (async completion, sync take,
//! cancel). At the end, after ending every sending phase, expiring everything at a far time and
//! taking the sync replies, the table is empty with all slots free and every request entered had
//! exactly one terminal event.
//!
//! Pinned tests cover a reply that overtakes the sender (arrives before `sending_done`), stale
//! ids after the record is reused (generation check), and the two regressions found while
//! writing this test (`poll` on an async request, `send_failed` after the sending phase).

use std::collections::{HashMap, HashSet};

use memplane_core::pending::Inline;
use memplane_core::pending::{
    Answer, Cancelled, Completion, Finished, Notify, PendingError, PendingTable, Reply, Waiting,
};
use memplane_core::{Instant, Message, Name, NoFds, RequestId};
use proptest::prelude::*;

const R: usize = 8;
const S: usize = 16;
/// Capacity of a request's reply sink: small, so that overflow happens.
const SINK: usize = 2;
/// Names requests use; the last one is never requested, so answers with it never match.
const NAMES: [&str; 4] = ["a", "b", "c", "never"];
const BEGIN_NAMES: usize = 3;
const PEERS: u32 = 8;

/// The sync waiter's handle: names the request it belongs to.
#[derive(Debug)]
struct Tag(usize);

impl Notify for Tag {
    fn notify(&self) {}
}

type Sink = heapless::Vec<(u32, Message<NoFds>), SINK>;
/// Async completions are the request's model token.
type Table = PendingTable<u32, NoFds, Tag, usize, Sink, Inline<R, S>>;

fn name(i: usize) -> Name {
    Name::new(NAMES[i]).unwrap()
}

fn at(t: u64) -> Instant {
    Instant::from_nanos(t)
}

/// A reply carries its sequence number as parameter, so that every reply is unique.
fn seq_of(m: &Message<NoFds>) -> u32 {
    u32::from_le_bytes(m.param().try_into().unwrap())
}

#[derive(Clone, Debug)]
enum Op {
    Begin {
        name: usize,
        peers: Vec<u32>,
        ttl: u64,
        sync: bool,
    },
    SendFailed {
        req: Pick,
        peer: u32,
    },
    SendingDone {
        req: Pick,
    },
    /// The transport found `peer` gone after the sending phase.
    PeerGone {
        peer: u32,
        limit: usize,
    },
    Answer {
        peer: u32,
        name: usize,
        reply: bool,
    },
    /// An answer from a peer a request still waits for (if it waits for any).
    AnswerOwed {
        req: Pick,
        which: usize,
        reply: bool,
    },
    Expire {
        limit: usize,
    },
    Poll {
        req: Pick,
    },
    Take {
        req: Pick,
    },
    Cancel {
        req: Pick,
    },
    Advance {
        by: u64,
    },
}

/// Which request an operation targets: mostly a live one, sometimes any ever entered (stale).
#[derive(Clone, Copy, Debug)]
struct Pick {
    live: bool,
    index: usize,
}

fn pick() -> impl Strategy<Value = Pick> {
    (prop::bool::weighted(0.85), any::<usize>()).prop_map(|(live, index)| Pick { live, index })
}

/// A peer list: mostly distinct peers in any order, sometimes with duplicates.
fn peers() -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![
        4 => prop::sample::subsequence((0..PEERS).collect::<Vec<_>>(), 0..=7).prop_shuffle(),
        1 => prop::collection::vec(0..PEERS, 0..5),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..BEGIN_NAMES, peers(), 0u64..40, any::<bool>())
            .prop_map(|(name, peers, ttl, sync)| Op::Begin { name, peers, ttl, sync }),
        1 => (pick(), 0..PEERS).prop_map(|(req, peer)| Op::SendFailed { req, peer }),
        3 => pick().prop_map(|req| Op::SendingDone { req }),
        1 => (0..PEERS, prop_oneof![Just(usize::MAX), 1usize..3])
            .prop_map(|(peer, limit)| Op::PeerGone { peer, limit }),
        2 => (0..PEERS, 0..NAMES.len(), prop::bool::weighted(0.8))
            .prop_map(|(peer, name, reply)| Op::Answer { peer, name, reply }),
        5 => (pick(), any::<usize>(), prop::bool::weighted(0.8))
            .prop_map(|(req, which, reply)| Op::AnswerOwed { req, which, reply }),
        2 => prop_oneof![Just(usize::MAX), 0usize..3].prop_map(|limit| Op::Expire { limit }),
        1 => pick().prop_map(|req| Op::Poll { req }),
        1 => pick().prop_map(|req| Op::Take { req }),
        1 => pick().prop_map(|req| Op::Cancel { req }),
        2 => (0u64..15).prop_map(|by| Op::Advance { by }),
    ]
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Waiting for answers (or still being sent).
    Open,
    /// A sync request that completed; its reply waits to be taken.
    Done,
    /// Left the table.
    Gone,
}

/// The model of one request that was entered.
#[derive(Debug)]
struct MReq {
    id: RequestId,
    name: Name,
    sync: bool,
    deadline: u64,
    sending: bool,
    phase: Phase,
    nb_sent: u32,
    nb_received: u32,
    /// Peers still owed an answer.
    owed: Vec<u32>,
    /// Replies matched but refused by the full sink.
    overflowed: u32,
    timed_out: bool,
    /// (peer, reply sequence number), in arrival order.
    replies: Vec<(u32, u32)>,
    wakes: u32,
    /// Terminal events: async completion run, sync reply taken, cancel.
    ends: u32,
}

struct Model {
    table: Box<Table>,
    /// Every request entered; its index is its token.
    reqs: Vec<MReq>,
    /// (peer, name) -> token of the open request owed that answer.
    keys: HashMap<(u32, Name), usize>,
    now: u64,
    seq: u32,
    /// Sequence numbers of the replies handed out in some reply.
    delivered: HashSet<u32>,
    issued: HashSet<RequestId>,
}

impl Model {
    fn new() -> Self {
        Model {
            table: Box::new(Table::new()),
            reqs: Vec::new(),
            keys: HashMap::new(),
            now: 0,
            seq: 0,
            delivered: HashSet::new(),
            issued: HashSet::new(),
        }
    }

    fn pick(&self, p: Pick) -> Option<usize> {
        let live: Vec<usize> = (0..self.reqs.len())
            .filter(|&t| self.reqs[t].phase != Phase::Gone)
            .collect();
        if p.live && !live.is_empty() {
            Some(live[p.index % live.len()])
        } else if self.reqs.is_empty() {
            None
        } else {
            Some(p.index % self.reqs.len())
        }
    }

    fn owed_total(&self) -> usize {
        self.reqs.iter().map(|r| r.owed.len()).sum()
    }

    fn is_due(&self, t: usize) -> bool {
        let r = &self.reqs[t];
        r.phase == Phase::Open && !r.sending && (r.owed.is_empty() || r.deadline <= self.now)
    }

    /// The model's completion of `t`: slots go, sync requests wait to be taken.
    fn complete(&mut self, t: usize) {
        let r = &mut self.reqs[t];
        assert_eq!(r.phase, Phase::Open);
        r.timed_out = !r.owed.is_empty();
        for p in r.owed.drain(..) {
            assert_eq!(self.keys.remove(&(p, r.name)), Some(t));
        }
        r.phase = if r.sync { Phase::Done } else { Phase::Gone };
    }

    /// A reply leaving the table for `t`: must be exactly the model's; `t` then leaves.
    fn check_reply(&mut self, t: usize, reply: Reply<Sink>) {
        let r = &mut self.reqs[t];
        assert_eq!(
            (reply.nb_sent, reply.nb_received, reply.timed_out),
            (r.nb_sent, r.nb_received, r.timed_out),
            "reply counters of request {t}"
        );
        let got: Vec<(u32, u32)> = reply
            .replies
            .iter()
            .map(|(p, m)| {
                assert_eq!(
                    m.name(),
                    &r.name,
                    "a reply went to a request of another name"
                );
                (*p, seq_of(m))
            })
            .collect();
        assert_eq!(got, r.replies, "replies of request {t}");
        for (_, s) in got {
            assert!(self.delivered.insert(s), "reply {s} delivered twice");
        }
        r.phase = Phase::Gone;
        r.ends += 1;
    }

    /// A completion left the table; it must be for one of `allowed`. Returns its token.
    fn on_completion(&mut self, c: Completion<Tag, usize, Sink>, allowed: &[usize]) -> usize {
        match c {
            Completion::Wake(Tag(t)) => {
                assert!(allowed.contains(&t), "unexpected wake of {t}");
                assert!(self.reqs[t].sync);
                self.complete(t);
                self.reqs[t].wakes += 1;
                t
            }
            Completion::Async(Finished {
                id,
                name,
                callback: t,
                reply,
            }) => {
                assert!(allowed.contains(&t), "unexpected completion of {t}");
                assert!(!self.reqs[t].sync);
                assert_eq!(id, self.reqs[t].id);
                assert_eq!(name, self.reqs[t].name);
                self.complete(t);
                self.check_reply(t, reply);
                t
            }
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Begin {
                name: n,
                ref peers,
                ttl,
                sync,
            } => self.begin(name(n), peers, ttl, sync),
            Op::SendFailed { req, peer } => {
                let Some(t) = self.pick(req) else { return };
                let r = &self.reqs[t];
                let expect = r.phase == Phase::Open && r.sending && r.owed.contains(&peer);
                assert_eq!(self.table.send_failed(r.id, &peer), expect);
                if expect {
                    let r = &mut self.reqs[t];
                    r.owed.retain(|&p| p != peer);
                    r.nb_sent -= 1;
                    assert_eq!(self.keys.remove(&(peer, r.name)), Some(t));
                }
            }
            Op::SendingDone { req } => {
                let Some(t) = self.pick(req) else { return };
                self.sending_done(t);
            }
            Op::PeerGone { peer, limit } => self.peer_gone(peer, limit),
            Op::Answer {
                peer,
                name: n,
                reply,
            } => self.answer(peer, name(n), reply),
            Op::AnswerOwed { req, which, reply } => {
                let Some(t) = self.pick(req) else { return };
                let r = &self.reqs[t];
                if !r.owed.is_empty() {
                    self.answer(r.owed[which % r.owed.len()], r.name, reply);
                }
            }
            Op::Expire { limit } => self.expire(limit),
            Op::Poll { req } => {
                let Some(t) = self.pick(req) else { return };
                let id = self.reqs[t].id;
                let res = self.table.poll(id, at(self.now));
                match self.reqs[t].phase {
                    Phase::Gone => assert_eq!(res.err(), Some(PendingError::Unknown)),
                    Phase::Done => self.check_reply(t, res.unwrap().unwrap()),
                    Phase::Open if !self.reqs[t].sync => {
                        // Not a sync request: nothing to take, and it stays pending.
                        assert_eq!(res.err(), Some(PendingError::Unknown));
                    }
                    Phase::Open => {
                        if self.is_due(t) {
                            // The waiter saw the deadline itself: completes, nobody is woken.
                            self.complete(t);
                            self.check_reply(t, res.unwrap().unwrap());
                        } else {
                            assert!(res.unwrap().is_none());
                        }
                    }
                }
            }
            Op::Take { req } => {
                let Some(t) = self.pick(req) else { return };
                let res = self.table.take(self.reqs[t].id);
                if self.reqs[t].phase == Phase::Done {
                    self.check_reply(t, res.unwrap());
                } else {
                    assert_eq!(res.err(), Some(PendingError::Unknown));
                }
            }
            Op::Cancel { req } => {
                let Some(t) = self.pick(req) else { return };
                let res = self.table.cancel(self.reqs[t].id);
                match self.reqs[t].phase {
                    Phase::Gone => assert_eq!(res.err(), Some(PendingError::Unknown)),
                    Phase::Done => match res {
                        Ok(Cancelled::Completed(reply)) => self.check_reply(t, reply),
                        _ => panic!("cancel of a completed sync request"),
                    },
                    Phase::Open => {
                        match res {
                            Ok(Cancelled::Pending(Waiting::Sync(Tag(x)))) => {
                                assert!(self.reqs[t].sync);
                                assert_eq!(x, t);
                            }
                            Ok(Cancelled::Pending(Waiting::Async(x))) => {
                                assert!(!self.reqs[t].sync);
                                assert_eq!(x, t);
                            }
                            _ => panic!("cancel of an open request"),
                        }
                        let r = &mut self.reqs[t];
                        for p in r.owed.drain(..) {
                            assert_eq!(self.keys.remove(&(p, r.name)), Some(t));
                        }
                        r.phase = Phase::Gone;
                        r.ends += 1;
                    }
                }
            }
            Op::Advance { by } => self.now += by,
        }
    }

    fn begin(&mut self, name: Name, peers: &[u32], ttl: u64, sync: bool) {
        let t = self.reqs.len();
        let live = self.reqs.iter().filter(|r| r.phase != Phase::Gone).count();
        let free = S - self.owed_total();
        let mut possible = Vec::new();
        if live == R {
            possible.push(PendingError::TableFull { capacity: R });
        }
        if peers.len() > free {
            possible.push(PendingError::NoSlots {
                needed: peers.len(),
                free,
            });
        }
        if (1..peers.len()).any(|i| peers[..i].contains(&peers[i])) {
            possible.push(PendingError::DuplicatePeer);
        }
        if peers.iter().any(|&p| self.keys.contains_key(&(p, name))) {
            possible.push(PendingError::InFlight(name));
        }
        let waiting = if sync {
            Waiting::Sync(Tag(t))
        } else {
            Waiting::Async(t)
        };
        let deadline = self.now + ttl;
        match self.table.begin(name, peers, at(deadline), waiting) {
            Ok(id) => {
                assert!(possible.is_empty(), "entered despite {possible:?}");
                assert!(self.issued.insert(id), "{id:?} issued twice");
                for &p in peers {
                    self.keys.insert((p, name), t);
                }
                self.reqs.push(MReq {
                    id,
                    name,
                    sync,
                    deadline,
                    sending: true,
                    phase: Phase::Open,
                    nb_sent: peers.len() as u32,
                    nb_received: 0,
                    owed: peers.to_vec(),
                    overflowed: 0,
                    timed_out: false,
                    replies: Vec::new(),
                    wakes: 0,
                    ends: 0,
                });
            }
            Err((e, w)) => {
                assert!(
                    possible.contains(&e),
                    "refused with {e:?}, expected {possible:?}"
                );
                match w {
                    Waiting::Sync(Tag(x)) => assert!(sync && x == t),
                    Waiting::Async(x) => assert!(!sync && x == t),
                }
            }
        }
    }

    fn sending_done(&mut self, t: usize) {
        let res = self.table.sending_done(self.reqs[t].id, at(self.now));
        match self.reqs[t].phase {
            Phase::Gone => assert_eq!(res.err(), Some(PendingError::Unknown)),
            Phase::Done => assert!(res.unwrap().is_none()),
            Phase::Open => {
                self.reqs[t].sending = false;
                let c = res.unwrap();
                if self.is_due(t) {
                    self.on_completion(c.expect("due at sending_done"), &[t]);
                } else {
                    assert!(c.is_none(), "completed at sending_done while not due");
                }
            }
        }
    }

    /// Every open request owing `peer` stops owing it and leaves it out of `nb_sent`; those
    /// left owing nothing complete, unless still being sent.
    fn peer_gone(&mut self, peer: u32, limit: usize) {
        let mut affected = 0;
        let mut completes = Vec::new();
        for t in 0..self.reqs.len() {
            let r = &mut self.reqs[t];
            if r.phase != Phase::Open || !r.owed.contains(&peer) {
                continue;
            }
            affected += 1;
            r.owed.retain(|&p| p != peer);
            r.nb_sent -= 1;
            assert_eq!(self.keys.remove(&(peer, r.name)), Some(t));
            if !r.sending && r.owed.is_empty() {
                completes.push(t);
            }
        }
        let mut got = Vec::new();
        let mut withdrawn = 0;
        loop {
            let before = got.len();
            let (n, more) = self.table.peer_gone(&peer, limit, |c| got.push(c));
            withdrawn += n;
            assert!(
                got.len() - before <= limit,
                "more completions than the limit"
            );
            if !more {
                break;
            }
            assert_eq!(got.len() - before, limit, "stopped before the limit");
        }
        assert_eq!(withdrawn, affected, "slots withdrawn for peer {peer}");
        assert_eq!(got.len(), completes.len(), "completions for peer {peer}");
        let mut seen = HashSet::new();
        for c in got {
            let t = self.on_completion(c, &completes);
            assert!(seen.insert(t), "request {t} completed twice");
            assert!(!self.reqs[t].timed_out);
        }
    }

    fn answer(&mut self, peer: u32, name: Name, reply: bool) {
        self.seq += 1;
        let seq = self.seq;
        let msg = Message::new(name.as_str(), &seq.to_le_bytes()).unwrap();
        let res = self.table.on_answer(&peer, msg, reply);
        let Some(t) = self.keys.remove(&(peer, name)) else {
            match res {
                Answer::Unmatched(m) => assert_eq!(seq_of(&m), seq),
                Answer::Matched { .. } => panic!("answer {seq} from {peer} for {name} matched"),
            }
            return;
        };
        let r = &mut self.reqs[t];
        assert_eq!(r.phase, Phase::Open);
        r.owed.retain(|&p| p != peer);
        let mut overflow_expected = None;
        if reply {
            if r.replies.len() < SINK {
                r.replies.push((peer, seq));
                r.nb_received += 1;
            } else {
                r.overflowed += 1;
                overflow_expected = Some(seq);
            }
        } else {
            r.nb_sent -= 1;
        }
        let completes = !r.sending && r.owed.is_empty();
        match res {
            Answer::Matched {
                completion,
                overflow,
            } => {
                assert_eq!(overflow.as_ref().map(seq_of), overflow_expected);
                match (completes, completion) {
                    (true, Some(c)) => {
                        self.on_completion(c, &[t]);
                    }
                    (false, None) => {}
                    (true, None) => panic!("last answer did not complete request {t}"),
                    (false, Some(_)) => panic!("request {t} completed early"),
                }
            }
            Answer::Unmatched(_) => panic!("answer {seq} from {peer} for {name} unmatched"),
        }
    }

    fn expire(&mut self, limit: usize) {
        let due: Vec<usize> = (0..self.reqs.len()).filter(|&t| self.is_due(t)).collect();
        let mut got = Vec::new();
        let n = self.table.expire(at(self.now), limit, |c| got.push(c));
        assert_eq!(n, limit.min(due.len()), "expire count, due: {due:?}");
        assert_eq!(got.len(), n);
        let mut seen = HashSet::new();
        for c in got {
            let t = self.on_completion(c, &due);
            assert!(seen.insert(t), "request {t} completed twice by one expire");
        }
    }

    /// Checks the table against the model.
    fn check(&self) {
        let live = self.reqs.iter().filter(|r| r.phase != Phase::Gone).count();
        assert_eq!(self.table.len(), live);
        assert_eq!(self.table.is_empty(), live == 0);
        let owed = self.owed_total();
        assert_eq!(self.keys.len(), owed);
        assert_eq!(self.table.free_slots(), S - owed);
        for (t, r) in self.reqs.iter().enumerate() {
            assert!(r.wakes <= 1, "request {t} woken twice");
            assert!(r.sync || r.wakes == 0);
            match r.phase {
                Phase::Gone => {
                    assert_eq!(self.table.counters(r.id), None, "stale id {t} still known");
                    assert_eq!(self.table.deadline(r.id), None);
                    assert_eq!(r.ends, 1, "request {t} ended {} times", r.ends);
                }
                Phase::Open | Phase::Done => {
                    assert_eq!(
                        self.table.counters(r.id),
                        Some((r.nb_sent, r.nb_received, r.owed.len() as u32)),
                        "counters of request {t}"
                    );
                    assert_eq!(self.table.deadline(r.id), Some(at(r.deadline)));
                    assert_eq!(r.ends, 0);
                    // Every peer reached is still owed, or answered with a reply (stored or
                    // refused by the full sink); a timeout drops the owed ones.
                    let answered = r.nb_received + r.overflowed;
                    if r.phase == Phase::Open {
                        assert_eq!(r.nb_sent, answered + r.owed.len() as u32);
                    } else {
                        assert!(r.owed.is_empty() && r.wakes == 1);
                        assert!(r.nb_sent >= answered);
                        assert_eq!(r.timed_out, r.nb_sent > answered);
                    }
                }
            }
        }
        let next = self
            .reqs
            .iter()
            .filter(|r| r.phase == Phase::Open && !r.sending)
            .map(|r| at(r.deadline))
            .min();
        assert_eq!(self.table.next_deadline(), next);
    }

    /// Ends every sending phase, expires everything, takes every sync reply.
    fn finish(&mut self) {
        for t in 0..self.reqs.len() {
            if self.reqs[t].phase == Phase::Open && self.reqs[t].sending {
                self.sending_done(t);
                self.check();
            }
        }
        self.now = u64::MAX;
        self.expire(usize::MAX);
        self.check();
        for t in 0..self.reqs.len() {
            if self.reqs[t].phase == Phase::Done {
                let reply = self.table.take(self.reqs[t].id).unwrap();
                self.check_reply(t, reply);
            }
        }
        self.check();
        assert!(self.table.is_empty());
        assert_eq!(self.table.free_slots(), S);
        assert_eq!(self.table.next_deadline(), None);
        assert!(self.reqs.iter().all(|r| r.ends == 1));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn table_matches_model(ops in prop::collection::vec(op(), 1..150)) {
        let mut m = Model::new();
        for op in &ops {
            m.apply(op);
            m.check();
        }
        m.finish();
    }
}

fn msg(name: &str, param: &[u8]) -> Message<NoFds> {
    Message::new(name, param).unwrap()
}

/// Replies (and an ignore) arrive while the request is still being sent: they are matched and
/// counted, but the request completes only at `sending_done`, even past its deadline.
#[test]
fn reply_overtakes_sender() {
    for sync in [false, true] {
        let mut tb = Table::new();
        let waiting = if sync {
            Waiting::Sync(Tag(0))
        } else {
            Waiting::Async(0)
        };
        let id = tb
            .begin(name(0), &[1, 2, 3], at(10), waiting)
            .map_err(|(e, _)| e)
            .unwrap();
        assert!(matches!(
            tb.on_answer(&2, msg("a", b"2"), true),
            Answer::Matched {
                completion: None,
                overflow: None
            }
        ));
        assert!(matches!(
            tb.on_answer(&3, msg("a", b"3"), false),
            Answer::Matched {
                completion: None,
                overflow: None
            }
        ));
        assert_eq!(tb.counters(id), Some((2, 1, 1)));
        // Peer 1 answers too: nothing is owed any more, but the sender has not finished.
        assert!(matches!(
            tb.on_answer(&1, msg("a", b"1"), true),
            Answer::Matched {
                completion: None,
                overflow: None
            }
        ));
        assert_eq!(tb.counters(id), Some((2, 2, 0)));
        assert_eq!(tb.expire(Instant::NEVER, usize::MAX, |_| panic!()), 0);
        assert_eq!(tb.next_deadline(), None);
        if sync {
            assert!(tb.poll(id, Instant::NEVER).unwrap().is_none());
        }
        // The late `send_failed` for a peer that already answered is refused.
        assert!(!tb.send_failed(id, &1));
        let reply = match tb.sending_done(id, at(20)).unwrap() {
            Some(Completion::Wake(Tag(0))) => tb.take(id).unwrap(),
            Some(Completion::Async(f)) => f.reply,
            _ => panic!("must complete at sending_done"),
        };
        assert_eq!(
            (reply.nb_sent, reply.nb_received, reply.timed_out),
            (2, 2, false)
        );
        let peers: Vec<u32> = reply.replies.iter().map(|(p, _)| *p).collect();
        assert_eq!(peers, [2, 1]);
        assert!(tb.is_empty());
        assert_eq!(tb.free_slots(), S);
    }
}

/// A finished request's id stays refused after its record is reused by a new request, by every
/// operation, and using it does not disturb the new request.
#[test]
fn stale_id_after_record_reuse() {
    type One = PendingTable<u32, NoFds, Tag, usize, Sink, Inline<1, 4>>;
    let mut tb = One::new();
    let mut stale = Vec::new();
    for round in 0..3 {
        let sync = round % 2 == 1;
        let waiting = if sync {
            Waiting::Sync(Tag(round))
        } else {
            Waiting::Async(round)
        };
        let id = tb
            .begin(name(0), &[1, 2], at(10), waiting)
            .map_err(|(e, _)| e)
            .unwrap();
        // Only one record: this is the same record as every stale id.
        assert!(!stale.contains(&id));
        assert!(stale.iter().all(|s: &RequestId| s.as_u64() != id.as_u64()));
        for &old in &stale {
            assert_eq!(tb.counters(old), None);
            assert_eq!(tb.deadline(old), None);
            assert!(!tb.send_failed(old, &1));
            assert_eq!(
                tb.sending_done(old, at(0)).err(),
                Some(PendingError::Unknown)
            );
            assert_eq!(tb.poll(old, at(100)).err(), Some(PendingError::Unknown));
            assert_eq!(tb.take(old).err(), Some(PendingError::Unknown));
            assert_eq!(tb.cancel(old).err(), Some(PendingError::Unknown));
        }
        assert_eq!(tb.counters(id), Some((2, 0, 2)));
        assert_eq!(tb.len(), 1);
        assert!(tb.sending_done(id, at(0)).unwrap().is_none());
        assert!(matches!(
            tb.on_answer(&1, msg("a", b"x"), true),
            Answer::Matched {
                completion: None,
                ..
            }
        ));
        // End the request three different ways.
        match round {
            0 => assert!(matches!(
                tb.cancel(id),
                Ok(Cancelled::Pending(Waiting::Async(0)))
            )),
            1 => {
                let r = tb.poll(id, at(10)).unwrap().unwrap();
                assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (2, 1, true));
            }
            _ => {
                let mut n = 0;
                tb.expire(at(10), 1, |c| {
                    assert!(matches!(c, Completion::Async(Finished { callback: 2, .. })));
                    n += 1;
                });
                assert_eq!(n, 1);
            }
        }
        assert!(tb.is_empty());
        assert_eq!(tb.free_slots(), 4);
        stale.push(id);
    }
}

/// Regression: `poll` of an async request whose deadline passed used to complete it and drop
/// its callback unrun (the "exactly one completion" rule broken). It must leave it alone.
#[test]
fn poll_of_async_request_keeps_its_completion() {
    let mut tb = Table::new();
    let id = tb
        .begin(name(0), &[1], at(10), Waiting::Async(7))
        .map_err(|(e, _)| e)
        .unwrap();
    assert!(tb.sending_done(id, at(0)).unwrap().is_none());
    assert_eq!(tb.poll(id, at(10)).err(), Some(PendingError::Unknown));
    assert_eq!(tb.counters(id), Some((1, 0, 1)));
    let mut ran = Vec::new();
    assert_eq!(
        tb.expire(at(10), usize::MAX, |c| match c {
            Completion::Async(f) => ran.push((f.callback, f.reply.timed_out)),
            Completion::Wake(_) => panic!(),
        }),
        1
    );
    assert_eq!(ran, [(7, true)]);
    assert!(tb.is_empty());
}

/// Regression: `send_failed` after `sending_done` used to withdraw the last owed peer without
/// completing the request, which then hung open until its deadline (forever with
/// `Instant::NEVER`) and finally completed as not timed out. The sending phase is over: the peer
/// counts as reached and is still owed.
#[test]
fn send_failed_after_sending_done_is_refused() {
    let mut tb = Table::new();
    let id = tb
        .begin(name(0), &[1], Instant::NEVER, Waiting::Async(7))
        .map_err(|(e, _)| e)
        .unwrap();
    assert!(tb.sending_done(id, at(0)).unwrap().is_none());
    assert!(!tb.send_failed(id, &1));
    assert_eq!(tb.counters(id), Some((1, 0, 1)));
    match tb.on_answer(&1, msg("a", b"r"), true) {
        Answer::Matched {
            completion: Some(Completion::Async(f)),
            overflow: None,
        } => assert_eq!((f.reply.nb_sent, f.reply.nb_received), (1, 1)),
        _ => panic!("the reply completes the request"),
    }
    assert!(tb.is_empty());
}
