//! Body types on the request path: `RequestBody` guards what clients upload (size and time limits);
//! `ProxyBody` carries the upstream's streamed response, a static file, or a small response of our own.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_http::services::fs::ServeFileSystemResponseBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a client's request body was cut off. Found again in the upstream client's error chain so the
/// client gets the right status (413, 408) instead of a generic 502.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    #[error("request body not received within {0:?}")]
    TimedOut(Duration),
    #[error("client stopped sending the request body: {0}")]
    Client(#[source] hyper::Error),
}

pin_project! {
    /// A client's request body on its way upstream: either read completely before the upstream is
    /// contacted (small bodies, so a slow client never holds a Gunicorn worker, as nginx's request
    /// buffering does), or streamed with a byte limit and a deadline for the whole body.
    #[project = RequestBodyProj]
    pub enum RequestBody {
        Buffered { data: Option<Bytes> },
        Streaming {
            #[pin]
            inner: Incoming,
            remaining: u64,
            limit: u64,
            timeout: Duration,
            // Started at the first poll that has to wait: bodies that arrive at once never allocate a timer.
            deadline: Option<Pin<Box<Sleep>>>,
        },
    }
}

impl RequestBody {
    pub fn streaming(inner: Incoming, limit: u64, timeout: Duration) -> Self {
        RequestBody::Streaming {
            inner,
            remaining: limit,
            limit,
            timeout,
            deadline: None,
        }
    }

    pub fn buffered(data: Bytes) -> Self {
        RequestBody::Buffered {
            data: (!data.is_empty()).then_some(data),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let (inner, remaining, limit, timeout, deadline) = match self.project() {
            RequestBodyProj::Buffered { data } => {
                return Poll::Ready(data.take().map(|d| Ok(Frame::data(d))));
            }
            RequestBodyProj::Streaming {
                inner,
                remaining,
                limit,
                timeout,
                deadline,
            } => (inner, remaining, limit, timeout, deadline),
        };
        match inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > *remaining {
                        return Poll::Ready(Some(Err(BodyError::TooLarge(*limit))));
                    }
                    *remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Client(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let timeout = *timeout;
                let deadline =
                    deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(deadline.as_mut().poll(cx));
                Poll::Ready(Some(Err(BodyError::TimedOut(timeout))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Buffered { data } => data.is_none(),
            RequestBody::Streaming { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestBody::Streaming { inner, .. } => inner.size_hint(),
        }
    }
}

pin_project! {
    /// A response body: the upstream's, streamed through, a file from a static folder, or a small one the
    /// proxy wrote itself.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Upstream { #[pin] body: Incoming },
        File { #[pin] body: ServeFileSystemResponseBody },
        Full { data: Option<Bytes> },
    }
}

impl ProxyBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        ProxyBody::Full {
            data: (!data.is_empty()).then_some(data),
        }
    }

    pub fn empty() -> Self {
        ProxyBody::Full { data: None }
    }

    pub fn file(body: ServeFileSystemResponseBody) -> Self {
        ProxyBody::File { body }
    }
}

impl From<Incoming> for ProxyBody {
    fn from(body: Incoming) -> Self {
        ProxyBody::Upstream { body }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ProxyBodyProj::Upstream { body } => {
                let frame = ready!(body.poll_frame(cx));
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            ProxyBodyProj::File { body } => {
                let frame = ready!(body.poll_frame(cx));
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            ProxyBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body } => body.is_end_stream(),
            ProxyBody::File { body } => body.is_end_stream(),
            ProxyBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body } => body.size_hint(),
            ProxyBody::File { body } => body.size_hint(),
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// Something that rides along with a response body: told about each data frame and the end, and
/// dropped with the body (when hyper has finished sending it or the client went away).
pub trait BodyObserver {
    fn on_data(&mut self, _len: usize) {}
    fn on_end(&mut self) {}
}

pin_project! {
    /// A body passed through unchanged, with an observer attached.
    pub struct ObservedBody<B, O> {
        #[pin]
        inner: B,
        observer: O,
    }
}

impl<B, O> ObservedBody<B, O> {
    pub fn new(inner: B, observer: O) -> Self {
        ObservedBody { inner, observer }
    }
}

impl<B: Body<Data = Bytes>, O: BodyObserver> Body for ObservedBody<B, O> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(f)) => this.observer.on_data(f.data_ref().map_or(0, Bytes::len)),
            None => this.observer.on_end(),
            Some(Err(_)) => {}
        }
        // hyper stops polling once the body says it has ended.
        if this.inner.is_end_stream() {
            this.observer.on_end();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
