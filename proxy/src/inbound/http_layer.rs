//! The inbound HTTP layer: a tunnel stream (or plaintext arrival) detected
//! as HTTP/1.1 or h2 is served by hyper, and each request is passed on to
//! the application over the one connection made to it, so that requests
//! are measured where they are served (`reporter="inbound"`): the server
//! pod's view, which also counts callers whose node runs no Outrigger.
//!
//! No routing happens here (the caller's side did it); the request and
//! the response pass unchanged apart from hop-by-hop headers.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use hyper::{body::Incoming, Request, Response};

use crate::{
    httpcore::{
        body::{grpc_status, local_response, BodyEnd, Counted, DownBody, OnEnd},
        local::{Exec, Spawner},
        BUFFER,
    },
    metrics::{Label, Metrics, RequestLabels, SeriesCache},
    outbound::detect::{Detected, Outcome},
    resilience::{Admission, RateLimiter},
    transport::{Duplex, HyperIo},
};

/// The key of a pod's one inbound bucket (the limiter keeps one per key).
static INBOUND_KEY: std::sync::LazyLock<crate::model::ObjectKey> =
    std::sync::LazyLock::new(|| crate::model::ObjectKey::new("", "inbound"));

/// Request series a connection keeps resolved (an application answering
/// with ever new status codes finds the rest in the metrics' own map).
const SERIES_CACHE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum InboundHttpError {
    #[error("HTTP handshake with the application failed: {0}")]
    Handshake(hyper::Error),
    #[error("serving the tunnel's HTTP failed: {0}")]
    Serve(hyper::Error),
}

/// Who is talking to whom on this connection: the label values every
/// request of it shares.
#[derive(Clone)]
pub struct Parties {
    pub source_pod: Label,
    pub source_namespace: Label,
    pub destination_service: Label,
    pub destination_pod: Label,
    pub destination_namespace: Label,
}

impl Parties {
    /// The request labels a connection's own labels imply.
    pub fn of(labels: &crate::metrics::ConnLabels) -> Self {
        let label = |s: &String| Label(Arc::from(s.as_str()));
        Self {
            source_pod: label(&labels.source_pod),
            source_namespace: label(&labels.source_workload_namespace),
            destination_service: label(&labels.destination_service),
            destination_pod: label(&labels.destination_pod),
            destination_namespace: label(&labels.destination_workload_namespace),
        }
    }
}

enum AppSender {
    Http1(hyper::client::conn::http1::SendRequest<Counted<Incoming>>),
    H2(hyper::client::conn::http2::SendRequest<Counted<Incoming>>),
}

struct Conn {
    metrics: Arc<Metrics>,
    parties: Parties,
    h2: bool,
    /// The application connection: HTTP/1.1 takes one request at a time
    /// (hyper's server side serves them in order), h2 multiplexes.
    app: tokio::sync::Mutex<AppSender>,
    /// Request series by (protocol, code, grpc status), up to
    /// [`SERIES_CACHE`] of them.
    cache: SeriesCache<(&'static str, u16, Option<u8>)>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    /// The destination pod's inbound rate limit, if its service has one.
    limiter: Option<Arc<RateLimiter>>,
}

/// Serves `client` (speaking `detected`) against `app` until either ends.
/// Returns the body bytes (from the client, to the client).
pub async fn serve<I, A>(
    client: I,
    app: A,
    detected: Detected,
    metrics: Arc<Metrics>,
    parties: Parties,
    limiter: Option<Arc<RateLimiter>>,
    cut: tokio_util::sync::CancellationToken,
) -> Result<(u64, u64), InboundHttpError>
where
    I: Duplex + Unpin + Send + 'static,
    A: Duplex + Unpin + Send + 'static,
{
    let spawner = Spawner::default();
    let exec = Exec::Local(spawner.clone());
    let h2 = detected == Detected::H2;
    let app_io = HyperIo::new(app, BUFFER, BUFFER);
    let app_closed = tokio_util::sync::CancellationToken::new();
    let closed = app_closed.clone().drop_guard();
    let sender = if h2 {
        let (sender, conn) = hyper::client::conn::http2::Builder::new(exec.clone())
            .handshake(app_io)
            .await
            .map_err(InboundHttpError::Handshake)?;
        hyper::rt::Executor::execute(&exec, async move {
            let _closed = closed;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "inbound h2 connection to the application ended with an error");
            }
        });
        AppSender::H2(sender)
    } else {
        let (sender, conn) =
            hyper::client::conn::http1::Builder::new().handshake(app_io).await.map_err(InboundHttpError::Handshake)?;
        hyper::rt::Executor::execute(&exec, async move {
            let _closed = closed;
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "inbound HTTP/1.1 connection to the application ended with an error");
            }
        });
        AppSender::Http1(sender)
    };
    let conn = Arc::new(Conn {
        metrics,
        parties,
        h2,
        app: tokio::sync::Mutex::new(sender),
        cache: Default::default(),
        sent: Default::default(),
        received: Default::default(),
        limiter,
    });
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(handle(&conn, req).await) }
        })
    };
    // The application closing its connection (an idle or request limit)
    // winds the tunnel side down the same way: the request in flight
    // finishes, then the client sees the connection close, as it would
    // talking to the application itself, and opens a new one.
    let served = crate::httpcore::serve_client(client, h2, &spawner, service, &cut, app_closed.cancelled()).await;
    served.map_err(InboundHttpError::Serve)?;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Ok((load(&conn.sent), load(&conn.received)))
}

