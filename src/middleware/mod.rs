//! Tower middleware on the request path. Response rewrites (security headers, cookie hardening) share one
//! layer type, `RewriteHeadersLayer`, parameterised by what they rewrite; request checks that may answer
//! instead of the app (the head checks, the Host guard, login rate limits) share `gate_layer`; checks
//! that also read the app's answer (cross-origin reports, failed logins) share `guard_layer`;
//! `RecordResponse` (metrics and the access log) is its own layer because it follows the response body.

pub mod clear_site_data;
pub mod compress_whole;
pub mod compression;
pub mod cookies;
pub mod cross_origin;
pub mod csp_reports;
pub mod framing;
pub mod host;
pub mod login_lockout;
pub mod maintenance;
pub mod rate_limit;
pub mod record;
pub mod security_headers;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tower_http::validate_request::{
    ValidateRequest, ValidateRequestHeader, ValidateRequestHeaderLayer,
};

use crate::body::ProxyBody;

pub use clear_site_data::ClearSiteDataOnLogout;
pub use cookies::CookieHardening;
pub use cross_origin::CrossOriginGuard;
pub use csp_reports::{CspCollector, CspCollectorLayer};
pub use framing::RequestHeadCheck;
pub use host::HostAllowlist;
pub use login_lockout::LoginLockout;
pub use maintenance::Maintenance;
pub use rate_limit::{RateLimit, RateLimitLayer, RateLimiter};
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
/// (boxed: the refusal is the rare path). tower-http's `ValidateRequestHeaderLayer::custom` runs it;
/// `Gate` shares one checker (and its state, such as the rate limiter's buckets) among the clones
/// tower makes per connection.
pub trait RequestGate: Send + Sync + 'static {
    fn admit<B>(&self, req: &mut Request<B>) -> Result<(), Box<Response<ProxyBody>>>;
}

pub struct Gate<G>(Arc<G>);

impl<G> Clone for Gate<G> {
    fn clone(&self) -> Self {
        Gate(self.0.clone())
    }
}

impl<G: RequestGate, B> ValidateRequest<B> for Gate<G> {
    type ResponseBody = ProxyBody;

    fn validate(&mut self, req: &mut Request<B>) -> Result<(), Response<ProxyBody>> {
        self.0.admit(req).map_err(|answer| *answer)
    }
}

/// The layer that runs `gate` before the inner service.
pub fn gate_layer<G: RequestGate>(gate: G) -> ValidateRequestHeaderLayer<Gate<G>> {
    ValidateRequestHeaderLayer::custom(Gate(Arc::new(gate)))
}

/// The service `gate_layer` makes.
pub type Gated<S, G> = ValidateRequestHeader<S, Gate<G>>;

/// A gate that also sees the answer: `before` refuses the request or lets it through with a note,
/// `after` reads the response (and may mark it) with that note.
pub trait RequestGuard: Send + Sync + 'static {
    type Note: Send + 'static;
    fn before<B>(&self, req: &mut Request<B>) -> Result<Self::Note, Box<Response<ProxyBody>>>;
    fn after(&self, note: Self::Note, response: &mut Response<ProxyBody>);
}

pub struct GuardLayer<G>(Arc<G>);

impl<G> Clone for GuardLayer<G> {
    fn clone(&self) -> Self {
        GuardLayer(self.0.clone())
    }
}

/// The layer that runs `guard` around the inner service.
pub fn guard_layer<G: RequestGuard>(guard: G) -> GuardLayer<G> {
    GuardLayer(Arc::new(guard))
}

impl<S, G> Layer<S> for GuardLayer<G> {
    type Service = Guarded<S, G>;
    fn layer(&self, inner: S) -> Self::Service {
        Guarded {
            inner,
            guard: self.0.clone(),
        }
    }
}

pub struct Guarded<S, G> {
    inner: S,
    guard: Arc<G>,
}

impl<S: Clone, G> Clone for Guarded<S, G> {
    fn clone(&self) -> Self {
        Guarded {
            inner: self.inner.clone(),
            guard: self.guard.clone(),
        }
    }
}

