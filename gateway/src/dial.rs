//! The control-plane side of dial sessions: TLS (pinned to the gateway certificate's
//! fingerprint) + `Hello::Dial` + yamux to a separate gateway: one session per `dial_addr`,
//! more (up to [`MAX_DIAL_SESSIONS`]) while the open ones are full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use proto::mux::{self, Mode, Opener};
use proto::tunnel::{DialRequest, Hello, HelloAnswer, HANDSHAKE_TIMEOUT};
use rustls::pki_types::ServerName;
use store::{EnvId, SharedTunnelStore, StoreError, TunnelLocation};
use tokio::net::TcpStream;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;

use crate::server::Gateway;
use crate::tls::pinned_client_config;
use crate::{
    OpenError, TunnelStream, DIAL_CONNECT_TIMEOUT, MAX_STREAMS_PER_SESSION, STORE_TIMEOUT,
};

/// Server name sent when a `dial_addr` host is neither an IP nor a valid DNS name; the
/// fingerprint is what is checked.
const FALLBACK_SERVER_NAME: &str = "edgeplane-gateway.invalid";

/// The server name to present for `addr` (`host:port`, `[v6]:port`).
fn server_name(addr: &str) -> ServerName<'static> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).unwrap_or_else(|_| {
        ServerName::try_from(FALLBACK_SERVER_NAME)
            .unwrap_or(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
    })
}

/// One dial session: its opener and the bound of its concurrent streams.
#[derive(Clone)]
struct DialSession {
    /// Tells sessions apart (a reconnect only replaces the session that failed).
    id: u64,
    opener: Opener,
    streams: Arc<Semaphore>,
}

/// Dial sessions one replica keeps to one gateway at most. Each carries
/// [`MAX_STREAMS_PER_SESSION`] streams at once, so together about 3,800: the Docker calls in
/// flight plus the idle engine connections kept for the next call, across every tunnel the
/// gateway holds (a fleet-wide operation touches hundreds of them at once).
pub const MAX_DIAL_SESSIONS: usize = 16;

/// The sessions to one `dial_addr`; its async lock is held while one is picked and while a
/// new one connects, so concurrent callers share a new session instead of each dialling.
type Slot = Arc<tokio::sync::Mutex<Vec<DialSession>>>;

/// Opens streams to agents whose tunnels other gateways hold (see the module docs).
pub struct Dialer {
    store: SharedTunnelStore,
    connector: Result<TlsConnector, String>,
    secret: OnceCell<[u8; 32]>,
    sessions: Mutex<HashMap<String, Slot>>,
    next_id: AtomicU64,
    local: Option<Arc<Gateway>>,
}

impl Dialer {
    /// `fingerprint`: SHA-256 of the gateways' certificate (the one in join keys). The cluster
    /// secret is read from `store` on first use, then cached.
    pub fn new(fingerprint: [u8; 32], store: SharedTunnelStore) -> Self {
        let connector = pinned_client_config(fingerprint)
            .map(TlsConnector::from)
            .map_err(|e| format!("tls client setup: {e}"));
        Self {
            store,
            connector,
            secret: OnceCell::new(),
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            local: None,
        }
    }

    /// Serves locations held by `gateway` (the embedded one) directly, without a dial session.
    pub fn with_local(mut self, gateway: Arc<Gateway>) -> Self {
        self.local = Some(gateway);
        self
    }

    /// Whether this process's own gateway holds a tunnel of `env` now.
    pub fn has_local_tunnel(&self, env: EnvId) -> bool {
        self.local
            .as_ref()
            .is_some_and(|gw| gw.tunnel_epoch(env).is_some())
    }

    /// Opens a stream to the agent of `loc` through its gateway (writing the `DialRequest`
    /// first); see the stream contract in the module docs. A session found dead is reopened
    /// once.
    pub async fn open_stream(&self, loc: &TunnelLocation) -> Result<TunnelStream, OpenError> {
        if let Some(gw) = &self.local {
            if gw.id() == loc.gateway_id {
                return gw.open_stream(loc.env, loc.epoch).await;
            }
        }
        let slot = self.slot(&loc.dial_addr);
        let (session, permit) = self.session(&slot, &loc.dial_addr, None).await?;
        match open_on(&session, permit, loc).await {
            Err(OpenError::Closed) => {
                let (session, permit) = self
                    .session(&slot, &loc.dial_addr, Some(session.id))
                    .await?;
                open_on(&session, permit, loc).await
            }
            other => other,
        }
    }

    /// Drops the sessions to `dial_addr` (if any), so the next stream dials anew. For callers
    /// that saw a stream time out: a gateway that vanished without closing its connection is
    /// otherwise only noticed when TCP gives up.
    pub fn discard_session(&self, dial_addr: &str) {
        let slot = self.sessions.lock().get(dial_addr).cloned();
        let Some(slot) = slot else {
            return;
        };
        // A slot locked right now is being (re)connected: that session is fresh anyway.
        let Ok(mut sessions) = slot.try_lock() else {
            return;
        };
        for s in sessions.drain(..) {
            s.opener.close();
        }
    }

    /// Dial sessions currently open, to every gateway (for tests and metrics).
    pub fn open_sessions(&self) -> usize {
        let slots: Vec<Slot> = self.sessions.lock().values().cloned().collect();
        slots
            .iter()
            .filter_map(|s| s.try_lock().ok())
            .map(|s| s.iter().filter(|s| !s.opener.is_closed()).count())
            .sum()
    }

