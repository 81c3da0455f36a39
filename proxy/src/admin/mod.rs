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

use crate::{
    capture::Capture, identity::Identities, node::status::NodeStatus, sources::SourceStatus, store::MeshReader,
    telemetry::LogControl, tunnel::TunnelClient,
};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding the admin server to {addr}: {source} (is another outrigger running? pick another --admin-addr)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the admin server reads; each part is a handle of its own owner.
pub struct AdminState {
    pub status: Arc<RwLock<NodeStatus>>,
    pub source: Arc<RwLock<SourceStatus>>,
    pub registry: Arc<Registry>,
    pub log: LogControl,
    pub capture: Arc<Capture>,
    pub mesh: MeshReader,
    pub identities: Option<Arc<Identities>>,
    pub tunnels: Option<Arc<TunnelClient>>,
    /// `--mtls strict`.
    pub strict: bool,
    /// The effective settings, shown as they are (no secrets in them).
    pub settings: serde_json::Value,
}

impl AdminState {
    /// `Ok` when the proxy serves every pod it was given (with a warning
    /// worth showing, if any); otherwise why not.
    pub fn readiness(&self) -> Result<Option<String>, String> {
        let node = self.status.read().unwrap_or_else(|e| e.into_inner());
        if node.shutting_down {
            return Err("shutting down".into());
        }
        let warning = self.source.read().unwrap_or_else(|e| e.into_inner()).readiness()?;
        node.readiness()?;
        Ok(warning)
    }

    /// The published state in numbers: cheap at any cluster size (the
    /// full dump is not), for watching changes land (`GET /store`).
    fn store_summary(snapshot: &crate::store::Snapshot) -> serde_json::Value {
        serde_json::json!({
            "version": snapshot.version,
            "workloads": snapshot.workload_count(),
            "services": snapshot.service_count(),
            "endpoint_slices": snapshot.endpoint_slice_count(),
            "rejected": snapshot.rejected(),
        })
    }

    fn config_dump(&self) -> serde_json::Value {
        let node = self.status.read().unwrap_or_else(|e| e.into_inner());
        let source = self.source.read().unwrap_or_else(|e| e.into_inner()).clone();
        let snapshot = self.mesh.load();
        let mut node_json = serde_json::to_value(&*node).unwrap_or_default();
        if let Some(obj) = node_json.as_object_mut() {
            obj.insert("loaded_once".into(), source.synced.into());
            obj.insert("last_reload_error".into(), source.last_error.clone().into());
            obj.insert("source".into(), serde_json::to_value(&source).unwrap_or_default());
        }
        serde_json::json!({
            "node": node_json,
            "programs": self.capture.attached(),
            "store": Self::store_summary(&snapshot),
            "services": snapshot.dump_routes(),
            "mtls": self.identities.as_ref().map(|ids| serde_json::json!({
                "identities": ids.status(),
                "pool": self.tunnels.as_ref().map(|t| t.pool_stats()),
                "hbone_port": self.tunnels.as_ref().map(|t| t.hbone_port()),
                "strict": self.strict,
            })),
            "maps": self.capture.map_entries(),
            "forward": self.settings,
        })
    }
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
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => match state.readiness() {
            Ok(None) => text(StatusCode::OK, "ready\n"),
            Ok(Some(warning)) => text(StatusCode::OK, format!("ready; warning: {warning}\n")),
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
        (&Method::GET, "/config_dump") => json(&state.config_dump()),
        (&Method::GET, "/store") => json(&AdminState::store_summary(&state.mesh.load())),
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
