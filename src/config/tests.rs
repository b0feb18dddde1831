//! Config errors must name the key and line; defaults must be the safe ones.

use super::*;

const MINIMAL: &str = r#"
[server]
domains = ["Example.com", "www.example.com"]
[upstream]
url = "http://127.0.0.1:8000"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "test.toml", None)
}

fn error_of(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn minimal_config_gets_safe_defaults() {
    let config = parse(MINIMAL).expect("valid");
    assert_eq!(config.server.https, "0.0.0.0:443".parse().expect("addr"));
    assert!(config.server.domains.contains("example.com"));
    assert!(config.server.domains.contains("EXAMPLE.COM."));
    assert!(!config.server.domains.contains("evil.com"));
    assert_eq!(config.tls.source, TlsSource::Local);
    assert_eq!(config.limits.max_body, DJANGO_DATA_UPLOAD_MAX_MEMORY_SIZE);
    assert_eq!(config.cookies.same_site, Some(SameSite::Lax));
    assert_eq!(
        config.cookies.http_only_exempt,
        vec!["csrftoken".to_string()]
    );
    let hsts = &config.headers.https_only_rules[0];
    assert_eq!(hsts.value, "max-age=31536000; includeSubDomains");
    let names: Vec<&str> = config
        .headers
        .rules
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "content-security-policy",
            "x-frame-options",
            "x-content-type-options",
            "referrer-policy",
            "permissions-policy",
            "cross-origin-opener-policy",
            "cross-origin-resource-policy"
        ]
    );
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let err = error_of(
        "[server]\ndomains = [\"a.example\"]\ndomain = \"x\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n",
    );
    assert!(
        err.starts_with("test.toml:3:1: `server.domain`: unknown field `domain`"),
        "{err}"
    );
}

#[test]
fn wrong_type_is_named() {
    let err =
        error_of("[server]\ndomains = \"a.example\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n");
    assert!(
        err.starts_with("test.toml:2:11: `server.domains`: invalid type"),
        "{err}"
    );
}

#[test]
fn invalid_values_name_key_and_line() {
    let err = error_of(
        "[server]\ndomains = [\"exa mple.com\"]\n[upstream]\nurl = \"http://127.0.0.1:1\"\n",
    );
    assert!(err.starts_with("test.toml:2: `server.domains`"), "{err}");

    let err = error_of(&format!("{MINIMAL}[limits]\nbody_timeout = \"30\"\n"));
    assert!(err.contains("no unit"), "{err}");

    let err = error_of(&format!(
        "{MINIMAL}[headers.x_frame_options]\nmode = \"sometimes\"\n"
    ));
    assert!(
        err.starts_with(
            "test.toml:7:8: `headers.x_frame_options.mode`: unknown variant `sometimes`, \
             expected one of `override`, `if-absent`, `off`"
        ),
        "{err}"
    );
    let err = error_of(&format!("{MINIMAL}[log]\nformat = \"xml\"\n"));
    assert!(
        err.contains("`log.format`: unknown variant `xml`, expected `text` or `json`"),
        "{err}"
    );
    let err = error_of(&format!(
        "{MINIMAL}[log]\nformat = \"text\"\naccess_format = \"json\"\n"
    ));
    assert!(
        err.contains("`log.access_format`: `text` and `json` access lines")
            && err.contains("or use `combined`"),
        "{err}"
    );
    let err = error_of(&format!("{MINIMAL}[log]\naccess_format = \"clf\"\n"));
    assert!(
        err.contains("expected one of `text`, `json`, `combined`"),
        "{err}"
    );
    let err = error_of(&format!("{MINIMAL}[cookies]\nsame_site = \"sometimes\"\n"));
    assert!(
        err.contains("`cookies.same_site`: unknown variant"),
        "{err}"
    );
    assert!(parse(&format!("{MINIMAL}[cookies]\nsame_site = \"strict\"\n")).is_ok());

    let err = error_of(
        "[server]\ndomains = [\"a.example\"]\n[upstream]\nurl = \"https://127.0.0.1:1\"\n",
    );
    assert!(err.contains("`upstream.url`"), "{err}");

    let err = error_of(&format!("{MINIMAL}[limits]\nmax_connections = 0\n"));
    assert!(
        err.contains("`limits.max_connections`: must be 1..=1000000"),
        "{err}"
    );

    let err = error_of(&format!("{MINIMAL}[tls]\nsource = \"files\"\n"));
    assert!(err.contains("tls.cert"), "{err}");

    let err = error_of(&format!(
        "{MINIMAL}[headers.strict_transport_security]\npreload = true\nmax_age = \"30d\"\n"
    ));
    assert!(err.contains("preload requires"), "{err}");
}

