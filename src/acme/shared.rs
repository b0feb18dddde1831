//! Where the ACME manager keeps its state: `tls.dir` alone (`[storage] backend = "files"`), or the shared
//! store with `tls.dir` as this replica's copy (`"redis"`). In Redis, under the key prefix:
//!
//! | key | value |
//! |---|---|
//! | `acme:<directory>:account` | the account credentials (sealed with `encryption_key_env`) |
//! | `acme:<directory>:cert:<names>` | the certificate bundle: chain, key, metadata (sealed), one `SET` |
//! | `acme:<directory>:lock:<names>` | the order lease: who is ordering it (`store::lease`) |
//! | `acme:<directory>:issued` | pub/sub channel: a new bundle was stored (message: the names) |
//! | `acme:challenge:http01:<token>` | an HTTP-01 key authorization, while its authorization is pending |
//! | `acme:challenge:alpn:<name>` | a TLS-ALPN-01 answer (identifier, digest), likewise |
//!
//! Challenge answers are written before the CA is told a challenge is ready, so the CA's validation
//! connection can land on any replica; they expire by themselves after ten minutes if never removed.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

use super::storage::{
    AcmeStore, CertMeta, StoredCert, decode_bundle, directory_slug, encode_bundle,
};
use super::{AcmeError, challenge_certificate};
use crate::config::Domains;
use crate::store::SharedStore;
use crate::store::lease::Lease;

/// How long a challenge answer outlives a replica that died before removing it.
const CHALLENGE_TTL: Duration = Duration::from_secs(600);

pub enum CertStore {
    Files(AcmeStore),
    Shared {
        /// This replica's copy: what it serves from when Redis is down at start.
        files: AcmeStore,
        store: Arc<SharedStore>,
    },
}

impl CertStore {
    pub fn files(&self) -> &AcmeStore {
        match self {
            CertStore::Files(files) | CertStore::Shared { files, .. } => files,
        }
    }

    pub fn shared(&self) -> Option<&Arc<SharedStore>> {
        match self {
            CertStore::Files(_) => None,
            CertStore::Shared { store, .. } => Some(store),
        }
    }

    pub async fn load_account(&self, directory: &str) -> Result<Option<Vec<u8>>, AcmeError> {
        let files = self.files();
        let Some(store) = self.shared() else {
            return Ok(files.load_account(directory)?);
        };
        let key = account_key(directory);
        if let Some(json) = store.get_secret(&key).await? {
            // This replica's copy, for a restart while Redis is down, or a Redis that lost its data.
            if files.load_account(directory).ok().flatten().as_ref() != Some(&json) {
                files.save_account(directory, &json)?;
            }
            return Ok(Some(json));
        }
        // A replica moving from files to redis brings its account along (no new registration).
        let Some(json) = files.load_account(directory)? else {
            return Ok(None);
        };
        if store.set_secret_if_absent(&key, &json).await? {
            tracing::info!("stored this replica's ACME account in redis for the others");
            return Ok(Some(json));
        }
        Ok(store.get_secret(&key).await?.or(Some(json)))
    }

    /// Stores new credentials; with Redis, the first stored wins and is returned (two replicas creating
    /// an account at once use one from then on).
    pub async fn save_account(&self, directory: &str, json: &[u8]) -> Result<Vec<u8>, AcmeError> {
        let files = self.files();
        let chosen = match self.shared() {
            None => json.to_vec(),
            Some(store) => {
                let key = account_key(directory);
                if store.set_secret_if_absent(&key, json).await? {
                    json.to_vec()
                } else {
                    store
                        .get_secret(&key)
                        .await?
                        .unwrap_or_else(|| json.to_vec())
                }
            }
        };
        files.save_account(directory, &chosen)?;
        Ok(chosen)
    }

    /// The stored certificate for `domains`. With Redis: the shared bundle; none there, this replica's
    /// copy is offered to the others (a move from files to redis orders nothing); Redis unreachable,
    /// this replica's copy, so a restart during an outage still serves.
    pub async fn load_cert(
        &self,
        directory: &str,
        domains: &Domains,
    ) -> Result<Option<StoredCert>, AcmeError> {
        let files = self.files();
        let Some(store) = self.shared() else {
            return Ok(files.load_cert()?);
        };
        let key = cert_key(directory, domains);
        match store.get_secret(&key).await {
            Ok(Some(bytes)) => {
                let shared = decode_bundle(&bytes)?;
                let local = files.load_cert().ok().flatten();
                if local.is_none_or(|l| l.chain_pem != shared.chain_pem) {
                    files.save_cert(&shared.chain_pem, &shared.key_pem, &shared.meta)?;
                }
                Ok(Some(shared))
            }
            Ok(None) => {
                let Some(local) = files.load_cert()? else {
                    return Ok(None);
                };
                if local.meta.directory == directory && covers(&local.meta, domains) {
                    let bundle = encode_bundle(&local.chain_pem, &local.key_pem, &local.meta)?;
                    if store.set_secret_if_absent(&key, &bundle).await? {
                        tracing::info!(
                            "stored this replica's ACME certificate in redis for the others"
                        );
                    }
                }
                Ok(Some(local))
            }
            Err(e) => {
                // The store warns of the outage itself; this runs at every poll.
                tracing::debug!(error = %e, "redis unreachable: reading this replica's own copy of the certificate");
                Ok(files.load_cert()?)
            }
        }
    }

