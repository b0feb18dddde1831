//! The proxy service, innermost on the request path: rewrites the request for the upstream (hop-by-hop
//! out, forwarded headers in), sends it to a backend the pool chooses, streams the answer back, and turns
//! every failure into a response tagged with who caused it. WebSocket upgrades become a byte tunnel.
//!
//! Retries never repeat a side effect. A request goes to another backend (or the same one on a new
//! connection) only when no response byte has arrived and either the connection could not be made (it
//! never left: any method) or the method is idempotent (RFC 9110 §9.2.2); and only when its body was
//! read whole and can be sent again. At most `upstream.retries` more attempts, all within one
//! `response_timeout`. Non-idempotent requests go on a kept-alive connection only if it has been idle
//! for less than `pool_reuse_for_posts` (well under Gunicorn's keep-alive timeout, so the backend is not
//! closing it), else on a new one; either way they are never sent twice. The response timeout starts
//! once the whole body has gone upstream: a slow upload is the client's 408, not Gunicorn's 504.

pub mod headers;
pub mod pool;
pub mod upstream;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use http::header::CONTENT_LENGTH;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tower::Service;

use crate::body::{BodyError, BufferBudget, ProxyBody, RequestBody, UpstreamBody, held_bytes};
use crate::config::{Config, ErrorPages};
use crate::context::{AccelRedirect, ConnInfo, TrustedProxies, UpstreamBackend, UpstreamTiming};
use crate::metrics::BackendGauge;
use crate::response::{Blame, ProxyFailure, error_page, refused, set_retry_after};
use crate::security::SecurityCause;
use headers::{
    ForwardingPolicy, join_cookie_fields, keep_upgrade, own_field_values, remove_hop_by_hop,
    websocket_upgrade,
};
use pool::{AllDown, Picked, Pool};
use upstream::{ClientError, Reuse, UpstreamClient, build_client};

/// What `set_forwarded_headers` writes into a request: X-Forwarded-For/-Proto/-Host/-Port, X-Real-IP.
const FORWARDED_FIELDS: usize = 5;
/// What the response layers typically add: the security headers, `Vary`, `Content-Encoding`.
const ADDED_RESPONSE_FIELDS: usize = 12;

#[derive(Clone)]
pub struct ProxyService {
    shared: Arc<Shared>,
}

struct Shared {
    /// One pool per worker thread (`ConnInfo::worker`): a connection is driven on the thread of the
    /// requests that use it. Idempotent requests take any kept-alive connection; the rest only one
    /// idle for less than `reuse_for_posts` (see the module comment).
    clients: Vec<UpstreamClient>,
    reuse_for_posts: Duration,
    pool: Arc<Pool>,
    retries: u32,
    forwarding: ForwardingPolicy,
    response_timeout: Duration,
    max_body: u64,
    /// Bodies declared up to this size are read whole before the upstream is contacted.
    buffer_body: u64,
    /// Responses declared up to this size are read whole from the upstream before they are sent on,
    /// while `budget` has room for them.
    buffer_response: u64,
    budget: BufferBudget,
    body_timeout: Duration,
    /// `[errors]`: the team's own pages for the 502, 503 and 504 the proxy writes.
    pages: ErrorPages,
    /// Whether an `internal` `[[static]]` mount can take an upstream's `X-Accel-Redirect`.
    accel_redirect: bool,
}

