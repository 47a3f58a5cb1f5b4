//! The domain records every replica and gateway shares: environments, groups and tags, edge
//! groups, settings, tunnel grants and locations, gateway registrations, snapshots, async commands,
//! and the change notifications that travel between replicas. Plain data: how each backend
//! lays them out is its own business.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub type EnvId = u64;

/// How an environment's agent talks to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EdgeMode {
    #[default]
    Standard,
    Async,
}

/// A durable environment record. `Debug` is written by hand (below) so that the join secret
/// never reaches a log line through `{:?}`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Environment {
    pub id: EnvId,
    pub name: String,
    pub mode: EdgeMode,
    /// Per-environment overrides in seconds; `None` follows the settings' defaults.
    pub checkin_interval: Option<u32>,
    pub ping_interval: Option<u32>,
    pub snapshot_interval: Option<u32>,
    pub command_interval: Option<u32>,
    pub group_id: Option<u64>,
    pub tag_ids: Vec<u64>,
    /// Host variable names passed through to the agent by install commands.
    pub env_vars: Vec<String>,
    /// This environment's values for edge stacks' `${NAME}`s (over the stacks' own).
    #[serde(default)]
    pub variables: std::collections::BTreeMap<String, String>,
    pub allow_self_signed: bool,
    /// The join secret, base64url (see `proto::token::JoinSecret`). It has to be kept, not
    /// hashed: the server verifies HMAC proofs with it and install commands re-issue the key.
    /// Only creation and [`Store::reset_association`] set it; [`Store::update_environment`]
    /// leaves it alone, so a stale copy can never bring back a rotated secret.
    pub join_secret: String,
    /// The bound Edge ID. Only [`Store::bind_edge_id`] and [`Store::reset_association`] (and a
    /// pre-assigned ID at creation) change it; [`Store::update_environment`] leaves it alone.
    pub edge_id: Option<Uuid>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// An environment to create; the store assigns the id. `Debug` hides the join secret, as for
/// [`Environment`].
#[derive(Clone, PartialEq, Eq)]
pub struct NewEnvironment {
    pub name: String,
    pub mode: EdgeMode,
    pub checkin_interval: Option<u32>,
    pub ping_interval: Option<u32>,
    pub snapshot_interval: Option<u32>,
    pub command_interval: Option<u32>,
    pub group_id: Option<u64>,
    pub tag_ids: Vec<u64>,
    pub env_vars: Vec<String>,
    pub variables: std::collections::BTreeMap<String, String>,
    pub allow_self_signed: bool,
    pub join_secret: String,
    pub edge_id: Option<Uuid>,
    pub created_at_ms: u64,
}

impl NewEnvironment {
    pub fn into_environment(self, id: EnvId) -> Environment {
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
            variables: self.variables,
            allow_self_signed: self.allow_self_signed,
            join_secret: self.join_secret,
            edge_id: self.edge_id,
            created_at_ms: self.created_at_ms,
        }
    }
}

/// What `Debug` shows instead of a join secret.
const REDACTED: &str = "<redacted>";

// Both impls destructure `self` so that a field added to the struct fails to compile here
// until someone decides whether it may be printed.
impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            id,
            name,
            mode,
            checkin_interval,
            ping_interval,
            snapshot_interval,
            command_interval,
            group_id,
            tag_ids,
            env_vars,
            variables,
            allow_self_signed,
            join_secret: _,
            edge_id,
            created_at_ms,
        } = self;
        f.debug_struct("Environment")
            .field("id", id)
            .field("name", name)
            .field("mode", mode)
            .field("checkin_interval", checkin_interval)
            .field("ping_interval", ping_interval)
            .field("snapshot_interval", snapshot_interval)
            .field("command_interval", command_interval)
            .field("group_id", group_id)
            .field("tag_ids", tag_ids)
            .field("env_vars", env_vars)
            .field("variables", &variables.keys().collect::<Vec<_>>())
            .field("allow_self_signed", allow_self_signed)
            .field("join_secret", &format_args!("{REDACTED}"))
            .field("edge_id", edge_id)
            .field("created_at_ms", created_at_ms)
            .finish()
    }
}

