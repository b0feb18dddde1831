//! HTTP-01 tokens the plain listener answers at `/.well-known/acme-challenge/<token>` (RFC 8555 §8.3),
//! present from the moment a challenge is set ready until its authorization is settled.

use std::collections::HashMap;
use std::sync::RwLock;

#[derive(Debug, Default)]
pub struct Http01Tokens {
    tokens: RwLock<HashMap<String, String>>,
}

impl Http01Tokens {
    pub fn insert(&self, token: &str, key_authorization: &str) {
        let mut map = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        map.insert(token.to_string(), key_authorization.to_string());
    }

    pub fn remove(&self, token: &str) {
        let mut map = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        map.remove(token);
    }

    pub fn get(&self, token: &str) -> Option<String> {
        let map = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        map.get(token).cloned()
    }
}
