//! Copying both ways between two connections, whatever they are.
//!
//! Each direction reads a chunk and hands it to the other side's writer;
//! the next read waits until the write is done (back-pressure, never a
//! queue). Nothing is allocated or locked per read or write beyond the
//! read buffer, which exists only while data flows.

use std::{
    future::poll_fn,
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::io::{ChunkRead, ChunkWrite, Duplex, ReadBuffer};

/// Buffer sizes and deadlines of a relay.
#[derive(Debug, Clone, Copy)]
pub struct RelayOptions {
    /// First read size of each direction.
    pub initial_buffer: usize,
    /// Largest read size (a direction doubles up to it while reads fill the buffer).
    pub max_buffer: usize,
    /// No byte either way for this long ends the connection (with a reset).
    pub idle_timeout: Option<Duration>,
    /// The first (second) connection arrives already set to reset if the
    /// proxy dies (a client accepted on a listener with SO_LINGER 0, which
    /// it inherits), so arming it again would be a wasted syscall per
    /// connection.
    pub a_armed: bool,
    pub b_armed: bool,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self { initial_buffer: 4096, max_buffer: 64 * 1024, idle_timeout: None, a_armed: false, b_armed: false }
    }
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions reached end of stream.
    Completed,
    /// A peer reset its side (passed on as a reset to the other).
    Reset,
    /// Another I/O error.
    Error,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// The proxy cut it (drain deadline at shutdown).
    Cut,
}

impl End {
    /// The access log's `result`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Completed => "ok",
            Self::Reset => "reset",
            Self::Error => "error",
            Self::IdleTimeout => "idle_timeout",
            Self::Cut => "drain_cut",
        }
    }

    /// Envoy-style flag: `-` ok, `UR` reset, `UE` error, `SI` idle
    /// timeout, `DC` cut by the proxy's drain deadline.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Completed => "-",
            Self::Reset => "UR",
            Self::Error => "UE",
            Self::IdleTimeout => "SI",
            Self::Cut => "DC",
        }
    }
}

/// What a relay moved, and how it ended.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes from the first connection to the second (delivered).
    pub sent: u64,
    /// Bytes from the second back to the first (delivered).
    pub received: u64,
    pub end: End,
    /// The first error in either direction, if any.
    pub error: Option<io::Error>,
}

impl Relayed {
    /// A short tag for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        self.end.label()
    }

    pub fn is_ok(&self) -> bool {
        self.end == End::Completed
    }
}

/// Why a relay stopped before both sides finished.
enum Stop {
    Io(io::Error),
    Idle,
    Cut,
}

/// Relays until both directions have seen end of stream. A half-close is
/// passed on (EOF one way becomes FIN/END_STREAM on the other side; the
/// other direction keeps flowing). The first error, the idle timeout, or
/// `cut` ends both directions and both connections are aborted, so each
/// peer sees a failure, never a clean short end. While relaying, a crash of
/// the proxy also reaches both peers as a reset. `on_first_response` gets
/// the delay from the first byte sent to `b` to the first byte back (from
/// the start when `b` speaks first).
pub async fn relay<A, B, F>(
    a: &mut A,
    b: &mut B,
    opts: RelayOptions,
    cut: &CancellationToken,
    on_first_response: F,
) -> Relayed
where
    A: Duplex,
    B: Duplex,
    F: FnOnce(Duration),
{
    let mut sent = 0u64;
    let mut received = 0u64;
    let started = Instant::now();
    // Nanoseconds after `started` at which the first byte went to `b` (0: not yet).
    let first_sent = AtomicU64::new(0);
    // Tokio's clock (not std's), so paused-time tests see the idle timeout.
    let base = tokio::time::Instant::now();
    let clock = || base.elapsed().as_nanos() as u64;
    let last_activity = AtomicU64::new(0);
    let mut on_first_response = Some(on_first_response);
    if !opts.a_armed {
        a.reset_on_exit(true);
    }
    if !opts.b_armed {
        b.reset_on_exit(true);
    }
    let result = {
        let ((mut a_read, mut a_write), (mut b_read, mut b_write)) = (a.halves(), b.halves());
        let mut a_buf = ReadBuffer::new(opts.initial_buffer, opts.max_buffer);
        let mut b_buf = ReadBuffer::new(opts.initial_buffer, opts.max_buffer);
        let activity = Activity { last: &last_activity, clock: &clock };
        let forward = copy_one(&mut a_read, &mut b_write, &mut a_buf, &mut sent, &activity, || {
            if first_sent.load(Ordering::Relaxed) == 0 {
                first_sent.store(started.elapsed().as_nanos().max(1) as u64, Ordering::Relaxed);
            }
        });
        let backward = copy_one(&mut b_read, &mut a_write, &mut b_buf, &mut received, &activity, || {
            if let Some(observe) = on_first_response.take() {
                let sent_at = Duration::from_nanos(first_sent.load(Ordering::Relaxed));
                observe(started.elapsed().saturating_sub(sent_at));
            }
        });
        let both = async { tokio::try_join!(forward, backward).map(|_| ()).map_err(Stop::Io) };
        tokio::select! {
            result = both => result,
            () = idle(opts.idle_timeout, &activity) => Err(Stop::Idle),
            () = cut.cancelled() => Err(Stop::Cut),
        }
    };
    let (end, error) = match result {
        Ok(()) => {
            // An orderly end: close with FIN as usual.
            a.reset_on_exit(false);
            b.reset_on_exit(false);
            (End::Completed, None)
        }
        Err(stop) => {
            a.abort();
            b.abort();
            match stop {
                Stop::Io(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => {
                    (End::Reset, Some(e))
                }
                Stop::Io(e) => (End::Error, Some(e)),
                Stop::Idle => (End::IdleTimeout, None),
                Stop::Cut => (End::Cut, None),
            }
        }
    };
    Relayed { sent, received, end, error }
}

/// When data last moved, on the relay's own clock.
struct Activity<'a, C: Fn() -> u64> {
    last: &'a AtomicU64,
    clock: &'a C,
}

