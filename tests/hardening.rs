//! Hostile clients, failing upstreams and bad input: the honest client still gets its answer, the upstream
//! sees nothing ambiguous, and nothing is lost or sent twice. Loopback only, every loop bounded.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::raw_h2::{self, HeaderPair};
use common::*;
use http::StatusCode;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2", b"http/1.1"];

fn status_of(raw: &str) -> Option<u16> {
    raw.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test]
async fn smuggling_and_malformed_http1_requests_are_refused_before_the_upstream() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let host = format!("localhost:{}", proxy.https.port());
    let cases: Vec<(&str, String)> = vec![
        (
            "two different Content-Lengths",
            format!(
                "POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"
            ),
        ),
        (
            "Content-Length list",
            format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4, 4\r\n\r\nabcd"),
        ),
        (
            "signed Content-Length",
            format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: +4\r\n\r\nabcd"),
        ),
        (
            "obs-fold",
            format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nX-Folded: a\r\n b\r\n\r\n"),
        ),
        (
            "space before colon",
            format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nX-Bad : a\r\n\r\n"),
        ),
        (
            "space in header name",
            format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nX Bad: a\r\n\r\n"),
        ),
        (
            "NUL in header value",
            format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nX-Bad: a\0b\r\n\r\n"),
        ),
        (
            "bare CR in header value",
            format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nX-Bad: a\rb\r\n\r\n"),
        ),
        (
            "TE not ending in chunked",
            format!(
                "POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
            ),
        ),
        (
            "unknown TE",
            format!(
                "POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
            ),
        ),
        (
            "bad chunk size",
            format!(
                "POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
            ),
        ),
        (
            "duplicate Host",
            format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nHost: evil.com\r\n\r\n"),
        ),
        (
            "missing Host",
            "GET /echo HTTP/1.1\r\nX-A: b\r\n\r\n".to_string(),
        ),
        (
            "absolute-form against Host",
            format!("GET https://evil.com/echo HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        ),
        (
            "userinfo in Host",
            format!("GET /echo HTTP/1.1\r\nHost: user@{host}\r\n\r\n"),
        ),
        (
            "asterisk-form",
            format!("OPTIONS * HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        ),
        (
            "CONNECT",
            format!("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        ),
    ];
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (name, payload) in &cases {
        let raw = raw_tls_exchange(proxy.https, &proxy.root, payload.as_bytes()).await;
        let status = status_of(&raw);
        report.push(format!(
            "{name}: {}",
            raw.lines().next().unwrap_or("<connection closed>")
        ));
        if !matches!(status, Some(400..=499 | 501)) {
            failures.push(name);
        }
    }
    assert!(failures.is_empty(), "accepted: {failures:?}\n{report:#?}");
    assert_eq!(
        upstream.count(),
        0,
        "nothing ambiguous reached the upstream: {report:#?}"
    );
    proxy.stop().await;
}

/// What hyper accepts but normalises (RFC 9112 §6.3, RFC 9110 §8.6) must reach the upstream as one
/// unambiguous message: chunked wins over Content-Length (and the connection closes after), identical
/// Content-Lengths collapse into one.
#[tokio::test]
async fn framing_hyper_normalises_reaches_the_upstream_unambiguous() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let host = format!("localhost:{}", proxy.https.port());

    let started = Instant::now();
    let payload = format!(
        "POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let raw = raw_tls_exchange(proxy.https, &proxy.root, payload.as_bytes()).await;
    assert_eq!(status_of(&raw), Some(200), "{raw}");
    assert!(
        raw.ends_with("\r\n\r\n5"),
        "the upstream read the chunked body (5 bytes), not 3: {raw}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the connection was closed after the response"
    );

    let payload = format!(
        "POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd"
    );
    let raw = raw_tls_exchange(proxy.https, &proxy.root, payload.as_bytes()).await;
    assert_eq!(status_of(&raw), Some(200), "{raw}");
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(
        echoed(&echoed_headers(body), "content-length"),
        ["4"],
        "{body}"
    );
    assert_eq!(upstream.count(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn malformed_http2_requests_are_refused_before_the_upstream() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let authority = format!("localhost:{}", proxy.https.port());
    let base: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", authority.as_bytes()),
        (b":path", b"/echo"),
    ];
    // Sanity: the same framing without the fault is answered 200 (HPACK static index 8).
    assert_eq!(raw_h2::send(&proxy, &base).await, Ok(0x88));
    let faults: Vec<(&str, HeaderPair)> = vec![
        ("CR LF in a value", (b"x-bad", b"a\r\nx-injected: 1")),
        ("NUL in a value", (b"x-bad", b"a\0b")),
        ("Transfer-Encoding", (b"transfer-encoding", b"chunked")),
        ("TE other than trailers", (b"te", b"gzip")),
        ("Connection", (b"connection", b"keep-alive")),
        ("uppercase name", (b"X-Bad", b"1")),
    ];
    for (name, fault) in faults {
        let mut headers = base.clone();
        headers.push(fault);
        let outcome = raw_h2::send(&proxy, &headers).await;
        // Refused: a stream reset, a GOAWAY, or a 400 (HPACK static index 12).
        assert!(
            matches!(outcome, Err(_) | Ok(0x8c)),
            "{name}: accepted ({outcome:?})"
        );
    }
    assert_eq!(
        upstream.count(),
        1,
        "only the sanity request reached the upstream"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_request_heads_get_431() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let host = format!("localhost:{}", proxy.https.port());
    let big = format!(
        "GET /echo HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let raw = raw_tls_exchange(proxy.https, &proxy.root, big.as_bytes()).await;
    assert_eq!(status_of(&raw), Some(431), "{raw}");
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let raw = raw_tls_exchange(
        proxy.https,
        &proxy.root,
        format!("GET /echo HTTP/1.1\r\nHost: {host}\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&raw), Some(431), "{raw}");

    let mut client = proxy.client(H2).await;
    let req = request("GET", "/echo", proxy.https.port())
        .header("x-big", "a".repeat(20_000))
        .body(full(""))
        .expect("request");
    let refused = client.send(req).await;
    assert!(
        refused.as_ref().map_or(true, |r| r.status()
            == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        "{refused:?}"
    );
    assert_eq!(upstream.count(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn garbage_and_truncated_tls_only_close_that_connection() {
    let (_upstream, proxy) = Proxy::with_upstream("[limits]\nhandshake_timeout = \"1s\"\n").await;
    let hello_prefix = [
        0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    let payloads: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        vec![0xff; 4096],
        hello_prefix.to_vec(),
        vec![0x16, 0x03, 0x03, 0xff, 0xff, 0x01],
        Vec::new(),
    ];
    for payload in payloads {
        let mut tcp = TcpStream::connect(proxy.https).await.expect("connect");
        let _ = tcp.write_all(&payload).await;
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "closed within the handshake timeout");
        assert!(
            !String::from_utf8_lossy(&sink).contains("HTTP/1.1"),
            "no HTTP answer on a TLS port"
        );
    }
    assert!(
        tls_connect(proxy.https, "unknown.example", &proxy.root, H2)
            .await
            .is_err()
    );
    let mut client = proxy.client(H2).await;
    assert_eq!(
        client.get("/echo", proxy.https.port()).await.0.status(),
        StatusCode::OK
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_crowd_is_cut_off_while_honest_clients_are_served() {
    let (upstream, proxy) = Proxy::with_upstream("[limits]\nheader_read_timeout = \"2s\"\nhandshake_timeout = \"2s\"\nidle_timeout = \"2s\"\n").await;
    let port = proxy.https.port();
    let started = Instant::now();
    // 200 clients that finish TLS and then trickle a header line every 500ms, never ending the head.
    let cut_off = Arc::new(AtomicUsize::new(0));
    let mut crowd = Vec::new();
    for _ in 0..200 {
        let (addr, root, cut_off) = (proxy.https, proxy.root.clone(), cut_off.clone());
        crowd.push(tokio::spawn(async move {
            let Ok(mut tls) = tls_connect(addr, "localhost", &root, H1).await else {
                return;
            };
            let _ = tls
                .write_all(format!("GET /echo HTTP/1.1\r\nHost: localhost:{port}\r\n").as_bytes())
                .await;
            // Counted only when the proxy ends it: a client that trickles all 40 fields is not.
            for i in 0..40 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if tls
                    .write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    cut_off.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                let mut probe = [0u8; 512];
                if let Ok(read) =
                    tokio::time::timeout(Duration::from_millis(1), tls.read(&mut probe)).await
                {
                    match read {
                        Ok(n) if n > 0 && !probe.starts_with(b"HTTP/1.1 408") => {}
                        _ => {
                            cut_off.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                }
            }
        }));
    }
    // 100 TCP connections that never even start TLS.
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(proxy.https).await.expect("connect"));
    }
    // Meanwhile honest clients are answered, on new connections and on a kept-alive one.
    let mut honest = proxy.client(H2).await;
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(3) {
        assert_eq!(honest.get("/echo", port).await.0.status(), StatusCode::OK);
        let mut fresh = proxy.client(H1).await;
        assert_eq!(fresh.get("/echo", port).await.0.status(), StatusCode::OK);
        answered += 2;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for task in crowd {
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("slow client cut off in time")
            .expect("task");
    }
    assert_eq!(cut_off.load(Ordering::SeqCst), 200);
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "cut at the header timeout, not at the end of their trickle"
    );
    for mut tcp in silent {
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
        assert!(
            closed.is_ok(),
            "a silent connection is closed at the handshake timeout"
        );
    }
    assert_eq!(
        upstream.count(),
        answered,
        "only honest requests reached the upstream, each once"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let (_upstream, proxy) =
        Proxy::with_upstream("[limits]\nheader_read_timeout = \"1s\"\nidle_timeout = \"1s\"\n")
            .await;
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        assert_eq!(
            client.get("/echo", proxy.https.port()).await.0.status(),
            StatusCode::OK
        );
        // Closed by the proxy one idle timeout later (1 s), well before the wait's bound.
        eventually("the idle connection is closed", || async {
            match &client.sender {
                Sender::H1(s) => s.is_closed(),
                Sender::H2(s) => s.is_closed(),
            }
        })
        .await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn slow_small_post_is_refused_without_reaching_the_upstream() {
    let (upstream, proxy) = Proxy::with_upstream("[limits]\nbody_timeout = \"1s\"\n").await;
    let host = format!("localhost:{}", proxy.https.port());
    let mut tls = tls_connect(proxy.https, "localhost", &proxy.root, H1)
        .await
        .expect("connect");
    tls.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100\r\n\r\nusername=adm")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    let started = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    let raw = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&raw), Some(408), "{raw}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        upstream.count(),
        0,
        "a Gunicorn worker never waited for this body"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_and_restarted_under_load() {
    // The upstream's port is fixed so it can come back where the proxy expects it, and below the
    // ephemeral range so none of the proxy's reconnects can take it (or connect to itself) meanwhile.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], fixed_port()));
    let listener = TcpListener::bind(addr).await.expect("bind");
    let first = Upstream::serve(listener);
    let first_requests = first.requests.clone();
    let proxy = Proxy::start(&format!("http://{addr}"), "").await;
    let port = proxy.https.port();

    let ok = Arc::new(AtomicUsize::new(0));
    let bad_gateway = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (ok, bad_gateway, stop) = (ok.clone(), bad_gateway.clone(), stop.clone());
        let mut client = proxy.client(H2).await;
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let (response, _) = client.get("/echo", port).await;
                match response.status() {
                    StatusCode::OK => ok.fetch_add(1, Ordering::SeqCst),
                    StatusCode::BAD_GATEWAY => bad_gateway.fetch_add(1, Ordering::SeqCst),
                    other => panic!("unexpected status {other}"),
                };
            }
        }));
    }
    eventually("load is flowing", || async {
        ok.load(Ordering::SeqCst) >= 50
    })
    .await;
    let served_by_first = {
        drop(first); // the upstream dies mid-load
        ok.load(Ordering::SeqCst)
    };
    eventually("requests while the upstream is down get 502", || async {
        bad_gateway.load(Ordering::SeqCst) > 0
    })
    .await;
    let second = Upstream::serve(TcpListener::bind(addr).await.expect("rebind the same port"));
    let ok_before_restart = ok.load(Ordering::SeqCst);
    eventually("back to normal on its own after the restart", || async {
        ok.load(Ordering::SeqCst) >= ok_before_restart + 50
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for task in load {
        tokio::time::timeout(LIMIT, task)
            .await
            .expect("load stops")
            .expect("no unexpected status");
    }
    // Every 200 was exactly one upstream request: none lost, none sent twice.
    assert!(served_by_first > 0);
    let upstream_requests = first_requests.load(Ordering::SeqCst) + second.count();
    assert_eq!(upstream_requests, ok.load(Ordering::SeqCst));
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_reset_mid_response_aborts_only_that_response() {
    // A raw upstream that promises 100000 bytes, sends 10, and resets the connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let resets = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = vec![0u8; 4096];
                let _ = tcp.read(&mut head).await;
                let path_is_ok = head.starts_with(b"GET /ok ");
                if path_is_ok {
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                } else {
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n0123456789")
                        .await;
                    let _ = tcp.set_zero_linger();
                }
                drop(tcp);
            });
        }
    });
    // Streamed (buffering off): the status is already sent, so the client sees the body abort.
    // Buffered (the default for a length this small): the client gets a clean 502 instead.
    for (buffer, expected) in [("0", StatusCode::OK), ("256KiB", StatusCode::BAD_GATEWAY)] {
        let extra = format!("[limits]\nbuffer_response = \"{buffer}\"\n");
        let proxy = Proxy::start(&format!("http://{addr}"), &extra).await;
        let port = proxy.https.port();
        for alpn in [H1, H2] {
            let mut client = proxy.client(alpn).await;
            let response = client
                .send(
                    request("GET", "/partial", port)
                        .body(full(""))
                        .expect("request"),
                )
                .await
                .expect("headers arrive");
            assert_eq!(response.status(), expected, "buffer_response = {buffer}");
            let body = tokio::time::timeout(
                LIMIT,
                http_body_util::BodyExt::collect(response.into_body()),
            )
            .await
            .expect("in time");
            if expected == StatusCode::OK {
                assert!(
                    body.is_err(),
                    "an aborted body, not a short one passed off as complete"
                );
            }
            // Other requests, on new connections, are unaffected.
            let mut other = proxy.client(alpn).await;
            let (response, body) = other.get("/ok", port).await;
            assert_eq!((response.status(), body.as_str()), (StatusCode::OK, "ok"));
        }
        proxy.stop().await;
    }
    resets.abort();
}

#[tokio::test]
async fn http2_rapid_reset_flood_is_cut_off() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let authority = format!("localhost:{}", proxy.https.port());
    let headers: Vec<HeaderPair> = vec![
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", authority.as_bytes()),
        (b":path", b"/slow"),
    ];
    let goaway = raw_h2::rapid_reset(&proxy, &headers, 500).await;
    // ENHANCE_YOUR_CALM (0xb): hyper's limit on streams reset before they were served.
    assert_eq!(
        goaway,
        Some(0xb),
        "the flooding connection is told to calm down and closed"
    );
    assert!(
        upstream.count() < 500,
        "most of the flood never reached the upstream ({})",
        upstream.count()
    );
    // Everyone else is unaffected.
    let mut client = proxy.client(H2).await;
    assert_eq!(
        client.get("/echo", proxy.https.port()).await.0.status(),
        StatusCode::OK
    );
    proxy.stop().await;
}

#[tokio::test]
async fn login_posts_beyond_the_budget_get_429_before_the_upstream() {
    let (upstream, proxy) = Proxy::with_upstream(
        "[[rate_limit]]\npath = \"/admin/login/\"\nrequests = 3\nper = \"1m\"\n",
    )
    .await;
    let port = proxy.https.port();
    let post = |path: &str| {
        request("POST", path, port)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(full("username=admin&password=guess"))
            .expect("request")
    };
    let mut client = proxy.client(H2).await;
    for attempt in 0..3 {
        let (response, _) = client.fetch(post("/admin/login/?next=/admin/")).await;
        assert_eq!(response.status(), StatusCode::OK, "attempt {attempt}");
    }
    let (response, body) = client.fetch(post("/admin/login/")).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS, "{body}");
    // Three per minute: the next token is 20 s away.
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=20).contains(&retry), "{retry}");
    assert!(response.headers().contains_key("strict-transport-security"));
    // Every spelling Gunicorn decodes to the login path spends the same budget, over either protocol.
    let spellings = [
        "/admin/%6Cogin/",
        "/%61dmin/login/",
        "/admin/login%2F",
        "/admin//login/",
        "//admin/login/",
        "/admin/./login/",
        "/admin/x/../login/",
        "/admin%2flogin/",
    ];
    for path in spellings {
        let (response, _) = client.fetch(post(path)).await;
        assert_eq!(
            response.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "h2 {path}"
        );
        let raw = raw_tls_exchange(
            proxy.https,
            &proxy.root,
            format!(
                "POST {path} HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Length: 3\r\n\r\nx=1"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(status_of(&raw), Some(429), "h1 {path}: {raw}");
    }
    // Reading the form and other paths are not limited.
    assert_eq!(
        client.get("/admin/login/", port).await.0.status(),
        StatusCode::OK
    );
    assert_eq!(
        client.fetch(post("/contact/")).await.0.status(),
        StatusCode::OK
    );
    // Another client address has its own budget.
    let mut other = proxy.client_from_another_address(H2).await;
    assert_eq!(
        other.fetch(post("/admin/login/")).await.0.status(),
        StatusCode::OK
    );
    // The refused attempt never reached the upstream: 3 + 1 + 1 POSTs and one GET did.
    assert_eq!(upstream.count(), 6);
    proxy.stop().await;
}

/// HTTP/1.1 keep-alive lasts `idle_timeout`, not `header_read_timeout` (hyper's header timer, which ran
/// whenever hyper waited for a head, closed idle connections at the header timeout); a later head that
/// trickles in is still cut at the header timeout, timed from its first byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_outlives_the_header_timeout_and_a_slow_later_head_does_not() {
    let (upstream, proxy) =
        Proxy::with_upstream("[limits]\nheader_read_timeout = \"1s\"\nidle_timeout = \"60s\"\n")
            .await;
    let port = proxy.https.port();
    let mut client = proxy.client(H1).await;
    assert_eq!(client.get("/echo", port).await.0.status(), StatusCode::OK);
    // Idle for more than the header timeout: the same connection still carries the next request.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let Sender::H1(sender) = &client.sender else {
        panic!("http/1.1 was offered")
    };
    assert!(
        !sender.is_closed(),
        "closed while idle, before the idle timeout"
    );
    assert_eq!(client.get("/echo", port).await.0.status(), StatusCode::OK);

    // One request, then the start of a second head and nothing more.
    let tls = tls_connect(proxy.https, "localhost", &proxy.root, H1)
        .await
        .expect("connect");
    let mut tls = tokio::io::BufReader::new(tls);
    let head = format!("GET /echo HTTP/1.1\r\nHost: localhost:{port}\r\n");
    tls.write_all(format!("{head}\r\n").as_bytes())
        .await
        .expect("write");
    read_response(&mut tls).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tls.write_all(head.as_bytes()).await.expect("write");
    let mut sink = Vec::new();
    // Well inside the 60 s idle timeout: only the header timeout can have closed it.
    let closed = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the slow second head was not cut");
    assert_eq!(upstream.count(), 3);
    proxy.stop().await;
}

/// Item (issue 15): an HTTP/1.1 keep-alive connection idle for a second rests (hyper's connection and
/// its buffers freed, the TLS session kept) and wakes whole on the client's next bytes: a head that
/// arrives in pieces, one longer than the first read after waking, and two pipelined requests are
/// each answered on the same connection.
#[tokio::test]
async fn idle_http1_connections_rest_and_wake_with_nothing_lost() {
    let (upstream, proxy) = Proxy::with_upstream("[metrics]\nlisten = \"127.0.0.1:0\"\n").await;
    let metrics = proxy.server().metrics_addr.expect("metrics listener");
    let port = proxy.https.port();
    let resting = |n: usize| async move {
        scrape_metrics(metrics)
            .await
            .contains(&format!("\nportcullis_connections_resting {n}\n"))
    };
    let head = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n{extra}\r\n")
    };
    let tls = tls_connect(proxy.https, "localhost", &proxy.root, H1)
        .await
        .expect("connect");
    let mut tls = tokio::io::BufReader::new(tls);
    tls.write_all(head("/echo?first", "").as_bytes())
        .await
        .expect("write");
    assert!(read_response(&mut tls).await.contains("GET /echo?first "));
    eventually("the idle connection rests", || resting(1)).await;

    let second = head("/echo?second", "");
    let (start, rest) = second.split_at(10);
    tls.write_all(start.as_bytes()).await.expect("write");
    eventually("its first bytes wake it", || resting(0)).await;
    tls.write_all(rest.as_bytes()).await.expect("write");
    assert!(read_response(&mut tls).await.contains("GET /echo?second "));

    eventually("it rests again", || resting(1)).await;
    let long = "x".repeat(6000);
    tls.write_all(head("/echo?third", &format!("X-Long: {long}\r\n")).as_bytes())
        .await
        .expect("write");
    let third = read_response(&mut tls).await;
    assert!(third.contains("GET /echo?third ") && third.contains(&long));

    eventually("and again", || resting(1)).await;
    let pipelined = head("/echo?fourth", "") + &head("/echo?fifth", "");
    tls.write_all(pipelined.as_bytes()).await.expect("write");
    assert!(read_response(&mut tls).await.contains("GET /echo?fourth "));
    assert!(read_response(&mut tls).await.contains("GET /echo?fifth "));

    // A woken connection can still be upgraded: a WebSocket tunnel both ways.
    eventually("and again", || resting(1)).await;
    let upgrade = head(
        "/ws",
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    );
    tls.write_all(upgrade.as_bytes()).await.expect("write");
    let mut switched = String::new();
    while switched != "\r\n" {
        switched.clear();
        let n = tokio::time::timeout(LIMIT, tls.read_line(&mut switched))
            .await
            .expect("101 in time")
            .expect("read");
        assert!(n > 0, "closed before switching protocols");
        if switched.starts_with("HTTP/1.1") {
            assert!(switched.starts_with("HTTP/1.1 101"), "{switched}");
        }
    }
    tls.write_all(b"through the tunnel").await.expect("write");
    let mut echo = [0u8; 18];
    tokio::time::timeout(LIMIT, tls.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(&echo, b"through the tunnel");
    assert_eq!(upstream.count(), 6);
    proxy.stop().await;
}

/// Item: a resting connection still closes cleanly (TLS close_notify) at the idle timeout, and at once
/// when the server shuts down: well before the 30 s shutdown grace, which would otherwise cut it.
#[tokio::test]
async fn resting_connections_close_at_the_idle_timeout_and_on_shutdown() {
    for idle_timeout in ["3s", "60s"] {
        let (_upstream, proxy) = Proxy::with_upstream(&format!(
            "[limits]\nidle_timeout = \"{idle_timeout}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n"
        ))
        .await;
        let metrics = proxy.server().metrics_addr.expect("metrics listener");
        let port = proxy.https.port();
        let tls = tls_connect(proxy.https, "localhost", &proxy.root, H1)
            .await
            .expect("connect");
        let mut tls = tokio::io::BufReader::new(tls);
        let head = format!("GET /echo HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n");
        tls.write_all(head.as_bytes()).await.expect("write");
        read_response(&mut tls).await;
        eventually("the connection rests", || async {
            scrape_metrics(metrics)
                .await
                .contains("\nportcullis_connections_resting 1\n")
        })
        .await;
        // With the 60 s idle timeout only the shutdown can close it in time.
        let (stopped, proxy) = if idle_timeout == "60s" {
            (Some(tokio::spawn(proxy.stop())), None)
        } else {
            (None, Some(proxy))
        };
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(LIMIT, tls.read_to_end(&mut sink)).await;
        assert!(
            matches!(closed, Ok(Ok(0))),
            "idle timeout {idle_timeout}: {closed:?}"
        );
        if let Some(stopped) = stopped {
            stopped.await.expect("stopped");
        }
        if let Some(proxy) = proxy {
            proxy.stop().await;
        }
    }
}

/// Item: a TLS connection that completes its handshake and then sends no complete request head is cut at
/// `header_read_timeout`, whatever ALPN chose and however much of the HTTP/2 preface it sent. (Before,
/// hyper-util's auto builder waited for the preface before any timer ran: 60 s, the idle timeout.)
#[tokio::test]
async fn silent_tls_connections_are_cut_at_the_header_timeout() {
    let (upstream, proxy) =
        Proxy::with_upstream("[limits]\nheader_read_timeout = \"1s\"\nidle_timeout = \"60s\"\n")
            .await;
    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    let mut full_preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    full_preface.extend_from_slice(&settings);
    /// A case's name, its ALPN offer and what it sends after the handshake.
    type Case<'a> = (&'a str, &'a [&'a [u8]], &'a [u8]);
    let cases: [Case; 6] = [
        ("h2, nothing", &[b"h2"], b""),
        ("h2, half a preface", &[b"h2"], b"PRI * HTTP/2.0\r\n"),
        (
            "h2, preface and SETTINGS, no request",
            &[b"h2"],
            &full_preface,
        ),
        ("http/1.1, nothing", H1, b""),
        (
            "http/1.1, half a head",
            H1,
            b"GET / HTTP/1.1\r\nHost: local",
        ),
        ("no ALPN, nothing", &[], b""),
    ];
    let mut waits = Vec::new();
    let (https, root) = (proxy.https, &proxy.root);
    for (name, alpn, sent) in cases {
        waits.push(async move {
            let mut tls = tls_connect(https, "localhost", root, alpn)
                .await
                .expect("connect");
            tls.write_all(sent).await.expect("write");
            let mut sink = Vec::new();
            // Well inside the 60 s idle timeout: only the header timeout can have closed it.
            let closed = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut sink))
                .await
                .is_ok();
            (name, closed)
        });
    }
    for (name, closed) in futures_util::future::join_all(waits).await {
        assert!(closed, "{name}: still open after 15 s");
    }
    // An honest client is unaffected, over either protocol.
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        let (response, _) = client.get("/echo", proxy.https.port()).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(upstream.count(), 2);
    proxy.stop().await;
}
