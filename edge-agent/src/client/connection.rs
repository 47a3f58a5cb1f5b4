//! Setting up a [`PollClient`]'s connection: the target worked out once from the join token
//! (host, port, `host` header, routes, TLS name), then TCP (optionally from a chosen local
//! address), TLS, and the HTTP/1.1 handshake; and telling a kept-alive connection the peer had
//! already closed.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderValue;
use hyper::Uri;
use hyper_util::rt::TokioIo;
use proto::async_mode::ASYNC_PATH;
use proto::snapshot::SNAPSHOT_PATH;
use proto::tunnel::TUNNEL_REQUEST_PATH;
use proto::wire::{CHECKIN_PATH, HELD_CHECKIN_PATH};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use super::{ByteCounters, CheckinError, CheckinRoute, CountingStream, PollClient, SetupError};
use crate::tls::TlsSetupError;

/// Facts about a freshly opened connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewConnection {
    /// TCP payload bytes (both directions) of the TLS handshake.
    pub handshake_bytes: u64,
}

/// Where and how to connect, worked out once from the join token.
#[derive(Debug, Clone)]
pub(super) struct Target {
    host: url::Host<String>,
    port: u16,
    /// `host[:port]` as the `host` header carries it.
    pub(super) authority: HeaderValue,
    /// The agent routes under the API URL's path.
    checkin: Uri,
    held: Uri,
    ask_tunnel: Uri,
    pub(super) snapshot: Uri,
    pub(super) async_tick: Uri,
    pub(super) desired: Uri,
    pub(super) report: Uri,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl Target {
    pub(super) fn new(
        api_url: &str,
        tls_config: impl FnOnce() -> Result<Arc<rustls::ClientConfig>, TlsSetupError>,
    ) -> Result<Self, SetupError> {
        let bad = |why| SetupError::ApiUrl(api_url.to_owned(), why);
        let url = url::Url::parse(api_url).map_err(|_| bad("not a URL"))?;
        let host = url.host().ok_or_else(|| bad("no host"))?.to_owned();
        let port = url.port_or_known_default().ok_or_else(|| bad("no port"))?;
        let host_str = url.host_str().ok_or_else(|| bad("no host"))?;
        let authority = match url.port() {
            Some(p) => format!("{host_str}:{p}"),
            None => host_str.to_owned(),
        };
        let authority = HeaderValue::from_str(&authority).map_err(|_| bad("bad host"))?;
        let prefix = url.path().trim_end_matches('/');
        let route =
            |path: &str| Uri::try_from(format!("{prefix}{path}")).map_err(|_| bad("bad path"));
        let tls = match url.scheme() {
            "https" => {
                let name = match &host {
                    url::Host::Domain(d) => ServerName::try_from(d.clone())
                        .map_err(|_| bad("host is not a valid TLS server name"))?,
                    url::Host::Ipv4(ip) => ServerName::IpAddress(IpAddr::V4(*ip).into()),
                    url::Host::Ipv6(ip) => ServerName::IpAddress(IpAddr::V6(*ip).into()),
                };
                Some((tls_config()?, name))
            }
            "http" => None,
            _ => return Err(bad("scheme is neither https nor http")),
        };
        Ok(Self {
            host,
            port,
            authority,
            checkin: route(CHECKIN_PATH)?,
            held: route(HELD_CHECKIN_PATH)?,
            ask_tunnel: route(TUNNEL_REQUEST_PATH)?,
            snapshot: route(SNAPSHOT_PATH)?,
            async_tick: route(ASYNC_PATH)?,
            desired: route(proto::stacks::DESIRED_PATH)?,
            report: route(proto::stacks::STACK_REPORT_PATH)?,
            tls,
        })
    }

    pub(super) fn checkin_uri(&self, route: CheckinRoute) -> &Uri {
        match route {
            CheckinRoute::Plain => &self.checkin,
            CheckinRoute::Held => &self.held,
            CheckinRoute::AskTunnel => &self.ask_tunnel,
        }
    }
}

pub(super) type Sender = SendRequest<Full<Bytes>>;

impl PollClient {
    pub(super) async fn connect(&mut self) -> Result<(Sender, NewConnection), CheckinError> {
        let tcp = self.connect_tcp().await?;
        self.connects += 1;
        // Bytes of this connection only: the counters may be shared with other clients.
        let stream_counters = ByteCounters::new();
        let stream = CountingStream::new(tcp, stream_counters.clone());
        let tee = CountingStream::new(stream, self.counters.clone());
        let sender = match &self.target.tls {
            Some((config, name)) => {
                let tls = TlsConnector::from(config.clone())
                    .connect(name.clone(), tee)
                    .await
                    .map_err(|source| CheckinError::Tls {
                        host: self.target.host.to_string(),
                        source,
                    })?;
                http_handshake(tls).await?
            }
            None => http_handshake(tee).await?,
        };
        Ok((
            sender,
            NewConnection {
                handshake_bytes: stream_counters.snapshot().total(),
            },
        ))
    }

