//! A client connection's own executor. Everything one client connection
//! needs — hyper's server side, its h2 streams, the upstream connections
//! it opened and their request-body pipes — is polled inside the
//! connection's one task, so a request's way to the endpoint and back
//! wakes no other task.
//!
//! Wake-ups raised while that task is being polled (a response arriving
//! for a stream, a stream handing its request to the upstream connection)
//! are absorbed into another pass over what is ready instead of waking the
//! task itself: tokio reschedules a task that wakes itself at the back of
//! the run queue and wakes a parked worker to steal it, which costs a futex
//! wake-up, and often a migration to the other CPU, per request.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering::SeqCst},
        Arc, Mutex,
    },
    task::{Context, Poll, Wake, Waker},
};

use futures_util::{stream::FuturesUnordered, task::AtomicWaker, StreamExt};

/// A future run on a connection's executor (or as its own task).
pub type Driver = futures_util::future::BoxFuture<'static, ()>;

/// Passes over ready work in one poll before the task yields to others
/// (tokio's per-task budget makes busy I/O report pending after a while;
/// looping on that would spin).
const MAX_PASSES: usize = 32;

struct Shared {
    /// Futures spawned since the last pass.
    spawned: Mutex<Vec<Driver>>,
    /// The task is inside [`run`]'s poll: a wake-up only asks for one
    /// more pass.
    polling: AtomicBool,
    repoll: AtomicBool,
    /// The task's own waker, for wake-ups from elsewhere.
    waker: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Set before reading `polling`, which the poll clears before
        // reading `repoll`: one side always sees the other.
        self.repoll.store(true, SeqCst);
        if !self.polling.load(SeqCst) {
            self.waker.wake();
        }
    }
}

/// Spawns futures onto one connection's executor.
#[derive(Clone)]
pub struct Spawner(Arc<Shared>);

impl Default for Spawner {
    fn default() -> Self {
        Self(Arc::new(Shared {
            spawned: Mutex::default(),
            polling: AtomicBool::new(false),
            repoll: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }))
    }
}

impl Spawner {
    pub fn spawn(&self, fut: Driver) {
        self.0.spawned.lock().unwrap_or_else(|e| e.into_inner()).push(fut);
        self.0.wake_by_ref();
    }

    /// Polls `main`, and what is spawned here meanwhile, until `main`
    /// completes; then what was spawned is dropped with it.
    pub async fn run<F: Future>(&self, main: F) -> F::Output {
        let shared = self.0.clone();
        let waker = Waker::from(shared.clone());
        let mut main = std::pin::pin!(main);
        let mut drivers: FuturesUnordered<Driver> = FuturesUnordered::new();
        std::future::poll_fn(move |cx| {
            shared.waker.register(cx.waker());
            let mut inner = Context::from_waker(&waker);
            for _ in 0..MAX_PASSES {
                shared.polling.store(true, SeqCst);
                shared.repoll.store(false, SeqCst);
                if let Poll::Ready(out) = main.as_mut().poll(&mut inner) {
                    shared.polling.store(false, SeqCst);
                    return Poll::Ready(out);
                }
                drivers.extend(shared.spawned.lock().unwrap_or_else(|e| e.into_inner()).drain(..));
                while let Poll::Ready(Some(())) = drivers.poll_next_unpin(&mut inner) {}
                shared.polling.store(false, SeqCst);
                if !shared.repoll.load(SeqCst) {
                    return Poll::Pending;
                }
            }
            // Still busy: let other tasks run, and come back.
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }
}

/// Where hyper runs the futures of a connection it makes (h2 streams and
/// connection drivers): on a client connection's own executor, or as their
/// own tasks (for connections that outlive the client connection).
#[derive(Clone)]
pub enum Exec {
    Task,
    Local(Spawner),
}

impl<F> hyper::rt::Executor<F> for Exec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        match self {
            Self::Task => drop(tokio::spawn(fut)),
            Self::Local(s) => s.spawn(Box::pin(fut)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn spawned_futures_run_until_main_ends() {
        let spawner = Spawner::default();
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let main = {
            let (spawner, done) = (spawner.clone(), done.clone());
            async move {
                // A spawned future that waits on another (a cross-future
                // wake-up inside one pass) and one woken from another task.
                let (inner_tx, inner_rx) = tokio::sync::oneshot::channel::<()>();
                let d = done.clone();
                spawner.spawn(Box::pin(async move {
                    inner_rx.await.ok();
                    d.fetch_add(1, Ordering::SeqCst);
                }));
                spawner.spawn(Box::pin(async move {
                    let _ = inner_tx.send(());
                }));
                let d = done.clone();
                spawner.spawn(Box::pin(async move {
                    rx.await.ok();
                    d.fetch_add(1, Ordering::SeqCst);
                }));
                while done.load(Ordering::SeqCst) < 2 {
                    tokio::task::yield_now().await;
                }
                "main"
            }
        };
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let _ = tx.send(());
        });
        assert_eq!(spawner.run(main).await, "main");
        assert_eq!(done.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_busy_connection_yields_to_other_tasks() {
        let spawner = Spawner::default();
        // A spawned future that is always ready again.
        spawner.spawn(Box::pin(std::future::poll_fn(|cx| {
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        })));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // On a current-thread runtime the other task runs only if the
        // connection's task yields.
        tokio::spawn(async move {
            let _ = tx.send(());
        });
        spawner.run(async { rx.await.ok() }).await;
    }
}
