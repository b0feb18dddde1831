//! A local certificate authority, like Caddy's `tls internal`: one root created on first start and kept in
//! `<tls.dir>/local/` (key 0600), and short-lived leaf certificates for the served names, renewed in the
//! background before they expire. Trust the root once (curl `--cacert`, the OS or browser store).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use super::store::{PUBLIC, SECRET, create_private_dir, write_atomic};
use super::{CertInfo, CertResolver, TlsError, crypto_provider};
use crate::config::Domains;

const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Short like Caddy's (12h there): a leaked leaf key is worthless soon, and renewal is exercised daily.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 86_400);

pub struct LocalCa {
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    pub root_path: PathBuf,
}

impl LocalCa {
    /// Opens the CA in `dir/local`, creating it on first use.
    pub fn open(dir: &Path) -> Result<LocalCa, TlsError> {
        let ca_dir = dir.join("local");
        let root_path = ca_dir.join("root.crt");
        let key_path = ca_dir.join("root.key");
        if !root_path.exists() || !key_path.exists() {
            create_private_dir(&ca_dir).map_err(|e| TlsError::io(&ca_dir, e))?;
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            let mut name = DistinguishedName::new();
            name.push(DnType::OrganizationName, "portcullis");
            name.push(
                DnType::CommonName,
                format!("portcullis local CA {}", short_id()),
            );
            params.distinguished_name = name;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::hours(1);
            params.not_after = now + ROOT_LIFETIME;
            let cert = params.self_signed(&key)?;
            // Key first: a crash between the two writes leaves no certificate without its key.
            write_atomic(&key_path, key.serialize_pem().as_bytes(), SECRET)
                .map_err(|e| TlsError::io(&key_path, e))?;
            write_atomic(&root_path, cert.pem().as_bytes(), PUBLIC)
                .map_err(|e| TlsError::io(&root_path, e))?;
            tracing::info!(root = %root_path.display(), "created a new local CA");
        }
        let root_pem =
            std::fs::read_to_string(&root_path).map_err(|e| TlsError::io(&root_path, e))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| TlsError::io(&key_path, e))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&root_pem, key)?;
        Ok(LocalCa {
            root_pem,
            issuer,
            root_path,
        })
    }

    /// The root certificate and key as stored in `dir/local`, to share with other replicas.
    pub fn stored_pems(dir: &Path) -> Result<(String, String), TlsError> {
        let ca_dir = dir.join("local");
        let read = |name: &str| {
            let path = ca_dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| TlsError::io(&path, e))
        };
        Ok((read("root.crt")?, read("root.key")?))
    }

    /// Puts another replica's root in `dir/local` (key first, 0600), replacing this one's; checked
    /// before anything is written: a root and key that do not load are refused.
    pub fn install_pems(dir: &Path, root_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        Issuer::from_ca_cert_pem(root_pem, key)?;
        let ca_dir = dir.join("local");
        create_private_dir(&ca_dir).map_err(|e| TlsError::io(&ca_dir, e))?;
        let (root_path, key_path) = (ca_dir.join("root.crt"), ca_dir.join("root.key"));
        write_atomic(&key_path, key_pem.as_bytes(), SECRET)
            .map_err(|e| TlsError::io(&key_path, e))?;
        write_atomic(&root_path, root_pem.as_bytes(), PUBLIC)
            .map_err(|e| TlsError::io(&root_path, e))
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Issues a leaf for `domains` (DNS names and IP addresses), valid from an hour ago for `LEAF_LIFETIME`.
    pub fn issue(&self, domains: &Domains) -> Result<CertifiedKey, TlsError> {
        let key = KeyPair::generate()?;
        let names: Vec<String> = domains.iter().map(str::to_string).collect();
        let mut params = CertificateParams::new(names)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            domains.iter().next().unwrap_or("localhost"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + LEAF_LIFETIME;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        Ok(CertifiedKey::from_der(chain, key_der, &crypto_provider())?)
    }

    /// Issues and installs a leaf; returns when the next one is due.
    pub fn issue_and_install(
        &self,
        domains: &Domains,
        resolver: &CertResolver,
    ) -> Result<SystemTime, TlsError> {
        let leaf = self.issue(domains)?;
        let info = CertInfo::of(&leaf)?;
        resolver.install(domains.iter(), Arc::new(leaf));
        Ok(info.renew_at())
    }
}

fn short_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{:08x}",
        (nanos as u64 ^ u64::from(std::process::id())) & 0xffff_ffff
    )
}

/// Renews the leaf before it expires, and reissues at once when a reload changes the served names.
pub async fn renew_forever(
    ca: Arc<LocalCa>,
    mut domains: watch::Receiver<Domains>,
    resolver: Arc<CertResolver>,
    mut next: SystemTime,
) {
    loop {
        let wait = next.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = domains.changed() => {
                if changed.is_err() {
                    return; // the server is gone
                }
            }
        }
        let names = domains.borrow_and_update().clone();
        match ca.issue_and_install(&names, &resolver) {
            Ok(at) => {
                tracing::info!("renewed the local certificate");
                next = at;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot renew the local certificate; retrying in a minute");
                next = SystemTime::now() + Duration::from_secs(60);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_created_once_with_a_private_key_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let first = LocalCa::open(dir.path()).expect("create");
        let second = LocalCa::open(dir.path()).expect("reopen");
        assert_eq!(first.root_pem(), second.root_pem());
        let mode = std::fs::metadata(dir.path().join("local/root.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn leaf_covers_names_and_ips_and_is_renewed_early() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = LocalCa::open(dir.path()).expect("create");
        let domains = Domains::new(vec!["localhost".into(), "127.0.0.1".into()]);
        let leaf = ca.issue(&domains).expect("issue");
        let info = CertInfo::of(&leaf).expect("parse");
        assert!(info.covers("localhost") && info.covers("127.0.0.1"));
        assert!(!info.covers("example.com"));
        let lifetime = info
            .not_after
            .duration_since(info.not_before)
            .expect("order");
        assert!(info.renew_at() < info.not_after);
        assert!(info.renew_at() > info.not_before + lifetime / 2);
    }
}
