//! `control-plane`: parses flags and environment, then hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use control_plane::bootstrap::AdminKeySource;
use control_plane::config::{Config, TlsSource};
use control_plane::{open_store, prepare_on, Listeners, Prepared};

// jemalloc with its background thread: memory freed after a burst (thousands of TLS
// handshakes, an attack's connections) goes back to the OS within 10-20 s even while the
// server is idle. glibc's malloc keeps it; mimalloc purges a thread's freed pages only when
// that thread allocates again, so an idle worker kept tens of MiB after an attack. jemalloc
// also serves C code's malloc (the workspace enables `unprefixed_malloc_on_supported_platforms`:
// aws-lc's handshake allocations in glibc's per-thread arenas kept ~3 MiB after the first
// burst), and runs without thread caches (`.cargo/config.toml`: what an idle thread cached
// stayed cached). See docs/benchmarks.md, "Hostile clients against the real binary".
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's counts for `/metrics`: what the program holds against what is resident.
fn jemalloc_stats() -> Option<control_plane::metrics::AllocatorStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // The counts are cached per epoch: advancing it refreshes them.
    epoch::advance().ok()?;
    let read = |r: tikv_jemalloc_ctl::Result<usize>| r.ok().map(|v| v as u64);
    Some(control_plane::metrics::AllocatorStats {
        allocated: read(stats::allocated::read())?,
        active: read(stats::active::read())?,
        resident: read(stats::resident::read())?,
        metadata: read(stats::metadata::read())?,
        mapped: read(stats::mapped::read())?,
        retained: read(stats::retained::read())?,
    })
}

/// edgeplane control plane: admin REST API and agent check-ins over HTTPS.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Embedded store, generated TLS material and the admin key live here.
    #[arg(long, env = "EDGEPLANE_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// HTTPS listener: admin REST API and agent API.
    #[arg(long, env = "EDGEPLANE_API_ADDR", default_value = "0.0.0.0:9443")]
    api_addr: SocketAddr,
    /// The URL agents are told to call (goes into join keys). Default: https://<hostname>:<api port>.
    #[arg(long, env = "EDGEPLANE_PUBLIC_URL")]
    public_url: Option<String>,
    /// Listener of the embedded tunnel gateway (single-node mode).
    #[arg(long, env = "EDGEPLANE_TUNNEL_ADDR", default_value = "0.0.0.0:8000")]
    tunnel_addr: SocketAddr,
    /// Tunnel address put into join keys. Default: host of --public-url, port of --tunnel-addr.
    #[arg(long, env = "EDGEPLANE_TUNNEL_PUBLIC_ADDR")]
    tunnel_public_addr: Option<String>,
    /// Run no tunnel listener: separate tunnel-gateway processes serve tunnels.
    #[arg(long, env = "EDGEPLANE_NO_EMBEDDED_GATEWAY")]
    no_embedded_gateway: bool,
    /// Keep all shared state in Redis (cluster mode); without it the embedded store serves.
    #[arg(long, env = "EDGEPLANE_REDIS_URL")]
    redis_url: Option<String>,
    /// Prefix of every Redis key.
    #[arg(long, env = "EDGEPLANE_REDIS_PREFIX", default_value = "edgeplane:")]
    redis_prefix: String,
    /// API certificate (PEM); without it a self-signed one is generated into the data dir.
    #[arg(long, env = "EDGEPLANE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, env = "EDGEPLANE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Plain-HTTP listener for /metrics, /metrics/agents, /healthz, /readyz.
    #[arg(long, env = "EDGEPLANE_METRICS_ADDR", default_value = "127.0.0.1:9444")]
    metrics_addr: SocketAddr,
    /// Shared secret agents must also hold (AGENT_SECRET is read too).
    #[arg(long, env = "EDGEPLANE_AGENT_SECRET", hide_env_values = true)]
    agent_secret: Option<String>,
    /// Agent image named in install commands.
    #[arg(long, env = "EDGEPLANE_AGENT_IMAGE")]
    agent_image: Option<String>,
    /// Share the API port with other control-plane processes of this node (SO_REUSEPORT):
    /// one process holds at most its open-file limit of agents, so a node runs several, on
    /// one Redis like any replicas; the kernel spreads agents' connections over them. Each
    /// keeps its own --metrics-addr and --tunnel-addr (or runs --no-embedded-gateway).
    #[arg(long, env = "EDGEPLANE_REUSE_PORT")]
    reuse_port: bool,
    /// HTTP keep-alive for agent connections, seconds (must exceed check-in intervals).
    #[arg(long, env = "EDGEPLANE_KEEP_ALIVE", default_value_t = 120)]
    keep_alive: u64,
    /// HTTP worker threads (default: one per core).
    #[arg(long, env = "EDGEPLANE_WORKERS")]
    workers: Option<usize>,
    /// How long a Docker API request waits for the agent's tunnel before answering 504.
    #[arg(long, env = "EDGEPLANE_TUNNEL_WAIT", default_value = "15s", value_parser = humantime::parse_duration)]
    tunnel_wait: std::time::Duration,
    /// How long an engine connection through a tunnel is kept idle for the next Docker call
    /// to the same environment (0: none kept). An idle one keeps its tunnel from counting as
    /// inactive on the agent (`EDGE_INACTIVITY_TIMEOUT`).
    #[arg(long, env = "EDGEPLANE_ENGINE_IDLE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    engine_idle_timeout: std::time::Duration,
    /// Connections held at once on the API and tunnel ports together. Default: the open-file
    /// limit less 512.
    #[arg(long, env = "EDGEPLANE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Connections one source address (an IPv6 /64) holds at once. Default: 8192.
    #[arg(long, env = "EDGEPLANE_MAX_CONNECTIONS_PER_SOURCE")]
    max_connections_per_source: Option<usize>,
    /// Bytes buffered at once for agents' request bodies that proved nothing yet (an
    /// upload's proof comes with its last byte); past it the slowest is let go or the newest
    /// answered 503. Default: 64 MiB.
    #[arg(long, env = "EDGEPLANE_MAX_PENDING_BODY_BYTES")]
    max_pending_body_bytes: Option<usize>,
}

