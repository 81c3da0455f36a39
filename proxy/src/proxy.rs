//! State shared by every connection the proxy handles, built once at start.
#![forbid(unsafe_code)]

use std::{sync::Arc, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{capture::Capture, metrics::Metrics};

/// Knobs of the forwarding path, copied from the command line.
#[derive(Debug, Clone, Copy)]
pub struct ForwardSettings {
    pub connect_timeout: Duration,
    pub buffer_size: usize,
    pub mark: u32,
}

#[derive(Debug)]
pub struct Proxy {
    pub capture: Arc<Capture>,
    pub metrics: Arc<Metrics>,
    pub forward: ForwardSettings,
    /// Every connection task, so shutdown can wait for them to drain.
    pub connections: TaskTracker,
    /// Cancelled when the proxy stops accepting.
    pub shutdown: CancellationToken,
}
