//! Operational counters in the Prometheus text format (version 0.0.4), served on `[metrics] listen`: a
//! separate listener for loopback or a private network, since it has no authentication. Counting is one
//! relaxed atomic add per event; everything else is read when scraped.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::acme::AcmeState;
use crate::response::{Blame, ProxyFailure};
use crate::security::SecurityCause;

/// Which listener a response went out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Https,
    Http,
}

impl Listener {
    fn as_str(self) -> &'static str {
        match self {
            Listener::Https => "https",
            Listener::Http => "http",
        }
    }
}

/// Why a connection was closed at its PROXY protocol header (`server.proxy_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeaderRefusal {
    /// A header from a peer that is not a listed balancer.
    Untrusted,
    /// A listed balancer's connection without one.
    Missing,
    Malformed,
    Timeout,
}

impl ProxyHeaderRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyHeaderRefusal::Untrusted => "untrusted",
            ProxyHeaderRefusal::Missing => "missing",
            ProxyHeaderRefusal::Malformed => "malformed",
            ProxyHeaderRefusal::Timeout => "timeout",
        }
    }
}

const PROXY_HEADER_REFUSALS: [ProxyHeaderRefusal; 4] = [
    ProxyHeaderRefusal::Untrusted,
    ProxyHeaderRefusal::Missing,
    ProxyHeaderRefusal::Malformed,
    ProxyHeaderRefusal::Timeout,
];

const LISTENERS: [Listener; 2] = [Listener::Https, Listener::Http];
const BLAMES: [Blame; 3] = [Blame::Client, Blame::Upstream, Blame::Proxy];

/// Counts a connection as resting while held (`Metrics::rest_begins`).
pub struct RestingConnection<'a>(&'a Metrics);

impl Drop for RestingConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_resting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters for one running server; shared by its listeners and request stacks across reloads.
#[derive(Debug, Default)]
pub struct Metrics {
    connections_accepted: AtomicU64,
    connections_refused: AtomicU64,
    /// HTTP/1.1 keep-alive connections resting now (`server::keepalive`: idle, hyper's buffers freed).
    connections_resting: AtomicU64,
    handshake_failures: AtomicU64,
    proxy_header_refusals: [AtomicU64; 4],
    /// By listener, then status class 1xx..5xx.
    responses: [[AtomicU64; 5]; 2],
    /// Responses the proxy wrote instead of the upstream, by who caused them.
    failures: [AtomicU64; 3],
    upstream_count: AtomicU64,
    upstream_micros: AtomicU64,
    /// Security events (refusals and notes), by `SecurityCause`.
    security_events: [AtomicU64; SecurityCause::ALL.len()],
    /// CSP violation reports by directive (`CSP_DIRECTIVES`, the last slot for any other).
    csp_reports: [AtomicU64; CSP_DIRECTIVES.len() + 1],
    /// The shared store (`[storage]`): 0 none configured, 1 reachable, 2 unreachable.
    store_state: AtomicU64,
    store_failures: AtomicU64,
    /// Rate-limit decisions made locally because the shared store could not be asked.
    rate_limit_local: AtomicU64,
}

/// The directives a report may name, as label values: a fixed set, so a client cannot grow the
/// metrics with made-up names.
const CSP_DIRECTIVES: [&str; 22] = [
    "default-src",
    "script-src",
    "script-src-elem",
    "script-src-attr",
    "style-src",
    "style-src-elem",
    "style-src-attr",
    "img-src",
    "font-src",
    "connect-src",
    "media-src",
    "object-src",
    "frame-src",
    "child-src",
    "worker-src",
    "manifest-src",
    "form-action",
    "frame-ancestors",
    "base-uri",
    "trusted-types",
    "require-trusted-types-for",
    "fenced-frame-src",
];

impl Metrics {
    pub fn connection_accepted(&self) {
        self.connections_accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// An idle HTTP/1.1 connection starts resting; the guard counts it until it wakes or closes.
    pub fn rest_begins(&self) -> RestingConnection<'_> {
        self.connections_resting.fetch_add(1, Ordering::Relaxed);
        RestingConnection(self)
    }

