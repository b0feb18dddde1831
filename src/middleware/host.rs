//! The Host guard: a request reaches Django only if it names one of `server.domains`, names it once, and
//! names the same host the TLS connection was opened for. This is what stops password-reset poisoning
//! behind `ALLOWED_HOSTS = ['*']`. It also leaves exactly one `Host` header (from `:authority` on HTTP/2)
//! for the upstream, which speaks HTTP/1.1.

use http::header::HOST;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode, Version};

use super::RequestGate;
use crate::body::ProxyBody;
use crate::config::Domains;
use crate::context::ConnInfo;
use crate::response::{Blame, error_page};

/// The served names; as a `RequestGate`, refuses any request not for one of them.
pub struct HostAllowlist {
    domains: Domains,
}

impl HostAllowlist {
    pub fn new(domains: Domains) -> Self {
        HostAllowlist { domains }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRejection {
    /// No Host, several, or one that is not a valid authority (RFC 9112 §3.2: 400).
    Malformed,
    /// The absolute-form target or `:authority` names another host than `Host` (RFC 9112 §3.2.2).
    Conflicting,
    /// Not one of ours, or not the name this TLS connection was opened for (RFC 9110 §15.5.20: 421).
    Misdirected,
}

impl HostRejection {
    pub fn status(self) -> StatusCode {
        match self {
            HostRejection::Malformed | HostRejection::Conflicting => StatusCode::BAD_REQUEST,
            HostRejection::Misdirected => StatusCode::MISDIRECTED_REQUEST,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            HostRejection::Malformed => "missing, duplicate or malformed Host",
            HostRejection::Conflicting => "request target and Host disagree",
            HostRejection::Misdirected => "host not served here or not the TLS server name",
        }
    }
}

/// The host part of an authority, without port or IPv6 brackets.
pub fn host_of(authority: &Authority) -> &str {
    let host = authority.host();
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

fn parse_authority(value: &HeaderValue) -> Option<Authority> {
    let authority = Authority::try_from(value.as_bytes()).ok()?;
    // userinfo has no place in Host (RFC 9110 §7.2); `Authority` would accept it.
    (!authority.as_str().contains('@') && !authority.host().is_empty()).then_some(authority)
}

/// Checks the request's host against the allowlist and the connection; on success the request carries
/// exactly one `Host` header naming it.
pub fn check_host<B>(
    req: &mut Request<B>,
    domains: &Domains,
    sni: Option<&str>,
) -> Result<(), HostRejection> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(HostRejection::Malformed);
    }
    let header_authority = match host_header {
        Some(value) => Some(parse_authority(value).ok_or(HostRejection::Malformed)?),
        None => None,
    };
    let target_authority = req.uri().authority().cloned();
    let authority = match (target_authority, header_authority) {
        (Some(target), Some(header)) => {
            if !target.as_str().eq_ignore_ascii_case(header.as_str()) {
                return Err(HostRejection::Conflicting);
            }
            target
        }
        // HTTP/2 and HTTP/3 carry the host in `:authority`; HTTP/1.1 must send Host.
        (Some(target), None) if req.version() >= Version::HTTP_2 => target,
        (None, Some(header)) => header,
        _ => return Err(HostRejection::Malformed),
    };
    let host = host_of(&authority);
    if !domains.contains(host) {
        return Err(HostRejection::Misdirected);
    }
    if let Some(sni) = sni
        && !sni.eq_ignore_ascii_case(host.strip_suffix('.').unwrap_or(host))
    {
        return Err(HostRejection::Misdirected);
    }
    if host_header.is_none() {
        let value =
            HeaderValue::from_str(authority.as_str()).map_err(|_| HostRejection::Malformed)?;
        req.headers_mut().insert(HOST, value);
    }
    Ok(())
}

impl RequestGate for HostAllowlist {
    fn admit<B>(&self, req: &mut Request<B>) -> Result<(), Box<Response<ProxyBody>>> {
        let sni = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.sni.clone());
        check_host(req, &self.domains, sni.as_deref()).map_err(|rejection| {
            tracing::debug!(host = ?req.headers().get(HOST), uri = %req.uri(), sni = ?sni, "{}", rejection.reason());
            Box::new(error_page(
                rejection.status(),
                Blame::Client,
                rejection.reason(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains() -> Domains {
        Domains::new(vec![
            "example.com".into(),
            "www.example.com".into(),
            "::1".into(),
        ])
    }

    fn h1(host: &[&str], uri: &str) -> Request<()> {
        let mut builder = Request::builder().uri(uri).version(Version::HTTP_11);
        for h in host {
            builder = builder.header(HOST, *h);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn accepts_served_hosts_with_ports_and_case() {
        let d = domains();
        assert_eq!(
            check_host(&mut h1(&["example.com"], "/"), &d, Some("example.com")),
            Ok(())
        );
        assert_eq!(
            check_host(
                &mut h1(&["EXAMPLE.com:8443"], "/x"),
                &d,
                Some("example.com")
            ),
            Ok(())
        );
        assert_eq!(check_host(&mut h1(&["[::1]:8443"], "/"), &d, None), Ok(()));
        assert_eq!(
            check_host(&mut h1(&["example.com."], "/"), &d, Some("example.com")),
            Ok(())
        );
    }

    #[test]
    fn rejects_foreign_missing_duplicate_and_malformed_hosts() {
        let d = domains();
        assert_eq!(
            check_host(&mut h1(&["evil.com"], "/"), &d, None),
            Err(HostRejection::Misdirected)
        );
        assert_eq!(
            check_host(&mut h1(&[], "/"), &d, None),
            Err(HostRejection::Malformed)
        );
        assert_eq!(
            check_host(&mut h1(&["example.com", "evil.com"], "/"), &d, None),
            Err(HostRejection::Malformed)
        );
        assert_eq!(
            check_host(&mut h1(&["user@example.com"], "/"), &d, None),
            Err(HostRejection::Malformed)
        );
        assert_eq!(
            check_host(&mut h1(&["exa mple.com"], "/"), &d, None),
            Err(HostRejection::Malformed)
        );
    }

    #[test]
    fn host_must_match_sni() {
        let d = domains();
        let mut req = h1(&["www.example.com"], "/");
        assert_eq!(
            check_host(&mut req, &d, Some("example.com")),
            Err(HostRejection::Misdirected)
        );
    }

    #[test]
    fn absolute_form_must_agree_with_host() {
        let d = domains();
        let mut req = h1(&["example.com"], "https://evil.com/");
        assert_eq!(
            check_host(&mut req, &d, None),
            Err(HostRejection::Conflicting)
        );
        let mut req = h1(&["example.com"], "https://example.com/x");
        assert_eq!(check_host(&mut req, &d, None), Ok(()));
    }

    #[test]
    fn http2_authority_becomes_the_host_header() {
        let d = domains();
        let mut req = Request::builder()
            .uri("https://example.com:8443/path")
            .version(Version::HTTP_2)
            .body(())
            .expect("request");
        assert_eq!(check_host(&mut req, &d, Some("example.com")), Ok(()));
        assert_eq!(req.headers()[HOST], "example.com:8443");
    }
}
