//! [`EdgeGroupStore`] on Redis: records in one hash (with a name index for uniqueness), static
//! members in a sorted set per group and, the other way round, a set per environment, both
//! kept by scripts (`lua/put_edge_group.lua`, `delete_edge_group.lua`, `delete_env.lua`).

use std::collections::HashMap;

use async_trait::async_trait;
use deadpool_redis::redis;

use super::{parse_id, redis_err, RedisStore};
use crate::{EdgeGroup, EdgeGroupRecord, EdgeGroupStore, EnvId, StoreError};

fn decode(id: u64, json: &str) -> Result<EdgeGroupRecord, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::corrupt_by(format!("edge group {id}"), e))
}

impl RedisStore {
    /// Creates (`id` 0) or replaces a group; `None` when the group to replace is gone.
    async fn put_edge_group(
        &self,
        id: u64,
        group: &EdgeGroup,
    ) -> Result<Option<EdgeGroup>, StoreError> {
        let record = group.record();
        let json =
            serde_json::to_string(&record).map_err(|e| StoreError::corrupt_by("edge group", e))?;
        let mut conn = self.conn().await?;
        let mut call = self.scripts.put_edge_group.prepare_invoke();
        call.key(&self.keys.edge_groups)
            .key(&self.keys.edge_group_names)
            .key(&self.keys.edge_group_seq)
            .key(&self.keys.env)
            .arg(id)
            .arg(&record.name)
            .arg(json)
            .arg(&self.keys.edge_group_members)
            .arg(&self.keys.env_edge_groups);
        for env in &group.environment_ids {
            call.arg(env);
        }
        let reply: Vec<i64> = call.invoke_async(&mut conn).await.map_err(redis_err)?;
        match reply.split_first() {
            Some((&-1, _)) => Err(StoreError::Conflict(format!(
                "an edge group named {:?} already exists",
                record.name
            ))),
            Some((&0, _)) => Ok(None),
            Some((&id, members)) if id > 0 => {
                let members = members.iter().map(|&m| m as EnvId).collect();
                Ok(Some(EdgeGroup::from_record(id as u64, record, members)))
            }
            _ => Err(StoreError::corrupt(format!(
                "put_edge_group answered {reply:?}"
            ))),
        }
    }

    /// The static members of each group of `ids`, ascending.
    async fn edge_group_members(&self, ids: &[u64]) -> Result<Vec<Vec<EnvId>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        for &id in ids {
            pipe.cmd("ZRANGE")
                .arg(self.keys.edge_group_members(id))
                .arg(0)
                .arg(-1);
        }
        pipe.query_async(&mut conn).await.map_err(redis_err)
    }
}

#[async_trait]
impl EdgeGroupStore for RedisStore {
    async fn create_edge_group(&self, group: &EdgeGroup) -> Result<EdgeGroup, StoreError> {
        self.put_edge_group(0, group)
            .await?
            .ok_or_else(|| StoreError::corrupt("put_edge_group did not create"))
    }

    async fn edge_group(&self, id: u64) -> Result<Option<EdgeGroup>, StoreError> {
        let mut conn = self.conn().await?;
        let (json, members): (Option<String>, Vec<EnvId>) = redis::pipe()
            .cmd("HGET")
            .arg(&self.keys.edge_groups)
            .arg(id)
            .cmd("ZRANGE")
            .arg(self.keys.edge_group_members(id))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        json.map(|json| Ok(EdgeGroup::from_record(id, decode(id, &json)?, members)))
            .transpose()
    }

    async fn list_edge_groups(&self) -> Result<Vec<EdgeGroup>, StoreError> {
        let all: HashMap<String, String> = {
            let mut conn = self.conn().await?;
            redis::cmd("HGETALL")
                .arg(&self.keys.edge_groups)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?
        };
        let mut records = all
            .into_iter()
            .map(|(id, json)| {
                let id = parse_id(&self.keys.edge_groups, &id)?;
                Ok((id, decode(id, &json)?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        records.sort_unstable_by_key(|(id, _)| *id);
        let ids: Vec<u64> = records.iter().map(|(id, _)| *id).collect();
        let members = self.edge_group_members(&ids).await?;
        Ok(records
            .into_iter()
            .zip(members)
            .map(|((id, record), members)| EdgeGroup::from_record(id, record, members))
            .collect())
    }

    async fn update_edge_group(&self, group: &EdgeGroup) -> Result<Option<EdgeGroup>, StoreError> {
        if group.id == 0 {
            return Ok(None);
        }
        self.put_edge_group(group.id, group).await
    }

    async fn delete_edge_group(&self, id: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let existed: i64 = self
            .scripts
            .delete_edge_group
            .key(&self.keys.edge_groups)
            .key(&self.keys.edge_group_names)
            .arg(id)
            .arg(&self.keys.edge_group_members)
            .arg(&self.keys.env_edge_groups)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(existed == 1)
    }
}
