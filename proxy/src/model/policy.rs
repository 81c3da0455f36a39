//! L4 authorization policies, Istio's shape: which sources may reach which
//! workloads on which ports.

use std::collections::BTreeMap;

use super::ObjectKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// Which pods of the policy's namespace it applies to. Every list given must
/// match (a list matches if any entry does); empty selects every pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub pods: Vec<String>,
    pub service_accounts: Vec<String>,
    pub match_labels: BTreeMap<String, String>,
}

/// Inside a rule every field given must match; a list matches if any entry
/// does. Principals are exact SPIFFE IDs, `*`, or a prefix ending in `*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    /// Namespace: the destination workloads'.
    pub key: ObjectKey,
    /// `None`: every pod of the namespace.
    pub selector: Option<Selector>,
    pub action: Action,
    /// Any rule matching makes the policy match; no rules matches everything.
    pub rules: Vec<Rule>,
}
