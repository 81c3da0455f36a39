//! Copying bytes both ways between two connections.
//!
//! Buffers are allocated once per connection; the loop does no allocation
//! or locking per read or write, and a full buffer waits for the writer
//! (back-pressure) rather than queueing.
#![forbid(unsafe_code)]

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What a relay moved, and how it ended.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes from the first stream to the second.
    pub sent: u64,
    /// Bytes from the second stream back to the first.
    pub received: u64,
    /// The first error in either direction; byte counts are kept even then.
    pub result: io::Result<()>,
}

impl Relayed {
    /// A short tag for logs: ok, reset, error.
    pub fn outcome(&self) -> &'static str {
        match &self.result {
            Ok(()) => "ok",
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset || e.kind() == io::ErrorKind::BrokenPipe => "reset",
            Err(_) => "error",
        }
    }
}

/// Relays until both directions have seen end-of-stream. A half-close is
/// passed on: EOF from one side becomes a write shutdown on the other, and
/// the other direction keeps flowing.
///
/// Takes the two streams as read/write halves so that a TCP stream can be
/// split without a lock (`TcpStream::split`).
pub async fn relay<AR, AW, BR, BW, F>(a: (AR, AW), b: (BR, BW), buffer_size: usize, on_first_response: F) -> Relayed
where
    AR: AsyncRead + Unpin,
    AW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin,
    BW: AsyncWrite + Unpin,
    F: FnOnce(Duration),
{
    let ((mut a_read, mut a_write), (mut b_read, mut b_write)) = (a, b);
    let mut sent = 0u64;
    let mut received = 0u64;
    let started = Instant::now();
    // Nanoseconds after `started` at which the first byte went to `b`
    // (0: not yet). Shared by the two directions of one task.
    let first_sent = AtomicU64::new(0);
    let mut on_first_response = Some(on_first_response);
    let result = {
        let forward = copy_one(&mut a_read, &mut b_write, buffer_size, &mut sent, || {
            if first_sent.load(Ordering::Relaxed) == 0 {
                first_sent.store(started.elapsed().as_nanos().max(1) as u64, Ordering::Relaxed);
            }
        });
        let backward = copy_one(&mut b_read, &mut a_write, buffer_size, &mut received, || {
            if let Some(observe) = on_first_response.take() {
                // Measured from the first byte sent, or from the start when
                // `b` speaks first.
                let sent_at = Duration::from_nanos(first_sent.load(Ordering::Relaxed));
                observe(started.elapsed().saturating_sub(sent_at));
            }
        });
        // The first error ends both directions: a reset on one side must
        // not leave the other waiting forever.
        tokio::try_join!(forward, backward).map(|_| ())
    };
    Relayed { sent, received, result }
}

async fn copy_one<R, W>(
    reader: &mut R,
    writer: &mut W,
    buffer_size: usize,
    count: &mut u64,
    mut on_data: impl FnMut(),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Uninitialised capacity: a connection that moves a few bytes does not
    // pay for zeroing two large buffers.
    let mut buf = BytesMut::with_capacity(buffer_size);
    loop {
        buf.clear();
        let n = reader.read_buf(&mut buf).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(());
        }
        on_data();
        writer.write_all(&buf[..n]).await?;
        *count += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, server) = tokio::io::duplex(1024);
        let relay_task = tokio::spawn(relay(tokio::io::split(proxy_a), tokio::io::split(proxy_b), 256, |_| {}));
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let (mut server_r, mut server_w) = tokio::io::split(server);
        client_w.write_all(b"hello").await.expect("write");
        client_w.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server_r.read_to_end(&mut got).await.expect("server reads to EOF");
        assert_eq!(got, b"hello");
        // After the client's half-close the other direction still flows.
        server_w.write_all(b"world!").await.expect("write back");
        server_w.shutdown().await.expect("close");
        let mut back = Vec::new();
        client_r.read_to_end(&mut back).await.expect("client reads");
        assert_eq!(back, b"world!");
        let relayed = relay_task.await.expect("relay finishes");
        assert_eq!((relayed.sent, relayed.received), (5, 6));
        assert!(relayed.result.is_ok());
    }
}
