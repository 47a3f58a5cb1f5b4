//! The multi-replica backend: Redis through a deadpool-redis pool, change notifications over
//! Redis pub/sub.
//!
//! Every key name is built in `Keys::new` (`keys.rs`); nothing else in the crate knows them. With the
//! default prefix `edgeplane:` they are:
//!
//! | key                         | type    | content                                          |
//! | --------------------------- | ------- | ------------------------------------------------ |
//! | `edgeplane:env`             | hash    | env id -> JSON of the record *without* `edge_id` |
//! | `edgeplane:binding`         | hash    | env id -> bound Edge ID (UUID text)              |
//! | `edgeplane:heartbeats`      | sorted set | env ids scored by their last check-in, ms since the epoch (read by id, and by time for what changed since) |
//! | `edgeplane:seq:env`         | string  | last environment id handed out (INCRBY)          |
//! | `edgeplane:groups`          | hash    | group id -> name                                 |
//! | `edgeplane:groups:names`    | hash    | group name -> id (uniqueness index)              |
//! | `edgeplane:seq:groups`      | string  | last group id handed out                         |
//! | `edgeplane:groups:tags`     | hash    | group id -> JSON list of its tag ids (groups with tags only) |
//! | `edgeplane:tags`            | hash    | tag id -> name                                   |
//! | `edgeplane:tags:names`      | hash    | tag name -> id (uniqueness index)                |
//! | `edgeplane:seq:tags`        | string  | last tag id handed out                           |
//! | `edgeplane:settings`        | string  | JSON of [`Settings`](crate::Settings)                             |
//! | `edgeplane:admin_keys`      | set     | raw 32-byte SHA-256 hashes of admin API keys     |
//! | `edgeplane:snapshot:{id}`   | hash    | `taken_ms`, `received_ms` (decimal), `body` (raw bytes) |
//! | `edgeplane:commands:{id}`   | hash    | `{cmd}` -> JSON of the [`StoredCommand`](crate::StoredCommand) as queued; `{cmd}:sent` -> ms it was first handed out (HSETNX); `{cmd}:done` -> JSON `{finishedMs, error}`, the first result (HSETNX) |
//! | `edgeplane:commands:{id}:ids` | sorted set | the command ids kept, scored by id (order, paging, count; the highest is the newest id) |
//! | `edgeplane:commands:{id}:finished` | sorted set | the finished ones among them, scored by id (the oldest are pruned first) |
//! | `edgeplane:cluster_secret`  | string  | the 32 raw random bytes of [`TunnelStore::cluster_secret`](crate::TunnelStore::cluster_secret) |
//! | `edgeplane:grant:{hash}`    | string  | JSON of a [`TunnelGrant`](crate::TunnelGrant), PX TTL; key ends in the hex SHA-256 of its token |
//! | `edgeplane:tunnel:{id}`     | string  | JSON of a [`TunnelLocation`](crate::TunnelLocation), PX TTL (the holder's lease) |
//! | `edgeplane:seq:tunnel`      | string  | last tunnel epoch handed out, for all environments (INCR, no TTL) |
//! | `edgeplane:gateway:{id}`    | string  | JSON of a [`GatewayInfo`](crate::GatewayInfo), PX TTL (its lease)    |
//! | `edgeplane:gateways`        | set     | ids of registered gateways (pruned when their key has expired) |
//! | `edgeplane:changes`         | channel | pub/sub channel of JSON-encoded [`Change`](crate::Change)s      |
//! | `edgeplane:edge_groups`     | hash    | edge group id -> JSON of [`EdgeGroupRecord`](crate::EdgeGroupRecord) (no members) |
//! | `edgeplane:edge_groups:names` | hash  | edge group name -> id (uniqueness index)         |
//! | `edgeplane:seq:edge_groups` | string  | last edge group id handed out                    |
//! | `edgeplane:edge_group:{id}` | sorted set | a static edge group's members, env ids scored by id |
//! | `edgeplane:edge_stacks`     | hash    | edge stack id -> JSON of [`EdgeStackRecord`](crate::EdgeStackRecord) |
//! | `edgeplane:edge_stacks:names` | hash  | edge stack name -> id (uniqueness index)         |
//! | `edgeplane:edge_stacks:version` | hash | edge stack id -> its newest version (the compare-and-set of a new one) |
//! | `edgeplane:edge_stacks:rollout` | hash | edge stack id -> `revision|JSON` of its [`Rollout`](crate::Rollout) (compare-and-set on the revision) |
//! | `edgeplane:seq:edge_stacks` | string  | last edge stack id handed out                    |
//! | `edgeplane:edge_stack_versions:{id}` | hash | version -> JSON of a [`StackVersion`](crate::StackVersion); the newest [`MAX_STACK_VERSIONS`](crate::MAX_STACK_VERSIONS) kept |
//! | `edgeplane:stack_status:{id}` | hash | env id -> `code|version|updated_ms|` + JSON of its [`StackStatus`](crate::StackStatus) |
//! | `edgeplane:stack_status:{id}:all` | sorted set | env ids with a status, scored by id (paging) |
//! | `edgeplane:stack_status:{id}:by:{code}` | sorted set | env ids at one status (paging by status) |
//! | `edgeplane:stack_counts:{id}` | hash | `code:version` -> how many environments, kept by the scripts |
//! | `edgeplane:env_stacks:{id}` | set   | the stacks an environment has a status of (so its deletion takes them) |
//! | `edgeplane:env_edge_groups:{id}` | set | the static edge groups an environment is in (so its deletion leaves them, `lua/delete_env.lua`) |
//!
//! The binding lives apart from the record so that binding ends in a single HSETNX and a
//! concurrent [`EnvironmentStore::update_environment`](crate::EnvironmentStore::update_environment) (which rewrites the record) can never undo it.
//! Read-check-write rules (bind only existing environments whose join secret is still the one
//! the proof was verified with, updates keep the stored join secret, heartbeats only for
//! existing ones and never backwards, unique names, snapshots only for existing environments
//! and never older ones, tunnel claims with their fresh epoch, renewals and releases only by
//! the current epoch) are small Lua scripts (`lua/*.lua`, each documenting its KEYS and ARGV),
//! which Redis runs atomically.
//!
//! Commands are queued, handed out and finished by scripts too (`lua/queue_command.lua`,
//! `deliver_commands.lua`, `finish_commands.lua`): the id is `max(newest id + 1, queue time
//! in ms × 1000)` ([`next_command_id`](crate::next_command_id)), so an id lost with Redis's
//! last writes is never handed out again; queueing refuses an environment with
//! [`MAX_UNFINISHED_COMMANDS_PER_ENV`](crate::MAX_UNFINISHED_COMMANDS_PER_ENV) unfinished
//! commands and prunes the finished ones beyond the newest
//! [`KEEP_FINISHED_COMMANDS_PER_ENV`](crate::KEEP_FINISHED_COMMANDS_PER_ENV) with all their
//! fields; a result is recorded only for a command still kept.
//!
//! Everything that lives as long as a lease has a relative TTL (`PX`), so the clocks of the
//! hosts involved never matter. Grants are taken with GETDEL (Redis 6.2 or later). Tunnel
//! epochs come from one counter shared by all environments: strictly increasing per
//! environment, never repeated, and no counter key left behind per environment.
//!
//! After the pub/sub connection is lost and restored, changes published in between are gone;
//! the store then sends [`Change::Resync`](crate::Change::Resync) to its local subscribers so that they reload.
//!
//! The scripts touch several keys, so this backend needs a single Redis (or a primary with
//! replicas), not Redis Cluster.