#[test]
fn header_modes_and_values() {
    let config = parse(&format!(
        "{MINIMAL}[headers.x_frame_options]\nmode = \"override\"\nvalue = \"SAMEORIGIN\"\n\
         [headers.cross_origin_opener_policy]\nmode = \"off\"\n\
         [headers.content_security_policy_report_only]\nvalue = \"default-src 'none'\"\n"
    ))
    .expect("valid");
    let xfo = config
        .headers
        .rules
        .iter()
        .find(|r| r.name == "x-frame-options")
        .expect("xfo");
    assert_eq!(
        (xfo.mode, xfo.value.to_str().ok()),
        (HeaderMode::Override, Some("SAMEORIGIN"))
    );
    assert!(
        !config
            .headers
            .rules
            .iter()
            .any(|r| r.name == "cross-origin-opener-policy")
    );
    assert!(
        config
            .headers
            .rules
            .iter()
            .any(|r| r.name == "content-security-policy-report-only")
    );
}

#[test]
fn no_referrer_is_accepted_with_a_warning() {
    let config = parse(&format!(
        "{MINIMAL}[headers.referrer_policy]\nvalue = \"no-referrer\"\n"
    ))
    .expect("valid");
    assert!(
        config.warnings.iter().any(|w| w.contains("CSRF")),
        "{:?}",
        config.warnings
    );
    let err = error_of(&format!(
        "{MINIMAL}[headers.referrer_policy]\nvalue = \"same-orign\"\n"
    ));
    assert!(err.contains("unknown policy"), "{err}");
}

#[test]
fn unix_upstream_and_relative_paths_resolve_against_the_config_folder() {
    let text =
        "[server]\ndomains = [\"a.example\"]\n[upstream]\nurl = \"unix:run/gunicorn.sock\"\n";
    let config = Config::parse(text, "x", Some(Path::new("/etc/portcullis"))).expect("valid");
    assert_eq!(
        config.upstream.backends[0].target,
        UpstreamTarget::Unix("/etc/portcullis/run/gunicorn.sock".into())
    );
    assert_eq!(config.tls.dir, PathBuf::from("/etc/portcullis/certs"));
}

#[test]
fn trusted_proxy_ranges() {
    use std::net::IpAddr;
    let parse = |s: &str| super::validate::parse_ip_net(s).expect("range");
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    assert!(parse("10.0.0.0/8").contains(&ip("10.1.2.3")));
    assert!(!parse("10.0.0.0/8").contains(&ip("11.0.0.1")));
    assert!(parse("::1").contains(&ip("::1")));
    assert!(super::validate::parse_ip_net("10.0.0.0/33").is_err());
    assert!(super::validate::parse_ip_net("example.com").is_err());
    assert!(parse("0.0.0.0/0").contains(&ip("192.0.2.1")));
    // IPv4-mapped peers are matched as IPv4 by `context::TrustedProxies`, which is tested there.
}

#[test]
fn shipped_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["config/portcullis.toml", "config/production.example.toml"] {
        let config = Config::load(&root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(config.warnings.is_empty(), "{file}: {:?}", config.warnings);
    }
}

