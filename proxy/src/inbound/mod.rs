//! Inbound: tunnels arriving at a meshed pod's `POD_IP:15008`.
//!
//! The listener lives in the pod's netns. It accepts mutual TLS 1.3 as the
//! pod's identity, requires a client certificate of our trust domain, then
//! serves HTTP/2 `CONNECT`s — only to the pod's own addresses (never an open
//! relay), only when authorization allows the peer — by connecting to the
//! application from inside the pod, over the pod's loopback interface.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{
    identity::Identity, node::PodContext, policy::Decision, proxy::Proxy, tls::peer_identity, tunnel::relay::relay_h2,
};

/// A TLS handshake that has not finished by then is dropped (slow or
/// hostile clients must not hold sockets).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one pod's HBONE listener until `stop` is cancelled.
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, proxy: Arc<Proxy>, stop: CancellationToken) {
    if proxy.mtls.is_none() {
        return;
    }
    crate::listen::accept_until(&listener, &stop, &pod.key, |tcp, peer| {
        let (pod, proxy, stop) = (pod.clone(), proxy.clone(), stop.clone());
        proxy.connections.clone().spawn(async move { connection(tcp, peer, pod, proxy, stop).await });
    })
    .await;
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
    stop: CancellationToken,
) {
    let Some(mtls) = proxy.mtls.as_ref() else { return };
    let _ = tcp.set_nodelay(true);
    // A duplicate of the socket, to read the kernel's RTT of the network
    // side when streams end.
    let socket: Option<Arc<std::os::fd::OwnedFd>> =
        std::os::fd::AsFd::as_fd(&tcp).try_clone_to_owned().ok().map(Arc::new);
    let config = match mtls.tls.server(&pod.identity) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(pod = %pod.key, error = %e, "cannot accept tunnels for this pod");
            return;
        }
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            proxy.metrics.inbound(&pod, "tls_failure").inc();
            tracing::info!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, peer = %peer,
                result = "tls_failure", error = %e, "tunnel refused");
            return;
        }
        Err(_) => {
            proxy.metrics.inbound(&pod, "tls_failure").inc();
            tracing::info!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, peer = %peer,
                result = "tls_failure", error = "handshake timed out", "tunnel refused");
            return;
        }
    };
    // The verifier already required exactly one SPIFFE ID of our domain.
    let peer_cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
    let Some(peer_id) = peer_cert.as_ref().and_then(peer_identity) else {
        return;
    };
    // Which certificate the peer presented: rotation shows in the logs.
    let peer_serial: Arc<str> = peer_cert
        .as_ref()
        .and_then(|c| crate::identity::cert::describe(c).ok())
        .map(|i| i.serial)
        .unwrap_or_default()
        .into();
    let mut h2 = match crate::tunnel::server_builder(mtls.max_streams).handshake::<_, Bytes>(tls).await {
        Ok(h2) => h2,
        Err(e) => {
            tracing::debug!(pod = %pod.key, peer = %peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
    };
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => {
                h2.graceful_shutdown();
                // Keep driving the connection so open streams can finish.
                while let Some(Ok((req, respond))) = h2.accept().await {
                    drop((req, respond));
                }
                return;
            }
            next = h2.accept() => next,
        };
        match next {
            Some(Ok((request, respond))) => {
                let peer =
                    Peer { addr: peer, identity: peer_id.clone(), serial: peer_serial.clone(), socket: socket.clone() };
                let (pod, proxy) = (pod.clone(), proxy.clone());
                proxy.connections.clone().spawn(async move { stream(request, respond, peer, pod, proxy).await });
            }
            Some(Err(e)) => {
                tracing::debug!(pod = %pod.key, peer = %peer, error = %e, "tunnel connection error");
                return;
            }
            None => return,
        }
    }
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode, header: Option<(&'static str, &'static str)>) {
    let mut builder = Response::builder().status(status);
    if let Some((name, value)) = header {
        builder = builder.header(name, value);
    }
    if let Ok(response) = builder.body(()) {
        let _ = respond.send_response(response, true);
    }
}

/// Why a tunnel request is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("not a CONNECT")]
    NotConnect,
    #[error("the authority is not an ip:port")]
    BadAuthority,
    #[error("{0} is not an address of this pod: tunnels only reach the pod itself")]
    NotPodAddress(std::net::IpAddr),
}

impl BadRequest {
    fn status(&self) -> StatusCode {
        match self {
            Self::NotConnect => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadAuthority => StatusCode::BAD_REQUEST,
            Self::NotPodAddress(_) => StatusCode::FORBIDDEN,
        }
    }

    fn result(&self) -> &'static str {
        match self {
            Self::NotConnect | Self::BadAuthority => "bad_request",
            Self::NotPodAddress(_) => "not_pod_address",
        }
    }
}

/// Checks a tunnel request: a CONNECT whose authority is one of the pod's
/// own `ip:port`s — never an open relay. Public for the fuzz target.
pub fn validate_connect<T>(request: &Request<T>, pod_ips: &[std::net::IpAddr]) -> Result<SocketAddr, BadRequest> {
    if request.method() != Method::CONNECT {
        return Err(BadRequest::NotConnect);
    }
    let authority = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or(BadRequest::BadAuthority)?;
    if !pod_ips.contains(&authority.ip()) {
        return Err(BadRequest::NotPodAddress(authority.ip()));
    }
    Ok(authority)
}

