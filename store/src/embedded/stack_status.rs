//! [`StackStatusStore`] on redb: a status per (stack, environment), an index by status, the
//! counts per (stack, status, version), and (environment, stack) so that a deleted
//! environment's statuses go with it.

use redb::{Durability, ReadableTable, WriteTransaction};

use super::{
    db_err, EmbeddedStore, EDGE_STACKS, ENVIRONMENTS, ENV_STACKS, STACK_COUNTS, STACK_STATUS,
    STACK_STATUS_BY,
};
use crate::{DeployStatus, EnvId, StackStatus, StackStatusStore, StatusCount, StoreError};

fn decode(stack: u64, env: EnvId, bytes: &[u8]) -> Result<StackStatus, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| {
        StoreError::corrupt_by(
            format!("status of edge stack {stack} on environment {env}"),
            e,
        )
    })
}

/// Adds `delta` to a count, removing it at zero.
fn count(tx: &WriteTransaction, key: (u64, u64, u64), delta: i64) -> Result<(), StoreError> {
    let mut counts = tx.open_table(STACK_COUNTS).map_err(db_err)?;
    let now = counts.get(key).map_err(db_err)?.map_or(0, |v| v.value());
    let next = now.saturating_add_signed(delta);
    if next == 0 {
        counts.remove(key).map_err(db_err)?;
    } else {
        counts.insert(key, next).map_err(db_err)?;
    }
    Ok(())
}

/// Takes `env`'s status of `stack` out of the records, the index and the counts.
fn forget_one(tx: &WriteTransaction, stack: u64, env: EnvId) -> Result<(), StoreError> {
    let old = tx
        .open_table(STACK_STATUS)
        .map_err(db_err)?
        .remove((stack, env))
        .map_err(db_err)?
        .map(|v| decode(stack, env, v.value()))
        .transpose()?;
    if let Some(old) = old {
        let code = u64::from(old.status.code());
        tx.open_table(STACK_STATUS_BY)
            .map_err(db_err)?
            .remove((stack, code, env))
            .map_err(db_err)?;
        count(tx, (stack, code, u64::from(old.version)), -1)?;
    }
    tx.open_table(ENV_STACKS)
        .map_err(db_err)?
        .remove((env, stack))
        .map_err(db_err)?;
    Ok(())
}

/// Takes `env` out of every stack's statuses (its deletion's transaction).
pub(super) fn forget_environment(tx: &WriteTransaction, env: EnvId) -> Result<(), StoreError> {
    let mut stacks = Vec::new();
    for entry in tx
        .open_table(ENV_STACKS)
        .map_err(db_err)?
        .range((env, 0)..=(env, u64::MAX))
        .map_err(db_err)?
    {
        stacks.push(entry.map_err(db_err)?.0.value().1);
    }
    for stack in stacks {
        forget_one(tx, stack, env)?;
    }
    Ok(())
}

/// Takes every status of `stack` out (its deletion's transaction).
pub(super) fn forget_stack(tx: &WriteTransaction, stack: u64) -> Result<(), StoreError> {
    let mut envs = Vec::new();
    for entry in tx
        .open_table(STACK_STATUS)
        .map_err(db_err)?
        .range((stack, 0)..=(stack, u64::MAX))
        .map_err(db_err)?
    {
        envs.push(entry.map_err(db_err)?.0.value().1);
    }
    let mut by_env = tx.open_table(ENV_STACKS).map_err(db_err)?;
    for env in envs {
        by_env.remove((env, stack)).map_err(db_err)?;
    }
    tx.open_table(STACK_STATUS)
        .map_err(db_err)?
        .retain_in((stack, 0)..=(stack, u64::MAX), |_, _| false)
        .map_err(db_err)?;
    tx.open_table(STACK_STATUS_BY)
        .map_err(db_err)?
        .retain_in((stack, 0, 0)..=(stack, u64::MAX, u64::MAX), |_, ()| false)
        .map_err(db_err)?;
    tx.open_table(STACK_COUNTS)
        .map_err(db_err)?
        .retain_in((stack, 0, 0)..=(stack, u64::MAX, u64::MAX), |_, _| false)
        .map_err(db_err)?;
    Ok(())
}

