//! `[[static]]`: a folder served at a URL prefix by the proxy itself (Django's STATIC_ROOT), through the
//! same Host check and security headers as everything else, never reaching the upstream.

mod common;

use common::*;
use http::StatusCode;

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2", b"http/1.1"];
const CACHE: &str = "public, max-age=31536000, immutable";

/// A STATIC_ROOT as collectstatic (with WhiteNoise's compressed storage) leaves it, plus things that must
/// never be served.
fn static_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |path: &str, data: &[u8]| {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, data).expect("write");
    };
    write("css/app.css", b"body { color: #123; }\n");
    write("css/app.css.gz", b"pretend-gzip");
    write("admin/js/core.js", b"'use strict';\n");
    write(".env", b"SECRET_KEY=leaked");
    write("css/.git/config", b"[core]");
    // A FIFO nobody writes to: opening it for reading would block forever without O_NONBLOCK.
    assert!(
        std::process::Command::new("mkfifo")
            .arg(dir.path().join("css/stuck.css"))
            .status()
            .expect("mkfifo")
            .success()
    );
    dir
}

async fn start(root: &std::path::Path) -> (Upstream, Proxy) {
    Proxy::with_upstream(&format!(
        "[[static]]\nurl = \"/static/\"\ndir = \"{}\"\ncache_control = \"{CACHE}\"\n",
        root.display()
    ))
    .await
}

#[tokio::test]
async fn static_files_are_served_by_the_proxy_with_the_security_headers() {
    let root = static_root();
    let (upstream, proxy) = start(root.path()).await;
    let port = proxy.https.port();
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        let (response, body) = client.get("/static/css/app.css", port).await;
        assert_eq!(response.status(), StatusCode::OK, "{body}");
        assert_eq!(body, "body { color: #123; }\n");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(header("content-type"), "text/css");
        assert_eq!(header("cache-control"), CACHE);
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert!(header("strict-transport-security").starts_with("max-age="));
        assert!(!header("last-modified").is_empty());

        let (response, body) = client.get("/static/admin/js/core.js", port).await;
        assert_eq!(response.status(), StatusCode::OK, "{body}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .is_ok_and(|t| t.contains("javascript"))
        );
    }
    assert_eq!(
        upstream.count(),
        0,
        "no static request reached the upstream"
    );

    // Outside the prefix, requests go upstream as always.
    let mut client = proxy.client(H2).await;
    assert_eq!(
        client.get("/staticfiles/app.css", port).await.0.status(),
        StatusCode::OK
    );
    assert_eq!(client.get("/static", port).await.0.status(), StatusCode::OK);
    assert_eq!(upstream.count(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn static_files_honour_conditional_range_head_and_precompressed_requests() {
    let root = static_root();
    let (_upstream, proxy) = start(root.path()).await;
    let port = proxy.https.port();
    let mut client = proxy.client(H2).await;
    let get = |headers: &[(&str, &str)]| {
        let mut req = request("GET", "/static/css/app.css", port);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(full("")).expect("request")
    };

    let (first, _) = client.fetch(get(&[])).await;
    let modified = first.headers()["last-modified"]
        .to_str()
        .expect("date")
        .to_string();
    let (response, body) = client.fetch(get(&[("if-modified-since", &modified)])).await;
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());

    let (response, body) = client.fetch(get(&[("range", "bytes=0-3")])).await;
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, "body");

    let (response, body) = client.fetch(get(&[("accept-encoding", "gzip")])).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body, "pretend-gzip");
    assert_eq!(response.headers()["content-encoding"], "gzip");
    assert_eq!(response.headers()["vary"], "accept-encoding");

    let head = request("HEAD", "/static/css/app.css", port)
        .body(full(""))
        .expect("request");
    let (response, body) = client.fetch(head).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-length"], "22");
    assert!(body.is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn static_files_refuse_hidden_missing_outside_and_unsafe_requests() {
    let root = static_root();
    let (upstream, proxy) = start(root.path()).await;
    let port = proxy.https.port();
    // Bounds the FIFO case even if it regresses: a writer appearing after LIMIT frees a stuck reader
    // (and the request's time then fails the assertion below instead of hanging the test).
    let fifo = root.path().join("css/stuck.css");
    std::thread::spawn(move || {
        std::thread::sleep(LIMIT);
        let _ = std::fs::OpenOptions::new().write(true).open(fifo);
    });
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        for path in [
            "/static/.env",
            "/static/%2eenv",
            "/static/css/.git/config",
            "/static/css/",
            "/static/css",
            "/static/missing.css",
            "/static/css/stuck.css",
        ] {
            let asked = std::time::Instant::now();
            let (response, body) = client.get(path, port).await;
            assert!(asked.elapsed() < LIMIT / 2, "{path} blocked the proxy");
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}: {body}");
            assert!(
                !body.contains("SECRET") && !body.contains("[package]"),
                "{path}"
            );
            // Our own error page, with the headers.
            assert!(response.headers().contains_key("content-security-policy"));
        }
        // Dot segments are resolved before mounts are matched (as nginx does): a path that climbs out
        // of the folder is not under the mount any more and goes to the app, which 404s it. No file
        // outside the folder is ever read.
        for path in [
            "/static/../Cargo.toml",
            "/static/css/%2e%2e/%2e%2e/Cargo.toml",
        ] {
            let (_, body) = client.get(path, port).await;
            assert!(!body.contains("[package]"), "{path}: {body}");
            assert!(body.starts_with("GET "), "{path} went to the app: {body}");
        }
        // Spellings of a file's path that Django would route to the same place are the same file.
        for path in [
            "/static/css/%61pp.css",
            "/static//css/app.css",
            "/static/x/../css/app.css",
        ] {
            let (response, _) = client.get(path, port).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
        }
        let post = request("POST", "/static/css/app.css", port)
            .body(full("x=1"))
            .expect("request");
        let (response, _) = client.fetch(post).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()["allow"], "GET, HEAD");
    }
    // The Host check comes first: a foreign Host gets nothing from the folder either.
    let mut client = proxy.client(H1).await;
    let (response, _) = client
        .fetch(foreign_host_get("/static/css/app.css", port))
        .await;
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(
        upstream.count(),
        4,
        "only the two paths that left the folder"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn large_static_files_stream_whole_and_by_range() {
    // Over the 1 MiB read-whole threshold: streamed from the blocking pool instead.
    let root = static_root();
    let big: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    std::fs::write(root.path().join("big.js"), &big).expect("write");
    let (upstream, proxy) = start(root.path()).await;
    let port = proxy.https.port();
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        let (response, body) = client.get("/static/big.js", port).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body.len(), big.len());
        assert!(body.as_bytes() == big.as_slice(), "content differs");
        let range = request("GET", "/static/big.js", port)
            .header("range", "bytes=2097152-2097161")
            .body(full(""))
            .expect("request");
        let (response, body) = client.fetch(range).await;
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(body.as_bytes(), &big[2_097_152..2_097_162]);
    }
    assert_eq!(upstream.count(), 0);
    proxy.stop().await;
}

