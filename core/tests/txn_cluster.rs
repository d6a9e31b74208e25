//! A simulated cluster runs the memory transactions under random schedules and failures.
//!
//! One primary (a `Coordinator` plus an executor over a model of the shared page map and the
//! heap) and up to four secondaries (each with its own set of mapped pages) exchange the real
//! payloads; a secondary syncs as the hugepage crate does: only the range of a sync when it saw
//! the change just before (its change counter is the message's `seq - 1`), everything otherwise; broadcasts go through the real `PendingTable`. proptest picks the operations, the
//! delivery order, which messages arrive late, which allocations, publishes and syncs fail, and
//! which secondaries die or hang. Whatever happens, these must hold:
//! - every request gets exactly one final answer, from the primary (never a requester timeout);
//! - the coordinator emits exactly one reply per request and no action after it;
//! - when pages join the heap, every live secondary has them mapped; a requester that maps its
//!   pages itself (`AllocFlags::REQUESTER_MAPS`) is not asked to sync, its pages join the heap
//!   held for it, and it maps them (from the answer's `seq`) before it hands them to the heap;
//! - at the end, the heap holds exactly the pages in the shared map (nothing leaked, nothing
//!   lost) but those held for requesters that died before their answer, and every live
//!   secondary whose last sync succeeded maps exactly those pages.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use memplane_core::message::{Message, NoFds};
use memplane_core::pending::{Answer, Completion, Finished, Inline, Notify, PendingTable, Waiting};
use memplane_core::time::Instant;
use memplane_core::txn::{
    ACTION_ROLLBACK, ACTION_SYNC, Action, AllocFlags, AllocRequest, Coordinator, FreeRequest,
    MemRange, MemRequest, Origin, Outcome, Requester, SyncJob, SyncOutcome, Timeouts, TxnId,
    TxnMsg, TxnStatus,
};
use proptest::prelude::*;

const PAGE: u64 = 4096;
const NPAGES: u64 = 40;
const BASE: u64 = 0x10_0000_0000;
const MAX_SECONDARIES: usize = 4;

struct NoWake;
impl Notify for NoWake {
    fn notify(&self) {}
}

/// The broadcast a pending request belongs to: (transaction, is it a rollback).
type Bcast = (TxnId, bool);
type Sink = heapless::Vec<(u32, Message<NoFds>), 8>;
type Table = PendingTable<u32, NoFds, NoWake, Bcast, Sink, Inline<16, 64>>;

#[derive(Clone, Debug)]
enum Net {
    /// Requester to primary.
    Request { from: u32, msg: TxnMsg },
    /// Primary to secondary: sync or rollback, as a request named `name`.
    Sync {
        to: u32,
        name: &'static str,
        msg: TxnMsg,
    },
    /// Secondary to primary: the reply to a sync or rollback.
    Ack {
        from: u32,
        name: &'static str,
        msg: TxnMsg,
        late: bool,
    },
    /// Primary to requester: the final answer.
    Response { to: u32, msg: TxnMsg },
}

#[derive(Default)]
struct Secondary {
    dead: bool,
    hung: bool,
    mapped: BTreeSet<u64>,
    /// The map's change counter this secondary's mappings are in line with.
    seq: u64,
    last_sync_ok: bool,
    /// Sync failures to inject, one bit per sync handled.
    fail_bits: u64,
    requester: Option<(Requester, MemRequest)>,
    /// Ranges this secondary allocated and may free later.
    owned: Vec<MemRange>,
}

#[derive(Clone, Debug)]
enum Step {
    Alloc { who: usize, pages: u8, maps: bool },
    Free { who: usize },
    Deliver { pick: usize },
    Advance { ms: u16 },
    Kill { who: usize },
    Hang { who: usize },
    FailNextAlloc,
    FailNextPublish,
}