impl std::fmt::Debug for NewEnvironment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            name,
            mode,
            checkin_interval,
            ping_interval,
            snapshot_interval,
            command_interval,
            group_id,
            tag_ids,
            env_vars,
            variables,
            allow_self_signed,
            join_secret: _,
            edge_id,
            created_at_ms,
        } = self;
        f.debug_struct("NewEnvironment")
            .field("name", name)
            .field("mode", mode)
            .field("checkin_interval", checkin_interval)
            .field("ping_interval", ping_interval)
            .field("snapshot_interval", snapshot_interval)
            .field("command_interval", command_interval)
            .field("group_id", group_id)
            .field("tag_ids", tag_ids)
            .field("env_vars", env_vars)
            .field("variables", &variables.keys().collect::<Vec<_>>())
            .field("allow_self_signed", allow_self_signed)
            .field("join_secret", &format_args!("{REDACTED}"))
            .field("edge_id", edge_id)
            .field("created_at_ms", created_at_ms)
            .finish()
    }
}

/// Outcome of binding an Edge ID to an environment (atomic compare-and-set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindOutcome {
    /// The environment was unbound and is now bound to the given ID.
    Bound,
    /// The environment is already bound to this very ID.
    AlreadyBound,
    /// The environment is bound to another ID, which is returned; nothing changed.
    BoundToOther(Uuid),
    /// The join secret is no longer the given one (association reset meanwhile): nothing
    /// changed. Takes precedence over the three above: the caller's view of the environment
    /// is a past generation, and the binding of the current one is none of its business.
    SecretChanged,
    NotFound,
}

/// Groups and tags are both named collections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Collection {
    Groups,
    Tags,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Named {
    pub id: u64,
    pub name: String,
}

/// How the tags of a dynamic edge group select environments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TagMatch {
    /// Any one of the tags.
    #[default]
    Any,
    /// Every one of them.
    All,
}

/// A named set of environments that edge stacks target: static (a list of environments) or
/// dynamic (the environments whose tags match, computed by the control plane).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeGroup {
    pub id: u64,
    pub name: String,
    pub dynamic: bool,
    /// Dynamic groups: the tags that select members.
    pub tag_ids: Vec<u64>,
    pub tag_match: TagMatch,
    /// Static groups: the members, ascending. A deleted environment leaves every group with
    /// it, in the same atomic step as its deletion.
    pub environment_ids: Vec<EnvId>,
}

/// The stored form of an [`EdgeGroup`] without its id and members (kept apart, per member).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeGroupRecord {
    pub name: String,
    pub dynamic: bool,
    #[serde(default)]
    pub tag_ids: Vec<u64>,
    #[serde(default)]
    pub tag_match: TagMatch,
}

impl EdgeGroup {
    pub fn record(&self) -> EdgeGroupRecord {
        EdgeGroupRecord {
            name: self.name.clone(),
            dynamic: self.dynamic,
            tag_ids: self.tag_ids.clone(),
            tag_match: self.tag_match,
        }
    }

    pub fn from_record(id: u64, r: EdgeGroupRecord, environment_ids: Vec<EnvId>) -> Self {
        Self {
            id,
            name: r.name,
            dynamic: r.dynamic,
            tag_ids: r.tag_ids,
            tag_match: r.tag_match,
            environment_ids,
        }
    }
}

/// How an edge stack's new version goes out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutConfig {
    /// Environments in the first batch; `None`: all at once.
    #[serde(default)]
    pub batch_size: Option<u32>,
    #[serde(default)]
    pub batch_growth: BatchGrowth,
    /// Pause between one batch settling and the next starting.
    #[serde(default)]
    pub wait_secs: u32,
    /// A batch whose environments have not all reported by then counts them as not yet and
    /// goes on (offline or async devices get the version when they next check in).
    #[serde(default = "default_batch_timeout")]
    pub batch_timeout_secs: u32,
    /// Below 1: the share of the released environments that may fail; from 1 on: how many.
    /// A failure count above it applies `on_failure`.
    #[serde(default)]
    pub failure_threshold: f64,
    #[serde(default)]
    pub on_failure: OnFailure,
}

