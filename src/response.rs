//! Responses the proxy writes itself (errors, redirects, health): small, no internals, no upstream names.
//! They pass through the same response layers as proxied ones, so they carry the security headers too.

use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;
use crate::security::{SecurityCause, SecurityEvent};

/// Where a failure came from, for the log line (RFC-style: client → 4xx, upstream → 502/504, ours → 500).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Client,
    Upstream,
    Proxy,
}

impl Blame {
    pub fn as_str(self) -> &'static str {
        match self {
            Blame::Client => "client",
            Blame::Upstream => "upstream",
            Blame::Proxy => "proxy",
        }
    }
}

/// Marks a response the proxy produced instead of the upstream, for the access log.
#[derive(Debug, Clone, Copy)]
pub struct ProxyFailure {
    pub blame: Blame,
    pub reason: &'static str,
}

/// A failure's page, tagged with who caused it (the access log, the metrics, and for `Blame::Client` on
/// HTTP/1.x, closing the connection).
pub fn error_page(status: StatusCode, blame: Blame, reason: &'static str) -> Response<ProxyBody> {
    let mut response = status_page(status);
    response
        .extensions_mut()
        .insert(ProxyFailure { blame, reason });
    response
}

/// A request refused for the client's doing that the security log should see: `error_page` with
/// `Blame::Client`, marked with `event` (written and counted by `middleware::record`).
pub fn refusal(
    status: StatusCode,
    reason: &'static str,
    event: SecurityEvent,
) -> Response<ProxyBody> {
    let mut response = error_page(status, Blame::Client, reason);
    response.extensions_mut().insert(event);
    response
}

/// `refusal` with its own page: for refusals a site owner may hit by design and needs told how to allow.
pub fn refusal_page(
    status: StatusCode,
    reason: &'static str,
    event: SecurityEvent,
    html: impl Into<bytes::Bytes>,
) -> Response<ProxyBody> {
    let mut response = html_page(status, html);
    let extensions = response.extensions_mut();
    extensions.insert(ProxyFailure {
        blame: Blame::Client,
        reason,
    });
    extensions.insert(event);
    response
}

/// `refusal` for `cause`, the reason as the event's detail.
pub fn refused(
    status: StatusCode,
    reason: &'static str,
    cause: SecurityCause,
) -> Response<ProxyBody> {
    refusal(status, reason, SecurityEvent::with_detail(cause, reason))
}

/// `Retry-After` (RFC 9110 §10.2.3) in whole seconds, rounded up so a retry at that time finds what was
/// missing, and at least 1.
pub fn set_retry_after<B>(response: &mut Response<B>, wait: std::time::Duration) {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
}

/// A small HTML page for `status` with no internals: for answers that are not failures (a static file
/// that does not exist is an ordinary 404, like Django's own).
pub fn status_page(status: StatusCode) -> Response<ProxyBody> {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    html_page(
        status,
        format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
             <body><h1>{title}</h1></body></html>\n"
        ),
    )
}

/// `body` as an HTML page for `status`, never cached.
pub fn html_page(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pub fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
