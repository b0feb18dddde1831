//! The Host guard: a request reaches Django only if it names one of `server.domains`, names it once, on a
//! port clients really use, and names the same host the TLS connection was opened for. This is what stops
//! password-reset poisoning behind `ALLOWED_HOSTS = ['*']`: Django builds absolute URLs from `Host`, port
//! included. It leaves exactly one `Host` header for the upstream (which speaks HTTP/1.1), in one normal
//! form: the host lowercased without a trailing dot, the port only when it is not the scheme's default.

use http::header::HOST;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode};

use super::RequestGate;
use crate::body::ProxyBody;
use crate::config::Domains;
use crate::context::ConnInfo;
use crate::response::refused;
use crate::security::SecurityCause;

/// The ports a Host may name on one listener: the scheme's default (443) and the one clients reach us
/// on (`public_https_port`, or the bound port). No port at all is fine. `public: None` allows any port:
/// the plain listener only redirects to HTTPS (with its own port) and forwards no Host anywhere, and
/// behind port mapping it cannot know the port clients typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPorts {
    pub default: u16,
    pub public: Option<u16>,
}

impl HostPorts {
    fn allows(self, port: u16) -> bool {
        port == self.default || self.public.is_none_or(|public| port == public)
    }
}

/// The served names and ports; as a `RequestGate`, refuses any request not for one of them.
pub struct HostAllowlist {
    domains: Domains,
    ports: HostPorts,
}

