//! Configuration: one TOML file, parsed strictly (`raw`), then validated into the typed `Config` the server
//! runs on. Every error names the key, the line and what is allowed; every default is chosen for a Django
//! app behind Gunicorn and written down in `config/production.example.toml`.

pub mod generate;
mod raw;
pub mod units;
mod validate;
pub use validate::COMPRESSIBLE_TYPES;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
pub use ipnet::IpNet;

use raw::RawConfig;
use validate::{Ctx, validate};

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
    /// Where Prometheus metrics are served (`GET /metrics`); `None`: nowhere.
    pub metrics: Option<SocketAddr>,
    /// Directories served at URL prefixes instead of the upstream, longest prefix first.
    pub static_files: Vec<StaticMount>,
    /// Per-client request budgets for chosen paths (logins).
    pub rate_limits: Vec<RateLimitRule>,
    /// The team's own pages for 502/503/504, and the maintenance switch.
    pub errors: ErrorPages,
    /// Unsafe cross-origin requests from browsers refused, reported or let be.
    pub cross_origin: CrossOriginPolicy,
    /// Clients locked out of a login form after repeated failures.
    pub login_lockouts: Vec<LoginLockoutRule>,
    /// Where browsers send CSP violation reports; `None`: not collected.
    pub csp_reports: Option<CspReports>,
    /// Shared state for replicas (`[storage]`); `None`: the files in `tls.dir`, nothing shared.
    pub redis: Option<RedisStorage>,
    /// Response compression by `Accept-Encoding` (`[compression]`).
    pub compression: CompressionPolicy,
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
    /// Load balancers that open every connection with a PROXY protocol header (v1 or v2); from
    /// them the header is required, from anyone else it is refused. Empty: PROXY protocol off.
    pub proxy_protocol: Vec<IpNet>,
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
    /// The certificate profile to order (`classic`, `tlsserver`, `shortlived` at Let's Encrypt);
    /// `None`: the CA's default, or `shortlived` for IP addresses where the CA offers it.
    pub profile: Option<String>,
    pub renew_check_interval: Duration,
    pub retry_base_delay: Duration,
    pub retry_max_delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum ChallengeType {
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    #[serde(rename = "http-01")]
    Http01,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// At least one; in the order given (`BalancePolicy::First` tries them in it).
    pub backends: Vec<BackendConfig>,
    pub policy: BalancePolicy,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    /// A non-idempotent request goes on a kept-alive connection only if it has been idle for less than
    /// this (zero: always a new one); see `proxy::upstream::Reuse`.
    pub pool_reuse_for_posts: Duration,
    /// Further attempts after the first, where one is safe (see `proxy`).
    pub retries: u32,
    /// Consecutive connection failures or timeouts that mark a backend down for `fail_timeout`.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub health: Option<HealthCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub target: UpstreamTarget,
    pub weight: u32,
}

/// How a backend is chosen for each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancePolicy {
    /// The fewest requests in flight (per unit of weight): suits Gunicorn's fixed worker pools.
    LeastRequests,
    RoundRobin,
    /// The first healthy one in order: a primary with backups.
    First,
}

/// Active health checks: `GET path` with the first domain as `Host`, every `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passed checks that bring a backend back.
    pub healthy_threshold: u32,
    /// Consecutive failed checks that take it out.
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTarget {
    /// `host:port` of a plain-HTTP upstream (Gunicorn speaks HTTP/1.1 without TLS).
    Tcp(http::uri::Authority),
    Unix(PathBuf),
}

impl UpstreamConfig {
    /// The backends and how they are chosen, for the log and `check`.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self
            .backends
            .iter()
            .map(|b| match b.weight {
                1 => b.target.describe(),
                w => format!("{} (weight {w})", b.target.describe()),
            })
            .collect();
        match names.len() {
            1 => names.join(""),
            _ => format!("{} by {:?}", names.join(", "), self.policy),
        }
    }
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
    /// `Clear-Site-Data` on successful answers to these paths (logout views).
    pub clear_site_data: Option<ClearSiteData>,
}