    fn slot(&self, addr: &str) -> Slot {
        Arc::clone(self.sessions.lock().entry(addr.to_owned()).or_default())
    }

    /// A live session in `slot` with room for a stream, and that room: the first that has
    /// some (so streams gather on few sessions; the idle ones after it are closed), else a new
    /// session while there are fewer than [`MAX_DIAL_SESSIONS`], else [`OpenError::Busy`].
    /// `failed`: the session that just failed us, which is dropped even if it still looks
    /// alive.
    async fn session(
        &self,
        slot: &Slot,
        addr: &str,
        failed: Option<u64>,
    ) -> Result<(DialSession, OwnedSemaphorePermit), OpenError> {
        let mut sessions = slot.lock().await;
        sessions.retain(|s| {
            let keep = !s.opener.is_closed() && failed != Some(s.id);
            if !keep {
                s.opener.close();
            }
            keep
        });
        let mut picked = None;
        for (i, s) in sessions.iter().enumerate() {
            if let Ok(permit) = Arc::clone(&s.streams).try_acquire_owned() {
                picked = Some((i, s.clone(), permit));
                break;
            }
        }
        if let Some((i, session, permit)) = picked {
            // Sessions opened for a burst that carry nothing now go (those after the one
            // picked: streams gather on the first with room, so they are the spare ones).
            let mut at = 0;
            sessions.retain(|s| {
                at += 1;
                let spare = at - 1 > i && s.streams.available_permits() == MAX_STREAMS_PER_SESSION;
                if spare {
                    s.opener.close();
                }
                !spare
            });
            return Ok((session, permit));
        }
        if sessions.len() >= MAX_DIAL_SESSIONS {
            return Err(OpenError::Busy);
        }
        let session = self.connect(addr).await?;
        let permit = Arc::clone(&session.streams)
            .try_acquire_owned()
            .map_err(|_| OpenError::Busy)?;
        sessions.push(session.clone());
        Ok((session, permit))
    }

    async fn secret(&self) -> Result<[u8; 32], OpenError> {
        let secret = self
            .secret
            .get_or_try_init(|| async {
                match tokio::time::timeout(STORE_TIMEOUT, self.store.cluster_secret()).await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::unavailable(
                        "reading the cluster secret timed out",
                    )),
                }
            })
            .await?;
        Ok(*secret)
    }

    async fn connect(&self, addr: &str) -> Result<DialSession, OpenError> {
        let unreachable = |what: String| OpenError::GatewayUnreachable(format!("{addr}: {what}"));
        let connector = self
            .connector
            .as_ref()
            .map_err(|e| unreachable(e.clone()))?;
        let secret = self.secret().await?;
        let tcp = match tokio::time::timeout(DIAL_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(unreachable(format!("connect: {e}"))),
            Err(_) => {
                return Err(unreachable(format!(
                    "connect timed out after {} s",
                    DIAL_CONNECT_TIMEOUT.as_secs()
                )))
            }
        };
        let _ = tcp.set_nodelay(true);
        let handshake = async {
            let mut tls = connector
                .connect(server_name(addr), tcp)
                .await
                .map_err(|e| unreachable(format!("tls: {e}")))?;
            mux::write_frame(&mut tls, &Hello::Dial { secret })
                .await
                .map_err(|e| unreachable(format!("sending the dial hello: {e}")))?;
            let answer: HelloAnswer = mux::read_frame(&mut tls)
                .await
                .map_err(|e| unreachable(format!("reading the hello answer: {e}")))?;
            Ok::<_, OpenError>((tls, answer))
        };
        let (tls, answer) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| {
                unreachable(format!(
                    "handshake timed out after {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                ))
            })??;
        match answer {
            HelloAnswer::Accepted { gateway_id, .. } => {
                tracing::debug!(addr, gateway = %gateway_id, "dial session open");
            }
            HelloAnswer::Refused { code, message } => {
                return Err(OpenError::Refused(format!("{addr}: {code:?}: {message}")));
            }
        }
        // The gateway never opens streams towards us: its inbound queue is dropped, which
        // refuses any stream it would open.
        let session = mux::spawn(tls, Mode::Client);
        Ok(DialSession {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            opener: session.opener,
            streams: Arc::new(Semaphore::new(MAX_STREAMS_PER_SESSION)),
        })
    }
}

async fn open_on(
    session: &DialSession,
    permit: OwnedSemaphorePermit,
    loc: &TunnelLocation,
) -> Result<TunnelStream, OpenError> {
    let mut stream = session.opener.open().await?;
    let req = DialRequest {
        endpoint_id: loc.env,
        epoch: loc.epoch,
    };
    mux::write_frame(&mut stream, &req)
        .await
        .map_err(|_| OpenError::Closed)?;
    Ok(TunnelStream::new(stream, Some(permit), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("127.0.0.1:8000"),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:8000"),
            ServerName::IpAddress(_)
        ));
        assert_eq!(
            server_name("gw-1.example:8000"),
            ServerName::try_from("gw-1.example").unwrap_or(ServerName::IpAddress(
                std::net::Ipv4Addr::UNSPECIFIED.into()
            ))
        );
        assert_eq!(
            server_name("not a name:8000"),
            ServerName::try_from(FALLBACK_SERVER_NAME).unwrap_or(ServerName::IpAddress(
                std::net::Ipv4Addr::UNSPECIFIED.into()
            ))
        );
    }
}
