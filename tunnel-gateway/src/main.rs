//! `tunnel-gateway`: parses flags and environment, then hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

// As in the control plane: jemalloc's background thread gives memory back after bursts of
// TLS handshakes, also while the process is idle; it serves C code's malloc (aws-lc) too and
// runs without thread caches (.cargo/config.toml).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// edgeplane tunnel gateway: terminates agents' reverse tunnels (cluster mode, shared Redis).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Tunnel listener (agents and control-plane dial sessions).
    #[arg(long, env = "EDGEPLANE_LISTEN", default_value = "0.0.0.0:8000")]
    listen: SocketAddr,
    /// Shared state of the cluster (the control plane's --redis-url).
    #[arg(long, env = "EDGEPLANE_REDIS_URL", hide_env_values = true)]
    redis_url: String,
    /// Prefix of every Redis key; must equal the control plane's --redis-prefix.
    #[arg(long, env = "EDGEPLANE_REDIS_PREFIX", default_value = tunnel_gateway::DEFAULT_REDIS_PREFIX)]
    redis_prefix: String,
    /// Certificate (PEM) shared by all gateways; its fingerprint is in join keys.
    #[arg(long, env = "EDGEPLANE_TLS_CERT")]
    tls_cert: PathBuf,
    /// Private key of --tls-cert (PEM).
    #[arg(long, env = "EDGEPLANE_TLS_KEY")]
    tls_key: PathBuf,
    /// Plain-HTTP listener for /metrics, /healthz, /readyz.
    #[arg(long, env = "EDGEPLANE_METRICS_ADDR", default_value = "127.0.0.1:9445")]
    metrics_addr: SocketAddr,
    /// Unique id of this gateway. Default: <hostname>-<6 random hex chars>.
    #[arg(long, env = "EDGEPLANE_ID")]
    id: Option<String>,
    /// HOST:PORT agents connect to. Default: --listen, an unspecified IP replaced by the hostname.
    #[arg(long, env = "EDGEPLANE_PUBLIC_ADDR")]
    public_addr: Option<String>,
    /// HOST:PORT control-plane replicas connect to. Default: --public-addr.
    #[arg(long, env = "EDGEPLANE_DIAL_ADDR")]
    dial_addr: Option<String>,
    /// Lease of tunnel locations and of this gateway's registration (renewed every third).
    #[arg(long, env = "EDGEPLANE_LEASE", default_value = "15s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Tunnels this gateway holds at most; over it agents are told to try later.
    #[arg(long, env = "EDGEPLANE_MAX_TUNNELS", default_value_t = gateway::DEFAULT_MAX_TUNNELS)]
    max_tunnels: usize,
    /// Connections held at once. Default: the open-file limit less 512.
    #[arg(long, env = "EDGEPLANE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Connections one source address (an IPv6 /64) holds at once. Default: 8192.
    #[arg(long, env = "EDGEPLANE_MAX_CONNECTIONS_PER_SOURCE")]
    max_connections_per_source: Option<usize>,
}

impl Cli {
    fn into_config(self) -> tunnel_gateway::Config {
        let public_addr = self
            .public_addr
            .unwrap_or_else(|| tunnel_gateway::default_public_addr(self.listen));
        tunnel_gateway::Config {
            listen: self.listen,
            redis_url: self.redis_url,
            redis_prefix: self.redis_prefix,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            metrics_addr: self.metrics_addr,
            id: self.id.unwrap_or_else(tunnel_gateway::default_id),
            dial_addr: self.dial_addr.unwrap_or_else(|| public_addr.clone()),
            public_addr,
            lease: self.lease,
            max_tunnels: self.max_tunnels,
            admission: gateway::admission::AdmissionLimits::configured(
                self.max_connections,
                self.max_connections_per_source,
            ),
        }
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Cli::parse().into_config();
    let prepared = match tunnel_gateway::prepare(config).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tunnel-gateway: {e}");
            std::process::exit(2);
        }
    };
    let gw = prepared.gateway.config();
    println!(
        "edgeplane tunnel gateway {version}: id {id}, listening on {listen}, agents connect to {public}, \
         replicas dial {dial}, certificate fingerprint {fp}, metrics http://{metrics}/metrics",
        version = env!("CARGO_PKG_VERSION"),
        id = gw.id,
        listen = prepared.gateway.local_addr(),
        public = gw.public_addr,
        dial = gw.dial_addr,
        fp = hex::encode(prepared.fingerprint),
        metrics = prepared.metrics_addr,
    );
    prepared.serve(shutdown_signal()).await;
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only ctrl-c stops the gateway");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
