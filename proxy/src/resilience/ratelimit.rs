//! Local rate limiting (Envoy's local_ratelimit): a token bucket per route
//! rule, or one per source pod of this node — a node proxy knows each
//! client pod, so one noisy pod cannot spend the others' share, with no
//! extra configuration per caller.
//!
//! The bucket refills continuously at `tokens_per_fill / fill_interval`
//! up to `max_tokens`, and starts full.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use crate::{
    clock::now_nanos,
    model::{ObjectKey, RateLimit},
};

/// Source pods with a bucket of their own per rule; past it, newcomers
/// share one (a node runs far fewer pods).
const MAX_SOURCES: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: u64,
}

/// What a request was told.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    Admitted {
        remaining: u32,
    },
    /// Refused; a token is back after this long.
    Limited {
        reset: Duration,
    },
}

#[derive(Debug)]
pub struct RateLimiter {
    spec: RateLimit,
    /// Tokens per nanosecond.
    rate: f64,
    shared: Mutex<Bucket>,
    per_source: Mutex<HashMap<ObjectKey, Bucket>>,
}

impl RateLimiter {
    pub fn new(spec: RateLimit) -> Self {
        let full = Bucket { tokens: f64::from(spec.max_tokens), at: now_nanos() };
        let rate = f64::from(spec.tokens_per_fill) / spec.fill_interval.as_nanos().max(1) as f64;
        Self { spec, rate, shared: Mutex::new(full), per_source: Mutex::default() }
    }

    pub fn spec(&self) -> &RateLimit {
        &self.spec
    }

    /// Takes a token for one request from `source` (its own bucket when the
    /// limit is per source pod).
    pub fn admit(&self, source: &ObjectKey) -> Admission {
        let now = now_nanos();
        if !self.spec.per_source_pod {
            return self.take(&mut self.shared.lock().unwrap_or_else(|e| e.into_inner()), now);
        }
        let mut sources = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = sources.get_mut(source) {
            return self.take(bucket, now);
        }
        if sources.len() < MAX_SOURCES {
            let bucket =
                sources.entry(source.clone()).or_insert(Bucket { tokens: f64::from(self.spec.max_tokens), at: now });
            return self.take(bucket, now);
        }
        drop(sources);
        self.take(&mut self.shared.lock().unwrap_or_else(|e| e.into_inner()), now)
    }

    fn take(&self, b: &mut Bucket, now: u64) -> Admission {
        let max = f64::from(self.spec.max_tokens);
        b.tokens = (b.tokens + now.saturating_sub(b.at) as f64 * self.rate).min(max);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Admission::Admitted { remaining: b.tokens as u32 }
        } else {
            let wait = ((1.0 - b.tokens) / self.rate.max(f64::MIN_POSITIVE)).min(3.6e12);
            Admission::Limited { reset: Duration::from_nanos(wait as u64) }
        }
    }
}

/// A 429's headers: `x-ratelimit-*` as Envoy's local rate limit sends them
/// (limit, remaining, seconds to reset), and `retry-after`.
pub fn limit_headers(max_tokens: u32, reset: Duration) -> http::HeaderMap {
    let secs = reset.as_secs_f64().ceil().max(1.0) as u64;
    let mut headers = http::HeaderMap::new();
    headers.insert("x-ratelimit-limit", http::HeaderValue::from(max_tokens));
    headers.insert("x-ratelimit-remaining", http::HeaderValue::from(0));
    headers.insert("x-ratelimit-reset", http::HeaderValue::from(secs));
    headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_source_pod: bool) -> RateLimiter {
        RateLimiter::new(RateLimit {
            max_tokens: 5,
            tokens_per_fill: 1,
            fill_interval: Duration::from_secs(3600),
            per_source_pod,
        })
    }

    #[test]
    fn a_full_bucket_admits_its_tokens_then_refuses() {
        let l = limiter(false);
        let a = ObjectKey::new("default", "a");
        let admitted = (0..8).filter(|_| matches!(l.admit(&a), Admission::Admitted { .. })).count();
        assert_eq!(admitted, 5);
        assert!(matches!(l.admit(&a), Admission::Limited { reset } if reset > Duration::from_secs(3000)));
    }

    #[test]
    fn each_source_pod_has_its_own_bucket() {
        let l = limiter(true);
        let (a, b) = (ObjectKey::new("default", "a"), ObjectKey::new("default", "b"));
        for _ in 0..5 {
            assert!(matches!(l.admit(&a), Admission::Admitted { .. }));
        }
        assert!(matches!(l.admit(&a), Admission::Limited { .. }));
        assert!(matches!(l.admit(&b), Admission::Admitted { remaining: 4 }), "b is not a's");
    }
}
