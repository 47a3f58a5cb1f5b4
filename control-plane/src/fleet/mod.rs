//! The fleet: one actix actor per environment, created lazily on first check-in, stopped
//! when idle, rebuilt from the store; plus per-agent statistics and the heartbeat
//! write-behind. The check-in path touches only memory in the steady state.

mod actor;
pub mod desired;
pub mod state;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::RwLock;
use proto::clock::now_ms;
use proto::wire::{CheckinRequest, EdgeStatus};
use store::{Change, EdgeMode, EnvId, Settings, SharedStore, StoreError, TunnelLocation};
use tokio::sync::{broadcast, oneshot, Notify};

use crate::config::Limits;
use crate::metrics::{AgentStats, FleetSizes, Metrics};
pub use actor::CREDENTIALS_TTL;
use actor::{CheckinMsg, Env, EnvActor, Reload, SharedEnv, Shutdown, TunnelEvent, WantTunnel};
use desired::{Catalog, EnvInputs};
use state::Verdict;
pub use state::{
    grace_ms, liveness, Answer, CheckinKind, Intervals, Liveness, Refusal, SharedGate,
};

/// Held check-ins are answered this long before the agent's interval ends, so the agent's
/// next check-in (at send time + interval) never waits for a late answer.
const HOLD_MARGIN: Duration = Duration::from_millis(250);
/// Holds end on this grid (rounded up, well within [`HOLD_MARGIN`]): the check-ins whose holds
/// end within one step are answered in one wake-up of their worker instead of one each, which
/// at a thousand check-ins a second is most of a worker's wake-ups.
const HOLD_GRID: Duration = Duration::from_millis(20);

/// `at` rounded up to the next point of [`HOLD_GRID`] (counted from the first call).
fn on_hold_grid(at: tokio::time::Instant) -> tokio::time::Instant {
    static BASE: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(tokio::time::Instant::now);
    let grid = HOLD_GRID.as_nanos();
    let since = at.saturating_duration_since(base).as_nanos();
    let steps = since.div_ceil(grid);
    let rounded = u64::try_from(steps * grid).unwrap_or(u64::MAX);
    base + Duration::from_nanos(rounded)
}
/// How often the list of live gateways handed out with credentials is refreshed.
const GATEWAY_REFRESH: Duration = Duration::from_secs(2);

/// Why a tunnel could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the agent did not open its tunnel within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an operator sees of a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelState {
    Closed,
    Requested,
    Open,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckinError {
    #[error("check-in refused: {0:?}")]
    Refused(Refusal),
    #[error("unknown environment {0}")]
    UnknownEnvironment(EnvId),
    #[error("environment {0} is busy, retry later")]
    Busy(EnvId),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("environment {id} cannot be served: {reason}")]
    Broken { id: EnvId, reason: String },
}

/// Default intervals from the settings, readable without locks on the hot path.
#[derive(Debug)]
pub struct Defaults {
    pub checkin_interval: AtomicU32,
    /// Async ping, snapshot and command intervals.
    pub async_intervals: [AtomicU32; 3],
}

impl Defaults {
    fn new(s: &Settings) -> Self {
        Self {
            checkin_interval: AtomicU32::new(s.checkin_interval),
            async_intervals: [
                AtomicU32::new(s.ping_interval),
                AtomicU32::new(s.snapshot_interval),
                AtomicU32::new(s.command_interval),
            ],
        }
    }

