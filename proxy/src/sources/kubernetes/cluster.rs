//! What the Kubernetes source knows of pods and namespaces, and the
//! workloads it derives from them.
//!
//! A pod's workload depends on three things that change apart: the pod,
//! its namespace's enrolment label, and (for pods of this node) the network
//! namespace found for it. Each change recomputes the workloads it touches
//! and compares them with what was published, so the store only sees real
//! differences: a namespace relabelled adds or removes exactly its pods.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use super::{procfs::Candidate, reduce::PodRecord};
use crate::{
    model::{HeldNetns, NetnsRef, Object, ObjectRef, PodKey, Workload},
    store::Change,
};

/// Which pod watch a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// `spec.nodeName` is this node: captured and served here.
    Local,
    Remote,
}

/// A network namespace found for a pod, valid while the pod keeps the uid
/// and addresses it was checked against.
#[derive(Debug, Clone)]
struct Found {
    uid: Arc<str>,
    ips: Vec<IpAddr>,
    netns: HeldNetns,
    /// The process it was found through, checked on every tick.
    witness: Candidate,
}

/// A pod of this node that should be meshed but whose network namespace
/// is not found yet.
#[derive(Debug, Clone)]
pub struct Pending {
    pub key: PodKey,
    pub uid: Arc<str>,
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Default)]
pub struct Cluster {
    /// Namespace name → enrolled.
    namespaces: HashMap<Arc<str>, bool>,
    local: BTreeMap<PodKey, PodRecord>,
    remote: BTreeMap<PodKey, PodRecord>,
    found: HashMap<PodKey, Found>,
    published: HashMap<PodKey, Workload>,
    /// Why each pod of this node is not meshed (for `/config_dump`).
    pub unmeshed: BTreeMap<PodKey, &'static str>,
}

impl Cluster {
    fn pods(&mut self, side: Side) -> &mut BTreeMap<PodKey, PodRecord> {
        match side {
            Side::Local => &mut self.local,
            Side::Remote => &mut self.remote,
        }
    }

    pub fn pod_count(&self, side: Side) -> usize {
        match side {
            Side::Local => self.local.len(),
            Side::Remote => self.remote.len(),
        }
    }

    pub fn namespace_count(&self) -> usize {
        self.namespaces.len()
    }

    /// Keys of the pods a watch holds (for removal after a relist).
    pub fn pod_keys(&self, side: Side) -> Vec<PodKey> {
        match side {
            Side::Local => self.local.keys().cloned().collect(),
            Side::Remote => self.remote.keys().cloned().collect(),
        }
    }

    pub fn namespace_names(&self) -> Vec<Arc<str>> {
        self.namespaces.keys().cloned().collect()
    }

    pub fn put_pod(&mut self, side: Side, mut record: PodRecord, out: &mut Vec<Change>) {
        if side == Side::Remote {
            // Policies select pods of this node only.
            record.labels = BTreeMap::new();
        }
        let key = record.key.clone();
        self.pods(side).insert(key.clone(), record);
        self.refresh(&key, out);
    }

    pub fn remove_pod(&mut self, side: Side, key: &PodKey, out: &mut Vec<Change>) {
        if self.pods(side).remove(key).is_some() {
            self.refresh(key, out);
        }
    }

    pub fn put_namespace(&mut self, name: &str, enrolled: bool, out: &mut Vec<Change>) {
        let name: Arc<str> = name.into();
        if self.namespaces.insert(name.clone(), enrolled) != Some(enrolled) {
            self.refresh_namespace(&name, out);
        }
    }

    pub fn remove_namespace(&mut self, name: &str, out: &mut Vec<Change>) {
        if self.namespaces.remove(name).is_some() {
            self.refresh_namespace(name, out);
        }
    }

