//! One meshed pod of this node as the data path sees it: who it is (key,
//! identity, addresses) and its network handle (the netns thread, spare
//! upstream sockets, listener binding). Every connection holds an `Arc` of
//! its pod's context; nothing here changes after the pod is started.
#![forbid(unsafe_code)]

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    sync::{Arc, Mutex},
};

use crate::{
    identity::Identity,
    model::{PodKey, RateLimit, Workload},
    netns::{sockets::bind_listener, Netns, NetnsError, SpareSockets},
    resilience::RateLimiter,
    transport::SocketOptions,
};

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("netns {0} is the proxy's own network namespace; meshing it would capture the proxy itself")]
    OwnNetns(String),
    #[error("pod {0} has no netns: it is not a pod of this node")]
    NotLocal(String),
    #[error("port {port} is already in use in the pod's netns ({addr}): the pod must not use the proxy's ports")]
    PortInUse { addr: SocketAddr, port: u16 },
    #[error("{ip} is not an address of the pod's netns: check the pod's ips (is {ip} configured on its interface?)")]
    NotPodAddress { ip: IpAddr },
    #[error("reading a listener's address: {0}")]
    ListenerAddr(String),
    #[error("binding {addr} in the pod's netns: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("registering the pod with the kernel programs: {0}")]
    Capture(#[from] crate::capture::CaptureError),
    #[error("the pod's netns thread did not start: {0}")]
    Join(#[from] tokio::task::JoinError),
}

fn bind_error(addr: SocketAddr, e: io::Error) -> PodError {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => PodError::PortInUse { addr, port: addr.port() },
        Some(libc::EADDRNOTAVAIL) => PodError::NotPodAddress { ip: addr.ip() },
        _ => PodError::Bind { addr, reason: e.to_string() },
    }
}

/// Per-pod limits: one pod's connections or half-open tunnels cannot take
/// the descriptors every other pod needs.
#[derive(Debug, Clone, Copy)]
pub struct PodLimits {
    /// Connections the proxy holds for the pod at once (each costs two
    /// descriptors): outbound from it and inbound to it.
    pub connections: usize,
    /// Tunnel connections to the pod still in their handshake.
    pub pending_handshakes: usize,
}

/// A pod's listening sockets, shared with its accept loops and kept by
/// its owner so that a new definition of the pod in the same netns listens
/// on the very same sockets. Binding new ones beside them (SO_REUSEPORT)
/// and closing the old would reset the connects the kernel queued on an
/// old socket between its last accept and its close — a few on every
/// change.
pub type ListenSockets = Vec<Arc<TcpListener>>;

/// A slot held for the life of one connection (or one handshake).
pub type Slot = tokio::sync::OwnedSemaphorePermit;

/// What a connection needs to know about the pod it came from (or goes to).
#[derive(Debug)]
pub struct PodContext {
    /// The proxy's small number for the pod (kernel map value, logs).
    pub id: u32,
    pub key: PodKey,
    pub uid: Arc<str>,
    /// The pod's SPIFFE identity (its service account's).
    pub identity: Identity,
    pub ips: Vec<IpAddr>,
    pub netns: Netns,
    /// Upstream sockets made ahead of time in the pod's netns.
    pub spares: Arc<SpareSockets>,
    /// Transparent sockets for delivering to the application with the
    /// client's address (`None`: deliveries come from the pod's address).
    delivery: Option<Arc<SpareSockets>>,
    connections: Arc<tokio::sync::Semaphore>,
    handshakes: Arc<tokio::sync::Semaphore>,
    /// Cancelled when the pod's listening sockets pass to its next
    /// definition: the accept loops then end at once — the sockets stay
    /// open and the next definition serves what is queued on them.
    pub handed_over: tokio_util::sync::CancellationToken,
    /// The bucket of its service's `inboundRateLimit` (made at the first
    /// request, remade when the limit changes; gone with the pod).
    inbound_limiter: Mutex<Option<Arc<RateLimiter>>>,
}

impl PodContext {
    /// The pod's inbound rate limiter for `spec` (none without one).
    pub fn inbound_limiter(&self, spec: Option<&RateLimit>) -> Option<Arc<RateLimiter>> {
        let spec = spec?;
        let mut held = self.inbound_limiter.lock().unwrap_or_else(|e| e.into_inner());
        match &*held {
            Some(l) if l.spec() == spec => Some(l.clone()),
            _ => {
                let l = Arc::new(RateLimiter::new(spec.clone()));
                *held = Some(l.clone());
                Some(l)
            }
        }
    }

