//! An environment's shared state ([`Env`]: the state machine and its held check-ins) and the
//! thin actix shell around it. Steady check-ins are decided by the fleet in place, under the
//! state's lock ([`Env::answer`]); the actor does what needs the store or a timer (a first
//! check-in's bind, tunnel credentials, offering held check-ins a grant) and applies admin
//! events, one at a time, through its bounded mailbox.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use parking_lot::Mutex;
use proto::clock::now_ms;
use proto::wire::{CheckinRequest, EdgeStatus, SealedCredentials, TunnelCredentials};
use rand::RngCore;
use sha2::{Digest, Sha256};
use store::{BindOutcome, EnvId, Environment, TunnelGrant};
use tokio::sync::oneshot;

use super::desired::{DesiredSync, EnvInputs};
use super::state::held::HeldQueue;
use super::state::{CheckinKind, EnvState, Verdict};
use super::{Answer, CheckinError, Fleet};
use crate::metrics::Metrics;

/// How long one-time tunnel credentials live (the agent connects within milliseconds).
pub const CREDENTIALS_TTL: Duration = Duration::from_secs(30);

/// The answer to a check-in, and for a held one, where a later answer may come from.
pub(super) struct Reply {
    pub answer: Answer,
    /// Set when the answer may be held: a tunnel grant arrives here, or the holder gives up
    /// and sends `answer`.
    pub held: Option<oneshot::Receiver<Answer>>,
}

/// An environment's state machine and held check-ins, shared by its actor and the fleet's
/// check-in path. The lock is held for a decision only, never across an `.await`.
pub(super) struct Env {
    pub state: EnvState,
    pub held: HeldQueue<Waiter>,
    /// What of the environment decides its desired stacks, and where its agent stands.
    pub inputs: EnvInputs,
    pub sync: DesiredSync,
    /// The agent's stack requests (fetches, reports), rate-limited.
    pub stack_requests: Bucket,
    /// `held.len()` as last added to the fleet-wide gauge.
    held_counted: usize,
    /// Its actor stopped: nothing will offer held check-ins a grant or apply reloads here
    /// any more, so a request that still holds this state is told to come back (`busy`).
    pub stopped: bool,
}

pub(super) type SharedEnv = Arc<Mutex<Env>>;

impl Env {
    pub(super) fn new(
        state: EnvState,
        held_per_env: usize,
        inputs: EnvInputs,
        digest: u64,
    ) -> SharedEnv {
        Arc::new(Mutex::new(Self {
            state,
            held: HeldQueue::new(held_per_env),
            inputs,
            sync: DesiredSync {
                digest,
                acked: None,
            },
            stack_requests: Bucket::default(),
            held_counted: 0,
            stopped: false,
        }))
    }

    /// Brings `edgeplane_fleet_held_checkins` up to date with this queue's length.
    fn count_held(&mut self, metrics: &Metrics) {
        let now = self.held.len();
        metrics
            .held_checkins
            .add(now as i64 - self.held_counted as i64);
        self.held_counted = now;
    }

    /// The reply to a check-in decided without credentials: an async tick's intervals filled
    /// in, the desired-state digest while the agent has not acknowledged it (to agents that
    /// speak protocol version 2, `peer_version`), an idle held check-in parked (unless the
    /// environment holds as many as it may).
    pub(super) fn answer(
        &mut self,
        kind: CheckinKind,
        mut answer: Answer,
        fleet: &Fleet,
        peer_version: u8,
    ) -> Reply {
        if kind == CheckinKind::Async {
            answer.async_intervals =
                Some(self.state.async_intervals(fleet.defaults.async_intervals()));
        }
        let speaks_stacks = peer_version >= 2;
        if speaks_stacks {
            if let Some(digest) = self.sync.announce() {
                // "Nothing" to an agent not heard from since this state was built goes only
                // on an answer with a body anyway (a new agent process, or one back from
                // errors: when a removal may have been missed), so idle check-ins stay 204.
                if digest != 0 || self.sync.acked.is_some() || !answer.unchanged {
                    answer.desired = Some(digest);
                    answer.unchanged = false;
                }
            }
        }
        let held = if kind == CheckinKind::Held && answer.unchanged {
            let (tx, rx) = oneshot::channel();
            let waiter = Waiter { tx, speaks_stacks };
            let held = self.held.hold(waiter, answer.interval_secs).is_ok();
            self.count_held(&fleet.metrics);
            held.then_some(rx)
        } else {
            None
        };
        Reply { answer, held }
    }

