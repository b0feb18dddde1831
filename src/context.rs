//! Facts about a request that every layer may read, set once where they become known: the connection it
//! arrived on (`ConnInfo`, set by the server), who the client really is behind trusted load balancers
//! (`TrustedProxies`), and how long the upstream took (`UpstreamTiming`, set by the proxy service).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use tokio::sync::{OwnedSemaphorePermit, watch};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer: the client, or a trusted load balancer in front of us.
    pub peer: SocketAddr,
    /// The TLS server name the client asked for; `None` on the plain listener or without SNI.
    pub sni: Option<Arc<str>>,
    pub tls: bool,
    /// The connection's place under `limits.max_connections`. A WebSocket tunnel keeps a clone, so an
    /// upgraded connection still counts (and is waited for on shutdown) after hyper lets go of it.
    pub slot: Arc<OwnedSemaphorePermit>,
    /// Turns true when the server shuts down; long-lived tunnels close on it instead of holding up the
    /// drain for the whole grace period.
    pub shutdown: watch::Receiver<bool>,
    /// The worker thread serving the connection (`server.workers > 1`; else 0): its requests use that
    /// worker's upstream connections, so no request wakes another thread.
    pub worker: usize,
    /// The peer's address as `X-Forwarded-For` writes it, formatted once per connection.
    pub peer_value: Option<http::HeaderValue>,
}

/// How long the upstream took to answer with headers; set by the proxy service on its responses and read
/// by the access log and the metrics.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTiming(pub Duration);

/// Which backend answered (as configured: `http://10.0.0.2:8000`); set with `UpstreamTiming`.
#[derive(Debug, Clone)]
pub struct UpstreamBackend(pub Arc<str>);

/// The path an upstream response named in `X-Accel-Redirect` (nginx's protocol, which django-sendfile2
/// speaks): set by the proxy service on a bodiless response, served from an `internal` `[[static]]` mount
/// by `static_files::StaticOrProxy`.
#[derive(Clone, Debug)]
pub struct AccelRedirect(pub HeaderValue);

/// The load balancers (`server.trusted_proxies`) whose `X-Forwarded-For` we believe.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Arc<[IpNet]>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies(nets.into())
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client behind this connection: the peer, or behind a trusted load balancer the rightmost
    /// address it did not add itself (what `X-Real-IP` says).
    pub fn client_ip(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        let peer = canonical_ip(peer);
        if !self.contains(peer) {
            return peer;
        }
        forwarded_chain(headers)
            .and_then(|chain| self.rightmost_untrusted(&chain))
            .unwrap_or(peer)
    }

    /// The client is the rightmost address not one of our trusted proxies: everything left of it could
    /// have been written by the client itself.
    pub fn rightmost_untrusted(&self, chain: &str) -> Option<IpAddr> {
        for entry in chain.rsplit(',') {
            let ip: IpAddr = entry.trim().parse().ok()?;
            if !self.contains(ip) {
                return Some(canonical_ip(ip));
            }
        }
        None
    }
}

/// Every `X-Forwarded-For` field joined into one chain, oldest hop first.
pub fn forwarded_chain(headers: &HeaderMap) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// An IP address as a header value (canonical form), formatted without an intermediate `String`.
pub fn ip_value(ip: IpAddr) -> Option<http::HeaderValue> {
    use std::io::Write;
    let mut buf = [0u8; 48];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    write!(cursor, "{}", canonical_ip(ip)).ok()?;
    let len = usize::try_from(cursor.position()).ok()?;
    http::HeaderValue::from_bytes(&buf[..len]).ok()
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) compare as the IPv4 address they carry.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The key a client's budgets and failures are kept under: IPv4 as is; IPv6 by its /64, which one host
/// usually controls whole.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::from(octets)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        let a = client_key("2001:db8:1:2:aaaa::1".parse().expect("ip"));
        let b = client_key("2001:db8:1:2:bbbb::2".parse().expect("ip"));
        let c = client_key("2001:db8:1:3::1".parse().expect("ip"));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let v4: IpAddr = "192.0.2.1".parse().expect("ip");
        assert_eq!(client_key(v4), v4);
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_says_otherwise() {
        let trusted = TrustedProxies::new(vec!["10.0.0.0/8".parse().expect("net")]);
        let mut h = HeaderMap::new();
        h.insert(
            &X_FORWARDED_FOR,
            "6.6.6.6, 203.0.113.9, 10.0.0.7".parse().expect("value"),
        );
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(trusted.client_ip(&h, ip("10.0.0.1")), ip("203.0.113.9"));
        assert_eq!(trusted.client_ip(&h, ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(
            trusted.client_ip(&HeaderMap::new(), ip("10.0.0.1")),
            ip("10.0.0.1")
        );
        // A dual-stack socket's IPv4-mapped peer is the IPv4 address.
        assert!(trusted.contains(ip("::ffff:10.1.2.3")));
    }
}
