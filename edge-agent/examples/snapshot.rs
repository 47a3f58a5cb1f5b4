//! Takes one snapshot of the engine at `DOCKER_HOST` (default `unix:///var/run/docker.sock`)
//! the way the agent does, and prints it as JSON, for checking an engine by hand:
//!
//! ```text
//! DOCKER_HOST=unix:///tmp/pe/docker.sock cargo run -p edge-agent --example snapshot
//! ```

use edge_agent::docker::{DockerClient, DockerHost};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let raw = std::env::var("DOCKER_HOST")
        .unwrap_or_else(|_| edge_agent::config::DEFAULT_DOCKER_HOST.to_owned());
    let host = DockerHost::parse(&raw)?;
    let snap = DockerClient::new(host)
        .snapshot(edge_agent::clock::unix_now_ms())
        .await?;
    let compressed = proto::snapshot::compress(&snap)?;
    println!("{}", serde_json::to_string_pretty(&snap)?);
    eprintln!("{} bytes compressed", compressed.len());
    Ok(())
}
