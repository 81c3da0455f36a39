//! The accept loop every pod listener runs (outbound and inbound).

use std::{
    fmt::Display,
    io,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    time::Duration,
};

use tokio::{
    io::{unix::AsyncFd, Interest},
    net::TcpListener,
};
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

/// Takes connections off a listener's backlog without registering them
/// with any event loop: the worker that serves one registers it with its
/// own (see [`Workers`]). tokio's `accept` would register each with the
/// accepting runtime, and moving it to another worker would cost two more
/// `epoll_ctl` calls per connection. So accepts go through a second
/// descriptor of the listening socket, registered here; tokio's own
/// registration of the listener is left idle.
///
/// [`Workers`]: super::Workers
enum Acceptor<'a> {
    Own(AsyncFd<OwnedFd>),
    /// When the descriptor cannot be duplicated (out of descriptors).
    Tokio(&'a TcpListener),
}

impl<'a> Acceptor<'a> {
    // `with_interest` is deprecated because a `T` that does not own its
    // descriptor could have it closed while registered; an `OwnedFd` held
    // by the `AsyncFd` itself cannot.
    #[allow(deprecated)]
    fn new(listener: &'a TcpListener) -> Self {
        match listener.as_fd().try_clone_to_owned().and_then(|fd| AsyncFd::with_interest(fd, Interest::READABLE)) {
            Ok(fd) => Self::Own(fd),
            Err(e) => {
                tracing::warn!(error = %e, "could not duplicate a listener's descriptor; its connections cost two more syscalls each");
                Self::Tokio(listener)
            }
        }
    }

    async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        let fd = match self {
            Self::Own(fd) => fd,
            Self::Tokio(listener) => {
                let (stream, peer) = listener.accept().await?;
                return Ok((stream.into_std()?, peer));
            }
        };
        loop {
            let mut ready = fd.readable().await?;
            let accepted = ready.try_io(|fd| {
                let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
                let (socket, addr) = socket2::SockRef::from(fd.get_ref()).accept4(flags)?;
                let addr =
                    addr.as_socket().ok_or_else(|| io::Error::other("accepted a connection without an IP address"))?;
                Ok((socket.into(), addr))
            });
            if let Ok(result) = accepted {
                return result;
            }
        }
    }
}

/// Accepts until `stop` is cancelled, handing each connection to
/// `on_accept` (which has a worker serve it), then serves what is left in the
/// backlog. Ends at once, backlog and all, when `handed_over` is cancelled:
/// another loop accepts on the same socket from then on. `owner` names the
/// listener's pod in logs.
pub async fn accept_until(
    listener: &TcpListener,
    stop: &CancellationToken,
    handed_over: &CancellationToken,
    owner: &(dyn Display + Sync),
    mut on_accept: impl FnMut(std::net::TcpStream, SocketAddr),
) {
    // Accept failures (out of descriptors or memory) come in storms: log
    // when one starts and when it has ended, with the count, not every 50 ms.
    let mut storm: Option<Storm> = None;
    let acceptor = Acceptor::new(listener);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = handed_over.cancelled() => return,
            _ = stop.cancelled() => {
                // Connects that reached the backlog before the stop (the pod
                // was un-meshed first, so no new ones arrive) are served, not
                // reset when the listener closes.
                while let Ok(Ok((stream, peer))) = tokio::time::timeout(DRAIN_QUIET, acceptor.accept()).await {
                    on_accept(stream, peer);
                }
                return;
            }
            accepted = acceptor.accept() => accepted,
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
