//! Faults under load at fleet scale (issue 11): the scenarios of `testkit::faults` (which the
//! test suite runs with a few hundred agents) with the real release binaries and 10,000
//! agents with held check-ins at 5 s.
//!
//!     scripts/faults                                   # all, 10,000 agents
//!     FAULTS_ONLY=replica_kill,restart FAULTS_AGENTS=15000 cargo bench -p control-plane --bench faults
//!
//! Settings (`FAULTS_<NAME>` or `--name`): `only` (replica_kill, redis_outage, restart,
//! gateway_kill), `agents` (10000), `interval` (5 s), `ramp` (20 s), `observe` (30 s: how long
//! the fleet is watched after the fault), `outage` (30 s, Redis down), `replicas` (3, for
//! replica_kill), `tunnels` (1000: open through the gateway that gateway_kill kills).
//! Each scenario prints one JSON line with its figures and the problems it saw against its
//! goal (none when the goal held).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use testkit::bench::{measuring, number, settings};
use testkit::faults::{self, Scale};

fn main() {
    if !measuring() {
        return;
    }
    let given = settings("FAULTS_");
    let scale = Scale {
        agents: number(&given, "agents", 10_000),
        interval: number(&given, "interval", 5),
        ramp: Duration::from_secs(number(&given, "ramp", 20)),
        observe: Duration::from_secs(number(&given, "observe", 30)),
    };
    let outage = Duration::from_secs(number(&given, "outage", 30));
    let replicas = number(&given, "replicas", 3) as usize;
    let tunnels = number(&given, "tunnels", 1000) as usize;
    let only: Vec<String> = given
        .get("only")
        .map(|s| s.split(',').map(|s| s.trim().to_owned()).collect())
        .unwrap_or_else(|| {
            ["replica_kill", "redis_outage", "restart", "gateway_kill"]
                .map(str::to_owned)
                .to_vec()
        });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut failed = 0;
    for name in &only {
        eprintln!("== {name}: {} agents at {} s", scale.agents, scale.interval);
        let outcome = rt.block_on(async {
            match name.as_str() {
                "replica_kill" => faults::replica_kill(scale, replicas).await,
                "redis_outage" => faults::redis_outage(scale, outage).await,
                "restart" => faults::restart(scale).await,
                "gateway_kill" => faults::gateway_kill(scale, tunnels).await,
                other => panic!("unknown scenario {other:?}"),
            }
        });
        if !outcome.problems.is_empty() {
            failed += 1;
        }
        eprintln!(
            "{name}: {}",
            if outcome.problems.is_empty() {
                "goal held".to_owned()
            } else {
                format!("PROBLEMS {:?}", outcome.problems)
            }
        );
        println!("{}", outcome.to_json());
    }
    eprintln!(
        "{} of {} scenarios held their goal",
        only.len() - failed,
        only.len()
    );
}
