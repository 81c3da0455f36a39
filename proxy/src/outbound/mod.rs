//! Outbound: connections captured leaving a meshed pod.
//!
//! Each meshed pod has listeners on `127.0.0.1:15001` and `[::1]:15001`
//! inside its own netns; the listener that accepted a connection tells us
//! which pod it came from. The original destination comes from the kernel
//! maps, keyed by (pod netns cookie, 4-tuple).
#![forbid(unsafe_code)]

mod connect;
mod forward;

pub use connect::ForwardError;

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{node::PodContext, proxy::Proxy};

/// Serves one pod-local listener until `stop` is cancelled.
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, proxy: Arc<Proxy>, stop: CancellationToken) {
    let local = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::error!(pod = %pod.key, error = %e, "listener has no local address; not serving it");
            return;
        }
    };
    crate::listen::accept_until(&listener, &stop, &pod.key, |stream, peer| {
        let conn = forward::Connection { pod: pod.clone(), peer, local };
        proxy.connections.spawn(forward::run(stream, conn, proxy.clone()));
    })
    .await;
}

/// The local address of a pod listener for the given family.
pub fn listener_addr(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port))
    }
}
