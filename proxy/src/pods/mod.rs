//! The mesh state file: which pods on this node are meshed.
//!
//! ```yaml
//! pods:
//!   - name: web-0
//!     namespace: shop
//!     serviceAccount: web
//!     netns: /var/run/netns/web-0
//!     ips: [10.244.1.5, fd00:244:1::5]
//! ```
//!
//! The file is read whole, validated whole, and applied whole: a file with
//! any problem is refused and the last good state stays in force.
#![forbid(unsafe_code)]

pub mod watch;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum MeshFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid mesh YAML: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// A pod as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The pod's network namespace file (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// The pod's own addresses.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

fn default_namespace() -> String {
    "default".into()
}

fn default_service_account() -> String {
    "default".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MeshFile {
    #[serde(default)]
    pods: Vec<PodSpec>,
}

/// `namespace/name`: unique per pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl PodSpec {
    pub fn key(&self) -> PodKey {
        PodKey { namespace: self.namespace.clone(), name: self.name.clone() }
    }
}

/// A validated mesh state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshState {
    pub pods: BTreeMap<PodKey, PodSpec>,
}

impl MeshState {
    pub fn parse(path: &Path, text: &str) -> Result<Self, MeshFileError> {
        let invalid = |problem: String| MeshFileError::Invalid { path: path.to_path_buf(), problem };
        let file: MeshFile = if text.trim().is_empty() {
            MeshFile { pods: Vec::new() }
        } else {
            serde_yaml::from_str(text).map_err(|source| MeshFileError::Parse { path: path.to_path_buf(), source })?
        };
        let mut pods = BTreeMap::new();
        let mut netns_owner: HashMap<&Path, PodKey> = HashMap::new();
        let mut ip_owner: HashMap<IpAddr, PodKey> = HashMap::new();
        for (i, pod) in file.pods.iter().enumerate() {
            check_name("pod name", &pod.name).map_err(|p| invalid(format!("pods[{i}]: {p}")))?;
            check_name("namespace", &pod.namespace).map_err(|p| invalid(format!("pod {}: {p}", pod.name)))?;
            let key = pod.key();
            check_name("serviceAccount", &pod.service_account).map_err(|p| invalid(format!("pod {key}: {p}")))?;
            if !pod.netns.is_absolute() {
                return Err(invalid(format!("pod {key}: netns {:?} must be an absolute path", pod.netns)));
            }
            if let Some(other) = netns_owner.insert(&pod.netns, key.clone()) {
                return Err(invalid(format!("pods {other} and {key} share netns {}", pod.netns.display())));
            }
            for ip in &pod.ips {
                if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
                    return Err(invalid(format!("pod {key}: {ip} cannot be a pod address")));
                }
                if let Some(other) = ip_owner.insert(*ip, key.clone()) {
                    return Err(invalid(format!("pods {other} and {key} both claim {ip}")));
                }
            }
            if pods.insert(key.clone(), pod.clone()).is_some() {
                return Err(invalid(format!("pod {key} is listed twice")));
            }
        }
        Ok(Self { pods })
    }
}

/// Kubernetes names: DNS-1123 labels (lower-case alphanumerics and '-',
/// at most 63) — also what keeps them safe as metric labels and in logs.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if name.is_empty() || name.len() > 253 || !name.chars().all(ok_char) || name.starts_with('-') || name.ends_with('-')
    {
        return Err(format!("{what} {name:?} is not a valid Kubernetes name (lower-case letters, digits, '-', '.')"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MeshState, MeshFileError> {
        MeshState::parse(Path::new("/etc/outrigger/mesh.yaml"), text)
    }

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
    fn rejects_bad_names_and_addresses() {
        assert!(parse("pods:\n  - {name: A_b, netns: /n/a}\n").is_err());
        assert!(parse("pods:\n  - {name: a, netns: relative}\n").is_err());
        assert!(parse("pods:\n  - {name: a, netns: /n/a, ips: [127.0.0.1]}\n").is_err());
        assert!(parse("pods:\n  - {name: a, netns: /n/a, ips: [not-an-ip]}\n").is_err());
    }
}
