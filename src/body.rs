//! Body types on the request path: `RequestBody` guards what clients upload (size and time limits);
//! `ProxyBody` carries the upstream's streamed response, a static file, or a small response of our own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Sleep;
use tower_http::services::fs::ServeFileSystemResponseBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every body read whole into memory may hold together (`limits.buffer_memory`): responses read
/// whole from the upstream and static files read whole from disk. A client can leave any number of
/// HTTP/2 streams unread; without a shared budget each one would keep its whole body here. When the
/// budget is spent, bodies stream instead, which costs a stream at most one chunk and its send buffer.
#[derive(Clone)]
pub struct BufferBudget(Arc<Semaphore>);

/// A share of the budget: given back when the bytes it covers are dropped.
pub struct BudgetHold {
    _permit: OwnedSemaphorePermit,
}

impl BufferBudget {
    /// Counted in KiB, so a budget of any realistic size fits the semaphore.
    pub fn new(bytes: u64) -> Self {
        let kib = usize::try_from(bytes.div_ceil(1024))
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        BufferBudget(Arc::new(Semaphore::new(kib)))
    }

    /// A hold on `len` bytes, or `None` when the budget has no room for them now.
    pub fn try_hold(&self, len: u64) -> Option<BudgetHold> {
        let kib = u32::try_from(len.div_ceil(1024).max(1)).ok()?;
        self.0
            .clone()
            .try_acquire_many_owned(kib)
            .ok()
            .map(|permit| BudgetHold { _permit: permit })
    }
}

/// `data` carrying `hold`: the budget gets it back when the last reference to these bytes is gone,
/// wherever that is (a body, or HTTP/2's send queue after the body has finished).
pub fn held_bytes(data: Bytes, hold: BudgetHold) -> Bytes {
    struct Held {
        data: Bytes,
        _hold: BudgetHold,
    }
    impl AsRef<[u8]> for Held {
        fn as_ref(&self) -> &[u8] {
            &self.data
        }
    }
    Bytes::from_owner(Held { data, _hold: hold })
}

/// Why a client's request body was cut off. Found again in the upstream client's error chain so the
/// client gets the right status (413, 408, 400) instead of a generic 502.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    #[error("request body not received within {0:?}")]
    TimedOut(Duration),
    #[error("client stopped sending the request body: {0}")]
    Client(#[source] hyper::Error),
    #[error("request body longer than its Content-Length")]
    LongerThanDeclared,
}

/// A client's request body on its way upstream: either read completely before the upstream is
/// contacted (small bodies, so a slow client never holds a Gunicorn worker, as nginx's request buffering
/// does), or streamed with a byte limit and a deadline for the whole body.
pub enum RequestBody {
    Buffered { data: Option<Bytes> },
    Streaming(Box<Streamed>),
}

/// A streamed body with a declared length holds back the frame that completes it until the client's
/// stream has really ended: an HTTP/2 client may send DATA past its `content-length`, which h2 only
/// notices at the extra bytes. Forwarding the completing frame first would hand Gunicorn a whole,
/// valid-looking request the client had framed wrongly; held back, the upstream sees a cut-off body.
pub struct Streamed {
    inner: Incoming,
    remaining: u64,
    limit: u64,
    /// What the client's Content-Length says is still to come.
    declared: Option<u64>,
    held: Option<Bytes>,
    held_trailers: Option<http::HeaderMap>,
    /// Told when the last byte has gone upstream: the response timeout starts then.
    sent: Option<oneshot::Sender<()>>,
    timeout: Duration,
    /// Started at the first poll that has to wait: bodies that arrive at once never allocate a timer.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl RequestBody {
    pub fn streaming(
        inner: Incoming,
        limit: u64,
        timeout: Duration,
        declared: Option<u64>,
    ) -> Self {
        RequestBody::Streaming(Box::new(Streamed {
            inner,
            remaining: limit,
            limit,
            declared,
            held: None,
            held_trailers: None,
            sent: None,
            timeout,
            deadline: None,
        }))
    }

    /// For a streamed body, resolves once the whole body has been handed upstream, so the upstream's
    /// response time is not charged with a slow client's upload (a buffered one is sent at once).
    pub fn sent(&mut self) -> Option<oneshot::Receiver<()>> {
        match self {
            RequestBody::Buffered { .. } => None,
            RequestBody::Streaming(streamed) => {
                let (tell, told) = oneshot::channel();
                streamed.sent = Some(tell);
                Some(told)
            }
        }
    }

