//! Behind a TCP load balancer: the PROXY protocol header (v1 and v2) is required from the balancers in
//! `server.proxy_protocol` and refused from anyone else, and the client it names is the client for the
//! upstream, the access log and the login budget. First by hand-written headers, then with a real
//! HAProxy in TCP mode (`send-proxy`, `send-proxy-v2`) in front of the binary.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use http::StatusCode;
use hyper_util::rt::TokioIo;
use portcullis::config::Config;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const H2: &[&[u8]] = &[b"h2"];

/// The proxy in front of `upstream`, taking PROXY headers from 127.0.0.1 only, with a metrics listener
/// and a one-second header deadline.
async fn proxy_behind_balancer(upstream: &Upstream, extra: &str) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[server]\nhttps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\ndomains = [\"localhost\"]\n\
         proxy_protocol = [\"127.0.0.1/32\"]\nshutdown_grace = \"5s\"\n\
         [tls]\nsource = \"local\"\ndir = \"{}\"\n[upstream]\nurl = \"http://{}\"\n\
         [limits]\nhandshake_timeout = \"1s\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n{extra}",
        dir.path().display(),
        upstream.addr
    );
    let config = Config::parse(&text, "test", None).expect("test config");
    Proxy::start_with(config, dir).await
}

async fn connect_from(local: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(local, 0)).expect("bind");
    socket.connect(to).await.expect("connect")
}

