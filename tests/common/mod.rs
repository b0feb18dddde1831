//! Test harness: the real proxy started in-process on 127.0.0.1:0, a real hyper upstream, and real
//! rustls/hyper clients. Everything stays on loopback; every wait is bounded.
#![allow(dead_code)]

pub mod pebble;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::config::Config;
use portcullis::server::{RunningServer, start};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub mod raw_h2;

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Upper bound for any single wait in the tests.
pub const LIMIT: Duration = Duration::from_secs(20);

/// Polls `check` until it yields a value, at most `within`; then panics with `what` and what
/// `explain` says about the state (a log, a status). Every "wait until" in the tests goes through
/// here, so none sleeps in the hope that something happened.
pub async fn wait_for<T, Fut>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Fut,
    explain: impl Fn() -> String,
) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + within;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}. {}",
            explain()
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// `wait_for` a condition, within `LIMIT`.
pub async fn eventually<Fut>(what: &str, mut condition: impl FnMut() -> Fut)
where
    Fut: std::future::Future<Output = bool>,
{
    wait_for(
        what,
        LIMIT,
        || {
            let holds = condition();
            async move { holds.await.then_some(()) }
        },
        String::new,
    )
    .await
}

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

/// An in-process upstream standing in for Gunicorn. It echoes what it received so tests can assert what
/// crossed the proxy, and counts requests so tests can prove none was lost or sent twice.
pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    /// Responses on `/large-sized` whose body the upstream finished writing.
    pub bodies_sent: Arc<AtomicUsize>,
    /// `/upload` bodies the upstream received whole (as their framing said), whatever it answered.
    pub uploads_completed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        Upstream::serve(listener)
    }

    pub fn serve(listener: TcpListener) -> Upstream {
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let bodies_sent = Arc::new(AtomicUsize::new(0));
        let uploads_completed = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let sent = bodies_sent.clone();
        let completed = uploads_completed.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the accept task kills them too, like a dead process.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (counter, sent, completed) = (counter.clone(), sent.clone(), completed.clone());
                while connections.try_join_next().is_some() {}
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        upstream_handler(req, sent.clone(), completed.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream {
            addr,
            requests,
            bodies_sent,
            uploads_completed,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn upstream_handler(
    mut req: Request<Incoming>,
    bodies_sent: Arc<AtomicUsize>,
    uploads_completed: Arc<AtomicUsize>,
) -> Result<Response<TestBody>, Infallible> {
    let path = req.uri().path().to_string();
    let response = match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Response::new(full("slow"))
        }
        "/hold" => {
            tokio::time::sleep(Duration::from_millis(800)).await;
            Response::new(full("held"))
        }
        "/cookies" => Response::builder()
            .header("set-cookie", "sessionid=abc; Path=/")
            .header(
                "set-cookie",
                "csrftoken=xyz; expires=Wed, 21 Oct 2026 07:28:00 GMT; Path=/",
            )
            .header("set-cookie", "prefs=1; Secure; HttpOnly; SameSite=Strict")
            .body(full("cookies"))
            .expect("response"),
        "/django-headers" => Response::builder()
            .header("server", "gunicorn")
            .header("x-powered-by", "Django")
            .header("x-frame-options", "SAMEORIGIN")
            .header("connection", "x-internal")
            .header("x-internal", "secret")
            .header("keep-alive", "timeout=5")
            .body(full("django"))
            .expect("response"),
        "/large" => {
            // 32 MiB in 64 KiB chunks: streamed, never held whole by the proxy.
            let chunks = (0..512).map(|_| {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(
                    vec![b'x'; 65536],
                )))
            });
            Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                chunks,
            ))))
        }
        "/large-sized" => {
            // 32 MiB with a Content-Length; counts in `bodies_sent` once the last byte is handed over.
            // (hyper stops polling at the declared length, so the last chunk itself does the counting).
            let chunks = (0..512).map(move |i| {
                if i == 511 {
                    bodies_sent.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(
                    vec![b'x'; 65536],
                )))
            });
            let stream = futures_util::stream::iter(chunks);
            Response::builder()
                .header("content-length", (512 * 65536).to_string())
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .expect("response")
        }
        "/upload" => {
            let mut total = 0usize;
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => total += f.data_ref().map_or(0, |d| d.len()),
                    Err(_) => {
                        return Ok(Response::builder()
                            .status(StatusCode::BAD_REQUEST)
                            .body(full("upload aborted"))
                            .expect("response"));
                    }
                }
            }
            uploads_completed.fetch_add(1, Ordering::SeqCst);
            Response::new(full(total.to_string()))
        }
        "/accel" => {
            // nginx's X-Accel-Redirect, as django-sendfile2 answers: the file to send in `?to=`, the
            // instructions and the file's description in headers, and a body the proxy must drop.
            let to = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("to="))
                .unwrap_or("/private/missing")
                .to_string();
            Response::builder()
                .header("x-accel-redirect", to)
                .header("x-accel-buffering", "no")
                .header("content-type", "application/pdf")
                .header("content-disposition", "attachment; filename=\"report.pdf\"")
                .header("set-cookie", "sessionid=refreshed; Path=/")
                .header("x-app-only", "not for a file")
                .body(full("placeholder the proxy must drop"))
                .expect("response")
        }
        "/medium" => {
            // 200 KiB with a Content-Length: under limits.buffer_response, so read whole by the proxy.
            Response::builder()
                .header("content-length", (200 * 1024).to_string())
                .body(full(vec![b'm'; 200 * 1024]))
                .expect("response")
        }
        // A Django REST framework-like JSON list, and an HTML page with a CSRF token in it.
        "/api/items/" => Response::builder()
            .header("content-type", "application/json")
            .body(full(api_items()))
            .expect("response"),
        "/page/" => Response::builder()
            .header("content-type", "text/html; charset=utf-8")
            .body(full(format!(
                "<!doctype html><html><body><form><input type=\"hidden\" name=\"csrfmiddlewaretoken\" value=\"s3cr3t\">{}</form></body></html>",
                "<p>Hello, reflected world.</p>".repeat(100)
            )))
            .expect("response"),
        // A login form as Django's: a wrong password gets the form again (200), the right one a redirect.
        // `/login/slow/` takes half a second to decide, as a password hash does.
        p if p.starts_with("/login/") => {
            if p == "/login/slow/" {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            if body.as_ref() == b"password=right" {
                Response::builder()
                    .status(StatusCode::FOUND)
                    .header("location", "/")
                    .body(full(""))
                    .expect("response")
            } else {
                Response::new(full("<form>wrong password</form>"))
            }
        }
        "/ws" => {
            let key_present = req.headers().contains_key("sec-websocket-key");
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            Response::builder()
                .status(if key_present {
                    StatusCode::SWITCHING_PROTOCOLS
                } else {
                    StatusCode::BAD_REQUEST
                })
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(full(""))
                .expect("response")
        }
        _ => {
            // Echo: method, target, version and every header, one per line.
            let mut text = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
            for (name, value) in req.headers() {
                text.push_str(&format!(
                    "{}: {}\n",
                    name,
                    String::from_utf8_lossy(value.as_bytes())
                ));
            }
            Response::new(full(text))
        }
    };
    Ok(response)
}

