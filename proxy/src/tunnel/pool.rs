//! Pooled TLS+h2 connections to peer proxies.
//!
//! Keyed by (source pod, source identity, destination identity, peer
//! address, connection thread). The source pod is in the key because a
//! connection's socket lives in that pod's netns: another pod's streams
//! must not leave with this pod's address. The thread is, because a
//! connection is driven by the thread that dialled it (Envoy's per-worker
//! pools). Streams go to the least busy connection; while every
//! connection is busy, up to `--tunnel-connections-per-peer` are opened
//! (one per CPU by default, so TLS work spreads over cores), and past
//! `--max-streams-per-connection` a new one is opened regardless. Once the
//! source certificate rotated, new streams take a new connection and the
//! old ones finish theirs. Dialling is single-flight per key: a burst of
//! new streams opens one connection, not one each, and when the peer is
//! dead every waiter gets the one dial's error — 20 waiters behind a dead
//! peer fail after one connect timeout, not twenty.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use h2::client::SendRequest;
use serde::Serialize;

use super::TunnelError;
use crate::{clock::now_nanos, identity::Identity};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub netns_cookie: u64,
    pub source: Identity,
    pub destination: Identity,
    pub peer: SocketAddr,
    /// The connection thread whose event loop drives the connection (see
    /// `transport::worker_index`): a stream from another thread would be
    /// woken across threads for every chunk, and with pinned threads wait
    /// for the other CPU (measured: one cross-node HBONE stream 0.86x
    /// HAProxy's pair with shared pools, against 1.29-1.43x unpinned).
    pub worker: usize,
}

#[derive(Debug)]
struct PooledConn {
    sender: SendRequest<Bytes>,
    streams: AtomicUsize,
    /// Certificate generation of the source identity when dialled.
    generation: u64,
    /// Set by the connection's driver task when it ends.
    closed: Arc<AtomicBool>,
    last_used: AtomicU64,
    /// A duplicate of the TCP socket's descriptor, to read its RTT.
    socket: Option<OwnedFd>,
}

/// Holds a stream's place on its connection; dropping it frees the place.
#[derive(Debug)]
pub struct StreamGuard(Arc<PooledConn>);

impl StreamGuard {
    /// The kernel's smoothed RTT of the tunnel's TCP connection.
    pub fn rtt(&self) -> Option<Duration> {
        self.0.socket.as_ref().and_then(|fd| crate::sys::tcp_rtt(fd.as_fd()))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
        self.0.last_used.store(now_nanos(), Ordering::Relaxed);
    }
}

/// A newly dialled connection: its sender and the flag its driver sets.
pub struct Dialled {
    pub sender: SendRequest<Bytes>,
    pub closed: Arc<AtomicBool>,
    pub socket: Option<OwnedFd>,
}

#[derive(Debug, Default, Serialize)]
pub struct PoolStats {
    pub connections: usize,
    pub streams: usize,
    /// Dials started, whether they connected or failed: a burst of streams
    /// to a dead peer shows here as one dial, not one per stream.
    pub dialled_total: u64,
}

/// One dial in flight for a key; every waiter shares its outcome.
#[derive(Debug, Default)]
struct Flight {
    outcome: tokio::sync::OnceCell<Result<(), Arc<TunnelError>>>,
}

/// Rounds of "dial, then take a place" before giving up: each round adds a
/// connection, so only connections that die at once can exhaust it.
const MAX_DIAL_ROUNDS: usize = 4;

#[derive(Debug)]
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Arc<PooledConn>>>>,
    dialing: Mutex<HashMap<PoolKey, Arc<Flight>>>,
    max_streams: usize,
    /// Connections per key before streams share them.
    max_conns: usize,
    idle_timeout: Duration,
    dialled: AtomicU64,
}

