//! A real third-party client: curl over HTTP/1.1 and HTTP/2 through the proxy, trusting the local CA.
//! Needs the `curl` program: run with `--include-ignored` (scripts/test.sh installs it).

mod common;

use std::process::Command;

use common::*;

fn curl(args: &[&str]) -> String {
    let output = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "20",
            "--dump-header",
            "-",
            "--output",
            "/dev/null",
        ])
        .args(args)
        .output()
        .expect("curl is installed (scripts/test.sh installs it)");
    assert!(
        output.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_ascii_lowercase()
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
            .args(["--silent", "--show-error", "--max-time", "20", "--http1.1", "--cacert", &root2])
            .args(["-H", "Expect: 100-continue", "--data-binary", &upload, &url2])
            .output()
            .expect("curl")
    })
    .await
    .expect("task");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), (3 * 1024 * 1024).to_string());

    let head = tokio::task::spawn_blocking(move || curl(&["--cacert", &root, "--head", &head_url]))
        .await
        .expect("task");
    assert!(head.starts_with("http/2 200"), "{head}");
    assert!(head.contains("content-length:"), "{head}");
    proxy.stop().await;
}
