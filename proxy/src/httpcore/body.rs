//! Bodies on the way through: counted as they pass, and a request's end
//! (last byte, error or abandonment) reported exactly once.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use super::tee::{CopiedBody, Tee};

/// What goes upstream: the client's body (handing copies to mirrors), or
/// a mirror's copy of one (empty for a request without a body, and for a
/// resend).
pub type UpBody = http_body_util::Either<Counted<Tee<Incoming>>, CopiedBody>;
/// What goes back to the client: the endpoint's body, or one the proxy
/// made (an error, a fault's abort).
pub type DownBody = Counted<http_body_util::Either<Incoming, Full<Bytes>>>;

/// Called once when a counted body ends: (bytes, how it ended, the
/// `grpc-status` seen in trailers, if any).
pub trait OnEnd: Send + 'static {
    fn ended(self: Box<Self>, bytes: u64, end: BodyEnd, grpc_status: Option<u8>);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// The last byte passed.
    Complete,
    /// The other side failed mid-body (reset, connection lost).
    Error,
    /// Dropped before its end (the client went away).
    Abandoned,
}

/// A body whose data bytes are counted (into `shared`, if given, too).
pub struct Counted<B> {
    inner: B,
    bytes: u64,
    shared: Option<Arc<AtomicU64>>,
    on_end: Option<Box<dyn OnEnd>>,
    grpc_status: Option<u8>,
    /// Empty from the start: hyper may never poll it, and its drop is then
    /// its complete end, not an abandonment.
    empty: bool,
}

impl<B: Body> Counted<B> {
    pub fn new(inner: B, shared: Option<Arc<AtomicU64>>, on_end: Option<Box<dyn OnEnd>>) -> Self {
        let empty = inner.is_end_stream();
        Self { inner, bytes: 0, shared, on_end, grpc_status: None, empty }
    }
}

impl<B> Counted<B> {
    /// The `grpc-status` of a trailers-only response (in its headers).
    pub fn set_grpc_status(&mut self, status: Option<u8>) {
        self.grpc_status = status;
    }

    fn finish(&mut self, end: BodyEnd) {
        if let Some(on_end) = self.on_end.take() {
            on_end.ended(self.bytes, end, self.grpc_status);
        }
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        self.finish(if self.empty { BodyEnd::Complete } else { BodyEnd::Abandoned });
    }
}

/// `grpc-status` as a number 0..=16, if it is one.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u8> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse::<u8>().ok()?;
    (v <= 16).then_some(v)
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.bytes += n;
                    if let Some(s) = &this.shared {
                        s.fetch_add(n, Ordering::Relaxed);
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    this.grpc_status = grpc_status(trailers);
                }
                // Trailers are always the last frame: the body ends with
                // them, before the peer can see them and act.
                if this.inner.is_end_stream() || frame.is_trailers() {
                    this.finish(BodyEnd::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(BodyEnd::Error);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish(BodyEnd::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response the proxy makes itself (no endpoint answered, a fault).
pub fn local_response(
    status: http::StatusCode,
    text: &'static str,
) -> http::Response<http_body_util::Either<Incoming, Full<Bytes>>> {
    let mut resp = http::Response::new(http_body_util::Either::Right(Full::new(Bytes::from_static(text.as_bytes()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    resp
}
