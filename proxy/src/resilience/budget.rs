//! Linkerd's retry budget: retries may add at most `ratio` of the requests
//! seen over a sliding window, plus a floor of `min_per_second`, so that
//! an outage never turns into a retry storm (every request failing, every
//! request retried `attempts` times).
//!
//! Lock-free: the window is ten slots of atomics, one per tenth of it; a
//! request costs one clock read and one atomic add.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::clock::now_nanos;

const SLOTS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetSettings {
    /// Retries allowed per request in the window (Linkerd: 0.2).
    pub ratio: f64,
    /// Retries allowed per second regardless of requests (Linkerd: 10).
    pub min_per_second: u32,
    /// How far back requests and retries count (Linkerd: 10 s).
    pub window: Duration,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        Self { ratio: 0.2, min_per_second: 10, window: Duration::from_secs(10) }
    }
}

#[derive(Debug, Default)]
struct Slot {
    /// Which tenth of the window (since the clock's start) the counts are of.
    epoch: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct RetryBudget {
    settings: BudgetSettings,
    slot_nanos: u64,
    slots: [Slot; SLOTS],
}

/// What the budget holds now (for `/config_dump`).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct BudgetState {
    pub requests: u64,
    pub retries: u64,
    pub allowed: u64,
}

impl RetryBudget {
    pub fn new(settings: BudgetSettings) -> Self {
        let slot_nanos = (settings.window.as_nanos() as u64 / SLOTS as u64).max(1);
        Self { settings, slot_nanos, slots: Default::default() }
    }

    /// The slot of `now`, emptied first if it holds an older tenth.
    fn slot(&self, now: u64) -> &Slot {
        // Epochs start at 1 so that an untouched slot (epoch 0) is stale.
        let epoch = now / self.slot_nanos + 1;
        let slot = &self.slots[(epoch % SLOTS as u64) as usize];
        let seen = slot.epoch.load(Ordering::Acquire);
        if seen != epoch && slot.epoch.compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // A count racing this reset may be lost: a budget, not a ledger.
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }

    /// Counts one request (a first attempt).
    pub fn deposit(&self) {
        self.slot(now_nanos()).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        let now = now_nanos();
        let state = self.state_at(now);
        if state.retries >= state.allowed {
            return false;
        }
        self.slot(now).retries.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub fn state(&self) -> BudgetState {
        self.state_at(now_nanos())
    }

    fn state_at(&self, now: u64) -> BudgetState {
        let current = now / self.slot_nanos + 1;
        let (mut requests, mut retries) = (0, 0);
        for slot in &self.slots {
            let epoch = slot.epoch.load(Ordering::Acquire);
            if epoch + (SLOTS as u64) > current && epoch <= current {
                requests += slot.requests.load(Ordering::Relaxed);
                retries += slot.retries.load(Ordering::Relaxed);
            }
        }
        let floor = f64::from(self.settings.min_per_second) * self.settings.window.as_secs_f64();
        let allowed = (floor + self.settings.ratio * requests as f64) as u64;
        BudgetState { requests, retries, allowed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_the_ratio_plus_the_floor() {
        let budget =
            RetryBudget::new(BudgetSettings { ratio: 0.2, min_per_second: 1, window: Duration::from_secs(10) });
        for _ in 0..1000 {
            budget.deposit();
        }
        let granted = (0..1000).filter(|_| budget.withdraw()).count();
        // 0.2 × 1 000 + 1/s × 10 s.
        assert_eq!(granted, 210);
        assert!(!budget.withdraw());
    }

    #[test]
    fn without_requests_only_the_floor_is_granted() {
        let budget = RetryBudget::new(BudgetSettings { ratio: 0.5, min_per_second: 0, window: Duration::from_secs(1) });
        assert!(!budget.withdraw());
        budget.deposit();
        budget.deposit();
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
    }
}
