//! What a kubelet leaves on a node for a pod, as far as the proxy can see
//! it: a network namespace holding the pod's address and a sandbox
//! ("pause") process in a cgroup named after the pod's UID. The proxy's
//! Kubernetes source finds pods' namespaces through exactly that.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{sandbox::Spawned, wait_for, Sandbox};

/// How the kubelet names a pod's cgroup (its cgroup driver).
#[derive(Clone, Copy, Debug)]
pub enum Driver {
    /// `kubepods/burstable/pod<uid>/<container>`
    Cgroupfs,
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`
    Systemd,
}

/// The pod's sandbox process: `sleep` in the network namespace `netns`
/// (a name under /var/run/netns), in a kubelet-shaped cgroup for `uid`
/// under node `node`'s cgroup (so the node's capture programs apply). It is
/// killed with the sandbox.
pub fn pod_sandbox(sb: &Sandbox, node: usize, uid: &str, netns: &str, driver: Driver) -> Result<Spawned> {
    let base = sb.node_cgroup(node);
    let cgroup = match driver {
        Driver::Cgroupfs => base.join("kubepods/burstable").join(format!("pod{uid}")).join("0123abcd"),
        Driver::Systemd => base
            .join("kubepods.slice/kubepods-besteffort.slice")
            .join(format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")))
            .join("cri-containerd-0123abcd.scope"),
    };
    std::fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg("echo $$ > \"$0/cgroup.procs\" && exec ip netns exec \"$1\" sleep 3600").arg(&cgroup).arg(netns);
    let spawned = sb.spawn("pause", cmd)?;
    let want = std::fs::metadata(Path::new("/var/run/netns").join(netns))?.ino();
    // Ready once `sleep` itself runs in the namespace.
    let ok = wait_for(Duration::from_secs(5), || {
        let link = std::fs::read_link(format!("/proc/{}/ns/net", spawned.pid)).ok()?;
        link.to_string_lossy().contains(&format!("[{want}]")).then_some(())
    });
    if ok.is_none() {
        bail!("the sandbox process of pod {uid} did not start: {}", spawned.stderr());
    }
    Ok(spawned)
}

/// Network namespaces with one address on loopback and nothing else: pods
/// that exist only to be found and meshed (the benchmark's hundreds of
/// local pods). Deleted on drop; named after the sandbox, so a killed run's
/// are removed by the next.
pub struct BareNetns {
    names: Vec<String>,
}

impl BareNetns {
    pub fn new() -> Self {
        Self { names: Vec::new() }
    }

    /// A namespace `<sandbox id>-<name>` holding `ip`/32 on `lo`.
    pub fn add(&mut self, sb: &Sandbox, name: &str, ip: std::net::IpAddr) -> Result<String> {
        let ns = format!("{}-{name}", sb.id);
        run(&["ip", "netns", "add", &ns])?;
        self.names.push(ns.clone());
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        run(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/{prefix}"), "dev", "lo"])?;
        Ok(ns)
    }

    pub fn path(name: &str) -> PathBuf {
        Path::new("/var/run/netns").join(name)
    }
}

impl Default for BareNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BareNetns {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "delete", ns]).output();
        }
    }
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
