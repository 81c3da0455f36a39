//! Plaintext arriving at a meshed pod from outside the mesh.
//!
//! The inbound program in the pod's netns hands each new TCP connection
//! from outside (not over loopback, not for the tunnel port, not from a
//! meshed pod of this node) to the proxy's inbound listener in the pod; the
//! accepted socket's local address is where the client was going. It is
//! authorized — a plaintext source has no principal and no namespace, so a
//! policy that requires either does not match it, as in Istio —, counted
//! (`reporter="inbound"`, `security="plaintext"`), logged, and delivered to
//! the application with its original source (request by request when it
//! speaks HTTP, counted with the requests of tunnel streams). A refusal is a reset: the
//! application never sees the client.

use std::{
    net::{SocketAddr, TcpListener},
    sync::Arc,
    time::Instant,
};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::Inbound;
use crate::{
    pod::PodContext,
    policy::{self, Decision},
    transport::Duplex,
};

impl Inbound {
    /// Serves one pod's plaintext listener until `stop` is cancelled.
    pub async fn serve_plaintext(
        self: Arc<Self>,
        listener: Arc<TcpListener>,
        pod: Arc<PodContext>,
        stop: CancellationToken,
    ) {
        let workers = self.workers.clone();
        let accept_pod = pod.clone();
        let on_accept = move |client, peer| {
            let pod = &accept_pod;
            let Some(slot) = pod.connection_slot() else {
                crate::transport::reset(client);
                self.metrics.limit_refused(&pod.key, "pod_connections");
                crate::warn_throttled!(pod = %pod.key, "the pod is at --max-connections-per-pod: plaintext arrivals are reset");
                return;
            };
            let (this, pod) = (self.clone(), pod.clone());
            self.workers.serve(client, peer, move |client| async move {
                let _slot = slot;
                this.plaintext(client, peer, pod).await;
            });
        };
        workers.accept_until(&listener, &stop, &pod.handed_over, pod.key.clone(), on_accept).await;
    }

    async fn plaintext(&self, mut client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>) {
        let start = Instant::now();
        // Assigned by the kernel program: the local address is the original
        // destination, one of the pod's own addresses.
        let Ok(dest) = client.local_addr() else { return client.abort() };
        if self.settings.reserved_ports.contains(&dest.port()) {
            // The proxy's own ports in the pod: never an application, and
            // delivering there would loop.
            client.abort();
            return crate::info_throttled!(target: "outrigger::access", reporter = "inbound", pod = %pod.key,
                client = %peer, dst = %dest, result = "reserved_port", "plaintext connection refused");
        }
        let (labels, decision, limit) = {
            let snapshot = self.mesh.load();
            let source = snapshot.workload(peer.ip());
            let service = snapshot.service_of_endpoint(dest);
            let limit = service.and_then(|k| snapshot.service(k)).and_then(|e| e.service.inbound_rate_limit.clone());
            let labels = self.metrics.conns.inbound_labels(&pod, source.map(|w| &**w), None, service, "plaintext");
            let decision = match snapshot.workload_by_key(&pod.key) {
                Some(me) => policy::check(
                    snapshot.policies_for(&pod.key.namespace),
                    &me.workload,
                    policy::Source { identity: None, ip: peer.ip() },
                    dest.port(),
                ),
                None => Decision::Deny { policy: "the pod is no longer in the mesh".into() },
            };
            (labels, decision, limit)
        };
        if let Decision::Deny { policy } = decision {
            self.metrics.conns.failed(&labels, "denied");
            client.abort();
            return tracing::info!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, client = %peer,
                dst = %dest, security = "plaintext", result = "denied", flags = "RBAC", policy, "plaintext connection refused");
        }
        let connect_start = Instant::now();
        // The client's address, not its port: the proxy's own socket for
        // this connection already holds (client, port) → (pod, port) in
        // this netns, and a delivery with the same four-tuple would land on
        // it instead of the application's listener.
        let source = SocketAddr::new(peer.ip(), 0);
        let app = match self.connect_app(&pod, dest, Some(source)).await {
            Ok(app) => app,
            Err(e) => {
                self.metrics.conns.failed(&labels, e.result);
                client.abort();
                return tracing::info!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, client = %peer,
                    dst = %dest, security = "plaintext", result = e.result, flags = "UF", error = e.why,
                    "plaintext connection failed");
            }
        };
        let record = self.metrics.conns.opened(&labels, connect_start.elapsed());
        // Taken now: the connection moves into the delivery (the handshake's
        // estimate; the kernel's smoothed RTT moves little over a
        // connection's life on a node's network).
        let rtt = crate::sys::tcp_rtt(std::os::fd::AsFd::as_fd(&client));
        let parties = super::http_layer::Parties::of(&labels);
        // Request by request when it speaks HTTP, as a tunnel stream is.
        let limiter = pod.inbound_limiter(limit.as_ref());
        let relayed = self.deliver(client, app, dest.port(), parties, limiter).await;
        if let Some(record) = &record {
            // Seen from the client: what it sent is what the delivery
            // received from it.
            record.finish(relayed.received, relayed.sent, start.elapsed(), rtt);
        }
        drop(record);
        tracing::info!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, client = %peer, dst = %dest,
            security = "plaintext", sent_bytes = relayed.received, received_bytes = relayed.sent,
            duration_ms = start.elapsed().as_secs_f64() * 1e3, result = relayed.outcome(), flags = relayed.end.flag(),
            "plaintext connection closed");
    }
}
