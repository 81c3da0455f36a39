//! Opening a tunnel: a pooled TLS+h2 connection from the source pod's netns
//! to the destination pod's HBONE port, then `CONNECT <authority>`.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

use super::{
    pool::{Dialled, PoolKey},
    Pool, PoolStats, StreamGuard, TunnelError,
};
use crate::{
    identity::Identity,
    pod::PodContext,
    tls::TlsConfigs,
    transport::{Duplex, H2Recv, H2Send, H2Stream},
};

/// Where a tunnel goes.
#[derive(Debug, Clone)]
pub struct TunnelTarget {
    /// The destination pod's HBONE address (`POD_IP:15008`).
    pub peer: SocketAddr,
    /// What the CONNECT asks for: the original destination.
    pub authority: SocketAddr,
    /// Who must answer: the destination pod's identity.
    pub identity: Identity,
}

/// An open tunnel stream; dropping it frees its place on the connection.
pub struct Tunnel {
    stream: H2Stream,
    place: StreamGuard,
}

impl Tunnel {
    /// The kernel's smoothed RTT of the TCP connection carrying the tunnel.
    pub fn rtt(&self) -> Option<Duration> {
        self.place.rtt()
    }
}

impl Duplex for Tunnel {
    type Read<'a> = H2Recv<'a>;
    type Write<'a> = H2Send<'a>;

    fn halves(&mut self) -> (H2Recv<'_>, H2Send<'_>) {
        self.stream.halves()
    }

    fn abort(&mut self) {
        self.stream.abort();
    }
}

/// Opens tunnels for the pods of this node.
#[derive(Debug)]
pub struct TunnelClient {
    tls: Arc<TlsConfigs>,
    pool: Pool,
    hbone_port: u16,
    connect_timeout: Duration,
    /// HTTP/2 PING period (and answer deadline) on pooled connections.
    keepalive: Option<Duration>,
}

impl TunnelClient {
    pub fn new(
        tls: Arc<TlsConfigs>,
        pool: Pool,
        hbone_port: u16,
        connect_timeout: Duration,
        keepalive: Option<Duration>,
    ) -> Self {
        Self { tls, pool, hbone_port, connect_timeout, keepalive }
    }

    pub fn hbone_port(&self) -> u16 {
        self.hbone_port
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Closes idle and dead pooled connections.
    pub fn reap(&self) {
        self.pool.reap();
    }

    /// A CONNECT stream from `pod` (as its identity) to `authority`, a
    /// meshed pod whose identity must be `identity`. `client` is the
    /// application's address as it would be seen without the mesh; the
    /// receiving proxy delivers with its port (`Forwarded: for=`).
    pub async fn open(
        &self,
        pod: &PodContext,
        authority: SocketAddr,
        identity: &Identity,
        client: Option<SocketAddr>,
    ) -> Result<Tunnel, TunnelError> {
        let target = TunnelTarget {
            peer: SocketAddr::new(authority.ip(), self.hbone_port),
            authority,
            identity: identity.clone(),
        };
        let source = &pod.identity;
        let generation = self.tls.identities().current(source).map_err(crate::tls::TlsError::from)?.generation;
        let key = PoolKey {
            netns_cookie: pod.netns.cookie(),
            source: source.clone(),
            destination: target.identity.clone(),
            peer: target.peer,
            worker: crate::transport::worker_index(),
        };
        // Bounded by the dial's own timeout when a dial is needed.
        let (sender, place) = self.pool.stream(&key, generation, || self.dial(pod, &target)).await?;
        let peer = target.peer;
        let h2_err = |source| TunnelError::H2 { peer, source };
        let mut request = Request::builder().method(Method::CONNECT).uri(target.authority.to_string());
        if let Some(client) = client {
            // RFC 7239: an address with a port is quoted.
            request = request.header(http::header::FORWARDED, format!("for=\"{client}\""));
        }
        let request = request.body(()).map_err(|e| TunnelError::Connect { peer, source: io::Error::other(e) })?;
        // A pooled connection to a peer that stopped answering takes the
        // stream and never replies: the CONNECT has its own deadline.
        let exchange = async {
            let mut sender = sender.ready().await.map_err(h2_err)?;
            let (response, send) = sender.send_request(request, false).map_err(h2_err)?;
            Ok::<_, TunnelError>((response.await.map_err(h2_err)?, send))
        };
        let (response, send) =
            tokio::time::timeout(self.connect_timeout, exchange).await.map_err(|_| TunnelError::Timeout { peer })??;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::FORBIDDEN if response.headers().contains_key("x-outrigger-denied") => {
                return Err(TunnelError::Denied { peer, authority: target.authority });
            }
            status => return Err(TunnelError::Status { peer, authority: target.authority, status: status.as_u16() }),
        }
        Ok(Tunnel { stream: H2Stream::new(send, response.into_body()), place })
    }

    /// A new mutual-TLS h2 connection to the peer, from a socket made in the
    /// source pod's netns.
    async fn dial(&self, pod: &PodContext, target: &TunnelTarget) -> Result<Dialled, TunnelError> {
        let peer = target.peer;
        let source = &pod.identity;
        let config = self.tls.client(source, &target.identity)?;
        let socket = pod.upstream_socket(peer.ip()).await.map_err(|source| TunnelError::Connect { peer, source })?;
        let socket = TcpSocket::from_std_stream(socket);
        let handshake = async {
            let tcp = socket.connect(peer).await.map_err(|e| match e.kind() {
                io::ErrorKind::ConnectionRefused => TunnelError::Refused { peer },
                _ => TunnelError::Connect { peer, source: e },
            })?;
            let rtt_fd = tcp.as_fd().try_clone_to_owned().ok();
            let tls = TlsConnector::from(config)
                .connect(ServerName::IpAddress(peer.ip().into()), tcp)
                .await
                .map_err(|source| TunnelError::Tls { peer, source })?;
            let h2 = super::client_builder()
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|source| TunnelError::H2 { peer, source })?;
            Ok::<_, TunnelError>((h2, rtt_fd))
        };
        let ((sender, mut connection), rtt_fd) = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| TunnelError::Timeout { peer })??;
        let closed = Arc::new(AtomicBool::new(false));
        let driver_closed = closed.clone();
        let pings = connection.ping_pong().zip(self.keepalive);
        tokio::spawn(async move {
            // A peer that stops answering (a stopped process, a cut link)
            // is found by PING rather than by the next stream hanging.
            let keepalive = async {
                let Some((mut pings, period)) = pings else { return std::future::pending().await };
                loop {
                    tokio::time::sleep(period).await;
                    match tokio::time::timeout(period, pings.ping(h2::Ping::opaque())).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return e.to_string(),
                        Err(_) => return format!("no PING answer within {period:?}"),
                    }
                }
            };
            tokio::select! {
                ended = &mut connection => {
                    if let Err(e) = ended {
                        tracing::debug!(peer = %peer, error = %e, "tunnel connection ended");
                    }
                }
                why = keepalive => {
                    crate::warn_throttled!(peer = %peer, error = %why, "tunnel peer unresponsive: connection closed");
                }
            }
            driver_closed.store(true, Ordering::Relaxed);
        });
        tracing::debug!(peer = %peer, source = %source, destination = %target.identity, "tunnel connection established");
        Ok(Dialled { sender, closed, socket: rtt_fd })
    }
}
