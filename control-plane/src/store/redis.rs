//! The multi-replica backend: Redis through a deadpool-redis pool, change notifications over
//! Redis pub/sub.
//!
//! Every key name is built in [`Keys::new`]; nothing else in the crate knows them. With the
//! default prefix `edgeplane:` they are:
//!
//! | key                         | type    | content                                          |
//! | --------------------------- | ------- | ------------------------------------------------ |
//! | `edgeplane:env`             | hash    | env id -> JSON of the record *without* `edge_id` |
//! | `edgeplane:binding`         | hash    | env id -> bound Edge ID (UUID text)              |
//! | `edgeplane:heartbeat`       | hash    | env id -> last check-in, ms since the epoch      |
//! | `edgeplane:seq:env`         | string  | last environment id handed out (INCRBY)          |
//! | `edgeplane:groups`          | hash    | group id -> name                                 |
//! | `edgeplane:groups:names`    | hash    | group name -> id (uniqueness index)              |
//! | `edgeplane:seq:groups`      | string  | last group id handed out                         |
//! | `edgeplane:tags`            | hash    | tag id -> name                                   |
//! | `edgeplane:tags:names`      | hash    | tag name -> id (uniqueness index)                |
//! | `edgeplane:seq:tags`        | string  | last tag id handed out                           |
//! | `edgeplane:settings`        | string  | JSON of [`Settings`]                             |
//! | `edgeplane:admin_keys`      | set     | raw 32-byte SHA-256 hashes of admin API keys     |
//! | `edgeplane:snapshot:{id}`   | hash    | `taken_ms`, `received_ms` (decimal), `body` (raw bytes) |
//! | `edgeplane:commands:{id}`   | hash    | command id -> JSON of its [`StoredCommand`] as queued (ids 1..=HLEN) |
//! | `edgeplane:commands:{id}:sent` | hash | command id -> ms it was first handed out (HSETNX) |
//! | `edgeplane:commands:{id}:done` | hash | command id -> JSON `{finishedMs, error}`, the first result (HSETNX) |
//! | `edgeplane:cluster_secret`  | string  | the 32 raw random bytes of [`Store::cluster_secret`] |
//! | `edgeplane:grant:{hash}`    | string  | JSON of a [`TunnelGrant`], PX TTL; key ends in the hex SHA-256 of its token |
//! | `edgeplane:tunnel:{id}`     | string  | JSON of a [`TunnelLocation`], PX TTL (the holder's lease) |
//! | `edgeplane:seq:tunnel`      | string  | last tunnel epoch handed out, for all environments (INCR, no TTL) |
//! | `edgeplane:gateway:{id}`    | string  | JSON of a [`GatewayInfo`], PX TTL (its lease)    |
//! | `edgeplane:gateways`        | set     | ids of registered gateways (pruned when their key has expired) |
//! | `edgeplane:changes`         | channel | pub/sub channel of JSON-encoded [`Change`]s      |
//!
//! The binding lives apart from the record so that binding ends in a single HSETNX and a
//! concurrent [`Store::update_environment`] (which rewrites the record) can never undo it.
//! Read-check-write rules (bind only existing environments whose join secret is still the one
//! the proof was verified with, updates keep the stored join secret, heartbeats only for
//! existing ones and never backwards, unique names, snapshots only for existing environments
//! and never older ones, tunnel claims with their fresh epoch, renewals and releases only by
//! the current epoch) are small Lua scripts, which Redis runs atomically.
//!
//! Everything that lives as long as a lease has a relative TTL (`PX`), so the clocks of the
//! hosts involved never matter. Grants are taken with GETDEL (Redis 6.2 or later). Tunnel
//! epochs come from one counter shared by all environments: strictly increasing per
//! environment, never repeated, and no counter key left behind per environment.
//!
//! After the pub/sub connection is lost and restored, changes published in between are gone;
//! the store then sends [`Change::Resync`] to its local subscribers so that they reload.
//!
//! The scripts touch several keys, so this backend needs a single Redis (or a primary with
//! replicas), not Redis Cluster.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::redis::{
    self, aio::PubSubSink, aio::PubSubStream, AsyncConnectionConfig, Script, Value,
};
use deadpool_redis::{Manager, Pool, Runtime};
use futures_util::StreamExt;
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use uuid::Uuid;

use proto::async_mode::{Action, CommandResult};

