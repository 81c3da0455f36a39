//! Finding a pod's network namespace without a CNI plugin: through the
//! processes of the pod, found by the pod's UID in their cgroup path.
//!
//! The kubelet puts every container of a pod under a cgroup named after the
//! pod's UID, in one of these shapes:
//!
//! - cgroupfs driver: `/kubepods/burstable/pod<uid>/<container>`
//! - systemd driver: `/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid with _ for ->.slice/cri-containerd-<id>.scope`
//!   (`crio-<id>.scope` under cri-o)
//! - seen from inside a cgroup namespace: `/../pod<uid>/<container>`
//!
//! One pass over `/proc` (the host's, `--host-proc`) maps pod UIDs to their
//! processes. For a pod, the oldest process's namespace is taken (the
//! sandbox's pause process starts first; a process that joined later —
//! `nsenter`, a debug container — may sit elsewhere), and only if that
//! namespace really holds one of the pod's addresses: a process of pod A
//! placed in pod B's namespace must not mesh A into B's. The namespace is
//! then held open by descriptor; the `/proc/PID` path is never used again
//! (the PID may be reused).

use std::{collections::HashMap, net::IpAddr, os::fd::OwnedFd, path::Path};

use crate::model::HeldNetns;

/// A process of a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub pid: u32,
    /// Start time, in clock ticks after boot: older is smaller.
    pub start: u64,
}

/// Pod UID (lower case, dashes) → its processes, oldest first.
pub type Processes = HashMap<String, Vec<Candidate>>;

/// The pod UID a cgroup path names, if any: the outermost `pod<uid>`
/// segment, the kubelet's — a pod allowed to make cgroups below its own
/// (nested containers) could name another pod's UID further down.
pub fn pod_uid(cgroup_path: &str) -> Option<String> {
    cgroup_path.split('/').find_map(|segment| {
        let segment = segment.strip_suffix(".slice").unwrap_or(segment);
        let at = segment.rfind("pod")?;
        let uid = &segment[at + 3..];
        let uuid_shaped = uid.len() == 36
            && uid.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-' || c == '_',
                _ => c.is_ascii_hexdigit(),
            });
        uuid_shaped.then(|| uid.replace('_', "-").to_ascii_lowercase())
    })
}

/// The pod UID in a `/proc/PID/cgroup` file (v2 `0::PATH` or v1
/// `N:controllers:PATH` lines).
fn uid_of_cgroup_file(text: &str) -> Option<String> {
    text.lines().find_map(|line| pod_uid(line.splitn(3, ':').nth(2)?))
}

/// Field 22 of `/proc/PID/stat`: start time after boot, in clock ticks.
fn start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or
    // parentheses itself: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// One pass over `proc`: every process under a pod's cgroup.
pub fn scan(proc: &Path) -> std::io::Result<Processes> {
    let mut out: Processes = HashMap::new();
    for entry in std::fs::read_dir(proc)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        // Processes end while we read: skip what cannot be read.
        let dir = entry.path();
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else { continue };
        let Some(uid) = uid_of_cgroup_file(&cgroup) else { continue };
        let Some(start) = std::fs::read_to_string(dir.join("stat")).ok().as_deref().and_then(start_time) else {
            continue;
        };
        out.entry(uid).or_default().push(Candidate { pid, start });
    }
    for list in out.values_mut() {
        list.sort_by_key(|c| (c.start, c.pid));
    }
    Ok(out)
}

/// (device, inode) of a namespace descriptor.
fn inode(fd: &OwnedFd) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::File::from(fd.try_clone()?).metadata()?;
    Ok((meta.dev(), meta.ino()))
}

/// Opens `PROC/PID/ns/net`.
fn open_netns(proc: &Path, pid: u32) -> std::io::Result<(OwnedFd, (u64, u64))> {
    let path = proc.join(pid.to_string()).join("ns/net");
    let fd: OwnedFd = std::fs::File::open(path)?.into();
    let ino = inode(&fd)?;
    Ok((fd, ino))
}

/// The namespaces never to mesh a pod into: the host's (PID 1 of `proc`)
/// and the proxy's own.
pub fn forbidden(proc: &Path) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    if let Ok((_, ino)) = open_netns(proc, 1) {
        out.push(ino);
    }
    if let Ok(fd) = std::fs::File::open("/proc/self/ns/net") {
        if let Ok(ino) = inode(&fd.into()) {
            out.push(ino);
        }
    }
    out
}

/// Why a pod's namespace was not found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotFound {
    #[error("no process of the pod is running yet")]
    NoProcess,
    #[error("its processes are in the host's (or the proxy's) network namespace")]
    HostNetns,
    #[error("no network namespace of its processes holds its address {ips:?}: not meshed")]
    WrongAddress { ips: Vec<IpAddr> },
    #[error("checking its network namespace: {0}")]
    Check(String),
}