    async fn connect_tcp(&self) -> Result<TcpStream, CheckinError> {
        let addrs: Vec<SocketAddr> = match &self.target.host {
            url::Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(*ip), self.target.port)],
            url::Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(*ip), self.target.port)],
            url::Host::Domain(name) => tokio::net::lookup_host((name.as_str(), self.target.port))
                .await
                .map_err(|source| CheckinError::Resolve {
                    host: name.clone(),
                    source,
                })?
                .collect(),
        };
        let mut last_err = None;
        for addr in addrs {
            match self.connect_addr(addr).await {
                Ok(stream) => return Ok(stream),
                Err(source) => last_err = Some((addr, source)),
            }
        }
        let (addr, source) = last_err.unwrap_or_else(|| {
            (
                SocketAddr::new(IpAddr::from([0, 0, 0, 0]), self.target.port),
                io::Error::new(io::ErrorKind::NotFound, "no address found"),
            )
        });
        Err(CheckinError::Connect {
            addr: addr.to_string(),
            source,
        })
    }

    async fn connect_addr(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(local) = self.local_addr.filter(|l| l.is_ipv4() == addr.is_ipv4()) {
            socket.bind(SocketAddr::new(local, 0))?;
        }
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Whether a send failed because the peer had already closed the kept-alive connection (idle
/// timeout, restart): then a fresh connection can carry the same check-in at once.
pub(super) fn is_dead_connection(e: &hyper::Error) -> bool {
    if e.is_canceled() || e.is_closed() || e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            );
        }
        source = err.source();
    }
    false
}

async fn http_handshake<T>(io: T) -> Result<Sender, CheckinError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(CheckinError::Http)?;
    // The connection task ends when the sender is dropped or the peer goes away.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "check-in connection closed");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls;

    #[test]
    fn target_from_urls() {
        let cfg = || tls::client_config([0; 32], false);
        let t = Target::new("https://cp.example.com:9443", cfg).unwrap();
        assert_eq!(t.authority, "cp.example.com:9443");
        assert_eq!(t.port, 9443);
        assert_eq!(t.checkin, proto::wire::CHECKIN_PATH);
        assert_eq!(t.checkin_uri(CheckinRoute::Held), HELD_CHECKIN_PATH);
        assert_eq!(t.checkin_uri(CheckinRoute::AskTunnel), TUNNEL_REQUEST_PATH);
        assert_eq!(t.snapshot, SNAPSHOT_PATH);
        assert!(t.tls.is_some());

        let t = Target::new("https://cp.example.com/prefix/", cfg).unwrap();
        assert_eq!(t.authority, "cp.example.com");
        assert_eq!(t.port, 443);
        assert_eq!(
            t.checkin,
            format!("/prefix{}", proto::wire::CHECKIN_PATH).as_str()
        );
        assert_eq!(t.snapshot, format!("/prefix{SNAPSHOT_PATH}").as_str());

        let t = Target::new("https://[::1]:9443", cfg).unwrap();
        assert_eq!(t.authority, "[::1]:9443");
        assert!(matches!(t.tls, Some((_, ServerName::IpAddress(_)))));

        let t = Target::new("http://127.0.0.1:8080", cfg).unwrap();
        assert!(t.tls.is_none());
        assert!(Target::new("ftp://x", cfg).is_err());
    }
}
