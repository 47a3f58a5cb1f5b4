//! Rollouts of edge stack versions: which version each environment should run, and the
//! controller that moves a rollout on, batch after batch.
//!
//! An environment's place in a rollout is its rank, a hash of stack and environment
//! ([`rank`]): those ranked below the rollout's threshold run the new version, the others the
//! old one ([`version_for`]). A batch moves the threshold past the next targets in rank order,
//! so the state is a few numbers however many environments there are, an environment never
//! goes back while a rollout goes on, and one that joins the targets meanwhile lands on its
//! side of the threshold at once.
//!
//! [`step`] is the pure rule (tested without a clock or a store); [`run`] applies it every
//! second on every replica, each write a compare-and-set on the rollout's revision, so two
//! replicas never both move one rollout (the loser reads again).

use std::time::Duration;

use sha2::{Digest, Sha256};
use store::{
    BatchGrowth, Change, EdgeStack, EnvId, OnFailure, Rollout, RolloutConfig, RolloutState,
    StatusCount,
};

use crate::api::AppState;

/// How often rollouts are looked at.
pub const TICK: Duration = Duration::from_secs(1);

/// An environment's place in stack `stack`'s rollouts.
pub fn rank(stack: u64, env: EnvId) -> u64 {
    let mut h = Sha256::new();
    h.update(stack.to_be_bytes());
    h.update(env.to_be_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    // Below u64::MAX: that threshold means "everyone".
    u64::from_be_bytes(b).min(u64::MAX - 1)
}

/// The version environment `env` of stack `stack` should run (0: none).
pub fn version_for(r: &Rollout, stack: u64, env: EnvId) -> u32 {
    if rank(stack, env) < r.threshold {
        r.to_version
    } else {
        r.from_version
    }
}

/// A new version going out from `from` (0: none ran) to `to`, its first batch due now.
pub fn start(config: RolloutConfig, from: u32, to: u32, now_ms: u64) -> Rollout {
    Rollout {
        revision: 0,
        config,
        state: RolloutState::Rolling,
        from_version: from,
        to_version: to,
        threshold: 0,
        batch: 0,
        released: 0,
        batch_started_ms: now_ms,
        next_batch_ms: Some(now_ms),
        reason: None,
        updated_ms: now_ms,
        tolerated_failures: 0,
    }
}

/// Everyone back to `version`, at once.
pub fn roll_back(r: Option<&Rollout>, version: u32, reason: String, now_ms: u64) -> Rollout {
    Rollout {
        revision: r.map_or(0, |r| r.revision),
        config: r.map(|r| r.config.clone()).unwrap_or_default(),
        state: RolloutState::RollingBack,
        from_version: version,
        to_version: version,
        threshold: u64::MAX,
        batch: 1,
        released: 0,
        batch_started_ms: now_ms,
        next_batch_ms: None,
        reason: Some(reason),
        updated_ms: now_ms,
        tolerated_failures: 0,
    }
}

/// The version environments that are not (yet) in a rollout run: the one the rollout before
/// brought everyone to, or, if it stopped half way, the one it started from.
pub fn settled_version(r: Option<&Rollout>, newest: u32) -> u32 {
    match r {
        None => newest,
        Some(r) => match r.state {
            RolloutState::Done | RolloutState::RollingBack | RolloutState::Idle => r.to_version,
            RolloutState::Rolling | RolloutState::Paused | RolloutState::Aborted => r.from_version,
        },
    }
}

/// What the controller sees of a stack's rollout.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    /// The ranks of the stack's current targets, ascending.
    pub ranks: Vec<u64>,
    /// Targets that reported `running` for the rollout's version.
    pub running: u64,
    /// Targets that reported `error` for it.
    pub failed: u64,
}

impl Observed {
    /// From the stack's counts (by status and version).
    pub fn new(mut ranks: Vec<u64>, counts: &[StatusCount], version: u32) -> Self {
        ranks.sort_unstable();
        let at = |s: store::DeployStatus| {
            counts
                .iter()
                .filter(|c| c.version == version && c.status == s)
                .map(|c| c.count)
                .sum()
        };
        Self {
            ranks,
            running: at(store::DeployStatus::Running),
            failed: at(store::DeployStatus::Error),
        }
    }

    fn released(&self, threshold: u64) -> u64 {
        self.ranks.partition_point(|&r| r < threshold) as u64
    }
}

