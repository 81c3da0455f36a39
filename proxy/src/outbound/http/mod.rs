//! The HTTP layer of the outbound path: a captured connection detected as
//! HTTP/1.1 or h2 is served by hyper, and every request goes through its
//! own steps:
//!
//! 1. route — the first rule of the service port's [`RouteTable`] that
//!    matches (Gateway API precedence), or the service itself;
//! 2. filters — fault injection (delay, abort), request header changes, a
//!    mirror copy sent aside;
//! 3. backend — weighted among the rule's `backendRefs`;
//! 4. endpoint — P2C over peak-EWMA × requests in flight over the
//!    backend's endpoints, the estimate fed by each response's latency;
//! 5. connection — from the pod's [`Pool`] (one per endpoint and version,
//!    direct or through a tunnel, as the L4 path decides), or a new one;
//! 6. response — header changes, then metrics and one access-log line
//!    when its body ends.
//!
//! The upstream speaks the client's version (HTTP/1.1 → HTTP/1.1, h2 →
//! h2). Upgrades (WebSocket, `CONNECT`) are forwarded, then the two
//! upgraded connections are joined byte for byte.
//!
//! [`RouteTable`]: crate::routing::RouteTable

mod exchange;
mod filters;
mod forward;
mod mirror;
mod pool;
#[cfg(test)]
pub(crate) mod tests;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, Instant},
};

use hyper::{body::Incoming, Request, Response};

pub use crate::httpcore::body::DownBody;
use crate::httpcore::body::{self, Counted};
use crate::httpcore::local::{Exec, Spawner};
use exchange::Exchange;
use forward::{Attempts, Outcome};
pub use pool::{Pool, Pools};
use pool::{Sender, Version};

use super::{
    detect::Detected,
    endpoint::{attempt, target_for, Connect, ConnectContext},
    failure::Failure,
    Core, Logical,
};
use crate::{
    metrics::{RequestSeries, SeriesCache},
    pod::PodContext,
    resilience::{Limit, Policy, Slot},
    routing::Pick,
    store::{ServiceRoute, Snapshot},
    transport::{Duplex, HyperIo},
};

use crate::httpcore::{is_upgrade, join_upgrade, BUFFER};
/// Request series a connection keeps resolved.
const SERIES_CACHE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("HTTP handshake with the endpoint failed: {0}")]
    Handshake(hyper::Error),
    #[error("serving the client's HTTP connection failed: {0}")]
    Serve(hyper::Error),
}

/// HTTP settings of the outbound path (from the command line).
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// `--access-log requests`: one line per request.
    pub log_requests: bool,
    /// `--trace-sampling`: the share of requests without a `traceparent`
    /// that get one.
    pub trace_sampling: crate::model::Share,
    /// Idle upstream HTTP/1.1 connections kept per endpoint and pod.
    pub max_idle_per_endpoint: usize,
    pub idle_timeout: Duration,
    /// Mirror copies in flight per pod; more are skipped (counted).
    pub max_mirrors_in_flight: usize,
    /// Timeouts and retries where a route rule sets none.
    pub resilience: crate::resilience::Defaults,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            log_requests: false,
            trace_sampling: crate::model::Share(0),
            max_idle_per_endpoint: 64,
            idle_timeout: Duration::from_secs(90),
            max_mirrors_in_flight: 64,
            resilience: Default::default(),
        }
    }
}

/// One client connection's HTTP state, shared by its requests.
pub struct HttpConn<C: Connect> {
    core: Arc<Core<C>>,
    pod: Arc<PodContext>,
    /// The application's address (as without the mesh).
    client: SocketAddr,
    logical: Logical,
    version: Version,
    /// The pod's pool: its h2 connections, and the connections mirror
    /// copies use (which may outlive this client connection).
    pool: Arc<Pool>,
    /// HTTP/1.1: this client connection's own upstream connections, idle
    /// between its requests.
    own: Pool,
    /// Runs the connection's h2 streams and its HTTP/1.1 upstream
    /// connections inside its own task (see [`crate::httpcore::local`]).
    spawner: Spawner,
    cache: SeriesCache<(Arc<str>, SocketAddr, u16, Option<u8>)>,
    /// Body bytes each way over the connection's life.
    pub sent: Arc<AtomicU64>,
    pub received: Arc<AtomicU64>,
}

