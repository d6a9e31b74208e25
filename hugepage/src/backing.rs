//! Where each page's memory comes from, and how it goes back to the kernel.
//!
//! - memfd (with `MFD_HUGETLB` for hugepages, plain for no-huge): one per memseg list, page `i`
//!   at offset `i * page_size`; the primary creates them and hands the fds to secondaries over
//!   the channel; a freed page is punched out of the file (`FALLOC_FL_PUNCH_HOLE`), which returns
//!   it to the kernel at once.
//! - one hugetlbfs file per page (`<huge-dir>/<prefix>map_<list>_<seg>`): a freed page's file is
//!   unlinked; the page returns to the kernel when the last process unmaps it.
//! - one hugetlbfs file per list (`<huge-dir>/<prefix>map_<list>`), punched like a memfd.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FallocateFlags, MemfdFlags};

use crate::error::MemError;
use crate::shared::backing_code;

/// The page store of one process.
pub enum PageStore {
    /// One memfd per list.
    Memfd {
        /// The fds, by list index (`MFD_HUGETLB` ones for hugepages).
        fds: Vec<OwnedFd>,
    },
    /// One hugetlbfs file per page.
    FilePerPage {
        /// The hugetlbfs directory.
        dir: PathBuf,
        /// The file prefix.
        prefix: String,
    },
    /// One hugetlbfs file per list.
    SingleFile {
        /// The hugetlbfs directory.
        dir: PathBuf,
        /// The file prefix.
        prefix: String,
        /// The open files, by list index.
        fds: Vec<OwnedFd>,
    },
}

/// A borrowed or owned fd to map a page from.
pub enum Source<'a> {
    /// The store keeps the fd.
    Borrowed(BorrowedFd<'a>),
    /// Opened for this mapping only; closed after it.
    Owned(OwnedFd),
}

impl Source<'_> {
    /// The fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Source::Borrowed(b) => *b,
            Source::Owned(o) => o.as_fd(),
        }
    }
}

fn huge_flags(page_size: u64) -> MemfdFlags {
    // MFD_HUGE_SHIFT is 26: the page size's log2 selects the hugepage pool.
    MemfdFlags::HUGETLB | MemfdFlags::from_bits_retain(page_size.trailing_zeros() << 26)
}

fn open_file(path: &Path, create: bool, len: u64) -> Result<OwnedFd, MemError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| MemError::io(format!("open {}", path.display()), e))?;
    if create && f.metadata().map(|m| m.len()).unwrap_or(0) < len {
        f.set_len(len)
            .map_err(|e| MemError::io(format!("size {}", path.display()), e))?;
    }
    Ok(f.into())
}

impl PageStore {
    /// The primary's store for `lists` (page size, segment count), of kind `code`.
    pub fn create(
        code: u32,
        lists: &[(u64, u32)],
        huge_dir: Option<&Path>,
        prefix: &str,
    ) -> Result<PageStore, MemError> {
        match code {
            backing_code::MEMFD | backing_code::NO_HUGE => {
                let huge = code == backing_code::MEMFD;
                let mut fds = Vec::new();
                for (i, &(ps, n)) in lists.iter().enumerate() {
                    let flags = MemfdFlags::CLOEXEC
                        | if huge {
                            huge_flags(ps)
                        } else {
                            MemfdFlags::empty()
                        };
                    let fd = rustix::fs::memfd_create(format!("memplane_list_{i}"), flags)
                        .map_err(|e| MemError::io("memfd_create", e.into()))?;
                    rustix::fs::ftruncate(&fd, ps * n as u64)
                        .map_err(|e| MemError::io("size memfd", e.into()))?;
                    fds.push(fd);
                }
                Ok(PageStore::Memfd { fds })
            }
            backing_code::FILE_PER_PAGE | backing_code::SINGLE_FILE => {
                let dir = huge_dir
                    .ok_or_else(|| MemError::Invalid("file backing without --huge-dir".into()))?
                    .to_owned();
                clean_stale_files(&dir, prefix);
                if code == backing_code::FILE_PER_PAGE {
                    return Ok(PageStore::FilePerPage {
                        dir,
                        prefix: prefix.to_owned(),
                    });
                }
                let mut fds = Vec::new();
                for (i, &(ps, n)) in lists.iter().enumerate() {
                    let p = dir.join(format!("{prefix}map_{i}"));
                    fds.push(open_file(&p, true, ps * n as u64)?);
                }
                Ok(PageStore::SingleFile {
                    dir,
                    prefix: prefix.to_owned(),
                    fds,
                })
            }
            c => Err(MemError::Layout {
                what: format!("backing code {c}"),
            }),
        }
    }