impl Pool {
    pub fn new(max_streams: usize, max_conns: usize, idle_timeout: Duration) -> Self {
        Self {
            conns: Mutex::default(),
            dialing: Mutex::default(),
            max_streams: max_streams.max(1),
            max_conns: max_conns.max(1),
            idle_timeout,
            dialled: AtomicU64::new(0),
        }
    }

    /// The least busy usable connection — unless it is busy and another
    /// connection may still be opened: streams then spread over up to
    /// `max_conns` connections, so their TLS work spreads over cores.
    fn take_place(&self, key: &PoolKey, generation: u64) -> Option<(SendRequest<Bytes>, StreamGuard)> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.closed.load(Ordering::Relaxed));
        let current = list.iter().filter(|c| c.generation == generation).count();
        let least =
            list.iter().filter(|c| c.generation == generation).min_by_key(|c| c.streams.load(Ordering::Relaxed))?;
        let busy = least.streams.load(Ordering::Relaxed);
        if busy >= self.max_streams || (busy > 0 && current < self.max_conns) {
            return None;
        }
        // The caller holds the pool lock: no other taker can slip in.
        least.streams.fetch_add(1, Ordering::AcqRel);
        Some((least.sender.clone(), StreamGuard(least.clone())))
    }

    /// A place for one stream to the peer of `key`, dialling with `dial` if
    /// no pooled connection has room. Concurrent callers for one key share
    /// one dial and its result.
    pub async fn stream<D, Fut>(
        &self,
        key: &PoolKey,
        generation: u64,
        dial: D,
    ) -> Result<(SendRequest<Bytes>, StreamGuard), TunnelError>
    where
        D: Fn() -> Fut,
        Fut: Future<Output = Result<Dialled, TunnelError>>,
    {
        for _ in 0..MAX_DIAL_ROUNDS {
            if let Some(place) = self.take_place(key, generation) {
                return Ok(place);
            }
            let flight = {
                let mut dialing = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
                dialing.entry(key.clone()).or_default().clone()
            };
            let outcome = flight
                .outcome
                .get_or_init(|| async {
                    self.dialled.fetch_add(1, Ordering::Relaxed);
                    let dialled = dial().await.map_err(Arc::new)?;
                    self.add(key, generation, dialled);
                    Ok(())
                })
                .await
                .clone();
            // The next burst after this one dials afresh.
            {
                let mut dialing = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
                if dialing.get(key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                    dialing.remove(key);
                }
            }
            outcome.map_err(TunnelError::Shared)?;
        }
        Err(TunnelError::Unavailable { peer: key.peer })
    }

    fn add(&self, key: &PoolKey, generation: u64, dialled: Dialled) {
        let conn = Arc::new(PooledConn {
            sender: dialled.sender,
            streams: AtomicUsize::new(0),
            generation,
            closed: dialled.closed,
            last_used: AtomicU64::new(now_nanos()),
            socket: dialled.socket,
        });
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().push(conn);
    }

    /// Drops connections that are closed, or idle past the idle timeout.
    /// Dropping the last sender of a connection closes it (GOAWAY).
    pub fn reap(&self) {
        let now = now_nanos();
        let idle = self.idle_timeout.as_nanos() as u64;
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for list in conns.values_mut() {
            list.retain(|c| {
                !c.closed.load(Ordering::Relaxed)
                    && (c.streams.load(Ordering::Relaxed) > 0
                        || now.saturating_sub(c.last_used.load(Ordering::Relaxed)) < idle)
            });
        }
        conns.retain(|_, list| !list.is_empty());
        let mut dialing = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
        dialing.retain(|_, flight| Arc::strong_count(flight) > 1);
    }

    pub fn stats(&self) -> PoolStats {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        PoolStats {
            connections: conns.values().map(Vec::len).sum(),
            streams: conns.values().flatten().map(|c| c.streams.load(Ordering::Relaxed)).sum(),
            dialled_total: self.dialled.load(Ordering::Relaxed),
        }
    }
}