impl ProxyService {
    /// `public_https_port` is the port clients reach us on, for `X-Forwarded-Port`. Starts the pool's
    /// health checks, which end when the service (its config) is dropped.
    pub fn new(config: &Config, public_https_port: u16, budget: BufferBudget) -> Self {
        let clients: Vec<UpstreamClient> = (0..config.server.workers.max(1))
            .map(|_| build_client(&config.upstream))
            .collect();
        let pool = Arc::new(Pool::new(&config.upstream));
        if let Some(host) = config
            .server
            .domains
            .iter()
            .next()
            .and_then(|d| http::HeaderValue::from_str(d).ok())
        {
            // Their own pool: the checks run on the main runtime, the workers' pools stay theirs.
            pool.spawn_health_checks(build_client(&config.upstream), host);
        }
        ProxyService {
            shared: Arc::new(Shared {
                clients,
                reuse_for_posts: config.upstream.pool_reuse_for_posts,
                pool,
                retries: config.upstream.retries,
                forwarding: ForwardingPolicy {
                    trusted_proxies: TrustedProxies::new(config.server.trusted_proxies.clone()),
                    port: Some(http::HeaderValue::from(public_https_port)),
                },
                response_timeout: config.upstream.response_timeout,
                max_body: config.limits.max_body,
                buffer_body: config.limits.buffer_body,
                buffer_response: config.limits.buffer_response,
                budget,
                body_timeout: config.limits.body_timeout,
                pages: config.errors.clone(),
                accel_redirect: config.static_files.iter().any(|m| m.internal),
            }),
        }
    }

    /// The backends' state, for the metrics.
    pub fn backends(&self) -> Vec<BackendGauge> {
        self.shared.pool.snapshot()
    }
}

/// nginx's `X-Accel-*` response fields are instructions to the proxy, never for the client: all are
/// removed, and the redirect target (if any) returned.
fn take_accel_headers(headers: &mut http::HeaderMap) -> Option<http::HeaderValue> {
    const INSTRUCTIONS: [&str; 4] = [
        "x-accel-buffering",
        "x-accel-charset",
        "x-accel-expires",
        "x-accel-limit-rate",
    ];
    // Almost no response has any: one look at the names present instead of five lookups.
    if !headers
        .keys()
        .any(|name| name.as_str().starts_with("x-accel-"))
    {
        return None;
    }
    let target = headers.remove("x-accel-redirect");
    for name in INSTRUCTIONS {
        headers.remove(name);
    }
    target
}

/// Why one attempt got no response.
enum Failure {
    /// The client's body broke a limit or stopped: its answer is ready (413, 408, 400).
    Client(Response<ProxyBody>),
    /// No response within the response timeout.
    Timeout,
    /// The backend could not be reached (`connect`: the request never left) or failed before answering.
    Upstream { connect: bool, error: ClientError },
}

impl Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let response = shared.forward(req).await;
            Ok(shared.with_custom_page(response))
        })
    }
}

impl Shared {
    /// One request, in order: refuse what cannot be proxied, rewrite the head for the hop, read or wrap
    /// the body, send it to a backend (with safe retries), pass the response back.
    async fn forward(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let Some(conn) = req.extensions_mut().remove::<ConnInfo>() else {
            return error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                Blame::Proxy,
                "request without connection info",
            );
        };
        if req.method() == Method::CONNECT {
            return error_page(
                StatusCode::METHOD_NOT_ALLOWED,
                Blame::Client,
                "CONNECT is not proxied",
            );
        }
        let Some(path_and_query) = origin_form(req.uri()) else {
            return error_page(
                StatusCode::BAD_REQUEST,
                Blame::Client,
                "request target is not a path",
            );
        };
        let declared_length = match content_length(req.headers()) {
            Err(()) => {
                return error_page(
                    StatusCode::BAD_REQUEST,
                    Blame::Client,
                    "invalid Content-Length",
                );
            }
            Ok(Some(len)) if len > self.max_body => {
                return refused(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body over limits.max_body",
                    SecurityCause::TooLarge,
                );
            }
            Ok(len) => len,
        };

