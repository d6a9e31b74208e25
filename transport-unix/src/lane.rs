//! Shared-memory lanes: requests and messages between memplane processes without a datagram
//! each way.
//!
//! A broadcast over sockets costs every secondary a `sendmsg` by path in the primary, a
//! `recvmsg` and a `sendmsg` in the secondary and a `recvmsg` back, and on a shared CPU a
//! switch back to the primary after each answer. Between memplane processes the same datagram
//! bytes (same codec) go into a shared file instead, and a futex wakes the other side:
//! - a primary's sync request: a slot of each secondary's lane, one `FUTEX_WAKE_BITSET` for
//!   all of them, one sleep until the last answer, which comes back in the slot;
//! - a secondary's sync request: one of its lane's `up` slots, answered there by the
//!   primary's lane thread;
//! - a secondary's one-way message: its lane's ring, drained in order by the primary.
//!
//! DPDK processes, async requests, the primary's one-way messages and anything carrying fds
//! still go over the sockets; so does a reply with fds, or an "ignore", to a lane request (the
//! lane then only says "answered").
//!
//! The board, `memplane_lanes` in the runtime directory (mode 0600 in a 0700 directory), is
//! made by the primary: a header, request controls (one per lane request in flight) and
//! [`LANES`] lanes of [`SLOTS`] slots. A secondary claims a free lane (or one whose owner is
//! dead) at open. Everything in it is an atomic, and everything read from it is checked: a
//! peer that scribbles on it can spoil its own answers, never the reader's memory.
//!
//! Order and one-at-a-time dispatch are DPDK's, as over one socket. Each side takes from a lane
//! and handles what it took, and handles its socket datagrams, under one dispatch lock, so its
//! handlers never run at once; its receiving thread serves what a sender posted to its lane
//! before that sender's later datagrams; and a sender posts to a lane only while everything it
//! sent the other side over the socket has been handled there: the kernel's count of those
//! messages and requests (`tx` / `up_tx`, counted by the sender as each is accepted) equals the
//! receiver's (`rx` / `up_rx`, counted after handling), and nothing waits in the sender's
//! outbox. Otherwise it goes over the socket, behind what went before.
//!
//! A slot's life: `EMPTY` → (primary posts) `POSTED` → (secondary takes) `TAKEN` →
//! (secondary answers) `ANSWERED` → (primary reads) `EMPTY`. A primary that gives up turns
//! `POSTED` back to `EMPTY` and `TAKEN` into `ABANDONED`, which the secondary empties when it
//! answers, or when the same action comes again.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use memplane_core::Name;
use memplane_core::wire::MAX_DATAGRAM_LEN;
use parking_lot::Mutex;
use rustix::thread::futex;

use crate::spin::Spinner;

/// The board's file name in the runtime directory.
pub const BOARD_FILE: &str = "memplane_lanes";
/// Lanes on a board: secondaries past this many are served over their sockets.
pub const LANES: usize = 64;
/// Requests one lane holds at once, each way.
pub const SLOTS: usize = 8;
/// One-way messages one lane holds, secondary to primary (a ring).
pub const RING: usize = 64;
/// Lane requests one primary has in flight at once.
const CTRLS: usize = 128;
const MAGIC: u64 = u64::from_le_bytes(*b"mplanes1");
/// Words of a slot's buffer: a whole datagram of any ABI.
const BUF_WORDS: usize = MAX_DATAGRAM_LEN.div_ceil(8);
/// Bytes of a slot's buffer: what an answer taken from a lane needs.
pub const BUF_LEN: usize = BUF_WORDS * 8;
/// Words of a lane's owner socket name (`mp_socket_<pid>_<stamp>`).
const NAME_WORDS: usize = 8;

// A slot's state word: (tag << 4) | state. The tag names one post (a counter of the primary's),
// so a request that gives up its slots can only touch its own, never a later post that reuses
// the slot (after a new secondary took over a dead one's lane).
const STATE: u32 = 0xf;
const EMPTY: u32 = 0;
const POSTED: u32 = 1;
const TAKEN: u32 = 2;
const ANSWERED: u32 = 3;
const ABANDONED: u32 = 4;
/// The primary is writing the slot.
const WRITING: u32 = 5;

#[repr(C)]
struct Header {
    magic: AtomicU64,
    /// `size_of::<Layout>()` of the primary that made it: another build's board is not used.
    size: AtomicU64,
    primary_pid: AtomicU32,
    /// Bumped whenever a lane is claimed: a primary's "this peer has no lane" holds until then.
    epoch: AtomicU32,
    /// The doorbell, one for every lane: bumped by the primary after posting. Lane threads
    /// sleep on it with a bit of their own (`FUTEX_WAIT_BITSET`), so one `FUTEX_WAKE_BITSET`
    /// wakes the lanes of a whole broadcast: one system call, and on a shared CPU the
    /// secondaries then run one after the other instead of each taking the CPU from the
    /// primary in turn.
    bell: AtomicU32,
    /// The primary's doorbell, for secondaries' requests: bumped by a secondary after posting.
    up_bell: AtomicU32,
    /// The primary's lane thread is about to sleep or sleeps on `up_bell`.
    up_sleeping: AtomicU32,
    /// Lanes with requests posted to the primary (bit `lane`): its lane thread serves those.
    up_work: AtomicU64,
}

/// A lane's bit on the bell (lanes 32 apart share one, and may wake for each other).
fn bell_bit(lane: usize) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(1 << (lane % 32)).unwrap_or(std::num::NonZeroU32::MIN)
}

/// One lane request in flight: `word` is (generation << 32) | answers still to come.
#[repr(C)]
struct Ctrl {
    word: AtomicU64,
    /// The requester sleeps on it; bumped by the last answer and by [`LaneWake`].
    wake: AtomicU32,
    _pad: AtomicU32,
}

#[repr(C)]
struct Slot {
    state: AtomicU32,
    ctrl: AtomicU32,
    ctrl_gen: AtomicU32,
    req_len: AtomicU32,
    rep_len: AtomicU32,
    /// A secondary's request to the primary: the requester sleeps on it; bumped by the answer
    /// and by [`UpWake`].
    wake: AtomicU32,
    req: [AtomicU64; BUF_WORDS],
    rep: [AtomicU64; BUF_WORDS],
}

impl Slot {
    /// Puts `reply` in the slot and marks the request of tag `tag` answered; false if its
    /// requester had given the slot up (then the slot is emptied here).
    fn answer(&self, tag: u32, reply: &[u8]) -> bool {
        copy_in(&self.rep, reply);
        self.rep_len.store(reply.len() as u32, Ordering::Relaxed);
        if self
            .state
            .compare_exchange(
                tag | TAKEN,
                tag | ANSWERED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            return true;
        }
        // Given up by the requester: ours to empty (anything else is not ours to touch).
        let _ = self.state.compare_exchange(
            tag | ABANDONED,
            EMPTY,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        false
    }
}

/// One direction of a lane (the primary's to the owner, or the owner's to the primary).
#[repr(C)]
struct Dir {
    /// Messages and requests the sender sent over a socket (accepted by the kernel).
    tx: AtomicU64,
    /// Of those, how many the receiver has handled.
    rx: AtomicU64,
    /// The sender's requests.
    slots: [Slot; SLOTS],
}

impl Dir {
    /// The receiver has handled everything the sender sent by socket: what goes by lane now
    /// cannot overtake it.
    fn caught_up(&self) -> bool {
        self.tx.load(Ordering::Acquire) == self.rx.load(Ordering::Acquire)
    }

