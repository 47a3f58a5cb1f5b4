//! The agent's main loop: check in, wait, repeat, until shut down.

use std::future::Future;
use std::time::{Duration, Instant};

use proto::wire::{EdgeStatus, SealedCredentials};
use tracing::{info, warn};

use crate::client::{CheckinError, CheckinOutcome, PollClient, PollOptions, SetupError};
use crate::config::Config;
use crate::edge_id::{self, EdgeIdError};
use crate::retry::{self, Backoff, LogDecision, LogThrottle};

/// Why the agent could not start. Once running, it never gives up on its own.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    EdgeId(#[from] EdgeIdError),
    #[error(transparent)]
    Setup(#[from] SetupError),
}

/// Runs the agent until `shutdown` completes.
pub async fn run<F>(config: Config, shutdown: F) -> Result<(), AgentError>
where
    F: Future<Output = ()>,
{
    let (edge_id, source) = edge_id::resolve(config.edge_id, &config.data_dir)?;
    info!(
        %edge_id,
        edge_id_source = source.as_str(),
        endpoint_id = config.token.endpoint_id,
        api_url = %config.token.api_url,
        docker_host = %config.docker_host,
        inactivity_timeout = %humantime::format_duration(config.inactivity_timeout),
        version = env!("CARGO_PKG_VERSION"),
        "edge agent starting"
    );
    let mut options = PollOptions::new(edge_id);
    options.agent_secret = config.agent_secret.clone();
    options.insecure = config.insecure_poll;
    let mut client = PollClient::new(&config.token, options)?;
    let mut poller = Poller::default();

    tokio::pin!(shutdown);
    loop {
        let result = tokio::select! {
            () = &mut shutdown => break,
            result = client.checkin() => result,
        };
        let delay = poller.handle(result, client.interval(), Instant::now());
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    info!("edge agent stopped");
    Ok(())
}

/// What the loop remembers between check-ins; decides the next delay and what to log.
#[derive(Debug, Default)]
struct Poller {
    backoff: Backoff,
    throttle: LogThrottle,
    checked_in: bool,
    tunnel: TunnelSeam,
}

impl Poller {
    fn handle(
        &mut self,
        result: Result<CheckinOutcome, CheckinError>,
        interval: Duration,
        now: Instant,
    ) -> Duration {
        match result {
            Ok(outcome) => {
                self.backoff.reset();
                if let LogDecision::Recovered { failures } = self.throttle.success() {
                    info!(failures, "check-in succeeded again");
                } else if !self.checked_in {
                    info!(
                        interval_secs = outcome.interval.as_secs(),
                        "checked in with the control plane"
                    );
                }
                self.checked_in = true;
                self.tunnel.on_answer(outcome.status, outcome.tunnel);
                outcome.interval
            }
            Err(err) => {
                let delay =
                    retry::retry_delay(&err, interval, &mut self.backoff, &mut rand::thread_rng());
                let retry_in = humantime::format_duration(round_ms(delay));
                match self.throttle.failure(&log_key(&err), now) {
                    LogDecision::Changed => warn!(
                        kind = err.kind(),
                        error = %err,
                        %retry_in,
                        "check-in failed"
                    ),
                    LogDecision::StillFailing { attempts } => warn!(
                        kind = err.kind(),
                        error = %err,
                        attempts,
                        %retry_in,
                        "check-in still failing"
                    ),
                    LogDecision::Quiet | LogDecision::Recovered { .. } => {}
                }
                delay
            }
        }
    }
}

/// One log line per state: errors of the same kind and status are the same state.
fn log_key(err: &CheckinError) -> String {
    match err {
        CheckinError::Refused { status, code, .. } => format!("refused:{status}:{code}"),
        CheckinError::Server { status, .. } => format!("server:{status}"),
        other => other.kind().to_owned(),
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where the reverse tunnel plugs in (a later issue). For now it only notices when the server
/// wants a tunnel and says so once.
#[derive(Debug, Default)]
struct TunnelSeam {
    requested: bool,
}

impl TunnelSeam {
    fn on_answer(&mut self, status: EdgeStatus, credentials: Option<SealedCredentials>) {
        match status {
            EdgeStatus::Required if !self.requested => {
                self.requested = true;
                info!(
                    credentials = credentials.is_some(),
                    "tunnel requested (tunnels are not implemented in this build yet)"
                );
            }
            EdgeStatus::Idle if self.requested => {
                self.requested = false;
                info!("tunnel no longer requested");
            }
            _ => {}
        }
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C); if the signal handlers cannot be installed, never.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("interrupted, shutting down"),
        () = term => info!("terminated, shutting down"),
    }
}

/// Logs to stderr; `RUST_LOG` overrides the default `info` level.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: container logs are read by people and parsers.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::RefusalCode;

    fn ok(interval: u64) -> Result<CheckinOutcome, CheckinError> {
        Ok(CheckinOutcome {
            status: EdgeStatus::Idle,
            interval: Duration::from_secs(interval),
            tunnel: None,
            connection: None,
            clock_corrected: false,
        })
    }

    #[test]
    fn follows_the_server_interval() {
        let mut p = Poller::default();
        let d = p.handle(ok(7), Duration::from_secs(5), Instant::now());
        assert_eq!(d, Duration::from_secs(7));
    }

    #[test]
    fn refusal_then_recovery() {
        let mut p = Poller::default();
        let now = Instant::now();
        let refused = || {
            Err(CheckinError::Refused {
                status: 403,
                code: RefusalCode::EdgeIdMismatch,
                message: "no".into(),
                server_time_ms: None,
            })
        };
        for _ in 0..3 {
            assert_eq!(
                p.handle(refused(), Duration::from_secs(5), now),
                Duration::from_secs(30)
            );
        }
        assert_eq!(
            p.handle(ok(5), Duration::from_secs(5), now),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn network_errors_back_off_within_cap() {
        let mut p = Poller::default();
        let now = Instant::now();
        for _ in 0..20 {
            let d = p.handle(
                Err(CheckinError::Timeout(Duration::from_secs(15))),
                Duration::from_secs(5),
                now,
            );
            assert!(d <= Duration::from_secs(60));
        }
    }

    #[test]
    fn tunnel_seam_tracks_transitions() {
        let mut t = TunnelSeam::default();
        t.on_answer(EdgeStatus::Required, None);
        assert!(t.requested);
        t.on_answer(EdgeStatus::Required, None);
        assert!(t.requested);
        t.on_answer(EdgeStatus::Idle, None);
        assert!(!t.requested);
    }

    #[test]
    fn log_keys_separate_states() {
        let a = CheckinError::Server {
            status: 500,
            message: "a".into(),
        };
        let b = CheckinError::Server {
            status: 502,
            message: "a".into(),
        };
        assert_ne!(log_key(&a), log_key(&b));
        assert_eq!(
            log_key(&CheckinError::Timeout(Duration::from_secs(1))),
            "timeout"
        );
    }
}
