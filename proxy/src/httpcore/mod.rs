//! HTTP plumbing both directions share: bodies counted on the way through
//! (with their end reported once), and a client connection's own executor.

pub mod body;
pub mod local;
pub mod tee;

use crate::transport::{Duplex, HyperIo};
use local::{Exec, Spawner};

/// The route label of a request no route rule took: made once, so a
/// request clones a reference count instead of allocating the text.
pub static DEFAULT_ROUTE: std::sync::LazyLock<std::sync::Arc<str>> = std::sync::LazyLock::new(|| "default".into());

/// The `request_protocol` label: `grpc` by content type, else by version.
pub fn request_protocol(headers: &http::HeaderMap, h2: bool) -> &'static str {
    let grpc = headers.get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    match (grpc, h2) {
        (true, _) => "grpc",
        (false, true) => "http2",
        (false, false) => "http",
    }
}

/// The `grpc_response_status` label: the status of a gRPC request's
/// response (`unknown` without one), empty for other protocols.
pub fn grpc_label(protocol: &str, grpc: Option<u8>) -> &'static str {
    match (protocol, grpc) {
        ("grpc", Some(g)) => crate::metrics::GRPC_STATUS[g as usize],
        ("grpc", None) => "unknown",
        _ => "",
    }
}

/// Read buffer sizes of HTTP connections (as the relay's first read).
pub const BUFFER: usize = 16 * 1024;
/// The most a client may send as request line and headers (HTTP/1.1) or
/// header list (h2): beyond it the request is refused (431 / stream reset).
pub const MAX_HEADERS: usize = 64 * 1024;
/// Concurrent streams a client h2 connection may open.
pub const MAX_STREAMS: u32 = 256;

/// Serves `client` (h2 when `h2`, else HTTP/1.1 with upgrades) with
/// `service` on `spawner`, until the connection ends or `cut` is cancelled
/// (the drain deadline). When `wind_down` completes, the connection is shut
/// down gracefully: what is in flight finishes, nothing new is taken.
pub async fn serve_client<I, S, B>(
    client: I,
    h2: bool,
    spawner: &Spawner,
    service: S,
    cut: &tokio_util::sync::CancellationToken,
    wind_down: impl std::future::Future<Output = ()>,
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
        drive(spawner, server, wind_down, |s| s.graceful_shutdown(), cut).await
    } else {
        let server = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .max_buf_size(MAX_HEADERS.max(8192))
            .serve_connection(client, service)
            .with_upgrades();
        drive(spawner, server, wind_down, |s| s.graceful_shutdown(), cut).await
    }
}

/// Runs a server connection on `spawner`; shuts it down gracefully (with
/// `shutdown`) once `wind_down` completes; drops it at `cut`.
async fn drive<F>(
    spawner: &Spawner,
    server: F,
    wind_down: impl std::future::Future<Output = ()>,
    mut shutdown: impl FnMut(std::pin::Pin<&mut F>),
    cut: &tokio_util::sync::CancellationToken,
) -> Result<(), hyper::Error>
where
    F: std::future::Future<Output = Result<(), hyper::Error>>,
{
    let mut server = std::pin::pin!(server);
    let mut wind_down = std::pin::pin!(wind_down);
    let mut winding = false;
    let run = std::future::poll_fn(|cx| {
        if !winding && wind_down.as_mut().poll(cx).is_ready() {
            winding = true;
            shutdown(server.as_mut());
        }
        server.as_mut().poll(cx)
    });
    tokio::select! {
        r = spawner.run(run) => r,
        () = cut.cancelled() => Ok(()),
    }
}

/// Whether the request asks to switch protocols (HTTP/1.1 `Upgrade`, or a
/// `CONNECT` tunnel).
pub fn is_upgrade<B>(req: &http::Request<B>) -> bool {
    req.method() == http::Method::CONNECT
        || (req.headers().contains_key(http::header::UPGRADE)
            && req
                .headers()
                .get_all(http::header::CONNECTION)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))))
}

/// Joins the client's and the endpoint's upgraded connections (WebSocket,
/// CONNECT) byte for byte until either ends.
pub fn join_upgrade(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut upstream = hyper_util::rt::TokioIo::new(upstream);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
    });
}
