//! Memzones: named blocks of the shared heap, found by name from any process.
//!
//! The table lives in the heap file: up to 2560 entries (DPDK's default maximum) and a hash index
//! over their names, so a lookup costs one hash and a probe or two instead of DPDK's scan of every
//! name. Names are 1..=31 bytes (DPDK's 32 with the NUL). Reservation follows DPDK's checks and
//! rules: alignment a power of two (raised to 64), length rounded up to 64 (0 asks for the
//! largest free block, or the boundary when one is given), an optional power-of-two boundary the
//! zone must not cross, an IOVA-contiguous flag.

use std::fmt;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;

use memplane_core::channel::Channel;

use crate::heap::{AllocError, Heap};
use crate::state::{MAX_MEMZONES, MZ_INDEX, MZ_NAME_LEN, MemzoneEntry, MemzoneTable};
use crate::tlsf::HEADER;

/// The zone must be contiguous in IOVA space (DPDK's `RTE_MEMZONE_IOVA_CONTIG`).
pub const IOVA_CONTIG: u32 = 0x0010_0000;
/// Every flag bit this build knows (page-size hints are accepted and recorded).
pub const KNOWN_FLAGS: u32 =
    0x1 | 0x2 | 0x4 | 0x100 | 0x200 | 0x1_0000 | 0x2_0000 | 0x4_0000 | 0x8_0000 | IOVA_CONTIG;
const TOMB: u32 = u32::MAX;

/// A reserved memzone, as lookups return it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memzone {
    /// Its name.
    pub name: MzName,
    /// Address (valid in every process).
    pub addr: u64,
    /// IOVA.
    pub iova: u64,
    /// Length.
    pub len: u64,
    /// Page size of the memory under it.
    pub page_size: u64,
    /// NUMA node.
    pub node: u32,
    /// Flags given at reservation.
    pub flags: u32,
}

/// A memzone name (1..=31 bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MzName([u8; MZ_NAME_LEN]);

impl MzName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        let n = self.0.iter().position(|&c| c == 0).unwrap_or(MZ_NAME_LEN);
        std::str::from_utf8(&self.0[..n]).unwrap_or("?")
    }
}

impl fmt::Debug for MzName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Why a memzone operation failed (DPDK's errno in brackets).
#[derive(Debug)]
pub enum MemzoneError {
    /// The table is full (ENOSPC).
    TableFull,
    /// Name empty, too long (31 bytes at most) or not text (ENAMETOOLONG / EINVAL).
    BadName(String),
    /// A zone with this name exists (EEXIST).
    Exists(String),
    /// Bad alignment, boundary, length or flags (EINVAL).
    Invalid(String),
    /// No such zone (ENOENT).
    NotFound(String),
    /// The heap could not provide the memory (ENOMEM).
    Alloc(AllocError),
}

impl fmt::Display for MemzoneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemzoneError::TableFull => write!(f, "memzone table is full ({MAX_MEMZONES} zones)"),
            MemzoneError::BadName(n) => write!(
                f,
                "bad memzone name {n:?}: 1 to {} bytes of text",
                MZ_NAME_LEN - 1
            ),
            MemzoneError::Exists(n) => write!(f, "memzone {n:?} already exists"),
            MemzoneError::Invalid(w) => write!(f, "invalid memzone request: {w}"),
            MemzoneError::NotFound(n) => write!(f, "no memzone named {n:?}"),
            MemzoneError::Alloc(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for MemzoneError {}

fn hash(name: &[u8]) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h ^ (h >> 29)) as usize & (MZ_INDEX - 1)
}

fn entry_name(e: &MemzoneEntry) -> &[u8] {
    let n = e.name.iter().position(|&c| c == 0).unwrap_or(MZ_NAME_LEN);
    &e.name[..n]
}

fn check_name(name: &str) -> Result<(), MemzoneError> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= MZ_NAME_LEN || b.contains(&0) {
        return Err(MemzoneError::BadName(name.to_owned()));
    }
    Ok(())
}

