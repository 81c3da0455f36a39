//! Services: which virtual IP:port is served by which endpoints.
//!
//! The table is rebuilt from the mesh state on every applied reload and
//! swapped in atomically; a connection resolves its destination against the
//! table once, at accept. Endpoint health (latency estimate, ejection) is
//! carried over from the previous table for endpoints that stay.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;

use crate::{
    balance::{now_nanos, BalanceSettings, Balancer, Endpoint, Health, HealthStatus},
    mesh::{EndpointTarget, MeshState, ServiceKey},
};

/// One VIP:port of a service and the balancer over its endpoints.
#[derive(Debug)]
pub struct ServiceRoute {
    pub service: ServiceKey,
    /// Stable small number for kernel-side counters.
    pub id: u32,
    pub vip: SocketAddr,
    pub balancer: Balancer,
}

#[derive(Debug, Default)]
pub struct ServiceTable {
    routes: HashMap<SocketAddr, Arc<ServiceRoute>>,
    ids: BTreeMap<ServiceKey, u32>,
    /// Endpoint address → a service it serves (for labelling what arrives
    /// at a pod: the sender resolved the VIP, the receiver sees the pod).
    by_endpoint: HashMap<SocketAddr, ServiceKey>,
}

/// Health is kept per (service, service port, endpoint address).
type HealthKey = (ServiceKey, u16, SocketAddr);

impl ServiceTable {
    pub fn build(state: &MeshState, previous: &ServiceTable, settings: &BalanceSettings) -> Self {
        let mut health: HashMap<HealthKey, Arc<Health>> = HashMap::new();
        for route in previous.routes.values() {
            for ep in route.balancer.endpoints() {
                health.insert((route.service.clone(), route.vip.port(), ep.addr), ep.health.clone());
            }
        }
        // Ids stay with their service across reloads; new services take the
        // smallest free one, so ids stay below the kernel counter array size.
        let mut ids: BTreeMap<ServiceKey, u32> = previous
            .ids
            .iter()
            .filter(|(k, _)| state.services.contains_key(*k))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let mut used: std::collections::BTreeSet<u32> = ids.values().copied().collect();
        let mut routes = HashMap::new();
        let mut by_endpoint = HashMap::new();
        for (key, svc) in &state.services {
            let id = match ids.get(key) {
                Some(id) => *id,
                None => {
                    let id = (1..).find(|i| !used.contains(i)).unwrap_or(u32::MAX);
                    used.insert(id);
                    id
                }
            };
            ids.insert(key.clone(), id);
            for port in &svc.ports {
                for vip in &svc.vips {
                    let v6 = vip.is_ipv6();
                    let mut endpoints = Vec::with_capacity(svc.endpoints.len());
                    for spec in &svc.endpoints {
                        let target = spec.target(&svc.namespace);
                        let (ip, label) = match &target {
                            EndpointTarget::Pod(pod) => {
                                let Some(pod_spec) = state.pods.get(pod) else { continue };
                                // Same family as the VIP dialled when the pod has one.
                                let Some(ip) = pod_spec.ip_of_family(v6).or_else(|| pod_spec.ips.first().copied())
                                else {
                                    continue;
                                };
                                (ip, format!("pod {pod}"))
                            }
                            EndpointTarget::Address(ip) => (*ip, ip.to_string()),
                        };
                        let addr = SocketAddr::new(ip, port.target());
                        let health = health
                            .entry((key.clone(), port.port, addr))
                            .or_insert_with(|| Arc::new(Health::new(settings.ewma_default_rtt)))
                            .clone();
                        by_endpoint.entry(addr).or_insert_with(|| key.clone());
                        endpoints.push(Endpoint { addr, weight: spec.weight, label, health });
                    }
                    prefer_family(&mut endpoints, v6);
                    let vip_addr = SocketAddr::new(*vip, port.port);
                    let route = ServiceRoute {
                        service: key.clone(),
                        id,
                        vip: vip_addr,
                        balancer: Balancer::new(endpoints, settings.clone()),
                    };
                    routes.insert(vip_addr, Arc::new(route));
                }
            }
        }
        Self { routes, ids, by_endpoint }
    }

    /// A service an endpoint address belongs to.
    pub fn service_of_endpoint(&self, addr: SocketAddr) -> Option<&ServiceKey> {
        self.by_endpoint.get(&normalize(addr))
    }

    /// The service route for a destination, if it is a service's VIP:port.
    pub fn route(&self, dest: SocketAddr) -> Option<&Arc<ServiceRoute>> {
        self.routes.get(&normalize(dest))
    }

