//! Where the engine listens ([`DockerHost`], parsed from `DOCKER_HOST`) and connections to
//! it over either transport ([`EngineStream`]).

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Default port of `tcp://host` without one (Docker's plain-text port).
const DEFAULT_TCP_PORT: u16 = 2375;

/// Where the engine listens, parsed from `DOCKER_HOST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerHost {
    /// `unix:///path/to/docker.sock`
    Unix(PathBuf),
    /// `tcp://host:port` (plain text; `http://` is taken as a synonym)
    Tcp { host: String, port: u16 },
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{value:?} is not usable: {why} (expected unix:///path/to/docker.sock or tcp://host:port)")]
pub struct DockerHostError {
    pub value: String,
    pub why: &'static str,
}

impl DockerHost {
    pub fn parse(raw: &str) -> Result<Self, DockerHostError> {
        let raw = raw.trim();
        let bad = |why| DockerHostError {
            value: raw.to_owned(),
            why,
        };
        if let Some(path) = raw.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad("the socket path must be absolute"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let rest = raw
            .strip_prefix("tcp://")
            .or_else(|| raw.strip_prefix("http://"))
            .ok_or_else(|| {
                if raw.starts_with("https://") || raw.starts_with("ssh://") {
                    bad("TLS and SSH engine connections are not supported")
                } else {
                    bad("unknown scheme")
                }
            })?;
        let url = url::Url::parse(&format!("http://{rest}")).map_err(|_| bad("bad host:port"))?;
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        // `Url` keeps IPv6 brackets; `TcpStream::connect((host, port))` wants them off.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Self::Tcp {
            host,
            port: url.port().unwrap_or(DEFAULT_TCP_PORT),
        })
    }

    /// Connects to the engine within `timeout`.
    pub async fn connect(&self, timeout: Duration) -> io::Result<EngineStream> {
        let connect = async {
            match self {
                Self::Unix(path) => UnixStream::connect(path).await.map(EngineStream::Unix),
                Self::Tcp { host, port } => {
                    let tcp = TcpStream::connect((host.as_str(), *port)).await?;
                    tcp.set_nodelay(true)?;
                    Ok(EngineStream::Tcp(tcp))
                }
            }
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            )),
        }
    }
}

impl std::fmt::Display for DockerHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

/// A connection to the engine, over whichever transport `DOCKER_HOST` names.
#[derive(Debug)]
pub enum EngineStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AsyncRead for EngineStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for EngineStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    /// Half-closes (the engine sees end of input, and may keep writing).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn docker_host_parsing() {
        assert_eq!(
            DockerHost::parse("unix:///var/run/docker.sock").unwrap(),
            DockerHost::Unix("/var/run/docker.sock".into())
        );
        assert_eq!(
            DockerHost::parse(" tcp://10.0.0.5:2376 ").unwrap(),
            DockerHost::Tcp {
                host: "10.0.0.5".into(),
                port: 2376
            }
        );
        assert_eq!(
            DockerHost::parse("tcp://engine").unwrap(),
            DockerHost::Tcp {
                host: "engine".into(),
                port: 2375
            }
        );
        let v6 = DockerHost::parse("tcp://[::1]:2375/").unwrap();
        assert_eq!(
            v6,
            DockerHost::Tcp {
                host: "::1".into(),
                port: 2375
            }
        );
        assert_eq!(v6.to_string(), "tcp://[::1]:2375");
        assert_eq!(
            DockerHost::parse("unix:///run/podman/podman.sock")
                .unwrap()
                .to_string(),
            "unix:///run/podman/podman.sock"
        );
        for bad in [
            "/var/run/docker.sock",
            "unix://relative.sock",
            "ssh://me@host",
            "https://host:2376",
            "tcp://",
            "npipe:////./pipe/docker_engine",
        ] {
            assert!(DockerHost::parse(bad).is_err(), "{bad}");
        }
        let err = DockerHost::parse("ssh://me@host").unwrap_err().to_string();
        assert!(err.contains("not supported"), "{err}");
    }
}
