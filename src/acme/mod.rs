//! Automatic certificates over ACME (RFC 8555) with instant-acme 0.8.5: one account per CA directory,
//! one certificate covering every `server.domains` name, challenges answered by our own listeners
//! (TLS-ALPN-01 per RFC 8737 on the HTTPS port, HTTP-01 per RFC 8555 §8.3 on the plain port), crash-safe
//! storage, and renewal in the background with the old certificate serving until the new one is in.

pub mod http01;
pub mod schedule;
pub mod storage;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType,
    ExternalAccountKey, Identifier, NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

pub use http01::Http01Tokens;
use storage::{AcmeStore, CertMeta};

use crate::config::{AcmeConfig, ChallengeType as ConfiguredChallenge, Domains};
use crate::tls::{CertInfo, CertResolver, TlsError, certified_key_from_pem, crypto_provider};

/// A whole issuance (order, validation, finalization, download) must finish within this.
const ISSUANCE_TIMEOUT: Duration = Duration::from_secs(300);
/// Asking for renewal information must finish within this; otherwise the lifetime rule decides.
const ARI_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME request failed: {0}")]
    Client(#[from] instant_acme::Error),
    #[error("certificate storage: {0}")]
    Storage(#[from] std::io::Error),
    #[error("account credentials: {0}")]
    Credentials(#[from] serde_json::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Order(String),
    #[error("issuance did not finish within {0:?}")]
    Timeout(Duration),
}

impl AcmeError {
    /// How long the CA asked us to wait, when it said so (rate limits).
    fn retry_after(&self) -> Option<Duration> {
        match self {
            AcmeError::Client(instant_acme::Error::Api(problem)) => {
                let rate_limited = problem
                    .r#type
                    .as_deref()
                    .is_some_and(|t| t.ends_with(":rateLimited"));
                let parsed = problem
                    .detail
                    .as_deref()
                    .and_then(|d| schedule::retry_after_from_detail(d, SystemTime::now()));
                // A rate limit without a date: wait at least an hour rather than hammer the CA.
                parsed.or(rate_limited.then_some(Duration::from_secs(3600)))
            }
            _ => None,
        }
    }
}

/// What the manager is doing, for logs, `portcullis` operators and tests.
#[derive(Debug, Default, Clone)]
pub struct AcmeState {
    pub issued: u32,
    /// Failed attempts in a row (reset by a success): what the backoff follows.
    pub failures: u32,
    /// Every failed attempt since start, never reset: the `_total` counter.
    pub failures_total: u64,
    /// When each failed attempt ended (the last 32), to check the backoff schedule.
    pub failed_at: Vec<SystemTime>,
    pub last_error: Option<String>,
    pub next_renewal: Option<SystemTime>,
    pub orders_placed: u32,
}

#[derive(Debug, Default)]
pub struct AcmeStatus(Mutex<AcmeState>);

impl AcmeStatus {
    pub fn snapshot(&self) -> AcmeState {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut AcmeState)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

pub struct AcmeManager {
    config: AcmeConfig,
    /// The names the current order is for; follows `domain_updates` (a reload).
    domains: Domains,
    domain_updates: watch::Receiver<Domains>,
    store: AcmeStore,
    resolver: Arc<CertResolver>,
    tokens: Arc<Http01Tokens>,
    http01_available: bool,
    status: Arc<AcmeStatus>,
    account: Option<Account>,
    /// Whether the CA offers ARI; `None` until asked.
    ari_supported: Option<bool>,
}

/// The certificate being served and the fixed jitter for its renewal time.
struct Current {
    info: CertInfo,
    leaf_der: Vec<u8>,
    jitter: f64,
}

impl AcmeManager {
    pub fn new(
        config: AcmeConfig,
        mut domain_updates: watch::Receiver<Domains>,
        tls_dir: &std::path::Path,
        resolver: Arc<CertResolver>,
        tokens: Arc<Http01Tokens>,
        http01_available: bool,
    ) -> AcmeManager {
        let domains = domain_updates.borrow_and_update().clone();
        AcmeManager {
            config,
            domains,
            domain_updates,
            store: AcmeStore::new(tls_dir),
            resolver,
            tokens,
            http01_available,
            status: Arc::new(AcmeStatus::default()),
            account: None,
            ari_supported: None,
        }
    }

    pub fn status(&self) -> Arc<AcmeStatus> {
        self.status.clone()
    }

    /// Installs the stored certificate if it is from this CA, still valid and covers every domain that
    /// it can: served at once, with no order placed (restarts must not burn rate limits).
    fn install_stored(&self) -> Option<Current> {
        let stored = match self.store.load_cert() {
            Ok(Some(stored)) => stored,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!(dir = %self.store.dir().display(), error = %e, "cannot read the stored certificate");
                return None;
            }
        };
        if stored.meta.directory != self.config.directory_url {
            tracing::info!(stored = %stored.meta.directory, "stored certificate is from another ACME directory; ordering a new one");
            return None;
        }
        let certified = match certified_key_from_pem(
            &stored.chain_pem,
            &stored.key_pem,
            &self.store.cert_path(),
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "stored certificate is unusable; ordering a new one");
                return None;
            }
        };
        let info = CertInfo::of(&certified).ok()?;
        if info.not_after <= SystemTime::now() {
            tracing::info!("stored certificate has expired; ordering a new one");
            return None;
        }
        let leaf_der = certified.cert.first()?.to_vec();
        self.resolver
            .install(self.domains.iter(), Arc::new(certified));
        tracing::info!(names = ?info.names, expires = %humantime::format_rfc3339_seconds(info.not_after), "serving the stored ACME certificate");
        Some(Current {
            info,
            leaf_der,
            jitter: schedule::jitter_fraction(),
        })
    }

    /// Runs for the life of the process: obtains the first certificate, then renews it.
    pub async fn run(mut self) {
        let mut current = self.install_stored();
        if current.is_none() {
            tracing::warn!(
                domains = ?self.domains.iter().collect::<Vec<_>>(),
                directory = %self.config.directory_url,
                "no certificate yet: HTTPS handshakes fail until the first one is issued (listeners are up)"
            );
        }
        let mut logged_due: Option<SystemTime> = None;
        loop {
            // The latest names (`changed()` below marks them seen, so compare rather than ask).
            let latest = self.domain_updates.borrow_and_update().clone();
            if latest != self.domains {
                self.domains = latest;
            }
            let due = match &current {
                Some(c) if c.info.missing_names(&self.domains).is_empty() => {
                    self.renewal_due(c).await
                }
                Some(_) => {
                    tracing::info!(
                        "configured domains are not all on the current certificate; ordering a new one"
                    );
                    SystemTime::now()
                }
                None => SystemTime::now(),
            };
            let now = SystemTime::now();
            if due > now {
                if logged_due != Some(due) {
                    tracing::info!(at = %humantime::format_rfc3339_seconds(due), "next certificate renewal");
                    logged_due = Some(due);
                }
                self.status.update(|s| s.next_renewal = Some(due));
                let wait = due.duration_since(now).unwrap_or_default();
                tokio::select! {
                    _ = tokio::time::sleep(wait.min(self.config.renew_check_interval)) => {}
                    // A reload changed server.domains: look again now (the new names need an order).
                    changed = self.domain_updates.changed() => {
                        if changed.is_err() {
                            return; // the server is gone
                        }
                    }
                }
                continue;
            }

            let failures = self.status.snapshot().failures;
            let kind = self.challenge_for_attempt(failures);
            let attempt = tokio::time::timeout(ISSUANCE_TIMEOUT, self.obtain(kind.clone())).await;
            match attempt.unwrap_or(Err(AcmeError::Timeout(ISSUANCE_TIMEOUT))) {
                Ok(new) => {
                    tracing::info!(
                        names = ?new.info.names,
                        expires = %humantime::format_rfc3339_seconds(new.info.not_after),
                        "certificate issued and installed"
                    );
                    self.status.update(|s| {
                        s.issued += 1;
                        s.failures = 0;
                        s.last_error = None;
                    });
                    current = Some(new);
                }
                Err(error) => {
                    let failures = failures + 1;
                    let delay = schedule::retry_delay(
                        failures,
                        self.config.retry_base_delay,
                        self.config.retry_max_delay,
                        error.retry_after(),
                        schedule::jitter_fraction(),
                    );
                    tracing::error!(
                        error = %error,
                        challenge = ?kind,
                        retry_in = %humantime::format_duration(Duration::from_secs(delay.as_secs().max(1))),
                        serving = if current.is_some() { "the previous certificate" } else { "nothing yet" },
                        "certificate order failed"
                    );
                    self.status.update(|s| {
                        s.failures = failures;
                        s.failures_total += 1;
                        s.failed_at.push(SystemTime::now());
                        if s.failed_at.len() > 32 {
                            s.failed_at.remove(0);
                        }
                        s.last_error = Some(error.to_string());
                    });
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The configured challenge, alternating with the other type after a failure where its listener
    /// exists (TLS-ALPN-01 always can: it answers on the HTTPS listener).
    fn challenge_for_attempt(&self, failures: u32) -> ChallengeType {
        let preferred = self.config.challenge;
        let fallback = match preferred {
            ConfiguredChallenge::TlsAlpn01 if self.http01_available => {
                Some(ConfiguredChallenge::Http01)
            }
            ConfiguredChallenge::Http01 => Some(ConfiguredChallenge::TlsAlpn01),
            _ => None,
        };
        let chosen = match fallback {
            Some(other) if failures % 2 == 1 => other,
            _ => preferred,
        };
        match chosen {
            ConfiguredChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
            ConfiguredChallenge::Http01 => ChallengeType::Http01,
        }
    }

    async fn renewal_due(&mut self, current: &Current) -> SystemTime {
        // The ACME client has no timeouts of its own: an unresponsive CA must not stall the schedule.
        let window = tokio::time::timeout(ARI_TIMEOUT, self.ari_window(&current.leaf_der))
            .await
            .unwrap_or(None);
        schedule::renewal_time(&current.info, window, current.jitter)
    }

    /// The CA's suggested renewal window (RFC 9773), where it offers ARI.
    async fn ari_window(&mut self, leaf_der: &[u8]) -> Option<(SystemTime, SystemTime)> {
        if self.ari_supported == Some(false) {
            return None;
        }
        let account = self.account().await.ok()?;
        let der = rustls_pki_types::CertificateDer::from(leaf_der.to_vec());
        let id = CertificateIdentifier::try_from(&der).ok()?;
        match account.renewal_info(&id).await {
            Ok((info, _retry_after)) => {
                self.ari_supported = Some(true);
                let to_system = |t: time::OffsetDateTime| {
                    SystemTime::UNIX_EPOCH
                        + Duration::from_secs(u64::try_from(t.unix_timestamp()).unwrap_or(0))
                };
                Some((
                    to_system(info.suggested_window.start),
                    to_system(info.suggested_window.end),
                ))
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                tracing::info!(
                    "the CA offers no renewal information (ARI); renewing with a third of the lifetime left"
                );
                self.ari_supported = Some(false);
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "renewal information unavailable this time");
                None
            }
        }
    }

    async fn account(&mut self) -> Result<Account, AcmeError> {
        if let Some(account) = &self.account {
            return Ok(account.clone());
        }
        let url = &self.config.directory_url;
        let builder = || match &self.config.directory_ca {
            Some(ca) => Account::builder_with_root(ca),
            None => Account::builder(),
        };
        let account = match self.store.load_account(url)? {
            Some(json) => {
                let credentials: AccountCredentials = serde_json::from_slice(&json)?;
                builder()?.from_credentials(credentials).await?
            }
            None => {
                let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
                let eab = match &self.config.eab {
                    Some((kid, hmac)) => {
                        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .decode(hmac.trim_end_matches('='))
                            .map_err(|e| {
                                AcmeError::Order(format!("acme.eab.hmac_key is not base64url: {e}"))
                            })?;
                        Some(ExternalAccountKey::new(kid.clone(), &key))
                    }
                    None => None,
                };
                let new_account = NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (account, credentials) = builder()?
                    .create(&new_account, url.clone(), eab.as_ref())
                    .await?;
                self.store
                    .save_account(url, &serde_json::to_vec(&credentials)?)?;
                tracing::info!(directory = %url, id = %account.id(), "created an ACME account");
                account
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }

    async fn obtain(&mut self, kind: ChallengeType) -> Result<Current, AcmeError> {
        let account = self.account().await?;
        self.status.update(|s| s.orders_placed += 1);
        let (chain_pem, key_pem) = self.issue(&account, kind).await?;
        let certified = certified_key_from_pem(
            chain_pem.as_bytes(),
            key_pem.as_bytes(),
            &self.store.cert_path(),
        )?;
        let info = CertInfo::of(&certified)?;
        let leaf_der = certified
            .cert
            .first()
            .map(|c| c.to_vec())
            .ok_or_else(|| AcmeError::Order("the CA returned an empty chain".into()))?;
        let meta = CertMeta {
            directory: self.config.directory_url.clone(),
            names: info.names.clone(),
            issued_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
        };
        // Serve it even if it cannot be stored: the next start would order again, so say so loudly.
        self.resolver
            .install(self.domains.iter(), Arc::new(certified));
        if let Err(e) = self
            .store
            .save_cert(chain_pem.as_bytes(), key_pem.as_bytes(), &meta)
        {
            tracing::error!(dir = %self.store.dir().display(), error = %e, "cannot store the new certificate; a restart will order again");
        }
        Ok(Current {
            info,
            leaf_der,
            jitter: schedule::jitter_fraction(),
        })
    }

    async fn issue(
        &self,
        account: &Account,
        kind: ChallengeType,
    ) -> Result<(String, String), AcmeError> {
        let identifiers: Vec<Identifier> = self
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.to_string()))
            .collect();
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let mut published = Published {
            resolver: &self.resolver,
            tokens: &self.tokens,
            alpn_names: Vec::new(),
            http_tokens: Vec::new(),
        };
        {
            let mut authorizations = order.authorizations();
            while let Some(authorization) = authorizations.next().await {
                let mut authorization = authorization?;
                let identifier = authorization.identifier().to_string();
                match authorization.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => {
                        return Err(AcmeError::Order(format!(
                            "authorization for {identifier} is {other:?}"
                        )));
                    }
                }
                let mut challenge = authorization.challenge(kind.clone()).ok_or_else(|| {
                    AcmeError::Order(format!(
                        "the CA offers no {kind:?} challenge for {identifier}"
                    ))
                })?;
                let key_authorization = challenge.key_authorization();
                match kind {
                    ChallengeType::TlsAlpn01 => {
                        let cert = challenge_certificate(
                            &identifier,
                            key_authorization.digest().as_ref(),
                        )?;
                        self.resolver
                            .set_challenge(&identifier, Some(Arc::new(cert)));
                        published.alpn_names.push(identifier.clone());
                    }
                    _ => {
                        self.tokens
                            .insert(&challenge.token, key_authorization.as_str());
                        published.http_tokens.push(challenge.token.clone());
                    }
                }
                challenge.set_ready().await?;
            }
        }
        // The CA validates several times, concurrently: answers stay published until this returns.
        let retry = RetryPolicy::new().timeout(Duration::from_secs(120));
        let status = order.poll_ready(&retry).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order(
                explain_failed_order(&mut order, &kind).await,
            ));
        }
        drop(published);
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&retry).await?;
        Ok((chain_pem, key_pem))
    }
}

