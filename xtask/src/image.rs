//! `cargo xtask image`: the proxy as an OCI image, `outrigger:dev`, for the
//! DaemonSet in `deploy/kubernetes`.
//!
//! Built from `scratch` with Debian's buildah into root's containers-storage
//! (which podman reads too: `podman run outrigger:dev --version`). No
//! registry and no base image are involved, so it works offline. The image
//! holds exactly:
//!
//! - `/usr/local/bin/outrigger`: the release binary with the kernel programs
//!   embedded, debug info stripped (symbols stay, for backtraces);
//! - the shared libraries it is linked against, as `ldd` lists them, and the
//!   dynamic loader, at the paths the binary asks for.
//!
//! Nothing else: no shell, no CA bundle (the proxy talks only to the API
//! server, verified with the in-cluster CA, and to other proxies, verified
//! with the mesh's trust bundle). The binary is not linked statically: that
//! takes a second full release build (`crt-static` with an explicit
//! target), and the glibc libraries are ~3 MB.
//!
//! Entrypoint `/usr/local/bin/outrigger`, default arguments `run`; the
//! DaemonSet passes `run` and its flags as `args`.
//!
//! A rebuild replaces the tag and removes the image it replaced; a working
//! container left by an interrupted run is removed by the next one.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::util::{describe, exec, output, workspace_root};

/// The image's name in local containers-storage (`localhost/outrigger:dev`).
pub const TAG: &str = "outrigger:dev";

/// The environment variable through which `cargo xtask test` tells
/// `tests/deploy.rs` which image to run.
pub const ENV: &str = "OUTRIGGER_IMAGE";

/// buildah's working container; fixed, so a leftover is found and removed.
const WORKING_CONTAINER: &str = "outrigger-image-build";

/// Where the binary sits in the image; also the entrypoint.
const BINARY_IN_IMAGE: &str = "usr/local/bin/outrigger";

/// Builds the kernel programs and the release proxy, then the image.
pub fn run() -> Result<()> {
    crate::build::all()?;
    build()
}

/// Builds the image from the release binary `crate::build::all` made.
pub fn build() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("`cargo xtask image` runs buildah as root (root's containers-storage, shared with podman)");
    }
    let binary = workspace_root().join("target/release/outrigger");
    if !binary.is_file() {
        bail!("{} is missing: run `cargo xtask build` first", binary.display());
    }
    let version = output(Command::new(&binary).arg("--version"))?.trim().to_owned();
    let rootfs = workspace_root().join("target/image/rootfs");
    stage(&binary, &rootfs)?;

    // A run killed between `from` and `commit` leaves its working container.
    discard_working_container();
    let previous = image_id(TAG);
    exec(
        Command::new("buildah").args(["from", "--quiet", "--name", WORKING_CONTAINER, "scratch"]).stdout(Stdio::null()),
    )?;
    let committed = configure_and_commit(&rootfs, &version);
    if committed.is_err() {
        discard_working_container();
    }
    let id = committed?;
    if let Some(old) = previous.filter(|old| *old != id) {
        // Untagged by the commit; keep storage from growing with every build.
        // It may still be used by a container: then it stays, harmlessly.
        let _ = Command::new("buildah").args(["rmi", &old]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
    eprintln!("xtask: image {TAG} ({}): {version}, {}", short(&id), describe_size(&rootfs)?);
    Ok(())
}

/// Tells the tests which image to run.
pub fn export() {
    // Single-threaded here: nothing else reads the environment concurrently.
    std::env::set_var(ENV, TAG);
}

/// Lays out the image's files under `rootfs`: the stripped binary and the
/// libraries and loader `ldd` names, each at its own absolute path.
fn stage(binary: &Path, rootfs: &Path) -> Result<()> {
    if rootfs.exists() {
        fs::remove_dir_all(rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    }
    let target = rootfs.join(BINARY_IN_IMAGE);
    create_parent(&target)?;
    exec(Command::new("strip").arg("--strip-debug").arg("-o").arg(&target).arg(binary))?;
    let listing = output(Command::new("ldd").arg(binary))?;
    for library in shared_libraries(&listing)? {
        let relative =
            library.strip_prefix("/").with_context(|| format!("ldd gave a relative path: {}", library.display()))?;
        let to = rootfs.join(relative);
        create_parent(&to)?;
        // fs::copy follows symlinks: the image gets the file under the name the loader looks for.
        fs::copy(&library, &to).with_context(|| format!("copying {} to {}", library.display(), to.display()))?;
    }
    Ok(())
}

fn create_parent(path: &Path) -> Result<()> {
    let parent = path.parent().with_context(|| format!("{} has no parent", path.display()))?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))
}

