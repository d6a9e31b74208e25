//! VFIO DMA mapping: the [`DmaMapper`] trait, the real container ([`VfioContainer`], a thin
//! layer over the VFIO type1 ioctls), a fake one for tests ([`FakeContainer`]) and the payload of
//! the IPC action that hands the container fd to secondaries ([`ACTION_VFIO`]).
//!
//! # When the mapper is called (DPDK's rules, reference section 5.11)
//!
//! - **map** is called for every new segment once it is mapped in the calling process and its
//!   IOVA is known, and *before* the memory is published to other processes (or to the heap).
//!   The type1 IOMMU pins the pages of the caller's virtual range, so the range must be mapped in
//!   the caller. Mapping a range that is already mapped is fine: the kernel answers `EEXIST`, and
//!   DPDK (and [`VfioContainer`]) take that as success.
//! - **unmap** is called *before* the pages are freed. The kernel writes back how many bytes it
//!   unmapped; a different size than asked is an error ([`DmaError::SizeMismatch`], DPDK's `EIO`).
//! - Only the primary maps. Secondaries use the same container (the fd is passed over IPC, so it
//!   is the same kernel object), so the primary's mappings serve every process.
//!
//! # Getting the container into a secondary
//!
//! 1. The primary opens the container ([`VfioContainer::open`]), attaches its groups, sets the
//!    IOMMU type ([`VfioContainer::set_iommu`]) and registers the action [`ACTION_VFIO`].
//! 2. A secondary sends a synchronous request named [`ACTION_VFIO`] whose parameter is
//!    [`encode_request`]`(`[`VfioRequest::ContainerFd`]`)` (12 bytes, the layout of DPDK's
//!    `struct vfio_mp_param`; the code is DPDK main's `0x100`).
//! 3. The primary decodes it with [`decode_request`] and replies with [`encode_reply`]: result
//!    [`VfioResult::Ok`] with the container fd attached (`SCM_RIGHTS`, one fd), or
//!    [`VfioResult::NoFd`] / [`VfioResult::Err`] with no fd.
//! 4. The secondary decodes the reply with [`decode_reply`], checks the fd count with
//!    [`check_reply_fds`] and wraps the fd with [`VfioContainer::from_fd`].
//!
//! Unlike DPDK, the action name is memplane's own (`memplane_vfio_container`, not DPDK's
//! `eal_vfio_mp_sync`), so the 22.11 / main difference in request codes does not apply.
//!
//! # The ioctl layer
//!
//! Request numbers are built like the kernel's `_IO(VFIO_TYPE, VFIO_BASE + n)` with
//! [`libc::_IO`] (which knows the per-architecture encodings). The argument structs are the
//! kernel's `struct vfio_iommu_type1_dma_map` (32 bytes) and `struct vfio_iommu_type1_dma_unmap`
//! (24 bytes: the header ends with a flexible `data[]` that only the dirty-bitmap variant uses, so
//! the plain form is 24 bytes, not 32). Numbers, sizes, offsets and flag values are checked
//! against `<linux/vfio.h>` by `tests/vfio.rs`, which compiles a small C program with `gcc`.
//!
//! Integer arguments (`VFIO_CHECK_EXTENSION`, `VFIO_SET_IOMMU`) are passed as `unsigned long`,
//! the width the kernel reads: passing an `int` through C varargs leaves the upper half of the
//! register unspecified.
//!
//! [`VfioContainer::from_fd`] accepts any descriptor. If it is not a VFIO container, the requests
//! still cannot touch this process's memory through an unrelated driver: type `';'` numbers
//! `0x64..=0x7F` are reserved for VFIO in the kernel's ioctl registry
//! (`Documentation/userspace-api/ioctl/ioctl-number.rst`), and other drivers refuse them with
//! `ENOTTY` (the tests check this with `/dev/null` and a memfd).
//!
//! # Differences between the real container and the fake
//!
//! The kernel answers `EEXIST` both for an identical mapping and for one that only overlaps an
//! existing mapping. [`VfioContainer`] cannot tell them apart and, like DPDK, takes both as success.
//! [`FakeContainer`] is stricter: an identical mapping is `Ok`, but a different overlapping one is
//! [`DmaError::Overlap`], so that callers' bookkeeping bugs show up in tests. Its unmap follows
//! the type1v2 IOMMU (see [`FakeContainer`]).
//!
//! # What is tested here, and what needs hardware
//!
//! Tested without a device (`tests/vfio.rs`):
//! - the fake container: map/unmap sequences, identical re-map, overlap, size mismatch, injected
//!   failures, bookkeeping (`mapped_bytes`), use from several threads;
//! - [`VfioContainer::open`] without `/dev/vfio/vfio` gives [`DmaError::NoVfio`] (with the device
//!   present, the test checks the API version and extensions and says `SKIPPED` for the rest);
//! - the ioctl plumbing: every ioctl on a container built from a non-VFIO fd (`/dev/null`, a
//!   memfd) reaches the kernel and comes back as [`DmaError::Ioctl`] with `ENOTTY`;
//! - request numbers, struct sizes and field offsets, flags and constants against the installed
//!   `<linux/vfio.h>`;
//! - the IPC payload codec (round trips and every strict error).
//!
//! Needs hardware (a device bound to `vfio-pci` and an IOMMU), not tested here: `VFIO_SET_IOMMU`
//! (which needs a group attached to the container), real `VFIO_IOMMU_MAP_DMA` /
//! `VFIO_IOMMU_UNMAP_DMA`, the kernel's `EEXIST` on a repeated map, and the unmapped size it
//! writes back.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

