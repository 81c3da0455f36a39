//! The store at cluster scale, held to issue #8's goals: one endpoint
//! change applied and published in under 1 ms with 10 000 services and
//! 100 000 endpoints in the store, and that state in under 100 MB.
//!
//! The measuring is done by `outrigger-storebench` (tests/storebench, which
//! says what the state holds and how memory is counted). It needs no
//! namespaces or root, only a release build: timing unoptimised code would
//! say nothing about the proxy.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};
use serde_json::Value;

use super::Table;
use crate::util::{cargo, exec, output, workspace_root};

/// What `--only` selects both tables by.
pub const GROUP: &str = "store";
const BIN: &str = "outrigger-storebench";

/// One change + publish, in µs: the goal is on every change, so on p99 (the
/// max also catches the machine's scheduler ticks, which are not the store's).
pub fn tables() -> [Table; 2] {
    let timing = Table::with_paths(
        GROUP,
        "Store with 10 000 services, 100 000 endpoints, 100 000 remote pods: one change applied + published, µs \
         (2000 endpoint changes, 1000 services removed and added back, on random services)",
        &["endpoint ready flip", "endpoint address change", "service removed", "service added"],
        &[("p50_us", false), ("p99_us", false), ("max_us", false)],
        vec![],
    )
    .goal("p50_us", 1000.0)
    .goal("p99_us", 1000.0);
    let memory = Table::with_paths(
        "store_memory",
        "Memory of that state, MB (rss: process growth building + publishing it; heap: bytes live on the heap, \
         total and by object kind; build: all upserts + publish, s)",
        &["10k svc, 100k ep"],
        &[
            ("build_s", false),
            ("rss_mb", false),
            ("heap_mb", false),
            ("pods_heap_mb", false),
            ("services_heap_mb", false),
            ("slices_heap_mb", false),
        ],
        vec![],
    )
    .goal("rss_mb", 100.0)
    .goal("heap_mb", 100.0)
    .in_group(GROUP);
    [timing, memory]
}

pub fn build() -> Result<PathBuf> {
    exec(cargo().args(["build", "--release", "-p", "outrigger-e2e", "--bin", BIN]))?;
    Ok(workspace_root().join("target/release").join(BIN))
}

/// One run of the binary: a sample of every figure of both tables.
pub fn measure(bin: &Path, [timing, memory]: &mut [Table; 2], round: usize) -> Result<()> {
    eprintln!("bench: round {round}: {:<28} {BIN}", "store at cluster scale");
    let text = output(&mut Command::new(bin))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{BIN} printed: {text}"))?;
    for p in 0..timing.paths.len() {
        // The binary names each kind of change like the row, with underscores.
        let key = timing.paths[p].replace(' ', "_");
        timing.record(p, &v[key.as_str()]);
    }
    memory.record(0, &v);
    Ok(())
}
