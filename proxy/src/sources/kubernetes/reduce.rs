//! Kubernetes objects → the model. Pure functions, tested on fixtures
//! written as the API server sends them (`tests.rs`).
//!
//! What is kept of a pod is a [`PodRecord`]: a few strings and addresses,
//! never the object itself (a full Pod is tens of kilobytes; thousands of
//! them are hundreds of megabytes).

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service as KubeService},
        discovery::v1::EndpointSlice as KubeSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::model::{
    AppProtocol, Endpoint, EndpointPort, EndpointSlice, ObjectKey, PodKey, Service, ServicePort, TargetPort,
};

/// The enrolment label: `enabled` on a namespace meshes its pods;
/// `disabled` on a pod opts it out.
pub const MESH_LABEL: &str = "outrigger.dev/mesh";

/// The label naming an EndpointSlice's service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Whether a namespace meshes its pods.
pub fn namespace_enrolled(ns: &Namespace) -> bool {
    ns.metadata.labels.as_ref().and_then(|l| l.get(MESH_LABEL)).is_some_and(|v| v == "enabled")
}

/// What the source keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    pub uid: Arc<str>,
    pub key: PodKey,
    pub service_account: Arc<str>,
    pub node: Option<Arc<str>>,
    pub ips: Vec<IpAddr>,
    /// For policy selectors; kept for pods of this node only.
    pub labels: BTreeMap<String, String>,
    pub host_network: bool,
    /// Labelled `outrigger.dev/mesh=disabled`.
    pub opted_out: bool,
    /// Phase `Succeeded` or `Failed`: its containers will not run again.
    pub finished: bool,
}

impl PodRecord {
    /// Why this pod is not meshed, or `None` when it is (given whether its
    /// namespace is enrolled).
    pub fn not_meshed(&self, namespace_enrolled: bool) -> Option<&'static str> {
        if !namespace_enrolled {
            Some("namespace not labelled outrigger.dev/mesh=enabled")
        } else if self.host_network {
            Some("hostNetwork pod")
        } else if self.opted_out {
            Some("labelled outrigger.dev/mesh=disabled")
        } else if self.finished {
            Some("finished")
        } else if self.ips.is_empty() {
            Some("no IP yet")
        } else {
            None
        }
    }
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Result<ObjectKey, String> {
    let name = meta.name.as_deref().filter(|n| !n.is_empty()).ok_or("no metadata.name")?;
    let namespace = meta.namespace.as_deref().filter(|n| !n.is_empty()).ok_or("no metadata.namespace")?;
    Ok(ObjectKey::new(namespace, name))
}

fn parse_ip(what: &str, s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| format!("{what} {s:?} is not an IP address"))
}

/// A Pod → what the source keeps of it.
pub fn pod(pod: &Pod) -> Result<PodRecord, String> {
    let key = name_of(&pod.metadata)?;
    let uid = pod.metadata.uid.as_deref().filter(|u| !u.is_empty()).ok_or("no metadata.uid")?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut ips = Vec::new();
    // podIPs lists every family (dual-stack); podIP is its first entry, and
    // the only one servers older than 1.16 send.
    let listed = status.and_then(|s| s.pod_ips.as_ref()).map(|l| l.iter().map(|p| p.ip.as_str()).collect::<Vec<_>>());
    let single = status.and_then(|s| s.pod_ip.as_deref()).filter(|s| !s.is_empty());
    for s in listed.unwrap_or_else(|| single.into_iter().collect()) {
        let ip = parse_ip("status.podIPs", s)?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
    Ok(PodRecord {
        uid: uid.into(),
        service_account: spec
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .into(),
        node: spec.and_then(|s| s.node_name.as_deref()).filter(|s| !s.is_empty()).map(Into::into),
        ips,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        opted_out: labels.get(MESH_LABEL).is_some_and(|v| v == "disabled"),
        finished: matches!(phase, "Succeeded" | "Failed"),
        labels,
        key,
    })
}

fn tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p.eq_ignore_ascii_case("TCP"))
}

