//! One conformance suite for every `Store` backend (`store` crate).
//!
//! Each check is a generic async function over a [`Backend`] (which opens `Arc<dyn Store>`s on
//! the same data); the `conformance!` macro instantiates every check once per backend:
//! `on_embedded::<check>` on a temp dir and `on_redis::<check>` on a fresh `redis-server` per test.
//! A few backend-specific checks (reopen, key names and TTLs, reconnect, error mapping, gateway
//! set pruning, large epochs) follow.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use proto::async_mode::{Action, CommandResult};
use store::embedded::EmbeddedStore;
use store::prelude::*;
use store::redis::RedisStore;
use store::{
    BatchGrowth, BindOutcome, Change, Collection, CommandState, DeployStatus, EdgeGroup, EdgeMode,
    EdgeStack, Environment, GatewayInfo, NewEnvironment, OnFailure, Rollout, RolloutConfig,
    RolloutState, Settings, SnapshotPut, StackStatus, StatusCount, Store, StoreError,
    StoredCommand, StoredSnapshot, TagMatch, TunnelGrant, TunnelLocation, COMMAND_IDS_PER_MS,
    KEEP_FINISHED_COMMANDS_PER_ENV, MAX_COMMAND_ID, MAX_STACK_VERSIONS,
    MAX_UNFINISHED_COMMANDS_PER_ENV,
};
use testkit::RedisServer;
use tokio::sync::broadcast;
use uuid::Uuid;

/// Upper bound for anything we wait on (a change to arrive, a reconnect); never a sleep.
const WAIT: Duration = Duration::from_secs(10);
const PREFIX: &str = "edgeplane:";

#[async_trait]
trait Backend: Send + Sync {
    /// The name `Store::backend` must report.
    fn name(&self) -> &'static str;
    /// Opens a store on this backend's data; every call sees the same data.
    async fn open(&self) -> Arc<dyn Store>;
    /// Whether several stores may be open on the same data at once (replicas).
    fn has_replicas(&self) -> bool;
}

struct Embedded {
    dir: tempfile::TempDir,
}

impl Embedded {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
}

#[async_trait]
impl Backend for Embedded {
    fn name(&self) -> &'static str {
        "embedded"
    }
    async fn open(&self) -> Arc<dyn Store> {
        Arc::new(EmbeddedStore::open(self.dir.path()).expect("open embedded store"))
    }
    fn has_replicas(&self) -> bool {
        false
    }
}

struct Redis {
    server: RedisServer,
}

impl Redis {
    fn new() -> Self {
        Self {
            server: RedisServer::start(),
        }
    }
}

#[async_trait]
impl Backend for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }
    async fn open(&self) -> Arc<dyn Store> {
        Arc::new(
            RedisStore::connect(&self.server.url(), PREFIX)
                .await
                .expect("connect redis store"),
        )
    }
    fn has_replicas(&self) -> bool {
        true
    }
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod on_embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    super::$check(&super::Embedded::new()).await;
                }
            )*
        }
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    super::$check(&super::Redis::new()).await;
                }
            )*
        }
    };
}

conformance!(
    reports_backend_name,
    ping_succeeds,
    create_assigns_increasing_ids_in_order,
    get_and_list_environments,
    update_replaces_fields_but_not_identity,
    update_never_clobbers_a_concurrent_bind,
    update_never_restores_a_rotated_secret,
    delete_removes_binding_and_heartbeat,
    bind_outcomes,
    preassigned_edge_id_at_creation,
    concurrent_binds_have_exactly_one_winner,
    reset_association_clears_binding_and_changes_secret,
    bind_with_a_stale_secret_changes_nothing,
    binds_with_the_old_secret_never_outlive_a_concurrent_reset,
    heartbeats_keep_the_max_and_drop_unknown_environments,
    named_collections,
    settings_default_then_put,
    admin_key_hashes_are_replaced_as_a_whole,
    admin_key_replacement_is_never_seen_half_done,
    publish_reaches_every_subscriber_exactly_once,
    data_survives_reopen,
    tunnel_grants_are_taken_exactly_once,
    tunnel_grants_expire,
    claims_hand_out_increasing_epochs_and_replace_the_location,
    renew_keeps_its_own_and_reports_lost_tunnels,
    release_is_compare_and_delete,
    tunnel_locations_follow_the_ids_and_expire,
    gateways_register_list_expire_unregister,
    cluster_secret_is_created_once,
    snapshots_keep_the_latest_taken,
    delete_removes_the_snapshot,
    tunnel_changes_round_trip,
    commands_queue_list_deliver_finish,
    command_ids_grow_whatever_the_clock_does,
    finished_commands_beyond_the_bound_are_pruned_when_queueing,
    unfinished_commands_are_capped,
    commands_are_refused_for_missing_environments_and_deleted_with_them,
    concurrent_queueing_hands_out_distinct_ids,
    edge_groups_crud_with_unique_names,
    static_edge_groups_keep_only_environments_and_lose_deleted_ones,
    edge_groups_survive_reopen,
    group_tags_are_set_cleared_and_go_with_their_group,
    edge_stacks_crud_with_unique_names,
    stack_rollouts_are_compare_and_set_and_go_with_their_stack,
    stack_versions_are_compare_and_set_kept_and_pruned,
    stack_statuses_are_counted_paged_and_go_with_their_environment_or_stack,
);

// ---------------------------------------------------------------------------------------------
// Helpers

fn new_env(name: &str) -> NewEnvironment {
    NewEnvironment {
        name: name.to_owned(),
        mode: EdgeMode::Standard,
        checkin_interval: None,
        ping_interval: Some(30),
        snapshot_interval: None,
        command_interval: None,
        group_id: Some(7),
        tag_ids: vec![1, 2],
        env_vars: vec!["HTTP_PROXY".to_owned()],
        variables: [("SITE".to_owned(), "berlin".to_owned())].into(),
        allow_self_signed: false,
        join_secret: format!("secret-{name}"),
        edge_id: None,
        // Above 2^53 on purpose: a backend that goes through doubles would round it.
        created_at_ms: 1_700_000_000_000 + (1 << 53),
    }
}

async fn create_one(store: &dyn Store, name: &str) -> Environment {
    let mut created = store
        .create_environments(vec![new_env(name)])
        .await
        .expect("create");
    assert_eq!(created.len(), 1);
    created.remove(0)
}

async fn next_change(rx: &mut broadcast::Receiver<Change>) -> Change {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for a change")
        .expect("change channel failed")
}

// ---------------------------------------------------------------------------------------------
// Generic checks

async fn reports_backend_name(b: &dyn Backend) {
    let store = b.open().await;
    assert_eq!(store.backend(), b.name());
}

async fn ping_succeeds(b: &dyn Backend) {
    let store = b.open().await;
    store.ping().await.expect("ping");
}

async fn create_assigns_increasing_ids_in_order(b: &dyn Backend) {
    let store = b.open().await;
    assert!(store
        .create_environments(Vec::new())
        .await
        .expect("empty batch")
        .is_empty());

    let batch: Vec<_> = (0..5).map(|i| new_env(&format!("env-{i}"))).collect();
    let created = store
        .create_environments(batch.clone())
        .await
        .expect("create");
    assert_eq!(created.len(), 5);
    for (i, (env, new)) in created.iter().zip(batch).enumerate() {
        assert_eq!(
            *env,
            new.into_environment(env.id),
            "record {i} is the input plus its id"
        );
        if i > 0 {
            assert!(
                env.id > created[i - 1].id,
                "ids increase in input order: {created:?}"
            );
        }
    }

    let second = store
        .create_environments(vec![new_env("a"), new_env("b")])
        .await
        .expect("create");
    let max_first = created.iter().map(|e| e.id).max().expect("non-empty");
    assert!(second[0].id > max_first, "a later batch gets later ids");
    assert!(second[1].id > second[0].id);

    // Ids are never reused, even after a delete.
    assert!(store
        .delete_environment(second[1].id)
        .await
        .expect("delete"));
    let third = create_one(&*store, "c").await;
    assert!(third.id > second[1].id);
}

async fn get_and_list_environments(b: &dyn Backend) {
    let store = b.open().await;
    assert!(store.list_environments().await.expect("list").is_empty());
    assert_eq!(store.get_environment(1).await.expect("get"), None);

    // More than 10, so that ids ordered as text ("10" < "2") would show.
    let created = store
        .create_environments((0..12).map(|i| new_env(&format!("env-{i}"))).collect())
        .await
        .expect("create");
    for env in &created {
        assert_eq!(
            store.get_environment(env.id).await.expect("get").as_ref(),
            Some(env)
        );
    }
    assert_eq!(store.list_environments().await.expect("list"), created);
    let max = created.iter().map(|e| e.id).max().expect("non-empty");
    assert_eq!(store.get_environment(max + 1).await.expect("get"), None);

    // Several at once, in the order asked, absent ones as `None`, a bound one with its
    // Edge ID.
    let edge = Uuid::new_v4();
    assert_eq!(
        store
            .bind_edge_id(created[3].id, edge, &created[3].join_secret)
            .await
            .expect("bind"),
        BindOutcome::Bound
    );
    let bound = store
        .get_environment(created[3].id)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(bound.edge_id, Some(edge));
    assert!(store.get_environments(&[]).await.expect("none").is_empty());
    assert_eq!(
        store
            .get_environments(&[created[5].id, max + 1, created[3].id, created[5].id])
            .await
            .expect("several"),
        vec![
            Some(created[5].clone()),
            None,
            Some(bound),
            Some(created[5].clone())
        ]
    );
}

async fn update_replaces_fields_but_not_identity(b: &dyn Backend) {
    let store = b.open().await;
    let env = create_one(&*store, "before").await;
    let other = create_one(&*store, "other").await;
    let edge = Uuid::new_v4();
    assert_eq!(
        store
            .bind_edge_id(env.id, edge, &env.join_secret)
            .await
            .expect("bind"),
        BindOutcome::Bound
    );

    let mut changed = env.clone();
    changed.name = "after".to_owned();
    changed.mode = EdgeMode::Async;
    changed.checkin_interval = Some(9);
    changed.ping_interval = None;
    changed.snapshot_interval = Some(120);
    changed.command_interval = Some(15);
    changed.group_id = None;
    changed.tag_ids = vec![3];
    changed.env_vars = vec![];
    changed.allow_self_signed = true;
    // These are not the caller's to change (the id selects the record).
    changed.join_secret = "not-through-update".to_owned();
    changed.edge_id = Some(Uuid::new_v4());
    changed.created_at_ms = 1;
    assert!(store.update_environment(&changed).await.expect("update"));

    let stored = store
        .get_environment(env.id)
        .await
        .expect("get")
        .expect("present");
    let expected = Environment {
        join_secret: env.join_secret.clone(),
        edge_id: Some(edge),
        created_at_ms: env.created_at_ms,
        ..changed.clone()
    };
    assert_eq!(stored, expected);
    assert_eq!(
        store.get_environment(other.id).await.expect("get"),
        Some(other),
        "other records untouched"
    );

    // Absent: false, and nothing is created.
    let mut ghost = changed;
    ghost.id = 10_000;
    assert!(!store.update_environment(&ghost).await.expect("update"));
    assert_eq!(store.get_environment(10_000).await.expect("get"), None);
}

async fn update_never_clobbers_a_concurrent_bind(b: &dyn Backend) {
    let store = b.open().await;
    let env = create_one(&*store, "racy").await;
    // A stale copy, read before the bind: it says "unbound".
    let stale = env.clone();
    let edge = Uuid::new_v4();

    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = Arc::clone(&store);
        let mut stale = stale.clone();
        tasks.push(tokio::spawn(async move {
            stale.name = format!("renamed-{i}");
            assert!(store.update_environment(&stale).await.expect("update"));
        }));
    }
    let binder = {
        let store = Arc::clone(&store);
        let (id, secret) = (env.id, env.join_secret.clone());
        tokio::spawn(async move { store.bind_edge_id(id, edge, &secret).await.expect("bind") })
    };
    for t in tasks {
        t.await.expect("update task");
    }
    assert_eq!(binder.await.expect("bind task"), BindOutcome::Bound);
    let stored = store
        .get_environment(env.id)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(stored.edge_id, Some(edge));
    assert!(stored.name.starts_with("renamed-"));
}

async fn update_never_restores_a_rotated_secret(b: &dyn Backend) {
    // Where the backend has replicas, the reset and the update go through different ones.
    let store = b.open().await;
    let other = if b.has_replicas() {
        b.open().await
    } else {
        Arc::clone(&store)
    };
    let env = create_one(&*store, "rotate-me").await;
    assert_eq!(
        store
            .bind_edge_id(env.id, Uuid::new_v4(), &env.join_secret)
            .await
            .expect("bind"),
        BindOutcome::Bound
    );
    // An admin's copy, read before the reset: it carries the old secret and the old binding.
    let mut stale = env.clone();

    // Characters JSON escapes (and Lua's cjson escapes differently from serde_json), to catch a
    // backend that copies the secret over as mangled text.
    let rotated = "new/secret \"quoted\" \\ é\u{1}";
    let reset = other
        .reset_association(env.id, rotated.to_owned())
        .await
        .expect("reset")
        .expect("present");
    assert_eq!(reset.join_secret, rotated);

    stale.name = "patched".to_owned();
    stale.allow_self_signed = true;
    assert_ne!(stale.join_secret, rotated);
    assert!(store.update_environment(&stale).await.expect("update"));
    let stored = store
        .get_environment(env.id)
        .await
        .expect("get")
        .expect("present");
    let expected = Environment {
        name: "patched".to_owned(),
        allow_self_signed: true,
        join_secret: rotated.to_owned(),
        edge_id: None,
        ..env.clone()
    };
    assert_eq!(stored, expected, "the update applied, the rotation kept");

    // The same under concurrency: stale updates racing one rotation never undo it. At most 12
    // updates, so Redis's optimistic reset (16 attempts, each lost only to a write landing in
    // its own window) cannot run out of retries.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let store = Arc::clone(if i % 2 == 0 { &store } else { &other });
        let mut stale = stored.clone();
        tasks.push(tokio::spawn(async move {
            stale.name = format!("renamed-{i}");
            assert!(store.update_environment(&stale).await.expect("update"));
        }));
    }
    let rotator = {
        let other = Arc::clone(&other);
        tokio::spawn(async move {
            other
                .reset_association(env.id, "newest".to_owned())
                .await
                .expect("reset")
        })
    };
    for t in tasks {
        t.await.expect("update task");
    }
    assert!(rotator.await.expect("reset task").is_some());
    let stored = store
        .get_environment(env.id)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(stored.join_secret, "newest");
    assert!(stored.name.starts_with("renamed-"));
}