    /// The whole body, when it was read before the upstream was contacted: a request that can be sent
    /// again.
    pub fn replayable(&self) -> Option<Bytes> {
        match self {
            RequestBody::Buffered { data } => Some(data.clone().unwrap_or_default()),
            RequestBody::Streaming(_) => None,
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
        match self.get_mut() {
            RequestBody::Buffered { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RequestBody::Streaming(streamed) => streamed.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Buffered { data } => data.is_none(),
            RequestBody::Streaming(streamed) => streamed.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestBody::Streaming(streamed) => match &streamed.held {
                Some(data) => SizeHint::with_exact(data.len() as u64),
                None => streamed.inner.size_hint(),
            },
        }
    }
}

impl Streamed {
    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.held_trailers.is_none() && self.inner.is_end_stream()
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.held.is_none()
            && let Some(trailers) = self.held_trailers.take()
        {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let frame = self.poll_next(cx);
        // hyper stops polling once the body says it has ended, so the end is told here as well as at
        // `None`.
        let ended = match &frame {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.is_end_stream(),
            _ => false,
        };
        if ended && let Some(tell) = self.sent.take() {
            let _ = tell.send(());
        }
        frame
    }

    /// One step: size limit, deadline, and the completing frame held back until the client's stream
    /// has ended.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            let len = data.len() as u64;
                            if len > self.remaining {
                                return Poll::Ready(Some(Err(BodyError::TooLarge(self.limit))));
                            }
                            self.remaining -= len;
                            if len == 0 {
                                continue;
                            }
                            if self.held.is_some() {
                                return Poll::Ready(Some(Err(BodyError::LongerThanDeclared)));
                            }
                            if let Some(left) = &mut self.declared {
                                *left =
                                    left.checked_sub(len).ok_or(BodyError::LongerThanDeclared)?;
                                if *left == 0 && !self.inner.is_end_stream() {
                                    self.held = Some(data);
                                    continue;
                                }
                            }
                            Frame::data(data)
                        }
                        Err(trailers) => match (self.held.take(), trailers.into_trailers()) {
                            (Some(data), Ok(trailers)) => {
                                self.held_trailers = Some(trailers);
                                Frame::data(data)
                            }
                            (None, Ok(trailers)) => Frame::trailers(trailers),
                            (_, Err(_)) => continue,
                        },
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(BodyError::Client(e)))),
                Poll::Ready(None) => {
                    return Poll::Ready(self.held.take().map(|d| Ok(Frame::data(d))));
                }
                Poll::Pending => {
                    let timeout = self.timeout;
                    let deadline = self
                        .deadline
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    ready!(deadline.as_mut().poll(cx));
                    return Poll::Ready(Some(Err(BodyError::TimedOut(timeout))));
                }
            }
        }
    }
}

pin_project! {
    /// A response body: the upstream's, streamed through, a file from a static folder, or a small one the
    /// proxy wrote itself.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Upstream { #[pin] body: UpstreamBody },
        File { #[pin] body: ServeFileSystemResponseBody },
        Full { data: Option<Bytes> },
        /// Another body with bytes sent after it (the random padding of a compressed HTML page).
        Padded { body: Pin<Box<ProxyBody>>, padding: Option<Bytes> },
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

    /// `self`, then `padding`. Trailers, if the body has any, go out before the padding would, and
    /// the padding is dropped (HTML from Gunicorn has none).
    pub fn padded(self, padding: Bytes) -> Self {
        ProxyBody::Padded {
            body: Box::pin(self),
            padding: Some(padding),
        }
    }
}

/// The connection an upstream response arrives on (`proxy::upstream`): driven by whoever reads the
/// body, so the backend's bytes wake the reading task itself. Dropped, it goes back to its pool if it
/// can take another request.
pub trait UpstreamConnection: Send {
    /// Moves the connection along; `Ready` once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()>;
}

/// An upstream response body and its connection, given back at the body's end (or closed when the
/// body is dropped before it).
pub struct UpstreamBody {
    incoming: Incoming,
    connection: Option<Box<dyn UpstreamConnection>>,
    /// A frame went out since the connection was last driven.
    delivered: bool,
}

impl UpstreamBody {
    pub fn new(incoming: Incoming, connection: Box<dyn UpstreamConnection>) -> Self {
        UpstreamBody {
            incoming,
            connection: Some(connection),
            delivered: false,
        }
    }

    /// The connection, for a caller that drives it on (an upgrade: it hands over its bytes when it ends).
    pub fn into_connection(mut self) -> Option<Box<dyn UpstreamConnection>> {
        self.connection.take()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut frame = Pin::new(&mut this.incoming).poll_frame(cx);
        if frame.is_pending()
            && let Some(connection) = this.connection.as_mut()
        {
            if std::mem::take(&mut this.delivered) {
                // The reader sends what it has before the connection is read again: a backend that
                // fails now must not take the bytes already here down with it (the client sees the
                // status and a cut-off body, as when the connection had a task of its own).
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            // The connection reads what the body waits for; poll the body again for what it read.
            let _ = connection.drive(cx);
            frame = Pin::new(&mut this.incoming).poll_frame(cx);
        }
        match &frame {
            Poll::Ready(Some(Ok(_))) => this.delivered = true,
            // Ended: the connection is free for the next request now, not when the body is dropped.
            Poll::Ready(None) => drop(this.connection.take()),
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl From<UpstreamBody> for ProxyBody {
    fn from(body: UpstreamBody) -> Self {
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
            ProxyBodyProj::Padded { body, padding } => match ready!(body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) if frame.is_trailers() => {
                    padding.take();
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(frame) => Poll::Ready(Some(frame)),
                None => Poll::Ready(padding.take().map(|p| Ok(Frame::data(p)))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body } => body.is_end_stream(),
            ProxyBody::File { body } => body.is_end_stream(),
            ProxyBody::Full { data } => data.is_none(),
            ProxyBody::Padded { body, padding } => padding.is_none() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body } => body.size_hint(),
            ProxyBody::File { body } => body.size_hint(),
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Padded { body, padding } => {
                let extra = padding.as_ref().map_or(0, |p| p.len() as u64);
                let inner = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
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
