//! Sealing one-time tunnel credentials for one agent.
//!
//! Key: HKDF-SHA256 over the join secret, salted with the Edge ID, so only the agent holding
//! both (and not, as with Portainer, anyone who learns the Edge ID) can open it.
//! Cipher: ChaCha20-Poly1305 with a random 96-bit nonce; the Edge ID is authenticated data.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;
use uuid::Uuid;

use crate::codec::{self, CodecError, MAX_CONTROL_FRAME};
use crate::token::JoinSecret;
use crate::wire::{SealedCredentials, TunnelCredentials};

const KEY_INFO: &[u8] = b"edgeplane/v1 tunnel credentials";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("tunnel credentials could not be opened (wrong join secret or Edge ID, or tampered)")]
    Open,
    #[error("tunnel credentials: {0}")]
    Codec(#[from] CodecError),
}

/// The AEAD key for one (join secret, Edge ID) pair. Never printed.
#[derive(Clone)]
pub struct SealKey {
    key: [u8; 32],
    edge_id: Uuid,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(<redacted>)")
    }
}

impl SealKey {
    pub fn derive(secret: &JoinSecret, edge_id: &Uuid) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(edge_id.as_bytes()), secret.as_bytes());
        let mut key = [0u8; 32];
        hk.expand(KEY_INFO, &mut key)
            .unwrap_or_else(|_| unreachable!("32-byte HKDF output"));
        Self {
            key,
            edge_id: *edge_id,
        }
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(&self.key))
    }

    pub fn seal(&self, creds: &TunnelCredentials) -> Result<SealedCredentials, SealError> {
        let plain = codec::encode(creds)?;
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: self.edge_id.as_bytes(),
                },
            )
            .map_err(|_| SealError::Open)?;
        Ok(SealedCredentials { nonce, ciphertext })
    }

    pub fn open(&self, sealed: &SealedCredentials) -> Result<TunnelCredentials, SealError> {
        let plain = self
            .cipher()
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: self.edge_id.as_bytes(),
                },
            )
            .map_err(|_| SealError::Open)?;
        Ok(codec::decode(&plain, MAX_CONTROL_FRAME)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open() {
        let secret = JoinSecret::generate();
        let edge = Uuid::new_v4();
        let creds = TunnelCredentials {
            token: [9; 32],
            expires_ms: 42,
            gateways: vec!["gw-1:8000".into()],
        };
        let sealed = SealKey::derive(&secret, &edge).seal(&creds).unwrap();
        assert_eq!(
            SealKey::derive(&secret, &edge).open(&sealed).unwrap(),
            creds
        );
        // Another Edge ID or another secret cannot open it.
        assert_eq!(
            SealKey::derive(&secret, &Uuid::new_v4()).open(&sealed),
            Err(SealError::Open)
        );
        assert_eq!(
            SealKey::derive(&JoinSecret::generate(), &edge).open(&sealed),
            Err(SealError::Open)
        );
        let mut tampered = sealed.clone();
        tampered.ciphertext[0] ^= 1;
        assert_eq!(
            SealKey::derive(&secret, &edge).open(&tampered),
            Err(SealError::Open)
        );
    }
}
