//! [`StackStatusStore`] on Redis: a hash of statuses per stack, sorted sets of its
//! environments (all, and by status) for paging, counts per status and version, all kept
//! by scripts (`lua/record_stack_statuses.lua`, `forget_stack_statuses.lua`).

use std::collections::HashMap;

use async_trait::async_trait;
use deadpool_redis::redis;

use super::{redis_err, RedisStore};
use crate::{DeployStatus, EnvId, StackStatus, StackStatusStore, StatusCount, StoreError};

/// A stored status: `code|version|updated_ms|json`.
fn decode(stack: u64, stored: &str) -> Result<StackStatus, StoreError> {
    let json = stored.splitn(4, '|').nth(3).ok_or_else(|| {
        StoreError::corrupt(format!("a status of edge stack {stack} has no record"))
    })?;
    serde_json::from_str(json)
        .map_err(|e| StoreError::corrupt_by(format!("a status of edge stack {stack}"), e))
}

#[async_trait]
impl StackStatusStore for RedisStore {
    async fn record_stack_statuses(
        &self,
        stack: u64,
        statuses: &[StackStatus],
    ) -> Result<(), StoreError> {
        if statuses.is_empty() {
            return Ok(());
        }
        let mut call = self.scripts.record_stack_statuses.prepare_invoke();
        call.key(&self.keys.env)
            .key(&self.keys.edge_stacks)
            .arg(stack)
            .arg(self.keys.stack_status(stack))
            .arg(self.keys.stack_counts(stack))
            .arg(&self.keys.env_stacks);
        for s in statuses {
            let json =
                serde_json::to_string(s).map_err(|e| StoreError::corrupt_by("stack status", e))?;
            call.arg(s.env)
                .arg(s.status.code())
                .arg(s.version)
                .arg(s.updated_ms)
                .arg(json);
        }
        let mut conn = self.conn().await?;
        let _recorded: i64 = call.invoke_async(&mut conn).await.map_err(redis_err)?;
        Ok(())
    }

    async fn stack_status_counts(&self, stack: u64) -> Result<Vec<StatusCount>, StoreError> {
        let mut conn = self.conn().await?;
        let all: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(self.keys.stack_counts(stack))
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let mut out = all
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(key, count)| {
                let parsed = key.split_once(':').and_then(|(c, v)| {
                    let status = DeployStatus::from_code(c.parse().ok()?)?;
                    Some((status, v.parse().ok()?))
                });
                let (status, version) = parsed.ok_or_else(|| {
                    StoreError::corrupt(format!("edge stack {stack}: count key {key:?}"))
                })?;
                Ok(StatusCount {
                    status,
                    version,
                    count,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_unstable();
        Ok(out)
    }

    async fn stack_statuses(
        &self,
        stack: u64,
        status: Option<DeployStatus>,
        start: u64,
        limit: u64,
    ) -> Result<(Vec<StackStatus>, u64), StoreError> {
        let base = self.keys.stack_status(stack);
        let set = match status {
            None => format!("{base}:all"),
            Some(s) => format!("{base}:by:{}", s.code()),
        };
        if limit == 0 {
            let mut conn = self.conn().await?;
            let total: u64 = redis::cmd("ZCARD")
                .arg(&set)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            return Ok((Vec::new(), total));
        }
        let stop = start.saturating_add(limit - 1).min(i64::MAX as u64);
        let mut conn = self.conn().await?;
        let (envs, total): (Vec<EnvId>, u64) = redis::pipe()
            .cmd("ZRANGE")
            .arg(&set)
            .arg(start.min(i64::MAX as u64))
            .arg(stop)
            .cmd("ZCARD")
            .arg(&set)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if envs.is_empty() {
            return Ok((Vec::new(), total));
        }
        let stored: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&base)
            .arg(&envs)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let page = stored
            .iter()
            .flatten()
            .map(|s| decode(stack, s))
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((page, total))
    }

    async fn forget_stack_statuses(&self, stack: u64, envs: &[EnvId]) -> Result<(), StoreError> {
        if envs.is_empty() {
            return Ok(());
        }
        let mut call = self.scripts.forget_stack_statuses.prepare_invoke();
        call.arg(stack)
            .arg(self.keys.stack_status(stack))
            .arg(self.keys.stack_counts(stack))
            .arg(&self.keys.env_stacks);
        for env in envs {
            call.arg(env);
        }
        let mut conn = self.conn().await?;
        let _forgotten: i64 = call.invoke_async(&mut conn).await.map_err(redis_err)?;
        Ok(())
    }
}
