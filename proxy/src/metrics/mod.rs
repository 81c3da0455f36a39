//! Metrics: one prometheus-client registry, served by the admin server.
//!
//! Label handles are resolved once per connection and kept in the
//! connection's task; nothing here is touched per read or write.
#![forbid(unsafe_code)]

mod connection;
mod kernel;
mod labels;
mod process;
mod requests;
mod resilience;
pub mod textfile;

use std::{collections::HashSet, sync::Arc};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

pub use connection::{ConnLabels, ConnRecord, ConnectionMetrics, POD_FAMILIES};
pub use kernel::KernelCounters;
pub use labels::{EXTERNAL, UNKNOWN_SERVICE};
pub use process::ProcessMetrics;
pub use requests::{Label, RequestLabels, RequestMetrics, RequestSeries, SeriesCache, GRPC_STATUS, REQUEST_FAMILIES};
pub use resilience::ResilienceMetrics;

/// The pods metric series may name, as the sweep sees them. A series goes
/// with its pod of this node, and with the meshed peer pod it names: peers
/// come and go for as long as a pod lives (every rollout of a service it
/// calls, every client that calls it), and their series must not pile up.
#[derive(Debug, Default)]
pub struct LivePods {
    /// (namespace, name) of this node's pods.
    pub local: HashSet<(String, String)>,
    /// (namespace, name) of every meshed pod, this node's included.
    pub meshed: HashSet<(String, String)>,
}

impl LivePods {
    fn is_local(&self, (namespace, pod): (&str, &str)) -> bool {
        self.local.contains(&(namespace.to_string(), pod.to_string()))
    }

    /// Whether a peer label still names a pod of the mesh. An empty one
    /// (a peer outside the mesh) names none and never goes stale.
    pub(crate) fn peer_alive(&self, (namespace, pod): (&str, &str)) -> bool {
        pod.is_empty() || self.meshed.contains(&(namespace.to_string(), pod.to_string()))
    }

    /// Whether a series of `local`'s traffic with `peer` is still wanted.
    fn keep(&self, local: (&str, &str), peer: (&str, &str)) -> bool {
        self.is_local(local) && self.peer_alive(peer)
    }
}

/// A service as a metric label: `name.namespace`, as Istio and Linkerd show it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_service: String,
}

impl ServiceLabels {
    pub fn of(key: &crate::model::ServiceKey) -> Self {
        Self { destination_service: service_label(key) }
    }
}

/// `name.namespace`: how every metric names a service.
pub fn service_label(key: &crate::model::ServiceKey) -> String {
    format!("{}.{}", key.name, key.namespace)
}

/// Tunnels arriving at a pod of this node, by outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct InboundLabels {
    pub reporter: &'static str,
    pub destination_pod: String,
    pub destination_namespace: String,
    pub result: &'static str,
}

/// Connections or handshakes refused because a limit was reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LimitLabels {
    pub pod: String,
    pub namespace: String,
    /// pod_connections, pod_handshakes, node_handshakes.
    pub limit: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DetectionLabels {
    pub direction: &'static str,
    pub result: &'static str,
}