impl<C: Fn() -> u64> Activity<'_, C> {
    fn touch(&self) {
        self.last.store((self.clock)(), Ordering::Relaxed);
    }

    fn quiet(&self) -> u64 {
        (self.clock)().saturating_sub(self.last.load(Ordering::Relaxed))
    }
}

/// Resolves once nothing has moved for `timeout` (never without one).
async fn idle<C: Fn() -> u64>(timeout: Option<Duration>, activity: &Activity<'_, C>) {
    let Some(timeout) = timeout else { return std::future::pending().await };
    let limit = timeout.as_nanos() as u64;
    loop {
        let quiet = activity.quiet();
        if quiet >= limit {
            return;
        }
        tokio::time::sleep(Duration::from_nanos(limit - quiet)).await;
    }
}

async fn copy_one<R: ChunkRead, W: ChunkWrite, C: Fn() -> u64>(
    reader: &mut R,
    writer: &mut W,
    rb: &mut ReadBuffer,
    count: &mut u64,
    activity: &Activity<'_, C>,
    mut on_data: impl FnMut(),
) -> io::Result<()> {
    loop {
        let Some(mut chunk) = poll_fn(|cx| reader.poll_chunk(cx, rb)).await? else {
            return poll_fn(|cx| writer.poll_finish(cx)).await;
        };
        let n = chunk.len();
        on_data();
        // Per chunk, not per byte: one clock read and one relaxed store.
        activity.touch();
        let last = reader.at_end();
        if last {
            poll_fn(|cx| writer.poll_write_last(cx, &mut chunk)).await?;
        } else {
            poll_fn(|cx| writer.poll_write_chunk(cx, &mut chunk)).await?;
        }
        reader.release(n);
        *count += n as u64;
        if last {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::transport::Stream;

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, server) = tokio::io::duplex(1024);
        let relay_task = tokio::spawn(async move {
            let (mut a, mut b) = (Stream::new(proxy_a), Stream::new(proxy_b));
            let opts = RelayOptions { initial_buffer: 16, max_buffer: 256, ..RelayOptions::default() };
            relay(&mut a, &mut b, opts, &CancellationToken::new(), |_| {}).await
        });
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let (mut server_r, mut server_w) = tokio::io::split(server);
        client_w.write_all(b"hello").await.expect("write");
        client_w.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server_r.read_to_end(&mut got).await.expect("server reads to EOF");
        assert_eq!(got, b"hello");
        // After the client's half-close the other direction still flows.
        let big = vec![7u8; 10_000];
        let write_back = async {
            server_w.write_all(&big).await.expect("write back");
            server_w.shutdown().await.expect("close");
        };
        let mut back = Vec::new();
        let read_back = client_r.read_to_end(&mut back);
        let (_, read) = tokio::join!(write_back, read_back);
        read.expect("client reads");
        assert_eq!(back, big);
        let relayed = relay_task.await.expect("relay finishes");
        assert_eq!((relayed.sent, relayed.received), (5, 10_000));
        assert!(relayed.is_ok());
    }

    #[tokio::test]
    async fn an_error_aborts_both_sides() {
        let (client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, server) = tokio::io::duplex(64);
        drop(server);
        let (mut a, mut b) = (Stream::new(proxy_a), Stream::new(proxy_b));
        let (_keep, mut client_w) = tokio::io::split(client);
        client_w.write_all(b"x").await.expect("write");
        let relayed = relay(&mut a, &mut b, RelayOptions::default(), &CancellationToken::new(), |_| {}).await;
        assert!(!relayed.is_ok());
        assert!(a.aborted() && b.aborted(), "both connections see a failure, not a clean end");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_cut_after_the_timeout_and_a_cut_token_ends_it() {
        let (_client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, _server) = tokio::io::duplex(64);
        let (mut a, mut b) = (Stream::new(proxy_a), Stream::new(proxy_b));
        let opts = RelayOptions { idle_timeout: Some(Duration::from_secs(30)), ..RelayOptions::default() };
        let started = tokio::time::Instant::now();
        let relayed = relay(&mut a, &mut b, opts, &CancellationToken::new(), |_| {}).await;
        assert_eq!(relayed.end, End::IdleTimeout);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(a.aborted() && b.aborted(), "an idle cut is a reset");

        let (_client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, _server) = tokio::io::duplex(64);
        let (mut a, mut b) = (Stream::new(proxy_a), Stream::new(proxy_b));
        let cut = CancellationToken::new();
        cut.cancel();
        let relayed = relay(&mut a, &mut b, RelayOptions::default(), &cut, |_| {}).await;
        assert_eq!(relayed.end, End::Cut);
        assert!(a.aborted() && b.aborted(), "a drain cut is a reset, never a clean EOF");
    }
}
