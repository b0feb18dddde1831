//! Records every response, for two readers: the metrics count it (status class, blame, upstream time)
//! whether or not the access log is on, and the access log writes one line per request (method, host,
//! path, status, bytes, duration, upstream duration, client) when the response body is finished or
//! abandoned, so `bytes` and `duration` are real. One layer, because both read the same facts once.
//! The line is an event in the main log's format, or a "combined" line on standard output. A response
//! marked with a `SecurityEvent` also goes to the security log and its counter, here, once.

use std::io::Write;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::{BodyObserver, ObservedBody};
use crate::config::AccessLog;
use crate::context::{ConnInfo, TrustedProxies, UpstreamBackend, UpstreamTiming};
use crate::metrics::{Listener, Metrics};
use crate::response::ProxyFailure;
use crate::security::{EventPlace, SecurityEvent, write_event};

#[derive(Clone)]
pub struct RecordResponseLayer {
    access: AccessLog,
    metrics: Arc<Metrics>,
    listener: Listener,
    trusted_proxies: TrustedProxies,
}

impl RecordResponseLayer {
    pub fn new(
        access: AccessLog,
        metrics: Arc<Metrics>,
        listener: Listener,
        trusted_proxies: TrustedProxies,
    ) -> Self {
        RecordResponseLayer {
            access,
            metrics,
            listener,
            trusted_proxies,
        }
    }
}

impl<S> Layer<S> for RecordResponseLayer {
    type Service = RecordResponse<S>;
    fn layer(&self, inner: S) -> RecordResponse<S> {
        RecordResponse {
            inner,
            access: self.access,
            metrics: self.metrics.clone(),
            listener: self.listener,
            trusted_proxies: self.trusted_proxies.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RecordResponse<S> {
    inner: S,
    access: AccessLog,
    metrics: Arc<Metrics>,
    listener: Listener,
    trusted_proxies: TrustedProxies,
}

struct RequestFacts {
    method: Method,
    host: Option<HeaderValue>,
    uri: Uri,
    /// The client behind trusted load balancers (`server.trusted_proxies`), else the peer.
    client: Option<IpAddr>,
    start: Instant,
    /// Only for combined lines, which also name these.
    combined: Option<CombinedFacts>,
}

struct CombinedFacts {
    received: SystemTime,
    version: Version,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
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
        if let Some(combined) = &r.combined {
            let mut line = combined_line(r, combined, self.status, self.bytes);
            line.push('\n');
            // One write per line to a locked stdout, so lines from two threads never interleave; a closed
            // stdout (a gone pipe) must not take the request down with it.
            let _ = std::io::stdout().lock().write_all(line.as_bytes());
            return;
        }
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
        let access = self.access;
        // Always taken (a few reference counts): a refusal needs them for the security log.
        let facts = Some(RequestFacts {
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
                .map(|c| self.trusted_proxies.client_ip(req.headers(), c.peer.ip())),
            start: Instant::now(),
            combined: (access == AccessLog::Combined).then(|| CombinedFacts {
                received: SystemTime::now(),
                version: req.version(),
                referer: req.headers().get(http::header::REFERER).cloned(),
                user_agent: req.headers().get(http::header::USER_AGENT).cloned(),
            }),
        });
        RecordResponseFuture {
            inner: self.inner.call(req),
            facts,
            access,
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
        access: AccessLog,
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
        if let Some(event) = response.extensions().get::<SecurityEvent>() {
            this.metrics.security_event(event.cause);
            let facts = this.facts.as_ref();
            let host = facts
                .and_then(|f| f.host.as_ref())
                .and_then(|h| h.to_str().ok());
            let place = EventPlace {
                client: facts.and_then(|f| f.client),
                host,
                method: facts.map(|f| f.method.as_str()),
                path: facts.map(|f| f.uri.path()),
            };
            write_event(event, place, 1);
        }
        let facts = this.facts.take().filter(|_| *this.access != AccessLog::Off);
        let entry = facts.map(|request| Entry {
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

/// The Apache/nginx "combined" format with nginx's `$request_time` (seconds, millisecond resolution) added:
/// `client - - [02/Dec/2026:21:49:13 +0000] "GET /path?q HTTP/1.1" 200 512 "referer" "agent" 0.004`.
/// GoAccess reads it as `%h %^[%d:%t %^] "%r" %s %b "%R" "%u" %T`. Quoted fields are escaped as nginx
/// does (`"`, `\` and bytes outside printable ASCII as `\xHH`), so a client cannot forge a line.
fn combined_line(r: &RequestFacts, c: &CombinedFacts, status: StatusCode, bytes: u64) -> String {
    const DATE: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000"
    );
    let received = time::OffsetDateTime::from(c.received);
    let date = received.format(DATE).unwrap_or_else(|_| "-".into());
    let client = r
        .client
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "-".into());
    let target = r
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or_else(|| r.uri.path());
    let request = format!("{} {} {:?}", r.method, target, c.version);
    let header = |value: &Option<HeaderValue>| match value {
        Some(v) => escape_log_field(v.as_bytes()),
        None => "-".to_string(),
    };
    let bytes = if bytes == 0 {
        "-".to_string()
    } else {
        bytes.to_string()
    };
    format!(
        "{client} - - [{date}] \"{}\" {} {bytes} \"{}\" \"{}\" {:.3}",
        escape_log_field(request.as_bytes()),
        status.as_u16(),
        header(&c.referer),
        header(&c.user_agent),
        r.start.elapsed().as_secs_f64(),
    )
}

fn escape_log_field(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for &b in raw {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(b as char);
            }
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02X}")),
        }
    }
    out
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
        for log in [AccessLog::Events, AccessLog::Off] {
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
                    TrustedProxies::default(),
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
                assert!(text.contains(line), "log = {log:?}: {line} in\n{text}");
            }
        }
    }

    #[test]
    fn combined_lines_escape_what_a_client_controls() {
        let facts = RequestFacts {
            method: Method::POST,
            host: None,
            uri: Uri::from_static("/admin/login/?next=%22x"),
            client: Some(IpAddr::from([192, 0, 2, 7])),
            start: Instant::now(),
            combined: Some(CombinedFacts {
                // 2026-12-02 21:49:13 UTC.
                received: SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_248_153),
                version: Version::HTTP_11,
                referer: None,
                user_agent: Some(HeaderValue::from_bytes(b"a\"b\\c\t\xff").expect("value")),
            }),
        };
        let combined = facts.combined.as_ref().expect("combined");
        let line = combined_line(&facts, combined, StatusCode::TOO_MANY_REQUESTS, 0);
        let (head, seconds) = line.rsplit_once(' ').expect("time at the end");
        assert_eq!(
            head,
            r#"192.0.2.7 - - [02/Dec/2026:21:49:13 +0000] "POST /admin/login/?next=%22x HTTP/1.1" 429 - "-" "a\"b\\c\x09\xFF""#
        );
        assert!(seconds.parse::<f64>().is_ok(), "{seconds}");
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
