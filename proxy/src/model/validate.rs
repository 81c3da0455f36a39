//! Checks of one object on its own (names, addresses, ranges). Checks
//! between objects (two pods claiming one address) are the store's.

use std::net::IpAddr;

use super::{
    AuthorizationPolicy, EndpointSlice, Filter, HeaderModifier, HttpRoute, Object, PathMatch, Service, StringMatch,
    TargetPort, Workload,
};

/// The largest endpoint weight: enough range for any traffic split.
pub const MAX_WEIGHT: u32 = 10_000;

/// Kubernetes names: DNS-1123 (lower-case alphanumerics, '-' and '.') —
/// also what keeps them safe as metric labels and in logs.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if name.is_empty() || name.len() > 253 || !name.chars().all(ok_char) || name.starts_with('-') || name.ends_with('-')
    {
        return Err(format!("{what} {name:?} is not a valid Kubernetes name (lower-case letters, digits, '-', '.')"));
    }
    Ok(())
}

/// Addresses that can never be a pod's, a VIP or an endpoint.
pub fn unusable_address(ip: &IpAddr) -> bool {
    let ip = super::canonical_ip(*ip);
    ip.is_loopback() || ip.is_unspecified() || ip.is_multicast()
}

pub fn object(object: &Object) -> Result<(), String> {
    match object {
        Object::Workload(w) => workload(w),
        Object::Service(s) => service(s),
        Object::Endpoints(e) => endpoints(e),
        Object::Policy(p) => policy(p),
        Object::Route(r) => route(r),
    }
}

pub fn workload(w: &Workload) -> Result<(), String> {
    check_name("pod name", &w.key.name)?;
    check_name("namespace", &w.key.namespace)?;
    check_name("serviceAccount", &w.service_account)?;
    let key = &w.key;
    match &w.netns {
        Some(super::NetnsRef::Path(p)) if !p.is_absolute() => {
            return Err(format!("pod {key}: netns {} must be an absolute path", p.display()));
        }
        Some(_) => {}
        None if w.ips.is_empty() => {
            return Err(format!("pod {key} has neither a netns (a pod of this node) nor ips (a pod elsewhere)"));
        }
        None => {}
    }
    for (i, ip) in w.ips.iter().enumerate() {
        if unusable_address(ip) {
            return Err(format!("pod {key}: {ip} cannot be a pod address"));
        }
        if w.ips[..i].contains(ip) {
            return Err(format!("pod {key} lists {ip} twice"));
        }
    }
    Ok(())
}

pub fn service(s: &Service) -> Result<(), String> {
    check_name("service name", &s.key.name)?;
    check_name("namespace", &s.key.namespace)?;
    let key = &s.key;
    for (i, vip) in s.vips.iter().enumerate() {
        if unusable_address(vip) {
            return Err(format!("service {key}: {vip} cannot be a virtual IP"));
        }
        if s.vips[..i].contains(vip) {
            return Err(format!("service {key} lists virtual IP {vip} twice"));
        }
    }
    if s.ports.is_empty() {
        return Err(format!("service {key} has no ports"));
    }
    for (i, port) in s.ports.iter().enumerate() {
        if port.port == 0 || port.target_port == TargetPort::Number(0) {
            return Err(format!("service {key}: port 0 is not a port"));
        }
        if s.ports[..i].iter().any(|p| p.port == port.port) {
            return Err(format!("service {key} lists port {} twice", port.port));
        }
        if s.ports[..i].iter().any(|p| p.name == port.name) {
            let name = port.name.as_deref().unwrap_or("(unnamed)");
            return Err(format!("service {key}: two ports are named {name}: name each port differently"));
        }
    }
    if let Some(l) = &s.inbound_rate_limit {
        rate_limit(&format!("service {key} inboundRateLimit"), l)?;
    }
    Ok(())
}

pub fn endpoints(e: &EndpointSlice) -> Result<(), String> {
    check_name("endpoint slice name", &e.key.name)?;
    check_name("namespace", &e.key.namespace)?;
    check_name("service name", &e.service)?;
    for (j, ep) in e.endpoints.iter().enumerate() {
        let what = format!("endpoint slice {} endpoints[{j}]", e.key);
        if unusable_address(&ep.address) {
            return Err(format!("{what}: {} cannot be an endpoint address", ep.address));
        }
        if ep.weight == 0 || ep.weight > MAX_WEIGHT {
            return Err(format!("{what}: weight {} is outside 1..={MAX_WEIGHT}", ep.weight));
        }
    }
    if e.ports.iter().any(|p| p.port == 0) {
        return Err(format!("endpoint slice {}: port 0 is not a port", e.key));
    }
    Ok(())
}

