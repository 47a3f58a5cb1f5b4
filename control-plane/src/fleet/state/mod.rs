//! The per-environment state machine: binding, proof and replay checks, the required flag and
//! the answer; held check-ins and who gets tunnel credentials ([`held`]). Plain data and a
//! clock passed in; the actor in `actor.rs` is a thin shell.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::RwLock;

pub mod held;

use proto::async_mode::AsyncIntervals;
use proto::proof::{self, ProofKey, Route, FRESHNESS_WINDOW_MS};
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

impl CheckinKind {
    /// The route whose MAC a check-in of this kind must carry: a frame signed for another
    /// route (a held check-in replayed to `/edge/t`, say) is `bad_proof`.
    pub fn route(self) -> Route {
        match self {
            CheckinKind::Poll => Route::Checkin,
            CheckinKind::Held => Route::Held,
            CheckinKind::AskTunnel => Route::Tunnel,
            CheckinKind::Async => Route::Async,
        }
    }
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
    /// The desired-state digest, while the agent has not acknowledged it (filled in with
    /// the environment's shared state, [`super::actor::Env::answer`]).
    pub desired: Option<u64>,
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

/// What a request can be judged by before it reaches the environment's actor: who claims to
/// send it, whether its MAC holds under the environment's current keys, and whether its clock
/// is inside the window. The actor's state keeps it current (reloads, binding); the fleet
/// holds a clone of the `Arc` and checks every request with it *before* the request counts
/// against the environment's in-flight bound, so frames of anyone without the join secret can
/// never make the real agent `busy`. The actor checks again with the same code.
pub struct Gate {
    keys: Keys,
    edge_id: Option<Uuid>,
    /// Bumped by every reload and binding: a request checked under an older generation is
    /// judged again.
    generation: u64,
}

/// The gate of one environment, shared by its actor and the fleet.
pub type SharedGate = Arc<RwLock<Gate>>;

impl Gate {
    /// See [`Gate::generation`](Self): what a check was made under.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A check-in of `kind`: the claimed Edge ID (sent, or the bound one), its MAC (which
    /// covers the route it came in on), its clock.
    pub fn check_checkin(
        &self,
        kind: CheckinKind,
        req: &CheckinRequest,
        frame: &[u8],
        now_ms: u64,
    ) -> Result<Uuid, Refusal> {
        // Steady-state requests omit the Edge ID; the MAC covers the bound one.
        let claimed = req
            .edge_id
            .or(self.edge_id)
            .ok_or(Refusal::EdgeIdRequired)?;
        let timestamp_ms =
            proto::wire::request_timestamp(req.timestamp_lo, req.timestamp_hi, now_ms);
        let route = kind.route();
        if !proof::verify(frame, route, &self.keys.proof, &claimed, timestamp_ms) {
            let lacks_agent_secret = self
                .keys
                .without_agent_secret
                .as_ref()
                .is_some_and(|k| proof::verify(frame, route, k, &claimed, timestamp_ms));
            return Err(if lacks_agent_secret {
                Refusal::AgentSecretMismatch
            } else {
                Refusal::BadProof
            });
        }
        fresh(timestamp_ms, now_ms)?;
        Ok(claimed)
    }

    /// A signed upload (snapshot) from the bound agent: its Edge ID, its MAC, its clock.
    /// Uploads are idempotent (the newest snapshot wins), so there is no replay memory.
    pub fn check_upload(
        &self,
        frame: &[u8],
        edge_id: Uuid,
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        self.check_signed(Route::Snapshot, frame, edge_id, timestamp_ms, now_ms)
    }

    /// A signed request to `route` that carries its Edge ID and full timestamp (uploads,
    /// desired-state fetches, stack reports): binding, proof, freshness.
    pub fn check_signed(
        &self,
        route: Route,
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
        if !proof::verify(frame, route, &self.keys.proof, &edge_id, timestamp_ms) {
            return Err(Refusal::BadProof);
        }
        fresh(timestamp_ms, now_ms)
    }
}

fn fresh(timestamp_ms: u64, now_ms: u64) -> Result<(), Refusal> {
    proof::check_freshness(timestamp_ms, now_ms).map_err(|_| Refusal::ClockSkew {
        server_time_ms: now_ms,
    })
}

pub struct EnvState {
    id: EnvId,
    mode: EdgeMode,
    interval_override: Option<u32>,
    /// Async ping, snapshot and command intervals set on the environment (else defaults).
    async_overrides: [Option<u32>; 3],
    /// The keys and the bound Edge ID, shared with the fleet.
    gate: SharedGate,
    /// The join secret text the keys were derived from: a bind is only valid while the store
    /// still holds this very secret (see `Store::bind_edge_id`).
    join_secret: String,
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
            gate: Arc::new(RwLock::new(Gate {
                keys: Keys::derive(&secret, agent_secret),
                edge_id: env.edge_id,
                generation: 0,
            })),
            join_secret: env.join_secret.clone(),
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
        let secret = JoinSecret::from_text(&env.join_secret)
            .map_err(|source| BadRecord { id: env.id, source })?;
        if env.edge_id != self.edge_id() {
            // A new binding generation: requests accepted under the old one are irrelevant.
            self.recent.clear();
        }
        self.mode = env.mode;
        self.interval_override = env.checkin_interval;
        self.async_overrides = [
            env.ping_interval,
            env.snapshot_interval,
            env.command_interval,
        ];
        self.join_secret.clone_from(&env.join_secret);
        // In place: the fleet holds this very gate.
        let mut gate = self.gate.write();
        *gate = Gate {
            keys: Keys::derive(&secret, agent_secret),
            edge_id: env.edge_id,
            generation: gate.generation + 1,
        };
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
        self.gate.read().edge_id
    }

