//! End to end with a real Django 5.2 app under Gunicorn (tests/django_app), behind the real proxy.
//! Needs the virtualenv that `scripts/test.sh` makes (PORTCULLIS_TEST_VENV); run with `--include-ignored`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use http::StatusCode;

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2", b"http/1.1"];

fn venv() -> PathBuf {
    let venv = std::env::var_os("PORTCULLIS_TEST_VENV").map(PathBuf::from).unwrap_or_else(|| {
        panic!("PORTCULLIS_TEST_VENV is not set: run scripts/test.sh, which makes a virtualenv with Django and Gunicorn")
    });
    assert!(
        venv.join("bin/gunicorn").exists(),
        "{}/bin/gunicorn is missing: run scripts/test.sh",
        venv.display()
    );
    // manage.py and gunicorn run from the app's directory, so a relative path must be made absolute.
    std::path::absolute(&venv).expect("absolute venv path")
}

fn app_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/django_app")
}

struct Django {
    _gunicorn: KillOnDrop,
    /// The migrated database, shared by every Gunicorn started on this app.
    db: PathBuf,
    pub upstream_url: String,
    /// STATIC_ROOT, filled by collectstatic.
    pub static_root: PathBuf,
    /// Gunicorn's access log: what reached the app.
    access_log: PathBuf,
    _dir: tempfile::TempDir,
}

enum Bind {
    Tcp,
    Unix,
}

impl Django {
    /// The `[[static]]` section serving this app's STATIC_ROOT at its STATIC_URL.
    fn static_mount(&self) -> String {
        format!(
            "[[static]]\nurl = \"/static/\"\ndir = \"{}\"\n",
            self.static_root.display()
        )
    }

    /// Migrates a fresh database, creates the `admin` superuser, collects static files and starts
    /// Gunicorn.
    async fn start(bind: Bind) -> Django {
        let venv = venv();
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db.sqlite3");
        let static_root = dir.path().join("static");
        let python = venv.join("bin/python");
        let manage = |args: &[&str]| {
            let status = Command::new(&python)
                .arg("manage.py")
                .args(args)
                .current_dir(app_dir())
                .env("DJANGO_DB_PATH", &db)
                .env("DJANGO_STATIC_ROOT", &static_root)
                .env("DJANGO_SUPERUSER_PASSWORD", "correct horse battery staple")
                .stdout(Stdio::null())
                .status()
                .expect("run manage.py");
            assert!(status.success(), "manage.py {args:?} failed");
        };
        manage(&["migrate", "--noinput"]);
        manage(&["collectstatic", "--noinput"]);
        manage(&[
            "createsuperuser",
            "--noinput",
            "--username",
            "admin",
            "--email",
            "admin@example.com",
        ]);

        let (bind_arg, upstream_url, probe): (String, String, Box<dyn Fn() -> bool>) = match bind {
            Bind::Tcp => {
                let port = fixed_port();
                let addr = format!("127.0.0.1:{port}");
                let probe_addr = addr.clone();
                (
                    addr.clone(),
                    format!("http://{addr}"),
                    Box::new(move || std::net::TcpStream::connect(&probe_addr).is_ok()),
                )
            }
            Bind::Unix => {
                let socket = dir.path().join("gunicorn.sock");
                let probe_socket = socket.clone();
                (
                    format!("unix:{}", socket.display()),
                    format!("unix:{}", socket.display()),
                    Box::new(move || {
                        std::os::unix::net::UnixStream::connect(&probe_socket).is_ok()
                    }),
                )
            }
        };
        let access_log = dir.path().join("access.log");
        let child = Command::new(venv.join("bin/gunicorn"))
            .args(["--no-control-socket", "--workers", "2", "--bind", &bind_arg])
            .arg("--access-logfile")
            .arg(&access_log)
            .arg("djangoapp.wsgi:application")
            .current_dir(app_dir())
            .env("DJANGO_DB_PATH", &db)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gunicorn");
        let gunicorn = KillOnDrop(child);
        eventually("gunicorn listens", || std::future::ready(probe())).await;
        Django {
            _gunicorn: gunicorn,
            db,
            upstream_url,
            static_root,
            access_log,
            _dir: dir,
        }
    }

    /// How many requests for `method path` Gunicorn has logged.
    fn requests_seen(&self, method: &str, path: &str) -> usize {
        let log = std::fs::read_to_string(&self.access_log).unwrap_or_default();
        let needle = format!("\"{method} {path}");
        log.lines().filter(|l| l.contains(&needle)).count()
    }
}

/// One more Gunicorn on the same app and database, on a fixed loopback port so it can be stopped and
/// started again there, as a deploy does.
struct Gunicorn {
    port: u16,
    args: Vec<String>,
    db: PathBuf,
    post_log: PathBuf,
    child: Option<KillOnDrop>,
}

impl Gunicorn {
    async fn start(django: &Django, post_log: &Path, args: &[&str]) -> Gunicorn {
        let mut gunicorn = Gunicorn {
            port: fixed_port(),
            args: args.iter().map(|a| a.to_string()).collect(),
            db: django.db.clone(),
            post_log: post_log.to_path_buf(),
            child: None,
        };
        gunicorn.spawn().await;
        gunicorn
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new(venv().join("bin/gunicorn"))
            .args([
                "--no-control-socket",
                "--bind",
                &format!("127.0.0.1:{}", self.port),
            ])
            .args(&self.args)
            .arg("djangoapp.wsgi:application")
            .current_dir(app_dir())
            .env("DJANGO_DB_PATH", &self.db)
            .env("DJANGO_POST_LOG", &self.post_log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gunicorn");
        self.child = Some(KillOnDrop(child));
        let addr = format!("127.0.0.1:{}", self.port);
        eventually("gunicorn listens", || {
            std::future::ready(std::net::TcpStream::connect(&addr).is_ok())
        })
        .await;
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").0.id();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} {pid}");
    }

