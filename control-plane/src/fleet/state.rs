//! The per-environment state machine: binding, proof and replay checks, the required flag and
//! the answer. Plain data and a clock passed in; the actor in `actor.rs` is a thin shell.

use std::collections::VecDeque;

use proto::async_mode::AsyncIntervals;
use proto::proof::{self, ProofKey, FRESHNESS_WINDOW_MS};
use proto::seal::SealKey;
use proto::token::JoinSecret;
use proto::wire::{CheckinRequest, EdgeStatus, SealedCredentials};
use uuid::Uuid;

use store::{EdgeMode, EnvId, Environment};

/// Accepted request tags remembered per environment to refuse exact replays inside the
/// freshness window. One agent at 5 s keeps ~24; the cap only bites for abusive senders.
const MAX_RECENT: usize = 256;
/// Include the server clock in an answer when the agent is off by more than this.
const REPORT_SKEW_MS: u64 = 2_000;
/// After credentials went out, no other agent of the environment (a swarm shares one Edge
/// ID) gets any for this long, unless the tunnel opened or closed meanwhile: exactly one
/// agent holds the tunnel, and another takes over if that one never connects.
pub const GRANT_WINDOW_MS: u64 = 10_000;

/// What an agent asked for, told by the route it posted to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckinKind {
    /// `/edge/c`: answer at once.
    Poll,
    /// `/edge/h`: an idle answer may be held for up to the interval, and is answered the
    /// moment the environment's tunnel is wanted.
    Held,
    /// `/edge/t`: the agent lost a tunnel in use and asks for credentials itself.
    AskTunnel,
    /// `/edge/a`: an async-mode tick (only for async environments; never a tunnel).
    Async,
}

/// Why a check-in was refused. Each has one wire code ([`Refusal::code`]); its status and
/// message are in the error table (`crate::error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// MAC does not verify under the join secret (and `AGENT_SECRET`, if set).
    BadProof,
    /// MAC verifies with the join secret alone: the agent lacks the right `AGENT_SECRET`.
    AgentSecretMismatch,
    /// Timestamp outside the freshness window; carries the server clock.
    ClockSkew { server_time_ms: u64 },
    /// This exact request was accepted before.
    Replay,
    /// Environment bound to another Edge ID.
    EdgeIdMismatch,
    /// An async environment cannot use the standard check-in, nor a standard one the async
    /// route.
    WrongMode,
    /// The environment is unbound and the request did not carry its Edge ID.
    EdgeIdRequired,
}