async fn delete_removes_binding_and_heartbeat(b: &dyn Backend) {
    let store = b.open().await;
    let env = create_one(&*store, "doomed").await;
    let keep = create_one(&*store, "kept").await;
    let edge = Uuid::new_v4();
    assert_eq!(
        store
            .bind_edge_id(env.id, edge, &env.join_secret)
            .await
            .expect("bind"),
        BindOutcome::Bound
    );
    assert_eq!(
        store
            .bind_edge_id(keep.id, Uuid::new_v4(), &keep.join_secret)
            .await
            .expect("bind"),
        BindOutcome::Bound
    );
    store
        .record_heartbeats(&[(env.id, 1_000), (keep.id, 2_000)])
        .await
        .expect("heartbeats");

    assert!(store.delete_environment(env.id).await.expect("delete"));
    assert_eq!(store.get_environment(env.id).await.expect("get"), None);
    assert_eq!(
        store.heartbeats(&[env.id, keep.id]).await.expect("hb"),
        vec![None, Some(2_000)]
    );
    assert!(!store
        .delete_environment(env.id)
        .await
        .expect("delete again"));

    // The binding is gone with it: binding the deleted id finds nothing...
    assert_eq!(
        store
            .bind_edge_id(env.id, edge, &env.join_secret)
            .await
            .expect("bind"),
        BindOutcome::NotFound
    );
    // ...and heartbeats for it are dropped from now on.
    store
        .record_heartbeats(&[(env.id, 5_000)])
        .await
        .expect("heartbeats");
    assert_eq!(store.heartbeats(&[env.id]).await.expect("hb"), vec![None]);

    let listed = store.list_environments().await.expect("list");
    assert_eq!(
        listed.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![keep.id]
    );
    assert!(
        listed[0].edge_id.is_some(),
        "the other binding is untouched"
    );
}

async fn bind_outcomes(b: &dyn Backend) {
    let store = b.open().await;
    let env = create_one(&*store, "bindable").await;
    let first = Uuid::new_v4();
    let second = Uuid::new_v4();

    let secret = env.join_secret.as_str();

    assert_eq!(
        store
            .bind_edge_id(env.id, first, secret)
            .await
            .expect("bind"),
        BindOutcome::Bound
    );
    assert_eq!(
        store
            .bind_edge_id(env.id, first, secret)
            .await
            .expect("bind"),
        BindOutcome::AlreadyBound
    );
    assert_eq!(
        store
            .bind_edge_id(env.id, second, secret)
            .await
            .expect("bind"),
        BindOutcome::BoundToOther(first)
    );
    let stored = store
        .get_environment(env.id)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(
        stored.edge_id,
        Some(first),
        "a refused bind changes nothing"
    );
    assert_eq!(
        stored,
        Environment {
            edge_id: Some(first),
            ..env.clone()
        }
    );

    assert_eq!(
        store
            .bind_edge_id(env.id + 1_000, first, secret)
            .await
            .expect("bind"),
        BindOutcome::NotFound
    );
    assert_eq!(
        store.get_environment(env.id + 1_000).await.expect("get"),
        None,
        "no record appears"
    );
}

async fn preassigned_edge_id_at_creation(b: &dyn Backend) {
    let store = b.open().await;
    let edge = Uuid::new_v4();
    let mut pre = new_env("preassigned");
    pre.edge_id = Some(edge);
    let created = store
        .create_environments(vec![new_env("plain"), pre])
        .await
        .expect("create");
    assert_eq!(created[0].edge_id, None);
    assert_eq!(created[1].edge_id, Some(edge));

    let stored = store
        .get_environment(created[1].id)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(stored.edge_id, Some(edge));
    assert_eq!(store.list_environments().await.expect("list"), created);
    let secret = created[1].join_secret.as_str();
    assert_eq!(
        store
            .bind_edge_id(created[1].id, edge, secret)
            .await
            .expect("bind"),
        BindOutcome::AlreadyBound
    );
    assert_eq!(
        store
            .bind_edge_id(created[1].id, Uuid::new_v4(), secret)
            .await
            .expect("bind"),
        BindOutcome::BoundToOther(edge)
    );
}

