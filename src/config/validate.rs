//! Validation: turns the raw, untrusted `RawConfig` into the typed `Config`, applying the defaults and
//! naming the key and line of anything wrong.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::raw::{self, RawConfig, RawHeaderMode, RawHeaderRule, RawSameSite, RawTlsSource};
use super::units;
use super::*;

pub(super) struct Ctx<'a> {
    pub(super) origin: &'a str,
    pub(super) text: &'a str,
    pub(super) base_dir: Option<PathBuf>,
}

impl Ctx<'_> {
    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.origin.to_string(),
            key: key.to_string(),
            line: line_of_key(self.text, key),
            message: message.into(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        match &self.base_dir {
            Some(base) if p.is_relative() && !base.as_os_str().is_empty() => base.join(p),
            _ => p,
        }
    }
}

/// Finds the 1-based line of a dotted key (`server.domains`, `static[1].dir` for an array of tables) in
/// the TOML source, for error messages.
fn line_of_key(text: &str, dotted: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut table: &DeTable = root.get_ref();
    let mut span = None;
    // The deepest key that exists: a missing leaf (a default that failed) points at its table.
    for part in dotted.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let Some((key, value)) = table.iter().find(|(k, _)| k.get_ref() == name) else {
            break;
        };
        span = Some(key.span());
        let value = match (value.get_ref(), index) {
            (DeValue::Array(items), Some(i)) => match items.get(i) {
                Some(item) => {
                    span = Some(item.span());
                    item.get_ref()
                }
                None => break,
            },
            (value, _) => value,
        };
        match value {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    let offset = span?.start;
    Some(text[..offset.min(text.len())].matches('\n').count() + 1)
}

/// The dotted key whose name or value covers byte `offset` of the TOML source: turns a parse error's
/// position into the key it is about.
pub(super) fn key_at(text: &str, offset: usize) -> Option<String> {
    use toml::de::{DeTable, DeValue};
    fn search(table: &DeTable, offset: usize, path: &mut Vec<String>) -> bool {
        for (key, value) in table.iter() {
            let name = key.get_ref().to_string();
            path.push(name.clone());
            let here = key.span().contains(&offset) || value.span().contains(&offset);
            let inside = match value.get_ref() {
                DeValue::Table(inner) => search(inner, offset, path),
                // An array of tables (`[[static]]`): name the element, `static[1].dir`.
                DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
                    let DeValue::Table(inner) = item.get_ref() else {
                        return false;
                    };
                    if let Some(last) = path.last_mut() {
                        *last = format!("{name}[{i}]");
                    }
                    search(inner, offset, path) || item.span().contains(&offset)
                }),
                _ => false,
            };
            if inside || here {
                if !inside && let Some(last) = path.last_mut() {
                    *last = name;
                }
                return true;
            }
            path.pop();
        }
        false
    }
    let root = DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    search(root.get_ref(), offset, &mut path).then(|| path.join("."))
}

/// A header's mode as configured, or its default; `None` when it is off.
fn mode_of(mode: Option<RawHeaderMode>, default: Option<HeaderMode>) -> Option<HeaderMode> {
    match mode {
        None => default,
        Some(RawHeaderMode::Override) => Some(HeaderMode::Override),
        Some(RawHeaderMode::IfAbsent) => Some(HeaderMode::IfAbsent),
        Some(RawHeaderMode::Off) => None,
    }
}

fn header_value(ctx: &Ctx, key: &str, value: &str) -> Result<HeaderValue, ConfigError> {
    HeaderValue::from_str(value)
        .map_err(|_| ctx.invalid(key, "value must be visible ASCII with no line breaks"))
}

struct HeaderDefault {
    key: &'static str,
    name: HeaderName,
    value: &'static str,
    mode: HeaderMode,
}

/// Strong defaults that keep a stock Django app working: the CSP allows same-origin scripts and styles
/// (Django admin has no inline script), and the Referrer-Policy keeps same-origin referrers so Django's
/// CSRF Referer check on HTTPS passes (`no-referrer` would break every form without an `Origin`).
fn header_defaults() -> Vec<HeaderDefault> {
    use http::header;
    vec![
        HeaderDefault {
            key: "headers.content_security_policy",
            name: header::CONTENT_SECURITY_POLICY,
            value: "default-src 'self'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'; object-src 'none'",
            mode: HeaderMode::IfAbsent,
        },
        HeaderDefault {
            key: "headers.content_security_policy_report_only",
            name: header::CONTENT_SECURITY_POLICY_REPORT_ONLY,
            value: "",
            mode: HeaderMode::IfAbsent,
        },
        HeaderDefault {
            key: "headers.x_frame_options",
            name: header::X_FRAME_OPTIONS,
            value: "DENY",
            mode: HeaderMode::IfAbsent,
        },
        HeaderDefault {
            key: "headers.x_content_type_options",
            name: header::X_CONTENT_TYPE_OPTIONS,
            value: "nosniff",
            mode: HeaderMode::Override,
        },
        HeaderDefault {
            key: "headers.referrer_policy",
            name: header::REFERRER_POLICY,
            value: "same-origin",
            mode: HeaderMode::IfAbsent,
        },
        HeaderDefault {
            key: "headers.permissions_policy",
            name: HeaderName::from_static("permissions-policy"),
            value: "accelerometer=(), camera=(), geolocation=(), gyroscope=(), magnetometer=(), microphone=(), payment=(), usb=()",
            mode: HeaderMode::IfAbsent,
        },
        HeaderDefault {
            key: "headers.cross_origin_opener_policy",
            name: HeaderName::from_static("cross-origin-opener-policy"),
            value: "same-origin",
            mode: HeaderMode::IfAbsent,
        },
        // Other sites may not embed our responses (Spectre-class leaks); same-site keeps subdomains
        // such as a static or media host working.
        HeaderDefault {
            key: "headers.cross_origin_resource_policy",
            name: HeaderName::from_static("cross-origin-resource-policy"),
            value: "same-site",
            mode: HeaderMode::IfAbsent,
        },
    ]
}

