//! Edge stacks on this device: the agent's side of [`proto::stacks`].
//!
//! Check-in (or async tick) answers announce the digest of the desired state while the
//! server has not heard this agent acknowledge it; the main loop hands each announcement to
//! the [`Reconciler`], a task of its own, which
//! 1. fetches the desired state when the digest is not the one it holds, and keeps it in
//!    `<EDGE_DATA_DIR>/stacks.json` (with what is deployed, per stack: version, the digest of
//!    what was deployed, phase, error), written atomically before and after every step;
//! 2. deploys what differs, one stack at a time, through the engine
//!    ([`DockerClient::deploy_stack_spec`]): `acknowledged`, `imagesPulled` (images pulled
//!    as their pull policy says), `deploying`, then `running` once every container has been up
//!    (and healthy, where it has a healthcheck) for the settle time, or `error` with the
//!    engine's message, tried again with backoff (30 s doubling to 10 min);
//! 3. removes stacks no longer desired (`removing`, `removed`; volumes stay);
//! 4. reports every stack's status (and the digest it holds, which acknowledges it) after
//!    each change, until a report goes through.
//!
//! A restart resumes from the journal: what is `running` at the digest it had is left alone
//! (a re-announced digest it holds is only acknowledged, never deployed twice), a step cut
//! short is done again (every step is idempotent: containers whose configuration is
//! unchanged are kept).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::stacks::{DesiredStack, Phase, StackState, MAX_STACK_ERROR};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::PollClient;
use crate::docker::{DockerClient, StackHealth};
use crate::edge_id::write_atomically;

/// File name in the data dir.
pub const STACKS_FILE: &str = "stacks.json";
/// A failed deployment is tried again after this, doubling up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(30);
pub const RETRY_MAX: Duration = Duration::from_secs(600);
/// After the settle time, how much longer containers may take to be up and healthy.
const START_GRACE: Duration = Duration::from_secs(300);
/// Fetches and reports that failed are tried again after this, doubling up to a minute.
const SYNC_RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StacksJournalError {
    #[error("cannot read the stack journal {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the stack journal {path} is corrupt ({detail}); move it away to start afresh (stacks are then deployed again from the desired state)")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot write the stack journal in {dir}: {source}")]
    Write { dir: PathBuf, source: io::Error },
}

/// One stack as it stands on the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Deployed {
    name: String,
    version: u32,
    /// [`desired_hash`] of what this entry is about.
    hash: String,
    phase: Phase,
    error: Option<String>,
    at_ms: u64,
    /// Failed attempts in a row (for the backoff).
    attempts: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    /// The digest of `desired` (0: nothing desired).
    digest: u64,
    desired: Vec<DesiredStack>,
    /// By stack id.
    deployed: BTreeMap<u64, Deployed>,
    /// Statuses changed since the last report that went through.
    unreported: bool,
}

/// `stacks.json`: the desired state and what is deployed.
#[derive(Debug)]
pub struct StacksJournal {
    dir: PathBuf,
    state: State,
}

