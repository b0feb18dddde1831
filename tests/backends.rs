//! Several backends behind one proxy: balancing, passive and active health, retries that never repeat a
//! side effect, the all-down answer, slow uploads blamed on the client, and backends changed by reload.
//! In-process upstreams on loopback whose behaviour each test sets; every wait bounded.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A backend standing in for one Gunicorn: counts what it answered and completed, answers every path
/// after `delay`, fails `/healthz/` while `healthy` is false, and can close idle keep-alive connections
/// after `keep_alive` as Gunicorn's gthread workers do.
struct Backend {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    /// POST bodies read whole: each is a side effect that happened.
    posts: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    /// Connections accepted, and those still open.
    connections: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    async fn start(keep_alive: Option<Duration>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let posts = Arc::new(AtomicUsize::new(0));
        let healthy = Arc::new(AtomicBool::new(true));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (r, p, h, d) = (
            requests.clone(),
            posts.clone(),
            healthy.clone(),
            delay_ms.clone(),
        );
        let (accepted, still_open) = (connections.clone(), open.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                while connections.try_join_next().is_some() {}
                accepted.fetch_add(1, Ordering::SeqCst);
                still_open.fetch_add(1, Ordering::SeqCst);
                let (r, p, h, d) = (r.clone(), p.clone(), h.clone(), d.clone());
                let still_open = still_open.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (r, p, h, d) = (r.clone(), p.clone(), h.clone(), d.clone());
                        async move { Ok::<_, Infallible>(answer(req, &r, &p, &h, &d).await) }
                    });
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder.timer(TokioTimer::new());
                    // hyper's header timer also closes idle keep-alive connections, like --keep-alive.
                    if let Some(idle) = keep_alive {
                        builder.header_read_timeout(idle);
                    }
                    let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                    still_open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Backend {
            addr,
            requests,
            posts,
            healthy,
            delay_ms,
            connections,
            open,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn answer(
    req: Request<Incoming>,
    requests: &AtomicUsize,
    posts: &AtomicUsize,
    healthy: &AtomicBool,
    delay_ms: &AtomicU64,
) -> Response<TestBody> {
    if req.uri().path() == "/healthz/" {
        let status = if healthy.load(Ordering::SeqCst) {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let host = req.headers().get("host").cloned();
        return Response::builder()
            .status(status)
            .header(
                "x-seen-host",
                host.unwrap_or_else(|| "-".parse().expect("value")),
            )
            .body(full("health"))
            .expect("response");
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let is_post = req.method() == http::Method::POST;
    let delay = delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let Ok(body) = req.into_body().collect().await else {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(full("body cut off"))
            .expect("response");
    };
    if is_post {
        posts.fetch_add(1, Ordering::SeqCst);
    }
    Response::new(full(format!("{} bytes", body.to_bytes().len())))
}

fn upstream_section(urls: &[String], extra: &str) -> String {
    let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!("urls = [{}]\n{extra}", list.join(", "))
}

/// The proxy with `[upstream]` given whole (the harness's own `url` line is replaced).
async fn proxy_for(upstream: &str, extra: &str) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[server]\nhttps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\ndomains = [\"localhost\", \"127.0.0.1\"]\n\
         shutdown_grace = \"5s\"\n[tls]\nsource = \"local\"\ndir = \"{}\"\n[upstream]\n{upstream}\n\
         connect_timeout = \"1s\"\n{extra}",
        dir.path().display()
    );
    let config = portcullis::config::Config::parse(&text, "test", None).expect("test config");
    Proxy::start_with(config, dir).await
}

/// A proxy in front of one backend, with `upstream_extra` in its `[upstream]`.
async fn proxy_to(backend: &Backend, upstream_extra: &str) -> Proxy {
    proxy_for(&upstream_section(&[backend.url()], upstream_extra), "").await
}

/// A small form POST, as Django's views take them.
fn form_post(port: u16) -> Request<TestBody> {
    request("POST", "/form/", port)
        .body(full("a=1"))
        .expect("request")
}

#[tokio::test]
async fn round_robin_spreads_requests_by_weight() {
    let (a, b) = (Backend::start(None).await, Backend::start(None).await);
    let proxy = proxy_for(
        &upstream_section(
            &[a.url(), b.url()],
            "policy = \"round_robin\"\nweights = [3, 1]",
        ),
        "",
    )
    .await;
    let mut client = proxy.client(H2).await;
    for _ in 0..40 {
        let (response, _) = client.get("/", proxy.https.port()).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!((a.count(), b.count()), (30, 10));
    proxy.stop().await;
}

/// `least_requests` (the default) sends most requests to the backend that answers quickly: Gunicorn's
/// workers are few, so a busy backend should not get an equal share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_requests_avoids_the_slow_backend() {
    let (fast, slow) = (Backend::start(None).await, Backend::start(None).await);
    slow.delay_ms.store(300, Ordering::SeqCst);
    let proxy = proxy_for(&upstream_section(&[fast.url(), slow.url()], ""), "").await;
    let port = proxy.https.port();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client = proxy.client(H2).await;
        clients.push(tokio::spawn(async move {
            for _ in 0..15 {
                let (response, _) = client.get("/", port).await;
                assert_eq!(response.status(), StatusCode::OK);
            }
        }));
    }
    for client in clients {
        tokio::time::timeout(LIMIT, client)
            .await
            .expect("in time")
            .expect("no failed request");
    }
    let (f, s) = (fast.count(), slow.count());
    assert_eq!(f + s, 60);
    assert!(
        f >= 3 * s,
        "fast {f}, slow {s}: the slow backend got too many"
    );
    proxy.stop().await;
}

/// A backend that cannot be reached costs no request: connecting failed, so even a POST is sent to the
/// other one; after `max_fails` it is left out, and the metrics say so.
#[tokio::test]
async fn an_unreachable_backend_loses_no_request_and_is_taken_out() {
    let live = Backend::start(None).await;
    let dead = dead_address().await;
    let proxy = proxy_for(
        &upstream_section(
            &[format!("http://{dead}"), live.url()],
            "policy = \"round_robin\"\nmax_fails = 2\nfail_timeout = \"30s\"",
        ),
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let port = proxy.https.port();
    let mut client = proxy.client(H1).await;
    for i in 0..10 {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let req = request(method, "/form/", port)
            .body(full("a=1"))
            .expect("request");
        let (response, body) = client.fetch(req).await;
        assert_eq!(response.status(), StatusCode::OK, "{method} {i}: {body}");
    }
    assert_eq!(live.count(), 10);
    assert_eq!(live.posts.load(Ordering::SeqCst), 5, "each POST ran once");
    let metrics = scrape_metrics(proxy.server().metrics_addr.expect("metrics")).await;
    assert!(
        metrics.contains(&format!(
            "portcullis_backend_up{{backend=\"http://{dead}\"}} 0"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "portcullis_backend_up{{backend=\"{}\"}} 1",
            live.url()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "portcullis_backend_requests_total{{backend=\"{}\"}} 10",
            live.url()
        )),
        "{metrics}"
    );
    proxy.stop().await;
}

/// Every backend out: an immediate 503 with `Retry-After`, not a wait for the response timeout.
#[tokio::test]
async fn all_backends_down_is_an_immediate_503_with_retry_after() {
    let (a, b) = (dead_address().await, dead_address().await);
    let proxy = proxy_for(
        &upstream_section(
            &[format!("http://{a}"), format!("http://{b}")],
            "max_fails = 1\nfail_timeout = \"20s\"\nresponse_timeout = \"30s\"",
        ),
        "",
    )
    .await;
    let port = proxy.https.port();
    let mut client = proxy.client(H2).await;
    // The first request finds both unreachable, which takes both out (502, or already 503 when its
    // last retry finds none left); from then on both are out.
    let (first, _) = client.get("/", port).await;
    assert!(
        [StatusCode::BAD_GATEWAY, StatusCode::SERVICE_UNAVAILABLE].contains(&first.status()),
        "{}",
        first.status()
    );
    let asked = Instant::now();
    let (response, body) = client.get("/", port).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=20).contains(&retry), "{retry}");
    assert!(response.headers().contains_key("strict-transport-security"));
    // Answered without waiting for anything (the response timeout is 30 s).
    assert!(asked.elapsed() < Duration::from_secs(10));
    proxy.stop().await;
}

/// Active health checks take a failing backend out and bring it back once it passes again; the check
/// carries the first domain as `Host`, so Django's ALLOWED_HOSTS lets it through.
#[tokio::test]
async fn health_checks_take_a_backend_out_and_bring_it_back() {
    let (a, b) = (Backend::start(None).await, Backend::start(None).await);
    let proxy = proxy_for(
        &upstream_section(
            &[a.url(), b.url()],
            "policy = \"round_robin\"\nhealth_path = \"/healthz/\"\nhealth_interval = \"100ms\"\n\
             healthy_threshold = 2\nunhealthy_threshold = 2",
        ),
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let port = proxy.https.port();
    let metrics_addr = proxy.server().metrics_addr.expect("metrics");
    let up_line = |up: u8| format!("portcullis_backend_up{{backend=\"{}\"}} {up}", a.url());
    a.healthy.store(false, Ordering::SeqCst);
    eventually("the failing backend is out", || async {
        scrape_metrics(metrics_addr).await.contains(&up_line(0))
    })
    .await;
    let mut client = proxy.client(H2).await;
    let before = a.count();
    for _ in 0..10 {
        assert_eq!(client.get("/", port).await.0.status(), StatusCode::OK);
    }
    assert_eq!(
        a.count(),
        before,
        "no request went to the backend that failed its checks"
    );
    a.healthy.store(true, Ordering::SeqCst);
    eventually("the backend is back after passing its checks", || async {
        scrape_metrics(metrics_addr).await.contains(&up_line(1))
    })
    .await;
    for _ in 0..10 {
        assert_eq!(client.get("/", port).await.0.status(), StatusCode::OK);
    }
    assert!(a.count() > before, "traffic resumed");
    proxy.stop().await;
}

/// Gunicorn's gthread workers close idle keep-alive connections after `--keep-alive` (2 s). A request
/// written onto a pooled connection just as the backend closes it must not become a 502: an
/// idempotent request whose body was read whole is sent again on a new connection.
#[tokio::test]
async fn requests_racing_a_keep_alive_close_get_no_5xx() {
    let backend = Backend::start(Some(Duration::from_millis(40))).await;
    let proxy = proxy_to(&backend, "").await;
    let port = proxy.https.port();
    let mut client = proxy.client(H2).await;
    let mut errors = Vec::new();
    for i in 0..300u64 {
        // Around the backend's idle close: 35 to 45 ms after the previous response.
        tokio::time::sleep(Duration::from_millis(35 + i % 11)).await;
        let (response, body) = client.get("/", port).await;
        if response.status().is_server_error() {
            errors.push(format!("{i}: {} {body}", response.status()));
        }
    }
    assert!(
        errors.is_empty(),
        "{} of 300 failed: {errors:?}",
        errors.len()
    );
    assert_eq!(backend.count(), 300, "each request ran once");
    proxy.stop().await;
}

/// A burst of more concurrent requests than `pool_max_idle` keeps its connections: the next burst
/// finds them idle instead of opening new ones (a fixed limit below the concurrency would close all
/// but two after each burst and reopen them on the next). Sequential requests then use one.
#[tokio::test]
async fn a_burst_above_pool_max_idle_reuses_its_connections() {
    const BURST: usize = 12;
    let backend = Backend::start(None).await;
    // Long enough that the whole burst is in flight at once.
    backend.delay_ms.store(300, Ordering::SeqCst);
    let proxy = proxy_to(&backend, "pool_max_idle = 2\n").await;
    let port = proxy.https.port();
    let mut clients = Vec::new();
    for _ in 0..BURST {
        clients.push(proxy.client(H1).await);
    }
    for round in 0..3 {
        let answers =
            futures_util::future::join_all(clients.iter_mut().map(|client| client.get("/", port)))
                .await;
        for (response, body) in answers {
            assert_eq!(response.status(), StatusCode::OK, "round {round}: {body}");
        }
        assert_eq!(
            backend.connections.load(Ordering::SeqCst),
            BURST,
            "round {round}: connections opened in all"
        );
    }
    backend.delay_ms.store(0, Ordering::SeqCst);
    for _ in 0..20 {
        let (response, _) = clients[0].get("/", port).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), BURST);
    assert_eq!(backend.count(), 3 * BURST + 20);
    proxy.stop().await;
}

/// A POST goes on a kept-alive connection only while it has been idle for less than
/// `pool_reuse_for_posts`: a form-heavy site does not open a connection to Gunicorn per POST, and a
/// connection idle long enough for the backend to be closing it never carries one.
#[tokio::test]
async fn posts_reuse_only_connections_idle_for_less_than_the_window() {
    let backend = Backend::start(None).await;
    let proxy = proxy_to(&backend, "pool_reuse_for_posts = \"2s\"\n").await;
    let port = proxy.https.port();
    let mut client = proxy.client(H1).await;
    let post = async |client: &mut Client| {
        let (response, body) = client.fetch(form_post(port)).await;
        assert_eq!(response.status(), StatusCode::OK, "{body}");
    };
    for _ in 0..10 {
        post(&mut client).await;
    }
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        1,
        "ten POSTs, one connection"
    );
    // Past the window: the next POST leaves that connection alone and opens its own.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    post(&mut client).await;
    assert_eq!(backend.connections.load(Ordering::SeqCst), 2);
    assert_eq!(
        backend.posts.load(Ordering::SeqCst),
        11,
        "each POST ran once"
    );
    proxy.stop().await;
}

