//! What must keep working while an attack runs, each from 127.0.0.1 on a fresh connection (a
//! new admin or a Docker client has to get through admission like anyone), never panicking:
//! the real agent's check-ins are fresh, an admin call answers, a Docker call through the
//! real tunnel answers.

use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use testkit::ADMIN_KEY;

/// Longest any probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Outcome of one round of probes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Round {
    pub agent_fresh: bool,
    pub admin: Option<Duration>,
    pub docker: Option<Duration>,
}

fn client() -> reqwest::Client {
    testkit::api::http_with_timeout(PROBE_TIMEOUT)
}

/// One round: the agent's last check-in within `freshness`, `GET /api/endpoints`, and
/// `GET /api/endpoints/{env}/docker/_ping`.
pub async fn round(url: &str, env: u64, freshness: Duration) -> Round {
    let (agent_fresh, admin) = admin_and_agent(url, env, freshness).await;
    Round {
        agent_fresh,
        admin,
        docker: docker(url, env).await,
    }
}

/// The admin call doubles as the agent's probe: the environment's `lastCheckIn`.
async fn admin_and_agent(url: &str, env: u64, freshness: Duration) -> (bool, Option<Duration>) {
    let started = Instant::now();
    let Ok(r) = client()
        .get(format!("{url}/api/endpoints/{env}"))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
    else {
        return (false, None);
    };
    if !r.status().is_success() {
        return (false, None);
    }
    let Ok(v) = r.json::<Value>().await else {
        return (false, None);
    };
    let took = started.elapsed();
    let fresh = v["status"] == "up"
        && v["lastCheckIn"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age <= freshness);
    (fresh, Some(took))
}

async fn docker(url: &str, env: u64) -> Option<Duration> {
    let started = Instant::now();
    let (status, body) = testkit::api::docker_get_with(&client(), url, env, "/_ping").await;
    (status == 200 && body == "OK").then(|| started.elapsed())
}
