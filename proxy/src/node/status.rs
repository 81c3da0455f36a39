//! What the admin server shows about the node's pods.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

/// `namespace/name`, as a JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    pub namespace: String,
    pub name: String,
}

impl From<&crate::model::ObjectKey> for KeyStatus {
    fn from(k: &crate::model::ObjectKey) -> Self {
        Self { namespace: k.namespace.to_string(), name: k.name.to_string() }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PodStatus {
    pub key: KeyStatus,
    pub uid: String,
    pub service_account: String,
    pub netns: String,
    pub ips: Vec<IpAddr>,
    pub netns_cookie: Option<u64>,
    pub listeners: Vec<SocketAddr>,
    /// Why the pod is not meshed, when it is not.
    pub error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct NodeStatus {
    pub pods: Vec<PodStatus>,
    /// Every pod of the current state is meshed with its listeners bound.
    pub pods_ready: bool,
    /// Programs attached and the kernel side ready.
    pub capture_attached: bool,
    pub shutting_down: bool,
    /// Background tasks that stopped unexpectedly (the proxy is then not ready).
    pub failed_tasks: Vec<String>,
}

impl NodeStatus {
    /// `Ok` when the proxy can serve every pod it was given; otherwise why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.shutting_down {
            return Err("shutting down".into());
        }
        if !self.capture_attached {
            return Err("capture programs not attached yet".into());
        }
        if !self.failed_tasks.is_empty() {
            return Err(format!("background tasks stopped: {}", self.failed_tasks.join(", ")));
        }
        if !self.pods_ready {
            let failing: Vec<String> = self
                .pods
                .iter()
                .filter_map(|p| p.error.as_ref().map(|e| format!("{}/{}: {e}", p.key.namespace, p.key.name)))
                .collect();
            return Err(format!("pods not meshed: {}", failing.join("; ")));
        }
        Ok(())
    }
}
