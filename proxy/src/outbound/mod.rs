//! Outbound: connections captured leaving a meshed pod of this node.
//!
//! Each meshed pod has listeners on `127.0.0.1:15001` and `[::1]:15001`
//! inside its own netns; the listener that accepted a connection tells us
//! which pod it came from. A connection then goes through steps, each its
//! own small piece, generic over the connection type so the whole path runs
//! in unit tests without a kernel:
//!
//! 1. accept — the original destination, from an [`OrigDst`] (the kernel
//!    maps in production);
//! 2. logical destination — a service's VIP:port or a passthrough address;
//! 3. protocol — declared by the port, or detected from the first bytes
//!    ([`detect`]: HTTP/1, h2 or opaque); HTTP goes to the HTTP layer
//!    ([`http`], request by request) under `--http true`;
//! 4. endpoint — direct or through a tunnel ([`Connect`]), with retries on
//!    other endpoints and ejection for a service;
//! 5. relay, then one metric update and one access-log line.
//!
//! Failures are one typed enum ([`Failure`]) that yields the metric label,
//! the access-log flag, and whether the endpoint is to blame.
#![forbid(unsafe_code)]

pub mod detect;
mod endpoint;
mod failure;
mod forward;
pub mod http;
#[cfg(test)]
mod tests;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use std::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use detect::Detected;
pub use endpoint::{Connect, Connector, Target, Upstream};
pub use failure::{Failure, Reason};
pub use forward::{Accepted, Logical};
pub use http::HttpSettings;

use crate::{
    capture::Capture,
    metrics::Metrics,
    pod::PodContext,
    store::MeshReader,
    transport::{RelayOptions, Workers},
};

/// Where a captured connection was going. The kernel maps in production.
pub trait OrigDst: Send + Sync + 'static {
    /// `Ok(None)`: not a captured connection (someone dialled the listener
    /// directly) or its entry was lost — never guess a destination.
    fn lookup(&self, netns_cookie: u64, client: SocketAddr, listener: SocketAddr)
        -> Result<Option<SocketAddr>, String>;
}

impl OrigDst for Capture {
    fn lookup(
        &self,
        netns_cookie: u64,
        client: SocketAddr,
        listener: SocketAddr,
    ) -> Result<Option<SocketAddr>, String> {
        let key = outrigger_common::ConnKey {
            netns_cookie,
            client: crate::capture::addr::to_kernel(client),
            listener: crate::capture::addr::to_kernel(listener),
        };
        self.original_destination(&key).map_err(|e| e.to_string())
    }
}

/// Knobs of the outbound path, from the command line.
#[derive(Debug, Clone)]
pub struct OutboundSettings {
    /// Per connect attempt (TCP connect, or tunnel setup).
    pub connect_timeout: Duration,
    /// Attempts for a service VIP, each on another endpoint.
    pub connect_attempts: u32,
    pub relay: RelayOptions,
    /// `--protocol-detect-timeout` (zero: no detection).
    pub detect_timeout: Duration,
    /// `--opaque-ports`: never detected.
    pub opaque_ports: Arc<[u16]>,
    /// `--http`: detected HTTP is served by the HTTP layer (else relayed
    /// as opaque TCP).
    pub http: bool,
    pub http_layer: HttpSettings,
}

/// What every outbound connection shares; generic over the connector so
/// tests can substitute in-memory upstreams.
pub struct Core<C> {
    pub mesh: MeshReader,
    pub orig_dst: Arc<dyn OrigDst>,
    pub connector: C,
    pub metrics: Arc<Metrics>,
    pub settings: OutboundSettings,
    /// Cancelled when the drain deadline passes: open connections are cut
    /// (reset, logged with flag `DC`).
    pub drain_cut: CancellationToken,
    /// Each pod's upstream HTTP connections.
    pub pools: http::Pools,
}

/// The outbound side of the proxy: the core plus the tasks it runs.
pub struct Outbound {
    core: Arc<Core<Connector>>,
    /// The threads connections are dealt to (and the tracker of every
    /// connection task, so shutdown can wait for them to drain).
    workers: Arc<Workers>,
}

impl Outbound {
    pub fn new(core: Core<Connector>, workers: Arc<Workers>) -> Self {
        Self { core: Arc::new(core), workers }
    }

    /// Serves one pod-local listener until `stop` is cancelled.
    pub async fn serve(self: Arc<Self>, listener: Arc<TcpListener>, pod: Arc<PodContext>, stop: CancellationToken) {
        let local = match listener.local_addr() {
            Ok(addr) => addr,
            Err(e) => {
                tracing::error!(pod = %pod.key, error = %e, "listener has no local address; not serving it");
                return;
            }
        };
        let workers = self.workers.clone();
        let accept_pod = pod.clone();
        let on_accept = move |stream, peer| {
            let pod = &accept_pod;
            // One pod cannot take every descriptor: past its limit, its new
            // connections are reset at once.
            let Some(slot) = pod.connection_slot() else {
                crate::transport::reset(stream);
                self.core.metrics.limit_refused(&pod.key, "pod_connections");
                crate::warn_throttled!(pod = %pod.key, "the pod is at --max-connections-per-pod: new connections are reset");
                return;
            };
            let conn = Accepted { pod: pod.clone(), peer, local };
            let this = self.clone();
            self.workers.serve(stream, peer, move |stream| async move {
                let _slot = slot;
                forward::run(stream, conn, &this.core).await
            });
        };
        workers.accept_until(&listener, &stop, &pod.handed_over, pod.key.clone(), on_accept).await;
    }
}