        let upgrade = websocket_upgrade(req.headers(), req.version());
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        // Room for the X-Forwarded-* fields at once, not by doubling as they come.
        let _ = parts.headers.try_reserve(FORWARDED_FIELDS);
        remove_hop_by_hop(&mut parts.headers);
        join_cookie_fields(&mut parts.headers);
        self.forwarding.set_forwarded_headers(
            &mut parts.headers,
            conn.peer.ip(),
            conn.peer_value.as_ref(),
            conn.tls,
        );
        if let Some(upgrade) = upgrade {
            keep_upgrade(&mut parts.headers, upgrade);
        }
        let body = match self.request_body(body, declared_length).await {
            Ok(body) => body,
            Err(answer) => return answer,
        };
        let started = Instant::now();
        let sent = self
            .send(&parts, &path_and_query, body, started, conn.worker)
            .await;
        let (picked, response) = match sent {
            Ok(sent) => sent,
            Err(answer) => return answer,
        };
        let client_http2 = parts.version == Version::HTTP_2;
        self.pass_back(
            picked,
            response,
            started,
            client_upgrade,
            conn,
            client_http2,
        )
        .await
    }
}

/// The path and query to send upstream; `None` for asterisk-form or authority-form targets.
fn origin_form(uri: &Uri) -> Option<PathAndQuery> {
    let pq = uri.path_and_query()?;
    pq.as_str().starts_with('/').then(|| pq.clone())
}

/// The declared body length. hyper already refuses conflicting or duplicate lengths on HTTP/1.1; this also
/// covers HTTP/2, where the field is informational but must still be a single number.
fn content_length(headers: &http::HeaderMap) -> Result<Option<u64>, ()> {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(());
    }
    let text = first.to_str().map_err(|_| ())?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    text.parse().map(Some).map_err(|_| ())
}