fn validate_headers(
    raw: raw::RawHeaders,
    ctx: &Ctx,
    warnings: &mut Vec<String>,
    csp_reports: Option<&CspReports>,
) -> Result<SecurityHeaders, ConfigError> {
    let hsts = &raw.strict_transport_security;
    let hsts_key = "headers.strict_transport_security";
    let mut https_only_rules = Vec::new();
    if let Some(mode) = mode_of(hsts.mode, Some(HeaderMode::Override)) {
        let max_age = hsts
            .max_age
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(31_536_000));
        let include_subdomains = hsts.include_subdomains.unwrap_or(true);
        let preload = hsts.preload.unwrap_or(false);
        // https://hstspreload.org/#submission-requirements
        if preload && (max_age.as_secs() < 31_536_000 || !include_subdomains) {
            return Err(ctx.invalid(
                hsts_key,
                "preload requires max_age of at least 365d and include_subdomains = true",
            ));
        }
        if max_age.as_secs() < 86_400 {
            warnings.push(format!(
                "{hsts_key}.max_age is {}s: browsers forget HTTPS-only within a day",
                max_age.as_secs()
            ));
        }
        let mut value = format!("max-age={}", max_age.as_secs());
        if include_subdomains {
            value.push_str("; includeSubDomains");
        }
        if preload {
            value.push_str("; preload");
        }
        https_only_rules.push(HeaderRule {
            name: http::header::STRICT_TRANSPORT_SECURITY,
            value: header_value(ctx, hsts_key, &value)?,
            mode,
        });
    }

    let chosen: [(&RawHeaderRule, bool); 8] = [
        (&raw.content_security_policy, true),
        (&raw.content_security_policy_report_only, false),
        (&raw.x_frame_options, true),
        (&raw.x_content_type_options, true),
        (&raw.referrer_policy, true),
        (&raw.permissions_policy, true),
        (&raw.cross_origin_opener_policy, true),
        (&raw.cross_origin_resource_policy, true),
    ];
    let mut rules = Vec::new();
    for (default, (rule, on_by_default)) in header_defaults().into_iter().zip(chosen) {
        let key = default.key;
        // The report-only CSP has no sensible default value: it is on only when given one.
        let default_mode = (on_by_default || rule.value.is_some()).then_some(default.mode);
        let Some(mode) = mode_of(rule.mode, default_mode) else {
            continue;
        };
        let value = rule.value.as_deref().unwrap_or(default.value);
        if value.trim().is_empty() {
            return Err(ctx.invalid(key, "needs a `value` (or mode = \"off\")"));
        }
        let value_key = format!("{key}.value");
        let value_key = value_key.as_str();
        match key {
            "headers.x_frame_options"
                if !["DENY", "SAMEORIGIN"].contains(&value.to_ascii_uppercase().as_str()) =>
            {
                return Err(ctx.invalid(value_key, "must be \"DENY\" or \"SAMEORIGIN\""));
            }
            "headers.x_content_type_options" if !value.eq_ignore_ascii_case("nosniff") => {
                return Err(ctx.invalid(value_key, "the only value is \"nosniff\""));
            }
            "headers.referrer_policy" => check_referrer_policy(ctx, value_key, value, warnings)?,
            "headers.cross_origin_resource_policy"
                if !["same-site", "same-origin", "cross-origin"].contains(&value) =>
            {
                return Err(ctx.invalid(
                    value_key,
                    "must be \"same-site\", \"same-origin\" or \"cross-origin\"",
                ));
            }
            _ => {}
        }
        let is_csp = default.name == http::header::CONTENT_SECURITY_POLICY
            || default.name == http::header::CONTENT_SECURITY_POLICY_REPORT_ONLY;
        let value = match csp_reports {
            Some(reports) if is_csp => with_report_endpoints(value, &reports.path),
            _ => value.to_string(),
        };
        rules.push(HeaderRule {
            name: default.name,
            value: header_value(ctx, value_key, &value)?,
            mode,
        });
    }
    if let Some(reports) = csp_reports {
        let mode = rules
            .iter()
            .find(|r| r.name == http::header::CONTENT_SECURITY_POLICY)
            .map(|r| r.mode)
            .unwrap_or(HeaderMode::IfAbsent);
        // RFC-to-be (W3C Reporting API §3.1): named endpoints for `report-to`, beside the app's own.
        rules.push(HeaderRule {
            name: HeaderName::from_static("reporting-endpoints"),
            value: header_value(
                ctx,
                "csp_reports.path",
                &format!("{CSP_ENDPOINT}=\"{}\"", reports.path),
            )?,
            mode,
        });
    }

    let remove_names = raw
        .remove
        .unwrap_or_else(|| vec!["Server".into(), "X-Powered-By".into()]);
    let mut remove = Vec::new();
    for name in remove_names {
        remove.push(HeaderName::from_str(&name).map_err(|_| {
            ctx.invalid("headers.remove", format!("`{name}` is not a header name"))
        })?);
    }
    let clear_site_data = raw
        .clear_site_data
        .map(|c| validate_clear_site_data(c, ctx))
        .transpose()?;
    Ok(SecurityHeaders {
        rules,
        https_only_rules,
        remove,
        clear_site_data,
    })
}

/// The types `Clear-Site-Data` takes (W3C Clear Site Data §3.1, and Chromium's additions).
const CLEAR_SITE_DATA_TYPES: [&str; 8] = [
    "cache",
    "cookies",
    "storage",
    "executionContexts",
    "clientHints",
    "prefetchCache",
    "prerenderCache",
    "*",
];

/// `headers.clear_site_data`: logout paths as plain prefixes, and a value of quoted known types
/// (`"cache", "cookies", "storage"` unless given).
fn validate_clear_site_data(
    c: raw::RawClearSiteData,
    ctx: &Ctx,
) -> Result<ClearSiteData, ConfigError> {
    let key = "headers.clear_site_data";
    if c.paths.is_empty() {
        return Err(ctx.invalid(
            &format!("{key}.paths"),
            "list the logout paths, like [\"/admin/logout/\"]",
        ));
    }
    for path in &c.paths {
        check_path_prefix(ctx, &format!("{key}.paths"), path, "/accounts/logout/")?;
    }
    let value = c
        .value
        .unwrap_or_else(|| "\"cache\", \"cookies\", \"storage\"".into());
    for token in value.split(',').map(str::trim) {
        let known = token
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .is_some_and(|t| CLEAR_SITE_DATA_TYPES.contains(&t));
        if !known {
            return Err(ctx.invalid(
                &format!("{key}.value"),
                format!(
                    "`{token}` is not a quoted type: use \"cache\", \"cookies\", \"storage\" (with the quotes), \"executionContexts\" or \"*\""
                ),
            ));
        }
    }
    Ok(ClearSiteData {
        paths: c.paths,
        value: header_value(ctx, &format!("{key}.value"), &value)?,
    })
}

/// The `report-to` group name portcullis gives its collector in `Reporting-Endpoints`; Django's own
/// `SECURE_CSP` may name it too (`"report-to": "csp-endpoint"`).
const CSP_ENDPOINT: &str = "csp-endpoint";

/// A policy that reports to the collector: both `report-uri` (CSP2, Firefox and Safari) and
/// `report-to` (CSP3, Chromium), unless the policy already names somewhere.
fn with_report_endpoints(policy: &str, path: &str) -> String {
    let lower = policy.to_ascii_lowercase();
    if lower.contains("report-uri") || lower.contains("report-to") {
        return policy.to_string();
    }
    format!(
        "{}; report-uri {path}; report-to {CSP_ENDPOINT}",
        policy.trim_end().trim_end_matches(';')
    )
}

