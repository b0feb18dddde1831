//! ACME against a real ACME server: Let's Encrypt's pebble (Debian package), with pebble-challtestsrv
//! resolving every name to 127.0.0.1. Run with `--include-ignored` (scripts/test.sh installs pebble).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pebble::{DOMAIN, EAB_HMAC_KEY, EAB_KID, Pebble, served_leaf, wait_for_certificate};
use common::*;
use http::StatusCode;
use portcullis::acme::AcmeState;
use portcullis::config::Config;
use portcullis::server::RunningServer;

const H2: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The names most tests order for.
const NAMES: &[&str] = &[DOMAIN, "www.portcullis.test"];

#[allow(clippy::too_many_arguments)]
fn acme_config(
    https: u16,
    http: u16,
    state: &Path,
    pebble: &Pebble,
    upstream: &Upstream,
    challenge: &str,
    names: &[&str],
    acme_extra: &str,
) -> Config {
    let text = format!(
        "[server]\nhttps = \"127.0.0.1:{https}\"\nhttp = \"127.0.0.1:{http}\"\ndomains = {names:?}\nshutdown_grace = \"2s\"\n\
         [tls]\nsource = \"acme\"\ndir = \"{}\"\n\
         [acme]\ndirectory = \"{}\"\ndirectory_ca = \"{}\"\ncontact = [\"mailto:ops@portcullis.test\"]\nchallenge = \"{challenge}\"\n\
         retry_base_delay = \"1s\"\nretry_max_delay = \"8s\"\nrenew_check_interval = \"1s\"\n{acme_extra}{}\
         [upstream]\nurl = \"http://{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        state.display(),
        pebble.directory_url,
        pebble.ca().display(),
        if pebble.require_eab {
            format!("eab = {{ kid = \"{EAB_KID}\", hmac_key = \"{EAB_HMAC_KEY}\" }}\n")
        } else {
            String::new()
        },
        upstream.addr
    );
    Config::parse(&text, "acme-test", None).expect("valid config")
}

async fn request_through(https: u16, root: &Path) -> StatusCode {
    let addr = format!("127.0.0.1:{https}").parse().expect("addr");
    let mut client = Client::connect(addr, DOMAIN, root, H2)
        .await
        .expect("connect");
    let req = http::Request::builder()
        .uri(format!("https://{DOMAIN}:{https}/echo"))
        .body(full(""))
        .expect("request");
    client.fetch(req).await.0.status()
}

/// pebble validating against fresh ports, an upstream, and the proxy started ordering from pebble.
struct Ordering {
    https: u16,
    pebble: Pebble,
    upstream: Upstream,
    state: tempfile::TempDir,
    config: Config,
    server: RunningServer,
}

impl Ordering {
    async fn start(
        validity_secs: u64,
        challenge: &str,
        require_eab: bool,
        names: &[&str],
        acme_extra: &str,
    ) -> Ordering {
        let (https, http) = (fixed_port(), fixed_port());
        let pebble = Pebble::start(http, https, validity_secs, require_eab).await;
        let upstream = Upstream::start().await;
        let state = tempfile::tempdir().expect("state");
        let config = acme_config(
            https,
            http,
            state.path(),
            &pebble,
            &upstream,
            challenge,
            names,
            acme_extra,
        );
        let server = portcullis::server::start(config.clone())
            .await
            .expect("start");
        Ordering {
            https,
            pebble,
            upstream,
            state,
            config,
            server,
        }
    }
}

/// pebble, an upstream and the proxy ordering from pebble, up to the first certificate being served.
struct Issued {
    https: u16,
    pebble: Option<Pebble>,
    _upstream: Upstream,
    state: tempfile::TempDir,
    config: Config,
    server: RunningServer,
    root: PathBuf,
    first: Vec<u8>,
}

impl Issued {
    async fn start(validity_secs: u64, challenge: &str) -> Issued {
        Issued::launch(validity_secs, challenge, false).await
    }