fn default_batch_timeout() -> u32 {
    600
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            batch_size: None,
            batch_growth: BatchGrowth::Fixed,
            wait_secs: 0,
            batch_timeout_secs: default_batch_timeout(),
            failure_threshold: 0.0,
            on_failure: OnFailure::Pause,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BatchGrowth {
    #[default]
    Fixed,
    Double,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OnFailure {
    #[default]
    Pause,
    Rollback,
    Continue,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RolloutState {
    Idle,
    Rolling,
    Paused,
    RollingBack,
    Done,
    Aborted,
}

/// Where an edge stack's rollout stands: which version its environments should run. Those
/// whose rank (a hash of stack and environment) is below `threshold` run `to_version`, the
/// others `from_version` (0: none). The threshold only grows while a rollout goes on, so an
/// environment never goes back, and one that joins the targets meanwhile falls on its side
/// of it at once. Stored apart from the stack's record, with a revision for compare-and-set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Bumped by every write ([`crate::EdgeStackStore::put_stack_rollout`]).
    #[serde(default)]
    pub revision: u64,
    pub config: RolloutConfig,
    pub state: RolloutState,
    pub from_version: u32,
    pub to_version: u32,
    pub threshold: u64,
    /// The batch being rolled (1 for the first).
    pub batch: u32,
    /// Environments released so far (the targets below the threshold when it last moved).
    pub released: u64,
    pub batch_started_ms: u64,
    /// While waiting between batches: when the next one starts.
    #[serde(default)]
    pub next_batch_ms: Option<u64>,
    /// Why it paused, rolled back or stopped.
    #[serde(default)]
    pub reason: Option<String>,
    pub updated_ms: u64,
    /// Failures an operator resumed past: they no longer count against the threshold.
    #[serde(default)]
    pub tolerated_failures: u64,
}

/// Versions of one edge stack kept at most; older ones are pruned as new ones are added (the
/// current one is never pruned).
pub const MAX_STACK_VERSIONS: u32 = 100;

/// An edge stack: a compose file, versioned, deployed to the environments of its edge groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeStack {
    pub id: u64,
    /// Unique; on the device the compose project is `edge_<name>`.
    pub name: String,
    pub edge_group_ids: Vec<u64>,
    /// Substituted into the compose file (`${NAME}`), per environment with its own values.
    pub variables: std::collections::BTreeMap<String, String>,
    /// The newest version: 1 on create, one more per new compose file.
    pub version: u32,
    pub created_ms: u64,
}

/// The stored form of an [`EdgeStack`] without its id and version (kept apart, so that a new
/// version is a compare-and-set on a number).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeStackRecord {
    pub name: String,
    #[serde(default)]
    pub edge_group_ids: Vec<u64>,
    #[serde(default)]
    pub variables: std::collections::BTreeMap<String, String>,
    pub created_ms: u64,
}

impl EdgeStack {
    pub fn record(&self) -> EdgeStackRecord {
        EdgeStackRecord {
            name: self.name.clone(),
            edge_group_ids: self.edge_group_ids.clone(),
            variables: self.variables.clone(),
            created_ms: self.created_ms,
        }
    }

    pub fn from_record(id: u64, version: u32, r: EdgeStackRecord) -> Self {
        Self {
            id,
            name: r.name,
            edge_group_ids: r.edge_group_ids,
            variables: r.variables,
            version,
            created_ms: r.created_ms,
        }
    }
}

/// One kept version of an edge stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StackVersion {
    pub version: u32,
    pub compose: String,
    pub created_ms: u64,
}

/// Where an edge stack stands on one environment, as its agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeployStatus {
    /// Targeted; the agent has not said it knows.
    Pending,
    Acknowledged,
    ImagesPulled,
    Deploying,
    /// Its containers are up (and healthy where a healthcheck exists) for the settle time.
    Running,
    Error,
    Removing,
    Removed,
}

impl DeployStatus {
    pub const ALL: [DeployStatus; 8] = [
        DeployStatus::Pending,
        DeployStatus::Acknowledged,
        DeployStatus::ImagesPulled,
        DeployStatus::Deploying,
        DeployStatus::Running,
        DeployStatus::Error,
        DeployStatus::Removing,
        DeployStatus::Removed,
    ];

    /// A small number for keys and indexes.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }
}

/// One environment's status for one edge stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StackStatus {
    pub env: EnvId,
    pub status: DeployStatus,
    /// The version the status is about.
    pub version: u32,
    /// The engine's message, with `Error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the agent saw it (ms since the epoch): an older report never replaces a newer one.
    pub updated_ms: u64,
}

/// How many environments of a stack are at a status with a version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StatusCount {
    pub status: DeployStatus,
    pub version: u32,
    pub count: u64,
}

/// Default intervals, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub checkin_interval: u32,
    pub ping_interval: u32,
    pub snapshot_interval: u32,
    pub command_interval: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            checkin_interval: 5,
            ping_interval: 60,
            snapshot_interval: 60,
            command_interval: 60,
        }
    }
}

/// One-time tunnel credentials as stored: kept under the SHA-256 of the token (the token
/// itself only exists in the agent's sealed answer), consumed by the gateway on use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TunnelGrant {
    pub env: EnvId,
    pub edge_id: Uuid,
    /// ms since the Unix epoch (issuer's clock); the store also expires it by its TTL.
    pub expires_ms: u64,
}

