//! [`EdgeGroupStore`] on redb: one record per group (name, kind, tags), and static members as
//! keys of two tables, by group and by environment, so that deleting an environment takes it
//! out of every group in its own transaction.

use redb::{Durability, ReadableTable, WriteTransaction};

use super::records::{name_holder, reserve_ids};
use super::{
    db_err, EmbeddedStore, EDGE_GROUPS, EDGE_GROUP_MEMBERS, ENVIRONMENTS, ENV_EDGE_GROUPS,
    META_NEXT_EDGE_GROUP_ID,
};
use crate::{EdgeGroup, EdgeGroupRecord, EdgeGroupStore, EnvId, StoreError};

fn decode(id: u64, bytes: &[u8]) -> Result<EdgeGroupRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::corrupt_by(format!("edge group {id}"), e))
}

fn encode(r: &EdgeGroupRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(r).map_err(|e| StoreError::corrupt_by("edge group", e))
}

/// The other record than `except` named `name`, if any.
fn named(
    table: &impl ReadableTable<u64, &'static [u8]>,
    name: &str,
    except: u64,
) -> Result<Option<u64>, StoreError> {
    name_holder(table, name, except, |id, bytes| Ok(decode(id, bytes)?.name))
}

fn taken(name: &str) -> StoreError {
    StoreError::Conflict(format!("an edge group named {name:?} already exists"))
}

/// The static members of `group`, ascending.
fn members(
    table: &impl ReadableTable<(u64, u64), ()>,
    group: u64,
) -> Result<Vec<EnvId>, StoreError> {
    let mut out = Vec::new();
    for entry in table
        .range((group, 0)..=(group, u64::MAX))
        .map_err(db_err)?
    {
        out.push(entry.map_err(db_err)?.0.value().1);
    }
    Ok(out)
}

/// Replaces `group`'s static members with those of `wanted` that are environments; returns
/// them, ascending.
fn set_members(
    tx: &WriteTransaction,
    group: u64,
    wanted: &[EnvId],
) -> Result<Vec<EnvId>, StoreError> {
    let mut by_group = tx.open_table(EDGE_GROUP_MEMBERS).map_err(db_err)?;
    let mut by_env = tx.open_table(ENV_EDGE_GROUPS).map_err(db_err)?;
    for env in members(&by_group, group)? {
        by_env.remove((env, group)).map_err(db_err)?;
    }
    by_group
        .retain_in((group, 0)..=(group, u64::MAX), |_, ()| false)
        .map_err(db_err)?;
    let envs = tx.open_table(ENVIRONMENTS).map_err(db_err)?;
    let mut kept: Vec<EnvId> = Vec::with_capacity(wanted.len());
    for &env in wanted {
        if envs.get(env).map_err(db_err)?.is_some() {
            kept.push(env);
        }
    }
    kept.sort_unstable();
    kept.dedup();
    for &env in &kept {
        by_group.insert((group, env), ()).map_err(db_err)?;
        by_env.insert((env, group), ()).map_err(db_err)?;
    }
    Ok(kept)
}

/// Takes `env` out of every edge group (its deletion's transaction).
pub(super) fn forget_environment(tx: &WriteTransaction, env: EnvId) -> Result<(), StoreError> {
    let mut by_env = tx.open_table(ENV_EDGE_GROUPS).map_err(db_err)?;
    let mut groups = Vec::new();
    for entry in by_env.range((env, 0)..=(env, u64::MAX)).map_err(db_err)? {
        groups.push(entry.map_err(db_err)?.0.value().1);
    }
    by_env
        .retain_in((env, 0)..=(env, u64::MAX), |_, ()| false)
        .map_err(db_err)?;
    let mut by_group = tx.open_table(EDGE_GROUP_MEMBERS).map_err(db_err)?;
    for group in groups {
        by_group.remove((group, env)).map_err(db_err)?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl EdgeGroupStore for EmbeddedStore {
    async fn create_edge_group(&self, group: &EdgeGroup) -> Result<EdgeGroup, StoreError> {
        let record = group.record();
        let bytes = encode(&record)?;
        let wanted = group.environment_ids.clone();
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(EDGE_GROUPS).map_err(db_err)?;
            if named(&table, &record.name, 0)?.is_some() {
                return Err(taken(&record.name));
            }
            let id = reserve_ids(tx, META_NEXT_EDGE_GROUP_ID, 1)?;
            table.insert(id, bytes.as_slice()).map_err(db_err)?;
            drop(table);
            let members = set_members(tx, id, &wanted)?;
            Ok((EdgeGroup::from_record(id, record, members), true))
        })
        .await
    }

    async fn edge_group(&self, id: u64) -> Result<Option<EdgeGroup>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(EDGE_GROUPS).map_err(db_err)?;
            let Some(v) = table.get(id).map_err(db_err)? else {
                return Ok(None);
            };
            let record = decode(id, v.value())?;
            let by_group = tx.open_table(EDGE_GROUP_MEMBERS).map_err(db_err)?;
            Ok(Some(EdgeGroup::from_record(
                id,
                record,
                members(&by_group, id)?,
            )))
        })
        .await
    }

    async fn list_edge_groups(&self) -> Result<Vec<EdgeGroup>, StoreError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(EDGE_GROUPS).map_err(db_err)?;
            let by_group = tx.open_table(EDGE_GROUP_MEMBERS).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(db_err)? {
                let (id, v) = entry.map_err(db_err)?;
                let id = id.value();
                let record = decode(id, v.value())?;
                out.push(EdgeGroup::from_record(id, record, members(&by_group, id)?));
            }
            Ok(out)
        })
        .await
    }

    async fn update_edge_group(&self, group: &EdgeGroup) -> Result<Option<EdgeGroup>, StoreError> {
        let id = group.id;
        let record = group.record();
        let bytes = encode(&record)?;
        let wanted = group.environment_ids.clone();
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(EDGE_GROUPS).map_err(db_err)?;
            if table.get(id).map_err(db_err)?.is_none() {
                return Ok((None, false));
            }
            if named(&table, &record.name, id)?.is_some() {
                return Err(taken(&record.name));
            }
            table.insert(id, bytes.as_slice()).map_err(db_err)?;
            drop(table);
            let members = set_members(tx, id, &wanted)?;
            Ok((Some(EdgeGroup::from_record(id, record, members)), true))
        })
        .await
    }

    async fn delete_edge_group(&self, id: u64) -> Result<bool, StoreError> {
        self.write(Durability::Immediate, move |tx| {
            let existed = tx
                .open_table(EDGE_GROUPS)
                .map_err(db_err)?
                .remove(id)
                .map_err(db_err)?
                .is_some();
            if existed {
                set_members(tx, id, &[])?;
            }
            Ok((existed, existed))
        })
        .await
    }
}
