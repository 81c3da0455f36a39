//! Inbound: tunnels arriving at a meshed pod's `POD_IP:15008`.
//!
//! The listener lives in the pod's netns. It accepts mutual TLS 1.3 as the
//! pod's identity, requires a client certificate of our trust domain, then
//! serves HTTP/2 `CONNECT`s — only to the pod's own addresses (never an open
//! relay), only when authorization allows the peer — by connecting to the
//! application from inside the pod, over the pod's loopback interface.
//! Every stream is accounted for (a counter by result and an access-log
//! line), including one the peer resets before it is served: the
//! application is never dialled for a stream that is already gone.
#![forbid(unsafe_code)]

mod deliver;
mod http_layer;
mod plaintext;
mod stream;

use std::{
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use stream::{validate_connect, BadRequest};

use crate::{
    clock::now_nanos,
    metrics::Metrics,
    pod::{PodContext, Slot},
    store::MeshReader,
    tls::{peer_identity, TlsConfigs},
    transport::RelayOptions,
};

/// Knobs of the inbound path.
#[derive(Debug, Clone)]
pub struct InboundSettings {
    /// Connecting to the application inside the pod.
    pub connect_timeout: Duration,
    /// The whole pre-stream phase — TLS handshake, HTTP/2 handshake, first
    /// CONNECT — must finish within this, or the connection is dropped
    /// (slow or hostile clients must not hold sockets).
    pub handshake_timeout: Duration,
    /// A tunnel connection with no stream for this long is closed (GOAWAY).
    pub idle_timeout: Duration,
    /// Connections to one pod still in the pre-stream phase, at most.
    pub max_pending_handshakes: usize,
    /// Streams one tunnel connection may carry at once.
    pub max_streams: u32,
    /// The proxy's own ports in every pod (outbound, tunnel, plaintext
    /// inbound): never delivered to.
    pub reserved_ports: [u16; 3],
    pub relay: RelayOptions,
    /// `--http`: streams that speak HTTP are served request by request
    /// (for inbound request metrics).
    pub http: bool,
    /// `--protocol-detect-timeout`.
    pub detect_timeout: std::time::Duration,
    /// `--opaque-ports`: never detected.
    pub opaque_ports: Arc<[u16]>,
}

pub struct Inbound {
    pub(crate) mesh: MeshReader,
    /// Tunnels are served only with certificates.
    pub(crate) tls: Option<Arc<TlsConfigs>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) settings: InboundSettings,
    /// Where original-source deliveries are announced (`None` in tests).
    pub(crate) capture: Option<Arc<crate::capture::Capture>>,
    /// The threads accepted connections are dealt to (and the tracker of
    /// every connection task).
    workers: Arc<crate::transport::Workers>,
    /// Node-wide pending handshakes (per pod: the pod's own limit).
    handshakes: Arc<tokio::sync::Semaphore>,
    pub(crate) drain_cut: CancellationToken,
}

impl Inbound {
    pub fn new(
        mesh: MeshReader,
        tls: Option<Arc<TlsConfigs>>,
        metrics: Arc<Metrics>,
        settings: InboundSettings,
        capture: Option<Arc<crate::capture::Capture>>,
        workers: Arc<crate::transport::Workers>,
        drain_cut: CancellationToken,
    ) -> Self {
        let handshakes = Arc::new(tokio::sync::Semaphore::new(settings.max_pending_handshakes));
        Self { mesh, tls, metrics, settings, capture, workers, handshakes, drain_cut }
    }

    /// Serves one pod's tunnel listener until `stop` is cancelled.
    pub async fn serve(self: Arc<Self>, listener: Arc<TcpListener>, pod: Arc<PodContext>, stop: CancellationToken) {
        let workers = self.workers.clone();
        let (accept_pod, accept_stop) = (pod.clone(), stop.clone());
        let on_accept = move |tcp, peer| {
            let (pod, stop) = (&accept_pod, &accept_stop);
            // Unauthenticated connections are capped per pod and per node,
            // so a flood of them cannot take the descriptors others need.
            let slots = match (pod.handshake_slot(), self.handshakes.clone().try_acquire_owned()) {
                (Some(pod_slot), Ok(node_slot)) => (pod_slot, node_slot),
                (pod_slot, _) => {
                    let limit = if pod_slot.is_none() { "pod_handshakes" } else { "node_handshakes" };
                    crate::transport::reset(tcp);
                    self.metrics.limit_refused(&pod.key, limit);
                    crate::warn_throttled!(pod = %pod.key, limit, peer = %peer,
                        "too many tunnel handshakes in progress: new connections are reset");
                    return;
                }
            };
            let (this, pod, stop) = (self.clone(), pod.clone(), stop.clone());
            self.workers.serve(tcp, peer, move |tcp| async move { this.connection(tcp, peer, pod, stop, slots).await });
        };
        workers.accept_until(&listener, &stop, &pod.handed_over, pod.key.clone(), on_accept).await;
    }