/// The `/api/items/` body: 100 objects, about 9 KiB of JSON.
pub fn api_items() -> String {
    let items: Vec<String> = (0..100)
        .map(|i| {
            format!("{{\"id\":{i},\"name\":\"item {i}\",\"price\":\"{i}.00\",\"in_stock\":true}}")
        })
        .collect();
    format!("{{\"count\":100,\"results\":[{}]}}", items.join(","))
}

/// `curl -sS --max-time 20` with these arguments: its standard output, which must be a success.
pub fn curl_output(args: &[&str]) -> String {
    let output = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl is installed (scripts/test.sh installs it)");
    assert!(
        output.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Parses the echo body back into (name, value) pairs.
pub fn echoed_headers(body: &str) -> Vec<(String, String)> {
    body.lines()
        .skip(1)
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn echoed<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

pub struct Proxy {
    pub server: Option<RunningServer>,
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub root: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts the proxy with the local CA, serving `localhost` and `127.0.0.1`, in front of `upstream`.
    /// `extra` is appended to the config (more sections or keys).
    pub async fn start(upstream: &str, extra: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "[server]\nhttps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\ndomains = [\"localhost\", \"127.0.0.1\"]\n\
             shutdown_grace = \"5s\"\n[tls]\nsource = \"local\"\ndir = \"{}\"\n[upstream]\nurl = \"{upstream}\"\n\
             response_timeout = \"2s\"\nconnect_timeout = \"1s\"\n{extra}",
            dir.path().display()
        );
        let config = Config::parse(&text, "test", None).expect("test config");
        Proxy::start_with(config, dir).await
    }

    /// A fresh in-process upstream and the proxy in front of it.
    pub async fn with_upstream(extra: &str) -> (Upstream, Proxy) {
        let upstream = Upstream::start().await;
        let proxy = Proxy::start(&format!("http://{}", upstream.addr), extra).await;
        (upstream, proxy)
    }

    pub async fn start_with(config: Config, dir: tempfile::TempDir) -> Proxy {
        init_test_logging();
        let server = start(config).await.expect("proxy starts");
        Proxy {
            https: server.https_addr,
            http: server.http_addr,
            root: server.local_ca_root.clone().expect("local CA root"),
            server: Some(server),
            dir,
        }
    }

    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{}", self.https.port(), path)
    }

    pub async fn client(&self, alpn: &[&[u8]]) -> Client {
        Client::connect(self.https, "localhost", &self.root, alpn)
            .await
            .expect("TLS connect")
    }

    /// A client from 127.0.0.2: another client address, as far as the proxy can tell.
    pub async fn client_from_another_address(&self, alpn: &[&[u8]]) -> Client {
        Client::connect_from(
            Some(std::net::IpAddr::from([127, 0, 0, 2])),
            self.https,
            "localhost",
            &self.root,
            alpn,
        )
        .await
        .expect("connect from 127.0.0.2")
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
            tokio::time::timeout(LIMIT, server.wait())
                .await
                .expect("stops in time");
        }
    }
}

