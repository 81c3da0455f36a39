//! Load balancing over a service's endpoints at L4, with outlier ejection.
//!
//! The default is linkerd2-proxy's choice: power of two choices over a
//! peak-EWMA latency estimate multiplied by connections in flight (divided
//! by weight). Latency samples are the TCP connect time and the time from
//! the first byte sent to the first byte back. Round robin (smooth weighted,
//! as nginx does it) and weighted random are the alternatives.
//!
//! Ejection follows Envoy's outlier detection applied to connect failures:
//! `consecutive` failures eject an endpoint for `base × times ejected`
//! (capped at `max`), never more than `max_percent` of the service at once.
#![forbid(unsafe_code)]

mod endpoint;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;

pub use endpoint::{Endpoint, Health, HealthStatus, InFlight};

use crate::clock::now_nanos;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Power of two choices over peak-EWMA latency × connections in flight.
    P2cEwma,
    /// Smooth weighted round robin.
    RoundRobin,
    /// Weighted random.
    Random,
}

#[derive(Debug, Clone)]
pub struct BalanceSettings {
    pub algorithm: Algorithm,
    pub ewma_decay: Duration,
    pub ewma_default_rtt: Duration,
    /// Consecutive connect failures that eject an endpoint (0: never eject).
    pub ejection_consecutive_failures: u32,
    pub ejection_base_time: Duration,
    pub ejection_max_time: Duration,
    pub ejection_max_percent: u32,
}

impl Default for BalanceSettings {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::P2cEwma,
            ewma_decay: Duration::from_secs(10),
            ewma_default_rtt: Duration::from_millis(30),
            ejection_consecutive_failures: 5,
            ejection_base_time: Duration::from_secs(30),
            ejection_max_time: Duration::from_secs(300),
            ejection_max_percent: 50,
        }
    }
}

/// Chooses among one service port's endpoints.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Vec<Endpoint>,
    settings: BalanceSettings,
    /// Smooth weighted round robin's running weights.
    rr_current: Mutex<Vec<i64>>,
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoEndpoint {
    /// The service has no endpoints at all.
    None,
    /// Every endpoint not yet tried for this connection is ejected.
    AllUnavailable,
}

impl Balancer {
    pub fn new(endpoints: Vec<Endpoint>, settings: BalanceSettings) -> Self {
        let rr_current = Mutex::new(vec![0; endpoints.len()]);
        Self { endpoints, settings, rr_current }
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub fn settings(&self) -> &BalanceSettings {
        &self.settings
    }

    /// Picks an endpoint that is not ejected and not in `tried` (indices
    /// already attempted for this connection).
    pub fn pick(&self, tried: &[usize]) -> Result<usize, NoEndpoint> {
        if self.endpoints.is_empty() {
            return Err(NoEndpoint::None);
        }
        let now = now_nanos();
        let available = |i: usize| !tried.contains(&i) && !self.is_ejected(i, now);
        let picked = match self.settings.algorithm {
            Algorithm::P2cEwma => self.pick_p2c(&available),
            Algorithm::RoundRobin => self.pick_round_robin(&available),
            Algorithm::Random => self.pick_random(&available),
        };
        picked.ok_or(NoEndpoint::AllUnavailable)
    }

    fn pick_p2c(&self, available: &dyn Fn(usize) -> bool) -> Option<usize> {
        // The common case without an allocation: two distinct endpoints at
        // random, both available (nothing tried, nothing ejected) — the
        // same distribution as drawing from the available ones.
        let n = self.endpoints.len();
        if n >= 2 {
            let (a, b) = two_distinct(n);
            if available(a) && available(b) {
                return Some(self.cheaper(a, b));
            }
        } else if n == 1 && available(0) {
            return Some(0);
        }
        let candidates: Vec<usize> = (0..n).filter(|&i| available(i)).collect();
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            n => {
                let (a, b) = two_distinct(n);
                Some(self.cheaper(candidates[a], candidates[b]))
            }
        }
    }

    /// Of two endpoints, the one with less load per weight.
    fn cheaper(&self, a: usize, b: usize) -> usize {
        let cost = |i: usize| {
            let ep = &self.endpoints[i];
            let load = match ep.health_if_used() {
                Some(h) => h.load(self.settings.ewma_decay),
                // Never used: not measured, nothing in flight.
                None => 0.0,
            };
            load / f64::from(ep.weight)
        };
        if cost(b) < cost(a) {
            b
        } else {
            a
        }
    }