use super::{
    BindOutcome, Change, Collection, EdgeMode, EnvId, Environment, GatewayInfo, Named,
    NewEnvironment, Settings, Store, StoreError, StoredCommand, StoredSnapshot, TunnelGrant,
    TunnelLocation, CHANGE_CHANNEL_CAPACITY, MAX_COMMANDS_PER_ENV,
};

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
/// The stored name of [`EnvRecord::join_secret`], which [`BIND_LUA`] and [`UPDATE_LUA`] also
/// spell out.
const JOIN_SECRET_FIELD: &str = "joinSecret";
/// The stored name of [`TunnelLocation::epoch`], which [`CLAIM_LUA`] adds.
const EPOCH_FIELD: &str = "epoch";
/// Tunnels per renewal script call, for the same reason as [`HEARTBEAT_CHUNK`].
const RENEW_CHUNK: usize = 10_000;
/// The longest TTL sent to Redis (which refuses one that overflows its clock): 100 years,
/// "forever" in practice.
const LONGEST_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// Every key name, derived from the prefix in one place.
#[derive(Clone, Debug)]
struct Keys {
    env: String,
    binding: String,
    heartbeat: String,
    env_seq: String,
    groups: String,
    group_names: String,
    group_seq: String,
    tags: String,
    tag_names: String,
    tag_seq: String,
    settings: String,
    admin_keys: String,
    snapshot: String,
    commands: String,
    cluster_secret: String,
    grant: String,
    tunnel: String,
    tunnel_seq: String,
    gateway: String,
    gateways: String,
    changes: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            env: format!("{prefix}env"),
            binding: format!("{prefix}binding"),
            heartbeat: format!("{prefix}heartbeat"),
            env_seq: format!("{prefix}seq:env"),
            groups: format!("{prefix}groups"),
            group_names: format!("{prefix}groups:names"),
            group_seq: format!("{prefix}seq:groups"),
            tags: format!("{prefix}tags"),
            tag_names: format!("{prefix}tags:names"),
            tag_seq: format!("{prefix}seq:tags"),
            settings: format!("{prefix}settings"),
            admin_keys: format!("{prefix}admin_keys"),
            // Per-item keys: these are the prefixes the item's name is appended to.
            snapshot: format!("{prefix}snapshot:"),
            commands: format!("{prefix}commands:"),
            cluster_secret: format!("{prefix}cluster_secret"),
            grant: format!("{prefix}grant:"),
            tunnel: format!("{prefix}tunnel:"),
            tunnel_seq: format!("{prefix}seq:tunnel"),
            gateway: format!("{prefix}gateway:"),
            gateways: format!("{prefix}gateways"),
            changes: format!("{prefix}changes"),
        }
    }

    fn snapshot(&self, env: EnvId) -> String {
        format!("{}{env}", self.snapshot)
    }

    /// (queued commands, first-sent times, results) of an environment.
    fn commands(&self, env: EnvId) -> (String, String, String) {
        let base = format!("{}{env}", self.commands);
        (format!("{base}:sent"), format!("{base}:done"), base)
    }

    fn grant(&self, token_hash: &[u8; 32]) -> String {
        format!("{}{}", self.grant, hex::encode(token_hash))
    }

    fn tunnel(&self, env: EnvId) -> String {
        format!("{}{env}", self.tunnel)
    }

    fn gateway(&self, id: &str) -> String {
        format!("{}{id}", self.gateway)
    }

    /// (id -> name hash, name -> id hash, id counter) of a named collection.
    fn named(&self, coll: Collection) -> (&str, &str, &str) {
        match coll {
            Collection::Groups => (&self.groups, &self.group_names, &self.group_seq),
            Collection::Tags => (&self.tags, &self.tag_names, &self.tag_seq),
        }
    }
}

/// Binds only an existing environment whose stored join secret is exactly the given one, and
/// only if it is unbound. The secret is checked here, atomically with the HSETNX, so that a
/// `reset_association` (which rewrites the record and drops the binding in one script) is
/// either wholly before the check or wholly after the bind.
/// KEYS: env, binding. ARGV: id, edge id, join secret.
/// Returns 0 (no such environment), 1 (bound now), 2 (the join secret is another one),
/// -1 (the stored record has no readable join secret) or the Edge ID already bound.
/// Lua compares strings byte for byte, and cjson decodes a JSON string exactly, so the
/// comparison is exact.
const BIND_LUA: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if not ok or type(rec) ~= 'table' or type(rec.joinSecret) ~= 'string' then return -1 end
if rec.joinSecret ~= ARGV[3] then return 2 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then return 1 end
return redis.call('HGET', KEYS[2], ARGV[1])
";

/// Replaces a record only if it still exists (a concurrent delete wins), keeping its stored
/// join secret: only `reset_association` rotates it, and an update computed from a copy read
/// before a rotation must not bring the old secret back.
/// KEYS: env. ARGV: id, JSON object of the new record *without* `joinSecret` (and with at
/// least one other field, which every record has).
/// Returns 1 if replaced, 0 if absent, -1 if the stored record has no readable join secret.
/// The stored secret is spliced into the new JSON as text rather than re-encoding the whole
/// record with cjson, which would round u64s (`createdAtMs`) through doubles; encoding one
/// string with cjson is exact.
const UPDATE_LUA: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if not ok or type(rec) ~= 'table' or type(rec.joinSecret) ~= 'string' then return -1 end
local secret = '{"joinSecret":' .. cjson.encode(rec.joinSecret) .. ','
redis.call('HSET', KEYS[1], ARGV[1], secret .. string.sub(ARGV[2], 2))
return 1
"#;

/// Compare-and-set of a record that also drops its binding.
/// KEYS: env, binding. ARGV: id, expected JSON, new JSON.
/// Returns 1 if done, 0 if absent, -1 if the record changed meanwhile (retry).
const RESET_LUA: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
if cur ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
";

/// Records heartbeats of existing environments, never moving one backwards.
/// KEYS: env, heartbeat. ARGV: id1, ms1, id2, ms2, ...  Returns how many were written.
/// Times are compared as decimal strings (longer is larger, then lexicographic) because Lua
/// numbers are doubles and would round large u64 values.
const HEARTBEATS_LUA: &str = r"
local written = 0
for i = 1, #ARGV, 2 do
  local id, at = ARGV[i], ARGV[i + 1]
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    local cur = redis.call('HGET', KEYS[2], id)
    if (not cur) or #at > #cur or (#at == #cur and at > cur) then
      redis.call('HSET', KEYS[2], id, at)
      written = written + 1
    end
  end
end
return written
";

/// KEYS: ids hash, names hash, counter. ARGV: name. Returns the new id, or 0 if the name is taken.
const CREATE_NAMED_LUA: &str = r"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local id = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], id, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], id)
return id
";

/// KEYS: ids hash, names hash. ARGV: id, new name.
/// Returns 1 if renamed (or already so named), 0 if absent, -1 if the name is taken.
const RENAME_NAMED_LUA: &str = r"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
if old == ARGV[2] then return 1 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return -1 end
redis.call('HDEL', KEYS[2], old)
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// KEYS: ids hash, names hash. ARGV: id. Returns 1 if deleted, 0 if absent.
const DELETE_NAMED_LUA: &str = r"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], old)
return 1
";

