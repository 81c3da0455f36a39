//! HTTP routing: the routes attached to one service port compiled into one
//! table, ordered once by the Gateway API's precedence, so that a request
//! takes the first entry that matches it.
//!
//! Precedence between matches, of every rule of every route of the port
//! (Gateway API HTTPRoute): an `Exact` path; then a `RegularExpression`
//! path (implementation-specific in the specification: ranked above every
//! prefix here so that a regex rule beside a catch-all is reachable); then
//! the longest `PathPrefix`; then a method match; then the most header
//! matches; then the most query parameter matches; then the oldest route;
//! then the route's `namespace/name`; then rule and match order within it.
#![forbid(unsafe_code)]

#[cfg(test)]
mod tests;

use std::{cmp::Reverse, sync::Arc};

use http::request::Parts;

use crate::{
    model::{self, BackendRef, Filter, HttpRoute, PathMatch, RouteMatch, StringMatch},
    resilience::{BudgetSettings, RateLimiter, RetryBudget},
};

/// One rule, ready for requests.
#[derive(Debug)]
pub struct Rule {
    /// The metrics and access-log label: `route` or `route/rule-name`, or
    /// `route/N` for an unnamed rule of a route with several.
    pub label: Arc<str>,
    pub filters: Vec<Filter>,
    /// Weighted backends; empty: the parent service itself.
    pub backends: Vec<BackendRef>,
    total_weight: u64,
    pub timeouts: model::Timeouts,
    pub retry: Option<model::Retry>,
    /// The rule's retry budget, made on its first request (its settings are
    /// the flags'); a new table (a changed mesh) starts a new one.
    budget: std::sync::OnceLock<RetryBudget>,
    /// The rule's `LocalRateLimit` buckets (a changed mesh starts them full).
    pub rate_limiter: Option<RateLimiter>,
}

/// Where a rule sends one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick<'a> {
    /// No backendRefs: the service the route is attached to.
    Parent,
    Backend(&'a BackendRef),
    /// Every weight is 0: nowhere (Gateway API: answer 500).
    Nowhere,
}

impl Rule {
    /// The rule's retry budget.
    pub fn budget(&self, settings: BudgetSettings) -> &RetryBudget {
        self.budget.get_or_init(|| RetryBudget::new(settings))
    }

    /// The budget's state, if the rule has made one.
    pub fn budget_state(&self) -> Option<crate::resilience::BudgetState> {
        self.budget.get().map(RetryBudget::state)
    }

    /// A backend by weight (`weight / sum`).
    pub fn pick_backend(&self) -> Pick<'_> {
        if self.backends.is_empty() {
            return Pick::Parent;
        }
        if self.total_weight == 0 {
            return Pick::Nowhere;
        }
        let mut at = fastrand::u64(0..self.total_weight);
        for b in &self.backends {
            if at < b.weight as u64 {
                return Pick::Backend(b);
            }
            at -= b.weight as u64;
        }
        Pick::Nowhere
    }
}

#[derive(Debug)]
enum Path {
    Exact(Arc<str>),
    /// Without a trailing '/', except for "/" itself.
    Prefix(Arc<str>),
    Regex(regex::Regex),
}

impl Path {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => path == &**p,
            Self::Prefix(p) if &**p == "/" => true,
            Self::Prefix(p) => path.starts_with(&**p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/')),
            Self::Regex(r) => r.is_match(path),
        }
    }

    /// Higher is more specific.
    fn rank(&self) -> (u8, usize) {
        match self {
            Self::Exact(p) => (3, p.len()),
            Self::Regex(_) => (2, 0),
            Self::Prefix(p) => (1, p.len()),
        }
    }
}

#[derive(Debug)]
enum Value {
    Exact(Arc<str>),
    Regex(regex::Regex),
}

impl Value {
    fn matches(&self, v: &[u8]) -> bool {
        match self {
            Self::Exact(e) => v == e.as_bytes(),
            Self::Regex(r) => std::str::from_utf8(v).is_ok_and(|s| r.is_match(s)),
        }
    }
}

#[derive(Debug)]
struct Match {
    path: Path,
    method: Option<http::Method>,
    headers: Vec<(http::HeaderName, Value)>,
    query: Vec<(Arc<str>, Value)>,
}

impl Match {
    fn matches(&self, req: &Parts) -> bool {
        if !self.path.matches(req.uri.path()) {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| *m != req.method) {
            return false;
        }
        // Every header match must hold for some value of the header.
        let headers =
            self.headers.iter().all(|(name, v)| req.headers.get_all(name).iter().any(|hv| v.matches(hv.as_bytes())));
        headers && self.query.iter().all(|(name, v)| query_value(req.uri.query(), name).is_some_and(|q| v.matches(q)))
    }
}