/// Where an environment's tunnel is: kept alive by the holding gateway's lease; `epoch` grows
/// with every claim of the environment, so a stale holder can neither renew nor release it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TunnelLocation {
    pub env: EnvId,
    pub gateway_id: String,
    /// Where control-plane replicas open dial sessions to that gateway (`host:port`).
    pub dial_addr: String,
    pub epoch: u64,
    /// When the tunnel opened, ms since the Unix epoch.
    pub since_ms: u64,
}

/// A live tunnel gateway, registered with a lease it keeps renewing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayInfo {
    pub id: String,
    /// What agents connect to (`host:port`).
    pub public_addr: String,
    /// What control-plane replicas connect to (`host:port`).
    pub dial_addr: String,
    /// Tunnels open on it when it last renewed.
    pub tunnels: u64,
}

/// What [`SnapshotStore::put_snapshot`](crate::SnapshotStore::put_snapshot) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotPut {
    /// It is the environment's latest snapshot now.
    Stored,
    /// The stored one was taken later and stays: nothing changed.
    KeptNewer,
    /// No such environment: nothing stored.
    NoEnvironment,
}

/// The latest snapshot of an environment's engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredSnapshot {
    /// When the agent took it (ms since the Unix epoch).
    pub taken_ms: u64,
    /// When the server stored it.
    pub received_ms: u64,
    /// `proto::snapshot::compress`ed bytes.
    pub body: Vec<u8>,
}

/// An async command queued for an environment, and how far it got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredCommand {
    /// Per environment, strictly increasing and never repeated, with gaps: see
    /// [`next_command_id`].
    pub id: u64,
    pub action: proto::async_mode::Action,
    pub created_ms: u64,
    /// First handed to the agent.
    pub sent_ms: Option<u64>,
    /// When its result arrived.
    pub finished_ms: Option<u64>,
    /// The engine's or the agent's error, for a failed command.
    pub error: Option<String>,
}

/// Where a command is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandState {
    Pending,
    Sent,
    Succeeded,
    Failed,
}

impl StoredCommand {
    pub fn state(&self) -> CommandState {
        match (self.finished_ms, &self.error, self.sent_ms) {
            (Some(_), None, _) => CommandState::Succeeded,
            (Some(_), Some(_), _) => CommandState::Failed,
            (None, _, Some(_)) => CommandState::Sent,
            (None, _, None) => CommandState::Pending,
        }
    }

    /// Takes `result` unless one was taken before (the first result wins: a retried request
    /// repeats results, it never changes them).
    pub fn finish(&mut self, result: &proto::async_mode::CommandResult, now_ms: u64) -> bool {
        if self.finished_ms.is_some() {
            return false;
        }
        self.finished_ms = Some(now_ms);
        self.error = result.error.clone();
        true
    }
}

/// Most unfinished (pending or sent) commands per environment: queueing more is refused
/// (`Conflict`) until the agent has worked through some. Finished ones never count: those
/// beyond [`KEEP_FINISHED_COMMANDS_PER_ENV`] are pruned when a command is queued, so at most
/// this many plus the finished ones are stored.
pub const MAX_UNFINISHED_COMMANDS_PER_ENV: u64 = 10_000;

/// Finished (succeeded or failed) commands kept per environment: the newest ones, by id. Each
/// queueing prunes the older finished ones in the same atomic step (Lua script, redb write
/// transaction), so finished commands pile up only until the next command is queued. Enough
/// to read back what happened lately; unfinished commands are never pruned.
pub const KEEP_FINISHED_COMMANDS_PER_ENV: u64 = 100;

/// Command ids a millisecond of queue time holds before ids run ahead of the clock.
pub const COMMAND_IDS_PER_MS: u64 = 1_000;

/// The largest command id, 2^53 - 1: ids stay exact as Lua numbers (the Redis scripts) and as
/// JSON numbers in JavaScript. Queue times reach it in the year 2255.
pub const MAX_COMMAND_ID: u64 = (1 << 53) - 1;

// The newest command is never pruned, so it keeps the high-water mark of the ids.
const _: () = assert!(KEEP_FINISHED_COMMANDS_PER_ENV >= 1);

/// The id of a command queued at `now_ms` when the newest id of its environment is `newest`
/// (0 for none): `max(newest + 1, now_ms * COMMAND_IDS_PER_MS)`. `None` beyond
/// [`MAX_COMMAND_ID`].
///
/// So an id reads as its queue time: `id / 1000` is the millisecond it was queued (since the
/// Unix epoch), `id % 1000` counts the commands queued before it in that millisecond (for
/// example 1718000000123004 is the fifth of ms 1718000000123). Only more than 1,000 commands
/// within one millisecond, or a clock that went back, move ids ahead of the clock.
///
/// Ids grow strictly per environment whatever the clock does, as long as the newest command is
/// kept (it is never pruned). And a backend that lost its last writes (Redis after a crash
/// with `appendfsync everysec`, or a failover to a replica that lagged) still never hands an
/// id out again: the lost ids were at most the clock of their time, and the next one is
/// queued later, above them (unless the queueing clock went back by more than the time
/// between). Agents depend on this: they skip ids at or below their `done_through`.
pub fn next_command_id(newest: u64, now_ms: u64) -> Option<u64> {
    let id = newest
        .saturating_add(1)
        .max(now_ms.saturating_mul(COMMAND_IDS_PER_MS));
    (id <= MAX_COMMAND_ID).then_some(id)
}

