//! The whole test suite, as CI runs it.

use std::process::Command;

use anyhow::Result;

use crate::{
    build::ebpf_cargo,
    util::{cargo, exec, workspace_root},
};

pub fn run(extra: &[String]) -> Result<()> {
    crate::build::all()?;
    exec(cargo().args(["fmt", "--all", "--check"]))?;
    exec(
        Command::new("cargo")
            .current_dir(workspace_root().join("ebpf"))
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["+nightly", "fmt", "--check"]),
    )?;
    // Before clippy and the tests: a module cycle is cheap to find and points at the fix.
    crate::deps::check(&workspace_root())?;
    exec(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    exec(ebpf_cargo("clippy").args(["--", "-D", "warnings"]))?;
    crate::build::export_binaries();
    // tests/deploy.rs runs the image; tests cannot build it (no cargo or root steps inside tests).
    crate::image::build()?;
    crate::image::export();
    exec(cargo().args(["test", "--workspace"]).args(extra))
}
