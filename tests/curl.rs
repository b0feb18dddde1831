//! Real third-party clients: curl over HTTP/1.1 and HTTP/2 through the proxy trusting the local CA, and
//! `openssl s_client` probing which protocol versions and suites the TLS listener accepts.
//! Needs `curl` and `openssl`: run with `--include-ignored` (scripts/test.sh installs them).

mod common;

use std::process::Command;

use common::*;

/// The response head curl received (lowercased), the body discarded.
fn curl(args: &[&str]) -> String {
    let mut all = vec!["--dump-header", "-", "--output", "/dev/null"];
    all.extend_from_slice(args);
    curl_output(&all).to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs curl: run scripts/test.sh"]
async fn curl_over_http1_and_http2() {
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    let root = proxy.root.display().to_string();
    let url = proxy.url("/cookies");
    let args = [root.as_str(), url.as_str()];
    let run = move |version: &'static str| {
        let (root, url) = (args[0].to_string(), args[1].to_string());
        tokio::task::spawn_blocking(move || curl(&["--cacert", &root, version, &url]))
    };
    let h2 = run("--http2").await.expect("curl task");
    assert!(h2.starts_with("http/2 200"), "{h2}");
    assert!(
        h2.contains("strict-transport-security: max-age=31536000; includesubdomains"),
        "{h2}"
    );
    assert!(
        h2.contains("set-cookie: sessionid=abc; path=/; secure; httponly; samesite=lax"),
        "{h2}"
    );
    let h1 = run("--http1.1").await.expect("curl task");
    assert!(h1.starts_with("http/1.1 200"), "{h1}");
    assert!(h1.contains("x-content-type-options: nosniff"), "{h1}");

    let plain = format!(
        "http://localhost:{}/a?b=c",
        proxy.http.expect("plain").port()
    );
    let redirect = tokio::task::spawn_blocking(move || curl(&[&plain]))
        .await
        .expect("curl task");
    assert!(redirect.starts_with("http/1.1 308"), "{redirect}");
    assert!(
        redirect.contains(&format!(
            "location: https://localhost:{}/a?b=c",
            proxy.https.port()
        )),
        "{redirect}"
    );
    proxy.stop().await;
}

/// Cross-origin protection is on by default and must not touch what is not a browser: curl's POSTs (a
/// webhook, a deploy script) pass; the same POST claiming a browser's cross-site context does not.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs curl: run scripts/test.sh"]
async fn curl_posts_pass_the_default_cross_origin_protection() {
    let (upstream, proxy) = Proxy::with_upstream("").await;
    let root = proxy.root.display().to_string();
    let url = proxy.url("/api/webhook/");
    let post = move |extra: Vec<&'static str>| {
        let (root, url) = (root.clone(), url.clone());
        tokio::task::spawn_blocking(move || {
            let mut args = vec!["--cacert", &root, "--data", "event=paid"];
            args.extend(extra);
            args.push(&url);
            curl(&args)
        })
    };
    for version in ["--http1.1", "--http2"] {
        let answer = post(vec![version]).await.expect("curl task");
        assert!(answer.contains(" 200"), "{answer}");
    }
    assert_eq!(upstream.count(), 2);
    let refused = post(vec!["--header", "Sec-Fetch-Site: cross-site"])
        .await
        .expect("curl task");
    assert!(refused.contains(" 403"), "{refused}");
    assert_eq!(upstream.count(), 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs curl: run scripts/test.sh"]
async fn curl_upload_with_expect_continue_and_head() {
    let (_upstream, proxy) = Proxy::with_upstream("[limits]\nmax_body = \"8MiB\"\n").await;
    let root = proxy.root.display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, vec![b'x'; 3 * 1024 * 1024]).expect("write");
    let upload = format!("@{}", file.display());
    let url = proxy.url("/upload");
    let head_url = proxy.url("/echo");
    let (root2, url2) = (root.clone(), url.clone());
    // curl sends `Expect: 100-continue` for a body this size and waits for the 100 before sending it.
    let output = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "--silent",
                "--show-error",
                "--max-time",
                "20",
                "--http1.1",
                "--cacert",
                &root2,
            ])
            .args([
                "-H",
                "Expect: 100-continue",
                "--data-binary",
                &upload,
                &url2,
            ])
            .output()
            .expect("curl")
    })
    .await
    .expect("task");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        (3 * 1024 * 1024).to_string()
    );

    let head = tokio::task::spawn_blocking(move || curl(&["--cacert", &root, "--head", &head_url]))
        .await
        .expect("task");
    assert!(head.starts_with("http/2 200"), "{head}");
    assert!(head.contains("content-length:"), "{head}");
    proxy.stop().await;
}

/// A TLS handshake by `openssl s_client` with the given options; true if it completed.
fn openssl_handshake(port: u16, options: &[&str]) -> bool {
    let output = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "localhost",
        ])
        .args(options)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl is installed (scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    output.status.success() && text.contains("Cipher is") && !text.contains("Cipher is (NONE)")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs openssl: run scripts/test.sh"]
async fn only_tls_1_2_and_1_3_with_forward_secret_aead_suites() {
    let (_upstream, proxy) = Proxy::with_upstream("").await;
    let port = proxy.https.port();
    let results = tokio::task::spawn_blocking(move || {
        [
            ("TLS 1.3", openssl_handshake(port, &["-tls1_3"])),
            (
                "TLS 1.2 ECDHE-ECDSA-AES128-GCM",
                openssl_handshake(
                    port,
                    &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
                ),
            ),
            (
                "TLS 1.2 ECDHE-ECDSA-CHACHA20",
                openssl_handshake(
                    port,
                    &["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"],
                ),
            ),
            (
                "TLS 1.2 CBC",
                openssl_handshake(
                    port,
                    &[
                        "-tls1_2",
                        "-cipher",
                        "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA",
                    ],
                ),
            ),
            (
                "TLS 1.2 static RSA",
                openssl_handshake(port, &["-tls1_2", "-cipher", "AES128-GCM-SHA256"]),
            ),
            (
                "TLS 1.1",
                openssl_handshake(port, &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]),
            ),
        ]
    })
    .await
    .expect("task");
    let accepted: Vec<&str> = results
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(name, _)| *name)
        .collect();
    assert_eq!(
        accepted,
        [
            "TLS 1.3",
            "TLS 1.2 ECDHE-ECDSA-AES128-GCM",
            "TLS 1.2 ECDHE-ECDSA-CHACHA20"
        ]
    );
    proxy.stop().await;
}