    /// Nothing counted, no slot in use: for a lane's new owner.
    fn reset(&self) {
        self.tx.store(0, Ordering::Relaxed);
        self.rx.store(0, Ordering::Relaxed);
        for s in &self.slots {
            s.state.store(EMPTY, Ordering::Relaxed);
        }
    }
}

#[repr(C)]
struct Lane {
    /// The owner's pid; 0: free.
    owner: AtomicU32,
    /// The owner has written its name and serves the lane.
    ready: AtomicU32,
    /// The owner's lane thread is about to sleep or sleeps on the board's bell.
    sleeping: AtomicU32,
    name_len: AtomicU32,
    _pad: AtomicU32,
    name: [AtomicU64; NAME_WORDS],
    /// The primary's messages and requests to the owner.
    down: Dir,
    /// The owner's messages and requests to the primary.
    up: Dir,
    /// The owner's one-way messages to the primary: a ring of cells, each with a sequence
    /// number saying whose turn it is (the producers' or the consumer's).
    ring_head: AtomicU64,
    ring_tail: AtomicU64,
    ring: [Cell; RING],
    /// The pid of the process that claimed the lane last (kept after it left: its messages
    /// still in the ring are its).
    pid: AtomicU32,
    _pad2: AtomicU32,
}

#[repr(C)]
struct Cell {
    /// Whose turn the cell is, for position `pos` (cell `pos % RING`, lap `pos / RING`):
    /// `2 * lap` free for it, `2 * lap + 1` holding its message; taking it makes it free for
    /// the next lap. A new board's zeros are "free for the first lap": nothing to set up.
    seq: AtomicU64,
    len: AtomicU32,
    _pad: AtomicU32,
    data: [AtomicU64; BUF_WORDS],
}

/// A lane's owner socket name, read out of the board.
type NameBuf = [u8; NAME_WORDS * 8];

impl Lane {
    /// Owned by `pid` (not 0), which serves it.
    fn served_by(&self, pid: u32) -> bool {
        pid != 0
            && self.owner.load(Ordering::Acquire) == pid
            && self.ready.load(Ordering::Acquire) == 1
    }

    /// The owner's socket name, copied into `buf`.
    fn name<'b>(&self, buf: &'b mut NameBuf) -> &'b [u8] {
        let n = copy_out(
            &self.name,
            self.name_len.load(Ordering::Relaxed) as usize,
            buf,
        );
        &buf[..n]
    }
}

#[repr(C)]
struct Layout {
    header: Header,
    ctrls: [Ctrl; CTRLS],
    lanes: [Lane; LANES],
}

/// The board, mapped shared.
pub struct Board {
    map: NonNull<Layout>,
    /// Kept open for the mapping's life (and to check its owner).
    _file: File,
}

// SAFETY: `Layout` holds only atomics, which may be shared between threads (and processes);
// the mapping lives as long as the `Board`.
unsafe impl Send for Board {}
// SAFETY: as above.
unsafe impl Sync for Board {}

impl Drop for Board {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `Board::map` with this size and is dropped once.
        let _ = unsafe { rustix::mm::munmap(self.map.as_ptr().cast(), size_of::<Layout>()) };
    }
}

fn copy_in(dst: &[AtomicU64], src: &[u8]) {
    for (w, c) in dst.iter().zip(src.chunks(8)) {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        w.store(u64::from_ne_bytes(b), Ordering::Relaxed);
    }
}

fn copy_out(src: &[AtomicU64], len: usize, dst: &mut [u8]) -> usize {
    let len = len.min(src.len() * 8).min(dst.len());
    for (w, c) in src.iter().zip(dst[..len].chunks_mut(8)) {
        let b = w.load(Ordering::Relaxed).to_ne_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
    len
}

/// A datagram of the kinds whose order against lane requests is kept: a message or a request
/// (the kind is the datagram's first field, a native-endian `int`, on every ABI).
pub fn counted(datagram: &[u8]) -> bool {
    datagram
        .first_chunk::<4>()
        .is_some_and(|k| matches!(i32::from_ne_bytes(*k), 0 | 1))
}

/// Process `pid` exists and has not exited (a zombie, exited but not yet reaped, has).
fn alive(pid: u32) -> bool {
    let exists = rustix::process::Pid::from_raw(pid as i32)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok());
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
            // The state follows the parenthesised command name.
            st.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X']))
        })
}

/// One more answer to request control `ctrl` of generation `generation` (none if the control
/// went to another request meanwhile); the last one wakes the requester.
fn count_answer(l: &Layout, ctrl: usize, generation: u32) {
    let Some(c) = l.ctrls.get(ctrl) else {
        return;
    };
    let mut w = c.word.load(Ordering::Acquire);
    while (w >> 32) as u32 == generation && w as u32 != 0 {
        match c
            .word
            .compare_exchange(w, w - 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                if w as u32 == 1 {
                    c.wake.fetch_add(1, Ordering::AcqRel);
                    wake_all(&c.wake);
                }
                return;
            }
            Err(now) => w = now,
        }
    }
}

fn wake_all(w: &AtomicU32) {
    let _ = futex::wake(w, futex::Flags::empty(), i32::MAX as u32);
}

