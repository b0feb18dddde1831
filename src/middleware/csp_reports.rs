//! The CSP violation report collector (`[csp_reports]`): browsers POST what a Content-Security-Policy
//! blocked to a same-origin path, as `application/csp-report` (`report-uri`, CSP Level 2) or
//! `application/reports+json` (the Reporting API's `report-to`). Each report becomes a security event
//! (directive, blocked URL, document, sample), written once per distinct violation and again at 10,
//! 100, 1000… occurrences with the count, and counted by directive. Bounded in size and per client
//! (`[[rate_limit]]`'s buckets); never forwarded to Gunicorn.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tower::{Layer, Service};

use super::{RateLimiter, RequestGate};
use crate::body::ProxyBody;
use crate::config::CspReports;
use crate::context::{ConnInfo, TrustedProxies};
use crate::metrics::Metrics;
use crate::response::{Blame, error_page, refused};
use crate::route_path::route_path;
use crate::security::{EventPlace, SecurityCause, SecurityEvent, write_event};

/// Distinct violations remembered for de-duplication; past it the table starts again (a page that
/// makes this many distinct reports is broken in a way the first ones already showed).
const MAX_DISTINCT: usize = 10_000;
/// Longest field kept from a report: enough for a URL, short of filling the log for an attacker.
const MAX_FIELD: usize = 256;

/// One violation, in the fields both report formats share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Violation {
    pub directive: String,
    pub blocked: String,
    pub document: String,
    pub sample: String,
    /// `enforce` or `report` (from CSP-Report-Only).
    pub disposition: String,
}

/// The violations in a report body, in either format; `None` if it is neither.
pub fn parse_reports(body: &[u8]) -> Option<Vec<Violation>> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    let field = |object: &serde_json::Value, names: &[&str]| -> String {
        let text = names
            .iter()
            .find_map(|n| object.get(*n).and_then(|v| v.as_str()))
            .unwrap_or("");
        text.chars().take(MAX_FIELD).collect()
    };
    let violation = |r: &serde_json::Value, level_three: bool| {
        let directive = if level_three {
            field(r, &["effectiveDirective"])
        } else {
            field(r, &["effective-directive", "violated-directive"])
        };
        // CSP2's violated-directive is the whole directive ("script-src 'self'"); its name is enough.
        let directive = directive
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        if level_three {
            Violation {
                directive,
                blocked: field(r, &["blockedURL"]),
                document: field(r, &["documentURL"]),
                sample: field(r, &["sample"]),
                disposition: field(r, &["disposition"]),
            }
        } else {
            Violation {
                directive,
                blocked: field(r, &["blocked-uri"]),
                document: field(r, &["document-uri"]),
                sample: field(r, &["script-sample"]),
                disposition: field(r, &["disposition"]),
            }
        }
    };
    if let Some(report) = json.get("csp-report") {
        return Some(vec![violation(report, false)]);
    }
    let reports = json.as_array()?;
    Some(
        reports
            .iter()
            .filter(|r| r.get("type").and_then(|t| t.as_str()) == Some("csp-violation"))
            .filter_map(|r| r.get("body"))
            .map(|body| violation(body, true))
            .collect(),
    )
}

#[derive(Clone)]
pub struct CspCollectorLayer {
    shared: Option<Arc<Collector>>,
}

struct Collector {
    path: String,
    max_body: usize,
    body_timeout: Duration,
    budget: RateLimiter,
    trusted_proxies: TrustedProxies,
    metrics: Arc<Metrics>,
    seen: Mutex<HashMap<Violation, u64>>,
}

impl CspCollectorLayer {
    /// `None`: reports are not collected, and the path is the app's like any other.
    pub fn new(
        config: Option<&CspReports>,
        body_timeout: Duration,
        trusted_proxies: TrustedProxies,
        metrics: Arc<Metrics>,
    ) -> Self {
        CspCollectorLayer {
            shared: config.map(|c| {
                Arc::new(Collector {
                    path: c.path.clone(),
                    max_body: c.max_body,
                    body_timeout,
                    budget: RateLimiter::new(vec![c.budget.clone()], trusted_proxies.clone()),
                    trusted_proxies,
                    metrics,
                    seen: Mutex::new(HashMap::new()),
                })
            }),
        }
    }
}

