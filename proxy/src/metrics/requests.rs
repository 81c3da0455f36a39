//! Per-request metrics of the HTTP layer, labelled like Istio's
//! `istio_requests_total` / `istio_request_duration_milliseconds` plus the
//! route: who asked whom, through which route, with what answer.
//!
//! A label set is resolved once per connection and key (route, endpoint,
//! status, gRPC status) and kept by the connection: a request costs a
//! lookup in its connection's small map, not in the registry. Series of
//! pods that left the node go with the connection series' sweep.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use super::connection::Buckets;

/// A shared string as a label value: label sets clone a reference count,
/// not the text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Label(pub Arc<str>);

impl From<Arc<str>> for Label {
    fn from(s: Arc<str>) -> Self {
        Self(s)
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<String> for Label {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, &self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// `outbound` (the client's node) or `inbound` (the server's).
    pub reporter: &'static str,
    pub source_pod: Label,
    pub source_workload_namespace: Label,
    /// `name.namespace` of the service the request went to (a route's
    /// backend), `unknown` or `external`.
    pub destination_service: Label,
    pub destination_pod: Label,
    pub destination_workload_namespace: Label,
    /// The route rule that took the request (`route`, `route/rule`), or
    /// `default` (no route: balanced over the service).
    pub route: Label,
    /// `http` (HTTP/1.x), `http2`, `grpc`.
    pub request_protocol: &'static str,
    /// 0 when no response came (the connection failed or the client left).
    pub response_code: u16,
    /// The `grpc-status` of a gRPC response (empty for other protocols).
    pub grpc_response_status: &'static str,
}

/// Request duration, first byte in to last byte out: 0.5 ms to 60 s.
pub const REQUEST_BUCKETS: Buckets =
    Buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]);

/// gRPC status codes as label values, resolved without allocating.
pub const GRPC_STATUS: [&str; 17] =
    ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"];

/// Ready handles for one request label set.
#[derive(Debug)]
pub struct RequestSeries {
    pub requests: Counter,
    pub duration: Histogram,
    pub request_bytes: Counter,
    pub response_bytes: Counter,
}

#[derive(Debug)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram, Buckets>,
    request_bytes: Family<RequestLabels, Counter>,
    response_bytes: Family<RequestLabels, Counter>,
    /// Every label set made, for the sweep.
    made: Mutex<HashSet<RequestLabels>>,
}

/// The metric names of the request families (per pod: the textfile).
pub const REQUEST_FAMILIES: &[&str] = &[
    "outrigger_requests",
    "outrigger_request_duration_seconds",
    "outrigger_request_bytes",
    "outrigger_response_bytes",
];

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(REQUEST_BUCKETS),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            made: Mutex::default(),
        }
    }
}

impl RequestMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("requests", "HTTP requests proxied, by route and response code", self.requests.clone());
        r.register(
            "request_duration_seconds",
            "HTTP request duration, from the request's arrival to the response's last byte",
            self.duration.clone(),
        );
        r.register("request_bytes", "HTTP request body bytes", self.request_bytes.clone());
        r.register("response_bytes", "HTTP response body bytes", self.response_bytes.clone());
    }

    /// The handles of one label set (the registry lookup a connection's
    /// cache saves its later requests).
    pub fn series(&self, labels: &RequestLabels) -> Arc<RequestSeries> {
        self.made.lock().unwrap_or_else(|e| e.into_inner()).insert(labels.clone());
        Arc::new(RequestSeries {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        })
    }

    /// Drops the series of pods no longer on this node, and of peers no
    /// longer in the mesh.
    pub fn sweep(&self, pods: &super::LivePods) -> usize {
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        let stale: Vec<RequestLabels> = made
            .iter()
            .filter(|l| {
                let source = (&*l.source_workload_namespace.0, &*l.source_pod.0);
                let destination = (&*l.destination_workload_namespace.0, &*l.destination_pod.0);
                let (local, peer) = if l.reporter == "inbound" { (destination, source) } else { (source, destination) };
                !pods.keep(local, peer)
            })
            .cloned()
            .collect();
        for l in &stale {
            made.remove(l);
            self.requests.remove(l);
            self.duration.remove(l);
            self.request_bytes.remove(l);
            self.response_bytes.remove(l);
        }
        stale.len()
    }
}

/// A connection's cache of request series, by a key the connection makes
/// cheaply (route label pointer, endpoint, status, gRPC status).
pub type SeriesCache<K> = Mutex<HashMap<K, Arc<RequestSeries>>>;
