//! Phase 1: wake-up, from a Docker call to the answer while the tunnel is closed.

use super::*;

/// A wake-up sample: its time, and how long after this environment's previous wake-up
/// answer it was sent (`None` for the first).
pub(crate) struct WakeSample {
    pub(crate) id: u64,
    /// Seconds since the start of the rounds when the request went out.
    pub(crate) at_s: f64,
    pub(crate) ms: f64,
    pub(crate) since_previous_s: Option<f64>,
}

/// `rounds` wake-ups per environment, all environments concurrently. Each round waits for the
/// tunnel to be closed; with `settled`, also until one check-in interval has passed since the
/// previous wake-up answer (the agent's next held check-in is out by then); then a random
/// delay of 0 to one interval, then the timed request.
pub(crate) async fn wake_rounds(
    s: &Settings,
    cp: &ControlPlane,
    api: &reqwest::Client,
    ids: &[u64],
    rounds: usize,
    settled: bool,
    previous: &mut BTreeMap<u64, Instant>,
) -> Value {
    let interval = Duration::from_secs(u64::from(s.interval));
    let before = metrics(cp).await;
    let started = Instant::now();
    let carried = previous.clone();
    let tasks = ids.iter().map(|&id| {
        let mut previous: Option<Instant> = carried.get(&id).copied();
        async move {
            let mut samples = Vec::new();
            let mut errors = Vec::new();
            for _ in 0..rounds {
                // The agent closes an idle tunnel after its inactivity timeout and a snapshot.
                let closed =
                    testkit::api::wait_tunnel_closed(api, &cp.url, id, Duration::from_secs(60))
                        .await;
                if let Err(e) = closed {
                    errors.push(format!("env {id}: {e}"));
                }
                if settled {
                    if let Some(p) = previous {
                        tokio::time::sleep_until((p + interval).into()).await;
                    }
                }
                let delay = rand::thread_rng().gen_range(0.0..interval.as_secs_f64());
                tokio::time::sleep(Duration::from_secs_f64(delay)).await;
                let since_previous_s = previous.map(|p| p.elapsed().as_secs_f64());
                let at_s = started.elapsed().as_secs_f64();
                let (took, answer) = testkit::api::docker_ping_timed(api, &cp.url, id).await;
                previous = Some(Instant::now());
                match answer {
                    Ok(()) => samples.push(WakeSample {
                        id,
                        at_s,
                        ms: took,
                        since_previous_s,
                    }),
                    Err(e) => errors.push(format!("env {id}: {e} after {took:.0} ms")),
                }
            }
            (id, previous, samples, errors)
        }
    });
    let results = futures_util::future::join_all(tasks).await;
    let elapsed = started.elapsed();
    let after = metrics(cp).await;
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    for (id, last, s, e) in results {
        if let Some(t) = last {
            previous.insert(id, t);
        }
        samples.extend(s);
        errors.extend(e);
    }
    let all: Vec<f64> = samples.iter().map(|w| w.ms).collect();
    let interval_s = interval.as_secs_f64();
    // Split by whether the agent's held check-in had been renewed since the previous wake-up.
    let recent: Vec<f64> = samples
        .iter()
        .filter(|w| w.since_previous_s.is_some_and(|g| g < interval_s))
        .map(|w| w.ms)
        .collect();
    let later: Vec<f64> = samples
        .iter()
        .filter(|w| !w.since_previous_s.is_some_and(|g| g < interval_s))
        .map(|w| w.ms)
        .collect();
    let wait = metric_delta(&before, &after, "edgeplane_tunnel_wait_seconds");
    let wait_count = metric_sum(&wait, "edgeplane_tunnel_wait_seconds_count");
    let wait_sum = metric_sum(&wait, "edgeplane_tunnel_wait_seconds_sum");
    let buckets: BTreeMap<String, f64> = wait
        .iter()
        .filter_map(|(k, v)| {
            let le = k.split("le=\"").nth(1)?.trim_end_matches("\"}");
            Some((le.to_owned(), *v))
        })
        .collect();
    // Held check-ins are not timed by the check-in histogram; plain ones are.
    let checkins = metric_delta(&before, &after, "edgeplane_checkin");
    let total = metric_sum(&checkins, "edgeplane_checkin_requests_total");
    let timed = metric_sum(&checkins, "edgeplane_checkin_duration_seconds_count");
    let (sum, sum_recent, sum_later) = (summary(&all), summary(&recent), summary(&later));
    println!(
        "  {} ({} s): {}",
        if settled {
            "settled: each request >= 1 interval after the previous wake-up"
        } else {
            "anywhere: 0-1 interval after the tunnel closed"
        },
        elapsed.as_secs(),
        line(&sum)
    );
    println!(
        "    of which sent < 1 interval after the previous wake-up: {}",
        line(&sum_recent)
    );
    println!(
        "    of which first or >= 1 interval after the previous one: {}",
        line(&sum_later)
    );
    let mut slowest: Vec<&WakeSample> = samples.iter().collect();
    slowest.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    let slowest: Vec<String> = slowest
        .iter()
        .take(5)
        .map(|w| {
            format!(
                "env {} at +{:.2} s: {:.0} ms ({})",
                w.id,
                w.at_s,
                w.ms,
                w.since_previous_s.map_or("first".to_owned(), |g| format!(
                    "{g:.2} s after the previous answer"
                ))
            )
        })
        .collect();
    println!("    slowest: {}", slowest.join("; "));
    println!("    errors: {}", errors.len());
    for e in errors.iter().take(5) {
        println!("      {e}");
    }
    println!(
        "    server's edgeplane_tunnel_wait_seconds: {} requests, mean {:.1} ms; <= 0.1 s: {}, <= 0.5 s: {}, <= 1 s: {}, <= 2.5 s: {}",
        wait_count,
        wait_sum / wait_count.max(1.0) * 1000.0,
        buckets.get("0.1").copied().unwrap_or(0.0),
        buckets.get("0.5").copied().unwrap_or(0.0),
        buckets.get("1").copied().unwrap_or(0.0),
        buckets.get("2.5").copied().unwrap_or(0.0),
    );
    println!(
        "    check-ins meanwhile: {total} ({timed} plain, answered at once; {} held, on /edge/h)",
        total - timed
    );
    json!({
        "latency": sum,
        "sent_within_1_interval_of_previous": sum_recent,
        "first_or_after_1_interval": sum_later,
        "slowest": slowest,
        "errors": errors.len(),
        "error_samples": errors.iter().take(10).collect::<Vec<_>>(),
        "elapsed_s": round3(elapsed.as_secs_f64()),
        "tunnel_wait_histogram": {
            "count": wait_count,
            "mean_ms": round3(wait_sum / wait_count.max(1.0) * 1000.0),
            "cumulative_buckets_s": buckets,
        },
        "checkins": { "total": total, "plain": timed, "held": total - timed },
    })
}

