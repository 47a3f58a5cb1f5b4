//! The single-node backend: redb in `<dir>/edgeplane.redb`, change notifications through an
//! in-process broadcast.
//!
//! Layout (every table is created when the file is opened, so read transactions never meet a
//! missing table):
//!
//! | table              | key                 | value                                        |
//! | ------------------ | ------------------- | -------------------------------------------- |
//! | `environments`     | id (`u64`)          | JSON of [`Environment`](crate::Environment), edge_id included    |
//! | `meta`             | name (`&str`)       | `next_id:*`: `u64` little-endian; `settings`: JSON of [`Settings`](crate::Settings) |
//! | `groups`, `tags`   | id (`u64`)          | name (`&str`)                                |
//! | `group_tags`       | group id (`u64`)    | JSON list of its tag ids (groups with tags only) |
//! | `admin_key_hashes` | SHA-256 (`[u8; 32]`)| `()`                                         |
//! | `heartbeats`       | id (`u64`)          | ms since the epoch (`u64`)                   |
//! | `snapshots`        | id (`u64`)          | `taken_ms`, `received_ms` (`u64` little-endian each), then the body |
//! | `commands`         | (env id, command id)| JSON of [`StoredCommand`](crate::StoredCommand); ids from [`next_command_id`](crate::next_command_id), with gaps; finished ones beyond the newest [`KEEP_FINISHED_COMMANDS_PER_ENV`](crate::KEEP_FINISHED_COMMANDS_PER_ENV) pruned when queueing |
//! |                    | (env id, 0)         | the queue's counts: unfinished, finished (`u64` little-endian each) |
//! | `edge_groups`      | id (`u64`)          | JSON of [`EdgeGroupRecord`](crate::EdgeGroupRecord) (no members) |
//! | `edge_group_members` | (group id, env id) | `()`: a static group's members            |
//! | `edge_stacks`      | id (`u64`)          | JSON of the stack's record and its newest `version` |
//! | `stack_versions`   | (stack id, version) | JSON of a [`StackVersion`](crate::StackVersion); the newest [`MAX_STACK_VERSIONS`](crate::MAX_STACK_VERSIONS) kept |
//! | `stack_rollouts`   | stack id (`u64`)    | JSON of a [`Rollout`](crate::Rollout) (with its revision) |
//! | `stack_status`     | (stack id, env id)  | JSON of a [`StackStatus`](crate::StackStatus) |
//! | `stack_status_by`  | (stack, status code, env) | `()`: statuses by status, for paging |
//! | `stack_counts`     | (stack, status code, version) | how many environments (`u64`), kept with every write |
//! | `env_stacks`       | (env id, stack id)  | `()`: so a deleted environment's statuses go with it |
//! | `env_edge_groups`  | (env id, group id)  | `()`: the same by environment, so a deleted environment leaves its groups in its own transaction |
//!
//! The `meta` table also holds `cluster_secret`: the 32 random bytes of
//! [`TunnelStore::cluster_secret`](crate::TunnelStore::cluster_secret), created by the first caller.
//!
//! redb serialises write transactions, so every read-check-write below (binding and its join
//! secret check, name uniqueness, max-heartbeat, the fields an update keeps, replacing the
//! admin key set, keeping the newest snapshot of an existing environment) is atomic simply by
//! happening inside one write transaction.
//!
//! Every transaction runs on the store's own [`READERS`](workers::READERS) + 1 threads, writes
//! on `store-write` and reads on `store-read-<n>`, each side fed through a bounded queue
//! ([`workers`]); dropping the store waits for them, so its file is closed when it is gone.
//!
//! What only lives as long as a lease (tunnel grants, tunnel locations, gateway
//! registrations) is not written to disk at all: it sits in memory behind a mutex, each entry
//! with an [`Instant`](std::time::Instant) deadline that every read checks, and expired entries are purged now and
//! then so that nothing grows without bound. A restart forgets all of it, which is right: the
//! tunnels and gateways of a single node die with it. Tunnel epochs come from one counter for
//! all environments, seeded from the clock in microseconds when the store opens and moved at
//! least one past the clock on every claim, so they keep growing across restarts too (unless
//! the clock goes back, or claims outran it by more than the restart took).

mod catalog;
mod commands;
mod edge_groups;
mod edge_stacks;
mod environments;
mod leases;
mod records;
mod stack_status;
mod workers;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use leases::Leases;
use parking_lot::{Mutex, MutexGuard};
use redb::{Database, Durability, TableDefinition, WriteTransaction};
use tokio::sync::broadcast;

use crate::{Backend, Change, StoreError, CHANGE_CHANNEL_CAPACITY};

/// File name inside the data dir.
pub const FILE_NAME: &str = "edgeplane.redb";

const ENVIRONMENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("environments");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const GROUPS: TableDefinition<'_, u64, &str> = TableDefinition::new("groups");
const TAGS: TableDefinition<'_, u64, &str> = TableDefinition::new("tags");
/// Group id -> its tag ids (JSON list), for groups that have any.
const GROUP_TAGS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("group_tags");
const ADMIN_KEY_HASHES: TableDefinition<'_, &[u8; 32], ()> =
    TableDefinition::new("admin_key_hashes");
const HEARTBEATS: TableDefinition<'_, u64, u64> = TableDefinition::new("heartbeats");
const SNAPSHOTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("snapshots");
const COMMANDS: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("commands");
/// Edge group id -> its record (JSON); members are keys of the next two tables.
const EDGE_GROUPS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("edge_groups");
/// (edge group, environment) of static groups.
const EDGE_GROUP_MEMBERS: TableDefinition<'_, (u64, u64), ()> =
    TableDefinition::new("edge_group_members");
/// (environment, edge group): the same, by environment.
const ENV_EDGE_GROUPS: TableDefinition<'_, (u64, u64), ()> =
    TableDefinition::new("env_edge_groups");
/// Edge stack id -> its record and newest version (JSON).
const EDGE_STACKS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("edge_stacks");
/// Edge stack id -> its rollout (JSON of a `Rollout`).
const STACK_ROLLOUTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("stack_rollouts");
/// (edge stack, version) -> the version (JSON of a `StackVersion`).
const STACK_VERSIONS: TableDefinition<'_, (u64, u64), &[u8]> =
    TableDefinition::new("stack_versions");
/// (edge stack, environment) -> its status (JSON of a `StackStatus`).
const STACK_STATUS: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("stack_status");
/// (edge stack, status code, environment): the statuses by status, for paging.
const STACK_STATUS_BY: TableDefinition<'_, (u64, u64, u64), ()> =
    TableDefinition::new("stack_status_by");
/// (edge stack, status code, version) -> how many environments.
const STACK_COUNTS: TableDefinition<'_, (u64, u64, u64), u64> =
    TableDefinition::new("stack_counts");
/// (environment, edge stack): the stacks an environment has a status of.
const ENV_STACKS: TableDefinition<'_, (u64, u64), ()> = TableDefinition::new("env_stacks");

// Keys of the `meta` table.
const META_NEXT_ENV_ID: &str = "next_id:environments";
const META_NEXT_GROUP_ID: &str = "next_id:groups";
const META_NEXT_TAG_ID: &str = "next_id:tags";
const META_NEXT_EDGE_GROUP_ID: &str = "next_id:edge_groups";
const META_NEXT_EDGE_STACK_ID: &str = "next_id:edge_stacks";
const META_SETTINGS: &str = "settings";
const META_CLUSTER_SECRET: &str = "cluster_secret";

/// Bytes before the body in a `snapshots` value: `taken_ms` and `received_ms`.
const SNAPSHOT_HEADER: usize = 16;
/// How often (at most) the lease maps are swept for expired entries.
const PURGE_INTERVAL: Duration = Duration::from_secs(10);
/// What a lease too long for [`Instant`](std::time::Instant) is cut down to: "forever", in practice.
const LONGEST_LEASE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