    /// Takes a new desired-state digest (0: no stacks); if the agent has to be told, held
    /// check-ins that can understand it are answered with it at once.
    pub(super) fn set_desired(&mut self, digest: u64, fleet: &Fleet) {
        if self.sync.digest == digest {
            return;
        }
        self.sync.digest = digest;
        let Some(digest) = self.sync.announce() else {
            return;
        };
        for held in self.held.take_if(|w| w.speaks_stacks) {
            let _ = held.waiter.tx.send(Answer {
                status: EdgeStatus::Idle,
                interval_secs: held.interval_secs,
                server_time_ms: None,
                unchanged: false,
                tunnel: None,
                async_intervals: None,
                desired: Some(digest),
            });
        }
        self.count_held(&fleet.metrics);
    }
}

/// A token bucket of [`super::STACK_REQUEST_BURST`], refilled at one a second.
#[derive(Debug)]
pub(super) struct Bucket {
    tokens: u32,
    at_ms: u64,
}

impl Default for Bucket {
    fn default() -> Self {
        Self {
            tokens: super::STACK_REQUEST_BURST,
            at_ms: 0,
        }
    }
}

impl Bucket {
    /// Takes a token at `now_ms`, if there is one.
    pub(super) fn take(&mut self, now_ms: u64) -> bool {
        let refill = now_ms.saturating_sub(self.at_ms) / 1000;
        if refill > 0 {
            let refill = u32::try_from(refill).unwrap_or(u32::MAX);
            self.tokens = self
                .tokens
                .saturating_add(refill)
                .min(super::STACK_REQUEST_BURST);
            self.at_ms = now_ms;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// The protocol version a signed request came in (1 for anything unreadable).
pub(super) fn peer_version(frame: &[u8]) -> u8 {
    proto::codec::frame_version(frame).unwrap_or(1)
}

/// A held check-in's way back: its answer, and whether its agent speaks of stacks.
pub(super) struct Waiter {
    pub tx: oneshot::Sender<Answer>,
    pub speaks_stacks: bool,
}

impl super::state::held::Waiter for Waiter {
    fn is_gone(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Counts a check-in's outcome (`edgeplane_checkin_requests_total`), and says so when another
/// Edge ID knocks at a bound environment.
pub(super) fn count_result(metrics: &Metrics, id: EnvId, result: &Result<Reply, CheckinError>) {
    let name = match result {
        Ok(r) if r.answer.status == EdgeStatus::Required => "required",
        Ok(r) if r.held.is_some() => "held",
        Ok(_) => "idle",
        Err(CheckinError::Refused(r)) => r.code().kind(),
        Err(_) => "error",
    };
    match name {
        "idle" => metrics.checkins_by_result.idle.inc(),
        "held" => metrics.checkins_by_result.held.inc(),
        "required" => metrics.checkins_by_result.required.inc(),
        other => metrics.checkins.with_label_values(&[other]).inc(),
    }
    if let Err(CheckinError::Refused(super::Refusal::EdgeIdMismatch)) = result {
        tracing::warn!(
            env = id,
            "check-in from another edge id refused (environment is bound; reset the association to rebind)"
        );
    }
}

pub(super) struct EnvActor {
    id: EnvId,
    env: SharedEnv,
    fleet: Arc<Fleet>,
}

impl EnvActor {
    pub(super) fn new(env: SharedEnv, fleet: Arc<Fleet>) -> Self {
        let id = env.lock().state.id();
        Self { id, env, fleet }
    }

    /// Makes one-time credentials for the bound agent: the sealed form for the answer, and
    /// the future that stores the grant (by the token's hash) before the answer may leave.
    fn issue(
        &self,
        now: u64,
    ) -> Result<
        (
            SealedCredentials,
            impl Future<Output = Result<(), CheckinError>> + 'static,
        ),
        CheckinError,
    > {
        let id = self.id;
        let broken = |reason: &str| CheckinError::Broken {
            id,
            reason: reason.to_owned(),
        };
        let (key, edge_id) = {
            let env = self.env.lock();
            (env.state.seal_key(), env.state.edge_id())
        };
        let (Some(key), Some(edge_id)) = (key, edge_id) else {
            return Err(broken("tunnel credentials need a bound edge id"));
        };
        let mut token = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut token);
        let expires_ms = now + CREDENTIALS_TTL.as_millis() as u64;
        let sealed = key
            .seal(&TunnelCredentials {
                token,
                expires_ms,
                gateways: self.fleet.gateway_addrs(),
            })
            .map_err(|e| broken(&e.to_string()))?;
        let hash: [u8; 32] = Sha256::digest(token).into();
        let grant = TunnelGrant {
            env: id,
            edge_id,
            expires_ms,
        };
        let store = Arc::clone(self.fleet.store());
        let metrics = Arc::clone(&self.fleet.metrics);
        let put = async move {
            store
                .put_tunnel_grant(&hash, &grant, CREDENTIALS_TTL)
                .await
                .map_err(|e| {
                    metrics.store_error(crate::metrics::StoreOp::PutTunnelGrant);
                    CheckinError::Store(e)
                })
        };
        Ok((sealed, put))
    }

    /// Answers the held check-in the state machine picks ([`HeldQueue::offer`]) with
    /// credentials; if its agent never connects, offers again when the grant window ends.
    fn wake_one(&mut self, ctx: &mut Context<Self>) {
        let now = now_ms();
        let offered = {
            let mut env = self.env.lock();
            let env = &mut *env;
            let offered = env.held.offer(&mut env.state, now);
            env.count_held(&self.fleet.metrics);
            offered
        };
        let Some(held) = offered else {
            return;
        };
        let (sealed, put) = match self.issue(now) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(env = self.id, error = %e, "cannot issue tunnel credentials");
                self.env.lock().state.release_grant();
                return;
            }
        };
        ctx.wait(put.into_actor(self).map(move |result, act, ctx| {
            let answer = Answer {
                status: EdgeStatus::Required,
                interval_secs: held.interval_secs,
                server_time_ms: None,
                unchanged: false,
                tunnel: Some(sealed),
                async_intervals: None,
                desired: None,
            };
            let delivered = result.is_ok() && held.waiter.tx.send(answer).is_ok();
            if delivered {
                act.fleet
                    .metrics
                    .checkins
                    .with_label_values(&["required"])
                    .inc();
                // If this agent never opens the tunnel, give the next one a turn.
                let again = HeldQueue::<Waiter>::reoffer_at(&act.env.lock().state);
                if let Some(at) = again {
                    let after = Duration::from_millis(at.saturating_sub(now) + 50);
                    ctx.run_later(after, |act, ctx| act.wake_one(ctx));
                }
            } else {
                act.env.lock().state.release_grant();
                act.wake_one(ctx);
            }
        }));
    }

    /// Sends a decided answer: issues credentials first when it says `Required`, or answers
    /// (or parks) it as [`Env::answer`] does.
    fn respond(
        &mut self,
        kind: CheckinKind,
        answer: Answer,
        reply: oneshot::Sender<Result<Reply, CheckinError>>,
        now: u64,
        peer_version: u8,
    ) -> Option<ResponseActFuture<Self, ()>> {
        if answer.status == EdgeStatus::Required {
            let (sealed, put) = match self.issue(now) {
                Ok(x) => x,
                Err(e) => {
                    self.env.lock().state.release_grant();
                    self.finish(reply, Err(e));
                    return None;
                }
            };
            return Some(Box::pin(put.into_actor(self).map(
                move |result, act, _ctx| match result {
                    Ok(()) => act.finish(
                        reply,
                        Ok(Reply {
                            answer: Answer {
                                tunnel: Some(sealed),
                                ..answer
                            },
                            held: None,
                        }),
                    ),
                    Err(e) => {
                        act.env.lock().state.release_grant();
                        act.finish(reply, Err(e));
                    }
                },
            )));
        }
        let result = self
            .env
            .lock()
            .answer(kind, answer, &self.fleet, peer_version);
        self.finish(reply, Ok(result));
        None
    }
}

impl Actor for EnvActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.fleet.limits.actor_mailbox);
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        {
            let mut env = self.env.lock();
            self.fleet
                .metrics
                .held_checkins
                .sub(env.held_counted as i64);
            env.held_counted = 0;
            env.stopped = true;
        }
        self.fleet.actor_stopped(self.id, &ctx.address());
    }
}

