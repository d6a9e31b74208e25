//! The shared memory configuration: the file `memplane_mem` in the runtime directory, mapped by
//! every process, holding the memseg lists and each segment's state.
//!
//! Layout (`#[repr(C)]`, fixed-size fields, atomics only; no pointers, so it may be mapped at any
//! address): a [`Header`] with a magic and a layout version and the sizes of its records, up to
//! [`MAX_LISTS`] [`ListHeader`]s, then one array of [`Seg`] per list at the offset its header
//! gives. Only the primary writes list and segment state; everyone reads. A secondary validates
//! everything it reads from here before using it: the file is another process's output.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use rustix::mm::{MapFlags, ProtFlags};

use crate::error::MemError;

/// The file's name in the runtime directory.
pub const FILE_NAME: &str = "memplane_mem";
/// Magic at offset 0, written last by the primary.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MPLNMEM\x01");
/// Layout version; bump on any change to the records below.
pub const LAYOUT_VERSION: u32 = 1;
/// Most memseg lists.
pub const MAX_LISTS: usize = 32;

/// Backing codes stored in the header.
pub mod backing_code {
    /// `MFD_HUGETLB` memfd per list, fds passed over the channel.
    pub const MEMFD: u32 = 1;
    /// One hugetlbfs file per page.
    pub const FILE_PER_PAGE: u32 = 2;
    /// One hugetlbfs file per list.
    pub const SINGLE_FILE: u32 = 3;
    /// Plain memfd per list (no hugepages).
    pub const NO_HUGE: u32 = 4;
}

/// IOVA mode codes stored in the header.
pub mod iova_code {
    /// Physical addresses.
    pub const PA: u32 = 1;
    /// Virtual addresses.
    pub const VA: u32 = 2;
}

/// Segment states.
pub mod seg_state {
    /// Not allocated.
    pub const FREE: u32 = 0;
    /// Allocated and mapped in the primary.
    pub const USED: u32 = 1;
}