/// Finds `name` in the index: (index slot, entry) if present.
fn find(t: &MemzoneTable, name: &[u8]) -> Option<(usize, usize)> {
    let mut slot = hash(name);
    for _ in 0..MZ_INDEX {
        match t.index[slot] {
            0 => return None,
            TOMB => {}
            v => {
                let e = (v - 1) as usize;
                if e < MAX_MEMZONES && t.entries[e].used == 1 && entry_name(&t.entries[e]) == name {
                    return Some((slot, e));
                }
            }
        }
        slot = (slot + 1) & (MZ_INDEX - 1);
    }
    None
}

/// The first entry not in use, from the bitmap.
fn free_entry(t: &MemzoneTable) -> Option<usize> {
    t.used_map
        .iter()
        .enumerate()
        .find(|(_, w)| **w != u64::MAX)
        .map(|(i, w)| i * 64 + w.trailing_ones() as usize)
        .filter(|&e| e < MAX_MEMZONES)
}

/// Rebuilds the name index from the entries (after many deletions, or a holder's death).
fn reindex(t: &mut MemzoneTable) {
    t.index = [0; MZ_INDEX];
    t.used_map = [0; MAX_MEMZONES / 64];
    t.tombs = 0;
    let mut count = 0;
    for i in 0..MAX_MEMZONES {
        if t.entries[i].used != 1 {
            continue;
        }
        t.used_map[i / 64] |= 1 << (i % 64);
        let mut slot = hash(entry_name(&t.entries[i]));
        while t.index[slot] != 0 {
            slot = (slot + 1) & (MZ_INDEX - 1);
        }
        t.index[slot] = i as u32 + 1;
        count += 1;
    }
    t.count = count;
}

/// Takes the memzone lock; repairs the index if a holder died. The table reference is exclusive
/// while the guard lives.
#[allow(clippy::mut_from_ref)]
fn lock_table<C: Channel>(
    h: &Heap<C>,
) -> Result<(crate::lock::Guard<'_>, &mut MemzoneTable), MemzoneError> {
    let mut g = h
        .shared
        .map
        .file()
        .mz_lock
        .lock()
        .map_err(|e| MemzoneError::Alloc(AllocError::Lock(e)))?;
    // SAFETY: we hold the memzone lock.
    let t = unsafe { h.shared.map.memzones_mut() };
    if g.recovered() {
        reindex(t);
        g.mark_consistent();
    }
    Ok((g, t))
}

fn to_zone(e: &MemzoneEntry) -> Memzone {
    Memzone {
        name: MzName(e.name),
        addr: e.addr,
        iova: e.iova,
        len: e.len,
        page_size: e.page_size,
        node: e.node.max(0) as u32,
        flags: e.flags,
    }
}

/// What to reserve.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZoneSpec {
    /// Length (0: the largest free block, or the boundary when one is given).
    pub len: u64,
    /// NUMA node (`None`: any).
    pub node: Option<u32>,
    /// Alignment (0: 64).
    pub align: u64,
    /// Boundary the zone must not cross (0: none).
    pub bound: u64,
    /// Flags ([`IOVA_CONTIG`], page-size hints).
    pub flags: u32,
}