/// The size of batch `n` (1 for the first) of `total` targets.
fn batch_size(c: &RolloutConfig, n: u32, total: u64) -> u64 {
    match c.batch_size {
        None | Some(0) => total,
        Some(size) => {
            let size = u64::from(size);
            match c.batch_growth {
                BatchGrowth::Fixed => size,
                BatchGrowth::Double => size.saturating_mul(1u64 << n.saturating_sub(1).min(40)),
            }
        }
    }
}

/// Whether `failed` of `released` environments is over the threshold.
fn over_threshold(c: &RolloutConfig, failed: u64, released: u64) -> bool {
    if failed == 0 {
        return false;
    }
    let f = c.failure_threshold.max(0.0);
    if f < 1.0 {
        failed as f64 > f * released as f64
    } else {
        failed as f64 > f
    }
}

/// The rollout after one look at it, or `None` when nothing changes.
pub fn step(r: &Rollout, seen: &Observed, now_ms: u64) -> Option<Rollout> {
    let mut next = r.clone();
    next.updated_ms = now_ms;
    let total = seen.ranks.len() as u64;
    match r.state {
        RolloutState::Rolling => {
            if let Some(at) = r.next_batch_ms {
                if now_ms < at {
                    return None;
                }
                let released = seen.released(r.threshold);
                let n = r.batch + 1;
                let upto = released.saturating_add(batch_size(&r.config, n, total));
                next.threshold = if upto >= total {
                    u64::MAX
                } else {
                    seen.ranks[upto as usize]
                };
                next.batch = n;
                next.released = seen.released(next.threshold);
                next.batch_started_ms = now_ms;
                next.next_batch_ms = None;
                return Some(next);
            }
            let released = seen.released(r.threshold);
            let failed = seen.failed.saturating_sub(r.tolerated_failures);
            if over_threshold(&r.config, failed, released)
                && r.config.on_failure != OnFailure::Continue
            {
                let why = format!(
                    "{failed} of {released} environments failed in batch {}",
                    r.batch
                );
                return Some(match r.config.on_failure {
                    OnFailure::Rollback if r.from_version > 0 => {
                        let mut back = roll_back(
                            Some(r),
                            r.from_version,
                            format!("{why}; rolled back to version {}", r.from_version),
                            now_ms,
                        );
                        back.revision = r.revision;
                        back
                    }
                    _ => {
                        next.state = RolloutState::Paused;
                        next.reason = Some(why);
                        next
                    }
                });
            }
            let settled = seen.running + seen.failed >= released;
            let timed_out = now_ms
                >= r.batch_started_ms
                    .saturating_add(u64::from(r.config.batch_timeout_secs) * 1000);
            if !(settled || timed_out) {
                return None;
            }
            if r.threshold == u64::MAX || released >= total {
                next.state = RolloutState::Done;
                next.released = total;
                next.reason = None;
            } else {
                next.next_batch_ms =
                    Some(now_ms.saturating_add(u64::from(r.config.wait_secs) * 1000));
                next.released = released;
            }
            Some(next)
        }
        RolloutState::RollingBack => {
            let timed_out = now_ms
                >= r.batch_started_ms
                    .saturating_add(u64::from(r.config.batch_timeout_secs) * 1000);
            if seen.running + seen.failed >= total || timed_out {
                next.state = RolloutState::Done;
                next.released = total;
                return Some(next);
            }
            (next.released != seen.running).then(|| {
                next.released = seen.running;
                next
            })
        }
        RolloutState::Idle | RolloutState::Paused | RolloutState::Done | RolloutState::Aborted => {
            None
        }
    }
}

/// The stack's targets' ranks.
async fn observe(
    state: &AppState,
    stack: &EdgeStack,
    r: &Rollout,
) -> Result<Observed, store::StoreError> {
    let targets = crate::targets::targeted_by(state, stack).await?;
    let counts = state.store.stack_status_counts(stack.id).await?;
    Ok(Observed::new(
        targets.iter().map(|&e| rank(stack.id, e)).collect(),
        &counts,
        r.to_version,
    ))
}

/// Moves every active rollout on, every [`TICK`], until `shutdown`.
pub async fn run(
    state: actix_web::web::Data<AppState>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        ticks += 1;
        if ticks % STATUS_GAUGES_EVERY == 1 {
            if let Err(e) = status_gauges(&state).await {
                tracing::debug!(error = %e, "stack status gauges not refreshed");
            }
        }
        if let Err(e) = once(&state).await {
            state.metrics.store_error(crate::metrics::StoreOp::Rollouts);
            tracing::warn!(error = %e, "rollouts not moved on; will try again");
        }
    }
}