mod catalog;
mod commands;
mod edge_groups;
mod edge_stacks;
mod environments;
mod keys;
mod pubsub;
mod record;
mod scripts;
mod stack_status;
mod tunnels;

use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::redis::{self, AsyncConnectionConfig, Value};
use deadpool_redis::{Manager, Pool, Runtime};
use keys::Keys;
use pubsub::{forward_changes, subscribe_changes, AbortOnDrop};
use scripts::Scripts;
use tokio::sync::broadcast;

use crate::{Backend, Change, StoreError, CHANGE_CHANNEL_CAPACITY};

/// TCP connect (and handshake) budget for a new connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Budget for one command or pipeline. Generous: `list_environments` on a large fleet moves
/// megabytes, and a timeout here only turns a slow answer into an error.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a caller waits for a pooled connection before giving up.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// The pub/sub connection is pinged this often, so a half-open TCP connection (Redis gone
/// without a FIN) is noticed instead of silently delivering nothing forever.
const PUBSUB_KEEPALIVE: Duration = Duration::from_secs(15);
const PUBSUB_PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect backoff of the pub/sub task: doubles from the minimum up to the maximum.
const RECONNECT_MIN_BACKOFF: Duration = Duration::from_millis(100);
const RECONNECT_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Heartbeats per script call: big enough that a normal batch is one EVALSHA, small enough
/// that a huge batch does not block Redis (which runs scripts one at a time) for long.
const HEARTBEAT_CHUNK: usize = 10_000;
/// Optimistic retries of `reset_association` against concurrent writers of the same record.
const RESET_RETRIES: usize = 16;
/// The stored name of [`EnvRecord::join_secret`], which `lua/bind.lua` and `lua/update.lua` also
/// spell out.
const JOIN_SECRET_FIELD: &str = "joinSecret";
/// The stored name of [`TunnelLocation::epoch`], which `lua/claim.lua` adds.
const EPOCH_FIELD: &str = "epoch";
/// Tunnels per renewal script call, for the same reason as [`HEARTBEAT_CHUNK`].
const RENEW_CHUNK: usize = 10_000;
/// The longest TTL sent to Redis (which refuses one that overflows its clock): 100 years,
/// "forever" in practice.
const LONGEST_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

