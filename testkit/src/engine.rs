//! Podman's Docker API service as the engine of the tests that need a real one
//! (`scripts/podman-engine`), with the `docker` CLI pointed straight at it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The tiny local image `scripts/podman-engine` builds.
pub const IMAGE: &str = "edgeplane/busybox";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/podman-engine")
}

/// Podman's Docker API service on a private socket; stopped on drop.
pub struct Engine {
    dir: tempfile::TempDir,
}

impl Engine {
    /// An engine on Podman's shared storage (containers of other engines are visible).
    pub fn start() -> Self {
        Self::launch(false)
    }

    /// An engine with storage and networks of its own, like a separate device: the same
    /// container and network names can exist on several at once.
    pub fn start_isolated() -> Self {
        Self::launch(true)
    }

    fn launch(isolated: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for the engine");
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .args(isolated.then_some("isolated"))
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/podman-engine");
        assert!(
            out.status.success(),
            "podman engine did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    /// `unix://<socket>`: what agents get as `DOCKER_HOST`.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    /// `docker args...` straight against the engine: stdout, or stderr as the error.
    pub fn try_docker(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("docker")
            .env("DOCKER_HOST", self.docker_host())
            .env_remove("DOCKER_CONTEXT")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run docker: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// `docker args...` straight against the engine; panics unless it succeeds; stdout.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = Command::new("docker")
            .env("DOCKER_HOST", self.docker_host())
            .env_remove("DOCKER_CONTEXT")
            .args(args)
            .output()
            .expect("run docker");
        assert!(
            out.status.success(),
            "docker {args:?} against the engine failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
