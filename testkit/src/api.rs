//! Talking to a control plane as an admin does: an HTTPS client, the admin key, and the calls
//! tests make again and again.

use std::time::Duration;

use serde_json::Value;

/// The admin key every control plane the kit starts is given.
pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

/// rustls' process-wide provider (reqwest's rustls backend needs one).
pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// An HTTPS client that accepts the control plane's self-signed certificate, 20 s per request.
pub fn http() -> reqwest::Client {
    http_with_timeout(Duration::from_secs(20))
}

pub fn http_with_timeout(timeout: Duration) -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(timeout)
        .build()
        .expect("reqwest client")
}

/// An admin request with a JSON body: the status and the JSON answer (`Null` when the answer
/// is not JSON).
pub async fn admin_json(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: &Value,
) -> (reqwest::StatusCode, Value) {
    let r = client
        .request(method, url)
        .header("X-API-Key", ADMIN_KEY)
        .json(body)
        .send()
        .await
        .expect("admin request");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// An admin GET: the status, the JSON answer (`Null` when not JSON) and `X-Total-Count`.
pub async fn admin_get(
    client: &reqwest::Client,
    url: &str,
) -> (reqwest::StatusCode, Value, Option<u64>) {
    let r = client
        .get(url)
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("admin request");
    let status = r.status();
    let total = r
        .headers()
        .get("x-total-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (status, r.json().await.unwrap_or(Value::Null), total)
}

/// `GET /api/endpoints/{id}` on the control plane at `base_url`, as JSON.
pub async fn get_env(base_url: &str, id: u64) -> Value {
    get_env_with(&http(), base_url, id)
        .await
        .unwrap_or_else(|e| panic!("get environment {id}: {e}"))
}

/// [`get_env`] with `client` (kept-alive connections), the failure as text.
pub async fn get_env_with(
    client: &reqwest::Client,
    base_url: &str,
    id: u64,
) -> Result<Value, String> {
    client
        .get(format!("{base_url}/api/endpoints/{id}"))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .map_err(|e| format!("send: {e}"))?
        .json()
        .await
        .map_err(|e| format!("environment JSON: {e}"))
}

/// Waits (polling every 100 ms, at most `within`) until the control plane reports `id`'s
/// tunnel `closed`; the state it last saw otherwise.
pub async fn wait_tunnel_closed(
    client: &reqwest::Client,
    base_url: &str,
    id: u64,
    within: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let state = get_env_with(client, base_url, id)
            .await
            .map(|v| v["tunnel"]["state"].clone());
        if state.as_ref().ok().and_then(Value::as_str) == Some("closed") {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("tunnel of {id} still {state:?} after {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /api/endpoints/{id}/docker/_ping` timed: ms from sending to the complete answer, and
/// whether it was the engine's `200 OK`.
pub async fn docker_ping_timed(
    client: &reqwest::Client,
    base_url: &str,
    id: u64,
) -> (f64, Result<(), String>) {
    let t0 = std::time::Instant::now();
    let (status, body) = docker_get_with(client, base_url, id, "/_ping").await;
    let took = crate::stats::ms(t0.elapsed());
    if status == 200 && body == "OK" {
        (took, Ok(()))
    } else {
        (took, Err(format!("{status}: {body}")))
    }
}

/// `POST /api/endpoints` with `body` (201 expected): the new id and its join token.
pub async fn create_env(base_url: &str, body: Value) -> (u64, proto::JoinToken) {
    let (id, key) = create_env_key(base_url, body).await;
    (id, proto::JoinToken::parse(&key).expect("join token"))
}

/// `POST /api/endpoints` with `body` (201 expected): the new id and its join key as text.
pub async fn create_env_key(base_url: &str, body: Value) -> (u64, String) {
    let r = http()
        .post(format!("{base_url}/api/endpoints"))
        .header("X-API-Key", ADMIN_KEY)
        .json(&body)
        .send()
        .await
        .expect("create environment");
    let status = r.status();
    let v: Value = r.json().await.expect("environment JSON");
    assert_eq!(status, reqwest::StatusCode::CREATED, "{v}");
    (
        v["id"].as_u64().expect("id"),
        v["edgeKey"].as_str().expect("edgeKey").to_owned(),
    )
}

/// `GET /api/endpoints/{id}/docker{path}` with `client`: status and body (status 0 when the
/// request itself failed, with the reason as body).
pub async fn docker_get_with(
    client: &reqwest::Client,
    base_url: &str,
    id: u64,
    path: &str,
) -> (u16, String) {
    match client
        .get(format!("{base_url}/api/endpoints/{id}/docker{path}"))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, format!("request failed: {e}")),
    }
}

/// [`docker_get_with`] on a fresh client.
pub async fn docker_get(base_url: &str, id: u64, path: &str) -> (u16, String) {
    docker_get_with(&http(), base_url, id, path).await
}

/// The tunnel as the control plane reports it: (state, gateway, epoch).
pub async fn tunnel(base_url: &str, id: u64) -> (String, Option<String>, Option<u64>) {
    let env = get_env(base_url, id).await;
    let t = &env["tunnel"];
    (
        t["state"].as_str().unwrap_or_default().to_owned(),
        t["gateway"].as_str().map(str::to_owned),
        t["epoch"].as_u64(),
    )
}

/// Sum of a metric's samples whose line starts with `name` (labels included in `name` match),
/// from `<metrics_url>/metrics`.
pub async fn metric(metrics_url: &str, name: &str) -> f64 {
    let text = http()
        .get(format!("{metrics_url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every sample of `<metrics_url>/metrics` by its full name, labels included (e.g.
/// `edgeplane_tunnel_wait_seconds_bucket{le="1"}`).
pub async fn metric_samples(metrics_url: &str) -> std::collections::BTreeMap<String, f64> {
    try_metric_samples(&http(), metrics_url)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`metric_samples`] with `client`, a failed scrape as text (for runs that must outlive one).
pub async fn try_metric_samples(
    client: &reqwest::Client,
    metrics_url: &str,
) -> Result<std::collections::BTreeMap<String, f64>, String> {
    let url = format!("{metrics_url}/metrics");
    let text = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .text()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect())
}

/// What each sample of `after` (all whose name starts with `prefix`) grew by since `before`.
pub fn metric_delta(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
    prefix: &str,
) -> std::collections::BTreeMap<String, f64> {
    after
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

/// The sum of the samples whose name starts with `prefix`.
pub fn metric_sum(m: &std::collections::BTreeMap<String, f64>, prefix: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// The allocator's counts among `samples` (`edgeplane_allocator_<kind>_bytes`), in bytes by
/// kind (`allocated`, `active`, `resident`, ...).
pub fn allocator_bytes(
    samples: &std::collections::BTreeMap<String, f64>,
) -> std::collections::BTreeMap<&str, f64> {
    samples
        .iter()
        .filter_map(|(k, v)| {
            let kind = k
                .strip_prefix("edgeplane_allocator_")?
                .strip_suffix("_bytes")?;
            Some((kind, *v))
        })
        .collect()
}

/// Waits until `<metrics_url>/readyz` answers 2xx (at most 10 s).
pub async fn wait_ready(metrics_url: &str) {
    let client = http();
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{metrics_url}/readyz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{metrics_url} did not become ready in 10 s");
}

/// Writes `request` (raw HTTP/1.1 bytes, possibly several pipelined requests, the last with
/// `Connection: close`) to the HTTPS server at `base_url` on one connection and returns every
/// byte it answers until it closes (at most 30 s): for tests of framing, which a client library
/// would smooth over.
pub async fn raw_https(base_url: &str, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let url = url::Url::parse(base_url).expect("base url");
    let host = url.host_str().expect("host").to_owned();
    let port = url.port().expect("port");
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .expect("connect");
    let mut stream = crate::hostile::tls_over(tcp).await.expect("tls");
    stream.write_all(request).await.expect("write request");
    stream.flush().await.expect("flush");
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut out)).await;
    match read {
        Ok(Ok(_)) => {}
        // A close without close_notify still ends the answer.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Ok(Err(e)) => panic!("reading the answer: {e}"),
        Err(_) => panic!("the server kept the connection open for 30 s"),
    }
    out
}
