//! The mesh file's `routes:`: HTTPRoutes attached to services (GAMMA), in
//! the Gateway API's YAML shape, and their translation into the model.
//! Fault injection is Outrigger's own filter (`type: Fault`); from the
//! Kubernetes API it would come as an `ExtensionRef`.

use std::{sync::Arc, time::Duration};

use serde::Deserialize;

use crate::model::{
    BackendRef, Fault, Filter, HeaderModifier, HttpRoute, ObjectKey, ParentRef, PathMatch, RateLimit, Retry,
    RouteMatch, RouteRule, Share, StringMatch, Timeouts, ValueMatch,
};

fn default_namespace() -> String {
    "default".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub parent_refs: Vec<ParentRefSpec>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRefSpec {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    /// Only `Service` (the default) in a mesh.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<MatchSpec>,
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRefSpec>,
    #[serde(default)]
    pub timeouts: Option<TimeoutsSpec>,
    #[serde(default)]
    pub retry: Option<RetrySpec>,
}

/// Gateway API HTTPRouteTimeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TimeoutsSpec {
    #[serde(default, with = "humantime_serde_compat::option")]
    pub request: Option<Duration>,
    #[serde(default, with = "humantime_serde_compat::option")]
    pub backend_request: Option<Duration>,
}

/// Gateway API HTTPRouteRetry (GEP-1731).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Retries after the first attempt. Required: GEP-1731 leaves the
    /// default to each implementation, and a route should say what it means.
    pub attempts: u32,
    #[serde(default, with = "humantime_serde_compat::option")]
    pub backoff: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchSpec {
    #[serde(default)]
    pub path: Option<PathSpec>,
    #[serde(default)]
    pub headers: Vec<ValueSpec>,
    #[serde(default)]
    pub query_params: Vec<ValueSpec>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathSpec {
    /// Exact, PathPrefix (default), RegularExpression.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ValueSpec {
    pub name: String,
    pub value: String,
    /// Exact (default), RegularExpression.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRefSpec {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    pub port: u16,
    /// Default 1 (Gateway API).
    #[serde(default)]
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FilterSpec {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub request_mirror: Option<MirrorSpec>,
    #[serde(default)]
    pub fault: Option<FaultSpec>,
    #[serde(default)]
    pub local_rate_limit: Option<RateLimitSpec>,
}

/// Envoy's local_ratelimit token bucket, and whether each source pod gets
/// its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitSpec {
    pub max_tokens: u32,
    /// Envoy's default: 1.
    #[serde(default = "one")]
    pub tokens_per_fill: u32,
    #[serde(with = "humantime_serde_compat")]
    pub fill_interval: Duration,
    #[serde(default)]
    pub per_source_pod: bool,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifierSpec {
    #[serde(default)]
    pub set: Vec<NameValue>,
    #[serde(default)]
    pub add: Vec<NameValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MirrorSpec {
    pub backend_ref: BackendRefSpec,
    #[serde(default)]
    pub percent: Option<f64>,
    #[serde(default)]
    pub fraction: Option<FractionSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FractionSpec {
    pub numerator: u32,
    #[serde(default = "hundred")]
    pub denominator: u32,
}

fn hundred() -> u32 {
    100
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultSpec {
    #[serde(default)]
    pub delay: Option<DelaySpec>,
    #[serde(default)]
    pub abort: Option<AbortSpec>,
    #[serde(default)]
    pub header_control: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DelaySpec {
    #[serde(with = "humantime_serde_compat")]
    pub fixed_delay: Duration,
    #[serde(default = "hundred_f")]
    pub percentage: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AbortSpec {
    pub http_status: u16,
    #[serde(default = "hundred_f")]
    pub percentage: f64,
}

fn hundred_f() -> f64 {
    100.0
}

/// Durations as Gateway API writes them ("100ms", "1s").
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("duration {s:?}: {e}")))
    }

    pub mod option {
        use std::time::Duration;

        use serde::Deserializer;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

fn percentage(what: &str, p: f64) -> Result<Share, String> {
    if !(0.0..=100.0).contains(&p) {
        return Err(format!("{what}: percentage {p} is outside 0..=100"));
    }
    Ok(Share::percent(p))
}

fn service_ref(what: &str, kind: &Option<String>, group: &Option<String>) -> Result<(), String> {
    if kind.as_deref().is_some_and(|k| k != "Service") || group.as_deref().is_some_and(|g| !g.is_empty() && g != "core")
    {
        return Err(format!("{what}: only Service references are supported in a mesh"));
    }
    Ok(())
}

fn backend(what: &str, b: &BackendRefSpec, ns: &str) -> Result<BackendRef, String> {
    service_ref(what, &b.kind, &b.group)?;
    Ok(BackendRef {
        service: ObjectKey::new(b.namespace.as_deref().unwrap_or(ns), &b.name),
        port: b.port,
        weight: b.weight.unwrap_or(1),
    })
}

fn string_match(what: &str, v: &ValueSpec) -> Result<ValueMatch, String> {
    let value = match v.kind.as_deref().unwrap_or("Exact") {
        "Exact" => StringMatch::Exact(v.value.as_str().into()),
        "RegularExpression" => StringMatch::RegularExpression(v.value.as_str().into()),
        other => return Err(format!("{what}: match type {other:?} (Exact or RegularExpression)")),
    };
    Ok(ValueMatch { name: v.name.as_str().into(), value })
}

fn modifier(m: &HeaderModifierSpec) -> HeaderModifier {
    let pairs = |v: &[NameValue]| -> Vec<(Arc<str>, Arc<str>)> {
        v.iter().map(|nv| (nv.name.as_str().into(), nv.value.as_str().into())).collect()
    };
    HeaderModifier {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m.remove.iter().map(|n| n.as_str().into()).collect(),
    }
}

fn filter(what: &str, f: &FilterSpec, ns: &str) -> Result<Filter, String> {
    let missing = |field: &str| format!("{what}: type {} needs `{field}`", f.kind);
    Ok(match f.kind.as_str() {
        "RequestHeaderModifier" => {
            Filter::RequestHeaderModifier(modifier(f.request_header_modifier.as_ref().ok_or_else(|| missing("requestHeaderModifier"))?))
        }
        "ResponseHeaderModifier" => Filter::ResponseHeaderModifier(modifier(
            f.response_header_modifier.as_ref().ok_or_else(|| missing("responseHeaderModifier"))?,
        )),
        "RequestMirror" => {
            let m = f.request_mirror.as_ref().ok_or_else(|| missing("requestMirror"))?;
            let share = match (m.percent, &m.fraction) {
                (Some(_), Some(_)) => return Err(format!("{what}: requestMirror takes percent or fraction, not both")),
                (Some(p), None) => percentage(what, p)?,
                (None, Some(f)) if f.denominator == 0 || f.numerator > f.denominator => {
                    return Err(format!("{what}: fraction {}/{} is not a share", f.numerator, f.denominator))
                }
                (None, Some(f)) => Share::fraction(f.numerator, f.denominator),
                (None, None) => Share::ALL,
            };
            Filter::RequestMirror { backend: backend(what, &m.backend_ref, ns)?, share }
        }
        "Fault" => {
            let spec = f.fault.as_ref().ok_or_else(|| missing("fault"))?;
            Filter::Fault(Fault {
                delay: spec.delay.as_ref().map(|d| Ok::<_, String>((d.fixed_delay, percentage(what, d.percentage)?))).transpose()?,
                abort: spec.abort.as_ref().map(|a| Ok::<_, String>((a.http_status, percentage(what, a.percentage)?))).transpose()?,
                header_control: spec.header_control,
            })
        }
        "LocalRateLimit" => {
            let spec = f.local_rate_limit.as_ref().ok_or_else(|| missing("localRateLimit"))?;
            Filter::LocalRateLimit(RateLimit {
                max_tokens: spec.max_tokens,
                tokens_per_fill: spec.tokens_per_fill,
                fill_interval: spec.fill_interval,
                per_source_pod: spec.per_source_pod,
            })
        }
        other => {
            return Err(format!(
                "{what}: filter type {other:?} is not supported (RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, Fault, LocalRateLimit)"
            ))
        }
    })
}

/// One route of the file; `created`: its position (earlier is older).
pub fn translate(r: &RouteSpec, created: u64) -> Result<HttpRoute, String> {
    let key = ObjectKey::new(&r.namespace, &r.name);
    let ns = r.namespace.as_str();
    let mut parents = Vec::new();
    for p in &r.parent_refs {
        service_ref(&format!("route {key} parentRefs"), &p.kind, &p.group)?;
        parents
            .push(ParentRef { service: ObjectKey::new(p.namespace.as_deref().unwrap_or(ns), &p.name), port: p.port });
    }
    let mut rules = Vec::new();
    for (i, rule) in r.rules.iter().enumerate() {
        let what = format!("route {key} rules[{i}]");
        let mut matches = Vec::new();
        for m in &rule.matches {
            let path = match &m.path {
                None => None,
                Some(p) => {
                    let value: Arc<str> = p.value.as_deref().unwrap_or("/").into();
                    Some(match p.kind.as_deref().unwrap_or("PathPrefix") {
                        "Exact" => PathMatch::Exact(value),
                        "PathPrefix" => PathMatch::Prefix(value),
                        "RegularExpression" => PathMatch::RegularExpression(value),
                        other => {
                            return Err(format!("{what}: path type {other:?} (Exact, PathPrefix, RegularExpression)"))
                        }
                    })
                }
            };
            let method = match &m.method {
                None => None,
                Some(name) => {
                    Some(http::Method::from_bytes(name.as_bytes()).map_err(|_| format!("{what}: method {name:?}"))?)
                }
            };
            matches.push(RouteMatch {
                path,
                headers: m.headers.iter().map(|h| string_match(&what, h)).collect::<Result<_, _>>()?,
                query: m.query_params.iter().map(|q| string_match(&what, q)).collect::<Result<_, _>>()?,
                method,
            });
        }
        rules.push(RouteRule {
            name: rule.name.as_deref().map(Into::into),
            matches,
            filters: rule.filters.iter().map(|f| filter(&what, f, ns)).collect::<Result<_, _>>()?,
            backends: rule.backend_refs.iter().map(|b| backend(&what, b, ns)).collect::<Result<_, _>>()?,
            timeouts: rule
                .timeouts
                .as_ref()
                .map(|t| Timeouts { request: t.request, backend_request: t.backend_request })
                .unwrap_or_default(),
            retry: rule.retry.as_ref().map(|r| Retry {
                codes: r.codes.clone(),
                attempts: r.attempts,
                backoff: r.backoff,
            }),
        });
    }
    Ok(HttpRoute { key, parents, rules, created })
}
