//! L4 authorization policies, Istio's shape: which sources may reach which
//! workloads on which ports.

use std::collections::BTreeMap;

use ipnet::IpNet;

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
/// does. Principals and namespaces are exact, `*`, a prefix ending in `*`
/// or a suffix starting with `*`; principals are SPIFFE IDs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    /// The client's address (for a tunnelled connection: the source pod's).
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    /// Namespace: the destination workloads'.
    pub key: ObjectKey,
    /// `None`: every pod of the namespace.
    pub selector: Option<Selector>,
    pub action: Action,
    /// Any rule matching makes the policy match; no rules matches nothing
    /// (Istio's meaning: an ALLOW without rules allows nothing). A rule
    /// with no fields matches everything.
    pub rules: Vec<Rule>,
}

/// An `ipBlocks` entry: a CIDR (`10.0.0.0/16`) or one address.
pub fn parse_ip_block(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an address or CIDR block (e.g. 10.0.0.0/16)"))
}
