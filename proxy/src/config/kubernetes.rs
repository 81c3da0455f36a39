//! Flags of the Kubernetes source (`--kubernetes`).

use std::path::PathBuf;

use clap::Args;

use super::{bad, ConfigError};

#[derive(Debug, Clone, Args)]
pub struct KubeArgs {
    /// Take the mesh state from the Kubernetes API instead of --pods-file: pods of
    /// namespaces labelled outrigger.dev/mesh=enabled (a pod labelled
    /// outrigger.dev/mesh=disabled opts out), Services, EndpointSlices and Istio
    /// security.istio.io/v1 AuthorizationPolicies. Uses the in-cluster service
    /// account, or KUBECONFIG outside a pod. /ready waits for the first full list.
    #[arg(long, env = "OUTRIGGER_KUBERNETES", conflicts_with = "pods_file")]
    pub kubernetes: bool,

    /// This node's name, as in the pods' spec.nodeName: its pods are the ones captured
    /// here. In the DaemonSet it comes from the downward API (spec.nodeName).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,

    /// The host's /proc (mounted read-only into the proxy's pod): pods' network
    /// namespaces are found through their processes' cgroup paths there.
    #[arg(long, env = "OUTRIGGER_HOST_PROC", default_value = "/proc")]
    pub host_proc: PathBuf,

    /// The cluster's DNS domain: a service's hostname is NAME.NAMESPACE.svc.DOMAIN.
    #[arg(long, env = "OUTRIGGER_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
}

impl KubeArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.kubernetes {
            return Ok(());
        }
        if self.node_name.trim().is_empty() {
            return Err(bad(
                "node-name",
                "--kubernetes needs this node's name (set NODE_NAME from the downward API: fieldRef spec.nodeName)",
            ));
        }
        crate::model::validate::check_name("--node-name", &self.node_name).map_err(|e| bad("node-name", e))?;
        if !self.host_proc.join("1").exists() {
            return Err(bad(
                "host-proc",
                format!("{} has no process 1: mount the host's /proc there (read-only)", self.host_proc.display()),
            ));
        }
        let domain_ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        if self.cluster_domain.is_empty() || !self.cluster_domain.chars().all(domain_ok) {
            return Err(bad("cluster-domain", format!("{:?} is not a DNS domain", self.cluster_domain)));
        }
        Ok(())
    }
}
