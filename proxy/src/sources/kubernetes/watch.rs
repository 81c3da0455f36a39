//! The watchers and the one loop that applies their events.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service as KubeService},
    discovery::v1::EndpointSlice as KubeSlice,
};
use kube::{
    api::{Api, ApiResource, DynamicObject},
    runtime::{watcher, WatchStreamExt},
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::{
    cluster::{Cluster, Pending, Side},
    policy, procfs, reduce, KubeSettings,
};
use crate::{
    model::{Object, ObjectKey, ObjectRef},
    sources::{SourceStatus, WatchStatus},
    store::{Change, Store},
};

/// Events taken in one batch before the store is updated: a relist of
/// thousands of objects becomes a few publications, not thousands.
const BATCH: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Namespaces,
    LocalPods,
    RemotePods,
    Services,
    EndpointSlices,
    AuthorizationPolicies,
}

const KINDS: [Kind; 6] = [
    Kind::Namespaces,
    Kind::LocalPods,
    Kind::RemotePods,
    Kind::Services,
    Kind::EndpointSlices,
    Kind::AuthorizationPolicies,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Namespaces => "namespaces",
            Self::LocalPods => "pods of this node",
            Self::RemotePods => "pods of other nodes",
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
            Self::AuthorizationPolicies => "authorizationpolicies.security.istio.io",
        }
    }

    /// How objects of this kind are named in reports.
    fn object(self) -> &'static str {
        match self {
            Self::Namespaces => "Namespace",
            Self::LocalPods | Self::RemotePods => "Pod",
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::AuthorizationPolicies => "AuthorizationPolicy",
        }
    }

    fn resource(self) -> ApiResource {
        match self {
            Self::Namespaces => ApiResource::erase::<Namespace>(&()),
            Self::LocalPods | Self::RemotePods => ApiResource::erase::<Pod>(&()),
            Self::Services => ApiResource::erase::<KubeService>(&()),
            Self::EndpointSlices => ApiResource::erase::<KubeSlice>(&()),
            Self::AuthorizationPolicies => ApiResource {
                group: "security.istio.io".into(),
                version: "v1".into(),
                api_version: "security.istio.io/v1".into(),
                kind: "AuthorizationPolicy".into(),
                plural: "authorizationpolicies".into(),
            },
        }
    }
}

type Event = (Kind, Result<watcher::Event<DynamicObject>, watcher::Error>);

fn stream(client: &kube::Client, kind: Kind, node: &str) -> futures_util::stream::BoxStream<'static, Event> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.resource());
    let config = match kind {
        Kind::LocalPods => watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        Kind::RemotePods => watcher::Config::default().fields(&format!("spec.nodeName!={node}")),
        _ => watcher::Config::default(),
    };
    watcher(api, config).default_backoff().map(move |e| (kind, e)).boxed()
}

/// An untyped object as the typed one: each object on its own, so that a
/// malformed one fails alone.
fn typed<K: DeserializeOwned>(obj: DynamicObject) -> Result<K, String> {
    let DynamicObject { metadata, data, .. } = obj;
    let mut map = match data {
        serde_json::Value::Object(map) => map,
        serde_json::Value::Null => serde_json::Map::new(),
        _ => return Err("not a JSON object".into()),
    };
    map.insert("metadata".into(), serde_json::to_value(metadata).map_err(|e| e.to_string())?);
    map.remove("apiVersion");
    map.remove("kind");
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| e.to_string())
}

/// A watch error with its causes (kube-rs's own text stops at "client
/// error (Connect)"; the cause says refused, timed out or TLS), and what to
/// check when the API cannot be reached at all.
fn explain(e: &watcher::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let t = cause.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        source = cause.source();
    }
    if text.contains("(Connect)") || text.contains("tcp connect error") {
        text.push_str(" (is the API server reachable from this node? check the kubeconfig's server, or KUBERNETES_SERVICE_HOST in a pod)");
    }
    text
}

fn key_of(obj: &DynamicObject) -> ObjectKey {
    ObjectKey::new(obj.metadata.namespace.as_deref().unwrap_or(""), obj.metadata.name.as_deref().unwrap_or(""))
}

