//! Configuration: one TOML file, parsed strictly (`raw`), then validated into the typed `Config` the server
//! runs on. Every error names the key, the line and what is allowed; every default is chosen for a Django
//! app behind Gunicorn and written down in `config/production.example.toml`.

mod raw;
pub mod units;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use raw::{RawConfig, RawHeaderRule};

/// Django's `DATA_UPLOAD_MAX_MEMORY_SIZE` default (2.5 MiB): bodies above it would be refused by Django anyway,
/// after a Gunicorn worker had waited for all of them.
pub const DJANGO_DATA_UPLOAD_MAX_MEMORY_SIZE: u64 = 2_621_440;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{message}")]
    Parse { path: String, message: String },
    #[error("{path}{}: `{key}`: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        path: String,
        key: String,
        line: Option<usize>,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub acme: Option<AcmeConfig>,
    pub upstream: UpstreamConfig,
    pub headers: SecurityHeaders,
    pub cookies: CookiePolicy,
    pub limits: Limits,
    pub log: LogConfig,
    /// Legal but probably unintended settings; `check` prints them and `run` logs them.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub domains: Domains,
    pub workers: usize,
    /// The port clients reach HTTPS on, for redirects (differs from `https` behind port mapping);
    /// `None`: the port the HTTPS listener is bound to.
    pub public_https_port: Option<u16>,
    pub health_path: Option<String>,
    pub trusted_proxies: Vec<IpNet>,
    pub shutdown_grace: Duration,
}

/// The names this proxy serves: the Host/SNI allowlist and the certificate names. Stored lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domains(Vec<String>);

impl Domains {
    pub fn new(names: Vec<String>) -> Self {
        Domains(names.into_iter().map(|n| n.to_ascii_lowercase()).collect())
    }