    /// A secondary's store: the primary's memfds (received over the channel), or the files.
    pub fn attach(
        code: u32,
        nlists: usize,
        huge_dir: Option<PathBuf>,
        prefix: String,
        memfds: Vec<OwnedFd>,
    ) -> Result<PageStore, MemError> {
        match code {
            backing_code::MEMFD | backing_code::NO_HUGE => {
                if memfds.len() != nlists {
                    return Err(MemError::Layout {
                        what: format!("{} list fds for {nlists} lists", memfds.len()),
                    });
                }
                Ok(PageStore::Memfd { fds: memfds })
            }
            backing_code::FILE_PER_PAGE => Ok(PageStore::FilePerPage {
                dir: huge_dir.ok_or_else(|| MemError::Layout {
                    what: "file backing without a directory".into(),
                })?,
                prefix,
            }),
            backing_code::SINGLE_FILE => {
                let dir = huge_dir.ok_or_else(|| MemError::Layout {
                    what: "file backing without a directory".into(),
                })?;
                let mut fds = Vec::new();
                for i in 0..nlists {
                    fds.push(open_file(&dir.join(format!("{prefix}map_{i}")), false, 0)?);
                }
                Ok(PageStore::SingleFile { dir, prefix, fds })
            }
            c => Err(MemError::Layout {
                what: format!("backing code {c}"),
            }),
        }
    }

    /// The fds to hand to a secondary (memfd stores only).
    pub fn shareable_fds(&self) -> Option<&[OwnedFd]> {
        match self {
            PageStore::Memfd { fds, .. } => Some(fds),
            _ => None,
        }
    }

    /// The one file of list `list` (memfd and single-file stores), which holds page `i` at
    /// offset `i * page_size`; `None` for file-per-page stores.
    pub fn list_fd(&self, list: usize) -> Option<BorrowedFd<'_>> {
        match self {
            PageStore::Memfd { fds, .. } | PageStore::SingleFile { fds, .. } => {
                fds.get(list).map(|f| f.as_fd())
            }
            PageStore::FilePerPage { .. } => None,
        }
    }

    fn page_path(dir: &Path, prefix: &str, list: usize, seg: u32) -> PathBuf {
        dir.join(format!("{prefix}map_{list}_{seg}"))
    }

    /// Where to map page `seg` of list `list` from: (fd, offset). `create` makes the page's file
    /// (primary, file-per-page).
    pub fn source(
        &self,
        list: usize,
        seg: u32,
        page_size: u64,
        create: bool,
    ) -> Result<(Source<'_>, u64), MemError> {
        match self {
            PageStore::Memfd { fds, .. } | PageStore::SingleFile { fds, .. } => {
                let fd = fds.get(list).ok_or_else(|| MemError::Layout {
                    what: format!("no store for list {list}"),
                })?;
                Ok((Source::Borrowed(fd.as_fd()), seg as u64 * page_size))
            }
            PageStore::FilePerPage { dir, prefix } => {
                let p = Self::page_path(dir, prefix, list, seg);
                if create {
                    let _ = std::fs::remove_file(&p);
                }
                Ok((Source::Owned(open_file(&p, create, page_size)?), 0))
            }
        }
    }

    /// Gives page `seg` of list `list` back to the kernel (primary, after unmapping it).
    pub fn release(&self, list: usize, seg: u32, page_size: u64) -> Result<(), MemError> {
        match self {
            PageStore::Memfd { fds, .. } | PageStore::SingleFile { fds, .. } => {
                let fd = fds.get(list).ok_or_else(|| MemError::Layout {
                    what: format!("no store for list {list}"),
                })?;
                rustix::fs::fallocate(
                    fd,
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    seg as u64 * page_size,
                    page_size,
                )
                .map_err(|e| MemError::io("release page (punch hole)", e.into()))
            }
            PageStore::FilePerPage { dir, prefix } => {
                std::fs::remove_file(Self::page_path(dir, prefix, list, seg))
                    .map_err(|e| MemError::io("release page (unlink)", e))
            }
        }
    }

    /// Removes every file of this store (primary at exit).
    pub fn remove_files(&self) {
        match self {
            PageStore::Memfd { .. } => {}
            PageStore::FilePerPage { dir, prefix } | PageStore::SingleFile { dir, prefix, .. } => {
                clean_stale_files(dir, prefix)
            }
        }
    }
}

/// Removes files a dead primary with the same prefix left in `dir`.
pub fn clean_stale_files(dir: &Path, prefix: &str) {
    let want = format!("{prefix}map_");
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_str().is_some_and(|n| n.starts_with(&want)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
