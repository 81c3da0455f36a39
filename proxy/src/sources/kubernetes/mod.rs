//! The Kubernetes API as the source of the mesh state (`--kubernetes`).
//!
//! Six kube-rs watchers (`kube::runtime::watcher`), one event loop:
//!
//! | watch | for |
//! |---|---|
//! | Namespaces | the enrolment label `outrigger.dev/mesh=enabled` |
//! | Pods with `spec.nodeName` = this node | pods to capture and serve |
//! | Pods with `spec.nodeName` ≠ this node | tunnel peers and their identities |
//! | Services | VIPs, ports, named target ports |
//! | EndpointSlices | endpoints and their conditions |
//! | `security.istio.io/v1` AuthorizationPolicies | L4 authorization |
//!
//! Objects are watched as untyped JSON and turned into typed objects one at
//! a time, so that one malformed object is skipped and reported while the
//! rest of its list applies (a typed watcher fails the whole list). Each is
//! reduced at once to the model ([`reduce`], [`policy`]) and dropped: no
//! full object is kept.
//!
//! Watch semantics: nothing is published before every watch has listed
//! once (`/ready` says "waiting for the Kubernetes API" until then); a
//! dropped watch resumes from its resourceVersion; an expired version
//! (410 Gone) relists, and what is not in the new list is removed; while
//! the API is unreachable the last state keeps serving and the watchers
//! retry with exponential backoff (0.8 s doubling to 30 s).
//!
//! Pods of this node are meshed once their network namespace is found
//! through their processes ([`procfs`]).
#![forbid(unsafe_code)]

mod cluster;
pub mod policy;
pub mod procfs;
pub mod reduce;
mod watch;

pub use watch::run;

use std::{path::PathBuf, time::Duration};

use crate::sources::SourceStatus;

/// What `--kubernetes` needs beyond the client.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// This node's name (`--node-name`): its pods are captured here.
    pub node_name: String,
    /// The host's `/proc` (`--host-proc`): where pods' processes are found.
    pub host_proc: PathBuf,
    /// Services' DNS suffix (`--cluster-domain`).
    pub cluster_domain: String,
    /// How often pods still waiting for their network namespace are looked
    /// for again.
    pub rescan_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "no Kubernetes client configuration: {0} (in a pod, mount the service-account token; outside, set KUBECONFIG)"
    )]
    Config(String),
    #[error("building the Kubernetes client: {0}")]
    Client(String),
}

/// A client from the in-cluster configuration, or `KUBECONFIG` /
/// `~/.kube/config`.
pub async fn client() -> Result<kube::Client, KubeError> {
    let config = kube::Config::infer().await.map_err(|e| KubeError::Config(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))
}

/// The status a fresh Kubernetes source reports.
pub fn status() -> SourceStatus {
    SourceStatus::new("Kubernetes API".into())
}

#[cfg(test)]
mod tests;
