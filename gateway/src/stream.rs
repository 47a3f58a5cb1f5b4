//! [`TunnelStream`]: a multiplexed stream to an agent that also holds its share of the
//! session's stream bound and its place in the `streams_open` gauge until dropped. It ends
//! when its session ends (yamux 0.14 does not wake streams of a locally closed connection;
//! `proto::mux::MuxStream` handles that for every user of the multiplexer).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use proto::mux::MuxStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

use super::metrics::GaugeGuard;

/// A stream to an agent's engine (see the stream contract in the module docs): write the
/// request first, then read the `StreamOpen` frame, then it is a raw byte pipe.
pub struct TunnelStream {
    inner: MuxStream,
    _permit: Option<OwnedSemaphorePermit>,
    _open: Option<GaugeGuard>,
}

impl TunnelStream {
    pub(crate) fn new(
        inner: MuxStream,
        permit: Option<OwnedSemaphorePermit>,
        open: Option<GaugeGuard>,
    ) -> Self {
        Self {
            inner,
            _permit: permit,
            _open: open,
        }
    }
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proto::mux::{self, Mode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stream whose session this side closes ends, instead of waiting forever.
    #[tokio::test]
    async fn a_locally_closed_session_ends_its_streams() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = mux::spawn(a, Mode::Client);
        let mut server = mux::spawn(b, Mode::Server);
        let mut s = TunnelStream::new(client.opener.open().await.unwrap(), None, None);
        s.write_all(b"hi").await.unwrap();
        let mut peer = server.inbound.recv().await.unwrap();
        let mut two = [0u8; 2];
        peer.read_exact(&mut two).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.map(|_| rest)
        });
        client.opener.close();
        // EOF, or an error from a window update yamux could no longer send: either way, an end.
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("the stream did not end with its session")
            .unwrap();
        assert!(ended.map_or(true, |rest| rest.is_empty()));
    }
}
