//! The pods registered on this node: their netns threads, listeners and
//! capture entries, kept in line with the mesh file.
#![forbid(unsafe_code)]

mod pod;
pub mod status;

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use aya::programs::sk_lookup::SkLookupLinkId;
use outrigger_common::{MeshedPod, POD_FLAG_V6_LISTENER};
use tokio_util::sync::CancellationToken;

use crate::{
    mesh::{watch::FileWatch, MeshState, PodKey, PodSpec},
    metrics::ResultLabels,
    proxy::Proxy,
    view::MeshView,
};
pub use pod::{PodContext, PodError};
use status::{NodeStatus, PodStatus};

struct RunningPod {
    spec: PodSpec,
    ctx: Arc<PodContext>,
    listeners: Vec<std::net::SocketAddr>,
    stop: CancellationToken,
    /// The strict-mode program's link in the pod's netns.
    strict: Option<SkLookupLinkId>,
}

/// Owns the running pods. Only the reload loop touches it.
pub struct Node {
    proxy: Arc<Proxy>,
    outbound_port: u16,
    own_netns_cookie: u64,
    running: BTreeMap<PodKey, RunningPod>,
    /// Pods in the current state that could not be started; retried on every tick.
    failed: BTreeMap<PodKey, (PodSpec, String)>,
    next_pod_id: u32,
    status: Arc<RwLock<NodeStatus>>,
}

impl Node {
    pub fn new(proxy: Arc<Proxy>, outbound_port: u16, own_netns_cookie: u64, status: Arc<RwLock<NodeStatus>>) -> Self {
        Self {
            proxy,
            outbound_port,
            own_netns_cookie,
            running: BTreeMap::new(),
            failed: BTreeMap::new(),
            next_pod_id: 1,
            status,
        }
    }

