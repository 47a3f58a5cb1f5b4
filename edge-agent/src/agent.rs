//! The agent's main loop: check in, wait, repeat, until shut down; hands tunnel credentials
//! to the tunnel supervisor ([`crate::tunnel`]) and sends a first snapshot in the background.
//!
//! Check-ins use the held route: the server may keep an idle check-in open for up to the
//! interval and answers it the moment a tunnel is wanted. So the next check-in is due at
//! *send time* + interval (at once if the answer came later), not answer time + interval; a
//! server that answers at once still gets one check-in per interval. The first check-in of
//! the process and the first after an error are plain ones, answered at once: they carry the
//! agent's identity, learn the interval, and the first one starts the first snapshot; the
//! held check-in follows at once, so a tunnel can be had quickly from the start. A held
//! check-in answered with tunnel credentials is renewed at once as well, so the server always
//! holds one to answer when the tunnel is wanted again.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proto::seal::SealKey;
use proto::wire::{EdgeStatus, SealedCredentials};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::client::{
    CheckinError, CheckinOutcome, CheckinRoute, PollClient, PollOptions, SetupError,
};
use crate::config::Config;
use crate::docker::{DockerClient, DockerHost, DockerHostError};
use crate::edge_id::{self, EdgeIdError};
use crate::home::Home;
use crate::retry::{self, Backoff, LogDecision, LogThrottle};
use crate::tls::{self, TlsSetupError};
use crate::tunnel::{self, CredentialSlot, TunnelSettings};

/// How long shutdown waits for the tunnel to say goodbye.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the agent could not start. Once running, it never gives up on its own.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    EdgeId(#[from] EdgeIdError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("invalid DOCKER_HOST: {0}")]
    DockerHost(#[from] DockerHostError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error(transparent)]
    Stacks(#[from] crate::stacks::StacksJournalError),
}

/// Runs the agent until `shutdown` completes.
pub async fn run<F>(config: Config, shutdown: F) -> Result<(), AgentError>
where
    F: Future<Output = ()>,
{
    let (edge_id, source) = edge_id::resolve(config.edge_id, &config.data_dir)?;
    let docker = DockerHost::parse(&config.docker_host)?;
    // The Edge ID itself only at debug: with the join key it impersonates this agent, and
    // logs travel further than the key.
    tracing::debug!(%edge_id, "edge id");
    info!(
        edge_id_source = source.as_str(),
        endpoint_id = config.token.endpoint_id,
        api_url = %config.token.api_url,
        docker_host = %docker,
        inactivity_timeout = %humantime::format_duration(config.inactivity_timeout),
        mode = if config.async_mode { "async" } else { "standard" },
        version = env!("CARGO_PKG_VERSION"),
        "edge agent starting"
    );
    let mut options = PollOptions::new(edge_id);
    options.agent_secret = config.agent_secret.clone();
    options.insecure = config.insecure_poll;
    let mut client = PollClient::new(&config.token, options)?;
    // Edge stacks: a task of their own, fed with the digests answers announce.
    let (desired, announced) = tokio::sync::watch::channel(None);
    let stop = CancellationToken::new();
    let reconciler = tokio::spawn(
        crate::stacks::Reconciler::new(
            client.sibling(),
            DockerClient::new(docker.clone()),
            crate::stacks::StacksJournal::open(&config.data_dir)?,
            config.stack_settle,
            announced,
        )
        .run(stop.clone()),
    );
    if config.async_mode {
        let journal = crate::journal::Journal::open(&config.data_dir)?;
        crate::async_agent::run(
            client,
            DockerClient::new(docker),
            journal,
            desired,
            shutdown,
        )
        .await;
        stop.cancel();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, reconciler).await;
        return Ok(());
    }
    let home = Arc::new(Home::new(&client, DockerClient::new(docker.clone())));
    let settings = TunnelSettings {
        endpoint_id: config.token.endpoint_id,
        edge_id,
        seal: SealKey::derive(&config.token.secret, &edge_id),
        default_gateway: config.token.tunnel_addr.clone(),
        tls: tls::tunnel_config(config.token.tunnel_fingerprint)?,
        docker,
        inactivity_timeout: config.inactivity_timeout,
        local_addr: None,
    };
    let slot = Arc::new(CredentialSlot::default());
    let supervisor = tokio::spawn(tunnel::supervise(
        settings,
        home.clone(),
        slot.clone(),
        stop.clone(),
    ));
    let mut poller = Poller::default();

    tokio::pin!(shutdown);
    loop {
        let sent_at = Instant::now();
        let route = poller.route();
        let result = tokio::select! {
            () = &mut shutdown => break,
            result = client.checkin_via(route) => result,
        };
        home.set_interval(client.interval());
        if let Ok(CheckinOutcome {
            desired: Some(digest),
            ..
        }) = &result
        {
            desired.send_replace(Some(*digest));
        }
        let next = poller.handle(result, client.interval(), sent_at, Instant::now());
        if next.first_success {
            // In the background: a slow engine must never delay check-ins.
            let home = home.clone();
            tokio::spawn(async move { home.send_snapshot_logged("startup").await });
        }
        if let Some(sealed) = next.credentials {
            slot.put(sealed);
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep_until(next.at) => {}
        }
    }
    stop.cancel();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, supervisor).await;
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, reconciler).await;
    info!("edge agent stopped");
    Ok(())
}