pub fn policy(p: &AuthorizationPolicy) -> Result<(), String> {
    check_name("policy name", &p.key.name)?;
    check_name("namespace", &p.key.namespace)?;
    for (j, rule) in p.rules.iter().enumerate() {
        for principal in rule.principals.iter().chain(&rule.not_principals) {
            let body = principal.trim_end_matches('*');
            if principal != "*" && !body.starts_with("spiffe://") && !principal.starts_with('*') {
                return Err(format!(
                    "policy {} rules[{j}]: principal {principal:?} must be a spiffe:// ID, \"*\", a prefix ending in \"*\" or a suffix starting with \"*\"",
                    p.key
                ));
            }
        }
        if rule.ports.contains(&0) || rule.not_ports.contains(&0) {
            return Err(format!("policy {} rules[{j}]: port 0 is not a port", p.key));
        }
    }
    Ok(())
}

/// Gateway API's own limits on an HTTPRoute: they bound what one route
/// can make the proxy do per request.
pub const MAX_ROUTE_RULES: usize = 16;
pub const MAX_RULE_MATCHES: usize = 64;
pub const MAX_RULE_FILTERS: usize = 16;
pub const MAX_RULE_BACKENDS: usize = 16;
pub const MAX_MATCH_VALUES: usize = 16;
pub const MAX_HEADER_MODIFICATIONS: usize = 16;
/// A regular expression's compiled size: no pattern may cost a request
/// more than this much matching machinery.
pub const MAX_REGEX_SIZE: usize = 64 * 1024;
/// The largest backend weight (Gateway API: 1 000 000).
pub const MAX_BACKEND_WEIGHT: u32 = 1_000_000;

/// Compiles a route's regular expression under the size bound.
pub fn regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(MAX_REGEX_SIZE)
        .build()
        .map_err(|e| format!("regular expression {pattern:?}: {e}"))
}

fn header_name(what: &str, name: &str) -> Result<(), String> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map(|_| ())
        .map_err(|_| format!("{what}: {name:?} is not a header name"))
}

fn header_modifier(what: &str, m: &HeaderModifier) -> Result<(), String> {
    if m.set.len() + m.add.len() + m.remove.len() > MAX_HEADER_MODIFICATIONS {
        return Err(format!("{what}: more than {MAX_HEADER_MODIFICATIONS} header changes"));
    }
    for (name, value) in m.set.iter().chain(&m.add) {
        header_name(what, name)?;
        http::HeaderValue::from_str(value).map_err(|_| format!("{what}: {value:?} is not a header value"))?;
    }
    for name in &m.remove {
        header_name(what, name)?;
    }
    Ok(())
}

