//! Async mode (`EDGE_ASYNC=1`): no tunnel. Three ticks on the intervals the server sets (ping,
//! snapshot, command; 0 turns one off) and ticks due within [`MERGE_WINDOW`] of each other go
//! as one request ([`Schedule`], pure and tested with paused time).
//!
//! A snapshot tick sends the engine's state as a delta against the last snapshot the server
//! acknowledged, `Unchanged` when nothing changed, or whole when there is no acknowledged base
//! (first tick, after a restart, or when the server asks for it). Commands run in id order,
//! each recorded in the [`Journal`] before and after it touches the engine, so none runs
//! twice; after commands ran, a follow-up request goes at once with their results and a fresh
//! snapshot. A failed request is retried with jittered backoff and keeps every tick that was
//! due: when the link comes back, one request catches up.

use std::future::Future;

use proto::async_mode::{AsyncIntervals, SnapshotReport};
use proto::snapshot::Snapshot;
use tokio::time::{Duration, Instant};
use tracing::{debug, info, warn};

use crate::client::{AsyncTick, CheckinError, PollClient};
use crate::docker::DockerClient;
use crate::journal::Journal;
use crate::retry::{self, Backoff, LogDecision, LogThrottle};

/// Ticks due within this of the earliest go together.
pub const MERGE_WINDOW: Duration = Duration::from_secs(2);
/// With every interval off, the agent still pings this often, to hear about new intervals.
pub const ALL_OFF_PING: Duration = Duration::from_secs(300);
/// Intervals until the server says otherwise (the settings' defaults).
pub const DEFAULT_INTERVALS: AsyncIntervals = AsyncIntervals {
    ping: 60,
    snapshot: 60,
    command: 60,
};
/// Most command results carried by one request (the rest go with the next).
const MAX_RESULTS_PER_REQUEST: usize = 64;

/// Which ticks a request carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Due {
    pub ping: bool,
    pub snapshot: bool,
    pub command: bool,
}

/// When each tick is due next.
#[derive(Clone, Debug)]
pub struct Schedule {
    intervals: AsyncIntervals,
    /// Ping, snapshot, command; `None`: off.
    next: [Option<Instant>; 3],
    last_sent: Instant,
}

fn secs(s: u32) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(u64::from(s)))
}

impl Schedule {
    /// Everything is due at once: the first request reports and fetches all.
    pub fn new(now: Instant) -> Self {
        Self {
            intervals: DEFAULT_INTERVALS,
            next: [Some(now); 3],
            last_sent: now,
        }
    }

    fn periods(&self) -> [Option<Duration>; 3] {
        [
            secs(self.intervals.ping),
            secs(self.intervals.snapshot),
            secs(self.intervals.command),
        ]
    }

    /// When the next request is due.
    pub fn next_due(&self) -> Instant {
        self.next
            .iter()
            .flatten()
            .min()
            .copied()
            .unwrap_or(self.last_sent + ALL_OFF_PING)
    }

    /// The ticks due at `now` (within the merge window). With every tick off, a ping.
    pub fn due(&self, now: Instant) -> Due {
        let horizon = now + MERGE_WINDOW;
        let is_due = |i: usize| self.next[i].is_some_and(|t| t <= horizon);
        let due = Due {
            ping: is_due(0),
            snapshot: is_due(1),
            command: is_due(2),
        };
        if due == Due::default() && self.next.iter().all(Option::is_none) {
            return Due {
                ping: true,
                ..Due::default()
            };
        }
        due
    }

    /// A request carrying `due` succeeded at `now`: those ticks are due one interval later.
    /// A request also counts as the ping it made unnecessary.
    pub fn sent(&mut self, due: Due, now: Instant) {
        self.last_sent = now;
        let periods = self.periods();
        let flags = [true, due.snapshot, due.command];
        for i in 0..3 {
            if flags[i] {
                self.next[i] = periods[i].map(|p| now + p);
            }
        }
    }