impl StacksJournal {
    pub fn open(dir: &Path) -> Result<Self, StacksJournalError> {
        let path = dir.join(STACKS_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| StacksJournalError::Corrupt {
                    path: path.clone(),
                    detail: e.to_string(),
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(StacksJournalError::Read { path, source }),
        };
        Ok(Self {
            dir: dir.to_owned(),
            state,
        })
    }

    fn save(&self) -> Result<(), StacksJournalError> {
        let bytes = serde_json::to_vec(&self.state).map_err(|e| StacksJournalError::Write {
            dir: self.dir.clone(),
            source: io::Error::other(e),
        })?;
        write_atomically(&self.dir, STACKS_FILE, &bytes).map_err(|source| {
            StacksJournalError::Write {
                dir: self.dir.clone(),
                source,
            }
        })
    }

    /// The digest of the desired state held.
    pub fn digest(&self) -> u64 {
        self.state.digest
    }

    fn statuses(&self) -> Vec<StackState> {
        self.state
            .deployed
            .iter()
            .map(|(id, d)| StackState {
                stack_id: *id,
                version: d.version,
                phase: d.phase,
                error: d.error.clone(),
                at_ms: d.at_ms,
            })
            .collect()
    }
}

/// What identifies a stack's deployment: its version and everything it was rendered to.
fn desired_hash(stack: &DesiredStack) -> String {
    let bytes = serde_json::to_vec(stack).unwrap_or_default();
    Sha256::digest(&bytes)
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The next thing to do with the device's stacks.
#[derive(Debug, PartialEq, Eq)]
enum Work {
    Deploy(u64),
    Remove(u64),
    /// Nothing until then (a retry), or nothing at all.
    Wait(Option<Instant>),
}

/// Retry delay after `attempts` failures in a row.
fn backoff(attempts: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(10))
        .min(RETRY_MAX)
}

/// What to do next: a desired stack not deployed as desired (or cut short), a failed one
/// whose retry is due, a stack no longer desired; else when to look again.
fn next_work(state: &State, retry_at: &BTreeMap<u64, Instant>, now: Instant) -> Work {
    // Removals first: a stack deleted and made again under its name is the same project.
    for (id, d) in &state.deployed {
        if d.phase != Phase::Removed && !state.desired.iter().any(|s| s.id == *id) {
            return Work::Remove(*id);
        }
    }
    let mut wake: Option<Instant> = None;
    for stack in &state.desired {
        let hash = desired_hash(stack);
        match state.deployed.get(&stack.id) {
            Some(d) if d.hash == hash && d.phase == Phase::Running => {}
            Some(d) if d.hash == hash && d.phase == Phase::Error => match retry_at.get(&stack.id) {
                Some(at) if *at > now => {
                    wake = Some(wake.map_or(*at, |w| w.min(*at)));
                }
                _ => return Work::Deploy(stack.id),
            },
            _ => return Work::Deploy(stack.id),
        }
    }
    Work::Wait(wake)
}

/// Brings the device's stacks to the desired state and reports how they stand.
pub struct Reconciler {
    client: PollClient,
    docker: DockerClient,
    journal: StacksJournal,
    settle: Duration,
    announced: watch::Receiver<Option<u64>>,
    retry_at: BTreeMap<u64, Instant>,
    /// The server announced a digest this agent holds: acknowledge it.
    ack: bool,
    sync_failures: u32,
}

impl Reconciler {
    pub fn new(
        client: PollClient,
        docker: DockerClient,
        journal: StacksJournal,
        settle: Duration,
        announced: watch::Receiver<Option<u64>>,
    ) -> Self {
        Self {
            client,
            docker,
            journal,
            settle,
            announced,
            retry_at: BTreeMap::new(),
            ack: false,
            sync_failures: 0,
        }
    }

