//! The endpoint step: how a connection to one address travels (directly,
//! or through a tunnel to a meshed pod), connecting it, and — for a service
//! — choosing endpoints with retries on others and ejection.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration, time::Instant};

use tokio::net::{TcpSocket, TcpStream};

use super::failure::Failure;
use crate::{
    balance::{InFlight, NoEndpoint},
    identity::Identity,
    metrics::{Metrics, ServiceLabels},
    pod::PodContext,
    policy::{self, Decision},
    store::{ServiceRoute, Snapshot, WorkloadEntry},
    transport::{Duplex, Either},
    tunnel::{Tunnel, TunnelClient},
};

/// How a connection to one address travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A plain TCP connection from the source pod's netns.
    Direct(SocketAddr),
    /// A CONNECT stream in a mutual-TLS tunnel to the meshed pod at the
    /// address, which must prove `identity`.
    Hbone { authority: SocketAddr, identity: Identity },
}

impl Target {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Self::Direct(a) => *a,
            Self::Hbone { authority, .. } => *authority,
        }
    }

    pub fn security(&self) -> &'static str {
        match self {
            Self::Direct(_) => "plaintext",
            Self::Hbone { .. } => "mutual_tls",
        }
    }
}

/// A connected upstream, whatever it is.
pub trait Upstream: Duplex {
    /// The kernel's smoothed RTT of the TCP connection underneath.
    fn rtt(&self) -> Option<Duration>;
}

impl Upstream for TcpStream {
    fn rtt(&self) -> Option<Duration> {
        crate::sys::tcp_rtt(std::os::fd::AsFd::as_fd(self))
    }
}

impl Upstream for Tunnel {
    fn rtt(&self) -> Option<Duration> {
        Tunnel::rtt(self)
    }
}

impl<L: Upstream, R: Upstream> Upstream for Either<L, R> {
    fn rtt(&self) -> Option<Duration> {
        match self {
            Either::Left(l) => l.rtt(),
            Either::Right(r) => r.rtt(),
        }
    }
}

/// Makes upstream connections. The real one dials from the pod's netns or
/// opens tunnels; tests substitute in-memory connections.
pub trait Connect: Send + Sync + 'static {
    type Io: Upstream + Send + Unpin + 'static;
    /// Whether tunnels can be opened (a certificate source is configured).
    fn mtls(&self) -> bool;
    /// `--mtls strict`: meshed pods of this node are tunnelled to as well.
    fn strict(&self) -> bool;
    /// `client`: the application's address as it would be without the
    /// mesh (its pod address and port), passed on to the receiving side.
    fn connect(
        &self,
        pod: &PodContext,
        target: &Target,
        client: SocketAddr,
    ) -> impl Future<Output = Result<Self::Io, Failure>> + Send;
}

/// The real connector.
#[derive(Debug)]
pub struct Connector {
    pub tunnels: Option<Arc<TunnelClient>>,
    pub strict: bool,
}

impl Connect for Connector {
    type Io = Either<TcpStream, Tunnel>;

    fn mtls(&self) -> bool {
        self.tunnels.is_some()
    }

    fn strict(&self) -> bool {
        self.strict
    }

    async fn connect(&self, pod: &PodContext, target: &Target, client: SocketAddr) -> Result<Self::Io, Failure> {
        match target {
            Target::Direct(dest) => connect_direct(pod, *dest).await.map(Either::Left),
            Target::Hbone { authority, identity } => {
                let tunnels = self.tunnels.as_ref().ok_or(Failure::NoMtls { dest: *authority })?;
                Ok(Either::Right(tunnels.open(pod, *authority, identity, Some(client)).await?))
            }
        }
    }
}

/// One TCP connect to `dest` from a socket made in the pod's netns. The
/// caller bounds it in time.
async fn connect_direct(pod: &PodContext, dest: SocketAddr) -> Result<TcpStream, Failure> {
    let socket = pod.upstream_socket(dest.ip()).await.map_err(|e| Failure::Socket(e.to_string()))?;
    TcpSocket::from_std_stream(socket).connect(dest).await.map_err(|e| match e.kind() {
        io::ErrorKind::ConnectionRefused => Failure::Refused { dest },
        io::ErrorKind::TimedOut => Failure::Timeout { dest, after: Duration::ZERO },
        io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable => {
            Failure::NoRoute { dest, reason: e.to_string() }
        }
        _ => Failure::Connect { dest, reason: e.to_string() },
    })
}

/// How a connection from `pod` to `addr` travels, per the mesh: a meshed
/// pod on another node (any meshed pod under strict mTLS) through a tunnel;
/// a meshed pod of this node directly, once authorization allows it (the
/// source knows both identities); anything else directly.
pub fn target_for(snapshot: &Snapshot, pod: &PodContext, addr: SocketAddr, strict: bool) -> Result<Target, Failure> {
    let Some(w) = snapshot.workload(addr.ip()) else { return Ok(Target::Direct(addr)) };
    if !w.workload.is_local() || strict {
        return Ok(Target::Hbone { authority: addr, identity: w.identity.clone() });
    }
    let policies = snapshot.policies_for(&w.workload.key.namespace);
    // The source address the destination will see: the pod's own, of the
    // destination's family.
    let ip = pod.ips.iter().copied().find(|ip| ip.is_ipv6() == addr.is_ipv6()).unwrap_or(addr.ip());
    let source = policy::Source { identity: Some(&pod.identity), ip };
    if let Decision::Deny { policy } = policy::check(policies, &w.workload, source, addr.port()) {
        return Err(Failure::Denied { policy });
    }
    Ok(Target::Direct(addr))
}

