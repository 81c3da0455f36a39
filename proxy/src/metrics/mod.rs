//! Metrics: one prometheus-client registry, served by the admin server.
//!
//! Label handles are resolved once per connection (at accept) and kept in
//! the connection's task; nothing here is touched per read or write.
#![forbid(unsafe_code)]

mod kernel;

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

pub use kernel::KernelCounters;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PodLabels {
    /// "outbound": the connection was captured leaving a local pod.
    pub reporter: &'static str,
    pub source_pod: String,
    pub source_namespace: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FailureLabels {
    pub reporter: &'static str,
    pub source_pod: String,
    pub source_namespace: String,
    pub reason: &'static str,
}

/// A service as a metric label: `name.namespace`, as Istio and Linkerd show it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_service: String,
}

impl ServiceLabels {
    pub fn of(key: &crate::mesh::ServiceKey) -> Self {
        Self { destination_service: format!("{}.{}", key.name, key.namespace) }
    }
}

/// Tunnels arriving at a pod of this node, by outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct InboundLabels {
    pub reporter: &'static str,
    pub destination_pod: String,
    pub destination_namespace: String,
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// The proxy's metric families.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_opened: Family<PodLabels, Counter>,
    pub connections_closed: Family<PodLabels, Counter>,
    pub connections_failed: Family<FailureLabels, Counter>,
    pub connections_open: Family<PodLabels, Gauge>,
    pub bytes_sent: Family<PodLabels, Counter>,
    pub bytes_received: Family<PodLabels, Counter>,
    pub orig_dst_misses: Counter,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub pods_meshed: Gauge,
    pub ejections: Family<ServiceLabels, Counter>,
    pub inbound_streams: Family<InboundLabels, Counter>,
}

/// Handles for one connection's metrics, resolved once at accept.
#[derive(Debug, Clone)]
pub struct ConnMetrics {
    pub opened: Counter,
    pub closed: Counter,
    pub open: Gauge,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
}

impl Metrics {
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("outrigger");
        r.register("connections_opened", "TCP connections accepted by the proxy", self.connections_opened.clone());
        r.register("connections_closed", "Proxied TCP connections that ended", self.connections_closed.clone());
        r.register(
            "connections_failed",
            "Connections the proxy could not forward, by reason",
            self.connections_failed.clone(),
        );
        r.register("connections_open", "Proxied TCP connections open now", self.connections_open.clone());
        r.register(
            "sent_bytes",
            "Bytes forwarded from the source pod towards the destination",
            self.bytes_sent.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes forwarded from the destination back to the source pod",
            self.bytes_received.clone(),
        );
        r.register(
            "orig_dst_lookup_misses",
            "Accepted connections whose original destination the kernel maps did not hold",
            self.orig_dst_misses.clone(),
        );
        r.register("config_reloads", "Mesh file loads, by result (applied, rejected)", self.config_reloads.clone());
        r.register("pods_meshed", "Pods whose connections are captured now", self.pods_meshed.clone());
        r.register(
            "inbound_tunnel_streams",
            "Tunnel streams (and refused TLS handshakes) arriving at pods of this node, by result",
            self.inbound_streams.clone(),
        );
        r.register(
            "endpoint_ejections",
            "Endpoints ejected from a service after consecutive connect failures",
            self.ejections.clone(),
        );
    }

    pub fn connection(&self, labels: &PodLabels) -> ConnMetrics {
        ConnMetrics {
            opened: self.connections_opened.get_or_create(labels).clone(),
            closed: self.connections_closed.get_or_create(labels).clone(),
            open: self.connections_open.get_or_create(labels).clone(),
            bytes_sent: self.bytes_sent.get_or_create(labels).clone(),
            bytes_received: self.bytes_received.get_or_create(labels).clone(),
        }
    }

    pub fn inbound(&self, pod: &crate::node::PodContext, result: &'static str) -> Counter {
        self.inbound_streams
            .get_or_create(&InboundLabels {
                reporter: "inbound",
                destination_pod: pod.key.name.clone(),
                destination_namespace: pod.key.namespace.clone(),
                result,
            })
            .clone()
    }

    pub fn failed(&self, labels: &PodLabels, reason: &'static str) {
        self.connections_failed
            .get_or_create(&FailureLabels {
                reporter: labels.reporter,
                source_pod: labels.source_pod.clone(),
                source_namespace: labels.source_namespace.clone(),
                reason,
            })
            .inc();
    }
}

/// Encodes the registry as OpenMetrics text.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}
