//! The operator's side: agents on threads of their own, admin calls, metrics.

use super::*;

pub(crate) fn start_agent(
    name: &str,
    key: &str,
    docker_host: &str,
    inactivity: &str,
) -> AgentThread {
    AgentThread::start(
        name,
        edge_agent::Args {
            edge_key: Some(key.to_owned()),
            docker_host: Some(docker_host.to_owned()),
            inactivity_timeout: Some(inactivity.to_owned()),
            ..Default::default()
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Operator-side HTTP

pub(crate) fn client(pool: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .http1_only()
        .pool_max_idle_per_host(pool)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

pub(crate) async fn create_env(
    api: &reqwest::Client,
    cp: &ControlPlane,
    name: &str,
    interval: u32,
) -> (u64, String) {
    let r = api
        .post(format!("{}/api/endpoints", cp.url))
        .header("X-API-Key", ADMIN_KEY)
        .json(&json!({ "name": name, "checkinInterval": interval }))
        .send()
        .await
        .expect("create environment");
    assert_eq!(r.status(), 201, "create environment {name}");
    let v: Value = r.json().await.expect("environment JSON");
    (
        v["id"].as_u64().expect("id"),
        v["edgeKey"].as_str().expect("edgeKey").to_owned(),
    )
}

pub(crate) async fn get_env(api: &reqwest::Client, cp: &ControlPlane, id: u64) -> Option<Value> {
    testkit::api::get_env_with(api, &cp.url, id).await.ok()
}

pub(crate) async fn wait_up(api: &reqwest::Client, cp: &ControlPlane, ids: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for &id in ids {
        loop {
            if let Some(v) = get_env(api, cp, id).await {
                if v["status"] == "up" {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "environment {id} never came up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Metric samples by full name including labels, e.g. `edgeplane_tunnel_wait_seconds_bucket{le="1"}`.
pub(crate) async fn metrics(cp: &ControlPlane) -> BTreeMap<String, f64> {
    testkit::api::metric_samples(&cp.metrics_url).await
}

pub(crate) use testkit::api::{metric_delta, metric_sum};
