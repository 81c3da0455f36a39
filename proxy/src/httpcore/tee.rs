//! Copying a request body to a mirror as it passes, without ever making
//! the real request wait.
//!
//! The real body ([`Tee`]) hands each frame on at once and offers a clone
//! (a reference count, not a copy of the bytes) to each mirror's
//! [`CopiedBody`] through a bounded channel. A mirror that falls behind, or
//! a body past [`MAX_COPIED_BODY`], loses its copy — the mirror's body then
//! fails, so the shadow never gets a truncated request that looks whole —
//! and the real request goes on unaffected.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// The most of a body a mirror gets a copy of (Linkerd's limit for bodies
/// it buffers for a retry): past it the copy is dropped and counted as
/// skipped.
pub const MAX_COPIED_BODY: u64 = 64 * 1024;
/// Frames a copy may lag behind the real body before it is dropped.
const LAG: usize = 256;

/// How a copy ended, as its sender saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CopyState {
    Running = 0,
    /// Every frame was handed over.
    Complete = 1,
    /// The body was larger than [`MAX_COPIED_BODY`].
    TooLarge = 2,
    /// The mirror lagged, or the real body failed or was abandoned.
    Cut = 3,
}

impl CopyState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Complete,
            2 => Self::TooLarge,
            3 => Self::Cut,
            _ => Self::Running,
        }
    }
}

/// One frame of a copy (`Frame` is not `Clone`).
#[derive(Clone)]
enum Piece {
    Data(Bytes),
    Trailers(http::HeaderMap),
}

/// The sending half of one copy.
pub struct CopySender {
    tx: mpsc::Sender<Piece>,
    state: Arc<AtomicU8>,
}

impl CopySender {
    fn end(self, state: CopyState) {
        // Stored before the channel closes (the sender drops after this):
        // the copy reads it once it sees the channel closed.
        self.state.store(state as u8, Ordering::Release);
    }
}

/// A mirror's copy of a request body (or an empty body).
pub struct CopiedBody {
    rx: Option<mpsc::Receiver<Piece>>,
    state: Arc<AtomicU8>,
}

#[derive(Debug, thiserror::Error)]
#[error("the copied request body was cut short ({0:?})")]
pub struct CopyCut(CopyState);

impl CopiedBody {
    /// No body at all.
    pub fn empty() -> Self {
        Self { rx: None, state: Arc::new(AtomicU8::new(CopyState::Complete as u8)) }
    }

    /// A copy to be filled by the returned sender (attached to the real
    /// body with [`Tee::new`]).
    pub fn channel() -> (CopySender, Self) {
        let (tx, rx) = mpsc::channel(LAG);
        let state = Arc::new(AtomicU8::new(CopyState::Running as u8));
        (CopySender { tx, state: state.clone() }, Self { rx: Some(rx), state })
    }

    /// How the copy ended (`Running` while it has not).
    pub fn state(&self) -> CopyState {
        CopyState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// A handle on the copy's end state that outlives the body (which the
    /// HTTP client consumes).
    pub fn state_handle(&self) -> CopyStateHandle {
        CopyStateHandle(self.state.clone())
    }
}

/// See [`CopiedBody::state_handle`].
pub struct CopyStateHandle(Arc<AtomicU8>);

impl CopyStateHandle {
    pub fn get(&self) -> CopyState {
        CopyState::from_u8(self.0.load(Ordering::Acquire))
    }
}

impl Body for CopiedBody {
    type Data = Bytes;
    type Error = CopyCut;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, CopyCut>>> {
        let Some(rx) = &mut self.rx else { return Poll::Ready(None) };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(Piece::Data(data))) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Poll::Ready(Some(Piece::Trailers(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(None) => {
                self.rx = None;
                match self.state() {
                    CopyState::Complete => Poll::Ready(None),
                    other => Poll::Ready(Some(Err(CopyCut(other)))),
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rx.is_none() && self.state() == CopyState::Complete
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The real request body, handing copies of its frames to mirrors.
pub struct Tee<B> {
    inner: B,
    copies: Vec<CopySender>,
    bytes: u64,
}

impl<B: Body> Tee<B> {
    /// `copies` is empty for a request nobody mirrors (no cost beyond an
    /// empty check per frame).
    pub fn new(inner: B, copies: Vec<CopySender>) -> Self {
        Self { inner, copies, bytes: 0 }
    }

    fn end_all(&mut self, state: CopyState) {
        for c in self.copies.drain(..) {
            c.end(state);
        }
    }
}

impl<B> Drop for Tee<B> {
    fn drop(&mut self) {
        // Abandoned before its end: the copies must not look complete.
        for c in self.copies.drain(..) {
            c.end(CopyState::Cut);
        }
    }
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if this.copies.is_empty() {
            return polled;
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if this.bytes > MAX_COPIED_BODY {
                    this.end_all(CopyState::TooLarge);
                } else {
                    let copy = match (frame.data_ref(), frame.trailers_ref()) {
                        (Some(data), _) => Piece::Data(data.clone()),
                        (None, Some(trailers)) => Piece::Trailers(trailers.clone()),
                        _ => return polled,
                    };
                    // A copy that cannot take the frame now loses it all:
                    // waiting for it would hold up the real request.
                    let mut i = 0;
                    while i < this.copies.len() {
                        if this.copies[i].tx.try_send(copy.clone()).is_ok() {
                            i += 1;
                        } else {
                            this.copies.swap_remove(i).end(CopyState::Cut);
                        }
                    }
                    if this.inner.is_end_stream() || frame.is_trailers() {
                        this.end_all(CopyState::Complete);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => this.end_all(CopyState::Cut),
            Poll::Ready(None) => this.end_all(CopyState::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Frames = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>;

    fn body(chunks: Vec<&'static [u8]>) -> StreamBody<Frames> {
        let frames: Vec<_> = chunks.into_iter().map(|c| Ok(Frame::data(Bytes::from_static(c)))).collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_copy_gets_every_byte_and_ends_when_the_body_ends() {
        let (tx, copy) = CopiedBody::channel();
        let real = Tee::new(body(vec![b"hello ", b"world"]), vec![tx]);
        let got = real.collect().await.expect("real body").to_bytes();
        assert_eq!(&got[..], b"hello world");
        let copied = copy.collect().await.expect("copy").to_bytes();
        assert_eq!(&copied[..], b"hello world");
    }

    #[tokio::test]
    async fn a_body_past_the_limit_fails_the_copy_but_not_the_request() {
        static BIG: [u8; 40 * 1024] = [7; 40 * 1024];
        let (tx, copy) = CopiedBody::channel();
        let state = copy.state_handle();
        let real = Tee::new(body(vec![&BIG, &BIG]), vec![tx]);
        assert_eq!(real.collect().await.expect("real body").to_bytes().len(), 80 * 1024);
        assert!(copy.collect().await.is_err(), "a truncated copy must not end cleanly");
        assert_eq!(state.get(), CopyState::TooLarge);
    }

    #[tokio::test]
    async fn an_abandoned_body_fails_its_copy() {
        let (tx, copy) = CopiedBody::channel();
        let mut real = Tee::new(body(vec![b"part", b"never read"]), vec![tx]);
        let _first = real.frame().await;
        drop(real);
        assert!(copy.collect().await.is_err());
    }
}
