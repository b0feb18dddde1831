//! Automatic certificates over ACME (RFC 8555) with instant-acme 0.8.5: one account per CA directory,
//! one certificate covering every `server.domains` name, challenges answered by our own listeners
//! (TLS-ALPN-01 per RFC 8737 on the HTTPS port, HTTP-01 per RFC 8555 §8.3 on the plain port), crash-safe
//! storage, and renewal in the background with the old certificate serving until the new one is in.
//! With the shared store (`[storage] backend = "redis"`), replicas share one account and one certificate:
//! one of them orders under a lease, any of them answers the CA, all of them serve what was issued.

pub mod http01;
pub mod schedule;
pub mod shared;
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
use shared::CertStore;
use storage::{AcmeStore, CertMeta, StoredCert};

use crate::config::{AcmeConfig, ChallengeType as ConfiguredChallenge, Domains};
use crate::store::SharedStore;
use crate::store::lease::{HeldLease, Lease};
use crate::tls::{CertInfo, CertResolver, TlsError, certified_key_from_pem, crypto_provider};

/// A whole issuance (order, validation, finalization, download) must finish within this.
const ISSUANCE_TIMEOUT: Duration = Duration::from_secs(300);
/// Asking for renewal information must finish within this; otherwise the lifetime rule decides.
const ARI_TIMEOUT: Duration = Duration::from_secs(30);
/// The order lease's time to live: how soon another replica takes over from one that died mid-order.
const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often a replica looks in the shared store for a certificate another one stored (announcements
/// over pub/sub come sooner; this catches the ones missed).
const STORE_POLL: Duration = Duration::from_secs(60);
/// How long a replica waits before looking again while another one holds the order lease.
const LEASE_WAIT: Duration = Duration::from_secs(5);

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
    #[error("shared store: {0}")]
    Shared(#[from] crate::store::StoreError),
    #[error("the order lease was lost (redis unreachable too long); another replica may take over")]
    LeaseLost,
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
    /// Whether this replica holds the order lease (shared store) or is ordering (files).
    pub lock_held: bool,
    /// Certificates installed from storage: at start, or another replica's from the shared store.
    pub loaded_from_store: u32,
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
    store: CertStore,
    /// Woken when another replica announces a certificate.
    store_updates: Arc<tokio::sync::Notify>,
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
        shared: Option<Arc<SharedStore>>,
    ) -> AcmeManager {
        let domains = domain_updates.borrow_and_update().clone();
        let files = AcmeStore::new(tls_dir);
        let store = match shared {
            Some(store) => CertStore::Shared { files, store },
            None => CertStore::Files(files),
        };
        AcmeManager {
            config,
            domains,
            domain_updates,
            store,
            store_updates: Arc::new(tokio::sync::Notify::new()),
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

    /// Installs the stored certificate if it is from this CA, still valid, and not the one served: at
    /// start (served at once, with no order placed: restarts must not burn rate limits), and with the
    /// shared store whenever another replica stored a newer one.
    async fn adopt_stored(&self, current: Option<&Current>) -> Option<Current> {
        let stored = match self
            .store
            .load_cert(&self.config.directory_url, &self.domains)
            .await
        {
            Ok(Some(stored)) => stored,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!(dir = %self.store.files().dir().display(), error = %e, "cannot read the stored certificate");
                return None;
            }
        };
        let (certified, info) = self.usable(stored, current)?;
        let leaf_der = certified.cert.first()?.to_vec();
        self.resolver
            .install(self.domains.iter(), Arc::new(certified));
        self.status.update(|s| s.loaded_from_store += 1);
        let from = if current.is_some() {
            "another replica stored a newer certificate; serving it"
        } else {
            "serving the stored ACME certificate"
        };
        tracing::info!(names = ?info.names, expires = %humantime::format_rfc3339_seconds(info.not_after), "{from}");
        Some(Current {
            info,
            leaf_der,
            jitter: schedule::jitter_fraction(),
        })
    }

    /// The stored certificate, parsed, when it should replace `current` (or be the first).
    fn usable(
        &self,
        stored: StoredCert,
        current: Option<&Current>,
    ) -> Option<(CertifiedKey, CertInfo)> {
        if stored.meta.directory != self.config.directory_url {
            tracing::info!(stored = %stored.meta.directory, "stored certificate is from another ACME directory; ordering a new one");
            return None;
        }
        let certified = match certified_key_from_pem(
            &stored.chain_pem,
            &stored.key_pem,
            &self.store.files().cert_path(),
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "stored certificate is unusable; ordering a new one");
                return None;
            }
        };
        let info = CertInfo::of(&certified).ok()?;
        if let Some(current) = current {
            let same = certified.cert.first().map(|c| c.as_ref()) == Some(&current.leaf_der[..]);
            if same || info.not_after <= current.info.not_after {
                return None;
            }
        }
        if info.not_after <= SystemTime::now() {
            tracing::info!("stored certificate has expired; ordering a new one");
            return None;
        }
        Some((certified, info))
    }

    /// Runs for the life of the process: obtains the first certificate, then renews it.
    pub async fn run(mut self) {
        self.store
            .follow(&self.config.directory_url, self.store_updates.clone());
        let mut current = self.adopt_stored(None).await;
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
            if self.store.shared().is_some()
                && let Some(newer) = self.adopt_stored(current.as_ref()).await
            {
                current = Some(newer);
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
                let mut wait = due
                    .duration_since(now)
                    .unwrap_or_default()
                    .min(self.config.renew_check_interval);
                if self.store.shared().is_some() {
                    wait = wait.min(STORE_POLL);
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    // Another replica stored a certificate: look at it now.
                    _ = self.store_updates.notified() => {}
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
            let mut lease = match self
                .store
                .try_lease(&self.config.directory_url, &self.domains, LEASE_TTL)
                .await
            {
                Ok(Some(lease)) => lease.map(Lease::hold),
                Ok(None) => {
                    tracing::info!(
                        "another replica holds the order lease for this certificate; waiting for what it stores"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(LEASE_WAIT) => {}
                        _ = self.store_updates.notified() => {}
                    }
                    continue;
                }
                Err(e) => {
                    let delay = self.failed(e, &kind, failures, current.is_some());
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            // The lease is ours: the replica that held it before may have stored the renewal already.
            if lease.is_some()
                && let Some(newer) = self.adopt_stored(current.as_ref()).await
            {
                current = Some(newer);
                continue;
            }
            self.status.update(|s| s.lock_held = true);
            let replacing = current.as_ref().map(|c| c.leaf_der.clone());
            let attempt = tokio::select! {
                attempt = tokio::time::timeout(ISSUANCE_TIMEOUT, self.obtain(kind.clone(), replacing)) => {
                    attempt.unwrap_or(Err(AcmeError::Timeout(ISSUANCE_TIMEOUT)))
                }
                () = lease_lost(lease.as_mut()) => Err(AcmeError::LeaseLost),
            };
            self.status.update(|s| s.lock_held = false);
            match attempt {
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
                    let delay = self.failed(error, &kind, failures, current.is_some());
                    // The lease stays taken for the backoff: the replicas together retry no faster
                    // than one would.
                    if let Some(lease) = lease {
                        lease.keep_for(delay).await;
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Logs and counts a failed attempt; returns the backoff before the next.
    fn failed(
        &self,
        error: AcmeError,
        kind: &ChallengeType,
        failures: u32,
        serving: bool,
    ) -> Duration {
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
            serving = if serving { "the previous certificate" } else { "nothing yet" },
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
        delay
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
        let account = match self.store.load_account(url).await? {
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
                let ours = serde_json::to_vec(&credentials)?;
                let chosen = self.store.save_account(url, &ours).await?;
                tracing::info!(directory = %url, id = %account.id(), "created an ACME account");
                if chosen == ours {
                    account
                } else {
                    // Another replica registered at the same moment and stored first: use its account.
                    let credentials: AccountCredentials = serde_json::from_slice(&chosen)?;
                    builder()?.from_credentials(credentials).await?
                }
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }

    /// Orders, validates and installs a certificate. `replacing`: the leaf of the certificate this
    /// account issued that the new one replaces (named in the order where the CA offers ARI).
    async fn obtain(
        &mut self,
        kind: ChallengeType,
        replacing: Option<Vec<u8>>,
    ) -> Result<Current, AcmeError> {
        let account = self.account().await?;
        // The CA's ARI support is learnt when the renewal time is computed; ask now if that never ran.
        if replacing.is_some() && self.ari_supported.is_none() {
            let _ = tokio::time::timeout(
                ARI_TIMEOUT,
                self.ari_window(replacing.as_deref().unwrap_or_default()),
            )
            .await;
        }
        let replacing = replacing.filter(|_| self.ari_supported == Some(true));
        let (chain_pem, key_pem) = self.issue(&account, kind, replacing.as_deref()).await?;
        let certified = certified_key_from_pem(
            chain_pem.as_bytes(),
            key_pem.as_bytes(),
            &self.store.files().cert_path(),
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
            .save_cert(
                chain_pem.as_bytes(),
                key_pem.as_bytes(),
                &meta,
                &self.domains,
            )
            .await
        {
            tracing::error!(dir = %self.store.files().dir().display(), error = %e, "cannot store the new certificate; a restart will order again");
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
        replacing: Option<&[u8]>,
    ) -> Result<(String, String), AcmeError> {
        let identifiers = order_identifiers(&self.domains);
        let offered: Vec<&str> = account.profiles().map(|p| p.name).collect();
        let profile = order_profile(
            self.config.profile.as_deref(),
            &offered,
            self.domains.has_ip(),
            &self.config.directory_url,
        )?;
        let replaced_der =
            replacing.map(|der| rustls_pki_types::CertificateDer::from(der.to_vec()));
        let replaces = replaced_der
            .as_ref()
            .and_then(|der| CertificateIdentifier::try_from(der).ok());
        let request = new_order_request(&identifiers, profile, replaces.clone());
        self.status.update(|s| s.orders_placed += 1);
        let mut order = match account.new_order(&request).await {
            Ok(order) => {
                if replaces.is_some() {
                    tracing::info!("renewal order names the certificate it replaces (RFC 9773 §5)");
                }
                order
            }
            // RFC 9773 §5: a CA may refuse the `replaces` (already replaced, not this account's, or
            // not implemented); the renewal must not fail for it.
            Err(e) if replaces.is_some() && !is_rate_limited(&e) => {
                tracing::info!(error = %e, "the CA refused the order naming the certificate it replaces; ordering without `replaces`");
                account
                    .new_order(&new_order_request(&identifiers, profile, None))
                    .await?
            }
            Err(e) => return Err(e.into()),
        };
        let mut published = Published {
            resolver: &self.resolver,
            tokens: &self.tokens,
            shared: self.store.shared().cloned(),
            alpn_names: Vec::new(),
            http_tokens: Vec::new(),
        };
        {
            let mut authorizations = order.authorizations();
            while let Some(authorization) = authorizations.next().await {
                let mut authorization = authorization?;
                let identifier = authorization.identifier().to_string();
                let ip = match authorization.identifier().identifier {
                    Identifier::Ip(ip) => Some(*ip),
                    _ => None,
                };
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
                        // RFC 8738 §6: the CA asks for an IP address by its reverse-DNS name.
                        let sni = ip
                            .map(reverse_dns_name)
                            .unwrap_or_else(|| identifier.clone());
                        self.resolver.set_challenge(&sni, Some(Arc::new(cert)));
                        published.alpn_names.push(sni.clone());
                        // For the replica the CA's connection lands on, before the CA is told.
                        if let Some(store) = &published.shared {
                            shared::publish_alpn(
                                store,
                                &sni,
                                &identifier,
                                key_authorization.digest().as_ref(),
                            )
                            .await?;
                        }
                    }
                    _ => {
                        self.tokens
                            .insert(&challenge.token, key_authorization.as_str());
                        published.http_tokens.push(challenge.token.clone());
                        if let Some(store) = &published.shared {
                            shared::publish_http01(
                                store,
                                &challenge.token,
                                key_authorization.as_str(),
                            )
                            .await?;
                        }
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

/// The order's identifiers: DNS names, and IP addresses as `ip` identifiers (RFC 8738 §3).
fn order_identifiers(domains: &Domains) -> Vec<Identifier> {
    domains
        .iter()
        .map(|d| match d.parse::<std::net::IpAddr>() {
            Ok(ip) => Identifier::Ip(ip),
            Err(_) => Identifier::Dns(d.to_string()),
        })
        .collect()
}

/// The profile to order under, checked against what the CA's directory offers (`meta.profiles`):
/// the configured one must be offered; unset, IP addresses get `shortlived` where it is (Let's Encrypt
/// issues IP certificates under no other), else the CA's default.
fn order_profile<'a>(
    configured: Option<&'a str>,
    offered: &[&str],
    has_ip: bool,
    directory: &str,
) -> Result<Option<&'a str>, AcmeError> {
    match configured {
        Some(profile) if offered.contains(&profile) => Ok(Some(profile)),
        Some(profile) if offered.is_empty() => Err(AcmeError::Order(format!(
            "acme.profile = \"{profile}\", but the CA at {directory} offers no certificate profiles; remove acme.profile"
        ))),
        Some(profile) => {
            let mut names = offered.to_vec();
            names.sort_unstable();
            Err(AcmeError::Order(format!(
                "acme.profile = \"{profile}\" is not offered by the CA at {directory}; it offers: {}",
                names.join(", ")
            )))
        }
        None if has_ip && offered.contains(&"shortlived") => Ok(Some("shortlived")),
        None => Ok(None),
    }
}

/// The newOrder request (RFC 8555 §7.4, with RFC 9773 §5 `replaces` and the profiles extension).
fn new_order_request<'a>(
    identifiers: &'a [Identifier],
    profile: Option<&'a str>,
    replaces: Option<CertificateIdentifier<'a>>,
) -> NewOrder<'a> {
    let mut request = NewOrder::new(identifiers);
    if let Some(profile) = profile {
        request = request.profile(profile);
    }
    if let Some(replaces) = replaces {
        request = request.replaces(replaces);
    }
    request
}

fn is_rate_limited(error: &instant_acme::Error) -> bool {
    matches!(error, instant_acme::Error::Api(problem)
        if problem.r#type.as_deref() == Some("urn:ietf:params:acme:error:rateLimited"))
}

/// `1.0.0.127.in-addr.arpa` / the nibble form under `ip6.arpa` (RFC 1035 §3.5, RFC 3596 §2.5).
fn reverse_dns_name(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa")
        }
        std::net::IpAddr::V6(v6) => {
            let mut name = String::with_capacity(72);
            for byte in v6.octets().iter().rev() {
                name.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            name.push_str("ip6.arpa");
            name
        }
    }
}

/// Challenge answers currently published; withdrawn when the order is settled, however it ends.
struct Published<'a> {
    resolver: &'a CertResolver,
    tokens: &'a Http01Tokens,
    /// Where the answers were also written for the other replicas.
    shared: Option<Arc<SharedStore>>,
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
        if let Some(store) = self.shared.take() {
            shared::withdraw(
                store,
                std::mem::take(&mut self.http_tokens),
                std::mem::take(&mut self.alpn_names),
            );
        }
    }
}

/// Resolves when the order lease is lost; never without one (files backend).
async fn lease_lost(lease: Option<&mut HeldLease>) {
    match lease {
        Some(lease) => lease.lost().await,
        None => std::future::pending().await,
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
    fn an_ip_challenge_certificate_names_the_address_and_answers_its_reverse_name() {
        let cert = challenge_certificate("127.0.0.1", &[1u8; 32]).expect("certificate");
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert.cert[0]).expect("parse");
        let san = parsed
            .subject_alternative_name()
            .expect("san")
            .expect("present");
        assert!(matches!(
            san.value.general_names[..],
            [x509_parser::extensions::GeneralName::IPAddress([
                127, 0, 0, 1
            ])]
        ));
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        assert_eq!(reverse_dns_name(ip("192.0.2.5")), "5.2.0.192.in-addr.arpa");
        // RFC 3596 §2.5's example.
        assert_eq!(
            reverse_dns_name(ip("4321:0:1:2:3:4:567:89ab")),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.0.0.0.0.1.2.3.4.ip6.arpa"
        );
    }

    #[test]
    fn the_profile_is_one_the_ca_offers_and_ip_addresses_get_shortlived() {
        let lets_encrypt = ["classic", "tlsserver", "shortlived"];
        let dir = "https://acme.example/dir";
        let choose = |configured, offered: &[&str], has_ip| {
            order_profile(configured, offered, has_ip, dir).map_err(|e| e.to_string())
        };
        assert_eq!(
            choose(Some("tlsserver"), &lets_encrypt, false),
            Ok(Some("tlsserver"))
        );
        assert_eq!(choose(None, &lets_encrypt, false), Ok(None));
        assert_eq!(choose(None, &lets_encrypt, true), Ok(Some("shortlived")));
        // A CA without profiles (pebble 2.4) orders with none, IPs or not.
        assert_eq!(choose(None, &[], true), Ok(None));
        let unknown = choose(Some("longlived"), &lets_encrypt, false).expect_err("refused");
        assert!(
            unknown.contains("acme.profile = \"longlived\"")
                && unknown.contains("classic, shortlived, tlsserver"),
            "{unknown}"
        );
        let none = choose(Some("tlsserver"), &[], false).expect_err("refused");
        assert!(none.contains("offers no certificate profiles"), "{none}");
    }

    #[test]
    fn new_order_bodies_carry_ip_identifiers_the_profile_and_replaces() {
        let domains = Domains::new(vec![
            "example.com".into(),
            "192.0.2.5".into(),
            "2001:db8::1".into(),
        ]);
        let identifiers = order_identifiers(&domains);
        let plain =
            serde_json::to_value(new_order_request(&identifiers, None, None)).expect("json");
        assert_eq!(
            plain,
            serde_json::json!({ "identifiers": [
                { "type": "dns", "value": "example.com" },
                { "type": "ip", "value": "192.0.2.5" },
                { "type": "ip", "value": "2001:db8::1" },
            ]})
        );
        // A leaf with an authority key identifier, as every CA issues them (RFC 9773 §4.1 needs it).
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(vec![0xaa; 20]);
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let mut leaf = CertificateParams::new(vec!["example.com".to_string()]).expect("params");
        leaf.use_authority_key_identifier_extension = true;
        leaf.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01, 0x02, 0x03]));
        let leaf = leaf
            .signed_by(&KeyPair::generate().expect("key"), &issuer)
            .expect("leaf");
        let replaces = CertificateIdentifier::try_from(leaf.der()).expect("identifier");
        let renewal = serde_json::to_value(new_order_request(
            &identifiers[..1],
            Some("tlsserver"),
            Some(replaces),
        ))
        .expect("json");
        // RFC 9773 §4.1: base64url(AKI keyIdentifier) "." base64url(serial).
        assert_eq!(
            renewal,
            serde_json::json!({
                "identifiers": [{ "type": "dns", "value": "example.com" }],
                "profile": "tlsserver",
                "replaces": "qqqqqqqqqqqqqqqqqqqqqqqqqqo.AQID",
            })
        );
    }

    #[test]
    fn challenge_alternates_to_the_fallback_after_a_failure() {
        let config = AcmeConfig {
            directory_url: "https://acme.example/dir".into(),
            contact: vec![],
            challenge: ConfiguredChallenge::TlsAlpn01,
            directory_ca: None,
            eab: None,
            profile: None,
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
                None,
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