/// A check-in the fleet could not decide in place: a first check-in (its Edge ID is bound
/// here). The answer goes back on `reply` so the sender can use `try_send` and fail fast on a
/// full mailbox.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct CheckinMsg {
    pub kind: CheckinKind,
    pub req: CheckinRequest,
    pub frame: Bytes,
    pub now_ms: u64,
    pub reply: oneshot::Sender<Result<Reply, CheckinError>>,
}

impl Handler<CheckinMsg> for EnvActor {
    // Decided again here: an earlier first check-in may have bound the environment since
    // this one was sent. What needs the store (the bind, issuing credentials) runs with
    // `ctx.wait`, not `ctx.spawn`: the latter would let the next message in while the bind is
    // in flight (a second first check-in would bind again, a `Reload` of a reset could be
    // overwritten by a stale outcome); with `ctx.wait` nothing else is handled until the
    // outcome is applied. (Check-ins decided in place meanwhile find no binding and come
    // here too.)
    type Result = ();

    fn handle(&mut self, msg: CheckinMsg, ctx: &mut Self::Context) {
        let default_interval = self.fleet.defaults.checkin();
        let kind = msg.kind;
        let verdict = self.env.lock().state.checkin_as(
            kind,
            &msg.req,
            &msg.frame,
            msg.now_ms,
            default_interval,
        );
        match verdict {
            Verdict::Answer(a) => {
                let peer = peer_version(&msg.frame);
                if let Some(pending) = self.respond(kind, a, msg.reply, msg.now_ms, peer) {
                    ctx.wait(pending);
                }
            }
            Verdict::Refuse(r) => self.finish(msg.reply, Err(CheckinError::Refused(r))),
            Verdict::Bind(edge_id) => {
                // First check-in: bind atomically in the store (another replica may race us),
                // holding this actor's mailbox until the outcome is applied. The proof was
                // verified with this state's join secret, so the store binds only if it still
                // holds that secret: a reset landing meanwhile must not be bound by the old key.
                let store = Arc::clone(self.fleet.store());
                let id = self.id;
                let join_secret = self.env.lock().state.join_secret().to_owned();
                let fut = async move { store.bind_edge_id(id, edge_id, &join_secret).await };
                ctx.wait(Box::pin(fut.into_actor(self).then(
                    move |outcome, act, _ctx| {
                        let result = match outcome {
                            Ok(BindOutcome::Bound) => {
                                // The Edge ID is half of what impersonates a bound agent:
                                // never above debug.
                                tracing::info!(env = id, "edge id bound on first check-in");
                                tracing::debug!(env = id, %edge_id, "bound edge id");
                                act.env.lock().state.set_binding(edge_id);
                                act.retry(kind, &msg.req, &msg.frame, msg.now_ms, default_interval)
                            }
                            Ok(BindOutcome::AlreadyBound) => {
                                act.env.lock().state.set_binding(edge_id);
                                act.retry(kind, &msg.req, &msg.frame, msg.now_ms, default_interval)
                            }
                            Ok(BindOutcome::BoundToOther(other)) => {
                                act.env.lock().state.set_binding(other);
                                act.retry(kind, &msg.req, &msg.frame, msg.now_ms, default_interval)
                            }
                            Ok(BindOutcome::SecretChanged) => {
                                // The association was reset since this state was loaded; the
                                // `Reload` for it is on its way. Nothing is known about the
                                // new generation here, so the agent is told to retry rather
                                // than refused: by then the reloaded keys decide.
                                tracing::info!(
                                    env = id,
                                    "join secret changed during first check-in; not bound"
                                );
                                Err(CheckinError::Busy(id))
                            }
                            Ok(BindOutcome::NotFound) => Err(CheckinError::UnknownEnvironment(id)),
                            Err(e) => Err(CheckinError::Store(e)),
                        };
                        match result {
                            Ok(a) => act
                                .respond(kind, a, msg.reply, msg.now_ms, peer_version(&msg.frame))
                                .unwrap_or_else(Self::done),
                            Err(e) => {
                                act.finish(msg.reply, Err(e));
                                Self::done()
                            }
                        }
                    },
                )));
            }
        }
    }
}

