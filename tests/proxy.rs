//! The real proxy in front of a real in-process upstream, through real TLS clients (HTTP/1.1 and HTTP/2).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2", b"http/1.1"];

#[tokio::test]
async fn http1_and_http2_reach_the_upstream_with_host_and_forwarded_headers() {
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    let port = proxy.https.port();
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        assert_eq!(client.is_h2(), alpn == H2);
        let (response, body) = client.get("/echo?q=1", port).await;
        assert_eq!(response.status(), StatusCode::OK, "{body}");
        assert!(body.starts_with("GET /echo?q=1 HTTP/1.1"), "{body}");
        let headers = echoed_headers(&body);
        assert_eq!(echoed(&headers, "host"), [format!("localhost:{port}")]);
        assert_eq!(echoed(&headers, "x-forwarded-proto"), ["https"]);
        assert_eq!(echoed(&headers, "x-forwarded-port"), [port.to_string()]);
        assert_eq!(echoed(&headers, "x-forwarded-for"), ["127.0.0.1"]);
        assert_eq!(
            echoed(&headers, "x-forwarded-host"),
            [format!("localhost:{port}")]
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn client_supplied_forwarding_claims_never_reach_django() {
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    let port = proxy.https.port();
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        let req = request("GET", "/echo", port)
            .header("x-forwarded-proto", "http")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-host", "evil.com")
            .header("x-forwarded-ssl", "off")
            .header("x-real-ip", "6.6.6.6")
            .header("forwarded", "for=6.6.6.6;host=evil.com")
            .body(full(""))
            .expect("request");
        let (_, body) = client.fetch(req).await;
        let headers = echoed_headers(&body);
        assert_eq!(echoed(&headers, "x-forwarded-proto"), ["https"]);
        assert_eq!(echoed(&headers, "x-forwarded-for"), ["127.0.0.1"]);
        assert_eq!(echoed(&headers, "x-real-ip"), ["127.0.0.1"]);
        assert_eq!(
            echoed(&headers, "x-forwarded-host"),
            [format!("localhost:{port}")]
        );
        assert!(echoed(&headers, "x-forwarded-ssl").is_empty());
        assert!(echoed(&headers, "forwarded").is_empty());
    }
    proxy.stop().await;
}

#[tokio::test]
async fn client_address_comes_from_the_connection() {
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    // Connect from 127.0.0.2 so the address is not the proxy's own.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    let tcp = socket.connect(proxy.https).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(client_tls_config(&proxy.root, H1));
    let tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .expect("tls");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("/echo")
        .header("host", format!("localhost:{}", proxy.https.port()))
        .header("x-forwarded-for", "1.2.3.4")
        .body(full(""))
        .expect("request");
    let response = sender.send_request(req).await.expect("response");
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("body")
        .to_bytes();
    let headers = echoed_headers(&String::from_utf8_lossy(&body));
    assert_eq!(echoed(&headers, "x-forwarded-for"), ["127.0.0.2"]);
    proxy.stop().await;
}

#[tokio::test]
async fn security_headers_on_proxied_and_own_responses() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let port = proxy.https.port();
    let mut client = proxy.client(H2).await;

    let (response, _) = client.get("/django-headers", port).await;
    let h = response.headers();
    assert_eq!(
        h["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    // Django chose SAMEORIGIN for this view: kept, and sent once.
    assert_eq!(
        h.get_all("x-frame-options").iter().collect::<Vec<_>>(),
        ["SAMEORIGIN"]
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "same-origin");
    assert_eq!(h["cross-origin-opener-policy"], "same-origin");
    assert!(h.contains_key("content-security-policy") && h.contains_key("permissions-policy"));
    assert!(h.get("server").is_none() && h.get("x-powered-by").is_none());
    // Hop-by-hop fields from the upstream, and those it named in Connection, stop at the proxy.
    assert!(
        h.get("x-internal").is_none()
            && h.get("keep-alive").is_none()
            && h.get("connection").is_none()
    );

    // A response the proxy makes itself (421 for a foreign Host) carries them too.
    let mut h1 = proxy.client(H1).await;
    let (response, body) = h1.fetch(foreign_host_get("/", port)).await;
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    assert!(response.headers().contains_key("strict-transport-security"));
    assert!(body.contains("421") && !body.contains("127.0.0.1"));
    assert_eq!(
        upstream.count(),
        1,
        "the foreign Host never reached the upstream"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn every_set_cookie_is_hardened_and_csrftoken_stays_readable() {
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        let (response, _) = client.get("/cookies", proxy.https.port()).await;
        let cookies: Vec<&str> = response
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().expect("ascii"))
            .collect();
        assert_eq!(
            cookies,
            [
                "sessionid=abc; Path=/; Secure; HttpOnly; SameSite=Lax",
                "csrftoken=xyz; expires=Wed, 21 Oct 2026 07:28:00 GMT; Path=/; Secure; SameSite=Lax",
                "prefs=1; Secure; HttpOnly; SameSite=Strict",
            ]
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_removed() {
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    let mut client = proxy.client(H1).await;
    let req = request("GET", "/echo", proxy.https.port())
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-end-to-end", "kept")
        .body(full(""))
        .expect("request");
    let (_, body) = client.fetch(req).await;
    let headers = echoed_headers(&body);
    for gone in ["x-hop", "keep-alive", "te", "proxy-authorization"] {
        assert!(echoed(&headers, gone).is_empty(), "{gone} crossed: {body}");
    }
    assert_eq!(echoed(&headers, "x-end-to-end"), ["kept"]);
    proxy.stop().await;
}

#[tokio::test]
async fn plain_http_redirects_to_https_for_our_hosts_only() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let http = proxy.http.expect("plain listener");
    let exchange = |host: &'static str, method: &'static str| async move {
        let req = format!(
            "{method} /login/?next=/admin/ HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\nConnection: close\r\n\r\na=b"
        );
        plain_exchange(http, &req).await
    };
    let response = exchange("localhost:8080", "POST").await;
    assert!(response.starts_with("HTTP/1.1 308"), "{response}");
    let location = format!(
        "location: https://localhost:{}/login/?next=/admin/",
        proxy.https.port()
    );
    assert!(
        response.to_ascii_lowercase().contains(&location),
        "{response}"
    );
    assert!(
        !response
            .to_ascii_lowercase()
            .contains("strict-transport-security")
    );
    let refused = exchange("evil.com", "GET").await;
    assert!(
        !refused.to_ascii_lowercase().contains("location:"),
        "{refused}"
    );
    assert!(refused.starts_with("HTTP/1.1 4"), "{refused}");
    assert_eq!(upstream.count(), 0, "nothing is proxied over plain HTTP");
    proxy.stop().await;
}

#[tokio::test]
async fn unknown_sni_gets_no_certificate_and_a_mismatched_host_gets_421() {
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    let refused = tls_connect(proxy.https, "evil.example", &proxy.root, H1).await;
    assert!(
        refused.is_err(),
        "a name we do not serve must not get a certificate"
    );

    // SNI 127.0.0.1 is not sent (IP literal), so this connection has no SNI; Host must still be ours.
    let mut client = Client::connect(proxy.https, "127.0.0.1", &proxy.root, H1)
        .await
        .expect("connect by IP");
    let req = http::Request::builder()
        .uri(format!("https://127.0.0.1:{}/echo", proxy.https.port()))
        .header("host", format!("127.0.0.1:{}", proxy.https.port()))
        .body(full(""))
        .expect("request");
    assert_eq!(client.fetch(req).await.0.status(), StatusCode::OK);

    // SNI localhost, Host 127.0.0.1: served by us, but not the name this connection is for.
    let mut client = proxy.client(H2).await;
    let req = http::Request::builder()
        .uri(format!("https://127.0.0.1:{}/echo", proxy.https.port()))
        .body(full(""))
        .expect("request");
    assert_eq!(
        client.fetch(req).await.0.status(),
        StatusCode::MISDIRECTED_REQUEST
    );
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504_with_no_internals() {
    let dead = dead_address().await;
    let proxy = Proxy::start(&format!("http://{dead}"), "").await;
    let mut client = proxy.client(H2).await;
    let (response, body) = client.get("/", proxy.https.port()).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert!(
        !body.contains(&dead.port().to_string()) && !body.to_lowercase().contains("refused"),
        "{body}"
    );
    assert!(response.headers().contains_key("strict-transport-security"));
    proxy.stop().await;

    let (_upstream, proxy) = Proxy::with_upstream("").await;
    let mut client = proxy.client(H1).await;
    let started = std::time::Instant::now();
    let (response, _) = client.get("/slow", proxy.https.port()).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered at the response timeout, not after"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn bodies_stream_both_ways_and_oversized_uploads_get_413() {
    let (upstream, proxy) = Proxy::with_upstream("[limits]\nmax_body = \"8MiB\"\n").await;
    let port = proxy.https.port();
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        let (response, body) = client.get("/large", port).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body.len(), 32 * 1024 * 1024);

        // A 6 MiB upload in chunks without Content-Length (chunked on HTTP/1.1): streamed through.
        let chunks = (0..96).map(|_| {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                Bytes::from(vec![b'u'; 65536]),
            ))
        });
        let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter(chunks),
        ));
        let req = request("POST", "/upload", port)
            .body(body)
            .expect("request");
        let (response, text) = client.fetch(req).await;
        assert_eq!(
            (response.status(), text.as_str()),
            (StatusCode::OK, "6291456")
        );

        // Declared too large: refused before the upstream sees it.
        let before = upstream.count();
        let req = request("POST", "/upload", port)
            .header("content-length", (9 * 1024 * 1024).to_string())
            .body(full(vec![0u8; 9 * 1024 * 1024]))
            .expect("request");
        let (response, _) = client.fetch(req).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(upstream.count(), before);
    }
    // Undeclared and too large: cut off at the limit while streaming.
    let mut client = proxy.client(H2).await;
    let chunks = (0..160).map(|_| {
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(Bytes::from(
            vec![b'u'; 65536],
        )))
    });
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
        futures_util::stream::iter(chunks),
    ));
    let req = request("POST", "/upload", port)
        .body(body)
        .expect("request");
    let response = client.send(req).await.expect("response");
    assert!(
        response.status() == StatusCode::PAYLOAD_TOO_LARGE
            || response.status() == StatusCode::BAD_REQUEST,
        "{}",
        response.status()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn websocket_upgrade_tunnels_both_ways() {
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    let mut io = open_websocket(&proxy).await;
    for message in [&b"hello"[..], b"second frame", &[0u8, 255, 10, 13]] {
        io.write_all(message).await.expect("write");
        let mut buf = vec![0u8; message.len()];
        tokio::time::timeout(LIMIT, io.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(buf, message);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn h2c_upgrade_is_not_forwarded() {
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    let mut client = proxy.client(H1).await;
    let req = request("GET", "/echo", proxy.https.port())
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA")
        .body(full(""))
        .expect("request");
    let (response, body) = client.fetch(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = echoed_headers(&body);
    assert!(
        echoed(&headers, "upgrade").is_empty() && echoed(&headers, "http2-settings").is_empty(),
        "{body}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_requests_in_flight() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let mut client = proxy.client(H1).await;
    let port = proxy.https.port();
    let in_flight = tokio::spawn(async move { client.get("/hold", port).await });
    eventually("/hold reaches the upstream", || async {
        upstream.count() == 1
    })
    .await;
    let addr = proxy.https;
    let stopping = tokio::spawn(proxy.stop());
    eventually("the listener closes once stopping", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    let (response, body) = tokio::time::timeout(LIMIT, in_flight)
        .await
        .expect("in time")
        .expect("task");
    assert_eq!((response.status(), body.as_str()), (StatusCode::OK, "held"));
    tokio::time::timeout(LIMIT, stopping)
        .await
        .expect("stopped in time")
        .expect("task");
}

#[tokio::test]
async fn reload_applies_new_settings_to_the_next_request() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let mut client = proxy.client(H2).await;
    let (response, _) = client.get("/echo", proxy.https.port()).await;
    assert_eq!(response.headers()["x-frame-options"], "DENY");

    let mut config = (*proxy.server().config()).clone();
    let text = format!(
        "[server]\ndomains = [\"localhost\", \"127.0.0.1\"]\n[upstream]\nurl = \"http://{}\"\n[headers.x_frame_options]\nvalue = \"SAMEORIGIN\"\n",
        upstream.addr
    );
    config.headers = portcullis::config::Config::parse(&text, "reload", None)
        .expect("valid")
        .headers;
    proxy.server().reload(config).expect("reload");
    // Same connection, next request: the new policy.
    let (response, _) = client.get("/echo", proxy.https.port()).await;
    assert_eq!(response.headers()["x-frame-options"], "SAMEORIGIN");

    // Settings only a restart changes are kept as they run: `config()` tells what is in effect, and the
    // next reload compares against it.
    let running = proxy.server().config();
    let mut config = (*running).clone();
    config.server.https = "127.0.0.1:1".parse().expect("addr");
    config.limits.max_connections = 7;
    config.headers = portcullis::config::Config::parse(
        &format!("{text}[headers.referrer_policy]\nvalue = \"strict-origin-when-cross-origin\"\n"),
        "reload",
        None,
    )
    .expect("valid")
    .headers;
    proxy.server().reload(config).expect("reload");
    let now = proxy.server().config();
    assert_eq!(now.server.https, running.server.https);
    assert_eq!(now.limits.max_connections, running.limits.max_connections);
    let (response, _) = client.get("/echo", proxy.https.port()).await;
    assert_eq!(
        response.headers()["referrer-policy"],
        "strict-origin-when-cross-origin",
        "the rest was applied"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn unix_socket_upstream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("gunicorn.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind unix");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let host = req.headers().get("host").cloned();
                        let mut response = http::Response::new(full("via unix socket"));
                        if let Some(host) = host {
                            response.headers_mut().insert("x-seen-host", host);
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let proxy = Proxy::start(&format!("unix:{}", socket.display()), "").await;
    let mut client = proxy.client(H2).await;
    let (response, body) = client.get("/", proxy.https.port()).await;
    assert_eq!(body, "via unix socket");
    assert_eq!(
        response.headers()["x-seen-host"],
        format!("localhost:{}", proxy.https.port()).as_str()
    );
    proxy.stop().await;
    task.abort();
}

/// A throwaway CA and two leaf certificates for `localhost`, as PEM files for `tls.source = "files"`.
fn file_certificates(dir: &std::path::Path) -> (std::path::PathBuf, Vec<(String, String)>) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaves = (0..2)
        .map(|_| {
            let key = rcgen::KeyPair::generate().expect("key");
            let params =
                rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
            (
                params.signed_by(&key, &issuer).expect("leaf").pem(),
                key.serialize_pem(),
            )
        })
        .collect();
    let root = dir.join("ca.pem");
    std::fs::write(&root, ca.pem()).expect("write ca");
    (root, leaves)
}

#[tokio::test]
async fn certificate_files_reload_and_a_broken_file_keeps_the_old_one() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, leaves) = file_certificates(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &leaves[0].0).expect("write");
    std::fs::write(&key, &leaves[0].1).expect("write");
    let text = format!(
        "[server]\nhttps = \"127.0.0.1:0\"\ndomains = [\"localhost\"]\n[tls]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n\
         dir = \"{}\"\n[upstream]\nurl = \"http://{}\"\n",
        cert.display(),
        key.display(),
        dir.path().join("state").display(),
        upstream.addr
    );
    let config = portcullis::config::Config::parse(&text, "files", None).expect("valid");
    let server = portcullis::server::start(config.clone())
        .await
        .expect("start");
    let served = || async {
        let tls = tls_connect(server.https_addr, "localhost", &root, H2)
            .await
            .expect("handshake");
        tls.get_ref().1.peer_certificates().expect("certificate")[0].to_vec()
    };
    let first = served().await;

    // A torn write (half a PEM) must not replace a working certificate.
    std::fs::write(&cert, &leaves[1].0[..leaves[1].0.len() / 2]).expect("write");
    assert!(
        server.reload(config.clone()).is_err(),
        "a broken certificate file is refused"
    );
    assert_eq!(served().await, first);
    // A key that does not match the certificate neither.
    std::fs::write(&cert, &leaves[1].0).expect("write");
    assert!(
        server.reload(config.clone()).is_err(),
        "a mismatched key is refused"
    );
    assert_eq!(served().await, first);
    // The complete new pair is swapped in.
    std::fs::write(&key, &leaves[1].1).expect("write");
    server.reload(config).expect("reload");
    let second = served().await;
    assert_ne!(second, first);
    let mut client = Client::connect(server.https_addr, "localhost", &root, H2)
        .await
        .expect("connect");
    assert_eq!(
        client
            .get("/echo", server.https_addr.port())
            .await
            .0
            .status(),
        StatusCode::OK
    );
    server.shutdown();
    tokio::time::timeout(LIMIT, server.wait())
        .await
        .expect("stops");
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once() {
    let (_upstream, proxy) = Proxy::with_upstream("[limits]\nmax_connections = 4\n").await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(proxy.client(H1).await);
    }
    // The fifth is accepted and dropped before any TLS work.
    let mut extra = tokio::net::TcpStream::connect(proxy.https)
        .await
        .expect("connect");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Those inside are served; when one leaves, a new connection gets in.
    assert_eq!(
        held[0].get("/echo", proxy.https.port()).await.0.status(),
        StatusCode::OK
    );
    held.pop();
    // The slot is given back when the connection task ends: a new connection gets in soon after.
    let mut fresh = wait_for(
        "a new connection gets the freed slot",
        LIMIT,
        || async {
            Client::connect(proxy.https, "localhost", &proxy.root, H2)
                .await
                .ok()
        },
        String::new,
    )
    .await;
    assert_eq!(
        fresh.get("/echo", proxy.https.port()).await.0.status(),
        StatusCode::OK
    );
    proxy.stop().await;
}

#[tokio::test]
async fn reload_with_a_new_name_gets_it_a_local_certificate() {
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    assert!(
        tls_connect(proxy.https, "app.localhost", &proxy.root, H2)
            .await
            .is_err()
    );
    let mut config = (*proxy.server().config()).clone();
    config.server.domains = portcullis::config::Domains::new(vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "app.localhost".into(),
    ]);
    proxy.server().reload(config).expect("reload");
    let mut client = wait_for(
        "a certificate for the new name",
        LIMIT,
        || async {
            Client::connect(proxy.https, "app.localhost", &proxy.root, H2)
                .await
                .ok()
        },
        String::new,
    )
    .await;
    let req = http::Request::builder()
        .uri(format!("https://app.localhost:{}/echo", proxy.https.port()))
        .body(full(""))
        .expect("request");
    assert_eq!(client.fetch(req).await.0.status(), StatusCode::OK);
    proxy.stop().await;
}

#[tokio::test]
async fn ipv6_listener_and_client_address() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[server]\nhttps = \"[::1]:0\"\ndomains = [\"localhost\", \"::1\"]\n[tls]\ndir = \"{}\"\n[upstream]\nurl = \"http://{}\"\n",
        dir.path().display(),
        upstream.addr
    );
    let config = portcullis::config::Config::parse(&text, "ipv6", None).expect("valid");
    let proxy = Proxy::start_with(config, dir).await;
    assert!(proxy.https.is_ipv6());
    // By IP (no SNI): the certificate covers ::1 and Host is the bracketed literal.
    let mut client = Client::connect(proxy.https, "::1", &proxy.root, H2)
        .await
        .expect("connect over IPv6");
    let req = http::Request::builder()
        .uri(format!("https://[::1]:{}/echo", proxy.https.port()))
        .body(full(""))
        .expect("request");
    let (response, body) = client.fetch(req).await;
    assert_eq!(response.status(), StatusCode::OK, "{body}");
    let headers = echoed_headers(&body);
    assert_eq!(echoed(&headers, "x-forwarded-for"), ["::1"]);
    assert_eq!(
        echoed(&headers, "host"),
        [format!("[::1]:{}", proxy.https.port())]
    );
    proxy.stop().await;
}

#[tokio::test]
async fn websocket_tunnels_count_against_the_cap_and_close_on_shutdown() {
    let (_upstream, proxy) = Proxy::with_upstream("[limits]\nmax_connections = 2\n").await;
    let mut io = open_websocket(&proxy).await;
    io.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    io.read_exact(&mut buf).await.expect("echo");

    // The tunnel still holds its slot: one more connection fits, the next is closed at once.
    let mut second = proxy.client(H2).await;
    assert_eq!(
        second.get("/echo", proxy.https.port()).await.0.status(),
        StatusCode::OK
    );
    let mut third = tokio::net::TcpStream::connect(proxy.https)
        .await
        .expect("connect");
    let mut probe = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut probe))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    drop(second);

    // Shutdown does not wait out the grace period for the open WebSocket: it is closed.
    let started = std::time::Instant::now();
    proxy.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "stopped in {:?}",
        started.elapsed()
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the tunnel was closed");
}