    /// `host` is a Host header or SNI value without port; compared ASCII case-insensitively (RFC 9110 §4.2.3).
    pub fn contains(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        self.0.iter().any(|d| d.eq_ignore_ascii_case(host))
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    pub fn has_ip(&self) -> bool {
        self.0.iter().any(|d| d.parse::<IpAddr>().is_ok())
    }
}

/// An address range in CIDR notation (or a single address) for `trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    network: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR range (e.g. 10.0.0.0/8)"))?;
        let network = canonical_ip(network);
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?,
        };
        Ok(IpNet { network, prefix })
    }
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) compare as the IPv4 address they carry.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub source: TlsSource,
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// A local CA kept in `dir`, like Caddy's `tls internal`: for development and private networks.
    Local,
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    Acme,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    pub directory_url: String,
    pub contact: Vec<String>,
    pub challenge: ChallengeType,
    pub directory_ca: Option<PathBuf>,
    pub eab: Option<(String, String)>,
    pub renew_check_interval: Duration,
    pub retry_base_delay: Duration,
    pub retry_max_delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeType {
    TlsAlpn01,
    Http01,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub target: UpstreamTarget,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTarget {
    /// `host:port` of a plain-HTTP upstream (Gunicorn speaks HTTP/1.1 without TLS).
    Tcp(http::uri::Authority),
    Unix(PathBuf),
}

impl UpstreamTarget {
    pub fn describe(&self) -> String {
        match self {
            UpstreamTarget::Tcp(a) => format!("http://{a}"),
            UpstreamTarget::Unix(p) => format!("unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderMode {
    /// Replace whatever the upstream sent.
    Override,
    /// Keep the upstream's value when it sent one (Django's SecurityMiddleware or a per-view decorator).
    IfAbsent,
}

#[derive(Debug, Clone)]
pub struct HeaderRule {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub mode: HeaderMode,
}

/// The response header policy, precomputed once per config so the request path only copies values.
#[derive(Debug, Clone)]
pub struct SecurityHeaders {
    /// Applied to every response, HTTPS and plain HTTP.
    pub rules: Vec<HeaderRule>,
    /// Applied to HTTPS responses only: HSTS on plain HTTP is ignored by browsers (RFC 6797 §8.1).
    pub https_only_rules: Vec<HeaderRule>,
    pub remove: Vec<HeaderName>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

impl SameSite {
    pub fn attribute(self) -> &'static str {
        match self {
            SameSite::Lax => "SameSite=Lax",
            SameSite::Strict => "SameSite=Strict",
            SameSite::None => "SameSite=None",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CookiePolicy {
    pub secure: bool,
    pub http_only: bool,
    pub same_site: Option<SameSite>,
    pub http_only_exempt: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body: u64,
    /// Request bodies with a declared length up to this are read whole before the upstream sees the
    /// request: a slow client then costs a Gunicorn worker nothing.
    pub buffer_body: u64,
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_pending_resets: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    pub access: bool,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string(), path.parent())
    }

    /// Parses and validates `text`. `origin` names the file in errors; relative paths in the file are
    /// resolved against `base_dir` (the file's folder) so the proxy behaves the same from any working dir.
    pub fn parse(text: &str, origin: &str, base_dir: Option<&Path>) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // One line, like the validation errors: `file:line:column: message`.
            let at = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("{line}:{column}: ")
            });
            ConfigError::Parse {
                path: origin.to_string(),
                message: format!("{}{}", at.unwrap_or_default(), e.message().trim_end()),
            }
        })?;
        let ctx = Ctx {
            origin,
            text,
            base_dir: base_dir.map(Path::to_path_buf),
        };
        validate(raw, &ctx)
    }

    /// A few lines for `portcullis check` and the start-up log.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let domains: Vec<&str> = self.server.domains.iter().collect();
        out.push_str(&format!("domains:  {}\n", domains.join(", ")));
        out.push_str(&format!("https:    {}\n", self.server.https));
        match self.server.http {
            Some(a) => out.push_str(&format!(
                "http:     {a} (redirects to HTTPS port {})\n",
                self.server
                    .public_https_port
                    .unwrap_or(self.server.https.port())
            )),
            None => out.push_str("http:     off\n"),
        }
        let tls = match &self.tls.source {
            TlsSource::Local => "local CA".to_string(),
            TlsSource::Files { cert, .. } => format!("files ({})", cert.display()),
            TlsSource::Acme => format!(
                "acme ({})",
                self.acme
                    .as_ref()
                    .map(|a| a.directory_url.as_str())
                    .unwrap_or("?")
            ),
        };
        out.push_str(&format!(
            "tls:      {tls}, state in {}\n",
            self.tls.dir.display()
        ));
        out.push_str(&format!("upstream: {}\n", self.upstream.target.describe()));
        let names: Vec<String> = self
            .headers
            .https_only_rules
            .iter()
            .chain(&self.headers.rules)
            .map(|r| r.name.to_string())
            .collect();
        out.push_str(&format!("headers:  {}\n", names.join(", ")));
        out.push_str(&format!(
            "cookies:  Secure={} HttpOnly={} {} (HttpOnly exempt: {})\n",
            self.cookies.secure,
            self.cookies.http_only,
            self.cookies
                .same_site
                .map(SameSite::attribute)
                .unwrap_or("off"),
            self.cookies.http_only_exempt.join(", ")
        ));
        out.push_str(&format!(
            "limits:   body {} bytes, headers {} bytes, {} connections\n",
            self.limits.max_body, self.limits.max_header_bytes, self.limits.max_connections
        ));
        out
    }
}

struct Ctx<'a> {
    origin: &'a str,
    text: &'a str,
    base_dir: Option<PathBuf>,
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

