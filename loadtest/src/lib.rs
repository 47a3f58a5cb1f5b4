//! The edgeplane load test: creates environments through the admin API, simulates one agent
//! per environment with the agent's own check-in client, and reports scale figures.
//!
//! * [`cli`]: flags, validated into a [`cli::Plan`].
//! * [`admin`]: bulk creation and deletion of environments.
//! * [`sim`]: the simulated agents.
//! * [`worker`]: child processes for runs above one process's socket limit.
//! * [`server`]: the server under test (spawned, and read from `/proc`).
//! * [`redis_info`]: the Redis of a cluster under test, sampled around the steady window.
//! * [`report`]: measurements, merging and the JSON report.

pub mod admin;
pub mod cli;
pub mod redis_info;
pub mod report;
pub mod server;
pub mod sim;
pub mod worker;

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use proto::JoinToken;
use tokio::time::Instant;

use crate::admin::AdminClient;
use crate::cli::{Args, Plan};
use crate::report::{Report, RunFacts, ServerFacts};
use crate::server::SpawnedServer;
use crate::sim::{Live, Progress, SimPlan, Timeline};
use crate::worker::WorkerSpec;

/// How long a spawned control plane may take to become ready.
const SPAWN_READY_WITHIN: Duration = Duration::from_secs(60);
/// With held check-ins, the server's memory is read this long before the end of the window.
const HELD_RSS_LEAD: Duration = Duration::from_millis(300);

/// Runs a whole load test as described by `args` (not a worker).
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let plan = args.plan()?;
    // reqwest is built without a default crypto provider; the agents pass theirs explicitly.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let spawned = match &args.spawn_server {
        Some(path) => {
            let path = match path {
                Some(path) => path.clone(),
                None => server::default_server_path()?,
            };
            eprintln!("starting {}", path.display());
            let s = SpawnedServer::start(&path, SPAWN_READY_WITHIN).await?;
            eprintln!(
                "control plane ready at {} (pid {}, log {})",
                s.target,
                s.pid,
                s.log_path.display()
            );
            Some(s)
        }
        None => None,
    };
    let result = run_against(&args, &plan, spawned.as_ref()).await;
    if let Some(s) = spawned {
        if result.is_err() {
            eprintln!("control plane log tail:\n{}", s.log_tail());
        }
        s.stop().await;
    }
    result
}