impl HostAllowlist {
    pub fn new(domains: Domains, ports: HostPorts) -> Self {
        HostAllowlist { domains, ports }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRejection {
    /// No Host, several, one that is not a valid authority, userinfo, or a port that is not a number
    /// (RFC 9112 §3.2: 400).
    Malformed,
    /// The absolute-form target or `:authority` names another host than `Host` (RFC 9112 §3.2.2).
    Conflicting,
    /// A port no client of ours uses: Django would put it in every absolute URL it builds.
    ForeignPort,
    /// Not one of ours, or not the name this TLS connection was opened for (RFC 9110 §15.5.20: 421).
    Misdirected,
}

impl HostRejection {
    pub fn status(self) -> StatusCode {
        match self {
            HostRejection::Malformed | HostRejection::Conflicting | HostRejection::ForeignPort => {
                StatusCode::BAD_REQUEST
            }
            HostRejection::Misdirected => StatusCode::MISDIRECTED_REQUEST,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            HostRejection::Malformed => "missing, duplicate or malformed Host",
            HostRejection::Conflicting => "request target and Host disagree",
            HostRejection::ForeignPort => "Host names a port this site is not served on",
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

/// A Host value or request-target authority, refusing userinfo: it has no place in either (RFC 9110
/// §4.2.4, §7.2; RFC 9113 §8.3.1 for `:authority`), and `Authority` would accept it.
fn parse_authority(bytes: &[u8]) -> Option<Authority> {
    if bytes.contains(&b'@') {
        return None;
    }
    let authority = Authority::try_from(bytes).ok()?;
    (!authority.host().is_empty()).then_some(authority)
}

/// The port an authority names: `Ok(None)` for none (or an empty one, which RFC 3986 §3.2.3 allows),
/// `Err` for anything but a number. `Authority::port` would read `app.test:abc` as no port at all.
fn port_of(authority: &Authority) -> Result<Option<u16>, HostRejection> {
    let after_host = &authority.as_str()[authority.host().len()..];
    match after_host.strip_prefix(':') {
        None if after_host.is_empty() => Ok(None),
        None => Err(HostRejection::Malformed),
        Some("") => Ok(None),
        Some(digits) if digits.len() <= 5 && digits.bytes().all(|b| b.is_ascii_digit()) => digits
            .parse()
            .map(Some)
            .map_err(|_| HostRejection::Malformed),
        Some(_) => Err(HostRejection::Malformed),
    }
}

/// Checks the request's host against the allowlist, the listener's ports and the connection; on success
/// the request carries exactly one `Host` header, in normal form.
pub fn check_host<B>(
    req: &mut Request<B>,
    domains: &Domains,
    ports: HostPorts,
    sni: Option<&str>,
) -> Result<(), HostRejection> {
    // Nearly every request names a served host in normal form in one place: HTTP/1.1 in its one
    // `Host`, HTTP/2 in `:authority` alone. That is settled by a look at the bytes; the rest (and
    // anything that does not fit, down to an uppercase letter) gets the full check.
    let mut hosts = req.headers().get_all(HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    match (req.uri().authority(), first, second) {
        (None, Some(value), None)
            if is_served_normal_form(value.as_bytes(), domains, ports, sni) =>
        {
            return Ok(());
        }
        (Some(target), None, None)
            if req.version() >= http::Version::HTTP_2
                && is_served_normal_form(target.as_str().as_bytes(), domains, ports, sni) =>
        {
            if let Ok(value) = HeaderValue::from_str(target.as_str()) {
                req.headers_mut().insert(HOST, value);
                return Ok(());
            }
        }
        _ => {}
    }
    check_host_fully(req, domains, ports, sni)
}

/// Whether `value` is `name` or `name:port` with `name` a served domain (or IPv4 address) in normal
/// form, the port one this listener allows but not the default, and the name the TLS connection's.
/// Never true where `check_host_fully` would refuse or rewrite (the fuzz target `host_and_redirect`
/// checks the two agree).
fn is_served_normal_form(
    value: &[u8],
    domains: &Domains,
    ports: HostPorts,
    sni: Option<&str>,
) -> bool {
    let (name, port) = match value.iter().rposition(|&b| b == b':') {
        Some(colon) => (&value[..colon], Some(&value[colon + 1..])),
        None => (value, None),
    };
    let plain_name = !name.is_empty()
        && name.last() != Some(&b'.')
        && name
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let port_ok = match port {
        None => true,
        Some(digits) => std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.starts_with('0'))
            .and_then(|d| d.parse::<u16>().ok())
            .is_some_and(|port| port != ports.default && ports.allows(port)),
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return false;
    };
    plain_name
        && port_ok
        && domains.contains(name)
        && sni.is_none_or(|sni| sni.eq_ignore_ascii_case(name))
}

/// `check_host` for every request that is not already in normal form (and the reference the fast
/// path is checked against).
pub(crate) fn check_host_fully<B>(
    req: &mut Request<B>,
    domains: &Domains,
    ports: HostPorts,
    sni: Option<&str>,
) -> Result<(), HostRejection> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(HostRejection::Malformed);
    }
    let header_authority = match host_header {
        Some(value) => Some(parse_authority(value.as_bytes()).ok_or(HostRejection::Malformed)?),
        None => None,
    };
    let target_authority = match req.uri().authority() {
        Some(target) => {
            Some(parse_authority(target.as_str().as_bytes()).ok_or(HostRejection::Malformed)?)
        }
        None => None,
    };
    let authority = match (target_authority, header_authority) {
        (Some(target), Some(header)) => {
            if !target.as_str().eq_ignore_ascii_case(header.as_str()) {
                return Err(HostRejection::Conflicting);
            }
            target
        }
        // HTTP/2 and HTTP/3 carry the host in `:authority`; HTTP/1.1 must send Host.
        (Some(target), None) if req.version() >= http::Version::HTTP_2 => target,
        (None, Some(header)) => header,
        _ => return Err(HostRejection::Malformed),
    };
    let port = port_of(&authority)?;
    let host = host_of(&authority);
    let host = host.strip_suffix('.').unwrap_or(host);
    if !domains.contains(host) {
        return Err(HostRejection::Misdirected);
    }
    if let Some(sni) = sni
        && !sni.eq_ignore_ascii_case(host)
    {
        return Err(HostRejection::Misdirected);
    }
    let port = match port {
        Some(port) if !ports.allows(port) => return Err(HostRejection::ForeignPort),
        Some(port) if port != ports.default => Some(port),
        _ => None,
    };
    // Most requests already name the host in normal form: leave those as they are.
    if let Some(value) = host_header
        && is_normal(value.as_bytes(), host, port)
    {
        return Ok(());
    }
    let normal = normal_host(host, port).ok_or(HostRejection::Malformed)?;
    req.headers_mut().insert(HOST, normal);
    Ok(())
}

/// Whether `value` is exactly what `normal_host(host, port)` would write.
fn is_normal(value: &[u8], host: &str, port: Option<u16>) -> bool {
    let bracketed = host.contains(':');
    let name_len = host.len() + if bracketed { 2 } else { 0 };
    let (name, rest) = value.split_at(name_len.min(value.len()));
    let name_ok = if bracketed {
        name.first() == Some(&b'[')
            && name.last() == Some(&b']')
            && &name[1..name.len() - 1] == host.as_bytes()
    } else {
        name == host.as_bytes()
    };
    let port_ok = match port {
        None => rest.is_empty(),
        Some(port) => rest.first() == Some(&b':') && rest[1..] == *port.to_string().as_bytes(),
    };
    name_ok && port_ok && !name.iter().any(u8::is_ascii_uppercase)
}

/// `host[:port]`, lowercase, IPv6 in brackets: what Django's `get_host()` will see.
fn normal_host(host: &str, port: Option<u16>) -> Option<HeaderValue> {
    let mut text = String::with_capacity(host.len() + 8);
    push_authority(&mut text, host, port);
    text.make_ascii_lowercase();
    HeaderValue::from_str(&text).ok()
}

/// `host[:port]` onto `out`, an IPv6 address in brackets (RFC 3986 §3.2.2): for Host and Location.
pub fn push_authority(out: &mut String, host: &str, port: Option<u16>) {
    if host.contains(':') {
        out.push('[');
        out.push_str(host);
        out.push(']');
    } else {
        out.push_str(host);
    }
    if let Some(port) = port {
        out.push(':');
        out.push_str(&port.to_string());
    }
}

impl RequestGate for HostAllowlist {
    fn admit<B>(&self, req: &mut Request<B>) -> Result<(), Box<Response<ProxyBody>>> {
        let sni = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.sni.clone());
        check_host(req, &self.domains, self.ports, sni.as_deref()).map_err(|rejection| {
            tracing::debug!(host = ?req.headers().get(HOST), uri = %req.uri(), sni = ?sni, "{}", rejection.reason());
            Box::new(refused(
                rejection.status(),
                rejection.reason(),
                SecurityCause::ForeignHost,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Version;

    const PORTS: HostPorts = HostPorts {
        default: 443,
        public: Some(8443),
    };

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

    /// The Host the upstream gets, or why there is none.
    fn forwarded(host: &str, sni: Option<&str>) -> Result<String, HostRejection> {
        let mut req = h1(&[host], "/");
        check_host(&mut req, &domains(), PORTS, sni)?;
        Ok(req.headers()[HOST].to_str().expect("ascii").to_string())
    }

    /// The fast path answers exactly as the full check, for HTTP/1.1 `Host` and HTTP/2 `:authority`.
    #[test]
    fn the_normal_form_fast_path_agrees_with_the_full_check() {
        let values = [
            "example.com",
            "www.example.com",
            "example.com:8443",
            "example.com:443",
            "example.com:80",
            "example.com:08443",
            "example.com:",
            "example.com.",
            "Example.com",
            "EXAMPLE.COM:8443",
            "evil.com",
            "example.com:99999",
            "example.com:84a3",
            "[::1]",
            "[::1]:8443",
            "::1",
            "127.0.0.1",
            "example.com:8443:1",
            ":8443",
            "",
            "ex ample.com",
            "user@example.com",
        ];
        let d = domains();
        for value in values {
            for sni in [None, Some("example.com"), Some("www.example.com")] {
                let requests = [
                    HeaderValue::from_str(value).ok().map(|v| {
                        let mut req = h1(&[], "/");
                        req.headers_mut().insert(HOST, v);
                        req
                    }),
                    Request::builder()
                        .uri(format!("https://{value}/"))
                        .version(Version::HTTP_2)
                        .body(())
                        .ok(),
                ];
                for mut req in requests.into_iter().flatten() {
                    let mut reference = Request::new(());
                    *reference.uri_mut() = req.uri().clone();
                    *reference.version_mut() = req.version();
                    *reference.headers_mut() = req.headers().clone();
                    let expected = check_host_fully(&mut reference, &d, PORTS, sni);
                    let got = check_host(&mut req, &d, PORTS, sni);
                    assert_eq!(got, expected, "{value:?} {sni:?} {:?}", req.version());
                    assert_eq!(
                        req.headers().get(HOST),
                        reference.headers().get(HOST),
                        "{value:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn accepts_served_hosts_and_forwards_them_in_normal_form() {
        let sni = Some("example.com");
        assert_eq!(forwarded("example.com", sni).as_deref(), Ok("example.com"));
        assert_eq!(
            forwarded("EXAMPLE.com:8443", sni).as_deref(),
            Ok("example.com:8443")
        );
        assert_eq!(
            forwarded("example.com:443", sni).as_deref(),
            Ok("example.com")
        );
        assert_eq!(forwarded("example.com.", sni).as_deref(), Ok("example.com"));
        assert_eq!(forwarded("example.com:", sni).as_deref(), Ok("example.com"));
        assert_eq!(forwarded("[::1]:8443", None).as_deref(), Ok("[::1]:8443"));
    }

    #[test]
    fn ports_clients_do_not_use_are_refused() {
        let sni = Some("example.com");
        assert_eq!(
            forwarded("example.com:6666", sni),
            Err(HostRejection::ForeignPort)
        );
        assert_eq!(
            forwarded("example.com:80", sni),
            Err(HostRejection::ForeignPort)
        );
        for bad in [
            "example.com:abc",
            "example.com:99999",
            "example.com:+443",
            "example.com:443:1",
        ] {
            assert!(forwarded(bad, sni).is_err(), "{bad}");
        }
        assert_eq!(HostRejection::ForeignPort.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn rejects_foreign_missing_duplicate_and_malformed_hosts() {
        let d = domains();
        let check = |req: &mut Request<()>| check_host(req, &d, PORTS, None);
        assert_eq!(
            check(&mut h1(&["evil.com"], "/")),
            Err(HostRejection::Misdirected)
        );
        assert_eq!(check(&mut h1(&[], "/")), Err(HostRejection::Malformed));
        assert_eq!(
            check(&mut h1(&["example.com", "evil.com"], "/")),
            Err(HostRejection::Malformed)
        );
        assert_eq!(
            check(&mut h1(&["user@example.com"], "/")),
            Err(HostRejection::Malformed)
        );
        assert_eq!(
            check(&mut h1(&["exa mple.com"], "/")),
            Err(HostRejection::Malformed)
        );
    }

    #[test]
    fn host_must_match_sni() {
        assert_eq!(
            forwarded("www.example.com", Some("example.com")),
            Err(HostRejection::Misdirected)
        );
    }

    #[test]
    fn absolute_form_must_agree_with_host() {
        let d = domains();
        let mut req = h1(&["example.com"], "https://evil.com/");
        assert_eq!(
            check_host(&mut req, &d, PORTS, None),
            Err(HostRejection::Conflicting)
        );
        let mut req = h1(&["example.com"], "https://example.com/x");
        assert_eq!(check_host(&mut req, &d, PORTS, None), Ok(()));
    }

    #[test]
    fn http2_authority_becomes_the_host_header_and_has_no_userinfo() {
        let d = domains();
        let h2 = |uri: &str| {
            Request::builder()
                .uri(uri)
                .version(Version::HTTP_2)
                .body(())
                .expect("request")
        };
        let mut req = h2("https://example.com:8443/path");
        assert_eq!(check_host(&mut req, &d, PORTS, Some("example.com")), Ok(()));
        assert_eq!(req.headers()[HOST], "example.com:8443");
        let mut req = h2("https://evil.example@example.com/path");
        assert_eq!(
            check_host(&mut req, &d, PORTS, Some("example.com")),
            Err(HostRejection::Malformed)
        );
    }
}
