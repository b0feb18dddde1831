//! Edge defences beyond headers, on the real server over both protocols: cross-origin request
//! protection (what browsers mark cross-site is refused before the app, what no browser sent passes),
//! and the failed-login lockout (failures per client, a success clearing the count). Each refusal is
//! counted in `portcullis_security_events_total`; the log lines are checked on the binary
//! (`tests/binary.rs`).

mod common;

use common::*;
use http::StatusCode;

const ALPNS: [&[u8]; 2] = [b"http/1.1", b"h2"];

/// Method, path, request headers, and whether the proxy refuses it.
type Case = (
    &'static str,
    &'static str,
    Vec<(&'static str, String)>,
    bool,
);

fn metric(scrape: &str, cause: &str) -> u64 {
    let needle = format!("portcullis_security_events_total{{cause=\"{cause}\"}} ");
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {needle} in\n{scrape}"))
}

#[tokio::test]
async fn unsafe_cross_origin_requests_from_browsers_are_refused_before_the_app() {
    let (upstream, proxy) = Proxy::with_upstream(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[cross_origin]\ntrusted_origins = [\"https://pay.example.net\"]\nexempt = [\"/saml/acs/\"]\n",
    )
    .await;
    let port = proxy.https.port();
    let own_origin = format!("https://localhost:{port}");
    let cases: Vec<Case> = vec![
        // A form on another site posting here.
        (
            "POST",
            "/transfer/",
            vec![("sec-fetch-site", "cross-site".into())],
            true,
        ),
        (
            "DELETE",
            "/item/1/",
            vec![("sec-fetch-site", "cross-site".into())],
            true,
        ),
        // A sibling subdomain is not this site unless allowed.
        (
            "PUT",
            "/item/1/",
            vec![("sec-fetch-site", "same-site".into())],
            true,
        ),
        // An older browser: Origin only, and not ours.
        (
            "POST",
            "/transfer/",
            vec![("origin", "https://evil.example".into())],
            true,
        ),
        ("POST", "/transfer/", vec![("origin", "null".into())], true),
        // Our own pages.
        (
            "POST",
            "/transfer/",
            vec![("sec-fetch-site", "same-origin".into())],
            false,
        ),
        (
            "POST",
            "/transfer/",
            vec![("origin", own_origin.clone())],
            false,
        ),
        // curl, a webhook, a server-to-server call: neither header.
        ("POST", "/api/hook/", vec![], false),
        // Reading is never refused.
        (
            "GET",
            "/page/",
            vec![("sec-fetch-site", "cross-site".into())],
            false,
        ),
        // Trusted origins and exempt paths (in every spelling Django routes the same way).
        (
            "POST",
            "/checkout/return/",
            vec![
                ("sec-fetch-site", "cross-site".into()),
                ("origin", "https://pay.example.net".into()),
            ],
            false,
        ),
        (
            "POST",
            "/saml/acs/",
            vec![
                ("sec-fetch-site", "cross-site".into()),
                ("origin", "https://idp.example.org".into()),
            ],
            false,
        ),
        (
            "POST",
            "/saml/%61cs/",
            vec![("sec-fetch-site", "cross-site".into())],
            false,
        ),
        (
            "POST",
            "/saml/",
            vec![("sec-fetch-site", "cross-site".into())],
            true,
        ),
    ];
    let mut refused = 0;
    for alpn in ALPNS {
        let mut client = proxy.client(&[alpn]).await;
        for (method, path, headers, expect_refused) in &cases {
            let before = upstream.count();
            let mut req = request(method, path, port);
            for (name, value) in headers {
                req = req.header(*name, value.as_str());
            }
            let (response, body) = client.fetch(req.body(full("a=1")).expect("request")).await;
            let what = format!(
                "{method} {path} {headers:?} over {}",
                String::from_utf8_lossy(alpn)
            );
            if *expect_refused {
                refused += 1;
                assert_eq!(response.status(), StatusCode::FORBIDDEN, "{what}");
                assert!(
                    body.contains("cross_origin.exempt"),
                    "the page names the key: {body}"
                );
                assert_eq!(upstream.count(), before, "{what} reached the app");
                // Our own answer carries the security headers like any other.
                assert!(response.headers().contains_key("strict-transport-security"));
            } else {
                assert_eq!(response.status(), StatusCode::OK, "{what}: {body}");
                assert_eq!(upstream.count(), before + 1, "{what}");
            }
            if response
                .headers()
                .get("connection")
                .is_some_and(|v| v == "close")
            {
                client = proxy.client(&[alpn]).await;
            }
        }
    }
    let scrape = scrape_metrics(proxy.server().metrics_addr.expect("metrics")).await;
    assert_eq!(metric(&scrape, "cross_origin_refused"), refused);
    assert_eq!(metric(&scrape, "cross_origin_reported"), 0);
}

#[tokio::test]
async fn report_mode_lets_cross_origin_requests_through_and_counts_them() {
    let (upstream, proxy) = Proxy::with_upstream(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[cross_origin]\nmode = \"report\"\n",
    )
    .await;
    let port = proxy.https.port();
    let mut client = proxy.client(&[b"h2"]).await;
    let req = request("POST", "/transfer/", port)
        .header("sec-fetch-site", "cross-site")
        .body(full("a=1"))
        .expect("request");
    let (response, _) = client.fetch(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(upstream.count(), 1);
    let scrape = scrape_metrics(proxy.server().metrics_addr.expect("metrics")).await;
    assert_eq!(metric(&scrape, "cross_origin_reported"), 1);
    assert_eq!(metric(&scrape, "cross_origin_refused"), 0);
}

async fn log_in_at(
    client: &mut Client,
    port: u16,
    path: &str,
    password: &str,
) -> (StatusCode, Option<String>) {
    let req = request("POST", path, port)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(full(format!("password={password}")))
        .expect("request");
    let (response, _) = client.fetch(req).await;
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (response.status(), retry_after)
}

async fn log_in(client: &mut Client, port: u16, password: &str) -> StatusCode {
    log_in_at(client, port, "/login/", password).await.0
}

#[tokio::test]
async fn failed_logins_lock_one_client_out_and_a_success_clears_the_count() {
    for alpn in ALPNS {
        let (upstream, proxy) = Proxy::with_upstream(
            "[metrics]\nlisten = \"127.0.0.1:0\"\n[[login_lockout]]\npath = \"/login/\"\nfailures = 3\nlockout = \"10m\"\n",
        )
        .await;
        let port = proxy.https.port();
        let mut client = proxy.client(&[alpn]).await;
        // Two failures, then a success: the count starts again.
        assert_eq!(log_in(&mut client, port, "wrong").await, StatusCode::OK);
        assert_eq!(log_in(&mut client, port, "wrong").await, StatusCode::OK);
        assert_eq!(log_in(&mut client, port, "right").await, StatusCode::FOUND);
        // Three failures in a row lock the client out, the right password too, before the app.
        for _ in 0..3 {
            assert_eq!(log_in(&mut client, port, "wrong").await, StatusCode::OK);
        }
        let before = upstream.count();
        let (status, retry_after) = log_in_at(&mut client, port, "/login/", "right").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        let retry_after: u64 = retry_after
            .and_then(|v| v.parse().ok())
            .expect("Retry-After");
        assert!((590..=600).contains(&retry_after), "{retry_after}");
        // A refusal ends an HTTP/1.1 connection (as every client error here does).
        let mut client = proxy.client(&[alpn]).await;
        // Every spelling of the path is the same path.
        let (status, _) = log_in_at(&mut client, port, "/%6Cogin/", "right").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            upstream.count(),
            before,
            "a locked-out login never reaches the app"
        );
        let mut client = proxy.client(&[alpn]).await;
        // The form itself still shows.
        let (page, _) = client.get("/login/", port).await;
        assert_eq!(page.status(), StatusCode::OK);
        // Another client address has its own count.
        let mut other = proxy.client_from_another_address(&[alpn]).await;
        assert_eq!(log_in(&mut other, port, "right").await, StatusCode::FOUND);
        let scrape = scrape_metrics(proxy.server().metrics_addr.expect("metrics")).await;
        assert_eq!(metric(&scrape, "failed_login"), 5);
        assert_eq!(metric(&scrape, "locked_out"), 2);
    }
}

#[tokio::test]
async fn parallel_guesses_cannot_outrun_the_lockout() {
    let (upstream, proxy) =
        Proxy::with_upstream("[[login_lockout]]\npath = \"/login/\"\nfailures = 3\n").await;
    let port = proxy.https.port();
    let client = proxy.client(&[b"h2"]).await;
    let Sender::H2(sender) = &client.sender else {
        panic!("h2 was offered");
    };
    // 20 guesses at once on one HTTP/2 connection, each taking the app half a second: only 3 get there.
    let mut guesses = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let mut client = Client {
            sender: Sender::H2(sender.clone()),
            alpn: client.alpn.clone(),
        };
        guesses.spawn(async move {
            log_in_at(&mut client, port, "/login/slow/", "wrong")
                .await
                .0
        });
    }
    let mut statuses = Vec::new();
    while let Some(status) = guesses.join_next().await {
        statuses.push(status.expect("task"));
    }
    let answered = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(answered, 3, "{statuses:?}");
    assert_eq!(upstream.count(), 3);
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count(),
        17
    );
}

