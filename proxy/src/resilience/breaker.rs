//! Envoy's circuit breaking per service: thresholds on what is open to a
//! service at once — upstream connections, requests waiting for one,
//! requests in flight, retries in flight. Past a threshold a request fails
//! at once (503, flag `UO`) instead of queueing behind a service that is
//! already saturated, so that its slowness does not spread to callers.
//!
//! Counted with atomics; a slot is given back when its guard drops.

use std::sync::{
    atomic::{AtomicU32, AtomicU64, Ordering},
    Arc, OnceLock,
};

use prometheus_client::metrics::gauge::Gauge;

/// Envoy's thresholds (its defaults: 1 024, 1 024, 1 024, 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BreakerLimits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for BreakerLimits {
    fn default() -> Self {
        Self { max_connections: 1024, max_pending_requests: 1024, max_requests: 1024, max_retries: 3 }
    }
}

/// What a slot is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections = 0,
    PendingRequests = 1,
    Requests = 2,
    Retries = 3,
}

impl Limit {
    pub const ALL: [Limit; 4] = [Limit::Connections, Limit::PendingRequests, Limit::Requests, Limit::Retries];

    pub fn label(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::PendingRequests => "pending_requests",
            Self::Requests => "requests",
            Self::Retries => "retries",
        }
    }
}

/// One service's breaker; kept across mesh changes (its limits updated in
/// place), so that what is open stays counted.
#[derive(Debug, Default)]
pub struct Breaker {
    limits: [AtomicU32; 4],
    open: [AtomicU32; 4],
    /// Refusals per limit, since the start.
    overflows: [AtomicU64; 4],
    /// `outrigger_circuit_open{service,limit}`, resolved at the first
    /// overflow: 1 from an overflow until a slot is given back.
    gauges: OnceLock<[Gauge; 4]>,
}

/// A slot held against one limit until dropped.
#[derive(Debug)]
pub struct Slot {
    breaker: Arc<Breaker>,
    limit: Limit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let i = self.limit as usize;
        self.breaker.open[i].fetch_sub(1, Ordering::AcqRel);
        if let Some(gauges) = self.breaker.gauges.get() {
            if gauges[i].get() != 0 {
                gauges[i].set(0);
            }
        }
    }
}

/// What a breaker holds now (for `/config_dump`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BreakerState {
    pub limits: BreakerLimits,
    /// Open now: connections, pending requests, requests, retries.
    pub open: [u32; 4],
    /// Refused since the start, per limit in the same order.
    pub overflows: [u64; 4],
}

impl Breaker {
    pub fn new(limits: BreakerLimits) -> Arc<Self> {
        let breaker = Arc::new(Self::default());
        breaker.set_limits(limits);
        breaker
    }

    pub fn set_limits(&self, limits: BreakerLimits) {
        let values = [limits.max_connections, limits.max_pending_requests, limits.max_requests, limits.max_retries];
        for (slot, v) in self.limits.iter().zip(values) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    pub fn limits(&self) -> BreakerLimits {
        let l = |i: usize| self.limits[i].load(Ordering::Relaxed);
        BreakerLimits { max_connections: l(0), max_pending_requests: l(1), max_requests: l(2), max_retries: l(3) }
    }

    /// A slot against `limit`, or `None` when it is reached: counted, and
    /// the open gauge (made by `gauges` the first time) set.
    pub fn acquire(self: &Arc<Self>, limit: Limit, gauges: impl FnOnce() -> [Gauge; 4]) -> Option<Slot> {
        let i = limit as usize;
        let max = self.limits[i].load(Ordering::Relaxed);
        let taken = self.open[i].fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
        match taken {
            Ok(_) => Some(Slot { breaker: self.clone(), limit }),
            Err(_) => {
                self.overflows[i].fetch_add(1, Ordering::Relaxed);
                self.gauges.get_or_init(gauges)[i].set(1);
                None
            }
        }
    }

    pub fn state(&self) -> BreakerState {
        BreakerState {
            limits: self.limits(),
            open: std::array::from_fn(|i| self.open[i].load(Ordering::Relaxed)),
            overflows: std::array::from_fn(|i| self.overflows[i].load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_given_back() {
        let b = Breaker::new(BreakerLimits { max_requests: 2, ..BreakerLimits::default() });
        let gauges = || std::array::from_fn(|_| Gauge::default());
        let one = b.acquire(Limit::Requests, gauges).expect("first");
        let _two = b.acquire(Limit::Requests, gauges).expect("second");
        assert!(b.acquire(Limit::Requests, gauges).is_none(), "a third past max_requests 2");
        let open = b.gauges.get().expect("made at the overflow")[Limit::Requests as usize].clone();
        assert_eq!(open.get(), 1);
        drop(one);
        assert_eq!(open.get(), 0, "closed once a slot is given back");
        assert!(b.acquire(Limit::Requests, gauges).is_some(), "a slot given back is free again");
        assert_eq!(b.state().overflows[Limit::Requests as usize], 1);
        assert!(b.acquire(Limit::Retries, gauges).is_some(), "limits are counted apart");
    }
}
