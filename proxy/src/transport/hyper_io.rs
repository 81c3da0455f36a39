//! Any [`Duplex`] connection — a TCP socket, a tunnelled h2 stream, a
//! [`Peekable`](super::Peekable) whose first bytes were inspected — as the
//! byte stream hyper's HTTP/1 and HTTP/2 connections read and write
//! (`hyper::rt::Read` / `Write`), so the HTTP layer runs over every
//! transport the opaque relay does.
//!
//! Reads hand hyper the chunk the transport read (copied into hyper's
//! cursor; a chunk larger than the cursor is kept for the next read).
//! Writes are gathered until hyper flushes (vectored writes included) and
//! go out as one chunk: an h2 frame header, its payload and the next frame
//! are one syscall and one segment, not three. At most [`MAX_PENDING`]
//! bytes are gathered; beyond that a write waits for the transport
//! (back-pressure reaches hyper as `Pending`).

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};

use super::io::{ChunkRead, ChunkWrite, Duplex, ReadBuffer};

/// Bytes gathered from hyper before a write must wait for the transport.
pub const MAX_PENDING: usize = 64 * 1024;

pub struct HyperIo<T> {
    io: T,
    read_buffer: ReadBuffer,
    /// Read but not yet handed to hyper.
    unread: Bytes,
    /// Accepted from hyper, not yet handed to the transport.
    pending: BytesMut,
    /// Handed to the transport, not yet all written.
    unwritten: Bytes,
}

impl<T: Duplex> HyperIo<T> {
    /// `initial`/`max`: the read buffer's sizes, as for the relay.
    pub fn new(io: T, initial: usize, max: usize) -> Self {
        Self {
            io,
            read_buffer: ReadBuffer::new(initial, max),
            unread: Bytes::new(),
            pending: BytesMut::new(),
            unwritten: Bytes::new(),
        }
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.io
    }

    pub fn into_inner(self) -> T {
        self.io
    }

    /// Writes everything accepted so far.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.unwritten.is_empty() {
                if self.pending.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                // The allocation is reclaimed by the next `extend` once the
                // transport has let go of the chunk.
                self.unwritten = self.pending.split().freeze();
            }
            let (_, mut write) = self.io.halves();
            ready!(write.poll_write_chunk(cx, &mut self.unwritten))?;
        }
    }

    /// Room for `n` more bytes, writing what is gathered if there is none.
    fn poll_room(&mut self, cx: &mut Context<'_>, n: usize) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() && self.pending.len() + n > MAX_PENDING {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: Duplex + Unpin> hyper::rt::Read for HyperIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.unread.is_empty() {
            let (mut read, _) = this.io.halves();
            match ready!(read.poll_chunk(cx, &mut this.read_buffer))? {
                Some(chunk) => {
                    read.release(chunk.len());
                    this.unread = chunk;
                }
                // End of stream: a read of nothing.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: Duplex + Unpin> hyper::rt::Write for HyperIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx, buf.len()))?;
        let n = buf.len().min(MAX_PENDING);
        this.pending.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room(cx, total.min(MAX_PENDING)))?;
        let mut taken = 0;
        for b in bufs {
            let n = b.len().min(MAX_PENDING.saturating_sub(taken));
            this.pending.extend_from_slice(&b[..n]);
            taken += n;
            if n < b.len() {
                break;
            }
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_drain(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        let (_, mut write) = this.io.halves();
        write.poll_finish(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Full};
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::transport::{Peekable, Stream};

    /// An HTTP/1.1 exchange through hyper's server and client, both over
    /// `HyperIo`, the server's side peeked at first (as detection does).
    #[tokio::test]
    async fn hyper_http1_over_a_peeked_duplex() {
        let (client_end, server_end) = tokio::io::duplex(64);
        let server = tokio::spawn(async move {
            let mut peeked = Peekable::new(Stream::new(server_end));
            let first = peeked.peek(4).await.expect("peek").to_vec();
            assert_eq!(&first[..4], b"POST");
            let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let body = req.into_body().collect().await.expect("body").to_bytes();
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from([&b"echo:"[..], &body].concat()))))
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(HyperIo::new(peeked, 16, 16), service)
                .await
                .expect("serve");
        });
        let (mut sender, conn) = hyper::client::conn::http1::handshake(HyperIo::new(Stream::new(client_end), 16, 16))
            .await
            .expect("handshake");
        let driver = tokio::spawn(conn);
        // Larger than every buffer on the way: chunked through them.
        let body = Bytes::from(vec![b'x'; 10_000]);
        let req = hyper::Request::post("/echo").header("host", "a").body(Full::new(body.clone())).expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let got = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(got.len(), 5 + body.len());
        assert!(got.starts_with(b"echo:xxx"));
        drop(sender);
        driver.await.expect("driver").expect("client connection");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn end_of_stream_and_shutdown_pass_through() {
        use hyper::rt::{Read, Write};
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut io = HyperIo::new(Stream::new(ours), 8, 8);
        std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, b"hello")).await.expect("write");
        std::future::poll_fn(|cx| Pin::new(&mut io).poll_shutdown(cx)).await.expect("shutdown");
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut peer, &mut got).await.expect("read");
        assert_eq!(got, b"hello");
        peer.shutdown().await.expect("peer shutdown");
        let mut storage = [std::mem::MaybeUninit::<u8>::uninit(); 4];
        let mut buf = hyper::rt::ReadBuf::uninit(&mut storage);
        std::future::poll_fn(|cx| Pin::new(&mut io).poll_read(cx, buf.unfilled())).await.expect("read");
        assert_eq!(buf.filled().len(), 0, "end of stream is a read of nothing");
    }
}