impl Shared {
    /// The backend's response on its way to the client: a WebSocket 101 becomes a tunnel, hop-by-hop
    /// fields go, and a response of known, modest size is read whole so Gunicorn is free at once.
    async fn pass_back(
        &self,
        picked: Picked,
        mut response: Response<UpstreamBody>,
        started: Instant,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        conn: ConnInfo,
        client_http2: bool,
    ) -> Response<ProxyBody> {
        let upstream_time = started.elapsed();
        self.pool.record_success(&picked, upstream_time);

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            match (
                client_upgrade,
                websocket_upgrade(response.headers(), Version::HTTP_11),
            ) {
                (Some(client_upgrade), Some(_)) => {
                    let upstream_upgrade = hyper::upgrade::on(&mut response);
                    tokio::spawn(tunnel(client_upgrade, upstream_upgrade, conn));
                }
                _ => {
                    return error_page(
                        StatusCode::BAD_GATEWAY,
                        Blame::Upstream,
                        "unexpected 101 from upstream",
                    );
                }
            }
        } else {
            remove_hop_by_hop(response.headers_mut());
            if client_http2 {
                own_field_values(response.headers_mut());
            }
        }
        let (mut parts, body) = response.into_parts();
        // hyper sized the map for the upstream's fields; the layers above add the security headers.
        let _ = parts.headers.try_reserve(ADDED_RESPONSE_FIELDS);
        // Each hop speaks its own version (RFC 9110 §6.2): an HTTP/1.0 upstream must not make the
        // client's connection HTTP/1.0 and close it after every response.
        parts.version = Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        parts.extensions.insert(UpstreamTiming(upstream_time));
        parts
            .extensions
            .insert(UpstreamBackend(picked.backend.name.clone()));
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            // The upstream's side of the tunnel comes out of its connection, driven to the switch.
            if let Some(mut connection) = body.into_connection() {
                tokio::spawn(async move { std::future::poll_fn(|cx| connection.drive(cx)).await });
            }
            return Response::from_parts(parts, ProxyBody::empty());
        }
        if let Some(target) = take_accel_headers(&mut parts.headers) {
            if !self.accel_redirect {
                tracing::warn!(
                    target = ?target,
                    "upstream sent X-Accel-Redirect, but no `[[static]]` mount has `internal = true`"
                );
                return error_page(
                    StatusCode::BAD_GATEWAY,
                    Blame::Upstream,
                    "X-Accel-Redirect without an internal mount",
                );
            }
            // The body is the app's placeholder; the file replaces it (static_files::StaticOrProxy).
            parts.extensions.insert(AccelRedirect(target));
            return Response::from_parts(parts, ProxyBody::empty());
        }
        // A response of known, modest size is read whole at once: the upstream connection goes back to
        // the pool and the Gunicorn worker is free, however slowly the client reads (what nginx's
        // proxy_buffering does). Streaming responses (no Content-Length: SSE, downloads) pass through.
        // Past the memory budget it streams like a large one.
        let hold = match content_length(&parts.headers) {
            Ok(Some(len)) if len <= self.buffer_response && !body.is_end_stream() => {
                self.budget.try_hold(len)
            }
            _ => None,
        };
        let body = match hold {
            Some(hold) => {
                let left = self.response_timeout.saturating_sub(started.elapsed());
                match tokio::time::timeout(left, body.collect()).await {
                    Ok(Ok(collected)) => ProxyBody::full(held_bytes(collected.to_bytes(), hold)),
                    Ok(Err(error)) => {
                        tracing::warn!(error = %error_chain(&error), "upstream response body failed");
                        return error_page(
                            StatusCode::BAD_GATEWAY,
                            Blame::Upstream,
                            "upstream response body failed",
                        );
                    }
                    Err(_) => {
                        return error_page(
                            StatusCode::GATEWAY_TIMEOUT,
                            Blame::Upstream,
                            "upstream response body too slow",
                        );
                    }
                }
            }
            None => ProxyBody::from(body),
        };
        Response::from_parts(parts, body)
    }

    /// The client's body as it goes upstream: read whole when it is small (a slow client then never
    /// holds a worker, and the request can be sent again), else streamed with its limits.
    async fn request_body(
        &self,
        body: Incoming,
        declared_length: Option<u64>,
    ) -> Result<RequestBody, Response<ProxyBody>> {
        Ok(match declared_length {
            // No body at all (most GETs): nothing to wait for, and the request can be sent again.
            _ if body.is_end_stream() => RequestBody::buffered(bytes::Bytes::new()),
            Some(len) if len <= self.buffer_body => {
                match tokio::time::timeout(self.body_timeout, body.collect()).await {
                    Ok(Ok(collected)) => RequestBody::buffered(collected.to_bytes()),
                    Ok(Err(_)) => {
                        return Err(error_page(
                            StatusCode::BAD_REQUEST,
                            Blame::Client,
                            "request body aborted",
                        ));
                    }
                    Err(_) => {
                        return Err(error_page(
                            StatusCode::REQUEST_TIMEOUT,
                            Blame::Client,
                            "request body too slow",
                        ));
                    }
                }
            }
            _ => RequestBody::streaming(body, self.max_body, self.body_timeout, declared_length),
        })
    }

    /// Sends the request to a backend the pool chooses, again elsewhere where that is safe (see the
    /// module comment), until one answers with a response head; else the client's answer.
    async fn send(
        &self,
        parts: &http::request::Parts,
        path_and_query: &PathAndQuery,
        mut body: RequestBody,
        started: Instant,
        worker: usize,
    ) -> Result<(Picked, Response<UpstreamBody>), Response<ProxyBody>> {
        let replay = body.replayable();
        let idempotent = is_idempotent(&parts.method);
        // One response timeout for every attempt at a request that can be replayed; a streamed body's
        // single attempt gets its timeout from when the body has gone upstream.
        let deadline = replay.is_some().then(|| started + self.response_timeout);
        let mut tried = Vec::new();
        let mut first_body = Some(body);
        loop {
            let picked = match self.pool.choose(&tried, replay.is_some()) {
                Ok(picked) => picked,
                Err(AllDown { retry_after }) => return Err(all_backends_down(retry_after)),
            };
            tried.push(picked.index);
            body = match first_body.take() {
                Some(body) => body,
                None => RequestBody::buffered(replay.clone().unwrap_or_default()),
            };
            let sent = body.sent();
            let mut upstream_req = Request::new(body);
            *upstream_req.method_mut() = parts.method.clone();
            *upstream_req.uri_mut() = Uri::from(path_and_query.clone());
            *upstream_req.version_mut() = Version::HTTP_11;
            *upstream_req.headers_mut() = parts.headers.clone();
            let client = &self.clients[worker % self.clients.len()];
            let reuse = if idempotent {
                Reuse::Any
            } else {
                Reuse::IdleUnder(self.reuse_for_posts)
            };
            let attempt = client.request(&picked.backend.authority, upstream_req, reuse);
            match self.attempt(attempt, sent, deadline).await {
                Ok(response) => return Ok((picked, response)),
                Err(Failure::Client(answer)) => return Err(answer),
                Err(Failure::Timeout) => {
                    self.pool.record_failure(&picked);
                    tracing::warn!(backend = %picked.backend.name, timeout = ?self.response_timeout, "upstream did not answer in time");
                    return Err(error_page(
                        StatusCode::GATEWAY_TIMEOUT,
                        Blame::Upstream,
                        "upstream response timeout",
                    ));
                }
                Err(Failure::Upstream { connect, error }) => {
                    if connect {
                        self.pool.record_failure(&picked);
                    }
                    let retry = replay.is_some()
                        && (connect || idempotent)
                        && tried.len() <= self.retries as usize
                        && deadline.is_some_and(|d| Instant::now() < d);
                    let chain = error_chain(&error);
                    if !retry {
                        // Nothing up any more: the answer that says when to come back.
                        if let Some(AllDown { retry_after }) = self.pool.all_down()
                            && connect
                        {
                            tracing::warn!(backend = %picked.backend.name, error = %chain, "upstream unreachable");
                            return Err(all_backends_down(retry_after));
                        }
                        return Err(upstream_failure(&picked.backend.name, connect, &chain));
                    }
                    tracing::info!(backend = %picked.backend.name, error = %chain, attempt = tried.len(), "retrying on another connection");
                }
            }
        }
    }

    /// The configured page in place of our own 502, 503 or 504 (the upstream's own pass as they are).
    fn with_custom_page(&self, response: Response<ProxyBody>) -> Response<ProxyBody> {
        if response.extensions().get::<ProxyFailure>().is_none() {
            return response;
        }
        let page = match response.status() {
            StatusCode::BAD_GATEWAY => &self.pages.bad_gateway,
            StatusCode::SERVICE_UNAVAILABLE => &self.pages.service_unavailable,
            StatusCode::GATEWAY_TIMEOUT => &self.pages.gateway_timeout,
            _ => return response,
        };
        match page {
            Some(page) => response.map(|_| ProxyBody::full(page.clone())),
            None => response,
        }
    }

    /// One attempt at a response, until `deadline` when the request has one, else until the response
    /// timeout after the whole body has gone upstream (`sent`).
    async fn attempt(
        &self,
        request: impl Future<Output = Result<Response<UpstreamBody>, ClientError>>,
        sent: Option<tokio::sync::oneshot::Receiver<()>>,
        deadline: Option<Instant>,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let response_timeout = self.response_timeout;
        let clock = async move {
            let until = match (deadline, sent) {
                (Some(deadline), _) => deadline,
                (None, sent) => {
                    // A body that fails ends too (and the request with it); either way the clock runs.
                    if let Some(sent) = sent {
                        let _ = sent.await;
                    }
                    Instant::now() + response_timeout
                }
            };
            tokio::time::sleep_until(until).await;
        };
        tokio::select! {
            result = request => result.map_err(|error| {
                match body_error_response(&error) {
                    Some(answer) => Failure::Client(answer),
                    None => Failure::Upstream { connect: error.is_connect(), error },
                }
            }),
            () = clock => Err(Failure::Timeout),
        }
    }
}

