//! What the ACME manager keeps in `<tls.dir>/acme/`: the account credentials (0600), and the current
//! certificate as `cert.pem` (chain), `key.pem` (0600) and `meta.json`. Every file is written atomically;
//! the key is written before the chain, and the meta last, so any crash leaves a loadable pair.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tls::store::{PUBLIC, SECRET, create_private_dir, write_atomic};

#[derive(Debug, Clone)]
pub struct AcmeStore {
    dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertMeta {
    /// The directory URL the certificate came from: a staging certificate is never served in production.
    pub directory: String,
    pub names: Vec<String>,
    /// Unix seconds.
    pub issued_at: u64,
}

pub struct StoredCert {
    pub chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub meta: CertMeta,
}

impl AcmeStore {
    pub fn new(tls_dir: &Path) -> AcmeStore {
        AcmeStore {
            dir: tls_dir.join("acme"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    fn meta_path(&self) -> PathBuf {
        self.dir.join("meta.json")
    }

    /// One account per ACME directory, so switching from staging to production makes a new one.
    pub fn account_path(&self, directory_url: &str) -> PathBuf {
        let slug: String = directory_url
            .trim_start_matches("https://")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("account-{slug}.json"))
    }

    pub fn ensure_dir(&self) -> std::io::Result<()> {
        create_private_dir(&self.dir)
    }

    pub fn load_account(&self, directory_url: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.account_path(directory_url)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn save_account(
        &self,
        directory_url: &str,
        credentials_json: &[u8],
    ) -> std::io::Result<()> {
        self.ensure_dir()?;
        write_atomic(&self.account_path(directory_url), credentials_json, SECRET)
    }

    /// The stored certificate, if all three files are there and readable.
    pub fn load_cert(&self) -> std::io::Result<Option<StoredCert>> {
        let read = |path: PathBuf| match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        let (Some(chain_pem), Some(key_pem), Some(meta)) = (
            read(self.cert_path())?,
            read(self.key_path())?,
            read(self.meta_path())?,
        ) else {
            return Ok(None);
        };
        let meta: CertMeta = serde_json::from_slice(&meta).map_err(std::io::Error::other)?;
        Ok(Some(StoredCert {
            chain_pem,
            key_pem,
            meta,
        }))
    }

    pub fn save_cert(
        &self,
        chain_pem: &[u8],
        key_pem: &[u8],
        meta: &CertMeta,
    ) -> std::io::Result<()> {
        self.ensure_dir()?;
        let meta = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?;
        write_atomic(&self.key_path(), key_pem, SECRET)?;
        write_atomic(&self.cert_path(), chain_pem, PUBLIC)?;
        write_atomic(&self.meta_path(), &meta, PUBLIC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = AcmeStore::new(dir.path());
        assert!(store.load_cert().expect("load").is_none());
        let meta = CertMeta {
            directory: "https://acme.example/dir".into(),
            names: vec!["a.example".into()],
            issued_at: 1,
        };
        store.save_cert(b"chain", b"key", &meta).expect("save");
        let loaded = store.load_cert().expect("load").expect("present");
        assert_eq!(
            (loaded.chain_pem.as_slice(), loaded.key_pem.as_slice()),
            (&b"chain"[..], &b"key"[..])
        );
        assert_eq!(loaded.meta, meta);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.key_path())
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_file(store.key_path()).expect("remove");
        assert!(
            store.load_cert().expect("load").is_none(),
            "a chain without its key is not a certificate"
        );
    }

    #[test]
    fn accounts_are_per_directory() {
        let store = AcmeStore::new(Path::new("/state"));
        assert_ne!(
            store.account_path("https://acme-v02.api.letsencrypt.org/directory"),
            store.account_path("https://acme-staging-v02.api.letsencrypt.org/directory")
        );
    }
}