/// `[csp_reports]`: a plain path of the proxy's own (never the app's), bodies up to 1 MiB, and a
/// budget per client so one page in a loop cannot fill the log.
fn validate_csp_reports(r: raw::RawCspReports, ctx: &Ctx) -> Result<CspReports, ConfigError> {
    let path = r.path.unwrap_or_else(|| "/_portcullis/csp-report".into());
    if !path.starts_with('/')
        || path.contains(['?', '#', '%', ' ', ';', ',', '"'])
        || path.contains("//")
        || path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
    {
        return Err(ctx.invalid(
            "csp_reports.path",
            format!("`{path}` must be a plain path like \"/_portcullis/csp-report\""),
        ));
    }
    let max_body = r.max_body.map(|b| b.0).unwrap_or(16 * 1024);
    if !(512..=1024 * 1024).contains(&max_body) {
        return Err(ctx.invalid("csp_reports.max_body", "must be 512 B..=1 MiB"));
    }
    let requests = r.requests.unwrap_or(30);
    if requests == 0 || requests > 1_000_000 {
        return Err(ctx.invalid("csp_reports.requests", "must be 1..=1000000"));
    }
    let per = r.per.map(|d| d.0).unwrap_or(Duration::from_secs(60));
    if per < Duration::from_secs(1) {
        return Err(ctx.invalid("csp_reports.per", "must be at least 1s"));
    }
    Ok(CspReports {
        budget: RateLimitRule {
            path: path.clone(),
            methods: vec![http::Method::POST],
            requests,
            per,
        },
        path,
        max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
    })
}

const REFERRER_POLICIES: [&str; 8] = [
    "no-referrer",
    "no-referrer-when-downgrade",
    "origin",
    "origin-when-cross-origin",
    "same-origin",
    "strict-origin",
    "strict-origin-when-cross-origin",
    "unsafe-url",
];

fn check_referrer_policy(
    ctx: &Ctx,
    key: &str,
    value: &str,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    // A policy may be a comma-separated fallback list; the browser uses the last one it knows.
    for token in value.split(',').map(str::trim) {
        if !REFERRER_POLICIES.contains(&token.to_ascii_lowercase().as_str()) {
            return Err(ctx.invalid(
                key,
                format!(
                    "unknown policy `{token}`; one of: {}",
                    REFERRER_POLICIES.join(", ")
                ),
            ));
        }
    }
    let effective = value
        .rsplit(',')
        .next()
        .unwrap_or(value)
        .trim()
        .to_ascii_lowercase();
    if effective == "no-referrer" || effective == "origin" || effective == "strict-origin" {
        warnings.push(format!(
            "{key} = \"{value}\" drops the path from same-origin referrers{}: Django's CSRF check on HTTPS \
             compares the Referer when a request has no Origin header, so form posts from older browsers fail. \
             Prefer \"same-origin\" or \"strict-origin-when-cross-origin\".",
            if effective == "no-referrer" { " (it sends none at all)" } else { "" }
        ));
    }
    Ok(())
}

fn validate_domain(ctx: &Ctx, name: &str) -> Result<String, ConfigError> {
    let key = "server.domains";
    let lower = name.trim().to_ascii_lowercase();
    if lower.parse::<IpAddr>().is_ok() {
        return Ok(lower);
    }
    if lower.starts_with("*.") {
        return Err(ctx.invalid(
            key,
            format!("`{name}`: wildcard names are not supported; list each name"),
        ));
    }
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if lower.is_empty() || lower.len() > 253 || !lower.split('.').all(valid_label) {
        return Err(ctx.invalid(
            key,
            format!("`{name}` is not a host name (letters, digits and '-' in dot-separated labels, or an IP address)"),
        ));
    }
    Ok(lower)
}

/// A CIDR range, or one address as a range of one (`10.0.0.0/8`, `::1`).
pub(super) fn parse_ip_net(s: &str) -> Result<IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    s.parse::<IpNet>()
        .map_err(|_| format!("`{s}` is not an IP address or CIDR range (e.g. 10.0.0.0/8)"))
}

fn parse_socket_addr(ctx: &Ctx, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ctx.invalid(
            key,
            format!(
                "`{value}` is not an address with a port, like \"0.0.0.0:443\" or \"[::]:443\""
            ),
        )
    })
}

pub(super) fn validate(raw: RawConfig, ctx: &Ctx) -> Result<Config, ConfigError> {
    let mut warnings = Vec::new();
    let server = validate_server(raw.server, ctx)?;
    let tls = validate_tls(raw.tls, ctx)?;
    let acme = match (raw.acme, &tls.source) {
        (Some(a), TlsSource::Acme) => Some(validate_acme(a, ctx, &server)?),
        (None, TlsSource::Acme) => Some(validate_acme(raw::RawAcme::default(), ctx, &server)?),
        (Some(_), _) => {
            return Err(ctx.invalid("acme", "[acme] is only used with tls.source = \"acme\""));
        }
        (None, _) => None,
    };
    if let Some(profile) = acme.as_ref().and_then(|a| a.profile.as_deref())
        && server.domains.has_ip()
        && profile != "shortlived"
    {
        warnings.push(format!(
            "acme.profile = \"{profile}\" with IP addresses in server.domains: Let's Encrypt issues IP certificates only under \"shortlived\""
        ));
    }
    let csp_reports = raw
        .csp_reports
        .map(|r| validate_csp_reports(r, ctx))
        .transpose()?;
    Ok(Config {
        upstream: validate_upstream(raw.upstream, ctx)?,
        headers: validate_headers(raw.headers, ctx, &mut warnings, csp_reports.as_ref())?,
        csp_reports,
        cookies: validate_cookies(raw.cookies, &mut warnings),
        limits: validate_limits(raw.limits, ctx, &mut warnings)?,
        log: validate_log(raw.log, ctx)?,
        metrics: validate_metrics(raw.metrics, ctx, &server, &mut warnings)?,
        static_files: validate_static_files(raw.static_files, ctx)?,
        rate_limits: validate_rate_limits(raw.rate_limit, ctx)?,
        errors: validate_errors(raw.errors.unwrap_or_default(), ctx)?,
        cross_origin: validate_cross_origin(raw.cross_origin, ctx)?,
        login_lockouts: validate_login_lockouts(raw.login_lockout, ctx)?,
        compression: validate_compression(raw.compression, ctx)?,
        redis: match raw.storage {
            Some(s) => validate_storage(s, ctx, &mut warnings)?,
            None => None,
        },
        server,
        tls,
        acme,
        warnings,
    })
}

