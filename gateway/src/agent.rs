//! An agent's hello, step by step: **admission** (is there room for one more tunnel?), the
//! **grant check** (a pure function of the grant taken from the store, the hello and the
//! clock), the **lease** (claiming the tunnel's location with a new epoch), the **mux set-up**
//! (`Accepted`, yamux with the gateway as client, the agent's control stream), and then
//! holding the tunnel until its control stream ends.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use proto::mux::{self, ControlEnd, Mode, MuxStream, Opener};
use proto::tunnel::{CloseReason, HelloAnswer, HelloRefusal};
use sha2::{Digest, Sha256};
use store::{Change, EnvId, StoreError, TunnelGrant, TunnelLocation};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use uuid::Uuid;

use crate::admission::Ticket;
use crate::metrics::{kind, result};
use crate::server::{store_call, EndReason, Gateway, Tunnel, WRITE_TIMEOUT};
use crate::Socket;
use crate::MAX_STREAMS_PER_SESSION;

/// Frames the gateway writes in a row leave as one TLS record of at most this much (a
/// record's plaintext limit): a small Docker call's header and body, one write instead of two.
const COALESCE_BYTES: usize = 16 * 1024;

const BAD_CREDENTIALS_MSG: &str = "unknown, already used or expired tunnel credentials";
const STORE_DOWN_MSG: &str = "tunnel gateway cannot reach its store; try again later";

/// What an agent's hello carries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AgentHello {
    pub env: EnvId,
    pub edge_id: Uuid,
    pub token: [u8; 32],
}

/// Why a grant does not open this tunnel (see [`check_grant`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantRefusal {
    /// Issued for another environment or another Edge ID.
    Mismatch,
    /// Its lifetime is over (the store's TTL normally removes it first).
    Expired,
}

/// The grant check: the credentials taken from the store open the tunnel of `env` for
/// `edge_id` only, and only before they expire. Pure: no store, no clock of its own.
pub fn check_grant(
    grant: &TunnelGrant,
    env: EnvId,
    edge_id: Uuid,
    now_ms: u64,
) -> Result<(), GrantRefusal> {
    if grant.env != env || grant.edge_id != edge_id {
        return Err(GrantRefusal::Mismatch);
    }
    if grant.expires_ms < now_ms {
        return Err(GrantRefusal::Expired);
    }
    Ok(())
}

/// A refused hello: the code and message the agent is told.
pub(crate) struct Refusal {
    pub code: HelloRefusal,
    pub message: &'static str,
}

impl Refusal {
    fn bad_credentials() -> Self {
        Self {
            code: HelloRefusal::BadCredentials,
            message: BAD_CREDENTIALS_MSG,
        }
    }

    fn store_down() -> Self {
        Self {
            code: HelloRefusal::Unavailable,
            message: STORE_DOWN_MSG,
        }
    }
}

impl From<GrantRefusal> for Refusal {
    fn from(r: GrantRefusal) -> Self {
        match r {
            GrantRefusal::Mismatch => Self {
                code: HelloRefusal::Mismatch,
                message: "tunnel credentials belong to another environment or edge id",
            },
            GrantRefusal::Expired => Self::bad_credentials(),
        }
    }
}

/// Why the mux set-up after `Accepted` failed.
enum SetupFailure {
    /// The `Accepted` answer could not be written: the agent left.
    AgentLeft,
    /// No control stream from the agent within the handshake timeout (or the gateway stops).
    NoControlStream(Opener),
}

impl Gateway {
    /// Admission: over its tunnel limit the gateway refuses before taking the credentials, so
    /// they stay usable on another gateway. A tunnel replacing one of the same environment is
    /// always admitted.
    pub(crate) fn admit_agent(&self, env: EnvId) -> Result<(), Refusal> {
        let map = self.tunnels();
        if map.len() >= self.config().max_tunnels && !map.contains_key(&env) {
            return Err(Refusal {
                code: HelloRefusal::Unavailable,
                message: "tunnel gateway at its tunnel limit; try another gateway or later",
            });
        }
        Ok(())
    }

    /// Takes the one-time grant of `token` out of the store (exactly one taker wins).
    async fn take_grant(&self, token: &[u8; 32]) -> Result<Option<TunnelGrant>, StoreError> {
        let token_hash: [u8; 32] = Sha256::digest(token).into();
        store_call(self.store().take_tunnel_grant(&token_hash)).await
    }