/// RFC 9110 §9.2.2: sending these again has the effect of sending them once.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The client's answer when the upstream request failed because of the client's own body.
fn body_error_response(error: &ClientError) -> Option<Response<ProxyBody>> {
    let mut source: Option<&(dyn StdError + 'static)> = error.source();
    while let Some(cause) = source {
        if let Some(body_error) = cause.downcast_ref::<BodyError>() {
            tracing::debug!(error = %body_error, "request body refused");
            let (status, reason) = match body_error {
                BodyError::TooLarge(_) => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body over limits.max_body",
                ),
                BodyError::TimedOut(_) => (StatusCode::REQUEST_TIMEOUT, "request body too slow"),
                BodyError::Client(_) => (StatusCode::BAD_REQUEST, "request body aborted"),
                BodyError::LongerThanDeclared => (
                    StatusCode::BAD_REQUEST,
                    "request body longer than its Content-Length",
                ),
            };
            return Some(error_page(status, Blame::Client, reason));
        }
        source = cause.source();
    }
    None
}

/// The last attempt failed without a response: 502, blamed on the upstream.
fn upstream_failure(backend: &str, connect: bool, chain: &str) -> Response<ProxyBody> {
    if connect {
        tracing::warn!(backend, error = %chain, "upstream unreachable");
        error_page(
            StatusCode::BAD_GATEWAY,
            Blame::Upstream,
            "upstream unreachable",
        )
    } else {
        tracing::warn!(backend, error = %chain, "upstream failed before answering");
        error_page(
            StatusCode::BAD_GATEWAY,
            Blame::Upstream,
            "upstream closed or sent an invalid response",
        )
    }
}