impl Cli {
    fn into_config(self) -> Config {
        let mut c = Config::new(self.data_dir);
        c.public_url = self.public_url;
        c.tunnel_addr = self.tunnel_addr;
        c.tunnel_public_addr = self.tunnel_public_addr;
        c.embedded_gateway = !self.no_embedded_gateway;
        c.redis_url = self.redis_url;
        c.redis_prefix = self.redis_prefix;
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            c.tls = TlsSource::Files { cert, key };
        }
        c.admin_api_key = std::env::var("EDGEPLANE_ADMIN_API_KEY")
            .ok()
            .filter(|k| !k.is_empty());
        // Portainer's servers read AGENT_SECRET; accept it too so deployments carry over.
        c.agent_secret = self
            .agent_secret
            .or_else(|| std::env::var("AGENT_SECRET").ok())
            .filter(|s| !s.is_empty());
        if let Some(image) = self.agent_image {
            c.agent_image = image;
        }
        c.limits.keep_alive = std::time::Duration::from_secs(self.keep_alive.max(1));
        if let Some(w) = self.workers {
            c.limits.workers = w.max(1);
        }
        c.limits.tunnel_wait = self.tunnel_wait;
        c.limits.engine_idle = self.engine_idle_timeout;
        c.limits.admission = gateway::admission::AdmissionLimits::configured(
            self.max_connections,
            self.max_connections_per_source,
        );
        if let Some(bytes) = self.max_pending_body_bytes {
            c.limits.pending_body_bytes = bytes;
        }
        c.allocator_stats = Some(jemalloc_stats);
        c.thread_cache = Some(jemalloc_thread_cache);
        c
    }
}