// ---------------------------------------------------------------------------------------------
// Kernel ABI (<linux/vfio.h>)
// ---------------------------------------------------------------------------------------------

/// The path of the VFIO container device.
pub const VFIO_CONTAINER_PATH: &str = "/dev/vfio/vfio";

/// `VFIO_TYPE`: the ioctl type of VFIO, `';'`.
pub const VFIO_TYPE: u32 = b';' as u32;
/// `VFIO_BASE`: the first VFIO ioctl number.
pub const VFIO_BASE: u32 = 100;

/// `VFIO_GET_API_VERSION`, `_IO(VFIO_TYPE, VFIO_BASE + 0)`.
pub const VFIO_GET_API_VERSION: libc::Ioctl = libc::_IO(VFIO_TYPE, VFIO_BASE);
/// `VFIO_CHECK_EXTENSION`, `_IO(VFIO_TYPE, VFIO_BASE + 1)`.
pub const VFIO_CHECK_EXTENSION: libc::Ioctl = libc::_IO(VFIO_TYPE, VFIO_BASE + 1);
/// `VFIO_SET_IOMMU`, `_IO(VFIO_TYPE, VFIO_BASE + 2)`.
pub const VFIO_SET_IOMMU: libc::Ioctl = libc::_IO(VFIO_TYPE, VFIO_BASE + 2);
/// `VFIO_IOMMU_MAP_DMA`, `_IO(VFIO_TYPE, VFIO_BASE + 13)`.
pub const VFIO_IOMMU_MAP_DMA: libc::Ioctl = libc::_IO(VFIO_TYPE, VFIO_BASE + 13);
/// `VFIO_IOMMU_UNMAP_DMA`, `_IO(VFIO_TYPE, VFIO_BASE + 14)`.
pub const VFIO_IOMMU_UNMAP_DMA: libc::Ioctl = libc::_IO(VFIO_TYPE, VFIO_BASE + 14);

/// `VFIO_API_VERSION`: the only API version there is.
pub const VFIO_API_VERSION: i32 = 0;
/// `VFIO_TYPE1_IOMMU`.
pub const VFIO_TYPE1_IOMMU: u32 = 1;
/// `VFIO_TYPE1v2_IOMMU`.
pub const VFIO_TYPE1V2_IOMMU: u32 = 3;
/// `VFIO_DMA_MAP_FLAG_READ`: the device may read the range.
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// `VFIO_DMA_MAP_FLAG_WRITE`: the device may write the range.
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;

/// The alignment the mappers require of addresses and lengths: the smallest IOMMU page (4 KiB).
/// The kernel may require more (its IOMMU's smallest page size).
pub const DMA_ALIGN: u64 = 4096;

/// `struct vfio_iommu_type1_dma_map`, the argument of `VFIO_IOMMU_MAP_DMA`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VfioIommuType1DmaMap {
    /// The size of this struct.
    pub argsz: u32,
    /// `VFIO_DMA_MAP_FLAG_*`.
    pub flags: u32,
    /// The process virtual address of the range.
    pub vaddr: u64,
    /// The IO virtual address the device will use.
    pub iova: u64,
    /// The length of the range in bytes.
    pub size: u64,
}

