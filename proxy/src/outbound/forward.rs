//! One captured connection: find where it was going, connect there from
//! inside the source pod's netns, copy both ways.

use std::{io, net::SocketAddr, sync::Arc, time::Instant};

use outrigger_common::ConnKey;
use tokio::net::{TcpSocket, TcpStream};

use crate::{
    capture::addr::to_kernel, metrics::PodLabels, netns::sockets::upstream_socket, node::PodContext, proxy::Proxy,
    relay::relay,
};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("connection to {dest} refused: is anything listening there?")]
    Refused { dest: SocketAddr },
    #[error("connection to {dest} timed out after {timeout:?}: is the destination reachable from the pod?")]
    Timeout { dest: SocketAddr, timeout: std::time::Duration },
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
}

impl ForwardError {
    /// The `reason` label of the failure counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Refused { .. } => "connect_refused",
            Self::Timeout { .. } => "connect_timeout",
            Self::NoRoute { .. } => "no_route",
            Self::Connect { .. } | Self::Netns(_) => "connect_error",
        }
    }
}

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
    let upstream = match connect(pod, dest, &proxy).await {
        Ok(upstream) => upstream,
        Err(e) => {
            proxy.metrics.failed(&labels, e.reason());
            tracing::info!(
                target: "outrigger::access",
                pod = %pod.key, client = %conn.peer, dst = %dest,
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
    let (mut client, mut upstream) = (client, upstream);
    let relayed = relay(client.split(), upstream.split(), proxy.forward.buffer_size).await;
    if relayed.result.is_err() {
        // Pass a reset on as a reset: the application should see the
        // failure it would have seen without the proxy, not a clean EOF.
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
    let (sent, received, result) = (relayed.sent, relayed.received, relayed.outcome());
    metrics.open.dec();
    metrics.closed.inc();
    metrics.bytes_sent.inc_by(sent);
    metrics.bytes_received.inc_by(received);
    tracing::info!(
        target: "outrigger::access",
        pod = %pod.key, client = %conn.peer, dst = %dest,
        sent_bytes = sent, received_bytes = received,
        duration_ms = start.elapsed().as_secs_f64() * 1e3,
        result,
        "connection closed"
    );
}

async fn connect(pod: &PodContext, dest: SocketAddr, proxy: &Proxy) -> Result<TcpStream, ForwardError> {
    let mark = proxy.forward.mark;
    let ip = dest.ip();
    let socket = pod
        .netns
        .run(move || upstream_socket(ip, mark))
        .await?
        .map_err(|source| ForwardError::Connect { dest, source })?;
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