/// Stores a snapshot of an existing environment unless the stored one was taken later.
/// KEYS: env, snapshot. ARGV: id, taken ms, received ms, body.
/// Returns 1 if the environment exists (whether or not the snapshot replaced the stored one),
/// 0 if not. Times are compared as decimal strings, as in [`HEARTBEATS_LUA`].
const PUT_SNAPSHOT_LUA: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local cur = redis.call('HGET', KEYS[2], 'taken_ms')
local new = ARGV[2]
if cur and (#cur > #new or (#cur == #new and cur > new)) then return 1 end
redis.call('HSET', KEYS[2], 'taken_ms', new, 'received_ms', ARGV[3], 'body', ARGV[4])
return 1
";

/// Queues a command with the next id (ids are contiguous: 1..=HLEN).
/// KEYS: environments, the environment's commands. ARGV: env id, JSON, most commands kept.
/// Returns the id, 0 when the environment does not exist, -1 when it holds too many.
const QUEUE_COMMAND_LUA: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local n = redis.call('HLEN', KEYS[2])
if n >= tonumber(ARGV[3]) then return -1 end
redis.call('HSET', KEYS[2], n + 1, ARGV[2])
return n + 1
";

/// How many commands an environment has (ids are 1..=count).
async fn command_count(
    conn: &mut deadpool_redis::Connection,
    commands: &str,
) -> Result<u64, StoreError> {
    redis::cmd("HLEN")
        .arg(commands)
        .query_async(conn)
        .await
        .map_err(redis_err)
}

/// A command's result as stored in `commands:{id}:done`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommandDone {
    finished_ms: u64,
    error: Option<String>,
}

/// Hands out the next epoch and stores the location with it, in one step: of two concurrent
/// claims, the one with the higher epoch is the one left stored.
/// KEYS: location, epoch counter. ARGV: JSON object of the location *without* `epoch` (and
/// with other fields), lease ms. Returns the epoch.
/// The epoch is spliced into the JSON as text, as in [`UPDATE_LUA`]; `%d` prints it exactly
/// (Lua numbers are doubles, exact up to 2^53 claims).
const CLAIM_LUA: &str = r#"
local epoch = redis.call('INCR', KEYS[2])
local json = '{"epoch":' .. string.format('%d', epoch) .. ',' .. string.sub(ARGV[1], 2)
redis.call('SET', KEYS[1], json, 'PX', ARGV[2])
return epoch
"#;

/// Extends the locations still held by the given gateway with the given epochs.
/// KEYS: locations. ARGV: gateway id, lease ms, epoch of KEYS[1], epoch of KEYS[2], ...
/// Returns the (1-based) positions of the locations no longer held: gone, claimed since with
/// another epoch, or unreadable (which the next claim overwrites; until then nobody holds it).
const RENEW_LUA: &str = r"
local lost = {}
for i = 1, #KEYS do
  local held = false
  local cur = redis.call('GET', KEYS[i])
  if cur then
    local ok, rec = pcall(cjson.decode, cur)
    held = ok and type(rec) == 'table' and rec.gatewayId == ARGV[1]
      and rec.epoch == tonumber(ARGV[i + 2])
  end
  if held then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  else
    lost[#lost + 1] = i
  end
end
return lost
";

/// Compare-and-delete of a location on its epoch.
/// KEYS: location. ARGV: epoch. Returns 1 if deleted, 0 if absent or of another epoch, -1 if
/// the stored location is unreadable.
const RELEASE_LUA: &str = r"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if not ok or type(rec) ~= 'table' then return -1 end
if rec.epoch ~= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
return 1
";

/// Forgets registered gateways whose key expired, unless they registered again meanwhile.
/// KEYS: gateway set, then the gateways' keys. ARGV: the gateways' ids, in the same order.
const PRUNE_GATEWAYS_LUA: &str = r"
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    redis.call('SREM', KEYS[1], ARGV[i])
  end
end
return 0
";

struct Scripts {
    put_snapshot: Script,
    queue_command: Script,
    claim: Script,
    renew: Script,
    release: Script,
    prune_gateways: Script,
    bind: Script,
    update: Script,
    reset: Script,
    heartbeats: Script,
    create_named: Script,
    rename_named: Script,
    delete_named: Script,
}

impl Scripts {
    fn new() -> Self {
        // `Script` sends EVALSHA and falls back to loading the script on NOSCRIPT (a restarted
        // or flushed Redis), so callers need not care whether it is cached.
        Self {
            put_snapshot: Script::new(PUT_SNAPSHOT_LUA),
            queue_command: Script::new(QUEUE_COMMAND_LUA),
            claim: Script::new(CLAIM_LUA),
            renew: Script::new(RENEW_LUA),
            release: Script::new(RELEASE_LUA),
            prune_gateways: Script::new(PRUNE_GATEWAYS_LUA),
            bind: Script::new(BIND_LUA),
            update: Script::new(UPDATE_LUA),
            reset: Script::new(RESET_LUA),
            heartbeats: Script::new(HEARTBEATS_LUA),
            create_named: Script::new(CREATE_NAMED_LUA),
            rename_named: Script::new(RENAME_NAMED_LUA),
            delete_named: Script::new(DELETE_NAMED_LUA),
        }
    }
}

/// The stored form of an environment: everything but the id (the hash field) and the binding
/// (its own hash). Spelled out rather than derived from [`Environment`] so that adding a field
/// there fails to compile here until the layout is decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvRecord {
    name: String,
    mode: EdgeMode,
    checkin_interval: Option<u32>,
    ping_interval: Option<u32>,
    snapshot_interval: Option<u32>,
    command_interval: Option<u32>,
    group_id: Option<u64>,
    tag_ids: Vec<u64>,
    env_vars: Vec<String>,
    allow_self_signed: bool,
    join_secret: String,
    created_at_ms: u64,
}

impl EnvRecord {
    fn from_env(env: &Environment) -> Self {
        let Environment {
            id: _,
            name,
            mode,
            checkin_interval,
            ping_interval,
            snapshot_interval,
            command_interval,
            group_id,
            tag_ids,
            env_vars,
            allow_self_signed,
            join_secret,
            edge_id: _,
            created_at_ms,
        } = env.clone();
        Self {
            name,
            mode,
            checkin_interval,
            ping_interval,
            snapshot_interval,
            command_interval,
            group_id,
            tag_ids,
            env_vars,
            allow_self_signed,
            join_secret,
            created_at_ms,
        }
    }