/// [`Step::Alloc`] by secondary `who` (the primary when `who` is past the secondaries).
fn alloc(who: usize, pages: u8, maps: bool) -> Step {
    Step::Alloc { who, pages, maps }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..=MAX_SECONDARIES, 1u8..4, any::<bool>())
            .prop_map(|(who, pages, maps)| Step::Alloc { who, pages, maps }),
        2 => (0..=MAX_SECONDARIES).prop_map(|who| Step::Free { who }),
        8 => any::<usize>().prop_map(|pick| Step::Deliver { pick }),
        2 => (1u16..300).prop_map(|ms| Step::Advance { ms }),
        1 => (0..MAX_SECONDARIES).prop_map(|who| Step::Kill { who }),
        1 => (0..MAX_SECONDARIES).prop_map(|who| Step::Hang { who }),
        1 => Just(Step::FailNextAlloc),
        1 => Just(Step::FailNextPublish),
    ]
}

struct Cluster {
    now: Instant,
    timeouts: Timeouts,
    coord: Coordinator<u32, 4>,
    table: Table,
    used: BTreeSet<u64>,
    /// The shared map's change counter: bumped by every allocation and free.
    version: u64,
    heap: BTreeSet<u64>,
    /// Pages in the heap held for the requester that maps them itself, until it hands them over
    /// (page -> its transaction).
    held: std::collections::BTreeMap<u64, TxnId>,
    /// Which secondary asked for each transaction.
    requested_by: HashMap<TxnId, u32>,
    secs: Vec<Secondary>,
    net: VecDeque<Net>,
    late_mask: u64,
    rng: u64,
    next_id: u64,
    fail_alloc: bool,
    fail_publish: bool,
    /// The primary's own requests: token -> (request, outcome).
    local: HashMap<u64, (MemRequest, Option<Outcome>)>,
    local_owned: Vec<MemRange>,
    /// Every request: id -> number of final answers the requester took.
    answers: HashMap<TxnId, u32>,
    /// Ids the coordinator replied to, and how often.
    replies: HashMap<TxnId, u32>,
    submitted: HashSet<TxnId>,
    /// Requests whose requester died before its answer: they need none.
    orphaned: HashSet<TxnId>,
    /// What each secondary's transaction asked for.
    requests: HashMap<TxnId, MemRequest>,
}

impl Cluster {
    fn new(n: usize, fail_bits: &[u64], late_mask: u64, seed: u64) -> Self {
        let secs = fail_bits[..n]
            .iter()
            .map(|&bits| Secondary {
                fail_bits: bits,
                last_sync_ok: true,
                ..Default::default()
            })
            .collect();
        Cluster {
            now: Instant::from_nanos(1_000_000_000),
            timeouts: Timeouts {
                step: Duration::from_millis(100),
                margin: Duration::from_millis(20),
            },
            coord: Coordinator::new(Timeouts {
                step: Duration::from_millis(100),
                margin: Duration::from_millis(20),
            }),
            table: Table::new(),
            used: BTreeSet::new(),
            version: 0,
            heap: BTreeSet::new(),
            held: std::collections::BTreeMap::new(),
            requested_by: HashMap::new(),
            secs,
            net: VecDeque::new(),
            late_mask,
            rng: seed | 1,
            next_id: 1,
            fail_alloc: false,
            fail_publish: false,
            local: HashMap::new(),
            local_owned: Vec::new(),
            answers: HashMap::new(),
            replies: HashMap::new(),
            submitted: HashSet::new(),
            orphaned: HashSet::new(),
            requests: HashMap::new(),
        }
    }

