//! A connection whose first bytes can be inspected (protocol detection)
//! and then relayed in full: what was peeked is served first.

use std::{
    future::poll_fn,
    io,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};

use super::io::{ChunkRead, Duplex, ReadBuffer};

pub struct Peekable<T> {
    io: T,
    prefix: BytesMut,
    eof: bool,
    /// A read error met while peeking, kept for the relay: it must see the
    /// failure (and pass a reset on), not a clean end of stream — a socket
    /// read again after a reset reports end of stream.
    failed: Option<(io::ErrorKind, String)>,
}

impl<T: Duplex> Peekable<T> {
    pub fn new(io: T) -> Self {
        Self { io, prefix: BytesMut::new(), eof: false, failed: None }
    }

    /// Reads until at least `want` bytes are buffered or the peer ends its
    /// side, and returns what is buffered. Wrap it in a timeout: a peer
    /// that speaks second sends nothing.
    pub async fn peek(&mut self, want: usize) -> io::Result<&[u8]> {
        while self.prefix.len() < want && !self.eof {
            self.peek_more(want).await?;
        }
        Ok(&self.prefix)
    }

    /// Reads one more chunk unless `max` bytes are buffered or the peer
    /// ended its side; returns what is buffered and whether the peer
    /// ended. For detection, which decides as soon as it can.
    pub async fn peek_more(&mut self, max: usize) -> io::Result<(&[u8], bool)> {
        if let Some((kind, message)) = &self.failed {
            return Err(io::Error::new(*kind, message.clone()));
        }
        if self.prefix.len() < max && !self.eof {
            let room = max - self.prefix.len();
            let mut rb = ReadBuffer::new(room, room);
            let (mut read, _) = self.io.halves();
            match poll_fn(|cx| read.poll_chunk(cx, &mut rb)).await {
                Ok(Some(chunk)) => {
                    self.prefix.extend_from_slice(&chunk);
                    read.release(chunk.len());
                }
                Ok(None) => self.eof = true,
                Err(e) => {
                    self.failed = Some((e.kind(), e.to_string()));
                    return Err(e);
                }
            }
        }
        Ok((&self.prefix, self.eof))
    }

    /// What has been peeked so far.
    pub fn buffered(&self) -> &[u8] {
        &self.prefix
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.io
    }
}

pub struct PeekRead<'a, R> {
    prefix: &'a mut BytesMut,
    eof: bool,
    failed: &'a mut Option<(io::ErrorKind, String)>,
    inner: R,
}

impl<R: ChunkRead> ChunkRead for PeekRead<'_, R> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>, rb: &mut ReadBuffer) -> Poll<io::Result<Option<Bytes>>> {
        if !self.prefix.is_empty() {
            return Poll::Ready(Ok(Some(self.prefix.split().freeze())));
        }
        // Once, after what was peeked: the error the peek met.
        if let Some((kind, message)) = self.failed.take() {
            return Poll::Ready(Err(io::Error::new(kind, message)));
        }
        if self.eof {
            return Poll::Ready(Ok(None));
        }
        self.inner.poll_chunk(cx, rb)
    }

    fn release(&mut self, n: usize) {
        // The peeked prefix was already released when it was read.
        self.inner.release(n);
    }

    fn at_end(&self) -> bool {
        // After the prefix: the peek met the end, or the last read did.
        self.prefix.is_empty() && self.failed.is_none() && (self.eof || self.inner.at_end())
    }
}

impl<T: Duplex> Duplex for Peekable<T> {
    type Read<'a>
        = PeekRead<'a, T::Read<'a>>
    where
        T: 'a;
    type Write<'a>
        = T::Write<'a>
    where
        T: 'a;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        let (inner, write) = self.io.halves();
        (PeekRead { prefix: &mut self.prefix, eof: self.eof, failed: &mut self.failed, inner }, write)
    }

    fn abort(&mut self) {
        self.io.abort();
    }

    fn reset_on_exit(&mut self, on: bool) {
        self.io.reset_on_exit(on);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::transport::{relay, RelayOptions, Stream};

    /// A reset met while peeking is a reset for the relay too: read
    /// again, the socket would report a clean end of stream.
    #[tokio::test]
    async fn a_reset_met_while_peeking_reaches_the_relay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dialled = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"));
        let (ours, accepted) = tokio::join!(dialled, listener.accept());
        let (theirs, _) = accepted.expect("accept");
        socket2::SockRef::from(&theirs).set_linger(Some(std::time::Duration::ZERO)).expect("linger");
        drop(theirs);
        let mut a = Peekable::new(ours.expect("connect"));
        let err = a.peek_more(16).await.expect_err("reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        let (other_far, other) = tokio::io::duplex(64);
        drop(other_far);
        let mut b = Stream::new(other);
        let cut = tokio_util::sync::CancellationToken::new();
        let relayed = relay(&mut a, &mut b, RelayOptions::default(), &cut, |_| {}).await;
        assert_eq!(relayed.end, crate::transport::End::Reset, "{:?}", relayed.error);
    }

    #[tokio::test]
    async fn peeked_bytes_are_relayed_first() {
        let (mut client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        let mut a = Peekable::new(Stream::new(proxy_a));
        let seen = a.peek(4).await.expect("peek").to_vec();
        assert!(seen.starts_with(b"GET "), "{seen:?}");
        client.write_all(b"\r\n").await.expect("write");
        client.shutdown().await.expect("close");
        let mut b = Stream::new(proxy_b);
        let cut = tokio_util::sync::CancellationToken::new();
        let relay =
            tokio::spawn(async move { relay(&mut a, &mut b, RelayOptions::default(), &cut, |_| {}).await.sent });
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut server, &mut got).await.expect("read");
        assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
        drop(server);
        assert_eq!(relay.await.expect("relay"), 18);
    }
}
