//! The pending-request table: requests that wait for replies, and how replies find them.
//!
//! A request goes to a set of peers. The table keeps one *record* per request (name, deadline,
//! counters, the replies collected so far, and how to tell the requester: wake a waiting thread
//! or hand over an async callback) and one *slot* per (request, peer) still owed an answer.
//!
//! Counting follows DPDK's `rte_mp_reply`: `nb_sent` is the number of peers the request was
//! handed to, minus those that answered "ignore"; `nb_received` counts the replies stored. A
//! request completes when every slot is answered, or when its deadline passes; then exactly one
//! [`Completion`] leaves the table for it, or its [`Cancelled`] leaves through
//! [`PendingTable::cancel`], never both.
//!
//! **Matching.** DPDK's wire format carries no request id: a reply is matched by (peer, name).
//! So two requests with the same name to the same peer cannot both be pending: the second is
//! refused with [`PendingError::InFlight`] (DPDK's `EEXIST`), and their replies are never mixed.
//! A reply that finds no slot (late after a timeout, a duplicate, or unknown) is handed back as
//! unmatched for the caller to drop and count. One ambiguity is inherent to the format and is
//! documented rather than hidden: if a request times out and a new request with the same name
//! goes to the same peer, a late reply to the first arriving after the second was sent cannot be
//! told apart from the second's reply.
//!
//! **Sending.** The table never holds a lock across a send: a request is entered with all its
//! slots first (so a reply that overtakes the sender is matched), sends happen outside, failed
//! sends are withdrawn with [`PendingTable::send_failed`], and [`PendingTable::sending_done`]
//! ends the sending phase. A request cannot complete while it is still being sent.
//!
//! Lookups go through a hash index over (peer, name): O(1) expected per reply.

use core::fmt;
use core::hash::{Hash, Hasher};
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};

use crate::message::{Fds, Message};
use crate::name::Name;
use crate::time::Instant;

const NIL: u32 = u32::MAX;

/// Identifies one pending request. Stale ids (of finished requests) are recognised and refused.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId {
    index: u32,
    generation: u32,
}

impl RequestId {
    /// A stable number for logs.
    pub fn as_u64(self) -> u64 {
        ((self.generation as u64) << 32) | self.index as u64
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({}#{})", self.index, self.generation)
    }
}

/// Wakes a thread blocked in a synchronous request. Stored in the table while it waits.
pub trait Notify {
    /// Wakes the waiter. A notification sent before the waiter blocks must not be lost.
    fn notify(&self);
}

/// Where a request's replies are collected until it completes.
pub trait ReplySink<P, F>: Default {
    /// Stores one reply from `from`. Returns it back if the sink cannot take more.
    #[allow(clippy::result_large_err)] // handing the message back is the point: its fds close
    fn push(&mut self, from: P, msg: Message<F>) -> Result<(), Message<F>>;
}

impl<P, F, const N: usize> ReplySink<P, F> for heapless::Vec<(P, Message<F>), N> {
    #[allow(clippy::result_large_err)]
    fn push(&mut self, from: P, msg: Message<F>) -> Result<(), Message<F>> {
        heapless::Vec::push(self, (from, msg)).map_err(|(_, m)| m)
    }
}

/// How a requester learns that its request completed.
pub enum Waiting<N, C> {
    /// A thread waits; wake it with this handle.
    Sync(N),
    /// Run this completion (a callback, a channel sender...) with the replies.
    Async(C),
}

/// The result of a request: DPDK's `rte_mp_reply`, plus whether the deadline cut it short.
#[derive(Debug)]
pub struct Reply<K> {
    /// Peers the request reached, minus those that answered "ignore".
    pub nb_sent: u32,
    /// Replies received (and stored in `replies`).
    pub nb_received: u32,
    /// The deadline passed before every peer answered.
    pub timed_out: bool,
    /// The replies, each with the peer that sent it.
    pub replies: K,
}

/// What leaves the table when a request completes.
pub enum Completion<N, C, K> {
    /// A synchronous request is complete: wake its thread, which then takes the reply with
    /// [`PendingTable::take`].
    Wake(N),
    /// An asynchronous request is complete: run its callback with its reply.
    Async(Finished<C, K>),
}

/// A completed asynchronous request, out of the table: run `callback` with `reply`, once.
pub struct Finished<C, K> {
    /// The request.
    pub id: RequestId,
    /// Its name.
    pub name: Name,
    /// The callback given at [`PendingTable::begin`].
    pub callback: C,
    /// What came back.
    pub reply: Reply<K>,
}

impl<N, C, K> fmt::Debug for Completion<N, C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Completion::Wake(_) => f.write_str("Completion::Wake"),
            Completion::Async(d) => write!(f, "Completion::Async({:?}, {})", d.id, d.name),
        }
    }
}

