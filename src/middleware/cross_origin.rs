//! Cross-origin request protection for unsafe methods, as Go 1.25's `http.CrossOriginProtection` does it:
//! defence in depth behind Django's CSRF check, and the only defence for `@csrf_exempt` views. Browsers
//! say where a request comes from in `Sec-Fetch-Site` (Fetch Metadata); older ones only in `Origin`
//! (RFC 6454 §7), compared with the request's own `https://host`. A request with neither header is not
//! from a browser (curl, webhooks, server-to-server calls) and passes: CSRF needs a victim's browser.

use http::header::ORIGIN;
use http::{HeaderMap, Method, Request, Response, StatusCode};

use super::RequestGuard;
use crate::body::ProxyBody;
use crate::config::{CrossOriginMode, CrossOriginPolicy};
use crate::response::refusal_page;
use crate::route_path::route_path;
use crate::security::{SecurityCause, SecurityEvent};

static SEC_FETCH_SITE: http::HeaderName = http::HeaderName::from_static("sec-fetch-site");

const REFUSED_PAGE: &str = "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>403 Forbidden\
</title></head><body><h1>403 Forbidden</h1><p>This request came from another site and was refused by \
the proxy (cross-origin request protection).</p><p>If this address is meant to take requests from \
another site (a payment provider's return, a SAML assertion consumer, an OAuth <code>form_post</code>), \
add its path to <code>cross_origin.exempt</code>, or the sending origin to \
<code>cross_origin.trusted_origins</code>, in the proxy's config.</p></body></html>\n";

pub struct CrossOriginGuard {
    policy: CrossOriginPolicy,
}

impl CrossOriginGuard {
    pub fn new(policy: CrossOriginPolicy) -> Self {
        CrossOriginGuard { policy }
    }
}

/// `Err` says what gave the request away, for the log.
pub fn judge_cross_origin(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    policy: &CrossOriginPolicy,
) -> Result<(), String> {
    // RFC 9110 §9.2.1: the safe methods change nothing, so a cross-site one harms no one.
    if matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) {
        return Ok(());
    }
    let origin = headers.get(ORIGIN).and_then(|o| o.to_str().ok());
    if let Some(origin) = origin
        && policy
            .trusted_origins
            .iter()
            .any(|t| t.eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    if !policy.exempt.is_empty() {
        let path = route_path(path);
        if policy.exempt.iter().any(|prefix| path.starts_with(prefix)) {
            return Ok(());
        }
    }
    let shown_origin = || origin.map(|o| format!(", Origin {o}")).unwrap_or_default();
    match headers.get(&SEC_FETCH_SITE).map(|v| v.as_bytes()) {
        // `none`: the user typed it or used a bookmark.
        Some(b"same-origin" | b"none") => Ok(()),
        Some(b"same-site") if policy.allow_same_site => Ok(()),
        Some(site) => Err(format!(
            "Sec-Fetch-Site {}{}",
            String::from_utf8_lossy(site),
            shown_origin()
        )),
        None => match origin {
            None => Ok(()),
            Some(origin) => {
                let host = headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("");
                if same_origin(origin, host) {
                    Ok(())
                } else {
                    Err(format!("Origin {origin} is not https://{host}"))
                }
            }
        },
    }
}

/// `origin` is `https://` + `host` (the Host guard left it in normal form, default port dropped, as a
/// browser serialises an origin). Anything else, `null` included, is another origin.
fn same_origin(origin: &str, host: &str) -> bool {
    let scheme = "https://";
    match (origin.get(..scheme.len()), origin.get(scheme.len()..)) {
        (Some(start), Some(rest)) => {
            start.eq_ignore_ascii_case(scheme)
                && !host.is_empty()
                && rest.eq_ignore_ascii_case(host)
        }
        _ => false,
    }
}

impl RequestGuard for CrossOriginGuard {
    /// In report mode, the event to mark the app's response with.
    type Note = Option<SecurityEvent>;

    fn before<B>(&self, req: &mut Request<B>) -> Result<Self::Note, Box<Response<ProxyBody>>> {
        if self.policy.mode == CrossOriginMode::Off {
            return Ok(None);
        }
        let Err(seen) =
            judge_cross_origin(req.method(), req.uri().path(), req.headers(), &self.policy)
        else {
            return Ok(None);
        };
        let detail =
            format!("{seen}; allow it with cross_origin.exempt or cross_origin.trusted_origins");
        if self.policy.mode == CrossOriginMode::Report {
            return Ok(Some(SecurityEvent::with_detail(
                SecurityCause::CrossOriginReported,
                detail,
            )));
        }
        Err(Box::new(refusal_page(
            StatusCode::FORBIDDEN,
            "cross-origin request refused",
            SecurityEvent::with_detail(SecurityCause::CrossOriginRefused, detail),
            REFUSED_PAGE,
        )))
    }