    /// SIGTERM (Gunicorn stops accepting and finishes what it has), wait for the exit, start again.
    async fn restart(&mut self) {
        self.signal("TERM");
        let mut child = self.child.take().expect("running");
        wait_for(
            "gunicorn exits after SIGTERM",
            Duration::from_secs(40),
            || std::future::ready(child.0.try_wait().expect("wait")),
            String::new,
        )
        .await;
        self.spawn().await;
    }

    /// SIGKILL: what a crashed host or an OOM kill does; requests in flight on it are lost.
    async fn kill(&mut self) {
        self.signal("KILL");
        let mut child = self.child.take().expect("running");
        let _ = child.0.wait();
    }
}

fn json_field<'a>(json: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    json.get(key)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
}

fn cookie_value<'a>(set_cookies: &'a [String], name: &str) -> Option<&'a str> {
    set_cookies.iter().find_map(|c| {
        let first = c.split(';').next()?;
        let (n, v) = first.split_once('=')?;
        (n.trim() == name).then_some(v)
    })
}

fn set_cookies(response: &http::Response<()>) -> Vec<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_string())
        .collect()
}

#[tokio::test]
#[ignore = "needs Django and Gunicorn: run scripts/test.sh"]
async fn django_sees_https_and_the_real_host() {
    let django = Django::start(Bind::Tcp).await;
    let proxy = Proxy::start(&django.upstream_url, "").await;
    let port = proxy.https.port();
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        let req = request("GET", "/whoami/", port)
            .header("x-forwarded-proto", "http")
            .header("x-forwarded-host", "evil.com")
            .header("x-forwarded-for", "6.6.6.6")
            .body(full(""))
            .expect("request");
        let (response, body) = client.fetch(req).await;
        assert_eq!(response.status(), StatusCode::OK, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(json_field(&json, "is_secure"), true);
        assert_eq!(json_field(&json, "scheme"), "https");
        assert_eq!(
            json_field(&json, "host"),
            format!("localhost:{port}").as_str()
        );
        assert_eq!(
            json_field(&json, "absolute_uri"),
            format!("https://localhost:{port}/next/").as_str()
        );
        assert_eq!(json_field(&json, "x_forwarded_for"), "127.0.0.1");
        // Django's own SecurityMiddleware headers are not duplicated by ours.
        assert_eq!(
            response
                .headers()
                .get_all("x-content-type-options")
                .iter()
                .count(),
            1
        );
        assert_eq!(
            response.headers().get_all("x-frame-options").iter().count(),
            1
        );
        assert!(response.headers().get("server").is_none());
    }
    // A poisoned Host never reaches Django.
    let mut client = proxy.client(H1).await;
    assert_eq!(
        client
            .fetch(foreign_host_get("/whoami/", port))
            .await
            .0
            .status(),
        StatusCode::MISDIRECTED_REQUEST
    );
    proxy.stop().await;
}

