//! Tower middleware on the request path. Response rewrites (security headers, cookie hardening) share one
//! layer type, `RewriteHeadersLayer`, parameterised by what they rewrite; request checks that may answer
//! instead of the app (the head checks, the Host guard, login rate limits) share `GateLayer`;
//! `RecordResponse` (metrics and the access log) is its own layer because it follows the response body.

pub mod cookies;
pub mod framing;
pub mod host;
pub mod rate_limit;
pub mod record;
pub mod security_headers;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::future::Either;
use http::{HeaderMap, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::ProxyBody;

pub use cookies::CookieHardening;
pub use framing::RequestHeadCheck;
pub use host::HostAllowlist;
pub use rate_limit::RateLimiter;
pub use record::RecordResponseLayer;
pub use security_headers::SecurityHeaderPolicy;

/// A rewrite of response headers, decided once per config and applied to every response.
pub trait HeaderRewrite: Send + Sync + 'static {
    fn rewrite(&self, headers: &mut HeaderMap);
}

#[derive(Clone)]
pub struct RewriteHeadersLayer<R> {
    rewrite: Arc<R>,
}

impl<R> RewriteHeadersLayer<R> {
    pub fn new(rewrite: R) -> Self {
        RewriteHeadersLayer {
            rewrite: Arc::new(rewrite),
        }
    }
}

impl<S, R> Layer<S> for RewriteHeadersLayer<R> {
    type Service = RewriteHeaders<S, R>;
    fn layer(&self, inner: S) -> Self::Service {
        RewriteHeaders {
            inner,
            rewrite: self.rewrite.clone(),
        }
    }
}

pub struct RewriteHeaders<S, R> {
    inner: S,
    rewrite: Arc<R>,
}

impl<S: Clone, R> Clone for RewriteHeaders<S, R> {
    fn clone(&self) -> Self {
        RewriteHeaders {
            inner: self.inner.clone(),
            rewrite: self.rewrite.clone(),
        }
    }
}

impl<S, R, ReqBody, ResBody> Service<Request<ReqBody>> for RewriteHeaders<S, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    R: HeaderRewrite,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = RewriteHeadersFuture<S::Future, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        RewriteHeadersFuture {
            inner: self.inner.call(req),
            rewrite: self.rewrite.clone(),
        }
    }
}

pin_project! {
    pub struct RewriteHeadersFuture<F, R> {
        #[pin]
        inner: F,
        rewrite: Arc<R>,
    }
}

impl<F, R, ResBody, E> Future for RewriteHeadersFuture<F, R>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    R: HeaderRewrite,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        this.rewrite.rewrite(response.headers_mut());
        Poll::Ready(Ok(response))
    }
}

/// A check before the inner service: let the request through (possibly adjusted), or answer it here
/// (boxed: the refusal is the rare path).
pub trait RequestGate: Send + Sync + 'static {
    fn admit<B>(&self, req: &mut Request<B>) -> Result<(), Box<Response<ProxyBody>>>;
}

pub struct GateLayer<G> {
    gate: Arc<G>,
}

impl<G> GateLayer<G> {
    pub fn new(gate: G) -> Self {
        GateLayer {
            gate: Arc::new(gate),
        }
    }
}

impl<G> Clone for GateLayer<G> {
    fn clone(&self) -> Self {
        GateLayer {
            gate: self.gate.clone(),
        }
    }
}

impl<S, G> Layer<S> for GateLayer<G> {
    type Service = Gated<S, G>;
    fn layer(&self, inner: S) -> Self::Service {
        Gated {
            inner,
            gate: self.gate.clone(),
        }
    }
}

pub struct Gated<S, G> {
    inner: S,
    gate: Arc<G>,
}

impl<S: Clone, G> Clone for Gated<S, G> {
    fn clone(&self) -> Self {
        Gated {
            inner: self.inner.clone(),
            gate: self.gate.clone(),
        }
    }
}

impl<S, G, B> Service<Request<B>> for Gated<S, G>
where
    S: Service<Request<B>, Response = Response<ProxyBody>>,
    G: RequestGate,
{
    type Response = Response<ProxyBody>;
    type Error = S::Error;
    type Future = Either<std::future::Ready<Result<Response<ProxyBody>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.gate.admit(&mut req) {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(answer) => Either::Left(std::future::ready(Ok(*answer))),
        }
    }
}