impl VfioIommuType1DmaMap {
    /// A read-write mapping of `size` bytes at `vaddr` to `iova`.
    pub const fn new(vaddr: u64, iova: u64, size: u64) -> Self {
        VfioIommuType1DmaMap {
            argsz: size_of::<Self>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr,
            iova,
            size,
        }
    }
}

/// `struct vfio_iommu_type1_dma_unmap` without its trailing flexible `data[]` (used only with
/// `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`), the argument of `VFIO_IOMMU_UNMAP_DMA`. The kernel
/// writes the unmapped length back into `size`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VfioIommuType1DmaUnmap {
    /// The size of this struct.
    pub argsz: u32,
    /// `VFIO_DMA_UNMAP_FLAG_*`; 0 here.
    pub flags: u32,
    /// The IO virtual address of the range.
    pub iova: u64,
    /// The length of the range; on return, the length actually unmapped.
    pub size: u64,
}

impl VfioIommuType1DmaUnmap {
    /// A plain unmap of `size` bytes at `iova`.
    pub const fn new(iova: u64, size: u64) -> Self {
        VfioIommuType1DmaUnmap {
            argsz: size_of::<Self>() as u32,
            flags: 0,
            iova,
            size,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// What went wrong while mapping or unmapping DMA, or setting up a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaError {
    /// There is no VFIO container device (`/dev/vfio/vfio`): VFIO is not available here.
    NoVfio,
    /// The container device exists but could not be opened (typically `EACCES`).
    Open {
        /// The `errno` of `open`.
        errno: i32,
    },
    /// The kernel speaks another VFIO API version than [`VFIO_API_VERSION`].
    ApiVersion {
        /// The version the kernel reported.
        found: i32,
    },
    /// An ioctl failed.
    Ioctl {
        /// The ioctl, by its kernel name (`"VFIO_IOMMU_MAP_DMA"`, ...).
        op: &'static str,
        /// Its `errno`.
        errno: i32,
    },
    /// An unmap removed a different number of bytes than asked (DPDK's `EIO`).
    SizeMismatch {
        /// The length asked for.
        asked: u64,
        /// The length the IOMMU unmapped.
        unmapped: u64,
    },
    /// The range overlaps a different existing mapping ([`FakeContainer`] only; the kernel
    /// answers `EEXIST`, which [`VfioContainer`] takes as success, as DPDK does).
    Overlap {
        /// The IOVA of the range asked for.
        iova: u64,
        /// Its length.
        len: u64,
    },
    /// The range is empty, wraps past the end of the address space, or is not aligned to
    /// [`DMA_ALIGN`]. Checked before any ioctl.
    InvalidRange {
        /// The virtual address (maps only).
        vaddr: Option<u64>,
        /// The IOVA.
        iova: u64,
        /// The length.
        len: u64,
    },
    /// A failure injected with [`FakeContainer::fail_next_map`] or
    /// [`FakeContainer::fail_next_unmap`].
    Injected,
}

impl fmt::Display for DmaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DmaError::NoVfio => write!(
                f,
                "VFIO is not available here: {VFIO_CONTAINER_PATH} does not exist (load \
                 vfio-pci and bind a device, or give this process access to /dev/vfio)"
            ),
            DmaError::Open { errno } => write!(
                f,
                "cannot open the VFIO container {VFIO_CONTAINER_PATH}: {}",
                std::io::Error::from_raw_os_error(errno)
            ),
            DmaError::ApiVersion { found } => write!(
                f,
                "unsupported VFIO API version {found} (expected {VFIO_API_VERSION})"
            ),
            DmaError::Ioctl { op, errno } => {
                write!(f, "{op}: {}", std::io::Error::from_raw_os_error(errno))
            }
            DmaError::SizeMismatch { asked, unmapped } => write!(
                f,
                "DMA unmap cleared {unmapped:#x} bytes instead of {asked:#x}"
            ),
            DmaError::Overlap { iova, len } => write!(
                f,
                "DMA range iova {iova:#x} + {len:#x} overlaps a different existing mapping"
            ),
            DmaError::InvalidRange { vaddr, iova, len } => {
                write!(f, "invalid DMA range: iova {iova:#x} + {len:#x}")?;
                if let Some(v) = vaddr {
                    write!(f, " (vaddr {v:#x})")?;
                }
                write!(
                    f,
                    " is empty, wraps around or is not {DMA_ALIGN}-byte aligned"
                )
            }
            DmaError::Injected => write!(f, "injected DMA mapping failure"),
        }
    }
}

