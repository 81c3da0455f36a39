//! What a route does to a request besides choosing its backend: header
//! changes (Gateway API `RequestHeaderModifier` / `ResponseHeaderModifier`),
//! Envoy-style fault injection, W3C trace context; and the hop-by-hop
//! headers a proxy must not pass on (RFC 9110 §7.6.1).

use std::time::Duration;

use http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::model::{Fault, HeaderModifier};

/// Applies `set`, `add`, `remove` (the order the Gateway API gives). The
/// names and values were validated when the route was accepted.
pub fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for (name, value) in &m.set {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &m.add {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.append(n, v);
        }
    }
    for name in &m.remove {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(n);
        }
    }
}

/// Removes the connection-specific headers (and those `Connection` names),
/// except `Upgrade`/`Connection: upgrade` on an upgrade, which must pass.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in ["keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding"] {
        // `te: trailers` is how gRPC asks for trailers over h2: kept.
        if n == "te" && headers.get(header::TE).is_some_and(|v| v == "trailers") {
            continue;
        }
        headers.remove(n);
    }
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// What a fault filter decided for one request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FaultDecision {
    pub delay: Option<Duration>,
    pub abort: Option<u16>,
}

/// Envoy's header names for per-request faults.
const DELAY_HEADER: &str = "x-envoy-fault-delay-request";
const ABORT_HEADER: &str = "x-envoy-fault-abort-request";

pub fn fault(f: &Fault, headers: &HeaderMap) -> FaultDecision {
    let mut d = FaultDecision::default();
    if f.header_control {
        let number =
            |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(ms) = number(DELAY_HEADER) {
            d.delay = Some(Duration::from_millis(ms).min(Fault::MAX_HEADER_DELAY));
        }
        if let Some(status) = number(ABORT_HEADER).filter(|s| (200..=599).contains(s)) {
            d.abort = Some(status as u16);
        }
    }
    if d.delay.is_none() {
        d.delay = f.delay.filter(|(_, share)| share.roll()).map(|(delay, _)| delay);
    }
    if d.abort.is_none() {
        d.abort = f.abort.filter(|(_, share)| share.roll()).map(|(status, _)| status);
    }
    d
}

/// The trace id of a valid W3C `traceparent` (version 00: 2-32-16-2 hex).
pub fn trace_id(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = v.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let valid = hex(version, 2) && version != "ff" && hex(trace, 32) && hex(span, 16) && hex(flags, 2);
    (valid && trace != "00000000000000000000000000000000" && span != "0000000000000000").then_some(trace)
}

/// Starts a trace: a new sampled `traceparent` (the request had none, or
/// an invalid one). `tracestate` and a valid `traceparent` pass unchanged.
pub fn start_trace(headers: &mut HeaderMap) {
    let trace = loop {
        let t = fastrand::u128(..);
        if t != 0 {
            break t;
        }
    };
    let span = fastrand::u64(1..);
    let value = format!("00-{trace:032x}-{span:016x}-01");
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("traceparent", v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Share;

    #[test]
    fn hop_by_hop_headers_are_stripped_but_upgrades_pass() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h.contains_key("x-app") && h.contains_key(header::TE));
        let mut up = HeaderMap::new();
        up.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        up.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut up, true);
        assert_eq!(up.get(header::UPGRADE).map(|v| v.as_bytes()), Some(&b"websocket"[..]));
        assert!(up.contains_key(header::CONNECTION));
    }

    #[test]
    fn header_control_only_when_enabled() {
        let mut h = HeaderMap::new();
        h.insert(ABORT_HEADER, HeaderValue::from_static("418"));
        h.insert(DELAY_HEADER, HeaderValue::from_static("999999"));
        let off = Fault::default();
        assert_eq!(fault(&off, &h), FaultDecision::default());
        let on = Fault { header_control: true, ..Fault::default() };
        assert_eq!(fault(&on, &h), FaultDecision { delay: Some(Fault::MAX_HEADER_DELAY), abort: Some(418) });
        let always = Fault { abort: Some((503, Share::ALL)), ..Fault::default() };
        assert_eq!(fault(&always, &HeaderMap::new()).abort, Some(503));
    }

    #[test]
    fn traceparent_is_validated_and_started() {
        let mut h = HeaderMap::new();
        assert_eq!(trace_id(&h), None);
        start_trace(&mut h);
        let id = trace_id(&h).expect("a valid traceparent").to_string();
        assert_eq!(id.len(), 32);
        h.insert("traceparent", HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        assert_eq!(trace_id(&h), Some("0af7651916cd43dd8448eb211c80319c"));
        h.insert("traceparent", HeaderValue::from_static("00-XYZ-b7ad6b7169203331-01"));
        assert_eq!(trace_id(&h), None);
    }
}
