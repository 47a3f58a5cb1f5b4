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
//! | `snapshots`        | id (`u64`)          | `taken_ms`, `received_ms` (`u64` little-endian each), then the body |
//! | `commands`         | (env id, command id)| JSON of [`StoredCommand`]                    |
//!
//! The `meta` table also holds `cluster_secret`: the 32 random bytes of
//! [`Store::cluster_secret`], created by the first caller.
//!
//! redb serialises write transactions, so every read-check-write below (binding and its join
//! secret check, name uniqueness, max-heartbeat, the fields an update keeps, replacing the
//! admin key set, keeping the newest snapshot of an existing environment) is atomic simply by
//! happening inside one write transaction.
//!
//! What only lives as long as a lease (tunnel grants, tunnel locations, gateway
//! registrations) is not written to disk at all: it sits in memory behind a mutex, each entry
//! with an [`Instant`] deadline that every read checks, and expired entries are purged now and
//! then so that nothing grows without bound. A restart forgets all of it, which is right: the
//! tunnels and gateways of a single node die with it. Tunnel epochs come from one counter for
//! all environments, seeded from the clock in microseconds when the store opens and moved at
//! least one past the clock on every claim, so they keep growing across restarts too (unless
//! the clock goes back, or claims outran it by more than the restart took).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rand::RngCore;
use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::broadcast;
use uuid::Uuid;

use proto::async_mode::{Action, CommandResult};

use super::{
    BindOutcome, Change, Collection, EnvId, Environment, GatewayInfo, Named, NewEnvironment,
    Settings, Store, StoreError, StoredCommand, StoredSnapshot, TunnelGrant, TunnelLocation,
    CHANGE_CHANNEL_CAPACITY, MAX_COMMANDS_PER_ENV,
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
const SNAPSHOTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("snapshots");
const COMMANDS: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("commands");

// Keys of the `meta` table.
const META_NEXT_ENV_ID: &str = "next_id:environments";
const META_NEXT_GROUP_ID: &str = "next_id:groups";
const META_NEXT_TAG_ID: &str = "next_id:tags";
const META_SETTINGS: &str = "settings";
const META_CLUSTER_SECRET: &str = "cluster_secret";

/// Bytes before the body in a `snapshots` value: `taken_ms` and `received_ms`.
const SNAPSHOT_HEADER: usize = 16;
/// How often (at most) the lease maps are swept for expired entries.
const PURGE_INTERVAL: Duration = Duration::from_secs(10);
/// What a lease too long for [`Instant`] is cut down to: "forever", in practice.
const LONGEST_LEASE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    changes: broadcast::Sender<Change>,
    leases: Mutex<Leases>,
}

/// Everything that lives only as long as a lease; see the module doc.
struct Leases {
    grants: HashMap<[u8; 32], (TunnelGrant, Instant)>,
    tunnels: HashMap<EnvId, (TunnelLocation, Instant)>,
    gateways: HashMap<String, (GatewayInfo, Instant)>,
    /// The last tunnel epoch handed out (for any environment).
    last_epoch: u64,
    next_purge: Instant,
}

impl Leases {
    fn new() -> Self {
        Self {
            grants: HashMap::new(),
            tunnels: HashMap::new(),
            gateways: HashMap::new(),
            last_epoch: clock_epoch(),
            next_purge: Instant::now() + PURGE_INTERVAL,
        }
    }

    /// Drops every expired entry, at most once per [`PURGE_INTERVAL`]: reads check deadlines
    /// themselves, this only keeps abandoned entries from piling up.
    fn purge(&mut self, now: Instant) {
        if now < self.next_purge {
            return;
        }
        self.grants.retain(|_, (_, deadline)| *deadline > now);
        self.tunnels.retain(|_, (_, deadline)| *deadline > now);
        self.gateways.retain(|_, (_, deadline)| *deadline > now);
        self.next_purge = now + PURGE_INTERVAL;
    }