    /// The gate the fleet checks requests with before they reach the actor.
    pub fn gate(&self) -> SharedGate {
        Arc::clone(&self.gate)
    }

    pub fn last_checkin_ms(&self) -> Option<u64> {
        self.last_checkin_ms
    }

    pub fn set_binding(&mut self, edge_id: Uuid) {
        let mut gate = self.gate.write();
        gate.edge_id = Some(edge_id);
        gate.generation += 1;
    }

    /// The gate's generation: changes with every reload and binding.
    pub fn generation(&self) -> u64 {
        self.gate.read().generation
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

    /// Until when the last credentials are the only ones (the grant window), if a grant is
    /// pending: no tunnel opened or closed since it went out.
    pub fn grant_pending_until(&self) -> Option<u64> {
        self.grant_until_ms
    }

    /// The key that seals tunnel credentials for the bound agent.
    pub fn seal_key(&self) -> Option<SealKey> {
        let edge_id = self.edge_id()?;
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
    /// freshness ([`Gate::check_upload`]).
    pub fn verify_upload(
        &self,
        frame: &[u8],
        edge_id: Uuid,
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        self.gate
            .read()
            .check_upload(frame, edge_id, timestamp_ms, now_ms)
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

    /// Decides on one check-in of any kind: [`Self::check_checkin`], then [`Self::decide`].
    pub fn checkin_as(
        &mut self,
        kind: CheckinKind,
        req: &CheckinRequest,
        frame: &[u8],
        now_ms: u64,
        default_interval: u32,
    ) -> Verdict {
        match self.check_checkin(kind, req, frame, now_ms) {
            Ok(claimed) => self.decide(kind, req, frame, claimed, now_ms, default_interval),
            Err(refusal) => Verdict::Refuse(refusal),
        }
    }

    /// What a check-in is judged by first ([`Gate::check_checkin`]): the Edge ID it claims,
    /// when its MAC holds and its clock is inside the window.
    pub fn check_checkin(
        &self,
        kind: CheckinKind,
        req: &CheckinRequest,
        frame: &[u8],
        now_ms: u64,
    ) -> Result<Uuid, Refusal> {
        self.gate.read().check_checkin(kind, req, frame, now_ms)
    }

    /// Decides on a check-in that passed [`Self::check_checkin`] as `claimed`: mode, replay,
    /// binding, then the answer (a grant taken here starts the grant window).
    pub fn decide(
        &mut self,
        kind: CheckinKind,
        req: &CheckinRequest,
        frame: &[u8],
        claimed: Uuid,
        now_ms: u64,
        default_interval: u32,
    ) -> Verdict {
        let timestamp_ms =
            proto::wire::request_timestamp(req.timestamp_lo, req.timestamp_hi, now_ms);
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
        match self.edge_id() {
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
            desired: None,
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

/// Effective intervals of an environment given the settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Intervals {
    pub checkin: u32,
    pub ping: u32,
    pub snapshot: u32,
    pub command: u32,
}

impl Intervals {
    pub fn of(env: &store::Environment, s: &store::Settings) -> Self {
        Self::of_own(Self::own(env), s)
    }

    /// An environment's own intervals (check-in, ping, snapshot, command; `None`: the
    /// settings' default).
    pub fn own(env: &store::Environment) -> [Option<u32>; 4] {
        [
            env.checkin_interval,
            env.ping_interval,
            env.snapshot_interval,
            env.command_interval,
        ]
    }

    pub fn of_own(
        [checkin, ping, snapshot, command]: [Option<u32>; 4],
        s: &store::Settings,
    ) -> Self {
        Self {
            checkin: checkin.unwrap_or(s.checkin_interval),
            ping: ping.unwrap_or(s.ping_interval),
            snapshot: snapshot.unwrap_or(s.snapshot_interval),
            command: command.unwrap_or(s.command_interval),
        }
    }

    /// The interval that decides liveness: the check-in interval, or in async mode the
    /// smallest enabled one.
    pub fn liveness(&self, mode: store::EdgeMode) -> u32 {
        match mode {
            store::EdgeMode::Standard => self.checkin,
            store::EdgeMode::Async => [self.ping, self.snapshot, self.command]
                .into_iter()
                .filter(|&i| i > 0)
                .min()
                .unwrap_or(self.ping),
        }
    }
}

/// How long after its last check-in an environment at `interval_secs` is still `up`.
pub fn grace_ms(interval_secs: u32) -> u64 {
    (2 * u64::from(interval_secs) + 20) * 1000
}

/// `up` while `now - last <= 2 * interval + 20 s`.
pub fn liveness(last_checkin_ms: Option<u64>, interval_secs: u32, now_ms: u64) -> Liveness {
    match last_checkin_ms {
        None => Liveness::Never,
        Some(last) => {
            if now_ms.saturating_sub(last) <= grace_ms(interval_secs) {
                Liveness::Up
            } else {
                Liveness::Down
            }
        }
    }
}

#[cfg(test)]
mod tests;
