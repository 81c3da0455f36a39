//! The Kubernetes source at cluster scale (issue #11): 5 000 pods (250 on
//! this node), 2 000 services and 20 000 endpoints fed to the real proxy
//! through the test double of the API server — how long the proxy takes to
//! take it in (as watch events, and as a cold start's LIST), what one
//! EndpointSlice change costs from the API write to the published state,
//! and the proxy's memory with that state.
//!
//! The measuring is done by `outrigger-kubebench` (tests/kubebench, which
//! says what the cluster holds). It needs root (the proxy attaches its
//! programs) and release builds of the proxy and of itself.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};
use serde_json::Value;

use super::Table;
use crate::util::{cargo, exec, output, workspace_root};

/// What `--only` selects the table by.
pub const GROUP: &str = "kubernetes";
const BIN: &str = "outrigger-kubebench";

pub fn table() -> Table {
    Table::with_paths(
        GROUP,
        "Kubernetes source: 5 000 pods (250 local, meshed), 2 000 services, 20 000 endpoints through the test API \
         server (watch: the cluster created while the proxy watches, until all applied and 250 pods meshed; cold: a \
         new proxy to /ready; change: one EndpointSlice write to the proxy's published state, 300 changes; rss: \
         proxy VmRSS with that state; state: the growth over an empty cluster)",
        &["5k pods, 2k svc, 20k ep"],
        &[
            ("watch_apply_s", false),
            ("cold_start_s", false),
            ("change_p50_ms", false),
            ("change_p99_ms", false),
            ("change_max_ms", false),
            ("rss_mb", false),
            ("state_rss_mb", false),
        ],
        vec![],
    )
}

pub fn build() -> Result<PathBuf> {
    crate::build::ebpf()?;
    exec(cargo().args([
        "build",
        "--release",
        "-p",
        "outrigger",
        "-p",
        "outrigger-e2e",
        "--bin",
        "outrigger",
        "--bin",
        BIN,
    ]))?;
    Ok(workspace_root().join("target/release").join(BIN))
}

pub fn measure(bin: &Path, table: &mut Table, round: usize) -> Result<()> {
    eprintln!("bench: round {round}: {:<28} {BIN}", "Kubernetes at cluster scale");
    let proxy = workspace_root().join("target/release/outrigger");
    let text = output(Command::new(bin).env("OUTRIGGER_BIN", proxy))?;
    let v: Value = serde_json::from_str(text.trim().lines().last().unwrap_or_default())
        .with_context(|| format!("{BIN} printed: {text}"))?;
    table.record(0, &v);
    Ok(())
}
