//! [`SnapshotStore`] and [`CommandStore`] on Redis: one hash per snapshot; per environment's
//! commands a hash (each command as queued, its first-sent time and its first result, each
//! written once), a sorted set of the ids kept and one of the finished ids (scored by id, for
//! order, paging, counts and pruning).

use async_trait::async_trait;
use deadpool_redis::redis;
use proto::async_mode::{Action, CommandResult};
use serde::{Deserialize, Serialize};

use super::{decode_u64, redis_err, RedisStore};
use crate::{
    CommandStore, EnvId, SnapshotPut, SnapshotStore, StoreError, StoredCommand, StoredSnapshot,
    KEEP_FINISHED_COMMANDS_PER_ENV, MAX_COMMAND_ID, MAX_UNFINISHED_COMMANDS_PER_ENV,
};

/// A command's result as stored in the field `{id}:done`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommandDone {
    finished_ms: u64,
    error: Option<String>,
}

impl RedisStore {
    /// The commands `ids` of `env`, with their sent times and results, in the order of `ids`
    /// (ids that are not kept are left out).
    async fn read_commands(
        &self,
        conn: &mut deadpool_redis::Connection,
        env: EnvId,
        ids: &[u64],
    ) -> Result<Vec<StoredCommand>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (_, _, commands) = self.keys.commands(env);
        let mut hmget = redis::cmd("HMGET");
        hmget.arg(&commands);
        for id in ids {
            hmget
                .arg(id)
                .arg(format!("{id}:sent"))
                .arg(format!("{id}:done"));
        }
        let fields: Vec<Option<String>> = hmget.query_async(conn).await.map_err(redis_err)?;
        if fields.len() != ids.len() * 3 {
            return Err(StoreError::corrupt(format!(
                "{commands}: HMGET answered {} fields for {}",
                fields.len(),
                ids.len() * 3
            )));
        }
        let mut out = Vec::with_capacity(ids.len());
        for (&id, f) in ids.iter().zip(fields.chunks_exact(3)) {
            let [json, sent, done] = f else {
                continue;
            };
            let Some(json) = json else {
                continue;
            };
            let mut cmd: StoredCommand = serde_json::from_str(json)
                .map_err(|e| StoreError::corrupt_by(format!("{commands} {id}"), e))?;
            // The id is the field; the one inside the JSON is not read back.
            cmd.id = id;
            cmd.sent_ms = sent
                .as_deref()
                .map(|s| decode_u64(&format!("{commands} {id}:sent"), s.as_bytes()))
                .transpose()?;
            if let Some(json) = done {
                let d: CommandDone = serde_json::from_str(json)
                    .map_err(|e| StoreError::corrupt_by(format!("{commands} {id}:done"), e))?;
                cmd.finished_ms = Some(d.finished_ms);
                cmd.error = d.error;
            }
            out.push(cmd);
        }
        Ok(out)
    }
}

#[async_trait]
impl SnapshotStore for RedisStore {
    async fn put_snapshot(
        &self,
        env: EnvId,
        snap: &StoredSnapshot,
    ) -> Result<SnapshotPut, StoreError> {
        let mut conn = self.conn().await?;
        let stored: i64 = self
            .scripts
            .put_snapshot
            .key(&self.keys.env)
            .key(self.keys.snapshot(env))
            .arg(env)
            .arg(snap.taken_ms)
            .arg(snap.received_ms)
            .arg(snap.body.as_slice())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match stored {
            2 => Ok(SnapshotPut::Stored),
            1 => Ok(SnapshotPut::KeptNewer),
            0 => Ok(SnapshotPut::NoEnvironment),
            other => Err(StoreError::corrupt(format!(
                "put_snapshot.lua answered {other}"
            ))),
        }
    }