/// Where one request goes.
struct Destination {
    route: Option<Arc<ServiceRoute>>,
    /// Passthrough: the address dialled.
    addr: Option<SocketAddr>,
}

impl<C: Connect> HttpConn<C> {
    pub fn new(
        core: Arc<Core<C>>,
        pod: Arc<PodContext>,
        client: SocketAddr,
        logical: Logical,
        detected: Detected,
    ) -> Self {
        let settings = &core.settings.http_layer;
        let pool = core.pools.of(&pod, settings);
        let version = if detected == Detected::H2 { Version::H2 } else { Version::Http1 };
        // HTTP/1.1 has one request in flight per connection, so its
        // upstream connections need not be shared: they are the client
        // connection's own, driven in its task, and a request's way to the
        // endpoint and back wakes no other task (a pooled connection with
        // its own task costs two cross-task wake-ups a request). A
        // connection is made only when none to its endpoint is idle: at
        // most one per endpoint in use at a time. h2 connections are the
        // pod's: many clients' streams share one, and under load their
        // frames share reads and writes, which costs less than the
        // wake-ups it adds.
        let own = Pool::new(settings);
        Self {
            core,
            pod,
            client,
            logical,
            version,
            pool,
            own,
            spawner: Spawner::default(),
            cache: Default::default(),
            sent: Default::default(),
            received: Default::default(),
        }
    }

    /// The request series for this key, from the connection's cache.
    fn series(
        &self,
        key: (Arc<str>, SocketAddr, u16, Option<u8>),
        make: impl FnOnce() -> crate::metrics::RequestLabels,
    ) -> Arc<RequestSeries> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = cache.get(&key) {
            return s.clone();
        }
        let s = self.core.metrics.requests.series(&make());
        if cache.len() < SERIES_CACHE {
            cache.insert(key, s.clone());
        }
        s
    }

    /// Where this connection's requests find upstream connections.
    fn upstreams(&self) -> &Pool {
        match self.version {
            Version::Http1 => &self.own,
            Version::H2 => &self.pool,
        }
    }

    /// Where this connection's upstream connections run: HTTP/1.1 ones in
    /// its own task, shared h2 ones in theirs.
    fn upstream_exec(&self) -> Exec {
        match self.version {
            Version::Http1 => Exec::Local(self.spawner.clone()),
            Version::H2 => Exec::Task,
        }
    }

    /// A new upstream connection to `addr` for this connection's requests,
    /// holding `slot` (its service's breaker) while it is open.
    async fn connect(&self, snapshot: &Snapshot, addr: SocketAddr, slot: Option<Slot>) -> Result<Sender, Failure> {
        self.connect_driven(snapshot, addr, self.upstream_exec(), slot).await
    }

    /// A slot of `route`'s circuit breaker at `limit`; `None` (counted and
    /// logged) when the service is at it.
    fn breaker_slot(&self, route: &ServiceRoute, limit: Limit) -> Option<Slot> {
        let metrics = &self.core.metrics.resilience;
        let slot = route.breaker.acquire(limit, || metrics.circuit_gauges(&route.service));
        if slot.is_none() {
            metrics.overflowed(&route.service, limit);
            crate::warn_throttled!(service = %route.service, limit = limit.label(),
                "circuit breaker at its limit: requests fail at once with 503 (UO)");
        }
        slot
    }

    /// A new upstream connection whose driver is its own task (for
    /// requests that may outlive this client connection: mirror copies).
    async fn connect_detached(&self, snapshot: &Snapshot, addr: SocketAddr) -> Result<Sender, Failure> {
        self.connect_driven(snapshot, addr, Exec::Task, None).await
    }

    /// A new upstream connection to `addr`, as the L4 path would reach it,
    /// its futures run by `exec`.
    async fn connect_driven(
        &self,
        snapshot: &Snapshot,
        addr: SocketAddr,
        exec: Exec,
        slot: Option<Slot>,
    ) -> Result<Sender, Failure> {
        let strict = self.core.connector.strict();
        let target = target_for(snapshot, &self.pod, addr, strict)?;
        let cx = ConnectContext {
            snapshot,
            pod: &self.pod,
            client: self.client,
            timeout: self.core.settings.connect_timeout,
            metrics: &self.core.metrics,
        };
        let io = attempt(&self.core.connector, &cx, &target).await?;
        handshake(io, self.version, exec, slot)
            .await
            .map_err(|e| Failure::Connect { dest: addr, reason: e.to_string() })
    }
}

