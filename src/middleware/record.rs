//! Records every response, for two readers: the metrics count it (status class, blame, upstream time)
//! whether or not the access log is on, and the access log writes one line per request (method, host,
//! path, status, bytes, duration, upstream duration, client) when the response body is finished or
//! abandoned, so `bytes` and `duration` are real. One layer, because both read the same facts once.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::{BodyObserver, ObservedBody};
use crate::context::{ConnInfo, UpstreamBackend, UpstreamTiming, canonical_ip};
use crate::metrics::{Listener, Metrics};
use crate::response::ProxyFailure;

#[derive(Clone)]
pub struct RecordResponseLayer {
    enabled: bool,
    metrics: Arc<Metrics>,
    listener: Listener,
}

impl RecordResponseLayer {
    pub fn new(enabled: bool, metrics: Arc<Metrics>, listener: Listener) -> Self {
        RecordResponseLayer {
            enabled,
            metrics,
            listener,
        }
    }
}

impl<S> Layer<S> for RecordResponseLayer {
    type Service = RecordResponse<S>;
    fn layer(&self, inner: S) -> RecordResponse<S> {
        RecordResponse {
            inner,
            enabled: self.enabled,
            metrics: self.metrics.clone(),
            listener: self.listener,
        }
    }
}

#[derive(Clone)]
pub struct RecordResponse<S> {
    inner: S,
    enabled: bool,
    metrics: Arc<Metrics>,
    listener: Listener,
}

struct RequestFacts {
    method: Method,
    host: Option<HeaderValue>,
    uri: Uri,
    client: Option<IpAddr>,
    start: Instant,
}

/// One access-log line in the making: filled in as the response goes out, written when it is dropped.
pub struct Entry {
    request: RequestFacts,
    status: StatusCode,
    upstream: Option<Duration>,
    backend: Option<UpstreamBackend>,
    failure: Option<ProxyFailure>,
    bytes: u64,
    finished: bool,
}

impl Drop for Entry {
    fn drop(&mut self) {
        let r = &self.request;
        let host = r.host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("-");
        let client = r.client.map(tracing::field::display);
        let millis = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1000.0);
        let upstream_ms = self.upstream.map(millis);
        let duration_ms = millis(r.start.elapsed());
        tracing::info!(
            target: "portcullis::access",
            method = %r.method,
            host,
            path = r.uri.path(),
            status = self.status.as_u16(),
            bytes = self.bytes,
            duration_ms = %duration_ms,
            upstream_ms = upstream_ms.as_deref(),
            backend = self.backend.as_ref().map(|b| &*b.0),
            client,
            error = self.failure.map(|f| f.blame.as_str()),
            reason = self.failure.map(|f| f.reason),
            aborted = !self.finished,
        );
    }
}

impl<S, B, ResBody> Service<Request<B>> for RecordResponse<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<LoggedBody<ResBody>>;
    type Error = S::Error;
    type Future = RecordResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let facts = self.enabled.then(|| RequestFacts {
            method: req.method().clone(),
            // HTTP/2 carries the host in `:authority`; the Host guard adds the header later.
            host: req.headers().get(http::header::HOST).cloned().or_else(|| {
                req.uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            }),
            uri: req.uri().clone(),
            client: req
                .extensions()
                .get::<ConnInfo>()
                .map(|c| canonical_ip(c.peer.ip())),
            start: Instant::now(),
        });
        RecordResponseFuture {
            inner: self.inner.call(req),
            facts,
            metrics: self.metrics.clone(),
            listener: self.listener,
        }
    }
}

pin_project! {
    pub struct RecordResponseFuture<F> {
        #[pin]
        inner: F,
        facts: Option<RequestFacts>,
        metrics: Arc<Metrics>,
        listener: Listener,
    }
}

impl<F, ResBody, E> Future for RecordResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Body,
{
    type Output = Result<Response<LoggedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let ended = response.body().is_end_stream();
        let upstream = response.extensions().get::<UpstreamTiming>().map(|t| t.0);
        let failure = response.extensions().get::<ProxyFailure>().copied();
        this.metrics.count_response(
            *this.listener,
            response.status(),
            failure.as_ref(),
            upstream,
        );
        let entry = this.facts.take().map(|request| Entry {
            request,
            status: response.status(),
            upstream,
            backend: response.extensions().get::<UpstreamBackend>().cloned(),
            failure,
            bytes: 0,
            finished: ended,
        });
        Poll::Ready(Ok(response.map(|body| ObservedBody::new(body, entry))))
    }
}

/// The response body, counting bytes; the log line is written when it is dropped.
pub type LoggedBody<B> = ObservedBody<B, Option<Entry>>;

impl BodyObserver for Option<Entry> {
    fn on_data(&mut self, len: usize) {
        if let Some(entry) = self {
            entry.bytes += len as u64;
        }
    }

    fn on_end(&mut self) {
        if let Some(entry) = self {
            entry.finished = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::StatusCode;
    use http_body_util::BodyExt;
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::body::ProxyBody;
    use crate::metrics::Gauges;
    use crate::response::{Blame, error_page};

    fn gauges() -> Gauges {
        Gauges {
            max_connections: 1,
            ..Gauges::default()
        }
    }

    #[tokio::test]
    async fn every_response_is_counted_whether_or_not_the_log_is_on() {
        for log in [true, false] {
            let metrics = Arc::new(Metrics::default());
            let inner = service_fn(|req: Request<()>| async move {
                let response = match req.uri().path() {
                    "/down" => error_page(StatusCode::BAD_GATEWAY, Blame::Upstream, "test"),
                    _ => {
                        let mut response = Response::new(ProxyBody::full("hello"));
                        response
                            .extensions_mut()
                            .insert(UpstreamTiming(Duration::from_millis(3)));
                        response
                    }
                };
                Ok::<_, Infallible>(response)
            });
            let service = ServiceBuilder::new()
                .layer(RecordResponseLayer::new(
                    log,
                    metrics.clone(),
                    Listener::Https,
                ))
                .service(inner);
            for path in ["/", "/down"] {
                let req = Request::builder().uri(path).body(()).expect("request");
                let Ok(response) = service.clone().oneshot(req).await;
                // The body passes through unchanged.
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes();
                assert!(!body.is_empty(), "{path}");
            }
            let text = metrics.render(&gauges());
            for line in [
                "portcullis_responses_total{listener=\"https\",code=\"2xx\"} 1",
                "portcullis_responses_total{listener=\"https\",code=\"5xx\"} 1",
                "portcullis_errors_total{blame=\"upstream\"} 1",
            ] {
                assert!(text.contains(line), "log = {log}: {line} in\n{text}");
            }
        }
    }

    /// Records what the body observer was told, for the `ObservedBody` test.
    #[derive(Default)]
    struct Tally {
        bytes: usize,
        ended: usize,
    }

    impl BodyObserver for &mut Tally {
        fn on_data(&mut self, len: usize) {
            self.bytes += len;
        }
        fn on_end(&mut self) {
            self.ended += 1;
        }
    }

    #[tokio::test]
    async fn observed_body_reports_every_byte_and_the_end() {
        let mut tally = Tally::default();
        let body = ObservedBody::new(ProxyBody::full("twelve bytes"), &mut tally);
        let collected = body.collect().await.expect("body").to_bytes();
        assert_eq!(collected.as_ref(), b"twelve bytes");
        assert_eq!(tally.bytes, 12);
        assert!(tally.ended >= 1, "the end was reported");
    }
}