    fn after(&self, note: Self::Note, response: &mut Response<ProxyBody>) {
        if let Some(event) = note
            && response.extensions().get::<SecurityEvent>().is_none()
        {
            response.extensions_mut().insert(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::HeaderValue;
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::middleware::guard_layer;

    fn policy(mode: CrossOriginMode) -> CrossOriginPolicy {
        CrossOriginPolicy {
            mode,
            trusted_origins: vec!["https://pay.example.net".into()],
            exempt: vec!["/saml/acs/".into()],
            allow_same_site: false,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert("host", HeaderValue::from_static("app.example.com"));
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).expect("value"));
        }
        map
    }

    #[test]
    fn browsers_are_judged_by_fetch_metadata_then_by_origin() {
        let p = policy(CrossOriginMode::Enforce);
        let post = |path: &str, pairs: &[(&'static str, &str)]| {
            judge_cross_origin(&Method::POST, path, &headers(pairs), &p)
        };
        // Not from a browser: curl, webhooks, server-to-server.
        assert!(post("/api/hook/", &[]).is_ok());
        assert!(post("/", &[("sec-fetch-site", "same-origin")]).is_ok());
        assert!(post("/", &[("sec-fetch-site", "none")]).is_ok());
        assert!(post("/", &[("sec-fetch-site", "cross-site")]).is_err());
        assert!(post("/", &[("sec-fetch-site", "same-site")]).is_err());
        assert!(post("/", &[("sec-fetch-site", "something-new")]).is_err());
        // Fetch metadata wins over a matching Origin (it cannot be forged by page script).
        let forged = [
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://app.example.com"),
        ];
        assert!(post("/", &forged).is_err());
        // Older browsers: Origin against the request's own scheme and host.
        assert!(post("/", &[("origin", "https://app.example.com")]).is_ok());
        assert!(post("/", &[("origin", "HTTPS://App.Example.com")]).is_ok());
        assert!(post("/", &[("origin", "http://app.example.com")]).is_err());
        assert!(post("/", &[("origin", "https://evil.example")]).is_err());
        assert!(post("/", &[("origin", "https://app.example.com.evil.example")]).is_err());
        assert!(post("/", &[("origin", "null")]).is_err());
        // Trusted origins and exempt paths (in route_path's form) pass.
        let trusted = [
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://pay.example.net"),
        ];
        assert!(post("/checkout/return/", &trusted).is_ok());
        let idp = [
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://idp.example.org"),
        ];
        assert!(post("/saml/acs/", &idp).is_ok());
        assert!(post("/saml/%61cs/", &idp).is_ok());
        assert!(post("/saml/", &idp).is_err());
        // Safe methods never.
        let cross = headers(&[("sec-fetch-site", "cross-site")]);
        assert!(judge_cross_origin(&Method::GET, "/", &cross, &p).is_ok());
        assert!(judge_cross_origin(&Method::DELETE, "/", &cross, &p).is_err());
        let same_site = CrossOriginPolicy {
            allow_same_site: true,
            ..p.clone()
        };
        let sibling = headers(&[("sec-fetch-site", "same-site")]);
        assert!(judge_cross_origin(&Method::POST, "/", &sibling, &same_site).is_ok());
    }

    async fn post_through(mode: CrossOriginMode) -> (StatusCode, Option<SecurityCause>, bool) {
        let reached = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = reached.clone();
        let inner = service_fn(move |_req: Request<()>| {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(ProxyBody::empty())) }
        });
        let service = ServiceBuilder::new()
            .layer(guard_layer(CrossOriginGuard::new(policy(mode))))
            .service(inner);
        let req = Request::builder()
            .method(Method::POST)
            .uri("/transfer/")
            .header("host", "app.example.com")
            .header("sec-fetch-site", "cross-site")
            .body(())
            .expect("request");
        let Ok(response) = service.oneshot(req).await;
        let cause = response
            .extensions()
            .get::<SecurityEvent>()
            .map(|e| e.cause);
        (
            response.status(),
            cause,
            reached.load(std::sync::atomic::Ordering::SeqCst),
        )
    }

    #[tokio::test]
    async fn enforce_refuses_report_marks_off_ignores() {
        assert_eq!(
            post_through(CrossOriginMode::Enforce).await,
            (
                StatusCode::FORBIDDEN,
                Some(SecurityCause::CrossOriginRefused),
                false
            )
        );
        assert_eq!(
            post_through(CrossOriginMode::Report).await,
            (
                StatusCode::OK,
                Some(SecurityCause::CrossOriginReported),
                true
            )
        );
        assert_eq!(
            post_through(CrossOriginMode::Off).await,
            (StatusCode::OK, None, true)
        );
    }
}
