//! What the admin server shows about the node's pods.

use std::net::SocketAddr;

use serde::Serialize;

use crate::mesh::{PodKey, PodSpec};

#[derive(Debug, Clone, Serialize)]
pub struct PodStatus {
    pub key: PodKey,
    pub spec: PodSpec,
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
    /// A mesh file has been applied at least once.
    pub loaded_once: bool,
    /// Why the newest mesh file was refused (the last good one is in force).
    pub last_reload_error: Option<String>,
    /// Programs attached and the kernel side ready.
    pub capture_attached: bool,
    pub shutting_down: bool,
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
        if !self.loaded_once {
            return Err(match &self.last_reload_error {
                Some(e) => format!("no mesh file applied yet: {e}"),
                None => "no mesh file applied yet".into(),
            });
        }
        if !self.pods_ready {
            let failing: Vec<String> =
                self.pods.iter().filter_map(|p| p.error.as_ref().map(|e| format!("{}: {e}", p.key))).collect();
            return Err(format!("pods not meshed: {}", failing.join("; ")));
        }
        Ok(())
    }
}
