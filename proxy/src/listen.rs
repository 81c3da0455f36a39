//! The accept loop every pod listener runs (outbound and inbound).
#![forbid(unsafe_code)]

use std::{net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::mesh::PodKey;

/// Accepts until `stop` is cancelled, handing each connection to
/// `on_accept` (which spawns its task).
pub async fn accept_until(
    listener: &TcpListener,
    stop: &CancellationToken,
    pod: &PodKey,
    mut on_accept: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => on_accept(stream, peer),
            Err(e) => {
                // Out of file descriptors or memory: back off instead of
                // spinning; the backlog holds connects meanwhile.
                let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                tracing::warn!(pod = %pod, listener = %local, error = %e,
                    "accept failed; is the proxy out of file descriptors (ulimit -n)?");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
