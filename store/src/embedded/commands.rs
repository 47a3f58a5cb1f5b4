//! [`SnapshotStore`] and [`CommandStore`] on redb: the latest snapshot of each environment,
//! and its async commands keyed by (environment, command id).

use async_trait::async_trait;
use proto::async_mode::{Action, CommandResult};
use redb::{Durability, ReadableTable, WriteTransaction};

use super::records::{
    decode_command, decode_snapshot, encode_command, encode_snapshot, snapshot_taken_ms,
};
use super::{db_err, EmbeddedStore, COMMANDS, ENVIRONMENTS, SNAPSHOTS};
use crate::{
    CommandStore, EnvId, SnapshotStore, StoreError, StoredCommand, StoredSnapshot,
    MAX_COMMANDS_PER_ENV,
};

/// Whether environment `env` exists, read inside the write transaction that depends on it.
fn env_exists(tx: &WriteTransaction, env: EnvId) -> Result<bool, StoreError> {
    Ok(tx
        .open_table(ENVIRONMENTS)
        .map_err(db_err)?
        .get(env)
        .map_err(db_err)?
        .is_some())
}

/// The first and last command ids of `env` (ids are contiguous: commands are only removed
/// with their environment).
fn command_bounds<T>(table: &T, env: EnvId) -> Result<Option<(u64, u64)>, StoreError>
where
    T: ReadableTable<(u64, u64), &'static [u8]>,
{
    let mut range = table.range((env, 0)..=(env, u64::MAX)).map_err(db_err)?;
    let first = range.next().transpose().map_err(db_err)?;
    let last = range.next_back().transpose().map_err(db_err)?;
    Ok(match (first, last) {
        (Some(f), Some(l)) => Some((f.0.value().1, l.0.value().1)),
        (Some(f), None) => Some((f.0.value().1, f.0.value().1)),
        _ => None,
    })
}

#[async_trait]
impl SnapshotStore for EmbeddedStore {
    async fn put_snapshot(&self, env: EnvId, snap: &StoredSnapshot) -> Result<bool, StoreError> {
        let bytes = encode_snapshot(snap);
        let taken_ms = snap.taken_ms;
        // Like heartbeats, snapshots are replaced by the next one soon: losing the last ones
        // to a power cut only shows an older snapshot for a while, so skip the fsync.
        self.write(Durability::Eventual, move |tx| {
            if !env_exists(tx, env)? {
                return Ok((false, false));
            }
            let mut table = tx.open_table(SNAPSHOTS).map_err(db_err)?;
            let stored_taken = table
                .get(env)
                .map_err(db_err)?
                .map(|v| snapshot_taken_ms(env, v.value()))
                .transpose()?;
            if stored_taken.is_some_and(|stored| stored > taken_ms) {
                return Ok((true, false));
            }
            table.insert(env, bytes.as_slice()).map_err(db_err)?;
            Ok((true, true))
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
            let bounds = command_bounds(&table, env)?;
            if bounds.is_some_and(|(first, last)| last - first + 1 >= MAX_COMMANDS_PER_ENV) {
                return Err(StoreError::Conflict(format!(
                    "environment {env} already holds {MAX_COMMANDS_PER_ENV} commands"
                )));
            }
            let cmd = StoredCommand {
                id: bounds.map_or(1, |(_, last)| last + 1),
                action,
                created_ms: now_ms,
                sent_ms: None,
                finished_ms: None,
                error: None,
            };
            table
                .insert((env, cmd.id), encode_command(env, &cmd)?.as_slice())
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
            let total = command_bounds(&table, env)?.map_or(0, |(first, last)| last - first + 1);
            let mut out = Vec::new();
            let range = table.range((env, 0)..=(env, u64::MAX)).map_err(db_err)?;
            for entry in range.rev().skip(start as usize).take(limit as usize) {
                let (_, v) = entry.map_err(db_err)?;
                out.push(decode_command(env, v.value())?);
            }
            Ok((out, total))
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
            for entry in table
                .range((env, after.saturating_add(1))..=(env, u64::MAX))
                .map_err(db_err)?
            {
                let (_, v) = entry.map_err(db_err)?;
                let cmd = decode_command(env, v.value())?;
                if cmd.finished_ms.is_none() {
                    out.push(cmd);
                    if out.len() >= limit {
                        break;
                    }
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
            let mut changed = false;
            for r in &results {
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
                    changed = true;
                }
            }
            Ok(((), changed))
        })
        .await
    }
}