    /// The server's intervals; a shorter one takes effect from now, a longer one from the
    /// last tick.
    pub fn set_intervals(&mut self, intervals: AsyncIntervals, now: Instant) {
        if intervals == self.intervals {
            return;
        }
        self.intervals = intervals;
        let periods = self.periods();
        for (next, period) in self.next.iter_mut().zip(periods) {
            *next = match (period, *next) {
                (None, _) => None,
                (Some(p), None) => Some(now + p),
                (Some(p), Some(t)) => Some(t.min(now + p)),
            };
        }
    }

    pub fn intervals(&self) -> AsyncIntervals {
        self.intervals
    }
}

/// The last snapshot the server acknowledged, and the one in flight.
#[derive(Debug, Default)]
struct Snapshots {
    acked: Option<(u64, Snapshot)>,
}

impl Snapshots {
    /// The report for `snap`, and its digest.
    fn report(
        &self,
        snap: &Snapshot,
    ) -> Result<(SnapshotReport, u64), proto::snapshot::SnapshotError> {
        let digest = proto::snapshot::digest(snap)?;
        let report = match &self.acked {
            Some((d, _)) if *d == digest => SnapshotReport::Unchanged { digest },
            Some((_, base)) => {
                let delta = proto::snapshot::compress_delta(&proto::snapshot::diff(base, snap)?)?;
                let full = proto::snapshot::compress(snap)?;
                // A delta larger than the whole (most of the engine changed) is not worth it.
                if delta.len() < full.len() {
                    SnapshotReport::Delta(delta)
                } else {
                    SnapshotReport::Full(full)
                }
            }
            None => SnapshotReport::Full(proto::snapshot::compress(snap)?),
        };
        Ok((report, digest))
    }
}

/// Runs async mode until `shutdown` completes. Never gives up on its own.
/// Announced desired-stack digests go to `desired` (see [`crate::stacks`]).
pub async fn run<F>(
    mut client: PollClient,
    docker: DockerClient,
    mut journal: Journal,
    desired: tokio::sync::watch::Sender<Option<u64>>,
    shutdown: F,
) where
    F: Future<Output = ()>,
{
    let mut schedule = Schedule::new(Instant::now());
    let mut snapshots = Snapshots::default();
    let mut backoff = Backoff::default();
    let mut throttle = LogThrottle::default();
    let mut engine_throttle = LogThrottle::default();
    let mut retry_at: Option<Instant> = None;
    // After commands ran or the server asked for a full snapshot: go again at once, with a
    // snapshot and a command fetch.
    let mut follow_up = false;
    let mut connected = false;
    // The last snapshot was refused (too large, or unreadable to the server): the next request
    // goes without one, so pings and commands never wait behind a snapshot that cannot pass.
    let mut skip_snapshot = false;
    tokio::pin!(shutdown);
    loop {
        let at = next_request_at(retry_at, follow_up, &schedule, Instant::now());
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep_until(at) => {}
        }
        let now = Instant::now();
        let mut due = schedule.due(now);
        if follow_up {
            due.snapshot = true;
            due.command = true;
        }
        let mut in_flight = None;
        let snapshot = if due.snapshot && !std::mem::take(&mut skip_snapshot) {
            match docker.snapshot(client.clock().now_ms()).await {
                Ok(snap) => match snapshots.report(&snap) {
                    Ok((report, digest)) => {
                        engine_throttle.success();
                        in_flight = Some((digest, snap));
                        Some(report)
                    }
                    Err(e) => {
                        warn!(error = %e, "snapshot could not be encoded");
                        None
                    }
                },
                Err(e) => {
                    if engine_throttle.failure("engine", std::time::Instant::now())
                        == LogDecision::Changed
                    {
                        warn!(error = %e, "no snapshot: the engine could not be read");
                    }
                    None
                }
            }
        } else {
            None
        };
        let results: Vec<_> = journal
            .outbox()
            .iter()
            .take(MAX_RESULTS_PER_REQUEST)
            .cloned()
            .collect();
        let tick = AsyncTick {
            snapshot,
            results,
            done_through: due.command.then(|| journal.done_through()),
        };
        let result = tokio::select! {
            () = &mut shutdown => break,
            r = client.async_tick(&tick) => r,
        };
        let answer = match result {
            Ok(answer) => answer,
            Err(err) => {
                if tick.snapshot.is_some() && snapshot_refused(&err) {
                    warn!(
                        error = %err,
                        "the snapshot was refused; the next request goes without it, the next snapshot whole"
                    );
                    snapshots.acked = None;
                    skip_snapshot = true;
                }
                let delay = retry::retry_delay(
                    &err,
                    schedule_interval(&schedule),
                    &mut backoff,
                    &mut rand::thread_rng(),
                );
                log_failure(&mut throttle, &err, delay);
                retry_at = Some(Instant::now() + delay);
                continue;
            }
        };
        retry_at = None;
        backoff.reset();
        if let LogDecision::Recovered { failures } = throttle.success() {
            info!(failures, "reached the control plane again");
        } else if !connected {
            info!(
                ping_secs = answer.intervals.ping,
                snapshot_secs = answer.intervals.snapshot,
                command_secs = answer.intervals.command,
                "async mode: checked in with the control plane"
            );
        }
        connected = true;
        if answer.desired.is_some() {
            desired.send_replace(answer.desired);
        }
        if let Err(e) = journal.acknowledge(&tick.results) {
            warn!(error = %e, "command journal not updated");
        }
        schedule.sent(due, now);
        schedule.set_intervals(answer.intervals, now);
        if let Some((digest, snap)) = in_flight {
            if answer.snapshot_ack == Some(digest) {
                snapshots.acked = Some((digest, snap));
            }
        }
        if answer.need_full_snapshot {
            debug!("the control plane asked for a full snapshot");
            snapshots.acked = None;
        }
        let ran = run_commands(&docker, &mut journal, answer.commands).await;
        // Results and the engine's new state go home at once; a full snapshot asked for too
        // (but only once in a row, so a server that keeps asking cannot make us spin).
        follow_up = ran > 0 || (answer.need_full_snapshot && !follow_up);
    }
    info!("edge agent stopped");
}

