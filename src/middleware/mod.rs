//! Tower middleware on the request path. Response rewrites (security headers, cookie hardening) share one
//! layer type, `RewriteHeadersLayer`, parameterised by what they rewrite; the Host guard and access log
//! are their own layers because they look at the request too.

pub mod access_log;
pub mod cookies;
pub mod host;
pub mod security_headers;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

pub use access_log::AccessLogLayer;
pub use cookies::CookieHardening;
pub use host::HostGuardLayer;
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
