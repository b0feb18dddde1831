//! Certificate provisioning at start: the first certificate from the configured source (local CA, files
//! or ACME) and the background task that renews it, following `server.domains` through a watch channel.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ServerError;
use crate::acme::{AcmeManager, AcmeStatus, Http01Tokens};
use crate::config::{Config, Domains, TlsSource};
use crate::tls::CertResolver;
use crate::tls::local_ca::{self, LocalCa};

/// Gets the first certificate in place (or starts getting it) and spawns its renewal.
pub(super) fn provision_certificates(
    config: &Config,
    resolver: &Arc<CertResolver>,
    tokens: &Arc<Http01Tokens>,
    domain_updates: watch::Receiver<Domains>,
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
            );
            let status = manager.status();
            background.push(tokio::spawn(manager.run()));
            Ok((None, Some(status)))
        }
    }
}
