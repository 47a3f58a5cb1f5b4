//! Admin API keys: stored as SHA-256 hashes, compared in constant time. Framework-free, so both
//! the actix API (`api::auth`'s middleware) and the Docker proxy's hyper server check keys
//! the same way.

use std::sync::Arc;

use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The header that carries the key.
pub const HEADER: &str = "x-api-key";

/// The accepted key hashes, refreshed from the store on change; and the pepper console
/// sessions are signed with besides them ([`crate::session`]).
#[derive(Clone)]
pub struct AdminKeys(Arc<RwLock<Vec<[u8; 32]>>>, Arc<RwLock<[u8; 32]>>);

impl Default for AdminKeys {
    /// No key; a random pepper, so sessions hold on this process only until
    /// [`AdminKeys::set_session_pepper`] gives the one every replica shares.
    fn default() -> Self {
        let mut pepper = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut pepper);
        Self(Arc::default(), Arc::new(RwLock::new(pepper)))
    }
}

impl AdminKeys {
    /// Sessions are signed under keys derived from an admin key's hash AND this secret, which
    /// is not in the store (the API's TLS private key, which every replica behind one address
    /// serves): a copy of the store alone cannot mint a session.
    pub fn set_session_pepper(&self, secret: &[u8]) {
        let mut h = Sha256::new();
        h.update(b"edgeplane console session pepper\0");
        h.update(secret);
        *self.1.write() = h.finalize().into();
    }

    /// The pepper [`crate::session`] signs with.
    pub(crate) fn session_pepper(&self) -> [u8; 32] {
        *self.1.read()
    }

    pub fn hash(key: &str) -> [u8; 32] {
        Sha256::digest(key.as_bytes()).into()
    }

    pub fn replace(&self, hashes: Vec<[u8; 32]>) {
        *self.0.write() = hashes;
    }

    /// The accepted keys' hashes (sessions are signed under keys derived from them).
    pub fn hashes(&self) -> Vec<[u8; 32]> {
        self.0.read().clone()
    }

    /// Constant-time over each stored hash; every hash is compared (no early exit).
    pub fn accepts(&self, key: &str) -> bool {
        let h = Self::hash(key);
        self.0
            .read()
            .iter()
            .fold(false, |ok, stored| ok | bool::from(stored.ct_eq(&h)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_configured_key_is_accepted() {
        let keys = AdminKeys::default();
        assert!(!keys.accepts("k1"), "no key configured accepts nothing");
        keys.replace(vec![AdminKeys::hash("k1"), AdminKeys::hash("k2")]);
        assert!(keys.accepts("k1") && keys.accepts("k2"));
        assert!(!keys.accepts("k3") && !keys.accepts(""));
        keys.replace(vec![AdminKeys::hash("k2")]);
        assert!(!keys.accepts("k1"), "a key left out is revoked");
    }
}
