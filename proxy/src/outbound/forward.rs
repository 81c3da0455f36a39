//! One captured connection through the steps: original destination →
//! logical destination (service port or passthrough) → protocol (opaque
//! TCP today) → endpoint (direct or tunnel) → relay, accounted for once at
//! the end.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use super::{
    endpoint::{connect_passthrough, connect_route, Connect, ConnectContext, Connected, Upstream},
    failure::Failure,
    Core,
};
use crate::{
    pod::PodContext,
    store::{ServiceRoute, Snapshot},
    transport::{relay, Duplex},
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

/// How the bytes are understood. HTTP detection plugs in here; until then
/// every connection is relayed as opaque TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Opaque,
}

impl Protocol {
    pub fn decide(_logical: &Logical) -> Self {
        Self::Opaque
    }
}

/// Runs one connection to its end.
pub async fn run<I: Duplex, C: Connect>(mut client: I, conn: Accepted, core: &Core<C>) {
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
    let _protocol = Protocol::decide(&logical);
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
    let service_name = service.as_ref().map(ToString::to_string).unwrap_or_default();
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
    let Connected { io: mut link, addr: upstream_addr, security, workload, endpoint, attempts } = upstream;
    // A passthrough to an endpoint of a service is labelled with it.
    let service = service.or_else(|| snapshot.service_of_endpoint(dest).cloned());
    let labels = core.metrics.conns.outbound_labels(pod, dest, service.as_ref(), workload.as_deref(), security);
    drop(snapshot);
    let record = core.metrics.conns.opened(&labels, connect_time);
    // The first response byte's delay is a latency sample for the endpoint.
    let first_response = |latency| {
        if let (Logical::Service(route), Some((i, _))) = (&logical, &endpoint) {
            route.balancer.observe(*i, latency);
        }
    };
    let relayed = relay(&mut client, &mut link, core.settings.relay, &core.drain_cut, first_response).await;
    let rtt = link.rtt();
    drop(link);
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
        service = service_name, upstream = %upstream_addr, attempts, security,
        sent_bytes = relayed.sent, received_bytes = relayed.received,
        duration_ms = duration.as_secs_f64() * 1e3,
        rtt_us = rtt.map(|r| r.as_micros() as u64).unwrap_or(0),
        result = relayed.outcome(), flags,
        "connection closed"
    );
}

/// A connection the proxy cannot place: reset, counted, logged.
fn refuse<I: Duplex, C: Connect>(client: &mut I, conn: &Accepted, core: &Core<C>, e: Failure) {
    core.metrics.orig_dst_misses.inc();
    crate::warn_throttled!(pod = %conn.pod.key, client = %conn.peer, error = %e, "closing the connection (reset)");
    client.abort();
}
