//! A self-signed certificate for tests, as PEM files (for `--tls-cert/--tls-key` of replicas
//! and gateways that must share it) and as rustls configurations.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SHA-256 of the certificate (DER): what join keys carry and agents pin.
    pub fingerprint: [u8; 32],
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl TestCert {
    /// A certificate for `localhost` and `127.0.0.1` (ECDSA P-256, as the control plane's own).
    pub fn generate() -> Self {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
                .expect("generate a test certificate");
        let dir = tempfile::tempdir().expect("tempdir for the certificate");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, certified.cert.pem()).expect("write cert.pem");
        std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key.pem");
        let der = certified.cert.der().clone();
        Self {
            fingerprint: gateway::tls::fingerprint(&der),
            cert,
            key,
            der,
            key_der: certified.signing_key.serialize_der(),
            _dir: dir,
        }
    }

    /// A server configuration as the control plane's API has it (ALPN `http/1.1`; the gateway
    /// must clear that for agents, which send none).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![self.der.clone()], key)
        .expect("test certificate and key");
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(server)
    }

    /// A client configuration that accepts exactly this certificate.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        gateway::tls::pinned_client_config(self.fingerprint).expect("pinned client config")
    }
}
