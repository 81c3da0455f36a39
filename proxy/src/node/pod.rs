//! One meshed pod: its netns handle and its listeners.

use std::{io, sync::Arc};

use tokio::net::TcpListener;

use crate::{
    identity::Identity,
    mesh::{PodKey, PodSpec},
    netns::{sockets::bind_listener, Netns, NetnsError, SpareSockets},
    outbound::listener_addr,
};

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("netns {0} is the proxy's own network namespace; meshing it would capture the proxy itself")]
    OwnNetns(String),
    #[error("pod {0} has no netns: it is not a pod of this node")]
    NotLocal(String),
    #[error("binding {addr} in the pod's netns: {source} (is another process using port {port} in the pod, or loopback down?)")]
    Bind {
        addr: std::net::SocketAddr,
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("listener address: {0}")]
    ListenerAddr(#[source] io::Error),
    #[error("registering the pod with the kernel programs: {0}")]
    Capture(#[from] crate::capture::CaptureError),
    #[error("the pod's netns thread did not start: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What a connection needs to know about the pod it came from.
#[derive(Debug)]
pub struct PodContext {
    pub id: u32,
    pub key: PodKey,
    /// The pod's SPIFFE identity (its service account's).
    pub identity: Identity,
    pub spec: PodSpec,
    pub netns: Netns,
    /// Upstream sockets made ahead of time in the pod's netns.
    pub spares: Arc<SpareSockets>,
}

impl PodContext {
    pub async fn open(
        id: u32,
        spec: &PodSpec,
        own_netns_cookie: u64,
        trust_domain: &str,
        mark: u32,
    ) -> Result<Self, PodError> {
        let path = spec.netns.clone().ok_or_else(|| PodError::NotLocal(spec.key().to_string()))?;
        let thread = format!("ns-{}", spec.name);
        let netns = tokio::task::spawn_blocking(move || Netns::open(&path, &thread)).await??;
        if netns.cookie() == own_netns_cookie {
            return Err(PodError::OwnNetns(netns.path().display().to_string()));
        }
        let identity = Identity::new(trust_domain, &spec.namespace, &spec.service_account);
        Ok(Self { id, key: spec.key(), identity, spec: spec.clone(), netns, spares: SpareSockets::new(mark) })
    }

    /// A marked socket in the pod's netns for a connection to `ip`.
    pub async fn upstream_socket(&self, ip: std::net::IpAddr) -> Result<std::net::TcpStream, io::Error> {
        match self.spares.take(&self.netns, ip).await {
            Ok(result) => result,
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// Binds the HBONE listener on each of the pod's own addresses, inside
    /// the pod (these must be configured in its netns).
    pub async fn bind_inbound(self: &Arc<Self>, port: u16) -> Result<Vec<TcpListener>, PodError> {
        let mut listeners = Vec::with_capacity(self.spec.ips.len());
        for ip in self.spec.ips.clone() {
            let addr = std::net::SocketAddr::new(ip, port);
            let bound = self.netns.run(move || bind_listener(addr)).await?;
            let std_listener = bound.map_err(|source| PodError::Bind { addr, port, source })?;
            listeners.push(TcpListener::from_std(std_listener).map_err(|source| PodError::Bind {
                addr,
                port,
                source,
            })?);
        }
        Ok(listeners)
    }

    /// Binds `127.0.0.1:port` and `[::1]:port` inside the pod. A pod
    /// without IPv6 loopback gets the IPv4 listener only.
    pub async fn bind_listeners(self: &Arc<Self>, port: u16) -> Result<Vec<TcpListener>, PodError> {
        let mut listeners = Vec::with_capacity(2);
        for v6 in [false, true] {
            let addr = listener_addr(v6, port);
            let bound = self.netns.run(move || bind_listener(addr)).await?;
            match bound {
                Ok(std_listener) => {
                    let listener =
                        TcpListener::from_std(std_listener).map_err(|source| PodError::Bind { addr, port, source })?;
                    listeners.push(listener);
                }
                Err(e) if v6 && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                    tracing::warn!(pod = %self.key, "pod has no IPv6 loopback; only IPv4 connects are captured");
                }
                Err(source) => return Err(PodError::Bind { addr, port, source }),
            }
        }
        Ok(listeners)
    }
}
