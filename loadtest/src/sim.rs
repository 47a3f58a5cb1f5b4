//! The simulated agents: one tokio task and one kept-alive connection each, built on the
//! agent's own [`PollClient`], so the load test measures the real client.
//!
//! Plain agents poll `/edge/c` at a fixed rate. Held agents ([`SimPlan::held`]) check in like
//! the real agent's loop: a plain check-in first (and after an error), then held check-ins on
//! `/edge/h`, each due one interval after the previous one was *sent* (at once if its answer
//! came later), so a held agent costs one request and one answer per interval too. Async
//! agents ([`SimPlan::async_mode`]) post one merged tick per interval to `/edge/a`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use edge_agent::client::{agent_info, AsyncTick};
use edge_agent::docker::{DockerClient, DockerHost};
use edge_agent::home::Home;
use edge_agent::retry::{after_failure, retry_delay, Backoff};
use edge_agent::tunnel::{self, CredentialSlot, TunnelSettings};
use edge_agent::{ByteCounters, CheckinRoute, PollClient, PollOptions};
use hdrhistogram::Histogram;
use parking_lot::{Mutex, MutexGuard};
use proto::async_mode::SnapshotReport;
use proto::seal::SealKey;
use proto::snapshot::{Container, EngineInfo, Snapshot, COMPOSE_PROJECT_LABEL};
use proto::JoinToken;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::Tunnels;
use crate::report::{new_latency_histogram, SimResult};

/// When things happen, shared by every agent (and every worker process).
#[derive(Debug, Clone, Copy)]
pub struct Timeline {
    /// First check-ins are spread over `[start, ramp_end)`.
    pub start: Instant,
    /// The steady window is `[ramp_end, end]`.
    pub ramp_end: Instant,
    pub end: Instant,
}

impl Timeline {
    pub fn new(start: Instant, ramp: Duration, duration: Duration) -> Self {
        Self {
            start,
            ramp_end: start + ramp,
            end: start + ramp + duration,
        }
    }
}

/// A slice of agents to simulate in this process.
#[derive(Debug, Clone)]
pub struct SimPlan {
    pub tokens: Vec<JoinToken>,
    pub interval: Duration,
    pub timeline: Timeline,
    /// Local addresses to spread the agents over; empty: let the OS choose.
    pub sources: Vec<IpAddr>,
    /// Index of this slice's first agent in the whole run (keeps the spread even across workers).
    pub first_index: usize,
    /// Held check-ins (see the module docs).
    pub held: bool,
    /// Async agents (see [`async_loop`]).
    pub async_mode: bool,
    /// Held agents keep the real agent's tunnel too (see [`simulate`]).
    pub tunnels: Option<Tunnels>,
    /// How long a simulated stack deployment takes (see [`sync_stacks`]).
    pub stack_deploy: Duration,
}

/// How much shorter than the interval the server holds an idle held check-in
/// (`docs/protocol.md`: "up to the agent's interval (minus 250 ms)").
pub const HOLD_MARGIN: Duration = Duration::from_millis(250);

/// A held check-in answered more than this before the expected end of its hold was not held
/// (timers never fire early; the agent's clock starts before the server's).
pub const EARLY_TOLERANCE: Duration = Duration::from_millis(100);

/// How long the server holds an idle held check-in of an agent at `interval`.
pub fn expected_hold(interval: Duration) -> Duration {
    interval.saturating_sub(HOLD_MARGIN)
}

/// Counters the agents update while running; read by the progress display.
#[derive(Debug)]
pub struct Live {
    connected: AtomicI64,
    polls_total: AtomicU64,
    steady_polls: AtomicU64,
    errors: AtomicU64,
    /// Of those, refusals (the server said no: a 4xx with a code).
    refused: AtomicU64,
    handshake_bytes_sum: AtomicU64,
    handshakes: AtomicU64,
    steady_reconnects: AtomicU64,
    held_early: AtomicU64,
    /// Desired-state fetches, stack reports sent, and either of them failed.
    pub stack_fetches: AtomicU64,
    pub stack_reports: AtomicU64,
    pub stack_errors: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
    hold_overshoot_us: Mutex<Histogram<u64>>,
    errors_by_kind: Mutex<BTreeMap<&'static str, u64>>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            connected: AtomicI64::new(0),
            polls_total: AtomicU64::new(0),
            steady_polls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            handshake_bytes_sum: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            steady_reconnects: AtomicU64::new(0),
            held_early: AtomicU64::new(0),
            stack_fetches: AtomicU64::new(0),
            stack_reports: AtomicU64::new(0),
            stack_errors: AtomicU64::new(0),
            latency_us: Mutex::new(new_latency_histogram()),
            hold_overshoot_us: Mutex::new(new_latency_histogram()),
            errors_by_kind: Mutex::new(BTreeMap::new()),
        }
    }
}

