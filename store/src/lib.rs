//! Shared state behind one set of traits, with two backends that pass one conformance suite
//! (`tests/conformance.rs`):
//!
//! * [`embedded::EmbeddedStore`] (feature `embedded`): redb in the data dir, for a single node
//!   (the default); survives restarts; change notifications are an in-process broadcast.
//! * [`redis::RedisStore`] (feature `redis`): Redis through deadpool-redis, for several
//!   replicas and gateways; change notifications travel over Redis pub/sub.
//!
//! The records are plain data in [`model`]. The interface is cut by domain, so a consumer can
//! hold just the slice it needs: [`Backend`] (name, liveness, change notifications),
//! [`TunnelStore`] (grants, tunnel locations, gateway registrations, the cluster secret: all a
//! tunnel gateway needs), [`EnvironmentStore`], [`CatalogStore`], [`EdgeGroupStore`],
//! [`EdgeStackStore`], [`StackStatusStore`], [`SnapshotStore`] and [`CommandStore`]. [`Store`] is all of them; `Arc<dyn Store>` coerces to `Arc<dyn
//! TunnelStore>`.
//!
//! Only this crate knows key names, table names and serialised layouts. Nothing on the agent
//! poll path calls the store in the steady state: the environment actors read it once when
//! they start and write heartbeats behind, in batches.
//!
//! Must never know: HTTP, actix, the gateway, the wire codec (records are JSON or raw bytes
//! here; agents' bytes are `proto`'s).

#[cfg(feature = "embedded")]
pub mod embedded;
mod error;
pub mod model;
#[cfg(feature = "redis")]
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use proto::async_mode::{Action, CommandResult};
use tokio::sync::broadcast;
use uuid::Uuid;

pub use error::{Cause, StoreError};
pub use model::*;

/// Capacity of the local change broadcast; a subscriber that lags further reloads everything.
pub const CHANGE_CHANNEL_CAPACITY: usize = 1024;

/// What every user of shared state needs: which backend it is, whether it answers, and the
/// change notifications that travel between replicas and gateways.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name for logs and metrics: "embedded" or "redis".
    fn backend(&self) -> &'static str;

    /// Cheap liveness probe for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Sends a change to every subscriber of every replica sharing this store.
    async fn publish(&self, change: Change) -> Result<(), StoreError>;
    /// Receives changes published from now on (by anyone, this replica included).
    fn subscribe(&self) -> broadcast::Receiver<Change>;
}

/// Tunnels: one-time grants, where each tunnel is (leased by its gateway), which gateways are
/// alive, and the secret replicas prove to gateways. The whole of what a tunnel gateway uses.
#[async_trait]
pub trait TunnelStore: Backend {
    /// Stores one-time credentials under the SHA-256 of their token, for `ttl`.
    async fn put_tunnel_grant(
        &self,
        token_hash: &[u8; 32],
        grant: &TunnelGrant,
        ttl: Duration,
    ) -> Result<(), StoreError>;
    /// Removes and returns the grant in one atomic step across replicas and gateways: of two
    /// concurrent takes of one token, exactly one gets it. `None` when unknown, already taken
    /// or expired.
    async fn take_tunnel_grant(
        &self,
        token_hash: &[u8; 32],
    ) -> Result<Option<TunnelGrant>, StoreError>;

