//! The accept loop each connection thread runs on every pod listener
//! (outbound and inbound).

use std::{
    fmt::Display,
    io,
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

use tokio::io::{unix::AsyncFd, Interest};
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

/// Accept failures (out of descriptors or memory) of one listener, shared
/// by every loop accepting on it. They come in storms: logged when one
/// starts and when it has ended, with the count — once per listener, not
/// every 50 ms and not once per connection thread.
#[derive(Default)]
pub struct AcceptFailures {
    /// A storm is on: read on every accept, so a success takes the lock
    /// only during a storm.
    active: AtomicBool,
    storm: Mutex<Option<Storm>>,
}

impl AcceptFailures {
    fn failed(&self, owner: &(dyn Display + Sync), listener: &TcpListener, e: &io::Error) {
        let mut storm = self.storm.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *storm {
            Some(s) => {
                s.failures += 1;
                s.last = std::time::Instant::now();
            }
            None => {
                let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                tracing::warn!(pod = %owner, listener = %local, error = %e,
                    "accept failed; is the proxy out of file descriptors (ulimit -n)? retrying every 50ms, logged again when it recovers");
                *storm = Some(Storm { failures: 1, last: std::time::Instant::now() });
                self.active.store(true, Ordering::Relaxed);
            }
        }
    }

    fn accepted(&self, owner: &(dyn Display + Sync)) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let mut storm = self.storm.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = storm.take_if(|s| s.last.elapsed() >= STORM_QUIET) {
            self.active.store(false, Ordering::Relaxed);
            tracing::info!(pod = %owner, failures = s.failures, "accepting again");
        }
    }
}

/// Takes connections off a listener's backlog without registering them
/// with any event loop: the worker that serves one registers it with its
/// own (see [`Workers`]). Pod listeners are plain `std` sockets, registered
/// only here, with the event loop of the thread that accepts on them: a
/// listener also registered elsewhere would wake that thread for every
/// connect, for nothing. Each loop registers a descriptor of its own (a
/// duplicate): every connection thread accepts on every pod listener, and
/// two loops of one thread may accept on one socket for a moment (a pod
/// redefined in place hands its sockets over), while one event loop
/// cannot register a descriptor twice.
///
/// [`Workers`]: super::Workers
struct Acceptor(AsyncFd<OwnedFd>);

impl Acceptor {
    // `with_interest` is deprecated because a `T` that does not own its
    // descriptor could have it closed while registered; an `OwnedFd` held
    // by the `AsyncFd` itself cannot.
    #[allow(deprecated)]
    fn new(listener: &TcpListener) -> io::Result<Self> {
        let fd = listener.as_fd().try_clone_to_owned()?;
        Ok(Self(AsyncFd::with_interest(fd, Interest::READABLE)?))
    }

    async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
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

/// Accepts on `acceptor`, made first if it is not yet (it cannot be while
/// the process is out of descriptors: that fails like an accept).
async fn accept(
    acceptor: &mut Option<Acceptor>,
    listener: &TcpListener,
) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let acceptor = match acceptor {
        Some(a) => a,
        None => acceptor.insert(Acceptor::new(listener)?),
    };
    acceptor.accept().await
}

/// Accepts until `stop` is cancelled, handing each connection to
/// `on_accept` (which has a worker serve it), then serves what is left in the
/// backlog. Ends at once, backlog and all, when `handed_over` is cancelled:
/// another loop accepts on the same socket from then on. `owner` names the
/// listener's pod in logs; `failures` is shared by the loops on one
/// listener.
pub async fn accept_until(
    listener: &TcpListener,
    stop: &CancellationToken,
    handed_over: &CancellationToken,
    owner: &(dyn Display + Sync),
    failures: &AcceptFailures,
    mut on_accept: impl FnMut(std::net::TcpStream, SocketAddr),
) {
    let mut acceptor = None;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = handed_over.cancelled() => return,
            _ = stop.cancelled() => {
                // Connects that reached the backlog before the stop (the pod
                // was un-meshed first, so no new ones arrive) are served, not
                // reset when the listener closes.
                while let Ok(Ok((stream, peer))) = tokio::time::timeout(DRAIN_QUIET, accept(&mut acceptor, listener)).await {
                    on_accept(stream, peer);
                }
                return;
            }
            accepted = accept(&mut acceptor, listener) => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                failures.accepted(owner);
                on_accept(stream, peer)
            }
            Err(e) => {
                failures.failed(owner, listener, &e);
                // Back off instead of spinning; the backlog holds connects.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
