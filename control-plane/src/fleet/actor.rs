//! The thin actix shell around [`EnvState`]: one per environment, bounded mailbox.

use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;
use proto::wire::CheckinRequest;
use tokio::sync::oneshot;

use super::state::{EnvState, Verdict};
use super::{Answer, CheckinError, Fleet};
use crate::store::{BindOutcome, Environment};

pub(super) struct EnvActor {
    state: EnvState,
    fleet: Arc<Fleet>,
}

impl EnvActor {
    pub(super) fn new(state: EnvState, fleet: Arc<Fleet>) -> Self {
        Self { state, fleet }
    }

    fn result_name(r: &Result<Answer, CheckinError>) -> &'static str {
        match r {
            Ok(a) if a.status == proto::wire::EdgeStatus::Required => "required",
            Ok(_) => "idle",
            Err(CheckinError::Refused(r)) => match r {
                super::Refusal::BadProof => "bad_proof",
                super::Refusal::AgentSecretMismatch => "agent_secret_mismatch",
                super::Refusal::ClockSkew { .. } => "clock_skew",
                super::Refusal::Replay => "replay",
                super::Refusal::EdgeIdMismatch => "edge_id_mismatch",
                super::Refusal::WrongMode => "wrong_mode",
                super::Refusal::EdgeIdRequired => "edge_id_required",
            },
            Err(_) => "error",
        }
    }
}

impl Actor for EnvActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.fleet.limits.actor_mailbox);
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        self.fleet.actor_stopped(self.state.id(), &ctx.address());
    }
}

/// One check-in; the answer goes back on `reply` so the sender can use `try_send` and fail
/// fast on a full mailbox.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct CheckinMsg {
    pub req: CheckinRequest,
    pub frame: Bytes,
    pub now_ms: u64,
    pub reply: oneshot::Sender<Result<Answer, CheckinError>>,
}

impl Handler<CheckinMsg> for EnvActor {
    // `AtomicResponse`, not `ResponseActFuture`: actix runs the latter with `ctx.spawn`, which
    // lets the next message in while the bind is in flight (a second first check-in would bind
    // again, a `Reload` of a reset could be overwritten by a stale outcome). `AtomicResponse`
    // runs it with `ctx.wait`, so nothing else is handled until the outcome is applied.
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: CheckinMsg, _ctx: &mut Self::Context) -> Self::Result {
        let default_interval = self.fleet.defaults.checkin();
        match self
            .state
            .checkin(&msg.req, &msg.frame, msg.now_ms, default_interval)
        {
            Verdict::Answer(a) => {
                self.finish(msg.reply, Ok(a));
                Self::done()
            }
            Verdict::Refuse(r) => {
                self.finish(msg.reply, Err(CheckinError::Refused(r)));
                Self::done()
            }
            Verdict::Bind(edge_id) => {
                // First check-in: bind atomically in the store (another replica may race us),
                // holding this actor's mailbox until the outcome is applied. The proof was
                // verified with this state's join secret, so the store binds only if it still
                // holds that secret: a reset landing meanwhile must not be bound by the old key.
                let store = Arc::clone(self.fleet.store());
                let id = self.state.id();
                let join_secret = self.state.join_secret().to_owned();
                let fut = async move { store.bind_edge_id(id, edge_id, &join_secret).await };
                AtomicResponse::new(Box::pin(fut.into_actor(self).map(
                    move |outcome, act, _ctx| {
                        let result = match outcome {
                            Ok(BindOutcome::Bound) => {
                                tracing::info!(
                                    env = id,
                                    %edge_id,
                                    "edge id bound on first check-in"
                                );
                                act.state.set_binding(edge_id);
                                act.retry(&msg.req, &msg.frame, msg.now_ms, default_interval)
                            }
                            Ok(BindOutcome::AlreadyBound) => {
                                act.state.set_binding(edge_id);
                                act.retry(&msg.req, &msg.frame, msg.now_ms, default_interval)
                            }
                            Ok(BindOutcome::BoundToOther(other)) => {
                                act.state.set_binding(other);
                                act.retry(&msg.req, &msg.frame, msg.now_ms, default_interval)
                            }
                            Ok(BindOutcome::SecretChanged) => {
                                // The association was reset since this state was loaded; the
                                // `Reload` for it is on its way. Nothing is known about the
                                // new generation here, so the agent is told to retry rather
                                // than refused: by then the reloaded keys decide.
                                tracing::info!(
                                    env = id,
                                    %edge_id,
                                    "join secret changed during first check-in; not bound"
                                );
                                Err(CheckinError::Busy(id))
                            }
                            Ok(BindOutcome::NotFound) => Err(CheckinError::UnknownEnvironment(id)),
                            Err(e) => Err(CheckinError::Store(e)),
                        };
                        act.finish(msg.reply, result);
                    },
                )))
            }
        }
    }
}

impl EnvActor {
    /// The response of a check-in answered synchronously.
    fn done() -> AtomicResponse<Self, ()> {
        AtomicResponse::new(Box::pin(actix::fut::ready(())))
    }

    fn retry(
        &mut self,
        req: &CheckinRequest,
        frame: &[u8],
        now_ms: u64,
        default_interval: u32,
    ) -> Result<Answer, CheckinError> {
        match self.state.checkin(req, frame, now_ms, default_interval) {
            Verdict::Answer(a) => Ok(a),
            Verdict::Refuse(r) => Err(CheckinError::Refused(r)),
            Verdict::Bind(_) => Err(CheckinError::Broken {
                id: self.state.id(),
                reason: "binding did not hold".into(),
            }),
        }
    }

    fn finish(
        &self,
        reply: oneshot::Sender<Result<Answer, CheckinError>>,
        result: Result<Answer, CheckinError>,
    ) {
        self.fleet
            .metrics
            .checkins
            .with_label_values(&[Self::result_name(&result)])
            .inc();
        if let Err(CheckinError::Refused(super::Refusal::EdgeIdMismatch)) = &result {
            tracing::warn!(
                env = self.state.id(),
                "check-in from another edge id refused (environment is bound; reset the association to rebind)"
            );
        }
        // The requester may have given up (timeout); nothing to do then.
        let _ = reply.send(result);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Reload(pub Box<Environment>);

impl Handler<Reload> for EnvActor {
    type Result = ();

    fn handle(&mut self, msg: Reload, ctx: &mut Self::Context) {
        if let Err(e) = self
            .state
            .reload(&msg.0, self.fleet.agent_secret.as_deref())
        {
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

    fn handle(&mut self, msg: SetRequired, _ctx: &mut Self::Context) {
        self.state.set_required(msg.0);
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
