//! A monotonic clock in nanoseconds, so that deadlines and timestamps fit in
//! atomics and can be read without a lock.
#![forbid(unsafe_code)]

use std::{sync::OnceLock, time::Instant};

/// Monotonic nanoseconds since the first call.
pub fn now_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
