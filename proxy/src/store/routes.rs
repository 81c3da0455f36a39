//! Service routes: each VIP:port of a service with a balancer over the
//! endpoints that serve it. Rebuilt per service when the service or one of
//! its endpoint slices changes; endpoint health carries over.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use serde::Serialize;

use super::Store;
use crate::{
    balance::{Balancer, Endpoint, Health, HealthStatus},
    model::{canonical_ip, AppProtocol, ServiceKey, ServicePort},
    resilience::{Breaker, BreakerLimits, BreakerState, BudgetState},
    routing::RouteTable,
};

/// One VIP:port of a service and the balancer over its endpoints.
#[derive(Debug)]
pub struct ServiceRoute {
    pub service: ServiceKey,
    /// Stable small number for kernel-side counters.
    pub id: u32,
    pub vip: SocketAddr,
    /// What the port speaks, when declared.
    pub app_protocol: Option<AppProtocol>,
    pub balancer: Balancer,
    /// The HTTP routes attached to this port, compiled; `None`: requests
    /// are balanced over the endpoints.
    pub http: Option<Arc<RouteTable>>,
    /// The service's circuit breaker (one for all its ports and VIPs, kept
    /// across rebuilds).
    pub breaker: Arc<Breaker>,
}

#[derive(Debug, Serialize)]
pub struct RouteStatus {
    pub service: String,
    pub vip: SocketAddr,
    pub algorithm: String,
    pub endpoints: Vec<EndpointStatus>,
    /// The HTTP route rules attached, with their policies and live state.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http_rules: Vec<RuleStatus>,
    /// The service's circuit breaker: limits, what is open, refusals.
    pub circuit_breaker: BreakerState,
}

/// One route rule as `/config_dump` shows it: its own resilience settings
/// (`null`: the flags' default, shown under `forward.resilience_defaults`)
/// and the state of its retry budget.
#[derive(Debug, Serialize)]
pub struct RuleStatus {
    pub rule: String,
    pub request_timeout_ms: Option<u64>,
    pub backend_request_timeout_ms: Option<u64>,
    pub retry: Option<RetryStatus>,
    pub retry_budget: Option<BudgetState>,
    pub rate_limit: Option<RateLimitStatus>,
}

