//! The pods of this node: their netns handles, listeners and capture
//! entries, kept in line with the store's snapshots.
//!
//! The reconciler wakes on every published snapshot and compares the
//! snapshot's local pods with what runs: a pod whose definition is unchanged
//! is left alone (however often its source rewrites it); a changed or
//! departed pod is stopped (un-meshed first, then its listeners closed); a
//! new one is started (listeners bound first, then meshed — never steer to
//! a port not yet bound). Pods that fail to start are retried on a timer,
//! and a pod whose netns was replaced under the same path is re-meshed.
#![forbid(unsafe_code)]

pub mod status;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use aya::programs::sk_lookup::SkLookupLinkId;
use outrigger_common::{MeshedPod, INBOUND_FLAG_CAPTURE, INBOUND_FLAG_STRICT, POD_FLAG_V6_LISTENER};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    capture::Capture,
    identity::Identities,
    inbound::Inbound,
    metrics::Metrics,
    model::{NetnsRef, PodKey},
    outbound::Outbound,
    pod::{ListenSockets, PodContext, PodError, PodLimits},
    store::{Snapshot, WorkloadEntry},
    transport::SocketOptions,
};
use status::{KeyStatus, NodeStatus, PodStatus};

/// What the reconciler needs from the rest of the proxy.
pub struct NodeDeps {
    pub capture: Arc<Capture>,
    pub outbound: Arc<Outbound>,
    pub inbound: Arc<Inbound>,
    /// Mutual TLS is configured: pods get a tunnel listener.
    pub mtls: bool,
    pub identities: Option<Arc<Identities>>,
    pub metrics: Arc<Metrics>,
    pub sockets: SocketOptions,
    pub limits: PodLimits,
    pub outbound_port: u16,
    pub hbone_port: u16,
    /// `--mtls strict`: plaintext from outside a pod is refused (but for
    /// the allowed sources).
    pub strict: bool,
    /// Permissive mode: plaintext from outside the mesh goes through the
    /// proxy (`--inbound-capture`).
    pub inbound_capture: bool,
    pub inbound_port: u16,
    /// `--inbound-original-source`: the delivery mark, which also names
    /// the routing table in each pod.
    pub delivery_mark: Option<u32>,
    /// How delivery sockets are made (original source); `None`: off.
    pub delivery_sockets: Option<SocketOptions>,
    pub own_netns_cookie: u64,
    /// Parent of every pod's stop token.
    pub shutdown: CancellationToken,
}

struct RunningPod {
    entry: Arc<WorkloadEntry>,
    ctx: Arc<PodContext>,
    listeners: Vec<SocketAddr>,
    /// The listening sockets themselves, for the pod's next definition.
    sockets: ListenSockets,
    stop: CancellationToken,
    /// The inbound program's link in the pod's netns (strict or captured).
    inbound_link: Option<SkLookupLinkId>,
}

/// Owns the running pods. Only the reconcile loop touches it.
pub struct Node {
    deps: NodeDeps,
    running: BTreeMap<PodKey, RunningPod>,
    /// Pods of the current snapshot that could not be started; retried.
    failed: BTreeMap<PodKey, (Arc<WorkloadEntry>, String)>,
    /// VIP:ports the kernel refuses now (what was last written to it).
    refused: BTreeMap<SocketAddr, u32>,
    wanted_identities: BTreeSet<crate::identity::Identity>,
    next_pod_id: u32,
    status: Arc<RwLock<NodeStatus>>,
}

fn same(a: &WorkloadEntry, b: &WorkloadEntry) -> bool {
    a.workload == b.workload && a.identity == b.identity
}

impl Node {
    pub fn new(deps: NodeDeps, status: Arc<RwLock<NodeStatus>>) -> Self {
        Self {
            deps,
            running: BTreeMap::new(),
            failed: BTreeMap::new(),
            refused: BTreeMap::new(),
            wanted_identities: BTreeSet::new(),
            next_pod_id: 1,
            status,
        }
    }

