//! Workloads: meshed pods, on this node or another.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
};

use super::PodKey;

/// How the proxy reaches a local pod's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsRef {
    /// A namespace file: `/var/run/netns/NAME` or `/proc/PID/ns/net`,
    /// opened when the pod is meshed (the mesh file names these).
    Path(PathBuf),
    /// A namespace already open: found through a process of the pod and
    /// checked to hold the pod's address (the Kubernetes source). Held by
    /// descriptor, because the process's `/proc/PID` path may name another
    /// process's namespace once the PID is reused.
    Held(HeldNetns),
}

impl std::fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Held(h) => write!(f, "{}", h.origin),
        }
    }
}

/// An open network-namespace descriptor. Two are equal when they hold the
/// same namespace (device and inode), whatever process they came through.
#[derive(Debug, Clone)]
pub struct HeldNetns {
    fd: Arc<OwnedFd>,
    /// (device, inode) of the namespace.
    pub inode: (u64, u64),
    /// Where it was found, for messages: `/proc/PID/ns/net`.
    pub origin: Arc<str>,
}

impl HeldNetns {
    pub fn new(fd: OwnedFd, inode: (u64, u64), origin: &str) -> Self {
        Self { fd: Arc::new(fd), inode, origin: origin.into() }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl PartialEq for HeldNetns {
    fn eq(&self, other: &Self) -> bool {
        self.inode == other.inode
    }
}

impl Eq for HeldNetns {}

/// A meshed pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Unique across the pod's lifetimes (Kubernetes `metadata.uid`): a pod
    /// recreated under the same name is a different workload.
    pub uid: Arc<str>,
    pub key: PodKey,
    pub service_account: Arc<str>,
    /// The node it runs on, when known.
    pub node: Option<Arc<str>>,
    /// Its own addresses.
    pub ips: Vec<IpAddr>,
    /// Labels, for policy selectors.
    pub labels: BTreeMap<String, String>,
    /// Set for pods of this node: the proxy captures and serves those.
    pub netns: Option<NetnsRef>,
}

impl Workload {
    /// A pod of this node (the proxy captures and serves it).
    pub fn is_local(&self) -> bool {
        self.netns.is_some()
    }

    /// The pod's address of the given family, if it has one.
    pub fn ip_of_family(&self, v6: bool) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| ip.is_ipv6() == v6)
    }
}