async fn handle(conn: &Arc<Conn>, mut req: Request<Incoming>) -> Response<DownBody> {
    let start = Instant::now();
    let record = |status: u16, protocol| Record { conn: conn.clone(), start, protocol, status, request_bytes: None };
    if let Some(limiter) = &conn.limiter {
        // One bucket for every caller of the pod: the key is the pod's own.
        if let Admission::Limited { reset } = limiter.admit(&INBOUND_KEY) {
            let p = &conn.parties;
            let route = crate::httpcore::DEFAULT_ROUTE.clone().into();
            conn.metrics.resilience.rate_limited_labels(route, p.source_pod.clone(), p.source_namespace.clone());
            crate::info_throttled!(pod = %p.destination_pod.0, "requests over the pod's inbound rate limit get 429");
            let protocol = crate::httpcore::request_protocol(req.headers(), conn.h2);
            let mut resp = local_response(http::StatusCode::TOO_MANY_REQUESTS, "rate limited");
            resp.headers_mut().extend(crate::resilience::limit_headers(limiter.spec().max_tokens, reset));
            return resp.map(|b| Counted::new(b, None, Some(Box::new(record(429, protocol)) as Box<dyn OnEnd>)));
        }
    }
    let upgrade = crate::httpcore::is_upgrade(&req);
    let connect = req.method() == http::Method::CONNECT;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let protocol = crate::httpcore::request_protocol(req.headers(), conn.h2);
    // A counter of its own only for a request that has a body (most have
    // none): the bytes go to the request's series when it is accounted.
    let request_bytes = (!http_body::Body::is_end_stream(req.body())).then(|| Arc::new(AtomicU64::new(0)));
    let req = req.map(|b| Counted::new(b, request_bytes.clone(), None));
    let response = {
        let mut app = conn.app.lock().await;
        match &mut *app {
            AppSender::Http1(s) => match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            },
            AppSender::H2(s) => {
                let mut s = s.clone();
                drop(app);
                match s.ready().await {
                    Ok(()) => s.send_request(req).await,
                    Err(e) => Err(e),
                }
            }
        }
    };
    let record = |status: u16| Record { request_bytes: request_bytes.clone(), ..record(status, protocol) };
    match response {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
            if let Some(client_side) = client_upgrade {
                if switching || (connect && resp.status().is_success()) {
                    crate::httpcore::join_upgrade(client_side, hyper::upgrade::on(&mut resp));
                }
            }
            let trailers_only = grpc_status(resp.headers());
            resp.map(|b| {
                let mut counted = Counted::new(
                    http_body_util::Either::Left(b),
                    Some(conn.received.clone()),
                    Some(Box::new(record(status)) as Box<dyn OnEnd>),
                );
                counted.set_grpc_status(trailers_only);
                counted
            })
        }
        Err(e) => {
            tracing::debug!(error = %e, "inbound request to the application failed");
            let resp = local_response(http::StatusCode::BAD_GATEWAY, "the application's connection failed");
            resp.map(|b| Counted::new(b, None, Some(Box::new(record(502)) as Box<dyn OnEnd>)))
        }
    }
}

