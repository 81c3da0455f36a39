//! The store: the mesh model indexed for the data path, changed one object
//! at a time, published as immutable snapshots.
//!
//! Sources (the mesh file, the Kubernetes API) call [`Store::upsert`] and
//! [`Store::delete`] per object, then [`Store::publish`]. Indices (by IP,
//! by VIP:port, by `namespace/name`, by hostname, endpoint → service) are
//! persistent maps (`imbl`): a change copies the few tree nodes on its path
//! and shares the rest with the previous snapshot, so applying one endpoint
//! change costs O(log n) plus the endpoints of its service — never
//! O(cluster) — and publishing is a reference-count bump.
//!
//! An object that contradicts another (two pods claiming one address, a
//! VIP that is a pod's address, ...) is rejected *alone*: the store keeps
//! what it had for that object, records why, and tries the rejected object
//! again on every publish, so it applies once its blocker is gone.
//!
//! Snapshots go out on a `tokio::sync::watch` channel, which the node
//! reconciler waits on, and into an `ArcSwap`, which each connection reads
//! once at accept without taking a lock.
#![forbid(unsafe_code)]

mod routes;
mod snapshot;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::{
    balance::BalanceSettings,
    identity::Identity,
    model::{
        self, canonical_ip, AuthorizationPolicy, EndpointSlice, HttpRoute, Object, ObjectKey, ObjectRef, Service,
        Workload,
    },
};

pub use routes::{EndpointStatus, RouteStatus, ServiceRoute};
pub use snapshot::{ServiceEntry, Snapshot, WorkloadEntry};

/// Why an object was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object} rejected: {reason}")]
pub struct Rejected {
    pub object: ObjectRef,
    pub reason: String,
}

/// A change a source asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Upsert(Object),
    Delete(ObjectRef),
}

/// What the store needs to derive identities and balancers.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub trust_domain: String,
    pub balance: BalanceSettings,
    /// Circuit-breaker thresholds of services that set none.
    pub breaker: crate::resilience::BreakerLimits,
}

/// Reads the current snapshot without locking: what the data path uses.
#[derive(Debug, Clone)]
pub struct MeshReader(Arc<ArcSwap<Snapshot>>);

impl MeshReader {
    /// The current snapshot, for the duration of one decision.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.0.load()
    }

    /// The current snapshot, to keep.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.0.load_full()
    }

    /// A reader of an empty mesh that never changes (for tests).
    pub fn empty() -> Self {
        Self(Arc::new(ArcSwap::from_pointee(Snapshot::default())))
    }
}

/// One shared copy of each namespace, service-account and node name: at
/// cluster scale the same few hundred strings appear in every object.
#[derive(Debug, Default)]
struct Interner(std::collections::HashSet<Arc<str>>);

impl Interner {
    fn intern(&mut self, s: &Arc<str>) -> Arc<str> {
        if let Some(shared) = self.0.get(&**s) {
            return shared.clone();
        }
        self.0.insert(s.clone());
        s.clone()
    }

    fn key(&mut self, key: &ObjectKey) -> ObjectKey {
        ObjectKey { namespace: self.intern(&key.namespace), name: key.name.clone() }
    }
}

pub struct Store {
    settings: StoreSettings,
    trust_domain: Arc<str>,
    strings: Interner,
    /// The working state: cloned (cheaply) into each published snapshot.
    state: Snapshot,
    /// Objects refused, with why; retried on every publish.
    rejected: BTreeMap<ObjectRef, (Object, String)>,
    /// Service ids stay below the kernel's counter array size: freed ids
    /// are reused, smallest first.
    free_ids: BTreeSet<u32>,
    next_id: u32,
    tx: watch::Sender<Arc<Snapshot>>,
    current: Arc<ArcSwap<Snapshot>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("version", &self.state.version).finish_non_exhaustive()
    }
}

impl Store {
    pub fn new(settings: StoreSettings) -> Self {
        let state = Snapshot::default();
        let (tx, _) = watch::channel(Arc::new(state.clone()));
        Self {
            trust_domain: settings.trust_domain.as_str().into(),
            strings: Interner::default(),
            settings,
            state,
            rejected: BTreeMap::new(),
            free_ids: BTreeSet::new(),
            next_id: 1,
            tx,
            current: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
        }
    }

    pub fn reader(&self) -> MeshReader {
        MeshReader(self.current.clone())
    }

