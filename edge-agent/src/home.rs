//! Requests home that must not wait behind the main loop's held check-in: tunnel requests and
//! snapshot uploads. Each goes out on a short-lived sibling of the main [`PollClient`] (its own
//! connection, the same key and the same clock, so timestamps stay strictly increasing).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tracing::{info, warn};

use crate::client::{CheckinError, CheckinOutcome, CheckinRoute, PollClient};
use crate::clock::SharedClock;
use crate::docker::{DockerClient, DockerError};

/// Why a snapshot did not reach the control plane.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFailure {
    #[error("cannot take a snapshot: {0}")]
    Engine(#[from] DockerError),
    #[error("cannot compress the snapshot: {0}")]
    Compress(#[from] proto::snapshot::SnapshotError),
    #[error("cannot upload the snapshot: {0}")]
    Upload(#[from] CheckinError),
}

/// What a sent snapshot held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSent {
    pub containers: usize,
    pub bytes: usize,
}

/// The agent's out-of-band link home, shared by the main loop and the tunnel.
#[derive(Debug)]
pub struct Home {
    /// Never sends itself: a pattern for siblings (behind a lock only to be `Sync`).
    template: Mutex<PollClient>,
    /// The main loop's current interval, which siblings report.
    interval_secs: AtomicU64,
    docker: DockerClient,
    clock: SharedClock,
}

impl Home {
    pub fn new(main: &PollClient, docker: DockerClient) -> Self {
        Self {
            template: Mutex::new(main.sibling()),
            interval_secs: AtomicU64::new(main.interval().as_secs()),
            clock: main.clock().clone(),
            docker,
        }
    }

    /// Follows the main loop's interval.
    pub fn set_interval(&self, interval: Duration) {
        self.interval_secs
            .store(interval.as_secs(), Ordering::Relaxed);
    }

    fn client(&self) -> PollClient {
        let mut c = self.template.lock().sibling();
        c.set_interval(Duration::from_secs(
            self.interval_secs.load(Ordering::Relaxed),
        ));
        c
    }

    pub fn docker(&self) -> &DockerClient {
        &self.docker
    }

    /// Asks for tunnel credentials on [`proto::tunnel::TUNNEL_REQUEST_PATH`].
    pub async fn ask_tunnel(&self) -> Result<CheckinOutcome, CheckinError> {
        self.client().checkin_via(CheckinRoute::AskTunnel).await
    }

    /// Takes a snapshot of the engine and uploads it.
    pub async fn send_snapshot(&self) -> Result<SnapshotSent, SnapshotFailure> {
        let snap = self.docker.snapshot(self.clock.now_ms()).await?;
        let body = proto::snapshot::compress(&snap)?;
        self.client().upload_snapshot(&body).await?;
        Ok(SnapshotSent {
            containers: snap.containers.len(),
            bytes: body.len(),
        })
    }

    /// [`Home::send_snapshot`], with one log line either way; never fails.
    pub async fn send_snapshot_logged(&self, why: &'static str) {
        match self.send_snapshot().await {
            Ok(sent) => info!(
                reason = why,
                containers = sent.containers,
                bytes = sent.bytes,
                "snapshot sent"
            ),
            Err(e) => warn!(reason = why, "snapshot not sent: {e}"),
        }
    }
}
