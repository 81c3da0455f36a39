//! SPIFFE IDs of Kubernetes workloads: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::{fmt, str::FromStr};

use serde::{Serialize, Serializer};

/// A workload identity. Every pod of a service account shares one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a Kubernetes SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")]
pub struct NotASpiffeId(pub String);

impl FromStr for Identity {
    type Err = NotASpiffeId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || NotASpiffeId(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(err)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => Ok(Self::new(td, ns, sa)),
            _ => Err(err()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().expect("valid");
        assert_eq!(id, Identity::new("cluster.local", "shop", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in
            ["spiffe://cluster.local/ns/shop", "https://x/ns/a/sa/b", "spiffe:///ns/a/sa/b", "spiffe://td/ns/a/sa/b/c"]
        {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }
}