    fn rand(&mut self) -> u64 {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn pages(r: &MemRange) -> impl Iterator<Item = u64> {
        let first = (r.addr - BASE) / PAGE;
        first..first + r.len / PAGE
    }

    fn new_id(&mut self) -> TxnId {
        self.next_id += 1;
        TxnId(self.next_id)
    }

    // ----- requests -------------------------------------------------------------------------

    fn alloc(&mut self, who: usize, pages: u8, maps: bool) {
        let req = MemRequest::Alloc(AllocRequest {
            heap: 0,
            node: None,
            page_size: PAGE,
            bytes: pages as u64 * PAGE - 100,
            align: 0,
            // The primary's own requests carry it too sometimes: it must be ignored there.
            flags: if maps {
                AllocFlags::REQUESTER_MAPS
            } else {
                AllocFlags::default()
            },
        });
        self.request(who, req);
    }

    fn free(&mut self, who: usize) {
        let range = if who == self.secs.len() {
            self.local_owned.pop()
        } else {
            self.secs.get_mut(who).and_then(|s| s.owned.pop())
        };
        let Some(range) = range else { return };
        // The pages may have been returned already by a rollback elsewhere? No: owned ranges
        // are published, and only their owner frees them. Take them out of the heap first.
        for p in Self::pages(&range) {
            assert!(self.heap.remove(&p), "owned page {p} not in the heap");
        }
        let req = MemRequest::Free(FreeRequest { heap: 0, range });
        if !self.request(who, req) {
            // Never sent: put the pages back ourselves.
            for p in Self::pages(&range) {
                self.heap.insert(p);
            }
        }
    }

    /// Starts a request from secondary `who` (or the primary itself when `who` is past the
    /// secondaries). Returns false if it could not start.
    fn request(&mut self, who: usize, req: MemRequest) -> bool {
        let id = self.new_id();
        if who >= self.secs.len() {
            self.submitted.insert(id);
            self.local.insert(id.0, (req, None));
            self.coord.submit(Origin::Local(id.0), id, req, self.now);
            self.run_actions();
            return true;
        }
        let s = &mut self.secs[who];
        if s.dead || s.hung || s.requester.is_some() {
            return false;
        }
        let (r, msg) = Requester::new(id, req, self.now, &self.timeouts);
        s.requester = Some((r, req));
        self.submitted.insert(id);
        self.net.push_back(Net::Request {
            from: who as u32,
            msg,
        });
        true
    }

    /// A requester took its final answer.
    fn answered(&mut self, who: Option<usize>, id: TxnId, req: MemRequest, outcome: Outcome) {
        *self.answers.entry(id).or_default() += 1;
        let Outcome::Done { status, range, seq } = outcome else {
            panic!("request {id:?} ended with {outcome:?}: the primary must always answer first");
        };
        match req {
            MemRequest::Alloc(a) => {
                if status.is_ok() {
                    assert!(range.len > 0);
                    if let Some(w) = who.filter(|_| a.flags.contains(AllocFlags::REQUESTER_MAPS)) {
                        // Map the pages as a sync with the answer's `seq` would, then hand them
                        // to the heap.
                        let s = &mut self.secs[w];
                        if s.seq + 1 == seq {
                            for p in Self::pages(&range) {
                                s.mapped.insert(p);
                            }
                            s.seq = seq;
                        } else if s.seq < seq {
                            s.mapped = self.used.clone();
                            s.seq = self.version;
                        }
                        for p in Self::pages(&range) {
                            assert!(s.mapped.contains(&p), "requester {w} did not map page {p}");
                            assert_eq!(self.held.remove(&p), Some(id), "page {p} not held for {w}");
                            assert!(self.heap.insert(p), "page {p} in the heap twice");
                        }
                    }
                    let owned = match who {
                        Some(w) => &mut self.secs[w].owned,
                        None => &mut self.local_owned,
                    };
                    owned.push(range);
                } else {
                    assert_eq!(range.len, 0, "failed allocation reports pages");
                }
            }
            MemRequest::Free(f) => {
                if range.len == 0 {
                    // Not freed: the primary has put the pages back into the heap already.
                    for p in Self::pages(&f.range) {
                        assert!(self.heap.contains(&p), "unfreed page {p} not restored");
                    }
                } else {
                    assert_eq!(range, f.range);
                }
            }
        }
    }

    // ----- the primary's executor -----------------------------------------------------------

    fn run_actions(&mut self) {
        let mut guard = 0;
        while let Some(a) = self.coord.poll_action() {
            guard += 1;
            assert!(guard < 1000, "action livelock");
            if let Some(id) = action_id(&a) {
                assert!(
                    !self.replies.contains_key(&id),
                    "action {a:?} after the reply of {id:?}"
                );
            }
            self.execute(a);
        }
    }

    fn execute(&mut self, a: Action<u32>) {
        let now = self.now;
        match a {
            Action::AllocatePages { id, req } => {
                let n = req.bytes.div_ceil(PAGE);
                let result = if std::mem::take(&mut self.fail_alloc) {
                    Err(TxnStatus::NoMemory)
                } else {
                    match (0..=NPAGES - n).find(|&f| (f..f + n).all(|p| !self.used.contains(&p))) {
                        Some(first) => {
                            self.used.extend(first..first + n);
                            self.version += 1;
                            Ok(MemRange {
                                addr: BASE + first * PAGE,
                                len: n * PAGE,
                            })
                        }
                        None => Err(TxnStatus::NoMemory),
                    }
                };
                self.coord.pages_allocated(id, result, now).unwrap();
            }
            Action::FreePages {
                id,
                range,
                rollback,
                ..
            } => {
                for p in Self::pages(&range) {
                    assert!(self.used.remove(&p), "freeing page {p} that is not in use");
                    assert!(
                        !self.heap.contains(&p),
                        "freeing page {p} still in the heap"
                    );
                }
                let _ = rollback;
                self.version += 1;
                self.coord.pages_freed(id, Ok(()), now).unwrap();
            }
            Action::BroadcastSync { id, range, skip } => {
                let seq = self.version;
                let msg = TxnMsg::Sync { id, range, seq };
                self.broadcast(ACTION_SYNC, msg, (id, false), skip)
            }
            Action::BroadcastRollback { id, range } => {
                let seq = self.version;
                let msg = TxnMsg::Rollback { id, range, seq };
                self.broadcast(ACTION_ROLLBACK, msg, (id, true), None)
            }
            Action::Publish {
                id, range, held, ..
            } => {
                if std::mem::take(&mut self.fail_publish) {
                    self.coord
                        .published(id, Err(TxnStatus::Failed), now)
                        .unwrap();
                    return;
                }
                let requester = self.requested_by.get(&id).copied();
                for (i, s) in self.secs.iter().enumerate() {
                    if held && requester == Some(i as u32) {
                        continue;
                    }
                    if !s.dead {
                        for p in Self::pages(&range) {
                            assert!(
                                s.mapped.contains(&p),
                                "page {p} joins the heap but secondary {i} does not map it"
                            );
                        }
                    }
                }
                assert_eq!(held, requester.is_some_and(|_| self.maps_itself(id)));
                for p in Self::pages(&range) {
                    assert!(self.used.contains(&p));
                    let fresh = if held {
                        !self.heap.contains(&p) && self.held.insert(p, id).is_none()
                    } else {
                        !self.held.contains_key(&p) && self.heap.insert(p)
                    };
                    assert!(fresh, "page {p} published twice");
                }
                self.coord.published(id, Ok(()), now).unwrap();
            }
            Action::Restore { range, .. } => {
                for p in Self::pages(&range) {
                    assert!(self.used.contains(&p), "restoring page {p} not in the map");
                    assert!(
                        self.heap.insert(p),
                        "restoring page {p} already in the heap"
                    );
                }
            }
            Action::Reply {
                to,
                id,
                status,
                range,
            } => {
                *self.replies.entry(id).or_default() += 1;
                let seq = self.version;
                let msg = TxnMsg::Response {
                    id,
                    status,
                    range,
                    seq,
                };
                match to {
                    Origin::Local(tok) => {
                        let (req, out) = self.local.get_mut(&tok).unwrap();
                        assert!(out.is_none());
                        let req = *req;
                        let o = Outcome::Done { status, range, seq };
                        *out = Some(o);
                        self.answered(None, id, req, o);
                    }
                    Origin::Peer(p) => {
                        if self.secs[p as usize].dead {
                            self.orphan_response(p as usize, &msg);
                        } else {
                            self.net.push_back(Net::Response { to: p, msg });
                        }
                    }
                }
            }
        }
    }

    /// The requester is dead: the response cannot be sent. What it asked must not leak.
    fn orphan_response(&mut self, _who: usize, msg: &TxnMsg) {
        let TxnMsg::Response { id, .. } = *msg else {
            return;
        };
        self.orphaned.insert(id);
    }

    /// Whether the secondary that asked for transaction `id` maps its pages itself.
    fn maps_itself(&self, id: TxnId) -> bool {
        self.requests.get(&id).is_some_and(
            |r| matches!(r, MemRequest::Alloc(a) if a.flags.contains(AllocFlags::REQUESTER_MAPS)),
        )
    }

    fn broadcast(&mut self, name: &'static str, msg: TxnMsg, b: Bcast, skip: Option<u32>) {
        let peers: Vec<u32> = (0..self.secs.len() as u32)
            .filter(|p| Some(*p) != skip)
            .collect();
        let deadline = self.now.saturating_add(self.timeouts.step);
        let id = self
            .table
            .begin(
                memplane_core::Name::new(name).unwrap(),
                &peers,
                deadline,
                Waiting::Async(b),
            )
            .unwrap_or_else(|(e, _)| panic!("broadcast refused: {e}"));
        for &p in &peers {
            if self.secs[p as usize].dead {
                // The socket is gone: not counted as sent.
                assert!(self.table.send_failed(id, &p));
            } else {
                self.net.push_back(Net::Sync { to: p, name, msg });
            }
        }
        if let Some(c) = self.table.sending_done(id, self.now).unwrap() {
            self.broadcast_done(c);
        }
    }

    fn broadcast_done(&mut self, c: Completion<NoWake, Bcast, Sink>) {
        let Completion::Async(Finished {
            callback: (id, rollback),
            reply,
            ..
        }) = c
        else {
            panic!("sync completion")
        };
        let outcome = SyncOutcome::from_answers(
            id,
            reply.nb_sent,
            reply.replies.iter().map(|(_, m)| m.param()),
        );
        let now = self.now;
        let r = if rollback {
            self.coord.rollback_done(id, outcome, now)
        } else {
            self.coord.sync_done(id, outcome, now)
        };
        // The coordinator's own backstop may have ended the step first: then this is stale.
        let _ = r;
        self.run_actions();
    }

    // ----- delivery -------------------------------------------------------------------------

    fn deliver(&mut self, pick: usize) {
        if self.net.is_empty() {
            return;
        }
        let i = pick % self.net.len();
        let m = self.net.remove(i).unwrap();
        self.handle(m);
    }

    fn handle(&mut self, m: Net) {
        let now = self.now;
        match m {
            Net::Request { from, msg } => {
                // Decode what the requester encoded, as the primary would.
                let msg = TxnMsg::decode(msg.to_param().as_slice()).unwrap();
                let TxnMsg::Request { id, req } = msg else {
                    panic!()
                };
                self.requested_by.insert(id, from);
                self.requests.insert(id, req);
                self.coord.submit(Origin::Peer(from), id, req, now);
                self.run_actions();
            }
            Net::Sync { to, name, msg } => {
                let bit = {
                    let s = &mut self.secs[to as usize];
                    if s.dead || s.hung {
                        return;
                    }
                    let bit = s.fail_bits & 1 == 1;
                    s.fail_bits = s.fail_bits.rotate_right(1);
                    bit
                };
                let job = SyncJob::decode(msg.to_param().as_slice()).unwrap();
                let status = if bit {
                    self.secs[to as usize].last_sync_ok = false;
                    TxnStatus::Failed
                } else {
                    let s = &mut self.secs[to as usize];
                    if job.seq != 0 && s.seq >= job.seq {
                        // Already in line with this change or a later state.
                    } else if job.seq != 0 && s.seq + 1 == job.seq {
                        // Only this change happened since: bring its range in line.
                        for p in Self::pages(&job.range) {
                            if self.used.contains(&p) {
                                s.mapped.insert(p);
                            } else {
                                s.mapped.remove(&p);
                            }
                        }
                        s.seq = job.seq;
                    } else {
                        s.mapped = self.used.clone();
                        s.seq = self.version;
                    }
                    s.last_sync_ok = true;
                    TxnStatus::Ok
                };
                let late = self.late_mask & 1 == 1;
                self.late_mask = self.late_mask.rotate_right(1);
                self.net.push_back(Net::Ack {
                    from: to,
                    name,
                    msg: job.ack(status),
                    late,
                });
            }
            Net::Ack {
                from, name, msg, ..
            } => {
                let m = Message::new(name, msg.to_param().as_slice()).unwrap();
                match self.table.on_answer(&from, m, true) {
                    Answer::Matched {
                        completion: Some(c),
                        ..
                    } => self.broadcast_done(c),
                    Answer::Matched { .. } | Answer::Unmatched(_) => {}
                }
            }
            Net::Response { to, msg } => {
                let s = &mut self.secs[to as usize];
                if s.dead || s.hung {
                    self.orphan_response(to as usize, &msg);
                    return;
                }
                let Some((r, req)) = s.requester.as_mut() else {
                    panic!("response to a secondary with no request")
                };
                let req = *req;
                if let Some(o) = r.on_message(&msg) {
                    let id = r.id();
                    s.requester = None;
                    self.answered(Some(to as usize), id, req, o);
                }
            }
        }
    }

    /// Delivers every message except late acks, in random order.
    fn flush(&mut self) {
        let mut guard = 0;
        loop {
            let ready: Vec<usize> = (self.net.iter().enumerate())
                .filter(|(_, m)| !matches!(m, Net::Ack { late: true, .. }))
                .map(|(j, _)| j)
                .collect();
            if ready.is_empty() {
                return;
            }
            guard += 1;
            assert!(guard < 10_000, "delivery livelock");
            let idx = ready[(self.rand() as usize) % ready.len()];
            let m = self.net.remove(idx).unwrap();
            self.handle(m);
        }
    }

    /// Moves time forward by `d`, firing every deadline on the way at its own instant. Apart from
    /// late acks, messages arrive before time moves on.
    fn advance(&mut self, d: Duration) {
        let target = self.now.saturating_add(d);
        loop {
            self.flush();
            match self.next_deadline() {
                Some(t) if t <= target => {
                    self.now = self.now.max(t);
                    self.fire_timers();
                }
                _ => break,
            }
        }
        self.now = target;
        self.fire_timers();
    }

    fn fire_timers(&mut self) {
        let now = self.now;
        let mut done = Vec::new();
        while self.table.expire(now, 8, |c| done.push(c)) == 8 {}
        for c in done {
            self.broadcast_done(c);
        }
        while self.coord.poll_timeout().is_some_and(|t| t <= now) {
            self.coord.handle_timeout(now);
            self.run_actions();
        }
        // Answers sent at this instant arrive before a requester's deadline at the same instant.
        self.flush();
        for i in 0..self.secs.len() {
            let s = &mut self.secs[i];
            if let Some((r, req)) = s.requester.as_mut() {
                let req = *req;
                if let Some(o) = r.on_timeout(now) {
                    let id = r.id();
                    s.requester = None;
                    self.answered(Some(i), id, req, o);
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut d = [
            self.table.next_deadline(),
            self.coord.poll_timeout(),
            self.secs
                .iter()
                .filter_map(|s| s.requester.as_ref().map(|(r, _)| r.deadline()))
                .min(),
        ];
        d.sort();
        d.into_iter().flatten().next()
    }

    fn run(&mut self, s: Step) {
        match s {
            Step::Alloc { who, pages, maps } => self.alloc(who.min(self.secs.len()), pages, maps),
            Step::Free { who } => self.free(who.min(self.secs.len())),
            Step::Deliver { pick } => self.deliver(pick),
            Step::Advance { ms } => self.advance(Duration::from_millis(ms as u64)),
            Step::Kill { who } => {
                if let Some(s) = self.secs.get_mut(who) {
                    s.dead = true;
                    // A dead requester takes no answer.
                    if let Some((r, _)) = s.requester.take() {
                        self.orphaned.insert(r.id());
                    }
                }
            }
            Step::Hang { who } => {
                if let Some(s) = self.secs.get_mut(who) {
                    // A hung secondary stops reading; as a requester it is treated as dead.
                    s.hung = true;
                    if let Some((r, _)) = s.requester.take() {
                        self.orphaned.insert(r.id());
                    }
                }
            }
            Step::FailNextAlloc => self.fail_alloc = true,
            Step::FailNextPublish => self.fail_publish = true,
        }
    }

    /// Delivers everything and lets every deadline pass until nothing is left to happen.
    fn settle(&mut self) {
        for _ in 0..100_000 {
            if !self.net.is_empty() {
                let pick = self.rand() as usize;
                self.deliver(pick);
                continue;
            }
            match self.next_deadline() {
                Some(t) => {
                    let d = t.saturating_duration_since(self.now);
                    self.advance(d);
                }
                None => return,
            }
        }
        panic!("the cluster did not settle");
    }

    fn check_end(&self) {
        assert!(self.coord.is_idle(), "coordinator still busy");
        assert!(self.table.is_empty(), "broadcasts still pending");
        for id in &self.submitted {
            assert_eq!(
                self.replies.get(id),
                Some(&1),
                "coordinator replies for {id:?}"
            );
            let answers = self.answers.get(id).copied().unwrap_or(0);
            if self.orphaned.contains(id) {
                assert!(answers <= 1);
            } else {
                assert_eq!(answers, 1, "final answers for {id:?}");
            }
        }
        // Pages owned by requesters that died before hearing back still sit in the heap (held
        // for them, if they were to map them themselves); the heap and the shared map agree
        // exactly.
        let mut all = self.heap.clone();
        for (p, id) in &self.held {
            assert!(all.insert(*p), "page {p} both free and held");
            assert!(
                self.orphaned.contains(id) && self.answers.get(id).copied().unwrap_or(0) == 0,
                "page {p} still held for {id:?}, whose requester took its answer or lives"
            );
        }
        assert_eq!(all, self.used, "heap and shared map disagree");
        for (i, s) in self.secs.iter().enumerate() {
            if !s.dead && !s.hung && s.last_sync_ok {
                assert_eq!(s.mapped, self.used, "secondary {i} out of line");
            }
        }
    }
}

fn action_id(a: &Action<u32>) -> Option<TxnId> {
    Some(match a {
        Action::AllocatePages { id, .. }
        | Action::FreePages { id, .. }
        | Action::BroadcastSync { id, .. }
        | Action::BroadcastRollback { id, .. }
        | Action::Publish { id, .. }
        | Action::Restore { id, .. }
        | Action::Reply { id, .. } => *id,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn transactions_stay_consistent(
        n in 1usize..=MAX_SECONDARIES,
        fail_bits in proptest::collection::vec(
            prop_oneof![3 => Just(0u64), 1 => any::<u64>()], MAX_SECONDARIES),
        late_mask in prop_oneof![2 => Just(0u64), 1 => any::<u64>()],
        seed in any::<u64>(),
        steps in proptest::collection::vec(step(), 0..80),
    ) {
        let mut c = Cluster::new(n, &fail_bits, late_mask, seed);
        for s in steps {
            c.run(s);
        }
        c.settle();
        c.check_end();
    }
}

/// A secondary that never answers makes the allocation roll back after the step timeout; the
/// requester still gets the primary's answer, and no page stays behind.
#[test]
fn regression_hung_secondary_rolls_back() {
    let mut c = Cluster::new(2, &[0, 0, 0, 0], 0, 7);
    c.run(Step::Hang { who: 1 });
    c.run(alloc(0, 2, false));
    c.settle();
    c.check_end();
    assert!(c.used.is_empty());
    assert_eq!(c.coord.stats().rolled_back, 1);
}

/// Late acks (after the broadcast's deadline) are dropped, and the rollback that follows
/// leaves everything consistent.
#[test]
fn regression_late_acks_after_deadline() {
    let mut c = Cluster::new(3, &[0, 0, 0, 0], u64::MAX, 11);
    c.run(alloc(0, 1, false));
    c.run(Step::Advance { ms: 1 });
    c.run(Step::Advance { ms: 250 });
    c.settle();
    c.check_end();
}

/// A requester that dies right after sending: the pages it asked for end up in the heap
/// (shared), not leaked.
#[test]
fn regression_requester_dies() {
    let mut c = Cluster::new(2, &[0, 0, 0, 0], 0, 3);
    c.run(alloc(0, 3, false));
    c.run(Step::Kill { who: 0 });
    c.settle();
    c.check_end();
    assert_eq!(c.heap.len(), 3);
}

/// A secondary that dies after the sync was queued to it never answers: the allocation rolls
/// back after the step timeout and nothing stays mapped in the shared map.
#[test]
fn regression_secondary_dies_after_sync_sent() {
    let mut c = Cluster::new(2, &[0, 0, 0, 0], 0, 3);
    c.run(alloc(0, 3, false));
    c.run(Step::Deliver { pick: 0 });
    c.run(Step::Kill { who: 1 });
    c.settle();
    c.check_end();
    assert!(c.used.is_empty());
    assert_eq!(c.coord.stats().rolled_back, 1);
}

/// Queue overflow and queue expiry answer Busy; the pages of a refused free go back.
#[test]
fn regression_busy_queue() {
    let mut c = Cluster::new(4, &[0, 0, 0, 0], 0, 5);
    c.run(Step::Hang { who: 3 });
    for who in 0..3 {
        c.run(alloc(who, 1, false));
    }
    for _ in 0..6 {
        c.run(alloc(4, 1, false));
    }
    c.settle();
    c.check_end();
}

/// A requester that maps its pages itself is not asked to sync; the other secondary is, before
/// the pages join the heap (held for the requester); the requester maps them from the answer and
/// hands them over.
#[test]
fn requester_maps_its_own_pages() {
    let mut c = Cluster::new(2, &[0, 0, 0, 0], 0, 11);
    c.run(alloc(0, 2, true));
    c.settle();
    c.check_end();
    assert_eq!(c.used.len(), 2);
    assert!(c.held.is_empty());
    assert_eq!(c.secs[0].mapped, c.used);
    assert_eq!(c.secs[1].mapped, c.used);
}

/// A requester that maps its pages itself and dies before its answer leaves them held for it
/// (as any block of a dead process): accounted, not lost, not handed to anyone.
#[test]
fn a_dead_requester_leaves_its_held_pages_accounted() {
    let mut c = Cluster::new(2, &[0, 0, 0, 0], 0, 13);
    c.run(alloc(1, 1, true));
    // Deliver the request, the sync to the other secondary and its ack; not the response.
    for _ in 0..3 {
        c.run(Step::Deliver { pick: 0 });
    }
    c.run(Step::Kill { who: 1 });
    c.settle();
    c.check_end();
    assert_eq!(c.held.len(), 1);
}