/// The sharpest check: a browser-style admin login with `CSRF_TRUSTED_ORIGINS = []` passes only when Host
/// and X-Forwarded-Proto are right, and the cookies arrive hardened.
async fn admin_login(upstream_url: &str, alpn: &[&[u8]]) {
    let proxy = Proxy::start(upstream_url, "").await;
    let port = proxy.https.port();
    let mut client = proxy.client(alpn).await;
    let cookie = log_in(&mut client, port).await;
    let req = if client.is_h2() {
        // Browsers split cookies into one field each on HTTP/2 (RFC 9113 §8.2.3, for HPACK); the proxy
        // must join them for Gunicorn, which would otherwise hand Django one comma-joined string.
        let mut req = request("GET", "/admin/", port);
        for pair in cookie.split("; ") {
            req = req.header("cookie", pair);
        }
        req
    } else {
        request("GET", "/admin/", port).header("cookie", &cookie)
    }
    .body(full(""))
    .expect("request");
    let (response, page) = client.fetch(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(page.contains("Site administration"), "{page}");
    proxy.stop().await;
}

/// Logs `admin` in through the proxy's login form, checking the cookie flags on the way; returns the
/// `Cookie` header of the logged-in session.
async fn log_in(client: &mut Client, port: u16) -> String {
    let (csrftoken, response, page) =
        submit_login(client, port, "correct horse battery staple").await;
    assert_eq!(
        response.status(),
        StatusCode::FOUND,
        "login must redirect: {page}"
    );
    assert_eq!(response.headers()["location"], "/admin/");
    let cookies = set_cookies(&response);
    let session = cookies
        .iter()
        .find(|c| c.starts_with("sessionid="))
        .expect("session cookie");
    for flag in ["; Secure", "; HttpOnly", "SameSite=Lax"] {
        assert!(session.contains(flag), "{flag} missing: {session}");
    }
    let sessionid = cookie_value(&cookies, "sessionid")
        .expect("sessionid")
        .to_string();
    let csrftoken = cookie_value(&cookies, "csrftoken")
        .map(str::to_string)
        .unwrap_or(csrftoken);
    format!("csrftoken={csrftoken}; sessionid={sessionid}")
}

/// Opens the admin login form and posts `password` for `admin` with its CSRF token, as a browser does;
/// returns the CSRF cookie and the answer.
async fn submit_login(
    client: &mut Client,
    port: u16,
    password: &str,
) -> (String, http::Response<()>, String) {
    let (response, form) = client.get("/admin/login/?next=/admin/", port).await;
    assert_eq!(response.status(), StatusCode::OK, "{form}");
    let cookies = set_cookies(&response);
    let csrf_cookie = cookies
        .iter()
        .find(|c| c.starts_with("csrftoken="))
        .expect("csrftoken cookie");
    assert!(
        csrf_cookie.contains("; Secure") && csrf_cookie.contains("SameSite=Lax"),
        "{csrf_cookie}"
    );
    assert!(
        !csrf_cookie.contains("HttpOnly"),
        "JavaScript must be able to read csrftoken: {csrf_cookie}"
    );
    let csrftoken = cookie_value(&cookies, "csrftoken")
        .expect("csrftoken value")
        .to_string();
    let marker = "name=\"csrfmiddlewaretoken\" value=\"";
    let start = form.find(marker).expect("csrf field in form") + marker.len();
    let form_token = &form[start..start + form[start..].find('"').expect("end of token")];

    let password: String = password
        .bytes()
        .map(|b| match b {
            b' ' => "+".to_string(),
            b if b.is_ascii_alphanumeric() => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect();
    let body = format!(
        "csrfmiddlewaretoken={form_token}&username=admin&password={password}&next=%2Fadmin%2F"
    );
    let req = request("POST", "/admin/login/?next=/admin/", port)
        .header("origin", format!("https://localhost:{port}"))
        .header(
            "referer",
            format!("https://localhost:{port}/admin/login/?next=/admin/"),
        )
        .header("cookie", format!("csrftoken={csrftoken}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(full(body))
        .expect("request");
    let (response, page) = client.fetch(req).await;
    (csrftoken, response, page)
}

#[tokio::test]
#[ignore = "needs Django and Gunicorn: run scripts/test.sh"]
async fn django_admin_login_over_http1_and_http2() {
    let django = Django::start(Bind::Tcp).await;
    admin_login(&django.upstream_url, H1).await;
    admin_login(&django.upstream_url, H2).await;
}

#[tokio::test]
#[ignore = "needs Django and Gunicorn: run scripts/test.sh"]
async fn django_admin_login_over_a_unix_socket() {
    let django = Django::start(Bind::Unix).await;
    admin_login(&django.upstream_url, H2).await;
}

#[tokio::test]
#[ignore = "needs Django and Gunicorn: run scripts/test.sh"]
async fn django_static_files_are_served_by_the_proxy() {
    let django = Django::start(Bind::Tcp).await;
    let stylesheet = "/static/admin/css/base.css";
    // Without a mount, Gunicorn (DEBUG = False) has no static files: the admin renders unstyled.
    let proxy = Proxy::start(&django.upstream_url, "").await;
    let mut client = proxy.client(H1).await;
    let (response, _) = client.get(stylesheet, proxy.https.port()).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    proxy.stop().await;

    // With STATIC_ROOT mounted at STATIC_URL, the proxy serves what collectstatic wrote.
    let proxy = Proxy::start(&django.upstream_url, &django.static_mount()).await;
    let port = proxy.https.port();
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        let (response, body) = client.get(stylesheet, port).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/css");
        let on_disk = std::fs::read_to_string(django.static_root.join("admin/css/base.css"))
            .expect("collected stylesheet");
        assert_eq!(body, on_disk);
        // The login page that links it still comes from Django.
        let (response, body) = client.get("/admin/login/", port).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(body.contains(stylesheet), "{body}");
    }
    proxy.stop().await;
}

/// Private media behind Django's login check: the view answers with `X-Accel-Redirect` and the proxy's
/// internal mount sends the file; nobody reaches the file without the view's say.
#[tokio::test]
#[ignore = "needs Django and Gunicorn: run scripts/test.sh"]
async fn django_private_media_is_sent_by_the_proxy_after_the_login_check() {
    let django = Django::start(Bind::Tcp).await;
    let media = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(media.path().join("invoices")).expect("mkdir");
    std::fs::write(media.path().join("invoices/42.pdf"), b"%PDF-1.7 invoice 42").expect("write");
    let proxy = Proxy::start(
        &django.upstream_url,
        &format!(
            "[[static]]\nurl = \"/protected/\"\ndir = \"{}\"\ninternal = true\n",
            media.path().display()
        ),
    )
    .await;
    let port = proxy.https.port();
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        // Not logged in: Django sends the visitor to the login page; the internal path itself is a 404.
        let (response, _) = client.get("/media/invoices/42.pdf", port).await;
        assert_eq!(response.status(), StatusCode::FOUND);
        assert!(
            response.headers()["location"]
                .to_str()
                .is_ok_and(|l| l.starts_with("/admin/login/")),
            "{:?}",
            response.headers()
        );
        let (response, body) = client.get("/protected/invoices/42.pdf", port).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(!body.contains("invoice 42"));

        let cookie = log_in(&mut client, port).await;
        let get = |path: &str| {
            request("GET", path, port)
                .header("cookie", &cookie)
                .body(full(""))
                .expect("request")
        };
        let (response, body) = client.fetch(get("/media/invoices/42.pdf")).await;
        assert_eq!(response.status(), StatusCode::OK, "{body}");
        assert_eq!(body, "%PDF-1.7 invoice 42");
        assert_eq!(response.headers()["content-type"], "application/pdf");
        assert_eq!(
            response.headers()["content-disposition"],
            "attachment; filename=\"42.pdf\""
        );
        assert!(!response.headers().contains_key("x-accel-redirect"));
        // Logged in or not, the internal mount answers no one directly.
        let (response, _) = client.fetch(get("/protected/invoices/42.pdf")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let (response, _) = client.fetch(get("/media/invoices/43.pdf")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
    proxy.stop().await;
}

/// The first minute of a new user: `portcullis reverse-proxy --domain localhost --to ...` in front of
/// the Django app, no config file. curl sees HTTPS from the local CA, the security headers, hardened
/// cookies, the redirect from http:// and the static files; `--print-config` is a config `check` accepts.
#[tokio::test]
#[ignore = "needs Django, Gunicorn and curl: run scripts/test.sh"]
async fn the_one_line_start_serves_django_with_every_default() {
    let django = Django::start(Bind::Tcp).await;
    let state = tempfile::tempdir().expect("tempdir");
    let upstream = django
        .upstream_url
        .trim_start_matches("http://")
        .to_string();
    let mounted = format!("/static/={}", django.static_root.display());
    let state_arg = state.path().join("state").display().to_string();
    let mut args = vec![
        "reverse-proxy",
        "--domain",
        "localhost",
        "--to",
        &upstream,
        "--static",
        &mounted,
        "--https",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--state",
        &state_arg,
    ];

    let printed = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(&args)
        .arg("--print-config")
        .output()
        .expect("print-config");
    assert!(printed.status.success());
    let text = String::from_utf8_lossy(&printed.stdout).into_owned();
    assert!(text.contains("source = \"local\""), "{text}");
    let file = state.path().join("portcullis.toml");
    std::fs::write(&file, &text).expect("write");
    let checked = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .expect("check");
    assert!(
        checked.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    // `init` writes the same file, and never over one.
    let initialised = state.path().join("init.toml");
    let init_output = initialised.display().to_string();
    args[0] = "init";
    let init = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(args)
            .args(["--output", &init_output])
            .output()
            .expect("init")
    };
    assert!(init(&args).status.success());
    let written = std::fs::read_to_string(&initialised).expect("init wrote");
    assert_eq!(
        written.lines().skip(1).collect::<Vec<_>>(),
        text.lines().skip(1).collect::<Vec<_>>()
    );
    let again = init(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwritten"));
    args[0] = "reverse-proxy";

    let proxy = Running::with_args(&args.iter().map(std::ffi::OsStr::new).collect::<Vec<_>>());
    let serving = proxy.wait_for_log("portcullis is serving").await;
    let https = proxy.serving_at().await;
    let http: std::net::SocketAddr = serving
        .split("http=Some(")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no plain address in {serving}"));
    // It printed what it runs.
    assert!(proxy.wait_for_output(1).await[0].starts_with("# Written by `"));
    let root = state
        .path()
        .join("state/local/root.crt")
        .display()
        .to_string();
    let resolve = format!("localhost:{}:127.0.0.1", https.port());
    let base = format!("https://localhost:{}", https.port());
    let curl_https = |path: &str| {
        let (root, resolve, url) = (root.clone(), resolve.clone(), format!("{base}{path}"));
        tokio::task::spawn_blocking(move || {
            curl_output(&["--cacert", &root, "--resolve", &resolve, "--include", &url])
        })
    };

    let login = curl_https("/admin/login/")
        .await
        .expect("curl")
        .to_ascii_lowercase();
    assert!(login.starts_with("http/2 200"), "{login}");
    for header in [
        "strict-transport-security: max-age=",
        "content-security-policy:",
        "x-content-type-options: nosniff",
        "x-frame-options: deny",
        "cross-origin-opener-policy: same-origin",
    ] {
        assert!(login.contains(header), "{header} missing:\n{login}");
    }
    let csrf_cookie = login
        .lines()
        .find(|l| l.starts_with("set-cookie: csrftoken="))
        .unwrap_or_else(|| panic!("no csrftoken cookie:\n{login}"));
    assert!(
        csrf_cookie.contains("secure") && csrf_cookie.contains("samesite=lax"),
        "{csrf_cookie}"
    );
    assert!(!csrf_cookie.contains("httponly"), "{csrf_cookie}");
    assert!(!login.contains("server: gunicorn"));

    let stylesheet = curl_https("/static/admin/css/base.css")
        .await
        .expect("curl");
    assert!(stylesheet.starts_with("HTTP/2 200"), "{stylesheet}");
    assert!(stylesheet.contains("content-type: text/css"));

    let plain = format!("http://localhost:{}/admin/?next=1", http.port());
    let redirect = tokio::task::spawn_blocking(move || curl_output(&["--include", &plain]))
        .await
        .expect("curl")
        .to_ascii_lowercase();
    assert!(redirect.starts_with("http/1.1 308"), "{redirect}");
    assert!(
        redirect.contains(&format!(
            "location: https://localhost:{}/admin/?next=1",
            https.port()
        )),
        "{redirect}"
    );

    proxy.signal("TERM");
    proxy.wait_for_log("stopped").await;
}

/// The login budget against the real app: every spelling of the login path that Django routes to the
/// login view (Gunicorn percent-decodes the target) spends the same budget, and once it is spent none of
/// them reaches Gunicorn. Spellings Django does not route (it 404s them) are harmless either way.
#[tokio::test]
#[ignore = "needs Django and Gunicorn: run scripts/test.sh"]
async fn django_login_budget_holds_for_every_spelling_of_the_path() {
    let django = Django::start(Bind::Tcp).await;
    let spellings = [
        "/admin/login/",
        "/admin/%6Cogin/",
        "/%61dmin/login/",
        "/admin/login%2F",
        "/%61%64%6D%69%6E%2F%6C%6F%67%69%6E%2F",
        "/admin//login/",
        "/admin/./login/",
        "/admin/x/../login/",
    ];
    let post = |path: &str, port: u16| {
        request("POST", path, port)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(full("username=admin&password=guess"))
            .expect("request")
    };
    // Unthrottled, Django shows which spellings reach a view: the login view refuses a POST without a
    // CSRF token with 403 (the check runs only once a URL resolved); an unrouted path is a 404.
    let proxy = Proxy::start(&django.upstream_url, "").await;
    let port = proxy.https.port();
    let mut client = proxy.client(H1).await;
    let mut routed = Vec::new();
    for path in spellings {
        let (response, body) = client.fetch(post(path, port)).await;
        match response.status() {
            StatusCode::FORBIDDEN => routed.push(path),
            StatusCode::NOT_FOUND => {}
            other => panic!("{path}: unexpected {other}: {body}"),
        }
    }
    proxy.stop().await;
    for path in [
        "/admin/login/",
        "/admin/%6Cogin/",
        "/%61dmin/login/",
        "/admin/login%2F",
    ] {
        assert!(
            routed.contains(&path),
            "Django no longer routes {path}: {routed:?}"
        );
    }

    let proxy = Proxy::start(
        &django.upstream_url,
        "[[rate_limit]]\npath = \"/admin/login/\"\nrequests = 2\nper = \"1h\"\n",
    )
    .await;
    let port = proxy.https.port();
    for alpn in [H1, H2] {
        for (i, path) in spellings.iter().enumerate() {
            // A connection per request: HTTP/1.1 closes after a refusal.
            let mut client = proxy.client(alpn).await;
            let (response, body) = client.fetch(post(path, port)).await;
            if alpn == H1 && i < 2 {
                assert_eq!(
                    response.status(),
                    StatusCode::FORBIDDEN,
                    "{path}: Django answered"
                );
            } else {
                assert_eq!(
                    response.status(),
                    StatusCode::TOO_MANY_REQUESTS,
                    "{path}: {body}"
                );
                assert!(response.headers().contains_key("retry-after"));
            }
        }
    }
    proxy.stop().await;
}

/// The failed-login lockout in front of Django's real admin: failures are the form again (200), a
/// success the redirect; three failures lock the client out with 429 before Gunicorn sees the POST (its
/// access log says so), another client address is unaffected, and a success before the limit clears
/// the count.
#[tokio::test]
#[ignore = "needs Django and Gunicorn: run scripts/test.sh"]
async fn django_failed_logins_lock_the_client_out_before_gunicorn() {
    let django = Django::start(Bind::Tcp).await;
    let proxy = Proxy::start(
        &django.upstream_url,
        "[[login_lockout]]\npath = \"/admin/login/\"\nfailures = 3\nwindow = \"1h\"\nlockout = \"10m\"\n",
    )
    .await;
    let port = proxy.https.port();
    let login_posts = || django.requests_seen("POST", "/admin/login/");
    let attempt = |password: &'static str, alpn: &'static [&'static [u8]], other: bool| {
        let proxy = &proxy;
        async move {
            // A connection per attempt: HTTP/1.1 closes after a refusal.
            let mut client = if other {
                proxy.client_from_another_address(alpn).await
            } else {
                proxy.client(alpn).await
            };
            let (_, response, page) = submit_login(&mut client, port, password).await;
            (
                response.status(),
                response.headers().get("retry-after").cloned(),
                page,
            )
        }
    };
    let wrong = "not the password";
    let right = "correct horse battery staple";
    for _ in 0..2 {
        let (status, _, page) = attempt(wrong, H2, false).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            page.contains("Please enter the correct username and password"),
            "{page}"
        );
    }
    assert_eq!(
        attempt(right, H1, false).await.0,
        StatusCode::FOUND,
        "and the count is cleared"
    );
    for _ in 0..3 {
        assert_eq!(attempt(wrong, H1, false).await.0, StatusCode::OK);
    }
    // Gunicorn writes its access line just after it answers.
    eventually("Gunicorn logged the six logins", || {
        std::future::ready(login_posts() == 6)
    })
    .await;
    let before = 6;
    for alpn in [H1, H2] {
        let (status, retry_after, _) = attempt(right, alpn, false).await;
        assert_eq!(
            status,
            StatusCode::TOO_MANY_REQUESTS,
            "locked out, the right password too"
        );
        let seconds: u64 = retry_after
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .expect("Retry-After");
        assert!((590..=600).contains(&seconds), "{seconds}");
    }
    // Gunicorn writes its access line after answering; the two refused POSTs never got there.
    let (status, _, _) = attempt(right, H2, true).await;
    assert_eq!(status, StatusCode::FOUND, "another client logs in");
    eventually("Gunicorn logged the other client's login", || {
        std::future::ready(login_posts() == before + 1)
    })
    .await;
    proxy.stop().await;
}

/// The checklist's `SESSION_EXPIRE_AT_BROWSER_CLOSE` and a clean logout, at the edge: with
/// `cookies.session_only`, Django's session cookie arrives without `Expires`/`Max-Age` (gone when the
/// browser closes), yet the logout's deletion keeps its `Max-Age=0`; and the admin's logout answer
/// carries `Clear-Site-Data`.
#[tokio::test]
#[ignore = "needs Django and Gunicorn: run scripts/test.sh"]
async fn django_sessions_end_with_the_browser_and_logout_clears_the_site() {
    let django = Django::start(Bind::Tcp).await;
    let proxy = Proxy::start(
        &django.upstream_url,
        "[cookies]\nsession_only = [\"sessionid\"]\n[headers.clear_site_data]\npaths = [\"/admin/logout/\"]\n",
    )
    .await;
    let port = proxy.https.port();
    let mut client = proxy.client(H2).await;
    let (_, response, page) = submit_login(&mut client, port, "correct horse battery staple").await;
    assert_eq!(response.status(), StatusCode::FOUND, "{page}");
    assert!(
        response.headers().get("clear-site-data").is_none(),
        "not on login"
    );
    let cookies = set_cookies(&response);
    let session = cookies
        .iter()
        .find(|c| c.starts_with("sessionid="))
        .expect("session cookie");
    let lower = session.to_ascii_lowercase();
    assert!(
        !lower.contains("expires=") && !lower.contains("max-age="),
        "a session cookie: {session}"
    );
    assert!(
        session.contains("; Secure") && session.contains("; HttpOnly"),
        "{session}"
    );
    let csrf = cookies
        .iter()
        .find(|c| c.starts_with("csrftoken="))
        .expect("a new csrftoken at login");
    assert!(
        csrf.contains("Max-Age="),
        "other cookies keep their lifetime: {csrf}"
    );
    let csrftoken = cookie_value(&cookies, "csrftoken").expect("csrftoken");
    let sessionid = cookie_value(&cookies, "sessionid").expect("sessionid");
    let req = request("POST", "/admin/logout/", port)
        .header("origin", format!("https://localhost:{port}"))
        .header("referer", format!("https://localhost:{port}/admin/"))
        .header("cookie", format!("csrftoken={csrftoken}"))
        .header("cookie", format!("sessionid={sessionid}"))
        .header("x-csrftoken", csrftoken)
        .body(full(""))
        .expect("request");
    let (response, page) = client.fetch(req).await;
    assert_eq!(response.status(), StatusCode::OK, "{page}");
    assert!(page.contains("Logged out"), "{page}");
    assert_eq!(
        response.headers()["clear-site-data"],
        "\"cache\", \"cookies\", \"storage\""
    );
    let deletion = set_cookies(&response)
        .into_iter()
        .find(|c| c.starts_with("sessionid="))
        .expect("the session cookie deleted");
    assert!(
        deletion.contains("Max-Age=0"),
        "the deletion stands: {deletion}"
    );
    proxy.stop().await;
}

/// Django's admin in a real browser (Debian's Chromium driven by playwright-core, `tests/browser/`)
/// through the proxy with its default headers: log in, then the pages with the most JavaScript and
/// widgets. Catches what hand-written clients cannot: how a browser splits cookies on HTTP/2, whether the
/// default Content-Security-Policy blocks anything the admin needs, whether the stylesheets load.
#[tokio::test]
#[ignore = "needs Django, Gunicorn, Chromium and playwright-core: run scripts/test.sh"]
async fn django_admin_works_in_a_real_browser() {
    let django = Django::start(Bind::Tcp).await;
    let proxy = Proxy::start(&django.upstream_url, &django.static_mount()).await;
    let base = format!("https://localhost:{}", proxy.https.port());
    let report = run_browser(
        "django_admin.cjs",
        vec![base, "correct horse battery staple".into()],
    )
    .await;
    for list in ["violations", "consoleErrors", "failed"] {
        assert_eq!(
            json_field(&report, list),
            &serde_json::json!([]),
            "{list}: {report}"
        );
    }
    let titles: Vec<&str> = json_field(&report, "pages")
        .as_array()
        .expect("pages")
        .iter()
        .filter_map(|p| p.get("title")?.as_str())
        .collect();
    assert!(
        titles
            .iter()
            .filter(|t| t.starts_with("Site administration"))
            .count()
            >= 2,
        "the login did not stick: {titles:?}"
    );
    assert!(
        titles.iter().any(|t| t.starts_with("Add group")),
        "{titles:?}"
    );
    // Every page painted with the admin's stylesheet (its header is not the browser's transparent default).
    for page in json_field(&report, "styled").as_array().expect("styled") {
        let colour = json_field(page, "headerColour")
            .as_str()
            .unwrap_or_default();
        assert!(colour.starts_with("rgb("), "unstyled: {page}");
    }
    proxy.stop().await;
}

/// Runs `tests/browser/SCRIPT` under node with playwright-core and Debian's Chromium, bounded in time;
/// returns the JSON report it prints (a failed run fails the test with the report).
async fn run_browser(script: &str, args: Vec<String>) -> serde_json::Value {
    let node_modules = std::env::var_os("PORTCULLIS_TEST_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!("PORTCULLIS_TEST_NODE_MODULES is not set: run scripts/test.sh, which installs playwright-core")
        });
    assert!(
        node_modules.join("playwright-core").is_dir(),
        "{}/playwright-core is missing: run scripts/test.sh",
        node_modules.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/browser")
        .join(script);
    let node_path = std::path::absolute(&node_modules).expect("absolute path");
    // `timeout` bounds the browser; the blocking wait runs off the runtime so the proxy keeps serving.
    let output = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(["120", "node"])
            .arg(script)
            .args(args)
            .env("NODE_PATH", node_path)
            .stderr(Stdio::inherit())
            .output()
            .expect("run node (scripts/test.sh installs it)")
    })
    .await
    .expect("browser run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("browser report is not JSON ({e}): {stdout}"));
    assert!(output.status.success(), "browser run failed: {report}");
    report
}

/// The attacker's site: a page on another origin (plain HTTP on 127.0.0.1, another site than
/// `localhost`) whose form posts to `target` on load. Serves that page to every request until dropped.
async fn attacker_page(target: String) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    let page = format!(
        "<!doctype html><html><body><form id=\"f\" method=\"post\" action=\"{target}\">\
         <input name=\"to\" value=\"attacker\"></form>\
         <script>document.getElementById(\"f\").submit()</script></body></html>"
    );
    let task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut head = vec![0u8; 4096];
            let _ = tokio::time::timeout(LIMIT, tcp.read(&mut head)).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
            let _ = tcp.write_all(response.as_bytes()).await;
        }
    });
    (url, task)
}

/// A CSRF attack from another site in a real browser, against a Django view that is `@csrf_exempt` (so
/// Django itself would run it): with the default config the proxy refuses the browser's cross-site POST
/// with its 403 page before Gunicorn; in report mode it reaches the view and is counted as an event.
/// The admin login in `django_admin_works_in_a_real_browser` runs under the same default, same-origin.
#[tokio::test]
#[ignore = "needs Django, Gunicorn, Chromium and playwright-core: run scripts/test.sh"]
async fn a_cross_site_form_in_a_real_browser_is_refused_by_default() {
    let django = Django::start(Bind::Tcp).await;
    for mode in ["enforce", "report"] {
        let proxy = Proxy::start(
            &django.upstream_url,
            &format!("[metrics]\nlisten = \"127.0.0.1:0\"\n[cross_origin]\nmode = \"{mode}\"\n"),
        )
        .await;
        let target = format!("https://localhost:{}/transfer/", proxy.https.port());
        let (attacker, server) = attacker_page(target.clone()).await;
        let before = django.requests_seen("POST", "/transfer/");
        let report = run_browser("cross_site_form.cjs", vec![attacker, target]).await;
        assert_eq!(report["secFetchSite"], "cross-site", "{report}");
        let body = report["body"].as_str().unwrap_or_default();
        let metrics = scrape_metrics(proxy.server().metrics_addr.expect("metrics")).await;
        if mode == "enforce" {
            assert_eq!(report["status"], 403, "{report}");
            assert!(body.contains("cross_origin.exempt"), "{body}");
            assert!(
                metrics
                    .contains("portcullis_security_events_total{cause=\"cross_origin_refused\"} 1")
            );
        } else {
            assert_eq!(report["status"], 200, "{report}");
            assert_eq!(body, "transferred to attacker");
            assert!(
                metrics.contains(
                    "portcullis_security_events_total{cause=\"cross_origin_reported\"} 1"
                )
            );
            eventually("Gunicorn logged the POST", || {
                std::future::ready(django.requests_seen("POST", "/transfer/") == before + 1)
            })
            .await;
        }
        if mode == "enforce" {
            assert_eq!(
                django.requests_seen("POST", "/transfer/"),
                before,
                "Gunicorn never saw it"
            );
        }
        server.abort();
        proxy.stop().await;
    }
}

/// CSP reports from a real browser: a Django page with an inline script under the proxy's default
/// policy; Chromium blocks the script, fires `securitypolicyviolation`, and its report reaches the
/// collector (counted by directive), not Gunicorn.
#[tokio::test]
#[ignore = "needs Django, Gunicorn, Chromium and playwright-core: run scripts/test.sh"]
async fn a_blocked_inline_script_is_reported_by_a_real_browser_to_the_collector() {
    let django = Django::start(Bind::Tcp).await;
    // The binary, so its security log can be read as an operator reads it.
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics_port = fixed_port();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhttps = \"127.0.0.1:0\"\ndomains = [\"localhost\"]\n[tls]\nsource = \"local\"\n\
             dir = \"{}\"\n[upstream]\nurl = \"{}\"\n[log]\nformat = \"json\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[csp_reports]\n",
            dir.path().join("state").display(),
            django.upstream_url
        ),
    )
    .expect("config");
    let proxy = Running::start(&config);
    let line = proxy.wait_for_log("portcullis is serving").await;
    let started: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    let https: std::net::SocketAddr = started["https"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("https address");
    let page = format!("https://localhost:{}/inline-script/", https.port());
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    let report = run_browser("csp_report.cjs", vec![page.clone(), metrics]).await;
    assert_eq!(
        report["title"], "inline",
        "the script was blocked: {report}"
    );
    assert_eq!(
        report["violations"][0]["directive"], "script-src-elem",
        "{report}"
    );
    assert_eq!(
        report["metric"], "portcullis_csp_reports_total{directive=\"script-src-elem\"} 1",
        "the report reached the collector: {report}"
    );
    // And the security log has it, with what the browser said.
    let event: serde_json::Value =
        serde_json::from_str(&proxy.wait_for_log("\"cause\":\"csp_report\"").await).expect("JSON");
    assert_eq!(event["client"], "127.0.0.1", "{event}");
    assert_eq!(event["path"], "/_portcullis/csp-report");
    let detail = event["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("script-src-elem blocked inline on ")
            && detail.contains("/inline-script/"),
        "{event}"
    );
    assert_eq!(
        django.requests_seen("POST", "/_portcullis/csp-report"),
        0,
        "reports never reach Gunicorn"
    );
}

