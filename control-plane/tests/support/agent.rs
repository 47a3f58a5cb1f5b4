//! The edge agent in-process for tests, stopped on request.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::time::Duration;

pub struct Agent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: Option<tempfile::TempDir>,
}

impl Agent {
    /// Runs the agent with `args`; without a data dir it gets a fresh temporary one.
    pub fn start(mut args: edge_agent::Args) -> Self {
        let dir = if args.data_dir.is_none() {
            let dir = tempfile::tempdir().unwrap();
            args.data_dir = Some(dir.path().to_owned());
            Some(dir)
        } else {
            None
        };
        let config = edge_agent::Config::from_args(args).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            edge_agent::run(config, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self {
            stop: Some(tx),
            task,
            _dir: dir,
        }
    }

    /// A standard agent on `docker_host` with this inactivity timeout.
    pub fn standard(key: &str, docker_host: &str, inactivity: &str) -> Self {
        Self::start(edge_agent::Args {
            edge_key: Some(key.to_owned()),
            docker_host: Some(docker_host.to_owned()),
            inactivity_timeout: Some(inactivity.to_owned()),
            ..Default::default()
        })
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}
