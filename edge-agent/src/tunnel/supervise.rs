//! Keeping the agent's tunnel: the newest credentials from the main loop
//! ([`CredentialSlot`]), one open tunnel at a time (a newer one retires the old), and, when one
//! is lost rather than closed on purpose, fresh credentials asked for on the tunnel request
//! route with jittered backoff ([`Reconnect`]).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use proto::seal::SealError;
use proto::wire::{EdgeStatus, SealedCredentials};
use rand::Rng;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::handshake::open_any;
use super::serve::serve;
use super::{
    LostReason, TunnelEnd, TunnelSettings, CLOSE_TIMEOUT, RECONNECT_BASE, RECONNECT_CAP,
    RECOVERY_MIN_WINDOW, STABLE_AFTER,
};
use crate::home::Home;
use crate::retry::{Backoff, LogDecision, LogThrottle};

/// Reconnect pacing after a lost tunnel: at once after a stable tunnel, then jittered
/// exponential backoff ([`RECONNECT_BASE`] doubling to [`RECONNECT_CAP`]) while tunnels keep
/// dropping early or attempts keep failing.
#[derive(Debug, Clone)]
pub struct Reconnect {
    backoff: Backoff,
    losses: u32,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            backoff: Backoff::new(RECONNECT_BASE),
            losses: 0,
        }
    }
}

impl Reconnect {
    /// A tunnel that had been up for `up_for` was lost: the delay before asking again.
    pub fn on_lost<R: Rng + ?Sized>(&mut self, up_for: Duration, rng: &mut R) -> Duration {
        if up_for >= STABLE_AFTER {
            self.backoff.reset();
            self.losses = 0;
        }
        self.losses = self.losses.saturating_add(1);
        if self.losses == 1 {
            Duration::ZERO
        } else {
            self.backoff.next_delay(RECONNECT_CAP, rng)
        }
    }

    /// An attempt to get the tunnel back failed: the delay before the next one.
    pub fn on_failure<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        self.backoff.next_delay(RECONNECT_CAP, rng)
    }
}

/// The newest credentials from the main loop (older ones are useless once newer exist).
#[derive(Debug, Default)]
pub struct CredentialSlot {
    value: Mutex<Option<SealedCredentials>>,
    notify: Notify,
}

impl CredentialSlot {
    pub fn put(&self, sealed: SealedCredentials) {
        *self.value.lock() = Some(sealed);
        self.notify.notify_one();
    }

    pub async fn take(&self) -> SealedCredentials {
        loop {
            if let Some(v) = self.value.lock().take() {
                return v;
            }
            self.notify.notified().await;
        }
    }
}

struct Current {
    task: JoinHandle<TunnelEnd>,
    opened: Instant,
}

struct Recovery {
    since: Instant,
    next_at: Instant,
    throttle: LogThrottle,
}

/// Owns the agent's tunnel: see the module docs.
struct Supervisor {
    settings: Arc<TunnelSettings>,
    home: Arc<Home>,
    shutdown: CancellationToken,
    current: Option<Current>,
    /// Tunnels replaced by a newer one: they run on until their gateway closes them (their
    /// location epoch is outdated) or they go idle; they are only awaited at shutdown.
    retired: JoinSet<()>,
    recovery: Option<Recovery>,
    reconnect: Reconnect,
}

/// Runs the tunnel side of the agent until `shutdown`; credentials come through `slot`.
pub async fn supervise(
    settings: TunnelSettings,
    home: Arc<Home>,
    slot: Arc<CredentialSlot>,
    shutdown: CancellationToken,
) {
    let mut s = Supervisor {
        settings: Arc::new(settings),
        home,
        shutdown: shutdown.clone(),
        current: None,
        retired: JoinSet::new(),
        recovery: None,
        reconnect: Reconnect::default(),
    };
    loop {
        let recover_at = s.recovery.as_ref().map(|r| r.next_at);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            end = wait_current(&mut s.current), if s.current.is_some() => {
                let end = end.unwrap_or(TunnelEnd::Lost(LostReason::SessionEnded));
                s.ended(end);
            }
            sealed = slot.take() => {
                if s.attempt(sealed, false).await {
                    s.recovery = None;
                }
            }
            () = async {
                match recover_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            }, if recover_at.is_some() => s.recover().await,
            Some(_) = s.retired.join_next(), if !s.retired.is_empty() => {}
        }
    }
    // Tunnels close themselves on the shutdown token (with `Closing(Shutdown)`).
    if let Some(c) = s.current.take() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT * 2, c.task).await;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT * 2, async {
        while s.retired.join_next().await.is_some() {}
    })
    .await;
}

async fn wait_current(current: &mut Option<Current>) -> Result<TunnelEnd, tokio::task::JoinError> {
    match current {
        Some(c) => (&mut c.task).await,
        None => std::future::pending().await,
    }
}

impl Supervisor {
    fn ended(&mut self, end: TunnelEnd) {
        let Some(current) = self.current.take() else {
            return;
        };
        if let TunnelEnd::Lost(reason) = end {
            warn!("tunnel lost ({reason}); asking for a new one");
            let now = Instant::now();
            let delay = self
                .reconnect
                .on_lost(now - current.opened, &mut rand::thread_rng());
            self.recovery = Some(Recovery {
                since: now,
                next_at: now + delay,
                throttle: LogThrottle::default(),
            });
        }
    }

