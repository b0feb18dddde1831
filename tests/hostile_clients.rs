//! The second round of attacks (issue 9): each test sends the exact bytes an attacker did and asserts
//! both what the client got and what the upstream received. Loopback only, every wait bounded.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::raw_h2::{self, Connection};
use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2", b"http/1.1"];

fn status_of(raw: &str) -> Option<u16> {
    raw.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// HPACK's static index for `:status: 200` (RFC 7541 Appendix A), the first byte of a plain 200.
const STATUS_200: u8 = 0x88;

/// Django builds absolute URLs, password-reset links included, from `Host` with its port: only no port,
/// 443 or the public port may pass, and what passes reaches the upstream in one normal form.
#[tokio::test]
async fn host_ports_are_checked_and_the_host_is_forwarded_normalised() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let port = proxy.https.port();
    let exchange = |host: String| {
        let payload = format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let (https, root) = (proxy.https, proxy.root.clone());
        async move { raw_tls_exchange(https, &root, payload.as_bytes()).await }
    };
    for host in [
        "localhost:6666".to_string(),
        "localhost:abc".to_string(),
        "localhost:80".to_string(),
        "localhost:99999".to_string(),
        format!("localhost:{port}:1"),
    ] {
        let raw = exchange(host.clone()).await;
        assert_eq!(status_of(&raw), Some(400), "{host}: {raw}");
    }
    assert_eq!(upstream.count(), 0, "no foreign port reached the upstream");

    for (sent, forwarded) in [
        (format!("LOCALHOST:{port}"), format!("localhost:{port}")),
        ("localhost:443".to_string(), "localhost".to_string()),
        ("localhost.".to_string(), "localhost".to_string()),
        ("localhost".to_string(), "localhost".to_string()),
    ] {
        let raw = exchange(sent.clone()).await;
        assert_eq!(status_of(&raw), Some(200), "{sent}: {raw}");
        let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
        let echoed_headers = echoed_headers(body);
        assert_eq!(
            echoed(&echoed_headers, "host"),
            [forwarded.as_str()],
            "{sent}"
        );
        assert_eq!(
            echoed(&echoed_headers, "x-forwarded-host"),
            [forwarded.as_str()],
            "{sent}"
        );
    }

    // HTTP/2's `:authority` is held to the same rule.
    let authority = b"localhost:6666";
    let outcome = raw_h2::send(
        &proxy,
        &[
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", authority),
            (b":path", b"/echo"),
        ],
    )
    .await;
    assert_ne!(outcome, Ok(STATUS_200), "{outcome:?}");
    assert_eq!(upstream.count(), 4);
    proxy.stop().await;
}

/// RFC 9113 §8.3.1: `:authority` must not carry userinfo; HTTP/1.1 already refused `@` in Host.
#[tokio::test]
async fn userinfo_in_the_http2_authority_is_refused() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let authority = format!("evil.example@localhost:{}", proxy.https.port());
    let outcome = raw_h2::send(
        &proxy,
        &[
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", authority.as_bytes()),
            (b":path", b"/echo"),
        ],
    )
    .await;
    assert_ne!(outcome, Ok(STATUS_200), "{outcome:?}");
    let raw = raw_tls_exchange(
        proxy.https,
        &proxy.root,
        format!(
            "GET /echo HTTP/1.1\r\nHost: evil.example@localhost:{}\r\nConnection: close\r\n\r\n",
            proxy.https.port()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&raw), Some(400), "{raw}");
    assert_eq!(upstream.count(), 0);
    proxy.stop().await;
}

/// `limits.max_headers` and `limits.max_header_bytes` hold on HTTP/2 as on HTTP/1.1.
#[tokio::test]
async fn header_count_and_size_limits_hold_on_both_protocols() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let port = proxy.https.port();
    let names: Vec<String> = (0..150).map(|i| format!("x-field-{i}")).collect();
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        let mut req = request("GET", "/echo", port);
        for name in &names {
            req = req.header(name.as_str(), "1");
        }
        let response = client.send(req.body(full("")).expect("request")).await;
        match response {
            Ok(response) => assert_eq!(
                response.status(),
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "{alpn:?}"
            ),
            // HTTP/1.1: hyper answers 431 and closes; the client may see the close first.
            Err(e) => assert!(client.alpn.as_deref() != Some(b"h2"), "h2: {e}"),
        }
    }
    // 100 fields are fine, and Chromium's one-field-per-cookie does not count against the limit.
    let mut client = proxy.client(H2).await;
    let mut req = request("GET", "/echo", port);
    for name in names.iter().take(90) {
        req = req.header(name.as_str(), "1");
    }
    for i in 0..30 {
        req = req.header("cookie", format!("c{i}=v"));
    }
    let (response, _) = client.fetch(req.body(full("")).expect("request")).await;
    assert_eq!(response.status(), StatusCode::OK);

    // Over max_header_bytes (16 KiB) in one field, on HTTP/2 (hyper answers HTTP/1.1 with 431 too).
    let big = vec![b'a'; 20_000];
    let authority = format!("localhost:{port}");
    let outcome = raw_h2::send(
        &proxy,
        &[
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", authority.as_bytes()),
            (b":path", b"/echo"),
            (b"x-big", &big),
        ],
    )
    .await;
    assert_ne!(outcome, Ok(STATUS_200), "{outcome:?}");
    assert_eq!(upstream.count(), 1, "only the request within the limits");
    proxy.stop().await;
}

