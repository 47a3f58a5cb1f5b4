//! What an attacker does to a public port, for tests and the attack bench: connections from a
//! chosen loopback source (per-source bounds apply to 127.0.0.2 apart from 127.0.0.1), TLS
//! that trusts anything, and waiting for the server to let a connection go.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

use crate::api::install_crypto;

/// A TCP connection to `addr` from `source` (any address of 127.0.0.0/8 works on loopback).
pub async fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// TLS over `tcp`, trusting any certificate (this is about bytes, not trust).
pub async fn tls_over(tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
    install_crypto();
    let config = edge_agent::tls::client_config([0; 32], true)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// A TLS connection to `addr` from `source`.
pub async fn tls_from(source: Ipv4Addr, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
    tls_over(connect_from(source, addr).await?).await
}

/// Reads (and drops) what the server sends until it closes the connection; how long that
/// took, or `None` if it was still open after `limit`.
pub async fn closed_within<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| start.elapsed())
}

/// Everything the server sends until it closes (at most `limit`), as text.
pub async fn answer_within<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A zstd snapshot bomb: a few hundred bytes that inflate into the codec frame of a snapshot
/// announcing `containers` empty containers (nine zero bytes each: six empty strings, no
/// names, labels or ports, created 0), which a bounded decoder refuses on the length prefix.
pub fn zstd_bomb(containers: u32) -> Vec<u8> {
    let empty = proto::codec::encode(&proto::snapshot::Snapshot::default()).expect("encode");
    // The frame ends with the five empty lists (containers, images, volumes, networks,
    // stacks): the containers' length goes where the first of them is.
    let at = empty.len() - 5;
    let mut frame = empty[..at].to_vec();
    frame.push(252);
    frame.extend_from_slice(&containers.to_le_bytes());
    frame.resize(frame.len() + 9 * containers as usize, 0);
    frame.extend_from_slice(&empty[at + 1..]);
    zstd::bulk::compress(&frame, 3).expect("zstd")
}
