//! Starting real control planes for tests: in-process ([`TestCp`]) or as the real binary
//! ([`CpProcess`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use control_plane::config::Config;
use control_plane::{prepare, Listeners};

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub fn http() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("reqwest client")
}

/// A control plane running inside the test's actix system.
pub struct TestCp {
    pub url: String,
    pub metrics_url: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<actix_rt::task::JoinHandle<()>>,
}

impl TestCp {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        let mut cp = Self::start_in(&dir, tweak).await;
        cp._tmp = Some(tmp);
        cp
    }

    /// Starts on an existing data dir (restart tests).
    pub async fn start_in(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Self {
        install_crypto();
        let api = TcpListener::bind("127.0.0.1:0").expect("bind api");
        let metrics = TcpListener::bind("127.0.0.1:0").expect("bind metrics");
        let api_addr = api.local_addr().expect("addr");
        let metrics_addr = metrics.local_addr().expect("addr");
        let mut config = Config::new(dir.to_owned());
        config.public_url = Some(format!("https://127.0.0.1:{}", api_addr.port()));
        config.admin_api_key = Some(ADMIN_KEY.into());
        config.limits.workers = 1;
        tweak(&mut config);
        let tunnel = config
            .embedded_gateway
            .then(|| TcpListener::bind("127.0.0.1:0").expect("bind tunnel"));
        let prepared = prepare(
            config,
            Listeners {
                api,
                metrics,
                tunnel,
            },
        )
        .await
        .expect("prepare");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = actix_rt::spawn(async move {
            prepared
                .serve(async {
                    let _ = rx.await;
                })
                .await
                .expect("serve");
        });
        let cp = Self {
            url: format!("https://127.0.0.1:{}", api_addr.port()),
            metrics_url: format!("http://{metrics_addr}"),
            data_dir: dir.to_owned(),
            _tmp: None,
            stop: Some(tx),
            task: Some(task),
        };
        wait_ready(&cp.metrics_url).await;
        cp
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    /// Graceful stop: waits for the final heartbeat flush.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub async fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics_url, name).await
    }
}

/// `GET /api/endpoints/{id}` on the control plane at `base_url`, as JSON.
pub async fn get_env(base_url: &str, id: u64) -> serde_json::Value {
    http()
        .get(format!("{base_url}/api/endpoints/{id}"))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("get environment")
        .json()
        .await
        .expect("environment JSON")
}

/// `POST /api/endpoints` with `body` (201 expected): the new id and its join token.
pub async fn create_env(base_url: &str, body: serde_json::Value) -> (u64, proto::JoinToken) {
    let r = http()
        .post(format!("{base_url}/api/endpoints"))
        .header("X-API-Key", ADMIN_KEY)
        .json(&body)
        .send()
        .await
        .expect("create environment");
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    let v: serde_json::Value = r.json().await.expect("environment JSON");
    (
        v["id"].as_u64().expect("id"),
        proto::JoinToken::parse(v["edgeKey"].as_str().expect("edgeKey")).expect("join token"),
    )
}

/// Sum of a metric's samples whose line starts with `name` (labels included in `name` match).
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
    panic!("control plane at {metrics_url} did not become ready in 10 s");
}

/// Polls `check` until it returns `Some`, at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The real `control-plane` binary.
pub struct CpProcess {
    pub url: String,
    pub metrics_url: String,
    child: Child,
}

impl CpProcess {
    pub async fn spawn(data_dir: &Path, extra: &[&str]) -> Self {
        Self::spawn_at(data_dir, free_port(), extra).await
    }

    pub async fn spawn_at(data_dir: &Path, api_port: u16, extra: &[&str]) -> Self {
        let metrics_port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_control-plane"))
            .args(["--data-dir", &data_dir.display().to_string()])
            .args(["--api-addr", &format!("127.0.0.1:{api_port}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--public-url", &format!("https://127.0.0.1:{api_port}")])
            .args(extra)
            .env("EDGEPLANE_ADMIN_API_KEY", ADMIN_KEY)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn control-plane");
        let p = Self {
            url: format!("https://127.0.0.1:{api_port}"),
            metrics_url: format!("http://127.0.0.1:{metrics_port}"),
            child,
        };
        wait_ready(&p.metrics_url).await;
        p
    }

    /// Restarts on the api port in `token` (agents keep calling the same URL).
    pub async fn spawn_on_same_ports(data_dir: &Path, token: &proto::JoinToken) -> Self {
        let api_port = url::Url::parse(&token.api_url)
            .ok()
            .and_then(|u| u.port())
            .expect("api port in token");
        Self::spawn_at(data_dir, api_port, &[]).await
    }

    /// SIGTERM, then wait for the exit (graceful: final heartbeat flush).
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }
}

impl Drop for CpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