    /// Published snapshots, newest only (a slow reader skips versions).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The working state, with changes not yet published.
    pub fn state(&self) -> &Snapshot {
        &self.state
    }

    pub fn apply(&mut self, change: Change) -> Result<(), Rejected> {
        match change {
            Change::Upsert(object) => self.upsert(object),
            Change::Delete(r) => {
                self.delete(&r);
                Ok(())
            }
        }
    }

    /// Adds or replaces one object. On rejection the previous version of
    /// the object (if any) stays in force.
    pub fn upsert(&mut self, object: Object) -> Result<(), Rejected> {
        let r = object.object_ref();
        let result = model::validate::object(&object)
            .and_then(|()| self.check(&object))
            .map_err(|reason| Rejected { object: r.clone(), reason });
        match result {
            Ok(()) => {
                self.rejected.remove(&r);
                self.apply_valid(object);
                Ok(())
            }
            Err(rejected) => {
                self.rejected.insert(r, (object, rejected.reason.clone()));
                Err(rejected)
            }
        }
    }

    pub fn delete(&mut self, r: &ObjectRef) {
        self.rejected.remove(r);
        match r {
            ObjectRef::Workload(key) => self.remove_workload(key),
            ObjectRef::Service(key) => {
                if let Some(old) = self.state.services.remove(key) {
                    self.unindex_service(&old.service);
                    self.state.service_ids.remove(&old.id);
                    self.free_ids.insert(old.id);
                    self.rebuild_routes(key);
                }
            }
            ObjectRef::Endpoints(key) => {
                if let Some(old) = self.state.slices.remove(key) {
                    let service = old.service_key();
                    self.unlink_slice(&service, key);
                    self.rebuild_routes(&service);
                }
            }
            ObjectRef::Policy(key) => {
                if self.state.policies.remove(key).is_some() {
                    self.reindex_policies(&key.namespace);
                }
            }
            ObjectRef::Route(key) => {
                if let Some(old) = self.state.http_routes.remove(key) {
                    for parent in self.unlink_route(&old) {
                        self.rebuild_routes(&parent);
                    }
                }
            }
        }
    }

    /// Publishes the state as a new snapshot, after retrying rejected objects.
    pub fn publish(&mut self) -> Arc<Snapshot> {
        self.retry_rejected();
        self.state.version += 1;
        self.state.rejected =
            Arc::new(self.rejected.iter().map(|(r, (_, why))| (r.to_string(), why.clone())).collect());
        let snapshot = Arc::new(self.state.clone());
        self.current.store(snapshot.clone());
        self.tx.send_replace(snapshot.clone());
        snapshot
    }

    /// Objects currently refused, with the reason.
    pub fn rejected(&self) -> impl Iterator<Item = (&ObjectRef, &str)> {
        self.rejected.iter().map(|(r, (_, why))| (r, why.as_str()))
    }

    fn retry_rejected(&mut self) {
        if self.rejected.is_empty() {
            return;
        }
        let pending: Vec<Object> = self.rejected.values().map(|(o, _)| o.clone()).collect();
        for object in pending {
            let r = object.object_ref();
            // Validated again: an object invalid on its own stays refused
            // (and listed); only a conflict can clear by itself.
            if model::validate::object(&object).is_ok() && self.check(&object).is_ok() {
                tracing::info!(object = %r, "a previously rejected object now applies");
                self.rejected.remove(&r);
                self.apply_valid(object);
            }
        }
    }

