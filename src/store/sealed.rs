//! Secrets at rest in the shared store (`storage.encryption_key_env`): ACME account keys, certificate
//! keys and the local CA are sealed with AES-256-GCM (aws-lc-rs) before they reach Redis, so whoever can
//! read Redis (a replica of it, a backup, `MONITOR`) cannot read them without the key. The key's name in
//! Redis is the additional data: a sealed value copied under another name does not open.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

/// What a sealed value starts with: a version, so the format can change without guessing.
const SEALED_PREFIX: &[u8] = b"portcullis-sealed-v1:";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(
        "`{0}` in the store is encrypted, and storage.encryption_key_env is not set (or names another key)"
    )]
    Sealed(String),
    #[error("`{0}` in the store does not open with this encryption key (another key, or damaged)")]
    WrongKey(String),
    #[error("encryption failed")]
    Crypto,
}

pub struct SealingKey(LessSafeKey);

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(<redacted>)")
    }
}

impl SealingKey {
    /// 32 bytes (the config checks the length and the encoding).
    pub fn new(key: &[u8]) -> Result<SealingKey, SealError> {
        let unbound = UnboundKey::new(&AES_256_GCM, key).map_err(|_| SealError::Crypto)?;
        Ok(SealingKey(LessSafeKey::new(unbound)))
    }

    /// prefix ‖ random 96-bit nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| SealError::Crypto)?;
        let mut in_out = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut in_out,
            )
            .map_err(|_| SealError::Crypto)?;
        let mut sealed = Vec::with_capacity(SEALED_PREFIX.len() + NONCE_LEN + in_out.len());
        sealed.extend_from_slice(SEALED_PREFIX);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&in_out);
        Ok(sealed)
    }
}

pub fn is_sealed(stored: &[u8]) -> bool {
    stored.starts_with(SEALED_PREFIX)
}

/// The plain value: opened when sealed, as stored when not (values written before a key was set are
/// read, and sealed at their next write).
pub fn open(key: Option<&SealingKey>, name: &str, stored: Vec<u8>) -> Result<Vec<u8>, SealError> {
    let Some(rest) = stored.strip_prefix(SEALED_PREFIX) else {
        return Ok(stored);
    };
    let Some(key) = key else {
        return Err(SealError::Sealed(name.to_string()));
    };
    if rest.len() < NONCE_LEN {
        return Err(SealError::WrongKey(name.to_string()));
    }
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce)
        .map_err(|_| SealError::WrongKey(name.to_string()))?;
    let mut in_out = ciphertext.to_vec();
    let plain = key
        .0
        .open_in_place(nonce, Aad::from(name.as_bytes()), &mut in_out)
        .map_err(|_| SealError::WrongKey(name.to_string()))?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_under_their_name() {
        let key = SealingKey::new(&[7u8; 32]).expect("key");
        let sealed = key.seal("acme:account", b"secret").expect("seal");
        assert!(sealed.starts_with(SEALED_PREFIX));
        assert!(
            !sealed.windows(6).any(|w| w == b"secret"),
            "not in the clear"
        );
        assert_eq!(
            open(Some(&key), "acme:account", sealed.clone()).expect("open"),
            b"secret"
        );
        // Another nonce every time: two seals of one value differ.
        assert_ne!(sealed, key.seal("acme:account", b"secret").expect("seal"));
        let other = SealingKey::new(&[8u8; 32]).expect("key");
        assert!(matches!(
            open(Some(&other), "acme:account", sealed.clone()),
            Err(SealError::WrongKey(_))
        ));
        assert!(matches!(
            open(Some(&key), "acme:cert", sealed.clone()),
            Err(SealError::WrongKey(_))
        ));
        assert!(matches!(
            open(None, "acme:account", sealed),
            Err(SealError::Sealed(_))
        ));
        // Written before encryption was configured: read as it is.
        assert_eq!(
            open(Some(&key), "acme:account", b"plain".to_vec()).expect("plain"),
            b"plain"
        );
        let truncated = [SEALED_PREFIX, b"short"].concat();
        assert!(open(Some(&key), "x", truncated).is_err());
    }
}