/// A connected upstream and how it was reached.
pub struct Connected<Io> {
    pub io: Io,
    pub addr: SocketAddr,
    pub security: &'static str,
    /// The meshed pod reached, if it is one.
    pub workload: Option<Arc<WorkloadEntry>>,
    /// (endpoint index, its in-flight guard) when chosen by a balancer.
    pub endpoint: Option<(usize, InFlight)>,
    /// Connect attempts made (more than one when endpoints failed).
    pub attempts: u32,
}

/// What connecting needs besides the connector.
pub struct ConnectContext<'a> {
    pub snapshot: &'a Snapshot,
    pub pod: &'a PodContext,
    /// The application's address as it would be without the mesh.
    pub client: SocketAddr,
    pub timeout: Duration,
    pub metrics: &'a Metrics,
}

pub(super) async fn attempt<C: Connect>(c: &C, cx: &ConnectContext<'_>, target: &Target) -> Result<C::Io, Failure> {
    let dest = target.addr();
    // A tunnel bounds its own steps, each by the timeout: the dial it may
    // share with other streams to the peer, then its CONNECT. Cutting it
    // here at the same moment would cancel a shared dial under the feet of
    // the streams waiting on it (each would dial again); this bound only
    // catches what those miss.
    let bound = match target {
        Target::Hbone { .. } => cx.timeout * 2,
        Target::Direct(_) => cx.timeout,
    };
    match tokio::time::timeout(bound, c.connect(cx.pod, target, cx.client)).await {
        Ok(Err(Failure::Timeout { dest, .. })) => Err(Failure::Timeout { dest, after: cx.timeout }),
        Ok(result) => result,
        Err(_) => Err(Failure::Timeout { dest, after: cx.timeout }),
    }
}

/// A connection to an address that is not a service.
pub async fn connect_passthrough<C: Connect>(
    c: &C,
    cx: &ConnectContext<'_>,
    dest: SocketAddr,
) -> Result<Connected<C::Io>, Failure> {
    let target = target_for(cx.snapshot, cx.pod, dest, c.strict())?;
    let io = attempt(c, cx, &target).await?;
    Ok(Connected {
        io,
        addr: dest,
        security: target.security(),
        workload: cx.snapshot.workload(dest.ip()).cloned(),
        endpoint: None,
        attempts: 1,
    })
}

/// The most connect attempts per connection (`--connect-attempts` is 1–10).
const MAX_ATTEMPTS: usize = 10;

/// A connection to an endpoint of `route`: a failure that is the
/// endpoint's counts against it (and may eject it), and the next attempt
/// goes to an endpoint not yet tried, up to `attempts` in all.
pub async fn connect_route<C: Connect>(
    c: &C,
    cx: &ConnectContext<'_>,
    route: &ServiceRoute,
    attempts: u32,
) -> Result<Connected<C::Io>, Failure> {
    let service = || route.service.to_string();
    let attempts = (attempts.max(1) as usize).min(MAX_ATTEMPTS);
    // Endpoints tried so far, on the stack: no allocation per connection.
    let (mut tried, mut n) = ([0usize; MAX_ATTEMPTS], 0);
    let mut last = None;
    while n < attempts {
        let i = match route.balancer.pick(&tried[..n]) {
            Ok(i) => i,
            Err(NoEndpoint::None) => return Err(Failure::NoEndpoints { service: service() }),
            Err(NoEndpoint::AllUnavailable) => break,
        };
        tried[n] = i;
        n += 1;
        let endpoint = &route.balancer.endpoints()[i];
        let target = target_for(cx.snapshot, cx.pod, endpoint.addr, c.strict())?;
        let in_flight = route.balancer.start(i);
        let started = Instant::now();
        match attempt(c, cx, &target).await {
            Ok(io) => {
                route.balancer.observe(i, started.elapsed());
                route.balancer.succeeded(i);
                return Ok(Connected {
                    io,
                    addr: endpoint.addr,
                    security: target.security(),
                    workload: cx.snapshot.workload(endpoint.addr.ip()).cloned(),
                    endpoint: Some((i, in_flight)),
                    attempts: n as u32,
                });
            }
            Err(e) if !e.is_retryable() => return Err(e),
            Err(e) => {
                drop(in_flight);
                if !e.is_endpoint_fault() {
                    // Our own trouble: another endpoint would fare no better.
                    return Err(e);
                }
                if let Some(time) = route.balancer.failed(i) {
                    cx.metrics.ejections.get_or_create(&ServiceLabels::of(&route.service)).inc();
                    tracing::warn!(service = %route.service, endpoint = %endpoint.addr, ejected_for = ?time, error = %e,
                        "endpoint ejected after consecutive connect failures");
                } else {
                    tracing::debug!(service = %route.service, endpoint = %endpoint.addr, error = %e, "connect attempt failed");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| Failure::NoHealthyEndpoints { service: service() }))
}