#[tokio::test]
async fn slow_readers_do_not_hold_the_upstream_for_buffered_responses() {
    for (buffer, upstream_done) in [("64MiB", true), ("0", false)] {
        let (upstream, proxy) =
            Proxy::with_upstream(&format!("[limits]\nbuffer_response = \"{buffer}\"\n")).await;
        let mut client = proxy.client(H2).await;
        // Read the headers, then nothing: a client on a very slow link.
        let response = client
            .send(
                request("GET", "/large-sized", proxy.https.port())
                    .body(full(""))
                    .expect("request"),
            )
            .await
            .expect("headers");
        assert_eq!(response.status(), StatusCode::OK);
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while upstream
            .bodies_sent
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let finished = upstream
            .bodies_sent
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1;
        assert_eq!(
            finished, upstream_done,
            "buffer_response = {buffer}: upstream finished = {finished}"
        );
        if upstream_done {
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .expect("body");
            assert_eq!(body.to_bytes().len(), 32 * 1024 * 1024);
        } else {
            drop(response);
        }
        drop(client); // the slow reader gives up; nothing is left in flight
        proxy.stop().await;
    }
}

/// An HTTP/1.1 WebSocket handshake through the proxy to the upstream's echo; the upgraded stream.
async fn open_websocket(proxy: &Proxy) -> TokioIo<hyper::upgrade::Upgraded> {
    let mut client = proxy.client(H1).await;
    let req = request("GET", "/ws", proxy.https.port())
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(full(""))
        .expect("request");
    let response = client.send(req).await.expect("response");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = tokio::time::timeout(LIMIT, hyper::upgrade::on(response))
        .await
        .expect("in time")
        .expect("upgrade");
    TokioIo::new(upgraded)
}