    /// Opens the pod's netns (on a blocking thread: it starts the pod's
    /// netns thread) and refuses the proxy's own.
    pub async fn open(
        id: u32,
        workload: &Workload,
        identity: Identity,
        own_netns_cookie: u64,
        sockets: SocketOptions,
        delivery: Option<SocketOptions>,
        limits: PodLimits,
    ) -> Result<Self, PodError> {
        let Some(path) = workload.netns.clone() else {
            return Err(PodError::NotLocal(workload.key.to_string()));
        };
        let thread = format!("ns-{}", workload.key.name);
        let netns = tokio::task::spawn_blocking(move || Netns::open(&path, &thread)).await??;
        if netns.cookie() == own_netns_cookie {
            return Err(PodError::OwnNetns(netns.path().display().to_string()));
        }
        Ok(Self {
            id,
            key: workload.key.clone(),
            uid: workload.uid.clone(),
            identity,
            ips: workload.ips.clone(),
            netns,
            spares: SpareSockets::new(sockets),
            delivery: delivery.map(SpareSockets::new),
            connections: Arc::new(tokio::sync::Semaphore::new(limits.connections)),
            handshakes: Arc::new(tokio::sync::Semaphore::new(limits.pending_handshakes)),
            handed_over: tokio_util::sync::CancellationToken::new(),
            inbound_limiter: Mutex::default(),
        })
    }

    /// A connection slot, or `None` when the pod is at its limit (the
    /// caller refuses the connection at once).
    pub fn connection_slot(&self) -> Option<Slot> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// A slot for one pending tunnel handshake to this pod.
    pub fn handshake_slot(&self) -> Option<Slot> {
        self.handshakes.clone().try_acquire_owned().ok()
    }

    /// A pod context with no namespace behind it (unit tests of the data
    /// path, which never make sockets through it).
    #[cfg(test)]
    pub fn for_test(name: &str, ips: &[IpAddr]) -> Self {
        Self {
            id: 1,
            key: PodKey::new("default", name),
            uid: name.into(),
            identity: Identity::new("cluster.local", "default", name),
            ips: ips.to_vec(),
            netns: Netns::detached(std::path::Path::new("/test"), 42),
            spares: SpareSockets::new(SocketOptions {
                mark: 1,
                keepalive: None,
                user_timeout: None,
                transparent: false,
            }),
            delivery: None,
            connections: Arc::new(tokio::sync::Semaphore::new(1024)),
            handshakes: Arc::new(tokio::sync::Semaphore::new(16)),
            handed_over: tokio_util::sync::CancellationToken::new(),
            inbound_limiter: Mutex::default(),
        }
    }

