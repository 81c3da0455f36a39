//! One tunnel stream: validate the CONNECT, authorize the peer, dial the
//! application inside the pod, relay.

use std::{
    future::poll_fn,
    net::SocketAddr,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Method, Request, Response, StatusCode};

use super::Inbound;
use crate::{
    identity::Identity,
    pod::PodContext,
    policy::{self, Decision},
    transport::H2Stream,
};

/// The authenticated peer of a tunnel connection.
pub(super) struct Peer {
    pub addr: SocketAddr,
    pub identity: Identity,
    pub serial: Arc<str>,
    /// The tunnel's TCP RTT, read after its handshake.
    pub rtt: Option<Duration>,
}

impl Peer {
    /// Where the tunnel comes from: the source pod's address (the tunnel's
    /// socket lives in the source pod's netns).
    fn source(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.addr.ip(), 0))
    }
}

/// The client's own port, from the CONNECT's `Forwarded: for="ip:port"`,
/// believed only when the address is the tunnel's own source (a peer can
/// tell its client's port, not claim another address).
fn forwarded_source(request: &Request<RecvStream>, peer: &Peer) -> Option<SocketAddr> {
    let value = request.headers().get(http::header::FORWARDED)?.to_str().ok()?;
    let addr: SocketAddr = value.trim().strip_prefix("for=")?.trim_matches('"').parse().ok()?;
    (crate::model::canonical_ip(addr.ip()) == crate::model::canonical_ip(peer.addr.ip())).then_some(addr)
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

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode, header: Option<(&'static str, &'static str)>) {
    let mut builder = Response::builder().status(status);
    if let Some((name, value)) = header {
        builder = builder.header(name, value);
    }
    if let Ok(response) = builder.body(()) {
        let _ = respond.send_response(response, true);
    }
}

impl Inbound {
    pub(super) async fn stream(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: &Peer,
        pod: Arc<PodContext>,
    ) {
        let start = Instant::now();
        let refuse = |respond: &mut SendResponse<Bytes>, status, result: &'static str, header, why: &str| {
            reply(respond, status, header);
            self.metrics.inbound(&pod.key, result).inc();
            tracing::info!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, peer = %peer.addr,
                peer_identity = %peer.identity, peer_serial = %peer.serial, authority = %request.uri(), result,
                error = why, "tunnel stream refused");
        };
        let authority = match validate_connect(&request, &pod.ips) {
            Ok(authority) => authority,
            Err(r) => return refuse(&mut respond, r.status(), r.result(), None, &r.to_string()),
        };
        let (labels, decision, limit) = {
            let snapshot = self.mesh.load();
            let source = snapshot.workload(peer.addr.ip());
            let service = snapshot.service_of_endpoint(authority);
            let limit = service.and_then(|k| snapshot.service(k)).and_then(|e| e.service.inbound_rate_limit.clone());
            let labels = self.metrics.conns.inbound_labels(
                &pod,
                source.map(|w| &**w),
                Some(&peer.identity),
                service,
                "mutual_tls",
            );
            let decision = match snapshot.workload_by_key(&pod.key) {
                Some(me) => policy::check(
                    snapshot.policies_for(&pod.key.namespace),
                    &me.workload,
                    policy::Source { identity: Some(&peer.identity), ip: peer.addr.ip() },
                    authority.port(),
                ),
                // The pod is leaving: nothing may reach it any more.
                None => Decision::Deny { policy: "the pod is no longer in the mesh".into() },
            };
            (labels, decision, limit)
        };
        if let Decision::Deny { policy } = decision {
            self.metrics.conns.failed(&labels, "denied");
            let why = format!("denied by {policy}");
            return refuse(&mut respond, StatusCode::FORBIDDEN, "denied", Some(("x-outrigger-denied", "policy")), &why);
        }
        let Some(_slot) = pod.connection_slot() else {
            self.metrics.limit_refused(&pod.key, "pod_connections");
            return refuse(
                &mut respond,
                StatusCode::SERVICE_UNAVAILABLE,
                "pod_limit",
                None,
                "the pod is at --max-connections-per-pod",
            );
        };
        let connect_start = Instant::now();
        let source = forwarded_source(&request, peer).or_else(|| peer.source());
        let reset_before_service = |reason: Result<h2::Reason, h2::Error>, dialling: bool| {
            let reason = reason.map(|r| format!("{r:?}")).unwrap_or_else(|e| e.to_string());
            self.metrics.inbound(&pod.key, "reset_by_peer").inc();
            tracing::info!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, peer = %peer.addr,
                peer_identity = %peer.identity, authority = %authority, result = "reset_by_peer", reason, dialling,
                "tunnel stream reset before it was served");
        };
        // Never dial the application for a stream the peer already reset:
        // checked before the dial starts (racing the two would start the
        // dial half the time, whichever future is polled first).
        if let Poll::Ready(reason) = poll_fn(|cx| Poll::Ready(respond.poll_reset(cx))).await {
            return reset_before_service(reason, false);
        }
        // A reset during the dial abandons it; the application then sees a
        // reset (the dial's socket has SO_LINGER 0), never an empty clean
        // connection. A dial that completed wins over a reset seen at the
        // same time: the stream is then answered, and a reset found there
        // reaches the application as a reset too.
        let connected = tokio::select! {
            biased;
            app = self.connect_app(&pod, authority, source) => app,
            reason = poll_fn(|cx| respond.poll_reset(cx)) => return reset_before_service(reason, true),
        };
        let mut app = match connected {
            Ok(app) => app,
            Err(e) => {
                self.metrics.conns.failed(&labels, e.result);
                return refuse(&mut respond, e.status, e.result, None, &e.why);
            }
        };
        let record = self.metrics.conns.opened(&labels, connect_start.elapsed());
        let Ok(response) = Response::builder().status(StatusCode::OK).body(()) else { return };
        let send = match respond.send_response(response, false) {
            Ok(send) => send,
            Err(e) => {
                // Reset between dialling and answering: counted, and the
                // application sees a reset too.
                crate::transport::Duplex::abort(&mut app);
                self.metrics.inbound(&pod.key, "reset_by_peer").inc();
                tracing::info!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, peer = %peer.addr,
                    authority = %authority, result = "reset_by_peer", error = %e, "tunnel stream reset before it was served");
                return;
            }
        };
        let tunnel = H2Stream::new(send, request.into_body());
        self.metrics.inbound(&pod.key, "ok").inc();
        let parties = super::http_layer::Parties::of(&labels);
        let limiter = pod.inbound_limiter(limit.as_ref());
        let relayed = self.deliver(tunnel, app, authority.port(), parties, limiter).await;
        if let Some(record) = &record {
            // Seen from the source: what it sent reached the app (`received`
            // by the relay from the stream).
            record.finish(relayed.received, relayed.sent, start.elapsed(), peer.rtt);
        }
        drop(record);
        tracing::info!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, peer = %peer.addr,
            peer_identity = %peer.identity, peer_serial = %peer.serial, authority = %authority,
            sent_bytes = relayed.received, received_bytes = relayed.sent,
            duration_ms = start.elapsed().as_secs_f64() * 1e3, result = relayed.outcome(), flags = relayed.end.flag(),
            "tunnel stream closed");
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