    /// Records that `env`'s tunnel is now held by `gateway_id` for `lease`, with an epoch
    /// strictly greater than every epoch this store handed out for `env` before; replaces any
    /// previous location (the old holder's renewals and releases then fail).
    async fn claim_tunnel(
        &self,
        env: EnvId,
        gateway_id: &str,
        dial_addr: &str,
        since_ms: u64,
        lease: Duration,
    ) -> Result<TunnelLocation, StoreError>;
    /// Extends by `lease` the locations `(env, epoch)` that `gateway_id` still holds with that
    /// epoch, in one batch; returns the environments it no longer holds (record expired,
    /// released, or claimed since by another epoch): their tunnels must close.
    async fn renew_tunnels(
        &self,
        gateway_id: &str,
        held: &[(EnvId, u64)],
        lease: Duration,
    ) -> Result<Vec<EnvId>, StoreError>;
    /// Deletes `env`'s location if it still has `epoch`; `true` if it did.
    async fn release_tunnel(&self, env: EnvId, epoch: u64) -> Result<bool, StoreError>;
    /// The locations of `ids` whose lease has not expired, in the order of `ids`.
    async fn tunnel_locations(
        &self,
        ids: &[EnvId],
    ) -> Result<Vec<Option<TunnelLocation>>, StoreError>;

    /// Registers or refreshes a gateway for `lease`.
    async fn register_gateway(&self, info: &GatewayInfo, lease: Duration)
        -> Result<(), StoreError>;
    /// Removes a gateway's registration (graceful stop).
    async fn unregister_gateway(&self, id: &str) -> Result<(), StoreError>;
    /// Gateways whose registration has not expired, sorted by id.
    async fn live_gateways(&self) -> Result<Vec<GatewayInfo>, StoreError>;
    /// The random secret control-plane replicas prove to gateways when they open dial
    /// sessions: created by the first caller, then the same for everyone sharing the store.
    async fn cluster_secret(&self) -> Result<[u8; 32], StoreError>;
}

/// The latest heartbeat time a store keeps (2^53 - 1 ms since the epoch, the year 287,396):
/// the Redis backend keeps times as sorted-set scores, which are doubles.
pub const MAX_HEARTBEAT_MS: u64 = (1 << 53) - 1;

/// Environments, their Edge ID bindings and their heartbeats.
#[async_trait]
pub trait EnvironmentStore: Send + Sync + 'static {
    /// Creates environments with fresh, increasing ids, in order, in one batch.
    async fn create_environments(
        &self,
        new: Vec<NewEnvironment>,
    ) -> Result<Vec<Environment>, StoreError>;
    async fn get_environment(&self, id: EnvId) -> Result<Option<Environment>, StoreError>;
    /// Several environments in one read, in the order of `ids` (`None` where absent).
    async fn get_environments(&self, ids: &[EnvId])
        -> Result<Vec<Option<Environment>>, StoreError>;
    /// Every environment, ordered by id.
    async fn list_environments(&self) -> Result<Vec<Environment>, StoreError>;
    /// Replaces every field but `id`, `edge_id`, `join_secret` and `created_at_ms`, keeping
    /// the stored values of those atomically with the write: a record read before a
    /// concurrent [`EnvironmentStore::bind_edge_id`] or
    /// [`EnvironmentStore::reset_association`] can neither undo the binding nor bring back
    /// the old secret. `false` if absent.
    async fn update_environment(&self, env: &Environment) -> Result<bool, StoreError>;
    /// Deletes the environment, its binding, its heartbeat, its snapshot, its commands, its
    /// places in static edge groups and its edge stack statuses, in one atomic step. `false`
    /// if absent.
    async fn delete_environment(&self, id: EnvId) -> Result<bool, StoreError>;
    /// Binds `edge_id` if the environment is unbound and its join secret is still
    /// `join_secret` (the one the caller verified the agent's proof with), all in one atomic
    /// step across replicas. Without the secret check, a bind verified against the old secret
    /// but landing just after a [`EnvironmentStore::reset_association`] would hand the new
    /// generation to the old agent, and the real new agent would be refused.
    async fn bind_edge_id(
        &self,
        id: EnvId,
        edge_id: Uuid,
        join_secret: &str,
    ) -> Result<BindOutcome, StoreError>;
    /// Forgets the binding and stores a new join secret. Returns the updated record.
    async fn reset_association(
        &self,
        id: EnvId,
        new_secret: String,
    ) -> Result<Option<Environment>, StoreError>;

    /// Records last check-in times (ms since epoch) in one batch; a time never moves backwards.
    /// Heartbeats of unknown environments, and times past [`MAX_HEARTBEAT_MS`], are dropped.
    async fn record_heartbeats(&self, beats: &[(EnvId, u64)]) -> Result<(), StoreError>;
    /// Last check-in times, in the order of `ids`.
    async fn heartbeats(&self, ids: &[EnvId]) -> Result<Vec<Option<u64>>, StoreError>;
    /// Every environment whose last check-in is at `since_ms` or later, with that time: what
    /// changed since an earlier read (callers allow for heartbeats written behind, which
    /// arrive a flush period or so after their time). Unordered.
    async fn heartbeats_since(&self, since_ms: u64) -> Result<Vec<(EnvId, u64)>, StoreError>;
    /// How many [`EnvironmentStore::heartbeats_since`] would return, without returning them.
    async fn count_heartbeats_since(&self, since_ms: u64) -> Result<u64, StoreError>;
}

