//! Connections as two halves that move `Bytes` chunks.
//!
//! Reading hands out the chunk the data landed in; writing takes that chunk
//! as it is. For a TCP socket → h2 stream the chunk read from the socket
//! becomes the DATA frame; for h2 → TCP the received frame is written to
//! the socket — no copy in between, and the relay allocates nothing per
//! read beyond the buffer it reads into.

use std::{
    io,
    net::Shutdown,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadHalf, WriteHalf},
    net::TcpStream,
};

/// The read buffer of one direction of a connection. It holds memory only
/// while data flows: it is allocated when the socket becomes readable,
/// doubles (up to `max`) while reads fill it, and is released when the
/// socket has nothing more to read — so an idle connection pins no buffer.
#[derive(Debug)]
pub struct ReadBuffer {
    buf: BytesMut,
    size: usize,
    max: usize,
}

impl ReadBuffer {
    pub fn new(initial: usize, max: usize) -> Self {
        let max = max.max(1);
        Self { buf: BytesMut::new(), size: initial.clamp(1, max), max }
    }

    /// Room to read into. Reuses the previous allocation once the chunks
    /// cut from it have been written and dropped.
    pub fn space(&mut self) -> &mut BytesMut {
        if self.buf.capacity() < self.size {
            self.buf.reserve(self.size);
        }
        &mut self.buf
    }

    /// The `n` bytes just read, as a chunk; grows the next read if this one
    /// filled the buffer.
    pub fn take(&mut self, n: usize) -> Bytes {
        if n >= self.size && self.size < self.max {
            self.size = (self.size * 2).min(self.max);
        }
        self.buf.split().freeze()
    }

    /// Nothing to read now: let the memory go.
    pub fn idle(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Bytes this buffer holds on to now (for tests and measurements).
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }
}

/// The reading half of a connection.
pub trait ChunkRead {
    /// The next chunk of data, or `None` at end of stream.
    fn poll_chunk(&mut self, cx: &mut Context<'_>, rb: &mut ReadBuffer) -> Poll<io::Result<Option<Bytes>>>;
    /// `n` bytes of the last chunk were delivered onward (an h2 stream then
    /// returns flow-control window to its peer).
    fn release(&mut self, _n: usize) {}
    /// The end of stream came right behind the last chunk: the next poll
    /// would return `None`. Lets the relay send that chunk and the end as
    /// one (data and FIN in one TCP segment).
    fn at_end(&self) -> bool {
        false
    }
}

/// The writing half of a connection.
pub trait ChunkWrite {
    /// Writes all of `chunk`, advancing it as bytes are accepted.
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>>;
    /// End of stream for the peer (FIN, END_STREAM); the other direction
    /// stays open.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Writes all of `chunk`, then ends the stream: the two at once where
    /// the connection can.
    fn poll_write_last(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        ready!(self.poll_write_chunk(cx, chunk))?;
        self.poll_finish(cx)
    }
}

/// A connection that can be split into halves and cut abortively.
pub trait Duplex {
    type Read<'a>: ChunkRead
    where
        Self: 'a;
    type Write<'a>: ChunkWrite
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
    /// Makes the end of this connection a failure the peer sees (TCP reset,
    /// h2 RST_STREAM), not a clean end of stream.
    fn abort(&mut self);
    /// While set, the connection ends with a reset if this process dies
    /// (SO_LINGER 0 on a socket): a crash must never look like a clean end
    /// to the peer. Cleared before an orderly close.
    fn reset_on_exit(&mut self, _on: bool) {}
}

/// A borrowed connection is a connection: the caller keeps it afterwards.
impl<T: Duplex> Duplex for &mut T {
    type Read<'a>
        = T::Read<'a>
    where
        Self: 'a;
    type Write<'a>
        = T::Write<'a>
    where
        Self: 'a;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        (**self).halves()
    }

    fn abort(&mut self) {
        (**self).abort();
    }

    fn reset_on_exit(&mut self, on: bool) {
        (**self).reset_on_exit(on);
    }
}