/// Which side of the proxy decided a connection's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A captured connection from a pod of this node.
    Outbound = 0,
    /// A tunnel stream or plaintext arrival for a pod of this node.
    Inbound = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Outbound, Direction::Inbound];

    pub fn label(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// The proxy's metric families.
#[derive(Debug)]
pub struct Metrics {
    pub conns: ConnectionMetrics,
    pub requests: RequestMetrics,
    pub resilience: ResilienceMetrics,
    /// Mirrored requests by result (sent, skipped_busy, skipped_body,
    /// failed), resolved once.
    pub mirrors: Family<ResultLabels, Counter>,
    pub orig_dst_misses: Counter,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub pods_meshed: Gauge,
    pub ejections: Family<ServiceLabels, Counter>,
    pub inbound_streams: Family<InboundLabels, Counter>,
    pub limit_refused: Family<LimitLabels, Counter>,
    /// `outrigger_protocol_detections_total{direction,result}`, one
    /// counter per direction and result resolved once (no label lookup per
    /// connection); indexed by [`Direction`], then like
    /// `outbound::detect::Outcome::ALL`.
    pub protocol_detections: Family<DetectionLabels, Counter>,
    pub detection_results: [Vec<Counter>; 2],
}

impl Metrics {
    /// `connection_metrics: false` turns off the per-connection families
    /// (for measuring what they cost).
    pub fn new(connection_metrics: bool, addresses_per_pod: usize) -> Self {
        Self {
            conns: ConnectionMetrics::new(connection_metrics, addresses_per_pod),
            requests: RequestMetrics::default(),
            resilience: ResilienceMetrics::default(),
            mirrors: Family::default(),
            orig_dst_misses: Counter::default(),
            config_reloads: Family::default(),
            pods_meshed: Gauge::default(),
            ejections: Family::default(),
            inbound_streams: Family::default(),
            limit_refused: Family::default(),
            protocol_detections: Family::default(),
            detection_results: Default::default(),
        }
    }

    /// Resolves the detection counters for `results` (their labels, in the
    /// order the data path indexes them).
    pub fn with_detection_results(mut self, results: &[&'static str]) -> Self {
        self.detection_results = Direction::ALL.map(|direction| {
            results
                .iter()
                .map(|r| {
                    let labels = DetectionLabels { direction: direction.label(), result: r };
                    self.protocol_detections.get_or_create(&labels).clone()
                })
                .collect()
        });
        self
    }

    /// Counts one detection outcome by its index.
    pub fn detected(&self, direction: Direction, index: usize) {
        if let Some(c) = self.detection_results[direction as usize].get(index) {
            c.inc();
        }
    }

    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("outrigger");
        self.conns.register(r);
        self.requests.register(r);
        self.resilience.register(r);
        r.register(
            "mirrored_requests",
            "Requests copied to a RequestMirror backend, by result (sent, failed, skipped_busy, skipped_body)",
            self.mirrors.clone(),
        );
        r.register(
            "orig_dst_lookup_misses",
            "Accepted connections whose original destination the kernel maps did not hold",
            self.orig_dst_misses.clone(),
        );
        r.register("config_reloads", "Mesh file loads, by result (applied, rejected)", self.config_reloads.clone());
        r.register("pods_meshed", "Pods whose connections are captured now", self.pods_meshed.clone());
        r.register(
            "protocol_detections",
            "Connections by the side that decided their protocol (direction: outbound for captured connections, inbound for tunnel streams and plaintext arrivals) and how (http1, h2, tls, opaque, server_first, timeout, closed, declared)",
            self.protocol_detections.clone(),
        );
        r.register(
            "inbound_tunnel_streams",
            "Tunnel streams (and refused TLS handshakes) arriving at pods of this node, by result",
            self.inbound_streams.clone(),
        );
        r.register(
            "limit_refused",
            "Connections and tunnel handshakes refused at once because a per-pod or per-node limit was reached",
            self.limit_refused.clone(),
        );
        r.register(
            "endpoint_ejections",
            "Endpoints ejected from a service after consecutive failures (connect failures, HTTP 5xx answers)",
            self.ejections.clone(),
        );
    }

    /// Counts a refusal by `limit` on behalf of `pod`.
    pub fn limit_refused(&self, pod: &crate::model::PodKey, limit: &'static str) {
        self.limit_refused
            .get_or_create(&LimitLabels { pod: pod.name.to_string(), namespace: pod.namespace.to_string(), limit })
            .inc();
    }

    /// The counter of tunnel streams arriving at `pod` with `result`.
    pub fn inbound(&self, pod: &crate::model::PodKey, result: &'static str) -> Counter {
        self.inbound_streams
            .get_or_create(&InboundLabels {
                reporter: "inbound",
                destination_pod: pod.name.to_string(),
                destination_namespace: pod.namespace.to_string(),
                result,
            })
            .clone()
    }
}

/// Encodes the registry as OpenMetrics text.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[cfg(test)]
mod sweep_tests;
