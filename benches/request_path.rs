//! Micro benchmarks of the per-request work portcullis adds: the security-header layer, the Set-Cookie
//! rewrite, the forwarded-header rewrite, the redirect builder and choosing a backend (one and two, each
//! policy). `cargo bench --bench request_path`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use portcullis::config::{Config, CookiePolicy, SameSite};
use portcullis::middleware::cookies::harden_set_cookie;
use portcullis::middleware::{CookieHardening, HeaderRewrite, SecurityHeaderPolicy};
use portcullis::proxy::headers::{ForwardingPolicy, join_cookie_fields, remove_hop_by_hop};
use portcullis::server::plain::https_location;

fn config() -> Config {
    let text =
        "[server]\ndomains = [\"example.com\"]\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n";
    Config::parse(text, "bench", None).expect("valid")
}

/// What Gunicorn + Django typically send back.
fn django_response_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert("content-length", HeaderValue::from_static("1024"));
    h.insert("server", HeaderValue::from_static("gunicorn"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("vary", HeaderValue::from_static("Cookie"));
    h.append("set-cookie", HeaderValue::from_static("csrftoken=abcdef0123456789; expires=Wed, 25 Nov 2027 12:00:00 GMT; Max-Age=31449600; Path=/; SameSite=Lax"));
    h.append("set-cookie", HeaderValue::from_static("sessionid=0123456789abcdef; expires=Wed, 09 Dec 2026 12:00:00 GMT; HttpOnly; Max-Age=1209600; Path=/; SameSite=Lax"));
    h
}

fn browser_request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("example.com"));
    h.insert(
        "user-agent",
        HeaderValue::from_static("Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"),
    );
    h.insert(
        "accept",
        HeaderValue::from_static("text/html,application/xhtml+xml"),
    );
    h.insert(
        "accept-language",
        HeaderValue::from_static("en-US,en;q=0.5"),
    );
    h.insert(
        "accept-encoding",
        HeaderValue::from_static("gzip, deflate, br"),
    );
    h.insert(
        "cookie",
        HeaderValue::from_static("csrftoken=abcdef; sessionid=0123456789"),
    );
    h.insert("connection", HeaderValue::from_static("keep-alive"));
    h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
    h
}

fn benches(c: &mut Criterion) {
    let config = config();
    let https = SecurityHeaderPolicy::for_https(&config.headers);
    let response = django_response_headers();
    c.bench_function("security_headers/apply", |b| {
        b.iter_batched_ref(
            || response.clone(),
            |h| https.apply(black_box(h)),
            criterion::BatchSize::SmallInput,
        )
    });

    let cookies = CookieHardening::new(config.cookies.clone());
    c.bench_function("cookies/rewrite_response", |b| {
        b.iter_batched_ref(
            || response.clone(),
            |h| cookies.rewrite(black_box(h)),
            criterion::BatchSize::SmallInput,
        )
    });
    let policy = CookiePolicy {
        secure: true,
        http_only: true,
        same_site: Some(SameSite::Lax),
        http_only_exempt: vec!["csrftoken".into()],
        session_only: Vec::new(),
    };
    c.bench_function("cookies/harden_one", |b| {
        b.iter(|| {
            harden_set_cookie(
                black_box(b"sessionid=0123456789abcdef; Max-Age=1209600; Path=/"),
                &policy,
            )
        })
    });

    let forwarding = ForwardingPolicy::default();
    let request = browser_request_headers();
    let peer = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
    c.bench_function("forwarded/rewrite_request", |b| {
        b.iter_batched_ref(
            || request.clone(),
            |h| {
                remove_hop_by_hop(h);
                join_cookie_fields(h);
                forwarding.set_forwarded_headers(black_box(h), peer, None, true);
            },
            criterion::BatchSize::SmallInput,
        )
    });

    c.bench_function("redirect/location", |b| {
        b.iter(|| {
            https_location(
                black_box("example.com"),
                443,
                black_box("/accounts/login/?next=/admin/"),
            )
        })
    });
}

/// Choosing a backend and letting it go again (the in-flight count), as every proxied request does.
fn choosing_a_backend(c: &mut Criterion) {
    use portcullis::proxy::pool::Pool;
    for (name, upstream) in [
        ("one", "url = \"http://127.0.0.1:8000\"".to_string()),
        (
            "two_least_requests",
            "urls = [\"http://127.0.0.1:8000\", \"http://127.0.0.1:8001\"]".to_string(),
        ),
        (
            "two_round_robin",
            "urls = [\"http://127.0.0.1:8000\", \"http://127.0.0.1:8001\"]\npolicy = \"round_robin\""
                .to_string(),
        ),
    ] {
        let text = format!("[server]\ndomains = [\"example.com\"]\n[upstream]\n{upstream}\n");
        let config = Config::parse(&text, "bench", None).expect("valid");
        let pool = Pool::new(&config.upstream);
        c.bench_function(&format!("pool/choose_{name}"), |b| {
            b.iter(|| black_box(pool.choose(black_box(&[]), true).ok()))
        });
    }
}

criterion_group!(request_path, benches, choosing_a_backend);
criterion_main!(request_path);
