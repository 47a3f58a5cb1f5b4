//! [`SnapshotStore`] and [`CommandStore`] on Redis: one hash per snapshot, three hashes per
//! environment's commands (as queued, first-sent times, first results: each HSETNX-once).

use async_trait::async_trait;
use deadpool_redis::redis;
use proto::async_mode::{Action, CommandResult};
use serde::{Deserialize, Serialize};

use super::{decode_u64, redis_err, RedisStore};
use crate::{
    CommandStore, EnvId, SnapshotStore, StoreError, StoredCommand, StoredSnapshot,
    MAX_COMMANDS_PER_ENV,
};

/// How many commands an environment has (ids are 1..=count).
async fn command_count(
    conn: &mut deadpool_redis::Connection,
    commands: &str,
) -> Result<u64, StoreError> {
    redis::cmd("HLEN")
        .arg(commands)
        .query_async(conn)
        .await
        .map_err(redis_err)
}

/// A command's result as stored in `commands:{id}:done`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommandDone {
    finished_ms: u64,
    error: Option<String>,
}

impl RedisStore {
    /// The commands `ids` of `env`, with their sent times and results, in the order of `ids`
    /// (ids that do not exist are left out).
    async fn read_commands(
        &self,
        conn: &mut deadpool_redis::Connection,
        env: EnvId,
        ids: &[u64],
    ) -> Result<Vec<StoredCommand>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (sent, done, commands) = self.keys.commands(env);
        type Fields = Vec<Option<String>>;
        let (records, sent_ms, results): (Fields, Vec<Option<u64>>, Fields) = redis::pipe()
            .cmd("HMGET")
            .arg(&commands)
            .arg(ids)
            .cmd("HMGET")
            .arg(&sent)
            .arg(ids)
            .cmd("HMGET")
            .arg(&done)
            .arg(ids)
            .query_async(conn)
            .await
            .map_err(redis_err)?;
        let mut out = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let Some(json) = records.get(i).cloned().flatten() else {
                continue;
            };
            let mut cmd: StoredCommand = serde_json::from_str(&json)
                .map_err(|e| StoreError::corrupt_by(format!("{commands} {id}"), e))?;
            cmd.id = id;
            cmd.sent_ms = sent_ms.get(i).copied().flatten();
            if let Some(json) = results.get(i).cloned().flatten() {
                let d: CommandDone = serde_json::from_str(&json)
                    .map_err(|e| StoreError::corrupt_by(format!("{done} {id}"), e))?;
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
    async fn put_snapshot(&self, env: EnvId, snap: &StoredSnapshot) -> Result<bool, StoreError> {
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
        Ok(stored == 1)
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
        let (_, _, commands) = self.keys.commands(env);
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
            .key(&commands)
            .arg(env)
            .arg(json)
            .arg(MAX_COMMANDS_PER_ENV)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match id {
            0 => Ok(None),
            -1 => Err(StoreError::Conflict(format!(
                "environment {env} already holds {MAX_COMMANDS_PER_ENV} commands"
            ))),
            id => {
                cmd.id = id as u64;
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
        let (_, _, commands) = self.keys.commands(env);
        let mut conn = self.conn().await?;
        let total = command_count(&mut conn, &commands).await?;
        let newest = total.saturating_sub(start);
        let ids: Vec<u64> = (1..=newest).rev().take(limit as usize).collect();
        let out = self.read_commands(&mut conn, env, &ids).await?;
        Ok((out, total))
    }

    async fn deliver_commands(
        &self,
        env: EnvId,
        after: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredCommand>, StoreError> {
        let (sent, _, commands) = self.keys.commands(env);
        let mut conn = self.conn().await?;
        let total = command_count(&mut conn, &commands).await?;
        // Commands after the agent's last finished one are unfinished but for a rare race
        // with a result still in flight: reading `limit` of them is enough.
        let ids: Vec<u64> = (after.saturating_add(1)..=total).take(limit).collect();
        let mut out = self.read_commands(&mut conn, env, &ids).await?;
        out.retain(|c| c.finished_ms.is_none());
        let unsent: Vec<u64> = out
            .iter()
            .filter(|c| c.sent_ms.is_none())
            .map(|c| c.id)
            .collect();
        if !unsent.is_empty() {
            let mut pipe = redis::pipe();
            for id in &unsent {
                pipe.cmd("HSETNX").arg(&sent).arg(id).arg(now_ms).ignore();
            }
            let () = pipe.query_async(&mut conn).await.map_err(redis_err)?;
            for c in &mut out {
                c.sent_ms.get_or_insert(now_ms);
            }
        }
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
        let (_, done, commands) = self.keys.commands(env);
        let mut conn = self.conn().await?;
        let total = command_count(&mut conn, &commands).await?;
        let mut pipe = redis::pipe();
        for r in results.iter().filter(|r| (1..=total).contains(&r.id)) {
            let json = serde_json::to_string(&CommandDone {
                finished_ms: now_ms,
                error: r.error.clone(),
            })
            .map_err(|e| StoreError::corrupt_by("command result", e))?;
            pipe.cmd("HSETNX").arg(&done).arg(r.id).arg(json).ignore();
        }
        let () = pipe.query_async(&mut conn).await.map_err(redis_err)?;
        Ok(())
    }
}