/// `[server]`: listeners, names, workers, ports, trusted proxies.
fn validate_server(s: raw::RawServer, ctx: &Ctx) -> Result<ServerConfig, ConfigError> {
    let https = parse_socket_addr(
        ctx,
        "server.https",
        s.https.as_deref().unwrap_or("0.0.0.0:443"),
    )?;
    let http = s
        .http
        .as_deref()
        .map(|a| parse_socket_addr(ctx, "server.http", a))
        .transpose()?;
    if http.is_some_and(|h| h == https && h.port() != 0) {
        return Err(ctx.invalid("server.http", "must differ from server.https"));
    }
    if s.domains.is_empty() {
        return Err(ctx.invalid(
            "server.domains",
            "list at least one name this site is served as",
        ));
    }
    let mut domains = Vec::new();
    for d in &s.domains {
        let d = validate_domain(ctx, d)?;
        if !domains.contains(&d) {
            domains.push(d);
        }
    }
    let workers = match s.workers {
        Some(0) => return Err(ctx.invalid("server.workers", "must be at least 1")),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    if s.public_https_port == Some(0) {
        return Err(ctx.invalid("server.public_https_port", "must be 1..=65535"));
    }
    let public_https_port = s.public_https_port;
    let health_path = match s.health_path {
        Some(p) if !p.starts_with('/') => {
            return Err(ctx.invalid("server.health_path", "must start with '/'"));
        }
        other => other,
    };
    let mut trusted_proxies = Vec::new();
    for p in s.trusted_proxies.unwrap_or_default() {
        trusted_proxies
            .push(parse_ip_net(&p).map_err(|m| ctx.invalid("server.trusted_proxies", m))?);
    }
    let mut proxy_protocol = Vec::new();
    for p in s.proxy_protocol.unwrap_or_default() {
        proxy_protocol.push(parse_ip_net(&p).map_err(|m| ctx.invalid("server.proxy_protocol", m))?);
    }
    Ok(ServerConfig {
        https,
        http,
        domains: Domains::new(domains),
        workers,
        public_https_port,
        health_path,
        trusted_proxies,
        proxy_protocol,
        shutdown_grace: s
            .shutdown_grace
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(30)),
    })
}

/// `[tls]`: where certificates come from and where state is kept.
fn validate_tls(t: raw::RawTls, ctx: &Ctx) -> Result<TlsConfig, ConfigError> {
    let dir = ctx.path(t.dir.as_deref().unwrap_or("certs"));
    let source = match t.source.unwrap_or(RawTlsSource::Local) {
        RawTlsSource::Local => TlsSource::Local,
        RawTlsSource::Files => {
            let cert = t.cert.as_deref().ok_or_else(|| {
                ctx.invalid(
                    "tls.cert",
                    "source = \"files\" needs `cert` (PEM chain) and `key` (PEM key)",
                )
            })?;
            let key = t.key.as_deref().ok_or_else(|| {
                ctx.invalid(
                    "tls.key",
                    "source = \"files\" needs `cert` (PEM chain) and `key` (PEM key)",
                )
            })?;
            TlsSource::Files {
                cert: ctx.path(cert),
                key: ctx.path(key),
            }
        }
        RawTlsSource::Acme => TlsSource::Acme,
    };
    if !matches!(source, TlsSource::Files { .. }) && (t.cert.is_some() || t.key.is_some()) {
        return Err(ctx.invalid(
            "tls.cert",
            "`cert`/`key` are only used with source = \"files\"",
        ));
    }
    Ok(TlsConfig { source, dir })
}

/// One backend URL: `http://host:port` or `unix:/path`.
fn upstream_target(ctx: &Ctx, key: &str, url: &str) -> Result<UpstreamTarget, ConfigError> {
    if let Some(path) = url.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(ctx.invalid(
                key,
                "unix: needs a socket path, like \"unix:/run/gunicorn.sock\"",
            ));
        }
        return Ok(UpstreamTarget::Unix(ctx.path(path)));
    }
    let uri: http::Uri = url.parse().map_err(|_| {
        ctx.invalid(
            key,
            format!("`{url}` is not a URL like \"http://127.0.0.1:8000\""),
        )
    })?;
    if uri.scheme_str() != Some("http") {
        return Err(ctx.invalid(
            key,
            "must be http://host:port (Gunicorn speaks plain HTTP) or unix:/path/to.sock",
        ));
    }
    if uri.path() != "/" || uri.query().is_some() {
        return Err(ctx.invalid(
            key,
            "must not have a path or query: requests keep their own",
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| ctx.invalid(key, "needs a host and port"))?;
    if authority.port_u16().is_none() {
        return Err(ctx.invalid(
            key,
            "give the port explicitly, like \"http://127.0.0.1:8000\"",
        ));
    }
    Ok(UpstreamTarget::Tcp(authority))
}

/// `[upstream]`: Gunicorn's addresses (TCP or unix sockets), how one is chosen, timeouts, retries, the
/// idle pool and health checks.
fn validate_upstream(u: raw::RawUpstream, ctx: &Ctx) -> Result<UpstreamConfig, ConfigError> {
    let (key, urls) = match (u.url, u.urls) {
        (Some(url), None) => ("upstream.url", vec![url]),
        (None, Some(urls)) if !urls.is_empty() => ("upstream.urls", urls),
        (None, Some(_)) => return Err(ctx.invalid("upstream.urls", "list at least one backend")),
        (Some(_), Some(_)) => {
            return Err(ctx.invalid(
                "upstream.urls",
                "give either `url` (one backend) or `urls` (several), not both",
            ));
        }
        (None, None) => {
            return Err(ctx.invalid(
                "upstream.url",
                "missing: where Gunicorn listens, like \"http://127.0.0.1:8000\" (or `urls` for several)",
            ));
        }
    };
    let weights = u.weights.unwrap_or_else(|| vec![1; urls.len()]);
    if weights.len() != urls.len() {
        return Err(ctx.invalid(
            "upstream.weights",
            format!(
                "{} weights for {} backends: give one per entry of `urls`",
                weights.len(),
                urls.len()
            ),
        ));
    }
    if weights.iter().any(|w| *w == 0 || *w > 1000) {
        return Err(ctx.invalid("upstream.weights", "each weight must be 1..=1000"));
    }
    let mut backends: Vec<BackendConfig> = Vec::new();
    for (url, weight) in urls.iter().zip(weights) {
        let target = upstream_target(ctx, key, url)?;
        if backends.iter().any(|b| b.target == target) {
            return Err(ctx.invalid(key, format!("`{url}` is listed twice")));
        }
        backends.push(BackendConfig { target, weight });
    }
    let dur = |d: Option<units::HumanDuration>, default: u64| {
        d.map(|d| d.0).unwrap_or(Duration::from_secs(default))
    };
    let health = match u.health_path {
        None => {
            for (set, name) in [
                (u.health_interval.is_some(), "health_interval"),
                (u.health_timeout.is_some(), "health_timeout"),
                (u.healthy_threshold.is_some(), "healthy_threshold"),
                (u.unhealthy_threshold.is_some(), "unhealthy_threshold"),
            ] {
                if set {
                    return Err(ctx.invalid(
                        &format!("upstream.{name}"),
                        "only used with upstream.health_path",
                    ));
                }
            }
            None
        }
        Some(path) => {
            if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
                return Err(ctx.invalid(
                    "upstream.health_path",
                    format!("`{path}` must be a path like \"/healthz/\""),
                ));
            }
            let check = HealthCheck {
                path,
                interval: dur(u.health_interval, 5),
                timeout: dur(u.health_timeout, 2),
                healthy_threshold: u.healthy_threshold.unwrap_or(2),
                unhealthy_threshold: u.unhealthy_threshold.unwrap_or(2),
            };
            if check.interval < Duration::from_millis(100) || check.timeout.is_zero() {
                return Err(ctx.invalid(
                    "upstream.health_interval",
                    "health_interval must be at least 100ms and health_timeout more than 0s",
                ));
            }
            if check.healthy_threshold == 0 || check.unhealthy_threshold == 0 {
                return Err(ctx.invalid(
                    "upstream.healthy_threshold",
                    "healthy_threshold and unhealthy_threshold must be at least 1",
                ));
            }
            Some(check)
        }
    };
    let retries = u.retries.unwrap_or(2);
    if retries > 10 {
        return Err(ctx.invalid("upstream.retries", "must be 0..=10"));
    }
    let max_fails = u.max_fails.unwrap_or(3);
    if max_fails == 0 {
        return Err(ctx.invalid("upstream.max_fails", "must be at least 1"));
    }
    Ok(UpstreamConfig {
        backends,
        policy: u.policy.unwrap_or(BalancePolicy::LeastRequests),
        connect_timeout: dur(u.connect_timeout, 5),
        response_timeout: dur(u.response_timeout, 60),
        pool_idle_timeout: dur(u.pool_idle_timeout, 60),
        // The floor: the pool keeps more while the recent peak in flight was higher
        // (proxy::upstream), and idle ones go after pool_idle_timeout anyway.
        pool_max_idle: u.pool_max_idle.unwrap_or(1024),
        // Well under Gunicorn's shortest keep-alive (`--keep-alive` is whole seconds, 2 by default).
        pool_reuse_for_posts: u
            .pool_reuse_for_posts
            .map_or(Duration::from_millis(500), |d| d.0),
        retries,
        max_fails,
        fail_timeout: dur(u.fail_timeout, 10),
        health,
    })
}

