//! `cargo xtask`: everything around the code — toolchain set-up, the eBPF
//! build, the container image, the demo, the test suite and the benchmark. Each command installs
//! what it needs first, so two commands do all set-up on a fresh machine.
#![forbid(unsafe_code)]

mod bench;
mod build;
mod demo;
mod deps;
mod fuzz;
mod image;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Outrigger's build, demo, test and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: nightly rust-src, bpf-linker 0.10.4, Debian packages, kubernetes-validate (PyPI).
    Setup,
    /// Build the kernel programs (target/bpfel-unknown-none/release/outrigger-ebpf).
    BuildEbpf,
    /// Build the kernel programs and the proxy (release).
    Build,
    /// Set up a small simulated node, run the proxy, drive traffic, show what happened, tear down.
    Demo,
    /// fmt check, clippy -D warnings, unit tests and the end-to-end tests (needs root). CI runs this.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Measure latency and throughput: direct vs Outrigger vs HAProxy, on one topology, in one run.
    Bench(bench::BenchArgs),
    /// Build the OCI image outrigger:dev from scratch with buildah (root; no registry): the release proxy and its shared libraries.
    Image,
    /// Fuzz the tunnel port (TLS handshake, HTTP/2 CONNECT) and the mesh-file parser for a bounded time (cargo fuzz, nightly).
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build::ebpf(),
        Task::Build => build::all(),
        Task::Demo => demo::run(),
        Task::Test { args } => test::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::Image => image::run(),
        Task::Fuzz(args) => fuzz::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
