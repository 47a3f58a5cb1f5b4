//! Opening a tunnel: TCP to one gateway (3 s), TLS pinned to the join token's fingerprint,
//! then the one-time credentials in a hello and the gateway's answer, all within the
//! handshake timeout; `open_any` tries the gateways the credentials name, in order.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use proto::mux::{read_frame, write_frame};
use proto::tunnel::{Hello, HelloAnswer, HANDSHAKE_TIMEOUT};
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{TunnelError, TunnelSettings, GATEWAY_CONNECT_TIMEOUT};
use crate::docker;

/// A gateway accepted the credentials; the multiplexer starts on `stream`.
#[derive(Debug)]
pub struct Established {
    pub stream: TlsStream<TcpStream>,
    pub gateway_id: String,
    pub epoch: u64,
    pub addr: String,
}

/// The TLS server name for `host:port` (any valid name works: the certificate is pinned).
fn server_name(addr: &str) -> Option<ServerName<'static>> {
    let host = match addr.strip_prefix('[') {
        Some(rest) => rest.split_once(']')?.0,
        None => addr.rsplit_once(':')?.0,
    };
    if host.is_empty() {
        return None;
    }
    ServerName::try_from(host.to_owned()).ok()
}

/// TCP to `addr`, from `local` when given (and of the same family).
async fn connect(addr: &str, local: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(local) = local else {
        return TcpStream::connect(addr).await;
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address found");
    for remote in tokio::net::lookup_host(addr).await? {
        let socket = if remote.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if local.is_ipv4() == remote.is_ipv4() {
            socket.bind(SocketAddr::new(local, 0))?;
        }
        match socket.connect(remote).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Opens a tunnel connection to the gateway at `addr` (`host:port`), from `local` when given,
/// and presents `hello`. `tls` must pin the gateway certificate
/// ([`crate::tls::tunnel_config`]): on a mismatch nothing is sent after the TLS handshake.
pub async fn handshake(
    addr: &str,
    local: Option<IpAddr>,
    tls: &Arc<rustls::ClientConfig>,
    hello: &Hello,
) -> Result<Established, TunnelError> {
    let name = server_name(addr).ok_or_else(|| TunnelError::BadAddress {
        addr: addr.to_owned(),
    })?;
    let tcp = match tokio::time::timeout(GATEWAY_CONNECT_TIMEOUT, connect(addr, local)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) => {
            return Err(TunnelError::Connect {
                addr: addr.to_owned(),
                source,
            })
        }
        Err(_) => {
            return Err(TunnelError::ConnectTimeout {
                addr: addr.to_owned(),
                timeout: GATEWAY_CONNECT_TIMEOUT,
            })
        }
    };
    let _ = tcp.set_nodelay(true);
    let exchange = async {
        let mut stream = TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| {
                if crate::tls::is_certificate_rejection(&source) {
                    TunnelError::FingerprintMismatch {
                        addr: addr.to_owned(),
                    }
                } else {
                    TunnelError::Tls {
                        addr: addr.to_owned(),
                        source,
                    }
                }
            })?;
        let failed = |detail: String| TunnelError::Handshake {
            addr: addr.to_owned(),
            detail,
        };
        write_frame(&mut stream, hello)
            .await
            .map_err(|e| failed(format!("sending the hello: {e}")))?;
        let answer: HelloAnswer = read_frame(&mut stream)
            .await
            .map_err(|e| failed(format!("reading the answer: {e}")))?;
        match answer {
            HelloAnswer::Accepted { gateway_id, epoch } => Ok(Established {
                stream,
                gateway_id: docker::one_line(&gateway_id, 100),
                epoch,
                addr: addr.to_owned(),
            }),
            HelloAnswer::Refused { code, message } => Err(TunnelError::Refused {
                addr: addr.to_owned(),
                code,
                message: docker::one_line(&message, 200),
            }),
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err(TunnelError::HandshakeTimeout {
            addr: addr.to_owned(),
            timeout: HANDSHAKE_TIMEOUT,
        }),
    }
}

/// Tries the gateways of `gateways` in order (empty: `default`) until one accepts.
pub(super) async fn open_any(
    settings: &TunnelSettings,
    gateways: &[String],
    token: [u8; 32],
) -> Result<Established, Vec<TunnelError>> {
    let hello = Hello::Agent {
        endpoint_id: settings.endpoint_id,
        edge_id: settings.edge_id,
        token,
    };
    let fallback = [settings.default_gateway.clone()];
    let gateways = if gateways.is_empty() {
        &fallback[..]
    } else {
        gateways
    };
    let mut errors = Vec::new();
    for addr in gateways {
        match handshake(addr, settings.local_addr, &settings.tls, &hello).await {
            Ok(established) => return Ok(established),
            Err(e) => {
                let next = e.try_next();
                errors.push(e);
                if !next {
                    break;
                }
            }
        }
    }
    Err(errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_addresses_become_server_names() {
        assert!(matches!(
            server_name("gw.example.com:8000"),
            Some(ServerName::DnsName(_))
        ));
        assert!(matches!(
            server_name("127.0.0.1:8000"),
            Some(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("[::1]:8000"),
            Some(ServerName::IpAddress(_))
        ));
        assert!(server_name("no-port").is_none());
        assert!(server_name(":8000").is_none());
    }
}
