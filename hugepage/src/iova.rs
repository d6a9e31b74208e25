//! IOVA: the address a device uses for a page. IOVA-as-PA reads physical addresses from
//! `/proc/self/pagemap` (root only since Linux 4.0: otherwise the frame numbers read as 0);
//! IOVA-as-VA uses the virtual address itself.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// The chosen IOVA mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IovaMode {
    /// Physical addresses.
    Pa,
    /// Virtual addresses.
    Va,
}

impl std::fmt::Display for IovaMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IovaMode::Pa => "PA",
            IovaMode::Va => "VA",
        })
    }
}

const PFN_MASK: u64 = (1 << 55) - 1;
const PRESENT: u64 = 1 << 63;

/// Reads physical addresses of this process's pages.
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`.
    pub fn open() -> std::io::Result<Pagemap> {
        Ok(Pagemap {
            file: File::open("/proc/self/pagemap")?,
        })
    }

    /// The physical address of `va` (mapped and present), or `None` when the kernel hides it
    /// (not root) or the page is not present.
    pub fn phys(&self, va: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.file.read_exact_at(&mut b, (va / 4096) * 8).ok()?;
        let e = u64::from_le_bytes(b);
        let pfn = e & PFN_MASK;
        (e & PRESENT != 0 && pfn != 0).then_some(pfn * 4096 + va % 4096)
    }

    /// Whether physical addresses are visible to this process (tested on `probe`, a mapped
    /// and touched address).
    pub fn available(&self, probe: u64) -> bool {
        self.phys(probe).is_some()
    }
}
