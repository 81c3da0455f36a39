//! Any [`Duplex`] connection — a TCP socket, a tunnelled h2 stream, a
//! [`Peekable`](super::Peekable) whose first bytes were inspected — as the
//! byte stream hyper's HTTP/1 and HTTP/2 connections read and write
//! (`hyper::rt::Read` / `Write`), so the HTTP layer runs over every
//! transport the opaque relay does.
//!
//! Reads hand hyper the chunk the transport read (copied into hyper's
//! cursor; a chunk larger than the cursor is kept for the next read).
//! Writes are taken one at a time: the bytes hyper passes are copied into
//! one chunk, accepted at once, and written before the next write is
//! accepted — so at most one write is buffered, and back-pressure reaches
//! hyper as `Pending`.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes};

use super::io::{ChunkRead, ChunkWrite, Duplex, ReadBuffer};

pub struct HyperIo<T> {
    io: T,
    read_buffer: ReadBuffer,
    /// Read but not yet handed to hyper.
    unread: Bytes,
    /// Accepted from hyper but not yet written.
    unwritten: Bytes,
}

impl<T: Duplex> HyperIo<T> {
    /// `initial`/`max`: the read buffer's sizes, as for the relay.
    pub fn new(io: T, initial: usize, max: usize) -> Self {
        Self { io, read_buffer: ReadBuffer::new(initial, max), unread: Bytes::new(), unwritten: Bytes::new() }
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.io
    }

    pub fn into_inner(self) -> T {
        self.io
    }

    /// Writes what was accepted earlier.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.unwritten.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let (_, mut write) = self.io.halves();
        write.poll_write_chunk(cx, &mut self.unwritten)
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
        ready!(this.poll_drain(cx))?;
        this.unwritten = Bytes::copy_from_slice(buf);
        // Started now; finished by the next write, flush or shutdown.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
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