/// What [`PendingTable::cancel`] hands back: whatever had not yet left the table.
pub enum Cancelled<N, C, K> {
    /// The request had not completed: its waiter handle or callback, never run.
    Pending(Waiting<N, C>),
    /// A synchronous request had completed but its reply was not taken yet.
    Completed(Reply<K>),
}

/// What happened to an answer (reply or ignore) given to [`PendingTable::on_answer`].
pub enum Answer<N, C, K, F> {
    /// It belonged to a pending request; the request may have completed with it.
    Matched {
        /// The request's completion, if this answer was the last one owed.
        completion: Option<Completion<N, C, K>>,
        /// The reply itself, handed back when the request's reply sink was full (to drop and
        /// count); the peer still counts as answered.
        overflow: Option<Message<F>>,
    },
    /// Nobody waits for it (late, duplicate, unknown): here it is back, to drop and count.
    Unmatched(Message<F>),
}

/// Why a request could not be entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingError {
    /// Every request record is in use.
    TableFull {
        /// The number of records.
        capacity: usize,
    },
    /// Not enough free (request, peer) slots for this many peers.
    NoSlots {
        /// Slots needed.
        needed: usize,
        /// Slots free.
        free: usize,
    },
    /// A request with this name to one of these peers is already pending (DPDK's `EEXIST`).
    InFlight(Name),
    /// The same peer appears twice in one request's peer list.
    DuplicatePeer,
    /// No such request (finished, cancelled, or never existed).
    Unknown,
}

impl fmt::Display for PendingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PendingError::TableFull { capacity } => {
                write!(f, "too many requests in flight (limit {capacity})")
            }
            PendingError::NoSlots { needed, free } => write!(
                f,
                "request needs {needed} peer slots but only {free} are free"
            ),
            PendingError::InFlight(n) => write!(
                f,
                "a request named {n} to the same peer is still pending; replies carry no id, so \
                 it must complete first"
            ),
            PendingError::DuplicatePeer => f.write_str("a peer appears twice in one request"),
            PendingError::Unknown => f.write_str("no such pending request"),
        }
    }
}

impl core::error::Error for PendingError {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Open,
    /// A sync request that completed; its reply waits for [`PendingTable::take`].
    Done,
}

/// One request record (opaque; storage only creates vacant ones).
pub struct Record<N, C, K> {
    generation: u32,
    state: State,
    name: Option<Name>,
    deadline: Instant,
    sending: bool,
    nb_sent: u32,
    nb_received: u32,
    outstanding: u32,
    timed_out: bool,
    first_slot: u32,
    waiting: Option<Waiting<N, C>>,
    replies: K,
    next_free: u32,
}

/// One (request, peer) slot (opaque; storage only creates vacant ones).
pub struct Slot<P> {
    peer: Option<P>,
    record: u32,
    next_in_record: u32,
    next_in_bucket: u32,
    hash: u64,
}

impl<N, C, K: Default> Record<N, C, K> {
    /// A vacant record.
    pub fn vacant() -> Self {
        Record {
            generation: 0,
            state: State::Free,
            name: None,
            deadline: Instant::NEVER,
            sending: false,
            nb_sent: 0,
            nb_received: 0,
            outstanding: 0,
            timed_out: false,
            first_slot: NIL,
            waiting: None,
            replies: K::default(),
            next_free: NIL,
        }
    }
}

impl<P> Slot<P> {
    /// A vacant slot.
    pub fn vacant() -> Self {
        Slot {
            peer: None,
            record: NIL,
            next_in_record: NIL,
            next_in_bucket: NIL,
            hash: 0,
        }
    }
}