/// What the progress bar shows (also sent by workers to their parent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub connected: i64,
    pub polls_total: u64,
    pub errors: u64,
    /// Of the errors, refusals (a 4xx with a code).
    #[serde(default)]
    pub refused: u64,
    pub p99_ms: f64,
}

impl Progress {
    /// Sums workers' progress; p99 is approximated by the worst worker's.
    pub fn sum<'a>(items: impl IntoIterator<Item = &'a Progress>) -> Progress {
        items
            .into_iter()
            .fold(Progress::default(), |acc, p| Progress {
                connected: acc.connected + p.connected,
                polls_total: acc.polls_total + p.polls_total,
                errors: acc.errors + p.errors,
                refused: acc.refused + p.refused,
                p99_ms: acc.p99_ms.max(p.p99_ms),
            })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

impl Live {
    pub fn progress(&self) -> Progress {
        let h = lock(&self.latency_us);
        Progress {
            connected: self.connected.load(Ordering::Relaxed),
            polls_total: self.polls_total.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            p99_ms: if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(0.99) as f64 / 1000.0
            },
        }
    }

    /// An agent's request succeeded: it counts as connected from now.
    fn came_up(&self, up: &mut bool) {
        if !*up {
            *up = true;
            self.connected.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An agent's request failed: counted by kind, and no longer connected.
    fn went_down(&self, up: &mut bool, err: &edge_agent::CheckinError) {
        if *up {
            *up = false;
            self.connected.fetch_sub(1, Ordering::Relaxed);
        }
        if matches!(err, edge_agent::CheckinError::Refused { .. }) {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        self.error(err.kind());
    }

    fn error(&self, kind: &'static str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.errors_by_kind).entry(kind).or_default() += 1;
    }
}

/// The local address of agent `index` (across the whole run).
pub fn source_for(sources: &[IpAddr], index: usize) -> Option<IpAddr> {
    if sources.is_empty() {
        None
    } else {
        Some(sources[index % sources.len()])
    }
}

/// `127.0.0.1 ..= 127.0.0.k` when `target_host` is IPv4 loopback (or `localhost`), else none.
pub fn loopback_sources(target_host: &str, k: u8) -> Vec<IpAddr> {
    let loopback = target_host == "localhost"
        || target_host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Vec::new();
    }
    (1..=k).map(|i| IpAddr::from([127, 0, 0, i])).collect()
}

/// Runs the agents of `plan` until the end of its timeline. With [`SimPlan::tunnels`], each
/// agent also runs the real agent's tunnel supervisor: credentials from its check-ins open a
/// tunnel to a gateway (from the agent's source address), whose streams go to the engine.
pub async fn simulate(plan: SimPlan, live: Arc<Live>) -> anyhow::Result<SimResult> {
    let agents = plan.tokens.len();
    // One TLS configuration per server certificate (see `cached`), for check-ins and tunnels.
    let mut tls: HashMap<[u8; 32], Arc<rustls::ClientConfig>> = HashMap::new();
    let mut tunnel_tls: HashMap<[u8; 32], Arc<rustls::ClientConfig>> = HashMap::new();
    let engine = match &plan.tunnels {
        Some(t) => {
            Some(DockerHost::parse(&t.engine).with_context(|| "--tunnel-engine".to_owned())?)
        }
        None => None,
    };
    let stop_tunnels = CancellationToken::new();
    let mut supervisors = Vec::new();
    let mut counters = Vec::with_capacity(agents);
    let mut tasks = Vec::with_capacity(agents);
    let ramp = plan
        .timeline
        .ramp_end
        .saturating_duration_since(plan.timeline.start);
    for (i, token) in plan.tokens.iter().enumerate() {
        let index = plan.first_index + i;
        let config = cached(&mut tls, token.tunnel_fingerprint, |fp| {
            edge_agent::tls::client_config(fp, false)
        })?;
        let edge_id = uuid::Uuid::new_v4();
        let mut options = PollOptions::new(edge_id);
        options.local_addr = source_for(&plan.sources, index);
        options.tls_config = Some(config);
        options.initial_interval = plan.interval;
        options.agent_info = agent_info(format!("lt-agent-{index}"));
        counters.push(options.counters.clone());
        let local_addr = options.local_addr;
        let client = PollClient::new(token, options)
            .with_context(|| format!("agent {index}: cannot build its client"))?;
        let slot = match (&plan.tunnels, &engine) {
            (Some(t), Some(docker)) if !plan.async_mode => {
                let tls = cached(
                    &mut tunnel_tls,
                    token.tunnel_fingerprint,
                    edge_agent::tls::tunnel_config,
                )?;
                let settings = TunnelSettings {
                    endpoint_id: token.endpoint_id,
                    edge_id,
                    seal: SealKey::derive(&token.secret, &edge_id),
                    default_gateway: token.tunnel_addr.clone(),
                    tls,
                    docker: docker.clone(),
                    inactivity_timeout: t.inactivity,
                    local_addr,
                };
                let home = Arc::new(Home::new(&client, DockerClient::new(docker.clone())));
                let slot = Arc::new(CredentialSlot::default());
                supervisors.push(tokio::spawn(tunnel::supervise(
                    settings,
                    home,
                    slot.clone(),
                    stop_tunnels.clone(),
                )));
                Some(slot)
            }
            _ => None,
        };
        let offset_ms = u64::try_from(ramp.as_millis()).unwrap_or(u64::MAX);
        let first = plan.timeline.start
            + Duration::from_millis(rand::thread_rng().gen_range(0..offset_ms.max(1)));
        if plan.async_mode {
            tasks.push(tokio::spawn(async_loop(
                client,
                first,
                plan.timeline,
                live.clone(),
            )));
        } else {
            tasks.push(tokio::spawn(agent_loop(
                client,
                first,
                plan.timeline,
                plan.held,
                slot,
                plan.stack_deploy,
                live.clone(),
            )));
        }
    }

    tokio::time::sleep_until(plan.timeline.ramp_end).await;
    let window_start = Instant::now();
    let before = sum_bytes(&counters);
    let cpu_before = crate::server::cpu_seconds(std::process::id());
    tokio::time::sleep_until(plan.timeline.end).await;
    let after = sum_bytes(&counters);
    let cpu_after = crate::server::cpu_seconds(std::process::id());
    let steady_secs = window_start.elapsed().as_secs_f64();

    for task in tasks {
        // A panicked agent task is a bug worth seeing, but not worth losing the run for.
        if let Err(e) = task.await {
            tracing::error!(error = %e, "agent task failed");
        }
    }
    // Tunnels close with `Closing(Shutdown)`, as when an agent stops.
    stop_tunnels.cancel();
    for task in supervisors {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "tunnel supervisor failed");
        }
    }

    let mut result = SimResult::empty(agents as u64);
    result.connected = u64::try_from(live.connected.load(Ordering::Relaxed)).unwrap_or(0);
    result.polls = live.steady_polls.load(Ordering::Relaxed);
    result.polls_total = live.polls_total.load(Ordering::Relaxed);
    result.errors = live.errors.load(Ordering::Relaxed);
    result.errors_by_kind = lock(&live.errors_by_kind)
        .iter()
        .map(|(k, v)| ((*k).to_owned(), *v))
        .collect();
    result.latency_us = lock(&live.latency_us).clone();
    result.steady_bytes_read = after.0.saturating_sub(before.0);
    result.steady_bytes_written = after.1.saturating_sub(before.1);
    result.handshake_bytes_sum = live.handshake_bytes_sum.load(Ordering::Relaxed);
    result.handshakes = live.handshakes.load(Ordering::Relaxed);
    result.steady_reconnects = live.steady_reconnects.load(Ordering::Relaxed);
    result.steady_secs = steady_secs;
    result.held_early = live.held_early.load(Ordering::Relaxed);
    result.hold_overshoot_us = lock(&live.hold_overshoot_us).clone();
    result.client_cpu_seconds = cpu_before.zip(cpu_after).map(|(a, b)| (b - a).max(0.0));
    Ok(result)
}

