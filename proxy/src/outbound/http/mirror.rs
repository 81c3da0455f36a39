//! Gateway API `RequestMirror`: a copy of the request goes to another
//! backend and its response is thrown away. The copy never holds up or
//! fails the real request: it runs as its own task, bounded per pod (past
//! the bound a copy is skipped and counted), and each copy is bounded in
//! time.
//!
//! Only requests without a body are copied: copying a streamed body would
//! make the real request wait for the slower of the two readers.

use std::{sync::Arc, time::Duration};

use http_body::Body as _;
use http_body_util::{BodyExt, Empty};
use hyper::{body::Incoming, Request};

use super::HttpConn;
use crate::httpcore::body::UpBody;
use crate::{metrics::ResultLabels, model::BackendRef, outbound::Connect, store::Snapshot};

/// How long one copy may take, response included.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a mirror's response read (to reuse its connection).
const MAX_MIRROR_RESPONSE: usize = 1 << 20;

fn count<C: Connect>(conn: &HttpConn<C>, result: &'static str) {
    conn.core.metrics.mirrors.get_or_create(&ResultLabels { result }).inc();
}

pub fn send<C: Connect>(
    conn: &Arc<HttpConn<C>>,
    snapshot: &Arc<Snapshot>,
    backend: &BackendRef,
    parts: &http::request::Parts,
    body: &Incoming,
) {
    if !body.is_end_stream() && body.size_hint().exact() != Some(0) {
        count(conn, "skipped_body");
        return;
    }
    let Ok(permit) = conn.pool.mirror_slots.clone().try_acquire_owned() else {
        count(conn, "skipped_busy");
        return;
    };
    let Some(route) = snapshot.service_route(&backend.service, backend.port, conn.client.is_ipv6()).cloned() else {
        count(conn, "failed");
        return;
    };
    let mut req = Request::new(UpBody::Right(Empty::new()));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.headers_mut() = parts.headers.clone();
    super::filters::strip_hop_by_hop(req.headers_mut(), false);
    let conn = conn.clone();
    let snapshot = snapshot.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let result = tokio::time::timeout(MIRROR_TIMEOUT, async {
            let i = route.balancer.pick(&[]).map_err(|_| ())?;
            let addr = route.balancer.endpoints()[i].addr;
            let _in_flight = route.balancer.start(i);
            let mut sender = match conn.pool.checkout(addr, conn.version) {
                Some(s) => s,
                None => conn.connect_detached(&snapshot, addr).await.map_err(|_| ())?,
            };
            sender.ready().await.map_err(|_| ())?;
            let resp = sender.send(req).await.map_err(|_| ())?;
            // Read to the end (bounded) so an HTTP/1.1 connection can be
            // used again.
            http_body_util::Limited::new(resp.into_body(), MAX_MIRROR_RESPONSE).collect().await.map_err(|_| ())?;
            if conn.version == super::Version::Http1 {
                conn.pool.checkin(addr, sender);
            }
            Ok::<_, ()>(())
        })
        .await;
        count(&conn, if matches!(result, Ok(Ok(()))) { "sent" } else { "failed" });
    });
}