    /// Checks against the other objects of the store.
    fn check(&self, object: &Object) -> Result<(), String> {
        let s = &self.state;
        match object {
            Object::Workload(w) => {
                for ip in &w.ips {
                    let ip = canonical_ip(*ip);
                    if let Some(other) = s.by_ip.get(&ip).filter(|o| o.workload.key != w.key) {
                        return Err(format!("pods {} and {} both claim {ip}", other.workload.key, w.key));
                    }
                    if let Some(svc) = s.vip_owner.get(&ip) {
                        return Err(format!("{ip} is service {svc}'s virtual IP"));
                    }
                }
                if let Some(netns) = &w.netns {
                    let shared =
                        s.local.values().find(|o| o.workload.key != w.key && o.workload.netns.as_ref() == Some(netns));
                    if let Some(other) = shared {
                        return Err(format!("pods {} and {} share netns {netns}", other.workload.key, w.key));
                    }
                }
                Ok(())
            }
            Object::Service(svc) => {
                for vip in &svc.vips {
                    let vip = canonical_ip(*vip);
                    if let Some(other) = s.vip_owner.get(&vip).filter(|k| **k != svc.key) {
                        return Err(format!("services {other} and {} both claim virtual IP {vip}", svc.key));
                    }
                    if let Some(pod) = s.by_ip.get(&vip) {
                        return Err(format!("virtual IP {vip} is pod {}'s address", pod.workload.key));
                    }
                }
                for host in &svc.hostnames {
                    if let Some(other) = s.by_hostname.get(host).filter(|k| **k != svc.key) {
                        return Err(format!("services {other} and {} both claim hostname {host}", svc.key));
                    }
                }
                Ok(())
            }
            Object::Endpoints(_) | Object::Policy(_) | Object::Route(_) => Ok(()),
        }
    }

    fn apply_valid(&mut self, object: Object) {
        match object {
            Object::Workload(w) => self.put_workload(w),
            Object::Service(svc) => self.put_service(svc),
            Object::Endpoints(slice) => self.put_slice(slice),
            Object::Policy(p) => self.put_policy(p),
            Object::Route(r) => self.put_route(r),
        }
    }

    fn put_workload(&mut self, mut w: Workload) {
        // Policies select destination pods, and a node only evaluates them
        // for its own pods: labels of pods elsewhere are dead weight (they
        // were a third of the store at 100 000 remote pods).
        // Likewise the uid: it tells a recreated local pod from the old one.
        if !w.is_local() {
            w.labels = Default::default();
            w.uid = self.strings.intern(&Arc::from(""));
        }
        w.key = self.strings.key(&w.key);
        w.service_account = self.strings.intern(&w.service_account);
        w.node = w.node.as_ref().map(|n| self.strings.intern(n));
        if let Some(old) = self.state.workloads.get(&w.key) {
            if old.workload == w {
                return;
            }
        }
        self.remove_workload(&w.key);
        let identity =
            Identity::from_parts(self.trust_domain.clone(), w.key.namespace.clone(), w.service_account.clone());
        let entry = Arc::new(WorkloadEntry { workload: w, identity });
        let s = &mut self.state;
        for ip in &entry.workload.ips {
            s.by_ip.insert(canonical_ip(*ip), entry.clone());
        }
        if entry.workload.is_local() {
            s.local.insert(entry.workload.key.clone(), entry.clone());
        }
        s.workloads.insert(entry.workload.key.clone(), entry);
    }

    fn remove_workload(&mut self, key: &ObjectKey) {
        let s = &mut self.state;
        let Some(old) = s.workloads.remove(key) else { return };
        for ip in &old.workload.ips {
            s.by_ip.remove(&canonical_ip(*ip));
        }
        s.local.remove(key);
    }

    fn put_service(&mut self, mut svc: Service) {
        svc.key = self.strings.key(&svc.key);
        let key = svc.key.clone();
        let id = match self.state.services.get(&key) {
            Some(old) if old.service == svc => return,
            Some(old) => {
                let id = old.id;
                let old = old.service.clone();
                self.unindex_service(&old);
                id
            }
            None => self.allocate_id(),
        };
        let s = &mut self.state;
        for vip in &svc.vips {
            s.vip_owner.insert(canonical_ip(*vip), key.clone());
        }
        for host in &svc.hostnames {
            s.by_hostname.insert(host.clone(), key.clone());
        }
        s.service_ids.insert(id, key.clone());
        s.services.insert(key.clone(), Arc::new(ServiceEntry { service: svc, id }));
        self.rebuild_routes(&key);
    }

    fn allocate_id(&mut self) -> u32 {
        if let Some(id) = self.free_ids.pop_first() {
            return id;
        }
        let id = self.next_id;
        self.next_id = self.next_id.saturating_add(1);
        id
    }

    fn unindex_service(&mut self, svc: &Service) {
        let s = &mut self.state;
        for vip in &svc.vips {
            s.vip_owner.remove(&canonical_ip(*vip));
        }
        for host in &svc.hostnames {
            s.by_hostname.remove(host);
        }
    }