impl<S, G, ReqBody> Service<Request<ReqBody>> for Guarded<S, G>
where
    S: Service<Request<ReqBody>, Response = Response<ProxyBody>>,
    G: RequestGuard,
{
    type Response = Response<ProxyBody>;
    type Error = S::Error;
    type Future = GuardedFuture<S::Future, G>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match self.guard.before(&mut req) {
            Ok(note) => GuardedFuture::Inner {
                inner: self.inner.call(req),
                guard: self.guard.clone(),
                note: Some(note),
            },
            Err(answer) => GuardedFuture::Refused {
                answer: Some(answer),
            },
        }
    }
}

pin_project! {
    #[project = GuardedProjection]
    pub enum GuardedFuture<F, G: RequestGuard> {
        Inner {
            #[pin]
            inner: F,
            guard: Arc<G>,
            note: Option<G::Note>,
        },
        Refused {
            answer: Option<Box<Response<ProxyBody>>>,
        },
    }
}

impl<F, G, E> Future for GuardedFuture<F, G>
where
    F: Future<Output = Result<Response<ProxyBody>, E>>,
    G: RequestGuard,
{
    type Output = Result<Response<ProxyBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            GuardedProjection::Inner { inner, guard, note } => {
                let mut response = ready!(inner.poll(cx))?;
                if let Some(note) = note.take() {
                    guard.after(note, &mut response);
                }
                Poll::Ready(Ok(response))
            }
            GuardedProjection::Refused { answer } => match answer.take() {
                Some(answer) => Poll::Ready(Ok(*answer)),
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    //! The layers as tower-http tests its own: a `service_fn` inside, `oneshot` from outside.
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::{HeaderValue, StatusCode};
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::response::{Blame, error_page};

    struct AddMarker;

    impl HeaderRewrite for AddMarker {
        fn rewrite(&self, headers: &mut HeaderMap) {
            headers.insert("x-marker", HeaderValue::from_static("1"));
            headers.remove("server");
        }
    }

    /// Refuses requests to `/refused` with 403, and adds a header to the rest.
    struct RefuseSome;

    impl RequestGate for RefuseSome {
        fn admit<B>(&self, req: &mut Request<B>) -> Result<(), Box<Response<ProxyBody>>> {
            if req.uri().path() == "/refused" {
                return Err(Box::new(error_page(
                    StatusCode::FORBIDDEN,
                    Blame::Client,
                    "test refusal",
                )));
            }
            req.headers_mut()
                .insert("x-admitted", HeaderValue::from_static("yes"));
            Ok(())
        }
    }

    fn request(path: &str) -> Request<()> {
        Request::builder().uri(path).body(()).expect("request")
    }

    #[tokio::test]
    async fn rewrite_headers_applies_to_every_response() {
        let inner = service_fn(|_req: Request<()>| async {
            let mut response = Response::new(ProxyBody::empty());
            response
                .headers_mut()
                .insert("server", HeaderValue::from_static("gunicorn"));
            Ok::<_, Infallible>(response)
        });
        let service = ServiceBuilder::new()
            .layer(RewriteHeadersLayer::new(AddMarker))
            .service(inner);
        let Ok(response) = service.oneshot(request("/")).await;
        assert_eq!(response.headers()["x-marker"], "1");
        assert!(response.headers().get("server").is_none());
    }

    #[tokio::test]
    async fn a_gate_answers_refused_requests_without_calling_the_inner_service() {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let inner = service_fn(move |req: Request<()>| {
            seen.fetch_add(1, Ordering::SeqCst);
            let admitted = req.headers().contains_key("x-admitted");
            async move {
                let mut response = Response::new(ProxyBody::empty());
                if admitted {
                    *response.status_mut() = StatusCode::NO_CONTENT;
                }
                Ok::<_, Infallible>(response)
            }
        });
        let service = ServiceBuilder::new()
            .layer(gate_layer(RefuseSome))
            .service(inner);
        let Ok(refused) = service.clone().oneshot(request("/refused")).await;
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // The gate may adjust what it lets through.
        let Ok(admitted) = service.oneshot(request("/ok")).await;
        assert_eq!(admitted.status(), StatusCode::NO_CONTENT);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
