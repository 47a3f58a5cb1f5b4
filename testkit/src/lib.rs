//! edgeplane's one test kit: every integration test and bench starts the real parts through
//! it instead of copying a harness.
//!
//! * [`redis::RedisServer`]: a throwaway `redis-server` on a free port.
//! * [`engine::Engine`]: Podman's Docker API service with a tiny local image;
//!   [`mini_engine`]: a few Docker API answers on plain TCP, for benches and load tests.
//! * [`control_plane::ControlPlane`] (in-process, on an actix system of its own) and
//!   [`control_plane::CpProcess`] (the real binary).
//! * [`gateway::GatewayProcess`]: the real `tunnel-gateway` binary.
//! * [`agent::Agent`]: the real edge agent, in-process.
//! * [`docker_cli::DockerCli`]: the real docker CLI pointed at an environment.
//! * [`cluster::Cluster`]: all of the above in one builder,
//!   `Cluster::new().redis().replicas(2).gateways(2).engine().agents(3).start()`.
//! * [`fake::FakeControlPlane`]: a scriptable fake control plane for fault injection on the
//!   agent side.
//! * [`api`]: admin calls (`create_env`, `get_env`, `docker_get`, `metric`, ...), [`cert`]: a
//!   shared self-signed certificate, [`wait`]: `eventually`, `bounded`, free ports,
//!   [`process`]: the workspace's binaries, [`bench`]: what benches share, [`stats`]:
//!   percentiles, summaries and trends of bench samples, [`hostile`]: what attackers do to a
//!   port (connections from a chosen source, TLS trusting anything), [`faults`]: faults under
//!   load (a replica killed, Redis stopped, a restart) as scenarios tests and benches share.
//!
//! Dev-only: it unwraps and panics freely, since a failure to set up is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod api;
pub mod bench;
pub mod cert;
pub mod cluster;
pub mod control_plane;
pub mod docker_cli;
pub mod engine;
pub mod fake;
pub mod faults;
pub mod gateway;
pub mod hostile;
pub mod mini_engine;
pub mod process;
pub mod redis;
pub mod stats;
pub mod wait;

pub use agent::Agent;
pub use api::{create_env, get_env, http, metric, ADMIN_KEY};
pub use cert::TestCert;
pub use cluster::Cluster;
pub use control_plane::{ControlPlane, CpProcess};
pub use docker_cli::DockerCli;
pub use engine::{Engine, IMAGE};
pub use gateway::{GatewayArgs, GatewayProcess};
pub use redis::RedisServer;
pub use wait::{bounded, eventually, free_port, until};

/// Logs of the parts under test on the test's output (shown for failing tests), filtered by
/// `RUST_LOG` (default: info, quieter for actix).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,actix_server=warn,actix_web=warn".into()),
        )
        .with_test_writer()
        .try_init();
}
