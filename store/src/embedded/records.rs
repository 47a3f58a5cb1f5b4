//! How records become bytes in the tables (JSON for records, little-endian for counters and
//! snapshot headers), and the id counters of the `meta` table.

use redb::{ReadableTable, WriteTransaction};

use super::{db_err, META, SNAPSHOT_HEADER};
use crate::{EnvId, Environment, StoreError, StoredCommand, StoredSnapshot};

pub(super) fn decode_env(id: u64, bytes: &[u8]) -> Result<Environment, StoreError> {
    let env: Environment = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::corrupt_by(format!("environment {id}"), e))?;
    if env.id != id {
        return Err(StoreError::corrupt(format!(
            "environment {id} is stored with id {}",
            env.id
        )));
    }
    Ok(env)
}

pub(super) fn decode_command(env: EnvId, bytes: &[u8]) -> Result<StoredCommand, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::corrupt_by(format!("a command of environment {env}"), e))
}

/// Whether a stored command is finished, without decoding its action.
pub(super) fn command_finished(env: EnvId, bytes: &[u8]) -> Result<bool, StoreError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Progress {
        finished_ms: Option<u64>,
    }
    let p: Progress = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::corrupt_by(format!("a command of environment {env}"), e))?;
    Ok(p.finished_ms.is_some())
}

/// How many commands an environment's queue holds, stored under command id 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct CommandCounts {
    pub(super) unfinished: u64,
    pub(super) finished: u64,
}

pub(super) fn encode_command_counts(counts: CommandCounts) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&counts.unfinished.to_le_bytes());
    bytes[8..].copy_from_slice(&counts.finished.to_le_bytes());
    bytes
}

pub(super) fn decode_command_counts(env: EnvId, bytes: &[u8]) -> Result<CommandCounts, StoreError> {
    let (Some(unfinished), Some(finished), 16) = (
        bytes.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()),
        bytes.get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok()),
        bytes.len(),
    ) else {
        return Err(StoreError::corrupt(format!(
            "command counts of environment {env}: expected 16 bytes, found {}",
            bytes.len()
        )));
    };
    Ok(CommandCounts {
        unfinished: u64::from_le_bytes(unfinished),
        finished: u64::from_le_bytes(finished),
    })
}

pub(super) fn encode_command(env: EnvId, cmd: &StoredCommand) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(cmd)
        .map_err(|e| StoreError::corrupt_by(format!("command {} of environment {env}", cmd.id), e))
}

pub(super) fn encode_env(env: &Environment) -> Result<Vec<u8>, StoreError> {
    // Serialising plain data cannot fail in practice; map it anyway rather than panic.
    serde_json::to_vec(env)
        .map_err(|e| StoreError::corrupt_by(format!("environment {}", env.id), e))
}

pub(super) fn decode_counter(key: &str, bytes: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| {
        StoreError::corrupt(format!(
            "meta {key}: expected 8 bytes, found {}",
            bytes.len()
        ))
    })?;
    Ok(u64::from_le_bytes(arr))
}

/// Reserves `n` consecutive ids from the counter `key` (ids start at 1) and returns the first.
pub(super) fn reserve_ids(tx: &WriteTransaction, key: &str, n: u64) -> Result<u64, StoreError> {
    let mut meta = tx.open_table(META).map_err(db_err)?;
    let first = match meta.get(key).map_err(db_err)? {
        Some(v) => decode_counter(key, v.value())?,
        None => 1,
    };
    let next = first
        .checked_add(n)
        .ok_or_else(|| StoreError::corrupt(format!("meta {key}: id space exhausted")))?;
    meta.insert(key, next.to_le_bytes().as_slice())
        .map_err(db_err)?;
    Ok(first)
}

pub(super) fn encode_snapshot(snap: &StoredSnapshot) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(SNAPSHOT_HEADER + snap.body.len());
    bytes.extend_from_slice(&snap.taken_ms.to_le_bytes());
    bytes.extend_from_slice(&snap.received_ms.to_le_bytes());
    bytes.extend_from_slice(&snap.body);
    bytes
}

/// `taken_ms` of a stored snapshot, without copying its body.
pub(super) fn snapshot_taken_ms(env: EnvId, bytes: &[u8]) -> Result<u64, StoreError> {
    bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| snapshot_too_short(env, bytes))
}

pub(super) fn decode_snapshot(env: EnvId, bytes: &[u8]) -> Result<StoredSnapshot, StoreError> {
    let (Some(taken), Some(received), Some(body)) = (
        bytes.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()),
        bytes.get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok()),
        bytes.get(SNAPSHOT_HEADER..),
    ) else {
        return Err(snapshot_too_short(env, bytes));
    };
    Ok(StoredSnapshot {
        taken_ms: u64::from_le_bytes(taken),
        received_ms: u64::from_le_bytes(received),
        body: body.to_vec(),
    })
}

pub(super) fn snapshot_too_short(env: EnvId, bytes: &[u8]) -> StoreError {
    StoreError::corrupt(format!(
        "snapshot of environment {env}: {} bytes, shorter than its {SNAPSHOT_HEADER}-byte header",
        bytes.len()
    ))
}

/// The record other than `except` whose name (by `name_of` of its bytes) is `name`, if any:
/// a scan, for tables of tens to hundreds of records (edge groups, edge stacks).
pub(super) fn name_holder(
    table: &impl redb::ReadableTable<u64, &'static [u8]>,
    name: &str,
    except: u64,
    name_of: impl Fn(u64, &[u8]) -> Result<String, StoreError>,
) -> Result<Option<u64>, StoreError> {
    for entry in table.iter().map_err(db_err)? {
        let (id, v) = entry.map_err(db_err)?;
        if id.value() != except && name_of(id.value(), v.value())? == name {
            return Ok(Some(id.value()));
        }
    }
    Ok(None)
}
