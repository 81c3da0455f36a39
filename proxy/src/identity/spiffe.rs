//! SPIFFE IDs of Kubernetes workloads: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::{fmt, str::FromStr, sync::Arc};

use serde::{Serialize, Serializer};

/// A workload identity. Every pod of a service account shares one. The
/// parts are shared strings: every remote pod of the mesh has one, and the
/// store builds them from strings it already holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: Arc<str>,
    pub namespace: Arc<str>,
    pub service_account: Arc<str>,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self { trust_domain: trust_domain.into(), namespace: namespace.into(), service_account: service_account.into() }
    }

    /// From strings already shared elsewhere (no allocation).
    pub fn from_parts(trust_domain: Arc<str>, namespace: Arc<str>, service_account: Arc<str>) -> Self {
        Self { trust_domain, namespace, service_account }
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
