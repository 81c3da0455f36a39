//! Connecting upstream from inside the source pod's netns: to an address,
//! or to a service VIP through its balancer, retrying on other endpoints.

use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::net::{TcpSocket, TcpStream};

use crate::{
    balance::{InFlight, NoEndpoint},
    metrics::ServiceLabels,
    node::PodContext,
    policy::Decision,
    proxy::Proxy,
    services::ServiceRoute,
    tunnel::{Tunnel, TunnelContext, TunnelTarget},
    view::MeshView,
};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("connection to {dest} refused: is anything listening there?")]
    Refused { dest: SocketAddr },
    #[error("connection to {dest} timed out after {timeout:?}: is the destination reachable from the pod?")]
    Timeout { dest: SocketAddr, timeout: Duration },
    #[error("no route to {dest}: {source}")]
    NoRoute {
        dest: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {dest}: {source}")]
    Connect {
        dest: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("making a socket in the pod's netns: {0}")]
    Netns(#[from] crate::netns::NetnsError),
    #[error("tunnel: {0}")]
    Tunnel(#[from] crate::tunnel::TunnelError),
    #[error("{dest} is a meshed pod elsewhere, but this proxy has no certificates: pass --cert-dir or --ca-dir")]
    NoMtls { dest: SocketAddr },
    #[error("denied by authorization policy {policy}")]
    Denied { policy: String },
    #[error("service {service} has no endpoints: add some to the mesh file")]
    NoEndpoints { service: String },
    #[error("every endpoint of service {service} is ejected after connect failures: are its pods running?")]
    NoHealthyEndpoints { service: String },
}

impl ForwardError {
    /// The `reason` label of the failure counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Refused { .. } => "connect_refused",
            Self::Timeout { .. } => "connect_timeout",
            Self::NoRoute { .. } => "no_route",
            Self::Connect { .. } | Self::Netns(_) => "connect_error",
            Self::Tunnel(e) => e.reason(),
            Self::NoMtls { .. } => "tls_failure",
            Self::Denied { .. } => "denied",
            Self::NoEndpoints { .. } => "no_endpoints",
            Self::NoHealthyEndpoints { .. } => "no_healthy_endpoints",
        }
    }
}

/// How the bytes leave: a plain TCP connection, or a stream in a mutual-TLS tunnel.
pub enum UpstreamConn {
    Plain(TcpStream),
    Tunnel(Box<Tunnel>),
}

impl UpstreamConn {
    pub fn security(&self) -> &'static str {
        match self {
            Self::Plain(_) => "plaintext",
            Self::Tunnel(_) => "mutual_tls",
        }
    }
}

/// A connected upstream and, for a service, the endpoint it belongs to.
pub struct Upstream {
    pub conn: UpstreamConn,
    pub addr: SocketAddr,
    /// (endpoint index, its in-flight guard) when chosen by a balancer.
    pub endpoint: Option<(usize, InFlight)>,
    /// Connect attempts made (more than one when endpoints failed).
    pub attempts: u32,
}

/// Connects to `dest` the way the mesh says: through a tunnel to a meshed
/// pod on another node (or any meshed pod with `--mtls strict`), directly
/// otherwise — after checking authorization when the destination is a pod
/// of this node reached directly.
pub async fn connect_to(
    pod: &PodContext,
    dest: SocketAddr,
    proxy: &Proxy,
    view: &MeshView,
) -> Result<UpstreamConn, ForwardError> {
    let strict = proxy.mtls.as_ref().is_some_and(|m| m.strict);
    if let Some(w) = view.tunnel_peer(dest, strict) {
        let mtls = proxy.mtls.as_ref().ok_or(ForwardError::NoMtls { dest })?;
        let target = TunnelTarget {
            peer: SocketAddr::new(dest.ip(), mtls.hbone_port),
            authority: dest,
            identity: w.identity.clone(),
        };
        let ctx = TunnelContext {
            tls: &mtls.tls,
            pool: &mtls.pool,
            mark: proxy.forward.mark,
            connect_timeout: proxy.forward.connect_timeout,
        };
        let tunnel = crate::tunnel::open(pod, &pod.identity, &target, &ctx).await?;
        return Ok(UpstreamConn::Tunnel(Box::new(tunnel)));
    }
    if let Some(w) = view.workload(dest.ip()) {
        if let Decision::Deny { policy } = view.authz.check(&w.spec, Some(&pod.identity), dest.port()) {
            return Err(ForwardError::Denied { policy });
        }
    }
    connect_direct(pod, dest, proxy).await.map(UpstreamConn::Plain)
}

/// One connect to `dest` from a socket made in the pod's netns.
pub async fn connect_direct(pod: &PodContext, dest: SocketAddr, proxy: &Proxy) -> Result<TcpStream, ForwardError> {
    let socket = pod.upstream_socket(dest.ip()).await.map_err(|source| ForwardError::Connect { dest, source })?;
    let socket = TcpSocket::from_std_stream(socket);
    let timeout = proxy.forward.connect_timeout;
    match tokio::time::timeout(timeout, socket.connect(dest)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(match e.kind() {
            io::ErrorKind::ConnectionRefused => ForwardError::Refused { dest },
            io::ErrorKind::TimedOut => ForwardError::Timeout { dest, timeout },
            io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable => {
                ForwardError::NoRoute { dest, source: e }
            }
            _ => ForwardError::Connect { dest, source: e },
        }),
        Err(_) => Err(ForwardError::Timeout { dest, timeout }),
    }
}

/// Connects to an endpoint of `route`: a failed attempt counts against the
/// endpoint (and may eject it) and the next attempt goes to another one.
pub async fn connect_service(
    pod: &PodContext,
    route: &ServiceRoute,
    proxy: &Proxy,
    view: &MeshView,
) -> Result<Upstream, ForwardError> {
    let service = route.service.to_string();
    let attempts = proxy.forward.connect_attempts.max(1) as usize;
    let mut tried = Vec::with_capacity(attempts);
    let mut last = None;
    while tried.len() < attempts {
        let i = match route.balancer.pick(&tried) {
            Ok(i) => i,
            Err(NoEndpoint::None) => return Err(ForwardError::NoEndpoints { service }),
            Err(NoEndpoint::AllUnavailable) => break,
        };
        tried.push(i);
        let endpoint = &route.balancer.endpoints()[i];
        let in_flight = endpoint.health.start();
        let started = Instant::now();
        match connect_to(pod, endpoint.addr, proxy, view).await {
            // A policy refusal is not the endpoint's fault: do not retry or eject.
            Err(
                e @ (ForwardError::Denied { .. } | ForwardError::Tunnel(crate::tunnel::TunnelError::Denied { .. })),
            ) => {
                return Err(e);
            }
            Ok(conn) => {
                route.balancer.observe(i, started.elapsed());
                route.balancer.succeeded(i);
                return Ok(Upstream {
                    conn,
                    addr: endpoint.addr,
                    endpoint: Some((i, in_flight)),
                    attempts: tried.len() as u32,
                });
            }
            Err(e) => {
                drop(in_flight);
                if let Some(time) = route.balancer.failed(i) {
                    proxy.metrics.ejections.get_or_create(&ServiceLabels::of(&route.service)).inc();
                    tracing::warn!(service = %service, endpoint = %endpoint.addr, target = %endpoint.label,
                        ejected_for = ?time, error = %e, "endpoint ejected after consecutive connect failures");
                } else {
                    tracing::debug!(service = %service, endpoint = %endpoint.addr, error = %e, "connect attempt failed");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(ForwardError::NoHealthyEndpoints { service }))
}