/// A deploy with two real Gunicorns (one gthread with `--keep-alive 2`, one with sync workers) under
/// steady HTTP/1.1 and HTTP/2 load of GETs and POSTs: each is restarted in turn (SIGTERM, start again),
/// one gets SIGHUP (a worker reload), then one is killed with SIGKILL and started again; before those, one
/// is restarted the README's zero-loss way (out of `urls`, reload, restart, back in). No GET fails; no
/// POST runs twice; the drained restart and the worker reload lose nothing; the POSTs that fail are at
/// most those in flight when a Gunicorn closed its listener or died (printed with the counts).
#[tokio::test]
#[ignore = "needs Django and Gunicorn: run scripts/test.sh"]
async fn deploys_and_a_crash_lose_no_idempotent_request_and_repeat_no_post() {
    let django = Django::start(Bind::Tcp).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let post_log = dir.path().join("posts.log");
    let mut gthread = Gunicorn::start(
        &django,
        &post_log,
        &[
            "--worker-class",
            "gthread",
            "--threads",
            "4",
            "--workers",
            "2",
            "--keep-alive",
            "2",
        ],
    )
    .await;
    let mut sync = Gunicorn::start(&django, &post_log, &["--workers", "3"]).await;
    let proxy = Proxy::start("http://127.0.0.1:1", "").await;
    // The harness's config with the two Gunicorns as the backends.
    // The harness's config with these backends, applied by reload (as `kill -HUP` does).
    let set_backends = |urls: &[String]| {
        let mut config = (*proxy.server().config()).clone();
        let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        let backends = portcullis::config::Config::parse(
            &format!(
                "[server]\ndomains = [\"localhost\"]\n[upstream]\nurls = [{}]\n\
                 response_timeout = \"20s\"\nconnect_timeout = \"1s\"\n",
                list.join(", ")
            ),
            "backends",
            None,
        )
        .expect("config");
        config.upstream = backends.upstream;
        proxy.server().reload(config).expect("reload");
    };
    set_backends(&[gthread.url(), sync.url()]);
    let port = proxy.https.port();

    let stop = Arc::new(AtomicBool::new(false));
    let (gets_ok, posts_ok) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failed_gets = Arc::new(std::sync::Mutex::new(Vec::new()));
    let failed_posts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let next_id = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for alpn in [H1, H2, H1, H2] {
        let mut client = proxy.client(alpn).await;
        let (https, root) = (proxy.https, proxy.root.clone());
        let (stop, gets_ok, posts_ok) = (stop.clone(), gets_ok.clone(), posts_ok.clone());
        let (failed_gets, failed_posts, next_id) =
            (failed_gets.clone(), failed_posts.clone(), next_id.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let (response, body) = client.get("/whoami/", port).await;
                if response.status() == StatusCode::OK {
                    gets_ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed_gets
                        .lock()
                        .expect("lock")
                        .push(format!("{}: {body}", response.status()));
                }
                let id = next_id.fetch_add(1, Ordering::SeqCst);
                let req = request("POST", "/record/", port)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(full(format!("id={id}")))
                    .expect("request");
                let (response, _) = client.fetch(req).await;
                if response.status() == StatusCode::OK {
                    posts_ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed_posts
                        .lock()
                        .expect("lock")
                        .push((id, response.status()));
                }
                // HTTP/1.1: a refused request closes the connection; start a new one.
                if client.alpn.as_deref() != Some(b"h2") && response.status().is_server_error() {
                    if let Ok(fresh) = Client::connect(https, "localhost", &root, H1).await {
                        client = fresh;
                    }
                }
            }
        }));
    }
    let started = std::time::Instant::now();
    let pause = || tokio::time::sleep(Duration::from_secs(3));
    let failed_so_far =
        || failed_posts.lock().expect("lock").len() + failed_gets.lock().expect("lock").len();
    pause().await;
    // The README's zero-loss deploy: take the backend out, reload, restart it, put it back, reload.
    set_backends(&[sync.url()]);
    pause().await;
    gthread.restart().await;
    set_backends(&[gthread.url(), sync.url()]);
    pause().await;
    let after_drained_restart = failed_so_far();
    // The plain way: SIGTERM each Gunicorn in turn while it is in rotation.
    gthread.restart().await;
    pause().await;
    sync.restart().await;
    pause().await;
    let before_hup = failed_so_far();
    gthread.signal("HUP");
    pause().await;
    let after_hup = failed_so_far();
    let failed_posts_so_far = || failed_posts.lock().expect("lock").len();
    let after_hup_posts = failed_posts_so_far();
    sync.kill().await;
    pause().await;
    sync.spawn().await;
    while started.elapsed() < Duration::from_secs(30) {
        pause().await;
    }
    stop.store(true, Ordering::SeqCst);
    for task in load {
        tokio::time::timeout(LIMIT, task)
            .await
            .expect("load stops")
            .expect("load task");
    }

    let gets = gets_ok.load(Ordering::SeqCst);
    let failed_gets = failed_gets.lock().expect("lock").clone();
    let failed_posts = failed_posts.lock().expect("lock").clone();
    let log = std::fs::read_to_string(&post_log).unwrap_or_default();
    let mut runs = std::collections::HashMap::new();
    for line in log.lines() {
        *runs
            .entry(line.split(' ').next().unwrap_or("-").to_string())
            .or_insert(0) += 1;
    }
    let repeated: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "{gets} GETs ok, {} failed; {} POSTs ok, {} failed ({after_drained_restart} at the drained \
         restart, {} at the two plain restarts, {} at the worker reload, {} at the kill): \
         {failed_posts:?}",
        failed_gets.len(),
        posts_ok.load(Ordering::SeqCst),
        failed_posts.len(),
        before_hup - after_drained_restart,
        after_hup - before_hup,
        failed_posts.len() - after_hup_posts,
    );
    assert!(gets > 100, "the load ran: {gets} GETs");
    assert!(failed_gets.is_empty(), "GETs failed: {failed_gets:?}");
    assert!(repeated.is_empty(), "POSTs ran twice: {repeated:?}");
    assert_eq!(
        after_drained_restart, 0,
        "the drained restart lost a request"
    );
    assert_eq!(after_hup, before_hup, "a worker reload lost a request");
    // Gunicorn resets the connections still in its accept queue when SIGTERM closes its listener, and
    // SIGKILL loses what is in flight: a POST there may or may not have run, so it is never sent again.
    // Four clients have at most four requests in flight at each of those three moments.
    assert!(
        failed_posts.len() <= 12,
        "more POSTs failed than were in flight at the restarts and the kill: {failed_posts:?}"
    );
    proxy.stop().await;
}
