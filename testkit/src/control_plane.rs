//! Real control planes for tests: in-process on an actix system of their own
//! ([`ControlPlane`], usable from any runtime or none), or the real binary ([`CpProcess`]).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use control_plane::config::{Config, TlsSource};
use control_plane::{prepare, Listeners};

use crate::api::{self, install_crypto, ADMIN_KEY};
use crate::process::{bin, terminate};
use crate::wait::{free_port, listener};

type Tweak = Box<dyn FnOnce(&mut Config) + Send>;

/// Starts of the binary tried before giving up.
const START_ATTEMPTS: usize = 3;
/// How long opening the store and preparing TLS may take.
const PREPARE_WITHIN: Duration = Duration::from_secs(30);
/// How long dropping a control plane waits for it to stop (heartbeats flushed, store closed)
/// before its data dir is removed.
const STOP_WITHIN: Duration = Duration::from_secs(20);

/// How a [`ControlPlane`] is started; [`ControlPlane::builder`].
#[must_use]
pub struct CpBuilder {
    dir: Option<PathBuf>,
    api: Option<TcpListener>,
    public_url: Option<String>,
    workers: usize,
    tweaks: Vec<Tweak>,
}

impl CpBuilder {
    /// Keeps the data in `dir` (restart tests); by default a fresh temp dir, removed at the end.
    pub fn in_dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_owned());
        self
    }

    /// Serves the API on a listener the caller bound (it may have put a proxy in front).
    pub fn api_listener(mut self, api: TcpListener) -> Self {
        self.api = Some(api);
        self
    }

    /// The URL put into join keys (default: the API listener's own).
    pub fn public_url(mut self, url: impl Into<String>) -> Self {
        self.public_url = Some(url.into());
        self
    }

    /// actix workers of the API (default 1).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Keeps all shared state in this Redis, under `prefix`.
    pub fn redis(self, url: &str, prefix: &str) -> Self {
        let (url, prefix) = (url.to_owned(), prefix.to_owned());
        self.configure(move |c| {
            c.redis_url = Some(url);
            c.redis_prefix = prefix;
        })
    }

    /// Serves this certificate (replicas of one cluster share it).
    pub fn tls_files(self, cert: &Path, key: &Path) -> Self {
        let (cert, key) = (cert.to_owned(), key.to_owned());
        self.configure(move |c| c.tls = TlsSource::Files { cert, key })
    }

    /// Any other change to the configuration, applied in order after the kit's defaults.
    pub fn configure(mut self, tweak: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.tweaks.push(Box::new(tweak));
        self
    }

    /// Starts it on its own thread and returns once it is prepared (store open, certificate
    /// in place, listeners bound); it may not answer `/readyz` yet. Blocking: for callers
    /// without a runtime (benches); tests use [`CpBuilder::start`].
    pub fn spawn(self) -> ControlPlane {
        let (cp, prepared) = self.launch();
        match prepared.recv_timeout(PREPARE_WITHIN) {
            Ok(Ok(())) => cp,
            Ok(Err(e)) => panic!("control plane did not prepare: {e}"),
            Err(e) => panic!("control plane did not prepare in {PREPARE_WITHIN:?}: {e}"),
        }
    }

    /// [`CpBuilder::spawn`] without blocking the caller's runtime, then waits until it
    /// answers `/readyz`.
    pub async fn start(self) -> ControlPlane {
        let (cp, prepared) = self.launch();
        let deadline = tokio::time::Instant::now() + PREPARE_WITHIN;
        loop {
            match prepared.try_recv() {
                Ok(Ok(())) => break,
                Ok(Err(e)) => panic!("control plane did not prepare: {e}"),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    panic!("control plane thread ended before it was prepared")
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "control plane did not prepare in {PREPARE_WITHIN:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        api::wait_ready(&cp.metrics_url).await;
        cp
    }

    /// The thread, and where it says whether preparing worked.
    fn launch(self) -> (ControlPlane, std::sync::mpsc::Receiver<Result<(), String>>) {
        install_crypto();
        let (tmp, dir) = match self.dir {
            Some(dir) => (None, dir),
            None => {
                let tmp = tempfile::tempdir().expect("tempdir for the control plane");
                let dir = tmp.path().to_owned();
                (Some(tmp), dir)
            }
        };
        let api = self.api.unwrap_or_else(listener);
        let metrics = listener();
        let api_addr = api.local_addr().expect("api address");
        let metrics_addr = metrics.local_addr().expect("metrics address");
        let url = format!("https://127.0.0.1:{}", api_addr.port());
        let mut config = Config::new(dir.clone());
        config.public_url = Some(self.public_url.unwrap_or_else(|| url.clone()));
        config.admin_api_key = Some(ADMIN_KEY.into());
        config.limits.workers = self.workers;
        for tweak in self.tweaks {
            tweak(&mut config);
        }
        let cert = match &config.tls {
            TlsSource::Files { cert, .. } => cert.clone(),
            TlsSource::SelfSigned => dir.join("tls-cert.pem"),
        };
        let tunnel = config.embedded_gateway.then(listener);
        let tunnel_addr = tunnel.as_ref().and_then(|l| l.local_addr().ok());
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("control-plane".into())
            .spawn(move || {
                actix_rt::System::new().block_on(async move {
                    let listeners = Listeners {
                        api,
                        metrics,
                        tunnel,
                    };
                    let prepared = match prepare(config, listeners).await {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let stopped = async move {
                        // Polls the std channel without blocking the actix thread; a dropped
                        // sender (the test ended or panicked) stops too.
                        while let Err(std::sync::mpsc::TryRecvError::Empty) = stop_rx.try_recv() {
                            actix_rt::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    if let Err(e) = prepared.serve(stopped).await {
                        tracing::error!(error = %e, "control plane failed");
                    }
                });
            })
            .expect("spawn the control plane thread");
        let cp = ControlPlane {
            url,
            metrics_url: format!("http://{metrics_addr}"),
            data_dir: dir,
            cert,
            tunnel_addr,
            _tmp: tmp,
            stop: Some(stop),
            thread: Some(thread),
        };
        (cp, ready_rx)
    }
}

/// A control plane running in this process, on its own thread and actix system.
pub struct ControlPlane {
    pub url: String,
    pub metrics_url: String,
    pub data_dir: PathBuf,
    /// The certificate it serves (give it to the docker CLI as `ca.pem`).
    pub cert: PathBuf,
    /// The embedded gateway's listener, if it runs one.
    pub tunnel_addr: Option<std::net::SocketAddr>,
    _tmp: Option<tempfile::TempDir>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlPlane {
    pub fn builder() -> CpBuilder {
        CpBuilder {
            dir: None,
            api: None,
            public_url: None,
            workers: 1,
            tweaks: Vec::new(),
        }
    }

    /// The defaults: embedded store in a temp dir, embedded gateway, one worker.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        Self::builder().configure(tweak).start().await
    }

    /// A replica on `redis` (heartbeats flushed every 200 ms); with `tls`, sharing that
    /// replica's certificate (its fingerprint is in every join key), as in production.
    pub async fn replica(redis: &crate::RedisServer, tls: Option<&ControlPlane>) -> Self {
        let url = redis.url();
        let files = tls.map(|first| TlsSource::Files {
            cert: first.data_dir.join("tls-cert.pem"),
            key: first.data_dir.join("tls-key.pem"),
        });
        Self::start_with(move |c| {
            c.redis_url = Some(url);
            if let Some(files) = files {
                c.tls = files;
            }
            c.limits.heartbeat_flush = Duration::from_millis(200);
        })
        .await
    }

    /// Starts on an existing data dir (restart tests).
    pub async fn start_in(dir: &Path, tweak: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        Self::builder().in_dir(dir).configure(tweak).start().await
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    pub async fn metric(&self, name: &str) -> f64 {
        api::metric(&self.metrics_url, name).await
    }

    /// `GET /api/endpoints/{id}`.
    pub async fn get_env(&self, id: u64) -> serde_json::Value {
        api::get_env(&self.url, id).await
    }

    /// `GET /api/endpoints/{id}/docker{path}`: status and body.
    pub async fn docker_get(&self, id: u64, path: &str) -> (u16, String) {
        api::docker_get(&self.url, id, path).await
    }

    /// The tunnel of `id` as this replica reports it: (state, gateway, epoch).
    pub async fn tunnel(&self, id: u64) -> (String, Option<String>, Option<u64>) {
        api::tunnel(&self.url, id).await
    }

    /// Graceful stop: in-flight requests finish, the last heartbeats are written. Waits for
    /// it (at most 20 s) without blocking the caller's runtime.
    pub async fn stop(mut self) {
        self.signal_stop();
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + STOP_WITHIN;
            while !thread.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "the control plane did not stop within {STOP_WITHIN:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = thread.join();
        }
    }

    /// [`ControlPlane::stop`] for callers without a runtime (benches), waiting at most
    /// `limit`; `false` if it was still running then (it is left to finish alone).
    pub fn stop_blocking(mut self, limit: Duration) -> bool {
        self.signal_stop();
        let Some(thread) = self.thread.take() else {
            return true;
        };
        let deadline = Instant::now() + limit;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = thread.join();
        true
    }

    fn signal_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.signal_stop();
        // Waits (bounded) so that it is gone before its data dir, and before what it uses
        // (Redis, gateways) is dropped after it; a failing test's unwinding is never held up.
        if std::thread::panicking() {
            return;
        }
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + STOP_WITHIN;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// The real `control-plane` binary, killed on drop.
pub struct CpProcess {
    pub url: String,
    pub metrics_url: String,
    child: Child,
}

impl CpProcess {
    /// Starts the binary on a free API port, with `extra` flags, and waits until it is ready.
    pub async fn spawn(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_retrying(data_dir, None, extra).await
    }

    /// Starts the binary on `api_port` and waits until it is ready.
    pub async fn spawn_at(data_dir: &Path, api_port: u16, extra: &[&str]) -> Self {
        Self::start_retrying(data_dir, Some(api_port), extra).await
    }

    /// A process that exits before it is ready (a port picked free was taken meanwhile) is
    /// started again on other free ports, at most a few times.
    async fn start_retrying(data_dir: &Path, api_port: Option<u16>, extra: &[&str]) -> Self {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let api_port = api_port.unwrap_or_else(free_port);
            match Self::try_start(data_dir, api_port, extra).await {
                Ok(p) => return p,
                Err(why) => failures.push(why),
            }
        }
        panic!("control-plane did not start: {failures:#?}");
    }

    /// Starts the binary on `api_port` without waiting for it to be ready (a replica started
    /// while its store is down): see [`CpProcess::ready_within`].
    pub fn launch(data_dir: &Path, api_port: u16, extra: &[&str]) -> Self {
        let metrics_port = free_port();
        let child = Command::new(bin("control-plane"))
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
        Self {
            url: format!("https://127.0.0.1:{api_port}"),
            metrics_url: format!("http://127.0.0.1:{metrics_port}"),
            child,
        }
    }

    /// Whether `/readyz` answered 200 within `limit` (false at once if the process exited).
    pub async fn ready_within(&mut self, limit: Duration) -> bool {
        let client = api::http();
        let readyz = format!("{}/readyz", self.metrics_url);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(r) = client.get(&readyz).send().await {
                if r.status().is_success() {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The status `path` on the metrics listener answers now (`None`: no answer).
    pub async fn probe(&self, path: &str) -> Option<u16> {
        api::http()
            .get(format!("{}{path}", self.metrics_url))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    async fn try_start(data_dir: &Path, api_port: u16, extra: &[&str]) -> Result<Self, String> {
        let mut p = Self::launch(data_dir, api_port, extra);
        if p.ready_within(Duration::from_secs(10)).await {
            return Ok(p);
        }
        match p.child.try_wait() {
            Ok(Some(status)) => Err(format!("exited with {status} before it was ready")),
            _ => Err("not ready within 10 s".to_owned()),
        }
    }

    /// Restarts on the api port in `token` (agents keep calling the same URL).
    pub async fn spawn_on_same_ports(data_dir: &Path, token: &proto::JoinToken) -> Self {
        let api_port = url::Url::parse(&token.api_url)
            .ok()
            .and_then(|u| u.port())
            .expect("api port in token");
        Self::spawn_at(data_dir, api_port, &[]).await
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        url::Url::parse(&self.url)
            .ok()
            .and_then(|u| u.port())
            .expect("api port")
    }

    /// SIGTERM, without waiting: see [`CpProcess::exited_within`].
    pub fn sigterm(&self) {
        crate::process::sigterm(&self.child);
    }

    /// Its exit status once it exited, if it did within `limit` (a blocking wait).
    pub fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }

    /// SIGTERM, then wait for the exit (graceful: final heartbeat flush).
    pub fn stop(mut self) {
        terminate(&mut self.child, Duration::from_secs(30));
    }

    /// SIGKILL: no goodbye.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
