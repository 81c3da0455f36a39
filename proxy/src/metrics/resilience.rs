//! What the HTTP layer's resilience decided: retries by reason, retries
//! the budget refused, timeouts by kind. Counted per route rule (a bounded
//! label: routes and their rules are limited per service).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::Label;

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

#[derive(Debug, Default)]
pub struct ResilienceMetrics {
    pub retries: Family<RetryLabels, Counter>,
    pub budget_exhausted: Family<RouteLabels, Counter>,
    pub timeouts: Family<TimeoutLabels, Counter>,
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
            "request_timeouts",
            "HTTP requests or attempts that timed out, by route rule and kind (request: 504 to the client; backend_request: one attempt)",
            self.timeouts.clone(),
        );
    }
}