/// The head of the file.
#[repr(C)]
pub struct Header {
    /// [`MAGIC`] once the primary has finished writing the layout.
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`].
    pub version: u32,
    /// `size_of::<Header>()` of the writer.
    pub header_size: u32,
    /// `size_of::<ListHeader>()` of the writer.
    pub list_size: u32,
    /// `size_of::<Seg>()` of the writer.
    pub seg_size: u32,
    /// The primary's pid.
    pub primary_pid: u32,
    /// A [`backing_code`].
    pub backing: u32,
    /// An [`iova_code`].
    pub iova_mode: u32,
    /// Lists in use.
    pub nlists: u32,
    /// Start of the address range every process reserves.
    pub va_base: u64,
    /// Its length.
    pub va_len: u64,
    /// Total memory limit in bytes (0: none).
    pub total_limit: u64,
    /// Bytes allocated now, all lists.
    pub total_used: AtomicU64,
    /// The hugetlbfs directory of file backings, NUL-terminated.
    pub huge_dir: [u8; 128],
    /// The file prefix (names hugepage files), NUL-terminated.
    pub prefix: [u8; 64],
    /// The lists.
    pub lists: [ListHeader; MAX_LISTS],
}

/// One memseg list: pages of one size on one node, at consecutive addresses.
#[repr(C)]
pub struct ListHeader {
    /// Page size in bytes.
    pub page_size: u64,
    /// Address of segment 0.
    pub base: u64,
    /// NUMA node.
    pub node: u32,
    /// Number of segments.
    pub n_segs: u32,
    /// Byte offset of this list's [`Seg`] array in the file.
    pub segs_offset: u64,
    /// Bumped on every allocation or free in the list.
    pub version: AtomicU64,
    /// Segments in use.
    pub used: AtomicU32,
    /// Padding.
    pub _pad: u32,
    /// Per-node limit in bytes (0: none).
    pub node_limit: u64,
}

/// One segment (one page).
#[repr(C)]
pub struct Seg {
    /// A [`seg_state`].
    pub state: AtomicU32,
    /// Flags: bit 0 = allocated up front (`--socket-mem`), not to be freed by heap shrink.
    pub flags: AtomicU32,
    /// Bumped every time the segment is allocated: a process whose mapping carries an older
    /// generation maps the page again.
    pub generation: AtomicU64,
    /// The page's IOVA.
    pub iova: AtomicU64,
    /// Reserved.
    pub _pad: u64,
}

/// Segment flag: allocated up front, never returned by heap shrink.
pub const SEG_PINNED: u32 = 1;

impl Seg {
    /// The segment was allocated up front (`--socket-mem`).
    pub fn pinned(&self) -> bool {
        self.flags.load(Ordering::Acquire) & SEG_PINNED != 0
    }
}

const _: () = {
    assert!(std::mem::size_of::<Seg>() == 32);
    assert!(std::mem::size_of::<ListHeader>() == 56);
    assert!(std::mem::align_of::<Header>() == 8);
};

/// A file in the runtime directory mapped shared, read-write, wherever the kernel puts it; the
/// mapping goes with the value. The memory configuration and the heap's state are both kept in
/// one.
pub struct SharedFile {
    ptr: *mut u8,
    len: usize,
    _file: File,
    path: PathBuf,
}

// SAFETY: the value owns a shared mapping; what is read or written through it is the owner's
// business (atomics or locks in the mapped data).
unsafe impl Send for SharedFile {}
// SAFETY: as above.
unsafe impl Sync for SharedFile {}

impl SharedFile {
    /// Creates `path` anew (removing a leftover), `len` bytes of zeros, mode 0600, and maps it.
    pub fn create(path: &Path, len: usize) -> std::io::Result<SharedFile> {
        let _ = std::fs::remove_file(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        file.set_len(len as u64)?;
        Self::map(file, path, len)
    }

    /// Opens `path` read-write and maps all of it.
    pub fn open(path: &Path) -> std::io::Result<SharedFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        Self::map(file, path, len)
    }

    fn map(file: File, path: &Path, len: usize) -> std::io::Result<SharedFile> {
        if len == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidData));
        }
        // SAFETY: a fresh shared mapping of `len` bytes of our own open file, placed wherever the
        // kernel chooses; it touches no existing mapping.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                file.as_fd(),
                0,
            )
        }?;
        Ok(SharedFile {
            ptr: p.cast(),
            len,
            _file: file,
            path: path.to_owned(),
        })
    }

    /// The mapping's first byte (page aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty mapping (never: creation refuses it).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file; the mapping stays until the value is dropped.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for SharedFile {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `map`; nothing borrows from `self` any
        // more.
        unsafe {
            let _ = rustix::mm::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// The shared configuration, mapped in this process.
pub struct SharedConfig {
    file: SharedFile,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics or through fields that are
// written once before the magic is published; the struct owns the mapping until drop.
unsafe impl Send for SharedConfig {}
// SAFETY: as above; shared references only read plain fields or use atomics.
unsafe impl Sync for SharedConfig {}

fn page_align(n: u64) -> u64 {
    n.next_multiple_of(4096)
}

/// A list as the primary lays it out.
#[derive(Clone, Copy, Debug)]
pub struct ListSpec {
    /// Page size.
    pub page_size: u64,
    /// Node.
    pub node: u32,
    /// Segments.
    pub n_segs: u32,
    /// Address of segment 0.
    pub base: u64,
    /// Per-node limit (0: none).
    pub node_limit: u64,
}

/// What the primary writes into the header.
pub struct HeaderSpec<'a> {
    /// Backing code.
    pub backing: u32,
    /// IOVA code.
    pub iova_mode: u32,
    /// Reservation start.
    pub va_base: u64,
    /// Reservation length.
    pub va_len: u64,
    /// Total limit.
    pub total_limit: u64,
    /// Hugetlbfs directory for file backings.
    pub huge_dir: Option<&'a Path>,
    /// File prefix.
    pub prefix: &'a str,
    /// The lists.
    pub lists: &'a [ListSpec],
}

fn copy_cstr(dst: &mut [u8], src: &[u8]) -> Result<(), MemError> {
    if src.len() >= dst.len() {
        return Err(MemError::Invalid(format!(
            "{:?} is longer than {} bytes",
            String::from_utf8_lossy(src),
            dst.len() - 1
        )));
    }
    dst.fill(0);
    dst[..src.len()].copy_from_slice(src);
    Ok(())
}

fn cstr(b: &[u8]) -> &[u8] {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..n]
}

impl SharedConfig {
    fn wrap(file: SharedFile) -> SharedConfig {
        SharedConfig {
            ptr: file.as_ptr(),
            len: file.len(),
            file,
        }
    }

    /// Creates the file (replacing a dead primary's) and writes the layout; the magic goes in
    /// last, so a secondary never sees a half-written configuration.
    pub fn create(dir: &Path, spec: &HeaderSpec<'_>) -> Result<SharedConfig, MemError> {
        if spec.lists.len() > MAX_LISTS {
            return Err(MemError::Invalid(format!(
                "{} memseg lists, at most {MAX_LISTS}",
                spec.lists.len()
            )));
        }
        let path = dir.join(FILE_NAME);
        let mut off = page_align(std::mem::size_of::<Header>() as u64);
        let mut offsets = Vec::with_capacity(spec.lists.len());
        for l in spec.lists {
            offsets.push(off);
            off = page_align(off + l.n_segs as u64 * std::mem::size_of::<Seg>() as u64);
        }
        let cfg = SharedConfig::wrap(
            SharedFile::create(&path, off as usize)
                .map_err(|e| MemError::io(format!("create {}", path.display()), e))?,
        );
        {
            // SAFETY: the file is new and only we have it mapped; the mapping is at least
            // size_of::<Header>() bytes and page aligned; a zero-filled Header is a valid value
            // (integers, arrays of integers, atomics).
            let h = unsafe { &mut *(cfg.ptr as *mut Header) };
            h.version = LAYOUT_VERSION;
            h.header_size = std::mem::size_of::<Header>() as u32;
            h.list_size = std::mem::size_of::<ListHeader>() as u32;
            h.seg_size = std::mem::size_of::<Seg>() as u32;
            h.primary_pid = std::process::id();
            h.backing = spec.backing;
            h.iova_mode = spec.iova_mode;
            h.nlists = spec.lists.len() as u32;
            h.va_base = spec.va_base;
            h.va_len = spec.va_len;
            h.total_limit = spec.total_limit;
            if let Some(d) = spec.huge_dir {
                copy_cstr(&mut h.huge_dir, d.as_os_str().as_encoded_bytes())?;
            }
            copy_cstr(&mut h.prefix, spec.prefix.as_bytes())?;
            for (i, l) in spec.lists.iter().enumerate() {
                let lh = &mut h.lists[i];
                lh.page_size = l.page_size;
                lh.base = l.base;
                lh.node = l.node;
                lh.n_segs = l.n_segs;
                lh.segs_offset = offsets[i];
                lh.node_limit = l.node_limit;
            }
        }
        cfg.header().magic.store(MAGIC, Ordering::Release);
        Ok(cfg)
    }

    /// Maps the primary's file and checks everything in it before trusting it.
    pub fn attach(dir: &Path) -> Result<SharedConfig, MemError> {
        let path = dir.join(FILE_NAME);
        let file = SharedFile::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => MemError::NotInitialised {
                dir: dir.to_owned(),
            },
            _ => MemError::io(format!("open {}", path.display()), e),
        })?;
        if file.len() < std::mem::size_of::<Header>() || file.len() > (1 << 32) {
            return Err(MemError::Layout {
                what: format!("{} is {} bytes", path.display(), file.len()),
            });
        }
        let cfg = SharedConfig::wrap(file);
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), MemError> {
        let h = self.header();
        let bad = |what: String| Err(MemError::Layout { what });
        let magic = h.magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return bad(format!("magic {magic:#x}, expected {MAGIC:#x}"));
        }
        if h.version != LAYOUT_VERSION {
            return bad(format!(
                "layout version {}, this build reads {LAYOUT_VERSION}",
                h.version
            ));
        }
        if h.header_size as usize != std::mem::size_of::<Header>()
            || h.list_size as usize != std::mem::size_of::<ListHeader>()
            || h.seg_size as usize != std::mem::size_of::<Seg>()
        {
            return bad(format!(
                "record sizes {}/{}/{}, this build's {}/{}/{}",
                h.header_size,
                h.list_size,
                h.seg_size,
                std::mem::size_of::<Header>(),
                std::mem::size_of::<ListHeader>(),
                std::mem::size_of::<Seg>()
            ));
        }
        if h.nlists as usize > MAX_LISTS {
            return bad(format!("{} lists", h.nlists));
        }
        let va_end = h.va_base.checked_add(h.va_len);
        if h.va_base == 0 || va_end.is_none() {
            return bad("address range".into());
        }
        for i in 0..h.nlists as usize {
            let l = &h.lists[i];
            let segs_end = (l.n_segs as u64)
                .checked_mul(std::mem::size_of::<Seg>() as u64)
                .and_then(|b| b.checked_add(l.segs_offset));
            let va = (l.n_segs as u64)
                .checked_mul(l.page_size)
                .and_then(|b| b.checked_add(l.base));
            if !l.page_size.is_power_of_two()
                || l.page_size < 4096
                || !l.segs_offset.is_multiple_of(8)
                || l.segs_offset < std::mem::size_of::<Header>() as u64
                || segs_end.is_none_or(|e| e > self.len as u64)
                || l.base < h.va_base
                || !l.base.is_multiple_of(l.page_size)
                || va.is_none_or(|e| Some(e) > va_end)
            {
                return bad(format!("memseg list {i}"));
            }
        }
        Ok(())
    }

    /// The header.
    pub fn header(&self) -> &Header {
        // SAFETY: the mapping holds at least a Header (checked at create/attach), is page
        // aligned, and lives as long as `self`; all fields are integers or atomics, valid for any
        // bit pattern.
        unsafe { &*(self.ptr as *const Header) }
    }

    /// Lists in use.
    pub fn nlists(&self) -> usize {
        (self.header().nlists as usize).min(MAX_LISTS)
    }

    /// List `i`'s header.
    pub fn list(&self, i: usize) -> &ListHeader {
        &self.header().lists[i]
    }

    /// List `i`'s segments.
    pub fn segs(&self, i: usize) -> &[Seg] {
        let l = self.list(i);
        // SAFETY: validate()/create() checked that segs_offset .. segs_offset + n_segs * 32 lies
        // inside the mapping and is 8-aligned; Seg is all atomics (valid for any bits, safe to
        // share); the slice lives as long as `self`.
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.add(l.segs_offset as usize) as *const Seg,
                l.n_segs as usize,
            )
        }
    }

    /// The hugetlbfs directory of file backings.
    pub fn huge_dir(&self) -> Option<PathBuf> {
        let b = cstr(&self.header().huge_dir);
        (!b.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(b)))
    }

    /// The file prefix.
    pub fn prefix(&self) -> String {
        String::from_utf8_lossy(cstr(&self.header().prefix)).into_owned()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Removes the file (the primary, at exit).
    pub fn remove(&self) {
        self.file.remove();
    }
}

use std::os::unix::ffi::OsStrExt;
