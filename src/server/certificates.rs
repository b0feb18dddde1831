//! Certificate provisioning at start: the first certificate from the configured source (local CA, files
//! or ACME) and the background task that renews it, following `server.domains` through a watch channel.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ServerError;
use crate::acme::{AcmeManager, AcmeStatus, Http01Tokens};
use crate::config::{Config, Domains, TlsSource};
use crate::store::SharedStore;
use crate::tls::CertResolver;
use crate::tls::local_ca::{self, LocalCa};

/// The shared store's name for the local CA (its root and key, one JSON value).
const SHARED_LOCAL_CA: &str = "local-ca";

#[derive(serde::Serialize, serde::Deserialize)]
struct SharedCa {
    root_pem: String,
    key_pem: String,
}

/// With `[storage] backend = "redis"` and the local CA, every replica serves one CA: the first to start
/// stores its root and key (set only if absent, so two starting at once agree on one), the others take
/// it into their `tls.dir` before issuing. Redis unreachable: this replica keeps its own CA and says so.
/// The CA key is sealed in Redis when `storage.encryption_key_env` is set, else in the clear.
pub(super) async fn share_local_ca(dir: &std::path::Path, store: &SharedStore) {
    let adopt = |bytes: Vec<u8>| {
        let shared: SharedCa = match serde_json::from_slice(&bytes) {
            Ok(shared) => shared,
            Err(e) => {
                tracing::error!(error = %e, "the local CA in redis is not readable; keeping this replica's own");
                return;
            }
        };
        let same = LocalCa::stored_pems(dir).is_ok_and(|(root, _)| root == shared.root_pem);
        if same {
            return;
        }
        match LocalCa::install_pems(dir, &shared.root_pem, &shared.key_pem) {
            Ok(()) => tracing::info!("took the local CA the other replicas serve, from redis"),
            Err(e) => {
                tracing::error!(error = %e, "the local CA in redis does not load; keeping this replica's own")
            }
        }
    };
    match store.get_secret(SHARED_LOCAL_CA).await {
        Ok(Some(bytes)) => adopt(bytes),
        Ok(None) => {
            let pems = LocalCa::open(dir).and_then(|_| LocalCa::stored_pems(dir));
            let Ok((root_pem, key_pem)) = pems else {
                return;
            };
            let Ok(bytes) = serde_json::to_vec(&SharedCa { root_pem, key_pem }) else {
                return;
            };
            match store.set_secret_if_absent(SHARED_LOCAL_CA, &bytes).await {
                Ok(true) => {
                    tracing::info!("stored this replica's local CA in redis for the others")
                }
                Ok(false) => {
                    if let Ok(Some(theirs)) = store.get_secret(SHARED_LOCAL_CA).await {
                        adopt(theirs);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot share the local CA; this replica serves its own")
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "redis unreachable at start; this replica serves its own local CA")
        }
    }
}

/// Gets the first certificate in place (or starts getting it) and spawns its renewal.
pub(super) fn provision_certificates(
    config: &Config,
    resolver: &Arc<CertResolver>,
    tokens: &Arc<Http01Tokens>,
    domain_updates: watch::Receiver<Domains>,
    store: Option<Arc<SharedStore>>,
    background: &mut Vec<JoinHandle<()>>,
) -> Result<(Option<PathBuf>, Option<Arc<AcmeStatus>>), ServerError> {
    let domains = &config.server.domains;
    match &config.tls.source {
        TlsSource::Local => {
            let ca = Arc::new(LocalCa::open(&config.tls.dir)?);
            let next = ca.issue_and_install(domains, resolver)?;
            let root = ca.root_path.clone();
            let root_abs = std::fs::canonicalize(&root).unwrap_or_else(|_| root.clone());
            tracing::info!(
                root = %root_abs.display(),
                "local CA: trust this root to browse without warnings \
                 (curl --cacert {0}; Firefox/Chrome: import it as an authority; Debian: copy it to \
                 /usr/local/share/ca-certificates/portcullis.crt and run update-ca-certificates)",
                root_abs.display()
            );
            background.push(tokio::spawn(local_ca::renew_forever(
                ca,
                domain_updates,
                resolver.clone(),
                next,
            )));
            Ok((Some(root), None))
        }
        TlsSource::Files { cert, key } => {
            let info = crate::tls::install_files(resolver, domains, cert, key)?;
            tracing::info!(cert = %cert.display(), names = ?info.names, "serving certificate from files");
            Ok((None, None))
        }
        TlsSource::Acme => {
            let acme = config.acme.clone().ok_or_else(|| {
                ServerError::Acme("tls.source = \"acme\" without [acme] settings".into())
            })?;
            let manager = AcmeManager::new(
                acme,
                domain_updates,
                &config.tls.dir,
                resolver.clone(),
                tokens.clone(),
                config.server.http.is_some(),
                store,
            );
            let status = manager.status();
            background.push(tokio::spawn(manager.run()));
            Ok((None, Some(status)))
        }
    }
}
