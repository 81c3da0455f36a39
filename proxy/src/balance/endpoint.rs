//! One endpoint of a service and what the balancer knows about it: a
//! peak-EWMA latency estimate, connections in flight, and outlier-ejection
//! state. Touched once per connection (pick, connect result, first byte,
//! close), never per read or write.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use super::BalanceSettings;
use crate::clock::now_nanos;

/// How long an estimate stays current without a new sample: a twentieth
/// of the decay (0.5 s by default). Past it the endpoint is probed.
pub fn probe_after(decay: Duration) -> Duration {
    decay / 20
}

#[derive(Debug)]
struct Estimate {
    /// Peak-EWMA latency estimate, nanoseconds.
    rtt_ns: f64,
    updated: Instant,
    consecutive_failures: u32,
    /// Times ejected; the next ejection lasts `base × (ejections + 1)`.
    ejections: u32,
    /// Whether any latency sample came yet.
    measured: bool,
}

/// Health and load of one endpoint address, kept across reloads of the
/// mesh file as long as the endpoint stays in its service.
#[derive(Debug)]
pub struct Health {
    estimate: Mutex<Estimate>,
    pending: AtomicU32,
    /// `now_nanos()` until which the endpoint is ejected (0: not ejected).
    ejected_until: AtomicU64,
    /// Totals, for /config_dump.
    total_ejections: AtomicU32,
    total_failures: AtomicU64,
    /// A failure streak or an ejection to forgive: only then does a
    /// success take the lock (most successes follow successes).
    owes: std::sync::atomic::AtomicBool,
}

