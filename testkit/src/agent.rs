//! The real edge agent: in-process ([`Agent`], [`AgentThread`]), stopped on request (or
//! aborted on drop), or the binary ([`AgentProcess`]).

use std::time::Duration;

/// The agent's configuration from `args`, with a fresh temporary data dir (kept as long as
/// the agent) unless `args` names one.
fn config(mut args: edge_agent::Args) -> (edge_agent::Config, Option<tempfile::TempDir>) {
    let dir = if args.data_dir.is_none() {
        let dir = tempfile::tempdir().expect("tempdir for the agent");
        args.data_dir = Some(dir.path().to_owned());
        Some(dir)
    } else {
        None
    };
    (
        edge_agent::Config::from_args(args).expect("agent config"),
        dir,
    )
}

pub struct Agent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: Option<tempfile::TempDir>,
}

impl Agent {
    /// Runs the agent with `args`; without a data dir it gets a fresh temporary one. Must be
    /// called within a tokio runtime.
    pub fn start(args: edge_agent::Args) -> Self {
        let (config, dir) = config(args);
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

    /// A standard agent on `docker_host` with this inactivity timeout (e.g. `5m`).
    pub fn standard(key: &str, docker_host: &str, inactivity: &str) -> Self {
        Self::start(edge_agent::Args {
            edge_key: Some(key.to_owned()),
            docker_host: Some(docker_host.to_owned()),
            inactivity_timeout: Some(inactivity.to_owned()),
            ..Default::default()
        })
    }

    /// Stops it gracefully and waits for it, at most 15 s (a tunnel closes, a snapshot may go
    /// home first); `true` if it ended cleanly in time.
    pub async fn stop(mut self) -> bool {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        matches!(
            tokio::time::timeout(Duration::from_secs(15), &mut self.task).await,
            Ok(Ok(()))
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The real agent on a thread of its own (named, with its own current-thread runtime), so a
/// bench can tell the agent's CPU from the rest of the process.
pub struct AgentThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl AgentThread {
    /// Runs the agent with `args` on thread `name`; without a data dir it gets a fresh
    /// temporary one. Needs no runtime.
    pub fn start(name: &str, args: edge_agent::Args) -> Self {
        let (config, dir) = config(args);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = crate::bench::on_thread(name, move || async move {
            edge_agent::run(config, async {
                let _ = rx.await;
            })
            .await
            .expect("agent run");
        });
        Self {
            stop: Some(tx),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Stops it and waits at most `limit`; `true` if it ended cleanly in time (a stuck one is
    /// left behind, so a bench's report is never held up by it).
    pub fn stop(mut self, limit: Duration) -> bool {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let Some(thread) = self.thread.take() else {
            return true;
        };
        let deadline = std::time::Instant::now() + limit;
        while !thread.is_finished() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        thread.join().is_ok()
    }
}

/// The real `edge-agent` binary as a child process (its own open-file limit, its own RSS),
/// killed on drop; its log goes to `<data dir>/agent.log`.
pub struct AgentProcess {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl AgentProcess {
    /// A standard agent with join key `key`, this Edge ID, on `docker_host`, closing idle
    /// tunnels after `inactivity` (e.g. `5s`).
    pub fn standard(key: &str, edge_id: uuid::Uuid, docker_host: &str, inactivity: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for the agent");
        let log = std::fs::File::create(dir.path().join("agent.log")).expect("agent log");
        let child = std::process::Command::new(crate::process::bin("edge-agent"))
            .env("EDGE_KEY", key)
            .env("EDGE_ID", edge_id.to_string())
            .env("EDGE_DATA_DIR", dir.path())
            .env("DOCKER_HOST", docker_host)
            .env("EDGE_INACTIVITY_TIMEOUT", inactivity)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn edge-agent");
        Self { child, _dir: dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait (at most 15 s); `true` if it stopped gracefully.
    pub fn stop(mut self) -> bool {
        crate::process::terminate(&mut self.child, Duration::from_secs(15))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
