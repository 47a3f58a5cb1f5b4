//! [`EnvironmentStore`] on Redis: records, bindings (a hash of their own, so a bind is one
//! HSETNX) and heartbeats.

use std::collections::HashMap;

use async_trait::async_trait;
use deadpool_redis::redis::{self, Value};
use uuid::Uuid;

use super::record::{decode_edge_id, EnvRecord};
use super::{parse_id, redis_err, unexpected, RedisStore, HEARTBEAT_CHUNK, RESET_RETRIES};
use crate::{BindOutcome, EnvId, Environment, EnvironmentStore, NewEnvironment, StoreError};

/// A heartbeat's score as the milliseconds it holds (whole, not negative, below 2^53).
fn heartbeat_ms(id: EnvId, score: f64) -> Result<u64, StoreError> {
    const MAX: f64 = crate::MAX_HEARTBEAT_MS as f64;
    if (0.0..=MAX).contains(&score) && score.fract() == 0.0 {
        Ok(score as u64)
    } else {
        Err(StoreError::corrupt(format!(
            "heartbeat of environment {id}: {score}"
        )))
    }
}

#[async_trait]
impl EnvironmentStore for RedisStore {
    async fn create_environments(
        &self,
        new: Vec<NewEnvironment>,
    ) -> Result<Vec<Environment>, StoreError> {
        if new.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let n = new.len() as u64;
        let last: u64 = redis::cmd("INCRBY")
            .arg(&self.keys.env_seq)
            .arg(n)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        // INCRBY hands out a block of ids no other replica can get, even if the writes below
        // fail (the ids are then skipped, never reused).
        let first = last
            .checked_sub(n - 1)
            .filter(|first| *first > 0)
            .ok_or_else(|| {
                StoreError::corrupt(format!(
                    "{}: counter {last} below batch size {n}",
                    self.keys.env_seq
                ))
            })?;

        let created: Vec<Environment> = (first..)
            .zip(new)
            .map(|(id, n)| n.into_environment(id))
            .collect();
        let mut records = Vec::with_capacity(created.len());
        let mut bindings = Vec::new();
        for env in &created {
            records.push((env.id, EnvRecord::from_env(env).encode()?));
            if let Some(edge_id) = env.edge_id {
                bindings.push((env.id, edge_id.to_string()));
            }
        }
        // MULTI/EXEC so that no reader sees a pre-assigned environment without its binding.
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(&self.keys.env)
            .arg(&records)
            .ignore();
        if !bindings.is_empty() {
            pipe.cmd("HSET")
                .arg(&self.keys.binding)
                .arg(&bindings)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.map_err(redis_err)?;
        Ok(created)
    }

    async fn get_environment(&self, id: EnvId) -> Result<Option<Environment>, StoreError> {
        let mut conn = self.conn().await?;
        let (record, binding): (Option<String>, Option<String>) = redis::pipe()
            .atomic()
            .cmd("HGET")
            .arg(&self.keys.env)
            .arg(id)
            .cmd("HGET")
            .arg(&self.keys.binding)
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let Some(record) = record else {
            return Ok(None);
        };
        let edge_id = binding.map(|b| decode_edge_id(id, &b)).transpose()?;
        Ok(Some(EnvRecord::decode(id, &record)?.into_env(id, edge_id)))
    }

    async fn get_environments(
        &self,
        ids: &[EnvId],
    ) -> Result<Vec<Option<Environment>>, StoreError> {
        if ids.is_empty() {
            // HMGET needs at least one field.
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let (records, bindings): (Vec<Option<String>>, Vec<Option<String>>) = redis::pipe()
            .atomic()
            .cmd("HMGET")
            .arg(&self.keys.env)
            .arg(ids)
            .cmd("HMGET")
            .arg(&self.keys.binding)
            .arg(ids)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if records.len() != ids.len() || bindings.len() != ids.len() {
            return Err(StoreError::corrupt(format!(
                "HMGET returned {} records and {} bindings for {} ids",
                records.len(),
                bindings.len(),
                ids.len()
            )));
        }
        ids.iter()
            .zip(records.into_iter().zip(bindings))
            .map(|(&id, (record, binding))| {
                let Some(record) = record else {
                    return Ok(None);
                };
                let edge_id = binding.map(|b| decode_edge_id(id, &b)).transpose()?;
                Ok(Some(EnvRecord::decode(id, &record)?.into_env(id, edge_id)))
            })
            .collect()
    }

    async fn list_environments(&self) -> Result<Vec<Environment>, StoreError> {
        let mut conn = self.conn().await?;
        let (records, bindings): (HashMap<String, String>, HashMap<String, String>) = redis::pipe()
            .atomic()
            .cmd("HGETALL")
            .arg(&self.keys.env)
            .cmd("HGETALL")
            .arg(&self.keys.binding)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let mut out = Vec::with_capacity(records.len());
        for (field, record) in &records {
            let id = parse_id(&self.keys.env, field)?;
            let edge_id = bindings
                .get(field)
                .map(|b| decode_edge_id(id, b))
                .transpose()?;
            out.push(EnvRecord::decode(id, record)?.into_env(id, edge_id));
        }
        out.sort_unstable_by_key(|env| env.id);
        Ok(out)
    }

    async fn update_environment(&self, env: &Environment) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        // `created_at_ms` is kept from the stored record. It never changes after creation (and
        // ids are never reused), so reading it outside the script cannot race. The join secret
        // can change under us (`reset_association`), so the script keeps the stored one itself,
        // atomically with the write; it also guards against a concurrent delete.
        let current: Option<String> = redis::cmd("HGET")
            .arg(&self.keys.env)
            .arg(env.id)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let Some(current) = current else {
            return Ok(false);
        };
        let mut record = EnvRecord::from_env(env);
        record.created_at_ms = EnvRecord::decode(env.id, &current)?.created_at_ms;
        let outcome: i64 = self
            .scripts
            .update
            .key(&self.keys.env)
            .arg(env.id)
            .arg(record.encode_without_secret()?)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match outcome {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(StoreError::corrupt(format!(
                "environment {}: stored record has no readable join secret",
                env.id
            ))),
        }
    }

    async fn delete_environment(&self, id: EnvId) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let (ids, finished, commands) = self.keys.commands(id);
        // One script: `put_snapshot.lua`, `queue_command.lua` and `put_edge_group.lua` check
        // that the environment exists, so a snapshot, command or membership stored
        // concurrently is either deleted here or refused.
        let removed: i64 = self
            .scripts
            .delete_env
            .key(&self.keys.env)
            .key(&self.keys.binding)
            .key(&self.keys.heartbeats)
            .key(self.keys.snapshot(id))
            .key(commands)
            .key(ids)
            .key(finished)
            .key(self.keys.env_edge_groups(id))
            .key(self.keys.env_stacks(id))
            .arg(id)
            .arg(&self.keys.edge_group_members)
            .arg(&self.keys.stack_status)
            .arg(&self.keys.stack_counts)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(removed == 1)
    }

