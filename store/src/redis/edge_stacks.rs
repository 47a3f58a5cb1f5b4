//! [`EdgeStackStore`] on Redis: records in one hash (with a name index), the newest version
//! of each in another (so a new version is a compare-and-set on a number,
//! `lua/add_stack_version.lua`), the versions in a hash per stack.

use std::collections::HashMap;

use async_trait::async_trait;
use deadpool_redis::redis;

use super::{parse_id, redis_err, RedisStore};
use crate::{
    EdgeStack, EdgeStackRecord, EdgeStackStore, Rollout, StackVersion, StoreError,
    MAX_STACK_VERSIONS,
};

fn decode(id: u64, json: &str) -> Result<EdgeStackRecord, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::corrupt_by(format!("edge stack {id}"), e))
}

fn decode_version(id: u64, json: &str) -> Result<StackVersion, StoreError> {
    serde_json::from_str(json)
        .map_err(|e| StoreError::corrupt_by(format!("a version of edge stack {id}"), e))
}

fn to_json<T: serde::Serialize>(what: &str, v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::corrupt_by(what.to_owned(), e))
}

#[async_trait]
impl EdgeStackStore for RedisStore {
    async fn create_edge_stack(
        &self,
        stack: &EdgeStack,
        compose: &str,
    ) -> Result<EdgeStack, StoreError> {
        let record = stack.record();
        let first = StackVersion {
            version: 1,
            compose: compose.to_owned(),
            created_ms: stack.created_ms,
        };
        let mut conn = self.conn().await?;
        let id: u64 = self
            .scripts
            .create_edge_stack
            .key(&self.keys.edge_stacks)
            .key(&self.keys.edge_stack_names)
            .key(&self.keys.edge_stack_version)
            .key(&self.keys.edge_stack_seq)
            .arg(&record.name)
            .arg(to_json("edge stack", &record)?)
            .arg(to_json("edge stack version", &first)?)
            .arg(&self.keys.edge_stack_versions)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if id == 0 {
            return Err(StoreError::Conflict(format!(
                "an edge stack named {:?} already exists",
                record.name
            )));
        }
        Ok(EdgeStack::from_record(id, 1, record))
    }

    async fn edge_stack(&self, id: u64) -> Result<Option<EdgeStack>, StoreError> {
        let mut conn = self.conn().await?;
        let (json, version): (Option<String>, Option<u32>) = redis::pipe()
            .cmd("HGET")
            .arg(&self.keys.edge_stacks)
            .arg(id)
            .cmd("HGET")
            .arg(&self.keys.edge_stack_version)
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let Some(json) = json else {
            return Ok(None);
        };
        let version = version
            .ok_or_else(|| StoreError::corrupt(format!("edge stack {id} has no newest version")))?;
        Ok(Some(EdgeStack::from_record(
            id,
            version,
            decode(id, &json)?,
        )))
    }