pub fn client_tls_config(root: &std::path::Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(root).expect("root pem");
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("cert")).expect("add root");
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(portcullis::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    root: &std::path::Path,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    tls_connect_from(None, addr, sni, root, alpn).await
}

/// `tls_connect` from a chosen local address (another loopback address is another client).
pub async fn tls_connect_from(
    local: Option<std::net::IpAddr>,
    addr: SocketAddr,
    sni: &str,
    root: &std::path::Path,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = match local {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    let connector = TlsConnector::from(client_tls_config(root, alpn));
    let name =
        ServerName::try_from(sni.to_string()).map_err(|e| std::io::Error::other(e.to_string()))?;
    tokio::time::timeout(LIMIT, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timeout"))?
}

pub enum Sender {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

/// One TLS connection to the proxy speaking whatever ALPN chose.
pub struct Client {
    pub sender: Sender,
    pub alpn: Option<Vec<u8>>,
}

impl Client {
    pub async fn connect(
        addr: SocketAddr,
        sni: &str,
        root: &std::path::Path,
        alpn: &[&[u8]],
    ) -> std::io::Result<Client> {
        Client::connect_from(None, addr, sni, root, alpn).await
    }

    pub async fn connect_from(
        local: Option<std::net::IpAddr>,
        addr: SocketAddr,
        sni: &str,
        root: &std::path::Path,
        alpn: &[&[u8]],
    ) -> std::io::Result<Client> {
        let tls = tls_connect_from(local, addr, sni, root, alpn).await?;
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let io = TokioIo::new(tls);
        let sender = if negotiated.as_deref() == Some(b"h2") {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn.with_upgrades());
            Sender::H1(sender)
        };
        Ok(Client {
            sender,
            alpn: negotiated,
        })
    }

    pub async fn send(&mut self, mut req: Request<TestBody>) -> hyper::Result<Response<Incoming>> {
        // HTTP/1.1 clients send origin-form with Host; HTTP/2 clients send `:authority` only.
        match self.sender {
            Sender::H1(_) => {
                if let Some(pq) = req.uri().path_and_query().cloned() {
                    *req.uri_mut() = http::Uri::from(pq);
                }
            }
            Sender::H2(_) => {
                req.headers_mut().remove("host");
            }
        }
        let fut = async {
            match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await?;
                    s.send_request(req).await
                }
                Sender::H2(s) => {
                    s.ready().await?;
                    s.send_request(req).await
                }
            }
        };
        tokio::time::timeout(LIMIT, fut)
            .await
            .expect("response in time")
    }

    /// GET `path` with Host `localhost` (and the port) the way a browser would send it.
    pub async fn get(&mut self, path: &str, port: u16) -> (Response<()>, String) {
        let req = request("GET", path, port).body(full("")).expect("request");
        self.fetch(req).await
    }

    pub async fn fetch(&mut self, req: Request<TestBody>) -> (Response<()>, String) {
        let response = self.send(req).await.expect("response");
        let (parts, body) = response.into_parts();
        let bytes = tokio::time::timeout(LIMIT, body.collect())
            .await
            .expect("body in time")
            .expect("body")
            .to_bytes();
        (
            Response::from_parts(parts, ()),
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    pub fn is_h2(&self) -> bool {
        matches!(self.sender, Sender::H2(_))
    }
}

/// A request builder with the right target form for the connection: HTTP/1.1 sends `Host`; for HTTP/2
/// hyper derives `:authority` from an absolute URI.
/// A GET like `request` builds, but for a host this proxy does not serve (Host replaced, not added).
pub fn foreign_host_get(path: &str, port: u16) -> Request<TestBody> {
    let mut req = request("GET", path, port).body(full("")).expect("request");
    req.headers_mut()
        .insert("host", http::HeaderValue::from_static("evil.com"));
    req
}

pub fn request(method: &str, path: &str, port: u16) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(format!("https://localhost:{port}{path}"))
        .header("host", format!("localhost:{port}"))
}

/// Raw bytes over TLS, for requests no well-behaved client library would send.
pub async fn raw_tls_exchange(addr: SocketAddr, root: &std::path::Path, payload: &[u8]) -> String {
    let mut tls = tls_connect(addr, "localhost", root, &[b"http/1.1"])
        .await
        .expect("connect");
    tls.write_all(payload).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// One plain-HTTP/1.1 exchange (the request should say `Connection: close`): the raw response text.
pub async fn plain_exchange(addr: SocketAddr, request: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut out = String::new();
    tokio::time::timeout(LIMIT, tcp.read_to_string(&mut out))
        .await
        .expect("in time")
        .expect("read");
    out
}

/// The metrics listener's text, response head included.
/// One HTTP/1.1 response with a `Content-Length` body, head and body as text, read from a raw
/// connection (buffered, so a pipelined second response stays for the next call). Panics if the
/// connection closes first or nothing whole comes within `LIMIT`.
pub async fn read_response<S: tokio::io::AsyncBufRead + Unpin>(stream: &mut S) -> String {
    use tokio::io::AsyncBufReadExt;
    let whole = async {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let n = stream.read_line(&mut line).await.expect("read");
            assert!(n > 0, "closed before a whole response: {head:?}");
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let length: usize = head
            .lines()
            .find_map(|l| {
                let l = l.to_ascii_lowercase();
                l.strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse().ok())
            })
            .expect("content-length");
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.expect("body");
        head + &String::from_utf8_lossy(&body)
    };
    tokio::time::timeout(LIMIT, whole)
        .await
        .expect("a whole response in time")
}

pub async fn scrape_metrics(addr: SocketAddr) -> String {
    plain_exchange(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
}

/// An address with nothing listening: connecting is refused.
pub async fn dead_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], fixed_port()))
}

