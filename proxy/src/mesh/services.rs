//! Services in the mesh file: virtual IPs, ports, and weighted endpoints.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use super::{check_name, pods::default_namespace, PodKey, PodSpec, ServiceKey};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Virtual IPs (cluster IPs), IPv4 and/or IPv6. Nothing owns them: a
    /// captured connect to one of them is served by an endpoint.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePortSpec {
    #[serde(default)]
    pub name: Option<String>,
    /// The port clients dial on the VIP.
    pub port: u16,
    /// The port the endpoints listen on (default: `port`).
    #[serde(default)]
    pub target_port: Option<u16>,
}

impl ServicePortSpec {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// One endpoint: a pod of this file (`pod`, with `namespace` defaulting to
/// the service's) or a plain `address`, with a relative `weight`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSpec {
    #[serde(default)]
    pub pod: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub address: Option<IpAddr>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// The largest weight accepted: enough range for any traffic split.
pub const MAX_WEIGHT: u32 = 10_000;

/// What an endpoint refers to, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointTarget {
    Pod(PodKey),
    Address(IpAddr),
}

impl EndpointSpec {
    /// Valid only after `validate` has checked exactly one of pod/address is set.
    pub fn target(&self, service_namespace: &str) -> EndpointTarget {
        match (&self.pod, self.address) {
            (Some(pod), _) => EndpointTarget::Pod(PodKey {
                namespace: self.namespace.clone().unwrap_or_else(|| service_namespace.to_string()),
                name: pod.clone(),
            }),
            (None, Some(addr)) => EndpointTarget::Address(addr),
            (None, None) => EndpointTarget::Address(IpAddr::from([0, 0, 0, 0])),
        }
    }
}

impl ServiceSpec {
    pub fn key(&self) -> ServiceKey {
        ServiceKey { namespace: self.namespace.clone(), name: self.name.clone() }
    }
}

fn bad_address(ip: &IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || ip.is_multicast()
}

pub(super) fn validate(
    services: Vec<ServiceSpec>,
    pods: &BTreeMap<PodKey, PodSpec>,
) -> Result<BTreeMap<ServiceKey, ServiceSpec>, String> {
    let pod_ips: HashMap<IpAddr, &PodKey> =
        pods.iter().flat_map(|(k, p)| p.ips.iter().map(move |ip| (*ip, k))).collect();
    let mut vip_owner: HashMap<IpAddr, ServiceKey> = HashMap::new();
    let mut out = BTreeMap::new();
    for (i, svc) in services.into_iter().enumerate() {
        check_name("service name", &svc.name).map_err(|p| format!("services[{i}]: {p}"))?;
        check_name("namespace", &svc.namespace).map_err(|p| format!("service {}: {p}", svc.name))?;
        let key = svc.key();
        if svc.vips.is_empty() {
            return Err(format!("service {key} has no vips: list at least one virtual IP"));
        }
        for vip in &svc.vips {
            if bad_address(vip) {
                return Err(format!("service {key}: {vip} cannot be a virtual IP"));
            }
            if let Some(pod) = pod_ips.get(vip) {
                return Err(format!("service {key}: virtual IP {vip} is pod {pod}'s address"));
            }
            if let Some(other) = vip_owner.insert(*vip, key.clone()) {
                if other != key {
                    return Err(format!("services {other} and {key} both claim virtual IP {vip}"));
                }
                return Err(format!("service {key} lists virtual IP {vip} twice"));
            }
        }
        if svc.ports.is_empty() {
            return Err(format!("service {key} has no ports"));
        }
        let mut seen_ports = HashSet::new();
        for port in &svc.ports {
            if port.port == 0 || port.target_port == Some(0) {
                return Err(format!("service {key}: port 0 is not a port"));
            }
            if !seen_ports.insert(port.port) {
                return Err(format!("service {key} lists port {} twice", port.port));
            }
        }
        let mut seen_endpoints = HashSet::new();
        for (j, ep) in svc.endpoints.iter().enumerate() {
            let what = format!("service {key} endpoints[{j}]");
            if ep.pod.is_some() == ep.address.is_some() {
                return Err(format!("{what}: give exactly one of `pod` or `address`"));
            }
            if ep.weight == 0 || ep.weight > MAX_WEIGHT {
                return Err(format!("{what}: weight {} is outside 1..={MAX_WEIGHT}", ep.weight));
            }
            let target = ep.target(&svc.namespace);
            match &target {
                EndpointTarget::Pod(pod) => {
                    let spec = pods.get(pod).ok_or_else(|| format!("{what}: no pod {pod} in this file"))?;
                    if spec.ips.is_empty() {
                        return Err(format!("{what}: pod {pod} has no ips"));
                    }
                }
                EndpointTarget::Address(ip) if bad_address(ip) => {
                    return Err(format!("{what}: {ip} cannot be an endpoint address"));
                }
                EndpointTarget::Address(_) => {}
            }
            if !seen_endpoints.insert(format!("{target:?}")) {
                return Err(format!("{what} repeats an endpoint"));
            }
        }
        if out.insert(key.clone(), svc).is_some() {
            return Err(format!("service {key} is listed twice"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::mesh::parse_for_test as parse;

    const PODS: &str = "pods:\n  - {name: web-0, namespace: shop, netns: /n/w0, ips: [10.0.0.5, 'fd00::5']}\n";

    fn with_services(services: &str) -> String {
        format!("{PODS}services:\n{services}")
    }

    #[test]
    fn parses_a_service_with_pod_and_address_endpoints() {
        let text = with_services(
            "  - name: web\n    namespace: shop\n    vips: [10.96.0.10, 'fd00:96::10']\n    ports: [{port: 80, targetPort: 8080}]\n    endpoints:\n      - pod: web-0\n      - {address: 10.0.0.9, weight: 2}\n",
        );
        let state = parse(&text).expect("valid");
        let svc = state.services.values().next().expect("one service");
        assert_eq!(svc.ports[0].target(), 8080);
        assert_eq!(svc.endpoints[1].weight, 2);
    }

    #[test]
    fn rejects_what_an_operator_would_get_wrong() {
        let cases = [
            ("  - {name: web, vips: [], ports: [{port: 80}]}\n", "no vips"),
            ("  - {name: web, vips: [10.96.0.1], ports: []}\n", "no ports"),
            ("  - {name: web, vips: [10.0.0.5], ports: [{port: 80}]}\n", "pod shop/web-0's address"),
            ("  - {name: web, vips: [10.96.0.1], ports: [{port: 80}], endpoints: [{pod: nope}]}\n", "no pod default/nope"),
            (
                "  - {name: web, vips: [10.96.0.1], ports: [{port: 80}], endpoints: [{pod: web-0, address: 10.0.0.1}]}\n",
                "exactly one",
            ),
            ("  - {name: web, vips: [10.96.0.1], ports: [{port: 80}], endpoints: [{address: 10.0.0.1, weight: 0}]}\n", "weight 0"),
            ("  - {name: a, vips: [10.96.0.1], ports: [{port: 80}]}\n  - {name: b, vips: [10.96.0.1], ports: [{port: 80}]}\n", "both claim"),
            ("  - {name: web, vips: [10.96.0.1], ports: [{port: 80}, {port: 80}]}\n", "port 80 twice"),
        ];
        for (services, expect) in cases {
            let err = parse(&with_services(services)).expect_err(expect).to_string();
            assert!(err.contains(expect), "{expect:?} not in {err:?}");
        }
    }
}
