//! A whole deployment in one builder:
//!
//! ```text
//! let cluster = Cluster::new().redis().replicas(2).gateways(2).engine().agents(3).start().await;
//! let (status, body) = cluster.replica(1).docker_get(cluster.env(0), "/_ping").await;
//! ```
//!
//! Started in dependency order: Redis, one certificate for every replica and gateway (its
//! fingerprint is in join keys), the engine, the gateways (registered before any replica
//! serves, so the first credentials already name them all), the replicas (embedded gateways
//! only when no separate ones run), then one environment and one real agent per `agents`,
//! each `up` before `start` returns. Everything stops when the cluster is dropped.

use std::time::Duration;

use control_plane::config::Config;
use serde_json::json;
use store::redis::RedisStore;
use store::TunnelStore as _;

use crate::agent::Agent;
use crate::api::{create_env_key, get_env};
use crate::cert::TestCert;
use crate::control_plane::ControlPlane;
use crate::engine::Engine;
use crate::gateway::{GatewayArgs, GatewayProcess};
use crate::redis::RedisServer;
use crate::wait::eventually;

/// A `DOCKER_HOST` for agents of a cluster without an engine: the tunnel refuses streams,
/// check-ins work.
const NO_ENGINE: &str = "unix:///nonexistent/edgeplane-testkit.sock";

type Tweak = std::sync::Arc<dyn Fn(&mut Config) + Send + Sync>;

/// See the module docs.
#[must_use]
pub struct ClusterBuilder {
    redis: bool,
    replicas: usize,
    gateways: usize,
    agents: usize,
    engine: bool,
    checkin_interval: u32,
    lease: String,
    tweak: Option<Tweak>,
}

impl ClusterBuilder {
    /// Shared state in a real `redis-server` (needed by more than one replica, and by
    /// separate gateways).
    pub fn redis(mut self) -> Self {
        self.redis = true;
        self
    }

    /// Control-plane replicas, in-process (default 1).
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// Separate `tunnel-gateway` processes; the replicas then run no embedded gateway.
    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n;
        self
    }

    /// Environments, each with a real agent, `up` when `start` returns.
    pub fn agents(mut self, n: usize) -> Self {
        self.agents = n;
        self
    }

    /// Podman's Docker API as the agents' engine.
    pub fn engine(mut self) -> Self {
        self.engine = true;
        self
    }

    /// The agents' check-in interval in seconds (default 1).
    pub fn checkin_interval(mut self, secs: u32) -> Self {
        self.checkin_interval = secs;
        self
    }

    /// The gateways' lease (default `3s`: a killed gateway's records expire fast).
    pub fn lease(mut self, lease: &str) -> Self {
        self.lease = lease.to_owned();
        self
    }

    /// A change to every replica's configuration.
    pub fn configure(mut self, tweak: impl Fn(&mut Config) + Send + Sync + 'static) -> Self {
        self.tweak = Some(std::sync::Arc::new(tweak));
        self
    }

    pub async fn start(self) -> Cluster {
        assert!(self.replicas >= 1, "a cluster needs a replica");
        assert!(
            self.redis || (self.replicas == 1 && self.gateways == 0),
            "several replicas or separate gateways share state through Redis: add .redis()"
        );
        let redis = self.redis.then(RedisServer::start);
        let prefix = format!("edgeplane-test-{}:", uuid::Uuid::new_v4().simple());
        let cert = TestCert::generate();
        let engine = self.engine.then(Engine::start);

        let mut gateways = Vec::with_capacity(self.gateways);
        if let Some(redis) = &redis {
            for i in 0..self.gateways {
                let args = GatewayArgs {
                    id: format!("gw-{i}"),
                    port: 0,
                    redis_url: redis.url(),
                    redis_prefix: prefix.clone(),
                    cert: cert.cert.clone(),
                    key: cert.key.clone(),
                    lease: self.lease.clone(),
                    rust_log: "info".to_owned(),
                };
                gateways.push(GatewayProcess::start(&args).await);
            }
        }
        let observer = match &redis {
            Some(redis) => Some(
                RedisStore::connect(&redis.url(), &prefix)
                    .await
                    .expect("connect to redis as an observer"),
            ),
            None => None,
        };
        if let Some(store) = &observer {
            let mut want: Vec<String> = gateways.iter().map(|g| g.id.clone()).collect();
            want.sort();
            eventually(
                Duration::from_secs(10),
                "every gateway registered",
                || async {
                    let live = store.live_gateways().await.ok()?;
                    let mut ids: Vec<String> = live.into_iter().map(|g| g.id).collect();
                    ids.sort();
                    (ids == want).then_some(())
                },
            )
            .await;
        }

        let first_gateway = gateways.first().map(|g| g.listen.to_string());
        let mut replicas = Vec::with_capacity(self.replicas);
        for _ in 0..self.replicas {
            let mut builder = ControlPlane::builder().tls_files(&cert.cert, &cert.key);
            if let Some(redis) = &redis {
                builder = builder.redis(&redis.url(), &prefix);
            }
            if let Some(gw) = first_gateway.clone() {
                builder = builder.configure(move |c| {
                    c.embedded_gateway = false;
                    // The fallback when the list of live gateways is empty.
                    c.tunnel_public_addr = Some(gw);
                });
            }
            if let Some(tweak) = self.tweak.clone() {
                builder = builder.configure(move |c| tweak(c));
            }
            replicas.push(builder.start().await);
        }

        let docker_host = engine
            .as_ref()
            .map_or_else(|| NO_ENGINE.to_owned(), Engine::docker_host);
        let mut envs = Vec::with_capacity(self.agents);
        let mut agents = Vec::with_capacity(self.agents);
        for i in 0..self.agents {
            let body =
                json!({ "name": format!("agent-{i}"), "checkinInterval": self.checkin_interval });
            let (id, key) = create_env_key(&replicas[0].url, body).await;
            agents.push(Agent::standard(&key, &docker_host, "5m"));
            envs.push(Env { id, key });
        }
        for env in &envs {
            let url = &replicas[0].url;
            eventually(Duration::from_secs(30), "every agent up", || async {
                (get_env(url, env.id).await["status"] == "up").then_some(())
            })
            .await;
        }
        Cluster {
            agents,
            envs,
            replicas,
            gateways,
            observer,
            engine,
            cert,
            prefix,
            redis,
        }
    }
}