impl Refusal {
    /// The code the agent is told (its HTTP status is the error table's business).
    pub fn code(&self) -> proto::RefusalCode {
        use proto::RefusalCode as Code;
        match self {
            Self::BadProof => Code::BadProof,
            Self::AgentSecretMismatch => Code::AgentSecretMismatch,
            Self::ClockSkew { .. } => Code::ClockSkew,
            Self::Replay => Code::Replay,
            Self::EdgeIdMismatch => Code::EdgeIdMismatch,
            Self::WrongMode => Code::WrongMode,
            Self::EdgeIdRequired => Code::EdgeIdRequired,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// `Required` means: issue tunnel credentials with this answer (the actor does, then
    /// fills `tunnel`).
    pub status: EdgeStatus,
    pub interval_secs: u32,
    pub server_time_ms: Option<u64>,
    /// Nothing the agent does not already know: idle, its interval is current, its clock is
    /// fine and it is not a new process. Answered as `204 No Content`.
    pub unchanged: bool,
    pub tunnel: Option<SealedCredentials>,
    /// For async ticks: the environment's intervals (filled in by the actor).
    pub async_intervals: Option<AsyncIntervals>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Answer(Answer),
    /// Proof and freshness are good but the environment is unbound: bind this Edge ID in the
    /// store (atomically), feed the outcome to [`EnvState::set_binding`], then ask again.
    Bind(Uuid),
    Refuse(Refusal),
}

struct Keys {
    proof: ProofKey,
    /// The key without `AGENT_SECRET`, only to tell a wrong agent secret from a wrong key.
    without_agent_secret: Option<ProofKey>,
}

impl Keys {
    fn derive(secret: &JoinSecret, agent_secret: Option<&str>) -> Self {
        Self {
            proof: ProofKey::derive(secret, agent_secret),
            without_agent_secret: agent_secret.map(|_| ProofKey::derive(secret, None)),
        }
    }
}

pub struct EnvState {
    id: EnvId,
    mode: EdgeMode,
    interval_override: Option<u32>,
    /// Async ping, snapshot and command intervals set on the environment (else defaults).
    async_overrides: [Option<u32>; 3],
    keys: Keys,
    /// The join secret text `keys` were derived from: a bind is only valid while the store
    /// still holds this very secret (see `Store::bind_edge_id`).
    join_secret: String,
    edge_id: Option<Uuid>,
    last_checkin_ms: Option<u64>,
    recent: VecDeque<(u64, u64)>,
    /// An operator wants the tunnel until then (ms since epoch).
    wanted_until_ms: Option<u64>,
    /// Credentials went out; no others until then unless the tunnel opens or closes.
    grant_until_ms: Option<u64>,
    /// The epoch of the open tunnel, as the gateways reported it.
    open_epoch: Option<u64>,
}

/// A stored secret that does not decode is a broken record, not a client error.
#[derive(Debug, thiserror::Error)]
#[error("environment {id} has an unreadable join secret: {source}")]
pub struct BadRecord {
    pub id: EnvId,
    source: proto::TokenError,
}

impl EnvState {
    pub fn new(env: &Environment, agent_secret: Option<&str>) -> Result<Self, BadRecord> {
        let secret = JoinSecret::from_text(&env.join_secret)
            .map_err(|source| BadRecord { id: env.id, source })?;
        Ok(Self {
            id: env.id,
            mode: env.mode,
            interval_override: env.checkin_interval,
            async_overrides: [
                env.ping_interval,
                env.snapshot_interval,
                env.command_interval,
            ],
            keys: Keys::derive(&secret, agent_secret),
            join_secret: env.join_secret.clone(),
            edge_id: env.edge_id,
            last_checkin_ms: None,
            recent: VecDeque::new(),
            wanted_until_ms: None,
            grant_until_ms: None,
            open_epoch: None,
        })
    }

    /// Applies a reloaded record (after a PATCH or an association reset on any replica).
    pub fn reload(
        &mut self,
        env: &Environment,
        agent_secret: Option<&str>,
    ) -> Result<(), BadRecord> {
        let fresh = Self::new(env, agent_secret)?;
        if fresh.edge_id != self.edge_id {
            // A new binding generation: requests accepted under the old one are irrelevant.
            self.recent.clear();
        }
        self.mode = fresh.mode;
        self.interval_override = fresh.interval_override;
        self.async_overrides = fresh.async_overrides;
        self.keys = fresh.keys;
        self.join_secret = fresh.join_secret;
        self.edge_id = fresh.edge_id;
        Ok(())
    }

    pub fn id(&self) -> EnvId {
        self.id
    }

    /// The join secret this state verifies proofs with, as stored.
    pub fn join_secret(&self) -> &str {
        &self.join_secret
    }

    pub fn edge_id(&self) -> Option<Uuid> {
        self.edge_id
    }

    pub fn last_checkin_ms(&self) -> Option<u64> {
        self.last_checkin_ms
    }

    pub fn set_binding(&mut self, edge_id: Uuid) {
        self.edge_id = Some(edge_id);
    }

    /// Wanted for good (`true`) or not at all; tests and tools. Operators' requests use
    /// [`Self::want_tunnel`].
    pub fn set_required(&mut self, required: bool) {
        self.wanted_until_ms = required.then_some(u64::MAX);
        self.grant_until_ms = None;
    }

    /// An operator needs the tunnel until `until_ms`.
    pub fn want_tunnel(&mut self, until_ms: u64) {
        self.wanted_until_ms = Some(self.wanted_until_ms.map_or(until_ms, |u| u.max(until_ms)));
    }

    /// The gateways reported the tunnel open (with this epoch) or closed (`None`). Either way
    /// the pending grant is settled.
    pub fn set_open(&mut self, epoch: Option<u64>) {
        if epoch.is_some() {
            // Served: a later request wants it again explicitly.
            self.wanted_until_ms = None;
        }
        self.open_epoch = epoch;
        self.grant_until_ms = None;
    }

    pub fn open_epoch(&self) -> Option<u64> {
        self.open_epoch
    }

    /// Whether credentials should go out now to an agent waiting in a held check-in; if so,
    /// the grant window starts.
    pub fn take_grant(&mut self, now_ms: u64) -> bool {
        let wanted = self.wanted_until_ms.is_some_and(|u| u > now_ms);
        let pending = self.grant_until_ms.is_some_and(|g| g > now_ms);
        if wanted && self.open_epoch.is_none() && !pending {
            self.grant_until_ms = Some(now_ms + GRANT_WINDOW_MS);
            true
        } else {
            false
        }
    }

    /// The credentials of a grant could not be delivered: let another agent have them.
    pub fn release_grant(&mut self) {
        self.grant_until_ms = None;
    }

    /// The key that seals tunnel credentials for the bound agent.
    pub fn seal_key(&self) -> Option<SealKey> {
        let edge_id = self.edge_id?;
        let secret = JoinSecret::from_text(&self.join_secret).ok()?;
        Some(SealKey::derive(&secret, &edge_id))
    }

    pub fn interval_secs(&self, default_interval: u32) -> u32 {
        self.interval_override.unwrap_or(default_interval).max(1)
    }

    /// Async intervals: the environment's own, else `defaults` (ping, snapshot, command).
    pub fn async_intervals(&self, defaults: [u32; 3]) -> AsyncIntervals {
        let [ping, snapshot, command] = self.async_overrides;
        AsyncIntervals {
            ping: ping.unwrap_or(defaults[0]),
            snapshot: snapshot.unwrap_or(defaults[1]),
            command: command.unwrap_or(defaults[2]),
        }
    }

    /// Checks a signed upload (snapshot) from the bound agent: its proof, its Edge ID and its
    /// freshness. Uploads are idempotent (the newest snapshot wins), so no replay memory.
    pub fn verify_upload(
        &self,
        frame: &[u8],
        edge_id: Uuid,
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        match self.edge_id {
            None => return Err(Refusal::EdgeIdRequired),
            Some(bound) if bound != edge_id => return Err(Refusal::EdgeIdMismatch),
            Some(_) => {}
        }
        if !proof::verify(frame, &self.keys.proof, &edge_id, timestamp_ms) {
            return Err(Refusal::BadProof);
        }
        if proof::check_freshness(timestamp_ms, now_ms).is_err() {
            return Err(Refusal::ClockSkew {
                server_time_ms: now_ms,
            });
        }
        Ok(())
    }

    /// Decides on one plain check-in. `frame` is the signed request exactly as received.
    pub fn checkin(
        &mut self,
        req: &CheckinRequest,
        frame: &[u8],
        now_ms: u64,
        default_interval: u32,
    ) -> Verdict {
        self.checkin_as(CheckinKind::Poll, req, frame, now_ms, default_interval)
    }

    /// Decides on one check-in of any kind.
    pub fn checkin_as(
        &mut self,
        kind: CheckinKind,
        req: &CheckinRequest,
        frame: &[u8],
        now_ms: u64,
        default_interval: u32,
    ) -> Verdict {
        // Steady-state requests omit the Edge ID; the MAC covers the bound one.
        let Some(claimed) = req.edge_id.or(self.edge_id) else {
            return Verdict::Refuse(Refusal::EdgeIdRequired);
        };
        let timestamp_ms =
            proto::wire::request_timestamp(req.timestamp_lo, req.timestamp_hi, now_ms);
        if !proof::verify(frame, &self.keys.proof, &claimed, timestamp_ms) {
            let lacks_agent_secret = self
                .keys
                .without_agent_secret
                .as_ref()
                .is_some_and(|k| proof::verify(frame, k, &claimed, timestamp_ms));
            return Verdict::Refuse(if lacks_agent_secret {
                Refusal::AgentSecretMismatch
            } else {
                Refusal::BadProof
            });
        }
        if proof::check_freshness(timestamp_ms, now_ms).is_err() {
            return Verdict::Refuse(Refusal::ClockSkew {
                server_time_ms: now_ms,
            });
        }
        let route_mode = if kind == CheckinKind::Async {
            EdgeMode::Async
        } else {
            EdgeMode::Standard
        };
        if self.mode != route_mode {
            return Verdict::Refuse(Refusal::WrongMode);
        }
        let tag = proof::replay_tag(frame);
        if self.recent.iter().any(|&(_, t)| t == tag) {
            return Verdict::Refuse(Refusal::Replay);
        }
        match self.edge_id {
            None => return Verdict::Bind(claimed),
            Some(bound) if bound != claimed => return Verdict::Refuse(Refusal::EdgeIdMismatch),
            Some(_) => {}
        }
        self.remember(timestamp_ms, tag, now_ms);
        self.last_checkin_ms = Some(self.last_checkin_ms.map_or(now_ms, |t| t.max(now_ms)));
        // An agent that lost its tunnel knows better than our view of it (its gateway may be
        // dead and unable to say so); otherwise one grant at a time, and none while open.
        let grant = match kind {
            CheckinKind::AskTunnel => {
                self.grant_until_ms = Some(now_ms + GRANT_WINDOW_MS);
                true
            }
            CheckinKind::Async => false,
            CheckinKind::Poll | CheckinKind::Held => self.take_grant(now_ms),
        };
        let status = if grant {
            EdgeStatus::Required
        } else {
            EdgeStatus::Idle
        };
        let interval_secs = self.interval_secs(default_interval);
        let server_time_ms = (timestamp_ms.abs_diff(now_ms) > REPORT_SKEW_MS).then_some(now_ms);
        Verdict::Answer(Answer {
            status,
            interval_secs,
            server_time_ms,
            unchanged: status == EdgeStatus::Idle
                && server_time_ms.is_none()
                && interval_secs == req.interval_secs
                && req.agent.is_none()
                && kind != CheckinKind::Async,
            tunnel: None,
            async_intervals: None,
        })
    }

    fn remember(&mut self, ts: u64, tag: u64, now_ms: u64) {
        // Anything older than the window fails the freshness check anyway.
        let horizon = now_ms.saturating_sub(FRESHNESS_WINDOW_MS);
        self.recent.retain(|&(t, _)| t >= horizon);
        if self.recent.len() >= MAX_RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((ts, tag));
    }
}

/// The status an operator sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    Up,
    Down,
    Never,
}

/// `up` while `now - last <= 2 * interval + 20 s`.
pub fn liveness(last_checkin_ms: Option<u64>, interval_secs: u32, now_ms: u64) -> Liveness {
    match last_checkin_ms {
        None => Liveness::Never,
        Some(last) => {
            let grace_ms = (2 * u64::from(interval_secs) + 20) * 1000;
            if now_ms.saturating_sub(last) <= grace_ms {
                Liveness::Up
            } else {
                Liveness::Down
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn env(edge_id: Option<Uuid>) -> (Environment, JoinSecret) {
        let secret = JoinSecret::generate();
        let env = Environment {
            id: 7,
            name: "kiosk".into(),
            mode: EdgeMode::Standard,
            checkin_interval: None,
            ping_interval: None,
            snapshot_interval: None,
            command_interval: None,
            group_id: None,
            tag_ids: vec![],
            env_vars: vec![],
            allow_self_signed: false,
            join_secret: secret.to_text(),
            edge_id,
            created_at_ms: 0,
        };
        (env, secret)
    }

    /// A first-of-process style request: carries the Edge ID, asks with interval 5.
    fn signed(
        secret: &JoinSecret,
        agent_secret: Option<&str>,
        edge_id: Uuid,
        ts: u64,
    ) -> (CheckinRequest, Vec<u8>) {
        signed_as(secret, agent_secret, edge_id, Some(edge_id), ts)
    }

    fn signed_as(
        secret: &JoinSecret,
        agent_secret: Option<&str>,
        signer: Uuid,
        sent: Option<Uuid>,
        ts: u64,
    ) -> (CheckinRequest, Vec<u8>) {
        let req = CheckinRequest {
            endpoint_id: 7,
            edge_id: sent,
            timestamp_lo: proto::wire::timestamp_lo(ts),
            timestamp_hi: sent.map(|_| (ts >> 32) as u32),
            interval_secs: 5,
            agent: None,
        };
        let frame =
            proof::sign(&req, &ProofKey::derive(secret, agent_secret), &signer, ts).unwrap();
        (req, frame)
    }

    fn idle(interval: u32) -> Verdict {
        Verdict::Answer(Answer {
            status: EdgeStatus::Idle,
            interval_secs: interval,
            server_time_ms: None,
            unchanged: interval == 5,
            tunnel: None,
            async_intervals: None,
        })
    }

    #[test]
    fn first_checkin_binds_then_answers() {
        let (e, secret) = env(None);
        let mut s = EnvState::new(&e, None).unwrap();
        let id = Uuid::new_v4();
        let (req, frame) = signed(&secret, None, id, NOW);
        assert_eq!(s.checkin(&req, &frame, NOW, 5), Verdict::Bind(id));
        assert_eq!(
            s.last_checkin_ms(),
            None,
            "nothing recorded before the binding holds"
        );
        s.set_binding(id);
        assert_eq!(s.checkin(&req, &frame, NOW, 5), idle(5));
        assert_eq!(s.last_checkin_ms(), Some(NOW));
        assert_eq!(s.edge_id(), Some(id));
    }

    #[test]
    fn other_edge_id_is_refused_and_changes_nothing() {
        let bound = Uuid::new_v4();
        let (e, secret) = env(Some(bound));
        let mut s = EnvState::new(&e, None).unwrap();
        let (req, frame) = signed(&secret, None, Uuid::new_v4(), NOW);
        assert_eq!(
            s.checkin(&req, &frame, NOW, 5),
            Verdict::Refuse(Refusal::EdgeIdMismatch)
        );
        assert_eq!(s.edge_id(), Some(bound));
        assert_eq!(s.last_checkin_ms(), None);
    }

    #[test]
    fn wrong_secret_and_agent_secret() {
        let id = Uuid::new_v4();
        let (e, secret) = env(Some(id));
        let mut s = EnvState::new(&e, Some("shh")).unwrap();
        let (req, frame) = signed(&JoinSecret::generate(), Some("shh"), id, NOW);
        assert_eq!(
            s.checkin(&req, &frame, NOW, 5),
            Verdict::Refuse(Refusal::BadProof)
        );
        let (req, frame) = signed(&secret, None, id, NOW);
        assert_eq!(
            s.checkin(&req, &frame, NOW, 5),
            Verdict::Refuse(Refusal::AgentSecretMismatch)
        );
        let (req, frame) = signed(&secret, Some("other"), id, NOW);
        assert_eq!(
            s.checkin(&req, &frame, NOW, 5),
            Verdict::Refuse(Refusal::BadProof)
        );
        let (req, frame) = signed(&secret, Some("shh"), id, NOW);
        assert_eq!(s.checkin(&req, &frame, NOW, 5), idle(5));
    }

    #[test]
    fn replay_and_skew() {
        let id = Uuid::new_v4();
        let (e, secret) = env(Some(id));
        let mut s = EnvState::new(&e, None).unwrap();
        let (req, frame) = signed(&secret, None, id, NOW);
        assert_eq!(s.checkin(&req, &frame, NOW, 5), idle(5));
        assert_eq!(
            s.checkin(&req, &frame, NOW + 10, 5),
            Verdict::Refuse(Refusal::Replay)
        );
        // Outside the window a replay is a skew refusal, which tells the server time.
        let late = NOW + FRESHNESS_WINDOW_MS + 1;
        assert_eq!(
            s.checkin(&req, &frame, late, 5),
            Verdict::Refuse(Refusal::ClockSkew {
                server_time_ms: late
            })
        );
        // A skew within the window is accepted but reported.
        let (req, frame) = signed(&secret, None, id, NOW + 5_000);
        assert_eq!(
            s.checkin(&req, &frame, NOW, 5),
            Verdict::Answer(Answer {
                status: EdgeStatus::Idle,
                interval_secs: 5,
                server_time_ms: Some(NOW),
                unchanged: false,
                tunnel: None,
                async_intervals: None,
            })
        );
    }

    #[test]
    fn a_frame_replayed_one_timestamp_wrap_later_fails_the_proof() {
        let id = Uuid::new_v4();
        let (e, secret) = env(Some(id));
        let mut s = EnvState::new(&e, None).unwrap();
        // A steady frame (no high bits, no Edge ID) accepted now ...
        let (req, frame) = signed_as(&secret, None, id, None, NOW);
        assert_eq!(s.checkin(&req, &frame, NOW, 5), idle(5));
        // ... replayed when the low 32 bits come round again: same bytes, other instant.
        let later = NOW + (1 << 32);
        assert_eq!(
            s.checkin(&req, &frame, later, 5),
            Verdict::Refuse(Refusal::BadProof)
        );
    }

    #[test]
    fn a_far_off_clock_is_told_the_time_not_refused_as_bad_proof() {
        let id = Uuid::new_v4();
        let (e, secret) = env(Some(id));
        let mut s = EnvState::new(&e, None).unwrap();
        // A device that booted in 1970: its first request carries the high bits.
        let (req, frame) = signed(&secret, None, id, 5_000);
        assert_eq!(
            s.checkin(&req, &frame, NOW, 5),
            Verdict::Refuse(Refusal::ClockSkew {
                server_time_ms: NOW
            })
        );
    }

    #[test]
    fn recent_set_is_bounded_and_pruned() {
        let id = Uuid::new_v4();
        let (e, secret) = env(Some(id));
        let mut s = EnvState::new(&e, None).unwrap();
        for i in 0..200 {
            let (req, frame) = signed(&secret, None, id, NOW + i);
            assert_eq!(s.checkin(&req, &frame, NOW + i, 5), idle(5));
        }
        assert!(s.recent.len() <= MAX_RECENT);
        let later = NOW + 2 * FRESHNESS_WINDOW_MS;
        let (req, frame) = signed(&secret, None, id, later);
        s.checkin(&req, &frame, later, 5);
        assert_eq!(s.recent.len(), 1);
    }

    #[test]
    fn required_interval_mode_and_reload() {
        let id = Uuid::new_v4();
        let (mut e, secret) = env(Some(id));
        e.checkin_interval = Some(30);
        let mut s = EnvState::new(&e, None).unwrap();
        s.set_required(true);
        let (req, frame) = signed(&secret, None, id, NOW);
        assert_eq!(
            s.checkin(&req, &frame, NOW, 5),
            Verdict::Answer(Answer {
                status: EdgeStatus::Required,
                interval_secs: 30,
                server_time_ms: None,
                unchanged: false,
                tunnel: None,
                async_intervals: None,
            })
        );
        // Association reset: new secret, no binding. Old key is refused; new agent binds.
        let new_secret = JoinSecret::generate();
        e.join_secret = new_secret.to_text();
        e.edge_id = None;
        e.mode = EdgeMode::Async;
        s.reload(&e, None).unwrap();
        let (req, frame) = signed(&secret, None, id, NOW + 1);
        assert_eq!(
            s.checkin(&req, &frame, NOW + 1, 5),
            Verdict::Refuse(Refusal::BadProof)
        );
        let (req, frame) = signed(&new_secret, None, id, NOW + 2);
        assert_eq!(
            s.checkin(&req, &frame, NOW + 2, 5),
            Verdict::Refuse(Refusal::WrongMode)
        );
    }

    #[test]
    fn steady_requests_omit_the_edge_id_which_the_mac_still_covers() {
        let id = Uuid::new_v4();
        let (e, secret) = env(None);
        let mut s = EnvState::new(&e, None).unwrap();
        // Unbound and no Edge ID sent: nothing to bind to.
        let (req, frame) = signed_as(&secret, None, id, None, NOW);
        assert_eq!(
            s.checkin(&req, &frame, NOW, 5),
            Verdict::Refuse(Refusal::EdgeIdRequired)
        );
        s.set_binding(id);
        // Bound: the steady request without the ID verifies against the bound one.
        assert_eq!(s.checkin(&req, &frame, NOW, 5), idle(5));
        // An impostor omitting its ID fails the proof (its MAC covers its own ID) ...
        let other = Uuid::new_v4();
        let (req, frame) = signed_as(&secret, None, other, None, NOW + 1);
        assert_eq!(
            s.checkin(&req, &frame, NOW + 1, 5),
            Verdict::Refuse(Refusal::BadProof)
        );
        // ... and sending it is refused as a mismatch.
        let (req, frame) = signed_as(&secret, None, other, Some(other), NOW + 2);
        assert_eq!(
            s.checkin(&req, &frame, NOW + 2, 5),
            Verdict::Refuse(Refusal::EdgeIdMismatch)
        );
        // Claiming the bound ID without the matching signer fails too.
        let (req, frame) = signed_as(&secret, None, other, Some(id), NOW + 3);
        assert_eq!(
            s.checkin(&req, &frame, NOW + 3, 5),
            Verdict::Refuse(Refusal::BadProof)
        );
    }

    #[test]
    fn unchanged_only_when_the_agent_knows_everything() {
        let id = Uuid::new_v4();
        let (e, secret) = env(Some(id));
        let mut s = EnvState::new(&e, None).unwrap();
        let mut ts = NOW;
        let mut ask = |s: &mut EnvState, interval: u32, info: bool, default: u32| {
            ts += 1;
            let mut req = CheckinRequest {
                endpoint_id: 7,
                edge_id: None,
                timestamp_lo: proto::wire::timestamp_lo(ts),
                timestamp_hi: None,
                interval_secs: interval,
                agent: None,
            };
            if info {
                req.agent = Some(proto::wire::AgentInfo {
                    version: "t".into(),
                    platform: proto::wire::Platform::Docker,
                    hostname: "h".into(),
                });
            }
            let frame = proof::sign(&req, &ProofKey::derive(&secret, None), &id, ts).unwrap();
            match s.checkin(&req, &frame, ts, default) {
                Verdict::Answer(a) => a.unchanged,
                other => panic!("{other:?}"),
            }
        };
        assert!(ask(&mut s, 5, false, 5));
        assert!(
            !ask(&mut s, 5, true, 5),
            "a new process gets the full answer"
        );
        assert!(!ask(&mut s, 5, false, 9), "a new interval is sent");
        s.set_required(true);
        assert!(!ask(&mut s, 5, false, 5), "required is sent");
    }

    fn status_of(v: Verdict) -> EdgeStatus {
        match v {
            Verdict::Answer(a) => a.status,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn one_grant_at_a_time_until_the_window_passes_or_the_tunnel_settles() {
        let id = Uuid::new_v4();
        let (e, secret) = env(Some(id));
        let mut s = EnvState::new(&e, None).unwrap();
        let mut ts = NOW;
        let mut poll = |s: &mut EnvState, kind: CheckinKind, now: u64| {
            ts = ts.max(now) + 1;
            let (req, frame) = signed(&secret, None, id, ts);
            status_of(s.checkin_as(kind, &req, &frame, ts, 5))
        };
        assert_eq!(poll(&mut s, CheckinKind::Held, NOW), EdgeStatus::Idle);
        s.want_tunnel(NOW + 15_000);
        // Swarm agents share the Edge ID: the first gets credentials, the others wait.
        assert_eq!(poll(&mut s, CheckinKind::Held, NOW), EdgeStatus::Required);
        assert_eq!(poll(&mut s, CheckinKind::Held, NOW), EdgeStatus::Idle);
        assert!(!s.take_grant(NOW + 10));
        // The first never connected: after the window another one gets fresh credentials.
        assert_eq!(
            poll(&mut s, CheckinKind::Held, NOW + GRANT_WINDOW_MS + 1),
            EdgeStatus::Required
        );
        // Open: nobody gets credentials, and the wish is served.
        s.set_open(Some(3));
        assert_eq!(s.open_epoch(), Some(3));
        assert_eq!(poll(&mut s, CheckinKind::Held, NOW), EdgeStatus::Idle);
        // Closed later: not wanted any more, so still idle ...
        s.set_open(None);
        assert_eq!(poll(&mut s, CheckinKind::Held, NOW), EdgeStatus::Idle);
        // ... until an operator wants it again.
        s.want_tunnel(NOW + 30_000);
        assert!(s.take_grant(NOW + 20));
        s.release_grant();
        assert!(
            s.take_grant(NOW + 21),
            "an undelivered grant frees the slot"
        );
        // A wish that expired is no wish.
        let mut s = EnvState::new(&e, None).unwrap();
        s.want_tunnel(NOW);
        assert!(!s.take_grant(NOW + 1));
    }

    #[test]
    fn an_agent_that_lost_its_tunnel_gets_credentials_even_if_it_looks_open() {
        let id = Uuid::new_v4();
        let (e, secret) = env(Some(id));
        let mut s = EnvState::new(&e, None).unwrap();
        s.set_open(Some(9));
        let (req, frame) = signed(&secret, None, id, NOW);
        assert_eq!(
            status_of(s.checkin_as(CheckinKind::AskTunnel, &req, &frame, NOW, 5)),
            EdgeStatus::Required
        );
        assert!(s.seal_key().is_some());
        let unbound = EnvState::new(&env(None).0, None).unwrap();
        assert!(unbound.seal_key().is_none());
    }

    #[test]
    fn liveness_rule() {
        assert_eq!(liveness(None, 5, NOW), Liveness::Never);
        assert_eq!(liveness(Some(NOW - 30_000), 5, NOW), Liveness::Up);
        assert_eq!(liveness(Some(NOW - 30_001), 5, NOW), Liveness::Down);
        assert_eq!(liveness(Some(NOW + 1_000), 5, NOW), Liveness::Up);
    }

    proptest::proptest! {
        /// Whatever sequence of agents and clocks, an environment bound to one Edge ID never
        /// accepts another, and nothing but a verified, fresh, bound request is answered.
        #[test]
        fn only_bound_fresh_verified_requests_are_answered(
            steps in proptest::collection::vec((0u8..3, 0u8..3, -90_000i64..90_000), 1..40)
        ) {
            let ids = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
            let (e, secret) = env(None);
            let wrong = JoinSecret::generate();
            let mut s = EnvState::new(&e, None).unwrap();
            let mut bound: Option<Uuid> = None;
            for (i, (who, key, skew)) in steps.into_iter().enumerate() {
                let now = NOW + i as u64 * 5_000;
                let ts = (now as i64 + skew) as u64;
                let k = if key == 0 { &wrong } else { &secret };
                let (req, frame) = signed(k, None, ids[who as usize], ts);
                match s.checkin(&req, &frame, now, 5) {
                    Verdict::Bind(id) => {
                        proptest::prop_assert!(bound.is_none());
                        bound = Some(id);
                        s.set_binding(id);
                    }
                    Verdict::Answer(_) => {
                        proptest::prop_assert!(key != 0);
                        proptest::prop_assert!(skew.unsigned_abs() <= FRESHNESS_WINDOW_MS);
                        proptest::prop_assert_eq!(Some(ids[who as usize]), bound);
                    }
                    Verdict::Refuse(_) => {}
                }
                proptest::prop_assert_eq!(s.edge_id(), bound);
            }
        }
    }
}
