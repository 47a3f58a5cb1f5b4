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
#[derive(Clone, Debug, Default)]
pub struct Round {
    pub agent_fresh: bool,
    pub admin: Option<Duration>,
    pub docker: Option<Duration>,
    /// Why a probe failed, with the time it took.
    pub failures: Vec<String>,
}

fn client() -> reqwest::Client {
    testkit::api::http_with_timeout(PROBE_TIMEOUT)
}

/// One round: the agent's last check-in within `freshness`, `GET /api/endpoints`, and
/// `GET /api/endpoints/{env}/docker/_ping`.
pub async fn round(url: &str, env: u64, freshness: Duration) -> Round {
    let mut failures = Vec::new();
    let (agent_fresh, admin) = match admin_and_agent(url, env, freshness).await {
        Ok(ok) => ok,
        Err(e) => {
            failures.push(e);
            (false, None)
        }
    };
    if admin.is_some() && !agent_fresh {
        failures.push("agent: last check-in not fresh".to_owned());
    }
    let docker = match docker(url, env).await {
        Ok(t) => Some(t),
        Err(e) => {
            failures.push(e);
            None
        }
    };
    Round {
        agent_fresh,
        admin,
        docker,
        failures,
    }
}

/// The admin call doubles as the agent's probe: the environment's `lastCheckIn`.
async fn admin_and_agent(
    url: &str,
    env: u64,
    freshness: Duration,
) -> Result<(bool, Option<Duration>), String> {
    let started = Instant::now();
    let failed = |what: String| format!("admin: {what} after {} ms", started.elapsed().as_millis());
    let r = client()
        .get(format!("{url}/api/endpoints/{env}"))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .map_err(|e| failed(format!("{e:?}")))?;
    if !r.status().is_success() {
        return Err(failed(format!("status {}", r.status())));
    }
    let v = r
        .json::<Value>()
        .await
        .map_err(|e| failed(format!("body: {e}")))?;
    let took = started.elapsed();
    let fresh = v["status"] == "up"
        && v["lastCheckIn"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age <= freshness);
    Ok((fresh, Some(took)))
}

async fn docker(url: &str, env: u64) -> Result<Duration, String> {
    let started = Instant::now();
    let (status, body) = testkit::api::docker_get_with(&client(), url, env, "/_ping").await;
    if status == 200 && body == "OK" {
        return Ok(started.elapsed());
    }
    let short: String = body.chars().take(160).collect();
    Err(format!(
        "docker: {status} {short} after {} ms",
        started.elapsed().as_millis()
    ))
}
