//! The mesh file's objects as model objects.
//!
//! A service's endpoints become endpoint slices the way Kubernetes' slice
//! controller makes them: each endpoint's target ports are resolved (a
//! named `targetPort` through the pod's named ports), and endpoints that
//! resolve alike share a slice.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use super::format::{ActionSpec, MeshFile, PodSpec, PortRef, ServiceSpec};
use crate::model::{
    parse_ip_block, Action, AppProtocol, AuthorizationPolicy, Endpoint, EndpointPort, EndpointSlice, NetnsRef, Object,
    ObjectKey, Rule, Selector, Service, ServicePort, TargetPort, Workload,
};

/// Every object of the file, or the first problem that spans objects
/// (an endpoint naming an unknown pod, a name listed twice, ...).
pub fn objects(file: MeshFile) -> Result<Vec<Object>, String> {
    let mut out = Vec::new();
    let mut pods: BTreeMap<ObjectKey, PodSpec> = BTreeMap::new();
    for pod in &file.pods {
        let key = ObjectKey::new(&pod.namespace, &pod.name);
        if pods.insert(key.clone(), pod.clone()).is_some() {
            return Err(format!("pod {key} is listed twice"));
        }
        out.push(Object::Workload(workload(pod)));
    }
    let mut services = HashSet::new();
    for (i, svc) in file.services.iter().enumerate() {
        let key = ObjectKey::new(&svc.namespace, &svc.name);
        if !services.insert(key.clone()) {
            return Err(format!("service {key} is listed twice"));
        }
        if svc.vips.is_empty() {
            return Err(format!("service {key} (services[{i}]) has no vips: list at least one virtual IP"));
        }
        let (service, slices) = service(svc, &pods)?;
        out.push(Object::Service(service));
        out.extend(slices.into_iter().map(Object::Endpoints));
    }
    let mut policies = HashSet::new();
    for p in &file.authorization {
        let key = ObjectKey::new(&p.namespace, &p.name);
        if !policies.insert(key.clone()) {
            return Err(format!("policy {key} is listed twice"));
        }
        let blocks = |list: &[String], j: usize| -> Result<Vec<ipnet::IpNet>, String> {
            list.iter().map(|b| parse_ip_block(b).map_err(|e| format!("policy {key} rules[{j}]: {e}"))).collect()
        };
        // In the file, a policy without rules matches every connection (a
        // deny-all or allow-all); the model follows Istio (no rules matches
        // nothing), so that is one rule matching everything.
        let mut rules = Vec::with_capacity(p.rules.len().max(1));
        if p.rules.is_empty() {
            rules.push(Rule::default());
        }
        for (j, r) in p.rules.iter().enumerate() {
            rules.push(Rule {
                principals: r.principals.clone(),
                not_principals: r.not_principals.clone(),
                namespaces: r.namespaces.clone(),
                not_namespaces: r.not_namespaces.clone(),
                ip_blocks: blocks(&r.ip_blocks, j)?,
                not_ip_blocks: blocks(&r.not_ip_blocks, j)?,
                ports: r.ports.clone(),
                not_ports: r.not_ports.clone(),
            });
        }
        out.push(Object::Policy(AuthorizationPolicy {
            key,
            selector: p.selector.as_ref().map(|s| Selector {
                pods: s.pods.clone(),
                service_accounts: s.service_accounts.clone(),
                match_labels: s.match_labels.clone(),
            }),
            action: match p.action {
                ActionSpec::Allow => Action::Allow,
                ActionSpec::Deny => Action::Deny,
            },
            rules,
        }));
    }
    let mut routes = HashSet::new();
    for (i, r) in file.routes.iter().enumerate() {
        let route = super::routes::translate(r, i as u64)?;
        if !routes.insert(route.key.clone()) {
            return Err(format!("route {} is listed twice", route.key));
        }
        out.push(Object::Route(route));
    }
    Ok(out)
}

fn workload(pod: &PodSpec) -> Workload {
    Workload {
        // The file has no uids: a pod is the same pod as long as it keeps
        // its name (and, below the model, its netns).
        uid: format!("file:{}/{}", pod.namespace, pod.name).into(),
        key: ObjectKey::new(&pod.namespace, &pod.name),
        service_account: pod.service_account.as_str().into(),
        node: pod.node.as_deref().map(Into::into),
        ips: pod.ips.clone(),
        labels: pod.labels.clone(),
        netns: pod.netns.clone().map(NetnsRef::Path),
    }
}