/// Finds the 1-based line of a dotted key (`server.domains`) in the TOML source, for error messages.
fn line_of_key(text: &str, dotted: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut table: &DeTable = root.get_ref();
    let mut span = None;
    // The deepest key that exists: a missing leaf (a default that failed) points at its table.
    for part in dotted.split('.') {
        let Some((key, value)) = table.iter().find(|(k, _)| k.get_ref() == part) else {
            break;
        };
        span = Some(key.span());
        match value.get_ref() {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    let offset = span?.start;
    Some(text[..offset.min(text.len())].matches('\n').count() + 1)
}

fn mode_of(
    ctx: &Ctx,
    key: &str,
    mode: Option<&str>,
    default: Option<HeaderMode>,
) -> Result<Option<HeaderMode>, ConfigError> {
    match mode {
        None => Ok(default),
        Some("override") => Ok(Some(HeaderMode::Override)),
        Some("if-absent") => Ok(Some(HeaderMode::IfAbsent)),
        Some("off") => Ok(None),
        Some(other) => Err(ctx.invalid(
            &format!("{key}.mode"),
            format!("unknown mode `{other}`; use \"override\", \"if-absent\" or \"off\""),
        )),
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
    ]
}

fn validate_headers(
    raw: raw::RawHeaders,
    ctx: &Ctx,
    warnings: &mut Vec<String>,
) -> Result<SecurityHeaders, ConfigError> {
    let hsts = &raw.strict_transport_security;
    let hsts_key = "headers.strict_transport_security";
    let mut https_only_rules = Vec::new();
    if let Some(mode) = mode_of(
        ctx,
        hsts_key,
        hsts.mode.as_deref(),
        Some(HeaderMode::Override),
    )? {
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

    let chosen: [(&RawHeaderRule, bool); 7] = [
        (&raw.content_security_policy, true),
        (&raw.content_security_policy_report_only, false),
        (&raw.x_frame_options, true),
        (&raw.x_content_type_options, true),
        (&raw.referrer_policy, true),
        (&raw.permissions_policy, true),
        (&raw.cross_origin_opener_policy, true),
    ];
    let mut rules = Vec::new();
    for (default, (rule, on_by_default)) in header_defaults().into_iter().zip(chosen) {
        let key = default.key;
        // The report-only CSP has no sensible default value: it is on only when given one.
        let default_mode = (on_by_default || rule.value.is_some()).then_some(default.mode);
        let Some(mode) = mode_of(ctx, key, rule.mode.as_deref(), default_mode)? else {
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
            _ => {}
        }
        rules.push(HeaderRule {
            name: default.name,
            value: header_value(ctx, value_key, value)?,
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
    Ok(SecurityHeaders {
        rules,
        https_only_rules,
        remove,
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

fn validate(raw: RawConfig, ctx: &Ctx) -> Result<Config, ConfigError> {
    let mut warnings = Vec::new();

    // [server]
    let s = raw.server;
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
        trusted_proxies.push(
            p.parse::<IpNet>()
                .map_err(|m| ctx.invalid("server.trusted_proxies", m))?,
        );
    }
    let server = ServerConfig {
        https,
        http,
        domains: Domains::new(domains),
        workers,
        public_https_port,
        health_path,
        trusted_proxies,
        shutdown_grace: s
            .shutdown_grace
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(30)),
    };

    // [tls]
    let dir = ctx.path(raw.tls.dir.as_deref().unwrap_or("certs"));
    let source = match raw.tls.source.as_deref().unwrap_or("local") {
        "local" => TlsSource::Local,
        "files" => {
            let cert = raw.tls.cert.as_deref().ok_or_else(|| {
                ctx.invalid(
                    "tls.cert",
                    "source = \"files\" needs `cert` (PEM chain) and `key` (PEM key)",
                )
            })?;
            let key = raw.tls.key.as_deref().ok_or_else(|| {
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
        "acme" => TlsSource::Acme,
        other => {
            return Err(ctx.invalid(
                "tls.source",
                format!("unknown source `{other}`; use \"local\", \"files\" or \"acme\""),
            ));
        }
    };
    if !matches!(source, TlsSource::Files { .. })
        && (raw.tls.cert.is_some() || raw.tls.key.is_some())
    {
        return Err(ctx.invalid(
            "tls.cert",
            "`cert`/`key` are only used with source = \"files\"",
        ));
    }
    let tls = TlsConfig { source, dir };

    // [acme]
    let acme = match (raw.acme, &tls.source) {
        (Some(a), TlsSource::Acme) => Some(validate_acme(a, ctx, &server)?),
        (None, TlsSource::Acme) => Some(validate_acme(raw::RawAcme::default(), ctx, &server)?),
        (Some(_), _) => {
            return Err(ctx.invalid("acme", "[acme] is only used with tls.source = \"acme\""));
        }
        (None, _) => None,
    };

    // [upstream]
    let u = raw.upstream;
    let target = if let Some(path) = u.url.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(ctx.invalid(
                "upstream.url",
                "unix: needs a socket path, like \"unix:/run/gunicorn.sock\"",
            ));
        }
        UpstreamTarget::Unix(ctx.path(path))
    } else {
        let uri: http::Uri = u.url.parse().map_err(|_| {
            ctx.invalid(
                "upstream.url",
                format!("`{}` is not a URL like \"http://127.0.0.1:8000\"", u.url),
            )
        })?;
        if uri.scheme_str() != Some("http") {
            return Err(ctx.invalid(
                "upstream.url",
                "must be http://host:port (Gunicorn speaks plain HTTP) or unix:/path/to.sock",
            ));
        }
        if uri.path() != "/" || uri.query().is_some() {
            return Err(ctx.invalid(
                "upstream.url",
                "must not have a path or query: requests keep their own",
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| ctx.invalid("upstream.url", "needs a host and port"))?;
        if authority.port_u16().is_none() {
            return Err(ctx.invalid(
                "upstream.url",
                "give the port explicitly, like \"http://127.0.0.1:8000\"",
            ));
        }
        UpstreamTarget::Tcp(authority)
    };
    let upstream = UpstreamConfig {
        target,
        connect_timeout: u
            .connect_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(5)),
        response_timeout: u
            .response_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(60)),
        pool_idle_timeout: u
            .pool_idle_timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(60)),
        pool_max_idle: u.pool_max_idle.unwrap_or(64),
    };

    let headers = validate_headers(raw.headers, ctx, &mut warnings)?;

    // [cookies]
    let c = raw.cookies;
    let same_site = match c.same_site.as_deref() {
        None => Some(SameSite::Lax),
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "lax" => Some(SameSite::Lax),
            "strict" => Some(SameSite::Strict),
            "none" => Some(SameSite::None),
            "off" => None,
            _ => {
                return Err(ctx.invalid(
                    "cookies.same_site",
                    format!("unknown value `{v}`; use \"Lax\", \"Strict\", \"None\" or \"off\""),
                ));
            }
        },
    };
    let cookies = CookiePolicy {
        secure: c.secure.unwrap_or(true),
        http_only: c.http_only.unwrap_or(true),
        same_site,
        http_only_exempt: c
            .http_only_exempt
            .unwrap_or_else(|| vec!["csrftoken".into()]),
    };
    if !cookies.secure {
        warnings.push("cookies.secure = false: session cookies can leak over plain HTTP".into());
    }

    // [limits]
    let l = raw.limits;
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
        max_connections: l.max_connections.unwrap_or(10_000),
        h2_max_concurrent_streams: l.h2_max_concurrent_streams.unwrap_or(128),
        h2_max_pending_resets: l.h2_max_pending_resets.unwrap_or(20),
    };
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
    if limits.max_headers == 0
        || limits.max_connections == 0
        || limits.h2_max_concurrent_streams == 0
    {
        let key = if limits.max_headers == 0 {
            "limits.max_headers"
        } else if limits.max_connections == 0 {
            "limits.max_connections"
        } else {
            "limits.h2_max_concurrent_streams"
        };
        return Err(ctx.invalid(key, "must be at least 1"));
    }

    // [log]
    let format = match raw.log.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(ctx.invalid(
                "log.format",
                format!("unknown format `{other}`; use \"text\" or \"json\""),
            ));
        }
    };
    let level = raw.log.level.unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        return Err(ctx.invalid(
            "log.level",
            format!("`{level}` is not a level (error, warn, info, debug, trace)"),
        ));
    }
    let log = LogConfig {
        format,
        level,
        access: raw.log.access.unwrap_or(true),
    };

    Ok(Config {
        server,
        tls,
        acme,
        upstream,
        headers,
        cookies,
        limits,
        log,
        warnings,
    })
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
    let challenge = match a.challenge.as_deref().unwrap_or("tls-alpn-01") {
        "tls-alpn-01" => ChallengeType::TlsAlpn01,
        "http-01" => ChallengeType::Http01,
        other => {
            return Err(ctx.invalid(
                "acme.challenge",
                format!("unknown challenge `{other}`; use \"tls-alpn-01\" or \"http-01\""),
            ));
        }
    };
    if challenge == ChallengeType::Http01 && server.http.is_none() {
        return Err(ctx.invalid(
            "acme.challenge",
            "http-01 needs the plain listener: set server.http",
        ));
    }
    if server.domains.has_ip() {
        return Err(ctx.invalid(
            "server.domains",
            "ACME certificates are for DNS names; remove IP addresses",
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
        eab: a.eab.map(|e| (e.kid, e.hmac_key)),
        renew_check_interval: dur(a.renew_check_interval, 3600),
        retry_base_delay: dur(a.retry_base_delay, 60),
        retry_max_delay: dur(a.retry_max_delay, 6 * 3600),
    })
}

#[cfg(test)]
mod tests;
