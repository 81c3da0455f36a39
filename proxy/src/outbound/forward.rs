//! One captured connection through the steps: original destination →
//! logical destination (service port or passthrough) → protocol (opaque
//! TCP today) → endpoint (direct or tunnel) → relay, accounted for once at
//! the end.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use super::{
    detect::{self, Detected, Outcome},
    endpoint::{connect_passthrough, connect_route, Connect, ConnectContext, Connected, Upstream},
    failure::Failure,
    Core,
};
use crate::{
    pod::PodContext,
    store::{ServiceRoute, Snapshot},
    transport::{relay, Duplex, Peekable, RelayOptions},
};

/// A connection accepted on a pod's outbound listener.
pub struct Accepted {
    pub pod: Arc<PodContext>,
    /// The client's address (in the pod's netns).
    pub peer: SocketAddr,
    /// The listener address it reached.
    pub local: SocketAddr,
}

/// Where the connection is going, logically.
pub enum Logical {
    /// A service's VIP:port: balanced over its endpoints.
    Service(Arc<ServiceRoute>),
    /// Anything else: where it was dialled.
    Passthrough(SocketAddr),
}

impl Logical {
    pub fn resolve(snapshot: &Snapshot, dest: SocketAddr) -> Self {
        match snapshot.route(dest) {
            Some(route) => Self::Service(route.clone()),
            None => Self::Passthrough(dest),
        }
    }
}

impl Logical {
    /// The protocol the destination port declares (a Service port's
    /// `appProtocol`, or `--opaque-ports`), if any.
    fn declared(&self, opaque_ports: &[u16]) -> Option<Detected> {
        match self {
            Self::Service(route) => detect::declared(route.app_protocol.as_ref(), route.vip.port(), opaque_ports),
            Self::Passthrough(dest) => detect::declared(None, dest.port(), opaque_ports),
        }
    }
}

/// What the connection speaks: declared, or detected from the client's
/// first bytes — unless the server speaks first. What either side sent is
/// kept (in `client` / `upstream`) and relayed first. Counted once.
async fn protocol<I: Duplex, U: Duplex, C: Connect>(
    client: &mut Peekable<I>,
    upstream: &mut Peekable<U>,
    logical: &Logical,
    core: &Core<C>,
) -> Detected {
    let settings = &core.settings;
    let (detected, outcome) = match logical.declared(&settings.opaque_ports) {
        // Declared HTTP: the version still comes from the client (a port
        // declared `http` may be spoken to in h2 with prior knowledge).
        Some(declared @ (Detected::Http1 | Detected::H2)) if !settings.detect_timeout.is_zero() => {
            match detect::detect(client, settings.detect_timeout).await {
                (found @ (Detected::Http1 | Detected::H2), _) => (found, Outcome::Declared),
                _ => (declared, Outcome::Declared),
            }
        }
        Some(declared) => (declared, Outcome::Declared),
        None if settings.detect_timeout.is_zero() => (Detected::Opaque, Outcome::Declared),
        None => detect::client_or_server_first(client, upstream, settings.detect_timeout).await,
    };
    core.metrics.detected(crate::metrics::Direction::Outbound, outcome.index());
    detected
}