/// The small administrative records: groups and tags, default settings, admin key hashes.
#[async_trait]
pub trait CatalogStore: Send + Sync + 'static {
    async fn create_named(&self, coll: Collection, name: &str) -> Result<Named, StoreError>;
    async fn list_named(&self, coll: Collection) -> Result<Vec<Named>, StoreError>;
    async fn rename_named(
        &self,
        coll: Collection,
        id: u64,
        name: &str,
    ) -> Result<Option<Named>, StoreError>;
    /// Deletes a group or tag; `false` if absent. Environments referring to it are not touched
    /// (their `group_id` / `tag_ids` would keep a dangling id): the admin API refuses to
    /// delete a group or tag still in use, and callers must check that first. That check is
    /// not atomic with the delete, so readers must still tolerate unknown ids.
    async fn delete_named(&self, coll: Collection, id: u64) -> Result<bool, StoreError>;
    /// The tags of every group that has any, by group id (a group's tags count as its
    /// environments' own for dynamic edge groups).
    async fn group_tags(&self) -> Result<std::collections::BTreeMap<u64, Vec<u64>>, StoreError>;
    /// Replaces a group's tags (kept sorted, without duplicates); `false` when there is no
    /// such group. Deleting the group deletes its tags.
    async fn set_group_tags(&self, group: u64, tags: &[u64]) -> Result<bool, StoreError>;

    /// Settings, or the defaults when none were stored.
    async fn settings(&self) -> Result<Settings, StoreError>;
    async fn put_settings(&self, settings: &Settings) -> Result<(), StoreError>;

    /// SHA-256 hashes of the admin API keys.
    async fn admin_key_hashes(&self) -> Result<Vec<[u8; 32]>, StoreError>;
    /// Replaces the whole set with `hashes` (duplicates collapse), atomically: a key left out
    /// is revoked. Readers see either the old set or the new one, never a mix or an empty
    /// set in between.
    async fn replace_admin_key_hashes(&self, hashes: &[[u8; 32]]) -> Result<(), StoreError>;
}

/// Edge groups: the sets of environments edge stacks target. Few (tens to hundreds), each
/// static (its members kept per member) or dynamic (tags; members computed by the caller).
#[async_trait]
pub trait EdgeGroupStore: Send + Sync + 'static {
    /// Creates `group` under a fresh id (its `id` is ignored). Static members that are not
    /// environments are left out, in the same atomic step, so no group ever lists an
    /// environment that is gone. `Conflict` when another group has the name.
    async fn create_edge_group(&self, group: &EdgeGroup) -> Result<EdgeGroup, StoreError>;
    async fn edge_group(&self, id: u64) -> Result<Option<EdgeGroup>, StoreError>;
    /// Every edge group, by id.
    async fn list_edge_groups(&self) -> Result<Vec<EdgeGroup>, StoreError>;
    /// Replaces group `group.id` (name, kind, tags and members, as on create); `None` when
    /// there is no such group, `Conflict` when another group has the name.
    async fn update_edge_group(&self, group: &EdgeGroup) -> Result<Option<EdgeGroup>, StoreError>;
    /// `false` if absent.
    async fn delete_edge_group(&self, id: u64) -> Result<bool, StoreError>;
}

