//! Header rules at the proxy boundary: hop-by-hop fields never cross it (RFC 9110 §7.6.1), and the
//! `X-Forwarded-*` family is written from the real connection, never passed through from the client, so
//! Django's `SECURE_PROXY_SSL_HEADER`, `USE_X_FORWARDED_HOST` and IP-based libraries can trust it.

use std::net::IpAddr;

use bytes::BytesMut;
use http::header::{CONNECTION, COOKIE, HOST, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Version};

use crate::context::{TrustedProxies, X_FORWARDED_FOR, canonical_ip, forwarded_chain, ip_value};

pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

/// Hop-by-hop fields (RFC 9110 §7.6.1, plus the pre-standard `Keep-Alive` and `Proxy-Connection`).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Client-supplied fields that claim something about the connection. Gunicorn treats `X-Forwarded-Ssl`,
/// `X-Forwarded-Protocol` and `X-Forwarded-Proto` as "secure scheme" headers, and IP libraries
/// (django-ipware) read `X-Real-IP` and `Forwarded`: any of them from a client is a spoof.
const CONNECTION_CLAIMS: [&str; 9] = [
    "forwarded",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-protocol",
    "x-forwarded-ssl",
    "x-url-scheme",
    "front-end-https",
    "x-real-ip",
];

/// Removes hop-by-hop fields, including any named in `Connection` (RFC 9110 §7.6.1). `Host` is never
/// removed this way: the request would reach Django under the upstream's name.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named = connection_named(headers);
    remove_where(headers, |name| {
        HOP_BY_HOP.contains(&name.as_str()) || named.contains(name)
    });
}

/// Gives the fields' values one allocation of their own. hyper's values are slices of its 8 KiB read
/// buffer, and an HTTP/2 connection's HPACK encoder keeps the values it indexes for as long as they
/// stay in its table (RFC 7541 §2.3.2): one value kept pinned the whole buffer, 8 KiB per idle HTTP/2
/// connection. One copy per response, not one per field.
pub fn own_field_values(headers: &mut HeaderMap) {
    let total = headers.values().map(HeaderValue::len).sum();
    let mut all = BytesMut::with_capacity(total);
    for value in headers.values() {
        all.extend_from_slice(value.as_bytes());
    }
    let all = all.freeze();
    let mut at = 0;
    for value in headers.values_mut() {
        let end = at + value.len();
        // Always valid: the same bytes the value had.
        if let Ok(mut owned) = HeaderValue::from_maybe_shared(all.slice(at..end)) {
            owned.set_sensitive(value.is_sensitive());
            *value = owned;
        }
        at = end;
    }
}

/// Joins the `Cookie` fields into one, `; `-separated. Browsers send each cookie as its own field on
/// HTTP/2 for HPACK's sake, and RFC 9113 §8.2.3 requires this join before an HTTP/1.1 hop: Gunicorn
/// would otherwise join them with `, ` (RFC 9110 §5.3), which Django reads as one cookie's value, so the
/// session cookie vanishes and every admin login loops back to the form. RFC 6265 §5.4 allows one
/// `Cookie` field on HTTP/1.1 too, so the rule holds for any client.
pub fn join_cookie_fields(headers: &mut HeaderMap) {
    if headers.get_all(COOKIE).iter().nth(1).is_none() {
        return;
    }
    // Bytes, not `str`: a field with obs-text must not be dropped from the join.
    let mut joined = Vec::new();
    for (i, value) in headers.get_all(COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(joined) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, joined);
    }
}

/// Fields named in `Connection` that are not hop-by-hop already (nor `Host`).
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut named = Vec::new();
    for value in headers.get_all(CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim) {
            if token.is_empty()
                || HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(token))
                || token.eq_ignore_ascii_case("close")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes())
                && name != HOST
            {
                named.push(name);
            }
        }
    }
    named
}

/// Removes every field `unwanted` picks, looking at each name present once instead of probing for every
/// name that might be: a request carries a handful of fields, the lists here are longer.
fn remove_where(headers: &mut HeaderMap, unwanted: impl Fn(&HeaderName) -> bool) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| unwanted(name))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// The `Upgrade` value of an HTTP/1.1 WebSocket handshake (RFC 6455 §4.1), if this is one. Other upgrades,
/// notably `h2c`, are refused by not forwarding them: an h2c upgrade through a proxy lets a client talk to
/// the upstream past every rule the proxy applies ("h2c smuggling").
pub fn websocket_upgrade(headers: &HeaderMap, version: Version) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let connection_upgrade = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let upgrade = headers.get(UPGRADE)?;
    (connection_upgrade && upgrade.as_bytes().eq_ignore_ascii_case(b"websocket"))
        .then(|| upgrade.clone())
}

/// Restores the two fields a WebSocket handshake needs after hop-by-hop removal.
pub fn keep_upgrade(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, upgrade);
}

/// What the forwarded headers say: who may tell us about the client in front of them, and our port.
#[derive(Debug, Clone, Default)]
pub struct ForwardingPolicy {
    pub trusted_proxies: TrustedProxies,
    /// The public HTTPS port, sent as `X-Forwarded-Port` (Django's `USE_X_FORWARDED_PORT`).
    pub port: Option<HeaderValue>,
}

