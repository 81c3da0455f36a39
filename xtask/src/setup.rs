//! Installing what the build, tests, demo and benchmark need — only what is
//! missing, so running it again is quick.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{exec, have, output};

/// The linker for the eBPF crate: 0.10.x uses rustc's own LLVM; 0.11+ needs
/// a system LLVM that Debian here lacks; 0.10.0–0.10.1 emit BTF the kernel rejects.
const BPF_LINKER_VERSION: &str = "0.10.4";

/// Debian packages: (command that proves it is installed, or `py:MODULE`
/// for a module of Debian's Python, package).
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("haproxy", "haproxy"),
    ("iperf3", "iperf3"),
    ("sockperf", "sockperf"),
    ("tcpdump", "tcpdump"),
    ("tshark", "tshark"),
    ("prometheus", "prometheus"),
    ("prometheus-node-exporter", "prometheus-node-exporter"),
    ("curl", "curl"),
    ("vsftpd", "vsftpd"),
    ("nginx", "nginx"),
    // Protocol detection (tests/protocol.rs): a server-speaks-first protocol
    // (sshd, ssh-keyscan) and TLS from the application (openssl).
    ("sshd", "openssh-server"),
    ("ssh-keyscan", "openssh-client"),
    ("openssl", "openssl"),
    // The HTTP layer's tests and benchmark (tests/http.rs): h2load (h2
    // load and many streams over one connection), wrk, a WebSocket and a
    // gRPC peer in Debian's Python (`py:` checks a module), redis for the
    // opaque path.
    ("h2load", "nghttp2-client"),
    ("wrk", "wrk"),
    ("py:websockets", "python3-websockets"),
    ("py:grpc", "python3-grpcio"),
    ("redis-server", "redis-server"),
    // The container image (`cargo xtask image`) and its test: buildah builds
    // it, podman runs it with runc (crun refuses hosts with hybrid cgroups),
    // strip takes the debug info out of the binary.
    ("buildah", "buildah"),
    ("podman", "podman"),
    ("runc", "runc"),
    ("strip", "binutils"),
    // `kubectl kustomize` renders deploy/kubernetes (tests/deploy.rs). On the
    // machine image already; listed so a machine without it says so.
    ("kubectl", "kubectl"),
];

/// Validates the rendered manifests against the Kubernetes OpenAPI schemas
/// (tests/deploy.rs), offline: the schemas ship inside the package.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

pub fn run() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    packages()?;
    kubernetes_validate()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args(["+nightly", "component", "list", "--installed"]))
        .context("the nightly toolchain is needed for the eBPF crate: rustup toolchain install nightly")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        exec(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if have("bpf-linker") {
        let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
        if version.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
        eprintln!("xtask: found {} — replacing it with bpf-linker {BPF_LINKER_VERSION}", version.trim());
    }
    exec(Command::new("cargo").args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--force"]))
}

/// Installed for the `python3` on PATH and run as `python3 -m
/// kubernetes_validate`, so the test finds it whatever pip does with scripts.
fn kubernetes_validate() -> Result<()> {
    let version = output(Command::new("python3").args(["-m", "kubernetes_validate", "--version"])).unwrap_or_default();
    if version.trim() == KUBERNETES_VALIDATE_VERSION {
        return Ok(());
    }
    let wanted = format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}");
    exec(Command::new("python3").args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", &wanted]))
        .context("installing kubernetes-validate from PyPI (tests/deploy.rs validates the manifests with it)")
}

fn packages() -> Result<()> {
    let present = |check: &str| match check.strip_prefix("py:") {
        Some(module) => Command::new("/usr/bin/python3")
            .args(["-c", &format!("import {module}")])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        None => have(check),
    };
    let missing: Vec<&str> = PACKAGES.iter().filter(|(check, _)| !present(check)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("missing Debian packages {missing:?}: run as root, or `apt-get install {}`", missing.join(" "));
    }
    exec(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