/// The authenticated peer of a tunnel connection.
struct Peer {
    addr: SocketAddr,
    identity: Identity,
    serial: Arc<str>,
    socket: Option<Arc<std::os::fd::OwnedFd>>,
}

async fn stream(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: Peer,
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
) {
    let start = Instant::now();
    let Peer { addr: peer, identity: peer_id, serial: peer_serial, socket } = peer;
    let refuse = |respond: &mut SendResponse<Bytes>, status, result: &'static str, header, why: String| {
        reply(respond, status, header);
        proxy.metrics.inbound(&pod, result).inc();
        tracing::info!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, peer = %peer,
            peer_identity = %peer_id, peer_serial = %peer_serial, authority = %request.uri(), result, error = %why,
            "tunnel stream refused");
    };
    let authority = match validate_connect(&request, &pod.spec.ips) {
        Ok(authority) => authority,
        Err(r) => return refuse(&mut respond, r.status(), r.result(), None, r.to_string()),
    };
    let view = proxy.mesh.load_full();
    let labels = view.inbound_labels(&pod, peer.ip(), &peer_id, authority);
    let decision = view.authz.check(&pod.spec, Some(&peer_id), authority.port());
    drop(view);
    if let Decision::Deny { policy } = decision {
        proxy.metrics.conns.failed(&labels, "denied");
        return refuse(
            &mut respond,
            StatusCode::FORBIDDEN,
            "denied",
            Some(("x-outrigger-denied", "policy")),
            format!("denied by {policy}"),
        );
    }
    let connect_start = Instant::now();
    let app = match connect_app(&pod, &proxy, authority).await {
        Ok(app) => app,
        Err((status, result, why)) => {
            proxy.metrics.conns.failed(&labels, result);
            return refuse(&mut respond, status, result, None, why);
        }
    };
    let record = proxy.metrics.conns.opened(&labels, connect_start.elapsed());
    let Ok(response) = Response::builder().status(StatusCode::OK).body(()) else { return };
    let mut send = match respond.send_response(response, false) {
        Ok(send) => send,
        Err(_) => return,
    };
    let mut app = app;
    let mut recv = request.into_body();
    proxy.metrics.inbound(&pod, "ok").inc();
    let relayed = relay_h2(&mut app, &mut send, &mut recv, proxy.forward.buffer_size, |_| {}).await;
    if relayed.result.is_err() {
        let _ = app.set_zero_linger();
    }
    if let Some(record) = &record {
        let rtt = socket.as_ref().and_then(|fd| crate::sys::tcp_rtt(std::os::fd::AsFd::as_fd(&**fd)));
        // Seen from the source: what it sent reached the app (`received`
        // by the relay from the stream).
        record.finish(relayed.received, relayed.sent, start.elapsed(), rtt);
    }
    drop(record);
    tracing::info!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, peer = %peer,
        peer_identity = %peer_id, peer_serial = %peer_serial, authority = %authority,
        sent_bytes = relayed.received, received_bytes = relayed.sent,
        duration_ms = start.elapsed().as_secs_f64() * 1e3, result = relayed.outcome(), "tunnel stream closed");
}

/// The application, from a marked socket made inside the pod, dialling the
/// pod's own address: the kernel delivers it over the pod's loopback
/// interface, and an application bound to the wildcard address or to the
/// pod IP receives it alike (one bound to 127.0.0.1 only is not meant to be
/// reached from other pods).
async fn connect_app(
    pod: &PodContext,
    proxy: &Proxy,
    authority: SocketAddr,
) -> Result<TcpStream, (StatusCode, &'static str, String)> {
    let target = authority;
    let local_ip = target.ip();
    let err = |e: String| (StatusCode::SERVICE_UNAVAILABLE, "upstream_error", e);
    let socket = pod.upstream_socket(local_ip).await.map_err(|e| err(e.to_string()))?;
    let socket = TcpSocket::from_std_stream(socket);
    match tokio::time::timeout(proxy.forward.connect_timeout, socket.connect(target)).await {
        Ok(Ok(tcp)) => Ok(tcp),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err((StatusCode::SERVICE_UNAVAILABLE, "connect_refused", format!("nothing listens on {target} in the pod")))
        }
        Ok(Err(e)) => Err(err(format!("connecting to {target}: {e}"))),
        Err(_) => Err((StatusCode::GATEWAY_TIMEOUT, "connect_timeout", format!("{target} did not answer"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, uri: &str) -> Request<()> {
        Request::builder().method(method).uri(uri).body(()).expect("request")
    }

    #[test]
    fn only_connects_to_the_pods_own_addresses_are_served() {
        let ips = ["10.0.0.5".parse().expect("ip"), "fd00::5".parse().expect("ip")];
        assert_eq!(
            validate_connect(&request(Method::CONNECT, "10.0.0.5:8080"), &ips),
            Ok("10.0.0.5:8080".parse().expect("addr"))
        );
        assert!(validate_connect(&request(Method::CONNECT, "[fd00::5]:443"), &ips).is_ok());
        assert_eq!(validate_connect(&request(Method::GET, "10.0.0.5:8080"), &ips), Err(BadRequest::NotConnect));
        assert_eq!(validate_connect(&request(Method::CONNECT, "example.com:80"), &ips), Err(BadRequest::BadAuthority));
        assert!(matches!(
            validate_connect(&request(Method::CONNECT, "10.0.0.6:8080"), &ips),
            Err(BadRequest::NotPodAddress(_))
        ));
    }
}