fn csp_report(port: u16, content_type: &str, body: &str) -> http::Request<TestBody> {
    request("POST", "/_portcullis/csp-report", port)
        .header("content-type", content_type)
        .body(full(body.to_string()))
        .expect("request")
}

/// The CSP report collector: both report formats accepted (204) and counted by directive, never sent
/// to the app; the policies name it; wrong methods, types, sizes and floods get their own answers.
#[tokio::test]
async fn csp_reports_are_collected_at_the_edge_and_never_reach_the_app() {
    let (upstream, proxy) = Proxy::with_upstream(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[csp_reports]\nmax_body = \"1KiB\"\nrequests = 5\nper = \"1h\"\n",
    )
    .await;
    let port = proxy.https.port();
    let mut client = proxy.client(&[b"h2"]).await;
    let (page, _) = client.get("/page/", port).await;
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("ascii");
    assert!(
        csp.ends_with("; report-uri /_portcullis/csp-report; report-to csp-endpoint"),
        "{csp}"
    );
    assert_eq!(
        page.headers()["reporting-endpoints"],
        "csp-endpoint=\"/_portcullis/csp-report\""
    );
    let before = upstream.count();
    let level_two = r#"{"csp-report":{"document-uri":"https://localhost/admin/","violated-directive":"script-src-elem","effective-directive":"script-src-elem","blocked-uri":"inline","disposition":"enforce"}}"#;
    let (answer, _) = client
        .fetch(csp_report(port, "application/csp-report", level_two))
        .await;
    assert_eq!(answer.status(), StatusCode::NO_CONTENT);
    let reporting_api = r#"[{"type":"csp-violation","url":"https://localhost/","body":{"documentURL":"https://localhost/","effectiveDirective":"img-src","blockedURL":"https://tracker.example/p.gif","disposition":"enforce"}},{"type":"csp-violation","body":{"effectiveDirective":"made-up-src"}}]"#;
    let (answer, _) = client
        .fetch(csp_report(port, "application/reports+json", reporting_api))
        .await;
    assert_eq!(answer.status(), StatusCode::NO_CONTENT);
    // Refusals, each its own answer.
    let (answer, _) = client.get("/_portcullis/csp-report", port).await;
    assert_eq!(answer.status(), StatusCode::METHOD_NOT_ALLOWED);
    let mut client = proxy.client(&[b"h2"]).await;
    let (answer, _) = client
        .fetch(csp_report(port, "text/plain", level_two))
        .await;
    assert_eq!(answer.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let big = format!(
        r#"{{"csp-report":{{"blocked-uri":"{}"}}}}"#,
        "a".repeat(2000)
    );
    let (answer, _) = client
        .fetch(csp_report(port, "application/csp-report", &big))
        .await;
    assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (answer, _) = client
        .fetch(csp_report(port, "application/json", "nonsense"))
        .await;
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    // The budget (5 per hour: two reports, the oversized and the nonsense spent four) runs out.
    let (answer, _) = client
        .fetch(csp_report(port, "application/csp-report", level_two))
        .await;
    assert_eq!(answer.status(), StatusCode::NO_CONTENT);
    let (answer, _) = client
        .fetch(csp_report(port, "application/csp-report", level_two))
        .await;
    assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(upstream.count(), before, "no report reached the app");
    let scrape = scrape_metrics(proxy.server().metrics_addr.expect("metrics")).await;
    for (directive, count) in [("script-src-elem", 2), ("img-src", 1), ("other", 1)] {
        let line = format!("portcullis_csp_reports_total{{directive=\"{directive}\"}} {count}");
        assert!(scrape.contains(&line), "{line} in\n{scrape}");
    }
    assert_eq!(metric(&scrape, "csp_report"), 4);
}