/// The example file documents each default as a commented `# key = value` line. Uncommenting all of them
/// must change nothing: otherwise the file and the code disagree about a default.
#[test]
fn the_example_files_documented_defaults_are_the_codes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("config/production.example.toml");
    let text = std::fs::read_to_string(&path).expect("example");
    // Commented lines that show an example rather than the default (`public_https_port`'s default is
    // "the port of `https`", which the example spells out; the health-check settings apply only with a
    // `health_path`, and their defaults are checked in `several_backends_and_error_pages_are_checked`).
    const EXAMPLES: [&str; 17] = [
        "urls",
        "weights",
        "health_path",
        "health_interval",
        "health_timeout",
        "healthy_threshold",
        "unhealthy_threshold",
        "workers",
        "public_https_port",
        "health_path",
        "trusted_proxies",
        "proxy_protocol",
        "cert",
        "key",
        "directory_ca",
        "eab",
        "profile",
    ];
    let mut in_real_section = false;
    let mut uncommented = Vec::new();
    let mut count = 0;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            in_real_section = true;
        } else if trimmed.starts_with("# [") {
            in_real_section = false;
        }
        let documented = trimmed
            .strip_prefix("# ")
            .and_then(|rest| rest.split_once(" = ").map(|(key, _)| (key, rest)))
            .filter(|(key, _)| key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        match documented {
            Some((key, rest)) if in_real_section && !EXAMPLES.contains(&key) => {
                uncommented.push(rest.to_string());
                count += 1;
            }
            _ => uncommented.push(line.to_string()),
        }
    }
    assert!(count >= 20, "only {count} documented defaults found");
    let base = Some(path.parent().expect("folder"));
    let as_shipped = Config::parse(&text, "example", base).expect("example parses");
    let with_defaults =
        Config::parse(&uncommented.join("\n"), "example", base).expect("uncommented parses");
    assert_eq!(
        format!("{as_shipped:#?}"),
        format!("{with_defaults:#?}"),
        "a documented default differs from the code's"
    );
}

#[test]
fn parse_errors_name_the_key_at_their_position() {
    let text = "[server]\ndomains = [\"a.example\"]\n[upstream]\nurl = \"http://127.0.0.1:1\"\n[headers.x_frame_options]\nmode = 3\n";
    let err = error_of(text);
    assert!(
        err.starts_with("test.toml:6:8: `headers.x_frame_options.mode`: wanted string"),
        "{err}"
    );
    let err = error_of(&format!("{MINIMAL}[limits]\nmax_body = \"lots\"\n"));
    assert!(
        err.contains("`limits.max_body`: `lots`: unknown size unit"),
        "{err}"
    );
    let err = error_of(&format!("{MINIMAL}[serverr]\nx = 1\n"));
    assert!(
        err.contains("`serverr`: unknown field `serverr`, expected one of `server`"),
        "{err}"
    );
}

#[test]
fn metrics_listener_is_checked_and_warned_about_off_loopback() {
    assert_eq!(parse(MINIMAL).expect("valid").metrics, None);
    let config = parse(&format!(
        "{MINIMAL}[metrics]\nlisten = \"127.0.0.1:9100\"\n"
    ))
    .expect("valid");
    assert_eq!(
        config.metrics,
        Some("127.0.0.1:9100".parse().expect("addr"))
    );
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    assert!(config.summary().contains("http://127.0.0.1:9100/metrics"));

    let config = parse(&format!("{MINIMAL}[metrics]\nlisten = \"0.0.0.0:9100\"\n")).expect("valid");
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("no authentication")),
        "{:?}",
        config.warnings
    );

    let err = error_of(&format!("{MINIMAL}[metrics]\nlisten = \"9100\"\n"));
    assert!(err.starts_with("test.toml:7: `metrics.listen`"), "{err}");
    let err = error_of(&format!("{MINIMAL}[metrics]\nlisten = \"0.0.0.0:443\"\n"));
    assert!(err.contains("must differ from server.https"), "{err}");
    let err = error_of(&format!("{MINIMAL}[metrics]\nport = 9100\n"));
    assert!(
        err.contains("`metrics.port`: unknown field `port`"),
        "{err}"
    );
}