/// POSTs around a backend's keep-alive close (300 ms here, Gunicorn's is 2 s) with a reuse window well
/// under it: none meets a connection as the backend closes it, so none fails and none runs twice.
/// (With a window longer than the backend's keep-alive, 2 of these 60 got a 502 in one of two runs.)
#[tokio::test]
async fn posts_racing_a_keep_alive_close_are_never_lost() {
    let backend = Backend::start(Some(Duration::from_millis(300))).await;
    // HTTP/1.1 from the client: the test client sets no TCP_NODELAY, so over HTTP/2 its DATA frame
    // waits for the ACK of its HEADERS (40 ms), and the window would rarely be met.
    let proxy = proxy_to(&backend, "pool_reuse_for_posts = \"50ms\"\n").await;
    let port = proxy.https.port();
    let mut client = proxy.client(H1).await;
    let mut errors = Vec::new();
    for i in 0..60u64 {
        // Alternately well inside the window, and around the moment the backend closes.
        let gap = if i % 2 == 0 { 5 + i % 40 } else { 295 + i % 11 };
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let (response, body) = client.fetch(form_post(port)).await;
        if response.status() != StatusCode::OK {
            errors.push(format!("{i}: {} {body}", response.status()));
        }
    }
    assert!(
        errors.is_empty(),
        "{} of 60 failed: {errors:?}",
        errors.len()
    );
    assert_eq!(
        backend.posts.load(Ordering::SeqCst),
        60,
        "each POST ran once"
    );
    let opened = backend.connections.load(Ordering::SeqCst);
    assert!(
        opened < 60,
        "POSTs inside the window reused a connection: {opened} opened"
    );
    proxy.stop().await;
}