impl Board {
    fn map(file: File) -> std::io::Result<Board> {
        let len = file.metadata()?.len();
        if len < size_of::<Layout>() as u64 {
            return Err(std::io::Error::other("lane board too short"));
        }
        // SAFETY: a fresh shared mapping of a file at least as long as `Layout`; nothing else
        // in this process maps at the address the kernel picks.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                size_of::<Layout>(),
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &file,
                0,
            )
        }?;
        let map = NonNull::new(p.cast::<Layout>()).ok_or_else(|| std::io::Error::other("mmap"))?;
        Ok(Board { map, _file: file })
    }

    fn layout(&self) -> &Layout {
        // SAFETY: the mapping is page aligned, as long as `Layout`, lives as long as `self`,
        // and every bit pattern of its atomics is a valid value (a new file reads as zeros).
        unsafe { self.map.as_ref() }
    }

    /// Makes a new board in `dir` (replacing an old one: secondaries of an earlier primary
    /// keep the old file) for the primary `pid`.
    pub fn create(dir: &Path, pid: u32) -> std::io::Result<Arc<Board>> {
        let path = dir.join(BOARD_FILE);
        let _ = std::fs::remove_file(&path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)?;
        file.set_len(size_of::<Layout>() as u64)?;
        let b = Board::map(file)?;
        let h = &b.layout().header;
        h.primary_pid.store(pid, Ordering::Relaxed);
        h.size.store(size_of::<Layout>() as u64, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(Arc::new(b))
    }

    /// Opens the board of a live primary in `dir`, if there is one made by our user.
    pub fn open(dir: &Path, uid: u32) -> Option<Arc<Board>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join(BOARD_FILE))
            .ok()?;
        if file.metadata().ok()?.uid() != uid {
            return None;
        }
        let b = Board::map(file).ok()?;
        let h = &b.layout().header;
        (h.magic.load(Ordering::Acquire) == MAGIC
            && h.size.load(Ordering::Relaxed) == size_of::<Layout>() as u64
            && alive(h.primary_pid.load(Ordering::Relaxed)))
        .then(|| Arc::new(b))
    }

    /// Removes the board file of `dir` (the primary, closing).
    pub fn remove(dir: &Path) {
        let _ = std::fs::remove_file(dir.join(BOARD_FILE));
    }

    /// The primary's pid, as it wrote it.
    pub fn primary_pid(&self) -> u32 {
        self.layout().header.primary_pid.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------------
// The primary's side.

/// The primary's view of its board: which peer has which lane, and its free controls.
pub struct PrimaryLanes {
    board: Arc<Board>,
    uid: u32,
    allow_root: bool,
    /// Free control entries and their next generation.
    ctrls: Mutex<Vec<(u32, u32)>>,
    /// Peer socket name → (lane, owner pid), or no lane as of a board epoch.
    known: Mutex<std::collections::HashMap<String, Known>>,
    /// The next post's tag.
    tags: AtomicU32,
    /// Sender pid → (lane, owner pid), or no lane as of a board epoch.
    by_pid: Mutex<std::collections::HashMap<u32, Known>>,
    /// The last pid found to own a lane, and the lane: (pid << 32) | lane. Datagrams come in
    /// runs from one sender: no lock for those.
    last_pid: AtomicU64,
    /// Per lane: the tag of each of its requests to us taken, and its action while an answer
    /// is owed.
    up_owed: Mutex<Vec<Owed>>,
    /// How many entries of `up_owed` owe an answer.
    up_owing: AtomicUsize,
}

#[derive(Clone, Copy)]
enum Known {
    Lane(u32, u32),
    None(u32),
}

/// A lane request in flight: its control entry and the slots it posted.
pub struct LaneRequest {
    board: Arc<Board>,
    ctrl: u32,
    generation: u32,
    /// (index into the request's peers, lane, slot, the post's tag), for each peer reached
    /// by its lane.
    posts: Vec<(usize, u32, u32, u32)>,
    /// The first post's tag (each post takes the next).
    tag: u32,
}

impl PrimaryLanes {
    /// The primary's lanes on `board`; lanes of owners other than `uid` (or root, if
    /// `allow_root`) are never used.
    pub fn new(board: Arc<Board>, uid: u32, allow_root: bool) -> Self {
        PrimaryLanes {
            board,
            uid,
            allow_root,
            ctrls: Mutex::new((0..CTRLS as u32).rev().map(|i| (i, 1)).collect()),
            known: Mutex::default(),
            tags: AtomicU32::new(1),
            by_pid: Mutex::default(),
            last_pid: AtomicU64::new(0),
            up_owed: Mutex::new(vec![Default::default(); LANES]),
            up_owing: AtomicUsize::new(0),
        }
    }

    /// The lane of the secondary whose socket is named `name`, if it serves one.
    fn lane_of(&self, name: &str) -> Option<u32> {
        self.lookup(&self.known, name, |lane, pid| {
            lane.name(&mut [0; NAME_WORDS * 8]) == name.as_bytes() && self.owner_trusted(pid)
        })
    }

    /// The lane that `matches` (given the lane and its owner) picks, through `cache`: a hit
    /// is checked against the board (still that owner's, still served); a miss is cached with
    /// the board's epoch, and the lanes are scanned again only once a lane was claimed since.
    fn lookup<K, Q>(
        &self,
        cache: &Mutex<std::collections::HashMap<K, Known>>,
        key: &Q,
        matches: impl Fn(&Lane, u32) -> bool,
    ) -> Option<u32>
    where
        K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
        Q: ?Sized + std::hash::Hash + Eq + ToOwned<Owned = K>,
    {
        let l = self.board.layout();
        let epoch = l.header.epoch.load(Ordering::Acquire);
        let mut cache = cache.lock();
        match cache.get(key) {
            Some(&Known::Lane(i, pid)) if l.lanes[i as usize].served_by(pid) => return Some(i),
            Some(&Known::None(e)) if e == epoch => return None,
            _ => {}
        }
        let found = l.lanes.iter().enumerate().find_map(|(i, lane)| {
            let pid = lane.owner.load(Ordering::Acquire);
            (lane.served_by(pid) && matches(lane, pid)).then_some((i as u32, pid))
        });
        if cache.len() >= 4 * LANES {
            cache.clear();
        }
        cache.insert(
            key.to_owned(),
            match found {
                Some((i, pid)) => Known::Lane(i, pid),
                None => Known::None(epoch),
            },
        );
        found.map(|(i, _)| i)
    }

    /// The owner process runs as our user (or root when allowed): what the socket's
    /// credential check would require of its datagrams.
    fn owner_trusted(&self, pid: u32) -> bool {
        std::fs::metadata(format!("/proc/{pid}"))
            .is_ok_and(|m| m.uid() == self.uid || (m.uid() == 0 && self.allow_root))
    }

    /// Which of `names` (peer socket names) have a lane that may take a request now (all
    /// their socket datagrams handled); `None` when none has.
    pub fn lanes_for<'a>(&self, names: impl Iterator<Item = &'a str>) -> Option<Vec<Option<u32>>> {
        let lanes = &self.board.layout().lanes;
        let v: Vec<Option<u32>> = names
            .map(|n| {
                self.lane_of(n)
                    .filter(|&i| lanes[i as usize].down.caught_up())
            })
            .collect();
        v.iter().any(Option::is_some).then_some(v)
    }

    /// The kernel accepted `datagram` for the secondary whose socket is named `name`: counted
    /// if it is a message or a request and that secondary has a lane.
    pub fn sent(&self, name: &str, datagram: &[u8]) {
        if counted(datagram)
            && let Some(i) = self.lane_of(name)
        {
            self.board.layout().lanes[i as usize]
                .down
                .tx
                .fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The secondary whose socket is named `name` exited (its pidfd said so): its lane is free
    /// for another (the next request goes to its socket, found dead there and not counted).
    /// What it owed is answered "not here" on its behalf: a request's last live answer must
    /// still wake the requester.
    pub fn gone(&self, name: &str) {
        let l = self.board.layout();
        let cached = match self.known.lock().remove(name) {
            Some(Known::Lane(i, pid)) => Some((i as usize, pid)),
            _ => None,
        };
        let found = cached.or_else(|| {
            l.lanes.iter().enumerate().find_map(|(i, ln)| {
                let pid = ln.owner.load(Ordering::Acquire);
                (pid != 0 && ln.name(&mut [0; NAME_WORDS * 8]) == name.as_bytes())
                    .then_some((i, pid))
            })
        });
        let Some((i, pid)) = found else { return };
        let ln = &l.lanes[i];
        // The caller saw the process exit (its pidfd): a zombie not yet reaped still answers
        // kill(pid, 0), so that is not asked.
        if ln.owner.load(Ordering::Acquire) != pid {
            return;
        }
        for s in &ln.down.slots {
            let v = s.state.load(Ordering::Acquire);
            let tag = v & !STATE;
            match v & STATE {
                POSTED | TAKEN => {
                    let (ctrl, generation) = (
                        s.ctrl.load(Ordering::Relaxed) as usize,
                        s.ctrl_gen.load(Ordering::Relaxed),
                    );
                    s.rep_len.store(0, Ordering::Relaxed);
                    if s.state
                        .compare_exchange(v, tag | ANSWERED, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                    {
                        count_answer(l, ctrl, generation);
                    }
                }
                ABANDONED => {
                    let _ = s
                        .state
                        .compare_exchange(v, EMPTY, Ordering::AcqRel, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        for o in &mut self.up_owed.lock()[i] {
            set_owed(o, (0, None), &self.up_owing);
        }
        self.by_pid.lock().remove(&pid);
        let _ = ln
            .owner
            .compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Wakes every lane requester: a peer was withdrawn from the pending requests, and a
    /// request whose other answers wait in the lanes, not yet taken, may be complete now.
    pub fn nudge(&self) {
        for c in &self.board.layout().ctrls {
            if c.word.load(Ordering::Acquire) != 0 {
                c.wake.fetch_add(1, Ordering::AcqRel);
                wake_all(&c.wake);
            }
        }
    }

    /// Takes a control entry for a request; `None` when all are in use.
    pub fn begin(&self) -> Option<LaneRequest> {
        let (ctrl, generation) = self.ctrls.lock().pop()?;
        let c = &self.board.layout().ctrls[ctrl as usize];
        c.word.store(u64::from(generation) << 32, Ordering::Release);
        Some(LaneRequest {
            board: self.board.clone(),
            ctrl,
            generation,
            posts: Vec::new(),
            // Room for a broadcast to every lane, a tag each.
            tag: self.tags.fetch_add(LANES as u32, Ordering::Relaxed),
        })
    }

    /// Ends a request: slots not answered are given up, and the control entry is freed.
    pub fn finish(&self, r: LaneRequest) {
        let l = self.board.layout();
        for &(_, lane, slot, tag) in &r.posts {
            let s = &l.lanes[lane as usize].down.slots[slot as usize];
            let cas = |from: u32, to: u32| {
                s.state
                    .compare_exchange(tag | from, to, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            };
            let _ = cas(POSTED, EMPTY) || cas(TAKEN, tag | ABANDONED) || cas(ANSWERED, EMPTY);
        }
        let c = &l.ctrls[r.ctrl as usize];
        // A late answer compares the generation: from here on it no longer matches.
        c.word.store(0, Ordering::Release);
        let next = if r.generation == u32::MAX {
            1
        } else {
            r.generation + 1
        };
        self.ctrls.lock().push((r.ctrl, next));
    }
}

impl LaneRequest {
    /// Posts `datagram` to `lane` for the request's peer number `peer`; false when the lane
    /// has no free slot (send it over the socket then).
    pub fn post(&mut self, peer: usize, lane: u32, datagram: &[u8]) -> bool {
        let l = self.board.layout();
        let ln = &l.lanes[lane as usize];
        let Some((i, s)) = ln.down.slots.iter().enumerate().find(|(_, s)| {
            let v = s.state.load(Ordering::Relaxed);
            v & STATE == EMPTY
                && s.state
                    .compare_exchange(v, WRITING, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
        }) else {
            return false;
        };
        let tag = (self.tag.wrapping_add(self.posts.len() as u32) & (u32::MAX >> 4)) << 4;
        copy_in(&s.req, datagram);
        s.req_len.store(datagram.len() as u32, Ordering::Relaxed);
        s.rep_len.store(0, Ordering::Relaxed);
        s.ctrl.store(self.ctrl, Ordering::Relaxed);
        s.ctrl_gen.store(self.generation, Ordering::Relaxed);
        l.ctrls[self.ctrl as usize]
            .word
            .fetch_add(1, Ordering::AcqRel);
        s.state.store(tag | POSTED, Ordering::Release);
        self.posts.push((peer, lane, i as u32, tag));
        true
    }

    /// Rings the doorbells of every lane posted to (after all posts: the secondaries then
    /// run one after the other while the primary sleeps once).
    pub fn ring(&self) {
        let l = self.board.layout();
        l.header.bell.fetch_add(1, Ordering::SeqCst);
        let sleepers = self
            .posts
            .iter()
            .filter(|p| l.lanes[p.1 as usize].sleeping.load(Ordering::SeqCst) != 0)
            .fold(0u32, |m, p| m | bell_bit(p.1 as usize).get());
        if let Some(bits) = std::num::NonZeroU32::new(sleepers) {
            let _ =
                futex::wake_bitset(&l.header.bell, futex::Flags::empty(), i32::MAX as u32, bits);
        }
    }

    /// How many peers were reached by their lane.
    pub fn posted(&self) -> usize {
        self.posts.len()
    }

    /// The value to pass [`LaneRequest::sleep`], read before looking at the answers.
    pub fn wake_seen(&self) -> u32 {
        self.board.layout().ctrls[self.ctrl as usize]
            .wake
            .load(Ordering::Acquire)
    }

    /// A wake-up for this request, for other threads (a peer found dead, the deadline).
    pub fn waker(&self) -> LaneWake {
        LaneWake {
            board: self.board.clone(),
            ctrl: self.ctrl,
        }
    }

    /// Hands each answer that came to `f` (the peer number and the reply's bytes, empty when
    /// the answer went over the socket) and frees its slot; returns how many.
    pub fn harvest(&mut self, buf: &mut [u8], mut f: impl FnMut(usize, &[u8])) -> usize {
        let l = self.board.layout();
        let mut n = 0;
        self.posts.retain(|&(peer, lane, slot, tag)| {
            let s = &l.lanes[lane as usize].down.slots[slot as usize];
            if s.state.load(Ordering::Acquire) != tag | ANSWERED {
                return true;
            }
            let len = copy_out(&s.rep, s.rep_len.load(Ordering::Relaxed) as usize, buf);
            // Ours until emptied: only what was still ours is delivered.
            if s.state
                .compare_exchange(tag | ANSWERED, EMPTY, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                f(peer, &buf[..len]);
                n += 1;
            }
            false
        });
        n
    }

    /// All lane answers came (or the secondaries said they went over the socket).
    pub fn all_answered(&self) -> bool {
        let w = self.board.layout().ctrls[self.ctrl as usize]
            .word
            .load(Ordering::Acquire);
        w as u32 == 0
    }

    /// Sleeps until an answer completes the lanes' part, a [`LaneWake`], or `timeout`, unless
    /// the wake word moved from `seen` already.
    pub fn sleep(&self, seen: u32, timeout: Duration) {
        let w = &self.board.layout().ctrls[self.ctrl as usize].wake;
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let _ = futex::wait(w, futex::Flags::empty(), seen, Some(&ts));
    }
}

/// Wakes a requester sleeping in [`LaneRequest::sleep`] (spuriously, harmlessly, if its
/// request ended and the entry went to another).
pub struct LaneWake {
    board: Arc<Board>,
    ctrl: u32,
}

impl LaneWake {
    /// Wakes the requester.
    pub fn wake(&self) {
        let w = &self.board.layout().ctrls[self.ctrl as usize].wake;
        w.fetch_add(1, Ordering::AcqRel);
        wake_all(w);
    }
}

// ---------------------------------------------------------------------------------------------
// A secondary's side.

/// Per slot of a lane: the tag of the request taken from it, and its action while an answer
/// is owed.
type Owed = [(u32, Option<Name>); SLOTS];

/// Sets an entry of an [`Owed`] table, keeping `count` (the entries owing an answer, read
/// without the table's lock: a reply with nothing owed skips the table) in step.
fn set_owed(o: &mut (u32, Option<Name>), v: (u32, Option<Name>), count: &AtomicUsize) {
    match (o.1.is_some(), v.1.is_some()) {
        (false, true) => {
            count.fetch_add(1, Ordering::Relaxed);
        }
        (true, false) => {
            count.fetch_sub(1, Ordering::Relaxed);
        }
        _ => {}
    }
    *o = v;
}

/// Takes slot `s` if a request is posted in it: its tag (see `STATE`).
fn take_posted(s: &Slot) -> Option<u32> {
    let v = s.state.load(Ordering::Acquire);
    (v & STATE == POSTED
        && s.state
            .compare_exchange(v, v & !STATE | TAKEN, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok())
    .then_some(v & !STATE)
}

/// Records that the request of `action` taken from slot `i` (tag `tag`) of `slots` owes an
/// answer. One request of an action waits at a time: an abandoned slot of the same action is
/// done with, and emptied.
fn owe_in(
    owed: &mut Owed,
    slots: &[Slot; SLOTS],
    i: usize,
    tag: u32,
    action: Name,
    count: &AtomicUsize,
) {
    for (j, o) in owed.iter_mut().enumerate() {
        if j != i
            && o.1 == Some(action)
            && slots[j]
                .state
                .compare_exchange(o.0 | ABANDONED, EMPTY, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            set_owed(o, (o.0, None), count);
        }
    }
    set_owed(&mut owed[i], (tag, Some(action)), count);
}

/// A secondary's lane: served by its lane thread, answered by [`SecondaryLane::reply`].
pub struct SecondaryLane {
    board: Arc<Board>,
    lane: u32,
    pid: u32,
    /// The tag of each slot taken (see `STATE`), and its action while an answer is owed.
    owed: Mutex<Owed>,
    /// How many entries of `owed` owe an answer.
    owing: AtomicUsize,
    /// The next tag of a request to the primary.
    up_tags: AtomicU32,
    /// The primary exited: nothing goes up the lane any more (it would never be taken).
    primary_gone: std::sync::atomic::AtomicBool,
}

/// What serves a lane request: given its slot, its bytes, and `owe`, to call with the action's
/// name when a handler now owes an answer.
pub type Serve<'a> = dyn FnMut(usize, &[u8], &dyn Fn(Name)) + 'a;

/// How a reply went.
pub enum Answered {
    /// Through the lane.
    Lane,
    /// The request went away (given up by the primary): send it over the socket, as a late
    /// reply would go.
    Gone,
    /// No request of that name waits on the lane.
    NotHere,
}

impl SecondaryLane {
    /// Claims a lane on `board` for this process, whose socket is named `name`.
    pub fn claim(board: Arc<Board>, name: &str) -> Option<SecondaryLane> {
        if name.len() > NAME_WORDS * 8 {
            return None;
        }
        let pid = std::process::id();
        let l = board.layout();
        // A lane whose ring still holds messages of its last owner (who may have sent them
        // just before it exited) is left until the primary has taken them.
        let lane = l.lanes.iter().position(|ln| {
            let o = ln.owner.load(Ordering::Acquire);
            let drained =
                ln.ring_head.load(Ordering::Acquire) == ln.ring_tail.load(Ordering::Acquire);
            drained
                && (o == 0 || (o != pid && !alive(o)))
                && ln
                    .owner
                    .compare_exchange(o, pid, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
        })?;
        let ln = &l.lanes[lane];
        ln.ready.store(0, Ordering::Release);
        ln.down.reset();
        ln.up.reset();
        ln.sleeping.store(0, Ordering::Relaxed);
        ln.pid.store(pid, Ordering::Relaxed);
        copy_in(&ln.name, name.as_bytes());
        ln.name_len.store(name.len() as u32, Ordering::Relaxed);
        ln.ready.store(1, Ordering::Release);
        l.header.epoch.fetch_add(1, Ordering::AcqRel);
        Some(SecondaryLane {
            board,
            lane: lane as u32,
            pid,
            owed: Mutex::new(Default::default()),
            owing: AtomicUsize::new(0),
            up_tags: AtomicU32::new(1),
            primary_gone: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn lane(&self) -> &Lane {
        &self.board.layout().lanes[self.lane as usize]
    }

    /// The primary's pid.
    pub fn primary_pid(&self) -> u32 {
        self.board.primary_pid()
    }

    /// Serves every request posted now (see [`SecondaryLane::run`] for `serve`); the lane
    /// thread does, and the receiving thread before a later datagram from the primary.
    pub fn serve_posted(&self, serve: &mut Serve<'_>) {
        let ln = self.lane();
        let mut buf = [0u8; BUF_LEN];
        for (i, s) in ln.down.slots.iter().enumerate() {
            let Some(tag) = take_posted(s) else {
                continue;
            };
            set_owed(&mut self.owed.lock()[i], (tag, None), &self.owing);
            let n = copy_out(&s.req, s.req_len.load(Ordering::Relaxed) as usize, &mut buf);
            let owing = std::cell::Cell::new(false);
            let owe = |name: Name| {
                owing.set(true);
                owe_in(
                    &mut self.owed.lock(),
                    &ln.down.slots,
                    i,
                    tag,
                    name,
                    &self.owing,
                );
            };
            serve(i, &buf[..n], &owe);
            if !owing.get() {
                // Nothing will answer through the lane: say so, the request need not wait on
                // it (an answer over the socket, if any, still counts).
                self.settle(i, tag, &[]);
            }
        }
    }

    /// A message or request from the primary that came over the socket has been handled.
    pub fn handled(&self) {
        self.lane().down.rx.fetch_add(1, Ordering::AcqRel);
    }

    /// Serves the lane until `stop` says so: `serve_posted` runs [`SecondaryLane::serve_posted`]
    /// whenever the bell rang (under the lock that keeps the process's handlers one at a time,
    /// so that what it takes from the lane is also handled in that order). Waits on the
    /// doorbell, up to `tick` at a time, in between.
    pub(crate) fn run(
        &self,
        stop: &dyn Fn() -> bool,
        tick: Duration,
        spin: &mut Spinner,
        serve_posted: &mut dyn FnMut(),
    ) {
        let ln = self.lane();
        let bell = &self.board.layout().header.bell;
        let bit = bell_bit(self.lane as usize);
        while !stop() {
            let rung = bell.load(Ordering::SeqCst);
            serve_posted();
            // Where it may (two CPUs), poll the bell a while before sleeping: waking a
            // sleeping vCPU costs tens of microseconds here.
            let rang = || (bell.load(Ordering::Acquire) != rung).then_some(());
            if spin.poll(rang, |_| stop()).is_some() {
                continue;
            }
            ln.sleeping.store(1, Ordering::SeqCst);
            if bell.load(Ordering::SeqCst) == rung && !stop() {
                // FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC time.
                let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
                let ns = now.tv_nsec + i64::from(tick.subsec_nanos());
                let until = rustix::time::Timespec {
                    tv_sec: now.tv_sec + tick.as_secs() as i64 + ns / 1_000_000_000,
                    tv_nsec: ns % 1_000_000_000,
                };
                let _ = futex::wait_bitset(bell, futex::Flags::empty(), rung, Some(&until), bit);
            }
            ln.sleeping.store(0, Ordering::SeqCst);
        }
    }

    /// Wakes the lane thread (to see its stop flag).
    pub fn wake(&self) {
        let bell = &self.board.layout().header.bell;
        bell.fetch_add(1, Ordering::SeqCst);
        let _ = futex::wake_bitset(
            bell,
            futex::Flags::empty(),
            i32::MAX as u32,
            bell_bit(self.lane as usize),
        );
    }

    /// Answers slot `i` with `reply` (empty: "answered elsewhere, or not at all") and tells
    /// the request; returns false if the primary had given the slot up.
    fn settle(&self, i: usize, tag: u32, reply: &[u8]) -> bool {
        let l = self.board.layout();
        let s = &self.lane().down.slots[i];
        // Read before the answer: once answered, the primary may reuse the slot.
        let (ctrl, generation) = (
            s.ctrl.load(Ordering::Relaxed) as usize,
            s.ctrl_gen.load(Ordering::Relaxed),
        );
        if !s.answer(tag, reply) {
            return false;
        }
        count_answer(l, ctrl, generation);
        true
    }

    /// Whether any lane request owes an answer (else a reply need not look).
    pub fn owing(&self) -> bool {
        self.owing.load(Ordering::Relaxed) != 0
    }

    /// Answers the lane request of action `name` with the encoded `reply` (empty: the answer
    /// went over the socket).
    pub fn reply(&self, name: &Name, reply: &[u8]) -> Answered {
        let (i, tag) = {
            if self.owing.load(Ordering::Relaxed) == 0 {
                return Answered::NotHere;
            }
            let mut owed = self.owed.lock();
            let Some(i) = owed.iter().position(|o| o.1.as_ref() == Some(name)) else {
                return Answered::NotHere;
            };
            let tag = owed[i].0;
            set_owed(&mut owed[i], (tag, None), &self.owing);
            (i, owed[i].0)
        };
        if self.settle(i, tag, reply) {
            Answered::Lane
        } else {
            Answered::Gone
        }
    }

    /// Gives the lane back (the channel closing).
    pub fn release(&self) {
        let ln = self.lane();
        ln.ready.store(0, Ordering::Release);
        let _ = ln
            .owner
            .compare_exchange(self.pid, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream: a secondary's synchronous requests to the primary.
//
// The same board, the other way: a secondary writes its request into one of its lane's `up`
// slots and sleeps on the slot's wake word; the primary's lane thread (woken through the
// header's `up_bell`, told which lanes have work by `up_work`) runs the handler, and the reply
// goes into the slot. Order against the secondary's socket datagrams is kept as downstream:
// the secondary posts only while `up_tx == up_rx`, and the primary's receiving thread serves a
// secondary's posted requests before a later datagram of that secondary.

/// Serves one of a secondary's requests to the primary: given its lane, the owner's pid and
/// socket name, the bytes, and `owe`, to call with the action's name when a handler now owes
/// an answer.
pub type ServeUp<'a> = dyn FnMut(u32, u32, &str, &[u8], &dyn Fn(Name)) + 'a;

/// A slot of a secondary's lane reserved for a request to the primary, not posted yet.
pub struct UpSlot {
    board: Arc<Board>,
    lane: u32,
    slot: u32,
    tag: u32,
}

/// A secondary's request to the primary, posted.
pub struct UpRequest(UpSlot);

/// Wakes a requester sleeping in [`UpRequest::sleep`].
pub struct UpWake {
    board: Arc<Board>,
    lane: u32,
    slot: u32,
}

impl UpWake {
    /// Wakes the requester.
    pub fn wake(&self) {
        let s = &self.board.layout().lanes[self.lane as usize].up.slots[self.slot as usize];
        s.wake.fetch_add(1, Ordering::AcqRel);
        wake_all(&s.wake);
    }
}

impl SecondaryLane {
    /// The primary exited (its pidfd said so): what this process sends it from now on goes by
    /// socket, and finds it gone there.
    pub fn set_primary_gone(&self) {
        self.primary_gone.store(true, Ordering::Release);
    }

    /// The kernel accepted `datagram` for the primary: counted if a message or a request.
    pub fn sent_up(&self, datagram: &[u8]) {
        if counted(datagram) {
            self.lane().up.tx.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// What this process sent the primary that it has not yet handled (by socket) or taken
    /// (from the ring): how far behind the primary is. Zero once it has caught up.
    pub fn up_behind(&self) -> u64 {
        let ln = self.lane();
        let socket = ln
            .up
            .tx
            .load(Ordering::Acquire)
            .wrapping_sub(ln.up.rx.load(Ordering::Acquire));
        let ring = ln
            .ring_tail
            .load(Ordering::Acquire)
            .wrapping_sub(ln.ring_head.load(Ordering::Acquire));
        // A scribbled board can make either difference wrap: it reads as "far behind".
        socket.saturating_add(ring)
    }

    /// Whether something may go up the lane now: the primary is alive and has handled all
    /// this process sent it by socket (else it goes by socket too, behind the rest).
    pub fn up_open(&self) -> bool {
        let ln = self.lane();
        !self.primary_gone.load(Ordering::Acquire) && ln.up.caught_up()
    }

    /// Puts a one-way message (its encoded datagram) in the ring to the primary and rings its
    /// bell; false when the ring is full, or the primary has not yet handled everything this
    /// process sent it by socket (send it by socket then: it comes after the ring's).
    pub fn push_up(&self, datagram: &[u8]) -> bool {
        let ln = self.lane();
        if !self.up_open() {
            return false;
        }
        for _ in 0..RING {
            let pos = ln.ring_tail.load(Ordering::Relaxed);
            let c = &ln.ring[(pos % RING as u64) as usize];
            let free = ring_free(pos);
            let seq = c.seq.load(Ordering::Acquire);
            if seq == free {
                if ln
                    .ring_tail
                    .compare_exchange_weak(
                        pos,
                        pos.wrapping_add(1),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_err()
                {
                    continue;
                }
                copy_in(&c.data, datagram);
                c.len.store(datagram.len() as u32, Ordering::Relaxed);
                c.seq.store(free.wrapping_add(1), Ordering::Release);
                self.ring_primary();
                return true;
            }
            if (seq.wrapping_sub(free) as i64) < 0 {
                // The cell still holds a message the primary has not taken: full.
                return false;
            }
            // Another thread took this position meanwhile: look again.
        }
        false
    }

    fn ring_primary(&self) {
        ring_primary(&self.board, self.lane);
    }

    /// Reserves a slot for a request to the primary: `None` when every slot is in use, or
    /// the primary has not yet handled everything this process sent it by socket.
    pub fn reserve_up(&self) -> Option<UpSlot> {
        let ln = self.lane();
        if !self.up_open() {
            return None;
        }
        let (i, _) = ln.up.slots.iter().enumerate().find(|(_, s)| {
            let v = s.state.load(Ordering::Relaxed);
            v & STATE == EMPTY
                && s.state
                    .compare_exchange(v, WRITING, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
        })?;
        let tag = (self.up_tags.fetch_add(1, Ordering::Relaxed) & (u32::MAX >> 4)) << 4;
        Some(UpSlot {
            board: self.board.clone(),
            lane: self.lane,
            slot: i as u32,
            tag,
        })
    }
}

impl UpSlot {
    fn slot(&self) -> &Slot {
        &self.board.layout().lanes[self.lane as usize].up.slots[self.slot as usize]
    }

    /// A wake-up for the request, for other threads (the primary found dead, the deadline).
    pub fn waker(&self) -> UpWake {
        UpWake {
            board: self.board.clone(),
            lane: self.lane,
            slot: self.slot,
        }
    }

    /// Gives the slot back unposted.
    pub fn cancel(self) {
        self.slot().state.store(EMPTY, Ordering::Release);
    }

    /// Posts `datagram` to the primary and rings its bell.
    pub fn post(self, datagram: &[u8]) -> UpRequest {
        let s = self.slot();
        copy_in(&s.req, datagram);
        s.req_len.store(datagram.len() as u32, Ordering::Relaxed);
        s.rep_len.store(0, Ordering::Relaxed);
        s.state.store(self.tag | POSTED, Ordering::Release);
        ring_primary(&self.board, self.lane);
        UpRequest(self)
    }
}

impl UpRequest {
    /// The value to pass [`UpRequest::sleep`], read before looking for the answer.
    pub fn wake_seen(&self) -> u32 {
        self.0.slot().wake.load(Ordering::Acquire)
    }

    /// The answer, if it came: its length in `buf` (0: it went over the socket); the slot is
    /// free again then.
    pub fn take(&self, buf: &mut [u8]) -> Option<usize> {
        let s = self.0.slot();
        let answered = self.0.tag | ANSWERED;
        if s.state.load(Ordering::Acquire) != answered {
            return None;
        }
        let n = copy_out(&s.rep, s.rep_len.load(Ordering::Relaxed) as usize, buf);
        s.state
            .compare_exchange(answered, EMPTY, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
            .then_some(n)
    }

    /// Sleeps until the answer, an [`UpWake`], or `timeout`, unless the wake word moved from
    /// `seen` already.
    pub fn sleep(&self, seen: u32, timeout: Duration) {
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let _ = futex::wait(&self.0.slot().wake, futex::Flags::empty(), seen, Some(&ts));
    }

    /// Ends the request: a slot not answered is given up.
    pub fn finish(self) {
        let s = self.0.slot();
        let tag = self.0.tag;
        let cas = |from: u32, to: u32| {
            s.state
                .compare_exchange(tag | from, to, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        };
        let _ = cas(POSTED, EMPTY) || cas(TAKEN, tag | ABANDONED) || cas(ANSWERED, EMPTY);
    }
}

impl PrimaryLanes {
    /// The lane of the secondary process `pid`, if it serves one.
    pub fn lane_of_pid(&self, pid: u32) -> Option<u32> {
        let last = self.last_pid.load(Ordering::Relaxed);
        let i = (last as u32) % LANES as u32;
        if (last >> 32) as u32 == pid && self.board.layout().lanes[i as usize].served_by(pid) {
            return Some(i);
        }
        let found = self.lookup(&self.by_pid, &pid, |_, owner| {
            owner == pid && self.owner_trusted(pid)
        })?;
        self.last_pid
            .store((u64::from(pid) << 32) | u64::from(found), Ordering::Relaxed);
        Some(found)
    }

    /// A message or request from lane `lane`'s owner that came over a socket was handled.
    pub fn handled_up(&self, lane: u32) {
        self.board.layout().lanes[lane as usize]
            .up
            .rx
            .fetch_add(1, Ordering::AcqRel);
    }

    /// Serves every request posted now on lane `lane` (the primary's lane thread does, and
    /// its receiving thread before a later datagram from that secondary).
    pub fn serve_up(&self, lane: u32, serve: &mut ServeUp<'_>) {
        let l = self.board.layout();
        let ln = &l.lanes[lane as usize];
        // The lane's last owner: it may have left since (what it put in the lane before it
        // exited is still handled, as its datagrams would be).
        let pid = ln.pid.load(Ordering::Acquire);
        let head = ln.ring_head.load(Ordering::Relaxed);
        let ring_ready = |head: u64| {
            ln.ring[(head % RING as u64) as usize]
                .seq
                .load(Ordering::Acquire)
                == ring_free(head).wrapping_add(1)
        };
        if pid == 0
            || !(ring_ready(head)
                || ln
                    .up
                    .slots
                    .iter()
                    .any(|s| s.state.load(Ordering::Acquire) & STATE == POSTED))
        {
            return;
        }
        let mut name = [0u8; NAME_WORDS * 8];
        let Ok(name) = std::str::from_utf8(ln.name(&mut name)) else {
            return;
        };
        let mut buf = [0u8; BUF_LEN];
        // One-way messages first: a thread's message sent before its request (which waits for
        // its answer) comes before it. At most a ring's worth: a cell a peer scribbled on ends
        // the turn, it never loops.
        for _ in 0..RING {
            let head = ln.ring_head.load(Ordering::Relaxed);
            if !ring_ready(head) {
                break;
            }
            let c = &ln.ring[(head % RING as u64) as usize];
            let len = copy_out(&c.data, c.len.load(Ordering::Relaxed) as usize, &mut buf);
            c.seq
                .store(ring_free(head).wrapping_add(2), Ordering::Release);
            ln.ring_head.store(head.wrapping_add(1), Ordering::Relaxed);
            serve(lane, pid, name, &buf[..len], &|_| {});
        }
        for (i, s) in ln.up.slots.iter().enumerate() {
            let Some(tag) = take_posted(s) else {
                continue;
            };
            set_owed(
                &mut self.up_owed.lock()[lane as usize][i],
                (tag, None),
                &self.up_owing,
            );
            let len = copy_out(&s.req, s.req_len.load(Ordering::Relaxed) as usize, &mut buf);
            let owing = std::cell::Cell::new(false);
            let owe = |action: Name| {
                owing.set(true);
                let mut all = self.up_owed.lock();
                owe_in(
                    &mut all[lane as usize],
                    &ln.up.slots,
                    i,
                    tag,
                    action,
                    &self.up_owing,
                );
            };
            serve(lane, pid, name, &buf[..len], &owe);
            if !owing.get() {
                settle_up(s, tag, &[]);
            }
        }
    }

    /// Whether any secondary's request to us owes an answer (else a reply need not look).
    pub fn owing_up(&self) -> bool {
        self.up_owing.load(Ordering::Relaxed) != 0
    }

    /// Answers the request of action `action` that the secondary whose socket is named `to`
    /// posted to us, with the encoded `reply` (empty: the answer went over the socket).
    pub fn reply_up(&self, to: &str, action: &Name, reply: &[u8]) -> Answered {
        let Some(lane) = self.lane_of(to) else {
            return Answered::NotHere;
        };
        let (i, tag) = {
            let mut all = self.up_owed.lock();
            let owed = &mut all[lane as usize];
            let Some(i) = owed.iter().position(|o| o.1.as_ref() == Some(action)) else {
                return Answered::NotHere;
            };
            let tag = owed[i].0;
            set_owed(&mut owed[i], (tag, None), &self.up_owing);
            (i, owed[i].0)
        };
        let s = &self.board.layout().lanes[lane as usize].up.slots[i];
        if settle_up(s, tag, reply) {
            Answered::Lane
        } else {
            Answered::Gone
        }
    }

    /// Serves secondaries' requests and messages until `stop` says so (the primary's lane
    /// thread): `serve_lane` runs [`PrimaryLanes::serve_up`] for each lane with work (under
    /// the lock that keeps the process's handlers one at a time: taking from a lane and
    /// handling it must not be split, or another thread could handle later entries first).
    /// Waits on the up bell, up to `tick` at a time, in between.
    pub(crate) fn run_up(
        &self,
        stop: &dyn Fn() -> bool,
        tick: Duration,
        spin: &mut Spinner,
        serve_lane: &mut dyn FnMut(u32),
    ) {
        let h = &self.board.layout().header;
        while !stop() {
            let rung = h.up_bell.load(Ordering::SeqCst);
            let mut work = h.up_work.swap(0, Ordering::SeqCst);
            while work != 0 {
                let lane = work.trailing_zeros();
                work &= work - 1;
                if (lane as usize) < LANES {
                    serve_lane(lane);
                }
            }
            // Where it may, poll a while before sleeping (see `SecondaryLane::run`).
            let rang = || (h.up_bell.load(Ordering::Acquire) != rung).then_some(());
            if spin.poll(rang, |_| stop()).is_some() {
                continue;
            }
            h.up_sleeping.store(1, Ordering::SeqCst);
            if h.up_bell.load(Ordering::SeqCst) == rung && !stop() {
                let ts = rustix::time::Timespec {
                    tv_sec: tick.as_secs() as i64,
                    tv_nsec: i64::from(tick.subsec_nanos()),
                };
                let _ = futex::wait(&h.up_bell, futex::Flags::empty(), rung, Some(&ts));
            }
            h.up_sleeping.store(0, Ordering::SeqCst);
        }
    }

    /// Wakes the primary's lane thread (to see its stop flag).
    pub fn wake_up_thread(&self) {
        let h = &self.board.layout().header;
        h.up_bell.fetch_add(1, Ordering::SeqCst);
        wake_all(&h.up_bell);
    }
}

/// A ring cell's turn word when it is free for position `pos` (see `Cell::seq`).
fn ring_free(pos: u64) -> u64 {
    (pos / RING as u64).wrapping_mul(2)
}

/// Tells the primary's lane thread that lane `lane` has work, waking it if it sleeps.
fn ring_primary(board: &Board, lane: u32) {
    let h = &board.layout().header;
    h.up_work.fetch_or(1 << lane, Ordering::SeqCst);
    h.up_bell.fetch_add(1, Ordering::SeqCst);
    if h.up_sleeping.load(Ordering::SeqCst) != 0 {
        let _ = futex::wake(&h.up_bell, futex::Flags::empty(), 1);
    }
}

/// Answers a secondary's request in slot `s` (tag `tag`) and wakes the requester; false if it
/// had given the slot up.
fn settle_up(s: &Slot, tag: u32, reply: &[u8]) -> bool {
    if !s.answer(tag, reply) {
        return false;
    }
    s.wake.fetch_add(1, Ordering::AcqRel);
    wake_all(&s.wake);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A directory of this test's own, removed when dropped (also when the test fails).
    struct Dir(std::path::PathBuf);

    impl std::ops::Deref for Dir {
        type Target = std::path::Path;
        fn deref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir() -> Dir {
        let d = std::env::temp_dir().join(format!(
            "mp-lane-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn uid() -> u32 {
        rustix::process::getuid().as_raw()
    }

    /// A secondary's lane thread in this process: answers each request with its own bytes
    /// reversed, unless `silent`; says on `owing` when it owes one.
    fn serve(
        lane: Arc<SecondaryLane>,
        stop: Arc<AtomicBool>,
        silent: bool,
        owing: std::sync::mpsc::Sender<()>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let stopping = || stop.load(Ordering::Acquire);
            let mut spin = Spinner::new(Duration::ZERO, Arc::default());
            let mut serve = |_: usize, bytes: &[u8], owe: &dyn Fn(Name)| {
                let name = Name::new("q").unwrap();
                owe(name);
                let _ = owing.send(());
                if !silent {
                    let r: Vec<u8> = bytes.iter().rev().copied().collect();
                    assert!(matches!(lane.reply(&name, &r), Answered::Lane));
                }
            };
            lane.run(&stopping, Duration::from_millis(50), &mut spin, &mut || {
                lane.serve_posted(&mut serve)
            });
        })
    }

    #[test]
    fn a_request_posted_to_a_lane_is_answered_through_it() {
        let d = dir();
        let board = Board::create(&d, std::process::id()).unwrap();
        let lanes = PrimaryLanes::new(board, uid(), false);
        let lane = Arc::new(
            SecondaryLane::claim(Board::open(&d, uid()).unwrap(), "mp_socket_1_a").unwrap(),
        );
        let which = lanes.lanes_for(["mp_socket_1_a", "mp_socket_2_b"].into_iter());
        let Some([Some(l), None]) = which.as_deref() else {
            panic!("{which:?}")
        };
        let stop = Arc::new(AtomicBool::new(false));
        let t = serve(
            lane.clone(),
            stop.clone(),
            false,
            std::sync::mpsc::channel().0,
        );
        // More requests than a lane has slots, one after the other: slots are freed.
        for i in 0..3 * SLOTS as u8 {
            let mut r = lanes.begin().unwrap();
            assert!(r.post(0, *l, &[i, 1, 2]));
            r.ring();
            let mut got = Vec::new();
            let mut buf = [0u8; BUF_LEN];
            while got.is_empty() {
                let seen = r.wake_seen();
                if r.harvest(&mut buf, |p, b| got.push((p, b.to_vec()))) == 0 {
                    r.sleep(seen, Duration::from_secs(5));
                }
            }
            assert_eq!(got, [(0, vec![2, 1, i])]);
            assert!(r.all_answered());
            lanes.finish(r);
        }
        stop.store(true, Ordering::Release);
        lane.wake();
        t.join().unwrap();
        lane.release();
    }

    #[test]
    fn a_request_given_up_frees_its_slots_and_a_late_answer_goes_nowhere() {
        let d = dir();
        let board = Board::create(&d, std::process::id()).unwrap();
        let lanes = PrimaryLanes::new(board.clone(), uid(), false);
        let lane = Arc::new(
            SecondaryLane::claim(Board::open(&d, uid()).unwrap(), "mp_socket_1_a").unwrap(),
        );
        let l = lanes.lanes_for(["mp_socket_1_a"].into_iter()).unwrap()[0].unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, owing) = std::sync::mpsc::channel();
        let t = serve(lane.clone(), stop.clone(), true, tx);
        let q = Name::new("q").unwrap();
        for _ in 0..3 * SLOTS {
            let mut r = lanes.begin().unwrap();
            assert!(r.post(0, l, b"x"));
            r.ring();
            // Wait until the secondary took it (it owes the answer), then give up.
            owing.recv_timeout(Duration::from_secs(10)).unwrap();
            lanes.finish(r);
        }
        // Each new post of the same action emptied the abandoned slot of the one before: at
        // most one is still owed, and its late answer goes nowhere.
        assert!(matches!(lane.reply(&q, b"late"), Answered::Gone));
        assert!(matches!(lane.reply(&q, b"again"), Answered::NotHere));
        let ln = &board.layout().lanes[l as usize];
        assert!(
            ln.down
                .slots
                .iter()
                .all(|s| s.state.load(Ordering::Acquire) & STATE == EMPTY)
        );
        stop.store(true, Ordering::Release);
        lane.wake();
        t.join().unwrap();
    }

    #[test]
    fn a_board_of_another_build_or_a_dead_primary_is_not_used() {
        let d = dir();
        let board = Board::create(&d, std::process::id()).unwrap();
        board.layout().header.size.store(1, Ordering::Relaxed);
        assert!(Board::open(&d, uid()).is_none());
        board
            .layout()
            .header
            .size
            .store(size_of::<Layout>() as u64, Ordering::Relaxed);
        assert!(Board::open(&d, uid()).is_some());
        // No process has pid 0x7fff_fff0 (above the kernel's pid_max limit).
        board
            .layout()
            .header
            .primary_pid
            .store(0x7fff_fff0, Ordering::Relaxed);
        assert!(Board::open(&d, uid()).is_none());
        // Another user's board is not opened.
        assert!(Board::open(&d, uid() + 1).is_none());
    }

    /// Every operation either side makes, on a board a peer filled with garbage: nothing
    /// panics, nothing blocks (only the non-sleeping operations are called).
    #[test]
    fn a_board_full_of_garbage_never_panics() {
        let d = dir();
        let board = Board::create(&d, std::process::id()).unwrap();
        let lanes = PrimaryLanes::new(board.clone(), uid(), true);
        let lane = SecondaryLane::claim(Board::open(&d, uid()).unwrap(), "mp_socket_1_a").unwrap();
        let q = Name::new("q").unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let words = size_of::<Layout>() / 8;
        let base = board.map.as_ptr().cast::<AtomicU64>();
        // SAFETY: the mapping is `size_of::<Layout>()` bytes of atomics, 8-aligned (page
        // aligned), alive as long as `board`; viewing it as AtomicU64 words is what a peer's
        // writes through its own mapping amount to.
        let all = unsafe { std::slice::from_raw_parts(base, words) };
        let mut buf = [0u8; BUF_LEN];
        for round in 0..200 {
            // Garbage everywhere, or in a few words only (states, counts, lengths).
            if round % 2 == 0 {
                for w in all {
                    w.store(next(), Ordering::Relaxed);
                }
            } else {
                for _ in 0..64 {
                    all[(next() as usize) % words].store(next(), Ordering::Relaxed);
                }
            }
            let names = ["mp_socket_1_a", "mp_socket_2_b"];
            if let Some(which) = lanes.lanes_for(names.into_iter())
                && let Some(mut r) = lanes.begin()
            {
                for (i, l) in which.iter().enumerate() {
                    if let Some(l) = l {
                        r.post(i, *l, b"garbage");
                    }
                }
                r.ring();
                r.harvest(&mut buf, |_, _| {});
                let _ = r.all_answered();
                lanes.finish(r);
            }
            lanes.sent("mp_socket_1_a", &[1, 0, 0, 0]);
            lanes.nudge();
            if let Some(i) = lanes.lane_of_pid(std::process::id()) {
                lanes.serve_up(i, &mut |_, _, _, _, owe| owe(q));
                let _ = lanes.reply_up("mp_socket_1_a", &q, b"r");
            }
            lane.serve_posted(&mut |_, _, owe| owe(q));
            let _ = lane.reply(&q, b"r");
            lane.handled();
            lane.sent_up(&[0, 0, 0, 0]);
            let _ = lane.push_up(b"message");
            if let Some(slot) = lane.reserve_up() {
                let r = slot.post(b"up");
                let _ = r.take(&mut buf);
                r.finish();
            }
            if round % 50 == 49 {
                lanes.gone("mp_socket_1_a");
            }
        }
    }
}
