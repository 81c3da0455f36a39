//! State shared by every connection the proxy handles, built once at start.
#![forbid(unsafe_code)]

use std::{sync::Arc, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use arc_swap::ArcSwap;

use crate::{balance::BalanceSettings, capture::Capture, metrics::Metrics, services::ServiceTable};

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
    /// Service VIPs and their balancers; swapped whole on reload, read once
    /// per connection.
    pub services: ArcSwap<ServiceTable>,
    pub balance: BalanceSettings,
    /// Every connection task, so shutdown can wait for them to drain.
    pub connections: TaskTracker,
    /// Cancelled when the proxy stops accepting.
    pub shutdown: CancellationToken,
}
