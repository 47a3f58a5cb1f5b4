//! What the benches share: threads with their own runtime, and the control plane in-process
//! on its own actix system thread (embedded store and gateway).
#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

pub const ADMIN_KEY: &str = "bench-admin-key-0123456789";

/// Whether this is a real `cargo bench` run. `cargo test --all-targets` runs bench targets
/// too (without `--bench`): a full measurement there would cost minutes of CI for nothing.
pub fn measuring() -> bool {
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench {
        println!("skipped: run with `cargo bench` to measure");
    }
    bench
}

/// Runs `f` on a new thread with its own current-thread runtime.
pub fn on_thread<F, Fut>(name: &str, f: F) -> std::thread::JoinHandle<Fut::Output>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future,
    Fut::Output: Send + 'static,
{
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f())
        })
        .expect("spawn thread")
}

// ---------------------------------------------------------------------------------------------
// The control plane, in-process on its own actix system thread

pub struct ControlPlane {
    pub url: String,
    pub metrics_url: String,
    pub stop: std::sync::mpsc::Sender<()>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Starts the control plane; `public_url` overrides the URL put into join keys (e.g. a
/// byte-counting proxy in front of it).
pub fn start_control_plane_at(
    dir: &Path,
    workers: usize,
    api: TcpListener,
    public_url: Option<String>,
) -> ControlPlane {
    let metrics = TcpListener::bind("127.0.0.1:0").expect("bind metrics");
    let tunnel = TcpListener::bind("127.0.0.1:0").expect("bind tunnel");
    let url = format!("https://127.0.0.1:{}", api.local_addr().unwrap().port());
    let metrics_url = format!("http://{}", metrics.local_addr().unwrap());
    let mut config = control_plane::config::Config::new(dir.to_owned());
    config.public_url = Some(public_url.unwrap_or_else(|| url.clone()));
    config.admin_api_key = Some(ADMIN_KEY.into());
    config.limits.workers = workers;
    let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("cp-system".into())
        .spawn(move || {
            actix_rt::System::new().block_on(async move {
                let prepared = control_plane::prepare(
                    config,
                    control_plane::Listeners {
                        api,
                        metrics,
                        tunnel: Some(tunnel),
                    },
                )
                .await
                .expect("prepare");
                let _ = ready_tx.send(());
                let stop = async move {
                    while stop_rx.try_recv() == Err(std::sync::mpsc::TryRecvError::Empty) {
                        actix_rt::time::sleep(Duration::from_millis(50)).await;
                    }
                };
                prepared.serve(stop).await.expect("serve");
            });
        })
        .expect("spawn control plane");
    ready_rx.recv().expect("control plane prepared");
    ControlPlane {
        url,
        metrics_url,
        stop,
        thread,
    }
}

pub fn start_control_plane(dir: &Path, workers: usize) -> ControlPlane {
    let api = TcpListener::bind("127.0.0.1:0").expect("bind api");
    start_control_plane_at(dir, workers, api, None)
}