/// The client side of a new upstream connection; its driver (which ends
/// when every sender is gone and the connection is idle) and its h2
/// request-body pipes run on `exec`.
async fn handshake<T>(io: T, version: Version, exec: Exec, slot: Option<Slot>) -> Result<Sender, hyper::Error>
where
    T: Duplex + Unpin + Send + 'static,
{
    let io = HyperIo::new(io, BUFFER, BUFFER);
    Ok(match version {
        Version::Http1 => {
            let (sender, conn) = hyper::client::conn::http1::Builder::new().handshake(io).await?;
            // If the client connection is gone, so is a local driver (and
            // the connection with it).
            hyper::rt::Executor::execute(&exec, async move {
                // The service's connection slot, held while it is open.
                let _slot = slot;
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended with an error");
                }
            });
            Sender::Http1(sender)
        }
        Version::H2 => {
            let (sender, conn) = hyper::client::conn::http2::Builder::new(exec.clone()).handshake(io).await?;
            hyper::rt::Executor::execute(&exec, async move {
                let _slot = slot;
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended with an error");
                }
            });
            Sender::H2(sender)
        }
    })
}

/// Serves `client` speaking `detected` (HTTP/1 or h2). `first`: the
/// upstream connection the L4 path already made (to `first_addr`), which
/// becomes the pool's first connection to that endpoint.
pub async fn serve<I, U, C>(
    client: I,
    first: U,
    first_addr: SocketAddr,
    conn: Arc<HttpConn<C>>,
) -> Result<(), HttpError>
where
    I: Duplex + Unpin + Send + 'static,
    U: Duplex + Unpin + Send + 'static,
    C: Connect,
{
    let sender = handshake(first, conn.version, conn.upstream_exec(), None).await.map_err(HttpError::Handshake)?;
    conn.upstreams().checkin(first_addr, sender);
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(handle(conn, req).await) }
        })
    };
    // Upstream connections are this connection's own: one closing ends
    // nothing here (the next request makes a new one).
    let served = crate::httpcore::serve_client(
        client,
        conn.version == Version::H2,
        &conn.spawner,
        service,
        &conn.core.drain_cut,
        std::future::pending(),
    )
    .await;
    served.map_err(HttpError::Serve)
}

