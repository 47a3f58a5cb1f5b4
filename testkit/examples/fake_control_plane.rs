//! Runs the fake control plane of `testkit::fake` until Ctrl-C, for trying the agent or
//! the load test without the real server:
//!
//! ```text
//! cargo run -p edgeplane-testkit --example fake_control_plane
//! ```

use std::time::Duration;

use testkit::fake::FakeControlPlane;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cp = FakeControlPlane::start().await?;
    cp.set_recording(false);
    let (_, token) = cp.create_env(5);
    println!("url      {}", cp.url);
    println!("api key  {}", cp.api_key);
    println!("edge key {}", token.encode());
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => eprintln!(
                "environments {}, check-ins {}, connections {}",
                cp.env_count(),
                cp.seen_count(),
                cp.connections()
            ),
        }
    }
    Ok(())
}