    /// nginx's smooth weighted round robin: every pick adds each available
    /// endpoint's weight to its running total, takes the largest, and
    /// subtracts the sum of weights from it.
    fn pick_round_robin(&self, available: &dyn Fn(usize) -> bool) -> Option<usize> {
        let mut current = self.rr_current.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, ep) in self.endpoints.iter().enumerate() {
            if !available(i) {
                continue;
            }
            current[i] += i64::from(ep.weight);
            total += i64::from(ep.weight);
            if best.map(|b| current[i] > current[b]).unwrap_or(true) {
                best = Some(i);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }

    fn pick_random(&self, available: &dyn Fn(usize) -> bool) -> Option<usize> {
        let total: u64 =
            self.endpoints.iter().enumerate().filter(|(i, _)| available(*i)).map(|(_, e)| u64::from(e.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut point = fastrand::u64(..total);
        for (i, ep) in self.endpoints.iter().enumerate() {
            if !available(i) {
                continue;
            }
            if point < u64::from(ep.weight) {
                return Some(i);
            }
            point -= u64::from(ep.weight);
        }
        None
    }

    /// Records a failed connect to endpoint `i`; returns the ejection time
    /// if it was ejected.
    pub fn failed(&self, i: usize) -> Option<Duration> {
        let now = now_nanos();
        let ejected = (0..self.endpoints.len()).filter(|&e| self.is_ejected(e, now)).count() as u64;
        let total = self.endpoints.len() as u64;
        let may_eject = (ejected + 1) * 100 <= u64::from(self.settings.ejection_max_percent) * total;
        self.health(i).failed(&self.settings, may_eject)
    }

    pub fn succeeded(&self, i: usize) {
        self.health(i).succeeded(&self.settings);
    }

    /// A latency sample for endpoint `i` (connect time, first-byte time).
    pub fn observe(&self, i: usize, sample: Duration) {
        self.health(i).observe(sample, self.settings.ewma_decay);
    }

    /// Endpoint `i`'s health (made on first use).
    pub fn health(&self, i: usize) -> &Arc<Health> {
        self.endpoints[i].health(self.settings.ewma_default_rtt)
    }

    /// Counts a connection in flight to endpoint `i` until the guard drops.
    pub fn start(&self, i: usize) -> InFlight {
        self.health(i).start()
    }

    fn is_ejected(&self, i: usize, now: u64) -> bool {
        self.endpoints[i].health_if_used().is_some_and(|h| h.is_ejected(now))
    }
}

/// Two distinct indices below `n` (≥ 2), uniformly.
fn two_distinct(n: usize) -> (usize, usize) {
    let a = fastrand::usize(..n);
    let mut b = fastrand::usize(..n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn balancer(weights: &[u32], algorithm: Algorithm) -> Balancer {
        let settings = BalanceSettings { algorithm, ..BalanceSettings::default() };
        let endpoints = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Endpoint::new(SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)), *w, Some(format!("ep{i}").into()), None)
            })
            .collect();
        Balancer::new(endpoints, settings)
    }

    fn shares(b: &Balancer, n: usize) -> Vec<usize> {
        let mut counts = vec![0; b.endpoints().len()];
        for _ in 0..n {
            counts[b.pick(&[]).expect("an endpoint")] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_weights_exactly() {
        let b = balancer(&[1, 1, 2], Algorithm::RoundRobin);
        assert_eq!(shares(&b, 400), vec![100, 100, 200]);
    }

    #[test]
    fn random_follows_weights_roughly() {
        let b = balancer(&[1, 1, 2], Algorithm::Random);
        let s = shares(&b, 8000);
        assert!(s[2] > 3500 && s[2] < 4500, "{s:?}");
    }

    #[test]
    fn p2c_avoids_a_slow_endpoint() {
        let b = balancer(&[1, 1, 1], Algorithm::P2cEwma);
        for i in 0..3 {
            b.observe(i, Duration::from_micros(100));
        }
        b.observe(2, Duration::from_millis(50));
        let s = shares(&b, 3000);
        assert!(s[2] < 100, "slow endpoint still got {s:?}");
    }

    #[test]
    fn skips_tried_and_ejected_endpoints() {
        let b = balancer(&[1, 1], Algorithm::P2cEwma);
        assert_eq!(b.pick(&[0]), Ok(1));
        assert_eq!(b.pick(&[0, 1]), Err(NoEndpoint::AllUnavailable));
        assert_eq!(balancer(&[], Algorithm::RoundRobin).pick(&[]), Err(NoEndpoint::None));
    }

    #[test]
    fn p2c_spreads_evenly_over_equal_endpoints() {
        let s = shares(&balancer(&[1, 1, 1], Algorithm::P2cEwma), 3000);
        assert!(s.iter().all(|&n| (850..=1150).contains(&n)), "{s:?}");
    }

    #[test]
    fn a_success_clears_the_failure_streak() {
        let b = balancer(&[1, 1, 1], Algorithm::P2cEwma);
        assert!((0..4).all(|_| b.failed(0).is_none()));
        b.succeeded(0);
        assert!((0..4).all(|_| b.failed(0).is_none()), "the streak restarted after a success");
        assert!(b.failed(0).is_some(), "the fifth in a row ejects");
    }

    #[test]
    fn never_ejects_more_than_the_allowed_share() {
        let b = balancer(&[1, 1, 1], Algorithm::P2cEwma);
        let eject = |i| (0..5).filter_map(|_| b.failed(i)).count();
        assert_eq!(eject(0), 1, "first endpoint ejected");
        assert_eq!(eject(1), 0, "a second ejection would exceed 50% of three");
    }
}
