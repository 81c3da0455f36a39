//! HTTP over one captured connection (WIP, issue 12): the client's
//! connection is served by hyper (HTTP/1.1 or h2, as detected) and each
//! request is forwarded over one upstream connection of the same version to
//! the endpoint already connected. Per-request balancing, routes, upgrades
//! and request metrics build on this.

use std::sync::Arc;

use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::TokioExecutor;

use super::detect::Detected;
use crate::transport::{Duplex, HyperIo};

/// Read buffer sizes of the HTTP connections (as the relay's first read).
const BUFFER: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("HTTP handshake with the endpoint failed: {0}")]
    Handshake(hyper::Error),
    #[error("serving the client's HTTP connection failed: {0}")]
    Serve(hyper::Error),
    #[error("the endpoint's HTTP connection failed: {0}")]
    Upstream(hyper::Error),
}

/// A client of the one upstream connection.
enum Sender {
    Http1(tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Incoming>>),
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

impl Sender {
    async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, hyper::Error> {
        match self {
            // HTTP/1.1 without pipelining: one request at a time.
            Self::Http1(s) => s.lock().await.send_request(req).await,
            Self::H2(s) => s.clone().send_request(req).await,
        }
    }
}

/// Serves `client` speaking `protocol` (HTTP/1 or h2) to its end, forwarding
/// every request over `upstream`.
pub async fn serve<I, U>(client: I, upstream: U, protocol: Detected) -> Result<(), HttpError>
where
    I: Duplex + Unpin + Send,
    U: Duplex + Unpin + Send + 'static,
{
    let upstream = HyperIo::new(upstream, BUFFER, BUFFER);
    let client = HyperIo::new(client, BUFFER, BUFFER);
    match protocol {
        Detected::H2 => {
            let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(upstream)
                .await
                .map_err(HttpError::Handshake)?;
            let sender = Arc::new(Sender::H2(sender));
            let service = hyper::service::service_fn(move |req| {
                let sender = sender.clone();
                async move { forward(&sender, req).await }
            });
            let server =
                hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(client, service);
            run_both(server, conn).await
        }
        Detected::Http1 | Detected::Opaque => {
            let (sender, conn) = hyper::client::conn::http1::handshake(upstream).await.map_err(HttpError::Handshake)?;
            let sender = Arc::new(Sender::Http1(tokio::sync::Mutex::new(sender)));
            let service = hyper::service::service_fn(move |req| {
                let sender = sender.clone();
                async move { forward(&sender, req).await }
            });
            let server = hyper::server::conn::http1::Builder::new().keep_alive(true).serve_connection(client, service);
            run_both(server, conn).await
        }
    }
}

async fn forward(sender: &Sender, req: Request<Incoming>) -> Result<Response<Incoming>, hyper::Error> {
    sender.send(req).await
}

/// Drives the client-facing server and the upstream connection together;
/// done when the client's connection ends (the upstream one is then
/// dropped, closing it).
async fn run_both<S, C>(server: S, upstream: C) -> Result<(), HttpError>
where
    S: std::future::Future<Output = Result<(), hyper::Error>>,
    C: std::future::Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(server);
    tokio::pin!(upstream);
    tokio::select! {
        r = &mut server => r.map_err(HttpError::Serve),
        r = &mut upstream => match r {
            // The endpoint closed: finish what the client side has.
            Ok(()) => server.await.map_err(HttpError::Serve),
            Err(e) => Err(HttpError::Upstream(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    use std::convert::Infallible;

    use super::*;
    use crate::transport::Stream;

    /// An h1 client → proxy (serve) → an h1 origin, three keep-alive
    /// requests over one client connection, the Host header preserved.
    #[tokio::test]
    async fn http1_requests_are_forwarded_over_one_upstream_connection() {
        let (client_end, proxy_client) = tokio::io::duplex(1024);
        let (proxy_upstream, origin_end) = tokio::io::duplex(1024);
        let origin = tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
                let path = req.uri().path().to_string();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{host}{path}")))))
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(HyperIo::new(Stream::new(origin_end), 1024, 1024), service)
                .await
        });
        let proxy = tokio::spawn(serve(Stream::new(proxy_client), Stream::new(proxy_upstream), Detected::Http1));
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(HyperIo::new(Stream::new(client_end), 1024, 1024)).await.expect("hs");
        let driver = tokio::spawn(conn);
        for path in ["/a", "/b", "/c"] {
            let req = Request::get(path).header("host", "cart.shop").body(Full::new(Bytes::new())).expect("req");
            let resp = sender.send_request(req).await.expect("response");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body, format!("cart.shop{path}").as_bytes());
        }
        drop(sender);
        driver.await.expect("driver").expect("client conn");
        proxy.await.expect("proxy").expect("serve");
        origin.abort();
    }

    #[tokio::test]
    async fn h2_streams_are_forwarded_concurrently() {
        let (client_end, proxy_client) = tokio::io::duplex(64 * 1024);
        let (proxy_upstream, origin_end) = tokio::io::duplex(64 * 1024);
        let origin = tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let auth = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{auth}{}", req.uri().path())))))
            });
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(HyperIo::new(Stream::new(origin_end), 1024, 1024), service)
                .await
        });
        let proxy = tokio::spawn(serve(Stream::new(proxy_client), Stream::new(proxy_upstream), Detected::H2));
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(HyperIo::new(Stream::new(client_end), 1024, 1024))
            .await
            .expect("hs");
        let driver = tokio::spawn(conn);
        let calls = (0..10).map(|i| {
            let mut s = sender.clone();
            async move {
                let req = Request::get(format!("http://cart.shop/{i}")).body(Full::new(Bytes::new())).expect("req");
                let resp = s.send_request(req).await.expect("response");
                resp.into_body().collect().await.expect("body").to_bytes()
            }
        });
        let bodies = futures_util::future::join_all(calls).await;
        // Then one after the other on the same connection.
        for i in 10..13 {
            let req = Request::get(format!("http://cart.shop/{i}")).body(Full::new(Bytes::new())).expect("req");
            let resp = sender.clone().send_request(req).await.expect("sequential response");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body, format!("cart.shop/{i}").as_bytes());
        }
        for (i, b) in bodies.iter().enumerate() {
            assert_eq!(b, format!("cart.shop/{i}").as_bytes());
        }
        drop(sender);
        let _ = driver.await;
        let _ = proxy.await;
        origin.abort();
    }
}
