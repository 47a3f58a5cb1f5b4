//! [`EdgeStackStore`] on redb: one record per stack (with its newest version number), and its
//! versions keyed by (stack, version).

use redb::{Durability, ReadableTable};

use super::records::{name_holder, reserve_ids};
use super::{
    db_err, EmbeddedStore, EDGE_STACKS, META_NEXT_EDGE_STACK_ID, STACK_ROLLOUTS, STACK_VERSIONS,
};
use crate::{
    EdgeStack, EdgeStackRecord, EdgeStackStore, Rollout, StackVersion, StoreError,
    MAX_STACK_VERSIONS,
};

/// The stored record: the newest version and the rest.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    version: u32,
    #[serde(flatten)]
    record: EdgeStackRecord,
}

fn decode(id: u64, bytes: &[u8]) -> Result<EdgeStack, StoreError> {
    let s: Stored = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::corrupt_by(format!("edge stack {id}"), e))?;
    Ok(EdgeStack::from_record(id, s.version, s.record))
}

fn encode(stack: &EdgeStack) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&Stored {
        version: stack.version,
        record: stack.record(),
    })
    .map_err(|e| StoreError::corrupt_by("edge stack", e))
}

fn encode_version(v: &StackVersion) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::corrupt_by("edge stack version", e))
}

fn decode_version(id: u64, bytes: &[u8]) -> Result<StackVersion, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::corrupt_by(format!("a version of edge stack {id}"), e))
}

fn taken(name: &str) -> StoreError {
    StoreError::Conflict(format!("an edge stack named {name:?} already exists"))
}

/// The other record than `except` named `name`, if any.
fn named(
    table: &impl ReadableTable<u64, &'static [u8]>,
    name: &str,
    except: u64,
) -> Result<Option<u64>, StoreError> {
    name_holder(table, name, except, |id, bytes| Ok(decode(id, bytes)?.name))
}

