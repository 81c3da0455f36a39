//! Connection workers: the main runtime, or threads that each run their
//! own single-threaded event loop. Each connection thread accepts on every
//! pod listener itself (one shared socket, registered with every thread's
//! epoll) and serves what it accepts: a connection's sockets are
//! registered with its worker's own epoll and its task is never stolen by
//! another thread (HAProxy's and Envoy's model). Only a thread with more
//! live connections than another by more than [`SLACK`] hands a new one
//! over, so long-lived connections spread evenly.
//!
//! Why not accept on the main runtime and deal connections to the threads
//! in turn (the design before): every connection then cost the accepting
//! thread a wake-up and the serving thread a cross-thread hand-over
//! (eventfd write, another wake-up). Measured on 2 CPUs, plain-hop new
//! connections (`cargo xtask bench --only mesh`, 3 rounds): 97.5 µs of
//! proxy CPU per connection and 0.85-0.88x HAProxy's rate dealt from the
//! main runtime, 85 µs when half the connections were served on the
//! thread that accepted them.
//!
//! Why one shared listener and not a `SO_REUSEPORT` listener per thread:
//! tried, the kernel spreads connects over such listeners by their
//! addresses' hash, so a few long-lived connections land unevenly (the
//! plain hop's 8-stream iperf3 fell from 1.25-1.34x HAProxy's to
//! 0.97-1.11x), and nothing can move a connection the hash misplaced. A
//! shared listener wakes every idle thread for a connect (one accept finds
//! it, the others find nothing): a wasted wake-up per idle thread, which a
//! busy thread does not pay.
//!
//! Why not more workers in tokio's multi-threaded runtime: there the
//! workers share one I/O driver and steal each other's tasks, so a
//! connection's wake-ups hop threads (a futex wake-up and a migration
//! each). Measured on 2 CPUs (`cargo xtask bench --only mesh`), a second
//! tokio worker raised the plain hop's CPU per new connection from 107–120
//! to 117–133 µs and made its 16-connection p99 worse than HAProxy's
//! (0.66× as good, against 1.13× with one worker).
//!
//! Why pin them (when the process has exactly one CPU per thread): two
//! busy connection threads that the kernel places on the same CPU take
//! turns at its tick (4 ms at HZ=250), and every connection of the one
//! waiting stalls that long. Seen with `perf sched` on 2 CPUs, HTTP/1.1
//! with 16 connections: both threads on CPU 0 alternating in 4 ms slices,
//! each waiting up to 8 ms, the p99 at 2.1x HAProxy's; pinned one per CPU,
//! 0.81x.

use std::{
    cell::Cell,
    fmt::Display,
    future::Future,
    io,
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use tokio::{net::TcpStream, runtime::Handle, sync::oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// A connection thread keeps what it accepts unless it serves more than
/// this many connections more than the least busy thread. One let a
/// thread that wakes first keep two of every three connections arriving
/// one after another (iperf3's streams): plain 8-stream iperf3 fell to
/// 1.00x HAProxy's and HTTP/1.1 16-connection requests/s to 0.85x, with
/// one thread at twice the other's CPU. Zero keeps them within one of
/// even (8 streams 1.07x; mTLS 1.38x against 1.13x with one) and cost new
/// connections nothing measurable (83-85 us of CPU each against 83-90):
/// the thread that accepts is mostly the one that has just finished
/// others.
const SLACK: usize = 0;

/// Live connections of one worker, on a cache line of its own: every
/// connection's start and end touch its worker's count, and threads must
/// not contend for a line they do not share.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Live(AtomicUsize);

/// Counts a connection on its worker while it lives.
struct Counted {
    live: Arc<[Live]>,
    worker: usize,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.live[self.worker].0.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    /// Which connection thread this is: 0 on the main runtime's threads,
    /// 1 and up on the threads of their own.
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
    #[error("pinning connection thread {index} to CPU {cpu}: {source} (try --pin-connection-threads never)")]
    Pin {
        index: usize,
        cpu: usize,
        #[source]
        source: nix::Error,
    },
}

/// Whether connection threads are pinned, one per CPU, in turn over the
/// CPUs this process may run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pinning {
    /// Pin when there are as many threads as CPUs the process may run on
    /// (its own cores: a CPU limit given as a cpuset, a node of its own);
    /// on a node whose CPUs it shares with more than that, the kernel
    /// places them.
    Auto,
    Always,
    Never,
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect(),
        Err(_) => Vec::new(),
    }
}