/// Edge stacks: versioned compose files targeted at edge groups.
#[async_trait]
pub trait EdgeStackStore: Send + Sync + 'static {
    /// Creates `stack` (its `id` and `version` ignored) with `compose` as version 1, at
    /// `stack.created_ms`. `Conflict` when another stack has the name.
    async fn create_edge_stack(
        &self,
        stack: &EdgeStack,
        compose: &str,
    ) -> Result<EdgeStack, StoreError>;
    async fn edge_stack(&self, id: u64) -> Result<Option<EdgeStack>, StoreError>;
    /// Every edge stack, by id.
    async fn list_edge_stacks(&self) -> Result<Vec<EdgeStack>, StoreError>;
    /// Replaces the targets and variables of stack `stack.id` (not its name, version or
    /// versions); `None` when there is no such stack.
    async fn update_edge_stack(&self, stack: &EdgeStack) -> Result<Option<EdgeStack>, StoreError>;
    /// Adds `compose` as version `after + 1`, if the stack's newest version is still `after`
    /// (`Conflict` otherwise: another change came first), pruning versions beyond the newest
    /// [`MAX_STACK_VERSIONS`]. `None` when there is no such stack.
    async fn add_stack_version(
        &self,
        id: u64,
        after: u32,
        compose: &str,
        now_ms: u64,
    ) -> Result<Option<EdgeStack>, StoreError>;
    /// The kept versions of a stack, newest first (empty for no stack).
    async fn stack_versions(&self, id: u64) -> Result<Vec<StackVersion>, StoreError>;
    async fn stack_version(
        &self,
        id: u64,
        version: u32,
    ) -> Result<Option<StackVersion>, StoreError>;
    /// Deletes the stack, its versions, its statuses and its rollout; `false` if absent.
    async fn delete_edge_stack(&self, id: u64) -> Result<bool, StoreError>;
    /// The rollout of a stack, if it has one.
    async fn stack_rollout(&self, id: u64) -> Result<Option<Rollout>, StoreError>;
    /// Every stack's rollout, by stack id.
    async fn stack_rollouts(&self) -> Result<Vec<(u64, Rollout)>, StoreError>;
    /// Stores `rollout` for stack `id` (with revision `expected + 1`) if the stored one has
    /// revision `expected` (0: none stored): `false` when another write came first or there
    /// is no such stack.
    async fn put_stack_rollout(
        &self,
        id: u64,
        expected: u64,
        rollout: &Rollout,
    ) -> Result<bool, StoreError>;
}

/// Per-environment statuses of edge stacks: one small record per (stack, environment),
/// written in batches, with counts per status and version kept as they change (never a
/// record of the whole fleet rewritten per update).
#[async_trait]
pub trait StackStatusStore: Send + Sync + 'static {
    /// Records statuses of `stack`'s environments in one batch. A report older than the one
    /// stored for its environment (`updated_ms`) is dropped; so are reports for environments
    /// that do not exist (any more). Counts follow in the same atomic step.
    async fn record_stack_statuses(
        &self,
        stack: u64,
        statuses: &[StackStatus],
    ) -> Result<(), StoreError>;
    /// The counts of `stack`, by status then version (only non-zero ones).
    async fn stack_status_counts(&self, stack: u64) -> Result<Vec<StatusCount>, StoreError>;
    /// A page of `stack`'s statuses (those at `status`, or all), by environment id, and how
    /// many there are in all.
    async fn stack_statuses(
        &self,
        stack: u64,
        status: Option<DeployStatus>,
        start: u64,
        limit: u64,
    ) -> Result<(Vec<StackStatus>, u64), StoreError>;
    /// Forgets the statuses of `envs` for `stack` (no longer targeted, and removed).
    async fn forget_stack_statuses(&self, stack: u64, envs: &[EnvId]) -> Result<(), StoreError>;
}

