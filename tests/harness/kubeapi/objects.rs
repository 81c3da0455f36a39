//! Constructors of the objects tests feed the double, built from
//! `k8s-openapi` types so that their JSON has the real shape. Every field is
//! public: adjust what a test needs (`hostNetwork`, `deletionTimestamp`,
//! phase, a selector) on the returned value before `apply`.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{
            Container, Namespace, NamespaceSpec, NamespaceStatus, ObjectReference, Pod, PodCondition, PodIP, PodSpec,
            PodStatus, Service, ServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde_json::{json, Value};

fn labels_of(labels: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    (!labels.is_empty()).then(|| labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

fn meta(ns: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: ns.map(str::to_string),
        labels: labels_of(labels),
        ..ObjectMeta::default()
    }
}

/// A running pod on `node` with `ips` (first is `status.podIP`; none: the
/// pod is `Pending` without an IP yet), one container `app`, and the given
/// service account. `uid`: `None` lets the double generate one on create.
pub fn pod(
    ns: &str,
    name: &str,
    node: &str,
    ips: &[&str],
    labels: &[(&str, &str)],
    service_account: &str,
    uid: Option<&str>,
) -> Pod {
    let running = !ips.is_empty();
    let mut metadata = meta(Some(ns), name, labels);
    metadata.uid = uid.map(str::to_string);
    Pod {
        metadata,
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            service_account_name: Some(service_account.to_string()),
            containers: vec![Container {
                name: "app".to_string(),
                image: Some("registry.invalid/app:1".to_string()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some(if running { "Running" } else { "Pending" }.to_string()),
            pod_ip: ips.first().map(|ip| ip.to_string()),
            pod_ips: running.then(|| ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".to_string(),
                status: if running { "True" } else { "False" }.to_string(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

/// An active namespace.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: meta(None, name, labels),
        spec: Some(NamespaceSpec { finalizers: Some(vec!["kubernetes".to_string()]) }),
        status: Some(NamespaceStatus { phase: Some("Active".to_string()), ..NamespaceStatus::default() }),
    }
}

/// One port of a [`service`].
#[derive(Clone, Debug)]
pub struct ServicePortDef {
    pub name: String,
    pub port: i32,
    /// A number, or the name of a container port (resolved per
    /// EndpointSlice).
    pub target_port: IntOrString,
    pub app_protocol: Option<String>,
}

impl ServicePortDef {
    /// A port whose target is a number.
    pub fn new(name: &str, port: i32, target_port: i32) -> Self {
        Self { name: name.to_string(), port, target_port: IntOrString::Int(target_port), app_protocol: None }
    }

    /// A port whose target is a named container port.
    pub fn named(name: &str, port: i32, target_port: &str) -> Self {
        Self { target_port: IntOrString::String(target_port.to_string()), ..Self::new(name, port, 0) }
    }

    pub fn app_protocol(mut self, protocol: &str) -> Self {
        self.app_protocol = Some(protocol.to_string());
        self
    }
}

/// A `ClusterIP` service with `cluster_ips` (one per family, dual-stack:
/// both); none makes it headless (`clusterIP: None`).
pub fn service(ns: &str, name: &str, cluster_ips: &[&str], ports: &[ServicePortDef]) -> Service {
    let headless = cluster_ips.is_empty();
    let families =
        cluster_ips.iter().map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" }.to_string()).collect::<Vec<_>>();
    Service {
        metadata: meta(Some(ns), name, &[]),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            cluster_ip: Some(cluster_ips.first().copied().unwrap_or("None").to_string()),
            cluster_ips: Some(if headless {
                vec!["None".to_string()]
            } else {
                cluster_ips.iter().map(|ip| ip.to_string()).collect()
            }),
            ip_families: (!headless).then_some(families),
            ip_family_policy: Some(if cluster_ips.len() > 1 { "RequireDualStack" } else { "SingleStack" }.to_string()),
            ports: Some(
                ports
                    .iter()
                    .map(|p| ServicePort {
                        name: Some(p.name.clone()),
                        port: p.port,
                        protocol: Some("TCP".to_string()),
                        target_port: Some(p.target_port.clone()),
                        app_protocol: p.app_protocol.clone(),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// One endpoint of an [`endpoint_slice`].
#[derive(Clone, Debug)]
pub struct EndpointDef {
    pub address: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `targetRef` to this pod (same namespace as the slice).
    pub pod: Option<String>,
    pub node: Option<String>,
}

impl EndpointDef {
    /// A ready, serving endpoint.
    pub fn ready(address: &str, pod: Option<&str>, node: Option<&str>) -> Self {
        Self {
            address: address.to_string(),
            ready: true,
            serving: true,
            terminating: false,
            pod: pod.map(str::to_string),
            node: node.map(str::to_string),
        }
    }

    /// Terminating but still serving (what Kubernetes reports during a
    /// pod's grace period): not ready.
    pub fn terminating(mut self) -> Self {
        self.ready = false;
        self.terminating = true;
        self
    }

    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self.serving = false;
        self
    }
}

/// A slice of `service` (label `kubernetes.io/service-name`), addressType
/// `IPv4`/`IPv6`/`FQDN`, ports `(name, port)` TCP.
pub fn endpoint_slice(
    ns: &str,
    name: &str,
    service: &str,
    address_type: &str,
    endpoints: &[EndpointDef],
    ports: &[(&str, i32)],
) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            Some(ns),
            name,
            &[
                ("kubernetes.io/service-name", service),
                ("endpointslice.kubernetes.io/managed-by", "endpointslice-controller.k8s.io"),
            ],
        ),
        address_type: address_type.to_string(),
        endpoints: endpoints
            .iter()
            .map(|e| Endpoint {
                addresses: vec![e.address.clone()],
                conditions: Some(EndpointConditions {
                    ready: Some(e.ready),
                    serving: Some(e.serving),
                    terminating: Some(e.terminating),
                }),
                node_name: e.node.clone(),
                target_ref: e.pod.as_ref().map(|pod| ObjectReference {
                    kind: Some("Pod".to_string()),
                    namespace: Some(ns.to_string()),
                    name: Some(pod.clone()),
                    ..ObjectReference::default()
                }),
                ..Endpoint::default()
            })
            .collect(),
        ports: Some(
            ports
                .iter()
                .map(|(name, port)| EndpointPort {
                    name: Some(name.to_string()),
                    port: Some(*port),
                    protocol: Some("TCP".to_string()),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
    }
}

/// Istio's `security.istio.io/v1` AuthorizationPolicy (a CRD: plain JSON)
/// with the given `spec`.
pub fn authorization_policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}