#[derive(Debug, Serialize)]
pub struct RetryStatus {
    pub codes: Vec<u16>,
    pub attempts: u32,
    pub backoff_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct RateLimitStatus {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval_ms: u64,
    pub per_source_pod: bool,
}

impl RuleStatus {
    fn of(r: &crate::routing::Rule) -> Self {
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        Self {
            rule: r.label.to_string(),
            request_timeout_ms: r.timeouts.request.map(ms),
            backend_request_timeout_ms: r.timeouts.backend_request.map(ms),
            retry: r.retry.as_ref().map(|x| RetryStatus {
                codes: x.codes.clone(),
                attempts: x.attempts,
                backoff_ms: x.backoff.map(ms),
            }),
            retry_budget: r.budget_state(),
            rate_limit: r.rate_limiter.as_ref().map(|l| {
                let s = l.spec();
                RateLimitStatus {
                    max_tokens: s.max_tokens,
                    tokens_per_fill: s.tokens_per_fill,
                    fill_interval_ms: ms(s.fill_interval),
                    per_source_pod: s.per_source_pod,
                }
            }),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EndpointStatus {
    pub address: SocketAddr,
    /// `pod NAME` or the address.
    pub target: String,
    pub weight: u32,
    #[serde(flatten)]
    pub health: HealthStatus,
}

impl ServiceRoute {
    pub(super) fn status(&self, now: u64) -> RouteStatus {
        RouteStatus {
            service: self.service.to_string(),
            vip: self.vip,
            algorithm: format!("{:?}", self.balancer.settings().algorithm),
            endpoints: self
                .balancer
                .endpoints()
                .iter()
                .map(|e| EndpointStatus {
                    address: e.addr,
                    target: match &e.pod {
                        Some(name) => format!("pod {name}"),
                        None => e.addr.ip().to_string(),
                    },
                    weight: e.weight,
                    // Never used: what a fresh endpoint looks like.
                    health: match e.health_if_used() {
                        Some(h) => h.status(now),
                        None => Health::new(self.balancer.settings().ewma_default_rtt).status(now),
                    },
                })
                .collect(),
            http_rules: self.http.iter().flat_map(|t| t.rules().iter().map(RuleStatus::of)).collect(),
            circuit_breaker: self.breaker.state(),
        }
    }
}

/// A usable endpoint of one service port, before family selection.
struct Candidate {
    addr: SocketAddr,
    weight: u32,
    pod: Option<Arc<str>>,
}

impl Store {
    /// Recomputes the routes of one service from its current definition
    /// and slices (removing them when it is gone). Cost: its own endpoints.
    pub(super) fn rebuild_routes(&mut self, key: &ServiceKey) {
        // Health of the endpoints it had, per (service port, address).
        let mut health: HashMap<(u16, SocketAddr), Arc<Health>> = HashMap::new();
        let mut breaker = None;
        if let Some(old) = self.state.indexed.remove(key) {
            for vip in &old.routes {
                if let Some(route) = self.state.routes.remove(vip) {
                    breaker.get_or_insert_with(|| route.breaker.clone());
                    for ep in route.balancer.endpoints() {
                        self.state.endpoint_services.remove(&(ep.addr, old.id));
                        if let Some(h) = ep.health_if_used() {
                            health.insert((vip.port(), ep.addr), h.clone());
                        }
                    }
                }
                self.state.refused.remove(vip);
            }
            for addr in &old.endpoints {
                self.state.endpoint_services.remove(&(*addr, old.id));
            }
        }
        let Some(entry) = self.state.services.get(key).cloned() else { return };
        let svc = &entry.service;
        let slices: Vec<_> = self
            .state
            .slices_of
            .get(key)
            .map(|keys| keys.iter().filter_map(|k| self.state.slices.get(k).cloned()).collect())
            .unwrap_or_default();
        let attached: Vec<_> = self
            .state
            .routes_of
            .get(key)
            .map(|keys| keys.iter().filter_map(|k| self.state.http_routes.get(k).cloned()).collect())
            .unwrap_or_default();
        let mut indexed = Indexed { id: entry.id, ..Indexed::default() };
        let limits = breaker_limits(&svc.circuit_breaker, self.settings.breaker);
        let breaker = match breaker {
            Some(b) => {
                b.set_limits(limits);
                b
            }
            None => Breaker::new(limits),
        };
        let headless = svc.vips.is_empty();
        for port in &svc.ports {
            let candidates = candidates(port, &slices);
            let http = RouteTable::compile(key, port.port, &attached).map(Arc::new);
            // A headless service has no routes to find its endpoints in
            // later: it remembers them (few services are headless).
            if headless {
                for c in &candidates {
                    if self.state.endpoint_services.insert((c.addr, entry.id)).is_none() {
                        indexed.endpoints.push(c.addr);
                    }
                }
            }
            for vip in &svc.vips {
                let vip_addr = SocketAddr::new(canonical_ip(*vip), port.port);
                let endpoints = for_family(&candidates, vip.is_ipv6())
                    .map(|c| Endpoint::new(c.addr, c.weight, c.pod.clone(), health.get(&(port.port, c.addr)).cloned()))
                    .collect::<Vec<_>>();
                if endpoints.is_empty() {
                    self.state.refused.insert(vip_addr, entry.id);
                }
                for ep in &endpoints {
                    self.state.endpoint_services.insert((ep.addr, entry.id));
                }
                let route = ServiceRoute {
                    service: key.clone(),
                    id: entry.id,
                    vip: vip_addr,
                    app_protocol: port.app_protocol.clone(),
                    balancer: Balancer::new(endpoints, self.settings.balance.clone()),
                    http: http.clone(),
                    breaker: breaker.clone(),
                };
                self.state.routes.insert(vip_addr, Arc::new(route));
                indexed.routes.push(vip_addr);
            }
        }
        self.state.indexed.insert(key.clone(), Arc::new(indexed));
    }
}

/// What one service put into the shared indices, so that rebuilding it
/// removes exactly that without scanning them: its routes (whose endpoints
/// are its entries in `endpoint_services`), and for a headless service the
/// endpoints themselves.
#[derive(Debug, Default)]
pub struct Indexed {
    /// The service id the entries were made under.
    id: u32,
    routes: Vec<SocketAddr>,
    endpoints: Vec<SocketAddr>,
}

/// Usable endpoints of every slice for one service port.
fn candidates(port: &ServicePort, slices: &[Arc<crate::model::EndpointSlice>]) -> Vec<Candidate> {
    let mut out = Vec::new();
    for slice in slices {
        let Some(target) = slice.target_of(port) else { continue };
        for ep in slice.endpoints.iter().filter(|e| e.usable()) {
            let addr = SocketAddr::new(canonical_ip(ep.address), target);
            if out.iter().any(|c: &Candidate| c.addr == addr) {
                continue;
            }
            out.push(Candidate { addr, weight: ep.weight, pod: ep.pod.as_ref().map(|p| p.name.clone()) });
        }
    }
    out
}

/// Endpoints of the VIP's family; the other family only if there are none
/// (a pod may be single-stack while the service is dual-stack).
fn for_family(candidates: &[Candidate], v6: bool) -> impl Iterator<Item = &Candidate> {
    let any = candidates.iter().any(|c| c.addr.is_ipv6() == v6);
    candidates.iter().filter(move |c| !any || c.addr.is_ipv6() == v6)
}

/// A service's thresholds: its own where set, else the flags'.
fn breaker_limits(own: &crate::model::CircuitBreaker, defaults: BreakerLimits) -> BreakerLimits {
    BreakerLimits {
        max_connections: own.max_connections.unwrap_or(defaults.max_connections),
        max_pending_requests: own.max_pending_requests.unwrap_or(defaults.max_pending_requests),
        max_requests: own.max_requests.unwrap_or(defaults.max_requests),
        max_retries: own.max_retries.unwrap_or(defaults.max_retries),
    }
}