async fn run_against(
    args: &Args,
    plan: &Plan,
    spawned: Option<&SpawnedServer>,
) -> anyhow::Result<Report> {
    if let Some(pin) = &args.synthetic_pin {
        return run_synthetic(args, plan, pin).await;
    }
    let (target, api_key, insecure, pids) = match spawned {
        Some(s) => (s.target.clone(), s.api_key.clone(), true, vec![s.pid]),
        None => (
            args.target.clone().context("--target is required")?,
            args.api_key.clone().context("--api-key is required")?,
            args.insecure,
            args.server_pid.clone(),
        ),
    };
    let target_url = url::Url::parse(&target).with_context(|| format!("--target {target:?}"))?;
    let admin = AdminClient::new(&target, &api_key, insecure)?;

    // Create the environments.
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let names: Vec<String> = (0..plan.agents)
        .map(|i| format!("lt-{run_id}-{i}"))
        .collect();
    let bar = ProgressBar::new(plan.agents).with_style(
        ProgressStyle::with_template("creating environments {bar:30} {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let created_at = StdInstant::now();
    let created = admin
        .create(&names, plan.interval.as_secs(), plan.async_mode, |n| {
            bar.set_position(n as u64)
        })
        .await;
    bar.finish_and_clear();
    let created = created.context("cannot create the environments")?;
    let create_secs = created_at.elapsed().as_secs_f64();
    eprintln!(
        "created {} environments in {create_secs:.2} s",
        created.len()
    );

    let redis = match &args.redis_url {
        Some(url) => Some(redis_info::RedisInfo::connect(url).await?),
        None => None,
    };
    // Edge stacks: a static group of the run's environments, `--stacks` stacks for it now.
    let ids: Vec<u64> = created.iter().map(|e| e.id).collect();
    let group = if args.stacks > 0 || args.stack_at.is_some() {
        Some(admin.create_group(&format!("lt-{run_id}"), &ids).await?)
    } else {
        None
    };
    let mut stack_ids = Vec::new();
    if let Some(g) = group {
        for i in 0..args.stacks {
            stack_ids.push(admin.create_stack(&format!("lt-{run_id}-{i}"), g).await?);
        }
        if args.stacks > 0 {
            eprintln!("{} edge stacks for every agent", args.stacks);
        }
    }
    let rollout = match (args.stack_at, group) {
        (Some(at), Some(g)) => {
            let lead = if plan.workers > 1 { 3 } else { 0 };
            let after = plan.ramp + Duration::from_secs(at + lead);
            Some(tokio::spawn(roll_out(
                admin.clone(),
                format!("lt-{run_id}-rollout"),
                g,
                after,
                plan.interval,
                pids.clone(),
                args.redis_url.clone(),
            )))
        }
        _ => None,
    };
    let timeline_file = open_timeline(args)?;
    let outcome = measure(
        plan,
        &created,
        &target_url,
        args.sources,
        &pids,
        redis,
        timeline_file,
    )
    .await;

    let rolled = match rollout {
        Some(task) => match task.await {
            Ok(Ok((id, facts))) => {
                stack_ids.push(id);
                Some(facts)
            }
            Ok(Err(e)) => {
                eprintln!("stack rollout not measured: {e:#}");
                None
            }
            Err(e) => {
                eprintln!("stack rollout task failed: {e}");
                None
            }
        },
        None => None,
    };
    if !args.keep {
        admin.delete_stacks(&stack_ids, group).await;
    }
    if args.keep {
        eprintln!("keeping {} environments (--keep)", created.len());
    } else {
        let ids: Vec<u64> = created.iter().map(|e| e.id).collect();
        let at = StdInstant::now();
        let failed = admin.delete(&ids).await;
        eprintln!(
            "deleted {} environments in {:.2} s{}",
            ids.len() - failed,
            at.elapsed().as_secs_f64(),
            if failed > 0 {
                format!(" ({failed} failed)")
            } else {
                String::new()
            }
        );
    }

    let (sim, server, redis, live) = outcome?;
    let facts = RunFacts {
        mode: if plan.async_mode { "async" } else { "standard" }.to_owned(),
        held: plan.held,
        interval_secs: plan.interval.as_secs(),
        ramp_secs: plan.ramp.as_secs_f64(),
        create_secs,
        workers: plan.workers,
        server,
        redis,
        target,
    };
    let mut report = Report::build(&sim, &facts);
    if group.is_some() {
        use std::sync::atomic::Ordering::Relaxed;
        report.stacks = Some(report::StacksFacts {
            held_stacks: args.stacks,
            fetches: live.stack_fetches.load(Relaxed),
            reports: live.stack_reports.load(Relaxed),
            errors: live.stack_errors.load(Relaxed),
            rollout: rolled,
        });
    }
    Ok(report)
}

/// `--stack-at`: after `after`, one stack for `group`, all at once; how long until every
/// target runs it, and what that cost the server and Redis. Returns the stack's id too.
async fn roll_out(
    admin: AdminClient,
    name: String,
    group: u64,
    after: Duration,
    interval: Duration,
    pids: Vec<u32>,
    redis_url: Option<String>,
) -> anyhow::Result<(u64, report::StackRolloutFacts)> {
    tokio::time::sleep(after).await;
    let mut redis = match &redis_url {
        Some(url) => Some(redis_info::RedisInfo::connect(url).await?),
        None => None,
    };
    let calls_before = match &mut redis {
        Some(r) => Some(r.calls().await?),
        None => None,
    };
    let cpu_before = server::cpu_sum(&pids);
    let started = StdInstant::now();
    let id = admin.create_stack(&name, group).await?;
    eprintln!("stack {name} created for every agent; waiting for all to run it");
    let deadline = started + interval * 12;
    let (mut targets, mut running) = (0, 0);
    let mut all_at = None;
    while StdInstant::now() < deadline {
        (targets, running) = admin.stack_running(id).await?;
        if targets > 0 && running >= targets {
            all_at = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = match (cpu_before, server::cpu_sum(&pids)) {
        (Some(a), Some(b)) => Some((b - a).max(0.0)),
        _ => None,
    };
    let commands = match (&mut redis, calls_before) {
        (Some(r), Some(before)) => {
            let after = r.calls().await?;
            Some(
                after
                    .iter()
                    .map(|(k, v)| v.saturating_sub(before.get(k).copied().unwrap_or(0)))
                    .sum::<u64>(),
            )
        }
        _ => None,
    };
    let per_env = |x: f64| (targets > 0).then(|| x / targets as f64);
    let secs = all_at.map(|d| d.as_secs_f64());
    eprintln!(
        "stack rollout: {running}/{targets} running{}",
        secs.map(|s| format!(" after {s:.2} s")).unwrap_or_default()
    );
    Ok((
        id,
        report::StackRolloutFacts {
            targets,
            running,
            secs_to_all_running: secs,
            intervals_to_all_running: secs.map(|s| s / interval.as_secs_f64()),
            server_cpu_seconds: cpu,
            server_cpu_ms_per_environment: cpu.and_then(|c| per_env(c * 1000.0)),
            redis_commands: commands,
            redis_commands_per_environment: commands.and_then(|c| per_env(c as f64)),
        },
    ))
}

/// The `--timeline` file, created.
fn open_timeline(args: &Args) -> anyhow::Result<Option<std::fs::File>> {
    args.timeline
        .as_ref()
        .map(|path| {
            std::fs::File::create(path).with_context(|| format!("--timeline {}", path.display()))
        })
        .transpose()
}

/// [`run`] with join keys made up here (`--synthetic-pin`): no admin API, nothing to create
/// or delete.
async fn run_synthetic(args: &Args, plan: &Plan, pin: &str) -> anyhow::Result<Report> {
    let target = args.target.clone().context("--target is required")?;
    let target_url = url::Url::parse(&target).with_context(|| format!("--target {target:?}"))?;
    let fingerprint: [u8; 32] = hex::decode(pin.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("--synthetic-pin must be a SHA-256 in hex (64 digits)")?;
    let created: Vec<admin::CreatedEnvironment> = (1..=plan.agents)
        .map(|id| admin::CreatedEnvironment {
            id,
            edge_key: JoinToken {
                api_url: target.clone(),
                tunnel_addr: "127.0.0.1:9".to_owned(),
                tunnel_fingerprint: fingerprint,
                endpoint_id: id,
                secret: proto::token::JoinSecret::generate(),
            }
            .encode(),
        })
        .collect();
    let timeline_file = open_timeline(args)?;
    let (sim, server, redis, _) = measure(
        plan,
        &created,
        &target_url,
        args.sources,
        &args.server_pid,
        None,
        timeline_file,
    )
    .await?;
    let facts = RunFacts {
        mode: "synthetic".to_owned(),
        held: false,
        interval_secs: plan.interval.as_secs(),
        ramp_secs: plan.ramp.as_secs_f64(),
        create_secs: 0.0,
        workers: plan.workers,
        server,
        redis,
        target,
    };
    Ok(Report::build(&sim, &facts))
}

/// Connects the agents, measures the steady window, and samples the server around it.
async fn measure(
    plan: &Plan,
    created: &[admin::CreatedEnvironment],
    target: &url::Url,
    sources: u8,
    pids: &[u32],
    redis: Option<redis_info::RedisInfo>,
    timeline_file: Option<std::fs::File>,
) -> anyhow::Result<(
    report::SimResult,
    ServerFacts,
    Option<report::RedisFacts>,
    Arc<Live>,
)> {
    let keys: Vec<String> = created.iter().map(|e| e.edge_key.clone()).collect();
    let sources = sim::loopback_sources(target.host_str().unwrap_or(""), sources);
    let rss_before = server::rss_sum(pids);

    // Workers need a moment to start and build their clients before the ramp begins.
    let lead = if plan.workers > 1 {
        Duration::from_secs(3)
    } else {
        Duration::from_millis(200)
    };
    let start_unix_ms = edge_agent::clock::unix_now_ms() + lead.as_millis() as u64;
    let start = worker::instant_of_unix_ms(start_unix_ms);
    let timeline = Timeline::new(start, plan.ramp, plan.duration);

    // Held check-ins are pending almost all the time; read the memory before agents leave at
    // the end (they drop their pending check-ins then), while each still has one open.
    let rss_at = if plan.held {
        timeline
            .end
            .checked_sub(HELD_RSS_LEAD.min(plan.duration / 2))
            .unwrap_or(timeline.end)
    } else {
        timeline.end
    };
    let sampler = tokio::spawn(sample_server(pids.to_vec(), timeline, rss_at));
    let redis_sampler = redis.map(|r| tokio::spawn(r.sample(timeline.ramp_end, timeline.end)));
    let progress_slots = Arc::new(Mutex::new(vec![Progress::default(); plan.workers as usize]));
    let live = Arc::new(Live::default());
    let display = tokio::spawn(show_progress(
        plan.agents,
        timeline,
        live.clone(),
        progress_slots.clone(),
        plan.workers > 1,
        timeline_file,
    ));

    let sim = if plan.workers > 1 {
        let base = WorkerSpec {
            edge_keys: Vec::new(),
            interval_ms: plan.interval.as_millis() as u64,
            start_unix_ms,
            ramp_ms: plan.ramp.as_millis() as u64,
            duration_ms: plan.duration.as_millis() as u64,
            sources,
            first_index: 0,
            held: plan.held,
            async_mode: plan.async_mode,
            tunnel_engine: plan.tunnels.as_ref().map(|t| t.engine.clone()),
            tunnel_inactivity_ms: plan
                .tunnels
                .as_ref()
                .map_or(0, |t| t.inactivity.as_millis() as u64),
            stack_deploy_ms: plan.stack_deploy.as_millis() as u64,
        };
        worker::run_workers(worker::split(&keys, plan.workers, &base), progress_slots).await
    } else {
        let tokens = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                JoinToken::parse(k).with_context(|| {
                    format!("environment {} has an invalid edgeKey", created[i].id)
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        sim::simulate(
            SimPlan {
                tokens,
                interval: plan.interval,
                timeline,
                sources,
                first_index: 0,
                held: plan.held,
                async_mode: plan.async_mode,
                tunnels: plan.tunnels.clone(),
                stack_deploy: plan.stack_deploy,
            },
            live.clone(),
        )
        .await
    };
    display.abort();
    let (cpu_seconds, rss_after) = sampler.await.unwrap_or((None, None));
    let redis = match redis_sampler {
        Some(s) => match s.await {
            Ok(Ok(facts)) => Some(facts),
            Ok(Err(e)) => {
                eprintln!("redis not sampled: {e:#}");
                None
            }
            Err(_) => None,
        },
        None => None,
    };
    Ok((
        sim?,
        ServerFacts {
            rss_before,
            rss_after,
            cpu_seconds,
            processes: pids.len(),
        },
        redis,
        live,
    ))
}

/// CPU used by the server's processes inside the steady window, and their memory at
/// `rss_at` (the window's end, or just before it), summed.
async fn sample_server(
    pids: Vec<u32>,
    timeline: Timeline,
    rss_at: Instant,
) -> (Option<f64>, Option<u64>) {
    if pids.is_empty() {
        return (None, None);
    }
    tokio::time::sleep_until(timeline.ramp_end).await;
    let cpu_start = server::cpu_sum(&pids);
    let mut rss = None;
    if rss_at < timeline.end {
        tokio::time::sleep_until(rss_at).await;
        rss = server::rss_sum(&pids);
    }
    tokio::time::sleep_until(timeline.end).await;
    let cpu_end = server::cpu_sum(&pids);
    if rss_at >= timeline.end {
        rss = server::rss_sum(&pids);
    }
    let cpu = match (cpu_start, cpu_end) {
        (Some(a), Some(b)) => Some((b - a).max(0.0)),
        _ => None,
    };
    (cpu, rss)
}

async fn show_progress(
    agents: u64,
    timeline: Timeline,
    live: Arc<Live>,
    slots: Arc<Mutex<Vec<Progress>>>,
    from_workers: bool,
    mut file: Option<std::fs::File>,
) {
    use std::io::Write as _;
    let total = timeline
        .end
        .saturating_duration_since(timeline.start)
        .as_secs();
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {bar:25} {pos}/{len}s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last_polls = 0u64;
    let mut last_at = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut n = 0u64;
    loop {
        tick.tick().await;
        n += 1;
        let p = if from_workers {
            Progress::sum(slots.lock().iter())
        } else {
            live.progress()
        };
        let now = Instant::now();
        let rate = (p.polls_total.saturating_sub(last_polls)) as f64
            / now.duration_since(last_at).as_secs_f64().max(0.001);
        last_polls = p.polls_total;
        last_at = now;
        let phase = if now < timeline.start {
            "start"
        } else if now < timeline.ramp_end {
            "ramp"
        } else {
            "steady"
        };
        bar.set_position(now.saturating_duration_since(timeline.start).as_secs());
        bar.set_message(format!(
            "{phase} connected {}/{agents} polls/s {rate:.0} errors {} p99 {:.1} ms",
            p.connected, p.errors, p.p99_ms
        ));
        if let Some(f) = file.as_mut().filter(|_| n.is_multiple_of(2)) {
            let line = serde_json::json!({
                "unix_ms": edge_agent::clock::unix_now_ms(),
                "since_start_s": now.saturating_duration_since(timeline.start).as_secs_f64(),
                "phase": phase,
                "connected": p.connected,
                "polls_total": p.polls_total,
                "errors": p.errors,
                "refused": p.refused,
            });
            if writeln!(f, "{line}").is_err() {
                file = None;
            }
        }
    }
}