/// Finds and opens the namespace of a pod whose processes are
/// `candidates` (oldest first) and which should hold one of `ips`.
///
/// Checking addresses enters each namespace on a short-lived thread of its
/// own (a thread that changed namespace never serves anything else).
pub fn resolve(
    proc: &Path,
    candidates: &[Candidate],
    ips: &[IpAddr],
    forbidden: &[(u64, u64)],
) -> Result<(HeldNetns, Candidate), NotFound> {
    if candidates.is_empty() {
        return Err(NotFound::NoProcess);
    }
    let mut tried: Vec<(u64, u64)> = Vec::new();
    let mut opened = Vec::new();
    for c in candidates {
        let Ok((fd, ino)) = open_netns(proc, c.pid) else { continue };
        if forbidden.contains(&ino) || tried.contains(&ino) {
            continue;
        }
        tried.push(ino);
        opened.push((*c, fd, ino));
    }
    if opened.is_empty() {
        return Err(NotFound::HostNetns);
    }
    let ips = ips.to_vec();
    let wanted = ips.clone();
    let checked = std::thread::Builder::new()
        .name("netns-probe".into())
        .spawn(move || {
            // In age order: the first namespace holding the address wins.
            for (witness, fd, ino) in opened {
                let pid = witness.pid;
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    NotFound::Check(format!("entering the namespace of pid {pid}: {e} (needs CAP_SYS_ADMIN)"))
                })?;
                let held = nix::ifaddrs::getifaddrs()
                    .map_err(|e| NotFound::Check(format!("listing addresses: {e}")))?
                    .filter_map(|a| a.address)
                    .filter_map(|a| match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
                        (Some(v4), _) => Some(IpAddr::from(v4.ip())),
                        (_, Some(v6)) => Some(IpAddr::from(v6.ip())),
                        _ => None,
                    })
                    .any(|ip| wanted.contains(&ip));
                if held {
                    return Ok((HeldNetns::new(fd, ino, &format!("/proc/{pid}/ns/net")), witness));
                }
            }
            Err(NotFound::WrongAddress { ips: wanted })
        })
        .map_err(|e| NotFound::Check(format!("starting the probe thread: {e}")))?;
    checked.join().unwrap_or_else(|_| Err(NotFound::Check("the probe thread failed".into())))
}

/// Whether the process a pod's namespace was taken from still runs (the
/// same process: same start time) in that namespace. When the sandbox is
/// recreated — even with the same address — it is not, and the pod's new
/// namespace must be looked for. Two small reads per pod, no scan.
pub fn still_holds(proc: &Path, witness: Candidate, inode: (u64, u64)) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dir = proc.join(witness.pid.to_string());
    let same_process =
        std::fs::read_to_string(dir.join("stat")).ok().as_deref().and_then(start_time) == Some(witness.start);
    same_process && std::fs::metadata(dir.join("ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == inode)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b7c8f0e-1d2a-4b3c-9d8e-7f6a5b4c3d2e";

    #[test]
    fn cgroup_path_forms() {
        let forms = [
            "/kubepods/burstable/pod0b7c8f0e-1d2a-4b3c-9d8e-7f6a5b4c3d2e/4f1c2d3e",
            "/kubepods/pod0b7c8f0e-1d2a-4b3c-9d8e-7f6a5b4c3d2e/4f1c2d3e",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b7c8f0e_1d2a_4b3c_9d8e_7f6a5b4c3d2e.slice/cri-containerd-4f1c.scope",
            "/kubepods.slice/kubepods-pod0b7c8f0e_1d2a_4b3c_9d8e_7f6a5b4c3d2e.slice/crio-4f1c.scope",
            "/../pod0b7c8f0e-1d2a-4b3c-9d8e-7f6a5b4c3d2e/4f1c2d3e",
            "/KUBEPODS/besteffort/pod0B7C8F0E-1D2A-4B3C-9D8E-7F6A5B4C3D2E/x",
        ];
        for f in forms {
            assert_eq!(pod_uid(f).as_deref(), Some(UID), "{f}");
        }
        // A cgroup a pod made below its own, named after another pod.
        let nested = format!("/kubepods/pod{UID}/c/pod11111111-2222-3333-4444-555555555555/x");
        assert_eq!(pod_uid(&nested).as_deref(), Some(UID));
        for f in ["/", "/system.slice/sshd.service", "/kubepods/burstable/podnotauid/x", "/user.slice/pod.scope"] {
            assert_eq!(pod_uid(f), None, "{f}");
        }
        let file = format!("12:memory:/kubepods/pod{UID}/c\n0::/kubepods/pod{UID}/c\n");
        assert_eq!(uid_of_cgroup_file(&file).as_deref(), Some(UID));
    }

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "1234 (a) b) (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time(stat), Some(987_654));
    }
}
