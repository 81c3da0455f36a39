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
}

/// The writing half of a connection.
pub trait ChunkWrite {
    /// Writes all of `chunk`, advancing it as bytes are accepted.
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>>;
    /// End of stream for the peer (FIN, END_STREAM); the other direction
    /// stays open.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
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
pub struct TcpRead<'a>(&'a TcpStream);

/// A TCP socket's writing half.
#[derive(Debug)]
pub struct TcpWrite<'a>(&'a TcpStream);

impl ChunkRead for TcpRead<'_> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>, rb: &mut ReadBuffer) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            if let Poll::Ready(ready) = self.0.poll_read_ready(cx) {
                ready?;
            } else {
                rb.idle();
                return Poll::Pending;
            }
            let space = rb.space();
            let room = space.capacity() - space.len();
            match self.0.try_read_buf(space) {
                Ok(0) => return Poll::Ready(Ok(None)),
                Ok(n) => {
                    if n < room {
                        // A read that did not fill the buffer drained the
                        // socket (edge-triggered epoll; tokio's own reads
                        // assume the same): forget the readiness so the next
                        // read waits for the next edge, rather than making a
                        // recv that finds nothing (one syscall per message
                        // each way: half the recvs of an HTTP exchange).
                        // The closure makes no call: reporting WouldBlock
                        // only clears the readiness this read consumed.
                        let _ = self.0.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                    }
                    return Poll::Ready(Ok(Some(rb.take(n))));
                }
                // Readiness is cleared: the next poll registers for wake-up.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => rb.idle(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
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
}

impl Duplex for TcpStream {
    type Read<'a> = TcpRead<'a>;
    type Write<'a> = TcpWrite<'a>;

    fn halves(&mut self) -> (TcpRead<'_>, TcpWrite<'_>) {
        (TcpRead(self), TcpWrite(self))
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
    use super::*;

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
