//! The admin server: health, readiness, metrics, state and log level.
//!
//! | path | what |
//! |---|---|
//! | `/live` | 200 while the process serves requests |
//! | `/ready` | 200 once programs are attached and every pod's listeners are bound; 503 with the reason otherwise |
//! | `/metrics`, `/stats/prometheus` | OpenMetrics text |
//! | `/config_dump` | pods, listeners, services and endpoint health, attached programs, kernel map sizes (JSON) |
//! | `/logging` | GET: current filter; POST `?level=FILTER`: change it |
#![forbid(unsafe_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{node::status::NodeStatus, proxy::Proxy, telemetry::LogControl};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding the admin server to {addr}: {source} (is another outrigger running? pick another --admin-addr)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub struct AdminState {
    pub proxy: Arc<Proxy>,
    pub status: Arc<RwLock<NodeStatus>>,
    pub registry: Arc<Registry>,
    pub log: LogControl,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr).await.map_err(|source| AdminError::Bind { addr, source })
}

/// Serves until `stop` is cancelled. The admin server outlives the proxy's
/// own shutdown token so /ready can report draining.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let status = || state.status.read().unwrap_or_else(|e| e.into_inner());
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => match status().readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        (&Method::GET, "/metrics" | "/stats/prometheus") => match crate::metrics::encode(&state.registry) {
            Ok(body) => {
                let mut resp = text(StatusCode::OK, body);
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                );
                resp
            }
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed\n"),
        },
        (&Method::GET, "/config_dump") => {
            let node = status();
            let dump = serde_json::json!({
                "node": &*node,
                "programs": state.proxy.capture.attached(),
                "services": state.proxy.mesh.load().services.dump(),
                "mtls": state.proxy.mtls.as_ref().map(|m| serde_json::json!({
                    "identities": m.identities.status(),
                    "pool": m.pool.stats(),
                    "hbone_port": m.hbone_port,
                    "strict": m.strict,
                })),
                "maps": state.proxy.capture.map_entries(),
                "forward": {
                    "connect_timeout_ms": state.proxy.forward.connect_timeout.as_millis() as u64,
                    "buffer_size": state.proxy.forward.buffer_size,
                    "mark": state.proxy.forward.mark,
                },
            });
            json(&dump)
        }
        (&Method::GET, "/logging") => text(StatusCode::OK, format!("{}\n", state.log.current())),
        (&Method::POST | &Method::PUT, "/logging") => {
            let level = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")))
                .map(|v| v.replace("%2C", ",").replace("%3D", "="));
            match level {
                None => {
                    text(StatusCode::BAD_REQUEST, "usage: POST /logging?level=FILTER (e.g. info, outrigger=debug)\n")
                }
                Some(level) => match state.log.set(&level) {
                    Ok(()) => {
                        tracing::info!(filter = %level, "log filter changed");
                        text(StatusCode::OK, format!("{level}\n"))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live /ready /metrics /stats/prometheus /config_dump /logging\n",
        ),
    }
}