pub struct RedisStore {
    pool: Pool,
    keys: Keys,
    scripts: Scripts,
    changes: broadcast::Sender<Change>,
    _pubsub_task: AbortOnDrop,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379/0`) with every key under `prefix`.
    ///
    /// Returns only once Redis answered a PING and the change subscription is confirmed, so a
    /// change published after this returns reaches this store's [`Store::subscribe`] receivers.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let keys = Keys::new(prefix);
        let client =
            redis::Client::open(url).map_err(|e| StoreError::unavailable_by("redis url", e))?;
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let manager = Manager::new_with_config(url, conn_config).map_err(redis_err)?;
        let pool = Pool::builder(manager)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::unavailable_by("redis pool", e))?;

        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        let (sink, stream) = subscribe_changes(&client, &keys.changes).await?;
        let task = tokio::spawn(forward_changes(
            client,
            keys.changes.clone(),
            changes.clone(),
            sink,
            stream,
        ));
        let store = Self {
            pool,
            keys,
            scripts: Scripts::new(),
            changes,
            _pubsub_task: AbortOnDrop(task),
        };
        // Fail fast on a wrong address or password rather than at the first request (dropping
        // the store on error also stops the pub/sub task).
        store.ping().await?;
        store.migrate().await?;
        tracing::info!(prefix, "connected to redis store");
        Ok(store)
    }

    /// Brings what earlier versions stored into today's layout: heartbeats from their hash
    /// into the sorted set. Atomic (a script), and a no-op once done, so every replica may
    /// run it at start.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let moved: i64 = self
            .scripts
            .migrate_heartbeats
            .key(&self.keys.heartbeat_hash)
            .key(&self.keys.heartbeats)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if moved > 0 {
            tracing::info!(moved, "heartbeats moved to their sorted set");
        }
        Ok(())
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::unavailable_by("redis pool", e))
    }
}

#[async_trait]
impl Backend for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn publish(&self, change: Change) -> Result<(), StoreError> {
        let json =
            serde_json::to_string(&change).map_err(|e| StoreError::corrupt_by("change", e))?;
        let mut conn = self.conn().await?;
        // Not delivered locally: our own subscription brings it back, exactly once.
        redis::cmd("PUBLISH")
            .arg(&self.keys.changes)
            .arg(json)
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }
}

/// A reply that does not have the type we stored is corruption (someone else wrote under our
/// prefix, or a bug); everything else is the backend failing and may pass.
fn redis_err(e: redis::RedisError) -> StoreError {
    if e.kind() == redis::ErrorKind::UnexpectedReturnType || e.code() == Some("WRONGTYPE") {
        StoreError::corrupt_by("", e)
    } else {
        StoreError::unavailable_by("", e)
    }
}

/// A TTL for `PX`: at least 1 ms (Redis refuses 0), at most [`LONGEST_TTL_MS`].
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, LONGEST_TTL_MS)
}

fn parse_id(what: &str, field: &str) -> Result<u64, StoreError> {
    field
        .parse()
        .map_err(|_| StoreError::corrupt(format!("{what}: field {field:?} is not an id")))
}

fn decode_u64(what: &str, bytes: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            StoreError::corrupt(format!(
                "{what}: {:?} is not a number",
                String::from_utf8_lossy(bytes)
            ))
        })
}

fn unexpected(what: &str, v: &Value) -> StoreError {
    StoreError::corrupt(format!("{what}: unexpected script reply {v:?}"))
}

/// Whether `url` is a Redis URL this backend can use (checked before waiting for a Redis that
/// may not be up yet: a typing error should not look like an outage). The error never
/// contains the URL (it may hold a password).
pub fn check_url(url: &str) -> Result<(), String> {
    redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| format!("invalid redis url ({}): {e}", redact_url(url)))
}

/// A Redis URL with its password (if any) replaced, for logs and `Debug`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparsable>".to_owned(),
    }
}