/// Every how many ticks the per-stack status gauges are read again.
const STATUS_GAUGES_EVERY: u64 = 10;

/// `edgeplane_edge_stack_environments`: every stack's counts, as `GET` shows them.
async fn status_gauges(state: &AppState) -> Result<(), store::StoreError> {
    let rollouts: std::collections::HashMap<u64, Rollout> =
        state.store.stack_rollouts().await?.into_iter().collect();
    let mut all = Vec::new();
    for stack in state.store.list_edge_stacks().await? {
        let targets = crate::targets::targeted_by(state, &stack).await?;
        let counts = state.store.stack_status_counts(stack.id).await?;
        let version = rollouts
            .get(&stack.id)
            .map_or(stack.version, |r| r.to_version);
        all.push((
            stack.id,
            crate::targets::counts_for_version(targets.len(), &counts, version),
        ));
    }
    state.metrics.set_stack_environments(&all);
    Ok(())
}

async fn once(state: &AppState) -> Result<(), store::StoreError> {
    let rollouts = state.store.stack_rollouts().await?;
    let mut progress = Vec::with_capacity(rollouts.len());
    for (id, r) in rollouts {
        progress.push((id, r.clone()));
        if !matches!(r.state, RolloutState::Rolling | RolloutState::RollingBack) {
            continue;
        }
        let Some(stack) = state.store.edge_stack(id).await? else {
            continue;
        };
        let seen = observe(state, &stack, &r).await?;
        let Some(next) = step(&r, &seen, proto::clock::now_ms()) else {
            continue;
        };
        if state.store.put_stack_rollout(id, r.revision, &next).await? {
            // Only what changes an environment's version is worth every replica's reload.
            let moved = next.threshold != r.threshold
                || next.from_version != r.from_version
                || next.to_version != r.to_version
                || next.state != r.state;
            tracing::info!(
                stack = id,
                state = ?next.state,
                batch = next.batch,
                released = next.released,
                targets = seen.ranks.len(),
                reason = next.reason.as_deref().unwrap_or(""),
                "rollout moved on"
            );
            if let Some(last) = progress.last_mut() {
                last.1 = next;
            }
            if moved {
                let _ = state.publish(Change::EdgeStacks).await;
            }
        }
    }
    state.metrics.set_rollouts(&progress);
    Ok(())
}

#[cfg(test)]
mod tests {
    use store::DeployStatus;

    use super::*;

    fn config(batch: Option<u32>, growth: BatchGrowth, on_failure: OnFailure) -> RolloutConfig {
        RolloutConfig {
            batch_size: batch,
            batch_growth: growth,
            wait_secs: 5,
            batch_timeout_secs: 60,
            failure_threshold: 0.0,
            on_failure,
        }
    }

    fn seen(targets: u64, running: u64, failed: u64) -> Observed {
        Observed {
            ranks: (1..=targets).map(|e| rank(7, e)).collect::<Vec<_>>(),
            running,
            failed,
        }
        .sorted()
    }

    impl Observed {
        fn sorted(mut self) -> Self {
            self.ranks.sort_unstable();
            self
        }
    }

    #[test]
    fn batches_of_one_reach_the_targets_one_by_one() {
        let c = config(Some(1), BatchGrowth::Fixed, OnFailure::Pause);
        let mut r = start(c, 1, 2, 0);
        let mut now = 0;
        for batch in 1..=3u64 {
            // The batch is released...
            r = step(&r, &seen(3, batch - 1, 0), now).unwrap();
            assert_eq!((r.batch, r.released), (batch as u32, batch));
            let on_new = (1..=3).filter(|&e| version_for(&r, 7, e) == 2).count();
            assert_eq!(on_new as u64, batch, "exactly the released run version 2");
            // ... nothing moves until it reports ...
            assert_eq!(step(&r, &seen(3, batch - 1, 0), now + 1000), None);
            // ... then, settled, the next one waits its turn.
            r = step(&r, &seen(3, batch, 0), now + 1000).unwrap();
            if batch < 3 {
                assert_eq!(r.state, RolloutState::Rolling);
                assert_eq!(r.next_batch_ms, Some(now + 1000 + 5000));
                assert_eq!(step(&r, &seen(3, batch, 0), now + 2000), None, "waits");
                now += 6000;
            }
        }
        assert_eq!(r.state, RolloutState::Done);
        assert!((1..=3).all(|e| version_for(&r, 7, e) == 2));
    }

