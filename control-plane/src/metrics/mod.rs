//! Aggregate Prometheus series (few label values) and the sharded per-agent exposition.
//!
//! `/metrics` stays small at any fleet size; per-agent series live on `/metrics/agents`,
//! which Prometheus scrapes in shards (`?shard=i&shards=n`, agent `id % n == i`), from the
//! per-environment counters in [`AgentStats`].

mod agents;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use gateway::admission::Admission;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub use agents::{render_agents, AgentStat, AgentStats};

pub struct Metrics {
    registry: Registry,
    pub checkins: IntCounterVec,
    /// `checkins` of the results every steady check-in counts, looked up once (a lookup by
    /// label hashes the label and takes a lock, per check-in), exported from the start.
    pub checkins_by_result: CheckinResults,
    pub checkin_seconds: Histogram,
    pub actors: IntGauge,
    /// Entries of the environments' held check-in queues, summed: live holds and ended ones
    /// not pruned yet (they go at the environment's next hold or offer).
    pub held_checkins: IntGauge,
    pub actor_starts: IntCounter,
    pub heartbeat_batch: Histogram,
    pub heartbeat_flush_seconds: Histogram,
    pub store_errors: IntCounterVec,
    pub admin_requests: IntCounterVec,
    pub docker_requests: IntCounterVec,
    pub tunnel_wait_seconds: Histogram,
    /// Docker calls that opened an engine connection (a tunnel stream) and that reused one.
    pub engine_connections_opened: IntCounter,
    pub engine_connections_reused: IntCounter,
    /// Engine connections kept idle for the next call (`engine_pool`).
    pub engine_idle: IntGauge,
    /// Async snapshot reports by kind (`full`, `delta`, `unchanged`) and outcome (`stored`,
    /// `need_full`, `bad`).
    pub async_snapshots: IntCounterVec,
    /// Async commands by event: `queued`, `delivered` (each hand-out, repeats included),
    /// `result_ok`, `result_failed` (results received, retries included).
    pub async_commands: IntCounterVec,
    /// Stack statuses agents reported, by status (exported for every status from the start).
    pub stack_reports: IntCounterVec,
    /// Desired states agents fetched, and those that could not be rendered for them.
    pub desired_fetches: IntCounterVec,
    /// Edge stacks by rollout state; per stack: its rollout's batch and released count.
    rollouts: prometheus::IntGaugeVec,
    rollout_batch: prometheus::IntGaugeVec,
    rollout_released: prometheus::IntGaugeVec,
    /// Environments per stack and status, for the version each stack's counts are of.
    stack_environments: prometheus::IntGaugeVec,
    /// The API port's connections refused by admission and let go at deadlines.
    pub front: crate::front::FrontMetrics,
    /// The public ports' admission, read at scrape time.
    admission: parking_lot::Mutex<Option<Arc<Admission>>>,
    /// The fleet's map sizes, read at scrape time (`None` once the fleet is gone).
    fleet: parking_lot::Mutex<Option<FleetSizesFn>>,
    /// The allocator's own counts, read at scrape time (set by the binary that chose it).
    allocator: parking_lot::Mutex<Option<AllocatorStatsFn>>,
}

/// Reads the process's allocator, if the binary installed one that counts: `None` when it
/// cannot be read.
pub type AllocatorStatsFn = fn() -> Option<AllocatorStats>;

/// What the allocator holds, in bytes, as jemalloc counts it: what the program holds
/// (`allocated`), the pages those allocations sit in (`active`), what is in RAM (`resident`,
/// with freed pages not purged yet and the allocator's own `metadata`), and address space
/// kept mapped but given back (`retained`). `resident` against `allocated` tells memory the
/// program holds from memory the allocator has not returned yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    pub allocated: u64,
    pub active: u64,
    pub resident: u64,
    pub metadata: u64,
    pub mapped: u64,
    pub retained: u64,
}

type FleetSizesFn = Box<dyn Fn() -> Option<FleetSizes> + Send + Sync>;

/// The counters of [`Metrics::checkins`] for the common results.
pub struct CheckinResults {
    pub idle: IntCounter,
    pub held: IntCounter,
    pub required: IntCounter,
}

