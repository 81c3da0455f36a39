//! One request's account: where it went, what came back, and — once the
//! response body has ended — its metrics, the pooled connection returned,
//! and its access-log line.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Response};

use super::{pool::Sender, HttpConn};
use crate::httpcore::body::{grpc_status, local_response, BodyEnd, Counted, DownBody, OnEnd};
use crate::{
    balance::InFlight,
    metrics::{service_label, RequestLabels, EXTERNAL, UNKNOWN_SERVICE},
    model::ServiceKey,
    outbound::Connect,
    store::{ServiceRoute, Snapshot},
};

/// What the access log says of a request (only made when it is logged).
struct LogInfo {
    method: http::Method,
    authority: String,
    /// Without the query (which may carry secrets).
    path: String,
    trace: Option<String>,
}

pub struct Exchange<C: Connect> {
    conn: Arc<HttpConn<C>>,
    start: Instant,
    pub route: Arc<str>,
    flags: [&'static str; 3],
    pub service: Option<ServiceKey>,
    endpoint: Option<SocketAddr>,
    pod: Option<Arc<str>>,
    pod_namespace: Option<Arc<str>>,
    in_flight: Option<InFlight>,
    /// The service's circuit-breaker request slot, given back at the end.
    slot: Option<crate::resilience::Slot>,
    pub request_bytes: Option<Arc<AtomicU64>>,
    pub error: Option<String>,
    protocol: &'static str,
    log: Option<LogInfo>,
    /// Counted already (its end, or its drop, counts it once).
    recorded: bool,
}

impl<C: Connect> Exchange<C> {
    pub fn new(conn: Arc<HttpConn<C>>, parts: &http::request::Parts, start: Instant) -> Self {
        let protocol = crate::httpcore::request_protocol(&parts.headers, conn.version == super::Version::H2);
        let log = conn.core.settings.http_layer.log_requests.then(|| LogInfo {
            method: parts.method.clone(),
            authority: parts
                .uri
                .authority()
                .map(|a| a.to_string())
                .or_else(|| parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
                .unwrap_or_default(),
            path: parts.uri.path().to_string(),
            trace: super::filters::trace_id(&parts.headers).map(str::to_string),
        });
        Self {
            conn,
            start,
            route: crate::httpcore::DEFAULT_ROUTE.clone(),
            flags: ["", "", ""],
            service: None,
            endpoint: None,
            pod: None,
            pod_namespace: None,
            in_flight: None,
            slot: None,
            request_bytes: None,
            error: None,
            protocol,
            log,
            recorded: false,
        }
    }

    /// Holds a circuit-breaker slot until the request's end.
    pub fn hold(&mut self, slot: crate::resilience::Slot) {
        self.slot = Some(slot);
    }

    /// Adds an Envoy-style response flag.
    pub fn flag(&mut self, flag: &'static str) {
        if let Some(slot) = self.flags.iter_mut().find(|f| f.is_empty()) {
            *slot = flag;
        }
    }

    /// The endpoint tried now (counted in flight there until the end).
    pub fn set_endpoint(
        &mut self,
        snapshot: &Snapshot,
        route: Option<&ServiceRoute>,
        addr: SocketAddr,
        index: Option<usize>,
    ) {
        self.endpoint = Some(addr);
        self.service = route.map(|r| r.service.clone()).or_else(|| snapshot.service_of_endpoint(addr).cloned());
        self.in_flight = match (route, index) {
            (Some(r), Some(i)) => Some(r.balancer.start(i)),
            _ => None,
        };
        match snapshot.workload(addr.ip()) {
            Some(w) => {
                self.pod = Some(w.workload.key.name.clone());
                self.pod_namespace = Some(w.workload.key.namespace.clone());
            }
            None => {
                self.pod = None;
                self.pod_namespace = None;
            }
        }
    }

    /// A response the proxy answers itself.
    pub fn local(self, status: http::StatusCode, text: &'static str) -> Response<DownBody> {
        let resp = local_response(status, text);
        self.finish(resp, None)
    }

    /// The endpoint's response, on its way to the client.
    pub fn response(self, resp: Response<Incoming>, back: Option<(SocketAddr, Sender)>) -> Response<DownBody> {
        self.finish(resp.map(http_body_util::Either::Left), back)
    }

    fn finish(
        self,
        resp: Response<http_body_util::Either<Incoming, Full<Bytes>>>,
        back: Option<(SocketAddr, Sender)>,
    ) -> Response<DownBody> {
        let status = resp.status().as_u16();
        let trailers_only = grpc_status(resp.headers());
        let received = self.conn.received.clone();
        let record = Box::new(Record { x: self, status, back });
        resp.map(|b| {
            let mut counted = Counted::new(b, Some(received), Some(record as Box<dyn OnEnd>));
            counted.set_grpc_status(trailers_only);
            counted
        })
    }
}

struct Record<C: Connect> {
    x: Exchange<C>,
    status: u16,
    back: Option<(SocketAddr, Sender)>,
}

impl<C: Connect> OnEnd for Record<C> {
    fn ended(self: Box<Self>, bytes: u64, end: BodyEnd, grpc: Option<u8>) {
        let Record { mut x, status, back } = *self;
        x.record(status, bytes, end, grpc);
        if let (Some((addr, sender)), BodyEnd::Complete) = (back, end) {
            x.conn.upstreams().checkin(addr, sender);
        }
    }
}

/// A request dropped before it had a response (the client went away, or
/// the connection was cut) is counted too: code 0, flag `DC`.
impl<C: Connect> Drop for Exchange<C> {
    fn drop(&mut self) {
        if !self.recorded {
            self.record(0, 0, BodyEnd::Abandoned, None);
        }
    }
}

impl<C: Connect> Exchange<C> {
    /// The request's metrics and access-log line, once.
    fn record(&mut self, status: u16, bytes: u64, end: BodyEnd, grpc: Option<u8>) {
        self.recorded = true;
        let x = &*self;
        let conn = &x.conn;
        let duration = x.start.elapsed();
        let request_bytes = x.request_bytes.as_ref().map(|b| b.load(Ordering::Relaxed)).unwrap_or(0);
        conn.sent.fetch_add(request_bytes, Ordering::Relaxed);
        // A response cut short is reported as what the client got: no
        // complete response (code 0 in the metrics, flag UPE).
        let (code, flag) = match end {
            BodyEnd::Complete => (status, None),
            BodyEnd::Error => (0, Some("UPE")),
            BodyEnd::Abandoned => (0, Some("DC")),
        };
        let grpc_label = crate::httpcore::grpc_label(x.protocol, grpc);
        let endpoint = x.endpoint.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let series = conn.series((x.route.clone(), endpoint, code, grpc), || RequestLabels {
            reporter: "outbound",
            source_pod: conn.pod.key.name.clone().into(),
            source_workload_namespace: conn.pod.key.namespace.clone().into(),
            destination_service: match &x.service {
                Some(s) => service_label(s).into(),
                None if x.pod.is_some() => UNKNOWN_SERVICE.into(),
                None => EXTERNAL.into(),
            },
            destination_pod: x.pod.clone().map(Into::into).unwrap_or_else(|| UNKNOWN_SERVICE.into()),
            destination_workload_namespace: x
                .pod_namespace
                .clone()
                .map(Into::into)
                .unwrap_or_else(|| UNKNOWN_SERVICE.into()),
            route: x.route.clone().into(),
            request_protocol: x.protocol,
            response_code: code,
            grpc_response_status: grpc_label,
        });
        series.requests.inc();
        series.duration.observe(duration.as_secs_f64());
        series.request_bytes.inc_by(request_bytes);
        series.response_bytes.inc_by(bytes);
        if let Some(log) = &x.log {
            let mut flags =
                x.flags.iter().chain(flag.iter()).filter(|f| !f.is_empty()).copied().collect::<Vec<_>>().join(",");
            if flags.is_empty() {
                flags.push('-');
            }
            tracing::info!(
                target: "outrigger::access",
                reporter = "outbound", kind = "request", pod = %conn.pod.key, client = %conn.client,
                method = %log.method, authority = %log.authority, path = %log.path, status = code,
                duration_ms = duration.as_secs_f64() * 1e3, route = %x.route,
                service = x.service.as_ref().map(ToString::to_string).unwrap_or_default(),
                upstream = %endpoint, protocol = x.protocol, request_bytes, response_bytes = bytes,
                trace_id = log.trace.as_deref().unwrap_or("-"), flags,
                error = x.error.as_deref().unwrap_or(""),
                "request"
            );
        }
        // What was in flight to the endpoint ends with the request.
        self.in_flight = None;
    }
}
