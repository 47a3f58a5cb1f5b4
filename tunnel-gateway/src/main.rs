//! `tunnel-gateway`: parses flags and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// edgeplane tunnel gateway: terminates agents' reverse tunnels (not implemented yet).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Tunnel listener.
    #[arg(long, env = "EDGEPLANE_LISTEN", default_value = "0.0.0.0:8000")]
    listen: SocketAddr,
    /// Shared state of the cluster.
    #[arg(long, env = "EDGEPLANE_REDIS_URL")]
    redis_url: String,
    /// Certificate shared by all gateways (its fingerprint is in join keys).
    #[arg(long, env = "EDGEPLANE_TLS_CERT")]
    tls_cert: PathBuf,
    #[arg(long, env = "EDGEPLANE_TLS_KEY")]
    tls_key: PathBuf,
    /// Plain-HTTP listener for /metrics, /healthz, /readyz.
    #[arg(long, env = "EDGEPLANE_METRICS_ADDR", default_value = "127.0.0.1:9091")]
    metrics_addr: SocketAddr,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let config = tunnel_gateway::Config {
        listen: cli.listen,
        redis_url: cli.redis_url,
        tls_cert: cli.tls_cert,
        tls_key: cli.tls_key,
        metrics_addr: cli.metrics_addr,
    };
    if let Err(e) = tunnel_gateway::run(config).await {
        eprintln!("tunnel-gateway: {e}");
        std::process::exit(2);
    }
}
