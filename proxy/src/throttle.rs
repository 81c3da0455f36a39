//! Rate-limiting log lines that a flood could repeat.
//!
//! A hostile or broken pod can trigger the same warning thousands of times
//! a second; the node's log must not drown (nor fill the disk). A
//! [`Throttle`] lets the first occurrence through, then at most one per
//! period, and says how many were suppressed in between. Counters keep the
//! exact numbers; the log keeps the story.
#![forbid(unsafe_code)]

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::clock::now_nanos;

#[derive(Debug)]
pub struct Throttle {
    period_ns: u64,
    /// `now_nanos()` before which occurrences are suppressed (0: log now).
    next: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new(period: Duration) -> Self {
        Self { period_ns: period.as_nanos() as u64, next: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` when this occurrence should be logged (`n` were suppressed
    /// since the last one); `None` to stay quiet.
    pub fn allow(&self) -> Option<u64> {
        let now = now_nanos().max(1);
        let next = self.next.load(Ordering::Relaxed);
        if now < next {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // One caller wins the slot; the others count as suppressed.
        if self.next.compare_exchange(next, now + self.period_ns, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// Logs a warning through a per-call-site throttle (one line per 10 s at
/// most, with the number suppressed).
#[macro_export]
macro_rules! warn_throttled {
    ($($arg:tt)+) => {{
        static THROTTLE: $crate::throttle::Throttle = $crate::throttle::Throttle::new(std::time::Duration::from_secs(10));
        if let Some(suppressed) = THROTTLE.allow() {
            tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

/// [`warn_throttled!`] at info level: for access-log lines of refusals a
/// flood can repeat (the counters keep the exact numbers).
#[macro_export]
macro_rules! info_throttled {
    (target: $target:expr, $($arg:tt)+) => {{
        static THROTTLE: $crate::throttle::Throttle = $crate::throttle::Throttle::new(std::time::Duration::from_secs(10));
        if let Some(suppressed) = THROTTLE.allow() {
            tracing::info!(target: $target, suppressed, $($arg)+);
        }
    }};
    ($($arg:tt)+) => {{
        static THROTTLE: $crate::throttle::Throttle = $crate::throttle::Throttle::new(std::time::Duration::from_secs(10));
        if let Some(suppressed) = THROTTLE.allow() {
            tracing::info!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_one_through_per_period_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.allow(), None);
        }
        let t = Throttle::new(Duration::ZERO);
        assert_eq!(t.allow(), Some(0));
        assert!(t.allow().is_some(), "a zero period never suppresses");
    }
}