/// One request, start to response head; the rest is the [`Exchange`]'s.
async fn handle<C: Connect>(conn: Arc<HttpConn<C>>, mut req: Request<Incoming>) -> Response<DownBody> {
    let start = Instant::now();
    let upgrade = is_upgrade(&req);
    let connect = req.method() == http::Method::CONNECT;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let settings = &conn.core.settings.http_layer;
    if filters::trace_id(&parts.headers).is_none() && settings.trace_sampling.roll() {
        filters::start_trace(&mut parts.headers);
    }
    let mut x = Exchange::new(conn.clone(), &parts, start);
    // Until a backend is chosen (or when a filter answers first), the
    // request is the service's that the client dialled.
    if let Logical::Service(route) = &conn.logical {
        x.service = Some(route.service.clone());
    }
    let snapshot = conn.core.mesh.load_full();
    // 1. Route: the table is the connection's service port's.
    let table = match &conn.logical {
        Logical::Service(route) => route.http.clone(),
        Logical::Passthrough(_) => None,
    };
    let rule = table.as_deref().and_then(|t| t.find(&parts));
    if let Some(rule) = rule {
        x.route = rule.label.clone();
    }
    // 2. Filters, in the order Envoy runs them: fault first.
    let mut response_modifier = None;
    // The senders of mirrors' copies of the body (none for most requests).
    let mut copies = Vec::new();
    for f in rule.map(|r| &r.filters[..]).unwrap_or(&[]) {
        match f {
            crate::model::Filter::Fault(fault) => {
                let d = filters::fault(fault, &parts.headers);
                if let Some(delay) = d.delay {
                    x.flag("DI");
                    tokio::time::sleep(delay).await;
                }
                if let Some(status) = d.abort {
                    x.flag("FI");
                    let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
                    return x.local(status, "fault filter abort");
                }
            }
            crate::model::Filter::RequestHeaderModifier(m) => filters::modify_headers(&mut parts.headers, m),
            crate::model::Filter::ResponseHeaderModifier(m) => response_modifier = Some(m),
            crate::model::Filter::RequestMirror { backend, share } => {
                if share.roll() {
                    copies.extend(mirror::send(&conn, &snapshot, backend, &parts, &body));
                }
            }
            crate::model::Filter::LocalRateLimit(_) => {
                if let Some(limited) =
                    rule.and_then(|r| r.rate_limiter.as_ref()).and_then(|l| rate_limited(&conn, &x, l))
                {
                    x.flag("RL");
                    let mut resp = x.local(http::StatusCode::TOO_MANY_REQUESTS, "rate limited");
                    resp.headers_mut().extend(limited);
                    return resp;
                }
            }
        }
    }
    // 3. Backend.
    let v6 = conn.client.is_ipv6();
    let destination = match rule.map(|r| r.pick_backend()) {
        Some(Pick::Nowhere) => {
            x.flag("NR");
            return x.local(http::StatusCode::INTERNAL_SERVER_ERROR, "every backend of the route has weight 0");
        }
        Some(Pick::Backend(b)) => match snapshot.service_route(&b.service, b.port, v6) {
            Some(route) => Destination { route: Some(route.clone()), addr: None },
            None => {
                x.flag("NR");
                return x.local(http::StatusCode::INTERNAL_SERVER_ERROR, "the route's backend service does not exist");
            }
        },
        Some(Pick::Parent) | None => match &conn.logical {
            Logical::Service(route) => Destination { route: Some(route.clone()), addr: None },
            Logical::Passthrough(dest) => Destination { route: None, addr: Some(*dest) },
        },
    };
    // Circuit breaking: the service's requests in flight.
    if let Some(route) = &destination.route {
        match conn.breaker_slot(route, Limit::Requests) {
            Some(slot) => x.hold(slot),
            None => {
                x.flag("UO");
                x.service = Some(route.service.clone());
                return x.local(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "circuit breaker: the service is at its max requests",
                );
            }
        }
    }
    filters::strip_hop_by_hop(&mut parts.headers, upgrade);
    let idempotent = matches!(
        parts.method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::TRACE
            | http::Method::PUT
            | http::Method::DELETE
    );
    // 4 + 5. Endpoint, connection and sending, under the rule's policy.
    let resilience = &settings.resilience;
    let policy = match rule {
        Some(r) => Policy::new(r.timeouts, r.retry.as_ref(), resilience),
        None => Policy::new(Default::default(), None, resilience),
    };
    let budget = rule.filter(|_| policy.retry.is_some()).map(|r| r.budget(resilience.budget));
    if let Some(b) = budget {
        b.deposit();
    }
    // What a resend or a retry rebuilds: the head, and a body kept as it
    // passes (only where a retry could use it, up to 64 KiB).
    let has_body = !http_body::Body::is_end_stream(&body);
    let recording = (has_body
        && policy.retry.is_some()
        && idempotent
        && !upgrade
        && http_body::Body::size_hint(&body).lower() <= crate::httpcore::tee::MAX_COPIED_BODY)
        .then(|| Arc::new(crate::httpcore::tee::Recording::default()));
    let replay = (!upgrade && (!has_body || recording.is_some())).then(|| Head::of(&parts));
    let request_bytes = Arc::new(AtomicU64::new(0));
    x.request_bytes = Some(request_bytes.clone());
    let body = crate::httpcore::tee::Tee::new(body, copies, recording.clone());
    let up_req = Request::from_parts(parts, body::UpBody::Left(Counted::new(body, Some(request_bytes), None)));
    let attempts = Attempts {
        destination: &destination,
        snapshot: &snapshot,
        policy,
        budget,
        idempotent,
        route: x.route.clone().into(),
        replay,
        recording,
        deadline: policy.request_timeout.map(|t| tokio::time::Instant::from_std(start) + t),
    };
    let outcome = forward::forward(&conn, &mut x, &attempts, up_req).await;
    let (mut resp, addr, sender) = match outcome {
        Outcome::Response(resp, addr, sender) => (resp, addr, sender),
        Outcome::Local(status, text) => {
            if status == http::StatusCode::GATEWAY_TIMEOUT {
                x.flag("UT");
            }
            return x.local(status, text);
        }
    };
    // 6. The response.
    let switching = upgrade && resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    filters::strip_hop_by_hop(resp.headers_mut(), switching);
    if let Some(m) = response_modifier {
        filters::modify_headers(resp.headers_mut(), m);
    }
    let upgraded = match client_upgrade {
        Some(client_side) if switching || (connect && resp.status().is_success()) => {
            join_upgrade(client_side, hyper::upgrade::on(&mut resp));
            true
        }
        _ => false,
    };
    // An HTTP/1.1 connection goes back once its response has been read to
    // the end; an upgraded one is the tunnel's.
    let back = (!upgraded && conn.version == Version::Http1).then_some((addr, sender));
    x.response(resp, back)
}

