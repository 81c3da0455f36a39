//! HTTP plumbing both directions share: bodies counted on the way through
//! (with their end reported once), and a client connection's own executor.

pub mod body;
pub mod local;

use crate::transport::{Duplex, HyperIo};
use local::{Exec, Spawner};

/// Read buffer sizes of HTTP connections (as the relay's first read).
pub const BUFFER: usize = 16 * 1024;
/// The most a client may send as request line and headers (HTTP/1.1) or
/// header list (h2): beyond it the request is refused (431 / stream reset).
pub const MAX_HEADERS: usize = 64 * 1024;
/// Concurrent streams a client h2 connection may open.
pub const MAX_STREAMS: u32 = 256;

/// Serves `client` (h2 when `h2`, else HTTP/1.1 with upgrades) with
/// `service` on `spawner`, until the connection ends or `cut` is cancelled
/// (the drain deadline).
pub async fn serve_client<I, S, B>(
    client: I,
    h2: bool,
    spawner: &Spawner,
    service: S,
    cut: &tokio_util::sync::CancellationToken,
) -> Result<(), hyper::Error>
where
    I: Duplex + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client = HyperIo::new(client, BUFFER, BUFFER);
    if h2 {
        let server = hyper::server::conn::http2::Builder::new(Exec::Local(spawner.clone()))
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size(MAX_HEADERS as u32)
            .serve_connection(client, service);
        tokio::select! {
            r = spawner.run(server) => r,
            () = cut.cancelled() => Ok(()),
        }
    } else {
        let server = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .max_buf_size(MAX_HEADERS.max(8192))
            .serve_connection(client, service)
            .with_upgrades();
        tokio::select! {
            r = spawner.run(server) => r,
            () = cut.cancelled() => Ok(()),
        }
    }
}
