//! Hostile clients, failing upstreams and bad input: the honest client still gets its answer, the upstream
//! sees nothing ambiguous, and nothing is lost or sent twice. Loopback only, every loop bounded.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2", b"http/1.1"];

fn status_of(raw: &str) -> Option<u16> {
    raw.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test]
async fn smuggling_and_malformed_http1_requests_are_refused_before_the_upstream() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&format!("http://{}", upstream.addr), "").await;
    let host = format!("localhost:{}", proxy.https.port());
    let cases: Vec<(&str, String)> = vec![
        ("two different Content-Lengths", format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde")),
        ("Content-Length list", format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4, 4\r\n\r\nabcd")),
        ("signed Content-Length", format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: +4\r\n\r\nabcd")),
        ("obs-fold", format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nX-Folded: a\r\n b\r\n\r\n")),
        ("space before colon", format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nX-Bad : a\r\n\r\n")),
        ("space in header name", format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nX Bad: a\r\n\r\n")),
        ("NUL in header value", format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nX-Bad: a\0b\r\n\r\n")),
        ("bare CR in header value", format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nX-Bad: a\rb\r\n\r\n")),
        ("TE not ending in chunked", format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n")),
        ("unknown TE", format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n")),
        ("bad chunk size", format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")),
        ("duplicate Host", format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nHost: evil.com\r\n\r\n")),
        ("missing Host", "GET /echo HTTP/1.1\r\nX-A: b\r\n\r\n".to_string()),
        ("absolute-form against Host", format!("GET https://evil.com/echo HTTP/1.1\r\nHost: {host}\r\n\r\n")),
        ("userinfo in Host", format!("GET /echo HTTP/1.1\r\nHost: user@{host}\r\n\r\n")),
        ("asterisk-form", format!("OPTIONS * HTTP/1.1\r\nHost: {host}\r\n\r\n")),
        ("CONNECT", format!("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n")),
    ];
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (name, payload) in &cases {
        let raw = raw_tls_exchange(proxy.https, &proxy.root, payload.as_bytes()).await;
        let status = status_of(&raw);
        report.push(format!("{name}: {}", raw.lines().next().unwrap_or("<connection closed>")));
        if !matches!(status, Some(400..=499 | 501)) {
            failures.push(name);
        }
    }
    assert!(failures.is_empty(), "accepted: {failures:?}\n{report:#?}");
    assert_eq!(upstream.count(), 0, "nothing ambiguous reached the upstream: {report:#?}");
    proxy.stop().await;
}

/// What hyper accepts but normalises (RFC 9112 §6.3, RFC 9110 §8.6) must reach the upstream as one
/// unambiguous message: chunked wins over Content-Length (and the connection closes after), identical
/// Content-Lengths collapse into one.
#[tokio::test]
async fn framing_hyper_normalises_reaches_the_upstream_unambiguous() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&format!("http://{}", upstream.addr), "").await;
    let host = format!("localhost:{}", proxy.https.port());

    let started = Instant::now();
    let payload = format!(
        "POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let raw = raw_tls_exchange(proxy.https, &proxy.root, payload.as_bytes()).await;
    assert_eq!(status_of(&raw), Some(200), "{raw}");
    assert!(raw.ends_with("\r\n\r\n5"), "the upstream read the chunked body (5 bytes), not 3: {raw}");
    assert!(started.elapsed() < Duration::from_secs(4), "the connection was closed after the response");

    let payload = format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd");
    let raw = raw_tls_exchange(proxy.https, &proxy.root, payload.as_bytes()).await;
    assert_eq!(status_of(&raw), Some(200), "{raw}");
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(echoed(&echoed_headers(body), "content-length"), ["4"], "{body}");
    assert_eq!(upstream.count(), 2);
    proxy.stop().await;
}
