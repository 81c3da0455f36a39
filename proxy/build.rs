//! Embeds the kernel programs into the proxy binary.
//!
//! The eBPF object is built by `cargo xtask build-ebpf` (it needs nightly,
//! rust-src and bpf-linker, which a plain `cargo build` cannot provide). When
//! it is missing, the proxy still builds — unit tests need no kernel — and
//! `outrigger run` says how to get the programs.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let default = manifest.join("../target/bpfel-unknown-none/release/outrigger-ebpf");
    println!("cargo:rerun-if-env-changed=OUTRIGGER_EBPF_OBJECT");
    let object = env::var_os("OUTRIGGER_EBPF_OBJECT").map(PathBuf::from).unwrap_or(default);
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo::rustc-check-cfg=cfg(outrigger_ebpf_embedded)");
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("outrigger-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => {
            fs::write(&out, bytes).expect("write eBPF object to OUT_DIR");
            println!("cargo:rustc-cfg=outrigger_ebpf_embedded");
        }
        Err(_) => fs::write(&out, b"").expect("write placeholder to OUT_DIR"),
    }
}
