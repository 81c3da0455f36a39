//! The accept loop every pod listener runs (outbound and inbound).

use std::{fmt::Display, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// After a stop, the backlog is drained until it stays empty this long.
const DRAIN_QUIET: Duration = Duration::from_millis(50);

/// Accepts until `stop` is cancelled, handing each connection to
/// `on_accept` (which spawns its task). `owner` names the listener's pod in
/// logs.
pub async fn accept_until(
    listener: &TcpListener,
    stop: &CancellationToken,
    owner: &(dyn Display + Sync),
    mut on_accept: impl FnMut(TcpStream, SocketAddr),
) {
    // Accept failures (out of descriptors or memory) come in storms: log
    // when one starts and when it ends, with the count, not every 50 ms.
    let mut failing: Option<(u64, String)> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                // Connects that reached the backlog before the stop (the pod
                // was un-meshed first, so no new ones arrive) are served, not
                // reset when the listener closes.
                while let Ok(Ok((stream, peer))) = tokio::time::timeout(DRAIN_QUIET, listener.accept()).await {
                    on_accept(stream, peer);
                }
                return;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Some((count, _)) = failing.take() {
                    tracing::info!(pod = %owner, failures = count, "accepting again");
                }
                on_accept(stream, peer)
            }
            Err(e) => {
                let message = e.to_string();
                match &mut failing {
                    Some((count, _)) => *count += 1,
                    None => {
                        let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                        tracing::warn!(pod = %owner, listener = %local, error = %message,
                            "accept failed; is the proxy out of file descriptors (ulimit -n)? retrying every 50ms, logged again when it recovers");
                        failing = Some((1, message));
                    }
                }
                // Back off instead of spinning; the backlog holds connects.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