impl<S> Layer<S> for CspCollectorLayer {
    type Service = CspCollector<S>;
    fn layer(&self, inner: S) -> CspCollector<S> {
        CspCollector {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CspCollector<S> {
    inner: S,
    shared: Option<Arc<Collector>>,
}

type Collecting = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl<S> Service<Request<Incoming>> for CspCollector<S>
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Either<S::Future, Collecting>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        match &self.shared {
            Some(collector) if route_path(req.uri().path()) == collector.path => {
                let collector = collector.clone();
                Either::Right(Box::pin(async move { Ok(collector.collect(req).await) }))
            }
            _ => Either::Left(self.inner.call(req)),
        }
    }
}

impl Collector {
    async fn collect(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        if req.method() != Method::POST {
            let mut response = error_page(
                StatusCode::METHOD_NOT_ALLOWED,
                Blame::Client,
                "CSP reports are POSTed",
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
        let media_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase());
        if !matches!(
            media_type.as_deref(),
            Some("application/csp-report" | "application/reports+json" | "application/json")
        ) {
            return error_page(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Blame::Client,
                "not a CSP report",
            );
        }
        if let Err(spent) = self.budget.admit(&mut req) {
            return *spent;
        }
        let place = |req: &Request<Incoming>| -> (Option<std::net::IpAddr>, Option<String>) {
            let client = req
                .extensions()
                .get::<ConnInfo>()
                .map(|c| self.trusted_proxies.client_ip(req.headers(), c.peer.ip()));
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string);
            (client, host)
        };
        let (client, host) = place(&req);
        let body = Limited::new(req.into_body(), self.max_body);
        let bytes = match tokio::time::timeout(self.body_timeout, body.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(_)) => {
                return refused(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "CSP report over csp_reports.max_body",
                    SecurityCause::TooLarge,
                );
            }
            Err(_) => {
                return error_page(
                    StatusCode::REQUEST_TIMEOUT,
                    Blame::Client,
                    "CSP report body too slow",
                );
            }
        };
        let Some(violations) = parse_reports(&bytes) else {
            return error_page(
                StatusCode::BAD_REQUEST,
                Blame::Client,
                "CSP report is not JSON in either report format",
            );
        };
        for violation in violations {
            self.record(
                violation,
                EventPlace {
                    client,
                    host: host.as_deref(),
                    method: Some("POST"),
                    path: Some(&self.path),
                },
            );
        }
        let mut response = Response::new(ProxyBody::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        response
    }

    /// Counts the violation; writes it the first time and at each power of ten.
    fn record(&self, violation: Violation, place: EventPlace<'_>) {
        self.metrics.csp_report(&violation.directive);
        self.metrics.security_event(SecurityCause::CspReport);
        let count = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.len() >= MAX_DISTINCT && !seen.contains_key(&violation) {
                seen.clear();
            }
            let count = seen.entry(violation.clone()).or_insert(0);
            *count += 1;
            *count
        };
        if !is_power_of_ten(count) {
            return;
        }
        let detail = format!(
            "{} blocked {} on {}{}{}",
            if violation.directive.is_empty() {
                "?"
            } else {
                &violation.directive
            },
            if violation.blocked.is_empty() {
                "?"
            } else {
                &violation.blocked
            },
            violation.document,
            if violation.sample.is_empty() {
                String::new()
            } else {
                format!(" (sample {:?})", violation.sample)
            },
            if violation.disposition == "report" {
                " [report-only]"
            } else {
                ""
            },
        );
        write_event(
            &SecurityEvent::with_detail(SecurityCause::CspReport, detail),
            place,
            count,
        );
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n % 10 == 0 {
        n /= 10;
    }
    n == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_report_formats_are_read() {
        let level_two =
            br#"{"csp-report":{"document-uri":"https://app.example/admin/","referrer":"",
            "violated-directive":"script-src-elem","effective-directive":"script-src-elem",
            "original-policy":"default-src 'self'","disposition":"enforce","blocked-uri":"inline",
            "line-number":3,"script-sample":"alert(1)","status-code":200}}"#;
        assert_eq!(
            parse_reports(level_two),
            Some(vec![Violation {
                directive: "script-src-elem".into(),
                blocked: "inline".into(),
                document: "https://app.example/admin/".into(),
                sample: "alert(1)".into(),
                disposition: "enforce".into(),
            }])
        );
        // Older browsers send only the whole violated directive.
        let old = br#"{"csp-report":{"violated-directive":"img-src 'self'","blocked-uri":"https://x.example/a.png"}}"#;
        assert_eq!(parse_reports(old).expect("parsed")[0].directive, "img-src");
        let reporting_api = br#"[{"age":2,"type":"csp-violation","url":"https://app.example/",
            "user_agent":"x","body":{"documentURL":"https://app.example/","disposition":"report",
            "effectiveDirective":"style-src-attr","blockedURL":"inline","sample":"color: red",
            "statusCode":200}},{"type":"deprecation","body":{}}]"#;
        let parsed = parse_reports(reporting_api).expect("parsed");
        assert_eq!(parsed.len(), 1, "other report types are left out");
        assert_eq!(parsed[0].directive, "style-src-attr");
        assert_eq!(parsed[0].disposition, "report");
        assert_eq!(parse_reports(b"not json"), None);
        assert_eq!(parse_reports(br#"{"x":1}"#), None);
        // An attacker's megabyte URL is cut to what a log line can hold.
        let long = format!(
            r#"{{"csp-report":{{"blocked-uri":"https://x.example/{}"}}}}"#,
            "a".repeat(5000)
        );
        assert_eq!(
            parse_reports(long.as_bytes()).expect("parsed")[0]
                .blocked
                .len(),
            MAX_FIELD
        );
    }

    #[test]
    fn repeated_violations_are_written_at_powers_of_ten() {
        let written: Vec<u64> = (1..=1000).filter(|n| is_power_of_ten(*n)).collect();
        assert_eq!(written, [1, 10, 100, 1000]);
    }
}
