//! The cluster mode's acceptance test: a control plane with `--redis-url` and no embedded
//! gateway (in-process, on its own actix system), two real `tunnel-gateway` processes and a
//! real `redis-server` sharing one key prefix, the edge agent (in-process) serving Podman's
//! Docker API. A Docker API call goes through whichever gateway the agent reached; killing
//! that gateway (SIGKILL: no goodbye, its records only expire) and calling again brings the
//! tunnel back through the other one.
//!
//! Every child process is owned by a guard that kills it on drop, so a failing assertion
//! leaves nothing behind; on failure the gateways' logs are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use control_plane::store::redis::RedisStore;
use control_plane::store::Store as _;
use serde_json::{json, Value};

const ADMIN_KEY: &str = "cluster-test-admin-key-0123456789";
/// How long a proxied request waits for the agent's tunnel (the control plane's
/// `limits.tunnel_wait`).
const TUNNEL_WAIT: Duration = Duration::from_secs(10);
/// The gateways' lease: a killed gateway's registration and locations expire this fast.
const LEASE: &str = "3s";
/// The whole failover (agent reconnecting through the other gateway, proxy retrying) must
/// complete within this.
const FAILOVER_BUDGET: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn http() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        // Above two tunnel waits: a request that meets a stale location waits twice at most.
        .timeout(TUNNEL_WAIT * 2 + Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

/// Polls `check` until it returns `Some`, at most `within`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for a child process to exit, at most `within`; `false` if it is still running.
fn wait_exit(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// SIGTERM, then SIGKILL if the process has not exited within `grace`.
fn terminate(child: &mut Child, grace: Duration) -> bool {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let graceful = wait_exit(child, grace);
    if !graceful {
        let _ = child.kill();
        let _ = child.wait();
    }
    graceful
}

// ---------------------------------------------------------------------------------------------
// redis-server

/// A throwaway `redis-server` on a free port, without persistence, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Self {
        let mut failures = Vec::new();
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(dir.path().join("redis.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server (apt-get install -y redis-server)");
            let mut redis = Self { child, port, dir };
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(status)) = redis.child.try_wait() {
                    failures.push(format!("exited with {status}: {}", redis.log()));
                    break;
                }
                if redis_ping(port) {
                    return redis;
                }
                if Instant::now() >= deadline {
                    failures.push(format!("no PONG in 15 s: {}", redis.log()));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis-server did not start: {failures:?}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log"))
            .unwrap_or_else(|e| format!("(no log: {e})"))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One raw RESP PING.
fn redis_ping(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
        let mut reply = [0u8; 7];
        s.read_exact(&mut reply)?;
        Ok(&reply == b"+PONG\r\n")
    };
    attempt().unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// Podman's Docker API

/// Podman's Docker API service on a private socket; stopped on drop.
struct Engine {
    dir: tempfile::TempDir,
}

fn podman_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/podman-engine")
}

impl Engine {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(podman_script())
            .arg("start")
            .arg(dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/podman-engine");
        let engine = Self { dir };
        assert!(
            out.status.success(),
            "podman engine did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        engine
    }

    fn docker_host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = Command::new(podman_script())
            .arg("stop")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------------------------
// The control plane, in-process on its own actix system thread

struct ControlPlane {
    url: String,
    metrics_url: String,
    data_dir: tempfile::TempDir,
    go: Option<std::sync::mpsc::Sender<()>>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlPlane {
    /// Prepares (store, generated certificate, admin key) on a thread of its own and returns
    /// once the certificate is on disk; [`Self::serve`] starts serving.
    fn prepare(redis_url: &str, prefix: &str, tunnel_public_addr: &str) -> Self {
        install_crypto();
        let data_dir = tempfile::tempdir().unwrap();
        let api = TcpListener::bind("127.0.0.1:0").expect("bind api");
        let metrics = TcpListener::bind("127.0.0.1:0").expect("bind metrics");
        let url = format!("https://127.0.0.1:{}", api.local_addr().unwrap().port());
        let metrics_url = format!("http://{}", metrics.local_addr().unwrap());
        let mut config = control_plane::config::Config::new(data_dir.path().to_owned());
        config.public_url = Some(url.clone());
        config.admin_api_key = Some(ADMIN_KEY.into());
        config.redis_url = Some(redis_url.to_owned());
        config.redis_prefix = prefix.to_owned();
        config.embedded_gateway = false;
        config.tunnel_public_addr = Some(tunnel_public_addr.to_owned());
        config.limits.tunnel_wait = TUNNEL_WAIT;
        config.limits.workers = 1;
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("control-plane".into())
            .spawn(move || {
                actix_rt::System::new().block_on(async move {
                    let prepared = match control_plane::prepare(
                        config,
                        control_plane::Listeners {
                            api,
                            metrics,
                            tunnel: None,
                        },
                    )
                    .await
                    {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    // A dropped sender (the test failed before serving) ends the thread.
                    if go_rx.recv().is_err() {
                        return;
                    }
                    let stop = async move {
                        // Poll the std channel without blocking the actix thread; a dropped
                        // sender (the test panicked) stops too.
                        while let Err(std::sync::mpsc::TryRecvError::Empty) = stop_rx.try_recv() {
                            actix_rt::time::sleep(Duration::from_millis(50)).await;
                        }
                    };
                    if let Err(e) = prepared.serve(stop).await {
                        tracing::error!(error = %e, "control plane failed");
                    }
                });
            })
            .expect("spawn the control plane thread");
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("control plane did not prepare: {e}"),
            Err(e) => panic!("control plane did not prepare in 30 s: {e}"),
        }
        Self {
            url,
            metrics_url,
            data_dir,
            go: Some(go_tx),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Starts serving (API, metrics, background duties) and waits until ready.
    async fn serve(&mut self) {
        if let Some(go) = self.go.take() {
            go.send(())
                .expect("the control plane thread is waiting to serve");
        }
        let readyz = format!("{}/readyz", self.metrics_url);
        eventually(Duration::from_secs(10), "control plane ready", || async {
            let r = http().get(&readyz).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
    }

    fn api(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    fn cert(&self) -> PathBuf {
        self.data_dir.path().join("tls-cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.data_dir.path().join("tls-key.pem")
    }

    /// Graceful stop (in-flight requests finish, last heartbeats flushed), bounded.
    fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !thread.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "the control plane did not stop within 20 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            thread.join().expect("control plane thread");
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // On a failed test: ask it to stop; never block the unwinding on it.
        self.go.take();
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tunnel-gateway processes

struct Gateway {
    id: String,
    listen: SocketAddr,
    metrics: SocketAddr,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    fn spawn(id: &str, port: u16, redis_url: &str, prefix: &str, cert: &Path, key: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(format!("{id}.log"));
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tunnel-gateway"))
            .args(["--listen", &listen.to_string()])
            .args(["--redis-url", redis_url])
            .args(["--redis-prefix", prefix])
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--id", id])
            .args(["--lease", LEASE])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn tunnel-gateway");
        Self {
            id: id.to_owned(),
            listen,
            metrics,
            child,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Waits for `/readyz` (store reachable, listeners bound); panics with the log if the
    /// process exits or does not get ready.
    async fn wait_ready(&mut self) {
        let client = http();
        let url = format!("http://{}/readyz", self.metrics);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "gateway {} exited with {status} before ready:\n{}",
                    self.id,
                    self.log()
                );
            }
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway {} not ready in 20 s:\n{}",
                self.id,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no release of locations, no unregistration.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the gateway");
        self.child.wait().expect("reap the gateway");
    }

    /// SIGTERM and a graceful exit (tunnels closed, locations released, unregistered).
    fn stop(&mut self) -> bool {
        terminate(&mut self.child, Duration::from_secs(15))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- log of gateway {} ({}) -----\n{}\n----- end of {} -----",
                self.id,
                self.listen,
                self.log(),
                self.id
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent, in-process

struct Agent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start(key: &str, docker_host: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = edge_agent::Config::from_args(edge_agent::Args {
            edge_key: Some(key.to_owned()),
            data_dir: Some(dir.path().to_owned()),
            docker_host: Some(docker_host.to_owned()),
            inactivity_timeout: Some("5m".to_owned()),
            ..Default::default()
        })
        .expect("agent config");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            edge_agent::run(config, async {
                let _ = rx.await;
            })
            .await
            .expect("agent run");
        });
        Self {
            stop: Some(tx),
            task,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("the agent stops within 15 s")
            .expect("agent task");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// API helpers

async fn get_env(cp: &ControlPlane, id: u64) -> Value {
    http()
        .get(cp.api(&format!("/api/endpoints/{id}")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("get environment")
        .json()
        .await
        .expect("environment JSON")
}

/// `GET /api/endpoints/{id}/docker{path}`: status and body.
async fn docker_get(cp: &ControlPlane, id: u64, path: &str) -> (u16, String) {
    match http()
        .get(cp.api(&format!("/api/endpoints/{id}/docker{path}")))
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

/// The tunnel as the control plane reports it: (state, gateway, epoch).
async fn tunnel(cp: &ControlPlane, id: u64) -> (String, Option<String>, Option<u64>) {
    let env = get_env(cp, id).await;
    let t = &env["tunnel"];
    (
        t["state"].as_str().unwrap_or_default().to_owned(),
        t["gateway"].as_str().map(str::to_owned),
        t["epoch"].as_u64(),
    )
}

async fn live_gateway_ids(store: &RedisStore) -> Vec<String> {
    let mut ids: Vec<String> = store
        .live_gateways()
        .await
        .map(|g| g.into_iter().map(|g| g.id).collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,actix_server=warn,actix_web=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tunnel_fails_over_to_the_other_gateway() {
    init_tracing();
    let started = Instant::now();
    let redis = Redis::start();
    let engine = Engine::start();
    let prefix = format!("edgeplane-cluster-test-{}:", std::process::id());

    // The control plane is prepared first: `prepare` generates the certificate the gateways
    // must serve (its fingerprint is in join keys). It starts serving once both gateways are
    // registered, so the gateway list it hands out with tunnel credentials holds both from
    // the start (it refreshes that list every 2 s). Join keys name gateway A, the fallback
    // when that list is empty.
    let (port_a, port_b) = (free_port(), free_port());
    let mut cp = ControlPlane::prepare(&redis.url(), &prefix, &format!("127.0.0.1:{port_a}"));
    let spawn = |id: &str, port: u16| {
        Gateway::spawn(id, port, &redis.url(), &prefix, &cp.cert(), &cp.key())
    };
    let mut a = spawn("gw-a", port_a);
    let mut b = spawn("gw-b", port_b);
    a.wait_ready().await;
    b.wait_ready().await;
    let store = RedisStore::connect(&redis.url(), &prefix)
        .await
        .expect("connect to redis as an observer");
    eventually(
        Duration::from_secs(10),
        "both gateways registered",
        || async { (live_gateway_ids(&store).await == ["gw-a", "gw-b"]).then_some(()) },
    )
    .await;
    cp.serve().await;
    eprintln!(
        "[cluster] redis, podman, gateways and control plane up after {:?}",
        started.elapsed()
    );

    // An environment and its agent.
    let r = http()
        .post(cp.api("/api/endpoints"))
        .header("X-API-Key", ADMIN_KEY)
        .json(&json!({ "name": "cluster-host", "checkinInterval": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_u64().unwrap();
    let key = created["edgeKey"].as_str().unwrap().to_owned();
    let agent = Agent::start(&key, &engine.docker_host());
    eventually(Duration::from_secs(20), "agent up", || async {
        (get_env(&cp, id).await["status"] == "up").then_some(())
    })
    .await;

    // Through whichever gateway the agent reaches.
    let t0 = Instant::now();
    let (status, body) = docker_get(&cp, id, "/_ping").await;
    assert_eq!((status, body.as_str()), (200, "OK"), "first _ping");
    eprintln!(
        "[cluster] first _ping (opening the tunnel) took {:?}",
        t0.elapsed()
    );
    let (status, body) = docker_get(&cp, id, "/version").await;
    assert_eq!(status, 200, "version: {body}");
    let version: Value = serde_json::from_str(&body).expect("version JSON");
    assert!(
        version["Version"].as_str().is_some_and(|v| !v.is_empty()),
        "{version}"
    );
    let (state, first_gw, first_epoch) = tunnel(&cp, id).await;
    assert_eq!(state, "open");
    let first_gw = first_gw.expect("the open tunnel names its gateway");
    let first_epoch = first_epoch.expect("the open tunnel has an epoch");
    assert!(
        first_gw == "gw-a" || first_gw == "gw-b",
        "unexpected gateway {first_gw}"
    );
    eprintln!("[cluster] tunnel open through {first_gw}, epoch {first_epoch}");

    // Kill that gateway without a goodbye; the other one must take over.
    let (dead, survivor) = if first_gw == "gw-a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    dead.kill();
    let killed_at = Instant::now();
    let deadline = killed_at + FAILOVER_BUDGET;
    // Expected: the first request succeeds (the proxy finds the location stale, waits for the
    // agent's newer tunnel and retries once). A 502/504 from racing the failover is tolerated
    // and retried; every attempt is recorded and printed.
    let mut attempts = Vec::new();
    loop {
        let t = Instant::now();
        let (status, body) = docker_get(&cp, id, "/_ping").await;
        attempts.push(format!(
            "{status} after {:?}: {}",
            t.elapsed(),
            body.chars().take(300).collect::<String>()
        ));
        if status == 200 {
            assert_eq!(body, "OK");
            break;
        }
        assert!(
            matches!(status, 502 | 504 | 0),
            "unexpected answer during failover: {attempts:#?}"
        );
        assert!(
            Instant::now() < deadline,
            "no answer through {} within {FAILOVER_BUDGET:?} of killing {}: {attempts:#?}",
            survivor.id,
            dead.id
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "[cluster] after killing {}: _ping answered 200 in {:?}, {} attempt(s): {attempts:#?}",
        dead.id,
        killed_at.elapsed(),
        attempts.len()
    );
    let (state, gw, epoch) = tunnel(&cp, id).await;
    assert_eq!(state, "open");
    assert_eq!(
        gw.as_deref(),
        Some(survivor.id.as_str()),
        "the tunnel moved"
    );
    let epoch = epoch.expect("epoch");
    assert!(epoch > first_epoch, "epoch {epoch} after {first_epoch}");
    let (status, body) = docker_get(&cp, id, "/version").await;
    assert_eq!(status, 200, "version after failover: {body}");
    // The dead gateway's registration expires with its lease.
    let survivor_id = survivor.id.clone();
    eventually(
        Duration::from_secs(10),
        "the killed gateway's registration expired",
        || async { (live_gateway_ids(&store).await == [survivor_id.as_str()]).then_some(()) },
    )
    .await;

    // Clean shutdown, in dependency order.
    agent.stop().await;
    cp.stop();
    assert!(
        survivor.stop(),
        "the surviving gateway stops on SIGTERM:\n{}",
        survivor.log()
    );
    eventually(Duration::from_secs(5), "no gateway registered", || async {
        live_gateway_ids(&store).await.is_empty().then_some(())
    })
    .await;
    drop(store);
    drop(a);
    drop(b);
    drop(redis);
    drop(engine);
    eprintln!("[cluster] done in {:?}", started.elapsed());
}
