//! The Lua scripts of the rules that must be atomic across replicas (`lua/*.lua`; each file
//! documents its KEYS, ARGV and reply).

use deadpool_redis::redis::Script;

pub(super) struct Scripts {
    /// Stores a snapshot of an existing environment unless the stored one was taken later.
    pub(super) put_snapshot: Script,
    /// Queues a command with its clock-based id and prunes old finished ones, in one step.
    pub(super) queue_command: Script,
    /// Picks the unfinished commands after an id and marks them sent.
    pub(super) deliver_commands: Script,
    /// Records first results of commands still kept, and marks them finished.
    pub(super) finish_commands: Script,
    /// Hands out the next epoch and stores the location with it, in one step.
    pub(super) claim: Script,
    /// Extends the locations still held by the given gateway with the given epochs.
    pub(super) renew: Script,
    /// Compare-and-delete of a location on its epoch.
    pub(super) release: Script,
    /// Forgets registered gateways whose key expired, unless they registered again meanwhile.
    pub(super) prune_gateways: Script,
    /// Binds an unbound, existing environment whose join secret is still the given one.
    pub(super) bind: Script,
    /// Replaces an existing record, keeping its stored join secret.
    pub(super) update: Script,
    /// Compare-and-set of a record that also drops its binding.
    pub(super) reset: Script,
    /// Records heartbeats of existing environments, never moving one backwards.
    pub(super) heartbeats: Script,
    /// Moves heartbeats from the hash of earlier versions into the sorted set.
    pub(super) migrate_heartbeats: Script,
    /// Creates a group or tag under a name not yet taken.
    pub(super) create_named: Script,
    /// Renames a group or tag unless the name is taken.
    pub(super) rename_named: Script,
    /// Deletes a group or tag and its name.
    pub(super) delete_named: Script,
    /// Sets or clears an existing group's tags.
    pub(super) set_group_tags: Script,
    /// Creates or replaces an edge group and its static members (existing environments only).
    pub(super) put_edge_group: Script,
    /// Deletes an edge group, its name and its members.
    pub(super) delete_edge_group: Script,
    /// Deletes an environment and all that is its, edge group memberships included.
    pub(super) delete_env: Script,
    /// Creates an edge stack with version 1 under a name not yet taken.
    pub(super) create_edge_stack: Script,
    /// Replaces an existing edge stack's record.
    pub(super) update_edge_stack: Script,
    /// Compare-and-set of an edge stack's next version, pruning the oldest.
    pub(super) add_stack_version: Script,
    /// Deletes an edge stack with its versions and statuses.
    pub(super) delete_edge_stack: Script,
    pub(super) put_stack_rollout: Script,
    /// Records newer statuses of existing environments, with their counts.
    pub(super) record_stack_statuses: Script,
    /// Forgets environments' statuses of a stack, with their counts.
    pub(super) forget_stack_statuses: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        // `Script` sends EVALSHA and falls back to loading the script on NOSCRIPT (a restarted
        // or flushed Redis), so callers need not care whether it is cached.
        Self {
            put_snapshot: Script::new(include_str!("lua/put_snapshot.lua")),
            queue_command: Script::new(include_str!("lua/queue_command.lua")),
            deliver_commands: Script::new(include_str!("lua/deliver_commands.lua")),
            finish_commands: Script::new(include_str!("lua/finish_commands.lua")),
            claim: Script::new(include_str!("lua/claim.lua")),
            renew: Script::new(include_str!("lua/renew.lua")),
            release: Script::new(include_str!("lua/release.lua")),
            prune_gateways: Script::new(include_str!("lua/prune_gateways.lua")),
            bind: Script::new(include_str!("lua/bind.lua")),
            update: Script::new(include_str!("lua/update.lua")),
            reset: Script::new(include_str!("lua/reset.lua")),
            heartbeats: Script::new(include_str!("lua/heartbeats.lua")),
            migrate_heartbeats: Script::new(include_str!("lua/migrate_heartbeats.lua")),
            create_named: Script::new(include_str!("lua/create_named.lua")),
            rename_named: Script::new(include_str!("lua/rename_named.lua")),
            delete_named: Script::new(include_str!("lua/delete_named.lua")),
            set_group_tags: Script::new(include_str!("lua/set_group_tags.lua")),
            put_edge_group: Script::new(include_str!("lua/put_edge_group.lua")),
            delete_edge_group: Script::new(include_str!("lua/delete_edge_group.lua")),
            delete_env: Script::new(include_str!("lua/delete_env.lua")),
            create_edge_stack: Script::new(include_str!("lua/create_edge_stack.lua")),
            update_edge_stack: Script::new(include_str!("lua/update_edge_stack.lua")),
            add_stack_version: Script::new(include_str!("lua/add_stack_version.lua")),
            delete_edge_stack: Script::new(include_str!("lua/delete_edge_stack.lua")),
            put_stack_rollout: Script::new(include_str!("lua/put_stack_rollout.lua")),
            record_stack_statuses: Script::new(include_str!("lua/record_stack_statuses.lua")),
            forget_stack_statuses: Script::new(include_str!("lua/forget_stack_statuses.lua")),
        }
    }
}
