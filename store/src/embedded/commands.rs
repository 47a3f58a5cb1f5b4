//! [`SnapshotStore`] and [`CommandStore`] on redb: the latest snapshot of each environment,
//! and its async commands keyed by (environment, command id).
//!
//! Command ids start at 1; id 0 of an environment holds its queue's counts (unfinished,
//! finished), kept in the same write transactions as the commands, so the cap and the
//! retention rule cost no scan. A new id comes from [`next_command_id`] with the last key of
//! the environment's range, which is never pruned (and a committed redb transaction is not
//! lost, so the clock is only a second line here). Pruning removes the oldest finished
//! commands: a walk from the oldest id that normally meets finished ones first (agents finish
//! in id order).

use std::ops::RangeInclusive;

use async_trait::async_trait;
use proto::async_mode::{Action, CommandResult};
use redb::{Durability, ReadableTable, WriteTransaction};

use super::records::{
    command_finished, decode_command, decode_command_counts, decode_snapshot, encode_command,
    encode_command_counts, encode_snapshot, snapshot_taken_ms, CommandCounts,
};
use super::{db_err, EmbeddedStore, COMMANDS, ENVIRONMENTS, SNAPSHOTS};
use crate::{
    next_command_id, CommandStore, EnvId, SnapshotPut, SnapshotStore, StoreError, StoredCommand,
    StoredSnapshot, KEEP_FINISHED_COMMANDS_PER_ENV, MAX_COMMAND_ID,
    MAX_UNFINISHED_COMMANDS_PER_ENV,
};

/// The command id under which an environment's [`CommandCounts`] are stored.
const COUNTS_ID: u64 = 0;

/// Whether environment `env` exists, read inside the write transaction that depends on it.
fn env_exists(tx: &WriteTransaction, env: EnvId) -> Result<bool, StoreError> {
    Ok(tx
        .open_table(ENVIRONMENTS)
        .map_err(db_err)?
        .get(env)
        .map_err(db_err)?
        .is_some())
}

/// The keys of `env`'s commands (not its counts).
fn env_commands(env: EnvId) -> RangeInclusive<(u64, u64)> {
    (env, COUNTS_ID + 1)..=(env, u64::MAX)
}

/// `env`'s queue counts. A queue written before counts were kept has none: they are counted
/// then (and stored by the next write).
fn load_counts<T>(table: &T, env: EnvId) -> Result<CommandCounts, StoreError>
where
    T: ReadableTable<(u64, u64), &'static [u8]>,
{
    if let Some(v) = table.get((env, COUNTS_ID)).map_err(db_err)? {
        return decode_command_counts(env, v.value());
    }
    let mut counts = CommandCounts::default();
    for entry in table.range(env_commands(env)).map_err(db_err)? {
        let (_, v) = entry.map_err(db_err)?;
        if command_finished(env, v.value())? {
            counts.finished += 1;
        } else {
            counts.unfinished += 1;
        }
    }
    Ok(counts)
}

#[async_trait]
impl SnapshotStore for EmbeddedStore {
    async fn put_snapshot(
        &self,
        env: EnvId,
        snap: &StoredSnapshot,
    ) -> Result<SnapshotPut, StoreError> {
        let bytes = encode_snapshot(snap);
        let taken_ms = snap.taken_ms;
        // Like heartbeats, snapshots are replaced by the next one soon: losing the last ones
        // to a power cut only shows an older snapshot for a while, so skip the fsync.
        self.write(Durability::Eventual, move |tx| {
            if !env_exists(tx, env)? {
                return Ok((SnapshotPut::NoEnvironment, false));
            }
            let mut table = tx.open_table(SNAPSHOTS).map_err(db_err)?;
            let stored_taken = table
                .get(env)
                .map_err(db_err)?
                .map(|v| snapshot_taken_ms(env, v.value()))
                .transpose()?;
            if stored_taken.is_some_and(|stored| stored > taken_ms) {
                return Ok((SnapshotPut::KeptNewer, false));
            }
            table.insert(env, bytes.as_slice()).map_err(db_err)?;
            Ok((SnapshotPut::Stored, true))
        })
        .await
    }

    async fn snapshot(&self, env: EnvId) -> Result<Option<StoredSnapshot>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(SNAPSHOTS).map_err(db_err)?;
            let value = table.get(env).map_err(db_err)?;
            value.map(|v| decode_snapshot(env, v.value())).transpose()
        })
        .await
    }
}