#[test]
fn static_mounts_are_checked_and_named_by_index() {
    let dir = std::env::temp_dir();
    let dir = dir.display();
    let config = parse(&format!(
        "{MINIMAL}[[static]]\nurl = \"/static/\"\ndir = \"{dir}\"\n\
         [[static]]\nurl = \"/static/admin/\"\ndir = \"{dir}\"\ncache_control = \"public, max-age=60\"\n"
    ))
    .expect("valid");
    let urls: Vec<&str> = config.static_files.iter().map(|m| m.url.as_str()).collect();
    assert_eq!(urls, ["/static/admin/", "/static/"], "longest prefix first");
    assert!(config.summary().contains("static:   /static/ → "));

    let err = error_of(&format!(
        "{MINIMAL}[[static]]\nurl = \"/static/\"\ndir = \"{dir}\"\n[[static]]\nurl = \"/media/\"\ndir = \"/no/such/folder\"\n"
    ));
    assert!(
        err.starts_with("test.toml:11: `static[1].dir`: `/no/such/folder` is not a folder"),
        "{err}"
    );
    for url in ["/", "static/", "/static", "/st%61tic/", "/a/../b/"] {
        let err = error_of(&format!(
            "{MINIMAL}[[static]]\nurl = \"{url}\"\ndir = \"{dir}\"\n"
        ));
        assert!(
            err.starts_with("test.toml:7: `static[0].url`"),
            "{url}: {err}"
        );
    }
    let err = error_of(&format!(
        "{MINIMAL}[[static]]\nurl = \"/static/\"\ndir = \"{dir}\"\nroot = \"x\"\n"
    ));
    assert!(
        err.contains("`static[0].root`: unknown field `root`"),
        "{err}"
    );
    let err = error_of(&format!(
        "{MINIMAL}[[static]]\nurl = \"/static/\"\ndir = \"{dir}\"\ncache_control = \"a\\nb\"\n"
    ));
    assert!(err.contains("`static[0].cache_control`"), "{err}");
}

#[test]
fn rate_limits_default_to_post_and_name_their_mistakes() {
    let config = parse(&format!(
        "{MINIMAL}[[rate_limit]]\npath = \"/admin/login/\"\nrequests = 10\nper = \"1m\"\n"
    ))
    .expect("valid");
    assert_eq!(config.rate_limits[0].methods, [http::Method::POST]);
    assert_eq!(config.rate_limits[0].per, Duration::from_secs(60));
    assert!(
        config
            .summary()
            .contains("limit:    POST /admin/login/* at most 10 per 1m per client"),
        "{}",
        config.summary()
    );
    for (field, line, expected) in [
        ("path = \"admin\"", "path", "must be a path"),
        ("methods = [\"PO ST\"]", "methods", "is not a method"),
        ("requests = 0", "requests", "must be 1..=1000000"),
        ("per = \"500ms\"", "per", "at least 1s"),
    ] {
        let mut entry = vec!["path = \"/login/\"", "requests = 5", "per = \"1m\""];
        entry.retain(|l| !l.starts_with(line));
        entry.push(field);
        let err = error_of(&format!("{MINIMAL}[[rate_limit]]\n{}\n", entry.join("\n")));
        assert!(
            err.contains(&format!("`rate_limit[0].{line}`")) && err.contains(expected),
            "{field}: {err}"
        );
    }
}