/// Symbolic links are followed by default, as nginx does (`collectstatic --link` makes them); with
/// `symlinks = "inside"` a link whose target is outside the folder is a 404 and one inside still works.
#[tokio::test]
async fn symlinks_out_of_the_folder_are_followed_or_refused_as_configured() {
    let root = static_root();
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("secret.txt"), b"outside the folder").expect("write");
    std::os::unix::fs::symlink(
        outside.path().join("secret.txt"),
        root.path().join("link.txt"),
    )
    .expect("symlink out");
    std::os::unix::fs::symlink(outside.path(), root.path().join("linkdir")).expect("dir symlink");
    std::os::unix::fs::symlink(
        root.path().join("css/app.css"),
        root.path().join("inner.css"),
    )
    .expect("symlink in");
    for (policy, outside_status) in [
        ("", StatusCode::OK),
        ("symlinks = \"follow\"\n", StatusCode::OK),
        ("symlinks = \"inside\"\n", StatusCode::NOT_FOUND),
    ] {
        let (upstream, proxy) = Proxy::with_upstream(&format!(
            "[[static]]\nurl = \"/static/\"\ndir = \"{}\"\n{policy}",
            root.path().display()
        ))
        .await;
        let port = proxy.https.port();
        let mut client = proxy.client(H2).await;
        for path in ["/static/link.txt", "/static/linkdir/secret.txt"] {
            let (response, body) = client.get(path, port).await;
            assert_eq!(response.status(), outside_status, "{policy:?} {path}");
            assert_eq!(
                body.contains("outside the folder"),
                outside_status == StatusCode::OK,
                "{policy:?} {path}"
            );
        }
        let (response, _) = client.get("/static/inner.css", port).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "{policy:?}: a link inside"
        );
        assert_eq!(upstream.count(), 0);
        proxy.stop().await;
    }
}