/// An environment of the cluster and its join key.
#[derive(Clone, Debug)]
pub struct Env {
    pub id: u64,
    pub key: String,
}

/// A running cluster; see the module docs. Fields are dropped (stopped) in order: agents
/// first, Redis last.
pub struct Cluster {
    pub agents: Vec<Agent>,
    pub envs: Vec<Env>,
    pub replicas: Vec<ControlPlane>,
    pub gateways: Vec<GatewayProcess>,
    /// A store client of the cluster's own, for looking at shared state.
    pub observer: Option<RedisStore>,
    pub engine: Option<Engine>,
    pub cert: TestCert,
    /// The Redis key prefix every part of this cluster shares.
    pub prefix: String,
    pub redis: Option<RedisServer>,
}

impl Cluster {
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> ClusterBuilder {
        ClusterBuilder {
            redis: false,
            replicas: 1,
            gateways: 0,
            agents: 0,
            engine: false,
            checkin_interval: 1,
            lease: "3s".to_owned(),
            tweak: None,
        }
    }

    pub fn replica(&self, i: usize) -> &ControlPlane {
        &self.replicas[i]
    }

    /// The id of the `i`-th environment (the one of the `i`-th agent).
    pub fn env(&self, i: usize) -> u64 {
        self.envs[i].id
    }

    pub fn gateway(&self, id: &str) -> Option<&GatewayProcess> {
        self.gateways.iter().find(|g| g.id == id)
    }

    pub fn gateway_mut(&mut self, id: &str) -> Option<&mut GatewayProcess> {
        self.gateways.iter_mut().find(|g| g.id == id)
    }

    /// Ids of the gateways registered in the store now, sorted.
    pub async fn live_gateway_ids(&self) -> Vec<String> {
        let Some(store) = &self.observer else {
            return Vec::new();
        };
        let mut ids: Vec<String> = store
            .live_gateways()
            .await
            .map(|g| g.into_iter().map(|g| g.id).collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }
}