    /// The live location of `env`, if any.
    fn live_tunnel(&self, env: EnvId, now: Instant) -> Option<&TunnelLocation> {
        self.tunnels
            .get(&env)
            .filter(|(_, deadline)| *deadline > now)
            .map(|(loc, _)| loc)
    }
}

/// The clock in microseconds since the Unix epoch (0 if it is set before 1970): the floor of
/// every tunnel epoch, so epochs keep growing across restarts. Microseconds leave room for a
/// million claims a second before the counter runs ahead of the clock, and stay below 2^53
/// (exact in a double, e.g. in JavaScript) until the 23rd century.
fn clock_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// When a lease of `ttl` taken at `now` ends.
fn deadline(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl.min(LONGEST_LEASE)).unwrap_or(now)
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
        tx.open_table(SNAPSHOTS).map_err(db_err)?;
        tx.open_table(COMMANDS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;

        tracing::info!(path = %path.display(), "opened embedded store");
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        Ok(Self {
            db: Arc::new(db),
            path,
            changes,
            leases: Mutex::new(Leases::new()),
        })
    }

    /// The lease maps. Nothing panics while holding the lock, and every update leaves the maps
    /// consistent, so a poisoned lock is still usable.
    fn leases(&self) -> MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
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

fn decode_command(env: EnvId, bytes: &[u8]) -> Result<StoredCommand, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("a command of environment {env}: {e}")))
}

fn encode_command(env: EnvId, cmd: &StoredCommand) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(cmd)
        .map_err(|e| StoreError::Corrupt(format!("command {} of environment {env}: {e}", cmd.id)))
}

/// Whether environment `env` exists, read inside the write transaction that depends on it.
fn env_exists(tx: &WriteTransaction, env: EnvId) -> Result<bool, StoreError> {
    Ok(tx
        .open_table(ENVIRONMENTS)
        .map_err(db_err)?
        .get(env)
        .map_err(db_err)?
        .is_some())
}

/// The first and last command ids of `env` (ids are contiguous: commands are only removed
/// with their environment).
fn command_bounds<T>(table: &T, env: EnvId) -> Result<Option<(u64, u64)>, StoreError>
where
    T: ReadableTable<(u64, u64), &'static [u8]>,
{
    let mut range = table.range((env, 0)..=(env, u64::MAX)).map_err(db_err)?;
    let first = range.next().transpose().map_err(db_err)?;
    let last = range.next_back().transpose().map_err(db_err)?;
    Ok(match (first, last) {
        (Some(f), Some(l)) => Some((f.0.value().1, l.0.value().1)),
        (Some(f), None) => Some((f.0.value().1, f.0.value().1)),
        _ => None,
    })
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

fn encode_snapshot(snap: &StoredSnapshot) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(SNAPSHOT_HEADER + snap.body.len());
    bytes.extend_from_slice(&snap.taken_ms.to_le_bytes());
    bytes.extend_from_slice(&snap.received_ms.to_le_bytes());
    bytes.extend_from_slice(&snap.body);
    bytes
}

/// `taken_ms` of a stored snapshot, without copying its body.
fn snapshot_taken_ms(env: EnvId, bytes: &[u8]) -> Result<u64, StoreError> {
    bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| snapshot_too_short(env, bytes))
}

