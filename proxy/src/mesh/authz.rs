//! L4 authorization policies in the mesh file.
//!
//! ```yaml
//! authorization:
//!   - name: only-frontend
//!     namespace: shop                  # the destination workloads' namespace
//!     selector: {serviceAccounts: [web]}   # or {pods: [web-0]}; omitted: every pod of the namespace
//!     action: allow                    # allow | deny
//!     rules:                           # any rule matching makes the policy match
//!       - principals: ["spiffe://cluster.local/ns/shop/sa/frontend"]   # exact, "*", or "prefix*"
//!         namespaces: [shop]           # source namespaces
//!         ports: [8080]                # destination ports
//! ```
//!
//! Inside a rule, every field given must match (a list matches if any
//! entry does); a policy without rules matches every connection.

use serde::{Deserialize, Serialize};

use super::{check_name, pods::default_namespace};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub pods: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub selector: Option<Selector>,
    pub action: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

pub(super) fn validate(policies: &[AuthorizationPolicy]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for (i, p) in policies.iter().enumerate() {
        check_name("policy name", &p.name).map_err(|e| format!("authorization[{i}]: {e}"))?;
        check_name("namespace", &p.namespace).map_err(|e| format!("policy {}: {e}", p.name))?;
        if !names.insert((&p.namespace, &p.name)) {
            return Err(format!("policy {}/{} is listed twice", p.namespace, p.name));
        }
        for (j, rule) in p.rules.iter().enumerate() {
            for principal in &rule.principals {
                let body = principal.trim_end_matches('*');
                if principal != "*" && !body.starts_with("spiffe://") {
                    return Err(format!(
                        "policy {}/{} rules[{j}]: principal {principal:?} must be a spiffe:// ID, \"*\" or a prefix ending in \"*\"",
                        p.namespace, p.name
                    ));
                }
            }
            if rule.ports.contains(&0) {
                return Err(format!("policy {}/{} rules[{j}]: port 0 is not a port", p.namespace, p.name));
            }
        }
    }
    Ok(())
}
