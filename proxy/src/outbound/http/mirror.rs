//! Gateway API `RequestMirror`: a copy of the request goes to another
//! backend and its response is thrown away. The copy never holds up or
//! fails the real request: it runs as its own task, bounded per pod (past
//! the bound a copy is skipped and counted), and each copy is bounded in
//! time.
//!
//! A request body is copied as it passes (`httpcore::tee`), up to 64 KiB:
//! a larger body, or a mirror too slow to take the copy, loses the copy
//! (counted `skipped_body` / `failed`) and the shadow sees a failed
//! request, never a truncated one that looks whole.

use std::{sync::Arc, time::Duration};

use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::{body::Incoming, Request};

use super::HttpConn;
use crate::httpcore::{
    body::UpBody,
    tee::{CopiedBody, CopySender, CopyState, MAX_COPIED_BODY},
};
use crate::{metrics::ResultLabels, model::BackendRef, outbound::Connect, store::Snapshot};

/// How long one copy may take, response included.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a mirror's response read (to reuse its connection).
const MAX_MIRROR_RESPONSE: usize = 1 << 20;

fn count<C: Connect>(conn: &HttpConn<C>, result: &'static str) {
    conn.core.metrics.mirrors.get_or_create(&ResultLabels { result }).inc();
}

/// Starts a copy of the request to `backend`. Returns the sender the
/// real body must feed when the request has a body.
pub fn send<C: Connect>(
    conn: &Arc<HttpConn<C>>,
    snapshot: &Arc<Snapshot>,
    backend: &BackendRef,
    parts: &http::request::Parts,
    body: &Incoming,
) -> Option<CopySender> {
    let has_body = !body.is_end_stream() && body.size_hint().exact() != Some(0);
    // A declared length past the limit: no copy at all.
    if has_body && body.size_hint().lower() > MAX_COPIED_BODY {
        count(conn, "skipped_body");
        return None;
    }
    let Ok(permit) = conn.pool.mirror_slots.clone().try_acquire_owned() else {
        count(conn, "skipped_busy");
        return None;
    };
    let Some(route) = snapshot.service_route(&backend.service, backend.port, conn.client.is_ipv6()).cloned() else {
        count(conn, "failed");
        return None;
    };
    let (sender, copy) = if has_body {
        let (tx, copy) = CopiedBody::channel();
        (Some(tx), copy)
    } else {
        (None, CopiedBody::empty())
    };
    let copy_state = copy.state_handle();
    let mut req = Request::new(UpBody::Right(copy));
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
        let outcome = match (result, copy_state.get()) {
            (Ok(Ok(())), _) => "sent",
            (_, CopyState::TooLarge) => "skipped_body",
            _ => "failed",
        };
        count(&conn, outcome);
    });
    sender
}