    pub fn handshake_failed(&self) {
        self.handshake_failures.fetch_add(1, Ordering::Relaxed);
        self.security_event(SecurityCause::TlsHandshake);
    }

    pub fn set_store_up(&self, up: bool) {
        self.store_state
            .store(if up { 1 } else { 2 }, Ordering::Relaxed);
    }

    pub fn store_failed(&self) {
        self.store_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rate_limit_counted_locally(&self) {
        self.rate_limit_local.fetch_add(1, Ordering::Relaxed);
    }

    pub fn csp_report(&self, directive: &str) {
        let slot = CSP_DIRECTIVES
            .iter()
            .position(|d| *d == directive)
            .unwrap_or(CSP_DIRECTIVES.len());
        self.csp_reports[slot].fetch_add(1, Ordering::Relaxed);
    }

    pub fn security_event(&self, cause: SecurityCause) {
        self.security_events[cause as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn proxy_header_refused(&self, reason: ProxyHeaderRefusal) {
        self.proxy_header_refusals[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_response(
        &self,
        listener: Listener,
        status: StatusCode,
        failure: Option<&ProxyFailure>,
        upstream: Option<Duration>,
    ) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.responses[listener as usize][class].fetch_add(1, Ordering::Relaxed);
        if let Some(failure) = failure {
            self.failures[failure.blame as usize].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(took) = upstream {
            self.upstream_count.fetch_add(1, Ordering::Relaxed);
            let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            self.upstream_micros.fetch_add(micros, Ordering::Relaxed);
        }
    }

    /// The exposition text: these counters plus the gauges read at scrape time.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(2048);
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP portcullis_{name} {help}");
            let _ = writeln!(out, "# TYPE portcullis_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "portcullis_{name}{labels} {value}");
            }
        };
        let one = |value: f64| vec![(String::new(), value)];
        family(
            "connections_accepted_total",
            "counter",
            "Connections accepted on the HTTPS and plain-HTTP listeners.",
            &one(read(&self.connections_accepted) as f64),
        );
        family(
            "connections_refused_total",
            "counter",
            "Connections closed at accept because limits.max_connections were open.",
            &one(read(&self.connections_refused) as f64),
        );
        family(
            "connections_open",
            "gauge",
            "Connections open now, WebSocket tunnels included.",
            &one(gauges.open_connections as f64),
        );
        family(
            "connections_resting",
            "gauge",
            "Idle HTTP/1.1 keep-alive connections holding only their TLS session, buffers freed.",
            &one(read(&self.connections_resting) as f64),
        );
        family(
            "connections_max",
            "gauge",
            "limits.max_connections.",
            &one(gauges.max_connections as f64),
        );
        family(
            "tls_handshake_failures_total",
            "counter",
            "TLS handshakes that failed or timed out (limits.handshake_timeout).",
            &one(read(&self.handshake_failures) as f64),
        );
        let refusals: Vec<(String, f64)> = PROXY_HEADER_REFUSALS
            .iter()
            .map(|&reason| {
                (
                    format!("{{reason=\"{}\"}}", reason.as_str()),
                    read(&self.proxy_header_refusals[reason as usize]) as f64,
                )
            })
            .collect();
        family(
            "proxy_protocol_refused_total",
            "counter",
            "Connections closed at their PROXY protocol header (server.proxy_protocol), by reason.",
            &refusals,
        );
        let mut by_class = Vec::new();
        for listener in LISTENERS {
            for (class, counter) in self.responses[listener as usize].iter().enumerate() {
                by_class.push((
                    format!(
                        "{{listener=\"{}\",code=\"{}xx\"}}",
                        listener.as_str(),
                        class + 1
                    ),
                    read(counter) as f64,
                ));
            }
        }
        family(
            "responses_total",
            "counter",
            "Responses sent, by listener and status class.",
            &by_class,
        );
        let by_blame: Vec<_> = BLAMES
            .iter()
            .map(|&blame| {
                (
                    format!("{{blame=\"{}\"}}", blame.as_str()),
                    read(&self.failures[blame as usize]) as f64,
                )
            })
            .collect();
        family(
            "errors_total",
            "counter",
            "Error responses the proxy wrote itself instead of the upstream's, by cause: client (a \
             4xx it refused), upstream (502/504), proxy (500).",
            &by_blame,
        );
        let by_cause: Vec<_> = SecurityCause::ALL
            .iter()
            .map(|&cause| {
                (
                    format!("{{cause=\"{}\"}}", cause.as_str()),
                    read(&self.security_events[cause as usize]) as f64,
                )
            })
            .collect();
        family(
            "security_events_total",
            "counter",
            "Requests and connections refused or noted as suspicious, by cause (the security log's \
             `cause`; every TLS handshake failure counts, though the log aggregates them).",
            &by_cause,
        );
        let by_directive: Vec<_> = CSP_DIRECTIVES
            .iter()
            .chain(&["other"])
            .zip(&self.csp_reports)
            .map(|(directive, counter)| {
                (
                    format!("{{directive=\"{directive}\"}}"),
                    read(counter) as f64,
                )
            })
            .filter(|(_, value)| *value > 0.0)
            .collect();
        family(
            "csp_reports_total",
            "counter",
            "CSP violation reports received by [csp_reports], by the directive violated.",
            &by_directive,
        );
        let store_state = read(&self.store_state);
        if store_state != 0 {
            family(
                "store_up",
                "gauge",
                "1 while the shared store ([storage], Redis) answers, 0 while it does not (serving goes on).",
                &one(f64::from(u8::from(store_state == 1))),
            );
            family(
                "store_failures_total",
                "counter",
                "Calls to the shared store that failed or timed out.",
                &one(read(&self.store_failures) as f64),
            );
            family(
                "rate_limit_local_total",
                "counter",
                "Rate-limit decisions made by this replica alone because the shared store could not be asked.",
                &one(read(&self.rate_limit_local) as f64),
            );
        }
        family(
            "upstream_response_seconds",
            "summary",
            "Time from sending a request upstream to its response headers.",
            &[
                (
                    "_sum".into(),
                    read(&self.upstream_micros) as f64 / 1_000_000.0,
                ),
                ("_count".into(), read(&self.upstream_count) as f64),
            ],
        );
        if !gauges.backends.is_empty() {
            let samples = |value: &dyn Fn(&BackendGauge) -> f64| -> Vec<(String, f64)> {
                gauges
                    .backends
                    .iter()
                    .map(|b| {
                        (
                            format!("{{backend=\"{}\"}}", label_value(&b.name)),
                            value(b),
                        )
                    })
                    .collect()
            };
            family(
                "backend_up",
                "gauge",
                "1 while a backend takes requests, 0 while passive failures or health checks keep it out.",
                &samples(&|b| f64::from(u8::from(b.up))),
            );
            family(
                "backend_in_flight",
                "gauge",
                "Requests a backend is working on now.",
                &samples(&|b| b.in_flight as f64),
            );
            family(
                "backend_requests_total",
                "counter",
                "Attempts sent to a backend (retries included).",
                &samples(&|b| b.requests as f64),
            );
            family(
                "backend_failures_total",
                "counter",
                "Attempts a backend could not be reached for or did not answer in time.",
                &samples(&|b| b.failures as f64),
            );
            let mut response_time = Vec::new();
            for b in &gauges.backends {
                let name = label_value(&b.name);
                response_time.push((
                    format!("_sum{{backend=\"{name}\"}}"),
                    b.response_seconds_sum,
                ));
                response_time.push((format!("_count{{backend=\"{name}\"}}"), b.responses as f64));
            }
            family(
                "backend_response_seconds",
                "summary",
                "Time from sending a request to a backend to its response headers.",
                &response_time,
            );
        }
        if let Some(expiry) = gauges.certificate_expiry {
            family(
                "certificate_expiry_timestamp_seconds",
                "gauge",
                "When the served certificate expires (Unix time).",
                &one(unix_seconds(expiry)),
            );
        }
        if let Some(acme) = &gauges.acme {
            family(
                "acme_orders_total",
                "counter",
                "ACME orders placed.",
                &one(f64::from(acme.orders_placed)),
            );
            family(
                "acme_certificates_issued_total",
                "counter",
                "Certificates issued by the ACME server and installed.",
                &one(f64::from(acme.issued)),
            );
            family(
                "acme_certificates_loaded_total",
                "counter",
                "Certificates installed from storage: at start, and another replica's from the shared store.",
                &one(f64::from(acme.loaded_from_store)),
            );
            family(
                "acme_lock_held",
                "gauge",
                "1 while this replica holds the order lease and is ordering a certificate.",
                &one(f64::from(u8::from(acme.lock_held))),
            );
            family(
                "acme_failures_total",
                "counter",
                "Failed ACME attempts (each is retried with backoff; the old certificate keeps serving).",
                &one(acme.failures_total as f64),
            );
            if let Some(next) = acme.next_renewal {
                family(
                    "acme_next_renewal_timestamp_seconds",
                    "gauge",
                    "When the next renewal (or retry) is due (Unix time).",
                    &one(unix_seconds(next)),
                );
            }
        }
        out
    }
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as f64)
        .unwrap_or(0.0)
}

/// A label value with `\` and `"` escaped (the text format's rule).
fn label_value(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// One backend as the metrics show it.
#[derive(Debug, Clone, Default)]
pub struct BackendGauge {
    pub name: String,
    pub up: bool,
    pub in_flight: usize,
    pub requests: u64,
    pub failures: u64,
    pub response_seconds_sum: f64,
    pub responses: u64,
}

/// What is read from the server at scrape time.
#[derive(Debug, Default)]
pub struct Gauges {
    pub backends: Vec<BackendGauge>,
    pub open_connections: usize,
    pub max_connections: usize,
    pub certificate_expiry: Option<SystemTime>,
    pub acme: Option<AcmeState>,
}

/// The metrics listener's one resource: `GET /metrics`.
pub fn answer<B>(request: &Request<B>, render: impl FnOnce() -> String) -> Response<Full<Bytes>> {
    let respond = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return respond(StatusCode::NOT_FOUND, "not found: try /metrics\n".into());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = respond(StatusCode::METHOD_NOT_ALLOWED, String::new());
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let mut response = respond(StatusCode::OK, render());
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Serves `/metrics` on `listener` until the task is aborted. Plain HTTP/1.1, a short header timeout.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(&request, render)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_by_label_and_skips_absent_gauges() {
        let metrics = Metrics::default();
        metrics.connection_accepted();
        metrics.count_response(
            Listener::Https,
            StatusCode::OK,
            None,
            Some(Duration::from_millis(1500)),
        );
        let failure = ProxyFailure {
            blame: Blame::Upstream,
            reason: "connect",
        };
        metrics.count_response(
            Listener::Https,
            StatusCode::BAD_GATEWAY,
            Some(&failure),
            None,
        );
        metrics.count_response(Listener::Http, StatusCode::PERMANENT_REDIRECT, None, None);
        let text = metrics.render(&Gauges {
            open_connections: 3,
            max_connections: 10,
            ..Gauges::default()
        });
        for line in [
            "portcullis_connections_accepted_total 1",
            "portcullis_connections_open 3",
            "portcullis_responses_total{listener=\"https\",code=\"2xx\"} 1",
            "portcullis_responses_total{listener=\"https\",code=\"5xx\"} 1",
            "portcullis_responses_total{listener=\"http\",code=\"3xx\"} 1",
            "portcullis_errors_total{blame=\"upstream\"} 1",
            "portcullis_errors_total{blame=\"client\"} 0",
            "portcullis_upstream_response_seconds_sum 1.5",
            "portcullis_upstream_response_seconds_count 1",
            "# TYPE portcullis_responses_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("certificate_expiry"));
        assert!(!text.contains("acme_"));
    }

    #[test]
    fn only_get_metrics_is_served() {
        let get = |method: Method, path: &str| {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .expect("request");
            answer(&request, || "x 1\n".into()).status()
        };
        assert_eq!(get(Method::GET, "/metrics"), StatusCode::OK);
        assert_eq!(get(Method::HEAD, "/metrics"), StatusCode::OK);
        assert_eq!(
            get(Method::POST, "/metrics"),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(get(Method::GET, "/"), StatusCode::NOT_FOUND);
    }
}