impl std::error::Error for DmaError {}

/// Checks a range the same way for both mappers: non-empty, aligned, not wrapping.
fn check_range(vaddr: Option<u64>, iova: u64, len: u64) -> Result<(), DmaError> {
    let ok_one = |a: u64| a.is_multiple_of(DMA_ALIGN) && a.checked_add(len).is_some();
    let ok = len != 0 && len.is_multiple_of(DMA_ALIGN) && ok_one(iova) && vaddr.is_none_or(ok_one);
    if ok {
        Ok(())
    } else {
        Err(DmaError::InvalidRange { vaddr, iova, len })
    }
}

// ---------------------------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------------------------

/// Maps memory for device DMA, with DPDK's semantics (see the [module documentation](self)).
pub trait DmaMapper: Send + Sync {
    /// Maps `len` bytes at virtual address `vaddr` to `iova`, readable and writable by devices.
    ///
    /// Call it after the segment is mapped in this process and its IOVA is known, and before the
    /// memory is published to other processes. Mapping an identical range again is `Ok`.
    fn map(&self, vaddr: u64, iova: u64, len: u64) -> Result<(), DmaError>;

    /// Unmaps `len` bytes at `iova`. Call it before the pages are freed.
    ///
    /// [`DmaError::SizeMismatch`] when the IOMMU unmapped a different length than asked.
    fn unmap(&self, iova: u64, len: u64) -> Result<(), DmaError>;
}

impl<T: DmaMapper + ?Sized> DmaMapper for &T {
    fn map(&self, vaddr: u64, iova: u64, len: u64) -> Result<(), DmaError> {
        (**self).map(vaddr, iova, len)
    }
    fn unmap(&self, iova: u64, len: u64) -> Result<(), DmaError> {
        (**self).unmap(iova, len)
    }
}

impl<T: DmaMapper + ?Sized> DmaMapper for Box<T> {
    fn map(&self, vaddr: u64, iova: u64, len: u64) -> Result<(), DmaError> {
        (**self).map(vaddr, iova, len)
    }
    fn unmap(&self, iova: u64, len: u64) -> Result<(), DmaError> {
        (**self).unmap(iova, len)
    }
}

impl<T: DmaMapper + ?Sized> DmaMapper for Arc<T> {
    fn map(&self, vaddr: u64, iova: u64, len: u64) -> Result<(), DmaError> {
        (**self).map(vaddr, iova, len)
    }
    fn unmap(&self, iova: u64, len: u64) -> Result<(), DmaError> {
        (**self).unmap(iova, len)
    }
}

// ---------------------------------------------------------------------------------------------
// The real container
// ---------------------------------------------------------------------------------------------

/// An IOMMU model a container can be set to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IommuType {
    /// `VFIO_TYPE1_IOMMU` (DPDK's choice): an unmap may remove whole mappings past the range.
    Type1,
    /// `VFIO_TYPE1v2_IOMMU`: an unmap must not split a mapping.
    Type1v2,
}

impl IommuType {
    /// The kernel's number for this type (the argument of `VFIO_SET_IOMMU`).
    pub const fn raw(self) -> u32 {
        match self {
            IommuType::Type1 => VFIO_TYPE1_IOMMU,
            IommuType::Type1v2 => VFIO_TYPE1V2_IOMMU,
        }
    }

    /// The type with the kernel's number `raw`, if it is one of these.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            VFIO_TYPE1_IOMMU => Some(IommuType::Type1),
            VFIO_TYPE1V2_IOMMU => Some(IommuType::Type1v2),
            _ => None,
        }
    }
}

/// A VFIO container (`/dev/vfio/vfio`): the IOMMU context DMA mappings live in.
///
/// The primary opens it; secondaries receive its fd over IPC and wrap it with
/// [`VfioContainer::from_fd`]. Mappings made through any process's fd are visible to all,
/// because the fd is one kernel object.
#[derive(Debug)]
pub struct VfioContainer {
    fd: OwnedFd,
    iommu_type: Option<IommuType>,
}