impl Health {
    pub fn new(default_rtt: Duration) -> Self {
        Self {
            estimate: Mutex::new(Estimate {
                rtt_ns: default_rtt.as_nanos() as f64,
                updated: Instant::now(),
                consecutive_failures: 0,
                ejections: 0,
                measured: false,
            }),
            pending: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            total_ejections: AtomicU32::new(0),
            total_failures: AtomicU64::new(0),
            owes: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Estimate> {
        self.estimate.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Peak-EWMA (linkerd2-proxy's balancer): a sample above the estimate
    /// replaces it at once; lower samples pull it down with a weight that
    /// grows with the time since the last update (decay constant `decay`).
    pub fn observe(&self, sample: Duration, decay: Duration) {
        let mut e = self.lock();
        let now = Instant::now();
        let sample = sample.as_nanos() as f64;
        if !e.measured || now.saturating_duration_since(e.updated) > probe_after(decay) {
            // The first sample replaces the default guess, and a sample
            // after a long silence replaces a stale estimate.
            e.measured = true;
            e.rtt_ns = sample;
        } else if sample > e.rtt_ns {
            e.rtt_ns = sample;
        } else {
            let elapsed = now.saturating_duration_since(e.updated).as_nanos() as f64;
            let w = (-elapsed / decay.as_nanos().max(1) as f64).exp();
            e.rtt_ns = e.rtt_ns * w + sample * (1.0 - w);
        }
        e.updated = now;
    }

    /// The load a new connection (or request) would meet: the estimate,
    /// decayed towards zero since its last sample, times what is in flight
    /// plus one. An endpoint not measured yet, or not for
    /// [`probe_after`]`(decay)`, costs nothing while idle — it is tried and
    /// measured again — and its estimate per connection in flight
    /// otherwise. Without that, one slow sample (a peak sticks) would keep
    /// an endpoint unpicked, and so unmeasured, for many decay periods.
    pub fn load(&self, decay: Duration) -> f64 {
        let pending = f64::from(self.pending.load(Ordering::Relaxed));
        let (rtt, fresh) = {
            let e = self.lock();
            let elapsed = e.updated.elapsed();
            let rtt = e.rtt_ns * (-(elapsed.as_nanos() as f64) / decay.as_nanos().max(1) as f64).exp();
            (rtt, e.measured && elapsed <= probe_after(decay))
        };
        if fresh {
            rtt * (pending + 1.0)
        } else {
            rtt * pending
        }
    }

    pub fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// A successful connect: clears the failure streak, and after a healthy
    /// base period since the last ejection ended, forgives one ejection
    /// (Envoy's ejection multiplier decay).
    pub fn succeeded(&self, settings: &BalanceSettings) {
        if !self.owes.load(Ordering::Acquire) {
            return;
        }
        let mut e = self.lock();
        e.consecutive_failures = 0;
        let until = self.ejected_until.load(Ordering::Relaxed);
        if e.ejections > 0 && now_nanos() >= until + settings.ejection_base_time.as_nanos() as u64 {
            e.ejections -= 1;
        }
        // Set again under the lock by a failure racing this.
        self.owes.store(e.ejections > 0, Ordering::Release);
    }

    /// A failed connect. Returns the ejection time when this failure ejects
    /// the endpoint; `may_eject` says whether the service's ejection budget
    /// (`max_ejection_percent`) allows one more.
    pub fn failed(&self, settings: &BalanceSettings, may_eject: bool) -> Option<Duration> {
        self.total_failures.fetch_add(1, Ordering::Relaxed);
        let mut e = self.lock();
        let now = now_nanos();
        // Connects that were in flight when it was ejected say nothing new.
        if self.is_ejected(now) {
            return None;
        }
        e.consecutive_failures += 1;
        self.owes.store(true, Ordering::Release);
        let threshold = settings.ejection_consecutive_failures;
        if threshold == 0 || e.consecutive_failures < threshold || !may_eject {
            return None;
        }
        e.ejections += 1;
        e.consecutive_failures = 0;
        let time = settings.ejection_base_time.saturating_mul(e.ejections).min(settings.ejection_max_time);
        self.ejected_until.store(now + time.as_nanos() as u64, Ordering::Relaxed);
        self.total_ejections.fetch_add(1, Ordering::Relaxed);
        Some(time)
    }

    pub fn status(&self, now: u64) -> HealthStatus {
        let e = self.lock();
        let until = self.ejected_until.load(Ordering::Relaxed);
        HealthStatus {
            ewma_ms: e.rtt_ns / 1e6,
            pending: self.pending.load(Ordering::Relaxed),
            consecutive_failures: e.consecutive_failures,
            ejected: until > now,
            ejected_for_ms: until.saturating_sub(now) / 1_000_000,
            ejections: self.total_ejections.load(Ordering::Relaxed),
            connect_failures: self.total_failures.load(Ordering::Relaxed),
        }
    }
}

/// A connection in flight to an endpoint; dropping it ends the connection's
/// share of the endpoint's load.
#[derive(Debug)]
pub struct InFlight(Arc<Health>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HealthStatus {
    pub ewma_ms: f64,
    pub pending: u32,
    pub consecutive_failures: u32,
    pub ejected: bool,
    pub ejected_for_ms: u64,
    pub ejections: u32,
    pub connect_failures: u64,
}

/// An endpoint as a balancer sees it.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    /// The pod it is, when it is one (its name).
    pub pod: Option<Arc<str>>,
    /// Made on first use: a node balances to few of the cluster's services,
    /// and health for the others would be most of the store's memory.
    health: OnceLock<Arc<Health>>,
}

impl Endpoint {
    /// `health`: carried over from the previous version of the route.
    pub fn new(addr: SocketAddr, weight: u32, pod: Option<Arc<str>>, health: Option<Arc<Health>>) -> Self {
        let cell = OnceLock::new();
        if let Some(h) = health {
            let _ = cell.set(h);
        }
        Self { addr, weight, pod, health: cell }
    }

    /// The endpoint's health, made now if it was never used.
    pub fn health(&self, default_rtt: Duration) -> &Arc<Health> {
        self.health.get_or_init(|| Arc::new(Health::new(default_rtt)))
    }

    /// The endpoint's health if it has been used.
    pub fn health_if_used(&self) -> Option<&Arc<Health>> {
        self.health.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BalanceSettings {
        BalanceSettings {
            ejection_consecutive_failures: 3,
            ejection_base_time: Duration::from_secs(1),
            ejection_max_time: Duration::from_secs(5),
            ..BalanceSettings::default()
        }
    }

    #[test]
    fn peak_ewma_jumps_up_and_eases_down() {
        let h = Health::new(Duration::from_millis(1));
        h.observe(Duration::from_millis(50), Duration::from_secs(10));
        assert!(h.lock().rtt_ns >= 50e6, "a higher sample is taken at once");
        h.observe(Duration::from_micros(100), Duration::from_secs(10));
        let after = h.lock().rtt_ns;
        assert!(after > 40e6, "a lower sample right after moves the estimate only a little: {after}");
    }

    #[test]
    fn load_counts_connections_in_flight() {
        let h = Arc::new(Health::new(Duration::from_millis(10)));
        let idle = h.load(Duration::from_secs(10));
        let _a = h.start();
        let _b = h.start();
        let busy = h.load(Duration::from_secs(10));
        assert!(busy > idle * 2.5, "{busy} vs {idle}");
    }

    #[test]
    fn ejects_after_consecutive_failures_with_growing_time() {
        let s = settings();
        let h = Health::new(Duration::from_millis(1));
        assert_eq!(h.failed(&s, true), None);
        assert_eq!(h.failed(&s, true), None);
        assert_eq!(h.failed(&s, true), Some(Duration::from_secs(1)));
        assert!(h.is_ejected(now_nanos()));
        // While ejected, failures do not extend it.
        assert_eq!(h.failed(&s, true), None);
        h.ejected_until.store(0, Ordering::Relaxed);
        for _ in 0..2 {
            assert_eq!(h.failed(&s, true), None);
        }
        assert_eq!(h.failed(&s, true), Some(Duration::from_secs(2)), "second ejection lasts twice as long");
    }

    #[test]
    fn success_resets_the_streak_and_the_budget_can_forbid() {
        let s = settings();
        let h = Health::new(Duration::from_millis(1));
        h.failed(&s, true);
        h.failed(&s, true);
        h.succeeded(&s);
        assert_eq!(h.failed(&s, true), None, "the streak restarted");
        h.failed(&s, true);
        assert_eq!(h.failed(&s, false), None, "no ejection beyond the service's budget");
    }
}