/// Challenge answers currently published; withdrawn when the order is settled, however it ends.
struct Published<'a> {
    resolver: &'a CertResolver,
    tokens: &'a Http01Tokens,
    alpn_names: Vec<String>,
    http_tokens: Vec<String>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for name in &self.alpn_names {
            self.resolver.set_challenge(name, None);
        }
        for token in &self.http_tokens {
            self.tokens.remove(token);
        }
    }
}

/// The TLS-ALPN-01 certificate (RFC 8737 §3): self-signed, exactly one SAN (the identifier), and the
/// critical acmeIdentifier extension with the SHA-256 of the key authorization.
pub fn challenge_certificate(
    identifier: &str,
    key_authorization_digest: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![identifier.to_string()])?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(
        key_authorization_digest,
    )];
    let cert = params.self_signed(&key)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Not `CertifiedKey::from_der`: its key check parses the certificate with webpki, which refuses the
    // critical acmeIdentifier extension that RFC 8737 requires.
    let signing_key = crypto_provider().key_provider.load_private_key(key_der)?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing_key))
}

/// Turns the CA's problem documents into a message an operator can act on.
async fn explain_failed_order(order: &mut Order, kind: &ChallengeType) -> String {
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let _ = authorization.refresh().await;
        let identifier = authorization.identifier().to_string();
        for challenge in &authorization.challenges {
            if let Some(problem) = &challenge.error {
                let kind = problem.r#type.as_deref().unwrap_or_default();
                reasons.push(format!(
                    "{identifier}: {problem}. {}",
                    advice(kind, &challenge.r#type)
                ));
            }
        }
    }
    if reasons.is_empty() {
        format!("the order for {kind:?} became invalid without a reason from the CA")
    } else {
        reasons.join("; ")
    }
}

