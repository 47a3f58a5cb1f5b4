//! Dial sessions served: a control-plane replica proves the cluster secret, then each stream it
//! opens names a tunnel (`DialRequest`) and is spliced onto a new stream of that tunnel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::mux::{self, Mode};
use proto::tunnel::{DialRequest, HelloAnswer, HelloRefusal, StreamOpen, StreamRefusal};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt};
use tokio_rustls::server::TlsStream;

use crate::admission::Ticket;
use crate::metrics::{kind, result, GaugeGuard};
use crate::server::{Gateway, WRITE_TIMEOUT};
use crate::Socket;
use crate::{OpenError, TunnelStream, DIAL_REQUEST_TIMEOUT};

impl Gateway {
    pub(crate) async fn dial_session(
        self: Arc<Self>,
        mut tls: TlsStream<Socket>,
        peer: SocketAddr,
        secret: [u8; 32],
        ticket: Ticket,
    ) {
        let expected = match self.cluster_secret().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "dial session refused: cannot read the cluster secret");
                self.refuse(
                    tls,
                    kind::DIAL,
                    HelloRefusal::Unavailable,
                    "tunnel gateway cannot reach its store; try again later",
                )
                .await;
                return;
            }
        };
        if !bool::from(secret.ct_eq(&expected)) {
            tracing::warn!(%peer, "dial session refused: wrong cluster secret");
            self.refuse(
                tls,
                kind::DIAL,
                HelloRefusal::NotAuthorized,
                "wrong cluster secret (is this replica on the same store as the gateway?)",
            )
            .await;
            return;
        }
        let accepted = HelloAnswer::Accepted {
            gateway_id: self.config.id.clone(),
            epoch: 0,
        };
        match tokio::time::timeout(WRITE_TIMEOUT, mux::write_frame(&mut tls, &accepted)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
        self.metrics.handshake(kind::DIAL, result::ACCEPTED);
        ticket.proved();
        let _open = GaugeGuard::new(&self.metrics.dial_sessions_open);
        tracing::debug!(%peer, "dial session open");
        let mux::Session {
            opener,
            mut inbound,
        } = mux::spawn(tls, Mode::Server);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => {
                    opener.close();
                    break;
                }
                stream = inbound.recv() => match stream {
                    Some(stream) => {
                        let gw = Arc::clone(&self);
                        let stream = TunnelStream::new(stream, None, None);
                        self.spawn_tracked(gw.dial_stream(stream, peer));
                    }
                    None => break,
                },
            }
        }
        tracing::debug!(%peer, "dial session closed");
    }

    /// One stream of a dial session: `DialRequest`, then spliced onto a stream of the tunnel.
    async fn dial_stream(self: Arc<Self>, mut stream: TunnelStream, peer: SocketAddr) {
        let req: DialRequest =
            match tokio::time::timeout(DIAL_REQUEST_TIMEOUT, mux::read_frame(&mut stream)).await {
                Ok(Ok(req)) => req,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "dial stream without a valid request");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "dial stream sent no request in time");
                    return;
                }
            };
        let mut agent = match self.open_stream(req.endpoint_id, req.epoch).await {
            Ok(agent) => agent,
            Err(e) => {
                let code = match e {
                    OpenError::Busy => StreamRefusal::TooManyStreams,
                    _ => StreamRefusal::NoTunnel,
                };
                tracing::debug!(env = req.endpoint_id, epoch = req.epoch, error = %e, "dial stream refused");
                let refusal = StreamOpen::Refused {
                    code,
                    message: format!("gateway {}: {e}", self.config.id),
                };
                let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
                    mux::write_frame(&mut stream, &refusal).await?;
                    stream.shutdown().await
                })
                .await;
                return;
            }
        };
        // The agent hears of a stream with its first frame (yamux sets SYN on it), and a
        // close sent before any byte carries no SYN: the agent never learns of that stream and
        // never closes it, so waiting for it would hold the stream and its place on the
        // tunnel for good. A stream the dialer gives up on before its first byte ends here.
        let mut first = [0u8; 4096];
        let n = match stream.read(&mut first).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if agent.write_all(&first[..n]).await.is_err() {
            return;
        }
        if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut agent).await {
            tracing::debug!(env = req.endpoint_id, error = %e, "dial stream ended with an error");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.shutdown().await;
            let _ = agent.shutdown().await;
        })
        .await;
    }
}
