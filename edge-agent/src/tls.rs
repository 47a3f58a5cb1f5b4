//! Which API certificates the agent accepts when it polls.
//!
//! A certificate is accepted if ANY of these holds:
//! 1. the SHA-256 of the end-entity certificate (DER) equals the fingerprint in the join token.
//!    In single-node mode the API and the tunnel share one self-signed certificate, so a fresh
//!    install works without any insecure flag and without trusting anything but the token;
//! 2. it validates against the webpki (Mozilla) roots for the URL's host;
//! 3. `EDGE_INSECURE_POLL=1`: anything goes (logged once). The join secret never crosses the
//!    wire, so even then nothing reusable leaks; the risk is a fake "idle" answer.
//!
//! The handshake signature is always checked with the provider's algorithms, so whoever
//! answers must hold the certificate's private key.
//!
//! Tunnel gateways are held to a stricter rule ([`tunnel_config`]): only the fingerprint in the
//! join token counts, never public roots and never `EDGE_INSECURE_POLL`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("tls setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls setup: cannot build the certificate verifier: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// How a certificate got accepted (for tests and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    Pinned,
    WebPki,
    Insecure,
}

/// The verifier described in the module docs.
#[derive(Debug)]
pub struct PollVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    pinned: [u8; 32],
    insecure: bool,
    algorithms: WebPkiSupportedAlgorithms,
    warned: AtomicBool,
}

/// The crypto provider used everywhere in the agent.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The Mozilla roots shipped in `webpki-roots`.
pub fn webpki_roots() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

impl PollVerifier {
    pub fn new(
        roots: RootCertStore,
        pinned: [u8; 32],
        insecure: bool,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsSetupError> {
        let algorithms = provider.signature_verification_algorithms;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
        Ok(Self {
            webpki,
            pinned,
            insecure,
            algorithms,
            warned: AtomicBool::new(false),
        })
    }

    /// The accept/reject decision, without the logging.
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<Accepted, rustls::Error> {
        let fingerprint: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        // Not a secret comparison: the fingerprint is in the token and the certificate is public.
        if fingerprint == self.pinned {
            return Ok(Accepted::Pinned);
        }
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_) => Ok(Accepted::WebPki),
            Err(_) if self.insecure => Ok(Accepted::Insecure),
            Err(e) => Err(e),
        }
    }
}

impl ServerCertVerifier for PollVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let accepted = self.check(end_entity, intermediates, server_name, ocsp_response, now)?;
        if accepted == Accepted::Insecure && !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                server = ?server_name,
                "accepting an api certificate that is neither pinned by the join token nor publicly trusted (EDGE_INSECURE_POLL=1)"
            );
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client configuration for polling a server whose certificate fingerprint (from the join
/// token) is `pinned`. Share the result between clients of the same server: it holds the
/// parsed roots and the session-resumption cache.
pub fn client_config(
    pinned: [u8; 32],
    insecure: bool,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    client_config_with_roots(webpki_roots(), pinned, insecure)
}

/// [`client_config`] with other roots (tests, private CAs).
pub fn client_config_with_roots(
    roots: RootCertStore,
    pinned: [u8; 32],
    insecure: bool,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let provider = provider();
    let verifier = PollVerifier::new(roots, pinned, insecure, provider.clone())?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts exactly the certificate whose SHA-256 is pinned (the tunnel gateways'); anything
/// else fails with [`rustls::CertificateError::ApplicationVerificationFailure`], which
/// [`is_certificate_rejection`] recognises.
pub use proto::pin::PinnedVerifier;

/// The client configuration for tunnels: the gateway certificate must be the one pinned in
/// the join token. No ALPN.
pub fn tunnel_config(pinned: [u8; 32]) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let provider = provider();
    let verifier = PinnedVerifier::new(pinned, &provider);
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Whether a failed TLS handshake (as tokio-rustls reports it) means our verifier rejected
/// the peer's certificate.
pub fn is_certificate_rejection(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)))
}

