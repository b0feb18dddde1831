//! Properties checked on arbitrary input, shared by the `fuzz/` targets (libFuzzer, long runs) and the
//! bounded random run in `tests/fuzz_smoke.rs` (every `cargo test`). Each function panics on a violation.

use http::{HeaderMap, HeaderName, HeaderValue, Request, Version};

use crate::config::{Config, CookiePolicy, Domains, SameSite};
use crate::middleware::cookies::harden_set_cookie;
use crate::middleware::host::{HostPorts, check_host, check_host_fully, host_of};
use crate::proxy::headers::{ForwardingPolicy, join_cookie_fields, remove_hop_by_hop};
use crate::route_path::route_path;
use crate::server::plain::https_location;
use crate::server::proxy_protocol::{self, Step};

/// Hardening a Set-Cookie only appends, yields a valid header value, and is idempotent.
pub fn set_cookie(data: &[u8]) {
    let Ok(original) = HeaderValue::from_bytes(data) else {
        return;
    };
    let policy = CookiePolicy {
        secure: true,
        http_only: true,
        same_site: Some(SameSite::Lax),
        http_only_exempt: vec!["csrftoken".into()],
        session_only: Vec::new(),
    };
    // With `session_only` the lifetime may go, but never the name and value, and twice is once.
    let session = CookiePolicy {
        session_only: vec!["a".into(), "sessionid".into()],
        ..policy.clone()
    };
    if let Some(hardened) = harden_set_cookie(original.as_bytes(), &session) {
        let name_value = original
            .as_bytes()
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default();
        assert!(
            hardened.as_bytes().starts_with(name_value.trim_ascii_end()),
            "the name and value stay: {original:?} -> {hardened:?}"
        );
        assert!(
            harden_set_cookie(hardened.as_bytes(), &session).is_none(),
            "session_only must be idempotent: {original:?} -> {hardened:?}"
        );
    }
    let Some(hardened) = harden_set_cookie(original.as_bytes(), &policy) else {
        return;
    };
    // Only trailing separators (`;` and white space) may be dropped before the appended attributes.
    let mut kept = original.as_bytes();
    while let [rest @ .., last] = kept
        && (*last == b';' || last.is_ascii_whitespace())
    {
        kept = rest;
    }
    assert!(
        hardened.as_bytes().starts_with(kept),
        "hardening must only append: {original:?} -> {hardened:?}"
    );
    assert!(
        harden_set_cookie(hardened.as_bytes(), &policy).is_none(),
        "hardening must be idempotent: {hardened:?}"
    );
}

/// Splits fuzz input into header fields (`name:value` per line) for a request.
fn headers_from(data: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let mut parts = line.splitn(2, |&b| b == b':');
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    headers
}