impl<C: Channel> Heap<C>
where
    C::Fds: From<Vec<OwnedFd>> + Into<Vec<OwnedFd>>,
{
    /// Reserves a memzone named `name`.
    pub fn memzone_reserve(&self, name: &str, spec: ZoneSpec) -> Result<Memzone, MemzoneError> {
        check_name(name)?;
        let mut align = if spec.align == 0 { 64 } else { spec.align };
        if !align.is_power_of_two() {
            return Err(MemzoneError::Invalid(format!(
                "alignment {align} is not a power of two"
            )));
        }
        align = align.max(64);
        if spec.flags & !KNOWN_FLAGS != 0 {
            return Err(MemzoneError::Invalid(format!(
                "unknown flags {:#x}",
                spec.flags
            )));
        }
        if spec.len > u64::MAX - 63 {
            return Err(MemzoneError::Invalid(format!("length {}", spec.len)));
        }
        if spec.bound != 0 && (!spec.bound.is_power_of_two() || spec.len > spec.bound) {
            return Err(MemzoneError::Invalid(format!(
                "boundary {} must be a power of two at least the length {}",
                spec.bound, spec.len
            )));
        }
        let node = spec.node.unwrap_or_else(|| self.current_node());
        let mut len = if spec.len == 0 {
            if spec.bound != 0 {
                spec.bound
            } else {
                let s = self
                    .stats(node)
                    .map_err(MemzoneError::Alloc)?
                    .largest_free
                    .saturating_sub(HEADER);
                // The largest block, less what alignment may take at its front.
                (s.saturating_sub(align) / 64) * 64
            }
        } else {
            spec.len.next_multiple_of(64)
        };
        len = len.max(64);
        // A zone aligned to a power of two at least its length never crosses a multiple of a
        // boundary at least as large.
        if spec.bound != 0 {
            align = align
                .max(len.next_power_of_two())
                .min(spec.bound.max(align));
        }
        let (g, t) = lock_table(self)?;
        if find(t, name.as_bytes()).is_some() {
            return Err(MemzoneError::Exists(name.to_owned()));
        }
        let Some(slot_e) = free_entry(t) else {
            return Err(MemzoneError::TableFull);
        };
        let p = self
            .malloc_on(node, len as usize, align as usize)
            .map_err(MemzoneError::Alloc)?;
        let addr = p.as_ptr() as u64;
        let iova = self.mem.virt2iova(addr).unwrap_or(addr);
        if spec.flags & IOVA_CONTIG != 0 {
            let ps = self.mem.page_size_at(addr).unwrap_or(4096);
            let mut a = addr / ps * ps;
            while a + ps < addr + len {
                let (x, y) = (self.mem.virt2iova(a), self.mem.virt2iova(a + ps));
                if x.zip(y).is_none_or(|(x, y)| y != x + ps) {
                    let _ = self.free(p);
                    return Err(MemzoneError::Alloc(AllocError::OutOfMemory {
                        size: len,
                        why: "no IOVA-contiguous block of that size".into(),
                    }));
                }
                a += ps;
            }
        }
        let mut e = MemzoneEntry {
            name: [0; MZ_NAME_LEN],
            addr,
            iova,
            len,
            page_size: self.mem.page_size_at(addr).unwrap_or(0),
            node: node as i32,
            flags: spec.flags,
            used: 1,
            _pad: 0,
        };
        e.name[..name.len()].copy_from_slice(name.as_bytes());
        t.entries[slot_e] = e;
        t.used_map[slot_e / 64] |= 1 << (slot_e % 64);
        let mut slot = hash(name.as_bytes());
        while t.index[slot] != 0 && t.index[slot] != TOMB {
            slot = (slot + 1) & (MZ_INDEX - 1);
        }
        if t.index[slot] == TOMB {
            t.tombs -= 1;
        }
        t.index[slot] = slot_e as u32 + 1;
        t.count += 1;
        drop(g);
        Ok(to_zone(&e))
    }

    /// The memzone named `name`, from any process.
    pub fn memzone_lookup(&self, name: &str) -> Option<Memzone> {
        let (g, t) = lock_table(self).ok()?;
        let r = find(t, name.as_bytes()).map(|(_, e)| to_zone(&t.entries[e]));
        drop(g);
        r
    }

    /// Frees the memzone named `name` and its memory.
    pub fn memzone_free(&self, name: &str) -> Result<(), MemzoneError> {
        let (g, t) = lock_table(self)?;
        let (slot, e) =
            find(t, name.as_bytes()).ok_or_else(|| MemzoneError::NotFound(name.to_owned()))?;
        let addr = t.entries[e].addr;
        t.entries[e].used = 0;
        t.used_map[e / 64] &= !(1 << (e % 64));
        t.index[slot] = TOMB;
        t.tombs += 1;
        t.count -= 1;
        if t.tombs as usize > MZ_INDEX / 4 {
            reindex(t);
        }
        drop(g);
        let p = NonNull::new(addr as *mut u8).ok_or_else(|| MemzoneError::NotFound(name.into()))?;
        self.free(p).map_err(MemzoneError::Alloc)
    }

    /// Every memzone, in table order.
    pub fn memzone_walk(&self) -> Vec<Memzone> {
        let Ok((g, t)) = lock_table(self) else {
            return Vec::new();
        };
        let v = t
            .entries
            .iter()
            .filter(|e| e.used == 1)
            .map(to_zone)
            .collect();
        drop(g);
        v
    }

    /// Memzones reserved now.
    pub fn memzone_count(&self) -> usize {
        lock_table(self).map_or(0, |(_g, t)| t.count as usize)
    }
}
