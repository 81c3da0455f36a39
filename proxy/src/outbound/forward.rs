//! One captured connection: find where it was going, resolve a service VIP
//! to an endpoint, connect there from inside the source pod's netns, copy
//! both ways.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use outrigger_common::ConnKey;
use tokio::net::TcpStream;

use super::connect::{connect_service, connect_to, Upstream, UpstreamConn};
use crate::{
    capture::addr::to_kernel,
    metrics::PodLabels,
    node::PodContext,
    proxy::Proxy,
    relay::relay,
    tunnel::{relay::relay_h2, Tunnel},
};

pub struct Connection {
    pub pod: Arc<PodContext>,
    /// The client's address (in the pod's netns).
    pub peer: SocketAddr,
    /// The listener address it reached.
    pub local: SocketAddr,
}

pub async fn run(client: TcpStream, conn: Connection, proxy: Arc<Proxy>) {
    let start = Instant::now();
    let _ = client.set_nodelay(true);
    let pod = &conn.pod;
    let key =
        ConnKey { netns_cookie: pod.netns.cookie(), client: to_kernel(conn.peer), listener: to_kernel(conn.local) };
    let dest = match proxy.capture.original_destination(&key) {
        Ok(Some(dest)) => dest,
        Ok(None) => {
            // Not a captured connection (someone dialled the listener
            // directly) or its entry was lost: never guess a destination.
            proxy.metrics.orig_dst_misses.inc();
            tracing::warn!(pod = %pod.key, client = %conn.peer, "no original destination for this connection; closing it");
            return;
        }
        Err(e) => {
            proxy.metrics.orig_dst_misses.inc();
            tracing::error!(pod = %pod.key, client = %conn.peer, error = %e, "original destination lookup failed; closing");
            return;
        }
    };
    let labels = PodLabels {
        reporter: "outbound",
        source_pod: pod.key.name.clone(),
        source_namespace: pod.key.namespace.clone(),
    };
    let view = proxy.mesh.load_full();
    let route = view.services.route(dest).cloned();
    let service = route.as_ref().map(|r| r.service.to_string()).unwrap_or_default();
    let connected = match &route {
        Some(route) => connect_service(pod, route, &proxy, &view).await,
        None => connect_to(pod, dest, &proxy, &view).await.map(|conn| Upstream {
            conn,
            addr: dest,
            endpoint: None,
            attempts: 1,
        }),
    };
    drop(view);
    let upstream = match connected {
        Ok(upstream) => upstream,
        Err(e) => {
            proxy.metrics.failed(&labels, e.reason());
            tracing::info!(
                target: "outrigger::access",
                pod = %pod.key, client = %conn.peer, dst = %dest, service,
                result = e.reason(), error = %e,
                duration_ms = start.elapsed().as_secs_f64() * 1e3,
                "connection failed"
            );
            // Reset rather than close, so the client sees a failure like a
            // direct connect would, not an empty successful exchange.
            let _ = client.set_zero_linger();
            return;
        }
    };
    let metrics = proxy.metrics.connection(&labels);
    metrics.opened.inc();
    metrics.open.inc();
    let Upstream { conn: link, addr: upstream_addr, endpoint, attempts } = upstream;
    let security = link.security();
    // The first response byte's delay is a latency sample for the endpoint.
    let first_response = |latency| {
        if let (Some(route), Some((i, _))) = (&route, &endpoint) {
            route.balancer.observe(*i, latency);
        }
    };
    let mut client = client;
    let buffer = proxy.forward.buffer_size;
    let relayed = match link {
        UpstreamConn::Plain(mut upstream) => {
            let relayed = relay(client.split(), upstream.split(), buffer, first_response).await;
            if relayed.result.is_err() {
                let _ = upstream.set_zero_linger();
            }
            relayed
        }
        UpstreamConn::Tunnel(mut tunnel) => {
            let Tunnel { send, recv, .. } = &mut *tunnel;
            relay_h2(&mut client, send, recv, buffer, first_response).await
        }
    };
    if relayed.result.is_err() {
        // Pass a reset on as a reset: the application should see the
        // failure it would have seen without the proxy, not a clean EOF.
        let _ = client.set_zero_linger();
    }
    drop(endpoint);
    metrics.open.dec();
    metrics.closed.inc();
    metrics.bytes_sent.inc_by(relayed.sent);
    metrics.bytes_received.inc_by(relayed.received);
    tracing::info!(
        target: "outrigger::access",
        pod = %pod.key, client = %conn.peer, dst = %dest, service, upstream = %upstream_addr, attempts, security,
        sent_bytes = relayed.sent, received_bytes = relayed.received,
        duration_ms = start.elapsed().as_secs_f64() * 1e3,
        result = relayed.outcome(),
        "connection closed"
    );
}
