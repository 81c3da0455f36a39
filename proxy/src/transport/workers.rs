//! Connection workers: the main runtime plus threads that each run their
//! own single-threaded event loop. Accepted connections are dealt to them
//! in turn and stay where they land: a connection's sockets are registered
//! with its worker's own epoll and its task is never stolen by another
//! thread (HAProxy's and Envoy's model).
//!
//! Why not more workers in tokio's multi-threaded runtime: there the
//! workers share one I/O driver and steal each other's tasks, so a
//! connection's wake-ups hop threads (a futex wake-up and a migration
//! each). Measured on 2 CPUs (`cargo xtask bench --only mesh`), a second
//! tokio worker raised the plain hop's CPU per new connection from 107–120
//! to 117–133 µs and made its 16-connection p99 worse than HAProxy's
//! (0.66× as good, against 1.13× with one worker).

use std::{
    cell::Cell,
    future::Future,
    io,
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use tokio::{net::TcpStream, runtime::Handle, sync::oneshot};
use tokio_util::task::TaskTracker;

thread_local! {
    /// Which connection thread this is: 0 on the main runtime's threads.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The calling thread's connection-thread index (0: the main runtime), for
/// state kept per thread because its sockets belong to that thread's event
/// loop (the HTTP layer's upstream pools).
pub fn worker_index() -> usize {
    INDEX.with(Cell::get)
}

#[derive(Debug, thiserror::Error)]
pub enum WorkersError {
    #[error("starting connection thread {index}: {source} (lower --connection-threads?)")]
    Start {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error("connection thread {index} exited while starting")]
    Exited { index: usize },
}

/// Where accepted connections are served.
#[derive(Debug)]
pub struct Workers {
    /// The runtime that made this first, then each thread's.
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Every connection task, so shutdown can wait for them to drain.
    tasks: TaskTracker,
    /// Dropping these ends the threads' event loops.
    _stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// `threads` connection threads in all: the calling runtime and
    /// `threads - 1` new ones, their connections tracked by `tasks`. Must
    /// be called inside a runtime.
    pub fn start(threads: usize, tasks: TaskTracker) -> Result<Self, WorkersError> {
        let mut handles = vec![Handle::current()];
        let mut stops = Vec::new();
        for index in 1..threads.max(1) {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("outrigger-conn{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(runtime.handle().clone()));
                    // Serves what is spawned onto it until the workers are dropped.
                    runtime.block_on(async {
                        let _ = stop_rx.await;
                    });
                })
                .map_err(|source| WorkersError::Start { index, source })?;
            match handle_rx.recv() {
                Ok(Ok(handle)) => handles.push(handle),
                Ok(Err(source)) => return Err(WorkersError::Start { index, source }),
                Err(_) => return Err(WorkersError::Exited { index }),
            }
            stops.push(stop_tx);
        }
        Ok(Self { handles, next: AtomicUsize::new(0), tasks, _stops: stops })
    }

    /// The tracker of connection tasks (for tasks a connection spawns).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Serves an accepted connection on the next worker in turn: `serve`
    /// gets it registered with that worker's event loop. Tracked (shutdown
    /// waits for it). A connection that cannot be registered (out of memory
    /// for the epoll entry) is dropped and logged: an outbound client or a
    /// plaintext arrival is reset then (its listener armed it, see
    /// `netns::sockets::accept_reset_on_close`); a tunnel arrival is closed.
    pub fn serve<F, Fut>(&self, stream: std::net::TcpStream, peer: SocketAddr, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        let task = self.tasks.track_future(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => {
                    crate::warn_throttled!(peer = %peer, error = %e, "could not register an accepted connection; it is dropped");
                }
            }
        });
        drop(self.handles[i].spawn(task));
    }
}

/// Resets an accepted connection that is refused before it is served.
pub fn reset(stream: std::net::TcpStream) {
    super::io::reset_on_close(&stream, true);
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn connections_are_dealt_in_turn_to_threads_of_their_own() {
        let tasks = TaskTracker::new();
        let workers = Workers::start(3, tasks.clone()).expect("workers");
        assert_eq!(workers.count(), 3);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (names_tx, mut names_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for _ in 0..6 {
            let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (accepted, peer) = listener.accept().expect("accept");
            accepted.set_nonblocking(true).expect("nonblocking");
            let names = names_tx.clone();
            workers.serve(accepted, peer, move |mut stream| async move {
                let name = std::thread::current().name().unwrap_or_default().to_string();
                let _ = names.send(format!("{name}/{}", worker_index()));
                let _ = stream.write_all(b"served").await;
            });
            let mut buf = [0u8; 6];
            client.read_exact(&mut buf).await.expect("served");
            clients.push(client);
        }
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(names_rx.recv().await.expect("a name"));
        }
        let threads: HashSet<&String> = seen.iter().collect();
        assert_eq!(threads.len(), 3, "each worker serves its turn on its own thread: {seen:?}");
        assert_eq!(seen[0], seen[3], "the turn comes round again: {seen:?}");
        assert!(seen[1].starts_with("outrigger-conn"), "{seen:?}");
        let indexes: HashSet<&str> = seen.iter().filter_map(|s| s.rsplit('/').next()).collect();
        assert_eq!(indexes, HashSet::from(["0", "1", "2"]), "each thread knows its index: {seen:?}");
        tasks.close();
        tasks.wait().await;
    }
}
