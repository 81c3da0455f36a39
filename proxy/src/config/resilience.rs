//! Flags of the HTTP layer's resilience defaults: what a request gets when
//! its route rule (Gateway API `timeouts`, `retry`) says nothing.

use std::time::Duration;

use clap::Args;

use super::{bad, ConfigError};
use crate::resilience::{BreakerLimits, BudgetSettings, Defaults};

#[derive(Debug, Clone, Args)]
pub struct ResilienceArgs {
    /// Default for a route rule's timeouts.request (Gateway API; Envoy's route
    /// timeout): the longest a request may take, retries included, until the
    /// response head; then the client gets 504 (flag UT) and the upstream request
    /// is cancelled (h2 RST_STREAM, HTTP/1.1 connection closed). 0s: none (Envoy
    /// uses 15s; Linkerd none, which suits streaming).
    #[arg(long, env = "OUTRIGGER_HTTP_REQUEST_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub http_request_timeout: Duration,

    /// Default for timeouts.backendRequest (Gateway API; Envoy's per_try_timeout):
    /// the longest one attempt at one endpoint may take until the response head;
    /// then the attempt is cancelled and, if the rule's retry allows, retried on
    /// another endpoint. 0s: none.
    #[arg(long, env = "OUTRIGGER_HTTP_BACKEND_REQUEST_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub http_backend_request_timeout: Duration,

    /// Default for retry.backoff (GEP-1731; Envoy's base_interval): the least
    /// wait before the first retry; each further retry waits twice as long, plus
    /// up to half again of random jitter, up to --retry-max-backoff.
    #[arg(long, env = "OUTRIGGER_RETRY_BACKOFF", default_value = "25ms", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,

    /// The longest wait between retries (Envoy's max_interval, by default 10 x
    /// its base interval).
    #[arg(long, env = "OUTRIGGER_RETRY_MAX_BACKOFF", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub retry_max_backoff: Duration,

    /// Retry budget (Linkerd's): retries may add at most this share of the
    /// requests a route rule saw over --retry-budget-window, plus
    /// --retry-budget-min-per-second, so that an outage is not multiplied by
    /// retries. A retry past the budget is not made: the client gets the failed
    /// response (counted in outrigger_retry_budget_exhausted_total).
    #[arg(long, env = "OUTRIGGER_RETRY_BUDGET_RATIO", default_value_t = 0.2)]
    pub retry_budget_ratio: f64,

    /// Retries per second a route rule may always make, whatever its request
    /// rate (Linkerd's minRetriesPerSecond).
    #[arg(long, env = "OUTRIGGER_RETRY_BUDGET_MIN_PER_SECOND", default_value_t = 10)]
    pub retry_budget_min_per_second: u32,

    /// How far back the retry budget counts requests and retries (Linkerd's ttl).
    #[arg(long, env = "OUTRIGGER_RETRY_BUDGET_WINDOW", default_value = "10s", value_parser = humantime::parse_duration)]
    pub retry_budget_window: Duration,

    /// Circuit breaking (Envoy's thresholds, per service; a service's
    /// circuitBreaker in the mesh file overrides): upstream HTTP connections
    /// open to one service from this node. Past it a request fails at once with
    /// 503 and flag UO (outrigger_circuit_overflows_total{limit="connections"}).
    #[arg(long, env = "OUTRIGGER_CB_MAX_CONNECTIONS", default_value_t = 1024)]
    pub cb_max_connections: u32,

    /// Requests waiting for an upstream connection to one service (Envoy's
    /// max_pending_requests); past it, 503 UO.
    #[arg(long, env = "OUTRIGGER_CB_MAX_PENDING_REQUESTS", default_value_t = 1024)]
    pub cb_max_pending_requests: u32,

    /// Requests in flight to one service (Envoy's max_requests); past it, 503
    /// UO at once instead of queueing behind a saturated service.
    #[arg(long, env = "OUTRIGGER_CB_MAX_REQUESTS", default_value_t = 1024)]
    pub cb_max_requests: u32,

    /// Retries in flight to one service (Envoy's max_retries, default 3); past
    /// it a failure goes to the client without a retry (flag URX).
    #[arg(long, env = "OUTRIGGER_CB_MAX_RETRIES", default_value_t = 3)]
    pub cb_max_retries: u32,
}

impl ResilienceArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let hour = Duration::from_secs(3600);
        for (flag, d) in [
            ("http-request-timeout", self.http_request_timeout),
            ("http-backend-request-timeout", self.http_backend_request_timeout),
            ("retry-backoff", self.retry_backoff),
            ("retry-max-backoff", self.retry_max_backoff),
        ] {
            if d > hour {
                return Err(bad(flag, "at most 1h"));
            }
        }
        if !self.http_request_timeout.is_zero() && self.http_backend_request_timeout > self.http_request_timeout {
            return Err(bad(
                "http-backend-request-timeout",
                "must not exceed --http-request-timeout (one attempt cannot outlast the request)",
            ));
        }
        if self.retry_max_backoff < self.retry_backoff {
            return Err(bad("retry-max-backoff", "must be at least --retry-backoff"));
        }
        if !(0.0..=10.0).contains(&self.retry_budget_ratio) {
            return Err(bad("retry-budget-ratio", "0 to 10 (retries per request; Linkerd's default is 0.2)"));
        }
        if self.retry_budget_min_per_second > 100_000 {
            return Err(bad("retry-budget-min-per-second", "at most 100000"));
        }
        if self.retry_budget_window < Duration::from_secs(1) || self.retry_budget_window > Duration::from_secs(3600) {
            return Err(bad("retry-budget-window", "1s to 1h"));
        }
        Ok(())
    }

    pub fn breaker_limits(&self) -> BreakerLimits {
        BreakerLimits {
            max_connections: self.cb_max_connections,
            max_pending_requests: self.cb_max_pending_requests,
            max_requests: self.cb_max_requests,
            max_retries: self.cb_max_retries,
        }
    }

    pub fn defaults(&self) -> Defaults {
        Defaults {
            request_timeout: self.http_request_timeout,
            backend_request_timeout: self.http_backend_request_timeout,
            backoff: self.retry_backoff,
            max_backoff: self.retry_max_backoff,
            budget: BudgetSettings {
                ratio: self.retry_budget_ratio,
                min_per_second: self.retry_budget_min_per_second,
                window: self.retry_budget_window,
            },
        }
    }
}