/// `headers.clear_site_data`: the path prefixes (logouts) and the header's value.
#[derive(Debug, Clone)]
pub struct ClearSiteData {
    pub paths: Vec<String>,
    pub value: HeaderValue,
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
    /// Cookies made to end with the browser session: `Expires` and `Max-Age` dropped (Django's
    /// `SESSION_EXPIRE_AT_BROWSER_CLOSE`, at the edge), except on a deletion.
    pub session_only: Vec<String>,
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
    /// Responses with a declared length up to this are read whole from the upstream before they are
    /// sent on: a slow reader then costs a Gunicorn worker nothing.
    pub buffer_response: u64,
    /// What all bodies held whole in memory may take together (`body::BufferBudget`).
    pub buffer_memory: u64,
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_pending_resets: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `log.access_format`: `text` and `json` name `log.format` (the access log is one of its events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessFormat {
    Text,
    Json,
    Combined,
}

/// After `failures` failed POSTs to `path` (answered with one of `failure_status`) within `window`, that
/// client's POSTs there get 429 for `lockout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginLockoutRule {
    pub path: String,
    pub failures: u32,
    pub window: Duration,
    pub lockout: Duration,
    pub failure_status: Vec<u16>,
}

/// `[csp_reports]`: the collector's path (also put in the CSP headers' `report-uri`/`report-to`), the
/// largest report body, and each client's budget of reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CspReports {
    pub path: String,
    pub max_body: usize,
    pub budget: RateLimitRule,
}

/// `[compression]`: which encodings, for which media types, from what size, at what level. HTML only
/// when asked (BREACH), then with random length padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionPolicy {
    pub enabled: bool,
    pub zstd: bool,
    pub br: bool,
    pub gzip: bool,
    pub min_size: u64,
    /// Media types (lowercase, no parameters); `text/html` never here, see `html`.
    pub types: Vec<String>,
    pub html: bool,
    pub level: u32,
}

/// `[storage] backend = "redis"`: the server (its password from the URL or the environment) and the
/// prefix every key gets, so several sites can share one Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisStorage {
    /// As written, without a password (safe to print).
    pub url: String,
    pub password: Option<String>,
    pub key_prefix: String,
    /// AES-256-GCM key (32 bytes) that seals secrets before they reach Redis.
    pub encryption_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for RedisStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStorage")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("key_prefix", &self.key_prefix)
            .field(
                "encryption_key",
                &self.encryption_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// `cross_origin.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrossOriginMode {
    /// Refuse with 403.
    Enforce,
    /// Let through, and write a security event.
    Report,
    Off,
}

/// `[cross_origin]`: what unsafe requests from other sites' pages may reach the app.
#[derive(Debug, Clone)]
pub struct CrossOriginPolicy {
    pub mode: CrossOriginMode,
    /// Origins allowed to send them, as a browser writes them: `https://pay.example.net`.
    pub trusted_origins: Vec<String>,
    /// Path prefixes (in `route_path`'s form) that take them from anyone: SAML, payment returns.
    pub exempt: Vec<String>,
    /// Whether sibling subdomains (`Sec-Fetch-Site: same-site`) count as ours.
    pub allow_same_site: bool,
}

/// At most `requests` requests per `per` from one client to paths starting with `path`, for `methods`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitRule {
    pub path: String,
    pub methods: Vec<http::Method>,
    pub requests: u32,
    pub per: Duration,
}

/// `[errors]`: HTML read at start and on reload, sent instead of the built-in pages.
#[derive(Debug, Clone, Default)]
pub struct ErrorPages {
    pub bad_gateway: Option<bytes::Bytes>,
    pub service_unavailable: Option<bytes::Bytes>,
    pub gateway_timeout: Option<bytes::Bytes>,
    /// While this file exists, every request (but from `maintenance_allow`) gets 503 and the file's
    /// contents as the page, without reaching Gunicorn.
    pub maintenance_file: Option<PathBuf>,
    pub maintenance_allow: Vec<IpNet>,
    pub maintenance_retry_after: Duration,
}

/// A directory served under a URL prefix (Django's `STATIC_URL` → `STATIC_ROOT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticMount {
    /// Starts and ends with `/`, e.g. `/static/`.
    pub url: String,
    pub dir: PathBuf,
    pub cache_control: Option<HeaderValue>,
    pub symlinks: SymlinkPolicy,
    /// Reachable only through an upstream response's `X-Accel-Redirect`; a direct request is a 404.
    pub internal: bool,
}

