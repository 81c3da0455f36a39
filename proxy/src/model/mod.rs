//! The mesh model: workloads, services, their endpoints and authorization
//! policies, as the data path needs them.
//!
//! It knows nothing of YAML, serde, clap or the Kubernetes API: sources
//! (`sources::file` today, the Kubernetes API next) translate their objects
//! into these types, and the `store` indexes them. Every object has a key
//! ([`ObjectRef`]) so that sources can upsert and delete one at a time.
//!
//! Names are `Arc<str>`: the same pod or service name appears in indices,
//! endpoints and routes many times over, and cloning it must cost a
//! reference count, not an allocation.
#![forbid(unsafe_code)]

mod policy;
mod route;
mod service;
pub mod validate;
mod workload;

use std::{fmt, sync::Arc};

pub use policy::{parse_ip_block, Action, AuthorizationPolicy, Rule, Selector};
pub use route::{
    BackendRef, Fault, Filter, HeaderModifier, HttpRoute, ParentRef, PathMatch, RateLimit, Retry, RouteMatch,
    RouteRule, Share, StringMatch, Timeouts, ValueMatch,
};
pub use service::{
    AppProtocol, CircuitBreaker, Endpoint, EndpointPort, EndpointSlice, Service, ServicePort, TargetPort,
};
pub use workload::{HeldNetns, NetnsRef, Workload};

/// `namespace/name` of a namespaced object.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Pods are keyed like any namespaced object.
pub type PodKey = ObjectKey;
pub type ServiceKey = ObjectKey;

/// Which object a change is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectRef {
    Workload(PodKey),
    Service(ServiceKey),
    /// An endpoint slice, keyed by its own name (a service may have several).
    Endpoints(ObjectKey),
    Policy(ObjectKey),
    Route(ObjectKey),
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Workload(k) => write!(f, "pod {k}"),
            Self::Service(k) => write!(f, "service {k}"),
            Self::Endpoints(k) => write!(f, "endpoint slice {k}"),
            Self::Policy(k) => write!(f, "authorization policy {k}"),
            Self::Route(k) => write!(f, "HTTP route {k}"),
        }
    }
}

/// One object of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Workload(Workload),
    Service(Service),
    Endpoints(EndpointSlice),
    Policy(AuthorizationPolicy),
    Route(HttpRoute),
}

impl Object {
    pub fn object_ref(&self) -> ObjectRef {
        match self {
            Self::Workload(w) => ObjectRef::Workload(w.key.clone()),
            Self::Service(s) => ObjectRef::Service(s.key.clone()),
            Self::Endpoints(e) => ObjectRef::Endpoints(e.key.clone()),
            Self::Policy(p) => ObjectRef::Policy(p.key.clone()),
            Self::Route(r) => ObjectRef::Route(r.key.clone()),
        }
    }
}

/// IPv4-mapped IPv6 addresses are IPv4 addresses: the kernel programs fold
/// them, and so does every lookup.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// [`canonical_ip`] for a socket address.
pub fn canonical(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}
