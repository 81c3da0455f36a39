//! One captured connection: find where it was going, resolve a service VIP
//! to an endpoint, connect there from inside the source pod's netns (or
//! through a tunnel), copy both ways, and account for it once at the end.

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    sync::Arc,
    time::{Duration, Instant},
};

use outrigger_common::ConnKey;
use tokio::net::TcpStream;

use super::connect::{connect_service, connect_to, ForwardError, Upstream, UpstreamConn};
use crate::{
    capture::addr::to_kernel,
    node::PodContext,
    proxy::Proxy,
    relay::{relay, Relayed},
    tunnel::{relay::relay_h2, Tunnel},
};

pub struct Connection {
    pub pod: Arc<PodContext>,
    /// The client's address (in the pod's netns).
    pub peer: SocketAddr,
    /// The listener address it reached.
    pub local: SocketAddr,
}

/// Envoy-style response flags for the access log: what went wrong, briefly.
fn failure_flag(e: &ForwardError) -> &'static str {
    match e.reason() {
        "connect_refused" | "connect_error" | "tunnel_error" => "UF",
        "connect_timeout" => "UT",
        "no_route" | "no_endpoints" => "NR",
        "no_healthy_endpoints" => "UH",
        "denied" => "RBAC",
        "tls_failure" => "TLS",
        _ => "UF",
    }
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
    let view = proxy.mesh.load_full();
    let route = view.services.route(dest).cloned();
    let service = route.as_ref().map(|r| r.service.to_string()).unwrap_or_default();
    let connect_start = Instant::now();
    let connected = match &route {
        Some(route) => connect_service(pod, route, &proxy, &view).await,
        None => connect_to(pod, dest, &proxy, &view).await.map(|conn| Upstream {
            conn,
            addr: dest,
            endpoint: None,
            attempts: 1,
        }),
    };
    let connect_time = connect_start.elapsed();
    let strict = proxy.mtls.as_ref().is_some_and(|m| m.strict);
    let service_key = route.as_ref().map(|r| &r.service);
    let upstream = match connected {
        Ok(upstream) => upstream,
        Err(e) => {
            let labels = view.outbound_labels(pod, dest, service_key, dest, view.security_to(dest, strict));
            proxy.metrics.conns.failed(&labels, e.reason());
            tracing::info!(
                target: "outrigger::access",
                reporter = "outbound", pod = %pod.key, identity = %pod.identity, client = %conn.peer, dst = %dest,
                service, result = e.reason(), flags = failure_flag(&e), error = %e,
                duration_ms = start.elapsed().as_secs_f64() * 1e3,
                "connection failed"
            );
            // Reset rather than close, so the client sees a failure like a
            // direct connect would, not an empty successful exchange.
            let _ = client.set_zero_linger();
            return;
        }
    };
    let Upstream { conn: link, addr: upstream_addr, endpoint, attempts } = upstream;
    let security = link.security();
    let labels = view.outbound_labels(pod, dest, service_key, upstream_addr, security);
    drop(view);
    let record = proxy.metrics.conns.opened(&labels, connect_time);
    // The first response byte's delay is a latency sample for the endpoint.
    let first_response = |latency| {
        if let (Some(route), Some((i, _))) = (&route, &endpoint) {
            route.balancer.observe(*i, latency);
        }
    };
    let mut client = client;
    let buffer = proxy.forward.buffer_size;
    let (relayed, rtt): (Relayed, Option<Duration>) = match link {
        UpstreamConn::Plain(mut upstream) => {
            let relayed = relay(client.split(), upstream.split(), buffer, first_response).await;
            let rtt = crate::sys::tcp_rtt(upstream.as_fd());
            if relayed.result.is_err() {
                let _ = upstream.set_zero_linger();
            }
            (relayed, rtt)
        }
        UpstreamConn::Tunnel(mut tunnel) => {
            let Tunnel { send, recv, .. } = &mut *tunnel;
            let relayed = relay_h2(&mut client, send, recv, buffer, first_response).await;
            (relayed, tunnel.rtt())
        }
    };
    if relayed.result.is_err() {
        // Pass a reset on as a reset: the application should see the
        // failure it would have seen without the proxy, not a clean EOF.
        let _ = client.set_zero_linger();
    }
    drop(endpoint);
    let duration = start.elapsed();
    if let Some(record) = &record {
        record.finish(relayed.sent, relayed.received, duration, rtt);
    }
    drop(record);
    let flags = match (relayed.outcome(), attempts > 1) {
        ("ok", false) => "-",
        ("ok", true) => "RT",
        ("reset", _) => "UR",
        _ => "UE",
    };
    tracing::info!(
        target: "outrigger::access",
        reporter = "outbound", pod = %pod.key, identity = %pod.identity, client = %conn.peer, dst = %dest,
        service, upstream = %upstream_addr, attempts, security,
        sent_bytes = relayed.sent, received_bytes = relayed.received,
        duration_ms = duration.as_secs_f64() * 1e3,
        rtt_us = rtt.map(|r| r.as_micros() as u64).unwrap_or(0),
        result = relayed.outcome(), flags,
        "connection closed"
    );
}