/// A child process killed when the test ends, however it ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port for a server that must be named before it starts (pebble dials fixed ports; gunicorn takes
/// `--bind`). Ports from `:0` come from the kernel's ephemeral range, where any outgoing connection (pebble
/// dialling a validation, a client) can take one between our check and the server's bind: CI saw exactly
/// that. So draw from below the ephemeral range, each port once per process, and check it is free.
pub fn fixed_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|&low| low > FIRST + 1_000)
        .unwrap_or(32_768);
    let span = ephemeral_low - FIRST;
    // Seeded by pid so test binaries run side by side (nextest) start far apart.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let candidate = FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = u16::try_from(candidate).expect("below 65536");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{ephemeral_low}");
}

/// GET over HTTPS/1.1 with a given trust root; for test servers' management APIs.
pub async fn https_get(
    addr: SocketAddr,
    sni: &str,
    root: &std::path::Path,
    path: &str,
) -> std::io::Result<(StatusCode, String)> {
    let mut client = Client::connect(addr, sni, root, &[b"http/1.1"]).await?;
    let req = Request::builder()
        .uri(path)
        .header("host", sni)
        .body(full(""))
        .map_err(std::io::Error::other)?;
    let response = client.send(req).await.map_err(std::io::Error::other)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Logs from the proxy under test, shown for failing tests (`PORTCULLIS_LOG` filters, default warn).
pub fn init_test_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The `portcullis` binary run as an operator runs it, its log lines collected as they are written.
pub struct Running {
    pub child: KillOnDrop,
    /// Standard error: the log.
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
    /// Standard output (the combined access log, `--print-config`).
    pub out: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Collects a child's output stream line by line as it is written.
fn collect_lines(
    stream: impl std::io::Read + Send + 'static,
) -> Arc<std::sync::Mutex<Vec<String>>> {
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stream)).map_while(Result::ok) {
            sink.lock().expect("lines").push(line);
        }
    });
    lines
}

