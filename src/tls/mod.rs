//! TLS termination: the one crypto provider, the rustls server config (TLS 1.2/1.3, forward-secret AEAD
//! suites, ALPN `h2`/`http/1.1`), and the SNI resolver that certificate sources swap certificates into.

pub mod local_ca;
pub mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Domains;

/// ALPN protocol of TLS-ALPN-01 challenge handshakes (RFC 8737 §6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("cannot parse certificate: {0}")]
    Parse(String),
}

impl TlsError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        TlsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// aws-lc-rs with exactly the forward-secret AEAD suites: TLS 1.3's three, and for TLS 1.2 only ECDHE
/// with AES-GCM or ChaCha20-Poly1305 (Mozilla's "intermediate" profile minus the CBC and DHE suites).
/// Built once; every rustls config and key load in the process shares it.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::aws_lc_rs::cipher_suite::*;
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            provider.cipher_suites = vec![
                TLS13_AES_128_GCM_SHA256,
                TLS13_AES_256_GCM_SHA384,
                TLS13_CHACHA20_POLY1305_SHA256,
                TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            ];
            Arc::new(provider)
        })
        .clone()
}

/// Installs the process-wide default provider for libraries that build their own rustls configs (the
/// ACME client). Safe to call more than once.
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub fn server_config(
    resolver: Arc<CertResolver>,
    acme_tls_alpn: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if acme_tls_alpn {
        config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    // Resumption spares returning clients a full handshake: stateless tickets (rotated every 6 hours by
    // rustls) plus a bounded session-ID cache for TLS 1.2 clients without ticket support.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.session_storage = ServerSessionMemoryCache::new(16_384);
    Ok(Arc::new(config))
}

/// The server config for one TLS-ALPN-01 validation handshake (RFC 8737 §3) whose answer another
/// replica published: that challenge certificate whatever the name, and only the `acme-tls/1` protocol.
pub fn challenge_server_config(
    challenge: Arc<CertifiedKey>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneCertificate(challenge)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct OneCertificate(Arc<CertifiedKey>);

impl ResolvesServerCert for OneCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[derive(Default)]
struct CertTable {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    /// Served to clients that send no SNI (they connected by IP address), only when an IP is a domain.
    without_sni: Option<Arc<CertifiedKey>>,
    /// The installed certificate's expiry, for the metrics.
    not_after: Option<SystemTime>,
}

/// Picks the certificate by SNI. A name outside the table gets none, so the handshake fails instead of
/// presenting a certificate for another site. Certificates are swapped atomically: handshakes in progress
/// keep the one they started with, live connections are untouched.
#[derive(Default)]
pub struct CertResolver {
    table: ArcSwap<CertTable>,
    /// TLS-ALPN-01 challenge certificates by identifier, present only while an authorization is pending.
    challenges: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.table.load().by_name.keys().cloned().collect();
        f.debug_struct("CertResolver")
            .field("names", &names)
            .finish()
    }
}

impl CertResolver {
    /// Serves `key` for exactly `names` from now on: a name no longer configured stops getting a
    /// certificate. One certificate covers every served name (one ACME order, one renewal).
    pub fn install<'a>(&self, names: impl IntoIterator<Item = &'a str>, key: Arc<CertifiedKey>) {
        let mut table = CertTable {
            not_after: CertInfo::of(&key).ok().map(|info| info.not_after),
            ..CertTable::default()
        };
        for name in names {
            let name = name.to_ascii_lowercase();
            if name.parse::<std::net::IpAddr>().is_ok() {
                table.without_sni = Some(key.clone());
            }
            table.by_name.insert(name, key.clone());
        }
        self.table.store(Arc::new(table));
    }

    /// When the served certificate expires; `None` before the first one is installed.
    pub fn not_after(&self) -> Option<SystemTime> {
        self.table.load().not_after
    }

    pub fn set_challenge(&self, name: &str, key: Option<Arc<CertifiedKey>>) {
        let mut challenges = match self.challenges.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match key {
            Some(key) => challenges.insert(name.to_ascii_lowercase(), key),
            None => challenges.remove(&name.to_ascii_lowercase()),
        };
    }

    /// Whether this process answers the TLS-ALPN-01 challenge for `name` itself.
    pub fn has_challenge(&self, name: &str) -> bool {
        self.challenge(&name.to_ascii_lowercase()).is_some()
    }

    fn challenge(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let challenges = match self.challenges.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        challenges.get(name).cloned()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let is_acme_challenge = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        let Some(name) = hello.server_name() else {
            return self.table.load().without_sni.clone();
        };
        if is_acme_challenge {
            return self.challenge(name);
        }
        let table = self.table.load();
        match table.by_name.get(name) {
            Some(key) => Some(key.clone()),
            // rustls lowercases SNI already; this only guards against a future change there.
            None if name.bytes().any(|b| b.is_ascii_uppercase()) => {
                table.by_name.get(&name.to_ascii_lowercase()).cloned()
            }
            None => None,
        }
    }
}

