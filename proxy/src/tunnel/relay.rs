//! Copying between a TCP connection and an HTTP/2 stream.
//!
//! TCP reads land in a `BytesMut` that is frozen and handed to h2 as a data
//! frame; once h2 has written it out, the next `reserve` reuses the same
//! memory, so a steady stream does not allocate per read. h2 hands received
//! frames over as `Bytes`; their flow-control window is released as soon as
//! they are written to the socket. END_STREAM and FIN map to each other
//! (half-close); errors reset both sides.

use std::{
    future::poll_fn,
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::relay::Relayed;

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

/// Relays until both directions finished. `on_first_response` gets the
/// delay from the first byte sent into the stream to the first byte back.
pub async fn relay_h2<F: FnOnce(Duration)>(
    tcp: &mut TcpStream,
    send: &mut SendStream<Bytes>,
    recv: &mut RecvStream,
    buffer_size: usize,
    on_first_response: F,
) -> Relayed {
    let (mut tcp_read, mut tcp_write) = tcp.split();
    let mut sent = 0u64;
    let mut received = 0u64;
    let started = Instant::now();
    let first_sent = AtomicU64::new(0);
    let result = {
        let forward = tcp_to_h2(&mut tcp_read, send, buffer_size, &mut sent, &first_sent, started);
        let backward = h2_to_tcp(recv, &mut tcp_write, &mut received, &first_sent, started, on_first_response);
        tokio::try_join!(forward, backward).map(|_| ())
    };
    if result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
    }
    Relayed { sent, received, result }
}

async fn tcp_to_h2<R: AsyncRead + Unpin>(
    reader: &mut R,
    send: &mut SendStream<Bytes>,
    buffer_size: usize,
    count: &mut u64,
    first_sent: &AtomicU64,
    started: Instant,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(buffer_size);
    loop {
        if buf.capacity() < buffer_size / 2 {
            buf.reserve(buffer_size);
        }
        let n = reader.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(());
        }
        if first_sent.load(Ordering::Relaxed) == 0 {
            first_sent.store(started.elapsed().as_nanos().max(1) as u64, Ordering::Relaxed);
        }
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(granted) => granted.map_err(h2_io)?,
                None => return Err(io::Error::new(io::ErrorKind::ConnectionReset, "tunnel stream closed")),
            };
            if granted == 0 {
                continue;
            }
            let piece = chunk.split_to(granted.min(chunk.len()));
            send.send_data(piece, false).map_err(h2_io)?;
        }
        *count += n as u64;
    }
}

async fn h2_to_tcp<W: AsyncWrite + Unpin, F: FnOnce(Duration)>(
    recv: &mut RecvStream,
    writer: &mut W,
    count: &mut u64,
    first_sent: &AtomicU64,
    started: Instant,
    on_first_response: F,
) -> io::Result<()> {
    let mut on_first = Some(on_first_response);
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_io)?;
        if data.is_empty() {
            continue;
        }
        if let Some(observe) = on_first.take() {
            let sent_at = Duration::from_nanos(first_sent.load(Ordering::Relaxed));
            observe(started.elapsed().saturating_sub(sent_at));
        }
        writer.write_all(&data).await?;
        *count += data.len() as u64;
        recv.flow_control().release_capacity(data.len()).map_err(h2_io)?;
    }
    writer.shutdown().await
}