/// What the fleet keeps per environment besides its actor, counted at scrape time: each is
/// bounded by the environments known here (or, for `unknown`, by the negative cache).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FleetSizes {
    /// Open tunnels as the gateways reported them.
    pub tunnels: usize,
    /// Environments with proxy requests waiting for a tunnel (or whose waiter is not swept yet).
    pub tunnel_waiters: usize,
    /// Operators' wishes for tunnels not yet served or swept.
    pub wanted: usize,
    /// The negative cache of unknown environment ids.
    pub unknown: usize,
    /// Edge modes of environments that Docker calls went to.
    pub modes: usize,
    /// Check-ins (and uploads) inside an actor's in-flight slots, summed over environments.
    pub in_flight: usize,
}

const ROLLOUT_STATES: [&str; 6] = [
    "idle",
    "rolling",
    "paused",
    "rollingBack",
    "done",
    "aborted",
];

fn rollout_state_name(s: store::RolloutState) -> &'static str {
    use store::RolloutState as S;
    match s {
        S::Idle => "idle",
        S::Rolling => "rolling",
        S::Paused => "paused",
        S::RollingBack => "rollingBack",
        S::Done => "done",
        S::Aborted => "aborted",
    }
}

fn must<T>(r: Result<T, prometheus::Error>) -> T {
    // Metric definitions are static; a failure here is a programming error caught by tests.
    r.unwrap_or_else(|e| panic!("invalid metric definition: {e}"))
}

/// The store operations whose failures `edgeplane_store_errors_total{op}` counts (the
/// background writes and reads that have no request to answer with an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    GetEnvironment,
    LoadCatalog,
    PutTunnelGrant,
    RecordHeartbeats,
    RecordStackStatuses,
    ForgetStackStatuses,
    Rollouts,
}

impl StoreOp {
    pub const ALL: [Self; 7] = [
        Self::GetEnvironment,
        Self::LoadCatalog,
        Self::PutTunnelGrant,
        Self::RecordHeartbeats,
        Self::RecordStackStatuses,
        Self::ForgetStackStatuses,
        Self::Rollouts,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::GetEnvironment => "get_environment",
            Self::LoadCatalog => "load_catalog",
            Self::PutTunnelGrant => "put_tunnel_grant",
            Self::RecordHeartbeats => "record_heartbeats",
            Self::RecordStackStatuses => "record_stack_statuses",
            Self::ForgetStackStatuses => "forget_stack_statuses",
            Self::Rollouts => "rollouts",
        }
    }
}

/// Label values of the labelled counters, each series exported at 0 from the start: an alert
/// on `increase()` must see the first one, and a dashboard shows 0 rather than nothing.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const SNAPSHOT_KINDS: [&str; 3] = ["full", "delta", "unchanged"];
const SNAPSHOT_OUTCOMES: [&str; 4] = ["stored", "kept_newer", "need_full", "bad"];
const COMMAND_EVENTS: [&str; 4] = ["queued", "delivered", "result_ok", "result_failed"];
const TIMEOUT_STAGES: [&str; 4] = ["first_byte", "first_request", "agent_body", "next_request"];
const BODY_DROPS: [&str; 2] = ["full", "slowest"];