    fn refresh_namespace(&mut self, namespace: &str, out: &mut Vec<Change>) {
        let start = PodKey::new(namespace, "");
        let in_ns = |m: &BTreeMap<PodKey, PodRecord>| -> Vec<PodKey> {
            m.range(start.clone()..).take_while(|(k, _)| &*k.namespace == namespace).map(|(k, _)| k.clone()).collect()
        };
        let mut keys = in_ns(&self.local);
        keys.extend(in_ns(&self.remote));
        for key in keys {
            self.refresh(&key, out);
        }
    }

    /// Records the network namespace found for a pending pod.
    pub fn put_netns(&mut self, pending: &Pending, netns: HeldNetns, witness: Candidate, out: &mut Vec<Change>) {
        let found = Found { uid: pending.uid.clone(), ips: pending.ips.clone(), netns, witness };
        self.found.insert(pending.key.clone(), found);
        self.refresh(&pending.key, out);
    }

    /// The namespaces held, with the process each was found through.
    pub fn held(&self) -> Vec<(PodKey, Candidate, (u64, u64))> {
        self.found.iter().map(|(k, f)| (k.clone(), f.witness, f.netns.inode)).collect()
    }

    /// The pod's namespace is gone (its sandbox was recreated): release it;
    /// the pod waits for its new one.
    pub fn forget_netns(&mut self, key: &PodKey, out: &mut Vec<Change>) {
        if self.found.remove(key).is_some() {
            self.refresh(key, out);
        }
    }

    /// Pods of this node to mesh whose network namespace is not known.
    pub fn pending(&self) -> Vec<Pending> {
        self.local
            .values()
            .filter(|r| r.not_meshed(self.enrolled(&r.key.namespace)).is_none())
            .filter(|r| self.found_for(r).is_none())
            .map(|r| Pending { key: r.key.clone(), uid: r.uid.clone(), ips: r.ips.clone() })
            .collect()
    }

    fn enrolled(&self, namespace: &str) -> bool {
        self.namespaces.get(namespace).copied().unwrap_or(false)
    }

    fn found_for(&self, r: &PodRecord) -> Option<&HeldNetns> {
        self.found.get(&r.key).filter(|f| f.uid == r.uid && f.ips == r.ips).map(|f| &f.netns)
    }

    /// The workload `key` should be now, if any.
    fn desired(&mut self, key: &PodKey) -> Option<Workload> {
        let workload = |r: &PodRecord, netns: Option<NetnsRef>| Workload {
            uid: r.uid.clone(),
            key: r.key.clone(),
            service_account: r.service_account.clone(),
            node: r.node.clone(),
            ips: r.ips.clone(),
            labels: r.labels.clone(),
            netns,
        };
        if let Some(r) = self.local.get(key) {
            if let Some(why) = r.not_meshed(self.enrolled(&key.namespace)) {
                self.unmeshed.insert(key.clone(), why);
                // Release its namespace: a finished Job pod can stay for
                // days, and its held descriptor keeps a dead netns alive.
                self.found.remove(key);
                return None;
            }
            let Some(netns) = self.found_for(r).cloned() else {
                self.unmeshed.insert(key.clone(), "network namespace not found yet");
                return None;
            };
            self.unmeshed.remove(key);
            return Some(workload(r, Some(NetnsRef::Held(netns))));
        }
        self.unmeshed.remove(key);
        self.found.remove(key);
        let r = self.remote.get(key)?;
        // Not meshed: its addresses are plain destinations, and never
        // claimed — a hostNetwork pod's address is its node's.
        r.not_meshed(self.enrolled(&key.namespace)).is_none().then(|| workload(r, None))
    }

    fn refresh(&mut self, key: &PodKey, out: &mut Vec<Change>) {
        let desired = self.desired(key);
        match desired {
            Some(w) if self.published.get(key) == Some(&w) => {}
            Some(w) => {
                self.published.insert(key.clone(), w.clone());
                out.push(Change::Upsert(Object::Workload(w)));
            }
            None => {
                if self.published.remove(key).is_some() {
                    out.push(Change::Delete(ObjectRef::Workload(key.clone())));
                }
            }
        }
    }
}
