//! The config file as written: serde structs that reject unknown keys. Nothing here is trusted yet;
//! `super::validate` turns it into the typed `Config` the server runs on.

use serde::Deserialize;

use super::units::{ByteSize, HumanDuration};
use super::{
    AccessFormat, BalancePolicy, ChallengeType, CrossOriginMode, LogFormat, SymlinkPolicy,
};

// The string choices parse straight into enums: a wrong one is a parse error that names the key, its
// line and the values allowed (serde's "unknown variant `x`, expected one of …").

/// `headers.*.mode`: how one header is applied; `Off` leaves it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RawHeaderMode {
    Override,
    IfAbsent,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawTlsSource {
    Local,
    Files,
    Acme,
}

/// `cookies.same_site`, in any of the spellings Django's settings use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RawSameSite {
    #[serde(alias = "lax", alias = "LAX")]
    Lax,
    #[serde(alias = "strict", alias = "STRICT")]
    Strict,
    #[serde(alias = "none", alias = "NONE")]
    None,
    #[serde(rename = "off")]
    Off,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: RawServer,
    #[serde(default)]
    pub tls: RawTls,
    pub acme: Option<RawAcme>,
    pub upstream: RawUpstream,
    #[serde(default)]
    pub headers: RawHeaders,
    #[serde(default)]
    pub cookies: RawCookies,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub log: RawLog,
    pub metrics: Option<RawMetrics>,
    #[serde(default, rename = "static")]
    pub static_files: Vec<RawStatic>,
    #[serde(default)]
    pub rate_limit: Vec<RawRateLimit>,
    pub errors: Option<RawErrors>,
    #[serde(default)]
    pub cross_origin: RawCrossOrigin,
    #[serde(default)]
    pub login_lockout: Vec<RawLoginLockout>,
    pub csp_reports: Option<RawCspReports>,
    pub storage: Option<RawStorage>,
    #[serde(default)]
    pub compression: RawCompression,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompression {
    pub enabled: Option<bool>,
    pub encodings: Option<Vec<String>>,
    pub min_size: Option<ByteSize>,
    pub types: Option<Vec<String>>,
    pub html: Option<bool>,
    pub level: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawStorageBackend {
    Files,
    Redis,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub backend: Option<RawStorageBackend>,
    pub url: Option<String>,
    pub password_env: Option<String>,
    pub key_prefix: Option<String>,
    pub encryption_key_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCspReports {
    pub path: Option<String>,
    pub max_body: Option<ByteSize>,
    pub requests: Option<u32>,
    pub per: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLoginLockout {
    pub path: String,
    pub failures: Option<u32>,
    pub window: Option<HumanDuration>,
    pub lockout: Option<HumanDuration>,
    pub failure_status: Option<Vec<u16>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCrossOrigin {
    pub mode: Option<CrossOriginMode>,
    pub trusted_origins: Option<Vec<String>>,
    pub exempt: Option<Vec<String>>,
    pub allow_same_site: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawErrors {
    pub bad_gateway: Option<String>,
    pub service_unavailable: Option<String>,
    pub gateway_timeout: Option<String>,
    pub maintenance_file: Option<String>,
    pub maintenance_allow: Option<Vec<String>>,
    pub maintenance_retry_after: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub https: Option<String>,
    pub http: Option<String>,
    pub domains: Vec<String>,
    pub workers: Option<usize>,
    pub public_https_port: Option<u16>,
    pub health_path: Option<String>,
    pub trusted_proxies: Option<Vec<String>>,
    pub proxy_protocol: Option<Vec<String>>,
    pub shutdown_grace: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub source: Option<RawTlsSource>,
    pub dir: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    pub directory: Option<String>,
    pub contact: Option<Vec<String>>,
    pub challenge: Option<ChallengeType>,
    pub directory_ca: Option<String>,
    pub eab: Option<RawEab>,
    pub profile: Option<String>,
    pub renew_check_interval: Option<HumanDuration>,
    pub retry_base_delay: Option<HumanDuration>,
    pub retry_max_delay: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEab {
    pub kid: String,
    pub hmac_key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// One backend (the shorthand); `urls` for several.
    pub url: Option<String>,
    pub urls: Option<Vec<String>>,
    pub weights: Option<Vec<u32>>,
    pub policy: Option<BalancePolicy>,
    pub connect_timeout: Option<HumanDuration>,
    pub response_timeout: Option<HumanDuration>,
    pub pool_idle_timeout: Option<HumanDuration>,
    pub pool_max_idle: Option<usize>,
    pub pool_reuse_for_posts: Option<HumanDuration>,
    pub retries: Option<u32>,
    pub max_fails: Option<u32>,
    pub fail_timeout: Option<HumanDuration>,
    pub health_path: Option<String>,
    pub health_interval: Option<HumanDuration>,
    pub health_timeout: Option<HumanDuration>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
}

/// One security header: how to apply it and, for most, its value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderRule {
    pub mode: Option<RawHeaderMode>,
    pub value: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHsts {
    pub mode: Option<RawHeaderMode>,
    pub max_age: Option<HumanDuration>,
    pub include_subdomains: Option<bool>,
    pub preload: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaders {
    #[serde(default)]
    pub strict_transport_security: RawHsts,
    #[serde(default)]
    pub content_security_policy: RawHeaderRule,
    #[serde(default)]
    pub content_security_policy_report_only: RawHeaderRule,
    #[serde(default)]
    pub x_frame_options: RawHeaderRule,
    #[serde(default)]
    pub x_content_type_options: RawHeaderRule,
    #[serde(default)]
    pub referrer_policy: RawHeaderRule,
    #[serde(default)]
    pub permissions_policy: RawHeaderRule,
    #[serde(default)]
    pub cross_origin_opener_policy: RawHeaderRule,
    #[serde(default)]
    pub cross_origin_resource_policy: RawHeaderRule,
    pub remove: Option<Vec<String>>,
    pub clear_site_data: Option<RawClearSiteData>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClearSiteData {
    pub paths: Vec<String>,
    pub value: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCookies {
    pub secure: Option<bool>,
    pub http_only: Option<bool>,
    pub same_site: Option<RawSameSite>,
    pub http_only_exempt: Option<Vec<String>>,
    pub session_only: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub handshake_timeout: Option<HumanDuration>,
    pub header_read_timeout: Option<HumanDuration>,
    pub idle_timeout: Option<HumanDuration>,
    pub body_timeout: Option<HumanDuration>,
    pub max_header_bytes: Option<ByteSize>,
    pub max_headers: Option<usize>,
    pub max_body: Option<ByteSize>,
    pub buffer_body: Option<ByteSize>,
    pub buffer_response: Option<ByteSize>,
    pub buffer_memory: Option<ByteSize>,
    pub max_connections: Option<usize>,
    pub h2_max_concurrent_streams: Option<u32>,
    pub h2_max_pending_resets: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub path: String,
    pub methods: Option<Vec<String>>,
    pub requests: u32,
    pub per: HumanDuration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStatic {
    pub url: String,
    pub dir: String,
    pub cache_control: Option<String>,
    pub symlinks: Option<SymlinkPolicy>,
    pub internal: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<LogFormat>,
    pub level: Option<String>,
    pub access: Option<bool>,
    pub access_format: Option<AccessFormat>,
}
