//! Copying a request body to a mirror as it passes, without ever making
//! the real request wait; and keeping it, up to a limit, for a retry to
//! send again.
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

/// The most of a body a mirror gets a copy of, and a retry may send again
/// (Linkerd's limit for bodies it buffers for a retry): past it the copy
/// is dropped (a mirror's counted as skipped; the request not retried).
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
#[derive(Clone, Debug)]
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

/// A mirror's copy of a request body, a kept body sent again, or an empty
/// body.
pub struct CopiedBody {
    /// Kept frames, sent first.
    kept: std::collections::VecDeque<Piece>,
    rx: Option<mpsc::Receiver<Piece>>,
    state: Arc<AtomicU8>,
}

#[derive(Debug, thiserror::Error)]
#[error("the copied request body was cut short ({0:?})")]
pub struct CopyCut(CopyState);

impl CopiedBody {
    /// No body at all.
    pub fn empty() -> Self {
        Self::kept(Default::default())
    }

    fn kept(kept: std::collections::VecDeque<Piece>) -> Self {
        Self { kept, rx: None, state: Arc::new(AtomicU8::new(CopyState::Complete as u8)) }
    }

    /// A copy to be filled by the returned sender (attached to the real
    /// body with [`Tee::new`]).
    pub fn channel() -> (CopySender, Self) {
        let (tx, rx) = mpsc::channel(LAG);
        let state = Arc::new(AtomicU8::new(CopyState::Running as u8));
        (CopySender { tx, state: state.clone() }, Self { kept: Default::default(), rx: Some(rx), state })
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
        match self.kept.pop_front() {
            Some(Piece::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
            Some(Piece::Trailers(trailers)) => return Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            None => {}
        }
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
        self.kept.is_empty() && self.rx.is_none() && self.state() == CopyState::Complete
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A request body kept as it passes (up to [`MAX_COPIED_BODY`]), for a
/// retry to send again once the first attempt has read all of it.
#[derive(Debug, Default)]
pub struct Recording(std::sync::Mutex<Recorded>);

#[derive(Debug, Default)]
struct Recorded {
    pieces: std::collections::VecDeque<Piece>,
    complete: bool,
    /// Past the limit, cut, or failed: never sent again.
    lost: bool,
}

impl Recording {
    fn with(&self, f: impl FnOnce(&mut Recorded)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The whole body again, if it was kept whole.
    pub fn body(&self) -> Option<CopiedBody> {
        let r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (r.complete && !r.lost).then(|| CopiedBody::kept(r.pieces.clone()))
    }
}

/// The real request body, handing copies of its frames to mirrors and to
/// a recording for retries.
pub struct Tee<B> {
    inner: B,
    copies: Vec<CopySender>,
    recording: Option<Arc<Recording>>,
    bytes: u64,
}

impl<B: Body> Tee<B> {
    /// `copies` is empty and `recording` none for most requests (no cost
    /// beyond a check per frame).
    pub fn new(inner: B, copies: Vec<CopySender>, recording: Option<Arc<Recording>>) -> Self {
        Self { inner, copies, recording, bytes: 0 }
    }

    fn end_all(&mut self, state: CopyState) {
        for c in self.copies.drain(..) {
            c.end(state);
        }
        if let Some(r) = self.recording.take() {
            r.with(|r| match state {
                CopyState::Complete => r.complete = true,
                _ => {
                    r.lost = true;
                    r.pieces.clear();
                }
            });
        }
    }
}

impl<B> Drop for Tee<B> {
    fn drop(&mut self) {
        // Abandoned before its end: the copies must not look complete.
        for c in self.copies.drain(..) {
            c.end(CopyState::Cut);
        }
        if let Some(r) = self.recording.take() {
            r.with(|r| r.lost = !r.complete);
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
        if this.copies.is_empty() && this.recording.is_none() {
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
                    if let Some(r) = &this.recording {
                        r.with(|r| r.pieces.push_back(copy));
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
        let kept = Arc::new(Recording::default());
        let real = Tee::new(body(vec![b"hello ", b"world"]), vec![tx], Some(kept.clone()));
        let got = real.collect().await.expect("real body").to_bytes();
        assert_eq!(&got[..], b"hello world");
        let copied = copy.collect().await.expect("copy").to_bytes();
        assert_eq!(&copied[..], b"hello world");
        let again = kept.body().expect("kept whole").collect().await.expect("kept").to_bytes();
        assert_eq!(&again[..], b"hello world");
    }

    #[tokio::test]
    async fn a_body_past_the_limit_fails_the_copy_but_not_the_request() {
        static BIG: [u8; 40 * 1024] = [7; 40 * 1024];
        let (tx, copy) = CopiedBody::channel();
        let state = copy.state_handle();
        let kept = Arc::new(Recording::default());
        let real = Tee::new(body(vec![&BIG, &BIG]), vec![tx], Some(kept.clone()));
        assert_eq!(real.collect().await.expect("real body").to_bytes().len(), 80 * 1024);
        assert!(kept.body().is_none(), "a body past the limit is not kept");
        assert!(copy.collect().await.is_err(), "a truncated copy must not end cleanly");
        assert_eq!(state.get(), CopyState::TooLarge);
    }

    #[tokio::test]
    async fn an_abandoned_body_fails_its_copy() {
        let (tx, copy) = CopiedBody::channel();
        let kept = Arc::new(Recording::default());
        let mut real = Tee::new(body(vec![b"part", b"never read"]), vec![tx], Some(kept.clone()));
        let _first = real.frame().await;
        drop(real);
        assert!(copy.collect().await.is_err());
        assert!(kept.body().is_none(), "half a body is not sent again");
    }
}