#[test]
fn several_backends_and_error_pages_are_checked() {
    let config = parse(
        "[server]\ndomains = [\"a.example\"]\n[upstream]\nurls = [\"http://10.0.0.2:8000\", \"unix:/run/g.sock\"]\n\
         weights = [2, 1]\npolicy = \"first\"\nhealth_path = \"/healthz/\"\n",
    )
    .expect("valid");
    assert_eq!(config.upstream.backends.len(), 2);
    assert_eq!(config.upstream.backends[0].weight, 2);
    assert_eq!(config.upstream.policy, BalancePolicy::First);
    let health = config.upstream.health.expect("health checks");
    assert_eq!(
        (health.interval, health.healthy_threshold),
        (Duration::from_secs(5), 2)
    );

    for (upstream, wanted) in [
        (
            "url = \"http://a:1\"\nurls = [\"http://b:1\"]",
            "`upstream.urls`: give either",
        ),
        ("urls = []", "`upstream.urls`: list at least one"),
        (
            "urls = [\"http://a:1\"]\nweights = [1, 2]",
            "`upstream.weights`: 2 weights for 1",
        ),
        ("urls = [\"http://a:1\", \"http://a:1\"]", "is listed twice"),
        (
            "url = \"http://a:1\"\nhealth_interval = \"1s\"",
            "`upstream.health_interval`: only used",
        ),
        (
            "url = \"http://a:1\"\npolicy = \"random\"",
            "unknown variant `random`",
        ),
        ("", "`upstream.url`: missing"),
    ] {
        let err = error_of(&format!(
            "[server]\ndomains = [\"a.example\"]\n[upstream]\n{upstream}\n"
        ));
        assert!(err.contains(wanted), "{upstream}: {err}");
    }
    let err = error_of(&format!(
        "{MINIMAL}[errors]\nbad_gateway = \"/nonexistent/502.html\"\n"
    ));
    assert!(
        err.contains("`errors.bad_gateway`: cannot read `/nonexistent/502.html`"),
        "{err}"
    );
}

#[test]
fn the_eab_key_is_checked_by_check_not_at_the_first_order() {
    let acme = |kid: &str, key: &str| {
        format!(
            "[server]\ndomains = [\"a.example\"]\n[tls]\nsource = \"acme\"\n[acme]\n\
             eab = {{ kid = \"{kid}\", hmac_key = \"{key}\" }}\n[upstream]\nurl = \"http://127.0.0.1:1\"\n"
        )
    };
    // 32 bytes, as ZeroSSL and Google issue them.
    let good = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    assert!(parse(&acme("kid-1", good)).is_ok());
    let err = error_of(&acme("kid-1", "not+base64/url!"));
    assert!(err.contains("`acme.eab.hmac_key`: not base64url"), "{err}");
    let err = error_of(&acme("kid-1", "c2hvcnQ"));
    assert!(err.contains("decodes to 5 bytes"), "{err}");
    let err = error_of(&acme(" ", good));
    assert!(err.contains("`acme.eab.kid`"), "{err}");
}

#[test]
fn acme_profiles_are_names_and_ip_certificates_are_allowed() {
    let acme = |domains: &str, profile: &str| {
        format!(
            "[server]\ndomains = {domains}\n[tls]\nsource = \"acme\"\n[acme]\n{profile}\
             [upstream]\nurl = \"http://127.0.0.1:1\"\n"
        )
    };
    let config = parse(&acme("[\"a.example\", \"192.0.2.5\"]", "")).expect("IPs may be ordered");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let config = parse(&acme("[\"a.example\"]", "profile = \"tlsserver\"\n")).expect("valid");
    assert_eq!(
        config.acme.expect("acme").profile.as_deref(),
        Some("tlsserver")
    );
    let err = error_of(&acme("[\"a.example\"]", "profile = \"short lived\"\n"));
    assert!(
        err.contains("`acme.profile`") && err.contains("not a profile name"),
        "{err}"
    );
    // Let's Encrypt issues IP certificates only under shortlived: another profile is legal but warned.
    let config = parse(&acme("[\"192.0.2.5\"]", "profile = \"classic\"\n")).expect("valid");
    assert!(
        config.warnings.iter().any(|w| w.contains("shortlived")),
        "{:?}",
        config.warnings
    );
}