/// Private media as Django serves it behind a login check: the app answers with `X-Accel-Redirect`
/// and an `internal` mount sends the file (nginx's protocol; django-sendfile2's nginx backend).
#[tokio::test]
async fn x_accel_redirect_serves_internal_files_that_clients_cannot_ask_for() {
    let private = tempfile::tempdir().expect("tempdir");
    std::fs::write(private.path().join("report.pdf"), b"%PDF-1.7 the report").expect("write");
    std::fs::write(private.path().join(".secret"), b"hidden").expect("write");
    let public = static_root();
    let (upstream, proxy) = Proxy::with_upstream(&format!(
        "[[static]]\nurl = \"/private/\"\ndir = \"{}\"\ninternal = true\n\
         [[static]]\nurl = \"/static/\"\ndir = \"{}\"\n",
        private.path().display(),
        public.path().display()
    ))
    .await;
    let port = proxy.https.port();
    let header = |response: &http::Response<()>, name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    for alpn in [H1, H2] {
        let mut client = proxy.client(alpn).await;
        // Asked for directly, the internal folder does not exist, and the app is not asked either.
        let before = upstream.count();
        for path in ["/private/report.pdf", "/private/", "/%70rivate/report.pdf"] {
            let (response, body) = client.get(path, port).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}: {body}");
            assert!(!body.contains("%PDF"), "{path}");
        }
        assert_eq!(upstream.count(), before);

        // Through the app: the file, described as the app said, with none of the instructions.
        let (response, body) = client.get("/accel?to=/private/report.pdf", port).await;
        assert_eq!(response.status(), StatusCode::OK, "{body}");
        assert_eq!(body, "%PDF-1.7 the report");
        assert_eq!(header(&response, "content-type"), "application/pdf");
        assert_eq!(
            header(&response, "content-disposition"),
            "attachment; filename=\"report.pdf\""
        );
        assert!(header(&response, "set-cookie").contains("sessionid=refreshed"));
        assert!(header(&response, "set-cookie").contains("Secure"));
        assert!(header(&response, "x-content-type-options") == "nosniff");
        for gone in ["x-accel-redirect", "x-accel-buffering", "x-app-only"] {
            assert!(!response.headers().contains_key(gone), "{gone} leaked");
        }
        let modified = header(&response, "last-modified");
        assert!(!modified.is_empty());

        // The client's range and conditional headers apply to the file; any method becomes GET.
        let fetch = |method: &str, headers: &[(&str, &str)]| {
            let mut req = request(method, "/accel?to=/private/report.pdf", port);
            for (name, value) in headers {
                req = req.header(*name, *value);
            }
            req.body(full("")).expect("request")
        };
        let (response, body) = client.fetch(fetch("GET", &[("range", "bytes=0-3")])).await;
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(body, "%PDF");
        let (response, body) = client
            .fetch(fetch("GET", &[("if-modified-since", &modified)]))
            .await;
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED, "{body}");
        let (response, body) = client.fetch(fetch("POST", &[])).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body, "%PDF-1.7 the report");
        let (response, body) = client.fetch(fetch("HEAD", &[])).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, "content-length"), "19");
        assert!(body.is_empty());

        // A missing or hidden file is a 404 like any other; a path under no internal mount (a public
        // one, or one that climbs out) is the app's mistake, a 502, and reads nothing.
        for (to, status) in [
            ("/private/missing.pdf", StatusCode::NOT_FOUND),
            ("/private/.secret", StatusCode::NOT_FOUND),
            ("/private/%2e%2e/etc/passwd", StatusCode::BAD_GATEWAY),
            ("/private/../static/css/app.css", StatusCode::BAD_GATEWAY),
            ("/static/css/app.css", StatusCode::BAD_GATEWAY),
            ("private/report.pdf", StatusCode::BAD_GATEWAY),
        ] {
            let (response, body) = client.get(&format!("/accel?to={to}"), port).await;
            assert_eq!(response.status(), status, "{to}: {body}");
            assert!(!body.contains("hidden") && !body.contains("body {"), "{to}");
            assert!(!response.headers().contains_key("x-accel-redirect"));
        }
    }
    proxy.stop().await;

    // Without an internal mount the instruction is refused, never passed to the client.
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    let mut client = proxy.client(H1).await;
    let (response, body) = client
        .get("/accel?to=/private/report.pdf", proxy.https.port())
        .await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{body}");
    assert!(!body.contains("placeholder"));
    assert!(!response.headers().contains_key("x-accel-redirect"));
    proxy.stop().await;
}
