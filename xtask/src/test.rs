//! The whole test suite, as CI runs it.

use std::process::Command;

use anyhow::Result;

use crate::util::{cargo, exec, workspace_root};

pub fn run(extra: &[String]) -> Result<()> {
    crate::build::all()?;
    let root = workspace_root();
    exec(cargo().args(["fmt", "--all", "--check"]))?;
    exec(
        Command::new("cargo")
            .current_dir(root.join("ebpf"))
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["+nightly", "fmt", "--check"]),
    )?;
    exec(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    exec(
        Command::new("cargo")
            .current_dir(root.join("ebpf"))
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .args(["+nightly", "clippy", "--release", "-Z", "build-std=core", "--target", "bpfel-unknown-none"])
            .arg("--target-dir")
            .arg(root.join("target"))
            .args(["--", "-D", "warnings"]),
    )?;
    crate::build::export_binaries();
    exec(cargo().args(["test", "--workspace"]).args(extra))
}
