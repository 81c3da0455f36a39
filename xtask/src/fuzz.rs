//! `cargo xtask fuzz`: the inbound tunnel port's parsing and the mesh-file parser under libFuzzer
//! (cargo fuzz, nightly, AddressSanitizer), for a bounded time per target.

use std::process::Command;

use anyhow::Result;

use crate::util::{exec, have, workspace_root};

/// The fuzz targets in fuzz/fuzz_targets.
const TARGETS: &[&str] = &["hbone_connect", "tls_handshake", "mesh_file"];

#[derive(clap::Args, Debug)]
pub struct FuzzArgs {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    crate::setup::run()?;
    if !have("cargo-fuzz") {
        exec(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz = workspace_root().join("fuzz");
    for target in TARGETS {
        let corpus = fuzz.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        exec(
            Command::new("cargo")
                .current_dir(&fuzz)
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO")
                .env_remove("RUSTC")
                .args(["+nightly", "fuzz", "run", target])
                .arg(&corpus)
                .arg(fuzz.join("seeds").join(target))
                .arg("--")
                .arg(format!("-max_total_time={}", args.seconds))
                .arg("-timeout=10"),
        )?;
        eprintln!("xtask: fuzz target {target}: {} s, no crash", args.seconds);
    }
    Ok(())
}
