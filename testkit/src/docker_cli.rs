//! The real `docker` CLI, configured as an operator would: the control plane's certificate as
//! `ca.pem`, the admin key as a header on every call, and
//! `-H tcp://<control plane>/api/endpoints/{id}/docker` with `--tlsverify`.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::api::ADMIN_KEY;

pub struct DockerCli {
    config: tempfile::TempDir,
    host: String,
}

impl DockerCli {
    /// The CLI for environment `env_id` through the control plane on 127.0.0.1:`api_port`,
    /// trusting `ca_cert` (the control plane's certificate).
    pub fn new(ca_cert: &Path, api_port: u16, env_id: u64) -> Self {
        let config = tempfile::tempdir().expect("tempdir for the docker config");
        std::fs::write(
            config.path().join("config.json"),
            serde_json::json!({ "HttpHeaders": { "X-API-Key": ADMIN_KEY } }).to_string(),
        )
        .expect("write docker config.json");
        std::fs::copy(ca_cert, config.path().join("ca.pem")).expect("copy ca.pem");
        Self {
            config,
            host: format!("tcp://127.0.0.1:{api_port}/api/endpoints/{env_id}/docker"),
        }
    }

    /// `docker --tlsverify -H <host> args...`, not yet run (for streaming and stdin).
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("docker");
        c.env("DOCKER_CONFIG", self.config.path())
            .env("DOCKER_CERT_PATH", self.config.path())
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .args(["--tlsverify", "-H", &self.host])
            .args(args)
            .kill_on_drop(true);
        c
    }

    /// Runs `docker args...` with `stdin`, bounded in time (60 s).
    pub async fn run_with(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut c = self.command(args);
        c.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn docker");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("docker's stdin");
            pipe.write_all(input).await.expect("write docker's stdin");
            drop(pipe);
        }
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("docker {args:?} did not finish in 60 s"))
            .expect("docker's output")
    }

    pub async fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, None).await
    }

    /// Runs and expects success, and no complaint of the CLI about the bytes it got (an
    /// answer framed wrong shows as `Unsolicited response received on idle HTTP channel`);
    /// returns stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("Unsolicited response"),
            "docker {args:?}: an answer was framed wrong: {stderr}"
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Stdout and stderr of a finished command, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