/// Every backend is out: say so at once, with when to come back, instead of queueing the request
/// until the response timeout (RFC 9110 §15.6.4, §10.2.3).
fn all_backends_down(retry_after: Duration) -> Response<ProxyBody> {
    tracing::warn!(retry_after = ?retry_after, "no backend available");
    let mut response = error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        Blame::Upstream,
        "no backend available",
    );
    set_retry_after(&mut response, retry_after);
    response
}

fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Copies bytes both ways between the client and the upstream once both sides switched protocols.
/// The tunnel keeps the connection's slot under the connection cap and ends when the server shuts down.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    conn: ConnInfo,
) {
    let mut shutdown = conn.shutdown.clone();
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "websocket upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
            Ok((up, down)) => tracing::debug!(bytes_up = up, bytes_down = down, "websocket closed"),
            Err(e) => tracing::debug!(error = %e, "websocket ended with an error"),
        },
        _ = shutdown.wait_for(|stop| *stop) => tracing::debug!(peer = %conn.peer, "websocket closed for shutdown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_must_be_one_plain_number() {
        let length = |values: &[&str]| {
            let mut headers = http::HeaderMap::new();
            for v in values {
                headers.append(CONTENT_LENGTH, v.parse().expect("value"));
            }
            content_length(&headers)
        };
        assert_eq!(length(&[]), Ok(None));
        assert_eq!(length(&["42"]), Ok(Some(42)));
        assert_eq!(length(&["42", "42"]), Err(()));
        assert_eq!(length(&["+42"]), Err(()));
        assert_eq!(length(&["4 2"]), Err(()));
        assert_eq!(length(&["99999999999999999999999"]), Err(()));
    }

    #[test]
    fn only_origin_form_targets_are_forwarded() {
        assert!(origin_form(&"/a?b=c".parse().expect("uri")).is_some());
        assert!(origin_form(&"https://example.com/a".parse().expect("uri")).is_some());
        assert!(origin_form(&"*".parse().expect("uri")).is_none());
        assert!(origin_form(&"example.com:443".parse().expect("uri")).is_none());
    }
}