    /// Brings the node in line with `snapshot`.
    pub async fn reconcile(&mut self, snapshot: &Snapshot) {
        let local = snapshot.local_workloads();
        let stale: Vec<PodKey> = self
            .running
            .iter()
            .filter(|(key, pod)| !local.get(*key).is_some_and(|e| same(e, &pod.entry)))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            let Some(old) = self.running.remove(&key) else { continue };
            match local.get(&key) {
                // Changed: the new definition takes over before the old one
                // stops, so the pod is never left uncaptured in between,
                // and on the old one's sockets if its netns is the same.
                Some(entry) => {
                    self.start_or_record(key.clone(), entry.clone(), Some(&old)).await;
                    let successor =
                        self.running.get(&key).filter(|new| new.ctx.netns.cookie() == old.ctx.netns.cookie());
                    // Addresses the pod no longer has are forgotten.
                    let dropped: Vec<std::net::IpAddr> = match successor {
                        Some(new) => old.ctx.ips.iter().filter(|ip| !new.ctx.ips.contains(ip)).copied().collect(),
                        None => Vec::new(),
                    };
                    let replaced = successor.is_some();
                    if replaced {
                        // Same netns: the new definition listens on the old
                        // one's sockets (nothing queued on them is lost).
                        old.ctx.handed_over.cancel();
                    }
                    self.stop(&key, old, !replaced);
                    for ip in dropped {
                        if let Err(e) = self.deps.capture.forget_inbound_pod(ip) {
                            tracing::error!(pod = %key, error = %e, "removing an old address's inbound entries failed");
                        }
                    }
                }
                None => self.stop(&key, old, true),
            }
        }
        self.failed.retain(|key, (entry, _)| local.get(key).is_some_and(|e| same(e, entry)));
        for (key, entry) in local.iter() {
            if !self.running.contains_key(key) && !self.failed.contains_key(key) {
                self.start_or_record(key.clone(), entry.clone(), None).await;
            }
        }
        self.sync_refused(snapshot);
        self.sync_identities(snapshot).await;
        self.publish();
    }

    /// Writes only the differences to the kernel's refused-VIP map.
    fn sync_refused(&mut self, snapshot: &Snapshot) {
        let wanted = snapshot.refused();
        let gone: Vec<SocketAddr> = self.refused.keys().filter(|vip| !wanted.contains_key(*vip)).copied().collect();
        for vip in gone {
            match self.deps.capture.allow_vip(vip) {
                Ok(()) => {
                    self.refused.remove(&vip);
                }
                Err(e) => tracing::error!(vip = %vip, error = %e, "could not stop refusing a VIP in the kernel"),
            }
        }
        for (vip, id) in wanted.iter() {
            if self.refused.get(vip) == Some(id) {
                continue;
            }
            match self.deps.capture.refuse_vip(*vip, *id) {
                Ok(()) => {
                    self.refused.insert(*vip, *id);
                }
                Err(e) => tracing::error!(vip = %vip, error = %e,
                    "could not mark a VIP without endpoints in the kernel; such connects reach the proxy and are reset there"),
            }
        }
    }

    /// Asks for certificates of the identities now on the node. Loading
    /// them reads files or generates keys: done on a blocking thread.
    async fn sync_identities(&mut self, snapshot: &Snapshot) {
        let Some(identities) = self.deps.identities.clone() else { return };
        let wanted: BTreeSet<_> = snapshot.local_workloads().values().map(|e| e.identity.clone()).collect();
        if wanted == self.wanted_identities {
            return;
        }
        self.wanted_identities = wanted.clone();
        let _ = tokio::task::spawn_blocking(move || {
            identities.set_wanted(wanted);
            identities.refresh();
        })
        .await;
    }

    /// Retries pods that failed to start, and re-meshes pods whose netns
    /// file now refers to another namespace (a pod sandbox recreated).
    pub async fn recheck(&mut self) {
        let replaced: Vec<PodKey> = self
            .running
            .iter()
            .filter(|(_, pod)| {
                let Some(NetnsRef::Path(path)) = &pod.entry.workload.netns else { return false };
                crate::netns::inode_of(path).map(|now| now != pod.ctx.netns.inode()).unwrap_or(true)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in replaced {
            if let Some(pod) = self.running.remove(&key) {
                tracing::warn!(pod = %key, netns = %pod.ctx.netns.path().display(),
                    "the pod's network namespace was replaced (or removed); re-meshing it");
                let entry = pod.entry.clone();
                self.stop(&key, pod, true);
                self.failed.insert(key, (entry, "network namespace replaced".into()));
            }
        }
        if self.failed.is_empty() {
            return;
        }
        let keys: Vec<PodKey> = self.failed.keys().cloned().collect();
        for key in keys {
            // Stays in `failed` while retried, so an unchanged reason is
            // not logged again on every tick.
            if let Some((entry, _)) = self.failed.get(&key) {
                let entry = entry.clone();
                self.start_or_record(key, entry, None).await;
            }
        }
        self.publish();
    }

    /// Starts a pod — on the sockets of `previous`, its running definition,
    /// where the netns is the same — or records why it cannot start.
    async fn start_or_record(&mut self, key: PodKey, entry: Arc<WorkloadEntry>, previous: Option<&RunningPod>) {
        let id = self.next_pod_id;
        self.next_pod_id = self.next_pod_id.wrapping_add(1).max(1);
        let result = match self.start_pod(id, &entry, previous).await {
            Ok(pod) => match self.running.values().find(|p| p.ctx.netns.cookie() == pod.ctx.netns.cookie()) {
                // Two paths can name one namespace: refuse the second.
                Some(other) => {
                    let message = format!(
                        "pod {} already uses this network namespace (netns cookie {}, {}): each pod needs its own",
                        other.entry.workload.key,
                        pod.ctx.netns.cookie(),
                        other.ctx.netns.path().display()
                    );
                    self.stop(&key, pod, false);
                    Err(message)
                }
                None => Ok(pod),
            },
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(pod) => {
                tracing::info!(pod = %key, netns = %pod.ctx.netns.path().display(), cookie = pod.ctx.netns.cookie(),
                    listeners = ?pod.listeners, "pod meshed");
                self.failed.remove(&key);
                self.running.insert(key, pod);
            }
            Err(message) => {
                // Logged when the reason first appears or changes, not on
                // every retry.
                let known = self.failed.get(&key).is_some_and(|(_, m)| *m == message);
                if !known {
                    tracing::error!(pod = %key, error = %message, "pod not meshed; retrying");
                }
                self.failed.insert(key, (entry, message));
            }
        }
    }

    async fn start_pod(
        &self,
        id: u32,
        entry: &Arc<WorkloadEntry>,
        previous: Option<&RunningPod>,
    ) -> Result<RunningPod, PodError> {
        let d = &self.deps;
        let ctx = Arc::new(
            PodContext::open(
                id,
                &entry.workload,
                entry.identity.clone(),
                d.own_netns_cookie,
                d.sockets,
                d.delivery_sockets,
                d.limits,
            )
            .await?,
        );
        let previous = previous.filter(|p| p.ctx.netns.cookie() == ctx.netns.cookie()).map_or(&[][..], |p| &p.sockets);
        let stop = d.shutdown.child_token();
        let mut addrs = Vec::new();
        let mut sockets = ListenSockets::new();
        let mut flags = 0;
        let result = async {
            for listener in ctx.bind_outbound(d.outbound_port, previous, &mut sockets).await? {
                let addr = listener.local_addr().map_err(|e| PodError::ListenerAddr(e.to_string()))?;
                if addr.is_ipv6() {
                    flags |= POD_FLAG_V6_LISTENER;
                }
                addrs.push(addr);
                tokio::spawn(d.outbound.clone().serve(listener, ctx.clone(), stop.clone()));
            }
            if d.mtls {
                for listener in ctx.bind_inbound(d.hbone_port, previous, &mut sockets).await? {
                    if let Ok(addr) = listener.local_addr() {
                        addrs.push(addr);
                    }
                    tokio::spawn(d.inbound.clone().serve(listener, ctx.clone(), stop.clone()));
                }
            }
            if let Some(mark) = d.delivery_mark {
                ctx.prepare_delivery(mark).await?;
            }
            // Capture only once the listeners are up: a connect steered to
            // a port nobody listens on would be refused.
            let ip4 = ctx.ips.iter().find(|ip| ip.is_ipv4());
            let ip6 = ctx.ips.iter().find(|ip| ip.is_ipv6());
            let word = |ip: Option<&std::net::IpAddr>| {
                ip.map(|ip| crate::capture::addr::to_kernel(std::net::SocketAddr::new(*ip, 0)).ip).unwrap_or_default()
            };
            let pod = MeshedPod {
                pod_id: id,
                outbound_port: u32::from(d.outbound_port),
                flags,
                ip4: word(ip4)[0],
                ip6: word(ip6),
            };
            d.capture.mesh(ctx.netns.cookie(), pod)?;
            match self.start_inbound(&ctx, &stop, &mut addrs, previous, &mut sockets).await {
                Ok(link) => Ok(link),
                Err(e) => {
                    let _ = d.capture.unmesh(ctx.netns.cookie());
                    Err(e)
                }
            }
        }
        .await;
        match result {
            Ok(inbound_link) => {
                Ok(RunningPod { entry: entry.clone(), ctx, listeners: addrs, sockets, stop, inbound_link })
            }
            Err(e) => {
                stop.cancel();
                Err(e)
            }
        }
    }

    /// Inbound treatment of plaintext from outside the pod: strict (refuse
    /// but for allowed sources) or captured (the proxy's plaintext
    /// listener), through the inbound program attached to the pod's netns.
    /// Returns its link; `None` when neither applies.
    async fn start_inbound(
        &self,
        ctx: &Arc<PodContext>,
        stop: &CancellationToken,
        addrs: &mut Vec<std::net::SocketAddr>,
        previous: &[Arc<std::net::TcpListener>],
        sockets: &mut ListenSockets,
    ) -> Result<Option<SkLookupLinkId>, PodError> {
        let d = &self.deps;
        if !d.strict && !d.inbound_capture {
            return Ok(None);
        }
        let (flags, listeners) = if d.strict {
            (INBOUND_FLAG_STRICT, None)
        } else {
            let (v4, v6) = ctx.bind_plaintext(d.inbound_port, previous, sockets).await?;
            (INBOUND_FLAG_CAPTURE, Some((v4, v6)))
        };
        for ip in &ctx.ips {
            let listener = listeners.as_ref().and_then(|(v4, v6)| if ip.is_ipv4() { Some(v4) } else { v6.as_ref() });
            d.capture.inbound_pod(*ip, flags, listener.map(|l| &**l))?;
        }
        if let Some((v4, v6)) = listeners {
            for listener in std::iter::once(v4).chain(v6) {
                if let Ok(addr) = listener.local_addr() {
                    addrs.push(addr);
                }
                tokio::spawn(d.inbound.clone().serve_plaintext(listener, ctx.clone(), stop.clone()));
            }
        }
        let netns = std::fs::File::open(ctx.netns.path()).map_err(|source| {
            PodError::Netns(crate::netns::NetnsError::Open { path: ctx.netns.path().into(), source })
        })?;
        Ok(Some(d.capture.attach_inbound(&netns)?))
    }

    /// Stops a pod's listeners (after draining their backlog); with
    /// `unmesh`, first removes its capture entries so new connects go
    /// direct (a pod replaced in the same netns keeps them: its successor
    /// wrote its own over them). Connections already accepted run to
    /// completion.
    fn stop(&self, key: &PodKey, pod: RunningPod, unmesh: bool) {
        if unmesh {
            if let Err(e) = self.deps.capture.unmesh(pod.ctx.netns.cookie()) {
                tracing::error!(pod = %key, error = %e, "un-meshing pod failed");
            }
            for ip in &pod.ctx.ips {
                if let Err(e) = self.deps.capture.forget_inbound_pod(*ip) {
                    tracing::error!(pod = %key, error = %e, "removing the pod's inbound entries failed");
                }
            }
        }
        pod.stop.cancel();
        if let Some(link) = pod.inbound_link {
            if let Err(e) = self.deps.capture.detach_inbound(link) {
                tracing::error!(pod = %key, error = %e, "detaching the inbound program failed");
            }
        }
        if unmesh {
            tracing::info!(pod = %key, "pod un-meshed");
        }
    }

    /// Shutdown: stop capturing every pod so new connects go direct, give
    /// connects already steered a moment to be accepted, then close the
    /// listeners. Accepted connections keep running.
    pub async fn unmesh_all(&mut self) {
        for (key, pod) in &self.running {
            if let Err(e) = self.deps.capture.unmesh(pod.ctx.netns.cookie()) {
                tracing::error!(pod = %key, error = %e, "un-meshing pod failed");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (_, pod) in std::mem::take(&mut self.running) {
            pod.stop.cancel();
        }
        self.publish();
    }

    fn publish(&self) {
        self.deps.metrics.pods_meshed.set(self.running.len() as i64);
        let status_of = |entry: &WorkloadEntry, cookie, listeners: Vec<SocketAddr>, error: Option<String>| PodStatus {
            key: KeyStatus::from(&entry.workload.key),
            uid: entry.workload.uid.to_string(),
            service_account: entry.workload.service_account.to_string(),
            netns: entry.workload.netns.as_ref().map(ToString::to_string).unwrap_or_default(),
            ips: entry.workload.ips.clone(),
            netns_cookie: cookie,
            listeners,
            error,
        };
        let mut pods: Vec<PodStatus> = self
            .running
            .values()
            .map(|pod| status_of(&pod.entry, Some(pod.ctx.netns.cookie()), pod.listeners.clone(), None))
            .collect();
        pods.extend(self.failed.values().map(|(entry, error)| status_of(entry, None, Vec::new(), Some(error.clone()))));
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        status.pods = pods;
        status.pods_ready = self.failed.is_empty();
    }
}

/// Applies every published snapshot, and rechecks failed and replaced pods
/// every `recheck`, until `stop`.
pub async fn run(
    mut node: Node,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    recheck: Duration,
    stop: CancellationToken,
) -> Node {
    let mut ticker = tokio::time::interval(recheck);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return node,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    // The store is gone: nothing more will change.
                    stop.cancelled().await;
                    return node;
                }
                let snapshot = snapshots.borrow_and_update().clone();
                node.reconcile(&snapshot).await;
            }
            _ = ticker.tick() => node.recheck().await,
        }
    }
}
