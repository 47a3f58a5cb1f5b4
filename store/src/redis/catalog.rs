//! [`CatalogStore`] on Redis: groups and tags (with a name index for uniqueness), settings,
//! admin key hashes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use deadpool_redis::redis;

use super::{parse_id, redis_err, RedisStore};
use crate::{CatalogStore, Collection, Named, Settings, StoreError};

#[async_trait]
impl CatalogStore for RedisStore {
    async fn create_named(&self, coll: Collection, name: &str) -> Result<Named, StoreError> {
        let (ids, names, seq) = self.keys.named(coll);
        let mut conn = self.conn().await?;
        let id: u64 = self
            .scripts
            .create_named
            .key(ids)
            .key(names)
            .key(seq)
            .arg(name)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if id == 0 {
            return Err(StoreError::Conflict(format!(
                "a {} named {name:?} already exists",
                coll_name(coll)
            )));
        }
        Ok(Named {
            id,
            name: name.to_owned(),
        })
    }

    async fn list_named(&self, coll: Collection) -> Result<Vec<Named>, StoreError> {
        let (ids, _, _) = self.keys.named(coll);
        let mut conn = self.conn().await?;
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(ids)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let mut out = all
            .into_iter()
            .map(|(id, name)| {
                Ok(Named {
                    id: parse_id(ids, &id)?,
                    name,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_unstable_by_key(|n| n.id);
        Ok(out)
    }

    async fn rename_named(
        &self,
        coll: Collection,
        id: u64,
        name: &str,
    ) -> Result<Option<Named>, StoreError> {
        let (ids, names, _) = self.keys.named(coll);
        let mut conn = self.conn().await?;
        let outcome: i64 = self
            .scripts
            .rename_named
            .key(ids)
            .key(names)
            .arg(id)
            .arg(name)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match outcome {
            1 => Ok(Some(Named {
                id,
                name: name.to_owned(),
            })),
            0 => Ok(None),
            _ => Err(StoreError::Conflict(format!(
                "a {} named {name:?} already exists",
                coll_name(coll)
            ))),
        }
    }

    async fn delete_named(&self, coll: Collection, id: u64) -> Result<bool, StoreError> {
        let (ids, names, _) = self.keys.named(coll);
        let mut conn = self.conn().await?;
        let deleted: i64 = self
            .scripts
            .delete_named
            .key(ids)
            .key(names)
            .key(match coll {
                Collection::Groups => self.keys.group_tags.as_str(),
                Collection::Tags => ids,
            })
            .arg(id)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(deleted == 1)
    }

    async fn group_tags(&self) -> Result<BTreeMap<u64, Vec<u64>>, StoreError> {
        let mut conn = self.conn().await?;
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&self.keys.group_tags)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        all.into_iter()
            .map(|(id, json)| {
                let id = parse_id(&self.keys.group_tags, &id)?;
                let tags = serde_json::from_str(&json)
                    .map_err(|e| StoreError::corrupt_by(format!("tags of group {id}"), e))?;
                Ok((id, tags))
            })
            .collect()
    }

    async fn set_group_tags(&self, group: u64, tags: &[u64]) -> Result<bool, StoreError> {
        let tags: BTreeSet<u64> = tags.iter().copied().collect();
        let json = if tags.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&tags).map_err(|e| StoreError::corrupt_by("tags", e))?
        };
        let mut conn = self.conn().await?;
        let set: i64 = self
            .scripts
            .set_group_tags
            .key(&self.keys.groups)
            .key(&self.keys.group_tags)
            .arg(group)
            .arg(json)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(set == 1)
    }

    async fn settings(&self) -> Result<Settings, StoreError> {
        let mut conn = self.conn().await?;
        let json: Option<String> = redis::cmd("GET")
            .arg(&self.keys.settings)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match json {
            Some(json) => {
                serde_json::from_str(&json).map_err(|e| StoreError::corrupt_by("settings", e))
            }
            None => Ok(Settings::default()),
        }
    }

    async fn put_settings(&self, settings: &Settings) -> Result<(), StoreError> {
        let json =
            serde_json::to_string(settings).map_err(|e| StoreError::corrupt_by("settings", e))?;
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(&self.keys.settings)
            .arg(json)
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn admin_key_hashes(&self) -> Result<Vec<[u8; 32]>, StoreError> {
        let mut conn = self.conn().await?;
        let members: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
            .arg(&self.keys.admin_keys)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let mut out = members
            .into_iter()
            .map(|m| {
                <[u8; 32]>::try_from(m.as_slice()).map_err(|_| {
                    StoreError::corrupt(format!("admin key hash of {} bytes", m.len()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Sets are unordered; sort so both backends answer alike.
        out.sort_unstable();
        Ok(out)
    }

    async fn replace_admin_key_hashes(&self, hashes: &[[u8; 32]]) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        // MULTI/EXEC: no reader ever sees the set empty (or half filled) in between, which
        // would lock every admin out (or let a revoked key through) for a moment.
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("DEL").arg(&self.keys.admin_keys).ignore();
        // SADD needs at least one member; an empty set is simply no key.
        if !hashes.is_empty() {
            let members: Vec<&[u8]> = hashes.iter().map(|h| h.as_slice()).collect();
            pipe.cmd("SADD")
                .arg(&self.keys.admin_keys)
                .arg(members)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.map_err(redis_err)
    }
}

fn coll_name(coll: Collection) -> &'static str {
    match coll {
        Collection::Groups => "group",
        Collection::Tags => "tag",
    }
}