impl VfioContainer {
    /// Opens `/dev/vfio/vfio` and checks the API version.
    ///
    /// [`DmaError::NoVfio`] when the device does not exist, [`DmaError::Open`] when it cannot be
    /// opened, [`DmaError::ApiVersion`] when the kernel speaks another version.
    pub fn open() -> Result<Self, DmaError> {
        Self::open_path(VFIO_CONTAINER_PATH)
    }

    /// [`VfioContainer::open`] on another path (a container device in a container or chroot, or
    /// a test).
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self, DmaError> {
        let fd = rustix::fs::open(path.as_ref(), OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| match e {
                Errno::NOENT | Errno::NODEV | Errno::NXIO => DmaError::NoVfio,
                e => DmaError::Open {
                    errno: e.raw_os_error(),
                },
            })?;
        let c = Self::from_fd(fd);
        let v = c.api_version()?;
        if v != VFIO_API_VERSION {
            return Err(DmaError::ApiVersion { found: v });
        }
        Ok(c)
    }

    /// Wraps a container fd, typically received from the primary over IPC. The IOMMU type is
    /// unknown ([`VfioContainer::iommu_type`] is `None`): the primary has set it on the shared
    /// kernel object, and map and unmap do not need it.
    ///
    /// Any fd is accepted; on one that is not a VFIO container every ioctl fails with
    /// [`DmaError::Ioctl`] (`ENOTTY` from other drivers).
    pub fn from_fd(fd: OwnedFd) -> Self {
        VfioContainer {
            fd,
            iommu_type: None,
        }
    }

    /// `VFIO_GET_API_VERSION`.
    pub fn api_version(&self) -> Result<i32, DmaError> {
        self.ioctl_value("VFIO_GET_API_VERSION", VFIO_GET_API_VERSION, 0)
    }

    /// `VFIO_CHECK_EXTENSION`: whether the kernel supports extension `ext` (an IOMMU type such
    /// as [`VFIO_TYPE1V2_IOMMU`], or another extension number from `<linux/vfio.h>`).
    pub fn check_extension(&self, ext: u32) -> Result<bool, DmaError> {
        let r = self.ioctl_value(
            "VFIO_CHECK_EXTENSION",
            VFIO_CHECK_EXTENSION,
            libc::c_ulong::from(ext),
        )?;
        Ok(r > 0)
    }

    /// `VFIO_SET_IOMMU`. The kernel refuses it (`EINVAL`) until a group is attached to the
    /// container.
    pub fn set_iommu(&mut self, t: IommuType) -> Result<(), DmaError> {
        self.ioctl_value(
            "VFIO_SET_IOMMU",
            VFIO_SET_IOMMU,
            libc::c_ulong::from(t.raw()),
        )?;
        self.iommu_type = Some(t);
        Ok(())
    }

    /// The IOMMU type set through this value with [`VfioContainer::set_iommu`], if any.
    pub fn iommu_type(&self) -> Option<IommuType> {
        self.iommu_type
    }

    /// An ioctl whose argument is an integer (or unused), returning the ioctl's result.
    fn ioctl_value(
        &self,
        op: &'static str,
        req: libc::Ioctl,
        arg: libc::c_ulong,
    ) -> Result<i32, DmaError> {
        // SAFETY: `self.fd` is open for the whole call (owned by `self`). The argument is an
        // integer passed as `unsigned long`, the width the kernel reads; it is not a pointer into
        // this process, so no driver can read or write our memory through it.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req, arg) };
        if r < 0 {
            Err(DmaError::Ioctl { op, errno: errno() })
        } else {
            Ok(r)
        }
    }
}

