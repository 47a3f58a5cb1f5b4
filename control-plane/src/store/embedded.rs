//! The single-node backend: redb in `<dir>/edgeplane.redb`, change notifications through an
//! in-process broadcast.
//!
//! Layout (every table is created when the file is opened, so read transactions never meet a
//! missing table):
//!
//! | table              | key                 | value                                        |
//! | ------------------ | ------------------- | -------------------------------------------- |
//! | `environments`     | id (`u64`)          | JSON of [`Environment`], edge_id included    |
//! | `meta`             | name (`&str`)       | `next_id:*`: `u64` little-endian; `settings`: JSON of [`Settings`] |
//! | `groups`, `tags`   | id (`u64`)          | name (`&str`)                                |
//! | `admin_key_hashes` | SHA-256 (`[u8; 32]`)| `()`                                         |
//! | `heartbeats`       | id (`u64`)          | ms since the epoch (`u64`)                   |
//!
//! redb serialises write transactions, so every read-check-write below (binding and its join
//! secret check, name uniqueness, max-heartbeat, the fields an update keeps, replacing the
//! admin key set) is atomic simply by happening inside one write transaction.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::{
    BindOutcome, Change, Collection, EnvId, Environment, Named, NewEnvironment, Settings, Store,
    StoreError, CHANGE_CHANNEL_CAPACITY,
};

/// File name inside the data dir.
pub const FILE_NAME: &str = "edgeplane.redb";

const ENVIRONMENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("environments");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const GROUPS: TableDefinition<'_, u64, &str> = TableDefinition::new("groups");
const TAGS: TableDefinition<'_, u64, &str> = TableDefinition::new("tags");
const ADMIN_KEY_HASHES: TableDefinition<'_, &[u8; 32], ()> =
    TableDefinition::new("admin_key_hashes");
const HEARTBEATS: TableDefinition<'_, u64, u64> = TableDefinition::new("heartbeats");

// Keys of the `meta` table.
const META_NEXT_ENV_ID: &str = "next_id:environments";
const META_NEXT_GROUP_ID: &str = "next_id:groups";
const META_NEXT_TAG_ID: &str = "next_id:tags";
const META_SETTINGS: &str = "settings";

pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    changes: broadcast::Sender<Change>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) `<dir>/edgeplane.redb`, creating `dir` if needed. Blocking: call it at
    /// start-up, not from a busy async task.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path).map_err(db_err)?;

        // Create every table up front: a read transaction cannot create one, and opening a
        // table that was never written would fail with `TableDoesNotExist`.
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(ENVIRONMENTS).map_err(db_err)?;
        tx.open_table(META).map_err(db_err)?;
        tx.open_table(GROUPS).map_err(db_err)?;
        tx.open_table(TAGS).map_err(db_err)?;
        tx.open_table(ADMIN_KEY_HASHES).map_err(db_err)?;
        tx.open_table(HEARTBEATS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;

        tracing::info!(path = %path.display(), "opened embedded store");
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        Ok(Self {
            db: Arc::new(db),
            path,
            changes,
        })
    }

    /// Runs blocking redb work off the async threads.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Unavailable(format!("embedded store task failed: {e}")))?
    }

    /// Runs `f` in one write transaction. `f` returns its result and whether it changed
    /// anything: an unchanged transaction is aborted rather than committed, which spares a
    /// disk sync on the many no-op paths (re-binding the same ID, updating a missing record).
    /// An error aborts too (dropping a `WriteTransaction` aborts it).
    async fn write<T, F>(&self, durability: Durability, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&WriteTransaction) -> Result<(T, bool), StoreError> + Send + 'static,
        T: Send + 'static,
    {
        self.blocking(move |db| {
            let mut tx = db.begin_write().map_err(db_err)?;
            tx.set_durability(durability);
            let (out, changed) = f(&tx)?;
            if changed {
                tx.commit().map_err(db_err)?;
            } else {
                tx.abort().map_err(db_err)?;
            }
            Ok(out)
        })
        .await
    }
}

/// redb's own corruption reports are permanent; everything else (I/O, lock, a transaction
/// still in use) may go away on a retry.
fn db_err(e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    match e {
        redb::Error::Corrupted(_)
        | redb::Error::UpgradeRequired(_)
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TypeDefinitionChanged { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_) => StoreError::Corrupt(e.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn decode_env(id: u64, bytes: &[u8]) -> Result<Environment, StoreError> {
    let env: Environment = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("environment {id}: {e}")))?;
    if env.id != id {
        return Err(StoreError::Corrupt(format!(
            "environment {id} is stored with id {}",
            env.id
        )));
    }
    Ok(env)
}

fn encode_env(env: &Environment) -> Result<Vec<u8>, StoreError> {
    // Serialising plain data cannot fail in practice; map it anyway rather than panic.
    serde_json::to_vec(env).map_err(|e| StoreError::Corrupt(format!("environment {}: {e}", env.id)))
}

fn decode_counter(key: &str, bytes: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| {
        StoreError::Corrupt(format!(
            "meta {key}: expected 8 bytes, found {}",
            bytes.len()
        ))
    })?;
    Ok(u64::from_le_bytes(arr))
}

/// Reserves `n` consecutive ids from the counter `key` (ids start at 1) and returns the first.
fn reserve_ids(tx: &WriteTransaction, key: &str, n: u64) -> Result<u64, StoreError> {
    let mut meta = tx.open_table(META).map_err(db_err)?;
    let first = match meta.get(key).map_err(db_err)? {
        Some(v) => decode_counter(key, v.value())?,
        None => 1,
    };
    let next = first
        .checked_add(n)
        .ok_or_else(|| StoreError::Corrupt(format!("meta {key}: id space exhausted")))?;
    meta.insert(key, next.to_le_bytes().as_slice())
        .map_err(db_err)?;
    Ok(first)
}