#[test]
fn cross_origin_protection_is_on_by_default_and_names_its_mistakes() {
    let config = parse(MINIMAL).expect("valid");
    assert_eq!(config.cross_origin.mode, CrossOriginMode::Enforce);
    assert!(!config.cross_origin.allow_same_site);
    let config = parse(&format!(
        "{MINIMAL}[cross_origin]\nmode = \"report\"\ntrusted_origins = [\"HTTPS://Pay.Example.net:443\", \"https://sso.example.org:8443/\"]\nexempt = [\"/saml/acs/\"]\n"
    ))
    .expect("valid");
    assert_eq!(config.cross_origin.mode, CrossOriginMode::Report);
    assert_eq!(
        config.cross_origin.trusted_origins,
        ["https://pay.example.net", "https://sso.example.org:8443"],
        "stored as browsers send Origin"
    );
    assert!(
        config.summary().contains(
            "cross-origin: reported for unsafe methods (trusted: https://pay.example.net, https://sso.example.org:8443; exempt: /saml/acs/; same-site refused)"
        ),
        "{}",
        config.summary()
    );
    for (line, key, expected) in [
        (
            "mode = \"block\"",
            "cross_origin.mode",
            "expected one of `enforce`, `report`, `off`",
        ),
        (
            "trusted_origins = [\"pay.example.net\"]",
            "cross_origin.trusted_origins",
            "is not an origin",
        ),
        (
            "trusted_origins = [\"https://pay.example.net/return/\"]",
            "cross_origin.trusted_origins",
            "is not an origin",
        ),
        (
            "exempt = [\"saml/\"]",
            "cross_origin.exempt",
            "must be a path prefix",
        ),
    ] {
        let err = error_of(&format!("{MINIMAL}[cross_origin]\n{line}\n"));
        assert!(
            err.contains(&format!("`{key}`")) && err.contains(expected),
            "{line}: {err}"
        );
    }
}

#[test]
fn login_lockouts_have_safe_defaults_and_name_their_mistakes() {
    let config = parse(&format!(
        "{MINIMAL}[[login_lockout]]\npath = \"/admin/login/\"\n"
    ))
    .expect("valid");
    let rule = &config.login_lockouts[0];
    assert_eq!(
        (
            rule.failures,
            rule.window,
            rule.lockout,
            rule.failure_status.as_slice()
        ),
        (
            5,
            Duration::from_secs(900),
            Duration::from_secs(900),
            [200, 400, 401].as_slice()
        )
    );
    assert!(
        config.summary().contains(
            "lockout:  POST /admin/login/* after 5 failed logins (200/400/401) within 15m, for 15m per client"
        ),
        "{}",
        config.summary()
    );
    for (line, field, expected) in [
        ("path = \"login\"", "path", "must be a path"),
        ("failures = 0", "failures", "must be 1..=1000"),
        ("window = \"0s\"", "window", "between 1s and 7d"),
        ("lockout = \"30d\"", "lockout", "between 1s and 7d"),
        (
            "failure_status = [302]",
            "failure_status",
            "a redirect is a success",
        ),
        ("failure_status = []", "failure_status", "at least one"),
    ] {
        let mut entry = vec!["path = \"/login/\""];
        entry.retain(|l| !l.starts_with(field));
        entry.push(line);
        let err = error_of(&format!(
            "{MINIMAL}[[login_lockout]]\n{}\n",
            entry.join("\n")
        ));
        assert!(
            err.contains(&format!("`login_lockout[0].{field}`")) && err.contains(expected),
            "{line}: {err}"
        );
    }
}

