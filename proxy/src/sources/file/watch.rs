//! Watching the mesh file by polling its contents. Polling (rather than
//! inotify) survives every way files get replaced — editors' renames,
//! Kubernetes ConfigMap symlink swaps — and costs one small read per tick.

use std::{
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use super::{FileError, FileSource, Loaded};
use crate::{
    metrics::{Metrics, ResultLabels},
    sources::SourceStatus,
    store::{Change, Store},
};

/// Applies a batch of changes and publishes once. Returns how many objects
/// the store refused (each is logged once with its reason).
pub fn apply(store: &Mutex<Store>, changes: Vec<Change>) -> usize {
    crate::sources::apply(store, changes, true)
}

/// Runs `load` on a blocking thread: file reads and parsing never run on
/// an async worker.
pub async fn load_blocking(source: &Arc<Mutex<FileSource>>) -> Result<Loaded, FileError> {
    let shared = source.clone();
    let path = source.lock().unwrap_or_else(|e| e.into_inner()).path().to_path_buf();
    tokio::task::spawn_blocking(move || shared.lock().unwrap_or_else(|e| e.into_inner()).load())
        .await
        // The parser is panic-free; should a load ever panic, it is reported
        // like a bad file and the source (behind its mutex) carries on.
        .unwrap_or_else(|e| Err(FileError::Read { path, reason: format!("loading the file failed: {e}") }))
}

/// Checks the file every `interval` and applies changes until `stop`.
pub async fn run(
    source: Arc<Mutex<FileSource>>,
    store: Arc<Mutex<Store>>,
    status: Arc<RwLock<SourceStatus>>,
    metrics: Arc<Metrics>,
    interval: Duration,
    stop: CancellationToken,
) {
    let path = source.lock().unwrap_or_else(|e| e.into_inner()).path().to_path_buf();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match load_blocking(&source).await {
            Ok(Loaded::Unchanged) => {}
            Ok(Loaded::Changed { changes, objects }) => {
                let count = changes.len();
                let rejected = apply(&store, changes);
                metrics.config_reloads.get_or_create(&ResultLabels { result: "applied" }).inc();
                status.write().unwrap_or_else(|e| e.into_inner()).applied(objects, rejected);
                tracing::info!(file = %path.display(), objects, changes = count, "mesh file applied");
            }
            Err(e) => {
                let message = e.to_string();
                if status.write().unwrap_or_else(|e| e.into_inner()).failed(message.clone()) {
                    metrics.config_reloads.get_or_create(&ResultLabels { result: "rejected" }).inc();
                    tracing::error!(error = %message, "mesh file rejected; the last good state stays in force");
                }
            }
        }
    }
}
