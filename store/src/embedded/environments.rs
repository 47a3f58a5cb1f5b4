//! [`EnvironmentStore`] on redb: records, bindings (inside the record) and heartbeats.

use async_trait::async_trait;
use redb::{Durability, ReadableTable};
use uuid::Uuid;

use super::records::{decode_env, encode_env, reserve_ids};
use super::{
    db_err, EmbeddedStore, COMMANDS, ENVIRONMENTS, HEARTBEATS, META_NEXT_ENV_ID, SNAPSHOTS,
};
use crate::{BindOutcome, EnvId, Environment, EnvironmentStore, NewEnvironment, StoreError};

#[async_trait]
impl EnvironmentStore for EmbeddedStore {
    async fn create_environments(
        &self,
        new: Vec<NewEnvironment>,
    ) -> Result<Vec<Environment>, StoreError> {
        if new.is_empty() {
            return Ok(Vec::new());
        }
        self.write(Durability::Immediate, move |tx| {
            let first = reserve_ids(tx, META_NEXT_ENV_ID, new.len() as u64)?;
            let mut table = tx.open_table(ENVIRONMENTS).map_err(db_err)?;
            let mut created = Vec::with_capacity(new.len());
            for (id, n) in (first..).zip(new) {
                let env = n.into_environment(id);
                table
                    .insert(id, encode_env(&env)?.as_slice())
                    .map_err(db_err)?;
                created.push(env);
            }
            Ok((created, true))
        })
        .await
    }