fn service(svc: &ServiceSpec, pods: &BTreeMap<ObjectKey, PodSpec>) -> Result<(Service, Vec<EndpointSlice>), String> {
    let key = ObjectKey::new(&svc.namespace, &svc.name);
    // Kubernetes requires names on the ports of a multi-port service (slices
    // resolve target ports by name); the file does not, so an unnamed port
    // of such a service is named by its number.
    let several = svc.ports.len() > 1;
    let ports: Vec<ServicePort> = svc
        .ports
        .iter()
        .map(|p| ServicePort {
            name: match &p.name {
                Some(name) => Some(name.as_str().into()),
                None if several => Some(p.port.to_string().into()),
                None => None,
            },
            port: p.port,
            app_protocol: p.protocol.as_deref().map(AppProtocol::parse),
            target_port: match &p.target_port {
                None => TargetPort::Number(p.port),
                Some(PortRef::Number(n)) => TargetPort::Number(*n),
                Some(PortRef::Name(n)) => TargetPort::Name(n.as_str().into()),
            },
        })
        .collect();
    // Endpoints grouped by their resolved ports, in first-seen order.
    let mut groups: Vec<(Vec<EndpointPort>, Vec<Endpoint>)> = Vec::new();
    let mut seen = HashSet::new();
    for (j, ep) in svc.endpoints.iter().enumerate() {
        let what = format!("service {key} endpoints[{j}]");
        let (addresses, pod) = match (&ep.pod, ep.address) {
            (Some(name), None) => {
                let ns = ep.namespace.as_deref().unwrap_or(&svc.namespace);
                let pod_key = ObjectKey::new(ns, name);
                let spec = pods.get(&pod_key).ok_or_else(|| format!("{what}: no pod {pod_key} in this file"))?;
                if spec.ips.is_empty() {
                    return Err(format!("{what}: pod {pod_key} has no ips"));
                }
                (spec.ips.clone(), Some((pod_key, spec)))
            }
            (None, Some(address)) => (vec![address], None),
            _ => return Err(format!("{what}: give exactly one of `pod` or `address`")),
        };
        if !seen.insert(format!("{addresses:?}")) {
            return Err(format!("{what} repeats an endpoint"));
        }
        let mut resolved = Vec::with_capacity(ports.len());
        for port in &ports {
            let number = match &port.target_port {
                TargetPort::Number(n) => *n,
                TargetPort::Name(name) => match &pod {
                    Some((pod_key, spec)) => {
                        spec.ports.iter().find(|p| *p.name == **name).map(|p| p.port).ok_or_else(|| {
                            format!("{what}: pod {pod_key} has no port named {name} (targetPort of port {})", port.port)
                        })?
                    }
                    None => {
                        let problem = "an address endpoint cannot resolve a named targetPort";
                        return Err(format!("{what}: {problem} ({name}): use a pod endpoint or a number"));
                    }
                },
            };
            resolved.push(EndpointPort { name: port.name.clone(), port: number });
        }
        let pod_key = pod.map(|(k, _)| k);
        let endpoints = addresses.into_iter().map(|address| Endpoint {
            address,
            pod: pod_key.clone(),
            ready: true,
            terminating: false,
            weight: ep.weight,
        });
        let index = match groups.iter().position(|(p, _)| *p == resolved) {
            Some(i) => i,
            None => {
                groups.push((resolved, Vec::new()));
                groups.len() - 1
            }
        };
        groups[index].1.extend(endpoints);
    }
    let slices = groups
        .into_iter()
        .enumerate()
        .map(|(i, (ports, endpoints))| EndpointSlice {
            key: ObjectKey::new(&svc.namespace, &slice_name(&svc.name, i)),
            service: svc.name.as_str().into(),
            ports,
            endpoints,
        })
        .collect();
    let service = Service {
        key,
        vips: svc.vips.clone(),
        hostnames: svc.hostnames.iter().map(|h| Arc::from(h.as_str())).collect(),
        ports,
        circuit_breaker: svc
            .circuit_breaker
            .as_ref()
            .map(|c| crate::model::CircuitBreaker {
                max_connections: c.max_connections,
                max_pending_requests: c.max_pending_requests,
                max_requests: c.max_requests,
                max_retries: c.max_retries,
            })
            .unwrap_or_default(),
        inbound_rate_limit: svc.inbound_rate_limit.as_ref().map(|l| crate::model::RateLimit {
            max_tokens: l.max_tokens,
            tokens_per_fill: l.tokens_per_fill,
            fill_interval: l.fill_interval,
            per_source_pod: false,
        }),
    };
    Ok((service, slices))
}

fn slice_name(service: &str, i: usize) -> String {
    if i == 0 {
        format!("{service}-file")
    } else {
        format!("{service}-file-{}", i + 1)
    }
}