    fn into_env(self, id: EnvId, edge_id: Option<Uuid>) -> Environment {
        Environment {
            id,
            name: self.name,
            mode: self.mode,
            checkin_interval: self.checkin_interval,
            ping_interval: self.ping_interval,
            snapshot_interval: self.snapshot_interval,
            command_interval: self.command_interval,
            group_id: self.group_id,
            tag_ids: self.tag_ids,
            env_vars: self.env_vars,
            allow_self_signed: self.allow_self_signed,
            join_secret: self.join_secret,
            edge_id,
            created_at_ms: self.created_at_ms,
        }
    }

    fn encode(&self) -> Result<String, StoreError> {
        serde_json::to_string(self)
            .map_err(|e| StoreError::Corrupt(format!("encoding environment: {e}")))
    }

    /// The JSON of the record minus `joinSecret`, for [`UPDATE_LUA`] to add the stored one.
    /// Goes through a `serde_json::Value`, which keeps u64s exact.
    fn encode_without_secret(&self) -> Result<String, StoreError> {
        let mut value = serde_json::to_value(self)
            .map_err(|e| StoreError::Corrupt(format!("encoding environment: {e}")))?;
        // Fails loudly if the field is ever renamed: the script would otherwise write the
        // key twice, and the record would no longer decode.
        value
            .as_object_mut()
            .and_then(|fields| fields.remove(JOIN_SECRET_FIELD))
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "encoding environment: no {JOIN_SECRET_FIELD:?} field to leave out"
                ))
            })?;
        serde_json::to_string(&value)
            .map_err(|e| StoreError::Corrupt(format!("encoding environment: {e}")))
    }

    fn decode(id: EnvId, json: &str) -> Result<Self, StoreError> {
        serde_json::from_str(json)
            .map_err(|e| StoreError::Corrupt(format!("environment {id}: {e}")))
    }
}

fn decode_edge_id(id: EnvId, text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text)
        .map_err(|e| StoreError::Corrupt(format!("binding of environment {id}: {e}")))
}

fn parse_id(what: &str, field: &str) -> Result<u64, StoreError> {
    field
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("{what}: field {field:?} is not an id")))
}

/// A reply that does not have the type we stored is corruption (someone else wrote under our
/// prefix, or a bug); everything else is the backend failing and may pass.
fn redis_err(e: redis::RedisError) -> StoreError {
    if e.kind() == redis::ErrorKind::UnexpectedReturnType || e.code() == Some("WRONGTYPE") {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

/// A TTL for `PX`: at least 1 ms (Redis refuses 0), at most [`LONGEST_TTL_MS`].
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, LONGEST_TTL_MS)
}

/// The JSON of a location without its epoch, for [`CLAIM_LUA`] to add it.
fn encode_location_without_epoch(loc: &TunnelLocation) -> Result<String, StoreError> {
    let mut value = serde_json::to_value(loc)
        .map_err(|e| StoreError::Corrupt(format!("encoding tunnel location: {e}")))?;
    // Fails loudly if the field is ever renamed: the script would otherwise write it twice.
    value
        .as_object_mut()
        .and_then(|fields| fields.remove(EPOCH_FIELD))
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "encoding tunnel location: no {EPOCH_FIELD:?} field to leave out"
            ))
        })?;
    serde_json::to_string(&value)
        .map_err(|e| StoreError::Corrupt(format!("encoding tunnel location: {e}")))
}

fn decode_location(env: EnvId, json: &str) -> Result<TunnelLocation, StoreError> {
    let loc: TunnelLocation = serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("tunnel location of environment {env}: {e}")))?;
    if loc.env != env {
        return Err(StoreError::Corrupt(format!(
            "tunnel location of environment {env} is stored for environment {}",
            loc.env
        )));
    }
    Ok(loc)
}

fn decode_u64(what: &str, bytes: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "{what}: {:?} is not a number",
                String::from_utf8_lossy(bytes)
            ))
        })
}

fn unexpected(what: &str, v: &Value) -> StoreError {
    StoreError::Corrupt(format!("{what}: unexpected script reply {v:?}"))
}

/// Aborts the pub/sub task when the store goes away, so a dropped store stops reconnecting.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

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
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Unavailable(format!("redis url: {e}")))?;
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
            .map_err(|e| StoreError::Unavailable(format!("redis pool: {e}")))?;

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
        tracing::info!(prefix, "connected to redis store");
        Ok(store)
    }

    /// The commands `ids` of `env`, with their sent times and results, in the order of `ids`
    /// (ids that do not exist are left out).
    async fn read_commands(
        &self,
        conn: &mut deadpool_redis::Connection,
        env: EnvId,
        ids: &[u64],
    ) -> Result<Vec<StoredCommand>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (sent, done, commands) = self.keys.commands(env);
        type Fields = Vec<Option<String>>;
        let (records, sent_ms, results): (Fields, Vec<Option<u64>>, Fields) = redis::pipe()
            .cmd("HMGET")
            .arg(&commands)
            .arg(ids)
            .cmd("HMGET")
            .arg(&sent)
            .arg(ids)
            .cmd("HMGET")
            .arg(&done)
            .arg(ids)
            .query_async(conn)
            .await
            .map_err(redis_err)?;
        let mut out = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let Some(json) = records.get(i).cloned().flatten() else {
                continue;
            };
            let mut cmd: StoredCommand = serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("{commands} {id}: {e}")))?;
            cmd.id = id;
            cmd.sent_ms = sent_ms.get(i).copied().flatten();
            if let Some(json) = results.get(i).cloned().flatten() {
                let d: CommandDone = serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("{done} {id}: {e}")))?;
                cmd.finished_ms = Some(d.finished_ms);
                cmd.error = d.error;
            }
            out.push(cmd);
        }
        Ok(out)
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("redis pool: {e}")))
    }
}