fn label(kind: Kind, key: &ObjectKey) -> String {
    if key.namespace.is_empty() {
        format!("{} {}", kind.object(), key.name)
    } else {
        format!("{} {key}", kind.object())
    }
}

/// The source's state between events.
struct Source {
    settings: KubeSettings,
    cluster: Cluster,
    /// Services, slices and policies the store holds, per kind.
    applied: HashMap<Kind, BTreeSet<ObjectKey>>,
    /// Keys listed since the watch's current (re)list began.
    listing: HashMap<Kind, BTreeSet<ObjectKey>>,
    synced: BTreeSet<Kind>,
    published_once: bool,
    status: Arc<RwLock<SourceStatus>>,
    /// Why each pending pod's namespace was not found, last time.
    netns_reasons: HashMap<crate::model::PodKey, String>,
    forbidden: Vec<(u64, u64)>,
    /// Why the last /proc scan failed, kept until one succeeds (shown as the
    /// source's error when no watch has one).
    scan_error: Option<String>,
    /// Changes not yet applied to the store.
    out: Vec<Change>,
}

impl Source {
    fn status(&self) -> std::sync::RwLockWriteGuard<'_, SourceStatus> {
        self.status.write().unwrap_or_else(|e| e.into_inner())
    }

    fn watch_status(&self, kind: Kind, f: impl FnOnce(&mut WatchStatus)) {
        f(self.status().watches.entry(kind.name()).or_default());
    }

    fn handle(&mut self, kind: Kind, event: Result<watcher::Event<DynamicObject>, watcher::Error>) {
        match event {
            Ok(watcher::Event::Init) => {
                self.listing.insert(kind, BTreeSet::new());
                if self.synced.contains(&kind) {
                    tracing::info!(
                        watch = kind.name(),
                        "relisting (the watch's resourceVersion expired, or it restarted)"
                    );
                    self.watch_status(kind, |w| w.relists += 1);
                }
            }
            Ok(watcher::Event::InitApply(obj)) => {
                self.listing.entry(kind).or_default().insert(key_of(&obj));
                self.apply(kind, obj);
            }
            Ok(watcher::Event::Apply(obj)) => {
                self.recovered(kind);
                self.apply(kind, obj)
            }
            Ok(watcher::Event::Delete(obj)) => {
                self.recovered(kind);
                self.remove(kind, &key_of(&obj))
            }
            Ok(watcher::Event::InitDone) => {
                let listed = self.listing.remove(&kind).unwrap_or_default();
                self.finish_list(kind, &listed);
            }
            Err(e) => self.failed(kind, e),
        }
    }

    /// A watch that failed delivers again (kube-rs resumes a dropped watch
    /// without a relist, so no `InitDone` says so): its error is history.
    fn recovered(&mut self, kind: Kind) {
        let failing = self.status().watches.get(kind.name()).is_some_and(|w| w.last_error.is_some());
        if failing {
            tracing::info!(watch = kind.name(), "Kubernetes watch delivers again");
            self.watch_status(kind, |w| w.last_error = None);
        }
    }

    /// After a (re)list: what was not listed is gone.
    fn finish_list(&mut self, kind: Kind, listed: &BTreeSet<ObjectKey>) {
        let held: Vec<ObjectKey> = match kind {
            Kind::Namespaces => self
                .cluster
                .namespace_names()
                .into_iter()
                .map(|n| ObjectKey { namespace: "".into(), name: n })
                .collect(),
            Kind::LocalPods => self.cluster.pod_keys(Side::Local),
            Kind::RemotePods => self.cluster.pod_keys(Side::Remote),
            _ => self.applied.get(&kind).map(|s| s.iter().cloned().collect()).unwrap_or_default(),
        };
        let gone: Vec<ObjectKey> = held.into_iter().filter(|k| !listed.contains(k)).collect();
        if !gone.is_empty() {
            tracing::info!(
                watch = kind.name(),
                removed = gone.len(),
                "objects deleted while the watch was away removed"
            );
        }
        for key in &gone {
            self.remove(kind, key);
        }
        if self.synced.insert(kind) {
            tracing::info!(watch = kind.name(), objects = listed.len(), "initial list applied");
        }
        self.watch_status(kind, |w| {
            w.synced = true;
            w.last_error = None;
        });
    }

    fn failed(&mut self, kind: Kind, e: watcher::Error) {
        // No AuthorizationPolicy CRD (Istio absent and the optional CRD not
        // applied): no policies, which is a valid state, not a wait.
        let no_crd = kind == Kind::AuthorizationPolicies
            && matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.is_not_found());
        if no_crd {
            if !self.synced.contains(&kind) {
                tracing::warn!("the AuthorizationPolicy CRD is not installed: no authorization policies apply \
                    (install Istio's, or deploy/kubernetes/components/istio-authorizationpolicy-crd); checking again with backoff");
                self.finish_list(kind, &BTreeSet::new());
            }
            return;
        }
        let message = format!("{}: {}", kind.name(), explain(&e));
        let new = self.status().watches.get(kind.name()).and_then(|w| w.last_error.as_ref()) != Some(&message);
        if new {
            tracing::warn!(error = %message, "Kubernetes watch failed; retrying with backoff, the last state keeps serving");
        }
        self.watch_status(kind, |w| {
            w.errors += 1;
            w.last_error = Some(message);
        });
    }

    /// Reports a malformed object (once per distinct reason) and keeps
    /// what was applied for it before.
    fn malformed(&mut self, kind: Kind, key: &ObjectKey, why: String) {
        let object = label(kind, key);
        if self.status().report(object.clone(), format!("skipped: {why}")) {
            tracing::error!(object, error = %why, "malformed object skipped; the rest of the watch applies");
        }
        self.watch_status(kind, |w| w.errors += 1);
    }

    fn apply(&mut self, kind: Kind, obj: DynamicObject) {
        let key = key_of(&obj);
        let result = match kind {
            Kind::Namespaces => typed::<Namespace>(obj).map(|ns| {
                self.cluster.put_namespace(&key.name, reduce::namespace_enrolled(&ns), &mut self.out);
            }),
            Kind::LocalPods | Kind::RemotePods => {
                let side = if kind == Kind::LocalPods { Side::Local } else { Side::Remote };
                typed::<Pod>(obj).and_then(|p| reduce::pod(&p)).map(|r| self.cluster.put_pod(side, r, &mut self.out))
            }
            Kind::Services => typed::<KubeService>(obj)
                .and_then(|s| reduce::service(&s, &self.settings.cluster_domain))
                .map(|s| self.put(kind, &key, s.map(Object::Service))),
            Kind::EndpointSlices => typed::<KubeSlice>(obj)
                .and_then(|s| reduce::endpoint_slice(&s))
                .map(|s| self.put(kind, &key, s.map(Object::Endpoints))),
            Kind::AuthorizationPolicies => {
                let spec = obj.data.get("spec").cloned().unwrap_or(serde_json::Value::Null);
                let t = policy::translate_or_fail_closed(key.clone(), &spec);
                // Applied first: removing a policy clears its report.
                self.put(kind, &key, t.policy.map(Object::Policy));
                let object = label(kind, &key);
                if t.notes.is_empty() {
                    self.status().clear_report(&object);
                } else {
                    let notes = t.notes.join("; ");
                    if self.status().report(object.clone(), notes.clone()) {
                        tracing::warn!(object, notes, "authorization policy not applied as written (L4 proxy)");
                    }
                }
                Ok(())
            }
        };
        match result {
            Ok(()) if kind != Kind::AuthorizationPolicies => self.status().clear_report(&label(kind, &key)),
            Ok(()) => {}
            Err(why) => self.malformed(kind, &key, why),
        }
    }

    /// Upserts a service, slice or policy, or removes it when it has
    /// nothing for this proxy any more.
    fn put(&mut self, kind: Kind, key: &ObjectKey, object: Option<Object>) {
        match object {
            Some(o) => {
                self.applied.entry(kind).or_default().insert(key.clone());
                self.out.push(Change::Upsert(o));
            }
            None => self.remove(kind, key),
        }
    }

    fn remove(&mut self, kind: Kind, key: &ObjectKey) {
        self.status().clear_report(&label(kind, key));
        let r = match kind {
            Kind::Namespaces => return self.cluster.remove_namespace(&key.name, &mut self.out),
            Kind::LocalPods => return self.cluster.remove_pod(Side::Local, key, &mut self.out),
            Kind::RemotePods => return self.cluster.remove_pod(Side::Remote, key, &mut self.out),
            Kind::Services => ObjectRef::Service(key.clone()),
            Kind::EndpointSlices => ObjectRef::Endpoints(key.clone()),
            Kind::AuthorizationPolicies => ObjectRef::Policy(key.clone()),
        };
        if self.applied.get_mut(&kind).is_some_and(|s| s.remove(key)) {
            self.out.push(Change::Delete(r));
        }
    }

    /// Applies the batch; publishes once every watch has listed.
    fn flush(&mut self, store: &Mutex<Store>) {
        let all_synced = KINDS.iter().all(|k| self.synced.contains(k));
        if self.out.is_empty() && (self.published_once || !all_synced) {
            self.update_status(None);
            return;
        }
        let changes = std::mem::take(&mut self.out);
        let rejected = crate::sources::apply(store, changes, all_synced);
        if all_synced && !self.published_once {
            self.published_once = true;
            tracing::info!("Kubernetes state applied: every watch has listed");
        }
        self.update_status(Some(rejected));
    }

    /// `rejected`: what the store refuses now, when it was just applied to.
    fn update_status(&self, rejected: Option<usize>) {
        let counts = [
            (Kind::Namespaces, self.cluster.namespace_count()),
            (Kind::LocalPods, self.cluster.pod_count(Side::Local)),
            (Kind::RemotePods, self.cluster.pod_count(Side::Remote)),
        ];
        let mut status = self.status();
        let mut total = 0;
        for kind in KINDS {
            let n = counts
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, n)| *n)
                .unwrap_or_else(|| self.applied.get(&kind).map_or(0, BTreeSet::len));
            total += n;
            status.watches.entry(kind.name()).or_default().objects = n;
        }
        status.objects = total;
        if let Some(rejected) = rejected {
            status.rejected_objects = rejected;
        }
        status.synced = self.published_once;
        status.last_error =
            status.watches.values().find_map(|w| w.last_error.clone()).or_else(|| self.scan_error.clone());
        status.local_pods_not_meshed =
            self.cluster.unmeshed.iter().map(|(k, why)| (k.to_string(), why.to_string())).collect();
        for (key, why) in &self.netns_reasons {
            if let Some(slot) = status.local_pods_not_meshed.get_mut(&key.to_string()) {
                *slot = why.clone();
            }
        }
    }

    /// Looks for the network namespaces of pods still waiting for one.
    async fn rescan(&mut self) {
        let pending = self.cluster.pending();
        self.netns_reasons.retain(|k, _| pending.iter().any(|p| p.key == *k));
        if pending.is_empty() {
            return;
        }
        let proc = self.settings.host_proc.clone();
        let forbidden = self.forbidden.clone();
        let started = Instant::now();
        let work = pending.clone();
        let found = tokio::task::spawn_blocking(move || {
            let processes = procfs::scan(&proc).map_err(|e| format!("reading {}: {e}", proc.display()))?;
            Ok::<_, String>(
                work.into_iter()
                    .map(|p| {
                        let candidates = processes.get(&*p.uid).map(Vec::as_slice).unwrap_or_default();
                        let result = procfs::resolve(&proc, candidates, &p.ips, &forbidden);
                        (p, result)
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .await
        .unwrap_or_else(|e| Err(format!("the /proc scan failed: {e}")));
        let found = match found {
            Ok(found) => {
                self.scan_error = None;
                found
            }
            Err(e) => {
                if self.scan_error.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "cannot look for pods' network namespaces (mount the host's /proc at --host-proc)");
                }
                self.scan_error = Some(e);
                return;
            }
        };
        for (pending, result) in found {
            self.found(pending, result, started);
        }
    }

    /// Releases the namespaces whose sandbox process is gone or moved (a
    /// recreated sandbox, even with the same address): those pods wait for
    /// their new namespace, looked for at once.
    async fn check_held(&mut self) {
        let held = self.cluster.held();
        if held.is_empty() {
            return;
        }
        let proc = self.settings.host_proc.clone();
        let stale = tokio::task::spawn_blocking(move || {
            held.into_iter().filter(|(_, w, inode)| !procfs::still_holds(&proc, *w, *inode)).map(|(k, ..)| k).collect()
        })
        .await
        .unwrap_or_else(|_| Vec::new());
        for key in stale {
            tracing::info!(pod = %key, "the pod's sandbox process left its network namespace (sandbox recreated?): looking for its namespace again");
            self.cluster.forget_netns(&key, &mut self.out);
        }
    }

    fn found(
        &mut self,
        pending: Pending,
        result: Result<(crate::model::HeldNetns, procfs::Candidate), procfs::NotFound>,
        started: Instant,
    ) {
        match result {
            Ok((netns, witness)) => {
                tracing::info!(pod = %pending.key, netns = %netns.origin, scan_ms = started.elapsed().as_millis() as u64,
                    "network namespace found for the pod");
                self.netns_reasons.remove(&pending.key);
                self.cluster.put_netns(&pending, netns, witness, &mut self.out);
            }
            Err(why) => {
                let why = format!("network namespace not found: {why}");
                if self.netns_reasons.get(&pending.key) != Some(&why) {
                    // A pod whose containers have not started is the usual
                    // case; an address mismatch is worth a warning.
                    if matches!(why.as_str(), s if s.contains("holds its address")) {
                        tracing::warn!(pod = %pending.key, reason = %why, "pod not meshed");
                    } else {
                        tracing::info!(pod = %pending.key, reason = %why, "pod waits for its network namespace");
                    }
                    self.netns_reasons.insert(pending.key.clone(), why);
                }
            }
        }
    }
}

/// Watches the API and applies what it says to `store` until `stop`.
pub async fn run(
    client: kube::Client,
    settings: KubeSettings,
    store: Arc<Mutex<Store>>,
    status: Arc<RwLock<SourceStatus>>,
    stop: CancellationToken,
) {
    let node = settings.node_name.clone();
    let mut events = futures_util::stream::select_all(KINDS.iter().map(|k| stream(&client, *k, &node)));
    let mut ticker = tokio::time::interval(settings.rescan_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    {
        let mut s = status.write().unwrap_or_else(|e| e.into_inner());
        for kind in KINDS {
            s.watches.entry(kind.name()).or_default();
        }
    }
    let mut source = Source {
        forbidden: procfs::forbidden(&settings.host_proc),
        settings,
        cluster: Cluster::default(),
        applied: HashMap::new(),
        listing: HashMap::new(),
        synced: BTreeSet::new(),
        published_once: false,
        status,
        netns_reasons: HashMap::new(),
        scan_error: None,
        out: Vec::new(),
    };
    let mut pending_before: BTreeMap<crate::model::PodKey, ()> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            event = events.next() => {
                let Some((kind, event)) = event else { return };
                source.handle(kind, event);
                // Take what else is ready now, so a relist lands as one batch.
                for _ in 0..BATCH {
                    match events.next().now_or_never() {
                        Some(Some((kind, event))) => source.handle(kind, event),
                        _ => break,
                    }
                }
            }
            _ = ticker.tick() => {
                source.check_held().await;
                source.rescan().await;
            }
        }
        // A pod that just became meshable is looked for at once, not on
        // the next tick: the time from its event to its capture counts.
        let pending: BTreeMap<_, ()> = source.cluster.pending().into_iter().map(|p| (p.key, ())).collect();
        if pending.keys().any(|k| !pending_before.contains_key(k)) {
            source.rescan().await;
        }
        pending_before = pending;
        source.flush(&store);
    }
}
