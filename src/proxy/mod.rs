//! The proxy service, innermost on the request path: rewrites the request for the upstream (hop-by-hop
//! out, forwarded headers in), sends it over the pooled client, streams the answer back, and turns every
//! failure into a response tagged with who caused it. WebSocket upgrades become a byte tunnel.

pub mod headers;
pub mod upstream;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::CONTENT_LENGTH;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tower::Service;

use crate::body::{BodyError, BufferBudget, ProxyBody, RequestBody, held_bytes};
use crate::config::{Config, UpstreamTarget};
use crate::context::{ConnInfo, TrustedProxies, UpstreamTiming};
use crate::response::{Blame, error_page};
use headers::{
    ForwardingPolicy, join_cookie_fields, keep_upgrade, remove_hop_by_hop, websocket_upgrade,
};
use upstream::{UpstreamClient, build_client};

#[derive(Clone)]
pub struct ProxyService {
    shared: Arc<Shared>,
}

struct Shared {
    client: UpstreamClient,
    /// The authority put in upstream request URIs: it keys the connection pool (unix sockets ignore it).
    authority: Authority,
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
}

impl ProxyService {
    /// `public_https_port` is the port clients reach us on, for `X-Forwarded-Port`.
    pub fn new(config: &Config, public_https_port: u16, budget: BufferBudget) -> Self {
        let authority = match &config.upstream.target {
            UpstreamTarget::Tcp(a) => a.clone(),
            UpstreamTarget::Unix(_) => Authority::from_static("localhost"),
        };
        ProxyService {
            shared: Arc::new(Shared {
                client: build_client(&config.upstream),
                authority,
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
            }),
        }
    }
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
        Box::pin(async move { Ok(shared.forward(req).await) })
    }
}

impl Shared {
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
                return error_page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Blame::Client,
                    "request body over limits.max_body",
                );
            }
            Ok(len) => len,
        };

        let upgrade = websocket_upgrade(req.headers(), req.version());
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        join_cookie_fields(&mut parts.headers);
        self.forwarding
            .set_forwarded_headers(&mut parts.headers, conn.peer.ip(), conn.tls);
        if let Some(upgrade) = upgrade {
            keep_upgrade(&mut parts.headers, upgrade);
        }
        let mut uri_parts = http::uri::Parts::default();
        uri_parts.scheme = Some(Scheme::HTTP);
        uri_parts.authority = Some(self.authority.clone());
        uri_parts.path_and_query = Some(path_and_query);
        let Ok(uri) = Uri::from_parts(uri_parts) else {
            return error_page(
                StatusCode::BAD_REQUEST,
                Blame::Client,
                "request target is not a path",
            );
        };
        let body = match declared_length {
            Some(len) if len <= self.buffer_body && !body.is_end_stream() => {
                match tokio::time::timeout(self.body_timeout, body.collect()).await {
                    Ok(Ok(collected)) => RequestBody::buffered(collected.to_bytes()),
                    Ok(Err(_)) => {
                        return error_page(
                            StatusCode::BAD_REQUEST,
                            Blame::Client,
                            "request body aborted",
                        );
                    }
                    Err(_) => {
                        return error_page(
                            StatusCode::REQUEST_TIMEOUT,
                            Blame::Client,
                            "request body too slow",
                        );
                    }
                }
            }
            _ => RequestBody::streaming(body, self.max_body, self.body_timeout, declared_length),
        };
        let mut upstream_req = Request::new(body);
        *upstream_req.method_mut() = parts.method;
        *upstream_req.uri_mut() = uri;
        *upstream_req.version_mut() = Version::HTTP_11;
        *upstream_req.headers_mut() = parts.headers;

        let started = Instant::now();
        let mut response = match tokio::time::timeout(
            self.response_timeout,
            self.client.request(upstream_req),
        )
        .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return failure_response(&error),
            Err(_) => {
                tracing::warn!(timeout = ?self.response_timeout, "upstream did not answer in time");
                return error_page(
                    StatusCode::GATEWAY_TIMEOUT,
                    Blame::Upstream,
                    "upstream response timeout",
                );
            }
        };
        let upstream_time = started.elapsed();

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
        }
        let (mut parts, body) = response.into_parts();
        // Each hop speaks its own version (RFC 9110 §6.2): an HTTP/1.0 upstream must not make the
        // client's connection HTTP/1.0 and close it after every response.
        parts.version = Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        parts.extensions.insert(UpstreamTiming(upstream_time));
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

/// Maps an upstream-client error to the response the client gets, by where it came from.
fn failure_response(error: &hyper_util::client::legacy::Error) -> Response<ProxyBody> {
    let mut source: Option<&(dyn StdError + 'static)> = error.source();
    while let Some(cause) = source {
        if let Some(body_error) = cause.downcast_ref::<BodyError>() {
            tracing::debug!(error = %body_error, "request body refused");
            return match body_error {
                BodyError::TooLarge(_) => error_page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Blame::Client,
                    "request body over limits.max_body",
                ),
                BodyError::TimedOut(_) => error_page(
                    StatusCode::REQUEST_TIMEOUT,
                    Blame::Client,
                    "request body too slow",
                ),
                BodyError::Client(_) => error_page(
                    StatusCode::BAD_REQUEST,
                    Blame::Client,
                    "request body aborted",
                ),
                BodyError::LongerThanDeclared => error_page(
                    StatusCode::BAD_REQUEST,
                    Blame::Client,
                    "request body longer than its Content-Length",
                ),
            };
        }
        source = cause.source();
    }
    let chain = error_chain(error);
    if error.is_connect() {
        tracing::warn!(error = %chain, "upstream unreachable");
        error_page(
            StatusCode::BAD_GATEWAY,
            Blame::Upstream,
            "upstream unreachable",
        )
    } else {
        tracing::warn!(error = %chain, "upstream failed before answering");
        error_page(
            StatusCode::BAD_GATEWAY,
            Blame::Upstream,
            "upstream closed or sent an invalid response",
        )
    }
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