fn advice(problem_type: &str, kind: &ChallengeType) -> &'static str {
    let port = match kind {
        ChallengeType::Http01 => "80",
        _ => "443",
    };
    match problem_type.rsplit(':').next().unwrap_or_default() {
        "dns" => "Check that the name's A/AAAA records exist and point at this server.",
        "connection" => {
            if port == "80" {
                "The CA could not connect on port 80: check firewalls and port mapping to server.http."
            } else {
                "The CA could not connect on port 443: check firewalls and port mapping to server.https."
            }
        }
        "unauthorized" | "incorrectResponse" => {
            "The CA reached a server that did not answer the challenge: DNS may point at another machine or a \
             proxy in front of this one terminates TLS/HTTP itself."
        }
        "caa" => "A CAA DNS record forbids this CA from issuing for the name.",
        "rateLimited" => "The CA's rate limit was hit: retries wait until it lifts.",
        "rejectedIdentifier" => "The CA will not issue for this name (policy).",
        _ => "See the CA's problem document above.",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_certificate_follows_rfc_8737() {
        let digest = [7u8; 32];
        let cert = challenge_certificate("portcullis.test", &digest).expect("certificate");
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert.cert[0]).expect("parse");
        let san = parsed
            .subject_alternative_name()
            .expect("san")
            .expect("present");
        assert_eq!(san.value.general_names.len(), 1, "exactly one SAN");
        let acme_id = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(acme_id.critical);
        // DER OCTET STRING (0x04, length 32) wrapping the digest.
        assert_eq!(&acme_id.value[..2], &[0x04, 0x20]);
        assert_eq!(&acme_id.value[2..], &digest);
    }

    #[test]
    fn challenge_alternates_to_the_fallback_after_a_failure() {
        let config = AcmeConfig {
            directory_url: "https://acme.example/dir".into(),
            contact: vec![],
            challenge: ConfiguredChallenge::TlsAlpn01,
            directory_ca: None,
            eab: None,
            renew_check_interval: Duration::from_secs(3600),
            retry_base_delay: Duration::from_secs(60),
            retry_max_delay: Duration::from_secs(3600),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let manager = |http01| {
            AcmeManager::new(
                config.clone(),
                watch::channel(Domains::new(vec!["a.example".into()])).1,
                dir.path(),
                Arc::new(CertResolver::default()),
                Arc::new(Http01Tokens::default()),
                http01,
            )
        };
        let with_http = manager(true);
        assert_eq!(with_http.challenge_for_attempt(0), ChallengeType::TlsAlpn01);
        assert_eq!(with_http.challenge_for_attempt(1), ChallengeType::Http01);
        assert_eq!(with_http.challenge_for_attempt(2), ChallengeType::TlsAlpn01);
        let https_only = manager(false);
        assert_eq!(
            https_only.challenge_for_attempt(1),
            ChallengeType::TlsAlpn01
        );
    }
}