    async fn snapshot(&self, env: EnvId) -> Result<Option<StoredSnapshot>, StoreError> {
        let key = self.keys.snapshot(env);
        let mut conn = self.conn().await?;
        let fields: (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(&key)
            .arg(&["taken_ms", "received_ms", "body"])
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match fields {
            (None, None, None) => Ok(None),
            (Some(taken), Some(received), Some(body)) => Ok(Some(StoredSnapshot {
                taken_ms: decode_u64(&key, &taken)?,
                received_ms: decode_u64(&key, &received)?,
                body,
            })),
            _ => Err(StoreError::corrupt(format!("{key}: fields missing"))),
        }
    }
}

#[async_trait]
impl CommandStore for RedisStore {
    async fn queue_command(
        &self,
        env: EnvId,
        action: &Action,
        now_ms: u64,
    ) -> Result<Option<StoredCommand>, StoreError> {
        let (ids, finished, commands) = self.keys.commands(env);
        let mut cmd = StoredCommand {
            id: 0,
            action: action.clone(),
            created_ms: now_ms,
            sent_ms: None,
            finished_ms: None,
            error: None,
        };
        // The id is the hash field; the one inside the JSON is not read back.
        let json = serde_json::to_string(&cmd).map_err(|e| StoreError::corrupt_by("command", e))?;
        let mut conn = self.conn().await?;
        let id: i64 = self
            .scripts
            .queue_command
            .key(&self.keys.env)
            .key(&ids)
            .key(&finished)
            .key(&commands)
            .arg(env)
            .arg(json)
            .arg(now_ms)
            .arg(MAX_UNFINISHED_COMMANDS_PER_ENV)
            .arg(KEEP_FINISHED_COMMANDS_PER_ENV)
            .arg(MAX_COMMAND_ID)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match id {
            0 => Ok(None),
            -1 => Err(StoreError::Conflict(format!(
                "environment {env} already holds {MAX_UNFINISHED_COMMANDS_PER_ENV} unfinished \
                 commands"
            ))),
            -2 => Err(StoreError::Conflict(format!(
                "environment {env}: command ids would pass {MAX_COMMAND_ID} (queue time \
                 {now_ms} ms)"
            ))),
            id => {
                cmd.id = u64::try_from(id)
                    .map_err(|_| StoreError::corrupt(format!("{commands}: queued with id {id}")))?;
                Ok(Some(cmd))
            }
        }
    }

    async fn list_commands(
        &self,
        env: EnvId,
        start: u64,
        limit: u64,
    ) -> Result<(Vec<StoredCommand>, u64), StoreError> {
        let (ids, _, _) = self.keys.commands(env);
        let mut conn = self.conn().await?;
        if limit == 0 {
            let total: u64 = redis::cmd("ZCARD")
                .arg(&ids)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            return Ok((Vec::new(), total));
        }
        // Ranks, newest first; the count and the page from one point in time.
        let first = i64::try_from(start).unwrap_or(i64::MAX);
        let last = i64::try_from(start.saturating_add(limit - 1)).unwrap_or(i64::MAX);
        let (total, page): (u64, Vec<u64>) = redis::pipe()
            .atomic()
            .cmd("ZCARD")
            .arg(&ids)
            .cmd("ZREVRANGE")
            .arg(&ids)
            .arg(first)
            .arg(last)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let out = self.read_commands(&mut conn, env, &page).await?;
        Ok((out, total))
    }

    async fn deliver_commands(
        &self,
        env: EnvId,
        after: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredCommand>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (ids, finished, commands) = self.keys.commands(env);
        let mut conn = self.conn().await?;
        let picked: Vec<u64> = self
            .scripts
            .deliver_commands
            .key(&ids)
            .key(&finished)
            .key(&commands)
            .arg(after)
            .arg(limit)
            .arg(now_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        // One finished (or even pruned) since the script ran is left out.
        let mut out = self.read_commands(&mut conn, env, &picked).await?;
        out.retain(|c| c.finished_ms.is_none());
        Ok(out)
    }

    async fn finish_commands(
        &self,
        env: EnvId,
        results: &[CommandResult],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if results.is_empty() {
            return Ok(());
        }
        let (_, finished, commands) = self.keys.commands(env);
        let mut script = self.scripts.finish_commands.key(&commands);
        script.key(&finished);
        for r in results {
            let json = serde_json::to_string(&CommandDone {
                finished_ms: now_ms,
                error: r.error.clone(),
            })
            .map_err(|e| StoreError::corrupt_by("command result", e))?;
            script.arg(r.id).arg(json);
        }
        let mut conn = self.conn().await?;
        let _recorded: i64 = script.invoke_async(&mut conn).await.map_err(redis_err)?;
        Ok(())
    }
}