    fn put_slice(&mut self, mut slice: EndpointSlice) {
        slice.key = self.strings.key(&slice.key);
        if let Some(svc) = self.state.services.get(&slice.service_key()) {
            slice.service = svc.service.key.name.clone();
        }
        // An endpoint that is a known pod shares the pod's key strings.
        for ep in &mut slice.endpoints {
            if let Some(pod) = &ep.pod {
                ep.pod = Some(match self.state.workloads.get(pod) {
                    Some(w) => w.workload.key.clone(),
                    None => self.strings.key(pod),
                });
            }
        }
        let key = slice.key.clone();
        let service = slice.service_key();
        if let Some(old) = self.state.slices.get(&key) {
            if **old == slice {
                return;
            }
            let old_service = old.service_key();
            if old_service != service {
                self.unlink_slice(&old_service, &key);
                self.rebuild_routes(&old_service);
            }
        }
        self.state.slices.insert(key.clone(), Arc::new(slice));
        // A service has one or a few slices: a small shared slice, copied on
        // change, costs far less than a persistent set per service.
        let mut of: Vec<ObjectKey> = self.state.slices_of.get(&service).map(|l| l.to_vec()).unwrap_or_default();
        if !of.contains(&key) {
            of.push(key);
            of.sort();
        }
        self.state.slices_of.insert(service.clone(), of.into());
        self.rebuild_routes(&service);
    }

    fn unlink_slice(&mut self, service: &ObjectKey, slice: &ObjectKey) {
        if let Some(of) = self.state.slices_of.get(service) {
            let of: Vec<ObjectKey> = of.iter().filter(|k| *k != slice).cloned().collect();
            if of.is_empty() {
                self.state.slices_of.remove(service);
            } else {
                self.state.slices_of.insert(service.clone(), of.into());
            }
        }
    }

    /// A route is compiled into the tables of the services it attaches
    /// to: those (old parents and new) are rebuilt.
    fn put_route(&mut self, r: HttpRoute) {
        if self.state.http_routes.get(&r.key).is_some_and(|old| **old == r) {
            return;
        }
        let mut affected = match self.state.http_routes.get(&r.key).cloned() {
            Some(old) => self.unlink_route(&old),
            None => BTreeSet::new(),
        };
        for parent in &r.parents {
            let mut of: Vec<ObjectKey> =
                self.state.routes_of.get(&parent.service).map(|o| o.to_vec()).unwrap_or_default();
            if !of.contains(&r.key) {
                of.push(r.key.clone());
                self.state.routes_of.insert(parent.service.clone(), of.into());
            }
            affected.insert(parent.service.clone());
        }
        self.state.http_routes.insert(r.key.clone(), Arc::new(r));
        for service in affected {
            self.rebuild_routes(&service);
        }
    }

    /// Takes `route` out of its parents' lists; returns the parents.
    fn unlink_route(&mut self, route: &HttpRoute) -> BTreeSet<ObjectKey> {
        let mut parents = BTreeSet::new();
        for parent in &route.parents {
            if let Some(of) = self.state.routes_of.get(&parent.service) {
                let of: Vec<ObjectKey> = of.iter().filter(|k| **k != route.key).cloned().collect();
                if of.is_empty() {
                    self.state.routes_of.remove(&parent.service);
                } else {
                    self.state.routes_of.insert(parent.service.clone(), of.into());
                }
            }
            parents.insert(parent.service.clone());
        }
        parents
    }

    fn put_policy(&mut self, p: AuthorizationPolicy) {
        let ns = p.key.namespace.clone();
        if self.state.policies.get(&p.key).is_some_and(|old| **old == p) {
            return;
        }
        self.state.policies.insert(p.key.clone(), Arc::new(p));
        self.reindex_policies(&ns);
    }

    /// Policies are evaluated per destination namespace: only that
    /// namespace's list is rebuilt.
    fn reindex_policies(&mut self, namespace: &Arc<str>) {
        let s = &mut self.state;
        // Keys sort by namespace first: the namespace's policies are one
        // range of the ordered map, in name order.
        let start = ObjectKey { namespace: namespace.clone(), name: "".into() };
        let list: Vec<Arc<AuthorizationPolicy>> =
            s.policies.range(start..).take_while(|(k, _)| k.namespace == *namespace).map(|(_, p)| p.clone()).collect();
        if list.is_empty() {
            s.policies_by_ns.remove(namespace);
        } else {
            s.policies_by_ns.insert(namespace.clone(), list.into());
        }
    }
}

#[cfg(test)]
mod tests;
