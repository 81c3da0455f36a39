//! The mesh file's YAML shape. Only this module knows it; `translate.rs`
//! turns it into model objects.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshFile {
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub authorization: Vec<PolicySpec>,
    /// HTTP routes attached to services (Gateway API HTTPRoute shape).
    #[serde(default)]
    pub routes: Vec<super::routes::RouteSpec>,
}

fn default_namespace() -> String {
    "default".into()
}

fn default_service_account() -> String {
    "default".into()
}

fn default_weight() -> u32 {
    1
}

/// A pod: one of this node (`netns`) or of another (`node`, `ips`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The pod's network namespace file (`/var/run/netns/NAME`,
    /// `/proc/PID/ns/net`): set for pods of this node.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Named container ports, for services whose `targetPort` is a name.
    #[serde(default)]
    pub ports: Vec<NamedPort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    pub ports: Vec<ServicePortSpec>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    /// Envoy's circuit-breaker thresholds for the service.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// A token bucket per endpoint pod, kept by the pod's own node.
    #[serde(default)]
    pub inbound_rate_limit: Option<InboundRateLimitSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InboundRateLimitSpec {
    pub max_tokens: u32,
    #[serde(default = "one")]
    pub tokens_per_fill: u32,
    #[serde(deserialize_with = "duration")]
    pub fill_interval: std::time::Duration,
}

fn one() -> u32 {
    1
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("duration {s:?}: {e}")))
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub max_pending_requests: Option<u32>,
    #[serde(default)]
    pub max_requests: Option<u32>,
    #[serde(default)]
    pub max_retries: Option<u32>,
}

/// A number, or the name of a container port.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePortSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    /// Default: `port`.
    #[serde(default)]
    pub target_port: Option<PortRef>,
    /// What the port speaks: tcp, http, http2 (h2c), grpc.
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSpec {
    #[serde(default)]
    pub pod: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub address: Option<IpAddr>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionSpec {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SelectorSpec {
    #[serde(default)]
    pub pods: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Client address ranges (CIDR or a single address).
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub not_ports: Vec<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub selector: Option<SelectorSpec>,
    pub action: ActionSpec,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}