/// Prints the start banner; returns how to spell the admin key in shell commands.
fn banner(p: &Prepared, api: SocketAddr) -> String {
    let url = &p.public.api_url;
    let local = format!("https://127.0.0.1:{}", api.port());
    let key_file = p
        .config
        .data_dir
        .join(control_plane::bootstrap::ADMIN_KEY_FILE);
    let key_expr = match &p.admin_key_source {
        AdminKeySource::Generated { key, path } => {
            println!(
                "\nadmin API key (shown once, also saved to {}):\n\n    {key}\n",
                path.display()
            );
            format!("$(cat {})", path.display())
        }
        AdminKeySource::File(path) => format!("$(cat {})", path.display()),
        AdminKeySource::Environment => "$EDGEPLANE_ADMIN_API_KEY".to_owned(),
        AdminKeySource::Shared => {
            println!(
                "\nadmin keys already exist in the shared store (made by another replica); {} is not on this node",
                key_file.display()
            );
            "<admin key>".to_owned()
        }
    };
    println!(
        "edgeplane control plane {version}\n\
         \x20 API (HTTPS): {local}   agents are told: {url}\n\
         \x20 certificate: {cert} (self-signed unless --tls-cert; agents pin its fingerprint from their key)\n\
         \x20 metrics:     http://{metrics}/metrics\n\n\
         next steps:\n\
         \x20 1. create an environment:\n\
         \x20      curl -sk -H \"X-API-Key: {key_expr}\" -d '{{\"name\":\"kiosk-1\"}}' {local}/api/endpoints\n\
         \x20 2. get the agent command for it (docker, swarm, kubernetes or nomad):\n\
         \x20      curl -sk -H \"X-API-Key: {key_expr}\" -H 'Accept: text/plain' '{local}/api/endpoints/1/install?platform=docker'\n\
         \x20    or run the agent binary from this build on any machine that reaches {url}:\n\
         \x20      EDGE_KEY=<edgeKey from step 1> EDGE_DATA_DIR=./agent-data cargo run --release --bin edge-agent\n",
        version = env!("CARGO_PKG_VERSION"),
        cert = p.cert_path.display(),
        metrics = p.metrics_addr().map_or_else(|| "?".into(), |a| a.to_string()),
    );
    key_expr
}

/// Once environments exist, says how to get a ready-to-paste agent command for those still
/// waiting for their agent. Never prints join tokens: stdout ends up in `docker logs` and
/// journald, and a token lets whoever reads it bind an unbound environment.
async fn ready_agent_commands(p: &Prepared, api: SocketAddr, key_expr: &str) {
    let Ok(envs) = p.store.list_environments().await else {
        return;
    };
    let waiting: Vec<_> = envs.iter().filter(|e| e.edge_id.is_none()).collect();
    for env in waiting.iter().take(3) {
        println!(
            "environment {} ({:?}) waits for its agent; its install command:\n    \
             curl -sk -H \"X-API-Key: {key_expr}\" -H 'Accept: text/plain' \
             'https://127.0.0.1:{}/api/endpoints/{}/install?platform=docker'\n",
            env.id,
            env.name,
            api.port(),
            env.id
        );
    }
    if waiting.len() > 3 {
        println!(
            "({} more environments wait for their agent: GET /api/endpoints?status=never)\n",
            waiting.len() - 3
        );
    }
}

/// Turns the calling thread's jemalloc cache on or off (off gives back what it holds).
fn jemalloc_thread_cache(on: bool) -> bool {
    use tikv_jemalloc_ctl::{Access as _, AsName as _};
    b"thread.tcache.enabled\0".name().write(on).is_ok()
}

/// The memory figures (docs/benchmarks.md) hold for jemalloc without thread caches but on
/// the API workers, which empty theirs every few seconds (`workers::THREAD_CACHE_FLUSH`), as
/// `.cargo/config.toml` builds it; a build without that file, or `MALLOC_CONF`, can turn them
/// on everywhere. Says so at start.
fn warn_if_thread_caches() {
    if tikv_jemalloc_ctl::opt::tcache::read().unwrap_or(false) {
        tracing::warn!(
            malloc_conf = tikv_jemalloc_ctl::config::malloc_conf::read()
                .unwrap_or_default()
                .trim_end_matches('\0'),
            "jemalloc runs with thread caches: memory freed after a burst may stay with idle \
             threads (build from the repository, whose .cargo/config.toml turns them off, or \
             set MALLOC_CONF=tcache:false)"
        );
    }
}