fn named_table(coll: Collection) -> (TableDefinition<'static, u64, &'static str>, &'static str) {
    match coll {
        Collection::Groups => (GROUPS, META_NEXT_GROUP_ID),
        Collection::Tags => (TAGS, META_NEXT_TAG_ID),
    }
}

fn coll_name(coll: Collection) -> &'static str {
    match coll {
        Collection::Groups => "group",
        Collection::Tags => "tag",
    }
}

/// The id holding `name` in a named table, if any. Collections are small (tens to hundreds of
/// entries), so a scan inside the write transaction is cheaper than maintaining an index.
fn find_name(
    table: &impl ReadableTable<u64, &'static str>,
    name: &str,
) -> Result<Option<u64>, StoreError> {
    for entry in table.iter().map_err(db_err)? {
        let (id, n) = entry.map_err(db_err)?;
        if n.value() == name {
            return Ok(Some(id.value()));
        }
    }
    Ok(None)
}

#[async_trait]
impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

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
                if envs.get(id).map_err(db_err)?.is_none() {
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

    async fn create_named(&self, coll: Collection, name: &str) -> Result<Named, StoreError> {
        let name = name.to_owned();
        self.write(Durability::Immediate, move |tx| {
            let (def, counter) = named_table(coll);
            let mut table = tx.open_table(def).map_err(db_err)?;
            if find_name(&table, &name)?.is_some() {
                // The error aborts the transaction, so no id is burnt either.
                return Err(StoreError::Conflict(format!(
                    "a {} named {name:?} already exists",
                    coll_name(coll)
                )));
            }
            let id = reserve_ids(tx, counter, 1)?;
            table.insert(id, name.as_str()).map_err(db_err)?;
            Ok((Named { id, name }, true))
        })
        .await
    }

    async fn list_named(&self, coll: Collection) -> Result<Vec<Named>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(named_table(coll).0).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(db_err)? {
                let (id, name) = entry.map_err(db_err)?;
                out.push(Named {
                    id: id.value(),
                    name: name.value().to_owned(),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn rename_named(
        &self,
        coll: Collection,
        id: u64,
        name: &str,
    ) -> Result<Option<Named>, StoreError> {
        let name = name.to_owned();
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(named_table(coll).0).map_err(db_err)?;
            if table.get(id).map_err(db_err)?.is_none() {
                return Ok((None, false));
            }
            match find_name(&table, &name)? {
                // Renaming to its own name is a no-op, not a conflict.
                Some(holder) if holder == id => return Ok((Some(Named { id, name }), false)),
                Some(_) => {
                    return Err(StoreError::Conflict(format!(
                        "a {} named {name:?} already exists",
                        coll_name(coll)
                    )));
                }
                None => {}
            }
            table.insert(id, name.as_str()).map_err(db_err)?;
            Ok((Some(Named { id, name }), true))
        })
        .await
    }

    async fn delete_named(&self, coll: Collection, id: u64) -> Result<bool, StoreError> {
        self.write(Durability::Immediate, move |tx| {
            let existed = tx
                .open_table(named_table(coll).0)
                .map_err(db_err)?
                .remove(id)
                .map_err(db_err)?
                .is_some();
            Ok((existed, existed))
        })
        .await
    }

    async fn settings(&self) -> Result<Settings, StoreError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let meta = tx.open_table(META).map_err(db_err)?;
            match meta.get(META_SETTINGS).map_err(db_err)? {
                Some(v) => serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt(format!("settings: {e}"))),
                None => Ok(Settings::default()),
            }
        })
        .await
    }

    async fn put_settings(&self, settings: &Settings) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(settings)
            .map_err(|e| StoreError::Corrupt(format!("settings: {e}")))?;
        self.write(Durability::Immediate, move |tx| {
            tx.open_table(META)
                .map_err(db_err)?
                .insert(META_SETTINGS, bytes.as_slice())
                .map_err(db_err)?;
            Ok(((), true))
        })
        .await
    }

    async fn admin_key_hashes(&self) -> Result<Vec<[u8; 32]>, StoreError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(ADMIN_KEY_HASHES).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(db_err)? {
                let (hash, ()) = entry
                    .map(|(k, v)| (*k.value(), v.value()))
                    .map_err(db_err)?;
                out.push(hash);
            }
            Ok(out)
        })
        .await
    }

    async fn replace_admin_key_hashes(&self, hashes: &[[u8; 32]]) -> Result<(), StoreError> {
        let wanted: BTreeSet<[u8; 32]> = hashes.iter().copied().collect();
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(ADMIN_KEY_HASHES).map_err(db_err)?;
            // Drop what is not wanted, add what is missing; `changed` stays false when the set
            // is already right (every restart with the same key), which skips the commit.
            let mut changed = false;
            table
                .retain(|hash, ()| {
                    let keep = wanted.contains(hash);
                    changed |= !keep;
                    keep
                })
                .map_err(db_err)?;
            for hash in &wanted {
                if table.insert(hash, ()).map_err(db_err)?.is_none() {
                    changed = true;
                }
            }
            Ok(((), changed))
        })
        .await
    }

    async fn publish(&self, change: Change) -> Result<(), StoreError> {
        // No subscriber is not an error: nobody needed to hear it.
        let _ = self.changes.send(change);
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // A read transaction proves the file and its lock are still usable.
        self.blocking(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            tx.open_table(META).map_err(db_err)?;
            Ok(())
        })
        .await
    }
}