#[test]
fn csp_reports_add_their_endpoint_to_the_policies() {
    let config = parse(MINIMAL).expect("valid");
    assert!(config.csp_reports.is_none(), "off unless configured");
    let config = parse(&format!(
        "{MINIMAL}[csp_reports]\n[headers.content_security_policy_report_only]\nvalue = \"script-src 'self';\"\n"
    ))
    .expect("valid");
    let reports = config.csp_reports.as_ref().expect("on");
    assert_eq!(reports.path, "/_portcullis/csp-report");
    assert_eq!(reports.max_body, 16 * 1024);
    assert_eq!(
        (reports.budget.requests, reports.budget.per),
        (30, Duration::from_secs(60))
    );
    let value = |name: &str| -> String {
        config
            .headers
            .rules
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.value.to_str().expect("ascii").to_string())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    assert_eq!(
        value("content-security-policy"),
        "default-src 'self'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'; object-src 'none'; report-uri /_portcullis/csp-report; report-to csp-endpoint"
    );
    assert_eq!(
        value("content-security-policy-report-only"),
        "script-src 'self'; report-uri /_portcullis/csp-report; report-to csp-endpoint"
    );
    assert_eq!(
        value("reporting-endpoints"),
        "csp-endpoint=\"/_portcullis/csp-report\""
    );
    // A policy that already reports somewhere keeps its own endpoint.
    let config = parse(&format!(
        "{MINIMAL}[csp_reports]\npath = \"/csp/\"\n[headers.content_security_policy]\nvalue = \"default-src 'self'; report-uri https://report.example/\"\n"
    ))
    .expect("valid");
    let csp = &config.headers.rules[0];
    assert_eq!(
        csp.value,
        "default-src 'self'; report-uri https://report.example/"
    );
    for (line, key, expected) in [
        ("path = \"csp\"", "csp_reports.path", "plain path"),
        ("path = \"/a/../csp\"", "csp_reports.path", "plain path"),
        (
            "max_body = \"10MiB\"",
            "csp_reports.max_body",
            "512 B..=1 MiB",
        ),
        ("requests = 0", "csp_reports.requests", "1..=1000000"),
        ("per = \"100ms\"", "csp_reports.per", "at least 1s"),
    ] {
        let err = error_of(&format!("{MINIMAL}[csp_reports]\n{line}\n"));
        assert!(
            err.contains(&format!("`{key}`")) && err.contains(expected),
            "{line}: {err}"
        );
    }
}

#[test]
fn clear_site_data_and_session_only_cookies_are_checked() {
    let config = parse(&format!(
        "{MINIMAL}[cookies]\nsession_only = [\"sessionid\"]\n[headers.clear_site_data]\npaths = [\"/admin/logout/\"]\n"
    ))
    .expect("valid");
    assert_eq!(config.cookies.session_only, ["sessionid"]);
    let clear = config.headers.clear_site_data.as_ref().expect("on");
    assert_eq!(clear.paths, ["/admin/logout/"]);
    assert_eq!(clear.value, "\"cache\", \"cookies\", \"storage\"");
    for (body, key, expected) in [
        (
            "paths = []",
            "headers.clear_site_data.paths",
            "list the logout paths",
        ),
        (
            "paths = [\"logout\"]",
            "headers.clear_site_data.paths",
            "must be a path",
        ),
        (
            "paths = [\"/logout/\"]\nvalue = \"cookies\"",
            "headers.clear_site_data.value",
            "is not a quoted type",
        ),
    ] {
        let err = error_of(&format!("{MINIMAL}[headers.clear_site_data]\n{body}\n"));
        assert!(
            err.contains(&format!("`{key}`")) && err.contains(expected),
            "{body}: {err}"
        );
    }
}