    async fn get_environment(&self, id: EnvId) -> Result<Option<Environment>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(ENVIRONMENTS).map_err(db_err)?;
            match table.get(id).map_err(db_err)? {
                Some(v) => decode_env(id, v.value()).map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn get_environments(
        &self,
        ids: &[EnvId],
    ) -> Result<Vec<Option<Environment>>, StoreError> {
        let ids = ids.to_vec();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(ENVIRONMENTS).map_err(db_err)?;
            ids.into_iter()
                .map(|id| match table.get(id).map_err(db_err)? {
                    Some(v) => decode_env(id, v.value()).map(Some),
                    None => Ok(None),
                })
                .collect()
        })
        .await
    }

    async fn list_environments(&self) -> Result<Vec<Environment>, StoreError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(ENVIRONMENTS).map_err(db_err)?;
            // Keys iterate in ascending order, which is the order the trait promises.
            let mut out = Vec::new();
            for entry in table.iter().map_err(db_err)? {
                let (id, v) = entry.map_err(db_err)?;
                out.push(decode_env(id.value(), v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn update_environment(&self, env: &Environment) -> Result<bool, StoreError> {
        let mut env = env.clone();
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(ENVIRONMENTS).map_err(db_err)?;
            let current = match table.get(env.id).map_err(db_err)? {
                Some(v) => decode_env(env.id, v.value())?,
                None => return Ok((false, false)),
            };
            // The binding, the join secret and the creation time are not the caller's to
            // change. Taking them from the record read in this same write transaction is what
            // keeps a stale copy from undoing a concurrent bind or secret rotation.
            env.edge_id = current.edge_id;
            env.join_secret = current.join_secret;
            env.created_at_ms = current.created_at_ms;
            table
                .insert(env.id, encode_env(&env)?.as_slice())
                .map_err(db_err)?;
            Ok((true, true))
        })
        .await
    }

    async fn delete_environment(&self, id: EnvId) -> Result<bool, StoreError> {
        self.write(Durability::Immediate, move |tx| {
            // The binding lives in the record, so removing it removes the binding too.
            let existed = tx
                .open_table(ENVIRONMENTS)
                .map_err(db_err)?
                .remove(id)
                .map_err(db_err)?
                .is_some();
            if !existed {
                return Ok((false, false));
            }
            tx.open_table(HEARTBEATS)
                .map_err(db_err)?
                .remove(id)
                .map_err(db_err)?;
            tx.open_table(SNAPSHOTS)
                .map_err(db_err)?
                .remove(id)
                .map_err(db_err)?;
            tx.open_table(COMMANDS)
                .map_err(db_err)?
                .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)
                .map_err(db_err)?;
            super::edge_groups::forget_environment(tx, id)?;
            super::stack_status::forget_environment(tx, id)?;
            Ok((true, true))
        })
        .await
    }

    async fn bind_edge_id(
        &self,
        id: EnvId,
        edge_id: Uuid,
        join_secret: &str,
    ) -> Result<BindOutcome, StoreError> {
        let join_secret = join_secret.to_owned();
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(ENVIRONMENTS).map_err(db_err)?;
            let mut env = match table.get(id).map_err(db_err)? {
                Some(v) => decode_env(id, v.value())?,
                None => return Ok((BindOutcome::NotFound, false)),
            };
            // Checked in the same transaction as the write, so a reset cannot slip in between.
            if env.join_secret != join_secret {
                return Ok((BindOutcome::SecretChanged, false));
            }
            match env.edge_id {
                Some(bound) if bound == edge_id => Ok((BindOutcome::AlreadyBound, false)),
                Some(other) => Ok((BindOutcome::BoundToOther(other), false)),
                None => {
                    env.edge_id = Some(edge_id);
                    table
                        .insert(id, encode_env(&env)?.as_slice())
                        .map_err(db_err)?;
                    Ok((BindOutcome::Bound, true))
                }
            }
        })
        .await
    }

    async fn reset_association(
        &self,
        id: EnvId,
        new_secret: String,
    ) -> Result<Option<Environment>, StoreError> {
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(ENVIRONMENTS).map_err(db_err)?;
            let mut env = match table.get(id).map_err(db_err)? {
                Some(v) => decode_env(id, v.value())?,
                None => return Ok((None, false)),
            };
            env.edge_id = None;
            env.join_secret = new_secret;
            table
                .insert(id, encode_env(&env)?.as_slice())
                .map_err(db_err)?;
            Ok((Some(env), true))
        })
        .await
    }

    async fn record_heartbeats(&self, beats: &[(EnvId, u64)]) -> Result<(), StoreError> {
        if beats.is_empty() {
            return Ok(());
        }
        let beats = beats.to_vec();
        // Heartbeats are frequent and disposable: losing the last batches to a power cut only
        // makes environments look a little older, so skip the fsync (`Eventual` still writes
        // the data and keeps the file consistent).
        self.write(Durability::Eventual, move |tx| {
            let envs = tx.open_table(ENVIRONMENTS).map_err(db_err)?;
            let mut hb = tx.open_table(HEARTBEATS).map_err(db_err)?;
            let mut changed = false;
            for (id, at) in beats {
                if at > crate::MAX_HEARTBEAT_MS || envs.get(id).map_err(db_err)?.is_none() {
                    continue;
                }
                let current = hb.get(id).map_err(db_err)?.map(|v| v.value());
                if current.is_none_or(|c| at > c) {
                    hb.insert(id, at).map_err(db_err)?;
                    changed = true;
                }
            }
            Ok(((), changed))
        })
        .await
    }

    async fn heartbeats(&self, ids: &[EnvId]) -> Result<Vec<Option<u64>>, StoreError> {
        let ids = ids.to_vec();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let hb = tx.open_table(HEARTBEATS).map_err(db_err)?;
            ids.into_iter()
                .map(|id| Ok(hb.get(id).map_err(db_err)?.map(|v| v.value())))
                .collect()
        })
        .await
    }

    async fn count_heartbeats_since(&self, since_ms: u64) -> Result<u64, StoreError> {
        Ok(self.heartbeats_since(since_ms).await?.len() as u64)
    }

    /// A scan of the whole table (a single node's: its own agents' times are in the fleet's
    /// memory as well).
    async fn heartbeats_since(&self, since_ms: u64) -> Result<Vec<(EnvId, u64)>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let hb = tx.open_table(HEARTBEATS).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in hb.iter().map_err(db_err)? {
                let (id, at) = entry.map_err(db_err)?;
                if at.value() >= since_ms {
                    out.push((id.value(), at.value()));
                }
            }
            Ok(out)
        })
        .await
    }
}
