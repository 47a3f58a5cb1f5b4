//! The load test against the real control plane (in-process, embedded store): the harness
//! measures what it claims on the real thing, not only on the fake.

use std::net::TcpListener;

use clap::Parser as _;
use loadtest::cli::Args;

/// Starts a real control plane on its own actix system thread; returns its URL and a stopper.
fn start_control_plane(
    dir: &std::path::Path,
) -> (
    String,
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let api = TcpListener::bind("127.0.0.1:0").expect("bind");
    let metrics = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = api.local_addr().expect("addr").port();
    let url = format!("https://127.0.0.1:{port}");
    let mut config = control_plane::config::Config::new(dir.to_owned());
    config.public_url = Some(url.clone());
    config.admin_api_key = Some("lt-key".into());
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let prepared = control_plane::prepare(
                config,
                control_plane::Listeners {
                    api,
                    metrics,
                    tunnel: Some(std::net::TcpListener::bind("127.0.0.1:0").expect("bind tunnel")),
                },
            )
            .await
            .expect("prepare");
            let _ = ready_tx.send(());
            let stop = async move {
                // Poll the std channel without blocking the actix thread.
                while stop_rx.try_recv().is_err() {
                    actix_rt::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            };
            prepared.serve(stop).await.expect("serve");
        });
    });
    ready_rx.recv().expect("control plane prepared");
    (url, stop_tx, thread)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measures_the_real_control_plane() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, stop, thread) = start_control_plane(dir.path());
    let pid = std::process::id().to_string();
    let args = Args::try_parse_from([
        "loadtest",
        "--target",
        &url,
        "--api-key",
        "lt-key",
        "--insecure",
        "--agents",
        "200",
        "--duration",
        "3",
        "--interval",
        "1",
        "--ramp",
        "1",
        "--server-pid",
        &pid,
    ])
    .expect("args");
    let report = loadtest::run(args).await.expect("run");
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
    let _ = stop.send(());
    thread.join().expect("control plane thread");
}