/// A TCP socket's reading half: readiness and `try_read` take `&TcpStream`,
/// so no lock or split is needed.
#[derive(Debug)]
pub struct TcpRead<'a> {
    socket: &'a TcpStream,
    /// The last chunk ended the stream (see [`ChunkRead::at_end`]).
    ended: bool,
    /// An error met reading on after a chunk, returned next (a reset must
    /// reach the relay as one, never as the end of stream that the
    /// following read would report).
    failed: Option<io::Error>,
}

/// A TCP socket's writing half.
#[derive(Debug)]
pub struct TcpWrite<'a>(&'a TcpStream);

impl ChunkRead for TcpRead<'_> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>, rb: &mut ReadBuffer) -> Poll<io::Result<Option<Bytes>>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        let socket = self.socket;
        // Bytes read into `rb` for this chunk so far.
        let mut got = 0;
        loop {
            if let Poll::Ready(ready) = socket.poll_read_ready(cx) {
                ready?;
            } else if got > 0 {
                return Poll::Ready(Ok(Some(rb.take(got))));
            } else {
                rb.idle();
                return Poll::Pending;
            }
            let space = rb.space();
            let room = space.capacity() - space.len();
            match socket.try_read_buf(space) {
                Ok(0) if got == 0 => return Poll::Ready(Ok(None)),
                Ok(0) => {
                    self.ended = true;
                    return Poll::Ready(Ok(Some(rb.take(got))));
                }
                Ok(n) => {
                    got += n;
                    if n < room {
                        // A read that did not fill the buffer drained the
                        // socket (edge-triggered epoll; tokio's own reads
                        // assume the same): forget the readiness so the next
                        // read waits for the next edge, rather than making a
                        // recv that finds nothing (one syscall per message
                        // each way: half the recvs of an HTTP exchange).
                        // The closure makes no call: reporting WouldBlock
                        // only clears the readiness this read consumed.
                        let _ = socket.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                        // Still ready now means the peer's FIN is in too
                        // (the closed state is never cleared): read on to
                        // the end, so that the chunk and the end of stream
                        // go out together. `try_io` only looks at the
                        // readiness (no syscall, and unlike
                        // `poll_read_ready` it registers no wake-up).
                        if socket.try_io(Interest::READABLE, || Ok(())).is_ok() {
                            continue;
                        }
                    }
                    return Poll::Ready(Ok(Some(rb.take(got))));
                }
                // Readiness is cleared: the next poll registers for wake-up.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => {
                    return Poll::Ready(Ok(Some(rb.take(got))))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => rb.idle(),
                Err(e) if got > 0 => {
                    // The data read is delivered; the error comes next time.
                    self.failed = Some(e);
                    return Poll::Ready(Ok(Some(rb.take(got))));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn at_end(&self) -> bool {
        self.ended
    }
}

impl ChunkWrite for TcpWrite<'_> {
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        while !chunk.is_empty() {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(chunk) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => chunk.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(self.0).shutdown(Shutdown::Write))
    }

    /// `MSG_MORE` holds the last bytes back until the shutdown, which sets
    /// FIN on them: one segment where a write and a shutdown would send two
    /// (and the peer acknowledges one). HAProxy does the same.
    fn poll_write_last(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        let socket = socket2::SockRef::from(self.0);
        while !chunk.is_empty() {
            ready!(self.0.poll_write_ready(cx))?;
            let sent = self
                .0
                .try_io(Interest::WRITABLE, || socket.send_with_flags(chunk, libc::MSG_MORE | libc::MSG_NOSIGNAL));
            match sent {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => chunk.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.poll_finish(cx)
    }
}

impl Duplex for TcpStream {
    type Read<'a> = TcpRead<'a>;
    type Write<'a> = TcpWrite<'a>;

    fn halves(&mut self) -> (TcpRead<'_>, TcpWrite<'_>) {
        (TcpRead { socket: self, ended: false, failed: None }, TcpWrite(self))
    }

    fn abort(&mut self) {
        reset_on_close(&*self, true);
    }

    fn reset_on_exit(&mut self, on: bool) {
        // The kernel closes a dead process's sockets; armed, that close is
        // a reset.
        reset_on_close(&*self, on);
    }
}

/// Arms (or disarms) SO_LINGER 0 on a socket: closing it then sends a
/// reset instead of a FIN.
pub(super) fn reset_on_close(socket: impl std::os::fd::AsFd, on: bool) {
    let _ = socket2::SockRef::from(&socket).set_linger(on.then_some(std::time::Duration::ZERO));
}

/// Any `AsyncRead + AsyncWrite` (a TLS stream, an in-memory pipe) as a
/// [`Duplex`]. Split through tokio's lock, so meant for tests and cold
/// paths; sockets and h2 streams have their own halves.
pub struct Stream<T> {
    read: ReadHalf<T>,
    write: WriteHalf<T>,
    aborted: bool,
}

impl<T: AsyncRead + AsyncWrite> Stream<T> {
    pub fn new(io: T) -> Self {
        let (read, write) = tokio::io::split(io);
        Self { read, write, aborted: false }
    }

    /// Whether [`Duplex::abort`] was called (what a test asserts).
    pub fn aborted(&self) -> bool {
        self.aborted
    }
}

pub struct StreamRead<'a, R>(&'a mut R);
pub struct StreamWrite<'a, W>(&'a mut W);