pub use proto::pin::fingerprint;

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

    fn self_signed(name: &str) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        cert.der().clone()
    }

    /// A CA and a leaf for `name` signed by it.
    fn ca_and_leaf(name: &str) -> (CertificateDer<'static>, CertificateDer<'static>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        (ca.der().clone(), leaf.der().clone())
    }

    fn verifier(roots: RootCertStore, pinned: [u8; 32], insecure: bool) -> PollVerifier {
        PollVerifier::new(roots, pinned, insecure, provider()).unwrap()
    }

    fn name(n: &str) -> ServerName<'static> {
        ServerName::try_from(n.to_owned()).unwrap()
    }

    #[test]
    fn pinned_self_signed_is_accepted_for_any_name() {
        let cert = self_signed("cp.local");
        let v = verifier(webpki_roots(), fingerprint(&cert), false);
        for n in ["cp.local", "127.0.0.1", "other.example"] {
            assert_eq!(
                v.check(&cert, &[], &name(n), &[], UnixTime::now()).unwrap(),
                Accepted::Pinned
            );
        }
        assert!(v
            .verify_server_cert(&cert, &[], &name("cp.local"), &[], UnixTime::now())
            .is_ok());
    }

    #[test]
    fn unpinned_self_signed_is_rejected() {
        let cert = self_signed("cp.local");
        let other = self_signed("cp.local");
        let v = verifier(webpki_roots(), fingerprint(&other), false);
        let err = v
            .check(&cert, &[], &name("cp.local"), &[], UnixTime::now())
            .unwrap_err();
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );
        assert!(v
            .verify_server_cert(&cert, &[], &name("cp.local"), &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn insecure_accepts_anything() {
        let cert = self_signed("cp.local");
        let v = verifier(webpki_roots(), [0; 32], true);
        assert_eq!(
            v.check(&cert, &[], &name("elsewhere"), &[], UnixTime::now())
                .unwrap(),
            Accepted::Insecure
        );
        // Twice: the warning is logged once, the answer stays the same.
        for _ in 0..2 {
            assert!(v
                .verify_server_cert(&cert, &[], &name("x"), &[], UnixTime::now())
                .is_ok());
        }
    }

    #[test]
    fn trusted_chain_is_accepted_for_its_name_only() {
        let (ca, leaf) = ca_and_leaf("cp.example.com");
        let mut roots = RootCertStore::empty();
        roots.add(ca).unwrap();
        let v = verifier(roots, [0; 32], false);
        assert_eq!(
            v.check(&leaf, &[], &name("cp.example.com"), &[], UnixTime::now())
                .unwrap(),
            Accepted::WebPki
        );
        assert!(v
            .check(&leaf, &[], &name("evil.example.com"), &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn garbage_certificate_is_rejected() {
        let v = verifier(webpki_roots(), [0; 32], false);
        let junk = CertificateDer::from(vec![1, 2, 3]);
        assert!(v
            .check(&junk, &[], &name("x.example"), &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn pinned_verifier_accepts_only_the_pinned_certificate() {
        let cert = self_signed("gw.local");
        let (_, leaf) = ca_and_leaf("gw.local");
        let v = PinnedVerifier::new(fingerprint(&cert), &provider());
        assert!(v
            .verify_server_cert(&cert, &[], &name("anything"), &[], UnixTime::now())
            .is_ok());
        let err = v
            .verify_server_cert(&leaf, &[], &name("gw.local"), &[], UnixTime::now())
            .unwrap_err();
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, err);
        assert!(is_certificate_rejection(&io));
        assert!(!is_certificate_rejection(&std::io::Error::other("reset")));
        assert!(tunnel_config([0; 32]).is_ok());
    }

    #[test]
    fn config_builds_and_offers_schemes() {
        assert!(client_config([0; 32], false).is_ok());
        let v = verifier(webpki_roots(), [0; 32], false);
        assert!(v
            .supported_verify_schemes()
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256));
    }
}