/// Framing two parsers could read two ways never reaches the upstream: `chunked` twice is 400, a
/// coding we do not implement is 501, and the connection is closed after either.
#[tokio::test]
async fn ambiguous_transfer_encodings_are_refused() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let host = format!("localhost:{}", proxy.https.port());
    let body = "5\r\nhello\r\n0\r\n\r\n";
    for (te, status) in [
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            400,
        ),
        ("Transfer-Encoding: chunked, chunked\r\n", 400),
        ("Transfer-Encoding: gzip, chunked\r\n", 501),
        (
            "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
            501,
        ),
    ] {
        let started = Instant::now();
        let raw = raw_tls_exchange(
            proxy.https,
            &proxy.root,
            format!("POST /upload HTTP/1.1\r\nHost: {host}\r\n{te}\r\n{body}").as_bytes(),
        )
        .await;
        assert_eq!(status_of(&raw), Some(status), "{te}: {raw}");
        // raw_tls_exchange reads until the close; a kept-open connection would take its 5 s.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{te}: connection kept open"
        );
    }
    assert_eq!(upstream.count(), 0);
    proxy.stop().await;
}

/// An HTTP/2 upload whose DATA runs past its `content-length` must never reach Gunicorn as a complete
/// request. The frame that completes the declared length is held until the stream's end is seen.
#[tokio::test]
async fn http2_data_past_the_content_length_never_completes_upstream() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let authority = format!("localhost:{}", proxy.https.port());
    let headers = |length: &'static [u8]| -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"https".to_vec()),
            (b":authority", authority.as_bytes().to_vec()),
            (b":path", b"/upload".to_vec()),
            (b"content-length", length.to_vec()),
        ]
    };
    let body = vec![b'x'; 70_000];
    // The race was one in three: try it several times, and once with the extra bytes in a later write.
    for attempt in 0..6 {
        let mut h2 = Connection::open_ready(&proxy, &[]).await;
        let fields = headers(b"70000");
        let pairs: Vec<(&[u8], &[u8])> = fields.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        h2.headers(1, &pairs, false).await;
        h2.data(1, &body, false).await;
        if attempt % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        h2.data(1, b"0123456789", true).await;
        let outcome = h2.outcome(1).await;
        assert_ne!(outcome, Ok(STATUS_200), "attempt {attempt}: {outcome:?}");
    }
    // The honest upload of the same size goes through.
    let mut h2 = Connection::open_ready(&proxy, &[]).await;
    let fields = headers(b"70000");
    let pairs: Vec<(&[u8], &[u8])> = fields.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    h2.headers(1, &pairs, false).await;
    h2.data(1, &body, true).await;
    assert_eq!(h2.outcome(1).await, Ok(STATUS_200));
    let mut client = proxy.client(H2).await;
    let req = request("POST", "/upload", proxy.https.port())
        .header("content-length", "70000")
        .body(full(body.clone()))
        .expect("request");
    let (response, text) = client.fetch(req).await;
    assert_eq!(
        (response.status(), text.as_str()),
        (StatusCode::OK, "70000")
    );
    // Only the two honest uploads arrived whole; the six cut-off ones ended before them.
    assert_eq!(
        upstream.uploads_completed.load(Ordering::SeqCst),
        2,
        "a wrongly framed upload reached the upstream complete"
    );
    proxy.stop().await;
}

/// An upstream that answers HTTP/1.0 (Python's `http.server`, old app servers) must not make the
/// client's connection HTTP/1.0: the proxy answers HTTP/1.1 and keeps the connection (RFC 9110 §6.2).
#[tokio::test]
async fn an_http10_upstream_does_not_downgrade_the_client_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match tcp.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                // Close-delimited, as an HTTP/1.0 server without Content-Length does.
                let _ = tcp
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nold server")
                    .await;
            });
        }
    });
    let proxy = Proxy::start(&format!("http://{addr}"), "").await;
    let port = proxy.https.port();
    let mut client = proxy.client(H1).await;
    for attempt in 0..3 {
        let (response, body) = client.get("/", port).await;
        assert_eq!(response.status(), StatusCode::OK, "attempt {attempt}");
        assert_eq!(response.version(), http::Version::HTTP_11);
        assert_eq!(body, "old server");
        assert!(
            response.headers().get("connection").is_none(),
            "attempt {attempt}: {:?}",
            response.headers()
        );
    }
    // The status line on the wire, too.
    let raw = raw_tls_exchange(
        proxy.https,
        &proxy.root,
        format!("GET / HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    proxy.stop().await;
    served.abort();
}