/// Runs one connection to its end.
pub async fn run<I, C>(client: I, conn: Accepted, core: &Arc<Core<C>>)
where
    I: Duplex + Unpin + Send + 'static,
    C: Connect,
    C::Io: Unpin,
{
    let mut client = Peekable::new(client);
    let start = Instant::now();
    let pod = &conn.pod;
    let dest = match core.orig_dst.lookup(pod.netns.cookie(), conn.peer, conn.local) {
        Ok(Some(dest)) => dest,
        Ok(None) => return refuse(&mut client, &conn, core, Failure::NoOriginalDestination),
        Err(e) => return refuse(&mut client, &conn, core, Failure::OrigDstLookup(e)),
    };
    // What the application's getsockname says (the kernel program answers
    // with the pod's address and the real port): how it is logged and what
    // a tunnel passes on.
    let client_addr = pod
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == dest.is_ipv4())
        .map(|ip| SocketAddr::new(*ip, conn.peer.port()))
        .unwrap_or(conn.peer);
    let snapshot = core.mesh.load_full();
    let logical = Logical::resolve(&snapshot, dest);
    let cx = ConnectContext {
        snapshot: &snapshot,
        pod,
        client: client_addr,
        timeout: core.settings.connect_timeout,
        metrics: &core.metrics,
    };
    let connect_start = Instant::now();
    let connected = match &logical {
        Logical::Service(route) => connect_route(&core.connector, &cx, route, core.settings.connect_attempts).await,
        Logical::Passthrough(dest) => connect_passthrough(&core.connector, &cx, *dest).await,
    };
    let connect_time = connect_start.elapsed();
    let service = match &logical {
        Logical::Service(route) => Some(route.service.clone()),
        Logical::Passthrough(_) => None,
    };
    // The service dialled, as logged: formatted only if a line is written.
    let dialled = service.clone();
    let service_name = tracing::field::display(OrEmpty(dialled.as_ref()));
    let upstream = match connected {
        Ok(upstream) => upstream,
        Err(e) => {
            let target = snapshot.workload(dest.ip());
            let security = if target.is_some_and(|w| !w.workload.is_local() || core.connector.strict()) {
                "mutual_tls"
            } else {
                "plaintext"
            };
            let labels =
                core.metrics.conns.outbound_labels(pod, dest, service.as_ref(), target.map(|w| &**w), security);
            let reason = e.reason();
            core.metrics.conns.failed(&labels, reason.label());
            tracing::info!(
                target: "outrigger::access",
                reporter = "outbound", pod = %pod.key, identity = %pod.identity, client = %client_addr, dst = %dest,
                service = service_name, result = reason.label(), flags = reason.flag(), error = %e,
                duration_ms = start.elapsed().as_secs_f64() * 1e3,
                "connection failed"
            );
            // Reset rather than close: the client sees a failure like a
            // direct connect would, not an empty successful exchange.
            client.abort();
            return;
        }
    };
    let Connected { io: link, addr: upstream_addr, security, workload, mut endpoint, attempts } = upstream;
    let mut link = Peekable::new(link);
    // Decided once the upstream is connected, so that a server that speaks
    // first decides it at once (opaque) instead of waiting out the
    // detection timeout. Until the HTTP layer serves them, HTTP connections
    // are relayed as opaque TCP too; the decision is counted and logged.
    let protocol = protocol(&mut client, &mut link, &logical, core).await;
    // A passthrough to an endpoint of a service is labelled with it.
    let service = service.or_else(|| snapshot.service_of_endpoint(dest).cloned());
    let labels = core.metrics.conns.outbound_labels(pod, dest, service.as_ref(), workload.as_deref(), security);
    drop(snapshot);
    let record = core.metrics.conns.opened(&labels, connect_time);
    let (relayed, rtt) = match protocol {
        Detected::Http1 | Detected::H2 if core.settings.http => {
            // The connection made for detection becomes the pool's first to
            // its endpoint; requests are balanced one by one from here.
            drop(endpoint.take());
            let rtt = link.get_mut().rtt();
            // The HTTP layer closes client connections in order (and
            // aborts them itself): not a reset on close, which the outbound
            // listener set.
            client.reset_on_exit(false);
            let http =
                Arc::new(super::http::HttpConn::new(core.clone(), conn.pod.clone(), client_addr, logical, protocol));
            let end = match super::http::serve(client, link, upstream_addr, http.clone()).await {
                Ok(()) => crate::transport::End::Completed,
                Err(e) => {
                    tracing::debug!(pod = %pod.key, error = %e, "HTTP connection ended with an error");
                    crate::transport::End::Error
                }
            };
            let (sent, received) = (http.sent.load(Ordering::Relaxed), http.received.load(Ordering::Relaxed));
            (crate::transport::Relayed { sent, received, end, error: None }, rtt)
        }
        _ => {
            // The first response byte's delay is a latency sample for the endpoint.
            let first_response = |latency| {
                if let (Logical::Service(route), Some((i, _))) = (&logical, &endpoint) {
                    route.balancer.observe(*i, latency);
                }
            };
            // The client came armed to reset on close from its listener.
            let opts = RelayOptions { a_armed: true, ..core.settings.relay };
            let relayed = relay(&mut client, &mut link, opts, &core.drain_cut, first_response).await;
            let rtt = link.get_mut().rtt();
            drop(link);
            (relayed, rtt)
        }
    };
    drop(endpoint);
    let duration = start.elapsed();
    if let Some(record) = &record {
        record.finish(relayed.sent, relayed.received, duration, rtt);
    }
    drop(record);
    let flags = match relayed.end {
        crate::transport::End::Completed if attempts > 1 => "RT",
        end => end.flag(),
    };
    tracing::info!(
        target: "outrigger::access",
        reporter = "outbound", pod = %pod.key, identity = %pod.identity, client = %client_addr, dst = %dest,
        service = service_name, upstream = %upstream_addr, attempts, security, protocol = protocol.label(),
        sent_bytes = relayed.sent, received_bytes = relayed.received,
        duration_ms = duration.as_secs_f64() * 1e3,
        rtt_us = rtt.map(|r| r.as_micros() as u64).unwrap_or(0),
        result = relayed.outcome(), flags,
        "connection closed"
    );
}

/// A value, or nothing, for a log field.
struct OrEmpty<'a, T>(Option<&'a T>);

impl<T: std::fmt::Display> std::fmt::Display for OrEmpty<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => Ok(()),
        }
    }
}

/// A connection the proxy cannot place: reset, counted, logged.
fn refuse<I: Duplex, C: Connect>(client: &mut I, conn: &Accepted, core: &Core<C>, e: Failure) {
    core.metrics.orig_dst_misses.inc();
    crate::warn_throttled!(pod = %conn.pod.key, client = %conn.peer, error = %e, "closing the connection (reset)");
    client.abort();
}
