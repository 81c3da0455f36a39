//! The mesh state compiled for the data path: what a connection looks up
//! once, at accept — service VIPs, meshed pods by address, authorization.
//! Rebuilt on every applied reload and swapped in whole.
#![forbid(unsafe_code)]

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use crate::{
    balance::BalanceSettings,
    identity::Identity,
    mesh::{MeshState, PodKey, PodSpec},
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