    pub fn set(&self, s: &Settings) {
        self.checkin_interval
            .store(s.checkin_interval, Ordering::Relaxed);
        for (slot, v) in self.async_intervals.iter().zip([
            s.ping_interval,
            s.snapshot_interval,
            s.command_interval,
        ]) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    pub fn async_intervals(&self) -> [u32; 3] {
        self.async_intervals
            .each_ref()
            .map(|a| a.load(Ordering::Relaxed))
    }

    pub fn checkin(&self) -> u32 {
        self.checkin_interval.load(Ordering::Relaxed)
    }
}

/// A live actor, its environment's shared state, and the number of check-ins queued for the
/// actor. actix's `try_send` on a fresh `Addr` clone never reports a full mailbox, so the
/// bound is enforced here.
struct Handle {
    addr: Addr<EnvActor>,
    in_flight: Arc<AtomicUsize>,
    /// The environment's keys and binding: a request's proof is checked with them before
    /// it takes the environment's lock.
    gate: SharedGate,
    /// What steady check-ins are decided with, in place.
    env: SharedEnv,
}

impl Handle {
    /// Takes one of the environment's in-flight slots (`None` when they are all taken).
    fn slot(&self, bound: usize) -> Option<InFlight> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= bound {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(InFlight(Arc::clone(&self.in_flight)))
    }
}

/// What a check-in decided in place goes on to.
enum Next {
    Reply(actor::Reply),
    Refused(Refusal),
    /// Credentials: the actor issues them.
    Issue(Answer),
    /// A first check-in: the actor binds it.
    Bind,
}

/// Decrements an in-flight count when the check-in ends, however it ends.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the actor made of a check-in.
pub enum Checkin {
    Now(Answer),
    /// Await [`Hold::answer`]. (Kept apart from the actor's part, which is over in
    /// microseconds: a held check-in keeps only this for most of an interval; boxed, so
    /// moving it on costs no room in the futures it passes through.)
    Held(Box<Hold>),
}

impl Checkin {
    /// The answer, once it is due.
    pub async fn answer(self) -> Answer {
        match self {
            Checkin::Now(answer) => answer,
            Checkin::Held(hold) => hold.answer().await,
        }
    }
}

/// A held check-in: its idle answer is due at `until`, unless a tunnel grant comes first on
/// `wake` (dropping it tells the actor the holder left).
pub struct Hold {
    fleet: Arc<Fleet>,
    id: EnvId,
    /// When the check-in arrived.
    now: u64,
    answer: Answer,
    wake: oneshot::Receiver<Answer>,
    until: tokio::time::Instant,
}

impl Hold {
    /// (Fields used in place, not bound anew: an async fn's bindings are slots of its own.)
    pub async fn answer(self: Box<Self>) -> Answer {
        let answer = match tokio::time::timeout_at(self.until, self.wake).await {
            Ok(Ok(grant)) => grant,
            _ => self.answer,
        };
        self.fleet.answered(self.id, self.now);
        answer
    }
}

pub struct Fleet {
    store: SharedStore,
    actors: DashMap<EnvId, Arc<Handle>>,
    /// Bumped for every environment change notification, so an actor that was being built
    /// while a change arrived reloads once it is registered.
    epoch: AtomicU64,
    /// Unknown ids and when to forget them, to refuse probes without a store read each time.
    unknown: DashMap<EnvId, u64>,
    /// Edge modes of environments that Docker calls went to, so a call through an open tunnel
    /// reads no store: an entry goes with the environment's change notification.
    modes: DashMap<EnvId, EdgeMode>,
    pub stats: AgentStats,
    pub defaults: Defaults,
    agent_secret: Option<Arc<str>>,
    metrics: Arc<Metrics>,
    limits: Limits,
    /// Open tunnels as the gateways reported them (notifications; the store is the truth).
    tunnels: DashMap<EnvId, TunnelLocation>,
    /// Proxy requests waiting for a tunnel, woken when one opens.
    tunnel_waiters: DashMap<EnvId, Arc<Notify>>,
    /// Operators' wishes for tunnels (until when), for the `requested` state.
    wanted: DashMap<EnvId, u64>,
    /// Public addresses of the live gateways, handed to agents with their credentials.
    gateway_addrs: RwLock<Vec<String>>,
    /// Edge stacks and groups, for the stacks each environment should run.
    catalog: RwLock<Arc<Catalog>>,
    /// Bumped with every catalog read, so an actor started meanwhile judges itself again.
    catalog_epoch: AtomicU64,
    /// The last catalog read failed: read again at the next sweep.
    catalog_stale: std::sync::atomic::AtomicBool,
    /// A catalog was read at least once (until then desired states are not served: an empty
    /// one would tell agents to remove everything).
    catalog_loaded: std::sync::atomic::AtomicBool,
    /// Stack statuses agents reported, written in batches with the heartbeats.
    statuses: parking_lot::Mutex<PendingStatuses>,
}

/// Stack statuses waiting to be written, by stack then environment (the newest report of
/// each: an agent reporting often holds one entry per stack); at most
/// [`MAX_PENDING_STATUSES`].
#[derive(Default)]
struct PendingStatuses {
    by_stack: std::collections::HashMap<u64, std::collections::HashMap<EnvId, store::StackStatus>>,
    len: usize,
}

impl PendingStatuses {
    fn put(&mut self, stack: u64, status: store::StackStatus) {
        let entries = self.by_stack.entry(stack).or_default();
        match entries.get_mut(&status.env) {
            Some(old) if old.updated_ms > status.updated_ms => {}
            Some(old) => *old = status,
            None => {
                entries.insert(status.env, status);
                self.len += 1;
            }
        }
    }
}

/// Stack statuses held for the next write at most; past it, reports are refused with `busy`
/// (the agent sends them again) rather than held without bound while the store is down.
pub const MAX_PENDING_STATUSES: usize = 200_000;
/// Stack requests (fetches and reports) one environment may send at once; one more a second.
pub const STACK_REQUEST_BURST: u32 = 16;

const UNKNOWN_TTL_MS: u64 = 30_000;
/// Edge modes remembered at most (the cache starts again when full).
const MAX_MODES: usize = 200_000;

impl Fleet {
    pub fn new(
        store: SharedStore,
        settings: &Settings,
        agent_secret: Option<String>,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Arc<Self> {
        Arc::new_cyclic(|fleet: &std::sync::Weak<Self>| {
            let fleet = fleet.clone();
            metrics.watch_fleet(move || fleet.upgrade().map(|f| f.sizes()));
            Self::unshared(store, settings, agent_secret, metrics, limits)
        })
    }

    fn unshared(
        store: SharedStore,
        settings: &Settings,
        agent_secret: Option<String>,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Self {
        Self {
            store,
            actors: DashMap::new(),
            epoch: AtomicU64::new(0),
            unknown: DashMap::new(),
            modes: DashMap::new(),
            stats: AgentStats::default(),
            defaults: Defaults::new(settings),
            agent_secret: agent_secret.map(Arc::from),
            metrics,
            limits,
            tunnels: DashMap::new(),
            tunnel_waiters: DashMap::new(),
            wanted: DashMap::new(),
            gateway_addrs: RwLock::new(Vec::new()),
            catalog: RwLock::new(Arc::new(Catalog::default())),
            catalog_epoch: AtomicU64::new(0),
            catalog_stale: std::sync::atomic::AtomicBool::new(true),
            catalog_loaded: std::sync::atomic::AtomicBool::new(false),
            statuses: parking_lot::Mutex::new(PendingStatuses::default()),
        }
    }

    /// The sizes of the per-environment maps, for `/metrics`.
    fn sizes(&self) -> FleetSizes {
        FleetSizes {
            tunnels: self.tunnels.len(),
            tunnel_waiters: self.tunnel_waiters.len(),
            wanted: self.wanted.len(),
            unknown: self.unknown.len(),
            modes: self.modes.len(),
            in_flight: self
                .actors
                .iter()
                .map(|h| h.in_flight.load(Ordering::Relaxed))
                .sum(),
        }
    }

    /// Live gateways' public addresses, shuffled (spreads new tunnels across gateways).
    pub fn gateway_addrs(&self) -> Vec<String> {
        use rand::seq::SliceRandom;
        let mut addrs = self.gateway_addrs.read().clone();
        addrs.shuffle(&mut rand::thread_rng());
        addrs
    }

    async fn refresh_gateways(&self) {
        match self.store.live_gateways().await {
            Ok(gws) => {
                let addrs: Vec<String> = gws.into_iter().map(|g| g.public_addr).collect();
                *self.gateway_addrs.write() = addrs;
            }
            Err(e) => tracing::debug!(error = %e, "cannot list gateways"),
        }
    }

    /// The operator-facing tunnel state of `id`, from this replica's view.
    pub fn tunnel_state(&self, id: EnvId, now: u64) -> (TunnelState, Option<TunnelLocation>) {
        if let Some(loc) = self.tunnels.get(&id) {
            return (TunnelState::Open, Some(loc.clone()));
        }
        if self.wanted.get(&id).is_some_and(|u| *u > now) {
            return (TunnelState::Requested, None);
        }
        (TunnelState::Closed, None)
    }

    /// The location of `id`'s tunnel, opening it if needed: tells every replica the tunnel is
    /// wanted (the one holding the agent's check-in answers it) and waits at most `wait` for a
    /// gateway to report it open. A location with an epoch `<= stale` is not good enough (the
    /// caller found it dead): every replica is told that one is closed.
    pub async fn ensure_tunnel(
        self: &Arc<Self>,
        id: EnvId,
        wait: Duration,
        stale: Option<u64>,
    ) -> Result<TunnelLocation, TunnelError> {
        let fresh = |loc: &TunnelLocation| stale.is_none_or(|e| loc.epoch > e);
        if let Some(epoch) = stale {
            // The caller found that tunnel dead or gone. A gateway that died says nothing, and
            // an actor that still thinks it open would never hand out credentials again.
            let closed = Change::TunnelClosed { env: id, epoch };
            self.apply(&closed).await;
            if let Err(e) = self.store.publish(closed).await {
                tracing::warn!(env = id, error = %e, "cannot tell other replicas a tunnel is gone");
            }
        }
        if let Some(loc) = self.tunnels.get(&id).map(|l| l.clone()).filter(fresh) {
            return Ok(loc);
        }
        if let Some(loc) = self.stored_tunnel(id).await?.filter(fresh) {
            return Ok(loc);
        }
        let deadline = tokio::time::Instant::now() + wait;
        let notify = Arc::clone(
            self.tunnel_waiters
                .entry(id)
                .or_insert_with(|| Arc::new(Notify::new()))
                .value(),
        );
        let change = Change::TunnelWanted {
            env: id,
            until_ms: now_ms() + wait.as_millis() as u64,
        };
        // Here at once (the agent may poll this replica), everywhere else through the store.
        self.apply(&change).await;
        if let Err(e) = self.store.publish(change).await {
            tracing::warn!(env = id, error = %e, "cannot tell other replicas a tunnel is wanted");
        }
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(loc) = self.tunnels.get(&id).map(|l| l.clone()).filter(fresh) {
                return Ok(loc);
            }
            let slice = tokio::time::Instant::now() + Duration::from_secs(1);
            if tokio::time::timeout_at(slice.min(deadline), notified)
                .await
                .is_err()
            {
                // Notifications can be missed (a replica reconnecting to Redis): ask the store.
                if let Some(loc) = self.stored_tunnel(id).await?.filter(fresh) {
                    return Ok(loc);
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(TunnelError::Timeout(wait));
                }
            }
        }
    }

    async fn stored_tunnel(&self, id: EnvId) -> Result<Option<TunnelLocation>, StoreError> {
        let loc = self.store.tunnel_locations(&[id]).await?.pop().flatten();
        if let Some(loc) = &loc {
            self.note_open(loc.clone());
        }
        Ok(loc)
    }

    /// Records an open tunnel unless a newer epoch is known; wakes waiting proxy requests.
    fn note_open(&self, loc: TunnelLocation) {
        let id = loc.env;
        let newer = self.tunnels.get(&id).is_none_or(|l| l.epoch <= loc.epoch);
        if newer {
            self.tunnels.insert(id, loc);
            self.wanted.remove(&id);
        }
        if let Some(n) = self.tunnel_waiters.get(&id) {
            n.notify_waiters();
        }
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Handles one check-in: judged by the environment's state in place (proof, freshness,
    /// replay, binding), so a steady one costs no message; a first check-in (to bind) or one
    /// whose answer carries tunnel credentials goes on to the environment's actor. The answer
    /// is ready at once or, for a held check-in, held ([`Checkin::Held`]: due at the end of
    /// the interval, or when a tunnel grant comes). `proven` runs once the frame passed the
    /// cheap checks (its MAC holds: it comes from the join secret's holder), before any hold.
    pub async fn checkin(
        self: &Arc<Self>,
        kind: CheckinKind,
        req: CheckinRequest,
        frame: Bytes,
        proven: impl FnOnce(),
    ) -> Result<Checkin, CheckinError> {
        let id = req.endpoint_id;
        let handle = self.actor(id).await?;
        let now = now_ms();
        let hold_for =
            Duration::from_secs(u64::from(req.interval_secs)).saturating_sub(HOLD_MARGIN);
        // The cheap checks first, outside the environment's lock: a flood of frames without
        // the join secret never holds it, and never takes one of its slots, so it cannot
        // make the real agent wait or busy.
        let (checked, generation) = {
            let gate = handle.gate.read();
            (
                gate.check_checkin(kind, &req, &frame, now),
                gate.generation(),
            )
        };
        let claimed = checked.map_err(|refusal| self.refused_early(id, refusal))?;
        proven();
        let (next, generation) = {
            let mut env = handle.env.lock();
            if env.stopped {
                // Its actor is gone (idle sweep, deletion, a failed reload): nothing would
                // wake a hold here. The agent comes back to a fresh one.
                drop(env);
                self.actors
                    .remove_if(&id, |_, h| Arc::ptr_eq(&h.env, &handle.env));
                return Err(CheckinError::Busy(id));
            }
            // Reloaded or bound since the check: judged again by what holds now.
            let (claimed, generation) = if env.state.generation() == generation {
                (Ok(claimed), generation)
            } else {
                (
                    env.state.check_checkin(kind, &req, &frame, now),
                    env.state.generation(),
                )
            };
            let verdict = match claimed {
                Ok(claimed) => {
                    env.state
                        .decide(kind, &req, &frame, claimed, now, self.defaults.checkin())
                }
                Err(refusal) => Verdict::Refuse(refusal),
            };
            // Decided and parked in one turn of the lock, so a tunnel wanted in between
            // finds this check-in held and offers it the grant.
            let next = match verdict {
                Verdict::Answer(answer) if answer.status != EdgeStatus::Required => {
                    Next::Reply(env.answer(kind, answer, self, actor::peer_version(&frame)))
                }
                Verdict::Answer(answer) => Next::Issue(answer),
                Verdict::Refuse(refusal) => Next::Refused(refusal),
                Verdict::Bind(_) => Next::Bind,
            };
            (next, generation)
        };
        let result = match next {
            Next::Reply(reply) => Ok(reply),
            Next::Refused(refusal) => Err(CheckinError::Refused(refusal)),
            Next::Issue(answer) => {
                let (tx, rx) = oneshot::channel();
                let msg = actor::Issue {
                    kind,
                    answer,
                    now_ms: now,
                    generation,
                    reply: tx,
                };
                // Never sent: let another check-in have the grant (the actor releases it
                // itself when it cannot deliver).
                let release = || handle.env.lock().state.release_grant();
                // Boxed, as the actor's part is rare: a steady check-in's future stays small.
                let result = Box::pin(self.to_actor(id, &handle, msg, rx, release)).await;
                return self.settle(id, now, hold_for, result);
            }
            Next::Bind => {
                let (tx, rx) = oneshot::channel();
                let msg = CheckinMsg {
                    kind,
                    req,
                    frame,
                    now_ms: now,
                    reply: tx,
                };
                let result = Box::pin(self.to_actor(id, &handle, msg, rx, || ())).await;
                return self.settle(id, now, hold_for, result);
            }
        };
        actor::count_result(&self.metrics, id, &result);
        self.settle(id, now, hold_for, result)
    }

    /// Sends `msg` to the environment's actor within its in-flight bound and waits for the
    /// answer it sends on `rx`: `Busy` when the bound is reached, the actor is gone or does
    /// not answer in time. `not_sent` runs when the actor never got the message.
    async fn to_actor<M>(
        &self,
        id: EnvId,
        handle: &Handle,
        msg: M,
        rx: oneshot::Receiver<Result<actor::Reply, CheckinError>>,
        not_sent: impl FnOnce(),
    ) -> Result<actor::Reply, CheckinError>
    where
        M: Message<Result = ()> + Send + 'static,
        EnvActor: Handler<M>,
    {
        let Some(_in_flight) = handle.slot(self.limits.actor_mailbox) else {
            not_sent();
            return Err(CheckinError::Busy(id));
        };
        match handle.addr.try_send(msg) {
            Ok(()) => {}
            Err(SendError::Full(_)) => {
                not_sent();
                return Err(CheckinError::Busy(id));
            }
            Err(SendError::Closed(_)) => {
                not_sent();
                // The actor stopped between lookup and send (idle sweep): forget it; the
                // agent retries and a fresh one is started.
                self.actors.remove_if(&id, |_, h| !h.addr.connected());
                return Err(CheckinError::Busy(id));
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(result)) => result,
            _ => Err(CheckinError::Busy(id)),
        }
    }

    /// What a decided check-in becomes: its answer now, or held until `hold_for` from now.
    fn settle(
        self: &Arc<Self>,
        id: EnvId,
        now: u64,
        hold_for: Duration,
        result: Result<actor::Reply, CheckinError>,
    ) -> Result<Checkin, CheckinError> {
        match result {
            Ok(actor::Reply {
                answer,
                held: Some(wake),
            }) => Ok(Checkin::Held(Box::new(Hold {
                fleet: Arc::clone(self),
                id,
                now,
                answer,
                wake,
                until: on_hold_grid(tokio::time::Instant::now() + hold_for),
            }))),
            Ok(reply) => {
                self.answered(id, now);
                Ok(Checkin::Now(reply.answer))
            }
            Err(e) => {
                if let CheckinError::Refused(_) = e {
                    self.stats.refused(id);
                }
                Err(e)
            }
        }
    }

    /// Counts an answered check-in of `id` sent at `now` (not for an environment deleted
    /// while it was in flight).
    fn answered(&self, id: EnvId, now: u64) {
        if self.actors.contains_key(&id) {
            self.stats.answered(id, now);
        }
    }

    /// Counts a refusal decided before the actor, as the actor counts its own.
    fn refused_early(&self, id: EnvId, refusal: Refusal) -> CheckinError {
        self.stats.refused(id);
        self.metrics
            .checkins
            .with_label_values(&[refusal.code().kind()])
            .inc();
        CheckinError::Refused(refusal)
    }

    /// The environment's actor here, started (from the store) if it has none yet.
    async fn actor(self: &Arc<Self>, id: EnvId) -> Result<Arc<Handle>, CheckinError> {
        if let Some(h) = self.actors.get(&id) {
            if h.addr.connected() {
                return Ok(Arc::clone(&h));
            }
        }
        // Boxed: a steady check-in's future does not carry the store read's.
        Box::pin(self.start_actor(id)).await
    }

    async fn start_actor(self: &Arc<Self>, id: EnvId) -> Result<Arc<Handle>, CheckinError> {
        let now = now_ms();
        if let Some(until) = self.unknown.get(&id).map(|u| *u) {
            if until > now {
                return Err(CheckinError::UnknownEnvironment(id));
            }
            self.unknown.remove(&id);
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let env = match self.store.get_environment(id).await {
            Ok(Some(env)) => env,
            Ok(None) => {
                self.remember_unknown(id, now);
                return Err(CheckinError::UnknownEnvironment(id));
            }
            Err(e) => {
                self.metrics
                    .store_error(crate::metrics::StoreOp::GetEnvironment);
                return Err(e.into());
            }
        };
        let mut state = state::EnvState::new(&env, self.agent_secret.as_deref()).map_err(|e| {
            CheckinError::Broken {
                id,
                reason: e.to_string(),
            }
        })?;
        // What this replica heard before the environment had an actor here: an open tunnel,
        // or an operator waiting for one (its notification found no actor to tell).
        if let Some(epoch) = self.tunnels.get(&id).map(|l| l.epoch) {
            state.set_open(Some(epoch));
        } else if let Some(until) = self.wanted.get(&id).map(|u| *u) {
            state.want_tunnel(until);
        }
        let catalog_epoch = self.catalog_epoch.load(Ordering::Acquire);
        let inputs = EnvInputs::of(&env);
        let digest = self.catalog().digest(&inputs);
        let mut started = false;
        let handle = self
            .actors
            .entry(id)
            .or_insert_with(|| {
                started = true;
                self.metrics.actor_starts.inc();
                self.metrics.actors.inc();
                let gate = state.gate();
                let env = Env::new(state, self.limits.held_per_env, inputs, digest);
                Arc::new(Handle {
                    addr: EnvActor::new(Arc::clone(&env), Arc::clone(self)).start(),
                    in_flight: Arc::new(AtomicUsize::new(0)),
                    gate,
                    env,
                })
            })
            .clone();
        if started && self.epoch.load(Ordering::Acquire) != epoch {
            // A change arrived between our store read and the registration; it found no
            // actor to reload, so this one may hold an old record (e.g. a revoked secret).
            self.reload(id).await;
        }
        if started && self.catalog_epoch.load(Ordering::Acquire) != catalog_epoch {
            // The catalog was read again while this actor was built.
            let catalog = self.catalog();
            let mut env = handle.env.lock();
            let digest = catalog.digest(&env.inputs);
            env.set_desired(digest, self);
        }
        Ok(handle)
    }

    /// The edge mode of environment `id` (`None`: there is no such environment), for Docker
    /// calls: from memory when a call went there before and no change arrived since, so a
    /// call through an open tunnel costs no store read. Unknown ids share the check-ins'
    /// negative cache.
    pub async fn edge_mode(&self, id: EnvId) -> Result<Option<EdgeMode>, StoreError> {
        if let Some(mode) = self.modes.get(&id).map(|m| *m) {
            return Ok(Some(mode));
        }
        let now = now_ms();
        if self.unknown.get(&id).is_some_and(|until| *until > now) {
            return Ok(None);
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let Some(env) = self.store.get_environment(id).await? else {
            self.remember_unknown(id, now);
            return Ok(None);
        };
        if self.modes.len() >= MAX_MODES {
            self.modes.clear();
        }
        self.modes.insert(id, env.mode);
        // A change that arrived during the read found nothing to remove: the entry may be
        // older than it, so it goes (inserted first, checked after, no window between).
        if self.epoch.load(Ordering::Acquire) != epoch {
            self.modes.remove(&id);
        }
        Ok(Some(env.mode))
    }

    /// Remembers an unknown id; when the cache is full, expired entries go first, then all
    /// (a flood of distinct ids must not push every probe through to the store).
    fn remember_unknown(&self, id: EnvId, now: u64) {
        if self.unknown.len() >= self.limits.negative_cache {
            self.unknown.retain(|_, until| *until > now);
            if self.unknown.len() >= self.limits.negative_cache {
                self.unknown.clear();
            }
        }
        self.unknown.insert(id, now + UNKNOWN_TTL_MS);
    }

    /// Verifies a signed upload of `id`'s agent (proof, binding, freshness) with its
    /// environment's state, in place.
    pub async fn verify_upload(
        self: &Arc<Self>,
        id: EnvId,
        frame: Bytes,
        edge_id: uuid::Uuid,
        timestamp_ms: u64,
    ) -> Result<(), CheckinError> {
        self.verify_signed(
            proto::proof::Route::Snapshot,
            id,
            &frame,
            edge_id,
            timestamp_ms,
        )
        .await
    }

    /// Verifies a signed request of `id`'s agent to `route` that carries its Edge ID and
    /// full timestamp (proof, binding, freshness), in place.
    pub async fn verify_signed(
        self: &Arc<Self>,
        route: proto::proof::Route,
        id: EnvId,
        frame: &[u8],
        edge_id: uuid::Uuid,
        timestamp_ms: u64,
    ) -> Result<(), CheckinError> {
        let handle = self.actor(id).await?;
        let checked =
            handle
                .gate
                .read()
                .check_signed(route, frame, edge_id, timestamp_ms, now_ms());
        checked.map_err(|refusal| self.refused_early(id, refusal))
    }

    /// Wanted for good or not at all (tests and tools); operators' requests use
    /// [`Self::ensure_tunnel`].
    pub async fn set_required(
        self: &Arc<Self>,
        id: EnvId,
        required: bool,
    ) -> Result<(), CheckinError> {
        let handle = self.actor(id).await?;
        handle
            .addr
            .send(actor::SetRequired(required))
            .await
            .map_err(|_| CheckinError::Busy(id))
    }

    /// Applies one change notification from the store.
    pub async fn apply(self: &Arc<Self>, change: &Change) {
        match change {
            Change::TunnelWanted { env, until_ms } => {
                self.wanted
                    .entry(*env)
                    .and_modify(|u| *u = (*u).max(*until_ms))
                    .or_insert(*until_ms);
                if let Some(addr) = self.actors.get(env).map(|h| h.addr.clone()) {
                    let _ = addr.send(WantTunnel(*until_ms)).await;
                }
            }
            Change::TunnelOpened(loc) => {
                let (env, epoch) = (loc.env, loc.epoch);
                self.note_open(loc.clone());
                if let Some(addr) = self.actors.get(&env).map(|h| h.addr.clone()) {
                    let _ = addr.send(TunnelEvent::Opened(epoch)).await;
                }
            }
            Change::TunnelClosed { env, epoch } => {
                self.tunnels.remove_if(env, |_, l| l.epoch == *epoch);
                if let Some(addr) = self.actors.get(env).map(|h| h.addr.clone()) {
                    let _ = addr.send(TunnelEvent::Closed(*epoch)).await;
                }
            }
            Change::Environment(id) => {
                self.epoch.fetch_add(1, Ordering::AcqRel);
                self.unknown.remove(id);
                self.modes.remove(id);
                self.reload(*id).await;
            }
            Change::EnvironmentDeleted(id) => {
                self.epoch.fetch_add(1, Ordering::AcqRel);
                self.modes.remove(id);
                self.stats.forget(*id);
                self.tunnels.remove(id);
                self.wanted.remove(id);
                self.tunnel_waiters.remove(id);
                if let Some((_, h)) = self.actors.remove(id) {
                    let _ = h.addr.send(Shutdown).await;
                }
            }
            Change::Settings => match self.store.settings().await {
                Ok(s) => self.defaults.set(&s),
                Err(e) => tracing::warn!(error = %e, "cannot reload settings"),
            },
            Change::AdminKeys => {}
            Change::Catalog | Change::EdgeStacks => self.reload_catalog().await,
            Change::Resync => {
                self.reload_catalog().await;
                // Notifications may have been missed (e.g. the store's pub/sub reconnected):
                // the settings, every live actor and the tunnel view may be stale.
                self.epoch.fetch_add(1, Ordering::AcqRel);
                self.tunnels.clear();
                self.modes.clear();
                match self.store.settings().await {
                    Ok(s) => self.defaults.set(&s),
                    Err(e) => tracing::warn!(error = %e, "cannot reload settings"),
                }
                self.reload_all().await;
            }
        }
    }

    async fn reload(self: &Arc<Self>, id: EnvId) {
        if !self.actors.contains_key(&id) {
            return;
        }
        match self.store.get_environment(id).await {
            Ok(env) => self.reloaded(id, env).await,
            Err(e) => self.not_reloaded(&[id], &e).await,
        }
    }

    /// Hands a live actor its record as read again (`None`: deleted meanwhile, it stops).
    async fn reloaded(self: &Arc<Self>, id: EnvId, env: Option<store::Environment>) {
        let Some(addr) = self.actors.get(&id).map(|h| h.addr.clone()) else {
            return;
        };
        match env {
            Some(env) => {
                let _ = addr.send(Reload(Box::new(env))).await;
            }
            None => {
                self.actors.remove(&id);
                self.stats.forget(id);
                let _ = addr.send(Shutdown).await;
            }
        }
    }

    /// Without the new record an actor could keep an old secret: stop it, so that the next
    /// check-in rebuilds it from the store.
    async fn not_reloaded(self: &Arc<Self>, ids: &[EnvId], e: &StoreError) {
        tracing::warn!(environments = ids.len(), error = %e, "cannot reload environments; dropping their actors");
        for id in ids {
            if let Some((_, h)) = self.actors.remove(id) {
                let _ = h.addr.send(Shutdown).await;
            }
        }
    }

    /// After a lagged notification stream: every actor reloads, its record read in batches
    /// (a replica holding 20,000 agents reads them in 20 round trips, not 20,000).
    pub async fn reload_all(self: &Arc<Self>) {
        let ids: Vec<EnvId> = self.actors.iter().map(|e| *e.key()).collect();
        for chunk in ids.chunks(1000) {
            match self.store.get_environments(chunk).await {
                Ok(envs) => {
                    for (id, env) in chunk.iter().zip(envs) {
                        self.reloaded(*id, env).await;
                    }
                }
                Err(e) => self.not_reloaded(chunk, &e).await,
            }
        }
        self.unknown.clear();
    }

    /// The edge stacks and groups as last read.
    pub fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.catalog.read())
    }

    /// The catalog, once one was read (`Busy` until then: the agent comes back).
    pub fn loaded_catalog(&self, id: EnvId) -> Result<Arc<Catalog>, CheckinError> {
        if self.catalog_loaded.load(Ordering::Acquire) {
            Ok(self.catalog())
        } else {
            Err(CheckinError::Busy(id))
        }
    }

    /// The stacks environment `id` should run now, by id.
    pub async fn stacks_of(self: &Arc<Self>, id: EnvId) -> Result<Vec<u64>, CheckinError> {
        let catalog = self.loaded_catalog(id)?;
        let handle = self.actor(id).await?;
        let inputs = handle.env.lock().inputs.clone();
        Ok(catalog
            .stacks_for(&inputs)
            .into_iter()
            .map(|(s, _)| s.id)
            .collect())
    }

    /// Reads edge stacks and groups again and gives every live environment its desired
    /// state's digest (answering held check-ins whose agents must hear of a change). On a
    /// store error the old catalog stays, and the next sweep tries again.
    pub async fn reload_catalog(&self) {
        let catalog = match Catalog::load(&self.store).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                self.metrics
                    .store_error(crate::metrics::StoreOp::LoadCatalog);
                tracing::warn!(error = %e, "cannot read edge stacks; will try again");
                self.catalog_stale.store(true, Ordering::Release);
                return;
            }
        };
        self.catalog_stale.store(false, Ordering::Release);
        *self.catalog.write() = Arc::clone(&catalog);
        self.catalog_loaded.store(true, Ordering::Release);
        self.catalog_epoch.fetch_add(1, Ordering::AcqRel);
        let envs: Vec<SharedEnv> = self.actors.iter().map(|h| Arc::clone(&h.env)).collect();
        for env in envs {
            let mut env = env.lock();
            let digest = catalog.digest(&env.inputs);
            env.set_desired(digest, self);
        }
    }

