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

use super::io::{ChunkRead, ChunkWrite, Duplex, ReadBuffer};

/// Buffer sizes of a relay.
#[derive(Debug, Clone, Copy)]
pub struct RelayOptions {
    /// First read size of each direction.
    pub initial_buffer: usize,
    /// Largest read size (a direction doubles up to it while reads fill the buffer).
    pub max_buffer: usize,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self { initial_buffer: 4096, max_buffer: 64 * 1024 }
    }
}

/// What a relay moved, and how it ended.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes from the first connection to the second (delivered).
    pub sent: u64,
    /// Bytes from the second back to the first (delivered).
    pub received: u64,
    /// The first error in either direction; byte counts are kept even then.
    pub result: io::Result<()>,
}

impl Relayed {
    /// A short tag for logs and metrics: ok, reset, error.
    pub fn outcome(&self) -> &'static str {
        match &self.result {
            Ok(()) => "ok",
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset || e.kind() == io::ErrorKind::BrokenPipe => "reset",
            Err(_) => "error",
        }
    }
}

/// Relays until both directions have seen end of stream. A half-close is
/// passed on (EOF one way becomes FIN/END_STREAM on the other side; the
/// other direction keeps flowing). The first error ends both directions and
/// both connections are aborted, so each peer sees a failure, not a clean
/// end. `on_first_response` gets the delay from the first byte sent to `b`
/// to the first byte back (from the start when `b` speaks first).
pub async fn relay<A, B, F>(a: &mut A, b: &mut B, opts: RelayOptions, on_first_response: F) -> Relayed
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
    let mut on_first_response = Some(on_first_response);
    let result = {
        let ((mut a_read, mut a_write), (mut b_read, mut b_write)) = (a.halves(), b.halves());
        let mut a_buf = ReadBuffer::new(opts.initial_buffer, opts.max_buffer);
        let mut b_buf = ReadBuffer::new(opts.initial_buffer, opts.max_buffer);
        let forward = copy_one(&mut a_read, &mut b_write, &mut a_buf, &mut sent, || {
            if first_sent.load(Ordering::Relaxed) == 0 {
                first_sent.store(started.elapsed().as_nanos().max(1) as u64, Ordering::Relaxed);
            }
        });
        let backward = copy_one(&mut b_read, &mut a_write, &mut b_buf, &mut received, || {
            if let Some(observe) = on_first_response.take() {
                let sent_at = Duration::from_nanos(first_sent.load(Ordering::Relaxed));
                observe(started.elapsed().saturating_sub(sent_at));
            }
        });
        tokio::try_join!(forward, backward).map(|_| ())
    };
    if result.is_err() {
        a.abort();
        b.abort();
    }
    Relayed { sent, received, result }
}

async fn copy_one<R: ChunkRead, W: ChunkWrite>(
    reader: &mut R,
    writer: &mut W,
    rb: &mut ReadBuffer,
    count: &mut u64,
    mut on_data: impl FnMut(),
) -> io::Result<()> {
    loop {
        let Some(mut chunk) = poll_fn(|cx| reader.poll_chunk(cx, rb)).await? else {
            return poll_fn(|cx| writer.poll_finish(cx)).await;
        };
        let n = chunk.len();
        on_data();
        poll_fn(|cx| writer.poll_write_chunk(cx, &mut chunk)).await?;
        reader.release(n);
        *count += n as u64;
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
            relay(&mut a, &mut b, RelayOptions { initial_buffer: 16, max_buffer: 256 }, |_| {}).await
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
        assert!(relayed.result.is_ok());
    }

    #[tokio::test]
    async fn an_error_aborts_both_sides() {
        let (client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, server) = tokio::io::duplex(64);
        drop(server);
        let (mut a, mut b) = (Stream::new(proxy_a), Stream::new(proxy_b));
        let (_keep, mut client_w) = tokio::io::split(client);
        client_w.write_all(b"x").await.expect("write");
        let relayed = relay(&mut a, &mut b, RelayOptions::default(), |_| {}).await;
        assert!(relayed.result.is_err());
        assert!(a.aborted() && b.aborted(), "both connections see a failure, not a clean end");
    }
}
