//! The load test end to end against the fake control plane of `testkit::fake`.

use clap::Parser as _;
use loadtest::cli::Args;
use loadtest::report::Report;
use testkit::fake::FakeControlPlane;

fn args(cp: &FakeControlPlane, extra: &[&str]) -> Args {
    let base = [
        "loadtest",
        "--target",
        &cp.url,
        "--api-key",
        &cp.api_key,
        "--insecure",
        "--agents",
        "20",
        "--duration",
        "2",
        "--interval",
        "1",
        "--ramp",
        "1",
    ];
    Args::try_parse_from(base.iter().chain(extra.iter())).expect("args")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_run_reports_and_cleans_up() {
    let cp = FakeControlPlane::start().await.expect("fake");
    let pid = std::process::id().to_string();
    let report = loadtest::run(args(&cp, &["--server-pid", &pid]))
        .await
        .expect("run");
    assert_eq!(report.agents, 20);
    assert_eq!(report.connected_agents, 20);
    assert_eq!(report.errors, 0, "{:?}", report.errors_by_kind);
    // 20 agents at 1 s for a 2 s window: about 40 polls (window edges make it 20..=60).
    assert!((20..=60).contains(&report.polls), "polls {}", report.polls);
    assert!(report.polls_per_sec > 5.0);
    assert!(report.poll_latency_ms.p99 > 0.0);
    assert!(report.poll_latency_ms.max >= report.poll_latency_ms.p50);
    // A kept-alive poll is a few hundred bytes; a handshake is more than one.
    assert!(
        report.bytes_per_agent_per_sec > 50.0 && report.bytes_per_agent_per_sec < 1000.0,
        "{}",
        report.bytes_per_agent_per_sec
    );
    assert!(report.handshake_bytes_per_agent > 500.0);
    assert_eq!(report.steady_reconnects, 0);
    assert!(report.server_rss_bytes.is_some() && report.server_rss_bytes_before.is_some());
    assert!(report.server_cpu_seconds.is_some());
    assert!(report.create_secs >= 0.0);
    assert_eq!(report.interval_secs, 1);
    // Every environment was bound by its own agent, then deleted.
    assert_eq!(cp.deleted().len(), 20);
    assert_eq!(cp.env_count(), 0);
    let seen = cp.seen();
    assert!(seen.iter().all(|s| s.status == 200 || s.status == 204));
    assert!(seen
        .iter()
        .all(|s| s.header_names == ["host", "content-length"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_leaves_environments() {
    let cp = FakeControlPlane::start().await.expect("fake");
    let mut a = args(&cp, &["--keep"]);
    a.agents = Some(3);
    a.duration = Some(1);
    let report = loadtest::run(a).await.expect("run");
    assert_eq!(report.agents, 3);
    assert_eq!(cp.env_count(), 3);
    assert!(cp.deleted().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_api_key_fails_clearly() {
    let cp = FakeControlPlane::start().await.expect("fake");
    let mut a = args(&cp, &[]);
    a.api_key = Some("wrong".into());
    let err = loadtest::run(a).await.expect_err("refused");
    let text = format!("{err:#}");
    assert!(text.contains("401"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_merge_their_results() {
    let cp = FakeControlPlane::start().await.expect("fake");
    let dir = tempfile::tempdir().expect("tempdir");
    let report_path = dir.path().join("report.json");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "--target",
            &cp.url,
            "--api-key",
            &cp.api_key,
            "--insecure",
            "--agents",
            "10",
            "--duration",
            "2",
            "--interval",
            "1",
            "--ramp",
            "1",
            "--workers",
            "2",
            "--report",
        ])
        .arg(&report_path)
        .output()
        .await
        .expect("loadtest runs");
    assert!(
        child.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&child.stderr)
    );
    let report: Report =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report file")).expect("json");
    assert_eq!(report.workers, 2);
    assert_eq!(report.agents, 10);
    assert_eq!(report.connected_agents, 10);
    assert_eq!(report.errors, 0, "{:?}", report.errors_by_kind);
    assert!(report.polls >= 10, "polls {}", report.polls);
    assert!(report.poll_latency_ms.p99 > 0.0);
    assert!(report.handshake_bytes_per_agent > 500.0);
    assert_eq!(cp.deleted().len(), 10);
    let stdout = String::from_utf8_lossy(&child.stdout);
    assert!(stdout.contains("polls"), "{stdout}");
}