    /// Takes one of `id`'s stack requests (fetches and reports; a bucket of
    /// [`STACK_REQUEST_BURST`] refilled at one a second): `Busy` past it, so a misbehaving
    /// agent with a valid key cannot make the store render and write without bound.
    pub async fn take_stack_request(self: &Arc<Self>, id: EnvId) -> Result<(), CheckinError> {
        let handle = self.actor(id).await?;
        let now = now_ms();
        let mut env = handle.env.lock();
        if env.stack_requests.take(now) {
            Ok(())
        } else {
            Err(CheckinError::Busy(id))
        }
    }

    /// `id`'s agent reported holding the desired state with `digest`.
    pub async fn acknowledge(self: &Arc<Self>, id: EnvId, digest: u64) -> Result<(), CheckinError> {
        let handle = self.actor(id).await?;
        handle.env.lock().sync.acked = Some(digest);
        Ok(())
    }

    /// Queues the stack statuses `id`'s agent reported for the next batch write.
    pub fn record_statuses(
        &self,
        id: EnvId,
        states: &[proto::stacks::StackState],
    ) -> Result<(), CheckinError> {
        let mut pending = self.statuses.lock();
        if pending.len + states.len() > MAX_PENDING_STATUSES {
            return Err(CheckinError::Busy(id));
        }
        for s in states {
            let status = deploy_status(s.phase);
            self.metrics
                .stack_reports
                .with_label_values(&[crate::targets::status_name(status)])
                .inc();
            pending.put(
                s.stack_id,
                store::StackStatus {
                    env: id,
                    status,
                    version: s.version,
                    error: s.error.clone(),
                    updated_ms: s.at_ms,
                },
            );
        }
        Ok(())
    }