#[actix_web::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    warn_if_thread_caches();
    // One line, as operators read it: every error here names its cause in its own message.
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("control-plane: {e}");
        std::process::exit(2);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let api_addr = cli.api_addr;
    let metrics_addr = cli.metrics_addr;
    let reuse_port = cli.reuse_port;
    let config = cli.into_config();
    let bind = |flag: &str, addr: SocketAddr, shared: bool| {
        gateway::listen::bind_with(addr, shared).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AddrInUse && reuse_port {
                " (with --reuse-port only --api-addr is shared: give each process its own)"
            } else {
                ""
            };
            anyhow::anyhow!("cannot listen on {flag} {addr}: {e}{hint}")
        })
    };
    let metrics = bind("--metrics-addr", metrics_addr, false)?;
    let tunnel = if config.embedded_gateway {
        Some(bind("--tunnel-addr", config.tunnel_addr, false)?)
    } else {
        None
    };
    // The store first (it may wait for Redis, a stop signal meanwhile ends the process
    // cleanly), then the API port: a process sharing it with others (--reuse-port) takes no
    // connection it cannot serve yet.
    let store = tokio::select! {
        store = open_store(&config, &metrics) => store?,
        () = shutdown_signal() => return Ok(()),
    };
    let listeners = Listeners {
        api: bind("--api-addr", api_addr, reuse_port)?,
        metrics,
        tunnel,
    };
    let prepared = prepare_on(config, store, listeners).await?;
    let key_expr = banner(&prepared, api_addr);
    ready_agent_commands(&prepared, api_addr, &key_expr).await;
    prepared.serve(shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only ctrl-c stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use tikv_jemalloc_ctl::opt;

    /// The options the memory figures were measured with are the ones this build runs with
    /// (`.cargo/config.toml` and the workspace's jemalloc features).
    #[test]
    fn jemalloc_is_built_with_its_background_thread_and_no_thread_caches() {
        // Compiled in, whatever MALLOC_CONF says.
        let conf = tikv_jemalloc_ctl::config::malloc_conf::read().unwrap_or_default();
        // tikv-jemalloc-ctl hands the C string over with its terminating NUL.
        let conf = conf.trim_end_matches('\0');
        for option in ["background_thread:true", "tcache:false"] {
            assert!(
                conf.split(',').any(|o| o == option),
                "{option} not in {conf:?}"
            );
        }
        // And in effect, unless MALLOC_CONF overrides them.
        if std::env::var_os("MALLOC_CONF").is_none() {
            assert_eq!(opt::background_thread::read().ok(), Some(true));
            assert_eq!(opt::tcache::read().ok(), Some(false));
        }
        assert!(super::jemalloc_stats().is_some_and(|s| s.allocated > 0));
    }

    /// A thread turns its own cache on and off (an API worker's, emptied every few seconds),
    /// whatever the process's default.
    #[test]
    fn a_thread_turns_its_cache_on_and_off() {
        use tikv_jemalloc_ctl::{Access as _, AsName as _};
        let enabled = || -> bool {
            b"thread.tcache.enabled\0"
                .name()
                .read()
                .expect("thread.tcache.enabled")
        };
        std::thread::spawn(move || {
            assert!(super::jemalloc_thread_cache(true));
            assert!(enabled());
            // Something cached, then given back.
            drop(vec![0u8; 100]);
            assert!(super::jemalloc_thread_cache(false));
            assert!(!enabled());
            assert!(super::jemalloc_thread_cache(true));
            assert!(enabled());
        })
        .join()
        .expect("the thread ran");
    }
}