pub fn route(r: &HttpRoute) -> Result<(), String> {
    check_name("route name", &r.key.name)?;
    check_name("namespace", &r.key.namespace)?;
    let key = &r.key;
    if r.parents.is_empty() {
        return Err(format!("route {key} has no parentRefs: attach it to a service"));
    }
    if r.rules.len() > MAX_ROUTE_RULES {
        return Err(format!("route {key} has {} rules; at most {MAX_ROUTE_RULES}", r.rules.len()));
    }
    for (i, rule) in r.rules.iter().enumerate() {
        let what = format!("route {key} rules[{i}]");
        if let Some(name) = &rule.name {
            check_name("rule name", name)?;
        }
        if rule.matches.len() > MAX_RULE_MATCHES
            || rule.filters.len() > MAX_RULE_FILTERS
            || rule.backends.len() > MAX_RULE_BACKENDS
        {
            return Err(format!(
                "{what}: at most {MAX_RULE_MATCHES} matches, {MAX_RULE_FILTERS} filters and {MAX_RULE_BACKENDS} backendRefs"
            ));
        }
        for m in &rule.matches {
            if m.headers.len() > MAX_MATCH_VALUES || m.query.len() > MAX_MATCH_VALUES {
                return Err(format!("{what}: at most {MAX_MATCH_VALUES} header and query matches per match"));
            }
            match &m.path {
                Some(PathMatch::Exact(p) | PathMatch::Prefix(p)) if !p.starts_with('/') => {
                    return Err(format!("{what}: path {p:?} must start with '/'"));
                }
                Some(PathMatch::RegularExpression(p)) => {
                    regex(p).map_err(|e| format!("{what}: {e}"))?;
                }
                _ => {}
            }
            for h in &m.headers {
                header_name(&what, &h.name)?;
            }
            for v in m.headers.iter().chain(&m.query) {
                if let StringMatch::RegularExpression(p) = &v.value {
                    regex(p).map_err(|e| format!("{what}: {e}"))?;
                }
            }
        }
        for b in &rule.backends {
            if b.port == 0 || b.weight > MAX_BACKEND_WEIGHT {
                return Err(format!(
                    "{what}: backend {}:{} weight {} (port 1..65535, weight 0..={MAX_BACKEND_WEIGHT})",
                    b.service, b.port, b.weight
                ));
            }
        }
        resilience(&what, rule)?;
        if rule.filters.iter().filter(|f| matches!(f, Filter::LocalRateLimit(_))).count() > 1 {
            return Err(format!("{what}: at most one LocalRateLimit filter per rule"));
        }
        for f in &rule.filters {
            match f {
                Filter::RequestHeaderModifier(m) | Filter::ResponseHeaderModifier(m) => header_modifier(&what, m)?,
                Filter::RequestMirror { backend, .. } if backend.port == 0 => {
                    return Err(format!("{what}: the mirror's backendRef needs a port"));
                }
                Filter::Fault(fault) => {
                    if let Some((status, _)) = fault.abort {
                        if !(200..=599).contains(&status) {
                            return Err(format!("{what}: fault abort status {status} is outside 200..=599"));
                        }
                    }
                }
                Filter::RequestMirror { .. } => {}
                Filter::LocalRateLimit(l) => rate_limit(&what, l)?,
            }
        }
    }
    Ok(())
}

/// A token bucket's numbers: at least a token, refilled at most every 1 ms
/// and at least every hour.
fn rate_limit(what: &str, l: &crate::model::RateLimit) -> Result<(), String> {
    if l.max_tokens == 0 || l.tokens_per_fill == 0 {
        return Err(format!("{what}: a rate limit needs maxTokens and tokensPerFill of at least 1"));
    }
    if l.fill_interval < std::time::Duration::from_millis(1) || l.fill_interval > MAX_POLICY_DURATION {
        return Err(format!("{what}: a rate limit's fillInterval must be 1ms to 1h"));
    }
    Ok(())
}

/// Retries after the first attempt a rule may ask for.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;
/// The longest timeout or back-off a rule may set.
const MAX_POLICY_DURATION: std::time::Duration = std::time::Duration::from_secs(3600);

fn resilience(what: &str, rule: &crate::model::RouteRule) -> Result<(), String> {
    let t = rule.timeouts;
    for (name, d) in [("request", t.request), ("backendRequest", t.backend_request)] {
        if d.is_some_and(|d| d > MAX_POLICY_DURATION) {
            return Err(format!("{what}: timeouts.{name} is longer than an hour"));
        }
    }
    // Gateway API: backendRequest must not exceed request (0 disables).
    if let (Some(req), Some(backend)) = (t.request, t.backend_request) {
        if !req.is_zero() && (backend.is_zero() || backend > req) {
            return Err(format!(
                "{what}: timeouts.backendRequest ({backend:?}) must be non-zero and at most timeouts.request ({req:?})"
            ));
        }
    }
    if let Some(retry) = &rule.retry {
        if retry.attempts > MAX_RETRY_ATTEMPTS {
            return Err(format!("{what}: retry.attempts {} (at most {MAX_RETRY_ATTEMPTS})", retry.attempts));
        }
        if let Some(code) = retry.codes.iter().find(|c| !(400..=599).contains(*c)) {
            return Err(format!("{what}: retry code {code} is outside 400..=599"));
        }
        if retry.codes.len() > 200 {
            return Err(format!("{what}: at most 200 retry codes"));
        }
        if retry.backoff.is_some_and(|b| b > MAX_POLICY_DURATION) {
            return Err(format!("{what}: retry.backoff is longer than an hour"));
        }
    }
    Ok(())
}