impl AsFd for VfioContainer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<VfioContainer> for OwnedFd {
    fn from(c: VfioContainer) -> OwnedFd {
        c.fd
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl DmaMapper for VfioContainer {
    fn map(&self, vaddr: u64, iova: u64, len: u64) -> Result<(), DmaError> {
        check_range(Some(vaddr), iova, len)?;
        let arg = VfioIommuType1DmaMap::new(vaddr, iova, len);
        // Request numbers of type ';' 0x64..=0x7F belong to VFIO: another driver refuses the call
        // without touching the argument (its layout is checked against the header by the tests).
        // SAFETY: `self.fd` is open for the call; `arg` is a live, fully initialised dma_map
        // struct with `argsz` equal to its size, and VFIO reads only `argsz` bytes of it.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                VFIO_IOMMU_MAP_DMA,
                std::ptr::from_ref(&arg),
            )
        };
        if r == 0 {
            return Ok(());
        }
        match errno() {
            // Already mapped (identical or overlapping): success, as in DPDK.
            libc::EEXIST => Ok(()),
            e => Err(DmaError::Ioctl {
                op: "VFIO_IOMMU_MAP_DMA",
                errno: e,
            }),
        }
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<(), DmaError> {
        check_range(None, iova, len)?;
        let mut arg = VfioIommuType1DmaUnmap::new(iova, len);
        // As for the map: a VFIO request number, a struct layout checked by the tests.
        // SAFETY: `self.fd` is open for the call; `arg` is a live, fully initialised, exclusively
        // borrowed dma_unmap struct with `argsz` equal to its size and no flags, so VFIO reads and
        // writes back only those 24 bytes.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                VFIO_IOMMU_UNMAP_DMA,
                std::ptr::from_mut(&mut arg),
            )
        };
        if r != 0 {
            return Err(DmaError::Ioctl {
                op: "VFIO_IOMMU_UNMAP_DMA",
                errno: errno(),
            });
        }
        if arg.size != len {
            return Err(DmaError::SizeMismatch {
                asked: len,
                unmapped: arg.size,
            });
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The fake container
// ---------------------------------------------------------------------------------------------

/// One call made to a [`FakeContainer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaCall {
    /// [`DmaMapper::map`].
    Map {
        /// The virtual address.
        vaddr: u64,
        /// The IOVA.
        iova: u64,
        /// The length.
        len: u64,
    },
    /// [`DmaMapper::unmap`].
    Unmap {
        /// The IOVA.
        iova: u64,
        /// The length.
        len: u64,
    },
}

#[derive(Debug, Default)]
struct FakeState {
    /// iova -> (vaddr, len); the ranges never overlap.
    mappings: BTreeMap<u64, (u64, u64)>,
    calls: Vec<DmaCall>,
    fail_maps: usize,
    fail_unmaps: usize,
}

/// A [`DmaMapper`] that keeps the mappings in memory, for tests of the code that calls a mapper.
///
/// - Every call is recorded in order, failed ones included ([`FakeContainer::calls`]).
/// - Ranges are checked like [`VfioContainer`] does ([`DmaError::InvalidRange`]).
/// - map: an identical mapping (same vaddr, IOVA and length) again is `Ok` and changes nothing;
///   any other overlap with an existing mapping is [`DmaError::Overlap`].
/// - unmap, as the type1v2 IOMMU: every mapping inside the range is removed and their lengths
///   summed; if the sum differs from the length asked (nothing mapped there, or only part of
///   the range), the call fails with [`DmaError::SizeMismatch`] after the removal, as the kernel
///   reports it after unmapping. A range that would split a mapping removes nothing and fails
///   with `SizeMismatch { unmapped: 0 }` (the kernel says `EINVAL`).
/// - [`FakeContainer::fail_next_map`] / [`FakeContainer::fail_next_unmap`] make the next call
///   fail with [`DmaError::Injected`] and change nothing.
#[derive(Debug, Default)]
pub struct FakeContainer {
    state: Mutex<FakeState>,
}

impl FakeContainer {
    /// An empty fake container.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every call so far, in order, failed ones included.
    pub fn calls(&self) -> Vec<DmaCall> {
        self.state.lock().calls.clone()
    }

    /// The current mappings as `(iova, vaddr, len)`, by IOVA.
    pub fn mappings(&self) -> Vec<(u64, u64, u64)> {
        let st = self.state.lock();
        st.mappings.iter().map(|(&i, &(v, l))| (i, v, l)).collect()
    }

    /// The total length of the current mappings.
    pub fn mapped_bytes(&self) -> u64 {
        self.state.lock().mappings.values().map(|&(_, l)| l).sum()
    }

    /// Makes the next map fail with [`DmaError::Injected`]. Calls add up: `n` calls fail the next
    /// `n` maps.
    pub fn fail_next_map(&self) {
        self.state.lock().fail_maps += 1;
    }