/// `[cookies]`: the attributes every upstream `Set-Cookie` gains.
fn validate_cookies(c: raw::RawCookies, warnings: &mut Vec<String>) -> CookiePolicy {
    let same_site = match c.same_site.unwrap_or(RawSameSite::Lax) {
        RawSameSite::Lax => Some(SameSite::Lax),
        RawSameSite::Strict => Some(SameSite::Strict),
        RawSameSite::None => Some(SameSite::None),
        RawSameSite::Off => None,
    };
    let cookies = CookiePolicy {
        secure: c.secure.unwrap_or(true),
        http_only: c.http_only.unwrap_or(true),
        same_site,
        http_only_exempt: c
            .http_only_exempt
            .unwrap_or_else(|| vec!["csrftoken".into()]),
        session_only: c.session_only.unwrap_or_default(),
    };
    if !cookies.secure {
        warnings.push("cookies.secure = false: session cookies can leak over plain HTTP".into());
    }
    cookies
}

/// `[limits]`: timeouts, sizes and counts, each bounded to what the server can hold.
fn validate_limits(
    l: raw::RawLimits,
    ctx: &Ctx,
    warnings: &mut Vec<String>,
) -> Result<Limits, ConfigError> {
    let dur = |d: Option<units::HumanDuration>, default: u64| {
        d.map(|d| d.0).unwrap_or(Duration::from_secs(default))
    };
    let limits = Limits {
        handshake_timeout: dur(l.handshake_timeout, 10),
        header_read_timeout: dur(l.header_read_timeout, 10),
        idle_timeout: dur(l.idle_timeout, 60),
        body_timeout: dur(l.body_timeout, 60),
        max_header_bytes: usize::try_from(l.max_header_bytes.map(|b| b.0).unwrap_or(16_384))
            .unwrap_or(usize::MAX),
        max_headers: l.max_headers.unwrap_or(100),
        max_body: l
            .max_body
            .map(|b| b.0)
            .unwrap_or(DJANGO_DATA_UPLOAD_MAX_MEMORY_SIZE),
        buffer_body: l.buffer_body.map(|b| b.0).unwrap_or(65_536),
        buffer_response: l.buffer_response.map(|b| b.0).unwrap_or(262_144),
        buffer_memory: l.buffer_memory.map(|b| b.0).unwrap_or(64 * 1024 * 1024),
        max_connections: l.max_connections.unwrap_or(10_000),
        h2_max_concurrent_streams: l.h2_max_concurrent_streams.unwrap_or(128),
        h2_max_pending_resets: l.h2_max_pending_resets.unwrap_or(20),
    };
    if limits.buffer_memory < limits.buffer_response {
        warnings.push(format!(
            "limits.buffer_memory ({} bytes) is below limits.buffer_response ({} bytes): the largest \
             responses that could be buffered never will be",
            limits.buffer_memory, limits.buffer_response
        ));
    }
    for (key, d) in [
        ("limits.handshake_timeout", limits.handshake_timeout),
        ("limits.header_read_timeout", limits.header_read_timeout),
        ("limits.idle_timeout", limits.idle_timeout),
        ("limits.body_timeout", limits.body_timeout),
    ] {
        if d.is_zero() {
            return Err(ctx.invalid(key, "must be longer than 0s"));
        }
    }
    // hyper cannot buffer headers in less than 8 KiB.
    if limits.max_header_bytes < 8192 {
        return Err(ctx.invalid("limits.max_header_bytes", "must be at least 8KiB"));
    }
    let counts = [
        ("limits.max_headers", limits.max_headers, 10_000),
        ("limits.max_connections", limits.max_connections, 1_000_000),
        (
            "limits.h2_max_concurrent_streams",
            limits.h2_max_concurrent_streams as usize,
            10_000,
        ),
    ];
    for (key, value, max) in counts {
        if value == 0 || value > max {
            return Err(ctx.invalid(key, format!("must be 1..={max}")));
        }
    }
    Ok(limits)
}

/// `[log]`: format, level filter, access log.
fn validate_log(l: raw::RawLog, ctx: &Ctx) -> Result<LogConfig, ConfigError> {
    let format = l.format.unwrap_or(LogFormat::Text);
    let level = l.level.unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        return Err(ctx.invalid(
            "log.level",
            format!("`{level}` is not a level (error, warn, info, debug, trace)"),
        ));
    }
    let access = match (l.access.unwrap_or(true), l.access_format) {
        (false, _) => AccessLog::Off,
        (true, Some(AccessFormat::Combined)) => AccessLog::Combined,
        (true, None) => AccessLog::Events,
        (true, Some(named)) => {
            let same = matches!(
                (named, format),
                (AccessFormat::Text, LogFormat::Text) | (AccessFormat::Json, LogFormat::Json)
            );
            if !same {
                return Err(ctx.invalid(
                    "log.access_format",
                    "`text` and `json` access lines are events of the main log and follow `log.format`; \
                     set `log.format` instead, or use `combined`",
                ));
            }
            AccessLog::Events
        }
    };
    Ok(LogConfig {
        format,
        level,
        access,
    })
}

