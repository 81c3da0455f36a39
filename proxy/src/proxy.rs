//! State shared by every connection the proxy handles, built once at start.
#![forbid(unsafe_code)]

use std::{sync::Arc, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use arc_swap::ArcSwap;

use crate::{
    balance::BalanceSettings, capture::Capture, identity::Identities, metrics::Metrics, tls::TlsConfigs, tunnel::Pool,
    view::MeshView,
};

/// Knobs of the forwarding path, copied from the command line.
#[derive(Debug, Clone, Copy)]
pub struct ForwardSettings {
    /// Per connect attempt.
    pub connect_timeout: Duration,
    /// Attempts for a service VIP (each on another endpoint).
    pub connect_attempts: u32,
    pub buffer_size: usize,
    pub mark: u32,
}

#[derive(Debug)]
pub struct Proxy {
    pub capture: Arc<Capture>,
    pub metrics: Arc<Metrics>,
    pub forward: ForwardSettings,
    /// Services, meshed pods and policies; swapped whole on reload, read
    /// once per connection.
    pub mesh: ArcSwap<MeshView>,
    pub balance: BalanceSettings,
    pub trust_domain: String,
    /// Mutual TLS between nodes; `None` when no certificate source is set.
    pub mtls: Option<Mtls>,
    /// Every connection task, so shutdown can wait for them to drain.
    pub connections: TaskTracker,
    /// Cancelled when the proxy stops accepting.
    pub shutdown: CancellationToken,
}

/// Mutual TLS: certificates, TLS configurations, the tunnel pool.
#[derive(Debug)]
pub struct Mtls {
    pub identities: Arc<Identities>,
    pub tls: TlsConfigs,
    pub pool: Pool,
    pub hbone_port: u16,
    pub max_streams: u32,
    /// `--mtls strict`: meshed pods take no plaintext from outside the mesh,
    /// and same-node meshed traffic is tunnelled too.
    pub strict: bool,
}
