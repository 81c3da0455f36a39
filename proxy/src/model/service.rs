//! Services, their ports, and the endpoints that serve them.
//!
//! Shaped like Kubernetes Services and EndpointSlices: a service port's
//! target may be a number or a container port's name, resolved per slice;
//! endpoints carry readiness and belong to a pod when they are one.

use std::{net::IpAddr, sync::Arc};

use super::{ObjectKey, PodKey, ServiceKey};

/// What a service port speaks, when declared (`appProtocol`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppProtocol {
    Tcp,
    Http,
    Http2,
    Grpc,
    Other(Arc<str>),
}

impl AppProtocol {
    /// The Kubernetes / mesh-file spelling, case-insensitively.
    pub fn parse(s: &str) -> Self {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Self::Tcp,
            "http" | "http1" | "kubernetes.io/http" => Self::Http,
            "http2" | "h2c" | "kubernetes.io/h2c" => Self::Http2,
            "grpc" => Self::Grpc,
            _ => Self::Other(s.into()),
        }
    }
}

/// A service port's target on the endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port's name; each endpoint slice says what it resolves to.
    Name(Arc<str>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<Arc<str>>,
    /// The port clients dial on a VIP.
    pub port: u16,
    pub app_protocol: Option<AppProtocol>,
    pub target_port: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    /// Cluster IPs, IPv4 and/or IPv6. Empty: a headless service (connections
    /// to its pods' own addresses pass through).
    pub vips: Vec<IpAddr>,
    /// DNS names clients use for it (`name.namespace.svc.cluster.local`).
    pub hostnames: Vec<Arc<str>>,
    pub ports: Vec<ServicePort>,
    /// Circuit-breaker thresholds set for this service; unset ones take the
    /// flags' defaults.
    pub circuit_breaker: CircuitBreaker,
    /// A token bucket per endpoint pod, applied by the pod's own node to
    /// every request arriving for it (tunnel streams and plaintext).
    pub inbound_rate_limit: Option<super::RateLimit>,
}

/// Envoy's circuit-breaker thresholds for one service (as Istio's
/// DestinationRule `connectionPool` sets them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CircuitBreaker {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
}

/// A port of an endpoint slice: the resolved target of the service port of
/// the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPort {
    pub name: Option<Arc<str>>,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    /// The pod this endpoint is, when it is one.
    pub pod: Option<PodKey>,
    /// Takes new connections.
    pub ready: bool,
    /// Shutting down: no new connections even if still serving.
    pub terminating: bool,
    /// Relative share of new connections (1..=10000).
    pub weight: u32,
}

impl Endpoint {
    /// Whether new connections may go here.
    pub fn usable(&self) -> bool {
        self.ready && !self.terminating
    }
}

/// A set of endpoints of one service, with the ports they serve on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    /// The slice's own key (namespace: the service's).
    pub key: ObjectKey,
    /// The service's name, in the slice's namespace.
    pub service: Arc<str>,
    /// Resolved target ports by service port name. Empty: every numeric
    /// target port of the service applies as is.
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

impl EndpointSlice {
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey { namespace: self.key.namespace.clone(), name: self.service.clone() }
    }

    /// The port endpoints of this slice serve `port` on, if they do.
    pub fn target_of(&self, port: &ServicePort) -> Option<u16> {
        if self.ports.is_empty() {
            return match port.target_port {
                TargetPort::Number(n) => Some(n),
                TargetPort::Name(_) => None,
            };
        }
        self.ports.iter().find(|p| p.name == port.name).map(|p| p.port)
    }
}
