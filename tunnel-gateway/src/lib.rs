//! edgeplane tunnel gateway: terminates agents' reverse TLS tunnels and records their location
//! in shared state. The tunnel itself is the next milestone; today this crate only owns the
//! configuration the binary accepts.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Gateway configuration (flags of CONTRACT.md).
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub redis_url: String,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub metrics_addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("the tunnel gateway is not implemented in this build yet (it lands with the tunnel milestone); nothing was started")]
    NotImplemented,
}

/// Runs the gateway. Refuses clearly until the tunnel milestone lands, rather than pretending
/// to serve.
pub async fn run(_config: Config) -> Result<(), GatewayError> {
    Err(GatewayError::NotImplemented)
}