/// Idle upstream connections are closed after `pool_idle_timeout` even when no request comes to find
/// them: a backend without a keep-alive timer of its own is not left holding them.
#[tokio::test]
async fn idle_upstream_connections_close_after_the_idle_timeout() {
    let backend = Backend::start(None).await;
    let proxy = proxy_to(&backend, "pool_idle_timeout = \"1s\"\n").await;
    let port = proxy.https.port();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(proxy.client(H1).await);
    }
    backend.delay_ms.store(100, Ordering::SeqCst);
    let answers =
        futures_util::future::join_all(clients.iter_mut().map(|client| client.get("/", port)))
            .await;
    assert!(answers.iter().all(|(r, _)| r.status() == StatusCode::OK));
    assert_eq!(
        backend.open.load(Ordering::SeqCst),
        4,
        "kept alive after the burst"
    );
    eventually("the idle connections closed", || {
        let open = backend.open.load(Ordering::SeqCst);
        async move { open == 0 }
    })
    .await;
    // And a request afterwards gets a new one.
    let (response, _) = clients[0].get("/", port).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(backend.connections.load(Ordering::SeqCst), 5);
    proxy.stop().await;
}

/// A streamed upload slower than `limits.body_timeout` is the client's 408, not a 504 blamed on
/// Gunicorn: the response timeout starts only once the whole body has gone upstream.
#[tokio::test]
async fn a_slow_streamed_upload_is_the_clients_408() {
    let backend = Backend::start(None).await;
    let proxy = proxy_for(
        &upstream_section(&[backend.url()], "response_timeout = \"10s\""),
        "[limits]\nbody_timeout = \"1s\"\nbuffer_body = \"1KiB\"\n",
    )
    .await;
    let mut tls = tls_connect(proxy.https, "localhost", &proxy.root, H1)
        .await
        .expect("connect");
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: localhost:{}\r\nContent-Length: 100000\r\n\r\n",
        proxy.https.port()
    );
    tls.write_all(head.as_bytes()).await.expect("write");
    tls.write_all(&[b'x'; 4096]).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(8),
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut out),
    )
    .await;
    let raw = String::from_utf8_lossy(&out);
    assert!(raw.starts_with("HTTP/1.1 408"), "{raw}");
    assert_eq!(backend.posts.load(Ordering::SeqCst), 0);
    // A slow backend is still the upstream's 504, counted from the end of the body.
    backend.delay_ms.store(3000, Ordering::SeqCst);
    let proxy = proxy_for(
        &upstream_section(&[backend.url()], "response_timeout = \"1s\""),
        "",
    )
    .await;
    let mut client = proxy.client(H2).await;
    let (response, _) = client.get("/", proxy.https.port()).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    proxy.stop().await;
}

