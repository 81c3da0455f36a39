//! Pods in the mesh file.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{check_name, PodKey};

/// A pod as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The pod's network namespace file (`/var/run/netns/NAME`,
    /// `/proc/PID/ns/net`). Present for pods on this node, which the proxy
    /// captures and serves; absent for meshed pods on other nodes, which it
    /// reaches over mutual TLS.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The node a remote pod runs on (informational).
    #[serde(default)]
    pub node: Option<String>,
    /// The pod's own addresses.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

pub(super) fn default_namespace() -> String {
    "default".into()
}

fn default_service_account() -> String {
    "default".into()
}

impl PodSpec {
    pub fn key(&self) -> PodKey {
        PodKey { namespace: self.namespace.clone(), name: self.name.clone() }
    }

    /// A pod of this node (the proxy captures and serves it).
    pub fn is_local(&self) -> bool {
        self.netns.is_some()
    }

    /// The pod's address of the given family, if it has one.
    pub fn ip_of_family(&self, v6: bool) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| ip.is_ipv6() == v6)
    }
}

pub(super) fn validate(pods: Vec<PodSpec>) -> Result<BTreeMap<PodKey, PodSpec>, String> {
    let mut out = BTreeMap::new();
    let mut netns_owner: HashMap<&Path, PodKey> = HashMap::new();
    let mut ip_owner: HashMap<IpAddr, PodKey> = HashMap::new();
    for (i, pod) in pods.iter().enumerate() {
        check_name("pod name", &pod.name).map_err(|p| format!("pods[{i}]: {p}"))?;
        check_name("namespace", &pod.namespace).map_err(|p| format!("pod {}: {p}", pod.name))?;
        let key = pod.key();
        check_name("serviceAccount", &pod.service_account).map_err(|p| format!("pod {key}: {p}"))?;
        match &pod.netns {
            Some(netns) if !netns.is_absolute() => {
                return Err(format!("pod {key}: netns {netns:?} must be an absolute path"));
            }
            Some(netns) => {
                if let Some(other) = netns_owner.insert(netns, key.clone()) {
                    return Err(format!("pods {other} and {key} share netns {}", netns.display()));
                }
            }
            None if pod.ips.is_empty() => {
                return Err(format!("pod {key} has neither a netns (a pod of this node) nor ips (a pod elsewhere)"));
            }
            None => {}
        }
        for ip in &pod.ips {
            if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
                return Err(format!("pod {key}: {ip} cannot be a pod address"));
            }
            if let Some(other) = ip_owner.insert(*ip, key.clone()) {
                return Err(format!("pods {other} and {key} both claim {ip}"));
            }
        }
        if out.insert(key.clone(), pod.clone()).is_some() {
            return Err(format!("pod {key} is listed twice"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::mesh::parse_for_test as parse;

    #[test]
    fn parses_pods_with_defaults() {
        let state =
            parse("pods:\n  - name: a\n    netns: /var/run/netns/a\n    ips: [10.0.0.1, 'fd00::1']\n").expect("valid");
        let pod = state.pods.values().next().expect("one pod");
        assert_eq!(pod.namespace, "default");
        assert_eq!(pod.service_account, "default");
        assert_eq!(pod.ips.len(), 2);
    }

    #[test]
    fn empty_file_is_no_pods() {
        assert!(parse("").expect("valid").pods.is_empty());
    }

    #[test]
    fn rejects_unknown_fields_with_location() {
        let err = parse("pods:\n  - name: a\n    netns: /x\n    ipz: []\n").expect_err("unknown field");
        let msg = err.to_string();
        assert!(msg.contains("ipz") && msg.contains("line"), "{msg}");
    }

    #[test]
    fn rejects_duplicates() {
        let dup_ip =
            "pods:\n  - {name: a, netns: /n/a, ips: [10.0.0.1]}\n  - {name: b, netns: /n/b, ips: [10.0.0.1]}\n";
        assert!(parse(dup_ip).expect_err("dup ip").to_string().contains("both claim 10.0.0.1"));
        let dup_netns = "pods:\n  - {name: a, netns: /n/a}\n  - {name: b, netns: /n/a}\n";
        assert!(parse(dup_netns).expect_err("dup netns").to_string().contains("share netns"));
        let dup_name = "pods:\n  - {name: a, netns: /n/a}\n  - {name: a, netns: /n/b}\n";
        assert!(parse(dup_name).expect_err("dup").to_string().contains("listed twice"));
    }

    #[test]
    fn pods_without_netns_are_remote() {
        let state = parse("pods:\n  - {name: r, node: node-2, ips: [10.1.0.1]}\n").expect("valid");
        assert!(!state.pods.values().next().expect("pod").is_local());
        assert!(parse("pods:\n  - {name: r}\n").expect_err("no ips").to_string().contains("neither"));
    }

    #[test]
    fn rejects_bad_names_and_addresses() {
        assert!(parse("pods:\n  - {name: A_b, netns: /n/a}\n").is_err());
        assert!(parse("pods:\n  - {name: a, netns: relative}\n").is_err());
        assert!(parse("pods:\n  - {name: a, netns: /n/a, ips: [127.0.0.1]}\n").is_err());
        assert!(parse("pods:\n  - {name: a, netns: /n/a, ips: [not-an-ip]}\n").is_err());
    }
}