/// A multiply-rotate hash taking 8 bytes a step, enough to spread (peer, name) keys over the
/// buckets (not a defence against chosen keys: peers are processes of the same user).
struct KeyHasher(u64);

impl KeyHasher {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;

    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(Self::K);
    }
}

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        // The bucket index takes the low bits: fold the well-mixed high ones in.
        self.0 ^ (self.0 >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            // The length keeps "ab" and "ab\0" apart.
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }
}

fn key_hash<P: Hash>(peer: &P, name: &Name) -> u64 {
    let mut h = KeyHasher(0xcbf2_9ce4_8422_2325);
    peer.hash(&mut h);
    name.hash(&mut h);
    h.finish()
}

/// A fixed-size array the table keeps its parts in, seen as a slice: an array inline, or a
/// boxed slice the host allocated.
pub struct Slab<T, B>(B, PhantomData<fn() -> T>);

impl<T, B: AsRef<[T]>> Deref for Slab<T, B> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.0.as_ref()
    }
}

impl<T, B: AsRef<[T]> + AsMut<[T]>> DerefMut for Slab<T, B> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.0.as_mut()
    }
}

/// Where a table's records, slots and hash buckets live. The capacities are the lengths the
/// storage hands out; they never change. [`Inline`] keeps them in arrays (`no_std`, no
/// allocator: the table is one big value); a std host can box them so that no stack ever holds
/// the whole table.
pub trait Storage<P, N, C, K> {
    /// The request records.
    type Records: AsRef<[Record<N, C, K>]> + AsMut<[Record<N, C, K>]>;
    /// The (request, peer) slots.
    type Slots: AsRef<[Slot<P>]> + AsMut<[Slot<P>]>;
    /// Hash buckets over the slots (any length from 1; the slot count is a good choice).
    type Buckets: AsRef<[u32]> + AsMut<[u32]>;
    /// Fresh, vacant parts (see [`Record::vacant`], [`Slot::vacant`]; buckets any value).
    fn allocate() -> (Self::Records, Self::Slots, Self::Buckets);
}

/// Inline storage: `R` records and `S` slots in arrays.
pub struct Inline<const R: usize, const S: usize>;

impl<P, N, C, K: Default, const R: usize, const S: usize> Storage<P, N, C, K> for Inline<R, S> {
    type Records = [Record<N, C, K>; R];
    type Slots = [Slot<P>; S];
    type Buckets = [u32; S];
    fn allocate() -> (Self::Records, Self::Slots, Self::Buckets) {
        (
            core::array::from_fn(|_| Record::vacant()),
            core::array::from_fn(|_| Slot::vacant()),
            [NIL; S],
        )
    }
}

/// The table, with its parts in storage `St`.
///
/// Type parameters: `P` the peer address, `F` the fd set, `N` the sync waiter's [`Notify`]
/// handle, `C` the async completion, `K` the [`ReplySink`], `St` the [`Storage`].
pub struct PendingTable<P, F, N, C, K, St: Storage<P, N, C, K>> {
    records: Slab<Record<N, C, K>, St::Records>,
    slots: Slab<Slot<P>, St::Slots>,
    buckets: Slab<u32, St::Buckets>,
    free_record: u32,
    free_slot: u32,
    free_slots: usize,
    open: usize,
    _fds: PhantomData<fn() -> F>,
}

impl<P, F, N, C, K, St> Default for PendingTable<P, F, N, C, K, St>
where
    P: Clone + Eq + Hash,
    F: Fds,
    N: Notify,
    K: ReplySink<P, F>,
    St: Storage<P, N, C, K>,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<P, F, N, C, K, St> PendingTable<P, F, N, C, K, St>