    #[test]
    fn doubling_batches_grow_and_all_at_once_is_one_batch() {
        let c = config(Some(1), BatchGrowth::Double, OnFailure::Pause);
        let mut r = start(c, 1, 2, 0);
        let mut sizes = Vec::new();
        let mut now = 0;
        while r.state == RolloutState::Rolling {
            let before = r.released;
            r = step(&r, &seen(20, before, 0), now).unwrap();
            sizes.push(r.released - before);
            r = step(&r, &seen(20, r.released, 0), now).unwrap();
            now += 5000;
        }
        assert_eq!(sizes, vec![1, 2, 4, 8, 5]);
        let all = start(RolloutConfig::default(), 1, 2, 0);
        let r = step(&all, &seen(20, 0, 0), 0).unwrap();
        assert_eq!(r.threshold, u64::MAX);
        assert_eq!(
            step(&r, &seen(20, 20, 0), 0).unwrap().state,
            RolloutState::Done
        );
    }

    #[test]
    fn a_failure_pauses_or_rolls_back_and_stragglers_time_out() {
        let c = config(Some(1), BatchGrowth::Fixed, OnFailure::Pause);
        let r = step(&start(c.clone(), 2, 3, 0), &seen(3, 0, 0), 0).unwrap();
        let paused = step(&r, &seen(3, 0, 1), 10).unwrap();
        assert_eq!(paused.state, RolloutState::Paused);
        assert!(paused.reason.as_deref().unwrap().contains("1 of 1"));
        // The others stay on the old version.
        assert_eq!(
            (1..=3).filter(|&e| version_for(&paused, 7, e) == 2).count(),
            2
        );
        assert_eq!(step(&paused, &seen(3, 0, 1), 20), None, "paused stays");
        // Resumed past that failure (as the API resumes: the failures so far tolerated), it
        // goes on, and a new failure pauses it again.
        let mut resumed = paused.clone();
        resumed.state = RolloutState::Rolling;
        resumed.tolerated_failures = 1;
        let on = step(&resumed, &seen(3, 0, 1), 30).unwrap();
        assert_eq!(on.state, RolloutState::Rolling);
        assert!(on.next_batch_ms.is_some(), "the batch counts as settled");
        let on = step(&on, &seen(3, 0, 1), on.next_batch_ms.unwrap()).unwrap();
        assert_eq!(
            step(&on, &seen(3, 0, 2), 40).unwrap().state,
            RolloutState::Paused
        );

        let back = config(Some(1), BatchGrowth::Fixed, OnFailure::Rollback);
        let r = step(&start(back, 2, 3, 0), &seen(3, 0, 0), 0).unwrap();
        let rb = step(&r, &seen(3, 0, 1), 10).unwrap();
        assert_eq!(rb.state, RolloutState::RollingBack);
        assert!((1..=3).all(|e| version_for(&rb, 7, e) == 2));
        assert_eq!(
            step(&rb, &seen(3, 3, 0), 20).unwrap().state,
            RolloutState::Done
        );

        // A share: one failure in four released is under 0.5.
        let mut share = config(Some(4), BatchGrowth::Fixed, OnFailure::Pause);
        share.failure_threshold = 0.5;
        let r = step(&start(share, 2, 3, 0), &seen(8, 0, 0), 0).unwrap();
        assert_eq!(
            step(&r, &seen(8, 3, 1), 10).unwrap().state,
            RolloutState::Rolling
        );

        // A batch whose devices are offline goes on after its timeout.
        let r = step(&start(c, 2, 3, 0), &seen(3, 0, 0), 0).unwrap();
        assert_eq!(step(&r, &seen(3, 0, 0), 59_999), None);
        let on = step(&r, &seen(3, 0, 0), 60_000).unwrap();
        assert_eq!(on.next_batch_ms, Some(65_000));
    }

    #[test]
    fn counts_of_the_rollouts_version_are_observed() {
        let counts = [
            StatusCount {
                status: DeployStatus::Running,
                version: 2,
                count: 4,
            },
            StatusCount {
                status: DeployStatus::Running,
                version: 1,
                count: 9,
            },
            StatusCount {
                status: DeployStatus::Error,
                version: 2,
                count: 1,
            },
        ];
        let o = Observed::new(vec![3, 1, 2], &counts, 2);
        assert_eq!((o.running, o.failed), (4, 1));
        assert_eq!(o.ranks, vec![1, 2, 3]);
        assert_eq!(settled_version(None, 4), 4);
    }
}
