//! The channel's clock: `CLOCK_MONOTONIC`, as the core's [`Instant`].

use memplane_core::time::Instant;

/// Now, on `CLOCK_MONOTONIC`.
pub fn now() -> Instant {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    Instant::from_nanos((ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64)
}
