//! Test harness for Outrigger's end-to-end tests, demo and benchmark.
//!
//! A [`Sandbox`] is a simulated node made of network namespaces: a node
//! namespace holding a bridge, and pods joined to it by veth pairs. Every
//! address lives inside namespaces the sandbox made, with no route out. All
//! processes started for a sandbox run in its own cgroup, which is where the
//! proxy under test attaches its programs. Dropping the sandbox kills its
//! processes and deletes its namespaces and cgroup; a sandbox left behind by
//! a killed run is removed by the next run.
#![forbid(unsafe_code)]

pub mod hbone;
pub mod http;
pub mod kubeapi;
pub mod kubelet;
pub mod mesh;
pub mod metrics;
pub mod prometheus;
pub mod proxy;
pub mod sandbox;
pub mod servers;
pub mod traffic;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

pub use metrics::MetricsText;
pub use proxy::ProxyProcess;
pub use sandbox::{Pod, Sandbox};

/// Polls `check` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A binary of this workspace: `$env` if set, else found next to the running
/// executable (target/<profile>/ or target/<profile>/deps/).
pub fn workspace_binary(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    PathBuf::from(name)
}

/// The proxy binary under test (`OUTRIGGER_BIN`, set by `cargo xtask test`).
pub fn outrigger_bin() -> PathBuf {
    workspace_binary("OUTRIGGER_BIN", "outrigger")
}

/// The in-pod test application (`OUTRIGGER_PODTOOL`).
pub fn podtool_bin() -> PathBuf {
    workspace_binary("OUTRIGGER_PODTOOL", "outrigger-podtool")
}

/// The hostile-client tool of the hardening tests (`OUTRIGGER_HOSTILE`).
pub fn hostile_bin() -> PathBuf {
    workspace_binary("OUTRIGGER_HOSTILE", "outrigger-hostile")
}

/// Makes the calling process a pod process: joins `cgroup` (so the kernel
/// programs attached there see it) and then the network namespace at
/// `netns` (the calling thread's; call it before starting others).
pub fn enter_pod(cgroup: Option<&str>, netns: Option<&str>) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = cgroup {
        let procs = std::path::Path::new(dir).join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string()).with_context(|| format!("joining {dir}"))?;
    }
    if let Some(path) = netns {
        let ns = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
    }
    Ok(())
}

/// Fails with a clear message when not root: these tests need the kernel.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "end-to-end tests need root (network namespaces, cgroups, eBPF): run `sudo cargo xtask test`"
    );
}