/// Whatever the server sends before it closes (bounded).
async fn read_until_closed(tcp: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(LIMIT, tcp.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection in time")
        .unwrap_or_default();
    out
}

/// An HTTP/2 GET of `/echo` over TLS on a stream that already carries `preamble` (a PROXY header):
/// the headers the upstream saw.
async fn echo_over(mut tcp: TcpStream, preamble: &[u8], proxy: &Proxy) -> Vec<(String, String)> {
    tcp.write_all(preamble).await.expect("write header");
    let connector = TlsConnector::from(client_tls_config(&proxy.root, H2));
    let tls = tokio::time::timeout(
        LIMIT,
        connector.connect(ServerName::try_from("localhost").expect("name"), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("h2");
    tokio::spawn(conn);
    let request = request("GET", "/echo", proxy.https.port())
        .body(full(""))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    use http_body_util::BodyExt;
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    echoed_headers(&String::from_utf8_lossy(&body))
}

fn refusals(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("portcullis_proxy_protocol_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in {metrics}"))
}

#[tokio::test]
async fn the_balancers_header_names_the_client_and_anyone_elses_is_refused() {
    let upstream = Upstream::start().await;
    let proxy = proxy_behind_balancer(&upstream, "").await;
    let balancer: IpAddr = [127, 0, 0, 1].into();
    let stranger: IpAddr = [127, 0, 0, 2].into();

    // v1 and v2 from the balancer: the upstream sees the client they name.
    let seen = echo_over(
        connect_from(balancer, proxy.https).await,
        b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\n",
        &proxy,
    )
    .await;
    assert_eq!(echoed(&seen, "x-forwarded-for"), ["192.0.2.7"]);
    assert_eq!(echoed(&seen, "x-real-ip"), ["192.0.2.7"]);
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x13".to_vec();
    v2.extend([198, 51, 100, 9, 127, 0, 0, 1, 0x9c, 0x40, 0x01, 0xbb]);
    // A TLV nobody uses (the authority, type 0x02): skipped.
    v2.extend([0x02, 0x00, 0x04, b'a', b'.', b'b', b'c']);
    let seen = echo_over(connect_from(balancer, proxy.https).await, &v2, &proxy).await;
    assert_eq!(echoed(&seen, "x-forwarded-for"), ["198.51.100.9"]);
    // v2 LOCAL (the balancer's own health check): the balancer is the client.
    let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    let seen = echo_over(connect_from(balancer, proxy.https).await, local, &proxy).await;
    assert_eq!(echoed(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    let served = upstream.count();

    // A stranger may not say who the client is, on either listener; without a header it is served as
    // itself.
    let http = proxy.http.expect("plain listener");
    for to in [proxy.https, http] {
        let mut tcp = connect_from(stranger, to).await;
        tcp.write_all(
            b"PROXY TCP4 10.9.9.9 127.0.0.1 1 443\r\nGET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
        .await
        .expect("write");
        assert_eq!(read_until_closed(&mut tcp).await, b"", "refused on {to}");
    }
    let seen = echo_over(connect_from(stranger, proxy.https).await, b"", &proxy).await;
    assert_eq!(echoed(&seen, "x-forwarded-for"), ["127.0.0.2"]);

    // From the balancer: a missing header, garbage, a truncated header (closed early, and left
    // hanging past the deadline) all close the connection before HTTP or TLS see a byte.
    let garbage: [&[u8]; 4] = [
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\nGET /echo HTTP/1.1\r\n\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xffGET /echo HTTP/1.1\r\n\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x7f\x00",
    ];
    for (i, bytes) in garbage.iter().enumerate() {
        let mut tcp = connect_from(balancer, http).await;
        tcp.write_all(bytes).await.expect("write");
        if i == 3 {
            // Half a header, then the balancer goes quiet: the one-second deadline ends it.
            assert_eq!(read_until_closed(&mut tcp).await, b"");
            continue;
        }
        tcp.shutdown().await.expect("half-close");
        assert_eq!(read_until_closed(&mut tcp).await, b"", "input {i}");
    }
    let mut truncated = connect_from(balancer, proxy.https).await;
    truncated
        .write_all(b"PROXY TCP4 192.0.2.7")
        .await
        .expect("write");
    truncated.shutdown().await.expect("half-close");
    assert_eq!(read_until_closed(&mut truncated).await, b"");

    // The stranger's plain request above and the refused ones never reached the upstream.
    assert_eq!(upstream.count(), served + 1);
    let metrics = scrape_metrics(proxy.server().metrics_addr.expect("metrics")).await;
    assert_eq!(refusals(&metrics, "untrusted"), 2, "{metrics}");
    assert_eq!(refusals(&metrics, "missing"), 1, "{metrics}");
    assert_eq!(refusals(&metrics, "malformed"), 3, "{metrics}");
    assert_eq!(refusals(&metrics, "timeout"), 1, "{metrics}");
    proxy.stop().await;
}

/// A real HAProxy in TCP mode, started on fixed loopback ports and stopped by its PID.
struct Haproxy {
    _process: KillOnDrop,
    tls: SocketAddr,
    plain: SocketAddr,
}

impl Haproxy {
    /// Forwards `tls` to `https` with `send-proxy-v2` (a CRC32C TLV included), `plain` to `http`
    /// with `send-proxy` (v1).
    async fn start(
        dir: &std::path::Path,
        (tls, plain): (SocketAddr, SocketAddr),
        https: SocketAddr,
        http: SocketAddr,
    ) -> Haproxy {
        let config = format!(
            "global\n    maxconn 256\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
             frontend tls_in\n    bind {tls}\n    default_backend tls_out\n\
             backend tls_out\n    server portcullis {https} send-proxy-v2 proxy-v2-options crc32c\n\
             frontend plain_in\n    bind {plain}\n    default_backend plain_out\n\
             backend plain_out\n    server portcullis {http} send-proxy\n"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let child = std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect(
                "haproxy (Debian package haproxy) must be installed: scripts/test.sh installs it",
            );
        let process = KillOnDrop(child);
        for addr in [tls, plain] {
            wait_for(
                "HAProxy to listen",
                LIMIT,
                || async move { TcpStream::connect(addr).await.ok().map(|_| ()) },
                String::new,
            )
            .await;
        }
        Haproxy {
            _process: process,
            tls,
            plain,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs haproxy (scripts/test.sh installs it)"]
async fn behind_haproxy_the_upstream_the_log_and_the_login_budget_see_the_real_client() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let https = SocketAddr::from(([127, 0, 0, 1], fixed_port()));
    let http = SocketAddr::from(([127, 0, 0, 1], fixed_port()));
    let balancer = (
        SocketAddr::from(([127, 0, 0, 1], fixed_port())),
        SocketAddr::from(([127, 0, 0, 1], fixed_port())),
    );
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhttps = \"{https}\"\nhttp = \"{http}\"\ndomains = [\"localhost\"]\n\
             proxy_protocol = [\"127.0.0.1/32\"]\nshutdown_grace = \"5s\"\n\
             public_https_port = {}\n\
             [tls]\nsource = \"local\"\ndir = \"{}\"\n[upstream]\nurl = \"http://{}\"\n\
             [log]\nformat = \"json\"\n\
             [[rate_limit]]\npath = \"/admin/login/\"\nrequests = 2\nper = \"1m\"\n",
            balancer.0.port(),
            dir.path().join("state").display(),
            upstream.addr
        ),
    )
    .expect("write config");
    let proxy = Running::start(&config);
    proxy.wait_for_log("portcullis is serving").await;
    let haproxy = Haproxy::start(dir.path(), balancer, https, http).await;
    let root = dir.path().join("state/local/root.crt");
    let client = |from: [u8; 4]| {
        let root = root.clone();
        async move {
            Client::connect_from(Some(from.into()), haproxy.tls, "localhost", &root, H2)
                .await
                .expect("TLS through HAProxy")
        }
    };

    // v2: the upstream sees the client, not HAProxy.
    let mut first = client([127, 0, 0, 2]).await;
    let (response, body) = first.get("/echo", haproxy.tls.port()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let seen = echoed_headers(&body);
    assert_eq!(echoed(&seen, "x-forwarded-for"), ["127.0.0.2"]);
    assert_eq!(echoed(&seen, "x-real-ip"), ["127.0.0.2"]);

    // The login budget is the client's: 127.0.0.2 spends its two, 127.0.0.3 still has its own.
    let post = || {
        request("POST", "/admin/login/", haproxy.tls.port())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(full("username=admin&password=guess"))
            .expect("request")
    };
    for _ in 0..2 {
        assert_eq!(first.fetch(post()).await.0.status(), StatusCode::OK);
    }
    assert_eq!(
        first.fetch(post()).await.0.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let mut second = client([127, 0, 0, 3]).await;
    assert_eq!(second.fetch(post()).await.0.status(), StatusCode::OK);

    // v1 on the plain listener: the redirect's access line names the client.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 4], 0)))
        .expect("bind");
    let mut tcp = socket.connect(haproxy.plain).await.expect("connect");
    tcp.write_all(b"GET /via-v1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let answer = String::from_utf8_lossy(&read_until_closed(&mut tcp).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");

    let line = proxy.wait_for_log("/via-v1").await;
    let access: serde_json::Value = serde_json::from_str(&line).expect("JSON access line");
    assert_eq!(access["client"], "127.0.0.4", "{line}");
    let line = proxy.wait_for_log("\"path\":\"/echo\"").await;
    let access: serde_json::Value = serde_json::from_str(&line).expect("JSON access line");
    assert_eq!(access["client"], "127.0.0.2", "{line}");
    // Nothing was refused on the way.
    assert!(
        !proxy
            .log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains("PROXY protocol")),
        "{:#?}",
        proxy.log.lock().expect("log")
    );
}