    fn refused_handshake(&self, pod: &PodContext, peer: SocketAddr, error: &str) {
        self.metrics.inbound(&pod.key, "tls_failure").inc();
        // Unauthenticated: a flood of these must not flood the log.
        crate::info_throttled!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, peer = %peer,
            result = "tls_failure", error, "tunnel refused");
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        pod: Arc<PodContext>,
        stop: CancellationToken,
        slots: (Slot, Slot),
    ) {
        let Some(tls) = &self.tls else { return };
        let config = match tls.server(&pod.identity) {
            Ok(c) => c,
            Err(e) => {
                crate::warn_throttled!(pod = %pod.key, error = %e, "cannot accept tunnels for this pod");
                return;
            }
        };
        // The pre-stream phase, under one deadline: TLS, HTTP/2, first CONNECT.
        let setup = async {
            let tls = TlsAcceptor::from(config).accept(tcp).await.map_err(|e| Setup::Tls(e.to_string()))?;
            // The verifier already required exactly one SPIFFE ID of our domain.
            let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
            let identity = cert.as_ref().and_then(peer_identity).ok_or(Setup::Tls("no SPIFFE ID".into()))?;
            // Which certificate the peer presented: rotation shows in the logs.
            let serial: Arc<str> = cert
                .as_ref()
                .and_then(|c| crate::identity::cert::describe(c).ok())
                .map(|i| i.serial)
                .unwrap_or_default()
                .into();
            // The network side's RTT, read once now rather than holding a
            // second descriptor of the socket for the connection's lifetime.
            let rtt = crate::sys::tcp_rtt(std::os::fd::AsFd::as_fd(tls.get_ref().0));
            let mut h2 = crate::tunnel::server_builder(self.settings.max_streams)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| Setup::H2(e.to_string()))?;
            let first = h2.accept().await;
            Ok::<_, Setup>((h2, first, stream::Peer { addr: peer, identity, serial, rtt }))
        };
        let (mut h2, first, peer) = match tokio::time::timeout(self.settings.handshake_timeout, setup).await {
            Ok(Ok(ready)) => ready,
            Ok(Err(Setup::Tls(e))) => return self.refused_handshake(&pod, peer, &e),
            Ok(Err(Setup::H2(e))) => {
                self.metrics.inbound(&pod.key, "h2_failure").inc();
                tracing::debug!(pod = %pod.key, peer = %peer, error = %e, "HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.inbound(&pod.key, "handshake_timeout").inc();
                crate::warn_throttled!(pod = %pod.key, peer = %peer, timeout = ?self.settings.handshake_timeout,
                    "tunnel connection closed: no CONNECT within the handshake deadline");
                return;
            }
        };
        // Authenticated and in use: the handshake slots are free again.
        drop(slots);
        let peer = Arc::new(peer);
        let active = Arc::new(Activity::default());
        let mut next = first;
        let mut idle_check = tokio::time::interval(
            self.settings.idle_timeout.min(Duration::from_secs(1)).max(Duration::from_millis(10)),
        );
        loop {
            match next {
                Some(Ok((request, respond))) => {
                    let (this, pod, peer, activity) = (self.clone(), pod.clone(), peer.clone(), active.clone());
                    activity.start();
                    self.workers.tasks().spawn(async move {
                        this.stream(request, respond, &peer, pod).await;
                        activity.end();
                    });
                }
                // This side's HTTP/2 layer closed the connection for the
                // peer's behaviour (a GOAWAY of its own, e.g. too many
                // streams reset before they were accepted: rapid reset).
                // Streams it dropped never reach here; the close is counted.
                Some(Err(e)) if e.is_go_away() && e.is_library() => {
                    self.metrics.inbound(&pod.key, "h2_failure").inc();
                    crate::warn_throttled!(pod = %pod.key, peer = %peer.addr, peer_identity = %peer.identity,
                        error = %e, "tunnel connection closed: the peer broke HTTP/2 limits");
                    return;
                }
                Some(Err(e)) => {
                    tracing::debug!(pod = %pod.key, peer = %peer.addr, error = %e, "tunnel connection error");
                    return;
                }
                None => return,
            }
            next = loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        h2.graceful_shutdown();
                        // Keep driving the connection so open streams can finish.
                        while let Some(Ok((req, respond))) = h2.accept().await {
                            drop((req, respond));
                        }
                        return;
                    }
                    next = h2.accept() => break next,
                    _ = idle_check.tick() => {
                        if active.idle_for() >= self.settings.idle_timeout {
                            tracing::debug!(pod = %pod.key, peer = %peer.addr, "closing an idle tunnel connection");
                            h2.graceful_shutdown();
                        }
                    }
                }
            };
        }
    }
}

/// How the pre-stream phase failed.
enum Setup {
    Tls(String),
    H2(String),
}

/// Streams open on one tunnel connection, and since when it has had none.
#[derive(Debug)]
struct Activity {
    open: AtomicUsize,
    /// `now_nanos()` when the last stream ended.
    idle_since: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self { open: AtomicUsize::new(0), idle_since: AtomicU64::new(now_nanos()) }
    }
}

impl Activity {
    fn start(&self) {
        self.open.fetch_add(1, Ordering::AcqRel);
    }

    fn end(&self) {
        self.idle_since.store(now_nanos(), Ordering::Relaxed);
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Zero while a stream is open.
    fn idle_for(&self) -> Duration {
        if self.open.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(now_nanos().saturating_sub(self.idle_since.load(Ordering::Relaxed)))
    }
}