    /// Makes the next unmap fail with [`DmaError::Injected`]. Calls add up.
    pub fn fail_next_unmap(&self) {
        self.state.lock().fail_unmaps += 1;
    }
}

impl FakeState {
    /// The mappings overlapping `[iova, end)`, by IOVA.
    fn overlapping(&self, iova: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let mut v: Vec<_> = self
            .mappings
            .range(..end)
            .rev()
            .take_while(|&(&s, &(_, l))| s + l > iova)
            .map(|(&s, &(va, l))| (s, va, l))
            .collect();
        v.reverse();
        v
    }
}

impl DmaMapper for FakeContainer {
    fn map(&self, vaddr: u64, iova: u64, len: u64) -> Result<(), DmaError> {
        let mut st = self.state.lock();
        st.calls.push(DmaCall::Map { vaddr, iova, len });
        if st.fail_maps > 0 {
            st.fail_maps -= 1;
            return Err(DmaError::Injected);
        }
        check_range(Some(vaddr), iova, len)?;
        match st.overlapping(iova, iova + len).as_slice() {
            [] => {
                st.mappings.insert(iova, (vaddr, len));
                Ok(())
            }
            &[(s, v, l)] if (s, v, l) == (iova, vaddr, len) => Ok(()),
            _ => Err(DmaError::Overlap { iova, len }),
        }
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<(), DmaError> {
        let mut st = self.state.lock();
        st.calls.push(DmaCall::Unmap { iova, len });
        if st.fail_unmaps > 0 {
            st.fail_unmaps -= 1;
            return Err(DmaError::Injected);
        }
        check_range(None, iova, len)?;
        let end = iova + len;
        let hit = st.overlapping(iova, end);
        if hit.iter().any(|&(s, _, l)| s < iova || s + l > end) {
            return Err(DmaError::SizeMismatch {
                asked: len,
                unmapped: 0,
            });
        }
        let mut unmapped = 0;
        for (s, _, l) in hit {
            st.mappings.remove(&s);
            unmapped += l;
        }
        if unmapped == len {
            Ok(())
        } else {
            Err(DmaError::SizeMismatch {
                asked: len,
                unmapped,
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// IPC payload
// ---------------------------------------------------------------------------------------------

/// The IPC action a secondary sends to get the primary's VFIO container fd.
pub const ACTION_VFIO: &str = "memplane_vfio_container";

/// The length of the action's parameter, request and reply alike: DPDK's `struct vfio_mp_param`
/// (`req` i32, `result` i32, a group number or IOMMU type i32), in host byte order.
pub const VFIO_MP_PARAM_LEN: usize = 12;

/// The request code for the container fd (DPDK main's `SOCKET_REQ_DEFAULT_CONTAINER`).
pub const REQ_CONTAINER_FD: i32 = 0x100;
/// Result code: done, the fd is attached.
pub const RESULT_OK: i32 = 0;
/// Result code: no fd to give.
pub const RESULT_NO_FD: i32 = 1;
/// Result code: error.
pub const RESULT_ERR: i32 = 0xFF;

/// What a secondary asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VfioRequest {
    /// The container fd ([`REQ_CONTAINER_FD`]).
    ContainerFd,
}

impl VfioRequest {
    /// The wire code.
    pub const fn code(self) -> i32 {
        match self {
            VfioRequest::ContainerFd => REQ_CONTAINER_FD,
        }
    }

    /// The request with wire code `code`.
    pub const fn from_code(code: i32) -> Result<Self, VfioMpError> {
        match code {
            REQ_CONTAINER_FD => Ok(VfioRequest::ContainerFd),
            code => Err(VfioMpError::UnknownRequest { code }),
        }
    }
}

/// How the primary answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VfioResult {
    /// Done; the reply carries exactly one fd ([`RESULT_OK`]).
    Ok,
    /// Nothing to give, no fd ([`RESULT_NO_FD`]).
    NoFd,
    /// Failed, no fd ([`RESULT_ERR`]).
    Err,
}

impl VfioResult {
    /// The wire code.
    pub const fn code(self) -> i32 {
        match self {
            VfioResult::Ok => RESULT_OK,
            VfioResult::NoFd => RESULT_NO_FD,
            VfioResult::Err => RESULT_ERR,
        }
    }

    /// The result with wire code `code`.
    pub const fn from_code(code: i32) -> Result<Self, VfioMpError> {
        match code {
            RESULT_OK => Ok(VfioResult::Ok),
            RESULT_NO_FD => Ok(VfioResult::NoFd),
            RESULT_ERR => Ok(VfioResult::Err),
            code => Err(VfioMpError::UnknownResult { code }),
        }
    }

    /// How many fds a reply with this result carries: 1 for [`VfioResult::Ok`], else 0.
    pub const fn fds(self) -> usize {
        match self {
            VfioResult::Ok => 1,
            VfioResult::NoFd | VfioResult::Err => 0,
        }
    }
}

/// The primary's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VfioReply {
    /// The request answered (echoed).
    pub req: VfioRequest,
    /// The outcome.
    pub result: VfioResult,
}

/// A malformed [`ACTION_VFIO`] payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VfioMpError {
    /// The parameter is not [`VFIO_MP_PARAM_LEN`] bytes.
    WrongLength {
        /// Its length.
        len: usize,
    },
    /// Unknown request code.
    UnknownRequest {
        /// The code.
        code: i32,
    },
    /// Unknown result code.
    UnknownResult {
        /// The code.
        code: i32,
    },
    /// The reply carries another number of fds than its result calls for.
    FdCount {
        /// The result.
        result: VfioResult,
        /// The fds received.
        fds: usize,
    },
}

impl fmt::Display for VfioMpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            VfioMpError::WrongLength { len } => write!(
                f,
                "{ACTION_VFIO}: parameter of {len} bytes, expected {VFIO_MP_PARAM_LEN}"
            ),
            VfioMpError::UnknownRequest { code } => {
                write!(f, "{ACTION_VFIO}: unknown request code {code:#x}")
            }
            VfioMpError::UnknownResult { code } => {
                write!(f, "{ACTION_VFIO}: unknown result code {code:#x}")
            }
            VfioMpError::FdCount { result, fds } => write!(
                f,
                "{ACTION_VFIO}: reply {result:?} carries {fds} fds, expected {}",
                result.fds()
            ),
        }
    }
}