/// The TLS configuration for `fingerprint` from `cache`, built by `build` the first time: one
/// per server certificate shares parsed roots and the resumption cache.
fn cached<E>(
    cache: &mut HashMap<[u8; 32], Arc<rustls::ClientConfig>>,
    fingerprint: [u8; 32],
    build: impl FnOnce([u8; 32]) -> Result<Arc<rustls::ClientConfig>, E>,
) -> Result<Arc<rustls::ClientConfig>, E> {
    if let Some(c) = cache.get(&fingerprint) {
        return Ok(c.clone());
    }
    let c = build(fingerprint)?;
    cache.insert(fingerprint, c.clone());
    Ok(c)
}

fn sum_bytes(counters: &[Arc<ByteCounters>]) -> (u64, u64) {
    counters.iter().fold((0, 0), |(r, w), c| {
        let s = c.snapshot();
        (r + s.read, w + s.written)
    })
}

/// One agent: first check-in at `first`, then every interval the server asks for, with the
/// agent's own retry policy on errors, until the end of the timeline. `held`: held check-ins
/// once settled, scheduled from their send time (see the module docs). `tunnel`: where tunnel
/// credentials go (the agent's tunnel supervisor).
async fn agent_loop(
    mut client: PollClient,
    first: Instant,
    timeline: Timeline,
    held: bool,
    tunnel: Option<Arc<CredentialSlot>>,
    stack_deploy: Duration,
    live: Arc<Live>,
) {
    let mut stacks = SimStacks::default();
    let mut backoff = Backoff::default();
    let mut next = first;
    let mut up = false;
    let mut connected_once = false;
    while next < timeline.end {
        tokio::time::sleep_until(next).await;
        // As the real agent: plain until the first success and after an error, then held.
        let route = if held && up {
            CheckinRoute::Held
        } else {
            CheckinRoute::Plain
        };
        // The interval the request reports, which the server's hold follows.
        let hold = expected_hold(client.interval());
        let started = Instant::now();
        let result = tokio::select! {
            result = client.checkin_via(route) => result,
            () = tokio::time::sleep_until(timeline.end) => break,
        };
        let done = Instant::now();
        let steady = started >= timeline.ramp_end && done <= timeline.end;
        match result {
            Ok(mut outcome) => {
                // An answer that brings credentials ends its hold early on purpose.
                let credentials = outcome.tunnel.take();
                let asked = credentials.is_some();
                if let (Some(slot), Some(sealed)) = (&tunnel, credentials) {
                    slot.put(sealed);
                }
                if let Some(conn) = outcome.connection {
                    if !connected_once {
                        live.handshake_bytes_sum
                            .fetch_add(conn.handshake_bytes, Ordering::Relaxed);
                        live.handshakes.fetch_add(1, Ordering::Relaxed);
                    } else if started >= timeline.ramp_end {
                        live.steady_reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    connected_once = true;
                }
                live.came_up(&mut up);
                live.polls_total.fetch_add(1, Ordering::Relaxed);
                if let Some(digest) = outcome.desired {
                    sync_stacks(&mut client, &mut stacks, digest, stack_deploy, &live).await;
                }
                if steady {
                    live.steady_polls.fetch_add(1, Ordering::Relaxed);
                    let took = done - started;
                    let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                    lock(&live.latency_us).saturating_record(us.max(1));
                    if route == CheckinRoute::Held && !asked {
                        if took + EARLY_TOLERANCE < hold {
                            live.held_early.fetch_add(1, Ordering::Relaxed);
                        } else {
                            let over = took.saturating_sub(hold);
                            let us = u64::try_from(over.as_micros()).unwrap_or(u64::MAX);
                            lock(&live.hold_overshoot_us).saturating_record(us.max(1));
                        }
                    }
                }
                backoff.reset();
                next = match (held, route) {
                    // Fixed rate, like a real agent's timer; a slow answer does not shift the
                    // schedule, but a very slow one does not cause a burst either.
                    (false, _) => (next + outcome.interval).max(done),
                    // After a plain check-in, the held one follows at once (as the agent does).
                    (true, CheckinRoute::Plain) => done,
                    // Held: one interval after this one was sent, at once if answered later.
                    (true, _) => (started + outcome.interval).max(done),
                };
            }
            Err(err) => {
                live.went_down(&mut up, &err);
                // As the real agent: a broken held check-in comes back within its interval.
                next = done
                    + after_failure(
                        &err,
                        route == CheckinRoute::Held,
                        client.interval(),
                        &mut backoff,
                        &mut rand::thread_rng(),
                    );
            }
        }
    }
}

/// The stacks a simulated agent holds: the desired state's digest and (stack, version)s.
#[derive(Debug, Default)]
struct SimStacks {
    digest: u64,
    stacks: Vec<(u64, u32)>,
}

/// What a real agent does with an announced desired state, without an engine: fetch it when
/// the digest is new and report `acknowledged`, "deploy" for `deploy`, report `running`; a
/// digest it holds is only acknowledged (one report).
async fn sync_stacks(
    client: &mut PollClient,
    held: &mut SimStacks,
    digest: u64,
    deploy: Duration,
    live: &Live,
) {
    use proto::stacks::{Phase, StackState};
    let states = |held: &SimStacks, phase: Phase, gone: &[(u64, u32)], now: u64| {
        held.stacks
            .iter()
            .map(|&(stack_id, version)| (stack_id, version, phase))
            .chain(gone.iter().map(|&(id, v)| (id, v, Phase::Removed)))
            .map(|(stack_id, version, phase)| StackState {
                stack_id,
                version,
                phase,
                error: None,
                at_ms: now,
            })
            .collect::<Vec<_>>()
    };
    let mut failed = false;
    if digest != held.digest {
        match client.fetch_desired().await {
            Ok(state) => {
                live.stack_fetches.fetch_add(1, Ordering::Relaxed);
                let now: Vec<(u64, u32)> = state.stacks.iter().map(|s| (s.id, s.version)).collect();
                let gone: Vec<(u64, u32)> = held
                    .stacks
                    .iter()
                    .filter(|(id, _)| !now.iter().any(|(n, _)| n == id))
                    .copied()
                    .collect();
                held.digest = state.digest;
                held.stacks = now;
                let ack = states(held, Phase::Acknowledged, &gone, client.clock().now_ms());
                failed |= client.report_stacks(held.digest, &ack).await.is_err();
                tokio::time::sleep(deploy).await;
            }
            Err(_) => failed = true,
        }
    }
    if !failed {
        let running = states(held, Phase::Running, &[], client.clock().now_ms());
        failed |= client.report_stacks(held.digest, &running).await.is_err();
        live.stack_reports.fetch_add(1, Ordering::Relaxed);
    }
    if failed {
        live.stack_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a simulated async agent reports: an engine with 20 running containers of one compose
/// project (a kiosk's worth), the same on every tick.
pub fn async_engine(agent: &str) -> Snapshot {
    let mut s = Snapshot {
        engine: EngineInfo {
            name: agent.to_owned(),
            version: "27.3.1".into(),
            api_version: "1.47".into(),
            os: "linux".into(),
            arch: "arm64".into(),
            cpus: 4,
            memory_bytes: 4_000_000_000,
            ..EngineInfo::default()
        },
        containers: (0..20u64)
            .map(|i| Container {
                id: format!("{:064x}", 0xc0ffee * (i + 1)),
                names: vec![format!("kiosk-app-{i}")],
                image: format!("registry.example.com/kiosk/app:{}", i % 3),
                state: "running".into(),
                labels: [(COMPOSE_PROJECT_LABEL.to_owned(), "kiosk".to_owned())].into(),
                ..Container::default()
            })
            .collect(),
        ..Snapshot::default()
    };
    s.normalise();
    s
}

/// One async agent, as the real one behaves when nothing changes on its engine: a full
/// snapshot and a command fetch first, then one merged tick per interval (ping, unchanged
/// snapshot, command fetch); a full snapshot again whenever the server asks for one. Polls,
/// latency and errors are counted as for check-ins.
async fn async_loop(mut client: PollClient, first: Instant, timeline: Timeline, live: Arc<Live>) {
    let engine = async_engine(&format!("lt-engine-{}", client.endpoint_id()));
    let (Ok(digest), Ok(full)) = (
        proto::snapshot::digest(&engine),
        proto::snapshot::compress(&engine),
    ) else {
        live.error("encode");
        return;
    };
    let mut backoff = Backoff::default();
    let mut next = first;
    let mut acked = false;
    let mut up = false;
    while next < timeline.end {
        tokio::time::sleep_until(next).await;
        let tick = AsyncTick {
            snapshot: Some(if acked {
                SnapshotReport::Unchanged { digest }
            } else {
                SnapshotReport::Full(full.clone())
            }),
            results: Vec::new(),
            done_through: Some(0),
        };
        let started = Instant::now();
        let result = tokio::select! {
            result = client.async_tick(&tick) => result,
            () = tokio::time::sleep_until(timeline.end) => break,
        };
        let done = Instant::now();
        match result {
            Ok(answer) => {
                acked = answer.snapshot_ack == Some(digest) && !answer.need_full_snapshot;
                live.came_up(&mut up);
                live.polls_total.fetch_add(1, Ordering::Relaxed);
                if started >= timeline.ramp_end && done <= timeline.end {
                    live.steady_polls.fetch_add(1, Ordering::Relaxed);
                    let us = u64::try_from((done - started).as_micros()).unwrap_or(u64::MAX);
                    lock(&live.latency_us).saturating_record(us.max(1));
                }
                backoff.reset();
                let interval = answer
                    .intervals
                    .smallest()
                    .map_or(client.interval(), |s| Duration::from_secs(u64::from(s)));
                next = (next + interval).max(done);
            }
            Err(err) => {
                live.went_down(&mut up, &err);
                next = done
                    + retry_delay(
                        &err,
                        client.interval(),
                        &mut backoff,
                        &mut rand::thread_rng(),
                    );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_get_sources() {
        let s = loopback_sources("127.0.0.1", 4);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0], IpAddr::from([127, 0, 0, 1]));
        assert_eq!(s[3], IpAddr::from([127, 0, 0, 4]));
        assert_eq!(loopback_sources("localhost", 2).len(), 2);
        assert!(loopback_sources("10.0.0.1", 4).is_empty());
        assert!(loopback_sources("cp.example.com", 4).is_empty());
    }

    #[test]
    fn sources_rotate_by_global_index() {
        let s = loopback_sources("127.0.0.1", 3);
        let picked: Vec<_> = (0..6).map(|i| source_for(&s, i)).collect();
        assert_eq!(picked[0], picked[3]);
        assert_ne!(picked[0], picked[1]);
        assert_eq!(source_for(&[], 5), None);
    }

    #[test]
    fn progress_sums() {
        let a = Progress {
            connected: 3,
            polls_total: 10,
            errors: 1,
            refused: 1,
            p99_ms: 2.0,
        };
        let b = Progress {
            connected: 4,
            polls_total: 5,
            errors: 2,
            refused: 1,
            p99_ms: 7.5,
        };
        let s = Progress::sum([&a, &b]);
        assert_eq!(s.connected, 7);
        assert_eq!(s.polls_total, 15);
        assert_eq!((s.errors, s.refused), (3, 2));
        assert_eq!(s.p99_ms, 7.5);
    }

    #[test]
    fn held_checkins_are_held_for_the_interval_minus_the_margin() {
        assert_eq!(
            expected_hold(Duration::from_secs(5)),
            Duration::from_millis(4750)
        );
        assert_eq!(expected_hold(Duration::from_millis(100)), Duration::ZERO);
    }

    #[test]
    fn timeline() {
        let t0 = Instant::now();
        let t = Timeline::new(t0, Duration::from_secs(5), Duration::from_secs(30));
        assert_eq!(t.ramp_end - t.start, Duration::from_secs(5));
        assert_eq!(t.end - t.start, Duration::from_secs(35));
    }
}