/// The absolute paths of the shared objects in `ldd` output, loader
/// included; the vDSO (no file) is left out. A library `ldd` cannot find
/// is an error, not a smaller image that fails at run time.
fn shared_libraries(ldd: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in ldd.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") {
            continue;
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, or the
        // loader on its own: `/lib64/ld-linux-x86-64.so.2 (0x...)`.
        let resolved = line.split_once("=>").map_or(line, |(_, right)| right.trim());
        if resolved.starts_with("not found") {
            bail!("ldd: a library of the proxy is missing: {line}");
        }
        let path = resolved.split(" (").next().unwrap_or(resolved).trim();
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        } else if !line.starts_with("linux-vdso") && !line.starts_with("linux-gate") {
            bail!("ldd: cannot read the line {line:?}");
        }
    }
    if libraries.is_empty() && !ldd.contains("statically linked") {
        bail!("ldd listed no libraries and no loader:\n{ldd}");
    }
    Ok(libraries)
}

/// Copies the staged files in, sets the entrypoint and labels, commits.
/// Returns the new image's ID.
fn configure_and_commit(rootfs: &Path, version: &str) -> Result<String> {
    exec(
        Command::new("buildah").args(["copy", "--quiet", WORKING_CONTAINER]).arg(rootfs).arg("/").stdout(Stdio::null()),
    )?;
    let entrypoint = format!("[\"/{BINARY_IN_IMAGE}\"]");
    exec(Command::new("buildah").args([
        "config",
        "--entrypoint",
        &entrypoint,
        "--cmd",
        "run",
        "--env",
        "PATH=/usr/local/bin",
        "--workingdir",
        "/",
        "--port",
        "15000/tcp",
        "--label",
        "org.opencontainers.image.title=outrigger",
        "--label",
        &format!("org.opencontainers.image.version={}", version.trim_start_matches("outrigger ")),
        "--label",
        "org.opencontainers.image.description=Outrigger per-node service-mesh proxy",
        "--label",
        "org.opencontainers.image.licenses=Apache-2.0",
        WORKING_CONTAINER,
    ]))?;
    let mut commit = Command::new("buildah");
    commit.args(["commit", "--quiet", "--rm", "--format", "oci", WORKING_CONTAINER, TAG]);
    eprintln!("xtask: $ {}", describe(&commit));
    let id = output(&mut commit)?.trim().to_owned();
    if id.is_empty() {
        bail!("buildah commit printed no image ID");
    }
    Ok(id)
}

/// The ID of the image tagged `tag`, if there is one.
fn image_id(tag: &str) -> Option<String> {
    let out = Command::new("buildah").args(["images", "--quiet", "--no-trunc", tag]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.lines().next()?.trim().trim_start_matches("sha256:");
    (out.status.success() && !id.is_empty()).then(|| id.to_owned())
}

fn discard_working_container() {
    let _ =
        Command::new("buildah").args(["rm", WORKING_CONTAINER]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// "N files, M MiB" of the staged tree: what the image's one layer holds.
fn describe_size(rootfs: &Path) -> Result<String> {
    fn walk(dir: &Path, files: &mut u64, bytes: &mut u64) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let meta = entry.metadata().with_context(|| format!("reading {}", entry.path().display()))?;
            if meta.is_dir() {
                walk(&entry.path(), files, bytes)?;
            } else {
                *files += 1;
                *bytes += meta.len();
            }
        }
        Ok(())
    }
    let (mut files, mut bytes) = (0, 0);
    walk(rootfs, &mut files, &mut bytes)?;
    Ok(format!("{files} files, {:.1} MiB", bytes as f64 / (1024.0 * 1024.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_listing_gives_libraries_and_loader() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd1c5f2000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0c1a000000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c19e00000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1a200000)\n";
        let libraries = shared_libraries(ldd).expect("parses");
        assert_eq!(
            libraries,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn missing_library_is_an_error() {
        let ldd = "\tlibfoo.so.1 => not found\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f0c1a200000)\n";
        let err = shared_libraries(ldd).expect_err("a missing library must fail the build").to_string();
        assert!(err.contains("libfoo.so.1"), "{err}");
    }

    #[test]
    fn static_binary_needs_no_libraries() {
        assert!(shared_libraries("\tstatically linked\n").expect("parses").is_empty());
    }

    #[test]
    fn unreadable_listing_is_an_error() {
        assert!(shared_libraries("").is_err());
        assert!(shared_libraries("\tsomething else entirely\n").is_err());
    }
}