    /// Brings the running pods in line with `state`: pods that left or
    /// changed are stopped first, then new or changed ones are started.
    pub async fn reconcile(&mut self, state: &MeshState) {
        let local: BTreeMap<&PodKey, &PodSpec> = state.pods.iter().filter(|(_, p)| p.is_local()).collect();
        let stale: Vec<PodKey> = self
            .running
            .iter()
            .filter(|(key, pod)| local.get(key) != Some(&&pod.spec))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(pod) = self.running.remove(&key) {
                self.stop_pod(&key, pod);
            }
        }
        self.failed.retain(|key, (spec, _)| local.get(key).is_some_and(|s| *s == spec));
        for (key, spec) in local {
            if !self.running.contains_key(key) {
                self.start_or_record(key.clone(), spec.clone()).await;
            }
        }
        self.apply_mesh(state);
        self.publish();
    }

    /// Swaps in a view built from `state` (services keep endpoint health),
    /// tells the kernel which VIPs to refuse (no endpoints), and asks for
    /// certificates of the identities now on the node. New connections
    /// follow the new view; open ones keep their upstream.
    fn apply_mesh(&self, state: &MeshState) {
        let view = MeshView::build(state, &self.proxy.mesh.load(), &self.proxy.balance, &self.proxy.trust_domain);
        if let Err(e) = self.proxy.capture.set_refused_vips(&view.services.refused()) {
            tracing::error!(error = %e, "updating the kernel's refused-VIP map failed; such connects reach the proxy and are reset there");
        }
        if let Some(mtls) = &self.proxy.mtls {
            let wanted = view.workloads.values().filter(|w| w.is_local()).map(|w| w.identity.clone()).collect();
            mtls.identities.set_wanted(wanted);
            mtls.identities.refresh();
        }
        self.proxy.mesh.store(Arc::new(view));
    }

    /// Retries pods that failed to start (their netns may exist by now).
    pub async fn retry_failed(&mut self) {
        if self.failed.is_empty() {
            return;
        }
        let failed = std::mem::take(&mut self.failed);
        for (key, (spec, _)) in failed {
            self.start_or_record(key, spec).await;
        }
        self.publish();
    }

    async fn start_or_record(&mut self, key: PodKey, spec: PodSpec) {
        let id = self.next_pod_id;
        self.next_pod_id = self.next_pod_id.wrapping_add(1).max(1);
        match self.start_pod(id, &spec).await {
            Ok(pod) => {
                tracing::info!(pod = %key, netns = %pod.ctx.netns.path().display(), cookie = pod.ctx.netns.cookie(),
                    listeners = ?pod.listeners, "pod meshed");
                self.failed.remove(&key);
                self.running.insert(key, pod);
            }
            Err(e) => {
                let message = e.to_string();
                let known = self.failed.get(&key).map(|(_, m)| m == &message).unwrap_or(false);
                if !known {
                    tracing::error!(pod = %key, error = %message, "pod not meshed; retrying");
                }
                self.failed.insert(key, (spec, message));
            }
        }
    }

    async fn start_pod(&self, id: u32, spec: &PodSpec) -> Result<RunningPod, PodError> {
        let ctx = Arc::new(
            PodContext::open(id, spec, self.own_netns_cookie, &self.proxy.trust_domain, self.proxy.forward.mark)
                .await?,
        );
        let listeners = ctx.bind_listeners(self.outbound_port).await?;
        let stop = self.proxy.shutdown.child_token();
        let mut addrs = Vec::with_capacity(listeners.len());
        let mut flags = 0;
        for listener in listeners {
            if listener.local_addr().map(|a| a.is_ipv6()).unwrap_or(false) {
                flags |= POD_FLAG_V6_LISTENER;
            }
            addrs.push(listener.local_addr().map_err(PodError::ListenerAddr)?);
            tokio::spawn(crate::outbound::serve(listener, ctx.clone(), self.proxy.clone(), stop.clone()));
        }
        if let Some(mtls) = &self.proxy.mtls {
            match ctx.bind_inbound(mtls.hbone_port).await {
                Ok(inbound) => {
                    for listener in inbound {
                        addrs.push(listener.local_addr().map_err(PodError::ListenerAddr)?);
                        tokio::spawn(crate::inbound::serve(listener, ctx.clone(), self.proxy.clone(), stop.clone()));
                    }
                }
                Err(e) => {
                    stop.cancel();
                    return Err(e);
                }
            }
        }
        // Capture only once the listeners are up: a connect steered to a
        // port nobody listens on would be refused.
        if let Err(e) = self
            .proxy
            .capture
            .mesh(ctx.netns.cookie(), MeshedPod { pod_id: id, outbound_port: u32::from(self.outbound_port), flags })
        {
            stop.cancel();
            return Err(PodError::Capture(e));
        }
        let strict = match self.proxy.mtls.as_ref().filter(|m| m.strict) {
            None => None,
            Some(_) => {
                let attached = std::fs::File::open(ctx.netns.path())
                    .map_err(|source| {
                        PodError::Netns(crate::netns::NetnsError::Open { path: ctx.netns.path().into(), source })
                    })
                    .and_then(|netns| self.proxy.capture.attach_strict(&netns).map_err(PodError::Capture));
                match attached {
                    Ok(link) => Some(link),
                    Err(e) => {
                        let _ = self.proxy.capture.unmesh(ctx.netns.cookie());
                        stop.cancel();
                        return Err(e);
                    }
                }
            }
        };
        Ok(RunningPod { spec: spec.clone(), ctx, listeners: addrs, stop, strict })
    }

    fn stop_pod(&self, key: &PodKey, pod: RunningPod) {
        // Un-mesh first so new connects go direct, then close the listeners;
        // connections already accepted run to completion.
        if let Err(e) = self.proxy.capture.unmesh(pod.ctx.netns.cookie()) {
            tracing::error!(pod = %key, error = %e, "un-meshing pod failed");
        }
        pod.stop.cancel();
        if let Some(link) = pod.strict {
            if let Err(e) = self.proxy.capture.detach_strict(link) {
                tracing::error!(pod = %key, error = %e, "detaching the strict-mode program failed");
            }
        }
        tracing::info!(pod = %key, "pod un-meshed");
    }

    /// Shutdown: stop capturing every pod so new connects go direct, give
    /// connects already steered a moment to be accepted, then close the
    /// listeners. Accepted connections keep running.
    pub async fn unmesh_all(&mut self) {
        for (key, pod) in &self.running {
            if let Err(e) = self.proxy.capture.unmesh(pod.ctx.netns.cookie()) {
                tracing::error!(pod = %key, error = %e, "un-meshing pod failed");
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        for (_, pod) in std::mem::take(&mut self.running) {
            pod.stop.cancel();
        }
        self.publish();
    }

    fn publish(&self) {
        self.proxy.metrics.pods_meshed.set(self.running.len() as i64);
        let mut pods: Vec<PodStatus> = self
            .running
            .iter()
            .map(|(key, pod)| PodStatus {
                key: key.clone(),
                spec: pod.spec.clone(),
                netns_cookie: Some(pod.ctx.netns.cookie()),
                listeners: pod.listeners.clone(),
                error: None,
            })
            .collect();
        pods.extend(self.failed.iter().map(|(key, (spec, error))| PodStatus {
            key: key.clone(),
            spec: spec.clone(),
            netns_cookie: None,
            listeners: Vec::new(),
            error: Some(error.clone()),
        }));
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        status.pods = pods;
        status.pods_ready = self.failed.is_empty();
    }
}

/// Loads the mesh file every `interval` and applies changes until shutdown.
pub async fn reload_loop(
    mut node: Node,
    mut watch: FileWatch,
    interval: std::time::Duration,
    shutdown: CancellationToken,
) -> Node {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return node,
            _ = ticker.tick() => {}
        }
        match watch.poll().await {
            Ok(Some(state)) => {
                node.reconcile(&state).await;
                node.proxy.metrics.config_reloads.get_or_create(&ResultLabels { result: "applied" }).inc();
                node.record_reload(None);
                tracing::info!(file = %watch.path().display(), pods = state.pods.len(), "mesh file applied");
            }
            Ok(None) => node.retry_failed().await,
            Err(e) => {
                let message = e.to_string();
                if node.record_reload(Some(message.clone())) {
                    node.proxy.metrics.config_reloads.get_or_create(&ResultLabels { result: "rejected" }).inc();
                    tracing::error!(error = %message, "mesh file rejected; the last good state stays in force");
                }
                node.retry_failed().await;
            }
        }
    }
}

impl Node {
    /// Records the outcome of a load; true when it differs from the last one.
    fn record_reload(&self, error: Option<String>) -> bool {
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        status.loaded_once |= error.is_none();
        let changed = status.last_reload_error != error;
        status.last_reload_error = error;
        changed
    }
}
