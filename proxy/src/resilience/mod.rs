//! Request-level resilience of the HTTP layer: timeouts, retries with a
//! budget and back-off, circuit breaking. Timeouts and retries are
//! configured per route rule (Gateway API `timeouts` and `retry`), breaker
//! thresholds per service, with process-wide defaults from flags.
//!
//! This module holds the mechanisms (the budget, back-off, the effective
//! policy); `outbound::http` applies them to each request.
#![forbid(unsafe_code)]

mod breaker;
mod budget;
mod ratelimit;

use std::time::Duration;

pub use breaker::{Breaker, BreakerLimits, BreakerState, Limit, Slot};
pub use budget::{BudgetSettings, BudgetState, RetryBudget};
pub use ratelimit::{limit_headers, Admission, RateLimiter};

use crate::model::{Retry, Timeouts};

/// The flags' defaults, for requests (and route rules) that set nothing.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// `--http-request-timeout`; zero: none.
    pub request_timeout: Duration,
    /// `--http-backend-request-timeout`; zero: none.
    pub backend_request_timeout: Duration,
    /// `--retry-backoff`: the first retry's least wait.
    pub backoff: Duration,
    /// `--retry-max-backoff`: the longest wait however many retries.
    pub max_backoff: Duration,
    pub budget: BudgetSettings,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            request_timeout: Duration::ZERO,
            backend_request_timeout: Duration::ZERO,
            backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            budget: BudgetSettings::default(),
        }
    }
}

/// What one request runs under, resolved once from its rule and the
/// defaults.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The whole transaction, retries included, to the response head.
    pub request_timeout: Option<Duration>,
    /// One attempt, to the response head.
    pub backend_timeout: Option<Duration>,
    pub retry: Option<&'a Retry>,
    backoff: Duration,
    max_backoff: Duration,
}

fn enabled(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

impl<'a> Policy<'a> {
    pub fn new(timeouts: Timeouts, retry: Option<&'a Retry>, defaults: &Defaults) -> Self {
        let request_timeout = enabled(timeouts.request.unwrap_or(defaults.request_timeout));
        // A per-attempt timeout never outlasts the whole request's.
        let backend_timeout =
            match (enabled(timeouts.backend_request.unwrap_or(defaults.backend_request_timeout)), request_timeout) {
                (Some(b), Some(r)) => Some(b.min(r)),
                (b, _) => b,
            };
        Self {
            request_timeout,
            backend_timeout,
            retry: retry.filter(|r| r.attempts > 0),
            backoff: retry.and_then(|r| r.backoff).unwrap_or(defaults.backoff),
            max_backoff: defaults.max_backoff.max(retry.and_then(|r| r.backoff).unwrap_or_default()),
        }
    }

    /// Whether a response with `status` is retried (given attempts left).
    pub fn retries_status(&self, status: u16) -> bool {
        self.retry.is_some_and(|r| r.codes.contains(&status))
    }

    /// Retries after the first attempt.
    pub fn attempts(&self) -> u32 {
        self.retry.map_or(0, |r| r.attempts)
    }

    /// The wait before retry `n` (1 for the first): the back-off doubled
    /// for each earlier retry, capped, plus up to half again of jitter so
    /// that callers failing together do not retry together.
    pub fn backoff(&self, n: u32) -> Duration {
        let base = self.backoff.saturating_mul(1 << n.saturating_sub(1).min(16)).min(self.max_backoff);
        let jitter = base.as_nanos() as u64 / 2;
        base + Duration::from_nanos(if jitter > 0 { fastrand::u64(0..=jitter) } else { 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_overrides_the_defaults_and_zero_disables() {
        let defaults = Defaults { request_timeout: Duration::from_secs(15), ..Defaults::default() };
        let p = Policy::new(Timeouts::default(), None, &defaults);
        assert_eq!(p.request_timeout, Some(Duration::from_secs(15)));
        let off = Timeouts { request: Some(Duration::ZERO), backend_request: Some(Duration::from_millis(100)) };
        let p = Policy::new(off, None, &defaults);
        assert_eq!((p.request_timeout, p.backend_timeout), (None, Some(Duration::from_millis(100))));
        let both = Timeouts { request: Some(Duration::from_millis(50)), backend_request: Some(Duration::from_secs(1)) };
        assert_eq!(Policy::new(both, None, &defaults).backend_timeout, Some(Duration::from_millis(50)));
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_a_cap() {
        let retry = Retry { codes: vec![503], attempts: 5, backoff: Some(Duration::from_millis(10)) };
        let defaults = Defaults { max_backoff: Duration::from_millis(50), ..Defaults::default() };
        let p = Policy::new(Timeouts::default(), Some(&retry), &defaults);
        let first = p.backoff(1);
        assert!(first >= Duration::from_millis(10) && first <= Duration::from_millis(15), "{first:?}");
        let second = p.backoff(2);
        assert!(second >= Duration::from_millis(20) && second <= Duration::from_millis(30), "{second:?}");
        let late = p.backoff(9);
        assert!(late >= Duration::from_millis(50) && late <= Duration::from_millis(75), "{late:?}");
        assert!(p.retries_status(503) && !p.retries_status(500));
    }
}
