//! The mesh state: the pods on this node and the services they can reach.
//!
//! This is the model the data path reads. Today it comes from a YAML file
//! (`outrigger run --pods-file`); in a cluster the same model is to be fed
//! from the Kubernetes API (Pods, Services, EndpointSlices), which is why
//! it is kept free of file-format details: services name their endpoints
//! by pod or by address, as EndpointSlices do.
//!
//! ```yaml
//! pods:
//!   - name: web-0
//!     namespace: shop
//!     serviceAccount: web
//!     netns: /var/run/netns/web-0
//!     ips: [10.244.1.5, fd00:244:1::5]
//! services:
//!   - name: web
//!     namespace: shop
//!     vips: [10.96.0.10, fd00:96::10]
//!     ports: [{port: 80, targetPort: 8080}]
//!     endpoints:
//!       - pod: web-0              # a pod in this file (namespace: the service's)
//!       - address: 10.244.2.7     # or a plain address
//!         weight: 2
//! ```
//!
//! The file is read whole, validated whole, and applied whole: a file with
//! any problem is refused and the last good state stays in force.
#![forbid(unsafe_code)]

pub mod authz;
mod pods;
mod services;
pub mod watch;

use std::{collections::BTreeMap, fmt, path::Path};

use serde::{Deserialize, Serialize};

pub use pods::PodSpec;
pub use services::{EndpointSpec, EndpointTarget, ServicePortSpec, ServiceSpec};

#[derive(Debug, thiserror::Error)]
pub enum MeshFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid mesh YAML: {source}")]
    Parse {
        path: std::path::PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: std::path::PathBuf, problem: String },
}

/// `namespace/name` of a pod or a service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

/// Pods are keyed like any namespaced object.
pub type PodKey = ObjectKey;
pub type ServiceKey = ObjectKey;

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MeshFile {
    #[serde(default)]
    pods: Vec<PodSpec>,
    #[serde(default)]
    services: Vec<ServiceSpec>,
    #[serde(default)]
    authorization: Vec<authz::AuthorizationPolicy>,
}

/// A validated mesh state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshState {
    pub pods: BTreeMap<PodKey, PodSpec>,
    pub services: BTreeMap<ServiceKey, ServiceSpec>,
    pub authorization: Vec<authz::AuthorizationPolicy>,
}

impl MeshState {
    pub fn parse(path: &Path, text: &str) -> Result<Self, MeshFileError> {
        let file: MeshFile = if text.trim().is_empty() {
            MeshFile { pods: Vec::new(), services: Vec::new(), authorization: Vec::new() }
        } else {
            serde_yaml::from_str(text).map_err(|source| MeshFileError::Parse { path: path.to_path_buf(), source })?
        };
        let invalid = |problem: String| MeshFileError::Invalid { path: path.to_path_buf(), problem };
        let pods = pods::validate(file.pods).map_err(invalid)?;
        let services = services::validate(file.services, &pods).map_err(invalid)?;
        authz::validate(&file.authorization).map_err(invalid)?;
        Ok(Self { pods, services, authorization: file.authorization })
    }
}

/// Kubernetes names: DNS-1123 (lower-case alphanumerics, '-' and '.') —
/// also what keeps them safe as metric labels and in logs.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if name.is_empty() || name.len() > 253 || !name.chars().all(ok_char) || name.starts_with('-') || name.ends_with('-')
    {
        return Err(format!("{what} {name:?} is not a valid Kubernetes name (lower-case letters, digits, '-', '.')"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) fn parse_for_test(text: &str) -> Result<MeshState, MeshFileError> {
    MeshState::parse(Path::new("/etc/outrigger/mesh.yaml"), text)
}