#[tokio::test]
async fn metrics_count_connections_responses_and_errors() {
    let (upstream, proxy) = Proxy::with_upstream("[metrics]\nlisten = \"127.0.0.1:0\"\n").await;
    let metrics = proxy.server().metrics_addr.expect("metrics listener");
    let port = proxy.https.port();
    let mut client = proxy.client(H2).await;
    for _ in 0..3 {
        assert_eq!(client.get("/echo", port).await.0.status(), StatusCode::OK);
    }
    // Refused by the proxy, blamed on the client: a Host outside the allowlist.
    let mut h1 = proxy.client(H1).await;
    let (response, _) = h1.fetch(foreign_host_get("/", port)).await;
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    // A redirect on the plain listener, and a handshake that fails.
    let http = proxy.http.expect("plain listener");
    let redirect = plain_exchange(
        http,
        "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(redirect.starts_with("HTTP/1.1 308"), "{redirect}");
    let mut garbage = tokio::net::TcpStream::connect(proxy.https)
        .await
        .expect("connect");
    garbage
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(LIMIT, garbage.read_to_end(&mut sink)).await;

    // The refused HTTP/1.1 connection and the garbage one close just after their answers: scrape until
    // they are gone (bounded).
    let scrape = wait_for(
        "only the scraping connection is open",
        LIMIT,
        || async {
            let scrape = scrape_metrics(metrics).await;
            scrape
                .contains("\nportcullis_connections_open 1\n")
                .then_some(scrape)
        },
        String::new,
    )
    .await;
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(
        scrape.contains("content-type: text/plain; version=0.0.4"),
        "{scrape}"
    );
    let lines: Vec<&str> = scrape.lines().collect();
    for line in [
        "portcullis_responses_total{listener=\"https\",code=\"2xx\"} 3",
        "portcullis_responses_total{listener=\"https\",code=\"4xx\"} 1",
        "portcullis_responses_total{listener=\"http\",code=\"3xx\"} 1",
        "portcullis_errors_total{blame=\"client\"} 1",
        "portcullis_errors_total{blame=\"upstream\"} 0",
        "portcullis_upstream_response_seconds_count 3",
        "portcullis_tls_handshake_failures_total 1",
        // Two TLS clients, the plain request and the garbage connection.
        "portcullis_connections_accepted_total 4",
        // Only the h2 client is still connected: a refused HTTP/1.1 request closes its connection, and
        // the scrape is on its own listener.
        "portcullis_connections_open 1",
    ] {
        assert!(lines.contains(&line), "missing {line:?} in\n{scrape}");
    }
    // The local CA's leaf: about 7 days from now.
    let expiry: f64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("portcullis_certificate_expiry_timestamp_seconds "))
        .expect("certificate expiry")
        .parse()
        .expect("number");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        expiry > now + 86_400.0 && expiry < now + 8.0 * 86_400.0,
        "{expiry} vs {now}"
    );
    assert_eq!(upstream.count(), 3);
    let other = plain_exchange(
        metrics,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    drop((client, h1));
    proxy.stop().await;

    // An upstream that is down: 502s, blamed on the upstream.
    let dead = dead_address().await;
    let proxy = Proxy::start(
        &format!("http://{dead}"),
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let metrics = proxy.server().metrics_addr.expect("metrics listener");
    let mut client = proxy.client(H1).await;
    assert_eq!(
        client.get("/", proxy.https.port()).await.0.status(),
        StatusCode::BAD_GATEWAY
    );
    let scrape = scrape_metrics(metrics).await;
    assert!(
        scrape.contains("\nportcullis_errors_total{blame=\"upstream\"} 1\n"),
        "{scrape}"
    );
    assert!(
        scrape.contains("\nportcullis_responses_total{listener=\"https\",code=\"5xx\"} 1\n"),
        "{scrape}"
    );
    drop(client);
    proxy.stop().await;
}

/// Responses finished together on one HTTP/2 connection leave in one write (`server::coalesce`): each
/// stream must still get exactly its own body, small ones held for the next turn and large ones
/// (over the 64 KiB held at most) past them, and the connection must close cleanly on shutdown.
#[tokio::test]
async fn http2_streams_answered_together_each_get_their_own_body() {
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    let port = proxy.https.port();
    let client = proxy.client(H2).await;
    let Sender::H2(sender) = &client.sender else {
        panic!("h2 negotiated");
    };
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..60 {
        let mut sender = sender.clone();
        let path = if i % 10 == 9 {
            "/medium".to_string()
        } else {
            format!("/echo?stream={i}")
        };
        streams.spawn(async move {
            let mut req = request("GET", &path, port).body(full("")).expect("request");
            req.headers_mut().remove("host");
            let response = tokio::time::timeout(LIMIT, sender.send_request(req))
                .await
                .expect("response in time")
                .expect("response");
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let body = tokio::time::timeout(
                LIMIT,
                http_body_util::BodyExt::collect(response.into_body()),
            )
            .await
            .expect("body in time")
            .expect("body")
            .to_bytes();
            (path, body)
        });
    }
    let mut answered = 0;
    while let Some(joined) = streams.join_next().await {
        let (path, body) = joined.expect("stream task");
        if path == "/medium" {
            assert_eq!(body.len(), 200 * 1024);
            assert!(body.iter().all(|&b| b == b'm'), "medium body intact");
        } else {
            let text = String::from_utf8_lossy(&body);
            assert!(
                text.starts_with(&format!("GET {path} HTTP/1.1")),
                "{path}: {text}"
            );
        }
        answered += 1;
    }
    assert_eq!(answered, 60);
    proxy.stop().await;
}

#[tokio::test]
async fn http2_cookie_fields_reach_the_upstream_as_one() {
    // Browsers send one `cookie` field per cookie on HTTP/2 (RFC 9113 §8.2.3).
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    let port = proxy.https.port();
    let mut client = proxy.client(H2).await;
    assert!(client.is_h2());
    let req = request("GET", "/echo", port)
        .header("cookie", "csrftoken=abc")
        .header("cookie", "sessionid=xyz")
        .body(full(""))
        .expect("request");
    let (response, body) = client.fetch(req).await;
    assert_eq!(response.status(), StatusCode::OK, "{body}");
    let headers = echoed_headers(&body);
    assert_eq!(echoed(&headers, "cookie"), ["csrftoken=abc; sessionid=xyz"]);
    proxy.stop().await;
}
