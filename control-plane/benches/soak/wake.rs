//! The Docker calls of the soak: wake-ups of closed tunnels, then real calls through them.

use rand::Rng as _;
use testkit::api::{docker_get_with, docker_ping_timed, wait_tunnel_closed};

use super::*;

/// One wake-up: when it was sent (s since sampling started), its time, and what failed.
#[derive(Clone, Debug)]
pub(crate) struct Wake {
    pub(crate) env: u64,
    pub(crate) at_s: f64,
    pub(crate) ms: f64,
    pub(crate) error: Option<String>,
}

/// What the probes did since the last row.
#[derive(Debug, Default)]
pub(crate) struct Wakes {
    pub(crate) wakes: Vec<Wake>,
    /// Docker calls after the wake-up (through the open tunnel) and those that failed.
    pub(crate) calls: u64,
    pub(crate) call_errors: Vec<String>,
    /// Tunnels that did not close within a minute of the previous call.
    pub(crate) never_closed: Vec<String>,
}

/// Until `until`: wait for `id`'s tunnel to close (the agent's inactivity timeout), wait 0 to
/// one `interval`, time the wake-up ping, then list containers and ask the version through the
/// tunnel it opened.
pub(crate) async fn probe(
    api: reqwest::Client,
    url: String,
    id: u64,
    interval: Duration,
    started: Instant,
    until: Instant,
    out: Arc<Mutex<Wakes>>,
) {
    while Instant::now() < until {
        if let Err(e) = wait_tunnel_closed(&api, &url, id, Duration::from_secs(60)).await {
            out.lock().never_closed.push(e);
            continue;
        }
        let delay = rand::thread_rng().gen_range(0.0..interval.as_secs_f64());
        if Instant::now() + Duration::from_secs_f64(delay) >= until {
            break;
        }
        tokio::time::sleep(Duration::from_secs_f64(delay)).await;
        let at_s = started.elapsed().as_secs_f64();
        let (ms, answer) = docker_ping_timed(&api, &url, id).await;
        let ok = answer.is_ok();
        out.lock().wakes.push(Wake {
            env: id,
            at_s,
            ms,
            error: answer.err(),
        });
        if !ok {
            continue;
        }
        for path in ["/containers/json?all=1", "/version"] {
            let (status, body) = docker_get_with(&api, &url, id, path).await;
            let mut w = out.lock();
            w.calls += 1;
            if status != 200 || !(body.starts_with('[') || body.starts_with('{')) {
                let short: String = body.chars().take(200).collect();
                w.call_errors
                    .push(format!("env {id} {path}: {status} {short}"));
            }
        }
    }
}