impl ForwardingPolicy {
    /// Replaces every connection claim with what this connection shows: the scheme we terminated, the
    /// host we validated, and the client address (appended to a trusted load balancer's chain).
    /// `peer_value`: the peer as a header value when the connection has it formatted already.
    pub fn set_forwarded_headers(
        &self,
        headers: &mut HeaderMap,
        peer: IpAddr,
        peer_value: Option<&HeaderValue>,
        https: bool,
    ) {
        let peer = canonical_ip(peer);
        let previous = if self.trusted_proxies.contains(peer) {
            forwarded_chain(headers)
        } else {
            None
        };
        remove_where(headers, |name| {
            name == X_FORWARDED_FOR || CONNECTION_CLAIMS.contains(&name.as_str())
        });
        let Some(peer_value) = peer_value.cloned().or_else(|| ip_value(peer)) else {
            return;
        };
        match previous {
            Some(previous) => {
                let real_client = self
                    .trusted_proxies
                    .rightmost_untrusted(&previous)
                    .unwrap_or(peer);
                if let Ok(chain) = HeaderValue::from_str(&format!("{previous}, {peer}")) {
                    headers.insert(X_FORWARDED_FOR.clone(), chain);
                }
                if let Some(real) = ip_value(real_client) {
                    headers.insert(X_REAL_IP.clone(), real);
                }
            }
            None => {
                headers.insert(X_FORWARDED_FOR.clone(), peer_value.clone());
                headers.insert(X_REAL_IP.clone(), peer_value);
            }
        }
        let proto = if https { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
        if let Some(port) = &self.port {
            headers.insert(X_FORWARDED_PORT.clone(), port.clone());
        }
        if let Some(host) = headers.get(HOST).cloned() {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret, host"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("host", "example.com"),
            ("accept", "*/*"),
        ]);
        remove_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "host"]);
    }

    #[test]
    fn field_values_are_copied_out_of_the_buffer_they_were_read_into() {
        let buffer = bytes::Bytes::from_static(b"text/plain; charset=utf-8\"etag\"");
        let mut h = HeaderMap::new();
        let content_type = HeaderValue::from_maybe_shared(buffer.slice(0..25)).expect("value");
        h.insert("content-type", content_type);
        let mut etag = HeaderValue::from_maybe_shared(buffer.slice(25..)).expect("value");
        etag.set_sensitive(true);
        h.append("etag", etag);
        h.append("etag", HeaderValue::from_static("second"));
        own_field_values(&mut h);
        assert_eq!(h["content-type"], "text/plain; charset=utf-8");
        let etags: Vec<_> = h.get_all("etag").iter().collect();
        assert_eq!(etags, ["\"etag\"", "second"]);
        assert!(etags[0].is_sensitive(), "sensitivity kept");
        for value in h.values() {
            let range = buffer.as_ptr_range();
            assert!(
                !range.contains(&value.as_bytes().as_ptr()),
                "{value:?} still points into the read buffer"
            );
        }
    }

    #[test]
    fn cookie_fields_are_joined_for_http1() {
        let mut h = headers(&[
            ("cookie", "csrftoken=abc"),
            ("accept", "*/*"),
            ("cookie", "sessionid=xyz; theme=dark"),
        ]);
        join_cookie_fields(&mut h);
        let cookies: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["csrftoken=abc; sessionid=xyz; theme=dark"]);
        // One field stays exactly as it was.
        let mut one = headers(&[("cookie", "a=1;b=2")]);
        join_cookie_fields(&mut one);
        assert_eq!(one["cookie"], "a=1;b=2");
    }

    #[test]
    fn only_websocket_upgrades_pass() {
        let ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(websocket_upgrade(&ws, Version::HTTP_11).is_some());
        assert!(websocket_upgrade(&ws, Version::HTTP_2).is_none());
        let h2c = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(websocket_upgrade(&h2c, Version::HTTP_11).is_none());
    }

    #[test]
    fn client_claims_are_replaced() {
        let mut h = headers(&[
            ("host", "example.com"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.com"),
            ("x-forwarded-ssl", "on"),
            ("x-real-ip", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6;proto=https"),
        ]);
        ForwardingPolicy::default().set_forwarded_headers(
            &mut h,
            "127.0.0.2".parse().expect("ip"),
            None,
            false,
        );
        assert_eq!(h["x-forwarded-for"], "127.0.0.2");
        assert_eq!(h["x-real-ip"], "127.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert!(h.get("x-forwarded-ssl").is_none());
        assert!(h.get("forwarded").is_none());
    }

    #[test]
    fn trusted_load_balancer_chain_is_appended() {
        let policy = ForwardingPolicy {
            trusted_proxies: TrustedProxies::new(vec!["10.0.0.0/8".parse().expect("net")]),
            port: None,
        };
        let mut h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 203.0.113.9"),
            ("x-forwarded-for", "10.0.0.7"),
        ]);
        let peer = "10.0.0.1".parse().expect("ip");
        policy.set_forwarded_headers(&mut h, peer, ip_value(peer).as_ref(), true);
        assert_eq!(
            h["x-forwarded-for"],
            "6.6.6.6, 203.0.113.9, 10.0.0.7, 10.0.0.1"
        );
        assert_eq!(h["x-real-ip"], "203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