pub(crate) async fn wake_phase(
    s: &Settings,
    cp: &ControlPlane,
    engine: SocketAddr,
    agents: &mut Vec<AgentThread>,
) -> Value {
    let api = client(usize::MAX);
    let docker_host = format!("tcp://{engine}");
    let mut ids = Vec::new();
    for i in 0..s.agents {
        let (id, key) = create_env(&api, cp, &format!("wake-{i}"), s.interval).await;
        agents.push(start_agent(
            &format!("agent-w{i}"),
            &key,
            &docker_host,
            &s.inactivity,
        ));
        ids.push(id);
    }
    wait_up(&api, cp, &ids).await;
    // Let every agent settle into held check-ins (its first one is a plain one).
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "wake-up: {} agents at {} s check-ins, inactivity {}; time from sending GET .../docker/_ping to the complete answer",
        s.agents, s.interval, s.inactivity
    );
    let mut previous = BTreeMap::new();
    let anywhere = wake_rounds(s, cp, &api, &ids, s.rounds, false, &mut previous).await;
    let settled = if s.settled_rounds > 0 {
        wake_rounds(s, cp, &api, &ids, s.settled_rounds, true, &mut previous).await
    } else {
        Value::Null
    };
    json!({ "anywhere": anywhere, "settled": settled })
}