/// The earliest a held check-in that brought tunnel credentials is renewed, counted from when
/// it went out.
const REHOLD_MIN: Duration = Duration::from_secs(1);

/// What to do after a check-in.
#[derive(Debug)]
struct Next {
    /// When the next check-in is due.
    at: Instant,
    /// This was the first successful check-in of the process.
    first_success: bool,
    /// Tunnel credentials to hand to the tunnel supervisor.
    credentials: Option<SealedCredentials>,
}

/// What the loop remembers between check-ins; decides the next one and what to log.
#[derive(Debug, Default)]
struct Poller {
    backoff: Backoff,
    throttle: LogThrottle,
    checked_in: bool,
    /// The last check-in failed.
    failing: bool,
    /// The server asked for a tunnel without credentials (said once per episode).
    required_without_credentials: bool,
}

impl Poller {
    /// Held check-ins once settled; plain ones at first and after an error.
    fn route(&self) -> CheckinRoute {
        if self.checked_in && !self.failing {
            CheckinRoute::Held
        } else {
            CheckinRoute::Plain
        }
    }

    /// `sent_at`: when the check-in went out; `now`: when its answer (or error) came.
    fn handle(
        &mut self,
        result: Result<CheckinOutcome, CheckinError>,
        interval: Duration,
        sent_at: Instant,
        now: Instant,
    ) -> Next {
        let was_plain = self.route() == CheckinRoute::Plain;
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
                let first_success = !self.checked_in;
                self.checked_in = true;
                self.failing = false;
                let credentials = match (outcome.status, outcome.tunnel) {
                    (EdgeStatus::Required, Some(sealed)) => {
                        self.required_without_credentials = false;
                        debug!("tunnel requested");
                        Some(sealed)
                    }
                    (EdgeStatus::Required, None) => {
                        if !self.required_without_credentials {
                            self.required_without_credentials = true;
                            warn!("the control plane asked for a tunnel but sent no credentials");
                        }
                        None
                    }
                    (EdgeStatus::Idle, _) => {
                        self.required_without_credentials = false;
                        None
                    }
                };
                // Held check-ins: due one interval after the last one went out; after a
                // plain one, the held one starts at once. A held one answered with credentials
                // is renewed at once too (but at most one per `REHOLD_MIN`, whatever a server
                // answers): otherwise the server would have no check-in to answer until the
                // next interval, and a tunnel that closes soon (a short inactivity timeout)
                // could not be asked for again before then. One request per tunnel opened;
                // idle agents never see it.
                let at = if was_plain {
                    now
                } else if credentials.is_some() {
                    (sent_at + REHOLD_MIN).max(now)
                } else {
                    (sent_at + outcome.interval).max(now)
                };
                Next {
                    at,
                    first_success,
                    credentials,
                }
            }
            Err(err) => {
                self.failing = true;
                let held = !was_plain;
                let delay = retry::after_failure(
                    &err,
                    held,
                    interval,
                    &mut self.backoff,
                    &mut rand::thread_rng(),
                );
                let retry_in = humantime::format_duration(round_ms(delay));
                match self.throttle.failure(&log_key(&err), now.into_std()) {
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
                Next {
                    at: now + delay,
                    first_success: false,
                    credentials: None,
                }
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

    fn ok(status: EdgeStatus, interval: u64) -> Result<CheckinOutcome, CheckinError> {
        Ok(CheckinOutcome {
            status,
            interval: Duration::from_secs(interval),
            tunnel: (status == EdgeStatus::Required).then(|| SealedCredentials {
                nonce: [0; 12],
                ciphertext: vec![1],
            }),
            connection: None,
            clock_corrected: false,
            desired: None,
        })
    }

    fn idle(interval: u64) -> Result<CheckinOutcome, CheckinError> {
        ok(EdgeStatus::Idle, interval)
    }

    #[tokio::test(start_paused = true)]
    async fn next_checkin_is_due_one_interval_after_sending() {
        let mut p = Poller::default();
        let start = Instant::now();
        // The first (plain) check-in is followed by a held one at once.
        let next = p.handle(
            idle(5),
            Duration::from_secs(5),
            start,
            start + Duration::from_millis(30),
        );
        assert_eq!(next.at, start + Duration::from_millis(30));
        assert!(next.first_success);
        let sent = next.at;
        // A held check-in answered near the end of the interval: the next one follows at once
        // when the interval is over, not one more interval later.
        let next = p.handle(
            idle(5),
            Duration::from_secs(5),
            sent,
            sent + Duration::from_millis(4750),
        );
        assert_eq!(next.at, sent + Duration::from_secs(5));
        assert!(!next.first_success);
        // An old server answers at once: still one check-in per interval.
        let sent = next.at;
        let next = p.handle(
            idle(5),
            Duration::from_secs(5),
            sent,
            sent + Duration::from_millis(20),
        );
        assert_eq!(next.at, sent + Duration::from_secs(5));
        assert!(!next.first_success);
        // An answer later than the interval: the next check-in goes out at once.
        let late = sent + Duration::from_secs(9);
        let next = p.handle(idle(5), Duration::from_secs(5), sent, late);
        assert_eq!(next.at, late);
        // The server's interval wins.
        let next = p.handle(idle(7), Duration::from_secs(5), sent, sent);
        assert_eq!(next.at, sent + Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn plain_checkins_until_settled_and_after_errors() {
        let mut p = Poller::default();
        let now = Instant::now();
        assert_eq!(p.route(), CheckinRoute::Plain);
        p.handle(idle(5), Duration::from_secs(5), now, now);
        assert_eq!(p.route(), CheckinRoute::Held);
        p.handle(
            Err(CheckinError::Timeout(Duration::from_secs(15))),
            Duration::from_secs(5),
            now,
            now,
        );
        assert_eq!(p.route(), CheckinRoute::Plain);
        p.handle(idle(5), Duration::from_secs(5), now, now);
        assert_eq!(p.route(), CheckinRoute::Held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_request_hands_over_the_credentials() {
        let mut p = Poller::default();
        let now = Instant::now();
        let next = p.handle(
            ok(EdgeStatus::Required, 5),
            Duration::from_secs(5),
            now,
            now,
        );
        assert!(next.credentials.is_some());
        // A held check-in answered with credentials after 2 s: renewed at once, so the server
        // can ask again as soon as this tunnel has closed.
        let later = now + Duration::from_secs(2);
        let next = p.handle(
            ok(EdgeStatus::Required, 5),
            Duration::from_secs(5),
            now,
            later,
        );
        assert!(next.credentials.is_some());
        assert_eq!(next.at, later);
        // ... but never sooner than one second after the previous one went out, whatever
        // the server answers.
        let next = p.handle(
            ok(EdgeStatus::Required, 5),
            Duration::from_secs(5),
            later,
            later + Duration::from_millis(10),
        );
        assert_eq!(next.at, later + REHOLD_MIN);
        // Idle again: back to one per interval.
        let next = p.handle(idle(5), Duration::from_secs(5), later, later);
        assert_eq!(next.at, later + Duration::from_secs(5));
        let mut without = ok(EdgeStatus::Required, 5);
        if let Ok(o) = without.as_mut() {
            o.tunnel = None;
        }
        let next = p.handle(without, Duration::from_secs(5), now, now);
        assert!(next.credentials.is_none());
        assert!(p.required_without_credentials);
        p.handle(idle(5), Duration::from_secs(5), now, now);
        assert!(!p.required_without_credentials);
    }

    #[tokio::test(start_paused = true)]
    async fn refusal_then_recovery() {
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
            let next = p.handle(refused(), Duration::from_secs(5), now, now);
            assert_eq!(next.at, now + Duration::from_secs(30));
            assert!(!next.first_success);
        }
        let next = p.handle(idle(5), Duration::from_secs(5), now, now);
        assert_eq!(next.at, now, "the held check-in follows at once");
        assert!(next.first_success, "the first success of the process");
    }

    #[tokio::test(start_paused = true)]
    async fn network_errors_back_off_from_the_answer_within_cap() {
        let mut p = Poller::default();
        let sent = Instant::now();
        let now = sent + Duration::from_secs(15);
        for _ in 0..20 {
            let next = p.handle(
                Err(CheckinError::Timeout(Duration::from_secs(15))),
                Duration::from_secs(5),
                sent,
                now,
            );
            assert!(next.at >= now && next.at <= now + Duration::from_secs(60));
        }
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