    async fn launch(validity_secs: u64, challenge: &str, require_eab: bool) -> Issued {
        let Ordering {
            https,
            pebble,
            upstream,
            state,
            config,
            server,
        } = Ordering::start(validity_secs, challenge, require_eab, NAMES, "").await;
        let root = pebble.issuing_root(state.path()).await;
        let first = wait_for_certificate(https, &root, &pebble).await;
        Issued {
            https,
            pebble: Some(pebble),
            _upstream: upstream,
            state,
            config,
            server,
            root,
            first,
        }
    }

    fn status(&self) -> AcmeState {
        self.server
            .acme_status
            .clone()
            .expect("acme status")
            .snapshot()
    }
}

async fn stop(server: RunningServer) {
    server.shutdown();
    tokio::time::timeout(LIMIT, server.wait())
        .await
        .expect("stops");
}

#[tokio::test]
#[ignore = "needs pebble: run scripts/test.sh"]
async fn tls_alpn_01_issues_persists_and_restarts_without_a_new_order() {
    let issued = Issued::start(3600, "tls-alpn-01").await;
    let (https, root, state) = (issued.https, &issued.root, issued.state.path());
    assert_eq!(request_through(https, root).await, StatusCode::OK);
    // One certificate covers every configured name; SNI finds it for each.
    let addr = format!("127.0.0.1:{https}").parse().expect("addr");
    let www = tls_connect(addr, &format!("www.{DOMAIN}"), root, H2)
        .await
        .expect("www handshake");
    assert_eq!(
        www.get_ref().1.peer_certificates().expect("cert")[0].to_vec(),
        issued.first
    );

    use std::os::unix::fs::PermissionsExt;
    for (file, mode) in [("acme/key.pem", 0o600), ("acme/cert.pem", 0o644)] {
        let meta = std::fs::metadata(state.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    let accounts: Vec<_> = std::fs::read_dir(state.join("acme"))
        .expect("acme dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("account-"))
        .collect();
    assert_eq!(accounts.len(), 1);
    assert_eq!(
        accounts[0].metadata().expect("meta").permissions().mode() & 0o777,
        0o600
    );
    // One order, no fallback to HTTP-01: TLS-ALPN-01 itself worked.
    assert_eq!(
        (issued.status().orders_placed, issued.status().failures),
        (1, 0),
        "{:?}",
        issued.status()
    );
    // The metrics say the same, and when the renewal is due (an hour's certificate: within the hour).
    let metrics = issued.server.metrics_addr.expect("metrics listener");
    let scrape = scrape_metrics(metrics).await;
    let value = |name: &str| -> f64 {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(&format!("portcullis_{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{scrape}"))
            .parse()
            .expect("number")
    };
    assert_eq!(value("acme_orders_total"), 1.0);
    assert_eq!(value("acme_certificates_issued_total"), 1.0);
    assert_eq!(value("acme_failures_total"), 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let (renewal, expiry) = (
        value("acme_next_renewal_timestamp_seconds"),
        value("certificate_expiry_timestamp_seconds"),
    );
    assert!(
        now < renewal && renewal < expiry && expiry <= now + 3600.0,
        "{now} {renewal} {expiry}"
    );
    let Issued {
        server,
        config,
        first,
        ..
    } = issued;
    stop(server).await;

    // Restart on the same state: the stored certificate is served at once and no order is placed.
    let server = portcullis::server::start(config).await.expect("restart");
    let again = served_leaf(https, root)
        .await
        .expect("served immediately after restart");
    assert_eq!(again, first, "same certificate, not a new one");
    // Once the manager has scheduled the next renewal it has decided about the stored certificate.
    let status = server.acme_status.clone().expect("status");
    eventually("the manager schedules a renewal", || async {
        status.snapshot().next_renewal.is_some()
    })
    .await;
    assert_eq!(status.snapshot().orders_placed, 0);
    stop(server).await;
}

#[tokio::test]
#[ignore = "needs pebble: run scripts/test.sh"]
async fn http_01_issues_a_certificate() {
    let issued = Issued::start(3600, "http-01").await;
    assert_eq!(
        request_through(issued.https, &issued.root).await,
        StatusCode::OK
    );
    let snapshot = issued.status();
    assert_eq!((snapshot.issued, snapshot.failures), (1, 0), "{snapshot:?}");

    // A reload that adds a name: a new order covers it, without a restart, the old one serving meanwhile.
    let mut config = issued.config.clone();
    let api = format!("api.{DOMAIN}");
    let mut names: Vec<String> = config.server.domains.iter().map(str::to_string).collect();
    names.push(api.clone());
    config.server.domains = portcullis::config::Domains::new(names);
    issued.server.reload(config).expect("reload");
    let addr = format!("127.0.0.1:{}", issued.https).parse().expect("addr");
    wait_for(
        "a certificate for the added name",
        LIMIT,
        || async { tls_connect(addr, &api, &issued.root, H2).await.ok() },
        || format!("{:?}", issued.status()),
    )
    .await;
    assert_eq!(issued.status().issued, 2);
    assert_ne!(
        served_leaf(issued.https, &issued.root)
            .await
            .expect("served"),
        issued.first
    );
    stop(issued.server).await;
}

#[tokio::test]
#[ignore = "needs pebble: run scripts/test.sh"]
async fn http_01_with_external_account_binding() {
    // The CA refuses accounts without a valid binding (ZeroSSL, Google Trust Services work this way).
    let issued = Issued::launch(3600, "http-01", true).await;
    assert_eq!(
        request_through(issued.https, &issued.root).await,
        StatusCode::OK
    );
    assert_eq!(issued.status().failures, 0, "{:?}", issued.status());

    // The same CA without the binding in our config: the account is refused, and the log says why.
    let mut unbound = issued.config.clone();
    let state = tempfile::tempdir().expect("state");
    unbound.tls.dir = state.path().to_path_buf();
    unbound.server.https = "127.0.0.1:0".parse().expect("addr");
    unbound.server.http = Some("127.0.0.1:0".parse().expect("addr"));
    if let Some(acme) = unbound.acme.as_mut() {
        acme.eab = None;
    }
    let refused = portcullis::server::start(unbound)
        .await
        .expect("starts and keeps trying");
    let status = refused.acme_status.clone().expect("status");
    eventually("the CA refuses the account", || async {
        status.snapshot().failures > 0
    })
    .await;
    let error = status.snapshot().last_error.unwrap_or_default();
    assert!(error.contains("externalAccountRequired"), "{error}");
    stop(refused).await;
    stop(issued.server).await;
}

#[tokio::test]
#[ignore = "needs pebble: run scripts/test.sh"]
async fn renewal_swaps_the_certificate_without_failing_a_request() {
    // 24-second certificates: renewal is due after about 16 seconds.
    let issued = Issued::start(24, "tls-alpn-01").await;
    let (https, root) = (issued.https, &issued.root);

    // One long-lived HTTP/2 connection keeps requesting across the swap; new connections watch for it.
    let addr = format!("127.0.0.1:{https}").parse().expect("addr");
    let mut steady = Client::connect(addr, DOMAIN, root, H2)
        .await
        .expect("connect");
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut requests = 0;
    let renewed = loop {
        let req = http::Request::builder()
            .uri(format!("https://{DOMAIN}:{https}/echo"))
            .body(full(""))
            .expect("request");
        assert_eq!(
            steady.fetch(req).await.0.status(),
            StatusCode::OK,
            "request {requests} failed"
        );
        requests += 1;
        let leaf = served_leaf(https, root)
            .await
            .expect("every handshake succeeds during renewal");
        if leaf != issued.first {
            break leaf;
        }
        assert!(
            Instant::now() < deadline,
            "no renewal within 40s: {:?}",
            issued.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        requests > 10,
        "the client kept requesting across the swap ({requests})"
    );
    assert_eq!(request_through(https, root).await, StatusCode::OK);
    let stored =
        std::fs::read_to_string(issued.state.path().join("acme/cert.pem")).expect("stored chain");
    let stored_leaf = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_slice_iter(stored.as_bytes())
            .next()
            .expect("leaf")
            .expect("pem")
            .to_vec()
    };
    assert_eq!(
        stored_leaf, renewed,
        "the renewed certificate is the stored one"
    );
    stop(issued.server).await;
}

#[tokio::test]
#[ignore = "needs pebble: run scripts/test.sh"]
async fn acme_outage_keeps_the_old_certificate_and_backs_off() {
    // 36-second certificates: renewal is due after about 24 seconds, while the old one is still valid.
    let mut issued = Issued::start(36, "tls-alpn-01").await;
    let issued_at = Instant::now();
    drop(issued.pebble.take()); // the CA goes away
    let (https, root) = (issued.https, &issued.root);

    let deadline = issued_at + Duration::from_secs(34);
    loop {
        let leaf = served_leaf(https, root)
            .await
            .expect("the old certificate keeps serving");
        assert_eq!(leaf, issued.first);
        assert_eq!(request_through(https, root).await, StatusCode::OK);
        if issued.status().failures >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected 3 failed renewals by now: {:?}",
            issued.status()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let snapshot = issued.status();
    let gaps: Vec<Duration> = snapshot
        .failed_at
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default())
        .collect();
    // Base 1s, doubling, ±20% jitter: about 1s then 2s.
    assert!(
        gaps[0] >= Duration::from_millis(700) && gaps[0] <= Duration::from_millis(1800),
        "{gaps:?}"
    );
    assert!(
        gaps[1] > gaps[0] && gaps[1] >= Duration::from_millis(1500),
        "{gaps:?}"
    );
    assert!(snapshot.last_error.is_some());
    stop(issued.server).await;
}

#[tokio::test]
#[ignore = "needs pebble: run scripts/test.sh"]
async fn ip_addresses_get_certificates_by_either_challenge_and_an_unoffered_profile_is_named() {
    for challenge in ["http-01", "tls-alpn-01"] {
        let ordering = Ordering::start(3600, challenge, false, &["127.0.0.1"], "").await;
        let (https, pebble, server) = (ordering.https, &ordering.pebble, &ordering.server);
        let state = &ordering.state;
        let root = pebble.issuing_root(state.path()).await;
        let addr: std::net::SocketAddr = format!("127.0.0.1:{https}").parse().expect("addr");
        // A client connecting by address sends no SNI (RFC 6066 §3); the IP certificate answers it.
        let leaf = wait_for(
            &format!("an IP certificate by {challenge}"),
            Duration::from_secs(60),
            || async {
                let tls = tls_connect(addr, "127.0.0.1", &root, H2).await.ok()?;
                tls.get_ref()
                    .1
                    .peer_certificates()?
                    .first()
                    .map(|c| c.to_vec())
            },
            || format!("pebble log:\n{}", pebble.log()),
        )
        .await;
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).expect("parse");
        let san = parsed
            .subject_alternative_name()
            .expect("san")
            .expect("present");
        assert!(
            san.value.general_names.iter().any(|n| matches!(
                n,
                x509_parser::extensions::GeneralName::IPAddress([127, 0, 0, 1])
            )),
            "{:?}",
            san.value.general_names
        );
        let status = server.acme_status.clone().expect("acme").snapshot();
        assert_eq!(
            (status.orders_placed, status.failures),
            (1, 0),
            "{challenge}: {status:?}"
        );
        let mut client = Client::connect(addr, "127.0.0.1", &root, H2)
            .await
            .expect("connect");
        let req = http::Request::builder()
            .uri(format!("https://127.0.0.1:{https}/echo"))
            .body(full(""))
            .expect("request");
        assert_eq!(client.fetch(req).await.0.status(), StatusCode::OK);
        stop(ordering.server).await;
    }

    // pebble 2.4 advertises no profiles: a configured one fails the order with the key named, and
    // nothing is issued.
    let ordering = Ordering::start(
        3600,
        "tls-alpn-01",
        false,
        NAMES,
        "profile = \"tlsserver\"\n",
    )
    .await;
    let server = ordering.server;
    let status = server.acme_status.clone().expect("acme");
    let error = wait_for(
        "the order to fail on the profile",
        LIMIT,
        || std::future::ready(status.snapshot().last_error),
        || format!("{:?}", status.snapshot()),
    )
    .await;
    assert!(
        error.contains("acme.profile = \"tlsserver\"")
            && error.contains("offers no certificate profiles"),
        "{error}"
    );
    // Refused before anything was sent to the CA.
    assert_eq!(
        (status.snapshot().issued, status.snapshot().orders_placed),
        (0, 0)
    );
    stop(server).await;
}
