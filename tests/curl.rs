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
