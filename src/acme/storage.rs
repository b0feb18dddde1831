//! What the ACME manager keeps in `<tls.dir>/acme/`: the account credentials (0600), and the current
//! certificate as one bundle, `bundle.json` (chain, key and metadata; 0600), replaced atomically as a
//! whole: a crash at any point leaves the old certificate or the new one, never a new key beside an old
//! chain (which failed the key check at the next start and placed a new order). `cert.pem`, `key.pem`
//! (0600) and `meta.json` are written after it for people and other tools; a state folder from before
//! bundles is read from them until the next certificate is stored.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The bundle file: what the store is, whatever the copies beside it say.
#[derive(Serialize, Deserialize)]
struct Bundle {
    meta: CertMeta,
    chain_pem: String,
    key_pem: String,
}

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

    fn bundle_path(&self) -> PathBuf {
        self.dir.join("bundle.json")
    }

    /// One account per ACME directory, so switching from staging to production makes a new one.
    pub fn account_path(&self, directory_url: &str) -> PathBuf {
        self.dir
            .join(format!("account-{}.json", directory_slug(directory_url)))
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

    /// The stored certificate: the bundle, or in a state folder from before bundles the three files.
    pub fn load_cert(&self) -> std::io::Result<Option<StoredCert>> {
        let read = |path: PathBuf| match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        if let Some(bundle) = read(self.bundle_path())? {
            return decode_bundle(&bundle).map(Some);
        }
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
        for (path, contents, mode) in self.cert_writes(chain_pem, key_pem, meta)? {
            write_atomic(&path, &contents, mode)?;
        }
        Ok(())
    }

    /// The files a certificate is stored as, in the order they are written: the bundle first (from
    /// its rename on, the new certificate is the stored one), then the copies.
    fn cert_writes(
        &self,
        chain_pem: &[u8],
        key_pem: &[u8],
        meta: &CertMeta,
    ) -> std::io::Result<Vec<(PathBuf, Vec<u8>, u32)>> {
        let bundle = encode_bundle(chain_pem, key_pem, meta)?;
        let meta = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?;
        Ok(vec![
            (self.bundle_path(), bundle, SECRET),
            (self.key_path(), key_pem.to_vec(), SECRET),
            (self.cert_path(), chain_pem.to_vec(), PUBLIC),
            (self.meta_path(), meta, PUBLIC),
        ])
    }
}

/// A directory URL as a name part (file names, store keys): `acme-v02.api.letsencrypt.org_directory`.
pub fn directory_slug(directory_url: &str) -> String {
    directory_url
        .trim_start_matches("https://")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The one value a certificate is stored as, in a file or in the shared store.
pub fn encode_bundle(
    chain_pem: &[u8],
    key_pem: &[u8],
    meta: &CertMeta,
) -> std::io::Result<Vec<u8>> {
    let text = |pem: &[u8]| {
        String::from_utf8(pem.to_vec()).map_err(|_| std::io::Error::other("PEM is not UTF-8"))
    };
    let bundle = Bundle {
        meta: meta.clone(),
        chain_pem: text(chain_pem)?,
        key_pem: text(key_pem)?,
    };
    serde_json::to_vec(&bundle).map_err(std::io::Error::other)
}

pub fn decode_bundle(bytes: &[u8]) -> std::io::Result<StoredCert> {
    let bundle: Bundle = serde_json::from_slice(bytes).map_err(std::io::Error::other)?;
    Ok(StoredCert {
        chain_pem: bundle.chain_pem.into_bytes(),
        key_pem: bundle.key_pem.into_bytes(),
        meta: bundle.meta,
    })
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
        // The copies are for people: the bundle alone is the certificate.
        std::fs::remove_file(store.key_path()).expect("remove");
        assert!(store.load_cert().expect("load").is_some());
        std::fs::remove_file(store.bundle_path()).expect("remove");
        assert!(
            store.load_cert().expect("load").is_none(),
            "without a bundle, a chain without its key is not a certificate"
        );
    }

    fn meta(names: &str) -> CertMeta {
        CertMeta {
            directory: "https://acme.example/dir".into(),
            names: vec![names.into()],
            issued_at: 1,
        }
    }

    /// Crash points: after each file of a new certificate is renamed into place, and with a half-written
    /// temporary file beside them, the store loads the old certificate or the new one, whole.
    #[test]
    fn a_crash_at_any_point_of_a_write_leaves_the_old_or_the_new_certificate() {
        let (old, new) = (
            (
                b"old chain".as_slice(),
                b"old key".as_slice(),
                meta("old.example"),
            ),
            (
                b"new chain".as_slice(),
                b"new key".as_slice(),
                meta("new.example"),
            ),
        );
        for from_before_bundles in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = AcmeStore::new(dir.path());
            let writes = store.cert_writes(new.0, new.1, &new.2).expect("writes");
            for crash_after in 0..=writes.len() {
                let _ = std::fs::remove_dir_all(store.dir());
                if from_before_bundles {
                    // The three files an earlier version wrote.
                    store.ensure_dir().expect("dir");
                    write_atomic(&store.key_path(), old.1, SECRET).expect("key");
                    write_atomic(&store.cert_path(), old.0, PUBLIC).expect("chain");
                    let m = serde_json::to_vec(&old.2).expect("json");
                    write_atomic(&store.meta_path(), &m, PUBLIC).expect("meta");
                } else {
                    store.save_cert(old.0, old.1, &old.2).expect("old");
                }
                for (path, contents, mode) in &writes[..crash_after] {
                    write_atomic(path, contents, *mode).expect("write");
                }
                // The next file's temporary copy, half written when the power went.
                if let Some((path, contents, _)) = writes.get(crash_after) {
                    let name = path.file_name().expect("name").to_string_lossy();
                    let tmp = path.with_file_name(format!(".{name}.tmp.1"));
                    std::fs::write(tmp, &contents[..contents.len() / 2]).expect("tmp");
                }
                let loaded = store.load_cert().expect("load").expect("a certificate");
                let got = (
                    loaded.chain_pem.as_slice(),
                    loaded.key_pem.as_slice(),
                    loaded.meta,
                );
                let expected = if crash_after == 0 { &old } else { &new };
                assert_eq!(
                    (got.0, got.1, &got.2),
                    (expected.0, expected.1, &expected.2),
                    "crash after {crash_after} of {} writes (from before bundles: {from_before_bundles})",
                    writes.len()
                );
            }
        }
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