#[test]
fn storage_is_files_unless_redis_is_named_and_keeps_passwords_out_of_sight() {
    assert!(parse(MINIMAL).expect("valid").redis.is_none());
    assert!(
        parse(&format!("{MINIMAL}[storage]\nbackend = \"files\"\n"))
            .expect("valid")
            .redis
            .is_none()
    );
    let config = parse(&format!(
        "{MINIMAL}[storage]\nbackend = \"redis\"\nurl = \"rediss://cache.internal:6380/2\"\n"
    ))
    .expect("valid");
    let redis = config.redis.as_ref().expect("redis");
    assert_eq!(redis.url, "rediss://cache.internal:6380/2");
    assert_eq!(redis.key_prefix, "portcullis:");
    assert!(config.warnings.iter().any(
        |w| w.contains("without storage.encryption_key_env") && w.contains("in the clear")
    ));
    // Encryption at rest: the variable must be set and hold 32 bytes of base64.
    let var = format!("PORTCULLIS_TEST_STORAGE_KEY_{}", std::process::id());
    let err = error_of(&format!(
        "{MINIMAL}[storage]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1\"\nencryption_key_env = \"{var}\"\n"
    ));
    assert!(
        err.contains("`storage.encryption_key_env`") && err.contains("is not set"),
        "{err}"
    );
    let decode = |value: &str| super::validate::decode_encryption_key("K", Some(value.into()));
    // `openssl rand -base64 32`, and the URL-safe form of the same bytes.
    let standard = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";
    assert_eq!(decode(standard).expect("standard").len(), 32);
    assert_eq!(
        decode(standard),
        decode(&standard.replace('+', "-").replace('/', "_"))
    );
    assert!(
        decode("c2hvcnQ=")
            .expect_err("short")
            .contains("holds 5 bytes")
    );
    assert!(
        decode("not base64!")
            .expect_err("bad")
            .contains("not base64")
    );
    // A password in the URL works, is warned about, and never printed.
    let config = parse(&format!(
        "{MINIMAL}[storage]\nbackend = \"redis\"\nurl = \"redis://app:s3cret@127.0.0.1:6379/0\"\n"
    ))
    .expect("valid");
    let redis = config.redis.as_ref().expect("redis");
    assert_eq!(redis.password.as_deref(), Some("s3cret"));
    assert_eq!(redis.url, "redis://app:***@127.0.0.1:6379/0");
    let shown = format!("{config:?}{}", config.summary());
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("prefer storage.password_env"))
    );
    // From the environment: a variable that is not set is named (set_var is unsafe; the binary test
    // sets one for the child process instead).
    let var = format!("PORTCULLIS_TEST_REDIS_PASSWORD_{}", std::process::id());
    let config_text = format!(
        "{MINIMAL}[storage]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\npassword_env = \"{var}\"\n"
    );
    let err = error_of(&config_text);
    assert!(
        err.contains("`storage.password_env`") && err.contains("is not set"),
        "{err}"
    );
    for (body, key, expected) in [
        ("backend = \"redis\"", "storage.url", "needs a url"),
        (
            "backend = \"redis\"\nurl = \"http://127.0.0.1:6379\"",
            "storage.url",
            "not a redis:// or rediss:// URL",
        ),
        (
            "backend = \"redis\"\nurl = \"redis://x:pw@\"",
            "storage.url",
            "redis://x:***@",
        ),
        (
            "url = \"redis://127.0.0.1\"",
            "storage.url",
            "only used with storage.backend = \"redis\"",
        ),
        (
            "backend = \"redis\"\nurl = \"redis://127.0.0.1\"\nkey_prefix = \"a b\"",
            "storage.key_prefix",
            "without spaces",
        ),
        (
            "backend = \"postgres\"",
            "storage.backend",
            "expected `files` or `redis`",
        ),
    ] {
        let err = error_of(&format!("{MINIMAL}[storage]\n{body}\n"));
        assert!(
            err.contains(&format!("`{key}`")) && err.contains(expected),
            "{body}: {err}"
        );
        assert!(!err.contains(":pw@"), "the password is not echoed: {err}");
    }
}

#[test]
fn compression_is_on_for_everything_but_html_and_names_its_mistakes() {
    let c = parse(MINIMAL).expect("valid").compression;
    assert!(c.enabled && c.zstd && c.br && c.gzip && !c.html);
    assert_eq!((c.level, c.min_size), (4, 1024));
    assert!(c.types.contains(&"application/json".to_string()));
    assert!(!c.types.iter().any(|t| t == "text/html"));
    let config = parse(&format!(
        "{MINIMAL}[compression]\nencodings = [\"gzip\"]\nhtml = true\nlevel = 6\nmin_size = \"512B\"\n"
    ))
    .expect("valid");
    assert!(
        config
            .summary()
            .contains("compress: gzip at level 6 from 512 bytes, 19 types and HTML (padded)"),
        "{}",
        config.summary()
    );
    for (line, key, expected) in [
        (
            "encodings = [\"deflate\"]",
            "compression.encodings",
            "is not one of",
        ),
        ("encodings = []", "compression.encodings", "at least one"),
        (
            "types = [\"text/html\"]",
            "compression.types",
            "compression.html = true",
        ),
        (
            "types = [\"text\"]",
            "compression.types",
            "is not a media type",
        ),
        ("level = 11", "compression.level", "1..=9"),
    ] {
        let err = error_of(&format!("{MINIMAL}[compression]\n{line}\n"));
        assert!(
            err.contains(&format!("`{key}`")) && err.contains(expected),
            "{line}: {err}"
        );
    }
}