/// A request's head, to send it again.
struct Head {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Head {
    fn of(parts: &http::request::Parts) -> Self {
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    fn request(&self, body: crate::httpcore::tee::CopiedBody) -> Request<body::UpBody> {
        let mut req = Request::new(body::UpBody::Right(body));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Whether the endpoint provably did not process the request: refused (h2
/// REFUSED_STREAM, or a stream beyond the endpoint's GOAWAY), never sent,
/// or — for an idempotent request — a kept-alive connection that closed
/// before any response.
fn unprocessed(e: &hyper::Error, idempotent: bool) -> bool {
    if e.is_canceled() || (idempotent && e.is_incomplete_message()) {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote());
        }
        source = s.source();
    }
    false
}

/// A connect failure or a 5xx answer counts against the endpoint (Envoy's
/// consecutive_5xx, which counts both); the streak may eject it.
fn endpoint_failed<C: Connect>(
    conn: &HttpConn<C>,
    destination: &Destination,
    index: Option<usize>,
    why: &dyn std::fmt::Display,
) {
    let (Some(route), Some(i)) = (&destination.route, index) else { return };
    if let Some(time) = route.balancer.failed(i) {
        conn.core.metrics.ejections.get_or_create(&crate::metrics::ServiceLabels::of(&route.service)).inc();
        tracing::warn!(service = %route.service, endpoint = %route.balancer.endpoints()[i].addr, ejected_for = ?time,
            why = %why, "endpoint ejected after consecutive failures (connect failures or 5xx answers)");
    }
}

/// `None` when `limiter` admits the request; else the 429's headers, the
/// refusal counted.
fn rate_limited<C: Connect>(
    conn: &HttpConn<C>,
    x: &Exchange<C>,
    limiter: &crate::resilience::RateLimiter,
) -> Option<http::HeaderMap> {
    let crate::resilience::Admission::Limited { reset } = limiter.admit(&conn.pod.key) else { return None };
    conn.core.metrics.resilience.rate_limited(&x.route.clone().into(), &conn.pod.key);
    crate::info_throttled!(pod = %conn.pod.key, route = %x.route, "requests over the route's rate limit get 429");
    Some(crate::resilience::limit_headers(limiter.spec().max_tokens, reset))
}