#[async_trait::async_trait]
impl StackStatusStore for EmbeddedStore {
    async fn record_stack_statuses(
        &self,
        stack: u64,
        statuses: &[StackStatus],
    ) -> Result<(), StoreError> {
        let statuses = statuses.to_vec();
        // As heartbeats: frequent, and a power cut loses at most the last batches (no fsync).
        self.write(Durability::Eventual, move |tx| {
            if tx
                .open_table(EDGE_STACKS)
                .map_err(db_err)?
                .get(stack)
                .map_err(db_err)?
                .is_none()
            {
                return Ok(((), false));
            }
            let mut changed = false;
            for s in statuses {
                let exists = tx
                    .open_table(ENVIRONMENTS)
                    .map_err(db_err)?
                    .get(s.env)
                    .map_err(db_err)?
                    .is_some();
                if !exists {
                    continue;
                }
                let old = tx
                    .open_table(STACK_STATUS)
                    .map_err(db_err)?
                    .get((stack, s.env))
                    .map_err(db_err)?
                    .map(|v| decode(stack, s.env, v.value()))
                    .transpose()?;
                if old.as_ref().is_some_and(|o| o.updated_ms > s.updated_ms) {
                    continue;
                }
                forget_one(tx, stack, s.env)?;
                let code = u64::from(s.status.code());
                let bytes = serde_json::to_vec(&s)
                    .map_err(|e| StoreError::corrupt_by("stack status", e))?;
                tx.open_table(STACK_STATUS)
                    .map_err(db_err)?
                    .insert((stack, s.env), bytes.as_slice())
                    .map_err(db_err)?;
                tx.open_table(STACK_STATUS_BY)
                    .map_err(db_err)?
                    .insert((stack, code, s.env), ())
                    .map_err(db_err)?;
                tx.open_table(ENV_STACKS)
                    .map_err(db_err)?
                    .insert((s.env, stack), ())
                    .map_err(db_err)?;
                count(tx, (stack, code, u64::from(s.version)), 1)?;
                changed = true;
            }
            Ok(((), changed))
        })
        .await
    }

    async fn stack_status_counts(&self, stack: u64) -> Result<Vec<StatusCount>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let counts = tx.open_table(STACK_COUNTS).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in counts
                .range((stack, 0, 0)..=(stack, u64::MAX, u64::MAX))
                .map_err(db_err)?
            {
                let (k, n) = entry.map_err(db_err)?;
                let (_, code, version) = k.value();
                let status = u8::try_from(code)
                    .ok()
                    .and_then(DeployStatus::from_code)
                    .ok_or_else(|| StoreError::corrupt(format!("status code {code}")))?;
                let version = u32::try_from(version)
                    .map_err(|_| StoreError::corrupt(format!("stack version {version}")))?;
                out.push(StatusCount {
                    status,
                    version,
                    count: n.value(),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn stack_statuses(
        &self,
        stack: u64,
        status: Option<DeployStatus>,
        start: u64,
        limit: u64,
    ) -> Result<(Vec<StackStatus>, u64), StoreError> {
        let counts = self.stack_status_counts(stack).await?;
        let total = counts
            .iter()
            .filter(|c| status.is_none_or(|s| s == c.status))
            .map(|c| c.count)
            .sum();
        let (start, limit) = (
            usize::try_from(start).unwrap_or(usize::MAX),
            usize::try_from(limit).unwrap_or(usize::MAX),
        );
        let page = self
            .blocking(move |db| {
                let tx = db.begin_read().map_err(db_err)?;
                let records = tx.open_table(STACK_STATUS).map_err(db_err)?;
                let mut out = Vec::new();
                match status {
                    None => {
                        for entry in records
                            .range((stack, 0)..=(stack, u64::MAX))
                            .map_err(db_err)?
                            .skip(start)
                            .take(limit)
                        {
                            let (k, v) = entry.map_err(db_err)?;
                            out.push(decode(stack, k.value().1, v.value())?);
                        }
                    }
                    Some(s) => {
                        let code = u64::from(s.code());
                        let by = tx.open_table(STACK_STATUS_BY).map_err(db_err)?;
                        for entry in by
                            .range((stack, code, 0)..=(stack, code, u64::MAX))
                            .map_err(db_err)?
                            .skip(start)
                            .take(limit)
                        {
                            let env = entry.map_err(db_err)?.0.value().2;
                            if let Some(v) = records.get((stack, env)).map_err(db_err)? {
                                out.push(decode(stack, env, v.value())?);
                            }
                        }
                    }
                }
                Ok(out)
            })
            .await?;
        Ok((page, total))
    }

    async fn forget_stack_statuses(&self, stack: u64, envs: &[EnvId]) -> Result<(), StoreError> {
        let envs = envs.to_vec();
        self.write(Durability::Immediate, move |tx| {
            for env in envs {
                forget_one(tx, stack, env)?;
            }
            Ok(((), true))
        })
        .await
    }
}
