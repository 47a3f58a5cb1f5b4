//! TLS material shared by every process that terminates agents' TLS (the control plane's API
//! and embedded gateway, the `tunnel-gateway` binary): a certificate and key loaded from PEM
//! files into a server configuration, and its fingerprint, which join keys carry and agents
//! pin. The pin itself (the fingerprint, the client side) is `proto::pin`, re-exported here.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCert { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("certificate and key do not form a valid TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// What a server needs from TLS.
pub struct TlsMaterial {
    pub server_config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the end-entity certificate DER: the fingerprint agents pin.
    pub fingerprint: [u8; 32],
    /// Where the certificate is, for the banner (operators give it to the docker CLI as ca.pem).
    pub cert_path: PathBuf,
}

pub use proto::pin::fingerprint;

/// Loads `cert` (PEM, the end-entity certificate first) and `key` (PEM) into a server
/// configuration: aws-lc-rs, TLS 1.2 and 1.3, session tickets on, no ALPN (an HTTP server
/// using it sets its own).
pub fn load(cert: &Path, key: &Path) -> Result<TlsMaterial, TlsError> {
    let certs = read_certs(cert)?;
    let private_key = read_key(key)?;
    let fingerprint = fingerprint(&certs[0]);
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsError::Config)?
    .with_no_client_auth()
    .with_single_cert(certs, private_key)
    .map_err(TlsError::Config)?;
    // Stateless resumption: an agent that lost its connection resumes for ~0.6 KB instead of
    // a full handshake, which matters on metered links.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsError::Config)?;
    config.send_tls13_tickets = 1;
    Ok(TlsMaterial {
        server_config: Arc::new(config),
        fingerprint,
        cert_path: cert.to_owned(),
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: path.to_owned(),
        })
}

pub use proto::pin::pinned_client_config;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_empty_files_are_named() {
        let dir = std::env::temp_dir().join(format!("edgeplane-tls-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap_or_default();
        let empty = dir.join("empty.pem");
        fs::write(&empty, b"").unwrap_or_default();
        let missing = dir.join("missing.pem");
        assert!(
            matches!(load(&missing, &missing), Err(TlsError::Read { path, .. }) if path == missing)
        );
        assert!(matches!(load(&empty, &empty), Err(TlsError::NoCert { path }) if path == empty));
        let _ = fs::remove_dir_all(&dir);
    }
}
