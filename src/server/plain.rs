//! The plain-HTTP listener's service: HTTPS redirects for our own hosts only (no open redirect), ACME
//! HTTP-01 answers (this replica's, or with the shared store any replica's), and an optional health
//! path. Nothing is proxied over plain HTTP.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::header::{CONTENT_TYPE, HOST, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode};
use tower::Service;

use crate::acme::Http01Tokens;
use crate::body::ProxyBody;
use crate::config::Domains;
use crate::middleware::host::{HostPorts, check_host, host_of, push_authority};
use crate::response::{Blame, error_page, text};
use crate::store::SharedStore;

const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

#[derive(Clone)]
pub struct PlainHttpService {
    shared: Arc<Settings>,
}

struct Settings {
    domains: Domains,
    /// Any port: this listener forwards no Host anywhere.
    host_ports: HostPorts,
    public_https_port: u16,
    health_path: Option<String>,
    tokens: Arc<Http01Tokens>,
    /// With `[storage] backend = "redis"`: tokens another replica's order published.
    store: Option<Arc<SharedStore>>,
}

impl PlainHttpService {
    pub fn new(
        domains: Domains,
        host_ports: HostPorts,
        public_https_port: u16,
        health_path: Option<String>,
        tokens: Arc<Http01Tokens>,
        store: Option<Arc<SharedStore>>,
    ) -> Self {
        PlainHttpService {
            shared: Arc::new(Settings {
                domains,
                host_ports,
                public_https_port,
                health_path,
                tokens,
                store,
            }),
        }
    }

    fn respond<B>(&self, mut req: Request<B>) -> Response<ProxyBody> {
        let s = &self.shared;
        let path = req.uri().path();
        if let Some(token) = path.strip_prefix(ACME_CHALLENGE_PREFIX) {
            return acme_answer(s.tokens.get(token));
        }
        if s.health_path.as_deref() == Some(path) {
            return text(StatusCode::OK, "ok\n");
        }
        if let Err(rejection) = check_host(&mut req, &s.domains, s.host_ports, None) {
            return error_page(
                rejection.status(),
                Blame::Client,
                "redirect refused: host not served here",
            );
        }
        let location = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .and_then(|authority| {
                let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
                https_location(host_of(&authority), s.public_https_port, pq)
            });
        match location {
            Some(location) => {
                let mut response = Response::new(ProxyBody::empty());
                // 308 keeps the method and body: a POST stays a POST (RFC 9110 §15.4.9).
                *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
                response.headers_mut().insert(LOCATION, location);
                response
            }
            None => error_page(
                StatusCode::BAD_REQUEST,
                Blame::Client,
                "cannot build a redirect",
            ),
        }
    }
}

/// `https://host[:port]/path?query` for a host already checked against the allowlist.
pub fn https_location(host: &str, port: u16, path_and_query: &str) -> Option<HeaderValue> {
    // Only a valid origin-form target (RFC 9112 §3.2.1) goes into the Location.
    let valid = path_and_query.starts_with('/')
        && path_and_query.parse::<http::uri::PathAndQuery>().is_ok();
    if !valid {
        return None;
    }
    let mut location = String::with_capacity(16 + host.len() + path_and_query.len());
    location.push_str("https://");
    push_authority(&mut location, host, (port != 443).then_some(port));
    // hyper passes raw non-ASCII bytes in targets through; a Location is ASCII, so percent-encode them.
    for byte in path_and_query.bytes() {
        if byte.is_ascii() {
            location.push(char::from(byte));
        } else {
            location.push_str(&format!("%{byte:02X}"));
        }
    }
    HeaderValue::from_str(&location).ok()
}

/// The key authorization for an HTTP-01 token (RFC 8555 §8.3), or 404.
fn acme_answer(key_authorization: Option<String>) -> Response<ProxyBody> {
    match key_authorization {
        Some(key_authorization) => {
            let mut response = Response::new(ProxyBody::full(key_authorization));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        None => error_page(
            StatusCode::NOT_FOUND,
            Blame::Client,
            "unknown ACME challenge token",
        ),
    }
}

type SharedLookup = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl<B> Service<Request<B>> for PlainHttpService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    /// Ready, but for a token only another replica knows: then a lookup in the shared store.
    type Future = Either<Ready<Result<Response<ProxyBody>, Infallible>>, SharedLookup>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let s = &self.shared;
        if let (Some(store), Some(token)) = (
            &s.store,
            req.uri().path().strip_prefix(ACME_CHALLENGE_PREFIX),
        ) && s.tokens.get(token).is_none()
        {
            let (store, token) = (store.clone(), token.to_string());
            return Either::Right(Box::pin(async move {
                Ok(acme_answer(
                    crate::acme::shared::shared_http01(&store, &token).await,
                ))
            }));
        }
        Either::Left(ready(Ok(self.respond(req))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> PlainHttpService {
        let tokens = Arc::new(Http01Tokens::default());
        tokens.insert("tok", "tok.thumb");
        PlainHttpService::new(
            Domains::new(vec!["example.com".into(), "::1".into()]),
            HostPorts {
                default: 80,
                public: None,
            },
            8443,
            Some("/healthz".into()),
            tokens,
            None,
        )
    }

    fn get(host: &str, uri: &str) -> Response<ProxyBody> {
        let req = Request::builder()
            .uri(uri)
            .header(HOST, host)
            .body(())
            .expect("request");
        service().respond(req)
    }

    #[test]
    fn redirect_keeps_path_and_query_and_uses_the_public_port() {
        let response = get("example.com:8080", "/a/b?c=d&e");
        assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(
            response.headers()[LOCATION],
            "https://example.com:8443/a/b?c=d&e"
        );
        assert_eq!(
            get("[::1]:8080", "/").headers()[LOCATION],
            "https://[::1]:8443/"
        );
    }

    #[test]
    fn no_redirect_for_foreign_hosts_or_ports() {
        for host in ["evil.com", "example.com:abc", "example.com:99999"] {
            let response = get(host, "/");
            assert!(response.status().is_client_error(), "{host}");
            assert!(response.headers().get(LOCATION).is_none(), "{host}");
        }
        assert_eq!(
            get("example.com:80", "/").status(),
            StatusCode::PERMANENT_REDIRECT
        );
    }

    #[test]
    fn location_builder() {
        assert_eq!(
            https_location("example.com", 443, "//evil.com/x").expect("location"),
            "https://example.com//evil.com/x"
        );
        assert!(https_location("example.com", 443, "evil.com").is_none());
        assert!(https_location("example.com", 443, "/a\tb").is_none());
        assert_eq!(
            https_location("example.com", 443, "/caf\u{e9}?q=\u{e9}").expect("location"),
            "https://example.com/caf%C3%A9?q=%C3%A9"
        );
    }

    #[test]
    fn acme_tokens_and_health() {
        assert_eq!(
            get("anything", "/.well-known/acme-challenge/tok").status(),
            StatusCode::OK
        );
        assert_eq!(
            get("anything", "/.well-known/acme-challenge/nope").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(get("anything", "/healthz").status(), StatusCode::OK);
    }
}