    /// Stores a new certificate: in Redis as one value, announced to the other replicas, then in this
    /// replica's folder. A failure to reach Redis is returned (the caller says a restart will order).
    pub async fn save_cert(
        &self,
        chain_pem: &[u8],
        key_pem: &[u8],
        meta: &CertMeta,
        domains: &Domains,
    ) -> Result<(), AcmeError> {
        let shared = match self.shared() {
            Some(store) => {
                let bundle = encode_bundle(chain_pem, key_pem, meta)?;
                let stored = store
                    .set_secret(&cert_key(&meta.directory, domains), &bundle)
                    .await;
                if stored.is_ok() {
                    let names = names_part(domains);
                    if let Err(e) = store
                        .publish(&issued_channel(&meta.directory), &names)
                        .await
                    {
                        tracing::warn!(error = %e, "new certificate stored but not announced; the other replicas find it at their next poll");
                    }
                }
                stored.map_err(AcmeError::from)
            }
            None => Ok(()),
        };
        self.files().save_cert(chain_pem, key_pem, meta)?;
        shared
    }

    /// The order lease for `domains`, when no other replica holds it (`None`: one does); always won
    /// with the files backend.
    pub async fn try_lease(
        &self,
        directory: &str,
        domains: &Domains,
        ttl: Duration,
    ) -> Result<Option<Option<Lease>>, AcmeError> {
        match self.shared() {
            None => Ok(Some(None)),
            Some(store) => {
                let lease = store.try_lease(&lock_key(directory, domains), ttl).await?;
                Ok(lease.map(Some))
            }
        }
    }

    /// Wakes `notify` whenever another replica announces a certificate.
    pub fn follow(&self, directory: &str, notify: Arc<tokio::sync::Notify>) {
        if let Some(store) = self.shared() {
            store.follow(&issued_channel(directory), notify);
        }
    }
}

fn covers(meta: &CertMeta, domains: &Domains) -> bool {
    domains.iter().all(|d| meta.names.iter().any(|n| n == d))
}

/// The names, sorted (one certificate whatever order the config lists them in).
fn names_part(domains: &Domains) -> String {
    let mut names: Vec<&str> = domains.iter().collect();
    names.sort_unstable();
    names.dedup();
    names.join(",")
}

fn account_key(directory: &str) -> String {
    format!("acme:{}:account", directory_slug(directory))
}

fn cert_key(directory: &str, domains: &Domains) -> String {
    format!(
        "acme:{}:cert:{}",
        directory_slug(directory),
        names_part(domains)
    )
}

fn lock_key(directory: &str, domains: &Domains) -> String {
    format!(
        "acme:{}:lock:{}",
        directory_slug(directory),
        names_part(domains)
    )
}

fn issued_channel(directory: &str) -> String {
    format!("acme:{}:issued", directory_slug(directory))
}

fn http01_key(token: &str) -> String {
    format!("acme:challenge:http01:{token}")
}

fn alpn_key(name: &str) -> String {
    format!("acme:challenge:alpn:{}", name.to_ascii_lowercase())
}

#[derive(Serialize, Deserialize)]
struct AlpnAnswer {
    identifier: String,
    /// base64url SHA-256 of the key authorization.
    digest: String,
}

/// Challenge answers this replica put in the store, for every replica to give.
pub async fn publish_http01(
    store: &SharedStore,
    token: &str,
    key_authorization: &str,
) -> Result<(), AcmeError> {
    Ok(store
        .set(
            &http01_key(token),
            key_authorization.as_bytes(),
            Some(CHALLENGE_TTL),
        )
        .await?)
}

pub async fn publish_alpn(
    store: &SharedStore,
    name: &str,
    identifier: &str,
    digest: &[u8],
) -> Result<(), AcmeError> {
    let answer = AlpnAnswer {
        identifier: identifier.to_string(),
        digest: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest),
    };
    let value = serde_json::to_vec(&answer)?;
    Ok(store
        .set(&alpn_key(name), &value, Some(CHALLENGE_TTL))
        .await?)
}

/// Removes answers once the order is settled, in the background (a replica that cannot reach Redis
/// leaves them to expire).
pub fn withdraw(store: Arc<SharedStore>, http_tokens: Vec<String>, alpn_names: Vec<String>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let keys = http_tokens
                .iter()
                .map(|t| http01_key(t))
                .chain(alpn_names.iter().map(|n| alpn_key(n)));
            for key in keys {
                let _ = store.delete(&key).await;
            }
        });
    }
}

/// The key authorization for `token` that another replica published, for the plain listener.
pub async fn shared_http01(store: &SharedStore, token: &str) -> Option<String> {
    let value = store.get(&http01_key(token)).await.ok()??;
    String::from_utf8(value).ok()
}

/// The TLS-ALPN-01 certificate for `name` that another replica's order needs (RFC 8737 §3), built here
/// from its published digest.
pub async fn shared_alpn_certificate(store: &SharedStore, name: &str) -> Option<CertifiedKey> {
    let value = store.get(&alpn_key(name)).await.ok()??;
    let answer: AlpnAnswer = serde_json::from_slice(&value).ok()?;
    let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(answer.digest)
        .ok()?;
    challenge_certificate(&answer.identifier, &digest).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_one_certificate_whatever_the_order_of_the_names() {
        let dir = "https://acme-v02.api.letsencrypt.org/directory";
        let a = Domains::new(vec!["www.example.com".into(), "example.com".into()]);
        let b = Domains::new(vec!["example.com".into(), "www.example.com".into()]);
        assert_eq!(cert_key(dir, &a), cert_key(dir, &b));
        assert_eq!(
            cert_key(dir, &a),
            "acme:acme-v02.api.letsencrypt.org_directory:cert:example.com,www.example.com"
        );
        assert_ne!(lock_key(dir, &a), cert_key(dir, &a));
        let staging = "https://acme-staging-v02.api.letsencrypt.org/directory";
        assert_ne!(cert_key(dir, &a), cert_key(staging, &a));
        assert_ne!(account_key(dir), account_key(staging));
    }
}