/// When the next request goes: after a failure, when its backoff is over (a follow-up too:
/// it keeps its intent but must not hammer a server that is down); a follow-up at once;
/// otherwise at the next due tick.
fn next_request_at(
    retry_at: Option<Instant>,
    follow_up: bool,
    schedule: &Schedule,
    now: Instant,
) -> Instant {
    match retry_at {
        Some(at) => at,
        None if follow_up => now,
        None => schedule.next_due(),
    }
}

/// Whether a request failed because of its snapshot: too large to send, or refused as
/// unreadable or too large by the server.
fn snapshot_refused(err: &CheckinError) -> bool {
    matches!(
        err,
        CheckinError::TooLarge { .. }
            | CheckinError::Refused {
                status: 400 | 413,
                ..
            }
    )
}

fn schedule_interval(s: &Schedule) -> Duration {
    s.intervals()
        .smallest()
        .map_or(ALL_OFF_PING, |v| Duration::from_secs(u64::from(v)))
}

fn log_failure(throttle: &mut LogThrottle, err: &CheckinError, delay: Duration) {
    let retry_in = humantime::format_duration(Duration::from_millis(
        u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
    ));
    let key = match err {
        CheckinError::Refused { status, code, .. } => format!("refused:{status}:{code}"),
        CheckinError::Server { status, .. } => format!("server:{status}"),
        other => other.kind().to_owned(),
    };
    match throttle.failure(&key, std::time::Instant::now()) {
        LogDecision::Changed => {
            warn!(kind = err.kind(), error = %err, %retry_in, "async request failed")
        }
        LogDecision::StillFailing { attempts } => warn!(
            kind = err.kind(),
            error = %err,
            attempts,
            %retry_in,
            "async request still failing"
        ),
        LogDecision::Quiet | LogDecision::Recovered { .. } => {}
    }
}

