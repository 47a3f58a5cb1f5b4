#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Faults under load, small (the bench `faults` runs the same scenarios at 10,000 agents):
//! the real control-plane binaries on a real Redis, a few hundred agents of the real
//! `loadtest` binary with held check-ins.

use std::time::Duration;

use testkit::faults::{self, Outcome, Scale};

/// One scenario at a time: each is about timing (agents back within two intervals), which
/// three scenarios' processes sharing two cores would blur.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn assert_held(outcome: &Outcome) {
    assert!(
        outcome.problems.is_empty(),
        "{}: {:#?}\nfigures: {:#}",
        outcome.name,
        outcome.problems,
        outcome.figures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_loses_no_agent_and_no_binding() {
    let _turn = ONE_AT_A_TIME.lock().await;
    assert_held(&faults::replica_kill(Scale::small(), 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_ins_go_on_while_redis_is_down_and_nothing_is_lost() {
    let _turn = ONE_AT_A_TIME.lock().await;
    assert_held(&faults::redis_outage(Scale::small(), Duration::from_secs(8)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_load_costs_no_error_once_the_new_process_is_ready() {
    let _turn = ONE_AT_A_TIME.lock().await;
    assert_held(&faults::restart(Scale::small()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_of_a_killed_gateway_come_back_through_another() {
    let _turn = ONE_AT_A_TIME.lock().await;
    assert_held(&faults::gateway_kill(Scale::small(), 100).await);
}