    /// Runs until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let announced = *self.announced.borrow_and_update();
            let mut sync_due = None;
            if let Some(digest) = announced {
                if digest != self.journal.digest() {
                    if let Err(e) = self.fetch().await {
                        sync_due =
                            Some(self.sync_failed(&format!("desired state not fetched: {e}")));
                    }
                } else {
                    self.ack = true;
                }
            }
            let work = next_work(&self.journal.state, &self.retry_at, Instant::now());
            let wait = match work {
                Work::Deploy(id) => {
                    self.deploy(id, &stop).await;
                    Some(Instant::now())
                }
                Work::Remove(id) => {
                    self.remove(id, &stop).await;
                    Some(Instant::now())
                }
                Work::Wait(at) => at,
            };
            if self.journal.state.unreported || self.ack {
                if let Err(e) = self.report().await {
                    let at = self.sync_failed(&format!("stack statuses not reported: {e}"));
                    sync_due = Some(sync_due.map_or(at, |d: Instant| d.min(at)));
                }
            }
            let until = match (wait, sync_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                () = stop.cancelled() => return,
                changed = self.announced.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = sleep_until(until) => {}
            }
        }
    }

    fn sync_failed(&mut self, why: &str) -> Instant {
        self.sync_failures += 1;
        if self.sync_failures <= 3 || self.sync_failures.is_power_of_two() {
            warn!(failures = self.sync_failures, "{why}");
        }
        let delay = SYNC_RETRY
            .saturating_mul(1u32 << self.sync_failures.min(5))
            .min(Duration::from_secs(60));
        Instant::now() + delay
    }

    async fn fetch(&mut self) -> Result<(), String> {
        let state = self
            .client
            .fetch_desired()
            .await
            .map_err(|e| e.to_string())?;
        self.sync_failures = 0;
        info!(
            digest = state.digest,
            stacks = state.stacks.len(),
            "desired stacks fetched"
        );
        self.journal.state.digest = state.digest;
        self.journal.state.desired = state.stacks;
        // The new digest is acknowledged with the next report.
        self.journal.state.unreported = true;
        self.save();
        Ok(())
    }

    async fn report(&mut self) -> Result<(), String> {
        let statuses = self.journal.statuses();
        // At most what one report carries; the digest goes with each.
        for chunk in statuses
            .chunks(proto::stacks::MAX_STACKS_PER_ENV)
            .chain(statuses.is_empty().then_some(&[][..]))
        {
            self.client
                .report_stacks(self.journal.digest(), chunk)
                .await
                .map_err(|e| e.to_string())?;
        }
        self.sync_failures = 0;
        self.ack = false;
        self.journal.state.unreported = false;
        // Removed stacks are forgotten once the server heard so.
        self.journal
            .state
            .deployed
            .retain(|_, d| d.phase != Phase::Removed);
        self.save();
        Ok(())
    }

    fn save(&self) {
        if let Err(e) = self.journal.save() {
            warn!("{e}");
        }
    }

    /// Records a phase of stack `id` (journaled at once; reported with the next report).
    fn set_phase(&mut self, stack: &DesiredStack, phase: Phase, error: Option<String>) {
        let at_ms = self.client.clock().now_ms();
        let hash = desired_hash(stack);
        let entry = self
            .journal
            .state
            .deployed
            .entry(stack.id)
            .or_insert_with(|| Deployed {
                name: stack.name.clone(),
                version: stack.version,
                hash: hash.clone(),
                phase,
                error: None,
                at_ms,
                attempts: 0,
            });
        if entry.hash != hash {
            entry.attempts = 0;
        }
        entry.name.clone_from(&stack.name);
        entry.version = stack.version;
        entry.hash = hash;
        entry.phase = phase;
        entry.error = error.map(|e| clip(&e));
        entry.at_ms = at_ms;
        self.journal.state.unreported = true;
        self.save();
    }

    /// Sends what changed so far (progress is visible while a deployment runs); a failure
    /// is left for the loop's report.
    async fn progress(&mut self) {
        if let Err(e) = self.report().await {
            tracing::debug!(error = %e, "progress report not sent");
        }
    }

    async fn deploy(&mut self, id: u64, stop: &CancellationToken) {
        let Some(stack) = self
            .journal
            .state
            .desired
            .iter()
            .find(|s| s.id == id)
            .cloned()
        else {
            return;
        };
        let project = stack.project();
        info!(stack = %stack.name, version = stack.version, %project, "deploying stack");
        self.set_phase(&stack, Phase::Acknowledged, None);
        self.progress().await;
        let result = async {
            self.docker.ensure_images(&stack).await?;
            self.set_phase(&stack, Phase::ImagesPulled, None);
            self.set_phase(&stack, Phase::Deploying, None);
            self.progress().await;
            self.docker.deploy_stack_spec(&stack).await?;
            self.settle(&stack, stop).await
        }
        .await;
        match result {
            Ok(()) => {
                info!(stack = %stack.name, version = stack.version, "stack running");
                self.set_phase(&stack, Phase::Running, None);
                if let Some(d) = self.journal.state.deployed.get_mut(&id) {
                    d.attempts = 0;
                }
                self.retry_at.remove(&id);
            }
            Err(e) => {
                self.set_phase(&stack, Phase::Error, Some(e.clone()));
                let attempts = self
                    .journal
                    .state
                    .deployed
                    .get_mut(&id)
                    .map(|d| {
                        d.attempts += 1;
                        d.attempts
                    })
                    .unwrap_or(1);
                let delay = backoff(attempts);
                warn!(
                    stack = %stack.name,
                    version = stack.version,
                    attempts,
                    retry_in_secs = delay.as_secs(),
                    "stack deployment failed: {e}"
                );
                self.retry_at.insert(id, Instant::now() + delay);
            }
        }
        self.save();
    }

    /// Waits until the stack's containers have been up (and healthy) for the settle time.
    async fn settle(&self, stack: &DesiredStack, stop: &CancellationToken) -> Result<(), String> {
        let deadline = Instant::now() + self.settle + START_GRACE;
        let mut up_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            match self.docker.stack_health(stack).await? {
                StackHealth::Up => {
                    let since = *up_since.get_or_insert(now);
                    if now.duration_since(since) >= self.settle {
                        return Ok(());
                    }
                }
                StackHealth::Starting(why) => {
                    up_since = None;
                    if now >= deadline {
                        return Err(format!(
                            "not up within {}s: {why}",
                            (self.settle + START_GRACE).as_secs()
                        ));
                    }
                }
                StackHealth::Failed(why) => return Err(why),
            }
            let step = Duration::from_millis(500).min(self.settle.max(Duration::from_millis(100)));
            tokio::select! {
                () = stop.cancelled() => return Err("the agent stopped".into()),
                () = tokio::time::sleep(step) => {}
            }
        }
    }

    async fn remove(&mut self, id: u64, stop: &CancellationToken) {
        let Some(d) = self.journal.state.deployed.get(&id).cloned() else {
            return;
        };
        let project = proto::stacks::project_name(&d.name);
        if self
            .journal
            .state
            .desired
            .iter()
            .any(|s| s.project() == project)
        {
            // Another stack of that name (made anew) owns the project now: leave it be.
            info!(stack = %d.name, "stack replaced by a new one of its name; nothing to remove");
            let at_ms = self.client.clock().now_ms();
            if let Some(e) = self.journal.state.deployed.get_mut(&id) {
                e.phase = Phase::Removed;
                e.at_ms = at_ms;
            }
            self.journal.state.unreported = true;
            self.save();
            return;
        }
        info!(stack = %d.name, %project, "removing stack no longer targeted");
        let mark = |this: &mut Self, phase: Phase, error: Option<String>| {
            let at_ms = this.client.clock().now_ms();
            if let Some(e) = this.journal.state.deployed.get_mut(&id) {
                e.phase = phase;
                e.error = error.map(|e| clip(&e));
                e.at_ms = at_ms;
            }
            this.journal.state.unreported = true;
            this.save();
        };
        mark(self, Phase::Removing, None);
        self.progress().await;
        match self.docker.remove_project(&project).await {
            Ok(()) => mark(self, Phase::Removed, None),
            Err(e) => {
                warn!(stack = %d.name, "stack not removed: {e}");
                // Tried again at the next turn (after a pause, not in a loop).
                mark(self, Phase::Error, Some(format!("removing: {e}")));
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(RETRY_FIRST) => {}
                }
            }
        }
    }
}