fn decode_snapshot(env: EnvId, bytes: &[u8]) -> Result<StoredSnapshot, StoreError> {
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

fn snapshot_too_short(env: EnvId, bytes: &[u8]) -> StoreError {
    StoreError::Corrupt(format!(
        "snapshot of environment {env}: {} bytes, shorter than its {SNAPSHOT_HEADER}-byte header",
        bytes.len()
    ))
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
            tx.open_table(SNAPSHOTS)
                .map_err(db_err)?
                .remove(id)
                .map_err(db_err)?;
            tx.open_table(COMMANDS)
                .map_err(db_err)?
                .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)
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

    async fn put_tunnel_grant(
        &self,
        token_hash: &[u8; 32],
        grant: &TunnelGrant,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        leases
            .grants
            .insert(*token_hash, (grant.clone(), deadline(now, ttl)));
        Ok(())
    }

    async fn take_tunnel_grant(
        &self,
        token_hash: &[u8; 32],
    ) -> Result<Option<TunnelGrant>, StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        // Removed either way: an expired grant is of no use to anyone.
        Ok(leases
            .grants
            .remove(token_hash)
            .filter(|(_, deadline)| *deadline > now)
            .map(|(grant, _)| grant))
    }

    async fn claim_tunnel(
        &self,
        env: EnvId,
        gateway_id: &str,
        dial_addr: &str,
        since_ms: u64,
        lease: Duration,
    ) -> Result<TunnelLocation, StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        let epoch = leases
            .last_epoch
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt("tunnel epochs exhausted".to_owned()))?
            .max(clock_epoch());
        leases.last_epoch = epoch;
        let location = TunnelLocation {
            env,
            gateway_id: gateway_id.to_owned(),
            dial_addr: dial_addr.to_owned(),
            epoch,
            since_ms,
        };
        leases
            .tunnels
            .insert(env, (location.clone(), deadline(now, lease)));
        Ok(location)
    }

    async fn renew_tunnels(
        &self,
        gateway_id: &str,
        held: &[(EnvId, u64)],
        lease: Duration,
    ) -> Result<Vec<EnvId>, StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        let until = deadline(now, lease);
        let mut lost = Vec::new();
        for &(env, epoch) in held {
            match leases.tunnels.get_mut(&env) {
                Some((loc, deadline))
                    if *deadline > now && loc.epoch == epoch && loc.gateway_id == gateway_id =>
                {
                    *deadline = until;
                }
                _ => lost.push(env),
            }
        }
        Ok(lost)
    }

    async fn release_tunnel(&self, env: EnvId, epoch: u64) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        if leases
            .live_tunnel(env, now)
            .is_some_and(|loc| loc.epoch == epoch)
        {
            leases.tunnels.remove(&env);
            return Ok(true);
        }
        Ok(false)
    }

    async fn tunnel_locations(
        &self,
        ids: &[EnvId],
    ) -> Result<Vec<Option<TunnelLocation>>, StoreError> {
        let now = Instant::now();
        let leases = self.leases();
        Ok(ids
            .iter()
            .map(|&env| leases.live_tunnel(env, now).cloned())
            .collect())
    }

    async fn register_gateway(
        &self,
        info: &GatewayInfo,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        leases
            .gateways
            .insert(info.id.clone(), (info.clone(), deadline(now, lease)));
        Ok(())
    }

    async fn unregister_gateway(&self, id: &str) -> Result<(), StoreError> {
        self.leases().gateways.remove(id);
        Ok(())
    }

    async fn live_gateways(&self) -> Result<Vec<GatewayInfo>, StoreError> {
        let now = Instant::now();
        let mut leases = self.leases();
        leases.purge(now);
        let mut live: Vec<GatewayInfo> = leases
            .gateways
            .values()
            .filter(|(_, deadline)| *deadline > now)
            .map(|(info, _)| info.clone())
            .collect();
        drop(leases);
        live.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }

    async fn cluster_secret(&self) -> Result<[u8; 32], StoreError> {
        fn decode(bytes: &[u8]) -> Result<[u8; 32], StoreError> {
            <[u8; 32]>::try_from(bytes).map_err(|_| {
                StoreError::Corrupt(format!(
                    "meta {META_CLUSTER_SECRET}: expected 32 bytes, found {}",
                    bytes.len()
                ))
            })
        }

        let stored = self
            .blocking(|db| {
                let tx = db.begin_read().map_err(db_err)?;
                let meta = tx.open_table(META).map_err(db_err)?;
                let value = meta.get(META_CLUSTER_SECRET).map_err(db_err)?;
                value.map(|v| decode(v.value())).transpose()
            })
            .await?;
        if let Some(secret) = stored {
            return Ok(secret);
        }
        let mut fresh = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut fresh)
            .map_err(|e| StoreError::Unavailable(format!("no randomness for the secret: {e}")))?;
        // Checked again inside the write transaction: of two first callers, the second one
        // gets the secret the first one stored.
        self.write(Durability::Immediate, move |tx| {
            let mut meta = tx.open_table(META).map_err(db_err)?;
            let existing = meta
                .get(META_CLUSTER_SECRET)
                .map_err(db_err)?
                .map(|v| decode(v.value()))
                .transpose()?;
            if let Some(secret) = existing {
                return Ok((secret, false));
            }
            meta.insert(META_CLUSTER_SECRET, fresh.as_slice())
                .map_err(db_err)?;
            Ok((fresh, true))
        })
        .await
    }

    async fn put_snapshot(&self, env: EnvId, snap: &StoredSnapshot) -> Result<bool, StoreError> {
        let bytes = encode_snapshot(snap);
        let taken_ms = snap.taken_ms;
        // Like heartbeats, snapshots are replaced by the next one soon: losing the last ones
        // to a power cut only shows an older snapshot for a while, so skip the fsync.
        self.write(Durability::Eventual, move |tx| {
            if !env_exists(tx, env)? {
                return Ok((false, false));
            }
            let mut table = tx.open_table(SNAPSHOTS).map_err(db_err)?;
            let stored_taken = table
                .get(env)
                .map_err(db_err)?
                .map(|v| snapshot_taken_ms(env, v.value()))
                .transpose()?;
            if stored_taken.is_some_and(|stored| stored > taken_ms) {
                return Ok((true, false));
            }
            table.insert(env, bytes.as_slice()).map_err(db_err)?;
            Ok((true, true))
        })
        .await
    }

    async fn snapshot(&self, env: EnvId) -> Result<Option<StoredSnapshot>, StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(SNAPSHOTS).map_err(db_err)?;
            let value = table.get(env).map_err(db_err)?;
            value.map(|v| decode_snapshot(env, v.value())).transpose()
        })
        .await
    }

    async fn queue_command(
        &self,
        env: EnvId,
        action: &Action,
        now_ms: u64,
    ) -> Result<Option<StoredCommand>, StoreError> {
        let action = action.clone();
        // Immediate: a command the API acknowledged must survive a power cut.
        self.write(Durability::Immediate, move |tx| {
            if !env_exists(tx, env)? {
                return Ok((None, false));
            }
            let mut table = tx.open_table(COMMANDS).map_err(db_err)?;
            let bounds = command_bounds(&table, env)?;
            if bounds.is_some_and(|(first, last)| last - first + 1 >= MAX_COMMANDS_PER_ENV) {
                return Err(StoreError::Conflict(format!(
                    "environment {env} already holds {MAX_COMMANDS_PER_ENV} commands"
                )));
            }
            let cmd = StoredCommand {
                id: bounds.map_or(1, |(_, last)| last + 1),
                action,
                created_ms: now_ms,
                sent_ms: None,
                finished_ms: None,
                error: None,
            };
            table
                .insert((env, cmd.id), encode_command(env, &cmd)?.as_slice())
                .map_err(db_err)?;
            Ok((Some(cmd), true))
        })
        .await
    }

    async fn list_commands(
        &self,
        env: EnvId,
        start: u64,
        limit: u64,
    ) -> Result<(Vec<StoredCommand>, u64), StoreError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(db_err)?;
            let table = tx.open_table(COMMANDS).map_err(db_err)?;
            let total = command_bounds(&table, env)?.map_or(0, |(first, last)| last - first + 1);
            let mut out = Vec::new();
            let range = table.range((env, 0)..=(env, u64::MAX)).map_err(db_err)?;
            for entry in range.rev().skip(start as usize).take(limit as usize) {
                let (_, v) = entry.map_err(db_err)?;
                out.push(decode_command(env, v.value())?);
            }
            Ok((out, total))
        })
        .await
    }

    async fn deliver_commands(
        &self,
        env: EnvId,
        after: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredCommand>, StoreError> {
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(COMMANDS).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table
                .range((env, after.saturating_add(1))..=(env, u64::MAX))
                .map_err(db_err)?
            {
                let (_, v) = entry.map_err(db_err)?;
                let cmd = decode_command(env, v.value())?;
                if cmd.finished_ms.is_none() {
                    out.push(cmd);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            let mut changed = false;
            for cmd in &mut out {
                if cmd.sent_ms.is_none() {
                    cmd.sent_ms = Some(now_ms);
                    table
                        .insert((env, cmd.id), encode_command(env, cmd)?.as_slice())
                        .map_err(db_err)?;
                    changed = true;
                }
            }
            Ok((out, changed))
        })
        .await
    }

    async fn finish_commands(
        &self,
        env: EnvId,
        results: &[CommandResult],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let results = results.to_vec();
        self.write(Durability::Immediate, move |tx| {
            let mut table = tx.open_table(COMMANDS).map_err(db_err)?;
            let mut changed = false;
            for r in &results {
                let Some(mut cmd) = table
                    .get((env, r.id))
                    .map_err(db_err)?
                    .map(|v| decode_command(env, v.value()))
                    .transpose()?
                else {
                    continue;
                };
                if cmd.finish(r, now_ms) {
                    table
                        .insert((env, cmd.id), encode_command(env, &cmd)?.as_slice())
                        .map_err(db_err)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn location(env: EnvId) -> TunnelLocation {
        TunnelLocation {
            env,
            gateway_id: "gw".to_owned(),
            dial_addr: "gw:1".to_owned(),
            epoch: 1,
            since_ms: 0,
        }
    }

    #[test]
    fn purge_drops_expired_leases_but_not_too_often() {
        let mut leases = Leases::new();
        let now = Instant::now();
        let (past, future) = (now, now + Duration::from_secs(60));
        let grant = TunnelGrant {
            env: 1,
            edge_id: Uuid::nil(),
            expires_ms: 0,
        };
        leases.grants.insert([1; 32], (grant.clone(), past));
        leases.grants.insert([2; 32], (grant, future));
        leases.tunnels.insert(1, (location(1), past));
        leases.tunnels.insert(2, (location(2), future));
        let gw = GatewayInfo {
            id: "gw".to_owned(),
            public_addr: "gw:443".to_owned(),
            dial_addr: "gw:1".to_owned(),
            tunnels: 0,
        };
        leases.gateways.insert("old".to_owned(), (gw.clone(), past));
        leases.gateways.insert("new".to_owned(), (gw, future));

        // Not yet time for a sweep: nothing is touched.
        leases.purge(now);
        assert_eq!(
            (
                leases.grants.len(),
                leases.tunnels.len(),
                leases.gateways.len()
            ),
            (2, 2, 2)
        );

        let later = now + PURGE_INTERVAL;
        leases.purge(later);
        assert!(leases.grants.contains_key(&[2; 32]) && leases.grants.len() == 1);
        assert!(leases.tunnels.contains_key(&2) && leases.tunnels.len() == 1);
        assert!(leases.gateways.contains_key("new") && leases.gateways.len() == 1);
        assert_eq!(leases.next_purge, later + PURGE_INTERVAL);
        assert!(leases.live_tunnel(2, later).is_some());
        assert!(
            leases.live_tunnel(2, future).is_none(),
            "a deadline is exclusive"
        );
    }

    #[test]
    fn epochs_start_from_the_clock() {
        let before = clock_epoch();
        let leases = Leases::new();
        assert!(leases.last_epoch >= before);
        assert!(before > 1_600_000_000_000_000, "microseconds: {before}");
    }

    #[test]
    fn huge_leases_do_not_overflow() {
        let now = Instant::now();
        assert!(deadline(now, Duration::MAX) > now + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(deadline(now, Duration::ZERO), now);
    }
}