    /// Opens `sealed` and tries its gateways; `true` when a tunnel opened. In recovery
    /// (`quiet`), repeated failures are logged once per kind.
    async fn attempt(&mut self, sealed: SealedCredentials, quiet: bool) -> bool {
        let creds = match self.settings.seal.open(&sealed) {
            Ok(creds) => creds,
            Err(SealError::Open) => {
                warn!("could not open tunnel credentials: they were not sealed for this EDGE_KEY and Edge ID");
                return false;
            }
            Err(e) => {
                warn!("could not open tunnel credentials: {e}");
                return false;
            }
        };
        let result = tokio::select! {
            () = self.shutdown.cancelled() => return false,
            result = open_any(&self.settings, &creds.gateways, creds.token) => result,
        };
        drop(creds);
        match result {
            Ok(established) => {
                info!(
                    gateway = %established.gateway_id,
                    epoch = established.epoch,
                    addr = %established.addr,
                    "tunnel open"
                );
                let task = tokio::spawn(serve(
                    established,
                    self.settings.clone(),
                    self.home.clone(),
                    self.shutdown.child_token(),
                ));
                let new = Current {
                    task,
                    opened: Instant::now(),
                };
                if let Some(old) = self.current.replace(new) {
                    debug!("a newer tunnel replaces the open one");
                    self.retired.spawn(async move {
                        let _ = old.task.await;
                    });
                }
                true
            }
            Err(errors) => {
                for e in errors {
                    let log = match (quiet, self.recovery.as_mut()) {
                        (true, Some(r)) => !matches!(
                            r.throttle.failure(e.kind(), std::time::Instant::now()),
                            LogDecision::Quiet
                        ),
                        _ => true,
                    };
                    if log {
                        warn!(gateway = %e.gateway(), "{e}");
                    }
                }
                false
            }
        }
    }

    /// One step of getting a lost tunnel back: ask for credentials, try them.
    async fn recover(&mut self) {
        let window = self.settings.inactivity_timeout.max(RECOVERY_MIN_WINDOW);
        if self
            .recovery
            .as_ref()
            .is_some_and(|r| r.since.elapsed() > window)
        {
            warn!(
                "could not restore the tunnel within {}; waiting for the control plane to ask again",
                humantime::format_duration(window)
            );
            self.recovery = None;
            return;
        }
        let answer = tokio::select! {
            () = self.shutdown.cancelled() => return,
            answer = self.home.ask_tunnel() => answer,
        };
        match answer {
            Ok(outcome) => match (outcome.status, outcome.tunnel) {
                (EdgeStatus::Required, Some(sealed)) => {
                    if self.attempt(sealed, true).await {
                        self.recovery = None;
                        return;
                    }
                }
                _ => {
                    info!("the control plane does not want the tunnel any more");
                    self.recovery = None;
                    return;
                }
            },
            Err(e) => {
                if let Some(r) = self.recovery.as_mut() {
                    if !matches!(
                        r.throttle.failure(e.kind(), std::time::Instant::now()),
                        LogDecision::Quiet
                    ) {
                        warn!(kind = e.kind(), "tunnel request failed: {e}");
                    }
                }
            }
        }
        let delay = self.reconnect.on_failure(&mut rand::thread_rng());
        if let Some(r) = self.recovery.as_mut() {
            r.next_at = Instant::now() + delay;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn reconnect_is_immediate_after_a_stable_tunnel_then_backs_off() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut r = Reconnect::default();
        assert_eq!(
            r.on_lost(Duration::from_secs(3600), &mut rng),
            Duration::ZERO
        );
        // Failures back off within the doubling ceilings, up to the cap.
        let mut ceiling = RECONNECT_BASE;
        for _ in 0..20 {
            let d = r.on_failure(&mut rng);
            assert!(d <= ceiling && d <= RECONNECT_CAP, "{d:?} > {ceiling:?}");
            ceiling = (ceiling * 2).min(RECONNECT_CAP);
        }
        // A tunnel that drops early again does not reset the pace...
        let d = r.on_lost(Duration::from_secs(2), &mut rng);
        assert!(d <= RECONNECT_CAP);
        // ...one that stayed up for a while does.
        assert_eq!(r.on_lost(STABLE_AFTER, &mut rng), Duration::ZERO);
        let d = r.on_failure(&mut rng);
        assert!(d <= RECONNECT_BASE, "{d:?}");
    }

    #[test]
    fn flapping_tunnels_back_off() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut r = Reconnect::default();
        let delays: Vec<_> = (0..10)
            .map(|_| r.on_lost(Duration::from_secs(1), &mut rng))
            .collect();
        assert_eq!(delays[0], Duration::ZERO);
        assert!(delays.iter().all(|d| *d <= RECONNECT_CAP));
        assert!(
            delays[1..].iter().any(|d| *d > RECONNECT_BASE),
            "{delays:?}"
        );
    }

    #[tokio::test]
    async fn the_slot_keeps_only_the_newest_credentials() {
        let slot = CredentialSlot::default();
        let sealed = |n| SealedCredentials {
            nonce: [n; 12],
            ciphertext: vec![n],
        };
        slot.put(sealed(1));
        slot.put(sealed(2));
        assert_eq!(slot.take().await, sealed(2));
        let slot = Arc::new(slot);
        let waiter = tokio::spawn({
            let slot = slot.clone();
            async move { slot.take().await }
        });
        tokio::task::yield_now().await;
        slot.put(sealed(3));
        assert_eq!(waiter.await.unwrap(), sealed(3));
    }
}