/// Parses a PEM chain (leaf first) and key, and checks that they belong together.
pub fn certified_key_from_pem(
    chain_pem: &[u8],
    key_pem: &[u8],
    origin: &Path,
) -> Result<CertifiedKey, TlsError> {
    let pem_error = |message: String| TlsError::Pem {
        path: origin.to_path_buf(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(format!("bad certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(pem_error("no CERTIFICATE block found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| pem_error(format!("no usable private key: {e}")))?;
    let certified =
        CertifiedKey::from_der(chain, key, &crypto_provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch,
            other => TlsError::Rustls(other),
        })?;
    Ok(certified)
}

pub fn load_pem_files(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain_pem = std::fs::read(cert).map_err(|e| TlsError::io(cert, e))?;
    let key_pem = std::fs::read(key).map_err(|e| TlsError::io(key, e))?;
    certified_key_from_pem(&chain_pem, &key_pem, cert)
}

/// What the proxy needs to know of a leaf certificate: its names and validity.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<CertInfo, TlsError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Parse(e.to_string()))?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => names.push(dns.to_ascii_lowercase()),
                    GeneralName::IPAddress(bytes) => {
                        let ip = match bytes.len() {
                            4 => <[u8; 4]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*bytes)
                                .ok()
                                .map(std::net::IpAddr::from),
                            _ => None,
                        };
                        names.extend(ip.map(|ip| ip.to_string()));
                    }
                    _ => {}
                }
            }
        }
        let to_system = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Ok(CertInfo {
            names,
            not_before: to_system(cert.validity().not_before),
            not_after: to_system(cert.validity().not_after),
        })
    }

    pub fn of(key: &CertifiedKey) -> Result<CertInfo, TlsError> {
        let leaf = key
            .cert
            .first()
            .ok_or_else(|| TlsError::Parse("empty certificate chain".into()))?;
        CertInfo::parse(leaf)
    }

    /// Whether a browser would accept this certificate for `name` (exact or single-label wildcard).
    pub fn covers(&self, name: &str) -> bool {
        self.names.iter().any(|n| {
            n.eq_ignore_ascii_case(name)
                || n.strip_prefix("*.").is_some_and(|suffix| {
                    name.split_once('.')
                        .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(suffix))
                })
        })
    }

    /// The moment to renew: when a third of the lifetime is left (Let's Encrypt's own advice for 90-day
    /// certificates: renew at 60 days).
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_after - lifetime / 3
    }

    pub fn missing_names<'a>(&self, domains: &'a Domains) -> Vec<&'a str> {
        domains.iter().filter(|d| !self.covers(d)).collect()
    }
}

/// Loads `source = "files"` and installs it; used at start and on SIGHUP. On error nothing is replaced.
pub fn install_files(
    resolver: &CertResolver,
    domains: &Domains,
    cert: &Path,
    key: &Path,
) -> Result<CertInfo, TlsError> {
    let certified = load_pem_files(cert, key)?;
    let info = CertInfo::of(&certified)?;
    let missing = info.missing_names(domains);
    if !missing.is_empty() {
        tracing::warn!(cert = %cert.display(), missing = ?missing, "certificate does not cover every domain; browsers will reject those names");
    }
    if info.not_after < SystemTime::now() {
        tracing::warn!(cert = %cert.display(), "certificate has expired");
    }
    resolver.install(domains.iter(), Arc::new(certified));
    Ok(info)
}