/// What changed, broadcast to every replica (including the one that published it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Created, updated, or its association reset: reload it.
    Environment(EnvId),
    EnvironmentDeleted(EnvId),
    Settings,
    AdminKeys,
    /// Groups or their tags changed: what selects a dynamic edge group's members.
    Catalog,
    /// Edge groups or edge stacks changed: what environments should run.
    EdgeStacks,
    /// Notifications may have been missed: reload everything. Sent by the store itself to its
    /// local subscribers, e.g. by the Redis backend after re-subscribing to a lost channel.
    Resync,
    /// An operator needs the environment's tunnel until `until_ms`: the replica holding the
    /// agent's check-in answers it with credentials.
    TunnelWanted {
        env: EnvId,
        until_ms: u64,
    },
    /// A tunnel opened (published by the gateway that holds it).
    TunnelOpened(TunnelLocation),
    /// The tunnel with this epoch closed (or its gateway lost it).
    TunnelClosed {
        env: EnvId,
        epoch: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "c2VjcmV0LXRoYXQtbXVzdC1ub3QtbGVhaw";

    fn new_env() -> NewEnvironment {
        NewEnvironment {
            name: "visible-name".to_owned(),
            mode: EdgeMode::Standard,
            checkin_interval: Some(5),
            ping_interval: None,
            snapshot_interval: None,
            command_interval: None,
            group_id: Some(3),
            tag_ids: vec![4],
            env_vars: vec!["HTTP_PROXY".to_owned()],
            variables: [("DB_PASSWORD".to_owned(), "hunter2".to_owned())].into(),
            allow_self_signed: false,
            join_secret: SECRET.to_owned(),
            edge_id: Some(Uuid::nil()),
            created_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn command_ids_follow_the_clock_and_never_go_back() {
        // The first id of an environment is its queue time in ms, times 1000.
        assert_eq!(
            next_command_id(0, 1_718_000_000_123),
            Some(1_718_000_000_123_000)
        );
        // Within the same millisecond: the next one up.
        assert_eq!(
            next_command_id(1_718_000_000_123_000, 1_718_000_000_123),
            Some(1_718_000_000_123_001)
        );
        // A later millisecond jumps to the clock, leaving a gap.
        assert_eq!(
            next_command_id(1_718_000_000_123_001, 1_718_000_000_200),
            Some(1_718_000_000_200_000)
        );
        // A clock that went back does not take the ids with it.
        assert_eq!(
            next_command_id(1_718_000_000_200_000, 5),
            Some(1_718_000_000_200_001)
        );
        // Without a clock at all, ids still start at 1.
        assert_eq!(next_command_id(0, 0), Some(1));
        // The ceiling, and beyond it.
        assert_eq!(next_command_id(MAX_COMMAND_ID - 1, 0), Some(MAX_COMMAND_ID));
        assert_eq!(next_command_id(MAX_COMMAND_ID, 0), None);
        assert_eq!(next_command_id(0, u64::MAX), None);
        assert_eq!(next_command_id(u64::MAX, 0), None);
        // 2^53 / 1000 ms after the Unix epoch is in the year 2255.
        const { assert!(MAX_COMMAND_ID / COMMAND_IDS_PER_MS / 1000 / 86_400 / 365 >= 2255 - 1970) };
    }

    #[test]
    fn debug_redacts_the_join_secret() {
        let new = new_env();
        let env = new.clone().into_environment(42);
        for text in [format!("{new:?}"), format!("{env:?}"), format!("{env:#?}")] {
            assert!(!text.contains(SECRET), "{text}");
            assert!(text.contains("join_secret: <redacted>"), "{text}");
            // Variables may hold secrets too: their names only.
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("DB_PASSWORD"), "{text}");
            // The other fields are all still there.
            assert!(text.contains("visible-name"), "{text}");
            assert!(text.contains("HTTP_PROXY"), "{text}");
            assert!(text.contains("1700000000000"), "{text}");
        }
        assert!(format!("{env:?}").contains("id: 42"));
    }
}