impl Running {
    pub fn start(config: &std::path::Path) -> Running {
        Running::with_args(&["run".as_ref(), "--config".as_ref(), config.as_os_str()])
    }

    /// `portcullis` with these arguments (`run --config F`, `reverse-proxy ...`).
    pub fn with_args(args: &[&std::ffi::OsStr]) -> Running {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start portcullis");
        let log = collect_lines(child.stderr.take().expect("stderr"));
        let out = collect_lines(child.stdout.take().expect("stdout"));
        Running {
            child: KillOnDrop(child),
            log,
            out,
        }
    }

    /// The first `count` lines of standard output, once they are written.
    pub async fn wait_for_output(&self, count: usize) -> Vec<String> {
        let lines = || {
            let out = self.out.lock().expect("out");
            (out.len() >= count).then(|| out[..count].to_vec())
        };
        wait_for(
            &format!("{count} lines on standard output"),
            LIMIT,
            || std::future::ready(lines()),
            || {
                format!(
                    "{:#?}\nlog: {:#?}",
                    self.out.lock().expect("out"),
                    self.log.lock().expect("log")
                )
            },
        )
        .await
    }

    /// The HTTPS address from the "serving" log line, once it is written.
    pub async fn serving_at(&self) -> std::net::SocketAddr {
        let line = self.wait_for_log("portcullis is serving").await;
        line.split("https=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line}"))
    }

    pub async fn wait_for_log(&self, needle: &str) -> String {
        let line = || {
            let log = self.log.lock().expect("log");
            log.iter().find(|l| l.contains(needle)).cloned()
        };
        wait_for(
            &format!("a log line with {needle:?}"),
            LIMIT,
            || std::future::ready(line()),
            || format!("{:#?}", self.log.lock().expect("log")),
        )
        .await
    }

    /// Writes a new config, sends SIGHUP and returns the log line that answers it.
    pub async fn reload(&self, path: &std::path::Path, text: String, answer: &str) -> String {
        std::fs::write(path, text).expect("write config");
        self.signal("HUP");
        self.wait_for_log(answer).await
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.0.id().to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name}");
    }
}
