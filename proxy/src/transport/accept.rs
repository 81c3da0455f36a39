//! The accept loop every pod listener runs (outbound and inbound).

use std::{fmt::Display, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// After a stop, the backlog is drained until it stays empty this long.
const DRAIN_QUIET: Duration = Duration::from_millis(50);

/// An accept-failure storm has ended once accepts succeed and none has
/// failed for this long. Out of descriptors, accepts alternate: one
/// succeeds as a connection closes and frees a descriptor, the next fails
/// — ending the storm at the first success would log twice per retry.
const STORM_QUIET: Duration = Duration::from_secs(1);

/// Accept failures since a storm started.
struct Storm {
    failures: u64,
    last: std::time::Instant,
}

/// Accepts until `stop` is cancelled, handing each connection to
/// `on_accept` (which spawns its task), then serves what is left in the
/// backlog. Ends at once, backlog and all, when `handed_over` is cancelled:
/// another loop accepts on the same socket from then on. `owner` names the
/// listener's pod in logs.
pub async fn accept_until(
    listener: &TcpListener,
    stop: &CancellationToken,
    handed_over: &CancellationToken,
    owner: &(dyn Display + Sync),
    mut on_accept: impl FnMut(TcpStream, SocketAddr),
) {
    // Accept failures (out of descriptors or memory) come in storms: log
    // when one starts and when it has ended, with the count, not every 50 ms.
    let mut storm: Option<Storm> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = handed_over.cancelled() => return,
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
                if let Some(s) = storm.take_if(|s| s.last.elapsed() >= STORM_QUIET) {
                    tracing::info!(pod = %owner, failures = s.failures, "accepting again");
                }
                on_accept(stream, peer)
            }
            Err(e) => {
                match &mut storm {
                    Some(s) => {
                        s.failures += 1;
                        s.last = std::time::Instant::now();
                    }
                    None => {
                        let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                        tracing::warn!(pod = %owner, listener = %local, error = %e,
                            "accept failed; is the proxy out of file descriptors (ulimit -n)? retrying every 50ms, logged again when it recovers");
                        storm = Some(Storm { failures: 1, last: std::time::Instant::now() });
                    }
                }
                // Back off instead of spinning; the backlog holds connects.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