/// Opens a dedicated pub/sub connection and waits for the SUBSCRIBE confirmation.
async fn subscribe_changes(
    client: &redis::Client,
    channel: &str,
) -> Result<(PubSubSink, PubSubStream), StoreError> {
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        // `subscribe` resolves on the server's confirmation, not merely on sending.
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub.split())
    };
    match tokio::time::timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT, attempt).await {
        Ok(result) => result.map_err(|e| StoreError::Unavailable(format!("redis subscribe: {e}"))),
        Err(_) => Err(StoreError::Unavailable(
            "redis subscribe: timed out".to_owned(),
        )),
    }
}

/// Forwards changes from Redis to the local broadcast for as long as the store lives,
/// re-subscribing with backoff whenever the connection is lost.
async fn forward_changes(
    client: redis::Client,
    channel: String,
    changes: broadcast::Sender<Change>,
    mut sink: PubSubSink,
    mut stream: PubSubStream,
) {
    loop {
        let reason = pump(&mut sink, &mut stream, &changes).await;
        // Changes published while we are away are lost for this replica; the `Resync` sent
        // once we are back tells its consumers to catch up.
        tracing::warn!(%channel, %reason, "change subscription lost, reconnecting");
        let mut delay = RECONNECT_MIN_BACKOFF;
        let mut attempts: u32 = 0;
        (sink, stream) = loop {
            attempts += 1;
            match subscribe_changes(&client, &channel).await {
                Ok(subscribed) => {
                    tracing::info!(%channel, attempts, "change subscription restored");
                    // Only now, with the subscription confirmed: every change published from
                    // here on is delivered after the `Resync`, so a consumer that reloads on
                    // it leaves no gap. No local subscriber is fine: nobody needed to hear it.
                    let _ = changes.send(Change::Resync);
                    break subscribed;
                }
                Err(e) => {
                    // Jitter so that replicas do not all hammer a restarting Redis in step.
                    let jitter = rand::thread_rng().gen_range(0..=delay.as_millis() as u64 / 2);
                    let wait = delay + Duration::from_millis(jitter);
                    tracing::warn!(
                        %channel,
                        error = %e,
                        attempts,
                        retry_in_ms = wait.as_millis() as u64,
                        "change subscription reconnect failed"
                    );
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(RECONNECT_MAX_BACKOFF);
                }
            }
        };
    }
}