    async fn list_edge_stacks(&self) -> Result<Vec<EdgeStack>, StoreError> {
        let mut conn = self.conn().await?;
        let (records, versions): (HashMap<String, String>, HashMap<String, u32>) = redis::pipe()
            .cmd("HGETALL")
            .arg(&self.keys.edge_stacks)
            .cmd("HGETALL")
            .arg(&self.keys.edge_stack_version)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let mut out = records
            .into_iter()
            .map(|(id_text, json)| {
                let id = parse_id(&self.keys.edge_stacks, &id_text)?;
                let version = versions.get(&id_text).copied().ok_or_else(|| {
                    StoreError::corrupt(format!("edge stack {id} has no newest version"))
                })?;
                Ok(EdgeStack::from_record(id, version, decode(id, &json)?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_unstable_by_key(|s| s.id);
        Ok(out)
    }

    async fn update_edge_stack(&self, stack: &EdgeStack) -> Result<Option<EdgeStack>, StoreError> {
        let Some(current) = self.edge_stack(stack.id).await? else {
            return Ok(None);
        };
        let updated = EdgeStack {
            edge_group_ids: stack.edge_group_ids.clone(),
            variables: stack.variables.clone(),
            ..current
        };
        let mut conn = self.conn().await?;
        let done: i64 = self
            .scripts
            .update_edge_stack
            .key(&self.keys.edge_stacks)
            .arg(updated.id)
            .arg(to_json("edge stack", &updated.record())?)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok((done == 1).then_some(updated))
    }

    async fn add_stack_version(
        &self,
        id: u64,
        after: u32,
        compose: &str,
        now_ms: u64,
    ) -> Result<Option<EdgeStack>, StoreError> {
        let next = after
            .checked_add(1)
            .ok_or_else(|| StoreError::Conflict(format!("edge stack {id}: no versions left")))?;
        let version = StackVersion {
            version: next,
            compose: compose.to_owned(),
            created_ms: now_ms,
        };
        let (outcome, newest): (i64, u32) = {
            let mut conn = self.conn().await?;
            self.scripts
                .add_stack_version
                .key(&self.keys.edge_stacks)
                .key(&self.keys.edge_stack_version)
                .key(self.keys.edge_stack_versions(id))
                .arg(id)
                .arg(after)
                .arg(to_json("edge stack version", &version)?)
                .arg(MAX_STACK_VERSIONS)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_err)?
        };
        match outcome {
            1 => self.edge_stack(id).await,
            0 => Err(StoreError::Conflict(format!(
                "edge stack {id} is at version {newest}, not {after}"
            ))),
            _ => Ok(None),
        }
    }

    async fn stack_versions(&self, id: u64) -> Result<Vec<StackVersion>, StoreError> {
        let mut conn = self.conn().await?;
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.edge_stack_versions(id))
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let mut out = all
            .values()
            .map(|json| decode_version(id, json))
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_unstable_by_key(|v| std::cmp::Reverse(v.version));
        Ok(out)
    }

    async fn stack_version(
        &self,
        id: u64,
        version: u32,
    ) -> Result<Option<StackVersion>, StoreError> {
        let mut conn = self.conn().await?;
        let json: Option<String> = redis::cmd("HGET")
            .arg(self.keys.edge_stack_versions(id))
            .arg(version)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        json.map(|j| decode_version(id, &j)).transpose()
    }

    async fn delete_edge_stack(&self, id: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let existed: i64 = self
            .scripts
            .delete_edge_stack
            .key(&self.keys.edge_stacks)
            .key(&self.keys.edge_stack_names)
            .key(&self.keys.edge_stack_version)
            .key(self.keys.edge_stack_versions(id))
            .key(self.keys.stack_status(id))
            .key(self.keys.stack_counts(id))
            .key(&self.keys.edge_stack_rollouts)
            .arg(id)
            .arg(&self.keys.env_stacks)
            .arg(crate::DeployStatus::ALL.len())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(existed == 1)
    }

    async fn stack_rollout(&self, id: u64) -> Result<Option<Rollout>, StoreError> {
        let mut conn = self.conn().await?;
        let raw: Option<String> = redis::cmd("HGET")
            .arg(&self.keys.edge_stack_rollouts)
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        raw.map(|r| decode_rollout(id, &r)).transpose()
    }

    async fn stack_rollouts(&self) -> Result<Vec<(u64, Rollout)>, StoreError> {
        let mut conn = self.conn().await?;
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&self.keys.edge_stack_rollouts)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let mut out = all
            .into_iter()
            .map(|(k, v)| {
                let id = parse_id("edge stack rollout", &k)?;
                Ok((id, decode_rollout(id, &v)?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_unstable_by_key(|(id, _)| *id);
        Ok(out)
    }

    async fn put_stack_rollout(
        &self,
        id: u64,
        expected: u64,
        rollout: &Rollout,
    ) -> Result<bool, StoreError> {
        let mut wanted = rollout.clone();
        wanted.revision = expected + 1;
        let mut conn = self.conn().await?;
        let stored: i64 = self
            .scripts
            .put_stack_rollout
            .key(&self.keys.edge_stacks)
            .key(&self.keys.edge_stack_rollouts)
            .arg(id)
            .arg(expected)
            .arg(wanted.revision)
            .arg(to_json("edge stack rollout", &wanted)?)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(stored == 1)
    }
}

/// A stored rollout: "revision|json" (the revision in front, for the compare-and-set).
fn decode_rollout(id: u64, raw: &str) -> Result<Rollout, StoreError> {
    let json = raw.split_once('|').map_or(raw, |(_, j)| j);
    serde_json::from_str(json)
        .map_err(|e| StoreError::corrupt_by(format!("the rollout of edge stack {id}"), e))
}
