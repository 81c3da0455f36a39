//! Steps 4 and 5 of a request — endpoint and connection — and sending it,
//! under the rule's resilience policy:
//!
//! - a connect failure moves to another endpoint (`--connect-attempts`);
//! - a request the endpoint provably did not process (h2 REFUSED_STREAM,
//!   beyond a GOAWAY, a reused HTTP/1.1 connection that closed) is sent
//!   once more on a new connection, whatever the policy;
//! - with a `retry`, an idempotent request without a body is retried on a
//!   listed status code, on an attempt's timeout (`backendRequest`) and on
//!   a connection lost after sending, up to `attempts` times, each retry
//!   taken from the rule's budget, after a back-off, and on an endpoint not
//!   tried yet when there is one.
//!
//! The whole is bounded by `timeouts.request`: each wait (a connection, the
//! response head, a back-off) ends at its deadline at the latest, so an
//! attempt costs one timer, not one for the attempt and one for the request.

use std::{net::SocketAddr, sync::Arc};

use tokio::time::Instant;

use hyper::{body::Incoming, Request, Response};

use super::{endpoint_failed, exchange::Exchange, pool::Sender, unprocessed, Destination, Head, HttpConn};
use crate::{
    balance::NoEndpoint,
    httpcore::{
        body::UpBody,
        tee::{CopiedBody, Recording},
    },
    metrics::Label,
    outbound::Connect,
    resilience::{Limit, Policy, RetryBudget, Slot},
    store::Snapshot,
};

/// How the request ended, before the response is shaped for the client.
pub(super) enum Outcome {
    /// The endpoint's response (with the HTTP/1.1 connection, to return it
    /// to the client connection's pool once the body has been read).
    Response(Response<Incoming>, SocketAddr, Sender),
    /// The proxy answers itself.
    Local(http::StatusCode, &'static str),
}

/// What the attempts of one request share.
pub(super) struct Attempts<'a> {
    pub destination: &'a Destination,
    pub snapshot: &'a Arc<Snapshot>,
    pub policy: Policy<'a>,
    pub budget: Option<&'a RetryBudget>,
    pub idempotent: bool,
    /// The rule's label, for the resilience counters.
    pub route: Label,
    /// The head to send again (none for an upgrade, or a body not kept).
    pub replay: Option<Head>,
    /// The body, kept as the first attempt sends it.
    pub recording: Option<Arc<Recording>>,
    /// When `timeouts.request` ends the request.
    pub deadline: Option<Instant>,
}

/// `fut` bounded by `deadline` (`None`: it passed first); a timer only
/// when `fut` does not finish at once (a pooled connection is ready, most
/// of the time).
async fn bounded<F: std::future::Future>(deadline: Option<Instant>, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let std::task::Poll::Ready(out) = futures_util::poll!(fut.as_mut()) {
        return Some(out);
    }
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// Why an attempt is repeated.
#[derive(Clone, Copy)]
enum Again {
    Status,
    Timeout,
    Reset,
}

impl Again {
    fn reason(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
        }
    }
}

impl Attempts<'_> {
    /// `timeouts.request` passed: 504 (flagged `UT` by the caller).
    fn request_timeout<C: Connect>(&self, conn: &HttpConn<C>) -> Outcome {
        conn.core.metrics.resilience.timed_out(&self.route, "request");
        Outcome::Local(http::StatusCode::GATEWAY_TIMEOUT, "request timeout")
    }

    /// The request again, if it can be rebuilt: no body, or a body kept
    /// whole.
    fn again(&self) -> Option<Request<UpBody>> {
        let head = self.replay.as_ref()?;
        match &self.recording {
            None => Some(head.request(CopiedBody::empty())),
            Some(kept) => kept.body().map(|b| head.request(b)),
        }
    }

    /// The service's slots for a new connection: (pending request,
    /// connection); the limit reached otherwise.
    fn connect_slots<C: Connect>(&self, conn: &HttpConn<C>) -> Result<(Option<Slot>, Option<Slot>), Limit> {
        let Some(route) = &self.destination.route else { return Ok((None, None)) };
        let pending = conn.breaker_slot(route, Limit::PendingRequests).ok_or(Limit::PendingRequests)?;
        let slot = conn.breaker_slot(route, Limit::Connections).ok_or(Limit::Connections)?;
        Ok((Some(pending), Some(slot)))
    }

    /// Retry number `n` (1 for the first) for `why`, if it may be made (a
    /// slot of the service's breaker, then taken from the budget): the
    /// request to send and the slot to hold while it is tried.
    fn retry<C: Connect>(&self, conn: &HttpConn<C>, n: u32, why: Again) -> Option<(Request<UpBody>, Option<Slot>)> {
        if !self.idempotent || n > self.policy.attempts() {
            return None;
        }
        let again = self.again()?;
        let slot = match &self.destination.route {
            Some(route) => Some(conn.breaker_slot(route, Limit::Retries)?),
            None => None,
        };
        if let Some(budget) = self.budget {
            if !budget.withdraw() {
                conn.core.metrics.resilience.budget_exhausted(&self.route);
                crate::warn_throttled!(route = %self.route.0, "retry budget spent: failures go to clients without retries");
                return None;
            }
        }
        conn.core.metrics.resilience.retried(&self.route, why.reason());
        Some((again, slot))
    }
}