#[async_trait::async_trait]
impl EdgeStackStore for EmbeddedStore {
    async fn create_edge_stack(
        &self,
        stack: &EdgeStack,
        compose: &str,
    ) -> Result<EdgeStack, StoreError> {
        let mut stack = stack.clone();
        let compose = compose.to_owned();
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(EDGE_STACKS).map_err(db_err)?;
            if named(&table, &stack.name, 0)?.is_some() {
                return Err(taken(&stack.name));
            }
            stack.id = reserve_ids(tx, META_NEXT_EDGE_STACK_ID, 1)?;
            stack.version = 1;
            table
                .insert(stack.id, encode(&stack)?.as_slice())
                .map_err(db_err)?;
            let first = StackVersion {
                version: 1,
                compose,
                created_ms: stack.created_ms,
            };
            tx.open_table(STACK_VERSIONS)
                .map_err(db_err)?
                .insert((stack.id, 1), encode_version(&first)?.as_slice())
                .map_err(db_err)?;
            Ok((stack, true))
        })
        .await
    }

    async fn edge_stack(&self, id: u64) -> Result<Option<EdgeStack>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(EDGE_STACKS).map_err(db_err)?;
            let got = table.get(id).map_err(db_err)?;
            got.map(|v| decode(id, v.value())).transpose()
        })
        .await
    }

    async fn list_edge_stacks(&self) -> Result<Vec<EdgeStack>, StoreError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(EDGE_STACKS).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(db_err)? {
                let (id, v) = entry.map_err(db_err)?;
                out.push(decode(id.value(), v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn update_edge_stack(&self, stack: &EdgeStack) -> Result<Option<EdgeStack>, StoreError> {
        let wanted = stack.clone();
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(EDGE_STACKS).map_err(db_err)?;
            let Some(current) = table
                .get(wanted.id)
                .map_err(db_err)?
                .map(|v| decode(wanted.id, v.value()))
                .transpose()?
            else {
                return Ok((None, false));
            };
            let updated = EdgeStack {
                edge_group_ids: wanted.edge_group_ids,
                variables: wanted.variables,
                ..current
            };
            table
                .insert(updated.id, encode(&updated)?.as_slice())
                .map_err(db_err)?;
            Ok((Some(updated), true))
        })
        .await
    }

    async fn add_stack_version(
        &self,
        id: u64,
        after: u32,
        compose: &str,
        now_ms: u64,
    ) -> Result<Option<EdgeStack>, StoreError> {
        let compose = compose.to_owned();
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(EDGE_STACKS).map_err(db_err)?;
            let Some(mut stack) = table
                .get(id)
                .map_err(db_err)?
                .map(|v| decode(id, v.value()))
                .transpose()?
            else {
                return Ok((None, false));
            };
            if stack.version != after {
                return Err(StoreError::Conflict(format!(
                    "edge stack {id} is at version {}, not {after}",
                    stack.version
                )));
            }
            stack.version = after.checked_add(1).ok_or_else(|| {
                StoreError::Conflict(format!("edge stack {id}: no versions left"))
            })?;
            table
                .insert(id, encode(&stack)?.as_slice())
                .map_err(db_err)?;
            let mut versions = tx.open_table(STACK_VERSIONS).map_err(db_err)?;
            let v = StackVersion {
                version: stack.version,
                compose,
                created_ms: now_ms,
            };
            versions
                .insert(
                    (id, u64::from(stack.version)),
                    encode_version(&v)?.as_slice(),
                )
                .map_err(db_err)?;
            let keep_from = u64::from(stack.version.saturating_sub(MAX_STACK_VERSIONS - 1));
            versions
                .retain_in((id, 0)..(id, keep_from), |_, _| false)
                .map_err(db_err)?;
            Ok((Some(stack), true))
        })
        .await
    }

    async fn stack_versions(&self, id: u64) -> Result<Vec<StackVersion>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(STACK_VERSIONS).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table.range((id, 0)..=(id, u64::MAX)).map_err(db_err)?.rev() {
                let (_, v) = entry.map_err(db_err)?;
                out.push(decode_version(id, v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn stack_version(
        &self,
        id: u64,
        version: u32,
    ) -> Result<Option<StackVersion>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(STACK_VERSIONS).map_err(db_err)?;
            let got = table.get((id, u64::from(version))).map_err(db_err)?;
            got.map(|v| decode_version(id, v.value())).transpose()
        })
        .await
    }

    async fn delete_edge_stack(&self, id: u64) -> Result<bool, StoreError> {
        self.write(Durability::Immediate, move |tx| {
            let existed = tx
                .open_table(EDGE_STACKS)
                .map_err(db_err)?
                .remove(id)
                .map_err(db_err)?
                .is_some();
            if existed {
                tx.open_table(STACK_VERSIONS)
                    .map_err(db_err)?
                    .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)
                    .map_err(db_err)?;
                super::stack_status::forget_stack(tx, id)?;
                tx.open_table(STACK_ROLLOUTS)
                    .map_err(db_err)?
                    .remove(id)
                    .map_err(db_err)?;
            }
            Ok((existed, existed))
        })
        .await
    }

    async fn stack_rollout(&self, id: u64) -> Result<Option<Rollout>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(STACK_ROLLOUTS).map_err(db_err)?;
            let got = table.get(id).map_err(db_err)?;
            got.map(|v| decode_rollout(id, v.value())).transpose()
        })
        .await
    }

    async fn stack_rollouts(&self) -> Result<Vec<(u64, Rollout)>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(STACK_ROLLOUTS).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(db_err)? {
                let (k, v) = entry.map_err(db_err)?;
                out.push((k.value(), decode_rollout(k.value(), v.value())?));
            }
            Ok(out)
        })
        .await
    }

    async fn put_stack_rollout(
        &self,
        id: u64,
        expected: u64,
        rollout: &Rollout,
    ) -> Result<bool, StoreError> {
        let mut wanted = rollout.clone();
        wanted.revision = expected + 1;
        let bytes = serde_json::to_vec(&wanted)
            .map_err(|e| StoreError::corrupt_by("edge stack rollout", e))?;
        self.write(Durability::Immediate, move |tx| {
            if tx
                .open_table(EDGE_STACKS)
                .map_err(db_err)?
                .get(id)
                .map_err(db_err)?
                .is_none()
            {
                return Ok((false, false));
            }
            let mut table = tx.open_table(STACK_ROLLOUTS).map_err(db_err)?;
            let current = table
                .get(id)
                .map_err(db_err)?
                .map(|v| decode_rollout(id, v.value()))
                .transpose()?
                .map_or(0, |r| r.revision);
            if current != expected {
                return Ok((false, false));
            }
            table.insert(id, bytes.as_slice()).map_err(db_err)?;
            Ok((true, true))
        })
        .await
    }
}

fn decode_rollout(id: u64, bytes: &[u8]) -> Result<Rollout, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::corrupt_by(format!("the rollout of edge stack {id}"), e))
}
