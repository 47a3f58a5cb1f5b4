//! The API certificate: loaded from files, or generated self-signed into the data dir on
//! first start and reused after (so its fingerprint, which is in every join key, is stable).
//! Loading is `gateway::tls`'s, shared with the `tunnel-gateway` binary; generating (rcgen)
//! happens only here.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

pub use gateway::tls::TlsMaterial;

use crate::config::TlsSource;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Load(#[from] gateway::tls::TlsError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[source] rcgen::Error),
}

/// Where the API's certificate and private key are.
pub fn paths(source: &TlsSource, data_dir: &Path) -> (PathBuf, PathBuf) {
    match source {
        TlsSource::Files { cert, key } => (cert.clone(), key.clone()),
        TlsSource::SelfSigned => (data_dir.join("tls-cert.pem"), data_dir.join("tls-key.pem")),
    }
}

pub fn load(
    source: &TlsSource,
    data_dir: &Path,
    names: &[String],
) -> Result<TlsMaterial, TlsError> {
    let (cert_path, key_path) = paths(source, data_dir);
    if matches!(source, TlsSource::SelfSigned) && (!cert_path.exists() || !key_path.exists()) {
        generate(&cert_path, &key_path, names)?;
    }
    let mut material = gateway::tls::load(&cert_path, &key_path)?;
    // The API speaks HTTP/1.1 (the embedded gateway clears this again: agents send no ALPN).
    let mut config = (*material.server_config).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    material.server_config = std::sync::Arc::new(config);
    Ok(material)
}

fn generate(cert_path: &Path, key_path: &Path, names: &[String]) -> Result<(), TlsError> {
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for n in names {
        if !sans.contains(n) {
            sans.push(n.clone());
        }
    }
    // rcgen's default key is ECDSA P-256: small certificates, cheap handshakes.
    let certified = rcgen::generate_simple_self_signed(sans).map_err(TlsError::Generate)?;
    write_private(key_path, certified.signing_key.serialize_pem().as_bytes())?;
    fs::write(cert_path, certified.cert.pem()).map_err(|source| TlsError::Write {
        path: cert_path.to_owned(),
        source,
    })?;
    tracing::info!(cert = %cert_path.display(), "generated a self-signed api certificate");
    Ok(())
}

/// Writes a file readable by its owner only.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}
