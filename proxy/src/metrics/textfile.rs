//! The node-exporter textfile output: the per-pod series, written every
//! interval to `<dir>/outrigger.prom` for prometheus-node-exporter's
//! textfile collector, so a node's existing exporter publishes them.
//!
//! The file is written to a temporary name that the collector ignores (it
//! reads `*.prom` only) and renamed into place, so a half-written file is
//! never read. The exporter parses the classic text format, not
//! OpenMetrics, so counters are typed under their `_total` names and the
//! OpenMetrics-only lines are left out.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::{POD_FAMILIES, REQUEST_FAMILIES};

pub const FILE_NAME: &str = "outrigger.prom";
const TEMP_NAME: &str = ".outrigger.prom.tmp";
/// The last line of every file written: lets a reader check it got a whole file.
pub const TRAILER: &str = "# outrigger textfile end";

#[derive(Debug, thiserror::Error)]
pub enum TextfileError {
    #[error("writing {path}: {source} (does --textfile-dir exist and is it writable?)")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding metrics failed")]
    Encode,
}

/// The per-pod families of an OpenMetrics exposition, in text format 0.0.4.
pub fn to_textfile(openmetrics: &str) -> String {
    // HELP precedes TYPE in OpenMetrics: learn the types first.
    let kinds: std::collections::HashMap<&str, &str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|rest| rest.split_once(' ')).collect();
    let exposed = |name: &str| match kinds.get(name) {
        Some(&"counter") => format!("{name}_total"),
        _ => name.to_string(),
    };
    let mut out = String::with_capacity(openmetrics.len());
    let mut keep = false;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            keep = POD_FAMILIES.contains(&name) || REQUEST_FAMILIES.contains(&name);
            if keep {
                out.push_str(&format!("# HELP {} {help}\n", exposed(name)));
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            keep = POD_FAMILIES.contains(&name) || REQUEST_FAMILIES.contains(&name);
            if keep {
                out.push_str(&format!("# TYPE {} {kind}\n", exposed(name)));
            }
        } else if !line.starts_with('#') && keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(TRAILER);
    out.push('\n');
    out
}

/// Writes the file once, atomically.
pub fn write_once(dir: &Path, registry: &Registry) -> Result<(), TextfileError> {
    let text = super::encode(registry).map_err(|_| TextfileError::Encode)?;
    let temp = dir.join(TEMP_NAME);
    let target = dir.join(FILE_NAME);
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TextfileError::Write { path, source }
    };
    std::fs::write(&temp, to_textfile(&text)).map_err(err(&temp))?;
    std::fs::rename(&temp, &target).map_err(err(&target))
}

/// Rewrites the file every `interval` until `stop`; removes it at the end
/// so a stopped proxy's numbers are not published as current.
pub async fn run(dir: PathBuf, interval: Duration, registry: Arc<Registry>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let (dir2, registry2) = (dir.clone(), registry.clone());
        let result = tokio::task::spawn_blocking(move || write_once(&dir2, &registry2)).await;
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if error.is_some() && error != last_error {
            tracing::error!(error = error.as_deref().unwrap_or(""), "node-exporter textfile not written");
        }
        last_error = error;
    }
    let _ = std::fs::remove_file(dir.join(FILE_NAME));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_counters_and_keeps_only_pod_families() {
        let om = "# HELP outrigger_connections_opened TCP connections proxied.\n\
                  # TYPE outrigger_connections_opened counter\n\
                  outrigger_connections_opened_total{source_pod=\"a\"} 3\n\
                  # HELP outrigger_pods_meshed Pods.\n\
                  # TYPE outrigger_pods_meshed gauge\n\
                  outrigger_pods_meshed 2\n\
                  # HELP outrigger_connect_duration_seconds Connect.\n\
                  # TYPE outrigger_connect_duration_seconds histogram\n\
                  # UNIT outrigger_connect_duration_seconds seconds\n\
                  outrigger_connect_duration_seconds_bucket{le=\"+Inf\"} 3\n\
                  # EOF\n";
        let text = to_textfile(om);
        assert!(text.contains("# TYPE outrigger_connections_opened_total counter\n"), "{text}");
        assert!(text.contains("# HELP outrigger_connections_opened_total TCP"), "{text}");
        assert!(text.contains("outrigger_connections_opened_total{source_pod=\"a\"} 3\n"));
        assert!(!text.contains("pods_meshed"));
        assert!(text.contains("# TYPE outrigger_connect_duration_seconds histogram"));
        assert!(!text.contains("# UNIT") && !text.contains("# EOF"));
        assert!(text.ends_with(&format!("{TRAILER}\n")));
    }
}
