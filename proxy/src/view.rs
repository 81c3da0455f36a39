//! The mesh state compiled for the data path: what a connection looks up
//! once, at accept — service VIPs, meshed pods by address, authorization.
//! Rebuilt on every applied reload and swapped in whole.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::{
    balance::BalanceSettings,
    identity::Identity,
    mesh::{MeshState, PodKey, PodSpec},
    metrics::ConnLabels,
    node::PodContext,
    policy::Authorizer,
    services::ServiceTable,
};

/// A meshed pod, on this node or another.
#[derive(Debug)]
pub struct Workload {
    pub key: PodKey,
    pub spec: PodSpec,
    pub identity: Identity,
}

impl Workload {
    pub fn is_local(&self) -> bool {
        self.spec.is_local()
    }
}

#[derive(Debug, Default)]
pub struct MeshView {
    pub services: ServiceTable,
    pub workloads: HashMap<IpAddr, Arc<Workload>>,
    pub authz: Authorizer,
}

impl MeshView {
    pub fn build(state: &MeshState, previous: &MeshView, balance: &BalanceSettings, trust_domain: &str) -> Self {
        let mut workloads = HashMap::new();
        for (key, spec) in &state.pods {
            let workload = Arc::new(Workload {
                key: key.clone(),
                spec: spec.clone(),
                identity: Identity::new(trust_domain, &spec.namespace, &spec.service_account),
            });
            for ip in &spec.ips {
                workloads.insert(*ip, workload.clone());
            }
        }
        Self {
            services: ServiceTable::build(state, &previous.services, balance),
            workloads,
            authz: Authorizer::new(state.authorization.clone()),
        }
    }

    /// The meshed pod owning `ip`, if any (IPv4-mapped addresses as IPv4).
    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.workloads.get(&ip)
    }
}

impl MeshView {
    /// Labels of a connection leaving `pod` for `dest` (what it dialled),
    /// served by `upstream` (the endpoint, for a service).
    pub fn outbound_labels(
        &self,
        pod: &PodContext,
        dest: SocketAddr,
        service: Option<&crate::mesh::ServiceKey>,
        upstream: SocketAddr,
        security: &'static str,
    ) -> ConnLabels {
        let target = self.workload(upstream.ip());
        ConnLabels {
            reporter: "outbound",
            source_pod: pod.key.name.clone(),
            source_workload_namespace: pod.key.namespace.clone(),
            source_principal: pod.identity.to_string(),
            destination_service: service.map(crate::metrics::service_label).unwrap_or_else(|| dest.to_string()),
            destination_pod: target.map(|w| w.key.name.clone()).unwrap_or_default(),
            destination_workload_namespace: target.map(|w| w.key.namespace.clone()).unwrap_or_default(),
            destination_principal: target.map(|w| w.identity.to_string()).unwrap_or_default(),
            security,
        }
    }

    /// Labels of a tunnel stream arriving at `pod` from `peer` for `authority`.
    pub fn inbound_labels(
        &self,
        pod: &PodContext,
        peer: IpAddr,
        peer_id: &Identity,
        authority: SocketAddr,
    ) -> ConnLabels {
        let source = self.workload(peer);
        ConnLabels {
            reporter: "inbound",
            source_pod: source.map(|w| w.key.name.clone()).unwrap_or_default(),
            source_workload_namespace: peer_id.namespace.clone(),
            source_principal: peer_id.to_string(),
            destination_service: self
                .services
                .service_of_endpoint(authority)
                .map(crate::metrics::service_label)
                .unwrap_or_else(|| authority.to_string()),
            destination_pod: pod.key.name.clone(),
            destination_workload_namespace: pod.key.namespace.clone(),
            destination_principal: pod.identity.to_string(),
            security: "mutual_tls",
        }
    }

    /// The meshed pod at `addr` when a connection there goes through a
    /// tunnel: a pod elsewhere, or any meshed pod when strict.
    pub fn tunnel_peer(&self, addr: SocketAddr, strict: bool) -> Option<&Arc<Workload>> {
        self.workload(addr.ip()).filter(|w| !w.is_local() || strict)
    }

    /// How a connection to `addr` travels.
    pub fn security_to(&self, addr: SocketAddr, strict: bool) -> &'static str {
        if self.tunnel_peer(addr, strict).is_some() {
            "mutual_tls"
        } else {
            "plaintext"
        }
    }
}