pub(super) async fn forward<C: Connect>(
    conn: &Arc<HttpConn<C>>,
    x: &mut Exchange<C>,
    a: &Attempts<'_>,
    req: Request<UpBody>,
) -> Outcome {
    let connect_attempts = conn.core.settings.connect_attempts.max(1) as usize;
    let mut tried = Vec::with_capacity(connect_attempts);
    let (mut connect_failures, mut retries, mut resent) = (0, 0u32, false);
    let mut last_failure = None;
    let mut req = Some(req);
    // The retry in flight's breaker slot.
    let mut _retrying: Option<Slot> = None;
    loop {
        let (addr, index) = match (&a.destination.route, a.destination.addr) {
            (Some(route), _) => match route.balancer.pick(&tried) {
                Ok(i) => (route.balancer.endpoints()[i].addr, Some(i)),
                Err(NoEndpoint::None) => {
                    x.flag("UH");
                    x.service = Some(route.service.clone());
                    return Outcome::Local(http::StatusCode::SERVICE_UNAVAILABLE, "no endpoints");
                }
                // A retry with every endpoint tried goes to any of them again.
                Err(NoEndpoint::AllUnavailable) if retries > 0 => match route.balancer.pick(&[]) {
                    Ok(i) => (route.balancer.endpoints()[i].addr, Some(i)),
                    Err(_) => break,
                },
                Err(NoEndpoint::AllUnavailable) => break,
            },
            // A passthrough has one address: retried there, never redialled
            // after a connect failure.
            (None, Some(addr)) if connect_failures == 0 => (addr, None),
            (None, _) => break,
        };
        tried.push(index.unwrap_or(usize::MAX));
        x.set_endpoint(a.snapshot, a.destination.route.as_deref(), addr, index);
        // A pooled connection that closed meanwhile is replaced.
        let pooled = match conn.upstreams().checkout(addr, conn.version) {
            Some(mut s) => match bounded(a.deadline, s.ready()).await {
                Some(ready) => ready.is_ok().then_some(s),
                None => return a.request_timeout(conn),
            },
            None => None,
        };
        let sender = match pooled {
            Some(s) => Ok(s),
            None => {
                // Circuit breaking: requests waiting for a connection, and
                // connections open to the service.
                let (pending, slot) = match a.connect_slots(conn) {
                    Ok(slots) => slots,
                    Err(limit) => {
                        x.flag("UO");
                        tracing::debug!(pod = %conn.pod.key, upstream = %addr, limit = limit.label(), "circuit breaker open");
                        return Outcome::Local(
                            http::StatusCode::SERVICE_UNAVAILABLE,
                            "circuit breaker: the service is at a limit",
                        );
                    }
                };
                let Some(connected) = bounded(a.deadline, conn.connect(a.snapshot, addr, slot)).await else {
                    return a.request_timeout(conn);
                };
                drop(pending);
                connected
            }
        };
        let mut sender = match sender {
            Ok(s) => s,
            Err(e) => {
                if e.is_endpoint_fault() {
                    endpoint_failed(conn, a.destination, index, &e);
                }
                last_failure = Some(e);
                connect_failures += 1;
                if connect_failures >= connect_attempts {
                    break;
                }
                continue;
            }
        };
        let Some(this) = req.take() else { break };
        let sent_at = Instant::now();
        let sending = sender.send(this);
        // One timer per attempt, for whichever ends first: the attempt's
        // timeout or the request's. Dropping the send cancels the request:
        // h2 resets the stream, an HTTP/1.1 connection with a request in
        // flight is closed.
        let attempt_deadline = match (a.policy.backend_timeout, a.deadline) {
            (Some(limit), Some(d)) => Some((Instant::now() + limit).min(d)),
            (Some(limit), None) => Some(Instant::now() + limit),
            (None, d) => d,
        };
        let result = match attempt_deadline {
            Some(t) => tokio::time::timeout_at(t, sending).await.ok(),
            None => Some(sending.await),
        };
        if result.is_none() && a.deadline.is_some_and(|d| Instant::now() >= d) {
            return a.request_timeout(conn);
        }
        let again = match result {
            Some(Ok(resp)) => {
                let status = resp.status().as_u16();
                if let (Some(route), Some(i)) = (&a.destination.route, index) {
                    route.balancer.observe(i, sent_at.elapsed());
                    if status >= 500 {
                        endpoint_failed(conn, a.destination, index, &resp.status());
                    } else {
                        route.balancer.succeeded(i);
                    }
                }
                if !a.policy.retries_status(status) {
                    return Outcome::Response(resp, addr, sender);
                }
                match a.retry(conn, retries + 1, Again::Status) {
                    Some(again) => (again, Again::Status),
                    None => {
                        // A retryable answer the policy could not retry.
                        if a.policy.attempts() > 0 {
                            x.flag("URX");
                        }
                        return Outcome::Response(resp, addr, sender);
                    }
                }
            }
            Some(Err(e)) if !resent && unprocessed(&e, a.idempotent) && a.replay.is_some() => {
                // Not processed: once more on a new connection, free of the
                // retry policy (nothing was done twice).
                let Some(again) = a.again() else {
                    x.flag("UC");
                    return Outcome::Local(http::StatusCode::BAD_GATEWAY, "upstream connection failed");
                };
                tracing::debug!(pod = %conn.pod.key, upstream = %addr, error = %e, "request not processed: sent again on a new connection");
                conn.upstreams().evict(addr, conn.version);
                conn.core.metrics.resilience.retried(&a.route, "refused");
                resent = true;
                req = Some(again);
                tried.pop();
                continue;
            }
            Some(Err(e)) => {
                tracing::debug!(pod = %conn.pod.key, upstream = %addr, error = %e, "upstream request failed");
                match a.retry(conn, retries + 1, Again::Reset) {
                    Some(again) => (again, Again::Reset),
                    None => {
                        x.flag("UC");
                        return Outcome::Local(http::StatusCode::BAD_GATEWAY, "upstream connection failed");
                    }
                }
            }
            None => {
                // What the attempt cost is what the endpoint is worth now.
                if let (Some(route), Some(i)) = (&a.destination.route, index) {
                    route.balancer.observe(i, sent_at.elapsed());
                }
                conn.core.metrics.resilience.timed_out(&a.route, "backend_request");
                match a.retry(conn, retries + 1, Again::Timeout) {
                    Some(again) => (again, Again::Timeout),
                    // Flagged UT with every 504 the proxy answers.
                    None => return Outcome::Local(http::StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                }
            }
        };
        let ((again, slot), why) = again;
        _retrying = slot;
        retries += 1;
        tracing::debug!(pod = %conn.pod.key, upstream = %addr, retry = retries, reason = why.reason(), "retrying");
        let wake = Instant::now() + a.policy.backoff(retries);
        if let Some(d) = a.deadline.filter(|d| *d <= wake) {
            tokio::time::sleep_until(d).await;
            return a.request_timeout(conn);
        }
        tokio::time::sleep_until(wake).await;
        req = Some(again);
    }
    match last_failure {
        Some(e) => {
            x.flag(e.reason().flag());
            x.error = Some(e.to_string());
            Outcome::Local(http::StatusCode::SERVICE_UNAVAILABLE, "upstream connect error")
        }
        None => {
            x.flag("UH");
            Outcome::Local(http::StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
        }
    }
}