fn clip(e: &str) -> String {
    let mut end = e.len().min(MAX_STACK_ERROR);
    while !e.is_char_boundary(end) {
        end -= 1;
    }
    e[..end].to_owned()
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proto::stacks::StackSpec;

    use super::*;

    fn stack(id: u64, version: u32) -> DesiredStack {
        DesiredStack {
            id,
            name: format!("s{id}"),
            version,
            spec: StackSpec::default(),
        }
    }

    fn deployed(s: &DesiredStack, phase: Phase) -> Deployed {
        Deployed {
            name: s.name.clone(),
            version: s.version,
            hash: desired_hash(s),
            phase,
            error: None,
            at_ms: 0,
            attempts: 1,
        }
    }

    #[test]
    fn what_differs_is_deployed_what_runs_is_left_alone_what_went_is_removed() {
        let now = Instant::now();
        let none = BTreeMap::new();
        let mut state = State {
            digest: 1,
            desired: vec![stack(1, 2)],
            ..Default::default()
        };
        assert_eq!(next_work(&state, &none, now), Work::Deploy(1));
        state
            .deployed
            .insert(1, deployed(&stack(1, 2), Phase::Running));
        assert_eq!(next_work(&state, &none, now), Work::Wait(None));
        // A step cut short (the agent stopped while deploying) is done again.
        state
            .deployed
            .insert(1, deployed(&stack(1, 2), Phase::Deploying));
        assert_eq!(next_work(&state, &none, now), Work::Deploy(1));
        // A new version is deployed.
        state
            .deployed
            .insert(1, deployed(&stack(1, 1), Phase::Running));
        assert_eq!(next_work(&state, &none, now), Work::Deploy(1));
        // A failure waits for its retry.
        state
            .deployed
            .insert(1, deployed(&stack(1, 2), Phase::Error));
        let later = now + Duration::from_secs(30);
        let retry = BTreeMap::from([(1, later)]);
        assert_eq!(next_work(&state, &retry, now), Work::Wait(Some(later)));
        assert_eq!(next_work(&state, &retry, later), Work::Deploy(1));
        // A stack no longer desired goes.
        state
            .deployed
            .insert(1, deployed(&stack(1, 2), Phase::Running));
        state
            .deployed
            .insert(7, deployed(&stack(7, 1), Phase::Running));
        assert_eq!(next_work(&state, &none, now), Work::Remove(7));
        state.deployed.get_mut(&7).unwrap().phase = Phase::Removed;
        assert_eq!(next_work(&state, &none, now), Work::Wait(None));
    }

    #[test]
    fn retries_back_off_to_ten_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(30));
        assert_eq!(backoff(2), Duration::from_secs(60));
        assert_eq!(backoff(3), Duration::from_secs(120));
        assert_eq!(backoff(40), RETRY_MAX);
    }

    #[test]
    fn the_journal_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = StacksJournal::open(dir.path()).unwrap();
        assert_eq!(j.digest(), 0);
        j.state.digest = 9;
        j.state.desired = vec![stack(1, 3)];
        j.state
            .deployed
            .insert(1, deployed(&stack(1, 3), Phase::Running));
        j.save().unwrap();
        let again = StacksJournal::open(dir.path()).unwrap();
        assert_eq!(again.state, j.state);
        assert_eq!(again.statuses()[0].phase, Phase::Running);
        std::fs::write(dir.path().join(STACKS_FILE), b"{").unwrap();
        assert!(matches!(
            StacksJournal::open(dir.path()),
            Err(StacksJournalError::Corrupt { .. })
        ));
    }
}