    /// A marked socket in the pod's netns for a connection to `ip`.
    pub async fn upstream_socket(&self, ip: IpAddr) -> Result<std::net::TcpStream, io::Error> {
        match self.spares.take(&self.netns, ip).await {
            Ok(result) => result,
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// A socket in the pod's netns for delivering a connection to the
    /// application at `app`, from `source` when original-source delivery is
    /// on (the port is kept when it can be; 0 asks for any).
    pub async fn delivery_socket(
        &self,
        app: IpAddr,
        source: Option<SocketAddr>,
    ) -> Result<std::net::TcpStream, io::Error> {
        let (Some(delivery), Some(source)) = (&self.delivery, source) else {
            return self.upstream_socket(app).await;
        };
        // A source of the other family than the application cannot be
        // bound: fall back to the pod's own address.
        if source.is_ipv4() != app.is_ipv4() {
            return self.upstream_socket(app).await;
        }
        let socket = match delivery.take(&self.netns, app).await {
            Ok(result) => result?,
            Err(e) => return Err(io::Error::other(e)),
        };
        let sock = socket2::SockRef::from(&socket);
        if sock.bind(&source.into()).is_err() {
            // That port is taken here (the client's own connection shares
            // the pod's netns): any port, same address.
            sock.bind(&SocketAddr::new(source.ip(), 0).into())?;
        }
        Ok(socket)
    }

    /// Sets the pod's netns up for original-source delivery (see
    /// `netns::delivery`); a no-op when that is off.
    pub async fn prepare_delivery(&self, mark: u32) -> Result<(), PodError> {
        if self.delivery.is_some() {
            // The mark doubles as the routing table's number: one knob.
            self.netns.enable_original_source(mark, mark).await?;
        }
        Ok(())
    }

    /// A listener on `addr` inside the pod: the socket `previous` has on
    /// that address if any (see [`ListenSockets`]), else a newly bound one.
    /// It is also added to `kept`.
    ///
    /// `resetting`, for connections the proxy relays or serves itself
    /// (outbound clients, plaintext arrivals): they are reset, not closed,
    /// unless a relay or the HTTP layer ends them in order (the relay counts
    /// on it, see `RelayOptions`), so a crash or a connection dropped before
    /// it is served never looks like a clean end. A failed arming fails the
    /// listener like a bind.
    async fn listen_on(
        &self,
        addr: SocketAddr,
        previous: &[Arc<TcpListener>],
        kept: &mut ListenSockets,
        resetting: bool,
    ) -> Result<io::Result<Arc<TcpListener>>, PodError> {
        let listener = match previous.iter().find(|l| l.local_addr().ok() == Some(addr)) {
            Some(listening) => Ok(listening.clone()),
            None => self.netns.run(move || bind_listener(addr)).await?.map(Arc::new),
        };
        if let Ok(listener) = &listener {
            // Also on a listener kept from before (an older version's).
            if let Err(e) = crate::netns::sockets::accept_without_nagle(&**listener) {
                tracing::warn!(pod = %self.key, %addr, error = %e, "could not set TCP_NODELAY on a listener; its connections will use Nagle");
            }
            kept.push(listener.clone());
        }
        Ok(listener.and_then(|l| {
            if resetting {
                crate::netns::sockets::accept_reset_on_close(&*l)?;
            }
            Ok(l)
        }))
    }

    /// Listens on each of the pod's own addresses (they must be configured
    /// in its netns) for tunnels.
    pub async fn bind_inbound(
        &self,
        port: u16,
        previous: &[Arc<TcpListener>],
        kept: &mut ListenSockets,
    ) -> Result<Vec<Arc<TcpListener>>, PodError> {
        let mut listeners = Vec::with_capacity(self.ips.len());
        for ip in self.ips.clone() {
            let addr = SocketAddr::new(ip, port);
            listeners.push(self.listen_on(addr, previous, kept, false).await?.map_err(|e| bind_error(addr, e))?);
        }
        Ok(listeners)
    }

    /// Listens on the plaintext inbound port, `0.0.0.0:port` and
    /// `[::]:port`, inside the pod: the inbound program hands it connections
    /// for any of the pod's addresses. Returns (IPv4 listener, IPv6 listener
    /// if the pod has IPv6).
    pub async fn bind_plaintext(
        &self,
        port: u16,
        previous: &[Arc<TcpListener>],
        kept: &mut ListenSockets,
    ) -> Result<(Arc<TcpListener>, Option<Arc<TcpListener>>), PodError> {
        let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let listener = self.listen_on(v4, previous, kept, true).await?.map_err(|e| bind_error(v4, e))?;
        let listener6 = match self.listen_on(v6, previous, kept, true).await? {
            Ok(l) => Some(l),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)) => None,
            Err(e) => return Err(bind_error(v6, e)),
        };
        Ok((listener, listener6))
    }

    /// Listens on `127.0.0.1:port` and `[::1]:port` inside the pod. A pod
    /// without IPv6 loopback gets the IPv4 listener only.
    pub async fn bind_outbound(
        &self,
        port: u16,
        previous: &[Arc<TcpListener>],
        kept: &mut ListenSockets,
    ) -> Result<Vec<Arc<TcpListener>>, PodError> {
        let mut listeners = Vec::with_capacity(2);
        for v6 in [false, true] {
            let addr = outbound_listener_addr(v6, port);
            match self.listen_on(addr, previous, kept, true).await? {
                Ok(listener) => listeners.push(listener),
                Err(e) if v6 && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                    tracing::warn!(pod = %self.key, "pod has no IPv6 loopback; only IPv4 connects are captured");
                }
                Err(e) => return Err(bind_error(addr, e)),
            }
        }
        Ok(listeners)
    }
}

/// The local address of a pod's outbound listener for the given family.
pub fn outbound_listener_addr(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::from((Ipv6Addr::LOCALHOST, port))
    } else {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }
}