/// `[metrics]`: the listener, apart from the others; warned about off loopback.
fn validate_metrics(
    raw: Option<raw::RawMetrics>,
    ctx: &Ctx,
    server: &ServerConfig,
    warnings: &mut Vec<String>,
) -> Result<Option<SocketAddr>, ConfigError> {
    Ok(match raw {
        None => None,
        Some(m) => {
            let listen = parse_socket_addr(ctx, "metrics.listen", &m.listen)?;
            if listen.port() != 0 && (listen == server.https || Some(listen) == server.http) {
                return Err(ctx.invalid(
                    "metrics.listen",
                    "must differ from server.https and server.http",
                ));
            }
            if !listen.ip().is_loopback() {
                warnings.push(format!(
                    "metrics.listen = \"{listen}\" is reachable from other hosts and has no \
                     authentication; prefer 127.0.0.1 or a private network"
                ));
            }
            Some(listen)
        }
    })
}

/// `[errors]`: each page a readable file of at most 1 MiB (read now: a typo is an error at start, not a
/// blank 502 in an outage); the maintenance file need not exist (its existence is the switch).
fn validate_errors(e: raw::RawErrors, ctx: &Ctx) -> Result<ErrorPages, ConfigError> {
    let page = |key: &str, path: Option<String>| -> Result<Option<bytes::Bytes>, ConfigError> {
        let Some(path) = path else { return Ok(None) };
        let path = ctx.path(&path);
        let data = std::fs::read(&path).map_err(|error| {
            ctx.invalid(key, format!("cannot read `{}`: {error}", path.display()))
        })?;
        if data.len() > 1024 * 1024 {
            return Err(ctx.invalid(key, "an error page must be at most 1 MiB"));
        }
        Ok(Some(bytes::Bytes::from(data)))
    };
    let mut maintenance_allow = Vec::new();
    for net in e.maintenance_allow.unwrap_or_default() {
        maintenance_allow
            .push(parse_ip_net(&net).map_err(|m| ctx.invalid("errors.maintenance_allow", m))?);
    }
    Ok(ErrorPages {
        bad_gateway: page("errors.bad_gateway", e.bad_gateway)?,
        service_unavailable: page("errors.service_unavailable", e.service_unavailable)?,
        gateway_timeout: page("errors.gateway_timeout", e.gateway_timeout)?,
        maintenance_file: e.maintenance_file.map(|p| ctx.path(&p)),
        maintenance_allow,
        maintenance_retry_after: e
            .maintenance_retry_after
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(60)),
    })
}

/// A path prefix the rules match `route_path`'s normal form against: it must be a plain path (no query,
/// fragment or percent-encoding, which the normal form never contains).
fn check_path_prefix(ctx: &Ctx, key: &str, path: &str, example: &str) -> Result<(), ConfigError> {
    if !path.starts_with('/') || path.contains(['?', '#', '%']) {
        return Err(ctx.invalid(
            key,
            format!("`{path}` must be a path prefix like \"{example}\""),
        ));
    }
    Ok(())
}

/// `[[rate_limit]]`: a path prefix, methods (POST by default: a login form's GET is harmless), and a
/// budget of at least one request per at least a second.
fn validate_rate_limits(
    raw: Vec<raw::RawRateLimit>,
    ctx: &Ctx,
) -> Result<Vec<RateLimitRule>, ConfigError> {
    let mut rules = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("rate_limit[{i}].{field}");
        check_path_prefix(ctx, &key("path"), &r.path, "/admin/login/")?;
        let mut methods = Vec::new();
        for m in r.methods.unwrap_or_else(|| vec!["POST".into()]) {
            let method = http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| ctx.invalid(&key("methods"), format!("`{m}` is not a method")))?;
            methods.push(method);
        }
        if methods.is_empty() {
            return Err(ctx.invalid(&key("methods"), "list at least one method"));
        }
        if r.requests == 0 || r.requests > 1_000_000 {
            return Err(ctx.invalid(&key("requests"), "must be 1..=1000000"));
        }
        if r.per.0 < Duration::from_secs(1) {
            return Err(ctx.invalid(&key("per"), "must be at least 1s"));
        }
        rules.push(RateLimitRule {
            path: r.path,
            methods,
            requests: r.requests,
            per: r.per.0,
        });
    }
    Ok(rules)
}

/// What is compressed unless `compression.types` says otherwise: Django's static text (CSS, JavaScript,
/// source maps, SVG), its JSON and XML, plain text and fonts that are not compressed already (WOFF2 and
/// images are). Not `text/html`: see `compression.html`.
pub const COMPRESSIBLE_TYPES: [&str; 19] = [
    "text/css",
    "text/javascript",
    "application/javascript",
    "application/x-javascript",
    "application/json",
    "application/ld+json",
    "application/manifest+json",
    "application/problem+json",
    "application/geo+json",
    "application/xml",
    "text/xml",
    "application/rss+xml",
    "application/atom+xml",
    "image/svg+xml",
    "text/plain",
    "text/csv",
    "text/markdown",
    "application/wasm",
    "font/ttf",
];

/// `[compression]`: on by default for everything but HTML (BREACH: a proxy that compresses Django's
/// HTML undoes GZipMiddleware's length padding); level 1..=9 for all three encoders, 4 by default
/// (brotli's and zstd's defaults are for files compressed once, not per response).
fn validate_compression(
    c: raw::RawCompression,
    ctx: &Ctx,
) -> Result<CompressionPolicy, ConfigError> {
    let encodings = c
        .encodings
        .unwrap_or_else(|| vec!["zstd".into(), "br".into(), "gzip".into()]);
    let (mut zstd, mut br, mut gzip) = (false, false, false);
    for encoding in &encodings {
        match encoding.to_ascii_lowercase().as_str() {
            "zstd" => zstd = true,
            "br" => br = true,
            "gzip" => gzip = true,
            other => {
                return Err(ctx.invalid(
                    "compression.encodings",
                    format!("`{other}` is not one of \"zstd\", \"br\", \"gzip\""),
                ));
            }
        }
    }
    let enabled = c.enabled.unwrap_or(true);
    if enabled && encodings.is_empty() {
        return Err(ctx.invalid(
            "compression.encodings",
            "list at least one (or enabled = false)",
        ));
    }
    let mut types = Vec::new();
    for t in c
        .types
        .unwrap_or_else(|| COMPRESSIBLE_TYPES.iter().map(|t| t.to_string()).collect())
    {
        let t = t.trim().to_ascii_lowercase();
        if t == "text/html" {
            return Err(ctx.invalid(
                "compression.types",
                "text/html is set with compression.html = true (BREACH: read the README first)",
            ));
        }
        if t.split('/').count() != 2 || t.contains([';', ' ', '*']) {
            return Err(ctx.invalid(
                "compression.types",
                format!("`{t}` is not a media type like \"text/css\""),
            ));
        }
        types.push(t);
    }
    let level = c.level.unwrap_or(4);
    if !(1..=9).contains(&level) {
        return Err(ctx.invalid("compression.level", "must be 1..=9"));
    }
    let min_size = c.min_size.map(|b| b.0).unwrap_or(1024);
    Ok(CompressionPolicy {
        enabled,
        zstd,
        br,
        gzip,
        min_size,
        types,
        html: c.html.unwrap_or(false),
        level,
    })
}