    /// Writes the queued stack statuses, one batch per stack. What fails is queued again
    /// (within the bound) for the next flush.
    pub async fn flush_statuses(&self) {
        let batch = std::mem::take(&mut *self.statuses.lock());
        for (stack, statuses) in batch.by_stack {
            let mut statuses: Vec<store::StackStatus> = statuses.into_values().collect();
            // A stack removed from a device leaves no status behind: the environment is no
            // longer one of the stack's (its counts are of its targets).
            let removed: Vec<EnvId> = statuses
                .iter()
                .filter(|s| s.status == store::DeployStatus::Removed)
                .map(|s| s.env)
                .collect();
            statuses.retain(|s| s.status != store::DeployStatus::Removed);
            if !removed.is_empty() {
                if let Err(e) = self.store.forget_stack_statuses(stack, &removed).await {
                    self.metrics
                        .store_error(crate::metrics::StoreOp::ForgetStackStatuses);
                    tracing::warn!(error = %e, stack, "cannot forget removed stack statuses");
                }
            }
            if statuses.is_empty() {
                continue;
            }
            if let Err(e) = self.store.record_stack_statuses(stack, &statuses).await {
                self.metrics
                    .store_error(crate::metrics::StoreOp::RecordStackStatuses);
                tracing::warn!(error = %e, stack, statuses = statuses.len(), "stack status write failed; will retry");
                let mut pending = self.statuses.lock();
                if pending.len + statuses.len() <= MAX_PENDING_STATUSES {
                    for s in statuses {
                        pending.put(stack, s);
                    }
                }
            }
        }
    }

