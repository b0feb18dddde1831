//! `[compression]` on the real server over both protocols: JSON from the app and static CSS compressed
//! by what the client accepts, decompressing to the original; Django-style HTML left alone by default
//! (BREACH) and padded when opted in; precompressed static siblings, ranges and `no-transform` never
//! re-encoded.

mod common;

use std::io::Read;

use common::*;
use http::StatusCode;

const ALPNS: [&[&[u8]]; 2] = [&[b"http/1.1"], &[b"h2"]];

async fn get_raw(
    client: &mut Client,
    path: &str,
    port: u16,
    accept: &str,
) -> (http::Response<()>, Vec<u8>) {
    use http_body_util::BodyExt;
    let req = request("GET", path, port)
        .header("accept-encoding", accept)
        .body(full(""))
        .expect("request");
    let response = client.send(req).await.expect("response");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes().to_vec();
    (http::Response::from_parts(parts, ()), bytes)
}

fn gunzip(bytes: &[u8]) -> String {
    let mut out = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut out)
        .expect("gzip");
    out
}

fn static_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let css = "body { color: #123; margin: 0 auto; padding: 1em; }\n".repeat(100);
    std::fs::write(dir.path().join("app.css"), &css).expect("css");
    std::fs::write(dir.path().join("pre.css"), &css).expect("css");
    std::fs::write(dir.path().join("pre.css.br"), b"pretend-brotli").expect("br");
    dir
}

#[tokio::test]
async fn json_and_static_text_are_compressed_and_html_is_not_by_default() {
    let root = static_root();
    let (_upstream, proxy) = Proxy::with_upstream(&format!(
        "[[static]]\nurl = \"/static/\"\ndir = \"{}\"\n",
        root.path().display()
    ))
    .await;
    let port = proxy.https.port();
    for alpn in ALPNS {
        let mut client = proxy.client(alpn).await;
        let (response, body) =
            get_raw(&mut client, "/api/items/", port, "gzip, deflate, br, zstd").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-encoding"], "zstd");
        assert_eq!(response.headers()["vary"], "accept-encoding");
        assert!(body.len() < api_items().len() / 4, "{} bytes", body.len());
        // Every encoding decodes to what the app sent (gzip checked byte for byte here).
        let (response, body) = get_raw(&mut client, "/api/items/", port, "gzip").await;
        assert_eq!(response.headers()["content-encoding"], "gzip");
        assert_eq!(gunzip(&body), api_items());
        // The security headers are on compressed responses too.
        assert!(response.headers().contains_key("strict-transport-security"));
        // A static file without a precompressed sibling, compressed on the fly.
        let (response, body) = get_raw(&mut client, "/static/app.css", port, "gzip").await;
        assert_eq!(response.headers()["content-encoding"], "gzip");
        assert!(gunzip(&body).starts_with("body { color: #123;"));
        // The precompressed sibling wins, untouched.
        let (response, body) = get_raw(&mut client, "/static/pre.css", port, "br, gzip").await;
        assert_eq!(response.headers()["content-encoding"], "br");
        assert_eq!(body, b"pretend-brotli");
        // A range is never compressed.
        let req = request("GET", "/static/app.css", port)
            .header("accept-encoding", "gzip")
            .header("range", "bytes=0-3")
            .body(full(""))
            .expect("request");
        let (response, body) = client.fetch(req).await;
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(body, "body");
        // Django's HTML is left as it is: its CSRF token next to reflected text is BREACH's target.
        let (response, body) = get_raw(&mut client, "/page/", port, "gzip, br").await;
        assert!(response.headers().get("content-encoding").is_none());
        assert!(String::from_utf8_lossy(&body).contains("csrfmiddlewaretoken"));
        // A client that asks for nothing gets nothing.
        let (response, body) = get_raw(&mut client, "/api/items/", port, "identity").await;
        assert!(response.headers().get("content-encoding").is_none());
        assert_eq!(body, api_items().as_bytes());
    }
    proxy.stop().await;
}

#[tokio::test]
async fn opted_in_html_is_compressed_with_random_length_padding() {
    let (_upstream, proxy) = Proxy::with_upstream("[compression]\nhtml = true\n").await;
    let port = proxy.https.port();
    let mut client = proxy.client(&[b"h2"]).await;
    let mut lengths = std::collections::HashSet::new();
    for _ in 0..12 {
        let (response, body) = get_raw(&mut client, "/page/", port, "gzip").await;
        assert_eq!(response.headers()["content-encoding"], "gzip");
        let page = gunzip(&body);
        assert!(
            page.contains("csrfmiddlewaretoken") && page.contains("</html>\n<!-- "),
            "{page}"
        );
        lengths.insert(body.len());
    }
    assert!(
        lengths.len() >= 4,
        "the compressed length varies: {lengths:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn compression_can_be_turned_off() {
    let (_upstream, proxy) = Proxy::with_upstream("[compression]\nenabled = false\n").await;
    let port = proxy.https.port();
    let mut client = proxy.client(&[b"h2"]).await;
    let (response, body) = get_raw(&mut client, "/api/items/", port, "gzip, br, zstd").await;
    assert!(response.headers().get("content-encoding").is_none());
    assert_eq!(body, api_items().as_bytes());
    proxy.stop().await;
}