#[async_trait]
impl CommandStore for EmbeddedStore {
    async fn queue_command(
        &self,
        env: EnvId,
        action: &Action,
        now_ms: u64,
    ) -> Result<Option<StoredCommand>, StoreError> {
        let action = action.clone();
        // Immediate: a command the API acknowledged must survive a power cut.
        self.write(Durability::Immediate, move |tx| {
            if !env_exists(tx, env)? {
                return Ok((None, false));
            }
            let mut table = tx.open_table(COMMANDS).map_err(db_err)?;
            let mut counts = load_counts(&table, env)?;
            // Refusals return before anything is written (an error aborts the transaction).
            if counts.unfinished >= MAX_UNFINISHED_COMMANDS_PER_ENV {
                return Err(StoreError::Conflict(format!(
                    "environment {env} already holds {MAX_UNFINISHED_COMMANDS_PER_ENV} \
                     unfinished commands"
                )));
            }
            let newest = table
                .range(env_commands(env))
                .map_err(db_err)?
                .next_back()
                .transpose()
                .map_err(db_err)?
                .map_or(0, |(k, _)| k.value().1);
            let id = next_command_id(newest, now_ms).ok_or_else(|| {
                StoreError::Conflict(format!(
                    "environment {env}: command ids would pass {MAX_COMMAND_ID} \
                     (queue time {now_ms} ms)"
                ))
            })?;

            let mut excess = counts
                .finished
                .saturating_sub(KEEP_FINISHED_COMMANDS_PER_ENV);
            let mut prune = Vec::new();
            if excess > 0 {
                for entry in table.range(env_commands(env)).map_err(db_err)? {
                    let (k, v) = entry.map_err(db_err)?;
                    if command_finished(env, v.value())? {
                        prune.push(k.value().1);
                        excess -= 1;
                        if excess == 0 {
                            break;
                        }
                    }
                }
            }
            for old in prune {
                table.remove((env, old)).map_err(db_err)?;
                counts.finished -= 1;
            }

            let cmd = StoredCommand {
                id,
                action,
                created_ms: now_ms,
                sent_ms: None,
                finished_ms: None,
                error: None,
            };
            table
                .insert((env, cmd.id), encode_command(env, &cmd)?.as_slice())
                .map_err(db_err)?;
            counts.unfinished += 1;
            table
                .insert((env, COUNTS_ID), encode_command_counts(counts).as_slice())
                .map_err(db_err)?;
            Ok((Some(cmd), true))
        })
        .await
    }