    /// VIP:ports with no endpoints at all: the kernel refuses these at
    /// connect time, as kube-proxy does for a Service without endpoints.
    pub fn refused(&self) -> Vec<(SocketAddr, u32)> {
        let mut out: Vec<_> =
            self.routes.values().filter(|r| r.balancer.endpoints().is_empty()).map(|r| (r.vip, r.id)).collect();
        out.sort();
        out
    }

    /// Service ids, for per-service kernel counters.
    pub fn ids(&self) -> &BTreeMap<ServiceKey, u32> {
        &self.ids
    }

    pub fn dump(&self) -> Vec<RouteStatus> {
        let now = now_nanos();
        let mut out: Vec<RouteStatus> = self
            .routes
            .values()
            .map(|r| RouteStatus {
                service: r.service.to_string(),
                vip: r.vip,
                algorithm: format!("{:?}", r.balancer.settings().algorithm),
                endpoints: r
                    .balancer
                    .endpoints()
                    .iter()
                    .map(|e| EndpointStatus {
                        address: e.addr,
                        target: e.label.clone(),
                        weight: e.weight,
                        health: e.health.status(now),
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| (&a.service, a.vip).cmp(&(&b.service, b.vip)));
        out
    }
}

/// Endpoints of the VIP's family first; others only if there are none
/// (a pod may be single-stack while the service is dual-stack).
fn prefer_family(endpoints: &mut Vec<Endpoint>, v6: bool) {
    if endpoints.iter().any(|e| e.addr.is_ipv6() == v6) {
        endpoints.retain(|e| e.addr.is_ipv6() == v6);
    }
}

/// IPv4-mapped IPv6 destinations are IPv4 ones.
fn normalize(dest: SocketAddr) -> SocketAddr {
    match dest.ip() {
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), dest.port()),
            None => dest,
        },
        IpAddr::V4(_) => dest,
    }
}

#[derive(Debug, Serialize)]
pub struct RouteStatus {
    pub service: String,
    pub vip: SocketAddr,
    pub algorithm: String,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Debug, Serialize)]
pub struct EndpointStatus {
    pub address: SocketAddr,
    pub target: String,
    pub weight: u32,
    #[serde(flatten)]
    pub health: HealthStatus,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "pods:
  - {name: web-0, netns: /n/w0, ips: [10.0.0.5, 'fd00::5']}
  - {name: web-1, netns: /n/w1, ips: [10.0.0.6]}
services:
  - name: web
    vips: [10.96.0.10, 'fd00:96::10']
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [{pod: web-0}, {pod: web-1, weight: 3}]
  - name: empty
    vips: [10.96.0.11]
    ports: [{port: 80}]
";

    fn table() -> ServiceTable {
        let state = crate::mesh::parse_for_test(MESH).expect("valid");
        ServiceTable::build(&state, &ServiceTable::default(), &BalanceSettings::default())
    }

    #[test]
    fn resolves_vips_to_endpoints_of_the_same_family() {
        let t = table();
        let v4 = t.route("10.96.0.10:80".parse().expect("addr")).expect("v4 route");
        let addrs: Vec<String> = v4.balancer.endpoints().iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.5:8080", "10.0.0.6:8080"]);
        let v6 = t.route("[fd00:96::10]:80".parse().expect("addr")).expect("v6 route");
        let addrs: Vec<String> = v6.balancer.endpoints().iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["[fd00::5]:8080"], "web-1 has no IPv6 address");
        assert!(t.route("10.96.0.10:81".parse().expect("addr")).is_none(), "unknown port");
        assert!(t.route("[::ffff:10.96.0.10]:80".parse().expect("addr")).is_some(), "mapped VIP");
    }

    #[test]
    fn services_without_endpoints_are_refused_and_health_carries_over() {
        let t = table();
        assert_eq!(t.refused().len(), 1);
        let web = t.route("10.96.0.10:80".parse().expect("addr")).expect("route");
        web.balancer.observe(0, std::time::Duration::from_millis(70));
        let state = crate::mesh::parse_for_test(MESH).expect("valid");
        let rebuilt = ServiceTable::build(&state, &t, &BalanceSettings::default());
        let web2 = rebuilt.route("10.96.0.10:80".parse().expect("addr")).expect("route");
        assert!(Arc::ptr_eq(&web.balancer.endpoints()[0].health, &web2.balancer.endpoints()[0].health));
        assert_eq!(rebuilt.ids(), t.ids(), "service ids are stable");
    }
}