/// `[storage]`: `files` (the default: `tls.dir`, nothing shared) or `redis` with a `redis://` or
/// `rediss://` (TLS) URL; the password in the URL or, better, in the environment variable `password_env`
/// names (checked here, so `check` finds a missing one).
fn validate_storage(
    s: raw::RawStorage,
    ctx: &Ctx,
    warnings: &mut Vec<String>,
) -> Result<Option<RedisStorage>, ConfigError> {
    match s.backend.unwrap_or(raw::RawStorageBackend::Files) {
        raw::RawStorageBackend::Files => {
            for (key, set) in [
                ("storage.url", s.url.is_some()),
                ("storage.password_env", s.password_env.is_some()),
                ("storage.key_prefix", s.key_prefix.is_some()),
                ("storage.encryption_key_env", s.encryption_key_env.is_some()),
            ] {
                if set {
                    return Err(ctx.invalid(key, "only used with storage.backend = \"redis\""));
                }
            }
            Ok(None)
        }
        raw::RawStorageBackend::Redis => {
            let Some(url) = s.url else {
                return Err(ctx.invalid(
                    "storage.url",
                    "backend = \"redis\" needs a url like \"redis://127.0.0.1:6379/0\" (\"rediss://\" for TLS)",
                ));
            };
            let parsed = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .ok()
                .filter(|_| url.starts_with("redis://") || url.starts_with("rediss://"));
            let Some(info) = parsed else {
                return Err(ctx.invalid(
                    "storage.url",
                    format!("`{}` is not a redis:// or rediss:// URL", redact_url(&url)),
                ));
            };
            let mut password = info.redis_settings().password().map(str::to_string);
            if password.is_some() {
                warnings.push(
                    "storage.url holds a password: prefer storage.password_env, so it need not sit in the file"
                        .into(),
                );
            }
            if let Some(var) = s.password_env {
                match std::env::var(&var) {
                    Ok(value) if !value.is_empty() => password = Some(value),
                    _ => {
                        return Err(ctx.invalid(
                            "storage.password_env",
                            format!("the environment variable `{var}` is not set"),
                        ));
                    }
                }
            }
            let key_prefix = s.key_prefix.unwrap_or_else(|| "portcullis:".into());
            if key_prefix.is_empty()
                || key_prefix
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(ctx.invalid(
                    "storage.key_prefix",
                    "a non-empty prefix without spaces, like \"portcullis:\"",
                ));
            }
            let encryption_key = match s.encryption_key_env {
                Some(var) => Some(
                    encryption_key_from_env(&var)
                        .map_err(|message| ctx.invalid("storage.encryption_key_env", message))?,
                ),
                None => {
                    warnings.push(
                        "storage.backend = \"redis\" without storage.encryption_key_env: the ACME account key \
                         and certificate keys sit in Redis in the clear, readable by whoever can read Redis"
                            .into(),
                    );
                    None
                }
            };
            Ok(Some(RedisStorage {
                url: redact_url(&url),
                password,
                key_prefix,
                encryption_key,
            }))
        }
    }
}

/// The 32-byte key in the environment variable `var`.
fn encryption_key_from_env(var: &str) -> Result<Vec<u8>, String> {
    decode_encryption_key(var, std::env::var(var).ok())
}

/// base64 (standard or URL-safe, padded or not) as `openssl rand -base64 32` writes it; `value`: what
/// the variable `var` holds.
pub(super) fn decode_encryption_key(var: &str, value: Option<String>) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let value = value.ok_or_else(|| format!("the environment variable `{var}` is not set"))?;
    let trimmed = value.trim().trim_end_matches('=');
    let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
        .map_err(|_| format!("`{var}` is not base64: make one with `openssl rand -base64 32`"))?;
    if decoded.len() != 32 {
        return Err(format!(
            "`{var}` holds {} bytes; AES-256-GCM needs 32 (`openssl rand -base64 32`)",
            decoded.len()
        ));
    }
    Ok(decoded)
}

/// The URL with any password replaced, for messages and `check`.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let shown = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                "***".into()
            };
            format!("{}{shown}{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// `[[login_lockout]]`: a login path, and how many failures in what window lock a client out for how
/// long. Failures are the statuses a failed login gets: Django's forms answer 200 (the form again), API
/// logins 400 or 401. A redirect is a success.
fn validate_login_lockouts(
    raw: Vec<raw::RawLoginLockout>,
    ctx: &Ctx,
) -> Result<Vec<LoginLockoutRule>, ConfigError> {
    let mut rules = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("login_lockout[{i}].{field}");
        check_path_prefix(ctx, &key("path"), &r.path, "/admin/login/")?;
        let failures = r.failures.unwrap_or(5);
        if !(1..=1000).contains(&failures) {
            return Err(ctx.invalid(&key("failures"), "must be 1..=1000"));
        }
        let window = r
            .window
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(15 * 60));
        let lockout = r
            .lockout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(15 * 60));
        for (field, value) in [("window", window), ("lockout", lockout)] {
            if value < Duration::from_secs(1) || value > Duration::from_secs(7 * 24 * 3600) {
                return Err(ctx.invalid(&key(field), "must be between 1s and 7d"));
            }
        }
        let failure_status = r.failure_status.unwrap_or_else(|| vec![200, 400, 401]);
        if failure_status.is_empty() {
            return Err(ctx.invalid(&key("failure_status"), "list at least one status"));
        }
        if let Some(bad) = failure_status
            .iter()
            .find(|s| !(200..600).contains(*s) || (300..400).contains(*s))
        {
            return Err(ctx.invalid(
                &key("failure_status"),
                format!("{bad}: a failure is a 2xx, 4xx or 5xx status (a redirect is a success)"),
            ));
        }
        rules.push(LoginLockoutRule {
            path: r.path,
            failures,
            window,
            lockout,
            failure_status,
        });
    }
    Ok(rules)
}

