//! Building a connection's label set, once per connection.
//!
//! Cardinality is bounded per pod: a destination is named by its service
//! (`name.namespace`) when it is one or belongs to one, by `unknown` when
//! it is a meshed pod outside any service (its pod labels say which), and
//! otherwise collapses to `external` — unless `--metrics-destination-addresses N`
//! keeps up to N addresses per source pod, after which new ones collapse
//! too. A pod dialling 20 000 closed ports therefore mints at most N + 1
//! series, not 20 000.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Mutex,
};

use super::{service_label, ConnLabels};
use crate::{
    identity::Identity,
    model::{PodKey, ServiceKey},
    pod::PodContext,
    store::WorkloadEntry,
};

/// `destination_service` of a destination outside the mesh and its services.
pub const EXTERNAL: &str = "external";
/// `destination_service` of a meshed pod no service selects (Istio's word).
pub const UNKNOWN_SERVICE: &str = "unknown";

/// Which destination addresses each pod may keep as labels.
#[derive(Debug, Default)]
pub struct AddressBudget {
    per_pod: usize,
    seen: Mutex<HashMap<PodKey, HashSet<SocketAddr>>>,
}

impl AddressBudget {
    pub fn new(per_pod: usize) -> Self {
        Self { per_pod, seen: Mutex::default() }
    }

    /// The address as a label if the pod still may have it, else `external`.
    fn label(&self, pod: &PodKey, dest: SocketAddr) -> String {
        if self.per_pod == 0 {
            return EXTERNAL.into();
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let set = seen.entry(pod.clone()).or_default();
        if set.contains(&dest) || set.len() < self.per_pod {
            set.insert(dest);
            return dest.to_string();
        }
        EXTERNAL.into()
    }

    /// Forgets the addresses of pods that left (with their series).
    pub fn forget(&self, keep: &HashSet<(String, String)>) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|k, _| keep.contains(&(k.namespace.to_string(), k.name.to_string())));
    }
}

impl super::ConnectionMetrics {
    /// `destination_service` for a connection to `dest`.
    fn destination(&self, pod: &PodKey, dest: SocketAddr, service: Option<&ServiceKey>, meshed: bool) -> String {
        match service {
            Some(key) => service_label(key),
            None if meshed => UNKNOWN_SERVICE.into(),
            None => self.addresses.label(pod, dest),
        }
    }

    /// Labels of a connection leaving `pod` for `dest` (what it dialled):
    /// `service` is the service dialled or the one `upstream` belongs to,
    /// `target` the meshed pod it reached.
    pub fn outbound_labels(
        &self,
        pod: &PodContext,
        dest: SocketAddr,
        service: Option<&ServiceKey>,
        target: Option<&WorkloadEntry>,
        security: &'static str,
    ) -> ConnLabels {
        ConnLabels {
            reporter: "outbound",
            source_pod: pod.key.name.to_string(),
            source_workload_namespace: pod.key.namespace.to_string(),
            source_principal: pod.identity.to_string(),
            destination_service: self.destination(&pod.key, dest, service, target.is_some()),
            destination_pod: target.map(|w| w.workload.key.name.to_string()).unwrap_or_default(),
            destination_workload_namespace: target.map(|w| w.workload.key.namespace.to_string()).unwrap_or_default(),
            destination_principal: target.map(|w| w.identity.to_string()).unwrap_or_default(),
            security,
        }
    }

    /// Labels of a connection arriving at `pod` from `source` (authenticated
    /// as `peer_id` when it came through a tunnel) for its `authority`.
    pub fn inbound_labels(
        &self,
        pod: &PodContext,
        source: Option<&WorkloadEntry>,
        peer_id: Option<&Identity>,
        service: Option<&ServiceKey>,
        security: &'static str,
    ) -> ConnLabels {
        ConnLabels {
            reporter: "inbound",
            source_pod: source.map(|w| w.workload.key.name.to_string()).unwrap_or_default(),
            source_workload_namespace: peer_id.map(|id| id.namespace.to_string()).unwrap_or_default(),
            source_principal: peer_id.map(ToString::to_string).unwrap_or_default(),
            destination_service: service.map(service_label).unwrap_or_else(|| UNKNOWN_SERVICE.into()),
            destination_pod: pod.key.name.to_string(),
            destination_workload_namespace: pod.key.namespace.to_string(),
            destination_principal: pod.identity.to_string(),
            security,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_kept_up_to_the_cap_then_collapse() {
        let budget = AddressBudget::new(2);
        let pod = PodKey::new("default", "a");
        let addr = |p: u16| SocketAddr::from(([10, 0, 0, 1], p));
        assert_eq!(budget.label(&pod, addr(1)), "10.0.0.1:1");
        assert_eq!(budget.label(&pod, addr(2)), "10.0.0.1:2");
        assert_eq!(budget.label(&pod, addr(3)), EXTERNAL);
        assert_eq!(budget.label(&pod, addr(1)), "10.0.0.1:1", "a kept address stays");
        assert_eq!(budget.label(&PodKey::new("default", "b"), addr(3)), "10.0.0.1:3", "the cap is per pod");
        assert_eq!(AddressBudget::new(0).label(&pod, addr(1)), EXTERNAL, "off by default");
    }
}