impl EnvActor {
    /// The response of a check-in answered synchronously.
    fn done() -> ResponseActFuture<Self, ()> {
        Box::pin(actix::fut::ready(()))
    }

    fn retry(
        &mut self,
        kind: CheckinKind,
        req: &CheckinRequest,
        frame: &[u8],
        now_ms: u64,
        default_interval: u32,
    ) -> Result<Answer, CheckinError> {
        let verdict = self
            .env
            .lock()
            .state
            .checkin_as(kind, req, frame, now_ms, default_interval);
        match verdict {
            Verdict::Answer(a) => Ok(a),
            Verdict::Refuse(r) => Err(CheckinError::Refused(r)),
            Verdict::Bind(_) => Err(CheckinError::Broken {
                id: self.id,
                reason: "binding did not hold".into(),
            }),
        }
    }

    fn finish(
        &self,
        reply: oneshot::Sender<Result<Reply, CheckinError>>,
        result: Result<Reply, CheckinError>,
    ) {
        count_result(&self.fleet.metrics, self.id, &result);
        // The requester may have given up (timeout); nothing to do then.
        let _ = reply.send(result);
    }
}

/// A check-in the fleet decided in place whose answer carries tunnel credentials (its grant
/// is taken): the actor issues them, stores the grant, then answers on `reply`.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Issue {
    pub kind: CheckinKind,
    pub answer: Answer,
    pub now_ms: u64,
    /// The gate's generation the check-in was judged under.
    pub generation: u64,
    pub reply: oneshot::Sender<Result<Reply, CheckinError>>,
}

