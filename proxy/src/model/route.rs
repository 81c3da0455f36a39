//! HTTP routes, shaped like the Gateway API's HTTPRoute attached to a
//! Service (GAMMA): which requests a rule takes (`matches`), what it does
//! to them (`filters`) and where it sends them (weighted `backends`).
//!
//! A source translates its routes (the mesh file's `routes:`, HTTPRoute
//! objects later) into these types; the store compiles the routes of each
//! parent service into one table in Gateway API precedence order.

use std::{sync::Arc, time::Duration};

use super::{ObjectKey, ServiceKey};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRoute {
    pub key: ObjectKey,
    /// The services (and optionally one port of each) the route attaches to.
    pub parents: Vec<ParentRef>,
    pub rules: Vec<RouteRule>,
    /// Creation order: the older route wins a precedence tie (Gateway API).
    /// Sources give a timestamp or a position; equal values fall back to
    /// the route's `namespace/name`.
    pub created: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    pub service: ServiceKey,
    /// A service port; none: every port of the service.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteRule {
    /// Optional rule name (Gateway API `name`), used as the metrics label.
    pub name: Option<Arc<str>>,
    /// Empty: every request (one `PathPrefix /` match).
    pub matches: Vec<RouteMatch>,
    pub filters: Vec<Filter>,
    /// Empty: the parent service itself.
    pub backends: Vec<BackendRef>,
    /// Gateway API `timeouts`; unset fields take the flags' defaults.
    pub timeouts: Timeouts,
    /// Gateway API `retry` (GEP-1731); none: no retries beyond resending
    /// what an endpoint provably did not process.
    pub retry: Option<Retry>,
}

/// Gateway API HTTPRouteTimeouts. `None`: the flag's default; zero:
/// disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timeouts {
    /// The whole transaction, retries included, to the response head.
    pub request: Option<Duration>,
    /// One attempt at one endpoint, to the response head.
    pub backend_request: Option<Duration>,
}

/// Gateway API HTTPRouteRetry (GEP-1731).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Response codes that are retried (400-599).
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    pub attempts: u32,
    /// The least wait before a retry; it doubles with each retry (with
    /// jitter), Envoy's exponential back-off. None: the flag's default.
    pub backoff: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteMatch {
    /// None: `PathPrefix /`.
    pub path: Option<PathMatch>,
    pub headers: Vec<ValueMatch>,
    pub query: Vec<ValueMatch>,
    pub method: Option<http::Method>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(Arc<str>),
    /// Element-wise: `/a` takes `/a` and `/a/b`, not `/ab`.
    Prefix(Arc<str>),
    RegularExpression(Arc<str>),
}

/// A header (name case-insensitive) or query parameter (name exact) match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueMatch {
    pub name: Arc<str>,
    pub value: StringMatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(Arc<str>),
    RegularExpression(Arc<str>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRef {
    pub service: ServiceKey,
    pub port: u16,
    /// Share of requests: weight / sum of the rule's weights; 0 takes none.
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderModifier {
    pub set: Vec<(Arc<str>, Arc<str>)>,
    pub add: Vec<(Arc<str>, Arc<str>)>,
    pub remove: Vec<Arc<str>>,
}

/// A share of requests, in millionths (Gateway API `percent` or
/// `fraction`, Envoy's `percentage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share(pub u32);

impl Share {
    pub const ALL: Share = Share(1_000_000);

    pub fn percent(p: f64) -> Share {
        Share((p.clamp(0.0, 100.0) * 10_000.0).round() as u32)
    }

    pub fn fraction(numerator: u32, denominator: u32) -> Share {
        if denominator == 0 {
            return Share(0);
        }
        Share(((numerator.min(denominator) as u64 * 1_000_000) / denominator as u64) as u32)
    }

    /// Whether this request falls in the share.
    pub fn roll(self) -> bool {
        self.0 >= 1_000_000 || (self.0 > 0 && fastrand::u32(0..1_000_000) < self.0)
    }
}

/// Envoy's HTTP fault filter: delay and/or abort a share of requests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fault {
    pub delay: Option<(Duration, Share)>,
    pub abort: Option<(u16, Share)>,
    /// Requests may ask for a fault themselves (`x-envoy-fault-delay-request:
    /// MS`, `x-envoy-fault-abort-request: STATUS`), only on a route that
    /// enables it; a requested delay is capped at [`Fault::MAX_HEADER_DELAY`].
    pub header_control: bool,
}

impl Fault {
    pub const MAX_HEADER_DELAY: Duration = Duration::from_secs(10);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    RequestMirror {
        backend: BackendRef,
        share: Share,
    },
    /// An Outrigger extension (from Kubernetes: an `ExtensionRef`).
    Fault(Fault),
    /// Envoy's local rate limit, an Outrigger extension like `Fault`.
    LocalRateLimit(RateLimit),
}

/// A token bucket (Envoy's local_ratelimit): `max_tokens`, refilled by
/// `tokens_per_fill` every `fill_interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    /// One bucket per source pod of this node instead of one for the rule.
    pub per_source_pod: bool,
}