/// Where accepted connections are served.
#[derive(Debug)]
pub struct Workers {
    /// The runtime that made this (one thread), or each thread's.
    handles: Vec<Handle>,
    /// Live connections per worker (index as `handles`).
    live: Arc<[Live]>,
    next: AtomicUsize,
    /// Every connection task, so shutdown can wait for them to drain.
    tasks: TaskTracker,
    /// Dropping these ends the threads' event loops.
    _stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// `threads` connection threads: with one, the calling runtime serves
    /// connections; with more, that many new threads (indexes 1 to
    /// `threads`), pinned as `pinning` says, and the calling runtime keeps
    /// the rest (accepting, the control plane). Connections are tracked by
    /// `tasks`. Must be called inside a runtime.
    pub fn start(threads: usize, pinning: Pinning, tasks: TaskTracker) -> Result<Self, WorkersError> {
        if threads <= 1 {
            return Ok(Self::new(vec![Handle::current()], tasks, Vec::new()));
        }
        let cpus = allowed_cpus();
        let pin = match pinning {
            Pinning::Auto => cpus.len() == threads,
            Pinning::Always => !cpus.is_empty(),
            Pinning::Never => false,
        };
        let mut handles = Vec::with_capacity(threads);
        let mut stops = Vec::with_capacity(threads);
        for index in 1..=threads {
            let cpu = pin.then(|| cpus[(index - 1) % cpus.len()]);
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("outrigger-conn{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    if let Some(cpu) = cpu {
                        let mut set = nix::sched::CpuSet::new();
                        let pinned = set
                            .set(cpu)
                            .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
                        if let Err(source) = pinned {
                            let _ = handle_tx.send(Err(WorkersError::Pin { index, cpu, source }));
                            return;
                        }
                    }
                    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(source) => {
                            let _ = handle_tx.send(Err(WorkersError::Start { index, source }));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(runtime.handle().clone()));
                    // Serves what is spawned onto it until the workers are dropped.
                    runtime.block_on(async {
                        tokio::select! {
                            _ = stop_rx => {}
                            () = keep_timers_quiet() => {}
                        }
                    });
                })
                .map_err(|source| WorkersError::Start { index, source })?;
            match handle_rx.recv() {
                Ok(Ok(handle)) => handles.push(handle),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(WorkersError::Exited { index }),
            }
            stops.push(stop_tx);
        }
        if pin {
            tracing::info!(threads, cpus = ?cpus, "connection threads pinned, one per CPU");
        }
        Ok(Self::new(handles, tasks, stops))
    }

    fn new(handles: Vec<Handle>, tasks: TaskTracker, stops: Vec<oneshot::Sender<()>>) -> Self {
        let live = handles.iter().map(|_| Live::default()).collect();
        Self { handles, live, next: AtomicUsize::new(0), tasks, _stops: stops }
    }

    /// Accepts on `listener` from every worker's event loop at once until
    /// `stop` (or `handed_over`) is cancelled, as
    /// [`accept_until`](super::accept_until) does on one; `on_accept`
    /// (a copy per worker) runs on the worker that accepted and normally
    /// hands the connection to [`Workers::serve`], which keeps it there.
    /// With one worker (the calling runtime), the loop runs in place.
    pub async fn accept_until<O, A>(
        &self,
        listener: &Arc<TcpListener>,
        stop: &CancellationToken,
        handed_over: &CancellationToken,
        owner: O,
        on_accept: A,
    ) where
        O: Display + Send + Sync + 'static,
        A: FnMut(std::net::TcpStream, SocketAddr) + Clone + Send + 'static,
    {
        let failures = Arc::new(super::accept::AcceptFailures::default());
        if self.handles.len() == 1 {
            return super::accept_until(listener, stop, handed_over, &owner, &failures, on_accept).await;
        }
        // The loops stop with this future too (not only with `stop`), so
        // none outlives its caller.
        let stop = stop.child_token();
        let _stop_loops = stop.clone().drop_guard();
        let owner = Arc::new(owner);
        let loops: Vec<_> = self
            .handles
            .iter()
            .map(|handle| {
                let (listener, stop, handed_over, owner, failures) =
                    (listener.clone(), stop.clone(), handed_over.clone(), owner.clone(), failures.clone());
                let on_accept = on_accept.clone();
                handle.spawn(async move {
                    super::accept_until(&listener, &stop, &handed_over, &*owner, &failures, on_accept).await;
                })
            })
            .collect();
        for accepting in loops {
            // A loop ends only when told to, or when its thread stopped
            // (the proxy is exiting): nothing to report either way.
            let _ = accepting.await;
        }
    }

    /// The worker for a new connection: on a connection thread (which
    /// accepted it), that thread, unless it serves more than [`SLACK`]
    /// connections more than the least busy one, which takes it then; from
    /// any other thread, each worker in turn.
    fn pick(&self) -> usize {
        let n = self.handles.len();
        let here = INDEX.with(Cell::get);
        if n == 1 || !(1..=n).contains(&here) {
            return self.next.fetch_add(1, Ordering::Relaxed) % n;
        }
        let mine = here - 1;
        let load = |i: usize| self.live[i].0.load(Ordering::Relaxed);
        let (least, fewest) = (0..n).map(|i| (i, load(i))).min_by_key(|&(_, l)| l).unwrap_or((mine, 0));
        if load(mine) > fewest + SLACK {
            least
        } else {
            mine
        }
    }

    /// The tracker of connection tasks (for tasks a connection spawns).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Serves an accepted connection on the worker [`Workers::pick`]s: `serve`
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
        let i = self.pick();
        self.live[i].0.fetch_add(1, Ordering::Relaxed);
        let counted = Counted { live: self.live.clone(), worker: i };
        let task = self.tasks.track_future(async move {
            let _counted = counted;
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

/// The period of [`keep_timers_quiet`]: below the shortest per-connection
/// timeout by default (protocol detection, 1 s; connect, 5 s).
const TIMER_KEEPER_PERIOD: std::time::Duration = std::time::Duration::from_millis(250);

/// Keeps a timer due within [`TIMER_KEEPER_PERIOD`] on a connection thread,
/// for ever. Why: tokio (tokio-rs/tokio#5207) wakes the event loop, with a
/// write to its eventfd, whenever a new timer is due before the earliest
/// one it parked for, even when the new timer is set from that very loop,
/// which is running and so needs no waking. Every connection sets a
/// connect timeout (and a detection timeout), and with only long idle
/// timers pending each one woke the loop: 0.72 eventfd writes per
/// connection in the plain new-connection bench (`perf stat -e
/// 'syscalls:sys_enter_*'`), 0.15 with this timer pending, since a
/// per-connection timeout is then never the earliest. (`epoll_wait` calls
/// stayed at 0.88 per connection, and CPU per connection did not move
/// beyond noise.) It costs four wake-ups a second per thread.
async fn keep_timers_quiet() {
    loop {
        tokio::time::sleep(TIMER_KEEPER_PERIOD).await;
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

    /// Serves six connections on `workers` and returns, in order, the
    /// name and index of the thread and the CPUs each was served on.
    async fn served_on(workers: &Workers) -> Vec<(String, usize, Vec<usize>)> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for _ in 0..6 {
            let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (accepted, peer) = listener.accept().expect("accept");
            accepted.set_nonblocking(true).expect("nonblocking");
            let seen = seen_tx.clone();
            workers.serve(accepted, peer, move |mut stream| async move {
                let name = std::thread::current().name().unwrap_or_default().to_string();
                let _ = seen.send((name, worker_index(), allowed_cpus()));
                let _ = stream.write_all(b"served").await;
            });
            let mut buf = [0u8; 6];
            client.read_exact(&mut buf).await.expect("served");
            clients.push(client);
        }
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(seen_rx.recv().await.expect("a thread"));
        }
        seen
    }

    #[tokio::test]
    async fn connections_are_dealt_in_turn_to_threads_of_their_own() {
        let tasks = TaskTracker::new();
        let workers = Workers::start(3, Pinning::Never, tasks.clone()).expect("workers");
        assert_eq!(workers.count(), 3);
        let seen = served_on(&workers).await;
        let threads: HashSet<&String> = seen.iter().map(|(name, _, _)| name).collect();
        assert_eq!(threads.len(), 3, "each worker serves its turn on its own thread: {seen:?}");
        assert_eq!(seen[0], seen[3], "the turn comes round again: {seen:?}");
        assert!(seen.iter().all(|(name, _, _)| name.starts_with("outrigger-conn")), "{seen:?}");
        let indexes: HashSet<usize> = seen.iter().map(|(_, i, _)| *i).collect();
        assert_eq!(indexes, HashSet::from([1, 2, 3]), "each thread knows its index: {seen:?}");
        tasks.close();
        tasks.wait().await;
    }

    /// Where each of `n` long-lived connections accepted by the workers'
    /// own loops was (accepting thread, serving thread), made one after
    /// another; the clients are returned open.
    async fn accepted_by_workers(workers: &Arc<Workers>, n: usize) -> (Vec<(usize, usize)>, Vec<TcpStream>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let listener = Arc::new(listener);
        let (stop, handed_over) = (CancellationToken::new(), CancellationToken::new());
        let accepting = {
            let (w, listener, stop, handed_over) =
                (workers.clone(), listener.clone(), stop.clone(), handed_over.clone());
            tokio::spawn(async move {
                let serve_on = w.clone();
                let on_accept = move |stream, peer| {
                    let accepted_on = worker_index();
                    serve_on.serve(stream, peer, move |mut stream| async move {
                        let served = [accepted_on as u8, worker_index() as u8];
                        let _ = stream.write_all(&served).await;
                        // Lives until the client closes.
                        let _ = stream.read(&mut [0u8; 1]).await;
                    });
                };
                w.accept_until(&listener, &stop, &handed_over, "test", on_accept).await
            })
        };
        let mut seen = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..n {
            let mut client = TcpStream::connect(addr).await.expect("connect");
            let mut served = [0u8; 2];
            client.read_exact(&mut served).await.expect("served");
            seen.push((usize::from(served[0]), usize::from(served[1])));
            clients.push(client);
        }
        stop.cancel();
        accepting.await.expect("the accept loops end when stopped");
        (seen, clients)
    }

    #[tokio::test]
    async fn connection_threads_accept_themselves_and_spread_long_lived_connections() {
        let tasks = TaskTracker::new();
        let workers = Arc::new(Workers::start(2, Pinning::Never, tasks.clone()).expect("workers"));
        let (seen, clients) = accepted_by_workers(&workers, 8).await;
        assert!(seen.iter().all(|&(a, s)| (1..=2).contains(&a) && (1..=2).contains(&s)), "{seen:?}");
        let on = |t: usize| seen.iter().filter(|&&(_, s)| s == t).count();
        assert!(on(1).abs_diff(on(2)) <= SLACK + 1, "long-lived connections spread evenly: {seen:?}");
        // A thread keeps what it accepts unless it is ahead by more than SLACK.
        assert!(seen.iter().any(|&(a, s)| a == s), "{seen:?}");
        drop(clients);
        tasks.close();
        tasks.wait().await;
    }

    #[tokio::test]
    async fn one_thread_is_the_runtime_itself() {
        let tasks = TaskTracker::new();
        let workers = Workers::start(1, Pinning::Always, tasks.clone()).expect("workers");
        let seen = served_on(&workers).await;
        assert!(seen.iter().all(|(name, i, _)| *i == 0 && !name.starts_with("outrigger-conn")), "{seen:?}");
        tasks.close();
        tasks.wait().await;
    }

    #[tokio::test]
    async fn pinned_threads_run_on_one_cpu_each_in_turn() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty(), "sched_getaffinity");
        let tasks = TaskTracker::new();
        let workers = Workers::start(2, Pinning::Always, tasks.clone()).expect("workers");
        let seen = served_on(&workers).await;
        for (name, index, on) in &seen {
            assert_eq!(on, &vec![cpus[(index - 1) % cpus.len()]], "{name} runs on its own CPU: {seen:?}");
        }
        // Unpinned, a thread may run anywhere the process may.
        let unpinned = Workers::start(2, Pinning::Never, tasks.clone()).expect("workers");
        assert!(served_on(&unpinned).await.iter().all(|(_, _, on)| on == &cpus));
        tasks.close();
        tasks.wait().await;
    }
}
