//! Building the kernel programs (nightly, build-std, bpf-linker) and the proxy.

use anyhow::Result;

use crate::util::{cargo, exec, workspace_root};

/// `cargo +nightly SUBCOMMAND` in ebpf/, for the BPF target, sharing the
/// workspace's target directory.
pub fn ebpf_cargo(subcommand: &str) -> std::process::Command {
    let root = workspace_root();
    let mut cmd = std::process::Command::new("cargo");
    cmd.current_dir(root.join("ebpf"))
        // The outer cargo's variables would pin the stable toolchain.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .args(["+nightly", subcommand, "--release", "-Z", "build-std=core", "--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        .arg(root.join("target"));
    cmd
}

pub fn ebpf() -> Result<()> {
    crate::setup::run()?;
    exec(&mut ebpf_cargo("build"))
}

/// The eBPF object, the release proxy and the in-pod test tools.
pub fn all() -> Result<()> {
    ebpf()?;
    exec(cargo().args(["build", "--release", "-p", "outrigger"]))?;
    exec(cargo().args(["build", "-p", "outrigger-e2e", "--bins"]))
}

/// Points the test harness at the binaries `all` built.
pub fn export_binaries() {
    let target = workspace_root().join("target");
    // Single-threaded here: nothing else reads the environment concurrently.
    std::env::set_var("OUTRIGGER_BIN", target.join("release/outrigger"));
    std::env::set_var("OUTRIGGER_PODTOOL", target.join("debug/outrigger-podtool"));
    std::env::set_var("OUTRIGGER_HOSTILE", target.join("debug/outrigger-hostile"));
}
