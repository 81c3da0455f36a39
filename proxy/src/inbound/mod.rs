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

mod stream;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use stream::{validate_connect, BadRequest};

use crate::{
    metrics::Metrics, pod::PodContext, store::MeshReader, tls::peer_identity, tls::TlsConfigs, transport::RelayOptions,
};

/// Knobs of the inbound path.
#[derive(Debug, Clone, Copy)]
pub struct InboundSettings {
    /// Connecting to the application inside the pod.
    pub connect_timeout: Duration,
    /// A TLS handshake not finished by then is dropped (slow or hostile
    /// clients must not hold sockets).
    pub handshake_timeout: Duration,
    /// Streams one tunnel connection may carry at once.
    pub max_streams: u32,
    pub relay: RelayOptions,
}

pub struct Inbound {
    pub(crate) mesh: MeshReader,
    pub(crate) tls: Arc<TlsConfigs>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) settings: InboundSettings,
    tasks: TaskTracker,
}

impl Inbound {
    pub fn new(
        mesh: MeshReader,
        tls: Arc<TlsConfigs>,
        metrics: Arc<Metrics>,
        settings: InboundSettings,
        tasks: TaskTracker,
    ) -> Self {
        Self { mesh, tls, metrics, settings, tasks }
    }

    /// Serves one pod's tunnel listener until `stop` is cancelled.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, pod: Arc<PodContext>, stop: CancellationToken) {
        crate::transport::accept_until(&listener, &stop, &pod.key, |tcp, peer| {
            let (this, pod, stop) = (self.clone(), pod.clone(), stop.clone());
            self.tasks.spawn(async move { this.connection(tcp, peer, pod, stop).await });
        })
        .await;
    }

    fn refused_handshake(&self, pod: &PodContext, peer: SocketAddr, error: &str) {
        self.metrics.inbound(&pod.key, "tls_failure").inc();
        tracing::info!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, peer = %peer,
            result = "tls_failure", error, "tunnel refused");
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        pod: Arc<PodContext>,
        stop: CancellationToken,
    ) {
        let _ = tcp.set_nodelay(true);
        let config = match self.tls.server(&pod.identity) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(pod = %pod.key, error = %e, "cannot accept tunnels for this pod");
                return;
            }
        };
        let accept = TlsAcceptor::from(config).accept(tcp);
        let tls = match tokio::time::timeout(self.settings.handshake_timeout, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return self.refused_handshake(&pod, peer, &e.to_string()),
            Err(_) => return self.refused_handshake(&pod, peer, "handshake timed out"),
        };
        // The verifier already required exactly one SPIFFE ID of our domain.
        let peer_cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
        let Some(peer_id) = peer_cert.as_ref().and_then(peer_identity) else {
            return;
        };
        // Which certificate the peer presented: rotation shows in the logs.
        let serial: Arc<str> = peer_cert
            .as_ref()
            .and_then(|c| crate::identity::cert::describe(c).ok())
            .map(|i| i.serial)
            .unwrap_or_default()
            .into();
        // The network side's RTT, read once now rather than holding a
        // second descriptor of the socket for the connection's lifetime.
        let rtt = crate::sys::tcp_rtt(std::os::fd::AsFd::as_fd(tls.get_ref().0));
        let mut h2 = match crate::tunnel::server_builder(self.settings.max_streams).handshake::<_, Bytes>(tls).await {
            Ok(h2) => h2,
            Err(e) => {
                tracing::debug!(pod = %pod.key, peer = %peer, error = %e, "HTTP/2 handshake failed");
                return;
            }
        };
        let peer = Arc::new(stream::Peer { addr: peer, identity: peer_id, serial, rtt });
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => {
                    h2.graceful_shutdown();
                    // Keep driving the connection so open streams can finish.
                    while let Some(Ok((req, respond))) = h2.accept().await {
                        drop((req, respond));
                    }
                    return;
                }
                next = h2.accept() => next,
            };
            match next {
                Some(Ok((request, respond))) => {
                    let (this, pod, peer) = (self.clone(), pod.clone(), peer.clone());
                    self.tasks.spawn(async move { this.stream(request, respond, &peer, pod).await });
                }
                Some(Err(e)) => {
                    tracing::debug!(pod = %pod.key, peer = %peer.addr, error = %e, "tunnel connection error");
                    return;
                }
                None => return,
            }
        }
    }
}