    /// The lease: records that this gateway holds `env`'s tunnel, under a new epoch.
    async fn claim(&self, env: EnvId) -> Result<TunnelLocation, StoreError> {
        let config = self.config();
        store_call(self.store().claim_tunnel(
            env,
            &config.id,
            &config.dial_addr,
            proto::clock::now_ms(),
            config.lease,
        ))
        .await
    }

    /// Serves one agent's hello to the end of its tunnel.
    pub(crate) async fn agent(
        self: Arc<Self>,
        tls: TlsStream<Socket>,
        peer: SocketAddr,
        hello: AgentHello,
        ticket: Ticket,
    ) {
        let AgentHello {
            env,
            edge_id,
            token,
        } = hello;
        if let Err(refusal) = self.admit_agent(env) {
            // Anyone can send a hello: refusals before the credentials are checked are counted
            // (`edgeplane_gateway_handshakes_total`) and logged at debug, never a log flood.
            tracing::debug!(env, %peer, max = self.config().max_tunnels, "tunnel refused: gateway at its tunnel limit");
            return self.refuse_agent(tls, refusal).await;
        }
        let grant = match self.take_grant(&token).await {
            Ok(Some(grant)) => grant,
            Ok(None) => {
                tracing::debug!(env, %peer, "tunnel refused: {BAD_CREDENTIALS_MSG}");
                return self.refuse_agent(tls, Refusal::bad_credentials()).await;
            }
            Err(e) => {
                tracing::warn!(env, %peer, error = %e, "tunnel refused: store unavailable");
                return self.refuse_agent(tls, Refusal::store_down()).await;
            }
        };
        if let Err(refusal) = check_grant(&grant, env, edge_id, proto::clock::now_ms()) {
            match refusal {
                GrantRefusal::Mismatch => {
                    // Edge IDs only at debug: half of what impersonates a bound agent.
                    tracing::warn!(
                        env,
                        grant_env = grant.env,
                        %peer,
                        "tunnel refused: credentials of another environment or edge id"
                    );
                    tracing::debug!(env, %edge_id, grant_edge_id = %grant.edge_id, "mismatch");
                }
                GrantRefusal::Expired => {
                    tracing::warn!(env, %peer, "tunnel refused: expired credentials");
                }
            }
            return self.refuse_agent(tls, refusal.into()).await;
        }
        let claimed_at = Instant::now();
        let location = match self.claim(env).await {
            Ok(location) => location,
            Err(e) => {
                tracing::warn!(env, %peer, error = %e, "tunnel refused: cannot record its location");
                return self.refuse_agent(tls, Refusal::store_down()).await;
            }
        };
        let epoch = location.epoch;
        let (opener, control) = match self.start_session(tls, epoch).await {
            Ok(session) => session,
            Err(failure) => {
                let opener = match failure {
                    SetupFailure::AgentLeft => {
                        tracing::info!(env, epoch, %peer, "agent left before its tunnel was accepted");
                        None
                    }
                    SetupFailure::NoControlStream(opener) => Some(opener),
                };
                if let Some(opener) = &opener {
                    opener.close();
                }
                self.tunnel_ended(
                    env,
                    epoch,
                    EndReason::NoControlStream,
                    claimed_at,
                    peer,
                    None,
                )
                .await;
                return;
            }
        };
        ticket.proved();
        self.hold(location, opener, control, claimed_at, peer).await;
    }

    async fn refuse_agent(&self, tls: TlsStream<Socket>, refusal: Refusal) {
        self.refuse(tls, kind::AGENT, refusal.code, refusal.message)
            .await;
    }

    /// The mux set-up: answers `Accepted`, starts yamux (the gateway is the client) and waits
    /// for the agent's control stream. Any further stream the agent opens is refused.
    async fn start_session(
        &self,
        mut tls: TlsStream<Socket>,
        epoch: u64,
    ) -> Result<(Opener, MuxStream), SetupFailure> {
        let accepted = HelloAnswer::Accepted {
            gateway_id: self.config().id.clone(),
            epoch,
        };
        let written =
            tokio::time::timeout(WRITE_TIMEOUT, mux::write_frame(&mut tls, &accepted)).await;
        // Counted as accepted either way: the credentials were good and are used up.
        self.metrics().handshake(kind::AGENT, result::ACCEPTED);
        if !matches!(written, Ok(Ok(()))) {
            return Err(SetupFailure::AgentLeft);
        }
        let mux::Session {
            opener,
            mut inbound,
        } = mux::spawn_coalescing(tls, Mode::Client, COALESCE_BYTES);
        let control = tokio::select! {
            () = self.stopping() => None,
            r = tokio::time::timeout(self.config().handshake_timeout, inbound.recv()) => r.ok().flatten(),
        };
        drop(inbound);
        match control {
            Some(control) => Ok((opener, control)),
            None => Err(SetupFailure::NoControlStream(opener)),
        }
    }