impl<R: AsyncRead + Unpin> ChunkRead for StreamRead<'_, R> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>, rb: &mut ReadBuffer) -> Poll<io::Result<Option<Bytes>>> {
        match tokio_util::io::poll_read_buf(Pin::new(&mut *self.0), cx, rb.space()) {
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(None)),
            Poll::Ready(Ok(n)) => Poll::Ready(Ok(Some(rb.take(n)))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                rb.idle();
                Poll::Pending
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> ChunkWrite for StreamWrite<'_, W> {
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        while !chunk.is_empty() {
            match ready!(Pin::new(&mut *self.0).poll_write(cx, chunk))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => chunk.advance(n),
            }
        }
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + AsyncWrite> Duplex for Stream<T> {
    type Read<'a>
        = StreamRead<'a, ReadHalf<T>>
    where
        T: 'a;
    type Write<'a>
        = StreamWrite<'a, WriteHalf<T>>
    where
        T: 'a;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        (StreamRead(&mut self.read), StreamWrite(&mut self.write))
    }

    fn abort(&mut self) {
        self.aborted = true;
    }
}

/// One of two kinds of connection (a plain socket or a tunnel stream), as
/// one type, so a path can be generic over "whatever the endpoint gave".
#[derive(Debug)]
pub enum Either<L, R> {
    Left(L),
    Right(R),
}

impl<L: ChunkRead, R: ChunkRead> ChunkRead for Either<L, R> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>, rb: &mut ReadBuffer) -> Poll<io::Result<Option<Bytes>>> {
        match self {
            Self::Left(l) => l.poll_chunk(cx, rb),
            Self::Right(r) => r.poll_chunk(cx, rb),
        }
    }

    fn release(&mut self, n: usize) {
        match self {
            Self::Left(l) => l.release(n),
            Self::Right(r) => r.release(n),
        }
    }

    fn at_end(&self) -> bool {
        match self {
            Self::Left(l) => l.at_end(),
            Self::Right(r) => r.at_end(),
        }
    }
}

impl<L: ChunkWrite, R: ChunkWrite> ChunkWrite for Either<L, R> {
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        match self {
            Self::Left(l) => l.poll_write_chunk(cx, chunk),
            Self::Right(r) => r.poll_write_chunk(cx, chunk),
        }
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Left(l) => l.poll_finish(cx),
            Self::Right(r) => r.poll_finish(cx),
        }
    }

    fn poll_write_last(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        match self {
            Self::Left(l) => l.poll_write_last(cx, chunk),
            Self::Right(r) => r.poll_write_last(cx, chunk),
        }
    }
}