/// Whether a `[[static]]` folder's symbolic links may lead out of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SymlinkPolicy {
    /// Follow every link, as nginx does by default (`collectstatic --link` makes them on purpose).
    Follow,
    /// Serve a file only if its real path is inside the folder.
    Inside,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    pub access: AccessLog,
}

/// Where and how the access log is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    /// An event on the `portcullis::access` target, in `log.format`, on standard error.
    Events,
    /// Apache/nginx "combined" lines plus the request time, alone on standard output, for GoAccess,
    /// fail2ban and log shippers that expect them.
    Combined,
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
                match validate::key_at(text, span.start) {
                    Some(key) => format!("{line}:{column}: `{key}`: "),
                    None => format!("{line}:{column}: "),
                }
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
        out.push_str(&format!("upstream: {}\n", self.upstream.describe()));
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
        if !self.cookies.session_only.is_empty() {
            out.push_str(&format!(
                "cookies:  session-only (no Expires/Max-Age): {}\n",
                self.cookies.session_only.join(", ")
            ));
        }
        if let Some(clear) = &self.headers.clear_site_data {
            out.push_str(&format!(
                "logout:   Clear-Site-Data: {} on {}\n",
                clear.value.to_str().unwrap_or("?"),
                clear.paths.join(", ")
            ));
        }
        out.push_str(&format!(
            "limits:   body {} bytes, headers {} bytes, {} connections\n",
            self.limits.max_body, self.limits.max_header_bytes, self.limits.max_connections
        ));
        for rule in &self.rate_limits {
            let methods: Vec<&str> = rule.methods.iter().map(http::Method::as_str).collect();
            out.push_str(&format!(
                "limit:    {} {}* at most {} per {} per client\n",
                methods.join("/"),
                rule.path,
                rule.requests,
                humantime::format_duration(rule.per)
            ));
        }
        for rule in &self.login_lockouts {
            out.push_str(&format!(
                "lockout:  POST {}* after {} failed logins ({}) within {}, for {} per client\n",
                rule.path,
                rule.failures,
                rule.failure_status
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join("/"),
                humantime::format_duration(rule.window),
                humantime::format_duration(rule.lockout)
            ));
        }
        let c = &self.compression;
        if c.enabled {
            let encodings: Vec<&str> = [("zstd", c.zstd), ("br", c.br), ("gzip", c.gzip)]
                .iter()
                .filter(|(_, on)| *on)
                .map(|(name, _)| *name)
                .collect();
            out.push_str(&format!(
                "compress: {} at level {} from {} bytes, {} types{}\n",
                encodings.join("/"),
                c.level,
                c.min_size,
                c.types.len(),
                if c.html {
                    " and HTML (padded)"
                } else {
                    ", not HTML"
                }
            ));
        } else {
            out.push_str("compress: off\n");
        }
        if let Some(redis) = &self.redis {
            out.push_str(&format!(
                "storage:  redis {} (keys {}*): login budgets and the local CA shared by every replica\n",
                redis.url, redis.key_prefix
            ));
        }
        if let Some(reports) = &self.csp_reports {
            out.push_str(&format!(
                "csp:      reports collected at {} (at most {} per {} per client, {} bytes each)\n",
                reports.path,
                reports.budget.requests,
                humantime::format_duration(reports.budget.per),
                reports.max_body
            ));
        }
        let co = &self.cross_origin;
        out.push_str(&match co.mode {
            CrossOriginMode::Off => "cross-origin: off\n".to_string(),
            mode => format!(
                "cross-origin: {} for unsafe methods (trusted: {}; exempt: {}; same-site {})\n",
                if mode == CrossOriginMode::Enforce {
                    "refused"
                } else {
                    "reported"
                },
                none_if_empty(&co.trusted_origins),
                none_if_empty(&co.exempt),
                if co.allow_same_site {
                    "allowed"
                } else {
                    "refused"
                },
            ),
        });
        for mount in &self.static_files {
            out.push_str(&format!(
                "static:   {} → {}\n",
                mount.url,
                mount.dir.display()
            ));
        }
        match self.metrics {
            Some(addr) => out.push_str(&format!("metrics:  http://{addr}/metrics\n")),
            None => out.push_str("metrics:  off\n"),
        }
        out
    }
}

fn none_if_empty(list: &[String]) -> String {
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

#[cfg(test)]
mod tests;