/// The first value of query parameter `name` (undecoded, as the Gateway
/// API's conformance tests use plain values).
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a [u8]> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v.as_bytes())
    })
}

/// The compiled routes of one service port.
#[derive(Debug, Default)]
pub struct RouteTable {
    rules: Vec<Rule>,
    /// (match, index of its rule), in precedence order.
    entries: Vec<(Match, usize)>,
}

impl RouteTable {
    /// Compiles `routes` (already validated by the store) for the service
    /// port `port`; `None` when none of them attaches to it.
    pub fn compile(service: &model::ServiceKey, port: u16, routes: &[Arc<HttpRoute>]) -> Option<RouteTable> {
        let mut attached: Vec<&Arc<HttpRoute>> = routes
            .iter()
            .filter(|r| r.parents.iter().any(|p| p.service == *service && p.port.is_none_or(|pp| pp == port)))
            .collect();
        if attached.is_empty() {
            return None;
        }
        // Route-level tie-breakers: oldest first, then namespace/name.
        attached.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.key.cmp(&b.key)));
        let mut table = RouteTable::default();
        // (rank, route order, rule, match order) for the sort.
        let mut keyed = Vec::new();
        for (order, route) in attached.iter().enumerate() {
            let several = route.rules.len() > 1;
            for (ri, rule) in route.rules.iter().enumerate() {
                let label: Arc<str> = match (&rule.name, several) {
                    (Some(n), _) => format!("{}/{n}", route.key.name).into(),
                    (None, true) => format!("{}/{ri}", route.key.name).into(),
                    (None, false) => route.key.name.clone(),
                };
                let total_weight = rule.backends.iter().map(|b| b.weight as u64).sum();
                let index = table.rules.len();
                table.rules.push(Rule {
                    label,
                    filters: rule.filters.clone(),
                    backends: rule.backends.clone(),
                    total_weight,
                    timeouts: rule.timeouts,
                    retry: rule.retry.clone(),
                    budget: Default::default(),
                    rate_limiter: rule.filters.iter().find_map(|f| match f {
                        Filter::LocalRateLimit(l) => Some(RateLimiter::new(l.clone())),
                        _ => None,
                    }),
                });
                let default = [RouteMatch::default()];
                let matches = if rule.matches.is_empty() { &default[..] } else { &rule.matches[..] };
                for (mi, m) in matches.iter().enumerate() {
                    let Some(compiled) = compile_match(m) else { continue };
                    let rank =
                        (compiled.path.rank(), compiled.method.is_some(), compiled.headers.len(), compiled.query.len());
                    keyed.push(((Reverse(rank), order, ri, mi), compiled, index));
                }
            }
        }
        keyed.sort_by_key(|k| k.0);
        table.entries = keyed.into_iter().map(|(_, m, i)| (m, i)).collect();
        Some(table)
    }

    /// The rule that takes this request, if any does.
    pub fn find(&self, req: &Parts) -> Option<&Rule> {
        self.entries.iter().find(|(m, _)| m.matches(req)).map(|(_, i)| &self.rules[*i])
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

/// `None` if a pattern fails to compile (the store validated it; this only
/// guards against a size limit met on another build).
fn compile_match(m: &RouteMatch) -> Option<Match> {
    let path = match &m.path {
        None => Path::Prefix("/".into()),
        Some(PathMatch::Exact(p)) => Path::Exact(p.clone()),
        Some(PathMatch::Prefix(p)) => {
            let trimmed = p.trim_end_matches('/');
            Path::Prefix(if trimmed.is_empty() { "/".into() } else { trimmed.into() })
        }
        Some(PathMatch::RegularExpression(p)) => Path::Regex(model::validate::regex(p).ok()?),
    };
    let value = |v: &StringMatch| -> Option<Value> {
        Some(match v {
            StringMatch::Exact(e) => Value::Exact(e.clone()),
            StringMatch::RegularExpression(p) => Value::Regex(model::validate::regex(p).ok()?),
        })
    };
    let mut headers = Vec::with_capacity(m.headers.len());
    for h in &m.headers {
        headers.push((http::HeaderName::from_bytes(h.name.as_bytes()).ok()?, value(&h.value)?));
    }
    let mut query = Vec::with_capacity(m.query.len());
    for q in &m.query {
        query.push((q.name.clone(), value(&q.value)?));
    }
    Some(Match { path, method: m.method.clone(), headers, query })
}
