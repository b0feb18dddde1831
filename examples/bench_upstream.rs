//! A cheap, fixed upstream for the load benchmarks (benches/load.py): every request gets the same ~1 KB
//! HTML page and one bare `Set-Cookie`, so the proxy's own cost dominates what is measured.
//! Usage: bench_upstream [PORT] (default 18080), serving on 127.0.0.1 with one runtime thread.
//! `GET /api/items.json` answers a 6.5 KiB JSON list instead (the compression mode of benches/load.py).
//! `GET /__connections` answers how many connections it has accepted (benches/pool.py counts the
//! proxy's new upstream connections with it).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

static ACCEPTED: AtomicU64 = AtomicU64::new(0);

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue, SET_COOKIE};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

fn page() -> Bytes {
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>bench</title></head><body>",
    );
    while html.len() < 1000 {
        html.push_str("<p>portcullis benchmark page: a fixed body of about one kilobyte.</p>");
    }
    html.push_str("</body></html>\n");
    Bytes::from(html)
}

/// A page of a typical Django REST list: 100 small objects, 6.5 KiB, compressible.
fn items_json() -> Bytes {
    let items: Vec<String> = (0..100)
        .map(|i| {
            format!(r#"{{"id": {i}, "name": "item {i}", "price": "{i}.00", "in_stock": true}}"#)
        })
        .collect();
    Bytes::from(format!(
        r#"{{"count": 100, "results": [{}]}}"#,
        items.join(", ")
    ))
}

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(18080);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let body = page();
        let json = items_json();
        loop {
            let (stream, _) = listener.accept().await?;
            ACCEPTED.fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            let (body, json) = (body.clone(), json.clone());
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (body, content_type) = match req.uri().path() {
                            "/__connections" => (
                                Bytes::from(ACCEPTED.load(Ordering::Relaxed).to_string()),
                                "text/plain",
                            ),
                            "/api/items.json" => (json.clone(), "application/json"),
                            _ => (body.clone(), "text/html; charset=utf-8"),
                        };
                        async move {
                            let mut response = Response::new(Full::new(body));
                            let headers = response.headers_mut();
                            headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                            headers.insert(
                                SET_COOKIE,
                                "sessionid=abc123; Path=/".parse().expect("static"),
                            );
                            Ok::<_, Infallible>(response)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