    /// Stops actors that saw no check-in for the idle limit; their state is in the store.
    pub fn sweep_idle(&self, now: u64) {
        let idle_ms = self.limits.actor_idle.as_millis() as u64;
        let stale: Vec<EnvId> = self
            .actors
            .iter()
            .filter(|e| {
                // Actors that never saw a check-in here (no stats yet) are left alone.
                self.stats
                    .last_seen_ms(*e.key())
                    .is_some_and(|last| last + idle_ms < now)
            })
            .map(|e| *e.key())
            .collect();
        for id in stale {
            if let Some((_, h)) = self.actors.remove(&id) {
                let _ = h.addr.try_send(Shutdown);
            }
        }
        self.unknown.retain(|_, until| *until > now);
        self.wanted.retain(|_, until| *until > now);
        self.tunnel_waiters.retain(|_, n| Arc::strong_count(n) > 1);
    }

    fn actor_stopped(&self, id: EnvId, addr: &Addr<EnvActor>) {
        self.actors.remove_if(&id, |_, h| &h.addr == addr);
        self.metrics.actors.dec();
    }

    /// Writes pending heartbeats in one batch (chunked). Called every flush period and at
    /// shutdown.
    pub async fn flush_heartbeats(&self) {
        let beats = self.stats.take_dirty();
        if beats.is_empty() {
            return;
        }
        for chunk in beats.chunks(10_000) {
            let timer = self.metrics.heartbeat_flush_seconds.start_timer();
            self.metrics.heartbeat_batch.observe(chunk.len() as f64);
            if let Err(e) = self.store.record_heartbeats(chunk).await {
                self.metrics
                    .store_error(crate::metrics::StoreOp::RecordHeartbeats);
                tracing::warn!(error = %e, beats = chunk.len(), "heartbeat write failed; will retry");
                self.stats.unflush(chunk);
            }
            timer.observe_duration();
        }
    }

