//! The real edge agent, in-process, stopped on request (or aborted on drop).

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