/// Backends added and removed by reload: new requests go to the new set, and a request in flight on a
/// removed backend finishes there.
#[tokio::test]
async fn reload_changes_the_backends_without_dropping_requests_in_flight() {
    let (old, new) = (Backend::start(None).await, Backend::start(None).await);
    old.delay_ms.store(800, Ordering::SeqCst);
    let proxy = proxy_for(&upstream_section(&[old.url()], ""), "").await;
    let port = proxy.https.port();
    let mut slow_client = proxy.client(H2).await;
    let in_flight = tokio::spawn(async move { slow_client.get("/", port).await });
    eventually("the request reached the old backend", || async {
        old.count() == 1
    })
    .await;
    let mut config = (*proxy.server().config()).clone();
    let reloaded = portcullis::config::Config::parse(
        &format!(
            "[server]\ndomains = [\"localhost\"]\n[upstream]\n{}\n",
            upstream_section(&[new.url()], "")
        ),
        "reload",
        None,
    )
    .expect("config");
    config.upstream = reloaded.upstream;
    proxy.server().reload(config).expect("reload");
    let mut client = proxy.client(H2).await;
    for _ in 0..5 {
        assert_eq!(client.get("/", port).await.0.status(), StatusCode::OK);
    }
    assert_eq!(new.count(), 5);
    let (response, _) = tokio::time::timeout(LIMIT, in_flight)
        .await
        .expect("in time")
        .expect("task");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the removed backend finished"
    );
    assert_eq!(old.count(), 1);
    proxy.stop().await;
}