/// Delivers messages until the connection is lost; returns why.
async fn pump(
    sink: &mut PubSubSink,
    stream: &mut PubSubStream,
    changes: &broadcast::Sender<Change>,
) -> String {
    let mut keepalive = tokio::time::interval(PUBSUB_KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; the connection was just proven alive.
    keepalive.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else {
                    return "connection closed".to_owned();
                };
                match serde_json::from_slice::<Change>(msg.get_payload_bytes()) {
                    // No local subscriber is fine: nobody needed to hear it.
                    Ok(change) => {
                        let _ = changes.send(change);
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring undecodable change message"),
                }
            }
            _ = keepalive.tick() => {
                match tokio::time::timeout(PUBSUB_PING_TIMEOUT, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("keepalive ping failed: {e}"),
                    Err(_) => return "keepalive ping timed out".to_owned(),
                }
            }
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn create_environments(
        &self,
        new: Vec<NewEnvironment>,
    ) -> Result<Vec<Environment>, StoreError> {
        if new.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let n = new.len() as u64;
        let last: u64 = redis::cmd("INCRBY")
            .arg(&self.keys.env_seq)
            .arg(n)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        // INCRBY hands out a block of ids no other replica can get, even if the writes below
        // fail (the ids are then skipped, never reused).
        let first = last
            .checked_sub(n - 1)
            .filter(|first| *first > 0)
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "{}: counter {last} below batch size {n}",
                    self.keys.env_seq
                ))
            })?;

        let created: Vec<Environment> = (first..)
            .zip(new)
            .map(|(id, n)| n.into_environment(id))
            .collect();
        let mut records = Vec::with_capacity(created.len());
        let mut bindings = Vec::new();
        for env in &created {
            records.push((env.id, EnvRecord::from_env(env).encode()?));
            if let Some(edge_id) = env.edge_id {
                bindings.push((env.id, edge_id.to_string()));
            }
        }
        // MULTI/EXEC so that no reader sees a pre-assigned environment without its binding.
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(&self.keys.env)
            .arg(&records)
            .ignore();
        if !bindings.is_empty() {
            pipe.cmd("HSET")
                .arg(&self.keys.binding)
                .arg(&bindings)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.map_err(redis_err)?;
        Ok(created)
    }

    async fn get_environment(&self, id: EnvId) -> Result<Option<Environment>, StoreError> {
        let mut conn = self.conn().await?;
        let (record, binding): (Option<String>, Option<String>) = redis::pipe()
            .atomic()
            .cmd("HGET")
            .arg(&self.keys.env)
            .arg(id)
            .cmd("HGET")
            .arg(&self.keys.binding)
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let Some(record) = record else {
            return Ok(None);
        };
        let edge_id = binding.map(|b| decode_edge_id(id, &b)).transpose()?;
        Ok(Some(EnvRecord::decode(id, &record)?.into_env(id, edge_id)))
    }

    async fn list_environments(&self) -> Result<Vec<Environment>, StoreError> {
        let mut conn = self.conn().await?;
        let (records, bindings): (HashMap<String, String>, HashMap<String, String>) = redis::pipe()
            .atomic()
            .cmd("HGETALL")
            .arg(&self.keys.env)
            .cmd("HGETALL")
            .arg(&self.keys.binding)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let mut out = Vec::with_capacity(records.len());
        for (field, record) in &records {
            let id = parse_id(&self.keys.env, field)?;
            let edge_id = bindings
                .get(field)
                .map(|b| decode_edge_id(id, b))
                .transpose()?;
            out.push(EnvRecord::decode(id, record)?.into_env(id, edge_id));
        }
        out.sort_unstable_by_key(|env| env.id);
        Ok(out)
    }

    async fn update_environment(&self, env: &Environment) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        // `created_at_ms` is kept from the stored record. It never changes after creation (and
        // ids are never reused), so reading it outside the script cannot race. The join secret
        // can change under us (`reset_association`), so the script keeps the stored one itself,
        // atomically with the write; it also guards against a concurrent delete.
        let current: Option<String> = redis::cmd("HGET")
            .arg(&self.keys.env)
            .arg(env.id)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let Some(current) = current else {
            return Ok(false);
        };
        let mut record = EnvRecord::from_env(env);
        record.created_at_ms = EnvRecord::decode(env.id, &current)?.created_at_ms;
        let outcome: i64 = self
            .scripts
            .update
            .key(&self.keys.env)
            .arg(env.id)
            .arg(record.encode_without_secret()?)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match outcome {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(StoreError::Corrupt(format!(
                "environment {}: stored record has no readable join secret",
                env.id
            ))),
        }
    }

    async fn delete_environment(&self, id: EnvId) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let (sent, done, commands) = self.keys.commands(id);
        // MULTI/EXEC: `PUT_SNAPSHOT_LUA` and `QUEUE_COMMAND_LUA` check that the environment
        // exists, so a snapshot or command stored concurrently is either deleted here or
        // refused.
        let (removed, _, _, _, _): (i64, i64, i64, i64, i64) = redis::pipe()
            .atomic()
            .cmd("HDEL")
            .arg(&self.keys.env)
            .arg(id)
            .cmd("HDEL")
            .arg(&self.keys.binding)
            .arg(id)
            .cmd("HDEL")
            .arg(&self.keys.heartbeat)
            .arg(id)
            .cmd("DEL")
            .arg(self.keys.snapshot(id))
            .cmd("DEL")
            .arg(&[commands, sent, done])
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(removed == 1)
    }

    async fn bind_edge_id(
        &self,
        id: EnvId,
        edge_id: Uuid,
        join_secret: &str,
    ) -> Result<BindOutcome, StoreError> {
        let mut conn = self.conn().await?;
        let reply: Value = self
            .scripts
            .bind
            .key(&self.keys.env)
            .key(&self.keys.binding)
            .arg(id)
            .arg(edge_id.to_string())
            .arg(join_secret)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match reply {
            Value::Int(0) => Ok(BindOutcome::NotFound),
            Value::Int(1) => Ok(BindOutcome::Bound),
            Value::Int(2) => Ok(BindOutcome::SecretChanged),
            Value::Int(-1) => Err(StoreError::Corrupt(format!(
                "environment {id}: stored record has no readable join secret"
            ))),
            Value::BulkString(ref bytes) => {
                let text = std::str::from_utf8(bytes).map_err(|_| unexpected("bind", &reply))?;
                let bound = decode_edge_id(id, text)?;
                Ok(if bound == edge_id {
                    BindOutcome::AlreadyBound
                } else {
                    BindOutcome::BoundToOther(bound)
                })
            }
            other => Err(unexpected("bind", &other)),
        }
    }

    async fn reset_association(
        &self,
        id: EnvId,
        new_secret: String,
    ) -> Result<Option<Environment>, StoreError> {
        let mut conn = self.conn().await?;
        // Read, modify, compare-and-set: Lua has no exact JSON for u64s, so the record is
        // rewritten here and the script only checks nobody rewrote it in between.
        for _ in 0..RESET_RETRIES {
            let current: Option<String> = redis::cmd("HGET")
                .arg(&self.keys.env)
                .arg(id)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            let Some(current) = current else {
                return Ok(None);
            };
            let mut record = EnvRecord::decode(id, &current)?;
            record.join_secret.clone_from(&new_secret);
            let outcome: i64 = self
                .scripts
                .reset
                .key(&self.keys.env)
                .key(&self.keys.binding)
                .arg(id)
                .arg(&current)
                .arg(record.encode()?)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_err)?;
            match outcome {
                1 => return Ok(Some(record.into_env(id, None))),
                0 => return Ok(None),
                _ => tracing::debug!(env_id = id, "environment changed during reset, retrying"),
            }
        }
        Err(StoreError::Unavailable(format!(
            "environment {id} kept changing during reset, gave up after {RESET_RETRIES} attempts"
        )))
    }

    async fn record_heartbeats(&self, beats: &[(EnvId, u64)]) -> Result<(), StoreError> {
        if beats.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        for chunk in beats.chunks(HEARTBEAT_CHUNK) {
            let mut call = self.scripts.heartbeats.prepare_invoke();
            call.key(&self.keys.env).key(&self.keys.heartbeat);
            for (id, at) in chunk {
                call.arg(id).arg(at);
            }
            call.invoke_async::<i64>(&mut conn)
                .await
                .map_err(redis_err)?;
        }
        Ok(())
    }

    async fn heartbeats(&self, ids: &[EnvId]) -> Result<Vec<Option<u64>>, StoreError> {
        if ids.is_empty() {
            // HMGET needs at least one field.
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let values: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&self.keys.heartbeat)
            .arg(ids)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if values.len() != ids.len() {
            return Err(StoreError::Corrupt(format!(
                "HMGET returned {} values for {} fields",
                values.len(),
                ids.len()
            )));
        }
        ids.iter()
            .zip(values)
            .map(|(id, v)| {
                v.map(|v| {
                    v.parse().map_err(|_| {
                        StoreError::Corrupt(format!("heartbeat of environment {id}: {v:?}"))
                    })
                })
                .transpose()
            })
            .collect()
    }

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
            .arg(id)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(deleted == 1)
    }

    async fn settings(&self) -> Result<Settings, StoreError> {
        let mut conn = self.conn().await?;
        let json: Option<String> = redis::cmd("GET")
            .arg(&self.keys.settings)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match json {
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("settings: {e}"))),
            None => Ok(Settings::default()),
        }
    }

    async fn put_settings(&self, settings: &Settings) -> Result<(), StoreError> {
        let json = serde_json::to_string(settings)
            .map_err(|e| StoreError::Corrupt(format!("settings: {e}")))?;
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
                    StoreError::Corrupt(format!("admin key hash of {} bytes", m.len()))
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

    async fn put_tunnel_grant(
        &self,
        token_hash: &[u8; 32],
        grant: &TunnelGrant,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(grant)
            .map_err(|e| StoreError::Corrupt(format!("encoding tunnel grant: {e}")))?;
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(self.keys.grant(token_hash))
            .arg(json)
            .arg("PX")
            .arg(ttl_ms(ttl))
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn take_tunnel_grant(
        &self,
        token_hash: &[u8; 32],
    ) -> Result<Option<TunnelGrant>, StoreError> {
        let mut conn = self.conn().await?;
        // GETDEL is atomic: of two concurrent takes, one gets the value and the other nil.
        let json: Option<String> = redis::cmd("GETDEL")
            .arg(self.keys.grant(token_hash))
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        json.map(|json| {
            serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("tunnel grant: {e}")))
        })
        .transpose()
    }

    async fn claim_tunnel(
        &self,
        env: EnvId,
        gateway_id: &str,
        dial_addr: &str,
        since_ms: u64,
        lease: Duration,
    ) -> Result<TunnelLocation, StoreError> {
        let mut location = TunnelLocation {
            env,
            gateway_id: gateway_id.to_owned(),
            dial_addr: dial_addr.to_owned(),
            epoch: 0,
            since_ms,
        };
        let json = encode_location_without_epoch(&location)?;
        let mut conn = self.conn().await?;
        location.epoch = self
            .scripts
            .claim
            .key(self.keys.tunnel(env))
            .key(&self.keys.tunnel_seq)
            .arg(json)
            .arg(ttl_ms(lease))
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(location)
    }

    async fn renew_tunnels(
        &self,
        gateway_id: &str,
        held: &[(EnvId, u64)],
        lease: Duration,
    ) -> Result<Vec<EnvId>, StoreError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let lease = ttl_ms(lease);
        let mut conn = self.conn().await?;
        let mut lost = Vec::new();
        for chunk in held.chunks(RENEW_CHUNK) {
            let mut call = self.scripts.renew.prepare_invoke();
            call.arg(gateway_id).arg(lease);
            for (env, epoch) in chunk {
                call.key(self.keys.tunnel(*env)).arg(epoch);
            }
            let positions: Vec<usize> = call.invoke_async(&mut conn).await.map_err(redis_err)?;
            for pos in positions {
                let (env, _) = pos
                    .checked_sub(1)
                    .and_then(|i| chunk.get(i))
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!("renew: script returned position {pos}"))
                    })?;
                lost.push(*env);
            }
        }
        Ok(lost)
    }

    async fn release_tunnel(&self, env: EnvId, epoch: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let outcome: i64 = self
            .scripts
            .release
            .key(self.keys.tunnel(env))
            .arg(epoch)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match outcome {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(StoreError::Corrupt(format!(
                "tunnel location of environment {env} is unreadable"
            ))),
        }
    }

    async fn tunnel_locations(
        &self,
        ids: &[EnvId],
    ) -> Result<Vec<Option<TunnelLocation>>, StoreError> {
        if ids.is_empty() {
            // MGET needs at least one key.
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.tunnel(*id)).collect();
        let mut conn = self.conn().await?;
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if values.len() != ids.len() {
            return Err(StoreError::Corrupt(format!(
                "MGET returned {} values for {} keys",
                values.len(),
                ids.len()
            )));
        }
        ids.iter()
            .zip(values)
            .map(|(id, v)| v.map(|json| decode_location(*id, &json)).transpose())
            .collect()
    }

    async fn register_gateway(
        &self,
        info: &GatewayInfo,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(info)
            .map_err(|e| StoreError::Corrupt(format!("encoding gateway: {e}")))?;
        let mut conn = self.conn().await?;
        // MULTI/EXEC: listed in the set whenever its key exists.
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.keys.gateway(&info.id))
            .arg(json)
            .arg("PX")
            .arg(ttl_ms(lease))
            .ignore()
            .cmd("SADD")
            .arg(&self.keys.gateways)
            .arg(&info.id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn unregister_gateway(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(self.keys.gateway(id))
            .ignore()
            .cmd("SREM")
            .arg(&self.keys.gateways)
            .arg(id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn live_gateways(&self) -> Result<Vec<GatewayInfo>, StoreError> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&self.keys.gateways)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.gateway(id)).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        if values.len() != ids.len() {
            return Err(StoreError::Corrupt(format!(
                "MGET returned {} values for {} keys",
                values.len(),
                ids.len()
            )));
        }
        let mut live = Vec::with_capacity(ids.len());
        let mut expired = Vec::new();
        for ((id, key), value) in ids.iter().zip(&keys).zip(values) {
            match value {
                Some(json) => {
                    let info: GatewayInfo = serde_json::from_str(&json)
                        .map_err(|e| StoreError::Corrupt(format!("gateway {id:?}: {e}")))?;
                    live.push(info);
                }
                None => expired.push((id, key)),
            }
        }
        if !expired.is_empty() {
            // The script re-checks each key, so a gateway registering again right now stays.
            let mut call = self.scripts.prune_gateways.prepare_invoke();
            call.key(&self.keys.gateways);
            for (id, key) in expired {
                call.key(key).arg(id);
            }
            call.invoke_async::<i64>(&mut conn)
                .await
                .map_err(redis_err)?;
        }
        live.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }

    async fn cluster_secret(&self) -> Result<[u8; 32], StoreError> {
        let mut fresh = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut fresh)
            .map_err(|e| StoreError::Unavailable(format!("no randomness for the secret: {e}")))?;
        let mut conn = self.conn().await?;
        // SET NX: the first caller's secret stays, and everybody reads that one back.
        let (stored,): (Option<Vec<u8>>,) = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(&self.keys.cluster_secret)
            .arg(fresh.as_slice())
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&self.keys.cluster_secret)
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let stored = stored.ok_or_else(|| {
            StoreError::Unavailable(format!(
                "{} vanished right after SET",
                self.keys.cluster_secret
            ))
        })?;
        <[u8; 32]>::try_from(stored.as_slice()).map_err(|_| {
            StoreError::Corrupt(format!(
                "{}: expected 32 bytes, found {}",
                self.keys.cluster_secret,
                stored.len()
            ))
        })
    }

    async fn put_snapshot(&self, env: EnvId, snap: &StoredSnapshot) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let stored: i64 = self
            .scripts
            .put_snapshot
            .key(&self.keys.env)
            .key(self.keys.snapshot(env))
            .arg(env)
            .arg(snap.taken_ms)
            .arg(snap.received_ms)
            .arg(snap.body.as_slice())
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(stored == 1)
    }

    async fn snapshot(&self, env: EnvId) -> Result<Option<StoredSnapshot>, StoreError> {
        let key = self.keys.snapshot(env);
        let mut conn = self.conn().await?;
        let fields: (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(&key)
            .arg(&["taken_ms", "received_ms", "body"])
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match fields {
            (None, None, None) => Ok(None),
            (Some(taken), Some(received), Some(body)) => Ok(Some(StoredSnapshot {
                taken_ms: decode_u64(&key, &taken)?,
                received_ms: decode_u64(&key, &received)?,
                body,
            })),
            _ => Err(StoreError::Corrupt(format!("{key}: fields missing"))),
        }
    }

    async fn queue_command(
        &self,
        env: EnvId,
        action: &Action,
        now_ms: u64,
    ) -> Result<Option<StoredCommand>, StoreError> {
        let (_, _, commands) = self.keys.commands(env);
        let mut cmd = StoredCommand {
            id: 0,
            action: action.clone(),
            created_ms: now_ms,
            sent_ms: None,
            finished_ms: None,
            error: None,
        };
        // The id is the hash field; the one inside the JSON is not read back.
        let json = serde_json::to_string(&cmd)
            .map_err(|e| StoreError::Corrupt(format!("command: {e}")))?;
        let mut conn = self.conn().await?;
        let id: i64 = self
            .scripts
            .queue_command
            .key(&self.keys.env)
            .key(&commands)
            .arg(env)
            .arg(json)
            .arg(MAX_COMMANDS_PER_ENV)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        match id {
            0 => Ok(None),
            -1 => Err(StoreError::Conflict(format!(
                "environment {env} already holds {MAX_COMMANDS_PER_ENV} commands"
            ))),
            id => {
                cmd.id = id as u64;
                Ok(Some(cmd))
            }
        }
    }

    async fn list_commands(
        &self,
        env: EnvId,
        start: u64,
        limit: u64,
    ) -> Result<(Vec<StoredCommand>, u64), StoreError> {
        let (_, _, commands) = self.keys.commands(env);
        let mut conn = self.conn().await?;
        let total = command_count(&mut conn, &commands).await?;
        let newest = total.saturating_sub(start);
        let ids: Vec<u64> = (1..=newest).rev().take(limit as usize).collect();
        let out = self.read_commands(&mut conn, env, &ids).await?;
        Ok((out, total))
    }

    async fn deliver_commands(
        &self,
        env: EnvId,
        after: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredCommand>, StoreError> {
        let (sent, _, commands) = self.keys.commands(env);
        let mut conn = self.conn().await?;
        let total = command_count(&mut conn, &commands).await?;
        // Commands after the agent's last finished one are unfinished but for a rare race
        // with a result still in flight: reading `limit` of them is enough.
        let ids: Vec<u64> = (after.saturating_add(1)..=total).take(limit).collect();
        let mut out = self.read_commands(&mut conn, env, &ids).await?;
        out.retain(|c| c.finished_ms.is_none());
        let unsent: Vec<u64> = out
            .iter()
            .filter(|c| c.sent_ms.is_none())
            .map(|c| c.id)
            .collect();
        if !unsent.is_empty() {
            let mut pipe = redis::pipe();
            for id in &unsent {
                pipe.cmd("HSETNX").arg(&sent).arg(id).arg(now_ms).ignore();
            }
            let () = pipe.query_async(&mut conn).await.map_err(redis_err)?;
            for c in &mut out {
                c.sent_ms.get_or_insert(now_ms);
            }
        }
        Ok(out)
    }

    async fn finish_commands(
        &self,
        env: EnvId,
        results: &[CommandResult],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if results.is_empty() {
            return Ok(());
        }
        let (_, done, commands) = self.keys.commands(env);
        let mut conn = self.conn().await?;
        let total = command_count(&mut conn, &commands).await?;
        let mut pipe = redis::pipe();
        for r in results.iter().filter(|r| (1..=total).contains(&r.id)) {
            let json = serde_json::to_string(&CommandDone {
                finished_ms: now_ms,
                error: r.error.clone(),
            })
            .map_err(|e| StoreError::Corrupt(format!("command result: {e}")))?;
            pipe.cmd("HSETNX").arg(&done).arg(r.id).arg(json).ignore();
        }
        let () = pipe.query_async(&mut conn).await.map_err(redis_err)?;
        Ok(())
    }

    async fn publish(&self, change: Change) -> Result<(), StoreError> {
        let json = serde_json::to_string(&change)
            .map_err(|e| StoreError::Corrupt(format!("change: {e}")))?;
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

fn coll_name(coll: Collection) -> &'static str {
    match coll {
        Collection::Groups => "group",
        Collection::Tags => "tag",
    }
}