    async fn bind_edge_id(
        &self,
        id: EnvId,
        edge_id: Uuid,
        join_secret: &str,
    ) -> Result<BindOutcome, StoreError> {
        let mut conn = self.conn().await?;
        let reply: Value = self
            .scripts
            .bind
            .key(&self.keys.env)
            .key(&self.keys.binding)
            .arg(id)
            .arg(edge_id.to_string())
            .arg(join_secret)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match reply {
            Value::Int(0) => Ok(BindOutcome::NotFound),
            Value::Int(1) => Ok(BindOutcome::Bound),
            Value::Int(2) => Ok(BindOutcome::SecretChanged),
            Value::Int(-1) => Err(StoreError::corrupt(format!(
                "environment {id}: stored record has no readable join secret"
            ))),
            Value::BulkString(ref bytes) => {
                let text = std::str::from_utf8(bytes).map_err(|_| unexpected("bind", &reply))?;
                let bound = decode_edge_id(id, text)?;
                Ok(if bound == edge_id {
                    BindOutcome::AlreadyBound
                } else {
                    BindOutcome::BoundToOther(bound)
                })
            }
            other => Err(unexpected("bind", &other)),
        }
    }

    async fn reset_association(
        &self,
        id: EnvId,
        new_secret: String,
    ) -> Result<Option<Environment>, StoreError> {
        let mut conn = self.conn().await?;
        // Read, modify, compare-and-set: Lua has no exact JSON for u64s, so the record is
        // rewritten here and the script only checks nobody rewrote it in between.
        for _ in 0..RESET_RETRIES {
            let current: Option<String> = redis::cmd("HGET")
                .arg(&self.keys.env)
                .arg(id)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            let Some(current) = current else {
                return Ok(None);
            };
            let mut record = EnvRecord::decode(id, &current)?;
            record.join_secret.clone_from(&new_secret);
            let outcome: i64 = self
                .scripts
                .reset
                .key(&self.keys.env)
                .key(&self.keys.binding)
                .arg(id)
                .arg(&current)
                .arg(record.encode()?)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_err)?;
            match outcome {
                1 => return Ok(Some(record.into_env(id, None))),
                0 => return Ok(None),
                _ => tracing::debug!(env_id = id, "environment changed during reset, retrying"),
            }
        }
        Err(StoreError::unavailable(format!(
            "environment {id} kept changing during reset, gave up after {RESET_RETRIES} attempts"
        )))
    }

    async fn record_heartbeats(&self, beats: &[(EnvId, u64)]) -> Result<(), StoreError> {
        if beats.is_empty() {
            return Ok(());
        }
        let beats: Vec<(EnvId, u64)> = beats
            .iter()
            .copied()
            .filter(|(_, at)| *at <= crate::MAX_HEARTBEAT_MS)
            .collect();
        let mut conn = self.conn().await?;
        for chunk in beats.chunks(HEARTBEAT_CHUNK) {
            let mut call = self.scripts.heartbeats.prepare_invoke();
            call.key(&self.keys.env).key(&self.keys.heartbeats);
            for (id, at) in chunk {
                call.arg(id).arg(at);
            }
            call.invoke_async::<i64>(&mut conn)
                .await
                .map_err(redis_err)?;
        }
        Ok(())
    }

    async fn heartbeats(&self, ids: &[EnvId]) -> Result<Vec<Option<u64>>, StoreError> {
        if ids.is_empty() {
            // ZMSCORE needs at least one member.
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let values: Vec<Option<f64>> = redis::cmd("ZMSCORE")
            .arg(&self.keys.heartbeats)
            .arg(ids)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if values.len() != ids.len() {
            return Err(StoreError::corrupt(format!(
                "ZMSCORE returned {} values for {} members",
                values.len(),
                ids.len()
            )));
        }
        ids.iter()
            .zip(values)
            .map(|(id, v)| v.map(|v| heartbeat_ms(*id, v)).transpose())
            .collect()
    }

    async fn count_heartbeats_since(&self, since_ms: u64) -> Result<u64, StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("ZCOUNT")
            .arg(&self.keys.heartbeats)
            .arg(since_ms)
            .arg("+inf")
            .query_async(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn heartbeats_since(&self, since_ms: u64) -> Result<Vec<(EnvId, u64)>, StoreError> {
        let mut conn = self.conn().await?;
        let values: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(&self.keys.heartbeats)
            .arg(since_ms)
            .arg("+inf")
            .arg("BYSCORE")
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        values
            .into_iter()
            .map(|(id, at)| {
                let id = parse_id(&self.keys.heartbeats, &id)?;
                Ok((id, heartbeat_ms(id, at)?))
            })
            .collect()
    }
}