fn port_number(what: &str, n: i32) -> Result<u16, String> {
    u16::try_from(n).ok().filter(|p| *p != 0).ok_or_else(|| format!("{what} {n} is not a port"))
}

/// A Service → the model; `None` when it has nothing for a TCP proxy (an
/// `ExternalName` service, or only UDP/SCTP ports).
pub fn service(svc: &KubeService, cluster_domain: &str) -> Result<Option<Service>, String> {
    let key = name_of(&svc.metadata)?;
    let Some(spec) = svc.spec.as_ref() else { return Ok(None) };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let listed = spec.cluster_ips.clone().unwrap_or_else(|| spec.cluster_ip.clone().into_iter().collect());
    let mut vips = Vec::new();
    // "None" marks a headless service: no VIP, connections to the pods'
    // own addresses pass through as they are.
    for s in listed.iter().filter(|s| !s.is_empty() && *s != "None") {
        let ip = parse_ip("spec.clusterIPs", s)?;
        if !vips.contains(&ip) {
            vips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten().filter(|p| tcp(p.protocol.as_deref())) {
        let port = port_number("spec.ports[].port", p.port)?;
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number("spec.ports[].targetPort", *n)?),
            // A numeric string is a number to kube-proxy too.
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(port_number("spec.ports[].targetPort", n)?),
                Err(_) => TargetPort::Name(s.as_str().into()),
            },
        };
        ports.push(ServicePort {
            name: p.name.as_deref().filter(|n| !n.is_empty()).map(Into::into),
            port,
            app_protocol: p.app_protocol.as_deref().map(AppProtocol::parse),
            target_port,
        });
    }
    if ports.is_empty() {
        return Ok(None);
    }
    let hostname: Arc<str> = format!("{}.{}.svc.{cluster_domain}", key.name, key.namespace).into();
    Ok(Some(Service {
        key,
        vips,
        hostnames: vec![hostname],
        ports,
        circuit_breaker: Default::default(),
        inbound_rate_limit: None,
    }))
}

/// An EndpointSlice → the model; `None` when it serves no service or has
/// no addresses the proxy can use (`FQDN` slices, UDP-only ports).
pub fn endpoint_slice(slice: &KubeSlice) -> Result<Option<EndpointSlice>, String> {
    let key = name_of(&slice.metadata)?;
    let Some(service) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        return Ok(None);
    };
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Ok(None);
    }
    let mut ports = Vec::new();
    if let Some(listed) = &slice.ports {
        for p in listed.iter().filter(|p| tcp(p.protocol.as_deref())) {
            // A port without a number means "all ports" — not a thing a
            // service with ports has.
            let Some(n) = p.port else { continue };
            ports.push(EndpointPort {
                name: p.name.as_deref().filter(|n| !n.is_empty()).map(Into::into),
                port: port_number("ports[].port", n)?,
            });
        }
        if ports.is_empty() && !listed.is_empty() {
            return Ok(None);
        }
    }
    let mut endpoints = Vec::new();
    for ep in &slice.endpoints {
        let conditions = ep.conditions.as_ref();
        // An unset condition means "ready" and "not terminating"
        // (discovery.k8s.io/v1); a terminating endpoint takes no new
        // connections even while it still serves.
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        let pod = ep.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| {
            let name = r.name.as_deref()?;
            Some(PodKey::new(r.namespace.as_deref().unwrap_or(&key.namespace), name))
        });
        for address in &ep.addresses {
            endpoints.push(Endpoint {
                address: parse_ip("endpoints[].addresses", address)?,
                pod: pod.clone(),
                ready,
                terminating,
                weight: 1,
            });
        }
    }
    Ok(Some(EndpointSlice { service: service.as_str().into(), key, ports, endpoints }))
}