/// One request's account, made when its response body ends.
struct Record {
    conn: Arc<Conn>,
    start: Instant,
    protocol: &'static str,
    status: u16,
    request_bytes: Option<Arc<AtomicU64>>,
}

impl OnEnd for Record {
    fn ended(self: Box<Self>, bytes: u64, end: BodyEnd, grpc: Option<u8>) {
        let request_bytes = self.request_bytes.as_ref().map_or(0, |b| b.load(Ordering::Relaxed));
        self.conn.sent.fetch_add(request_bytes, Ordering::Relaxed);
        let code = if end == BodyEnd::Complete { self.status } else { 0 };
        let grpc_label = crate::httpcore::grpc_label(self.protocol, grpc);
        let p = &self.conn.parties;
        // Resolved once per connection and outcome: every request of a
        // connection shares its parties.
        let key = (self.protocol, code, grpc);
        let mut cache = self.conn.cache.lock().unwrap_or_else(|e| e.into_inner());
        let series = match cache.get(&key) {
            Some(s) => s.clone(),
            None => {
                let s = self.conn.metrics.requests.series(&RequestLabels {
                    reporter: "inbound",
                    source_pod: p.source_pod.clone(),
                    source_workload_namespace: p.source_namespace.clone(),
                    destination_service: p.destination_service.clone(),
                    destination_pod: p.destination_pod.clone(),
                    destination_workload_namespace: p.destination_namespace.clone(),
                    route: crate::httpcore::DEFAULT_ROUTE.clone().into(),
                    request_protocol: self.protocol,
                    response_code: code,
                    grpc_response_status: grpc_label,
                });
                if cache.len() < SERIES_CACHE {
                    cache.insert(key, s.clone());
                }
                s
            }
        };
        drop(cache);
        series.requests.inc();
        series.duration.observe(self.start.elapsed().as_secs_f64());
        series.request_bytes.inc_by(request_bytes);
        series.response_bytes.inc_by(bytes);
    }
}

impl super::Inbound {
    /// Passes what arrived for the application on: request by request
    /// when it speaks HTTP (and `--http` is on and the port not declared
    /// opaque), else as bytes. `client` is a tunnel stream or a plaintext
    /// arrival, which comes set to reset on close (its listener's).
    pub(super) async fn deliver<I, A>(
        &self,
        client: I,
        app: A,
        port: u16,
        parties: Parties,
        limiter: Option<Arc<RateLimiter>>,
    ) -> crate::transport::Relayed
    where
        I: Duplex + Unpin + Send + 'static,
        A: Duplex + Unpin + Send + 'static,
    {
        let settings = &self.settings;
        let mut client = crate::transport::Peekable::new(client);
        let mut app = crate::transport::Peekable::new(app);
        let detected = if !settings.http {
            Detected::Opaque
        } else {
            let (detected, outcome) = if settings.detect_timeout.is_zero() || settings.opaque_ports.contains(&port) {
                (Detected::Opaque, Outcome::Declared)
            } else {
                crate::outbound::detect::client_or_server_first(&mut client, &mut app, settings.detect_timeout).await
            };
            self.metrics.detected(crate::metrics::Direction::Inbound, outcome.index());
            detected
        };
        match detected {
            Detected::Http1 | Detected::H2 => {
                // The HTTP layer closes client connections in order (and
                // aborts them itself): not a reset on close, which a
                // plaintext arrival's listener set.
                client.reset_on_exit(false);
                let served =
                    serve(client, app, detected, self.metrics.clone(), parties, limiter, self.drain_cut.clone()).await;
                match served {
                    Ok((from_client, to_client)) => crate::transport::Relayed {
                        sent: to_client,
                        received: from_client,
                        end: crate::transport::End::Completed,
                        error: None,
                    },
                    Err(e) => {
                        tracing::debug!(error = %e, "inbound HTTP connection ended with an error");
                        crate::transport::Relayed {
                            sent: 0,
                            received: 0,
                            end: crate::transport::End::Error,
                            error: None,
                        }
                    }
                }
            }
            _ => {
                // The client is a tunnel stream (nothing to arm) or a
                // plaintext arrival, armed by its listener.
                let opts = crate::transport::RelayOptions { b_armed: true, ..settings.relay };
                crate::transport::relay(&mut app, &mut client, opts, &self.drain_cut, |_| {}).await
            }
        }
    }
}