/// Runs the new commands in id order; returns how many ran.
async fn run_commands(
    docker: &DockerClient,
    journal: &mut Journal,
    mut commands: Vec<proto::async_mode::Command>,
) -> usize {
    commands.sort_by_key(|c| c.id);
    let mut ran = 0;
    for cmd in commands {
        if !journal.is_new(cmd.id) {
            // Delivered again (at-least-once); its result is in the outbox or acknowledged.
            continue;
        }
        if let Err(e) = journal.begin(cmd.id) {
            warn!(command = cmd.id, error = %e, "command not run: the journal cannot be written");
            break;
        }
        let outcome = docker.execute(&cmd.action).await;
        match &outcome {
            Ok(()) => info!(
                command = cmd.id,
                kind = cmd.action.kind(),
                target = cmd.action.target(),
                "command succeeded"
            ),
            Err(e) => warn!(
                command = cmd.id,
                kind = cmd.action.kind(),
                target = cmd.action.target(),
                error = %e,
                "command failed"
            ),
        }
        if let Err(e) = journal.finish(cmd.id, outcome.err()) {
            warn!(command = cmd.id, error = %e, "command result not persisted");
        }
        ran += 1;
    }
    ran
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(ping: u32, snapshot: u32, command: u32) -> AsyncIntervals {
        AsyncIntervals {
            ping,
            snapshot,
            command,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn equal_intervals_make_one_request_per_interval() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        let all = Due {
            ping: true,
            snapshot: true,
            command: true,
        };
        assert_eq!(s.due(t0), all);
        s.sent(all, t0);
        assert_eq!(s.next_due(), t0 + Duration::from_secs(60));
        // Ticks a second apart still go together.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(s.due(t1), all);
        assert_eq!(s.due(t1 - Duration::from_secs(3)), Due::default());
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_of_different_intervals_merge_when_they_fall_together() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        s.set_intervals(iv(10, 30, 0), t0);
        s.sent(s.due(t0), t0);
        let mut requests = Vec::new();
        let mut now = t0;
        for _ in 0..6 {
            now = s.next_due();
            let due = s.due(now);
            requests.push((now - t0, due));
            s.sent(due, now);
        }
        let snapshot_at: Vec<u64> = requests
            .iter()
            .filter(|(_, d)| d.snapshot)
            .map(|(t, _)| t.as_secs())
            .collect();
        assert_eq!(snapshot_at, vec![30, 60]);
        assert!(requests.iter().all(|(_, d)| !d.command), "command is off");
        assert_eq!(
            requests
                .iter()
                .map(|(t, _)| t.as_secs())
                .collect::<Vec<_>>(),
            vec![10, 20, 30, 40, 50, 60]
        );
        let _ = now;
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_interval_applies_at_once_and_all_off_still_pings() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        s.sent(s.due(t0), t0);
        s.set_intervals(iv(60, 60, 5), t0 + Duration::from_secs(1));
        assert_eq!(s.next_due(), t0 + Duration::from_secs(6));
        s.set_intervals(iv(0, 0, 0), t0 + Duration::from_secs(2));
        assert_eq!(s.next_due(), t0 + ALL_OFF_PING);
        assert!(s.due(t0 + ALL_OFF_PING).ping);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_follow_up_waits_for_its_backoff() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0);
        s.sent(s.due(t0), t0);
        let later = t0 + Duration::from_secs(7);
        assert_eq!(next_request_at(None, true, &s, t0), t0);
        assert_eq!(next_request_at(Some(later), true, &s, t0), later);
        assert_eq!(next_request_at(Some(later), false, &s, t0), later);
        assert_eq!(
            next_request_at(None, false, &s, t0),
            t0 + Duration::from_secs(60)
        );
    }

    #[test]
    fn only_errors_about_the_request_itself_drop_the_snapshot() {
        use crate::client::RefusalCode;
        let refused = |status| CheckinError::Refused {
            status,
            code: RefusalCode::BadRequest,
            message: String::new(),
            server_time_ms: None,
        };
        assert!(snapshot_refused(&refused(400)));
        assert!(snapshot_refused(&refused(413)));
        assert!(snapshot_refused(&CheckinError::TooLarge {
            len: 2,
            limit: 1
        }));
        assert!(!snapshot_refused(&refused(401)));
        assert!(!snapshot_refused(&CheckinError::Timeout(
            Duration::from_secs(1)
        )));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_request_keeps_its_ticks_due() {
        let t0 = Instant::now();
        let s = Schedule::new(t0);
        // Nothing was sent: ten minutes later everything is still due, once.
        let later = t0 + Duration::from_secs(600);
        assert_eq!(
            s.due(later),
            Due {
                ping: true,
                snapshot: true,
                command: true
            }
        );
    }
}
