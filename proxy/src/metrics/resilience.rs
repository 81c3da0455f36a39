//! What the HTTP layer's resilience decided: retries by reason, retries
//! the budget refused, timeouts by kind. Counted per route rule (a bounded
//! label: routes and their rules are limited per service).

use std::{collections::HashSet, sync::Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::Label;
use crate::resilience::Limit;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RetryLabels {
    pub route: Label,
    /// `status` (a retried response code), `timeout` (timeouts.backendRequest),
    /// `reset` (the connection failed after the request was sent), `refused`
    /// (h2 REFUSED_STREAM, GOAWAY, a reused connection that closed).
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Label,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TimeoutLabels {
    pub route: Label,
    /// `request` (timeouts.request) or `backend_request`.
    pub kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BreakerLabels {
    /// `name.namespace`.
    pub service: String,
    /// `connections`, `pending_requests`, `requests`, `retries`.
    pub limit: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RateLimitedLabels {
    pub route: Label,
    /// The client pod: one of this node's (outbound) or any meshed pod
    /// (inbound, `route="default"`); a pod's series go when it leaves the
    /// mesh (see [`ResilienceMetrics::sweep`]).
    pub source_pod: Label,
    pub source_workload_namespace: Label,
}

#[derive(Debug, Default)]
pub struct ResilienceMetrics {
    pub rate_limited: Family<RateLimitedLabels, Counter>,
    /// The label sets of `rate_limited` (the family cannot be walked).
    rate_limited_made: Mutex<HashSet<RateLimitedLabels>>,
    pub retries: Family<RetryLabels, Counter>,
    pub budget_exhausted: Family<RouteLabels, Counter>,
    pub timeouts: Family<TimeoutLabels, Counter>,
    pub overflows: Family<BreakerLabels, Counter>,
    pub circuit_open: Family<BreakerLabels, Gauge>,
}

impl ResilienceMetrics {
    pub fn retried(&self, route: &Label, reason: &'static str) {
        self.retries.get_or_create(&RetryLabels { route: route.clone(), reason }).inc();
    }

    pub fn budget_exhausted(&self, route: &Label) {
        self.budget_exhausted.get_or_create(&RouteLabels { route: route.clone() }).inc();
    }

    pub fn timed_out(&self, route: &Label, kind: &'static str) {
        self.timeouts.get_or_create(&TimeoutLabels { route: route.clone(), kind }).inc();
    }

    /// Counts a request refused by `service`'s breaker at `limit`.
    pub fn overflowed(&self, service: &crate::model::ServiceKey, limit: Limit) {
        let labels = BreakerLabels { service: super::service_label(service), limit: limit.label() };
        self.overflows.get_or_create(&labels).inc();
    }

    /// The open gauges of `service`, one per limit (made at its breaker's
    /// first overflow).
    pub fn circuit_gauges(&self, service: &crate::model::ServiceKey) -> [Gauge; 4] {
        let name = super::service_label(service);
        Limit::ALL.map(|l| {
            self.circuit_open.get_or_create(&BreakerLabels { service: name.clone(), limit: l.label() }).clone()
        })
    }

    pub fn rate_limited(&self, route: &Label, source: &crate::model::PodKey) {
        self.rate_limited_labels(route.clone(), Label(source.name.clone()), Label(source.namespace.clone()));
    }

    /// A 429 by route (`default` for a pod's inbound limit) and source.
    pub fn rate_limited_labels(&self, route: Label, source_pod: Label, source_workload_namespace: Label) {
        let labels = RateLimitedLabels { route, source_pod, source_workload_namespace };
        {
            let mut made = self.rate_limited_made.lock().unwrap_or_else(|e| e.into_inner());
            if !made.contains(&labels) {
                made.insert(labels.clone());
            }
        }
        self.rate_limited.get_or_create(&labels).inc();
    }

    /// Drops the `rate_limited` series of client pods no longer in the
    /// mesh: under a rate limit, every pod that ever called makes one, and
    /// callers come and go while the limited pod lives.
    pub fn sweep(&self, pods: &super::LivePods) -> usize {
        let mut made = self.rate_limited_made.lock().unwrap_or_else(|e| e.into_inner());
        let before = made.len();
        made.retain(|l| {
            let keep = pods.peer_alive((&l.source_workload_namespace.0, &l.source_pod.0));
            if !keep {
                self.rate_limited.remove(l);
            }
            keep
        });
        before - made.len()
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "retries",
            "HTTP requests sent again, by route rule and reason (status, timeout, reset, refused)",
            self.retries.clone(),
        );
        r.register(
            "retry_budget_exhausted",
            "Retries not made because the route rule's retry budget was spent (the client got the failure)",
            self.budget_exhausted.clone(),
        );
        r.register(
            "rate_limited",
            "HTTP requests refused with 429 (flag RL) by a route rule's LocalRateLimit (or, route=\"default\", a pod's inboundRateLimit), by route and source pod",
            self.rate_limited.clone(),
        );
        r.register(
            "circuit_overflows",
            "Requests refused at once (503, flag UO) or retries not made because a service's circuit breaker was at a limit",
            self.overflows.clone(),
        );
        r.register(
            "circuit_open",
            "1 while a service's circuit breaker is at a limit (from a refusal until a slot is given back)",
            self.circuit_open.clone(),
        );
        r.register(
            "request_timeouts",
            "HTTP requests or attempts that timed out, by route rule and kind (request: 504 to the client; backend_request: one attempt)",
            self.timeouts.clone(),
        );
    }
}