/// `[cross_origin]`: on by default (as Go's `CrossOriginProtection`); trusted origins written the way a
/// browser sends `Origin` (scheme, host, port only when not the default), exempt paths as plain prefixes.
fn validate_cross_origin(
    c: raw::RawCrossOrigin,
    ctx: &Ctx,
) -> Result<CrossOriginPolicy, ConfigError> {
    let mut trusted_origins = Vec::new();
    for origin in c.trusted_origins.unwrap_or_default() {
        match serialised_origin(&origin) {
            Some(s) => trusted_origins.push(s),
            None => {
                return Err(ctx.invalid(
                    "cross_origin.trusted_origins",
                    format!(
                        "`{origin}` is not an origin: write scheme and host (and a port only if not the default), like \"https://pay.example.net\""
                    ),
                ));
            }
        }
    }
    let mut exempt = Vec::new();
    for path in c.exempt.unwrap_or_default() {
        check_path_prefix(ctx, "cross_origin.exempt", &path, "/saml/acs/")?;
        exempt.push(path);
    }
    Ok(CrossOriginPolicy {
        mode: c.mode.unwrap_or(CrossOriginMode::Enforce),
        trusted_origins,
        exempt,
        allow_same_site: c.allow_same_site.unwrap_or(false),
    })
}

/// `https://Pay.Example.net:443` as a browser's `Origin` header writes it (RFC 6454 §6.2): lowercase,
/// no default port, no path; `None` if it is not an origin at all.
fn serialised_origin(origin: &str) -> Option<String> {
    let uri: http::Uri = origin.parse().ok()?;
    let default_port = match uri.scheme_str()? {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    let authority = uri.authority()?;
    if authority.as_str().contains('@') || !matches!(uri.path(), "" | "/") || uri.query().is_some()
    {
        return None;
    }
    let host = authority.host().to_ascii_lowercase();
    let scheme = uri.scheme_str()?;
    Some(match authority.port_u16() {
        Some(port) if port != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// `[[static]]`: each prefix a plain path ending in `/`, each folder present now (a typo must not become
/// a site without CSS at the first deploy), longest prefix first so `/static/admin/` wins over `/static/`.
fn validate_static_files(
    raw: Vec<raw::RawStatic>,
    ctx: &Ctx,
) -> Result<Vec<StaticMount>, ConfigError> {
    let mut mounts: Vec<StaticMount> = Vec::new();
    for (i, s) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("static[{i}].{field}");
        let url = s.url;
        let plain = url
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'%' && b != b'?' && b != b'#');
        if !url.starts_with('/') || !url.ends_with('/') || url == "/" || !plain {
            return Err(ctx.invalid(
                &key("url"),
                format!(
                    "`{url}` must be a path prefix like \"/static/\": starting and ending with '/', not \
                     \"/\" alone (that would hide the app), no '%', '?' or '#'"
                ),
            ));
        }
        if url
            .split('/')
            .any(|segment| segment == "." || segment == "..")
        {
            return Err(ctx.invalid(&key("url"), "`.` and `..` segments are not allowed"));
        }
        if mounts.iter().any(|m| m.url == url) {
            return Err(ctx.invalid(&key("url"), format!("`{url}` is already served")));
        }
        let dir = ctx.path(&s.dir);
        if !dir.is_dir() {
            return Err(ctx.invalid(
                &key("dir"),
                format!(
                    "`{}` is not a folder (run collectstatic first, or fix the path)",
                    dir.display()
                ),
            ));
        }
        let cache_control = s
            .cache_control
            .map(|v| header_value(ctx, &key("cache_control"), &v))
            .transpose()?;
        let symlinks = s.symlinks.unwrap_or(SymlinkPolicy::Follow);
        mounts.push(StaticMount {
            url,
            dir,
            cache_control,
            symlinks,
            internal: s.internal.unwrap_or(false),
        });
    }
    mounts.sort_by_key(|m| std::cmp::Reverse(m.url.len()));
    Ok(mounts)
}

/// External account binding (RFC 8555 §7.3.4): a key id and an HMAC key in base64url, checked here so a
/// pasted-wrong key fails `check` instead of the first order. CAs issue keys of 32 bytes or more; HMAC
/// wants at least 16 (RFC 2104 §3).
fn check_eab(ctx: &Ctx, kid: &str, hmac_key: &str) -> Result<(), ConfigError> {
    use base64::Engine;
    if kid.trim().is_empty() {
        return Err(ctx.invalid("acme.eab.kid", "the key id from the CA must not be empty"));
    }
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(hmac_key.trim_end_matches('='))
        .map_err(|e| {
            ctx.invalid(
                "acme.eab.hmac_key",
                format!("not base64url (the alphabet with '-' and '_'): {e}"),
            )
        })?;
    if key.len() < 16 {
        return Err(ctx.invalid(
            "acme.eab.hmac_key",
            format!(
                "decodes to {} bytes; an HMAC key from the CA has at least 16",
                key.len()
            ),
        ));
    }
    Ok(())
}

fn validate_acme(
    a: raw::RawAcme,
    ctx: &Ctx,
    server: &ServerConfig,
) -> Result<AcmeConfig, ConfigError> {
    let directory_url = match a.directory.as_deref().unwrap_or("letsencrypt") {
        "letsencrypt" => "https://acme-v02.api.letsencrypt.org/directory".to_string(),
        "letsencrypt-staging" => {
            "https://acme-staging-v02.api.letsencrypt.org/directory".to_string()
        }
        url if url.starts_with("https://") => url.to_string(),
        other => {
            return Err(ctx.invalid(
                "acme.directory",
                format!("`{other}`: use \"letsencrypt\", \"letsencrypt-staging\" or an https:// directory URL"),
            ));
        }
    };
    let contact = a.contact.unwrap_or_default();
    for c in &contact {
        if !c.starts_with("mailto:") {
            return Err(ctx.invalid(
                "acme.contact",
                format!("`{c}` must be a mailto: URL (RFC 8555 §7.3)"),
            ));
        }
    }
    let challenge = a.challenge.unwrap_or(ChallengeType::TlsAlpn01);
    if challenge == ChallengeType::Http01 && server.http.is_none() {
        return Err(ctx.invalid(
            "acme.challenge",
            "http-01 needs the plain listener: set server.http",
        ));
    }
    if let Some(profile) = &a.profile
        && (profile.is_empty()
            || !profile
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
    {
        return Err(ctx.invalid(
            "acme.profile",
            format!("`{profile}` is not a profile name (the CA's directory lists them: `classic`, `tlsserver`, `shortlived` at Let's Encrypt)"),
        ));
    }
    let dur = |d: Option<units::HumanDuration>, default: u64| {
        d.map(|d| d.0).unwrap_or(Duration::from_secs(default))
    };
    Ok(AcmeConfig {
        directory_url,
        contact,
        challenge,
        directory_ca: a.directory_ca.as_deref().map(|p| ctx.path(p)),
        eab: match a.eab {
            None => None,
            Some(e) => {
                check_eab(ctx, &e.kid, &e.hmac_key)?;
                Some((e.kid, e.hmac_key))
            }
        },
        profile: a.profile,
        renew_check_interval: dur(a.renew_check_interval, 3600),
        retry_base_delay: dur(a.retry_base_delay, 60),
        retry_max_delay: dur(a.retry_max_delay, 6 * 3600),
    })
}