impl std::error::Error for VfioMpError {}

fn encode(req: i32, result: i32) -> [u8; VFIO_MP_PARAM_LEN] {
    let mut b = [0u8; VFIO_MP_PARAM_LEN];
    b[0..4].copy_from_slice(&req.to_ne_bytes());
    b[4..8].copy_from_slice(&result.to_ne_bytes());
    // b[8..12]: the group number / IOMMU type, unused for the container fd: 0.
    b
}

fn decode(param: &[u8]) -> Result<(i32, i32), VfioMpError> {
    let b: &[u8; VFIO_MP_PARAM_LEN] = param
        .try_into()
        .map_err(|_| VfioMpError::WrongLength { len: param.len() })?;
    let word = |i: usize| i32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Ok((word(0), word(4)))
}

/// The parameter of a request: the code, then zeroes.
pub fn encode_request(req: VfioRequest) -> [u8; VFIO_MP_PARAM_LEN] {
    encode(req.code(), 0)
}

/// Decodes a request's parameter. Length and code are checked; the `result` and value fields are
/// ignored (DPDK leaves them uninitialised in requests).
pub fn decode_request(param: &[u8]) -> Result<VfioRequest, VfioMpError> {
    let (req, _) = decode(param)?;
    VfioRequest::from_code(req)
}

/// The parameter of a reply: the request echoed, the result, then zeroes. Attach the container
/// fd when `reply.result` is [`VfioResult::Ok`], and no fd otherwise.
pub fn encode_reply(reply: VfioReply) -> [u8; VFIO_MP_PARAM_LEN] {
    encode(reply.req.code(), reply.result.code())
}

/// Decodes a reply's parameter. Length, request and result codes are checked; the value field is
/// ignored. Check the fds with [`check_reply_fds`].
pub fn decode_reply(param: &[u8]) -> Result<VfioReply, VfioMpError> {
    let (req, result) = decode(param)?;
    Ok(VfioReply {
        req: VfioRequest::from_code(req)?,
        result: VfioResult::from_code(result)?,
    })
}

/// Checks that a reply came with as many fds as its result calls for (exactly one for
/// [`VfioResult::Ok`], none otherwise).
pub fn check_reply_fds(reply: &VfioReply, fds: usize) -> Result<(), VfioMpError> {
    if fds == reply.result.fds() {
        Ok(())
    } else {
        Err(VfioMpError::FdCount {
            result: reply.result,
            fds,
        })
    }
}
