//! The real `tunnel-gateway` binary, on Redis, with its log kept for failure messages.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::api::http;
use crate::process::{bin, terminate};
use crate::wait::free_port;

/// How a gateway process is started.
#[derive(Clone, Debug)]
pub struct GatewayArgs {
    pub id: String,
    /// Its tunnel listener on 127.0.0.1 (0: a free one).
    pub port: u16,
    pub redis_url: String,
    pub redis_prefix: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Lease of its tunnel locations and registration (`--lease`), e.g. `3s`.
    pub lease: String,
    /// Its `RUST_LOG` (the log is kept in a file and printed when a test fails).
    pub rust_log: String,
}

pub struct GatewayProcess {
    pub id: String,
    /// Its tunnel listener: what agents connect to, and replicas dial.
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Starts tried before giving up, when a process exits before it is ready (another process
/// took a port picked a moment earlier).
const START_ATTEMPTS: usize = 3;

impl GatewayProcess {
    /// Spawns it and waits until it serves. A process that exits first (a port picked free
    /// was taken meanwhile) is started again on other ports, at most a few times.
    pub async fn start(args: &GatewayArgs) -> Self {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let mut gw = Self::spawn(args);
            match gw.ready().await {
                Ok(()) => return gw,
                Err(why) => failures.push(why),
            }
        }
        panic!("gateway {} did not start: {failures:#?}", args.id);
    }

    /// Spawns it; [`GatewayProcess::wait_ready`] waits until it serves.
    pub fn spawn(args: &GatewayArgs) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for the gateway");
        let log = dir.path().join(format!("{}.log", args.id));
        let port = if args.port == 0 {
            free_port()
        } else {
            args.port
        };
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let out = std::fs::File::create(&log).expect("gateway log file");
        let child = Command::new(bin("tunnel-gateway"))
            .args(["--listen", &listen.to_string()])
            .args(["--redis-url", &args.redis_url])
            .args(["--redis-prefix", &args.redis_prefix])
            .arg("--tls-cert")
            .arg(&args.cert)
            .arg("--tls-key")
            .arg(&args.key)
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--id", &args.id])
            .args(["--lease", &args.lease])
            .env("RUST_LOG", &args.rust_log)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("gateway log file"))
            .stderr(out)
            .spawn()
            .expect("spawn tunnel-gateway");
        Self {
            id: args.id.clone(),
            listen,
            metrics,
            child,
            log,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `/readyz` (store reachable, listeners bound); panics with the log if the
    /// process exits or does not get ready in 20 s.
    pub async fn wait_ready(&mut self) {
        if let Err(why) = self.ready().await {
            panic!("{why}");
        }
    }

    async fn ready(&mut self) -> Result<(), String> {
        let client = http();
        let url = format!("http://{}/readyz", self.metrics);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "gateway {} exited with {status} before ready:\n{}",
                    self.id,
                    self.log()
                ));
            }
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "gateway {} not ready in 20 s:\n{}",
                    self.id,
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no release of locations, no unregistration.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the gateway");
        self.child.wait().expect("reap the gateway");
    }

    /// SIGTERM and a graceful exit (tunnels closed, locations released, unregistered);
    /// `false` if it had to be killed after 15 s.
    pub fn stop(&mut self) -> bool {
        terminate(&mut self.child, Duration::from_secs(15))
    }
}

impl Drop for GatewayProcess {
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