pub struct EmbeddedStore {
    /// Runs every transaction on the store's own threads ([`workers`]).
    workers: workers::Workers,
    #[cfg(test)]
    db: Arc<Database>,
    path: PathBuf,
    changes: broadcast::Sender<Change>,
    leases: Mutex<Leases>,
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
    ///
    /// The file holds every environment's join secret, so it is readable by its owner only
    /// (0600): created so, and tightened (with a log line) when an older one is looser.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::unavailable_by(format!("cannot create data dir {}", dir.display()), e)
        })?;
        let path = dir.join(FILE_NAME);
        let file = private_file(&path)?;
        let db = Database::builder().create_file(file).map_err(db_err)?;

        // Create every table up front: a read transaction cannot create one, and opening a
        // table that was never written would fail with `TableDoesNotExist`.
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(ENVIRONMENTS).map_err(db_err)?;
        tx.open_table(META).map_err(db_err)?;
        tx.open_table(GROUPS).map_err(db_err)?;
        tx.open_table(TAGS).map_err(db_err)?;
        tx.open_table(GROUP_TAGS).map_err(db_err)?;
        tx.open_table(ADMIN_KEY_HASHES).map_err(db_err)?;
        tx.open_table(HEARTBEATS).map_err(db_err)?;
        tx.open_table(SNAPSHOTS).map_err(db_err)?;
        tx.open_table(COMMANDS).map_err(db_err)?;
        tx.open_table(EDGE_GROUPS).map_err(db_err)?;
        tx.open_table(EDGE_GROUP_MEMBERS).map_err(db_err)?;
        tx.open_table(ENV_EDGE_GROUPS).map_err(db_err)?;
        tx.open_table(EDGE_STACKS).map_err(db_err)?;
        tx.open_table(STACK_VERSIONS).map_err(db_err)?;
        tx.open_table(STACK_ROLLOUTS).map_err(db_err)?;
        tx.open_table(STACK_STATUS).map_err(db_err)?;
        tx.open_table(STACK_STATUS_BY).map_err(db_err)?;
        tx.open_table(STACK_COUNTS).map_err(db_err)?;
        tx.open_table(ENV_STACKS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;

        tracing::info!(path = %path.display(), "opened embedded store");
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        let db = Arc::new(db);
        Ok(Self {
            workers: workers::Workers::start(Arc::clone(&db), workers::READERS)?,
            #[cfg(test)]
            db,
            path,
            changes,
            leases: Mutex::new(Leases::new()),
        })
    }

    /// The lease maps. Nothing panics while holding the lock, and every update leaves the maps
    /// consistent, so a poisoned lock is still usable.
    fn leases(&self) -> MutexGuard<'_, Leases> {
        self.leases.lock()
    }

    /// Runs blocking redb reads off the async threads, on the store's reader threads
    /// ([`workers`]). Writes go through [`EmbeddedStore::write`].
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        self.workers.read(f).await
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
        self.workers
            .write(move |db| {
                let mut tx = db.begin_write().map_err(db_err)?;
                tx.set_durability(durability);
                // A panic inside the transaction is caught here, while `tx` is alive, so that
                // it is aborted the ordinary way when it drops: redb skips its abort for a
                // transaction dropped during an unwinding (2.6 still frees the writer slot
                // then, as the test below shows either way; this does not depend on it).
                let (out, changed) =
                    catch_unwind(AssertUnwindSafe(|| f(&tx))).map_err(|_| {
                        tracing::error!("an embedded store write panicked; it was aborted");
                        StoreError::unavailable("embedded store write panicked")
                    })??;
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

/// Opens `path` for reading and writing, created with mode 0600 if missing; an existing file
/// readable or writable by others is tightened to 0600. A file of another owner cannot be
/// tightened: that is logged, not fatal (the process can use it, so it is the operator's call).
fn private_file(path: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::unavailable_by(format!("cannot open {}", path.display()), e))?;
    let mode = file
        .metadata()
        .map_err(|e| StoreError::unavailable_by(format!("cannot stat {}", path.display()), e))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        match file.set_permissions(std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                from = format!("{mode:04o}"),
                to = "0600",
                "tightened the embedded store's file mode: it holds join secrets"
            ),
            Err(error) => tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:04o}"),
                %error,
                "cannot tighten the embedded store's file mode to 0600: it holds join secrets"
            ),
        }
    }
    Ok(file)
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
        | redb::Error::TableIsNotMultimap(_) => StoreError::corrupt_by("", e),
        other => StoreError::unavailable_by("", other),
    }
}

#[async_trait]
impl Backend for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
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
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn the_store_file_is_private() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = EmbeddedStore::open(dir.path()).expect("open");
        assert_eq!(mode(&dir.path().join(FILE_NAME)), 0o600, "a new file");
        let tx = store.db.begin_write().expect("write");
        tx.open_table(META)
            .expect("meta")
            .insert("probe", b"kept".as_slice())
            .expect("insert");
        tx.commit().expect("commit");
        drop(store);

        // A file made by an older version (or by hand) with 0644 is tightened, and its
        // contents are kept.
        let path = dir.path().join(FILE_NAME);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let store = EmbeddedStore::open(dir.path()).expect("reopen");
        assert_eq!(mode(&path), 0o600, "an existing 0644 file");
        let tx = store.db.begin_read().expect("read");
        let meta = tx.open_table(META).expect("meta");
        let probe = meta.get("probe").expect("get").expect("the record is kept");
        assert_eq!(probe.value(), b"kept");
    }

    #[tokio::test]
    async fn a_write_that_panics_is_aborted_and_the_next_one_goes_through() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let put = |key: &'static str, panics: bool| {
            store.write(Durability::Immediate, move |tx| {
                tx.open_table(META)
                    .map_err(db_err)?
                    .insert(key, b"value".as_slice())
                    .map_err(db_err)?;
                assert!(!panics, "a bug inside the transaction");
                Ok(((), true))
            })
        };
        // More panics than there are threads: none may keep redb's writer slot, nor leave
        // its insert for the next transaction to commit.
        for _ in 0..workers::READERS + 2 {
            let failed = put("ghost", true).await;
            assert!(failed.is_err());
        }
        let done = tokio::time::timeout(Duration::from_secs(10), put("probe", false)).await;
        done.expect("the writer slot is free").expect("write");
        let get = |key: &'static str| {
            store.blocking(move |db| {
                let tx = db.begin_read().map_err(db_err)?;
                let meta = tx.open_table(META).map_err(db_err)?;
                let found = meta.get(key).map_err(db_err)?.is_some();
                Ok(found)
            })
        };
        assert!(get("probe").await.expect("read"), "the good write is there");
        assert!(
            !get("ghost").await.expect("read"),
            "the panicked ones are not"
        );
    }
}