/// `[errors]`: the team's page instead of ours for a 502, and the maintenance switch: while the file
/// exists every request gets 503 with its contents and the security headers, nothing reaches Gunicorn,
/// and the allowed network still gets through; removing it ends maintenance.
#[tokio::test]
async fn error_pages_and_the_maintenance_switch() {
    let backend = Backend::start(None).await;
    let pages = tempfile::tempdir().expect("tempdir");
    let page = pages.path().join("502.html");
    std::fs::write(&page, "<h1>We will be right back</h1>").expect("write");
    let switch = pages.path().join("maintenance.html");
    let dead = dead_address().await;
    let proxy = proxy_for(
        &upstream_section(&[backend.url()], ""),
        &format!(
            "[errors]\nbad_gateway = \"{}\"\nmaintenance_file = \"{}\"\n\
             maintenance_allow = [\"127.0.0.2\"]\nmaintenance_retry_after = \"2m\"\n",
            page.display(),
            switch.display()
        ),
    )
    .await;
    let port = proxy.https.port();
    let mut client = proxy.client(H2).await;
    assert_eq!(client.get("/", port).await.0.status(), StatusCode::OK);

    std::fs::write(&switch, "<h1>Upgrading, back at noon</h1>").expect("switch on");
    let served = backend.count();
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        for _ in 0..2 {
            let (response, body) = client.get("/admin/", port).await;
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(body, "<h1>Upgrading, back at noon</h1>");
            assert_eq!(response.headers()["retry-after"], "120");
            assert!(response.headers().contains_key("content-security-policy"));
        }
    }
    assert_eq!(backend.count(), served, "nothing reached Gunicorn");
    let mut team = proxy.client_from_another_address(H2).await;
    assert_eq!(team.get("/", port).await.0.status(), StatusCode::OK);
    std::fs::remove_file(&switch).expect("switch off");
    assert_eq!(client.get("/", port).await.0.status(), StatusCode::OK);
    proxy.stop().await;

    // The team's 502 page, with our headers, when the backend cannot be reached.
    let proxy = proxy_for(
        &format!("url = \"http://{dead}\""),
        &format!("[errors]\nbad_gateway = \"{}\"\n", page.display()),
    )
    .await;
    let mut client = proxy.client(H1).await;
    let (response, body) = client.get("/", proxy.https.port()).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(body, "<h1>We will be right back</h1>");
    assert!(response.headers().contains_key("strict-transport-security"));
    proxy.stop().await;
}