where
    P: Clone + Eq + Hash,
    F: Fds,
    N: Notify,
    K: ReplySink<P, F>,
    St: Storage<P, N, C, K>,
{
    /// An empty table over freshly allocated storage.
    ///
    /// # Panics
    /// If the storage hands out no record, no slot or no bucket, or more than `u32::MAX - 1`
    /// of either: a configuration error caught at construction.
    pub fn new() -> Self {
        let (records, slots, buckets) = St::allocate();
        let mut t = PendingTable {
            records: Slab(records, PhantomData),
            slots: Slab(slots, PhantomData),
            buckets: Slab(buckets, PhantomData),
            free_record: 0,
            free_slot: 0,
            free_slots: 0,
            open: 0,
            _fds: PhantomData,
        };
        let (r, s) = (t.records.len(), t.slots.len());
        assert!(
            r > 0 && s > 0 && !t.buckets.is_empty() && r < NIL as usize && s < NIL as usize,
            "pending table storage must hold 1..u32::MAX records, slots and buckets"
        );
        for (i, rec) in t.records.iter_mut().enumerate() {
            *rec = Record::vacant();
            rec.next_free = if i + 1 < r { (i + 1) as u32 } else { NIL };
        }
        for (i, slot) in t.slots.iter_mut().enumerate() {
            *slot = Slot::vacant();
            slot.next_in_record = if i + 1 < s { (i + 1) as u32 } else { NIL };
        }
        t.buckets.fill(NIL);
        t.free_slots = s;
        t
    }

    /// How many requests the table holds at most.
    pub fn capacity(&self) -> usize {
        self.records.len()
    }

    /// Requests currently in the table (open or completed but not yet taken).
    pub fn len(&self) -> usize {
        self.open
    }

    /// True when no request is in the table.
    pub fn is_empty(&self) -> bool {
        self.open == 0
    }

    /// Free (request, peer) slots.
    pub fn free_slots(&self) -> usize {
        self.free_slots
    }

    fn find_slot(&self, peer: &P, name: &Name) -> Option<u32> {
        let h = key_hash(peer, name);
        let mut i = self.buckets[(h % self.buckets.len() as u64) as usize];
        while i != NIL {
            let s = &self.slots[i as usize];
            if s.hash == h
                && s.peer.as_ref() == Some(peer)
                && self.records[s.record as usize].name.as_ref() == Some(name)
            {
                return Some(i);
            }
            i = s.next_in_bucket;
        }
        None
    }

    fn record(&self, id: RequestId) -> Option<&Record<N, C, K>> {
        let r = self.records.get(id.index as usize)?;
        (r.state != State::Free && r.generation == id.generation).then_some(r)
    }

    fn record_mut(&mut self, id: RequestId) -> Option<&mut Record<N, C, K>> {
        let r = self.records.get_mut(id.index as usize)?;
        (r.state != State::Free && r.generation == id.generation).then_some(r)
    }

    /// Enters a request named `name` to `peers`, due at `deadline`.
    ///
    /// All slots are entered at once, before anything is sent. On refusal the `waiting` handle is
    /// handed back untouched (a callback is then never run).
    pub fn begin(
        &mut self,
        name: Name,
        peers: &[P],
        deadline: Instant,
        waiting: Waiting<N, C>,
    ) -> Result<RequestId, (PendingError, Waiting<N, C>)> {
        if self.free_record == NIL {
            let capacity = self.records.len();
            return Err((PendingError::TableFull { capacity }, waiting));
        }
        if peers.len() > self.free_slots {
            return Err((
                PendingError::NoSlots {
                    needed: peers.len(),
                    free: self.free_slots,
                },
                waiting,
            ));
        }
        for (i, p) in peers.iter().enumerate() {
            if peers[..i].contains(p) {
                return Err((PendingError::DuplicatePeer, waiting));
            }
            if self.find_slot(p, &name).is_some() {
                return Err((PendingError::InFlight(name), waiting));
            }
        }

        let ri = self.free_record;
        {
            let r = &mut self.records[ri as usize];
            self.free_record = r.next_free;
            r.state = State::Open;
            r.name = Some(name);
            r.deadline = deadline;
            r.sending = true;
            r.nb_sent = peers.len() as u32;
            r.nb_received = 0;
            r.outstanding = peers.len() as u32;
            r.timed_out = false;
            r.first_slot = NIL;
            r.waiting = Some(waiting);
            r.replies = K::default();
            r.next_free = NIL;
        }
        for p in peers {
            let si = self.free_slot;
            let h = key_hash(p, &name);
            let bucket = (h % self.buckets.len() as u64) as usize;
            let first = self.records[ri as usize].first_slot;
            let s = &mut self.slots[si as usize];
            self.free_slot = s.next_in_record;
            s.peer = Some(p.clone());
            s.record = ri;
            s.hash = h;
            s.next_in_record = first;
            s.next_in_bucket = self.buckets[bucket];
            self.buckets[bucket] = si;
            self.records[ri as usize].first_slot = si;
        }
        self.free_slots -= peers.len();
        self.open += 1;
        Ok(RequestId {
            index: ri,
            generation: self.records[ri as usize].generation,
        })
    }

    /// Unlinks slot `si` from its bucket chain and its record's list, and frees it.
    fn remove_slot(&mut self, si: u32) {
        let (h, ri) = {
            let s = &self.slots[si as usize];
            (s.hash, s.record)
        };
        let bucket = (h % self.buckets.len() as u64) as usize;
        // Bucket chain.
        let mut prev = NIL;
        let mut i = self.buckets[bucket];
        while i != NIL && i != si {
            prev = i;
            i = self.slots[i as usize].next_in_bucket;
        }
        let next_b = self.slots[si as usize].next_in_bucket;
        if prev == NIL {
            self.buckets[bucket] = next_b;
        } else {
            self.slots[prev as usize].next_in_bucket = next_b;
        }
        // Record's list.
        let mut prev = NIL;
        let mut i = self.records[ri as usize].first_slot;
        while i != NIL && i != si {
            prev = i;
            i = self.slots[i as usize].next_in_record;
        }
        let next_r = self.slots[si as usize].next_in_record;
        if prev == NIL {
            self.records[ri as usize].first_slot = next_r;
        } else {
            self.slots[prev as usize].next_in_record = next_r;
        }
        let s = &mut self.slots[si as usize];
        s.peer = None;
        s.record = NIL;
        s.next_in_bucket = NIL;
        s.next_in_record = self.free_slot;
        self.free_slot = si;
        self.free_slots += 1;
    }

    fn remove_all_slots(&mut self, ri: u32) {
        while self.records[ri as usize].first_slot != NIL {
            let si = self.records[ri as usize].first_slot;
            self.remove_slot(si);
        }
    }

    fn free_record(&mut self, ri: u32) -> Record<N, C, K> {
        self.remove_all_slots(ri);
        let r = &mut self.records[ri as usize];
        let taken = Record {
            generation: r.generation,
            state: r.state,
            name: r.name.take(),
            deadline: r.deadline,
            sending: r.sending,
            nb_sent: r.nb_sent,
            nb_received: r.nb_received,
            outstanding: r.outstanding,
            timed_out: r.timed_out,
            first_slot: NIL,
            waiting: r.waiting.take(),
            replies: core::mem::take(&mut r.replies),
            next_free: NIL,
        };
        r.state = State::Free;
        r.generation = r.generation.wrapping_add(1);
        r.next_free = self.free_record;
        r.deadline = Instant::NEVER;
        self.free_record = ri;
        self.open -= 1;
        taken
    }

    /// Ends a request: async ones leave the table now; sync ones wait in `Done` for `take`.
    fn complete(&mut self, ri: u32) -> Option<Completion<N, C, K>> {
        let timed_out = self.records[ri as usize].outstanding > 0;
        self.remove_all_slots(ri);
        let r = &mut self.records[ri as usize];
        r.timed_out = timed_out;
        r.outstanding = 0;
        match r.waiting.take() {
            Some(Waiting::Sync(n)) => {
                r.state = State::Done;
                Some(Completion::Wake(n))
            }
            Some(Waiting::Async(callback)) => {
                let id = RequestId {
                    index: ri,
                    generation: r.generation,
                };
                let rec = self.free_record(ri);
                Some(Completion::Async(Finished {
                    id,
                    name: rec.name?,
                    callback,
                    reply: Reply {
                        nb_sent: rec.nb_sent,
                        nb_received: rec.nb_received,
                        timed_out: rec.timed_out,
                        replies: rec.replies,
                    },
                }))
            }
            None => {
                r.state = State::Done;
                None
            }
        }
    }

    fn finished(&self, ri: u32, now: Instant) -> bool {
        let r = &self.records[ri as usize];
        r.state == State::Open && !r.sending && (r.outstanding == 0 || r.deadline <= now)
    }

    /// Withdraws the slot of `peer` in request `id` because sending to it failed: that peer is
    /// not counted in `nb_sent`. Returns false if the slot was already answered, `id` is stale,
    /// or its sending phase has ended ([`PendingTable::sending_done`]): a failure reported that
    /// late is ignored here: the peer stays owed until it answers, the deadline passes, or the
    /// transport reports it gone ([`PendingTable::peer_gone`]).
    pub fn send_failed(&mut self, id: RequestId, peer: &P) -> bool {
        // Only while sending: withdrawing the last owed slot later would leave the request open
        // with nothing owed, completing only at its deadline (never with `Instant::NEVER`).
        let Some(name) = self.record(id).filter(|r| r.sending).and_then(|r| r.name) else {
            return false;
        };
        match self.find_slot(peer, &name) {
            Some(si) if self.slots[si as usize].record == id.index => {
                self.remove_slot(si);
                let r = &mut self.records[id.index as usize];
                r.outstanding -= 1;
                r.nb_sent -= 1;
                true
            }
            _ => false,
        }
    }

    /// Withdraws every slot still owed by `peer`, which is gone: a datagram to it was refused
    /// (its socket has no process), so it answers none of them. This is the late counterpart of
    /// [`PendingTable::send_failed`], for failures found after the sending phase (a datagram
    /// that waited for a busy peer which then died). Each request counts the peer as an
    /// "ignore" would (it leaves `nb_sent`); one left owing nothing completes now, unless it is
    /// still being sent ([`PendingTable::sending_done`] completes it then), its completion
    /// handed to `out`. Stops after `limit` completions. Returns how many slots it withdrew and
    /// whether it stopped at the limit (then call again: withdrawn slots are not seen twice).
    pub fn peer_gone(
        &mut self,
        peer: &P,
        limit: usize,
        mut out: impl FnMut(Completion<N, C, K>),
    ) -> (usize, bool) {
        let mut withdrawn = 0;
        let mut completed = 0;
        for si in 0..self.slots.len() as u32 {
            if self.slots[si as usize].peer.as_ref() != Some(peer) {
                continue;
            }
            if completed == limit {
                return (withdrawn, true);
            }
            let ri = self.slots[si as usize].record;
            self.remove_slot(si);
            withdrawn += 1;
            let r = &mut self.records[ri as usize];
            r.outstanding -= 1;
            r.nb_sent -= 1;
            if r.state == State::Open && !r.sending && r.outstanding == 0 {
                completed += 1;
                if let Some(c) = self.complete(ri) {
                    out(c);
                }
            }
        }
        (withdrawn, false)
    }

    /// Ends the sending phase of `id`. If every peer has answered (or none was reached, DPDK's
    /// "dummy request"), or the deadline has passed, the request completes now.
    pub fn sending_done(
        &mut self,
        id: RequestId,
        now: Instant,
    ) -> Result<Option<Completion<N, C, K>>, PendingError> {
        let r = self.record_mut(id).ok_or(PendingError::Unknown)?;
        if r.state != State::Open {
            return Ok(None);
        }
        r.sending = false;
        if self.finished(id.index, now) {
            Ok(self.complete(id.index))
        } else {
            Ok(None)
        }
    }

    /// Takes an answer from `peer`: `reply = true` for a reply (stored), false for an ignore
    /// (the peer is no longer expected and leaves `nb_sent`).
    pub fn on_answer(&mut self, peer: &P, msg: Message<F>, reply: bool) -> Answer<N, C, K, F> {
        let Some(si) = self.find_slot(peer, msg.name()) else {
            return Answer::Unmatched(msg);
        };
        let ri = self.slots[si as usize].record;
        self.remove_slot(si);
        let mut overflow = None;
        {
            let r = &mut self.records[ri as usize];
            r.outstanding -= 1;
            if reply {
                match r.replies.push(peer.clone(), msg) {
                    Ok(()) => r.nb_received += 1,
                    Err(m) => overflow = Some(m),
                }
            } else {
                r.nb_sent -= 1;
            }
        }
        let r = &self.records[ri as usize];
        let done = r.state == State::Open && !r.sending && r.outstanding == 0;
        let completion = if done { self.complete(ri) } else { None };
        Answer::Matched {
            completion,
            overflow,
        }
    }

    /// Completes up to `limit` requests whose deadline is at or before `now` (and whose sending
    /// is done), handing each completion to `out`. Returns how many completed; call again while
    /// it returns `limit`.
    pub fn expire(
        &mut self,
        now: Instant,
        limit: usize,
        mut out: impl FnMut(Completion<N, C, K>),
    ) -> usize {
        let mut n = 0;
        for ri in 0..self.records.len() as u32 {
            if n == limit {
                break;
            }
            if self.finished(ri, now) {
                n += 1;
                if let Some(c) = self.complete(ri) {
                    out(c);
                }
            }
        }
        n
    }

    /// The earliest deadline among open requests whose sending is done.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.records
            .iter()
            .filter(|r| r.state == State::Open && !r.sending)
            .map(|r| r.deadline)
            .min()
    }

    /// The deadline of request `id`.
    pub fn deadline(&self, id: RequestId) -> Option<Instant> {
        self.record(id).map(|r| r.deadline)
    }

    /// For a synchronous waiter: if `id` is complete, or its deadline has passed by `now`, takes
    /// its reply and frees the request. `Ok(None)` means: still waiting.
    /// An async request is left alone (`Unknown`): its completion is not the poller's to take.
    pub fn poll(&mut self, id: RequestId, now: Instant) -> Result<Option<Reply<K>>, PendingError> {
        let r = self.record(id).ok_or(PendingError::Unknown)?;
        if matches!(r.waiting, Some(Waiting::Async(_))) {
            // Completing it here would drop its callback unrun.
            return Err(PendingError::Unknown);
        }
        let state = r.state;
        if state == State::Open {
            if !self.finished(id.index, now) {
                return Ok(None);
            }
            // The waiter itself observed the deadline: complete without waking anyone.
            drop(self.complete(id.index));
        }
        if self.records[id.index as usize].state != State::Done {
            // An async request: its completion left already; nothing to take.
            return Err(PendingError::Unknown);
        }
        Ok(Some(self.take_done(id.index)))
    }

    /// Takes the reply of a completed synchronous request, freeing it.
    pub fn take(&mut self, id: RequestId) -> Result<Reply<K>, PendingError> {
        match self.record(id) {
            Some(r) if r.state == State::Done => Ok(self.take_done(id.index)),
            _ => Err(PendingError::Unknown),
        }
    }

    fn take_done(&mut self, ri: u32) -> Reply<K> {
        let rec = self.free_record(ri);
        Reply {
            nb_sent: rec.nb_sent,
            nb_received: rec.nb_received,
            timed_out: rec.timed_out,
            replies: rec.replies,
        }
    }

    /// Removes request `id` whatever its state and returns what had not left the table yet.
    /// Its slots are freed: later replies to it are unmatched.
    pub fn cancel(&mut self, id: RequestId) -> Result<Cancelled<N, C, K>, PendingError> {
        let state = self.record(id).ok_or(PendingError::Unknown)?.state;
        let mut rec = self.free_record(id.index);
        if state == State::Done {
            return Ok(Cancelled::Completed(Reply {
                nb_sent: rec.nb_sent,
                nb_received: rec.nb_received,
                timed_out: rec.timed_out,
                replies: rec.replies,
            }));
        }
        match rec.waiting.take() {
            Some(w) => Ok(Cancelled::Pending(w)),
            None => Err(PendingError::Unknown),
        }
    }

    /// Counters of request `id`: (nb_sent, nb_received, outstanding).
    pub fn counters(&self, id: RequestId) -> Option<(u32, u32, u32)> {
        self.record(id)
            .map(|r| (r.nb_sent, r.nb_received, r.outstanding))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::NoFds;
    use core::cell::Cell;

    #[derive(Default)]
    struct Flag<'a>(Option<&'a Cell<u32>>);
    impl Notify for Flag<'_> {
        fn notify(&self) {
            if let Some(c) = self.0 {
                c.set(c.get() + 1)
            }
        }
    }

    type Sink = heapless::Vec<(u32, Message<NoFds>), 8>;
    type T<'a> = PendingTable<u32, NoFds, Flag<'a>, u8, Sink, Inline<4, 8>>;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }
    fn msg(s: &str) -> Message<NoFds> {
        Message::new(s, b"r").unwrap()
    }
    fn t(n: u64) -> Instant {
        Instant::from_nanos(n)
    }

    #[test]
    fn sync_completes_with_all_replies() {
        let woke = Cell::new(0);
        let mut tb: T = PendingTable::new();
        let id = tb
            .begin(
                name("q"),
                &[1, 2, 3],
                t(100),
                Waiting::Sync(Flag(Some(&woke))),
            )
            .ok()
            .unwrap();
        assert!(tb.sending_done(id, t(0)).unwrap().is_none());
        assert!(matches!(
            tb.on_answer(&1, msg("q"), true),
            Answer::Matched {
                completion: None,
                overflow: None
            }
        ));
        assert!(matches!(
            tb.on_answer(&1, msg("q"), true),
            Answer::Unmatched(_)
        ));
        assert!(matches!(
            tb.on_answer(&2, msg("q"), false),
            Answer::Matched {
                completion: None,
                overflow: None
            }
        ));
        match tb.on_answer(&3, msg("q"), true) {
            Answer::Matched {
                completion: Some(Completion::Wake(n)),
                ..
            } => n.notify(),
            _ => panic!("expected wake"),
        }
        assert_eq!(woke.get(), 1);
        let r = tb.take(id).unwrap();
        assert_eq!((r.nb_sent, r.nb_received, r.timed_out), (2, 2, false));
        assert_eq!(r.replies.len(), 2);
        assert!(tb.is_empty());
        assert_eq!(tb.free_slots(), 8);
        assert!(tb.take(id).is_err());
    }

    #[test]
    fn in_flight_refused_and_dummy_async() {
        let mut tb: T = PendingTable::new();
        let a = tb
            .begin(name("q"), &[1], t(100), Waiting::Async(7))
            .ok()
            .unwrap();
        let (e, _) = tb
            .begin(name("q"), &[2, 1], t(100), Waiting::Async(8))
            .err()
            .unwrap();
        assert_eq!(e, PendingError::InFlight(name("q")));
        assert!(tb.send_failed(a, &1));
        match tb.sending_done(a, t(0)).unwrap() {
            Some(Completion::Async(Finished {
                callback, reply, ..
            })) => {
                assert_eq!(callback, 7);
                assert_eq!(reply.nb_sent, 0);
            }
            _ => panic!("dummy request must complete"),
        }
        assert!(tb.is_empty());
    }

    #[test]
    fn deadline_expires_async_once() {
        let mut tb: T = PendingTable::new();
        let id = tb
            .begin(name("q"), &[1, 2], t(100), Waiting::Async(1))
            .ok()
            .unwrap();
        tb.sending_done(id, t(0)).unwrap();
        assert!(matches!(
            tb.on_answer(&1, msg("q"), true),
            Answer::Matched {
                completion: None,
                overflow: None
            }
        ));
        assert_eq!(tb.next_deadline(), Some(t(100)));
        let mut fired = 0;
        assert_eq!(tb.expire(t(99), 8, |_| fired += 1), 0);
        assert_eq!(
            tb.expire(t(100), 8, |c| {
                fired += 1;
                let Completion::Async(Finished { reply, .. }) = c else {
                    panic!()
                };
                assert!(reply.timed_out);
                assert_eq!((reply.nb_sent, reply.nb_received), (2, 1));
            }),
            1
        );
        assert_eq!(tb.expire(t(200), 8, |_| fired += 1), 0);
        assert_eq!(fired, 1);
        assert!(matches!(
            tb.on_answer(&2, msg("q"), true),
            Answer::Unmatched(_)
        ));
        assert!(tb.cancel(id).is_err());
    }

    #[test]
    fn capacity_errors() {
        let mut tb: T = PendingTable::new();
        let peers: [u32; 9] = core::array::from_fn(|i| i as u32);
        let (e, _) = tb
            .begin(name("a"), &peers, t(1), Waiting::Async(0))
            .err()
            .unwrap();
        assert_eq!(e, PendingError::NoSlots { needed: 9, free: 8 });
        for i in 0..4 {
            tb.begin(name("a"), &[i], t(1), Waiting::Async(0))
                .ok()
                .unwrap();
        }
        let (e, _) = tb
            .begin(name("b"), &[9], t(1), Waiting::Async(0))
            .err()
            .unwrap();
        assert_eq!(e, PendingError::TableFull { capacity: 4 });
    }
}