/// The `class` label of a status code (`edgeplane_api_requests_total`,
/// `edgeplane_docker_proxy_requests_total`).
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Metrics {
    /// Counts a failed store operation.
    pub fn store_error(&self, op: StoreOp) {
        self.store_errors.with_label_values(&[op.label()]).inc();
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        let checkins = must(IntCounterVec::new(
            Opts::new(
                "edgeplane_checkin_requests_total",
                "Agent check-ins by result",
            ),
            &["result"],
        ));
        let checkin_seconds = must(Histogram::with_opts(
            HistogramOpts::new(
                "edgeplane_checkin_duration_seconds",
                "Server time to answer a check-in",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
            ]),
        ));
        let actors = must(IntGauge::new(
            "edgeplane_fleet_actors",
            "Environment actors alive",
        ));
        let held_checkins = must(IntGauge::new(
            "edgeplane_fleet_held_checkins",
            "Entries of the environments' held check-in queues, summed: live holds plus ended ones not pruned yet (pruned at each hold and offer)",
        ));
        let actor_starts = must(IntCounter::new(
            "edgeplane_fleet_actor_starts_total",
            "Environment actors started (loaded from the store)",
        ));
        let heartbeat_batch = must(Histogram::with_opts(
            HistogramOpts::new(
                "edgeplane_store_heartbeat_batch_size",
                "Heartbeats per write-behind batch",
            )
            .buckets(vec![1.0, 10.0, 100.0, 1000.0, 5000.0, 20000.0, 100000.0]),
        ));
        let heartbeat_flush_seconds = must(Histogram::with_opts(HistogramOpts::new(
            "edgeplane_store_heartbeat_flush_duration_seconds",
            "Time to write one heartbeat batch",
        )));
        let store_errors = must(IntCounterVec::new(
            Opts::new(
                "edgeplane_store_errors_total",
                "Store operations that failed",
            ),
            &["op"],
        ));
        let admin_requests = must(IntCounterVec::new(
            Opts::new(
                "edgeplane_api_requests_total",
                "Admin API requests by status class",
            ),
            &["class"],
        ));
        let docker_requests = must(IntCounterVec::new(
            Opts::new(
                "edgeplane_docker_proxy_requests_total",
                "Docker API requests through the proxy (every call, hijacked or not), by status class of the answer",
            ),
            &["class"],
        ));
        let tunnel_wait_seconds = must(Histogram::with_opts(
            HistogramOpts::new(
                "edgeplane_tunnel_wait_seconds",
                "Time a Docker API request waited for a usable tunnel (0 when one was open)",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        ));
        let engine_connections = must(IntCounterVec::new(
            Opts::new(
                "edgeplane_docker_engine_connections_total",
                "Docker calls by how they reached the engine: over a new tunnel stream and \
                 engine connection (opened) or an idle one kept from a call before (reused)",
            ),
            &["how"],
        ));
        let engine_idle = must(IntGauge::new(
            "edgeplane_docker_engine_connections_idle",
            "Engine connections (each a tunnel stream) kept idle for the next Docker call",
        ));
        let async_snapshots = must(IntCounterVec::new(
            Opts::new(
                "edgeplane_async_snapshot_reports_total",
                "Async snapshot reports by kind (full, delta, unchanged) and outcome (stored, kept_newer: older than the one stored, need_full, bad)",
            ),
            &["kind", "outcome"],
        ));
        let async_commands = must(IntCounterVec::new(
            Opts::new(
                "edgeplane_async_commands_total",
                "Async commands queued, handed out, and results received",
            ),
            &["event"],
        ));
        let stack_reports = must(IntCounterVec::new(
            Opts::new(
                "edgeplane_stack_status_reports_total",
                "Edge stack statuses reported by agents, by status",
            ),
            &["status"],
        ));
        for s in store::DeployStatus::ALL {
            stack_reports.with_label_values(&[crate::targets::status_name(s)]);
        }
        let desired_fetches = must(IntCounterVec::new(
            Opts::new(
                "edgeplane_desired_state_fetches_total",
                "Desired stack states fetched by agents (ok), and stacks that could not be rendered for an environment (render_error)",
            ),
            &["outcome"],
        ));
        for o in ["ok", "render_error"] {
            desired_fetches.with_label_values(&[o]);
        }
        let rollouts = must(prometheus::IntGaugeVec::new(
            Opts::new(
                "edgeplane_edge_stack_rollouts",
                "Edge stacks by the state of their rollout",
            ),
            &["state"],
        ));
        for st in ROLLOUT_STATES {
            rollouts.with_label_values(&[st]);
        }
        let rollout_batch = must(prometheus::IntGaugeVec::new(
            Opts::new(
                "edgeplane_edge_stack_rollout_batch",
                "The batch an edge stack's rollout is at (1 for the first)",
            ),
            &["stack"],
        ));
        let rollout_released = must(prometheus::IntGaugeVec::new(
            Opts::new(
                "edgeplane_edge_stack_rollout_released_environments",
                "Environments an edge stack's rollout released to its target version so far",
            ),
            &["stack"],
        ));
        let stack_environments = must(prometheus::IntGaugeVec::new(
            Opts::new(
                "edgeplane_edge_stack_environments",
                "Environments of an edge stack by deployment status, for its rollout's target version (pending: targeted, nothing reported for it)",
            ),
            &["stack", "status"],
        ));
        let api_connections_refused = must(IntCounterVec::new(
            Opts::new(
                "edgeplane_api_connections_refused_total",
                "Connections to the API port dropped at once by admission, by reason",
            ),
            &["reason"],
        ));
        let api_connections_timed_out = must(IntCounterVec::new(
            Opts::new(
                "edgeplane_api_connections_timed_out_total",
                "Connections to the API port let go at a deadline, by stage: first_byte (nothing \
                 sent), first_request (no TLS and first head in time), agent_body (an agent's first \
                 body stalled), next_request (a kept-alive connection's next head not complete \
                 in time)",
            ),
            &["stage"],
        ));
        let api_pending_body_bytes = must(IntGauge::new(
            "edgeplane_api_pending_body_bytes",
            "Bytes buffered now for agents' first request bodies that proved nothing yet \
             (bounded by --max-pending-body-bytes)",
        ));
        let api_pending_bodies_dropped = must(IntCounterVec::new(
            Opts::new(
                "edgeplane_api_pending_bodies_dropped_total",
                "Agents' first request bodies answered 503 for the pending body budget: full \
                 (refused, nothing slower to let go), slowest (let go for a faster one)",
            ),
            &["why"],
        ));
        for code in proto::RefusalCode::KNOWN {
            checkins.with_label_values(&[code.kind()]);
        }
        checkins.with_label_values(&["error"]);
        for op in StoreOp::ALL {
            store_errors.with_label_values(&[op.label()]);
        }
        for class in STATUS_CLASSES {
            docker_requests.with_label_values(&[class]);
            admin_requests.with_label_values(&[class]);
        }
        for kind in SNAPSHOT_KINDS {
            for outcome in SNAPSHOT_OUTCOMES {
                async_snapshots.with_label_values(&[kind, outcome]);
            }
        }
        for event in COMMAND_EVENTS {
            async_commands.with_label_values(&[event]);
        }
        for reason in gateway::admission::Refused::ALL {
            api_connections_refused.with_label_values(&[reason.label()]);
        }
        for stage in TIMEOUT_STAGES {
            api_connections_timed_out.with_label_values(&[stage]);
        }
        for why in BODY_DROPS {
            api_pending_bodies_dropped.with_label_values(&[why]);
        }
        for c in [
            Box::new(must(gateway::metrics::ProcessCollector::new(
                "control-plane",
            ))) as Box<dyn prometheus::core::Collector>,
            Box::new(checkins.clone()),
            Box::new(api_pending_body_bytes.clone()),
            Box::new(api_pending_bodies_dropped.clone()),
            Box::new(api_connections_refused.clone()),
            Box::new(api_connections_timed_out.clone()),
            Box::new(async_snapshots.clone()),
            Box::new(async_commands.clone()),
            Box::new(stack_reports.clone()),
            Box::new(desired_fetches.clone()),
            Box::new(rollouts.clone()),
            Box::new(rollout_batch.clone()),
            Box::new(rollout_released.clone()),
            Box::new(stack_environments.clone()),
            Box::new(docker_requests.clone()),
            Box::new(tunnel_wait_seconds.clone()),
            Box::new(engine_connections.clone()),
            Box::new(engine_idle.clone()),
            Box::new(checkin_seconds.clone()),
            Box::new(actors.clone()),
            Box::new(held_checkins.clone()),
            Box::new(actor_starts.clone()),
            Box::new(heartbeat_batch.clone()),
            Box::new(heartbeat_flush_seconds.clone()),
            Box::new(store_errors.clone()),
            Box::new(admin_requests.clone()),
        ] {
            must(registry.register(c));
        }
        Self {
            registry,
            checkins_by_result: CheckinResults {
                idle: checkins.with_label_values(&["idle"]),
                held: checkins.with_label_values(&["held"]),
                required: checkins.with_label_values(&["required"]),
            },
            checkins,
            checkin_seconds,
            actors,
            held_checkins,
            actor_starts,
            heartbeat_batch,
            heartbeat_flush_seconds,
            store_errors,
            admin_requests,
            docker_requests,
            tunnel_wait_seconds,
            engine_connections_opened: engine_connections.with_label_values(&["opened"]),
            engine_connections_reused: engine_connections.with_label_values(&["reused"]),
            engine_idle,
            async_snapshots,
            async_commands,
            stack_reports,
            desired_fetches,
            rollouts,
            rollout_batch,
            rollout_released,
            stack_environments,
            front: crate::front::FrontMetrics {
                refused: api_connections_refused,
                timed_out: api_connections_timed_out,
                pending_body_bytes: api_pending_body_bytes,
                pending_bodies_dropped: api_pending_bodies_dropped,
            },
            admission: parking_lot::Mutex::new(None),
            fleet: parking_lot::Mutex::new(None),
            allocator: parking_lot::Mutex::new(None),
        }
    }

    /// The rollouts as the controller last saw them (stacks gone are dropped).
    pub fn set_rollouts(&self, rollouts: &[(u64, store::Rollout)]) {
        self.rollout_batch.reset();
        self.rollout_released.reset();
        for st in ROLLOUT_STATES {
            self.rollouts.with_label_values(&[st]).set(0);
        }
        for (id, r) in rollouts {
            let stack = id.to_string();
            self.rollout_batch
                .with_label_values(&[&stack])
                .set(i64::from(r.batch));
            self.rollout_released
                .with_label_values(&[&stack])
                .set(i64::try_from(r.released).unwrap_or(i64::MAX));
            self.rollouts
                .with_label_values(&[rollout_state_name(r.state)])
                .inc();
        }
    }

    /// Every stack's environments by status (`counts`: stack id, then status name to count).
    pub fn set_stack_environments(&self, counts: &[(u64, BTreeMap<&'static str, u64>)]) {
        self.stack_environments.reset();
        for (id, by_status) in counts {
            let stack = id.to_string();
            for s in store::DeployStatus::ALL {
                let name = crate::targets::status_name(s);
                let n = by_status.get(name).copied().unwrap_or(0);
                self.stack_environments
                    .with_label_values(&[&stack, name])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    /// Reads the allocator's counts into every scrape.
    pub fn watch_allocator(&self, stats: AllocatorStatsFn) {
        *self.allocator.lock() = Some(stats);
    }

    /// Reads the connection counts of `admission` into every scrape.
    pub fn watch_admission(&self, admission: Arc<Admission>) {
        *self.admission.lock() = Some(admission);
    }

    /// Reads the fleet's map sizes into every scrape (`sizes` answers `None` once the fleet is
    /// gone; nothing is written then).
    pub fn watch_fleet(&self, sizes: impl Fn() -> Option<FleetSizes> + Send + Sync + 'static) {
        *self.fleet.lock() = Some(Box::new(sizes));
    }

    /// The registry, for parts that register their own series (the embedded gateway).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The aggregate exposition, plus fleet-wide gauges computed at scrape time.
    pub fn render(&self, stats: &AgentStats, now_ms: u64) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        let mut text = String::from_utf8(out).unwrap_or_default();
        let (seen, recent) = stats.counts(now_ms, 60_000);
        if let Some(admission) = self.admission.lock().as_ref() {
            let c = admission.counts();
            let _ = writeln!(
                text,
                "# HELP edgeplane_connections_open Connections held now on the public ports (API and embedded gateway)\n\
                 # TYPE edgeplane_connections_open gauge\nedgeplane_connections_open {}\n\
                 # HELP edgeplane_connections_pending Of those, connections that proved nothing yet\n\
                 # TYPE edgeplane_connections_pending gauge\nedgeplane_connections_pending {}\n\
                 # HELP edgeplane_connections_evicted_total Pending connections let go to make room for newer ones (every pending place taken)\n\
                 # TYPE edgeplane_connections_evicted_total counter\nedgeplane_connections_evicted_total {}",
                c.connections, c.pending, c.evicted
            );
        }
        if let Some(f) = self.fleet.lock().as_ref().and_then(|sizes| sizes()) {
            let _ = writeln!(
                text,
                "# HELP edgeplane_fleet_entries Entries of the fleet's per-environment maps besides the actors: tunnels (open, as reported), tunnel_waiters (environments with proxy requests waiting), wanted (tunnel wishes), unknown (negative cache), modes (of environments Docker calls went to)\n\
                 # TYPE edgeplane_fleet_entries gauge\n\
                 edgeplane_fleet_entries{{map=\"tunnels\"}} {}\n\
                 edgeplane_fleet_entries{{map=\"tunnel_waiters\"}} {}\n\
                 edgeplane_fleet_entries{{map=\"wanted\"}} {}\n\
                 edgeplane_fleet_entries{{map=\"unknown\"}} {}\n\
                 edgeplane_fleet_entries{{map=\"modes\"}} {}\n\
                 # HELP edgeplane_fleet_checkins_in_flight Check-ins and uploads holding one of their environment's in-flight slots, summed\n\
                 # TYPE edgeplane_fleet_checkins_in_flight gauge\nedgeplane_fleet_checkins_in_flight {}",
                f.tunnels, f.tunnel_waiters, f.wanted, f.unknown, f.modes, f.in_flight
            );
        }
        let allocator = *self.allocator.lock();
        if let Some(a) = allocator.and_then(|read| read()) {
            for (name, help, v) in [
                (
                    "allocated",
                    "Bytes the program holds, as the allocator counts them",
                    a.allocated,
                ),
                (
                    "active",
                    "Bytes of the allocator's pages in use (allocations and their slack)",
                    a.active,
                ),
                (
                    "resident",
                    "Bytes of the allocator's pages in RAM, metadata included (an upper bound)",
                    a.resident,
                ),
                (
                    "metadata",
                    "Bytes of the allocator's own bookkeeping",
                    a.metadata,
                ),
                (
                    "mapped",
                    "Bytes of the allocator's mappings in use",
                    a.mapped,
                ),
                (
                    "retained",
                    "Bytes of address space the allocator keeps mapped but gave back to the OS",
                    a.retained,
                ),
            ] {
                let _ = writeln!(
                    text,
                    "# HELP edgeplane_allocator_{name}_bytes {help}\n\
                     # TYPE edgeplane_allocator_{name}_bytes gauge\n\
                     edgeplane_allocator_{name}_bytes {v}"
                );
            }
        }
        let _ = writeln!(
            text,
            "# HELP edgeplane_fleet_agents_seen Environments that checked in at this replica since it started\n\
             # TYPE edgeplane_fleet_agents_seen gauge\nedgeplane_fleet_agents_seen {seen}\n\
             # HELP edgeplane_fleet_agents_recent Environments that checked in here within the last minute\n\
             # TYPE edgeplane_fleet_agents_recent gauge\nedgeplane_fleet_agents_recent {recent}"
        );
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn fleet_sizes_and_held_check_ins_are_in_every_scrape() {
        let m = Metrics::new();
        let stats = AgentStats::default();
        let text = m.render(&stats, 0);
        assert_eq!(sample(&text, "edgeplane_fleet_held_checkins"), Some(0.0));
        assert_eq!(
            sample(&text, "edgeplane_fleet_entries{map=\"wanted\"}"),
            None,
            "no fleet watched yet"
        );
        let sizes = Arc::new(parking_lot::Mutex::new(Some(FleetSizes {
            tunnels: 1,
            tunnel_waiters: 2,
            wanted: 3,
            unknown: 4,
            modes: 6,
            in_flight: 5,
        })));
        let read = Arc::clone(&sizes);
        m.watch_fleet(move || *read.lock());
        m.held_checkins.add(7);
        let text = m.render(&stats, 0);
        for (name, want) in [
            ("edgeplane_fleet_entries{map=\"tunnels\"}", 1.0),
            ("edgeplane_fleet_entries{map=\"tunnel_waiters\"}", 2.0),
            ("edgeplane_fleet_entries{map=\"wanted\"}", 3.0),
            ("edgeplane_fleet_entries{map=\"unknown\"}", 4.0),
            ("edgeplane_fleet_entries{map=\"modes\"}", 6.0),
            ("edgeplane_fleet_checkins_in_flight", 5.0),
            ("edgeplane_fleet_held_checkins", 7.0),
        ] {
            assert_eq!(sample(&text, name), Some(want), "{name} in\n{text}");
        }
        // The fleet is gone: its lines are left out, the rest still renders.
        *sizes.lock() = None;
        let text = m.render(&stats, 0);
        assert_eq!(sample(&text, "edgeplane_fleet_checkins_in_flight"), None);
        assert!(text.contains("edgeplane_fleet_agents_seen 0"));
    }

    #[test]
    fn allocator_counts_are_in_every_scrape_once_watched() {
        let m = Metrics::new();
        let stats = AgentStats::default();
        let text = m.render(&stats, 0);
        assert!(!text.contains("edgeplane_allocator_"), "none watched yet");
        m.watch_allocator(|| {
            Some(AllocatorStats {
                allocated: 1,
                active: 2,
                resident: 3,
                metadata: 4,
                mapped: 5,
                retained: 6,
            })
        });
        let text = m.render(&stats, 0);
        for (kind, want) in [
            ("allocated", 1.0),
            ("active", 2.0),
            ("resident", 3.0),
            ("metadata", 4.0),
            ("mapped", 5.0),
            ("retained", 6.0),
        ] {
            let name = format!("edgeplane_allocator_{kind}_bytes");
            assert_eq!(sample(&text, &name), Some(want), "{name} in\n{text}");
        }
        // An allocator that cannot be read leaves its lines out, the rest still renders.
        m.watch_allocator(|| None);
        let text = m.render(&stats, 0);
        assert!(!text.contains("edgeplane_allocator_"));
        assert!(text.contains("edgeplane_fleet_agents_seen 0"));
    }
}
