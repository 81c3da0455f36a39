//! Delivering a connection to the application inside its pod.

use std::net::SocketAddr;

use http::StatusCode;
use tokio::net::{TcpSocket, TcpStream};

use super::Inbound;
use crate::pod::PodContext;

/// Why the application could not be reached.
pub(super) struct AppError {
    pub status: StatusCode,
    pub result: &'static str,
    pub why: String,
}

impl Inbound {
    /// The application at `target` (one of the pod's own addresses), from
    /// a socket made inside the pod. With original-source delivery the
    /// socket is transparent and bound to `source` — the real client — so
    /// the application sees who connected; its replies come back to the
    /// proxy through the pod's delivery routing rule, never out of the pod.
    /// The connection arrives over the pod's loopback interface, so an
    /// application bound to the wildcard address or the pod IP receives it
    /// alike (one bound to 127.0.0.1 only is not meant to be reached from
    /// other pods), and the inbound program lets it through.
    pub(super) async fn connect_app(
        &self,
        pod: &PodContext,
        target: SocketAddr,
        source: Option<SocketAddr>,
    ) -> Result<TcpStream, AppError> {
        let unavailable =
            |why: String| AppError { status: StatusCode::SERVICE_UNAVAILABLE, result: "upstream_error", why };
        // The pod's own address as the source needs no transparency.
        let source = source.filter(|s| !pod.ips.contains(&s.ip()));
        let socket = pod.delivery_socket(target.ip(), source).await.map_err(|e| unavailable(e.to_string()))?;
        // A socket bound to a client's address: announce it, or the inbound
        // program would take its SYN for a new arrival and capture it again.
        let bound = socket.local_addr().ok().filter(|from| source.is_some_and(|s| s.ip() == from.ip()));
        let announced = match (bound, &self.capture) {
            (Some(from), Some(capture)) => {
                capture.expect_delivery(from, target).map_err(|e| unavailable(e.to_string()))?;
                Some((capture, from))
            }
            _ => None,
        };
        let socket = TcpSocket::from_std_stream(socket);
        // Until the relay clears it at an orderly end, dropping this socket
        // resets the application's side (an abandoned dial included).
        socket2::SockRef::from(&socket)
            .set_linger(Some(std::time::Duration::ZERO))
            .map_err(|e| unavailable(format!("SO_LINGER: {e}")))?;
        let connected = tokio::time::timeout(self.settings.connect_timeout, socket.connect(target)).await;
        if let Some((capture, from)) = announced {
            capture.delivered(from, target);
        }
        match connected {
            Ok(Ok(tcp)) => Ok(tcp),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(AppError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                result: "connect_refused",
                why: format!("nothing listens on {target} in the pod"),
            }),
            Ok(Err(e)) => Err(unavailable(format!("connecting to {target}: {e}"))),
            Err(_) => Err(AppError {
                status: StatusCode::GATEWAY_TIMEOUT,
                result: "connect_timeout",
                why: format!("{target} did not answer within {:?}", self.settings.connect_timeout),
            }),
        }
    }
}
