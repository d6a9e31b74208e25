//! Zero-filling a block that holds old data (`zmalloc` of reused memory).
//!
//! A block that fits in the last-level cache is cleared with ordinary stores (`memset`): it may
//! be there already (just freed by a user that wrote it), and the zeroes stay in the cache,
//! where the caller's next writes find them. A block larger than the last-level cache cannot be
//! there; on x86-64 it is cleared with non-temporal stores, which go to memory without first
//! reading each line in. Measured on the development VM (`docs/heap-benchmark.md` section
//! 1.10): on memory nobody touched for a while, non-temporal zeroing is 2.2-2.6x faster at
//! every size; on a block just written, it is 4x slower at 2 MiB, 1.3x slower at 8 MiB, and
//! 2-2.6x faster from 64 MiB. Not knowing which a block is, only blocks past the cache stream
//! (glibc's `memset` decides the same way, from a similar size).

use std::sync::OnceLock;

/// Zero-fills `[p, p + n)`.
///
/// # Safety
/// `[p, p + n)` is writable memory that nobody else uses meanwhile.
#[inline]
pub(crate) unsafe fn zero(p: *mut u8, n: usize) {
    if n >= streaming_threshold() {
        // SAFETY: the caller's guarantees.
        unsafe { zero_streaming(p, n) }
    } else {
        // SAFETY: the caller's guarantees.
        unsafe { std::ptr::write_bytes(p, 0, n) }
    }
}

/// The size from which [`zero`] streams: the size of CPU 0's last-level cache as sysfs reports
/// it, on x86-64; never elsewhere or when sysfs does not say.
pub(crate) fn streaming_threshold() -> usize {
    static T: OnceLock<usize> = OnceLock::new();
    *T.get_or_init(|| {
        if cfg!(target_arch = "x86_64") {
            llc_size().unwrap_or(usize::MAX)
        } else {
            usize::MAX
        }
    })
}

/// The size in bytes of CPU 0's highest-level data or unified cache, from
/// `/sys/devices/system/cpu/cpu0/cache/index*/`.
fn llc_size() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.flatten()
        .filter_map(|e| {
            let read = |f: &str| std::fs::read_to_string(e.path().join(f)).ok();
            let level: u32 = read("level")?.trim().parse().ok()?;
            if read("type")?.trim() == "Instruction" {
                return None;
            }
            Some((level, parse_size(read("size")?.trim())?))
        })
        .max()
        .map(|(_, size)| size)
}

/// `2048K`, `1M`, `512` as sysfs writes cache sizes.
fn parse_size(s: &str) -> Option<usize> {
    let (num, mul) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .ok()?
        .checked_mul(mul)
        .filter(|&b| b > 0)
}

/// Zero-fills `[p, p + n)` with non-temporal stores for the whole 64-byte lines and ordinary
/// stores for the unaligned ends, then fences, so the zeroes are ordered before any later store
/// (such as the one that hands the block's address to another thread).
///
/// # Safety
/// As [`zero`].
#[cfg(target_arch = "x86_64")]
unsafe fn zero_streaming(p: *mut u8, n: usize) {
    use std::arch::x86_64::{__m128i, _mm_setzero_si128, _mm_sfence, _mm_stream_si128};
    let head = p.align_offset(64).min(n);
    let lines = (n - head) / 64;
    let tail = n - head - lines * 64;
    // SAFETY: [p, p + head) is inside the caller's range.
    unsafe { std::ptr::write_bytes(p, 0, head) };
    // SAFETY: SSE2 is part of x86-64.
    let z = unsafe { _mm_setzero_si128() };
    for i in 0..lines {
        // SAFETY: line i lies inside [p + head, p + n - tail), 64-byte aligned (p + head is),
        // so each 16-byte store is aligned as `_mm_stream_si128` requires; SSE2 is part of
        // x86-64.
        unsafe {
            let l = p.add(head + i * 64).cast::<__m128i>();
            _mm_stream_si128(l, z);
            _mm_stream_si128(l.add(1), z);
            _mm_stream_si128(l.add(2), z);
            _mm_stream_si128(l.add(3), z);
        }
    }
    // SAFETY: [p + n - tail, p + n) is inside the caller's range.
    unsafe { std::ptr::write_bytes(p.add(n - tail), 0, tail) };
    // SAFETY: a store fence has no memory operands; SSE is part of x86-64.
    unsafe { _mm_sfence() };
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn zero_streaming(p: *mut u8, n: usize) {
    // SAFETY: the caller's guarantees.
    unsafe { std::ptr::write_bytes(p, 0, n) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_sizes_parse() {
        assert_eq!(parse_size("2048K"), Some(2 << 20));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("0K"), None);
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size(""), None);
    }

    /// Fills a buffer with 0xa5, clears `[off, off + n)` of it with `clear`, and checks that
    /// exactly that range became zero and the bytes on either side kept their value.
    fn clears_exactly(off: usize, n: usize, clear: unsafe fn(*mut u8, usize)) {
        let mut buf = vec![0xa5u8; off + n + 128];
        // SAFETY: [off, off + n) is inside `buf`, which nothing else uses.
        unsafe { clear(buf.as_mut_ptr().add(off), n) };
        assert!(buf[..off].iter().all(|&b| b == 0xa5), "{off} {n}");
        assert!(buf[off..off + n].iter().all(|&b| b == 0), "{off} {n}");
        assert!(buf[off + n..].iter().all(|&b| b == 0xa5), "{off} {n}");
    }

    /// Every offset and length around the line size and beyond.
    #[test]
    fn streaming_zeroes_exactly_the_range() {
        for off in [0usize, 1, 15, 16, 63, 64, 65, 100] {
            for n in [0usize, 1, 63, 64, 65, 127, 128, 129, 1000, 4096] {
                clears_exactly(off, n, zero_streaming);
            }
        }
    }

    /// Through [`zero`], just below and past the threshold (streaming there): exactly the range
    /// becomes zero.
    #[test]
    fn zero_clears_exactly_the_range_on_both_sides_of_the_threshold() {
        // Without a threshold (or with one too large to test), the ordinary path at a size that
        // would stream elsewhere; the streaming routine is tested on its own above.
        let t = match streaming_threshold() {
            t if t <= 512 << 20 => t,
            _ => 2 << 20,
        };
        for n in [t - 1, t + 17] {
            clears_exactly(1, n, zero);
        }
    }

    #[test]
    fn the_threshold_is_the_last_level_cache_or_never() {
        let t = streaming_threshold();
        if cfg!(target_arch = "x86_64") && llc_size().is_some() {
            assert_eq!(Some(t), llc_size());
            assert!(t >= 256 << 10, "{t}");
        } else {
            assert_eq!(t, usize::MAX);
        }
    }
}
