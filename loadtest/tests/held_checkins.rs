//! `--held` against the real control plane (in-process, embedded store): simulated agents
//! check in on `/edge/h`, the server really holds their idle answers, and each agent still
//! sends one check-in per interval (the next one is due one interval after the previous one
//! was sent, not after its answer).

use clap::Parser as _;
use loadtest::cli::Args;
use testkit::{ControlPlane, ADMIN_KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_checkins_are_held_and_sent_once_per_interval() {
    const AGENTS: u64 = 8;
    const INTERVAL_MS: u64 = 1000;
    const WINDOW_MS: u64 = 8000;
    /// The server holds an idle check-in for the interval minus 250 ms.
    const HOLD_MS: u64 = INTERVAL_MS - 250;
    // As the binary runs it: one API worker per core.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let cp = ControlPlane::builder().workers(workers).start().await;
    let url = cp.url.clone();
    let pid = std::process::id().to_string();
    let args = Args::try_parse_from([
        "loadtest",
        "--target",
        &url,
        "--api-key",
        ADMIN_KEY,
        "--insecure",
        "--agents",
        &AGENTS.to_string(),
        "--duration",
        &(WINDOW_MS / 1000).to_string(),
        "--interval",
        &(INTERVAL_MS / 1000).to_string(),
        "--ramp",
        "1",
        "--server-pid",
        &pid,
        "--held",
    ])
    .expect("args");
    let report = loadtest::run(args).await.expect("run");
    eprintln!("{}", report.human());
    cp.stop().await;

    assert!(report.held);
    assert_eq!(report.agents, AGENTS);
    assert_eq!(report.connected_agents, AGENTS);
    assert_eq!(report.errors, 0, "{:?}", report.errors_by_kind);
    // A check-in counts when it was sent and answered inside the window, so each agent's are
    // sent within a span of window - hold = 7.25 s: one per interval is 7 or 8 per agent.
    // Scheduling from the answer instead of the send time (a period of interval + hold) would
    // give at most 5, sending the next one as soon as an answer came (a period of the hold) at
    // least 9. (Answers that were not held would not change the count: the latency says.)
    // One fewer per agent is tolerated: timers firing late on a loaded machine.
    let span = (WINDOW_MS - HOLD_MS) as f64 / INTERVAL_MS as f64;
    let least = AGENTS * (span.floor() as u64 - 1);
    let most = AGENTS * span.ceil() as u64;
    assert!(
        (least..=most).contains(&report.polls),
        "polls {} (expected {least}..={most})",
        report.polls
    );
    // The server held every idle answer for the whole hold, and answered it before the next
    // check-in was due.
    assert_eq!(report.held_early_answers, Some(0));
    let l = &report.poll_latency_ms;
    assert!(
        l.p50 >= HOLD_MS as f64 && l.max < INTERVAL_MS as f64,
        "latency {l:?}, hold {HOLD_MS} ms"
    );
    let over = report
        .hold_overshoot_ms
        .expect("hold overshoot with --held");
    assert!(over.max < (INTERVAL_MS - HOLD_MS) as f64, "{over:?}");
    // The same bytes as plain polling: one small request and one 204 per interval (about 190 B
    // per check-in at a 1 s interval; see real_control_plane.rs), and no reconnects.
    assert!(
        report.bytes_per_agent_per_sec > 100.0 && report.bytes_per_agent_per_sec < 300.0,
        "{}",
        report.bytes_per_agent_per_sec
    );
    assert_eq!(report.steady_reconnects, 0);
    assert!(report.notes.iter().any(|n| n.starts_with("held:")));
}