    /// Holds an accepted tunnel: registers it (a newer tunnel of the same environment here
    /// wins), announces it, pings its control stream until it ends, then cleans up.
    async fn hold(
        &self,
        location: TunnelLocation,
        opener: Opener,
        control: MuxStream,
        claimed_at: Instant,
        peer: SocketAddr,
    ) {
        let (env, epoch) = (location.env, location.epoch);
        let stop = self.stop_token().child_token();
        let reason = Arc::new(OnceLock::new());
        let tunnel = Tunnel {
            epoch,
            opener: opener.clone(),
            streams: Arc::new(Semaphore::new(MAX_STREAMS_PER_SESSION)),
            stop: stop.clone(),
            reason: Arc::clone(&reason),
            renewed: claimed_at,
        };
        if !self.insert_tunnel(env, tunnel) {
            opener.close();
            self.tunnel_ended(env, epoch, EndReason::Replaced, claimed_at, peer, None)
                .await;
            return;
        }
        self.publish(Change::TunnelOpened(location)).await;
        tracing::info!(env, epoch, %peer, gateway = %self.config().id, "tunnel open");

        // The control stream also ends when the session does; waiting for it alone (not for
        // the session) lets a `Closing` frame that arrived just before the end count.
        let end = mux::control_pinger(control, stop).await;
        let reason = end_reason(end, reason.get().copied());
        self.tunnel_ended(env, epoch, reason, claimed_at, peer, Some(&opener))
            .await;
    }
}

/// Why a held tunnel ended, from how its control stream ended (and, when this side ended it,
/// the reason given then).
fn end_reason(end: ControlEnd, local: Option<EndReason>) -> EndReason {
    match end {
        ControlEnd::PeerClosing(CloseReason::Inactive) => EndReason::Inactive,
        ControlEnd::PeerClosing(CloseReason::Shutdown) => EndReason::AgentShutdown,
        ControlEnd::Ended => EndReason::AgentGone,
        ControlEnd::Silent => EndReason::Silent,
        ControlEnd::Local => local.unwrap_or(EndReason::Shutdown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn grant(env: EnvId, edge_id: Uuid, expires_ms: u64) -> TunnelGrant {
        TunnelGrant {
            env,
            edge_id,
            expires_ms,
        }
    }

    #[test]
    fn a_grant_opens_only_its_own_tunnel_and_only_in_time() {
        let id = Uuid::new_v4();
        assert_eq!(check_grant(&grant(7, id, NOW), 7, id, NOW), Ok(()));
        assert_eq!(
            check_grant(&grant(7, id, NOW), 8, id, NOW),
            Err(GrantRefusal::Mismatch)
        );
        assert_eq!(
            check_grant(&grant(7, id, NOW), 7, Uuid::new_v4(), NOW),
            Err(GrantRefusal::Mismatch)
        );
        assert_eq!(
            check_grant(&grant(7, id, NOW - 1), 7, id, NOW),
            Err(GrantRefusal::Expired)
        );
        // A mismatch is reported before expiry: it names the bigger problem.
        assert_eq!(
            check_grant(&grant(7, id, 0), 8, id, NOW),
            Err(GrantRefusal::Mismatch)
        );
    }

    #[test]
    fn refusals_tell_the_agent_what_it_can_do() {
        let expired: Refusal = GrantRefusal::Expired.into();
        assert_eq!(expired.code, HelloRefusal::BadCredentials);
        let mismatch: Refusal = GrantRefusal::Mismatch.into();
        assert_eq!(mismatch.code, HelloRefusal::Mismatch);
    }

    #[test]
    fn end_reasons_follow_the_control_stream() {
        use ControlEnd::*;
        assert_eq!(
            end_reason(PeerClosing(CloseReason::Inactive), None),
            EndReason::Inactive
        );
        assert_eq!(
            end_reason(PeerClosing(CloseReason::Shutdown), None),
            EndReason::AgentShutdown
        );
        assert_eq!(end_reason(Ended, None), EndReason::AgentGone);
        assert_eq!(end_reason(Silent, None), EndReason::Silent);
        assert_eq!(end_reason(Local, None), EndReason::Shutdown);
        assert_eq!(
            end_reason(Local, Some(EndReason::LeaseLost)),
            EndReason::LeaseLost
        );
    }
}