    /// Background duties: change notifications, heartbeat flushes, idle sweeps. Runs until
    /// `shutdown` resolves, then flushes once more.
    pub async fn run_background(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut changes = self.store.subscribe();
        self.reload_catalog().await;
        let mut flush = tokio::time::interval(self.limits.heartbeat_flush);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep =
            tokio::time::interval((self.limits.actor_idle / 4).max(Duration::from_secs(1)));
        let mut gateways = tokio::time::interval(GATEWAY_REFRESH);
        gateways.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = flush.tick() => {
                    self.flush_heartbeats().await;
                    self.flush_statuses().await;
                }
                _ = gateways.tick() => self.refresh_gateways().await,
                _ = sweep.tick() => {
                    self.sweep_idle(now_ms());
                    if self.catalog_stale.load(Ordering::Acquire) {
                        self.reload_catalog().await;
                    }
                }
                change = changes.recv() => match change {
                    Ok(change) => self.apply(&change).await,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "change notifications lagged; reloading everything");
                        self.apply(&Change::Resync).await;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        tracing::error!("change notification stream closed");
                        break;
                    }
                },
            }
        }
        self.flush_heartbeats().await;
        self.flush_statuses().await;
    }
}

/// A phase on the device as the store keeps it.
pub fn deploy_status(phase: proto::stacks::Phase) -> store::DeployStatus {
    use proto::stacks::Phase as P;
    use store::DeployStatus as S;
    match phase {
        P::Pending => S::Pending,
        P::Acknowledged => S::Acknowledged,
        P::ImagesPulled => S::ImagesPulled,
        P::Deploying => S::Deploying,
        P::Running => S::Running,
        P::Error => S::Error,
        P::Removing => S::Removing,
        P::Removed => S::Removed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_requests_are_a_burst_then_one_a_second() {
        let mut b = actor::Bucket::default();
        let t = 1_800_000_000_000;
        for _ in 0..STACK_REQUEST_BURST {
            assert!(b.take(t));
        }
        assert!(!b.take(t));
        assert!(!b.take(t + 999));
        assert!(b.take(t + 1000));
        assert!(!b.take(t + 1001));
        // A long pause refills the burst, no more.
        let later = t + 3_600_000;
        for _ in 0..STACK_REQUEST_BURST {
            assert!(b.take(later));
        }
        assert!(!b.take(later));
    }

    #[test]
    fn pending_statuses_keep_the_newest_report_of_each_environment() {
        let status = |env, updated_ms| store::StackStatus {
            env,
            status: store::DeployStatus::Running,
            version: 1,
            error: None,
            updated_ms,
        };
        let mut p = PendingStatuses::default();
        p.put(1, status(7, 10));
        p.put(1, status(7, 30));
        p.put(1, status(7, 20));
        p.put(1, status(8, 5));
        p.put(2, status(7, 5));
        assert_eq!(p.len, 3);
        assert_eq!(p.by_stack[&1][&7].updated_ms, 30);
    }

    #[test]
    fn holds_end_on_the_grid_never_early_and_at_most_one_step_late() {
        let now = tokio::time::Instant::now();
        let first = on_hold_grid(now);
        for ms in [0u64, 1, 7, 19, 20, 21, 4750, 4751] {
            let want = now + Duration::from_millis(ms);
            let got = on_hold_grid(want);
            assert!(got >= want, "{ms} ms: rounded earlier");
            assert!(got - want < HOLD_GRID, "{ms} ms: more than a step late");
            // Points of the grid are a whole number of steps apart.
            let apart = (got - first).as_nanos();
            assert_eq!(apart % HOLD_GRID.as_nanos(), 0, "{ms} ms: off the grid");
        }
        // Deadlines within one step share one wake-up.
        let a = on_hold_grid(first + Duration::from_millis(1));
        let b = on_hold_grid(first + Duration::from_millis(19));
        assert_eq!(a, b);
    }
}