impl Handler<Issue> for EnvActor {
    type Result = ();

    fn handle(&mut self, msg: Issue, ctx: &mut Self::Context) {
        // A reload (a reset association) or a binding since the decision: the credentials
        // would be sealed for another generation. The agent comes back and is judged anew.
        let current = {
            let mut env = self.env.lock();
            let current = env.state.generation() == msg.generation;
            if !current {
                env.state.release_grant();
            }
            current
        };
        if !current {
            self.finish(msg.reply, Err(CheckinError::Busy(self.id)));
            return;
        }
        // (Credentials only: the desired state waits for the next check-in.)
        if let Some(pending) = self.respond(msg.kind, msg.answer, msg.reply, msg.now_ms, 1) {
            ctx.wait(pending);
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Reload(pub Box<Environment>);

impl Handler<Reload> for EnvActor {
    type Result = ();

    fn handle(&mut self, msg: Reload, ctx: &mut Self::Context) {
        let catalog = self.fleet.catalog();
        let reloaded = {
            let mut env = self.env.lock();
            env.inputs = EnvInputs::of(&msg.0);
            let digest = catalog.digest(&env.inputs);
            env.set_desired(digest, &self.fleet);
            env.state.reload(&msg.0, self.fleet.agent_secret.as_deref())
        };
        if let Err(e) = reloaded {
            tracing::error!(error = %e, "cannot apply reloaded environment; stopping its actor");
            ctx.stop();
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct SetRequired(pub bool);

impl Handler<SetRequired> for EnvActor {
    type Result = ();

    fn handle(&mut self, msg: SetRequired, ctx: &mut Self::Context) {
        self.env.lock().state.set_required(msg.0);
        self.wake_one(ctx);
    }
}

/// An operator needs the tunnel until then (ms since epoch).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct WantTunnel(pub u64);

impl Handler<WantTunnel> for EnvActor {
    type Result = ();

    fn handle(&mut self, msg: WantTunnel, ctx: &mut Self::Context) {
        self.env.lock().state.want_tunnel(msg.0);
        self.wake_one(ctx);
    }
}

/// The tunnel opened with this epoch (`Some`), or the one with this epoch closed.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) enum TunnelEvent {
    Opened(u64),
    Closed(u64),
}

impl Handler<TunnelEvent> for EnvActor {
    type Result = ();

    fn handle(&mut self, msg: TunnelEvent, ctx: &mut Self::Context) {
        match msg {
            TunnelEvent::Opened(epoch) => self.env.lock().state.set_open(Some(epoch)),
            TunnelEvent::Closed(epoch) => {
                let closed = {
                    let mut env = self.env.lock();
                    let ours = env.state.open_epoch() == Some(epoch);
                    if ours {
                        env.state.set_open(None);
                    }
                    ours
                };
                if closed {
                    self.wake_one(ctx);
                }
            }
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Shutdown;

impl Handler<Shutdown> for EnvActor {
    type Result = ();

    fn handle(&mut self, _msg: Shutdown, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
