//! Plaintext arriving at a meshed pod from outside the mesh.
//!
//! The inbound program in the pod's netns hands each new TCP connection
//! from outside (not over loopback, not for the tunnel port, not from a
//! meshed pod of this node) to the proxy's inbound listener in the pod; the
//! accepted socket's local address is where the client was going. It is
//! authorized — a plaintext source has no principal and no namespace, so a
//! policy that requires either does not match it, as in Istio —, counted
//! (`reporter="inbound"`, `security="plaintext"`), logged, and delivered to
//! the application with its original source. A refusal is a reset: the
//! application never sees the client.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::Inbound;
use crate::{
    pod::PodContext,
    policy::{self, Decision},
    transport::{relay, Duplex},
};

impl Inbound {
    /// Serves one pod's plaintext listener until `stop` is cancelled.
    pub async fn serve_plaintext(
        self: Arc<Self>,
        listener: Arc<TcpListener>,
        pod: Arc<PodContext>,
        stop: CancellationToken,
    ) {
        crate::transport::accept_until(&listener, &stop, &pod.handed_over, &pod.key, |mut client, peer| {
            let Some(slot) = pod.connection_slot() else {
                client.abort();
                self.metrics.limit_refused(&pod.key, "pod_connections");
                crate::warn_throttled!(pod = %pod.key, "the pod is at --max-connections-per-pod: plaintext arrivals are reset");
                return;
            };
            let (this, pod) = (self.clone(), pod.clone());
            self.tasks.spawn(async move {
                let _slot = slot;
                this.plaintext(client, peer, pod).await;
            });
        })
        .await;
    }

    async fn plaintext(&self, mut client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>) {
        let start = Instant::now();
        let _ = client.set_nodelay(true);
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
        let (labels, decision) = {
            let snapshot = self.mesh.load();
            let source = snapshot.workload(peer.ip());
            let service = snapshot.service_of_endpoint(dest);
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
            (labels, decision)
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
        let mut app = match self.connect_app(&pod, dest, Some(source)).await {
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
        let relayed = relay(&mut client, &mut app, self.settings.relay, &self.drain_cut, |_| {}).await;
        if let Some(record) = &record {
            let rtt = crate::sys::tcp_rtt(std::os::fd::AsFd::as_fd(&client));
            record.finish(relayed.sent, relayed.received, start.elapsed(), rtt);
        }
        drop(record);
        tracing::info!(target: "outrigger::access", reporter = "inbound", pod = %pod.key, client = %peer, dst = %dest,
            security = "plaintext", sent_bytes = relayed.sent, received_bytes = relayed.received,
            duration_ms = start.elapsed().as_secs_f64() * 1e3, result = relayed.outcome(), flags = relayed.end.flag(),
            "plaintext connection closed");
    }
}
