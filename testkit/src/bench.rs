//! What benches share: whether this is a real measurement, and threads with a runtime of
//! their own.

use std::future::Future;

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
