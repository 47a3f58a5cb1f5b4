//! Every Redis key name, derived from the prefix in one place (the table in the module docs of
//! `redis`).

use crate::{Collection, EnvId};

/// Every key name, derived from the prefix in one place.
#[derive(Clone, Debug)]
pub(super) struct Keys {
    pub(super) env: String,
    pub(super) binding: String,
    pub(super) heartbeats: String,
    /// Where heartbeats were kept before (a hash), moved into `heartbeats` at connect.
    pub(super) heartbeat_hash: String,
    pub(super) env_seq: String,
    pub(super) groups: String,
    pub(super) group_names: String,
    pub(super) group_seq: String,
    /// group id -> JSON list of its tag ids.
    pub(super) group_tags: String,
    pub(super) tags: String,
    pub(super) tag_names: String,
    pub(super) tag_seq: String,
    pub(super) settings: String,
    pub(super) admin_keys: String,
    pub(super) snapshot: String,
    pub(super) commands: String,
    pub(super) cluster_secret: String,
    pub(super) grant: String,
    pub(super) tunnel: String,
    pub(super) tunnel_seq: String,
    pub(super) gateway: String,
    pub(super) gateways: String,
    pub(super) changes: String,
    pub(super) edge_groups: String,
    pub(super) edge_group_names: String,
    pub(super) edge_group_seq: String,
    /// + group id: a static edge group's members.
    pub(super) edge_group_members: String,
    /// + env id: the static edge groups an environment is in.
    pub(super) env_edge_groups: String,
    pub(super) edge_stacks: String,
    pub(super) edge_stack_names: String,
    /// stack id -> its newest version.
    pub(super) edge_stack_version: String,
    pub(super) edge_stack_seq: String,
    /// + stack id: its versions.
    pub(super) edge_stack_versions: String,
    /// stack id -> "revision|json" of its rollout.
    pub(super) edge_stack_rollouts: String,
    /// + stack id: its statuses (and `:all`, `:by:<code>`).
    pub(super) stack_status: String,
    /// + stack id: its counts per status and version.
    pub(super) stack_counts: String,
    /// + env id: the stacks it has a status of.
    pub(super) env_stacks: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            env: format!("{prefix}env"),
            binding: format!("{prefix}binding"),
            heartbeats: format!("{prefix}heartbeats"),
            heartbeat_hash: format!("{prefix}heartbeat"),
            env_seq: format!("{prefix}seq:env"),
            groups: format!("{prefix}groups"),
            group_names: format!("{prefix}groups:names"),
            group_seq: format!("{prefix}seq:groups"),
            group_tags: format!("{prefix}groups:tags"),
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
            edge_groups: format!("{prefix}edge_groups"),
            edge_group_names: format!("{prefix}edge_groups:names"),
            edge_group_seq: format!("{prefix}seq:edge_groups"),
            edge_group_members: format!("{prefix}edge_group:"),
            env_edge_groups: format!("{prefix}env_edge_groups:"),
            edge_stacks: format!("{prefix}edge_stacks"),
            edge_stack_names: format!("{prefix}edge_stacks:names"),
            edge_stack_version: format!("{prefix}edge_stacks:version"),
            edge_stack_seq: format!("{prefix}seq:edge_stacks"),
            edge_stack_versions: format!("{prefix}edge_stack_versions:"),
            edge_stack_rollouts: format!("{prefix}edge_stacks:rollout"),
            stack_status: format!("{prefix}stack_status:"),
            stack_counts: format!("{prefix}stack_counts:"),
            env_stacks: format!("{prefix}env_stacks:"),
        }
    }

    pub(super) fn snapshot(&self, env: EnvId) -> String {
        format!("{}{env}", self.snapshot)
    }

    /// (every command id kept, finished command ids, commands) of an environment: two sorted
    /// sets and a hash. Every key of an environment's commands is one of these three, so
    /// deleting them deletes its queue.
    pub(super) fn commands(&self, env: EnvId) -> (String, String, String) {
        let base = format!("{}{env}", self.commands);
        (format!("{base}:ids"), format!("{base}:finished"), base)
    }

    pub(super) fn edge_group_members(&self, group: u64) -> String {
        format!("{}{group}", self.edge_group_members)
    }

    pub(super) fn env_edge_groups(&self, env: EnvId) -> String {
        format!("{}{env}", self.env_edge_groups)
    }

    pub(super) fn edge_stack_versions(&self, stack: u64) -> String {
        format!("{}{stack}", self.edge_stack_versions)
    }

    pub(super) fn stack_status(&self, stack: u64) -> String {
        format!("{}{stack}", self.stack_status)
    }

    pub(super) fn stack_counts(&self, stack: u64) -> String {
        format!("{}{stack}", self.stack_counts)
    }

    pub(super) fn env_stacks(&self, env: EnvId) -> String {
        format!("{}{env}", self.env_stacks)
    }

    pub(super) fn grant(&self, token_hash: &[u8; 32]) -> String {
        format!("{}{}", self.grant, hex::encode(token_hash))
    }

    pub(super) fn tunnel(&self, env: EnvId) -> String {
        format!("{}{env}", self.tunnel)
    }

    pub(super) fn gateway(&self, id: &str) -> String {
        format!("{}{id}", self.gateway)
    }

    /// (id -> name hash, name -> id hash, id counter) of a named collection.
    pub(super) fn named(&self, coll: Collection) -> (&str, &str, &str) {
        match coll {
            Collection::Groups => (&self.groups, &self.group_names, &self.group_seq),
            Collection::Tags => (&self.tags, &self.tag_names, &self.tag_seq),
        }
    }
}