/// The latest snapshot of each environment's engine.
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// Keeps `snap` as `env`'s latest snapshot unless the stored one was taken later, and
    /// says which happened (an agent is told its snapshot was taken only when it was).
    async fn put_snapshot(
        &self,
        env: EnvId,
        snap: &StoredSnapshot,
    ) -> Result<SnapshotPut, StoreError>;
    async fn snapshot(&self, env: EnvId) -> Result<Option<StoredSnapshot>, StoreError>;
}

/// Async-mode command queues, one per environment.
///
/// Ids are strictly increasing per environment and never repeated, with gaps
/// ([`next_command_id`]: the newest id + 1, or the queue time in ms × 1000 when that is more),
/// so agents can keep just the highest id they finished. Finished commands beyond the newest
/// [`KEEP_FINISHED_COMMANDS_PER_ENV`] are pruned when a command is queued; unfinished ones
/// never are.
#[async_trait]
pub trait CommandStore: Send + Sync + 'static {
    /// Queues `action` for `env`, queued at `now_ms` (the clock its id comes from), and prunes
    /// the finished commands beyond the newest [`KEEP_FINISHED_COMMANDS_PER_ENV`], in one
    /// atomic step. `None` when the environment does not exist; `Conflict` when it already
    /// holds [`MAX_UNFINISHED_COMMANDS_PER_ENV`] unfinished commands, or (with a clock past
    /// the year 2255) when ids would pass [`MAX_COMMAND_ID`]; nothing changes then.
    async fn queue_command(
        &self,
        env: EnvId,
        action: &Action,
        now_ms: u64,
    ) -> Result<Option<StoredCommand>, StoreError>;
    /// `env`'s commands, newest (highest id) first: `limit` of them after skipping `start`,
    /// and how many are kept in all.
    async fn list_commands(
        &self,
        env: EnvId,
        start: u64,
        limit: u64,
    ) -> Result<(Vec<StoredCommand>, u64), StoreError>;
    /// Unfinished commands with an id above `after`, oldest first, at most `limit`; marks
    /// each sent (keeping the first time it was).
    async fn deliver_commands(
        &self,
        env: EnvId,
        after: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredCommand>, StoreError>;
    /// Records results ([`StoredCommand::finish`]); unknown ids, and ids already pruned, are
    /// ignored.
    async fn finish_commands(
        &self,
        env: EnvId,
        results: &[CommandResult],
        now_ms: u64,
    ) -> Result<(), StoreError>;
}

/// All of shared state: what a control-plane replica holds.
pub trait Store:
    TunnelStore
    + EnvironmentStore
    + CatalogStore
    + EdgeGroupStore
    + EdgeStackStore
    + StackStatusStore
    + SnapshotStore
    + CommandStore
{
}

impl<T> Store for T where
    T: TunnelStore
        + EnvironmentStore
        + CatalogStore
        + EdgeGroupStore
        + EdgeStackStore
        + StackStatusStore
        + SnapshotStore
        + CommandStore
{
}

pub type SharedStore = Arc<dyn Store>;

/// The traits in scope (unnamed), for calling store methods on a concrete backend such as
/// `RedisStore`: `use store::prelude::*;`. Through `Arc<dyn Store>` no import is needed.
pub mod prelude {
    pub use crate::Backend as _;
    pub use crate::CatalogStore as _;
    pub use crate::CommandStore as _;
    pub use crate::EdgeGroupStore as _;
    pub use crate::EdgeStackStore as _;
    pub use crate::EnvironmentStore as _;
    pub use crate::SnapshotStore as _;
    pub use crate::StackStatusStore as _;
    pub use crate::TunnelStore as _;
}
/// The slice a tunnel gateway holds.
pub type SharedTunnelStore = Arc<dyn TunnelStore>;
