//! The load test against the real control plane (in-process, embedded store): the harness
//! measures what it claims on the real thing, not only on the fake.

use clap::Parser as _;
use loadtest::cli::Args;
use testkit::{ControlPlane, ADMIN_KEY};

/// Runs the load test on a fresh in-process control plane: `agents` at a 1 s interval, a 1 s
/// ramp and a 3 s window, with `extra` flags.
async fn run(agents: u64, extra: &[&str]) -> loadtest::report::Report {
    // As the binary runs it: one API worker per core.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let cp = ControlPlane::builder().workers(workers).start().await;
    let url = cp.url.clone();
    let pid = std::process::id().to_string();
    let agents = agents.to_string();
    let mut args = vec![
        "loadtest",
        "--target",
        &url,
        "--api-key",
        ADMIN_KEY,
        "--insecure",
        "--agents",
        &agents,
        "--duration",
        "3",
        "--interval",
        "1",
        "--ramp",
        "1",
        "--server-pid",
        &pid,
    ];
    args.extend_from_slice(extra);
    let report = loadtest::run(Args::try_parse_from(args).expect("args"))
        .await
        .expect("run");
    cp.stop().await;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measures_the_real_control_plane() {
    let report = run(200, &[]).await;
    assert_eq!(report.agents, 200);
    assert_eq!(report.connected_agents, 200);
    assert_eq!(report.errors, 0, "{:?}", report.errors_by_kind);
    // 200 agents at 1 s over a 3 s window.
    assert!(
        (400..=800).contains(&report.polls),
        "polls {}",
        report.polls
    );
    // Steady check-ins are answered 204 with a tiny body: between 100 and 300 B per agent-second
    // at a 1 s interval (about 190 B per check-in), and never a handshake per poll.
    assert!(
        report.bytes_per_agent_per_sec > 100.0 && report.bytes_per_agent_per_sec < 300.0,
        "{}",
        report.bytes_per_agent_per_sec
    );
    assert_eq!(report.steady_reconnects, 0);
    assert!(report.server_cpu_seconds.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measures_async_agents_on_the_real_control_plane() {
    let report = run(100, &["--mode", "async"]).await;
    assert_eq!(report.mode, "async");
    assert_eq!(report.connected_agents, 100);
    assert_eq!(report.errors, 0, "{:?}", report.errors_by_kind);
    // 100 agents at 1 s over a 3 s window: one merged tick per agent-second.
    assert!(
        (200..=400).contains(&report.polls),
        "polls {}",
        report.polls
    );
    // Steady ticks carry an unchanged snapshot (a digest) and a command fetch: a few hundred
    // bytes per tick on the wire, never a full snapshot (about 1 KB) again.
    assert!(
        report.bytes_per_agent_per_sec > 100.0 && report.bytes_per_agent_per_sec < 400.0,
        "{}",
        report.bytes_per_agent_per_sec
    );
    assert_eq!(report.steady_reconnects, 0);
}
