//! Shared by the tests that run the load test against the real control plane.

use std::net::TcpListener;
use std::time::Duration;

/// Starts a real control plane on its own actix system thread; returns its URL and a stopper.
pub fn start_control_plane(
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
                    tunnel: Some(TcpListener::bind("127.0.0.1:0").expect("bind tunnel")),
                },
            )
            .await
            .expect("prepare");
            let _ = ready_tx.send(());
            let stop = async move {
                // Poll the std channel without blocking the actix thread.
                while stop_rx.try_recv().is_err() {
                    actix_rt::time::sleep(Duration::from_millis(50)).await;
                }
            };
            prepared.serve(stop).await.expect("serve");
        });
    });
    ready_rx.recv().expect("control plane prepared");
    (url, stop_tx, thread)
}