impl<L: Duplex, R: Duplex> Duplex for Either<L, R> {
    type Read<'a>
        = Either<L::Read<'a>, R::Read<'a>>
    where
        Self: 'a;
    type Write<'a>
        = Either<L::Write<'a>, R::Write<'a>>
    where
        Self: 'a;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        match self {
            Self::Left(l) => {
                let (r, w) = l.halves();
                (Either::Left(r), Either::Left(w))
            }
            Self::Right(x) => {
                let (r, w) = x.halves();
                (Either::Right(r), Either::Right(w))
            }
        }
    }

    fn abort(&mut self) {
        match self {
            Self::Left(l) => l.abort(),
            Self::Right(r) => r.abort(),
        }
    }

    fn reset_on_exit(&mut self, on: bool) {
        match self {
            Self::Left(l) => l.reset_on_exit(on),
            Self::Right(r) => r.reset_on_exit(on),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio::io::AsyncReadExt;

    use super::*;

    fn segments_in(socket: &TcpStream) -> u32 {
        crate::sys::tcp_segments_in(std::os::fd::AsFd::as_fd(socket)).expect("TCP_INFO")
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let connect = TcpStream::connect(listener.local_addr().expect("addr"));
        let (client, accepted) = tokio::join!(connect, listener.accept());
        let client = client.expect("connect");
        client.set_nodelay(true).expect("nodelay");
        (client, accepted.expect("accept").0)
    }

    /// Sends `data` as the last chunk (or as a chunk and then the end) and
    /// returns how many segments the peer took to receive it all.
    async fn segments_for_last(data: &'static [u8], together: bool) -> u32 {
        let (mut ours, mut peer) = pair().await;
        let before = segments_in(&peer);
        let (_, mut w) = ours.halves();
        let mut chunk = Bytes::from_static(data);
        if together {
            poll_fn(|cx| w.poll_write_last(cx, &mut chunk)).await.expect("write last");
        } else {
            poll_fn(|cx| w.poll_write_chunk(cx, &mut chunk)).await.expect("write");
            poll_fn(|cx| w.poll_finish(cx)).await.expect("finish");
        }
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("read to the end");
        assert_eq!(got, data);
        segments_in(&peer) - before
    }

    #[tokio::test]
    async fn the_last_chunk_and_the_end_go_in_one_segment() {
        assert_eq!(segments_for_last(b"response", false).await, 2, "a write and a shutdown: data, then FIN");
        assert_eq!(segments_for_last(b"response", true).await, 1, "data and FIN together");
    }

    #[tokio::test]
    async fn a_chunk_read_with_the_end_behind_it_says_so() {
        let (mut ours, mut peer) = pair().await;
        tokio::io::AsyncWriteExt::write_all(&mut peer, b"last words").await.expect("write");
        // Closed with nothing unread: a FIN behind the data.
        drop(peer);
        let (mut r, _) = ours.halves();
        let mut rb = ReadBuffer::new(4096, 65536);
        let chunk = poll_fn(|cx| r.poll_chunk(cx, &mut rb)).await.expect("read").expect("a chunk");
        assert_eq!(&chunk[..], b"last words");
        assert!(r.at_end(), "the FIN was in: no read needed to learn of the end");

        // With the stream still open, a chunk is just a chunk.
        let (mut ours, mut peer) = pair().await;
        tokio::io::AsyncWriteExt::write_all(&mut peer, b"more to come").await.expect("write");
        let (mut r, _) = ours.halves();
        let chunk = poll_fn(|cx| r.poll_chunk(cx, &mut rb)).await.expect("read").expect("a chunk");
        assert_eq!(&chunk[..], b"more to come");
        assert!(!r.at_end());
    }

    #[test]
    fn read_buffers_grow_under_load_and_are_released_when_idle() {
        let mut rb = ReadBuffer::new(4096, 65536);
        assert_eq!(rb.held(), 0, "nothing allocated before data");
        rb.space().extend_from_slice(&[0; 4096]);
        let chunk = rb.take(4096);
        assert_eq!(chunk.len(), 4096);
        assert!(rb.space().capacity() >= 8192, "a full read doubles the next one");
        drop(chunk);
        rb.idle();
        assert_eq!(rb.held(), 0, "idle: no buffer kept");
        for _ in 0..10 {
            let n = rb.space().capacity();
            rb.space().extend_from_slice(&vec![0; n]);
            drop(rb.take(n));
        }
        assert!(rb.space().capacity() <= 65536 * 2, "never past the maximum (plus reclaimed slack)");
    }
}