    async fn list_commands(
        &self,
        env: EnvId,
        start: u64,
        limit: u64,
    ) -> Result<(Vec<StoredCommand>, u64), StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(COMMANDS).map_err(db_err)?;
            let counts = load_counts(&table, env)?;
            let mut out = Vec::new();
            let range = table.range(env_commands(env)).map_err(db_err)?;
            let start = usize::try_from(start).unwrap_or(usize::MAX);
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            for entry in range.rev().skip(start).take(limit) {
                let (_, v) = entry.map_err(db_err)?;
                out.push(decode_command(env, v.value())?);
            }
            Ok((out, counts.unfinished + counts.finished))
        })
        .await
    }

    async fn deliver_commands(
        &self,
        env: EnvId,
        after: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredCommand>, StoreError> {
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(COMMANDS).map_err(db_err)?;
            let mut out = Vec::new();
            // Past the agent's last finished id the commands are unfinished but for a rare
            // race, and at most the finished ones kept are skipped.
            for entry in table
                .range((env, after.saturating_add(1).max(COUNTS_ID + 1))..=(env, u64::MAX))
                .map_err(db_err)?
            {
                if out.len() >= limit {
                    break;
                }
                let (_, v) = entry.map_err(db_err)?;
                let cmd = decode_command(env, v.value())?;
                if cmd.finished_ms.is_none() {
                    out.push(cmd);
                }
            }
            let mut changed = false;
            for cmd in &mut out {
                if cmd.sent_ms.is_none() {
                    cmd.sent_ms = Some(now_ms);
                    table
                        .insert((env, cmd.id), encode_command(env, cmd)?.as_slice())
                        .map_err(db_err)?;
                    changed = true;
                }
            }
            Ok((out, changed))
        })
        .await
    }

    async fn finish_commands(
        &self,
        env: EnvId,
        results: &[CommandResult],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let results = results.to_vec();
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(COMMANDS).map_err(db_err)?;
            let mut finished = 0u64;
            for r in results.iter().filter(|r| r.id != COUNTS_ID) {
                let Some(mut cmd) = table
                    .get((env, r.id))
                    .map_err(db_err)?
                    .map(|v| decode_command(env, v.value()))
                    .transpose()?
                else {
                    continue;
                };
                if cmd.finish(r, now_ms) {
                    table
                        .insert((env, cmd.id), encode_command(env, &cmd)?.as_slice())
                        .map_err(db_err)?;
                    finished += 1;
                }
            }
            if finished == 0 {
                return Ok(((), false));
            }
            // Counted before the writes above when there were no counts yet: read them now.
            let counts = match table.get((env, COUNTS_ID)).map_err(db_err)? {
                Some(v) => {
                    let mut c = decode_command_counts(env, v.value())?;
                    c.unfinished = c.unfinished.saturating_sub(finished);
                    c.finished += finished;
                    c
                }
                None => load_counts(&table, env)?,
            };
            table
                .insert((env, COUNTS_ID), encode_command_counts(counts).as_slice())
                .map_err(db_err)?;
            Ok(((), true))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;
    use crate::{EdgeMode, EnvironmentStore, NewEnvironment};

    fn stop(container: &str) -> Action {
        Action::ContainerStop {
            container: container.to_owned(),
            timeout_secs: None,
        }
    }

    async fn open_with_env() -> (tempfile::TempDir, EmbeddedStore, EnvId) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let env = store
            .create_environments(vec![NewEnvironment {
                name: "counted".to_owned(),
                mode: EdgeMode::Async,
                checkin_interval: None,
                ping_interval: None,
                snapshot_interval: None,
                command_interval: None,
                group_id: None,
                tag_ids: Vec::new(),
                env_vars: Vec::new(),
                variables: Default::default(),
                allow_self_signed: false,
                join_secret: "secret".to_owned(),
                edge_id: None,
                created_at_ms: 0,
            }])
            .await
            .expect("create")
            .remove(0);
        (dir, store, env.id)
    }

    /// (stored counts, counts from a scan of the commands).
    async fn stored_and_recounted(
        store: &EmbeddedStore,
        env: EnvId,
    ) -> (Option<CommandCounts>, CommandCounts) {
        store
            .blocking(move |db| {
                let tx = db.begin_read().map_err(db_err)?;
                let table = tx.open_table(COMMANDS).map_err(db_err)?;
                let stored = table
                    .get((env, COUNTS_ID))
                    .map_err(db_err)?
                    .map(|v| decode_command_counts(env, v.value()))
                    .transpose()?;
                let mut recounted = CommandCounts::default();
                for entry in table.range(env_commands(env)).map_err(db_err)? {
                    let (_, v) = entry.map_err(db_err)?;
                    let cmd = decode_command(env, v.value())?;
                    if cmd.finished_ms.is_some() {
                        recounted.finished += 1;
                    } else {
                        recounted.unfinished += 1;
                    }
                }
                Ok((stored, recounted))
            })
            .await
            .expect("read counts")
    }

    #[tokio::test]
    async fn counts_follow_queueing_finishing_and_pruning() {
        let (_dir, store, env) = open_with_env().await;
        let mut ids = Vec::new();
        // Finish in bursts, out of order, with repeats and unknown ids, across the bound.
        for round in 0..6u64 {
            for i in 0..40 {
                let cmd = store
                    .queue_command(env, &stop("c"), 1_000 + round * 100 + i)
                    .await
                    .expect("queue")
                    .expect("exists");
                ids.push(cmd.id);
            }
            let results: Vec<_> = ids
                .iter()
                .rev()
                .step_by(2)
                .chain(ids.iter().take(7))
                .map(|&id| CommandResult { id, error: None })
                .chain([CommandResult { id: 0, error: None }])
                .chain([CommandResult { id: 3, error: None }])
                .collect();
            store
                .finish_commands(env, &results, 9_000)
                .await
                .expect("finish");
            store
                .deliver_commands(env, 0, 10, 9_000)
                .await
                .expect("deliver");
            let (stored, recounted) = stored_and_recounted(&store, env).await;
            assert_eq!(stored, Some(recounted), "round {round}");
            let (_, total) = store.list_commands(env, 0, 1).await.expect("list");
            assert_eq!(total, recounted.unfinished + recounted.finished);
        }
        let (_, counts) = stored_and_recounted(&store, env).await;
        assert!(counts.finished <= KEEP_FINISHED_COMMANDS_PER_ENV + 120);
        assert!(counts.unfinished > 0);
    }

    #[tokio::test]
    async fn a_queue_without_counts_is_counted() {
        // As written before counts were kept.
        let (_dir, store, env) = open_with_env().await;
        let mut ids = Vec::new();
        for i in 0..KEEP_FINISHED_COMMANDS_PER_ENV + 3 {
            let cmd = store
                .queue_command(env, &stop("c"), 1_000 + i)
                .await
                .expect("queue")
                .expect("exists");
            ids.push(cmd.id);
        }
        let results: Vec<_> = ids[1..]
            .iter()
            .map(|&id| CommandResult { id, error: None })
            .collect();
        store
            .finish_commands(env, &results, 9_000)
            .await
            .expect("finish");
        store
            .write(Durability::Immediate, move |tx| {
                let mut table = tx.open_table(COMMANDS).map_err(db_err)?;
                table.remove((env, COUNTS_ID)).map_err(db_err)?;
                Ok(((), true))
            })
            .await
            .expect("drop counts");
        assert_eq!(stored_and_recounted(&store, env).await.0, None);

        let (_, total) = store.list_commands(env, 0, 1).await.expect("list");
        assert_eq!(total, KEEP_FINISHED_COMMANDS_PER_ENV + 3);
        // Queueing counts, prunes the 2 oldest finished beyond the bound, and stores counts.
        store
            .queue_command(env, &stop("next"), 5_000)
            .await
            .expect("queue")
            .expect("exists");
        let (stored, recounted) = stored_and_recounted(&store, env).await;
        assert_eq!(stored, Some(recounted));
        assert_eq!(
            recounted,
            CommandCounts {
                unfinished: 2,
                finished: KEEP_FINISHED_COMMANDS_PER_ENV
            }
        );
        let (page, _) = store.list_commands(env, 0, 1_000).await.expect("list");
        assert!(page.iter().any(|c| c.id == ids[0]), "unfinished kept");
        assert!(!page.iter().any(|c| c.id == ids[1] || c.id == ids[2]));
    }
}