async fn concurrent_binds_have_exactly_one_winner(b: &dyn Backend) {
    // Where the backend has replicas, the contenders are spread over two of them.
    let stores: Vec<Arc<dyn Store>> = if b.has_replicas() {
        vec![b.open().await, b.open().await]
    } else {
        vec![b.open().await]
    };
    let envs = stores[0]
        .create_environments(vec![new_env("contested"), new_env("same-id")])
        .await
        .expect("create");

    // Many different IDs race for one environment.
    let mut tasks = Vec::new();
    for i in 0..32 {
        let store = Arc::clone(&stores[i % stores.len()]);
        let (id, secret) = (envs[0].id, envs[0].join_secret.clone());
        tasks.push(tokio::spawn(async move {
            let edge = Uuid::new_v4();
            (
                edge,
                store.bind_edge_id(id, edge, &secret).await.expect("bind"),
            )
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("bind task"));
    }
    let winners: Vec<Uuid> = results
        .iter()
        .filter(|(_, o)| *o == BindOutcome::Bound)
        .map(|(e, _)| *e)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one winner: {results:?}");
    let winner = winners[0];
    for (edge, outcome) in &results {
        if *edge != winner {
            assert_eq!(*outcome, BindOutcome::BoundToOther(winner));
        }
    }
    let stored = stores[0]
        .get_environment(envs[0].id)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(stored.edge_id, Some(winner));

    // The same ID from many places at once (an agent retrying): one Bound, the rest AlreadyBound.
    let edge = Uuid::new_v4();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = Arc::clone(&stores[i % stores.len()]);
        let (id, secret) = (envs[1].id, envs[1].join_secret.clone());
        tasks.push(tokio::spawn(async move {
            store.bind_edge_id(id, edge, &secret).await.expect("bind")
        }));
    }
    let mut bound = 0;
    for t in tasks {
        match t.await.expect("bind task") {
            BindOutcome::Bound => bound += 1,
            BindOutcome::AlreadyBound => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(bound, 1);
}

async fn reset_association_clears_binding_and_changes_secret(b: &dyn Backend) {
    let store = b.open().await;
    let env = create_one(&*store, "reset-me").await;
    let old_edge = Uuid::new_v4();
    assert_eq!(
        store
            .bind_edge_id(env.id, old_edge, &env.join_secret)
            .await
            .expect("bind"),
        BindOutcome::Bound
    );

    let reset = store
        .reset_association(env.id, "new-secret".to_owned())
        .await
        .expect("reset")
        .expect("present");
    let expected = Environment {
        edge_id: None,
        join_secret: "new-secret".to_owned(),
        ..env.clone()
    };
    assert_eq!(reset, expected);
    assert_eq!(
        store.get_environment(env.id).await.expect("get"),
        Some(expected)
    );

    // Free again: a new agent, holding the new secret, can bind.
    let new_edge = Uuid::new_v4();
    assert_eq!(
        store
            .bind_edge_id(env.id, new_edge, "new-secret")
            .await
            .expect("bind"),
        BindOutcome::Bound
    );
    // Resetting an unbound environment only changes the secret.
    let again = store
        .reset_association(env.id, "newer".to_owned())
        .await
        .expect("reset")
        .expect("present");
    assert_eq!(again.edge_id, None);
    assert_eq!(again.join_secret, "newer");

    assert_eq!(
        store
            .reset_association(env.id + 1_000, "x".to_owned())
            .await
            .expect("reset"),
        None
    );
    assert_eq!(
        store.get_environment(env.id + 1_000).await.expect("get"),
        None
    );
}

async fn bind_with_a_stale_secret_changes_nothing(b: &dyn Backend) {
    // Where the backend has replicas, the reset and the binds go through different ones.
    let store = b.open().await;
    let other = if b.has_replicas() {
        b.open().await
    } else {
        Arc::clone(&store)
    };
    let env = create_one(&*store, "regenerated").await;
    let old_secret = env.join_secret.clone();

    // The old agent's first check-in was verified with the old secret; the admin resets the
    // association before its bind lands. Characters JSON escapes, so that a backend comparing
    // re-encoded text instead of the secret itself shows.
    let rotated = "new/secret \"quoted\" \\ é\u{1}";
    other
        .reset_association(env.id, rotated.to_owned())
        .await
        .expect("reset")
        .expect("present");
    let old_agent = Uuid::new_v4();
    assert_eq!(
        store
            .bind_edge_id(env.id, old_agent, &old_secret)
            .await
            .expect("bind"),
        BindOutcome::SecretChanged
    );
    let unbound = Environment {
        join_secret: rotated.to_owned(),
        edge_id: None,
        ..env.clone()
    };
    assert_eq!(
        store.get_environment(env.id).await.expect("get"),
        Some(unbound.clone()),
        "still unbound, still the new secret"
    );
    // Only the exact secret is the secret: not a prefix, an extension, another case or nothing.
    let near_misses = [
        rotated[..rotated.len() - 1].to_owned(),
        format!("{rotated} "),
        rotated.to_uppercase(),
        String::new(),
    ];
    for near in &near_misses {
        assert_eq!(
            store
                .bind_edge_id(env.id, old_agent, near)
                .await
                .expect("bind"),
            BindOutcome::SecretChanged,
            "{near:?}"
        );
    }
    assert_eq!(
        other.get_environment(env.id).await.expect("get"),
        Some(unbound)
    );

    // The real new agent, with the new secret, is not refused.
    let new_agent = Uuid::new_v4();
    assert_eq!(
        store
            .bind_edge_id(env.id, new_agent, rotated)
            .await
            .expect("bind"),
        BindOutcome::Bound
    );
    // A stale secret learns nothing of the new generation's binding (neither AlreadyBound nor
    // BoundToOther) and changes nothing.
    for edge in [old_agent, new_agent] {
        assert_eq!(
            other
                .bind_edge_id(env.id, edge, &old_secret)
                .await
                .expect("bind"),
            BindOutcome::SecretChanged
        );
    }
    assert_eq!(
        store
            .get_environment(env.id)
            .await
            .expect("get")
            .expect("present")
            .edge_id,
        Some(new_agent)
    );
    // An absent environment has no secret to compare: NotFound, as before.
    assert_eq!(
        store
            .bind_edge_id(env.id + 1_000, old_agent, &old_secret)
            .await
            .expect("bind"),
        BindOutcome::NotFound
    );
}

async fn binds_with_the_old_secret_never_outlive_a_concurrent_reset(b: &dyn Backend) {
    // Binds verified with the old secret race one reset. A bind that lands before the reset is
    // undone by it; one that lands after must fail. Either way the environment ends unbound
    // under the new secret, whatever the interleaving.
    let stores: Vec<Arc<dyn Store>> = if b.has_replicas() {
        vec![b.open().await, b.open().await]
    } else {
        vec![b.open().await]
    };
    for round in 0..8 {
        let env = create_one(&*stores[0], &format!("raced-{round}")).await;
        let mut tasks = Vec::new();
        for i in 0..16 {
            let store = Arc::clone(&stores[i % stores.len()]);
            let (id, secret) = (env.id, env.join_secret.clone());
            tasks.push(tokio::spawn(async move {
                store
                    .bind_edge_id(id, Uuid::new_v4(), &secret)
                    .await
                    .expect("bind")
            }));
        }
        let resetter = {
            let store = Arc::clone(&stores[stores.len() - 1]);
            tokio::spawn(async move {
                store
                    .reset_association(env.id, "fresh".to_owned())
                    .await
                    .expect("reset")
            })
        };
        let mut bound = 0;
        for t in tasks {
            match t.await.expect("bind task") {
                BindOutcome::Bound => bound += 1,
                BindOutcome::BoundToOther(_) | BindOutcome::SecretChanged => {}
                other => panic!("unexpected outcome {other:?}"),
            }
        }
        assert!(bound <= 1, "at most one winner, got {bound}");
        assert!(resetter.await.expect("reset task").is_some());
        let stored = stores[0]
            .get_environment(env.id)
            .await
            .expect("get")
            .expect("present");
        assert_eq!(stored.join_secret, "fresh");
        assert_eq!(
            stored.edge_id, None,
            "round {round}: an old-secret bind survived"
        );
    }
}

async fn heartbeats_keep_the_max_and_drop_unknown_environments(b: &dyn Backend) {
    let store = b.open().await;
    let created = store
        .create_environments(vec![
            new_env("a"),
            new_env("b"),
            new_env("c"),
            new_env("silent"),
        ])
        .await
        .expect("create");
    let (a, bb, c, silent) = (created[0].id, created[1].id, created[2].id, created[3].id);
    let unknown = silent + 1_000;

    store.record_heartbeats(&[]).await.expect("empty batch");
    assert!(store.heartbeats(&[]).await.expect("no ids").is_empty());

    store
        .record_heartbeats(&[(a, 100), (bb, 200), (unknown, 300), (c, 9)])
        .await
        .expect("heartbeats");
    assert_eq!(
        store
            .heartbeats(&[a, bb, unknown, silent, c])
            .await
            .expect("hb"),
        vec![Some(100), Some(200), None, None, Some(9)]
    );

    // Within one batch and across batches the largest time wins, whatever the order.
    store
        .record_heartbeats(&[(a, 50), (bb, 250), (a, 150), (a, 120), (c, 10)])
        .await
        .expect("heartbeats");
    // Results follow the order of the ids asked, duplicates included.
    assert_eq!(
        store.heartbeats(&[bb, a, bb, c]).await.expect("hb"),
        vec![Some(250), Some(150), Some(250), Some(10)]
    );

    // What changed since a time: every environment last seen then or later, with its time.
    let mut since = store.heartbeats_since(150).await.expect("since");
    since.sort_unstable();
    assert_eq!(since, vec![(a, 150), (bb, 250)]);
    let mut all = store.heartbeats_since(0).await.expect("since");
    all.sort_unstable();
    assert_eq!(all, vec![(a, 150), (bb, 250), (c, 10)]);
    assert!(store.heartbeats_since(251).await.expect("since").is_empty());
    for (since, n) in [(0, 3), (150, 2), (151, 1), (251, 0)] {
        assert_eq!(
            store.count_heartbeats_since(since).await.expect("count"),
            n,
            "since {since}"
        );
    }

    // Times compare exactly up to the bound (2^53 ms, some 285,000 years): these differ by
    // less than most of that range could tell. Later ones are dropped.
    let top = store::MAX_HEARTBEAT_MS;
    store
        .record_heartbeats(&[(a, top - 2)])
        .await
        .expect("heartbeats");
    store
        .record_heartbeats(&[(a, top - 3), (a, top - 1)])
        .await
        .expect("heartbeats");
    assert_eq!(
        store.heartbeats(&[a]).await.expect("hb"),
        vec![Some(top - 1)]
    );
    store
        .record_heartbeats(&[(a, top - 2), (bb, top + 1), (bb, u64::MAX)])
        .await
        .expect("heartbeats");
    assert_eq!(
        store.heartbeats(&[a, bb]).await.expect("hb"),
        vec![Some(top - 1), Some(250)]
    );
    assert_eq!(
        store.heartbeats_since(top - 1).await.expect("since"),
        vec![(a, top - 1)]
    );
    assert_eq!(store.heartbeats(&[unknown]).await.expect("hb"), vec![None]);

    // A deleted environment takes its heartbeat with it.
    assert!(store.delete_environment(a).await.expect("delete"));
    assert_eq!(store.heartbeats(&[a]).await.expect("hb"), vec![None]);
    assert!(store
        .heartbeats_since(0)
        .await
        .expect("since")
        .iter()
        .all(|(id, _)| *id != a));
}

async fn named_collections(b: &dyn Backend) {
    let store = b.open().await;
    for coll in [Collection::Groups, Collection::Tags] {
        assert!(store.list_named(coll).await.expect("list").is_empty());
        let prod = store.create_named(coll, "prod").await.expect("create");
        let staging = store.create_named(coll, "staging").await.expect("create");
        assert_eq!(prod.name, "prod");
        assert!(staging.id > prod.id);

        let dup = store.create_named(coll, "prod").await;
        assert!(
            matches!(dup, Err(StoreError::Conflict(_))),
            "{coll:?}: {dup:?}"
        );
        assert_eq!(
            store.list_named(coll).await.expect("list"),
            vec![prod.clone(), staging.clone()]
        );

        let renamed = store
            .rename_named(coll, staging.id, "stage")
            .await
            .expect("rename")
            .expect("present");
        assert_eq!(renamed.id, staging.id);
        assert_eq!(renamed.name, "stage");
        let clash = store.rename_named(coll, staging.id, "prod").await;
        assert!(
            matches!(clash, Err(StoreError::Conflict(_))),
            "{coll:?}: {clash:?}"
        );
        // Renaming to its own name is fine.
        assert_eq!(
            store
                .rename_named(coll, prod.id, "prod")
                .await
                .expect("rename"),
            Some(prod.clone())
        );
        assert_eq!(
            store
                .rename_named(coll, 9_999, "ghost")
                .await
                .expect("rename"),
            None
        );
        // The old name is free again after the rename.
        let staging2 = store
            .create_named(coll, "staging")
            .await
            .expect("reuse freed name");

        assert_eq!(
            store.list_named(coll).await.expect("list"),
            vec![prod.clone(), renamed.clone(), staging2.clone()]
        );

        assert!(store.delete_named(coll, prod.id).await.expect("delete"));
        assert!(!store
            .delete_named(coll, prod.id)
            .await
            .expect("delete again"));
        assert_eq!(
            store.list_named(coll).await.expect("list"),
            vec![renamed.clone(), staging2.clone()]
        );
        // A deleted name can be taken again, under a new id.
        let prod2 = store.create_named(coll, "prod").await.expect("recreate");
        assert!(prod2.id > staging2.id, "ids are not reused");
    }
    // Groups and tags are separate namespaces: both now have "prod" and "stage".
    let groups: HashSet<String> = store
        .list_named(Collection::Groups)
        .await
        .expect("list")
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert!(groups.contains("prod") && groups.contains("stage"));
}

async fn settings_default_then_put(b: &dyn Backend) {
    let store = b.open().await;
    assert_eq!(
        store.settings().await.expect("settings"),
        Settings::default()
    );
    let custom = Settings {
        checkin_interval: 2,
        ping_interval: 30,
        snapshot_interval: 300,
        command_interval: 10,
    };
    store.put_settings(&custom).await.expect("put");
    assert_eq!(store.settings().await.expect("settings"), custom);
    let again = Settings {
        checkin_interval: 3,
        ..custom
    };
    store.put_settings(&again).await.expect("put");
    assert_eq!(store.settings().await.expect("settings"), again);
}

async fn admin_key_hashes_are_replaced_as_a_whole(b: &dyn Backend) {
    let store = b.open().await;
    let other = if b.has_replicas() {
        b.open().await
    } else {
        Arc::clone(&store)
    };
    assert!(store.admin_key_hashes().await.expect("hashes").is_empty());
    let h1 = [0xAB; 32];
    let mut h2 = [0u8; 32];
    // Bytes that are not valid UTF-8 and include a zero, to catch text-only storage.
    h2[0] = 0xFF;
    h2[31] = 0x01;
    let h3 = [0x00; 32];

    // Duplicates collapse.
    store
        .replace_admin_key_hashes(&[h1, h2, h1])
        .await
        .expect("replace");
    let mut want = vec![h1, h2];
    want.sort_unstable();
    let mut got = store.admin_key_hashes().await.expect("hashes");
    got.sort_unstable();
    assert_eq!(got, want);
    // The same set again is a no-op.
    store
        .replace_admin_key_hashes(&[h2, h1])
        .await
        .expect("replace again");
    let mut got = other.admin_key_hashes().await.expect("hashes");
    got.sort_unstable();
    assert_eq!(got, want);

    // A replacement revokes everything left out, whichever replica reads it.
    other
        .replace_admin_key_hashes(&[h3])
        .await
        .expect("replace");
    assert_eq!(store.admin_key_hashes().await.expect("hashes"), vec![h3]);
    assert_eq!(other.admin_key_hashes().await.expect("hashes"), vec![h3]);

    // Overlapping sets keep what stays and drop what goes.
    store
        .replace_admin_key_hashes(&[h3, h1])
        .await
        .expect("replace");
    store
        .replace_admin_key_hashes(&[h1])
        .await
        .expect("replace");
    assert_eq!(other.admin_key_hashes().await.expect("hashes"), vec![h1]);

    // An empty set is allowed (and leaves no key at all).
    store.replace_admin_key_hashes(&[]).await.expect("replace");
    assert!(other.admin_key_hashes().await.expect("hashes").is_empty());
}

async fn admin_key_replacement_is_never_seen_half_done(b: &dyn Backend) {
    // A reader racing replacements between two disjoint sets must only ever see one of them:
    // never an empty set (every admin locked out) nor a mix (a revoked key still valid).
    let writer = b.open().await;
    let reader = if b.has_replicas() {
        b.open().await
    } else {
        Arc::clone(&writer)
    };
    let a = vec![[1; 32], [2; 32]];
    let bb = vec![[3; 32], [4; 32]];
    writer.replace_admin_key_hashes(&a).await.expect("replace");

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The writer starts only once the reader is reading, so that the two really overlap.
    let (reading_tx, reading_rx) = tokio::sync::oneshot::channel();
    let watcher = {
        let done = Arc::clone(&done);
        let (a, bb) = (a.clone(), bb.clone());
        tokio::spawn(async move {
            let mut reading_tx = Some(reading_tx);
            let mut reads = 0u32;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let mut got = reader.admin_key_hashes().await.expect("hashes");
                got.sort_unstable();
                assert!(got == a || got == bb, "half-done replacement seen: {got:?}");
                reads += 1;
                if let Some(tx) = reading_tx.take() {
                    let _ = tx.send(());
                }
            }
            reads
        })
    };
    reading_rx.await.expect("reader started");
    for i in 0..200 {
        let next = if i % 2 == 0 { &bb } else { &a };
        writer
            .replace_admin_key_hashes(next)
            .await
            .expect("replace");
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    assert!(watcher.await.expect("watcher") > 0);
}

async fn publish_reaches_every_subscriber_exactly_once(b: &dyn Backend) {
    let first = b.open().await;
    // On a backend with replicas, a second store on the same data stands for another replica.
    let second = if b.has_replicas() {
        Some(b.open().await)
    } else {
        None
    };
    let mut stores = vec![Arc::clone(&first)];
    stores.extend(second.clone());

    let mut subs: Vec<_> = stores.iter().map(|s| s.subscribe()).collect();
    // Two subscribers on one store both get everything.
    subs.push(first.subscribe());

    // Each publisher sends a change and then a sentinel: receiving exactly [change, sentinel]
    // proves the change came once (a duplicate would arrive before the sentinel), without
    // waiting for "nothing more" with a sleep.
    for (i, publisher) in stores.iter().enumerate() {
        let change = Change::Environment(100 + i as u64);
        let sentinel = Change::EnvironmentDeleted(200 + i as u64);
        publisher.publish(change.clone()).await.expect("publish");
        publisher.publish(sentinel.clone()).await.expect("publish");
        for (n, rx) in subs.iter_mut().enumerate() {
            assert_eq!(
                next_change(rx).await,
                change,
                "subscriber {n}, publisher {i}"
            );
            assert_eq!(
                next_change(rx).await,
                sentinel,
                "subscriber {n}, publisher {i}"
            );
        }
    }

    // Every variant survives the trip.
    for change in [
        Change::Settings,
        Change::AdminKeys,
        Change::Catalog,
        Change::Resync,
    ] {
        first.publish(change.clone()).await.expect("publish");
        for rx in &mut subs {
            assert_eq!(next_change(rx).await, change);
        }
    }

    // A subscription only sees what is published after it was made.
    let mut late = first.subscribe();
    let last = Change::Environment(999);
    stores[stores.len() - 1]
        .publish(last.clone())
        .await
        .expect("publish");
    assert_eq!(next_change(&mut late).await, last);
    for rx in &mut subs {
        assert_eq!(next_change(rx).await, last);
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));
    }
}

async fn data_survives_reopen(b: &dyn Backend) {
    let store = b.open().await;
    let created = store
        .create_environments(vec![new_env("persist-1"), new_env("persist-2")])
        .await
        .expect("create");
    let edge = Uuid::new_v4();
    assert_eq!(
        store
            .bind_edge_id(created[0].id, edge, &created[0].join_secret)
            .await
            .expect("bind"),
        BindOutcome::Bound
    );
    store
        .record_heartbeats(&[(created[1].id, 42)])
        .await
        .expect("heartbeats");
    let group = store
        .create_named(Collection::Groups, "g")
        .await
        .expect("group");
    let tag = store
        .create_named(Collection::Tags, "t")
        .await
        .expect("tag");
    let settings = Settings {
        checkin_interval: 11,
        ..Settings::default()
    };
    store.put_settings(&settings).await.expect("settings");
    store
        .replace_admin_key_hashes(&[[7; 32]])
        .await
        .expect("admin key");
    let envs = store.list_environments().await.expect("list");
    drop(store);

    let store = b.open().await;
    assert_eq!(store.list_environments().await.expect("list"), envs);
    assert_eq!(envs[0].edge_id, Some(edge));
    assert_eq!(
        store
            .heartbeats(&[created[0].id, created[1].id])
            .await
            .expect("hb"),
        vec![None, Some(42)]
    );
    assert_eq!(
        store.list_named(Collection::Groups).await.expect("groups"),
        vec![group.clone()]
    );
    assert_eq!(
        store.list_named(Collection::Tags).await.expect("tags"),
        vec![tag]
    );
    assert_eq!(store.settings().await.expect("settings"), settings);
    assert_eq!(store.admin_key_hashes().await.expect("keys"), vec![[7; 32]]);
    // Counters survive too: nothing is handed out twice.
    let next = create_one(&*store, "after-reopen").await;
    assert!(next.id > created[1].id);
    let g2 = store
        .create_named(Collection::Groups, "g2")
        .await
        .expect("group");
    assert!(g2.id > group.id);
    assert!(matches!(
        store.create_named(Collection::Groups, "g").await,
        Err(StoreError::Conflict(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Tunnels, gateways, the cluster secret and snapshots

/// A lease or TTL that never runs out during a test.
const LONG: Duration = Duration::from_secs(60);
/// A lease or TTL short enough to wait out; only for what a test wants to see expire.
const SHORT: Duration = Duration::from_millis(100);
/// Above 2^53 on purpose, like `created_at_ms`: a backend going through doubles would round.
const BIG_MS: u64 = 1_700_000_000_000 + (1 << 53);

/// One store, or two on the same data where the backend has replicas.
async fn replicas(b: &dyn Backend) -> Vec<Arc<dyn Store>> {
    if b.has_replicas() {
        vec![b.open().await, b.open().await]
    } else {
        vec![b.open().await]
    }
}

/// Polls `cond` every few milliseconds until it holds; fails after [`WAIT`].
async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Lets a [`SHORT`] lease taken before the call run out (not a synchronisation: what follows
/// only needs the lease to be over).
async fn outlive_short_lease() {
    tokio::time::sleep(SHORT + Duration::from_millis(50)).await;
}

fn grant(env: u64) -> TunnelGrant {
    TunnelGrant {
        env,
        edge_id: Uuid::new_v4(),
        expires_ms: BIG_MS,
    }
}

fn gateway(id: &str, tunnels: u64) -> GatewayInfo {
    GatewayInfo {
        id: id.to_owned(),
        public_addr: format!("{id}.example.com:443"),
        dial_addr: format!("{id}.internal:7000"),
        tunnels,
    }
}

async fn location(store: &dyn Store, env: u64) -> Option<TunnelLocation> {
    let mut found = store.tunnel_locations(&[env]).await.expect("locations");
    assert_eq!(found.len(), 1);
    found.remove(0)
}

async fn live_gateway_ids(store: &dyn Store) -> Vec<String> {
    store
        .live_gateways()
        .await
        .expect("gateways")
        .into_iter()
        .map(|g| g.id)
        .collect()
}

async fn tunnel_grants_are_taken_exactly_once(b: &dyn Backend) {
    let stores = replicas(b).await;
    let last = stores.len() - 1;
    let g = grant(1);
    stores[0]
        .put_tunnel_grant(&[1; 32], &g, LONG)
        .await
        .expect("put");
    assert_eq!(
        stores[0].take_tunnel_grant(&[9; 32]).await.expect("take"),
        None,
        "unknown token"
    );
    assert_eq!(
        stores[last]
            .take_tunnel_grant(&[1; 32])
            .await
            .expect("take"),
        Some(g)
    );
    for store in &stores {
        assert_eq!(
            store.take_tunnel_grant(&[1; 32]).await.expect("take"),
            None,
            "a grant is taken only once"
        );
    }

    // Grants under different tokens are independent.
    let (g2, g3) = (grant(2), grant(3));
    stores[0]
        .put_tunnel_grant(&[2; 32], &g2, LONG)
        .await
        .expect("put");
    stores[last]
        .put_tunnel_grant(&[3; 32], &g3, LONG)
        .await
        .expect("put");
    assert_eq!(
        stores[0].take_tunnel_grant(&[3; 32]).await.expect("take"),
        Some(g3)
    );
    assert_eq!(
        stores[last]
            .take_tunnel_grant(&[2; 32])
            .await
            .expect("take"),
        Some(g2)
    );

    // Many takers at once, spread over the replicas: exactly one gets it, every time.
    for round in 0..8u8 {
        let hash = [100 + round; 32];
        let g = grant(u64::from(round));
        stores[usize::from(round) % stores.len()]
            .put_tunnel_grant(&hash, &g, LONG)
            .await
            .expect("put");
        let mut tasks = Vec::new();
        for i in 0..16 {
            let store = Arc::clone(&stores[i % stores.len()]);
            tasks.push(tokio::spawn(async move {
                store.take_tunnel_grant(&hash).await.expect("take")
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            winners.extend(t.await.expect("take task"));
        }
        assert_eq!(winners, vec![g], "round {round}");
    }
}

async fn tunnel_grants_expire(b: &dyn Backend) {
    let store = b.open().await;
    let (short, long) = (grant(1), grant(2));
    store
        .put_tunnel_grant(&[1; 32], &short, SHORT)
        .await
        .expect("put");
    store
        .put_tunnel_grant(&[2; 32], &long, LONG)
        .await
        .expect("put");
    // A zero TTL is accepted (Redis refuses `PX 0`) and expires at once, or nearly.
    store
        .put_tunnel_grant(&[3; 32], &grant(3), Duration::ZERO)
        .await
        .expect("put with a zero TTL");
    outlive_short_lease().await;
    assert_eq!(store.take_tunnel_grant(&[1; 32]).await.expect("take"), None);
    assert_eq!(store.take_tunnel_grant(&[3; 32]).await.expect("take"), None);
    assert_eq!(
        store.take_tunnel_grant(&[2; 32]).await.expect("take"),
        Some(long)
    );
}

async fn claims_hand_out_increasing_epochs_and_replace_the_location(b: &dyn Backend) {
    let stores = replicas(b).await;
    let last = stores.len() - 1;
    let (a, other) = (11, 12);
    assert_eq!(location(&*stores[0], a).await, None);

    let first = stores[0]
        .claim_tunnel(a, "gw-1", "gw-1.internal:7000", BIG_MS, LONG)
        .await
        .expect("claim");
    assert_eq!(
        first,
        TunnelLocation {
            env: a,
            gateway_id: "gw-1".to_owned(),
            dial_addr: "gw-1.internal:7000".to_owned(),
            epoch: first.epoch,
            since_ms: BIG_MS,
        }
    );
    for store in &stores {
        assert_eq!(location(&**store, a).await.as_ref(), Some(&first));
    }

    // Another claim (from another gateway, through another replica) gets a higher epoch and
    // replaces the location.
    let second = stores[last]
        .claim_tunnel(a, "gw-2", "gw-2.internal:7000", BIG_MS + 1, LONG)
        .await
        .expect("claim");
    assert!(second.epoch > first.epoch, "{second:?} after {first:?}");
    assert_eq!(second.gateway_id, "gw-2");
    for store in &stores {
        assert_eq!(location(&**store, a).await.as_ref(), Some(&second));
    }
    // Other environments are untouched, and get their own increasing epochs.
    assert_eq!(location(&*stores[0], other).await, None);
    let o1 = stores[0]
        .claim_tunnel(other, "gw-1", "gw-1.internal:7000", 5, LONG)
        .await
        .expect("claim");
    let o2 = stores[0]
        .claim_tunnel(other, "gw-1", "gw-1.internal:7000", 6, LONG)
        .await
        .expect("claim");
    assert!(o2.epoch > o1.epoch);
    assert_eq!(location(&*stores[0], a).await, Some(second.clone()));

    // Concurrent claims: every epoch is distinct, and the location left is the last claim's,
    // which has the highest epoch.
    let contested = 13;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let store = Arc::clone(&stores[i % stores.len()]);
        tasks.push(tokio::spawn(async move {
            store
                .claim_tunnel(contested, &format!("gw-{i}"), "x:1", i as u64, LONG)
                .await
                .expect("claim")
        }));
    }
    let mut claims = Vec::new();
    for t in tasks {
        claims.push(t.await.expect("claim task"));
    }
    let epochs: HashSet<u64> = claims.iter().map(|c| c.epoch).collect();
    assert_eq!(epochs.len(), claims.len(), "distinct epochs: {claims:?}");
    let newest = claims
        .iter()
        .max_by_key(|c| c.epoch)
        .expect("non-empty")
        .clone();
    assert_eq!(location(&*stores[0], contested).await, Some(newest.clone()));

    // Epochs keep growing across a restart (Redis keeps the counter; the embedded store, which
    // forgets its tunnels, starts above the clock).
    let highest = claims
        .iter()
        .map(|c| c.epoch)
        .chain([second.epoch, o2.epoch])
        .max()
        .expect("non-empty");
    drop(stores);
    let store = b.open().await;
    let after = store
        .claim_tunnel(a, "gw-3", "gw-3.internal:7000", 7, LONG)
        .await
        .expect("claim");
    assert!(after.epoch > highest, "{} after {highest}", after.epoch);
}

async fn renew_keeps_its_own_and_reports_lost_tunnels(b: &dyn Backend) {
    let stores = replicas(b).await;
    let last = stores.len() - 1;
    let gw = "gw-1";
    let mut held = Vec::new();
    for env in 1..=5 {
        let loc = stores[0]
            .claim_tunnel(env, gw, "gw-1.internal:7000", 1, LONG)
            .await
            .expect("claim");
        held.push((env, loc.epoch));
    }
    assert!(stores[last]
        .renew_tunnels(gw, &[], LONG)
        .await
        .expect("renew nothing")
        .is_empty());
    assert!(
        stores[last]
            .renew_tunnels(gw, &held, LONG)
            .await
            .expect("renew")
            .is_empty(),
        "everything is still held"
    );

    // Lost: claimed since by another gateway (2), released (3), expired (4), never claimed (9).
    stores[last]
        .claim_tunnel(2, "gw-2", "gw-2.internal:7000", 2, LONG)
        .await
        .expect("claim");
    assert!(stores[0]
        .release_tunnel(3, held[2].1)
        .await
        .expect("release"));
    let short = stores[0]
        .claim_tunnel(4, gw, "gw-1.internal:7000", 3, SHORT)
        .await
        .expect("claim");
    held[3].1 = short.epoch;
    wait_for("the short lease to expire", || async {
        location(&*stores[last], 4).await.is_none()
    })
    .await;
    held.push((9, 12345));

    let mut lost = stores[last]
        .renew_tunnels(gw, &held, LONG)
        .await
        .expect("renew");
    lost.sort_unstable();
    assert_eq!(lost, vec![2, 3, 4, 9]);
    // What was lost stays lost (renewing does not bring anything back) ...
    assert_eq!(location(&*stores[0], 3).await, None);
    assert_eq!(location(&*stores[0], 4).await, None);
    assert_eq!(
        location(&*stores[0], 2)
            .await
            .map(|l| l.gateway_id)
            .as_deref(),
        Some("gw-2")
    );
    // ... and what is held stays held.
    for env in [1, 5] {
        assert_eq!(
            location(&*stores[0], env).await.map(|l| l.gateway_id),
            Some(gw.to_owned())
        );
    }

    // Another gateway cannot renew gw-1's tunnels, even with the right epoch.
    assert_eq!(
        stores[0]
            .renew_tunnels("gw-2", &[held[0]], LONG)
            .await
            .expect("renew"),
        vec![1]
    );

    // A renewal extends the lease past its first end.
    let loc = stores[0]
        .claim_tunnel(6, gw, "gw-1.internal:7000", 4, Duration::from_millis(500))
        .await
        .expect("claim");
    assert!(stores[last]
        .renew_tunnels(gw, &[(6, loc.epoch)], LONG)
        .await
        .expect("renew")
        .is_empty());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(location(&*stores[0], 6).await, Some(loc));
}

async fn release_is_compare_and_delete(b: &dyn Backend) {
    let stores = replicas(b).await;
    let last = stores.len() - 1;
    let env = 21;
    assert!(!stores[0].release_tunnel(env, 1).await.expect("release"));

    let old = stores[0]
        .claim_tunnel(env, "gw-1", "gw-1.internal:7000", 1, LONG)
        .await
        .expect("claim");
    let new = stores[last]
        .claim_tunnel(env, "gw-2", "gw-2.internal:7000", 2, LONG)
        .await
        .expect("claim");
    // The old holder's release does nothing to the new holder's tunnel.
    assert!(!stores[0]
        .release_tunnel(env, old.epoch)
        .await
        .expect("release"));
    assert_eq!(location(&*stores[0], env).await.as_ref(), Some(&new));
    assert!(stores[0]
        .release_tunnel(env, new.epoch)
        .await
        .expect("release"));
    assert_eq!(location(&*stores[last], env).await, None);
    assert!(!stores[last]
        .release_tunnel(env, new.epoch)
        .await
        .expect("release again"));

    // A claim after a release still gets a higher epoch.
    let again = stores[0]
        .claim_tunnel(env, "gw-1", "gw-1.internal:7000", 3, SHORT)
        .await
        .expect("claim");
    assert!(again.epoch > new.epoch);
    // An expired location is not there to release.
    wait_for("the short lease to expire", || async {
        location(&*stores[0], env).await.is_none()
    })
    .await;
    assert!(!stores[0]
        .release_tunnel(env, again.epoch)
        .await
        .expect("release"));
}

async fn tunnel_locations_follow_the_ids_and_expire(b: &dyn Backend) {
    let stores = replicas(b).await;
    let last = stores.len() - 1;
    assert!(stores[0]
        .tunnel_locations(&[])
        .await
        .expect("nothing")
        .is_empty());
    let (e1, e2, e3) = (31, 32, 33);
    let l1 = stores[0]
        .claim_tunnel(e1, "gw-1", "gw-1.internal:7000", 1, LONG)
        .await
        .expect("claim");
    let l2 = stores[last]
        .claim_tunnel(e2, "gw-2", "gw-2.internal:7000", 2, LONG)
        .await
        .expect("claim");
    for store in &stores {
        assert_eq!(
            store
                .tunnel_locations(&[e3, e2, e1, e2])
                .await
                .expect("locations"),
            vec![None, Some(l2.clone()), Some(l1.clone()), Some(l2.clone())]
        );
    }

    // A claim with a short lease replaces e2's and then expires: e2 has no location.
    stores[0]
        .claim_tunnel(e2, "gw-3", "gw-3.internal:7000", 3, SHORT)
        .await
        .expect("claim");
    wait_for("the short lease to expire", || async {
        location(&*stores[last], e2).await.is_none()
    })
    .await;
    for store in &stores {
        assert_eq!(
            store
                .tunnel_locations(&[e1, e2, e3])
                .await
                .expect("locations"),
            vec![Some(l1.clone()), None, None]
        );
    }
}

async fn gateways_register_list_expire_unregister(b: &dyn Backend) {
    let stores = replicas(b).await;
    let last = stores.len() - 1;
    assert!(stores[0].live_gateways().await.expect("list").is_empty());
    stores[0].unregister_gateway("nobody").await.expect("no-op");

    for id in ["gw-b", "gw-a", "gw-c"] {
        stores[0]
            .register_gateway(&gateway(id, 0), LONG)
            .await
            .expect("register");
    }
    for store in &stores {
        assert_eq!(
            store.live_gateways().await.expect("list"),
            vec![gateway("gw-a", 0), gateway("gw-b", 0), gateway("gw-c", 0)],
            "sorted by id"
        );
    }

    // Registering again refreshes what is known about it.
    stores[last]
        .register_gateway(&gateway("gw-b", 5), LONG)
        .await
        .expect("refresh");
    assert_eq!(
        stores[0].live_gateways().await.expect("list"),
        vec![gateway("gw-a", 0), gateway("gw-b", 5), gateway("gw-c", 0)]
    );

    stores[last]
        .unregister_gateway("gw-c")
        .await
        .expect("unregister");
    assert_eq!(live_gateway_ids(&*stores[0]).await, ["gw-a", "gw-b"]);

    // A registration that is not renewed expires ...
    stores[0]
        .register_gateway(&gateway("gw-a", 1), SHORT)
        .await
        .expect("register");
    wait_for("gw-a's registration to expire", || async {
        live_gateway_ids(&*stores[last]).await == ["gw-b"]
    })
    .await;
    for store in &stores {
        assert_eq!(live_gateway_ids(&**store).await, ["gw-b"]);
    }
    // ... and a gateway that comes back is listed again.
    stores[last]
        .register_gateway(&gateway("gw-a", 2), LONG)
        .await
        .expect("register");
    for store in &stores {
        assert_eq!(
            store.live_gateways().await.expect("list"),
            vec![gateway("gw-a", 2), gateway("gw-b", 5)]
        );
    }
}

async fn cluster_secret_is_created_once(b: &dyn Backend) {
    let stores = replicas(b).await;
    // Many first callers at once, over every replica: they all get the same secret.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = Arc::clone(&stores[i % stores.len()]);
        tasks.push(tokio::spawn(async move {
            store.cluster_secret().await.expect("secret")
        }));
    }
    let mut secrets = HashSet::new();
    for t in tasks {
        secrets.insert(t.await.expect("secret task"));
    }
    assert_eq!(secrets.len(), 1, "{secrets:?}");
    let secret = secrets.into_iter().next().expect("one secret");
    assert_ne!(secret, [0; 32], "random, not zeroes");
    for store in &stores {
        assert_eq!(store.cluster_secret().await.expect("secret"), secret);
    }

    drop(stores);
    let store = b.open().await;
    assert_eq!(
        store.cluster_secret().await.expect("secret"),
        secret,
        "the secret survives a restart"
    );
}

fn snapshot_taken(taken_ms: u64, body: &[u8]) -> StoredSnapshot {
    StoredSnapshot {
        taken_ms,
        received_ms: taken_ms + 7,
        body: body.to_vec(),
    }
}

async fn snapshots_keep_the_latest_taken(b: &dyn Backend) {
    let stores = replicas(b).await;
    let last = stores.len() - 1;
    let env = create_one(&*stores[0], "snapped").await;
    let other = create_one(&*stores[0], "other").await;
    assert_eq!(stores[0].snapshot(env.id).await.expect("get"), None);

    // Bodies are arbitrary bytes: NULs, invalid UTF-8, every byte value.
    let binary: Vec<u8> = (0..=255u8).chain([0, 0, 0xff, 0xfe]).collect();
    let first = snapshot_taken(BIG_MS + 1, &binary);
    assert_eq!(
        stores[0].put_snapshot(env.id, &first).await.expect("put"),
        SnapshotPut::Stored
    );
    for store in &stores {
        assert_eq!(
            store.snapshot(env.id).await.expect("get").as_ref(),
            Some(&first)
        );
    }

    // An older one (a late delivery) does not replace it, and says so.
    assert_eq!(
        stores[last]
            .put_snapshot(env.id, &snapshot_taken(BIG_MS, b"older"))
            .await
            .expect("put"),
        SnapshotPut::KeptNewer
    );
    assert_eq!(
        stores[0].snapshot(env.id).await.expect("get").as_ref(),
        Some(&first)
    );
    // A newer one does.
    let second = snapshot_taken(BIG_MS + 2, &vec![0xab; 1 << 20]);
    assert_eq!(
        stores[last]
            .put_snapshot(env.id, &second)
            .await
            .expect("put"),
        SnapshotPut::Stored
    );
    assert_eq!(
        stores[0].snapshot(env.id).await.expect("get").as_ref(),
        Some(&second)
    );

    // Times are compared as numbers, not as text ("9999" > "10000").
    assert_eq!(
        stores[0]
            .put_snapshot(other.id, &snapshot_taken(10_000, b""))
            .await
            .expect("put"),
        SnapshotPut::Stored
    );
    assert_eq!(
        stores[0]
            .put_snapshot(other.id, &snapshot_taken(9_999, b"older"))
            .await
            .expect("put"),
        SnapshotPut::KeptNewer
    );
    // The same time again replaces it (a re-sent snapshot of the same moment).
    assert_eq!(
        stores[0]
            .put_snapshot(other.id, &snapshot_taken(10_000, b""))
            .await
            .expect("put"),
        SnapshotPut::Stored
    );
    let empty = snapshot_taken(10_000, b"");
    assert_eq!(
        stores[0].snapshot(other.id).await.expect("get"),
        Some(empty.clone()),
        "an empty body is a body"
    );
    assert_eq!(
        stores[0].snapshot(env.id).await.expect("get").as_ref(),
        Some(&second),
        "environments have their own snapshots"
    );

    // An unknown environment stores nothing.
    let unknown = other.id + 1000;
    assert_eq!(
        stores[0].put_snapshot(unknown, &first).await.expect("put"),
        SnapshotPut::NoEnvironment
    );
    assert_eq!(stores[last].snapshot(unknown).await.expect("get"), None);

    // Snapshots are durable.
    drop(stores);
    let store = b.open().await;
    assert_eq!(store.snapshot(env.id).await.expect("get"), Some(second));
    assert_eq!(store.snapshot(other.id).await.expect("get"), Some(empty));
}

async fn delete_removes_the_snapshot(b: &dyn Backend) {
    let store = b.open().await;
    let env = create_one(&*store, "doomed").await;
    let keep = create_one(&*store, "kept").await;
    let snap = snapshot_taken(1_000, b"engine state");
    for id in [env.id, keep.id] {
        assert_eq!(
            store.put_snapshot(id, &snap).await.expect("put"),
            SnapshotPut::Stored
        );
    }
    assert!(store.delete_environment(env.id).await.expect("delete"));
    assert_eq!(store.snapshot(env.id).await.expect("get"), None);
    assert_eq!(store.snapshot(keep.id).await.expect("get"), Some(snap));
    // And none comes back for the deleted environment.
    assert_eq!(
        store
            .put_snapshot(env.id, &snapshot_taken(2_000, b"late"))
            .await
            .expect("put"),
        SnapshotPut::NoEnvironment
    );
    assert_eq!(store.snapshot(env.id).await.expect("get"), None);
}

fn stop(container: &str) -> Action {
    Action::ContainerStop {
        container: container.to_owned(),
        timeout_secs: Some(3),
    }
}

fn ok(id: u64) -> CommandResult {
    CommandResult { id, error: None }
}

fn failed(id: u64, e: &str) -> CommandResult {
    CommandResult {
        id,
        error: Some(e.to_owned()),
    }
}

async fn queue(store: &dyn Store, env: u64, target: &str, now_ms: u64) -> StoredCommand {
    store
        .queue_command(env, &stop(target), now_ms)
        .await
        .expect("queue")
        .expect("environment exists")
}

/// Every command id kept, newest first, and the total the store reports.
async fn listed_ids(store: &dyn Store, env: u64) -> (Vec<u64>, u64) {
    let (page, total) = store.list_commands(env, 0, 100_000).await.expect("list");
    (page.iter().map(|c| c.id).collect(), total)
}

async fn commands_queue_list_deliver_finish(b: &dyn Backend) {
    let stores = replicas(b).await;
    let (a, other) = (&stores[0], &stores[stores.len() - 1]);
    let env = create_one(&**a, "async-box").await;
    let mut ids = Vec::new();
    for i in 1..=5u64 {
        let cmd = queue(&**a, env.id, &format!("c{i}"), 100 + i).await;
        // The id reads as the queue time: ms × 1000 (one per ms here).
        assert_eq!(
            (cmd.id, cmd.created_ms, cmd.state()),
            (
                (100 + i) * COMMAND_IDS_PER_MS,
                100 + i,
                CommandState::Pending
            )
        );
        ids.push(cmd.id);
    }
    // Newest first, paged, with the total.
    let (page, total) = other.list_commands(env.id, 1, 2).await.expect("list");
    assert_eq!(total, 5);
    assert_eq!(
        page.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![ids[3], ids[2]]
    );
    assert_eq!(page[0].action, stop("c4"));
    let (past_end, _) = a.list_commands(env.id, 10, 5).await.expect("list");
    assert!(past_end.is_empty());

    // Delivery: after the agent's last finished id, oldest first, at most `limit`, marked sent.
    let first = a
        .deliver_commands(env.id, 0, 3, 1_000)
        .await
        .expect("deliver");
    assert_eq!(first.iter().map(|c| c.id).collect::<Vec<_>>(), ids[..3]);
    assert!(first
        .iter()
        .all(|c| c.sent_ms == Some(1_000) && c.state() == CommandState::Sent));
    // Delivered again (a lost answer): same commands, first sent time kept.
    let again = other
        .deliver_commands(env.id, 0, 3, 2_000)
        .await
        .expect("deliver");
    assert_eq!(
        again.iter().map(|c| c.sent_ms).collect::<Vec<_>>(),
        vec![Some(1_000); 3]
    );

    // Results: the first one wins, unknown ids (in a gap, past the end) are ignored.
    a.finish_commands(
        env.id,
        &[
            ok(ids[0]),
            failed(ids[1], "No such container: c2"),
            ok(ids[0] + 1),
            ok(ids[4] + 1),
        ],
        3_000,
    )
    .await
    .expect("finish");
    other
        .finish_commands(env.id, &[failed(ids[0], "late retry"), ok(ids[1])], 4_000)
        .await
        .expect("finish again");
    let (all, total) = a.list_commands(env.id, 0, 10).await.expect("list");
    assert_eq!(total, 5, "unknown ids did not become commands");
    let by_id = |id: u64| all.iter().find(|c| c.id == id).expect("listed").clone();
    assert_eq!(by_id(ids[0]).state(), CommandState::Succeeded);
    assert_eq!(by_id(ids[0]).finished_ms, Some(3_000));
    assert_eq!(by_id(ids[1]).state(), CommandState::Failed);
    assert_eq!(
        by_id(ids[1]).error.as_deref(),
        Some("No such container: c2")
    );
    assert_eq!(by_id(ids[4]).state(), CommandState::Pending);
    // Finished commands are not delivered again, whatever `after` says; `after` may fall
    // in a gap between ids.
    let rest = a
        .deliver_commands(env.id, 0, 10, 5_000)
        .await
        .expect("deliver");
    assert_eq!(rest.iter().map(|c| c.id).collect::<Vec<_>>(), ids[2..]);
    for after in [ids[2], ids[2] + 1, ids[3] - 1] {
        let later = a
            .deliver_commands(env.id, after, 10, 5_000)
            .await
            .expect("deliver");
        assert_eq!(
            later.iter().map(|c| c.id).collect::<Vec<_>>(),
            ids[3..],
            "after {after}"
        );
    }
    assert!(a
        .deliver_commands(env.id, ids[4], 10, 5_000)
        .await
        .expect("deliver")
        .is_empty());

    // Durable.
    drop(stores);
    let store = b.open().await;
    let (all, total) = store.list_commands(env.id, 0, 10).await.expect("list");
    assert_eq!(total, 5);
    assert_eq!(all[3].state(), CommandState::Failed);
    assert_eq!(all[3].id, ids[1]);
}

async fn command_ids_grow_whatever_the_clock_does(b: &dyn Backend) {
    let stores = replicas(b).await;
    let (a, other) = (&stores[0], &stores[stores.len() - 1]);
    let env = create_one(&**a, "clocks").await;
    let second = create_one(&**a, "its-neighbour").await;
    let mut ids = Vec::new();
    // Same millisecond: one apart. Later: the clock, leaving a gap. A clock that went back
    // (another replica's, or a stepped one): still one up. No clock: still one up.
    for (store, now, want) in [
        (a, 5_000, 5_000_000),
        (other, 5_000, 5_000_001),
        (a, 5_000, 5_000_002),
        (other, 9_000, 9_000_000),
        (a, 4_000, 9_000_001),
        (other, 0, 9_000_002),
        (a, 9_000, 9_000_003),
        (other, 9_001, 9_001_000),
    ] {
        let cmd = queue(&**store, env.id, "c", now).await;
        assert_eq!(cmd.id, want, "queued at {now} ms");
        ids.push(cmd.id);
    }
    // Each environment counts on its own: the neighbour starts from its clock.
    assert_eq!(queue(&**a, second.id, "n", 5_000).await.id, 5_000_000);

    // Paging over the gaps: newest first, pages meet without overlap, the total is the count.
    ids.reverse();
    let (all, total) = listed_ids(&**other, env.id).await;
    assert_eq!((all, total), (ids.clone(), 8));
    let mut paged = Vec::new();
    for start in (0..10).step_by(3) {
        let (page, total) = a.list_commands(env.id, start, 3).await.expect("list");
        assert_eq!(total, 8);
        paged.extend(page.iter().map(|c| c.id));
    }
    assert_eq!(paged, ids);
    // Delivery walks the gaps oldest first, in pages of `limit`.
    ids.reverse();
    let mut after = 0;
    let mut delivered = Vec::new();
    loop {
        let batch = other
            .deliver_commands(env.id, after, 3, 10_000)
            .await
            .expect("deliver");
        let Some(last) = batch.last() else { break };
        after = last.id;
        delivered.extend(batch.iter().map(|c| c.id));
    }
    assert_eq!(delivered, ids);

    // Ids stay exact at the top of their range, and a clock past it is refused cleanly.
    let top = MAX_COMMAND_ID / COMMAND_IDS_PER_MS;
    let high = queue(&**a, second.id, "top", top).await;
    assert_eq!(high.id, top * COMMAND_IDS_PER_MS);
    assert_eq!(listed_ids(&**other, second.id).await.0[0], high.id);
    let refused = a.queue_command(second.id, &stop("late"), top + 1).await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    assert_eq!(listed_ids(&**a, second.id).await.1, 2, "nothing written");
}

async fn finished_commands_beyond_the_bound_are_pruned_when_queueing(b: &dyn Backend) {
    let stores = replicas(b).await;
    let (a, other) = (&stores[0], &stores[stores.len() - 1]);
    let env = create_one(&**a, "long-lived").await;
    let keep = KEEP_FINISHED_COMMANDS_PER_ENV;
    let mut ids = Vec::new();
    for i in 0..keep + 5 {
        ids.push(queue(&**a, env.id, &format!("c{i}"), 1_000 + i).await.id);
    }
    // The agent finishes all but the two oldest (out of order: they are still unfinished).
    let results: Vec<_> = ids[2..].iter().map(|&id| ok(id)).collect();
    other
        .finish_commands(env.id, &results, 50_000)
        .await
        .expect("finish");
    // Nothing is pruned until the next queueing.
    assert_eq!(listed_ids(&**a, env.id).await.1, keep + 5);

    let next = queue(&**other, env.id, "next", 60_000).await;
    assert!(next.id > ids[ids.len() - 1]);
    // Kept: the two unfinished (the oldest of all), the newest `keep` finished, the new one.
    // Gone: the 3 oldest finished.
    let mut want: Vec<u64> = ids[..2].to_vec();
    want.extend(&ids[5..]);
    want.push(next.id);
    want.reverse();
    let (all, total) = listed_ids(&**a, env.id).await;
    assert_eq!((all, total), (want.clone(), keep + 3));
    // The unfinished ones are still delivered, oldest first.
    let pending = a
        .deliver_commands(env.id, 0, 10, 70_000)
        .await
        .expect("deliver");
    assert_eq!(
        pending.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![ids[0], ids[1], next.id]
    );
    // A late (retried) result of a pruned command is ignored: it does not come back.
    other
        .finish_commands(env.id, &[failed(ids[2], "late"), ok(ids[3])], 80_000)
        .await
        .expect("finish");
    assert_eq!(listed_ids(&**a, env.id).await, (want, keep + 3));

    // When everything finished, the newest stays (it carries the ids on) and queueing goes on.
    let results: Vec<_> = [ids[0], ids[1], next.id].iter().map(|&id| ok(id)).collect();
    a.finish_commands(env.id, &results, 90_000)
        .await
        .expect("finish");
    let last = queue(&**a, env.id, "last", 1).await;
    assert_eq!(
        last.id,
        next.id + 1,
        "the clock went back: the kept newest id counts"
    );
    let (all, total) = listed_ids(&**other, env.id).await;
    assert_eq!(total, keep + 1);
    assert_eq!(all.len() as u64, keep + 1);
    assert_eq!(all[..2], [last.id, next.id]);
    assert!(!all.contains(&ids[0]) && !all.contains(&ids[1]) && !all.contains(&ids[5]));
    // Durable, pruning included.
    drop(stores);
    let store = b.open().await;
    assert_eq!(listed_ids(&*store, env.id).await, (all, keep + 1));
}

async fn unfinished_commands_are_capped(b: &dyn Backend) {
    let stores = replicas(b).await;
    let env = create_one(&*stores[0], "flooded").await;
    let mut tasks = Vec::new();
    for worker in 0..8u64 {
        let store = Arc::clone(&stores[worker as usize % stores.len()]);
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut i = worker;
            while i < MAX_UNFINISHED_COMMANDS_PER_ENV {
                ids.push(queue(&*store, env.id, "c", 1_000).await.id);
                i += 8;
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.expect("task"));
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as u64, MAX_UNFINISHED_COMMANDS_PER_ENV);
    let store = &stores[0];
    let full = store
        .queue_command(env.id, &stop("one-too-many"), 2_000)
        .await;
    assert!(
        matches!(&full, Err(StoreError::Conflict(m)) if m.contains("unfinished")),
        "{full:?}"
    );
    assert_eq!(
        listed_ids(&**store, env.id).await.1,
        MAX_UNFINISHED_COMMANDS_PER_ENV,
        "nothing written"
    );
    // One finished: room for one more, and the finished one stays (within the bound).
    store
        .finish_commands(env.id, &[ok(ids[0])], 3_000)
        .await
        .expect("finish");
    let more = queue(&**store, env.id, "one-more", 4_000).await;
    assert!(more.id > ids[ids.len() - 1]);
    let again = store
        .queue_command(env.id, &stop("full-again"), 5_000)
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(
        listed_ids(&**store, env.id).await.1,
        MAX_UNFINISHED_COMMANDS_PER_ENV + 1
    );
}

async fn commands_are_refused_for_missing_environments_and_deleted_with_them(b: &dyn Backend) {
    let store = b.open().await;
    assert_eq!(
        store
            .queue_command(987_654, &stop("x"), 1)
            .await
            .expect("queue"),
        None
    );
    let env = create_one(&*store, "short-lived").await;
    let keep = create_one(&*store, "kept").await;
    for id in [env.id, keep.id] {
        let cmd = queue(&*store, id, "x", 1).await;
        store
            .finish_commands(id, &[ok(cmd.id)], 2)
            .await
            .expect("finish");
        queue(&*store, id, "x", 1).await;
    }
    assert!(store.delete_environment(env.id).await.expect("delete"));
    assert_eq!(store.list_commands(env.id, 0, 10).await.expect("list").1, 0);
    assert!(store
        .deliver_commands(env.id, 0, 10, 2)
        .await
        .expect("deliver")
        .is_empty());
    assert_eq!(
        store
            .queue_command(env.id, &stop("y"), 3)
            .await
            .expect("queue"),
        None
    );
    assert_eq!(
        store.list_commands(keep.id, 0, 10).await.expect("list").1,
        2
    );
}

async fn concurrent_queueing_hands_out_distinct_ids(b: &dyn Backend) {
    let stores = replicas(b).await;
    let env = create_one(&*stores[0], "busy").await;
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let store = Arc::clone(&stores[i as usize % stores.len()]);
        // A few replicas' clocks, none in step.
        tasks.push(tokio::spawn(async move {
            queue(&*store, env.id, &format!("c{i}"), 1_000 + i % 3)
                .await
                .id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 40);
    let (mut listed, total) = listed_ids(&*stores[0], env.id).await;
    listed.reverse();
    assert_eq!((listed, total), (ids, 40));
}

async fn tunnel_changes_round_trip(b: &dyn Backend) {
    let stores = replicas(b).await;
    let mut subs: Vec<_> = stores.iter().map(|s| s.subscribe()).collect();
    let changes = [
        Change::TunnelWanted {
            env: 1,
            until_ms: BIG_MS,
        },
        Change::TunnelOpened(TunnelLocation {
            env: 2,
            gateway_id: "gw-ü \"quoted\"".to_owned(),
            dial_addr: "[::1]:7000".to_owned(),
            epoch: BIG_MS + 1,
            since_ms: BIG_MS + 2,
        }),
        Change::TunnelClosed {
            env: 3,
            epoch: u64::MAX,
        },
    ];
    for (i, publisher) in stores.iter().enumerate() {
        for change in &changes {
            publisher.publish(change.clone()).await.expect("publish");
        }
        for (n, rx) in subs.iter_mut().enumerate() {
            for change in &changes {
                assert_eq!(
                    &next_change(rx).await,
                    change,
                    "subscriber {n}, publisher {i}"
                );
            }
        }
    }
    for rx in &mut subs {
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Backend-specific checks

#[tokio::test]
async fn embedded_file_lives_in_the_data_dir_and_is_exclusive() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("nested").join("data");
    let store = EmbeddedStore::open(&data).expect("open creates the dir");
    assert!(data.join("edgeplane.redb").is_file());
    // redb locks the file: a second open while the first is alive fails cleanly, no panic.
    let second = EmbeddedStore::open(&data);
    assert!(
        matches!(second, Err(StoreError::Unavailable { .. })),
        "{second:?}"
    );
    drop(store);
    EmbeddedStore::open(&data).expect("reopen after drop");
}

/// A raw connection for poking at the server behind the store's back.
async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_all_carry_the_prefix() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), "ep-test:")
        .await
        .expect("connect");
    let mut pre = new_env("x");
    pre.edge_id = Some(Uuid::new_v4());
    let created = store
        .create_environments(vec![pre, new_env("y")])
        .await
        .expect("create");
    store
        .record_heartbeats(&[(created[0].id, 1)])
        .await
        .expect("hb");
    store
        .create_named(Collection::Groups, "g")
        .await
        .expect("group");
    store
        .create_named(Collection::Tags, "t")
        .await
        .expect("tag");
    store
        .put_settings(&Settings::default())
        .await
        .expect("settings");
    store
        .replace_admin_key_hashes(&[[1; 32]])
        .await
        .expect("key");
    store
        .put_tunnel_grant(&[0xab; 32], &grant(created[0].id), LONG)
        .await
        .expect("grant");
    store
        .claim_tunnel(created[0].id, "gw-1", "gw-1.internal:7000", 1, LONG)
        .await
        .expect("claim");
    store
        .register_gateway(&gateway("gw-1", 1), LONG)
        .await
        .expect("gateway");
    store.cluster_secret().await.expect("secret");
    assert_eq!(
        store
            .put_snapshot(created[1].id, &snapshot_taken(1, b"body"))
            .await
            .expect("snapshot"),
        SnapshotPut::Stored
    );
    let cmd = queue(&store, created[1].id, "c", 1).await;
    store
        .finish_commands(created[1].id, &[ok(cmd.id)], 2)
        .await
        .expect("finish");

    let mut conn = raw(&server).await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    keys.sort();
    let grant_key = format!("ep-test:grant:{}", "ab".repeat(32));
    let tunnel_key = format!("ep-test:tunnel:{}", created[0].id);
    let snapshot_key = format!("ep-test:snapshot:{}", created[1].id);
    let commands_key = format!("ep-test:commands:{}", created[1].id);
    let command_ids_key = format!("{commands_key}:ids");
    let finished_key = format!("{commands_key}:finished");
    let mut expected = vec![
        "ep-test:admin_keys",
        "ep-test:binding",
        "ep-test:cluster_secret",
        &commands_key,
        &command_ids_key,
        &finished_key,
        "ep-test:env",
        "ep-test:gateway:gw-1",
        "ep-test:gateways",
        &grant_key,
        "ep-test:groups",
        "ep-test:groups:names",
        "ep-test:heartbeats",
        "ep-test:seq:env",
        "ep-test:seq:groups",
        "ep-test:seq:tags",
        "ep-test:seq:tunnel",
        "ep-test:settings",
        &snapshot_key,
        "ep-test:tags",
        "ep-test:tags:names",
        &tunnel_key,
    ];
    expected.sort_unstable();
    assert_eq!(keys, expected);
    // What lives as long as a lease has a TTL; the rest, epoch counter included, does not.
    for key in &keys {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        let leased = [&grant_key, &tunnel_key, "ep-test:gateway:gw-1"].contains(&key.as_str());
        if leased {
            assert!(pttl > 0 && pttl <= 60_000, "{key}: {pttl}");
        } else {
            assert_eq!(pttl, -1, "{key}");
        }
    }
    // The record itself does not carry the binding: it lives only in the binding hash.
    let json: String = redis::cmd("HGET")
        .arg("ep-test:env")
        .arg(created[0].id)
        .query_async(&mut conn)
        .await
        .expect("HGET");
    assert!(!json.contains("edgeId"), "{json}");

    // Another prefix on the same server is another, empty, store.
    let other = RedisStore::connect(&server.url(), "other:")
        .await
        .expect("connect");
    assert!(other.list_environments().await.expect("list").is_empty());
    let mut rx = store.subscribe();
    other.publish(Change::Settings).await.expect("publish");
    store.publish(Change::AdminKeys).await.expect("publish");
    assert_eq!(
        next_change(&mut rx).await,
        Change::AdminKeys,
        "other prefixes' changes are not ours"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_prunes_expired_gateways_from_the_set() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), PREFIX)
        .await
        .expect("connect");
    store
        .register_gateway(&gateway("gw-long", 0), LONG)
        .await
        .expect("register");
    store
        .register_gateway(&gateway("gw-short", 0), SHORT)
        .await
        .expect("register");
    let mut conn = raw(&server).await;
    let members = |mut conn: redis::aio::MultiplexedConnection| async move {
        let mut ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{PREFIX}gateways"))
            .query_async(&mut conn)
            .await
            .expect("SMEMBERS");
        ids.sort();
        ids
    };
    assert_eq!(members(conn.clone()).await, ["gw-long", "gw-short"]);
    wait_for("gw-short's registration to expire", || async {
        live_gateway_ids(&store).await == ["gw-long"]
    })
    .await;
    // The listing that found its key gone dropped it from the set.
    assert_eq!(members(conn.clone()).await, ["gw-long"]);
    // Unregistering removes both the key and the set member.
    store
        .unregister_gateway("gw-long")
        .await
        .expect("unregister");
    assert!(members(conn.clone()).await.is_empty());
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("{PREFIX}gateway:gw-long"))
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_large_epochs_stay_exact() {
    // The scripts see epochs as Lua doubles: exact (and printed without an exponent) up to
    // 2^53, which INCR would take centuries to reach.
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), PREFIX)
        .await
        .expect("connect");
    let mut conn = raw(&server).await;
    let start: u64 = (1 << 53) - 10;
    let _: () = redis::cmd("SET")
        .arg(format!("{PREFIX}seq:tunnel"))
        .arg(start)
        .query_async(&mut conn)
        .await
        .expect("SET");
    let loc = store
        .claim_tunnel(7, "gw-1", "gw-1.internal:7000", BIG_MS, LONG)
        .await
        .expect("claim");
    assert_eq!(loc.epoch, start + 1);
    assert_eq!(location(&store, 7).await.as_ref(), Some(&loc));
    assert!(store
        .renew_tunnels("gw-1", &[(7, loc.epoch)], LONG)
        .await
        .expect("renew")
        .is_empty());
    // A neighbouring epoch is another epoch.
    assert!(!store
        .release_tunnel(7, loc.epoch - 1)
        .await
        .expect("release"));
    assert!(store.release_tunnel(7, loc.epoch).await.expect("release"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_moves_heartbeats_of_earlier_versions_into_their_sorted_set() {
    let server = RedisServer::start();
    let created = {
        let store = RedisStore::connect(&server.url(), PREFIX)
            .await
            .expect("connect");
        let created = store
            .create_environments(vec![new_env("old-a"), new_env("old-b")])
            .await
            .expect("create");
        store
            .record_heartbeats(&[(created[1].id, 9_000)])
            .await
            .expect("heartbeats");
        created
    };
    // What earlier versions wrote: a hash of decimal times, one of them older than the time
    // the sorted set holds already.
    let mut conn = raw(&server).await;
    let old = format!("{PREFIX}heartbeat");
    let _: () = redis::cmd("HSET")
        .arg(&old)
        .arg(created[0].id)
        .arg("1733480000123")
        .arg(created[1].id)
        .arg("5000")
        .query_async(&mut conn)
        .await
        .expect("HSET");
    let store = RedisStore::connect(&server.url(), PREFIX)
        .await
        .expect("connect");
    assert_eq!(
        store
            .heartbeats(&[created[0].id, created[1].id])
            .await
            .expect("hb"),
        vec![Some(1_733_480_000_123), Some(9_000)]
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&old)
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "the old hash is gone");
    // Once moved, a replica starting again changes nothing.
    drop(
        RedisStore::connect(&server.url(), PREFIX)
            .await
            .expect("connect"),
    );
    assert_eq!(
        store.heartbeats(&[created[0].id]).await.expect("hb"),
        vec![Some(1_733_480_000_123)]
    );
}

/// The fields of a hash, sorted.
async fn hash_fields(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<String> {
    let mut fields: Vec<String> = redis::cmd("HKEYS")
        .arg(key)
        .query_async(conn)
        .await
        .expect("HKEYS");
    fields.sort();
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_command_ids_never_repeat_after_lost_writes() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), PREFIX)
        .await
        .expect("connect");
    let env = create_one(&store, "lossy").await;
    let commands = format!("{PREFIX}commands:{}", env.id);
    let ids_key = format!("{commands}:ids");
    let finished_key = format!("{commands}:finished");
    let mut conn = raw(&server).await;

    // Three commands within one millisecond, and the agent has seen them all.
    let mut handed_out = Vec::new();
    for target in ["a", "b", "c"] {
        handed_out.push(queue(&store, env.id, target, 1_000).await.id);
    }
    assert_eq!(handed_out, [1_000_000, 1_000_001, 1_000_002]);
    let seen = store
        .deliver_commands(env.id, 0, 10, 1_000)
        .await
        .expect("deliver");
    assert_eq!(seen.len(), 3);

    // Redis loses its last write (a crash with `appendfsync everysec`, or a failover to a
    // replica that lagged): the newest command is gone, as if never queued.
    let newest = handed_out[2];
    let _: () = redis::pipe()
        .cmd("ZREM")
        .arg(&ids_key)
        .arg(newest)
        .ignore()
        .cmd("HDEL")
        .arg(&commands)
        .arg(newest)
        .arg(format!("{newest}:sent"))
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("lose the newest");
    assert_eq!(listed_ids(&store, env.id).await.1, 2);
    // "Newest + 1" alone would hand out 1_000_002 again, which the agent would skip as done
    // (or whose result it would report for another command). The clock is past it.
    let next = queue(&store, env.id, "d", 1_001).await;
    assert!(next.id > newest, "{} after {newest}", next.id);
    handed_out.push(next.id);

    // Worse: every key of the environment's queue lost.
    let _: () = redis::cmd("DEL")
        .arg(&[&commands, &ids_key, &finished_key])
        .query_async(&mut conn)
        .await
        .expect("DEL");
    assert_eq!(listed_ids(&store, env.id).await, (vec![], 0));
    let after = queue(&store, env.id, "e", 1_002).await;
    assert!(
        handed_out.iter().all(|&id| after.id > id),
        "{} after {handed_out:?}",
        after.id
    );
    // And the agent, with `done_through` at the highest id it finished, gets it.
    let delivered = store
        .deliver_commands(env.id, next.id, 10, 1_003)
        .await
        .expect("deliver");
    assert_eq!(
        delivered.iter().map(|c| c.id).collect::<Vec<_>>(),
        [after.id]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pruning_leaves_no_fields_behind() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), PREFIX)
        .await
        .expect("connect");
    let env = create_one(&store, "tidy").await;
    let commands = format!("{PREFIX}commands:{}", env.id);
    let ids_key = format!("{commands}:ids");
    let finished_key = format!("{commands}:finished");
    let mut conn = raw(&server).await;
    let keep = KEEP_FINISHED_COMMANDS_PER_ENV;
    let mut ids = Vec::new();
    for i in 0..keep + 2 {
        ids.push(queue(&store, env.id, &format!("c{i}"), 1_000 + i).await.id);
    }
    let sent = store
        .deliver_commands(env.id, 0, 1_000, 2_000)
        .await
        .expect("deliver");
    assert_eq!(sent.len() as u64, keep + 2);
    let results: Vec<_> = ids.iter().map(|&id| ok(id)).collect();
    store
        .finish_commands(env.id, &results, 3_000)
        .await
        .expect("finish");
    let next = queue(&store, env.id, "next", 4_000).await;

    // The two oldest are gone with every field; the rest keep theirs.
    let mut want: Vec<String> = ids[2..]
        .iter()
        .flat_map(|id| [format!("{id}"), format!("{id}:done"), format!("{id}:sent")])
        .collect();
    want.push(next.id.to_string());
    want.sort();
    assert_eq!(hash_fields(&mut conn, &commands).await, want);
    let zset_conn = conn.clone();
    let card = |key: String| {
        let mut conn = zset_conn.clone();
        async move {
            let n: u64 = redis::cmd("ZCARD")
                .arg(key)
                .query_async(&mut conn)
                .await
                .expect("ZCARD");
            n
        }
    };
    assert_eq!(card(ids_key.clone()).await, keep + 1);
    assert_eq!(card(finished_key.clone()).await, keep);
    // A retried result of a pruned command, or of an id never queued, writes nothing.
    store
        .finish_commands(env.id, &[ok(ids[0]), ok(next.id + 7)], 5_000)
        .await
        .expect("finish");
    assert_eq!(hash_fields(&mut conn, &commands).await, want);
    assert_eq!(card(finished_key.clone()).await, keep);
    // Queue state carries no TTL.
    for key in [&commands, &ids_key, &finished_key] {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        assert_eq!(pttl, -1, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_resubscribes_after_losing_the_pubsub_connection() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), PREFIX)
        .await
        .expect("connect");
    let mut rx = store.subscribe();
    // No `Resync` without a reconnect: the first change seen is the published one.
    store.publish(Change::AdminKeys).await.expect("publish");
    assert_eq!(next_change(&mut rx).await, Change::AdminKeys);

    let mut conn = raw(&server).await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .expect("CLIENT KILL");
    assert_eq!(killed, 1, "the store holds exactly one pub/sub connection");

    // Whatever was published during the outage is lost; the store says so once it is back.
    // It sends `Resync` only after the new subscription is confirmed, so a change published
    // after receiving it must come through: no retry loop, no sleep.
    assert_eq!(next_change(&mut rx).await, Change::Resync);
    store.publish(Change::Settings).await.expect("publish");
    assert_eq!(next_change(&mut rx).await, Change::Settings);
    assert!(matches!(
        rx.try_recv(),
        Err(broadcast::error::TryRecvError::Empty)
    ));

    // And again: every re-subscription sends one.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .expect("CLIENT KILL");
    assert_eq!(killed, 1);
    assert_eq!(next_change(&mut rx).await, Change::Resync);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_errors_are_mapped() {
    // Nobody listens on a port that was just free.
    let port = testkit::free_port();
    let refused = RedisStore::connect(&format!("redis://127.0.0.1:{port}/"), PREFIX).await;
    assert!(
        matches!(refused, Err(StoreError::Unavailable { .. })),
        "{:?}",
        refused.err()
    );

    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), PREFIX)
        .await
        .expect("connect");
    let created = store
        .create_environments(vec![new_env("bad-record"), new_env("bad-binding")])
        .await
        .expect("create");
    let mut conn = raw(&server).await;
    let _: () = redis::cmd("HSET")
        .arg(format!("{PREFIX}env"))
        .arg(created[0].id)
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .expect("HSET");
    let _: () = redis::cmd("HSET")
        .arg(format!("{PREFIX}binding"))
        .arg(created[1].id)
        .arg("not-a-uuid")
        .query_async(&mut conn)
        .await
        .expect("HSET");
    for id in [created[0].id, created[1].id] {
        let corrupt = store.get_environment(id).await;
        assert!(
            matches!(corrupt, Err(StoreError::Corrupt { .. })),
            "{corrupt:?}"
        );
    }
    let corrupt = store.list_environments().await;
    assert!(
        matches!(corrupt, Err(StoreError::Corrupt { .. })),
        "{corrupt:?}"
    );
    // The bind script cannot read the secret of an undecodable record: corrupt, not a
    // refusal and not a bind.
    let corrupt = store
        .bind_edge_id(created[0].id, Uuid::new_v4(), &created[0].join_secret)
        .await;
    assert!(
        matches!(corrupt, Err(StoreError::Corrupt { .. })),
        "{corrupt:?}"
    );
    let _: () = redis::cmd("SET")
        .arg(format!("{PREFIX}heartbeats"))
        .arg("wrong type")
        .query_async(&mut conn)
        .await
        .expect("SET");
    let corrupt = store.heartbeats(&[created[0].id]).await;
    assert!(
        matches!(corrupt, Err(StoreError::Corrupt { .. })),
        "{corrupt:?}"
    );

    // Unreadable tunnel locations, cluster secrets and snapshots.
    let env = created[0].id;
    let loc = store
        .claim_tunnel(env, "gw-1", "gw-1.internal:7000", 1, LONG)
        .await
        .expect("claim");
    let _: () = redis::cmd("SET")
        .arg(format!("{PREFIX}tunnel:{env}"))
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .expect("SET");
    let corrupt = store.tunnel_locations(&[env]).await;
    assert!(
        matches!(corrupt, Err(StoreError::Corrupt { .. })),
        "{corrupt:?}"
    );
    let corrupt = store.release_tunnel(env, loc.epoch).await;
    assert!(
        matches!(corrupt, Err(StoreError::Corrupt { .. })),
        "{corrupt:?}"
    );
    // Renewing does not fail the whole batch: nobody holds an unreadable location.
    assert_eq!(
        store
            .renew_tunnels("gw-1", &[(env, loc.epoch)], LONG)
            .await
            .expect("renew"),
        vec![env]
    );
    // A location stored under another environment's key is corrupt too.
    let other = store
        .claim_tunnel(env + 1, "gw-1", "gw-1.internal:7000", 1, LONG)
        .await
        .expect("claim");
    let json = serde_json::to_string(&other).expect("json");
    let _: () = redis::cmd("SET")
        .arg(format!("{PREFIX}tunnel:{env}"))
        .arg(json)
        .query_async(&mut conn)
        .await
        .expect("SET");
    let corrupt = store.tunnel_locations(&[env]).await;
    assert!(
        matches!(corrupt, Err(StoreError::Corrupt { .. })),
        "{corrupt:?}"
    );
    let _: () = redis::cmd("SET")
        .arg(format!("{PREFIX}cluster_secret"))
        .arg("short")
        .query_async(&mut conn)
        .await
        .expect("SET");
    let corrupt = store.cluster_secret().await;
    assert!(
        matches!(corrupt, Err(StoreError::Corrupt { .. })),
        "{corrupt:?}"
    );
    let _: () = redis::cmd("HSET")
        .arg(format!("{PREFIX}snapshot:{env}"))
        .arg("body")
        .arg("no times")
        .query_async(&mut conn)
        .await
        .expect("HSET");
    let corrupt = store.snapshot(env).await;
    assert!(
        matches!(corrupt, Err(StoreError::Corrupt { .. })),
        "{corrupt:?}"
    );

    // The server going away is "unavailable", not a panic or a hang.
    drop(server);
    let gone = store.ping().await;
    assert!(
        matches!(gone, Err(StoreError::Unavailable { .. })),
        "{gone:?}"
    );
}

fn edge_group(name: &str, dynamic: bool, tag_ids: &[u64], envs: &[u64]) -> EdgeGroup {
    EdgeGroup {
        id: 0,
        name: name.to_owned(),
        dynamic,
        tag_ids: tag_ids.to_vec(),
        tag_match: TagMatch::All,
        environment_ids: envs.to_vec(),
    }
}

async fn edge_groups_crud_with_unique_names(b: &dyn Backend) {
    let store = b.open().await;
    assert!(store.list_edge_groups().await.expect("list").is_empty());
    let kiosks = store
        .create_edge_group(&edge_group("kiosks", true, &[3, 1], &[]))
        .await
        .expect("create");
    assert!(kiosks.id > 0);
    assert_eq!(
        (kiosks.tag_ids.as_slice(), kiosks.tag_match),
        (&[3, 1][..], TagMatch::All)
    );
    let tills = store
        .create_edge_group(&edge_group("tills", false, &[], &[]))
        .await
        .expect("create");
    assert!(tills.id > kiosks.id);
    let dup = store
        .create_edge_group(&edge_group("kiosks", false, &[], &[]))
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    assert_eq!(
        store.edge_group(kiosks.id).await.expect("get"),
        Some(kiosks.clone())
    );
    assert_eq!(store.edge_group(9_999).await.expect("get"), None);

    // Replacing: a new name frees the old one; another group's name is refused.
    let mut renamed = kiosks.clone();
    renamed.name = "screens".into();
    renamed.tag_match = TagMatch::Any;
    assert_eq!(
        store.update_edge_group(&renamed).await.expect("update"),
        Some(renamed.clone())
    );
    let mut clash = tills.clone();
    clash.name = "screens".into();
    let clash = store.update_edge_group(&clash).await;
    assert!(matches!(clash, Err(StoreError::Conflict(_))), "{clash:?}");
    // Its own name again is no conflict.
    assert_eq!(
        store.update_edge_group(&renamed).await.expect("update"),
        Some(renamed.clone())
    );
    let mut ghost = renamed.clone();
    ghost.id = 9_999;
    ghost.name = "ghost".into();
    assert_eq!(store.update_edge_group(&ghost).await.expect("update"), None);
    let again = store
        .create_edge_group(&edge_group("kiosks", false, &[], &[]))
        .await
        .expect("the old name is free");
    assert_eq!(
        store.list_edge_groups().await.expect("list"),
        vec![renamed.clone(), tills.clone(), again.clone()]
    );

    assert!(store.delete_edge_group(renamed.id).await.expect("delete"));
    assert!(!store.delete_edge_group(renamed.id).await.expect("again"));
    assert_eq!(store.edge_group(renamed.id).await.expect("get"), None);
    store
        .create_edge_group(&edge_group("screens", true, &[1], &[]))
        .await
        .expect("a deleted group's name is free");
    let ids: Vec<u64> = store
        .list_edge_groups()
        .await
        .expect("list")
        .iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "by id: {ids:?}");
    assert!(!ids.contains(&renamed.id), "ids are not reused");
}

async fn static_edge_groups_keep_only_environments_and_lose_deleted_ones(b: &dyn Backend) {
    let store = b.open().await;
    let envs = store
        .create_environments(vec![new_env("a"), new_env("b"), new_env("c")])
        .await
        .expect("create");
    let (a, bb, c) = (envs[0].id, envs[1].id, envs[2].id);
    // Unknown ids are left out; duplicates collapse; members come back ascending.
    let group = store
        .create_edge_group(&edge_group("tills", false, &[], &[c, 9_999, a, c]))
        .await
        .expect("create");
    assert_eq!(group.environment_ids, vec![a, c]);
    let other = store
        .create_edge_group(&edge_group("all", false, &[], &[a, bb, c]))
        .await
        .expect("create");
    assert_eq!(other.environment_ids, vec![a, bb, c]);

    // Replacing the members replaces them.
    let mut changed = group.clone();
    changed.environment_ids = vec![bb, c];
    let changed = store
        .update_edge_group(&changed)
        .await
        .expect("update")
        .expect("present");
    assert_eq!(changed.environment_ids, vec![bb, c]);

    // A deleted environment leaves every group it was in, and nothing else.
    assert!(store.delete_environment(c).await.expect("delete"));
    let left: Vec<Vec<u64>> = store
        .list_edge_groups()
        .await
        .expect("list")
        .into_iter()
        .map(|g| g.environment_ids)
        .collect();
    assert_eq!(left, vec![vec![bb], vec![a, bb]]);
    assert_eq!(
        store
            .edge_group(other.id)
            .await
            .expect("get")
            .expect("present")
            .environment_ids,
        vec![a, bb]
    );
    // ... and a group asked to hold it later does not.
    let mut back = changed.clone();
    back.environment_ids = vec![c, bb];
    let back = store
        .update_edge_group(&back)
        .await
        .expect("update")
        .expect("present");
    assert_eq!(back.environment_ids, vec![bb]);

    // A deleted group takes its members with it; its environments stay.
    assert!(store.delete_edge_group(other.id).await.expect("delete"));
    assert!(store.get_environment(a).await.expect("get").is_some());
    assert!(store.delete_environment(a).await.expect("delete a"));
    assert!(store.delete_environment(bb).await.expect("delete b"));
    assert_eq!(
        store
            .edge_group(group.id)
            .await
            .expect("get")
            .expect("present")
            .environment_ids,
        Vec::<u64>::new()
    );
}

async fn edge_groups_survive_reopen(b: &dyn Backend) {
    let envs;
    let group;
    {
        let store = b.open().await;
        envs = store
            .create_environments(vec![new_env("a"), new_env("b")])
            .await
            .expect("create");
        group = store
            .create_edge_group(&edge_group("tills", false, &[], &[envs[1].id]))
            .await
            .expect("create");
    }
    let store = b.open().await;
    assert_eq!(
        store.edge_group(group.id).await.expect("get"),
        Some(group.clone())
    );
    let next = store
        .create_edge_group(&edge_group("screens", true, &[2], &[]))
        .await
        .expect("create");
    assert!(next.id > group.id, "the id counter survives too");
    // Membership by environment survives as well: deleting it still leaves the group.
    assert!(store.delete_environment(envs[1].id).await.expect("delete"));
    assert!(store
        .edge_group(group.id)
        .await
        .expect("get")
        .expect("present")
        .environment_ids
        .is_empty());
}

async fn group_tags_are_set_cleared_and_go_with_their_group(b: &dyn Backend) {
    let store = b.open().await;
    assert!(store.group_tags().await.expect("read").is_empty());
    let shops = store
        .create_named(Collection::Groups, "shops")
        .await
        .expect("group");
    let depots = store
        .create_named(Collection::Groups, "depots")
        .await
        .expect("group");
    // Sorted, without duplicates.
    assert!(store
        .set_group_tags(shops.id, &[7, 3, 7])
        .await
        .expect("set"));
    assert!(store.set_group_tags(depots.id, &[3]).await.expect("set"));
    assert!(!store.set_group_tags(9_999, &[3]).await.expect("no group"));
    assert_eq!(
        store.group_tags().await.expect("read"),
        [(shops.id, vec![3, 7]), (depots.id, vec![3])].into()
    );
    // Cleared: the group has none.
    assert!(store.set_group_tags(depots.id, &[]).await.expect("clear"));
    assert_eq!(
        store.group_tags().await.expect("read"),
        [(shops.id, vec![3, 7])].into()
    );
    // A deleted group's tags go with it; a tag's deletion leaves groups alone (the API refuses
    // to delete a tag in use).
    assert!(store
        .delete_named(Collection::Groups, shops.id)
        .await
        .expect("delete"));
    assert!(store.group_tags().await.expect("read").is_empty());
    assert!(!store
        .set_group_tags(shops.id, &[1])
        .await
        .expect("deleted group"));
}

fn edge_stack(name: &str, groups: &[u64]) -> EdgeStack {
    EdgeStack {
        id: 0,
        name: name.to_owned(),
        edge_group_ids: groups.to_vec(),
        variables: [("TZ".to_owned(), "UTC".to_owned())].into(),
        version: 0,
        created_ms: 1_800_000_000_000,
    }
}

async fn stack_rollouts_are_compare_and_set_and_go_with_their_stack(b: &dyn Backend) {
    let store = b.open().await;
    let stack = store
        .create_edge_stack(&edge_stack("rolled", &[]), "v1")
        .await
        .expect("create");
    assert_eq!(store.stack_rollout(stack.id).await.expect("get"), None);
    let rollout = Rollout {
        revision: 0,
        config: RolloutConfig {
            batch_size: Some(5),
            batch_growth: BatchGrowth::Double,
            wait_secs: 30,
            batch_timeout_secs: 60,
            failure_threshold: 0.25,
            on_failure: OnFailure::Rollback,
        },
        state: RolloutState::Rolling,
        from_version: 1,
        to_version: 2,
        // Above 2^53: kept exactly (no float on the way).
        threshold: u64::MAX - 7,
        batch: 1,
        released: 5,
        batch_started_ms: 1_800_000_000_000,
        next_batch_ms: None,
        reason: None,
        updated_ms: 1_800_000_000_000,
        tolerated_failures: 2,
    };
    assert!(store
        .put_stack_rollout(stack.id, 0, &rollout)
        .await
        .expect("put"));
    let stored = store
        .stack_rollout(stack.id)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(stored.revision, 1);
    assert_eq!(
        Rollout {
            revision: 0,
            ..stored.clone()
        },
        rollout
    );
    // A writer that read revision 0 lost: another came first.
    let mut paused = stored.clone();
    paused.state = RolloutState::Paused;
    assert!(!store
        .put_stack_rollout(stack.id, 0, &paused)
        .await
        .expect("stale put"));
    assert!(store
        .put_stack_rollout(stack.id, 1, &paused)
        .await
        .expect("put"));
    assert_eq!(
        store.stack_rollouts().await.expect("all"),
        vec![(
            stack.id,
            Rollout {
                revision: 2,
                ..paused.clone()
            }
        )]
    );
    assert!(!store
        .put_stack_rollout(9_999, 0, &rollout)
        .await
        .expect("no such stack"));
    assert!(store.delete_edge_stack(stack.id).await.expect("delete"));
    assert_eq!(store.stack_rollout(stack.id).await.expect("get"), None);
    assert!(store.stack_rollouts().await.expect("all").is_empty());
}

async fn edge_stacks_crud_with_unique_names(b: &dyn Backend) {
    let store = b.open().await;
    assert!(store.list_edge_stacks().await.expect("list").is_empty());
    let web = store
        .create_edge_stack(&edge_stack("web", &[1, 2]), "services: {}")
        .await
        .expect("create");
    assert!(web.id > 0);
    assert_eq!(web.version, 1);
    assert_eq!(web.edge_group_ids, vec![1, 2]);
    let dup = store.create_edge_stack(&edge_stack("web", &[]), "x").await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    let db = store
        .create_edge_stack(&edge_stack("db", &[]), "db: {}")
        .await
        .expect("create");
    assert!(db.id > web.id);
    assert_eq!(
        store.edge_stack(web.id).await.expect("get"),
        Some(web.clone())
    );
    assert_eq!(store.edge_stack(9_999).await.expect("get"), None);
    assert_eq!(
        store.list_edge_stacks().await.expect("list"),
        vec![web.clone(), db.clone()]
    );

    // Targets and variables change; the name, the version and the file do not.
    let mut retarget = web.clone();
    retarget.edge_group_ids = vec![3];
    retarget.variables.clear();
    retarget.name = "renamed".into();
    retarget.version = 42;
    let updated = store
        .update_edge_stack(&retarget)
        .await
        .expect("update")
        .expect("present");
    assert_eq!(
        (
            updated.name.as_str(),
            updated.version,
            updated.edge_group_ids.as_slice()
        ),
        ("web", 1, &[3][..])
    );
    assert!(updated.variables.is_empty());
    assert_eq!(store.edge_stack(web.id).await.expect("get"), Some(updated));
    let mut ghost = web.clone();
    ghost.id = 9_999;
    assert_eq!(store.update_edge_stack(&ghost).await.expect("update"), None);

    // Deleted with its versions; its name is free again.
    assert!(store.delete_edge_stack(web.id).await.expect("delete"));
    assert!(!store.delete_edge_stack(web.id).await.expect("again"));
    assert_eq!(store.edge_stack(web.id).await.expect("get"), None);
    assert!(store
        .stack_versions(web.id)
        .await
        .expect("versions")
        .is_empty());
    let again = store
        .create_edge_stack(&edge_stack("web", &[]), "v1")
        .await
        .expect("the name is free");
    assert!(again.id > db.id, "ids are not reused");
    assert_eq!(
        store
            .stack_versions(again.id)
            .await
            .expect("versions")
            .len(),
        1
    );
}

async fn stack_versions_are_compare_and_set_kept_and_pruned(b: &dyn Backend) {
    let store = b.open().await;
    let stack = store
        .create_edge_stack(&edge_stack("web", &[1]), "file 1")
        .await
        .expect("create");
    let v2 = store
        .add_stack_version(stack.id, 1, "file 2", 1_800_000_000_500)
        .await
        .expect("add")
        .expect("present");
    assert_eq!(v2.version, 2);
    assert_eq!(v2.edge_group_ids, vec![1], "the rest stays");
    // Another change came first: refused, nothing added.
    let stale = store.add_stack_version(stack.id, 1, "lost", 1).await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
    assert_eq!(
        store
            .add_stack_version(9_999, 1, "x", 1)
            .await
            .expect("none"),
        None
    );
    let versions = store.stack_versions(stack.id).await.expect("versions");
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.version, v.compose.as_str(), v.created_ms))
            .collect::<Vec<_>>(),
        vec![
            (2, "file 2", 1_800_000_000_500),
            (1, "file 1", stack.created_ms)
        ]
    );
    assert_eq!(
        store
            .stack_version(stack.id, 1)
            .await
            .expect("get")
            .map(|v| v.compose),
        Some("file 1".to_owned())
    );
    assert_eq!(store.stack_version(stack.id, 3).await.expect("get"), None);

    // Concurrent new versions from the same base: exactly one wins.
    let tries = (0..8).map(|i| {
        let store = Arc::clone(&store);
        let id = stack.id;
        tokio::spawn(async move {
            store
                .add_stack_version(id, 2, &format!("race {i}"), 2)
                .await
        })
    });
    let mut won = 0;
    for t in tries {
        match t.await.expect("task") {
            Ok(Some(s)) => {
                assert_eq!(s.version, 3);
                won += 1;
            }
            Err(StoreError::Conflict(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(won, 1);

    // Past the bound the oldest go; the newest ones stay.
    let mut at = 3;
    while at < MAX_STACK_VERSIONS + 5 {
        store
            .add_stack_version(stack.id, at, &format!("file {}", at + 1), 3)
            .await
            .expect("add")
            .expect("present");
        at += 1;
    }
    let versions = store.stack_versions(stack.id).await.expect("versions");
    assert_eq!(versions.len(), MAX_STACK_VERSIONS as usize);
    assert_eq!(versions[0].version, at);
    assert_eq!(
        versions.last().map(|v| v.version),
        Some(at - MAX_STACK_VERSIONS + 1)
    );
    assert_eq!(store.stack_version(stack.id, 1).await.expect("get"), None);
}

fn status(env: u64, status: DeployStatus, version: u32, at: u64) -> StackStatus {
    StackStatus {
        env,
        status,
        version,
        error: (status == DeployStatus::Error).then(|| format!("pull of env {env} failed")),
        updated_ms: at,
    }
}

async fn stack_statuses_are_counted_paged_and_go_with_their_environment_or_stack(b: &dyn Backend) {
    use DeployStatus::{Error, Pending, Running};
    let store = b.open().await;
    let envs: Vec<u64> = store
        .create_environments((0..5).map(|i| new_env(&format!("e{i}"))).collect())
        .await
        .expect("create")
        .iter()
        .map(|e| e.id)
        .collect();
    let stack = store
        .create_edge_stack(&edge_stack("web", &[]), "v1")
        .await
        .expect("stack")
        .id;
    let counts = |v: &[(DeployStatus, u32, u64)]| -> Vec<StatusCount> {
        v.iter()
            .map(|&(status, version, count)| StatusCount {
                status,
                version,
                count,
            })
            .collect()
    };
    // A batch: unknown environments and stacks are dropped.
    let mut batch: Vec<StackStatus> = envs.iter().map(|&e| status(e, Pending, 1, 10)).collect();
    batch.push(status(9_999, Running, 1, 10));
    store
        .record_stack_statuses(stack, &batch)
        .await
        .expect("record");
    store
        .record_stack_statuses(9_999, &[status(envs[0], Running, 1, 10)])
        .await
        .expect("no such stack: nothing");
    assert_eq!(
        store.stack_status_counts(stack).await.expect("counts"),
        counts(&[(Pending, 1, 5)])
    );
    assert!(store
        .stack_status_counts(9_999)
        .await
        .expect("counts")
        .is_empty());
    // No page, only the total.
    assert_eq!(
        store
            .stack_statuses(stack, None, 0, 0)
            .await
            .expect("count"),
        (vec![], 5)
    );

    // Newer reports move the counts; an older one changes nothing.
    store
        .record_stack_statuses(
            stack,
            &[
                status(envs[0], Running, 1, 20),
                status(envs[1], Running, 1, 20),
                status(envs[2], Error, 2, 20),
                status(envs[1], Pending, 1, 15),
            ],
        )
        .await
        .expect("record");
    assert_eq!(
        store.stack_status_counts(stack).await.expect("counts"),
        counts(&[(Pending, 1, 2), (Running, 1, 2), (Error, 2, 1)])
    );

    // Pages, all or by status, by environment id, with totals.
    let (page, total) = store.stack_statuses(stack, None, 1, 2).await.expect("page");
    assert_eq!(total, 5);
    assert_eq!(
        page.iter().map(|s| s.env).collect::<Vec<_>>(),
        vec![envs[1], envs[2]]
    );
    let (errors, total) = store
        .stack_statuses(stack, Some(Error), 0, 10)
        .await
        .expect("page");
    assert_eq!(total, 1);
    assert_eq!(errors, vec![status(envs[2], Error, 2, 20)]);
    let (running, total) = store
        .stack_statuses(stack, Some(Running), 1, 10)
        .await
        .expect("page");
    assert_eq!((running.len(), total), (1, 2));
    assert_eq!(running[0].env, envs[1]);

    // Forgotten, deleted environment: out of the pages and the counts.
    store
        .forget_stack_statuses(stack, &[envs[3], 9_999])
        .await
        .expect("forget");
    assert!(store.delete_environment(envs[0]).await.expect("delete"));
    assert_eq!(
        store.stack_status_counts(stack).await.expect("counts"),
        counts(&[(Pending, 1, 1), (Running, 1, 1), (Error, 2, 1)])
    );
    let (all, total) = store
        .stack_statuses(stack, None, 0, 10)
        .await
        .expect("page");
    assert_eq!(total, 3);
    assert_eq!(
        all.iter().map(|s| s.env).collect::<Vec<_>>(),
        vec![envs[1], envs[2], envs[4]]
    );

    // A deleted stack takes every status with it; its environments stay.
    assert!(store.delete_edge_stack(stack).await.expect("delete"));
    assert!(store
        .stack_status_counts(stack)
        .await
        .expect("counts")
        .is_empty());
    assert_eq!(
        store
            .stack_statuses(stack, None, 0, 10)
            .await
            .expect("page"),
        (vec![], 0)
    );
    assert!(store.get_environment(envs[1]).await.expect("get").is_some());
    // ... and deleting an environment afterwards finds nothing left to undo.
    assert!(store.delete_environment(envs[1]).await.expect("delete"));
}