/// After the request rewrite no hop-by-hop or client-supplied connection claim survives, and the
/// forwarded headers describe the real connection.
pub fn request_headers(data: &[u8]) {
    let mut headers = headers_from(data);
    let cookie_bytes = headers
        .get_all("cookie")
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    let cookie_named_in_connection = headers.get_all("connection").iter().any(|v| {
        v.as_bytes()
            .to_ascii_lowercase()
            .windows(6)
            .any(|w| w == b"cookie")
    });
    remove_hop_by_hop(&mut headers);
    join_cookie_fields(&mut headers);
    ForwardingPolicy::default().set_forwarded_headers(
        &mut headers,
        std::net::Ipv4Addr::new(192, 0, 2, 7).into(),
        None,
        true,
    );
    for name in [
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "forwarded",
        "x-forwarded-ssl",
    ] {
        assert!(!headers.contains_key(name), "{name} survived");
    }
    // Cookie fields are joined into one (RFC 9113 §8.2.3), none lost or reordered.
    let cookie_fields: Vec<&[u8]> = headers
        .get_all("cookie")
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    assert!(cookie_fields.len() <= 1);
    if !cookie_named_in_connection && !cookie_bytes.is_empty() {
        assert_eq!(cookie_fields, [&cookie_bytes[..]]);
    }
    assert_eq!(headers.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(headers["x-forwarded-for"], "192.0.2.7");
    assert_eq!(headers["x-forwarded-proto"], "https");
}

/// The Host guard never lets a foreign host through, and a redirect built from what it accepted points
/// at that same host over HTTPS (no open redirect).
pub fn host_and_redirect(data: &[u8]) {
    let domains = Domains::new(vec![
        "example.com".into(),
        "www.example.com".into(),
        "::1".into(),
    ]);
    let (host, path) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"/"[..]),
    };
    let Ok(host_value) = HeaderValue::from_bytes(host) else {
        return;
    };
    let Ok(mut req) = Request::builder()
        .version(Version::HTTP_11)
        .uri("/")
        .body(())
    else {
        return;
    };
    req.headers_mut()
        .insert(http::header::HOST, host_value.clone());
    let ports = HostPorts {
        default: 443,
        public: Some(8443),
    };
    // The fast path for hosts already in normal form must agree with the full check, Host included.
    let mut reference = Request::new(());
    *reference.version_mut() = req.version();
    *reference.headers_mut() = req.headers().clone();
    let expected = check_host_fully(&mut reference, &domains, ports, None);
    let result = check_host(&mut req, &domains, ports, None);
    assert_eq!(
        result, expected,
        "fast and full Host checks disagree on {host_value:?}"
    );
    if result.is_err() {
        return;
    }
    assert_eq!(
        req.headers().get(http::header::HOST),
        reference.headers().get(http::header::HOST),
        "fast and full Host checks forward different Hosts for {host_value:?}"
    );
    let authority: http::uri::Authority = req.headers()[http::header::HOST]
        .to_str()
        .ok()
        .and_then(|h| h.parse().ok())
        .expect("the forwarded Host is an authority");
    assert!(
        authority.port_u16().is_none_or(|port| port == 8443),
        "forwarded a port clients do not use: {authority}"
    );
    assert!(
        !authority.as_str().contains('@'),
        "forwarded userinfo: {authority}"
    );
    let name = host_of(&authority);
    assert!(domains.contains(name), "accepted a foreign host {name:?}");
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    if let Some(location) = https_location(name, 8443, path) {
        let location = location.to_str().expect("ASCII location");
        let uri: http::Uri = location.parse().expect("the redirect is a valid URI");
        assert_eq!(uri.scheme_str(), Some("https"));
        assert_eq!(
            uri.host().map(|h| h.trim_matches(['[', ']'])),
            Some(name),
            "redirect left the host: {location}"
        );
    }
}

/// The routing form of any path has no empty or dot segment, and every percent-encoding of a path
/// (the spellings Gunicorn decodes to the same `PATH_INFO`) has the same routing form as the path.
pub fn path_normalisation(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = format!("/{text}");
    let normal = route_path(&path);
    assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
    assert!(!normal.contains("//"), "{path:?} -> {normal:?}");
    assert!(
        !normal.split('/').any(|s| s == "." || s == ".."),
        "{path:?} -> {normal:?}"
    );
    if path.contains('%') {
        return;
    }
    assert_eq!(route_path(&normal), normal, "not idempotent for {path:?}");
    // Encode every non-ASCII byte and, chosen by the input itself, some ASCII ones (slashes included).
    let mut encoded = String::with_capacity(path.len() * 3);
    for (i, byte) in path.bytes().enumerate() {
        let pick = data.get(i % data.len().max(1)).copied().unwrap_or(0);
        if !byte.is_ascii() || (i > 0 && pick % 3 == 0) {
            encoded.push_str(&format!("%{byte:02X}"));
        } else {
            encoded.push(char::from(byte));
        }
    }
    assert_eq!(
        route_path(&encoded),
        normal,
        "{encoded:?} routes elsewhere than {path:?}"
    );
}

/// Any text either parses into a valid config or gives an error that names the file; never a panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(error) = Config::parse(text, "fuzz.toml", None) {
        assert!(error.to_string().starts_with("fuzz.toml"), "{error}");
    }
}

/// PROXY protocol framing never asks for zero bytes, never reads past the longest header it allows,
/// and a header it accepts is accepted again on exactly the bytes it took (nothing after it mattered).
pub fn proxy_header(data: &[u8]) {
    let (step, taken) = proxy_protocol::frame(data);
    assert!(taken <= proxy_protocol::LONGEST, "read {taken} bytes");
    if let Step::Done(client) = step {
        assert_eq!(
            proxy_protocol::frame(&data[..taken]),
            (Step::Done(client), taken)
        );
    }
}
