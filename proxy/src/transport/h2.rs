//! An HBONE `CONNECT` stream as a connection: the two halves for the relay
//! (chunks in and out without a copy), and `AsyncRead + AsyncWrite` for
//! protocol code that wants a byte stream.
//!
//! Flow control: received window is given back only once data has been
//! delivered onward, so a slow reader holds the sender back instead of
//! buffering. END_STREAM and FIN map to each other; an abort resets the
//! stream (RST_STREAM CANCEL).

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::io::{ChunkRead, ChunkWrite, Duplex, ReadBuffer};

/// An h2 error as an I/O error: a stream reset reads like a TCP reset.
pub fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

/// One CONNECT stream.
#[derive(Debug)]
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read (byte-stream use only).
    pending: Bytes,
    finished: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { send, recv, pending: Bytes::new(), finished: false }
    }
}

pub struct H2Recv<'a> {
    recv: &'a mut RecvStream,
    pending: &'a mut Bytes,
}

pub struct H2Send<'a> {
    send: &'a mut SendStream<Bytes>,
    finished: &'a mut bool,
}

fn poll_data(recv: &mut RecvStream, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
    loop {
        return match ready!(recv.poll_data(cx)) {
            None => Poll::Ready(Ok(None)),
            Some(Ok(data)) if data.is_empty() => continue,
            Some(Ok(data)) => Poll::Ready(Ok(Some(data))),
            Some(Err(e)) => Poll::Ready(Err(h2_io(e))),
        };
    }
}

impl ChunkRead for H2Recv<'_> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>, _rb: &mut ReadBuffer) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(self.pending))));
        }
        poll_data(self.recv, cx)
    }

    fn release(&mut self, n: usize) {
        // Fails only when the stream is already gone; the next read says so.
        let _ = self.recv.flow_control().release_capacity(n);
    }

    /// END_STREAM came with (or right behind) the last DATA frame.
    fn at_end(&self) -> bool {
        self.pending.is_empty() && self.recv.is_end_stream()
    }
}

/// Sends `chunk` as DATA frames as the peer's window allows; with `end`
/// (not yet set), the last frame carries END_STREAM and `end` is set.
fn poll_send(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
    chunk: &mut Bytes,
    mut end: Option<&mut bool>,
) -> Poll<io::Result<()>> {
    while !chunk.is_empty() {
        send.reserve_capacity(chunk.len());
        let granted = match ready!(send.poll_capacity(cx)) {
            Some(granted) => granted.map_err(h2_io)?,
            None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "tunnel stream closed"))),
        };
        if granted == 0 {
            continue;
        }
        let piece = chunk.split_to(granted.min(chunk.len()));
        let ends = chunk.is_empty() && end.as_deref().is_some_and(|finished| !*finished);
        send.send_data(piece, ends).map_err(h2_io)?;
        if ends {
            if let Some(finished) = end.as_deref_mut() {
                *finished = true;
            }
        }
    }
    match end {
        Some(finished) => Poll::Ready(finish(send, finished)),
        None => Poll::Ready(Ok(())),
    }
}

fn finish(send: &mut SendStream<Bytes>, finished: &mut bool) -> io::Result<()> {
    if !*finished {
        *finished = true;
        send.send_data(Bytes::new(), true).map_err(h2_io)?;
    }
    Ok(())
}

impl ChunkWrite for H2Send<'_> {
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        poll_send(self.send, cx, chunk, None)
    }

    /// The last DATA frame carries END_STREAM: no empty frame to end it.
    fn poll_write_last(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        poll_send(self.send, cx, chunk, Some(self.finished))
    }

    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(finish(self.send, self.finished))
    }
}

impl Duplex for H2Stream {
    type Read<'a> = H2Recv<'a>;
    type Write<'a> = H2Send<'a>;

    fn halves(&mut self) -> (H2Recv<'_>, H2Send<'_>) {
        (
            H2Recv { recv: &mut self.recv, pending: &mut self.pending },
            H2Send { send: &mut self.send, finished: &mut self.finished },
        )
    }

    fn abort(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pending.is_empty() {
            match ready!(poll_data(&mut this.recv, cx))? {
                Some(data) => this.pending = data,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        send.reserve_capacity(buf.len());
        loop {
            let granted = match ready!(send.poll_capacity(cx)) {
                Some(granted) => granted.map_err(h2_io)?,
                None => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "tunnel stream closed")))
                }
            };
            if granted == 0 {
                continue;
            }
            let n = granted.min(buf.len());
            send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_io)?;
            return Poll::Ready(Ok(n));
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        Poll::Ready(finish(&mut this.send, &mut this.finished))
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    /// A client stream and the server's side of it, over an in-memory pipe.
    async fn stream_pair() -> (H2Stream, H2Stream) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.expect("server handshake");
            let (request, mut respond) = conn.accept().await.expect("a stream").expect("accepted");
            let send = respond.send_response(http::Response::new(()), false).expect("respond");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            H2Stream::new(send, request.into_body())
        });
        let (mut client, conn) = h2::client::handshake(c).await.expect("client handshake");
        tokio::spawn(conn);
        let request = http::Request::builder().method("CONNECT").uri("10.0.0.1:80").body(()).expect("request");
        let (response, send) = client.send_request(request, false).expect("send request");
        let server_side = server.await.expect("server");
        let recv = response.await.expect("response").into_body();
        (H2Stream::new(send, recv), server_side)
    }

    #[tokio::test]
    async fn the_last_chunk_carries_end_stream() {
        let (mut client, mut server) = stream_pair().await;
        let (_, mut w) = client.halves();
        let mut chunk = Bytes::from_static(b"last words");
        poll_fn(|cx| w.poll_write_last(cx, &mut chunk)).await.expect("write last");
        let (mut r, _) = server.halves();
        let mut rb = ReadBuffer::new(4096, 4096);
        let got = poll_fn(|cx| r.poll_chunk(cx, &mut rb)).await.expect("read").expect("data");
        assert_eq!(&got[..], b"last words");
        assert!(r.at_end(), "END_STREAM came on the DATA frame: the end is known without another read");
        assert!(poll_fn(|cx| r.poll_chunk(cx, &mut rb)).await.expect("read").is_none());

        // A chunk that is not the last leaves the stream open.
        let (mut client, mut server) = stream_pair().await;
        let (_, mut w) = client.halves();
        let mut chunk = Bytes::from_static(b"more to come");
        poll_fn(|cx| w.poll_write_chunk(cx, &mut chunk)).await.expect("write");
        let (mut r, _) = server.halves();
        poll_fn(|cx| r.poll_chunk(cx, &mut rb)).await.expect("read").expect("data");
        assert!(!r.at_end());
    }
}
