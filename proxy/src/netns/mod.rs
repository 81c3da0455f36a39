//! Acting inside a pod's network namespace.
//!
//! The proxy lives in the host netns. Listeners and upstream sockets must be
//! created inside the pod's netns (a socket stays in the netns it was made
//! in), and `setns` applies to the calling thread only — so each pod gets a
//! small dedicated thread that entered its netns once and makes sockets on
//! request; the async runtime's threads never change namespace.
#![forbid(unsafe_code)]

mod delivery;
pub mod sockets;
mod spare;

pub use spare::SpareSockets;

use std::{
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
};

use nix::sched::CloneFlags;
use tokio::sync::{mpsc, oneshot};

/// `statfs` magic of nsfs: namespace files are on it.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Requests queued for a pod's netns thread. Bounded: callers wait rather
/// than pile up work.
const QUEUE_DEPTH: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "opening netns {path}: {source} (is the pod running? for `ip netns` pods the file is /var/run/netns/NAME)"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace file (expected nsfs, e.g. /var/run/netns/NAME or /proc/PID/ns/net)")]
    NotANetns { path: PathBuf },
    #[error("entering netns {path}: {source} (the proxy needs CAP_SYS_ADMIN)")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("reading the netns cookie of {path}: {source} (needs Linux 5.14+)")]
    Cookie {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the netns thread for {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the netns thread for {path} has stopped")]
    Stopped { path: PathBuf },
    #[error("{what} in the pod's netns: {reason} (the proxy needs CAP_NET_ADMIN)")]
    Routing { what: &'static str, reason: String },
}

type Job = Box<dyn FnOnce() + Send>;

/// A handle on a pod's network namespace and the thread that works in it.
/// The thread ends when the last handle is dropped.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    cookie: u64,
    /// (device, inode) of the namespace: what tells a namespace recreated
    /// at the same path from the one opened.
    inode: (u64, u64),
    jobs: mpsc::Sender<Job>,
}

/// (device, inode) of the namespace a netns file refers to now.
pub fn inode_of(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

impl Netns {
    /// Opens the pod's netns (a file, or a descriptor already held), starts
    /// its thread and reads its cookie.
    pub fn open(netns: &crate::model::NetnsRef, thread_name: &str) -> Result<Self, NetnsError> {
        match netns {
            crate::model::NetnsRef::Path(path) => Self::open_path(path, thread_name),
            crate::model::NetnsRef::Held(held) => {
                let path = PathBuf::from(&*held.origin);
                let fd =
                    held.fd().try_clone_to_owned().map_err(|source| NetnsError::Open { path: path.clone(), source })?;
                Self::start(std::fs::File::from(fd), held.inode, &path, thread_name)
            }
        }
    }

    /// Opens a netns file.
    fn open_path(path: &Path, thread_name: &str) -> Result<Self, NetnsError> {
        let open_err = |source| NetnsError::Open { path: path.to_path_buf(), source };
        // A FIFO or device at the path must not hang the reconciler: check
        // the type first, and open without blocking in any case.
        let kind = std::fs::metadata(path).map_err(open_err)?.file_type();
        if !kind.is_file() {
            return Err(NetnsError::NotANetns { path: path.to_path_buf() });
        }
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path)
                .map_err(open_err)?
        };
        let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| open_err(e.into()))?;
        if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
            return Err(NetnsError::NotANetns { path: path.to_path_buf() });
        }
        let inode = {
            use std::os::unix::fs::MetadataExt;
            let meta = file.metadata().map_err(open_err)?;
            (meta.dev(), meta.ino())
        };
        Self::start(file, inode, path, thread_name)
    }

    /// Starts the thread that enters `file`'s namespace and serves jobs.
    fn start(file: std::fs::File, inode: (u64, u64), path: &Path, thread_name: &str) -> Result<Self, NetnsError> {
        let (jobs, mut queue) = mpsc::channel::<Job>(QUEUE_DEPTH);
        let (ready_tx, ready_rx) = std_mpsc::sync_channel(1);
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name(thread_name.chars().take(15).collect())
            .spawn(move || {
                let entered = nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetnsError::Enter { path: thread_path.clone(), source })
                    .and_then(|()| {
                        sockets::current_netns_cookie()
                            .map_err(|source| NetnsError::Cookie { path: thread_path.clone(), source })
                    });
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                drop(file);
                while let Some(job) = queue.blocking_recv() {
                    job();
                }
            })
            .map_err(|source| NetnsError::Spawn { path: path.to_path_buf(), source })?;
        let cookie = ready_rx.recv().map_err(|_| NetnsError::Stopped { path: path.to_path_buf() })??;
        Ok(Self { path: path.to_path_buf(), cookie, inode, jobs })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (device, inode) of the namespace this handle holds.
    pub fn inode(&self) -> (u64, u64) {
        self.inode
    }

    /// A handle with no thread behind it, for tests that never make sockets.
    #[cfg(test)]
    pub fn detached(path: &Path, cookie: u64) -> Self {
        let (jobs, _) = mpsc::channel(1);
        Self { path: path.to_path_buf(), cookie, inode: (0, cookie), jobs }
    }

    /// The netns cookie: the key the kernel programs know this pod by.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Queues `f` on the thread inside the namespace without waiting for it
    /// (fails only when the queue is full or the thread has stopped).
    pub fn spawn<F>(&self, f: F) -> Result<(), NetnsError>
    where
        F: FnOnce() + Send + 'static,
    {
        self.jobs.try_send(Box::new(f)).map_err(|_| NetnsError::Stopped { path: self.path.clone() })
    }

    /// Runs `f` on the thread inside the namespace and returns its result.
    pub async fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let stopped = || NetnsError::Stopped { path: self.path.clone() };
        self.jobs.send(job).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }
}
