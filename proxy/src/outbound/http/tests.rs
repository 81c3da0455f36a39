//! An in-memory HTTP origin for the outbound tests: HTTP/1.1 or h2 (by
//! the client's preface), answering "<its address><path>" and echoing the
//! request headers it was asked about.

use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::TokioExecutor;
use tokio::io::DuplexStream;

use crate::transport::{HyperIo, Peekable, Stream};

pub async fn origin(io: DuplexStream, addr: SocketAddr) {
    let mut io = Peekable::new(Stream::new(io));
    let h2 = match io.peek(3).await {
        Ok(first) => first.starts_with(b"PRI"),
        Err(_) => return,
    };
    let service = hyper::service::service_fn(move |req: Request<Incoming>| async move {
        let mut resp = Response::new(Full::new(Bytes::from(format!("{addr}{}", req.uri().path()))));
        // `x-echo: NAME` asks for request header NAME back as `x-echoed`.
        if let Some(name) = req.headers().get("x-echo").and_then(|v| v.to_str().ok()) {
            let seen = req.headers().get(name).map(|v| v.as_bytes().to_vec()).unwrap_or_else(|| b"(none)".to_vec());
            if let Ok(v) = http::HeaderValue::from_bytes(&seen) {
                resp.headers_mut().insert("x-echoed", v);
            }
        }
        Ok::<_, Infallible>(resp)
    });
    let io = HyperIo::new(io, 4096, 4096);
    let _ = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await
    } else {
        hyper::server::conn::http1::Builder::new().serve_connection(io, service).await
    };
}
