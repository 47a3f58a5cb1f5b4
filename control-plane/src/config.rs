//! Control-plane configuration as a plain struct, built by `main.rs` from flags and
//! `EDGEPLANE_*` variables, or by tests directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `Debug` is written by hand: the admin key, `AGENT_SECRET` and a Redis URL with a password
/// must never reach a log line.
#[derive(Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// The URL agents are told to call (goes into join keys). `None`: derived at start.
    pub public_url: Option<String>,
    /// Tunnel address put into join keys. `None`: host of the public URL, port of `tunnel_addr`.
    pub tunnel_public_addr: Option<String>,
    pub tunnel_addr: SocketAddr,
    pub embedded_gateway: bool,
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    pub redis_prefix: String,
    pub tls: TlsSource,
    /// Admin key given by automation (`EDGEPLANE_ADMIN_API_KEY`); never stored in clear.
    pub admin_api_key: Option<String>,
    /// `AGENT_SECRET`: when set, agents must prove it too.
    pub agent_secret: Option<String>,
    /// Image named in install commands.
    pub agent_image: String,
    pub limits: Limits,
    /// Reads the allocator's counts for `/metrics` (`edgeplane_allocator_*_bytes`); the binary
    /// that chose the allocator sets it.
    pub allocator_stats: Option<crate::metrics::AllocatorStatsFn>,
    /// Turns a thread's allocator cache on or off: the API workers keep one, emptied every
    /// few seconds ([`crate::workers::THREAD_CACHE_FLUSH`]); the binary that chose the
    /// allocator sets it.
    pub thread_cache: Option<crate::workers::ThreadCacheFn>,
}

#[derive(Clone, Debug)]
pub enum TlsSource {
    /// Generate a self-signed certificate into the data dir on first start, reuse it after.
    SelfSigned,
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
}

/// Bounds and timings with sane defaults; every one is a knob, not a constant in the code.
#[derive(Clone, Debug)]
pub struct Limits {
    /// How often heartbeats are written behind to the store.
    pub heartbeat_flush: Duration,
    /// Check-ins (and uploads) of one environment in the actor's hands at once, and its
    /// mailbox capacity; over it the agent is answered 503 `busy`. Only requests that passed
    /// the cheap checks (proof, clock) count; held ones give their slot back once held.
    pub actor_mailbox: usize,
    /// Check-ins of one environment held at once (a swarm shares one environment); over it
    /// a check-in is answered at once instead of held.
    pub held_per_env: usize,
    /// An environment actor with no message for this long stops (its state is in the store).
    pub actor_idle: Duration,
    /// Unknown environment ids remembered to refuse repeated probes without a store read.
    pub negative_cache: usize,
    /// HTTP keep-alive; must exceed the longest check-in interval in use.
    pub keep_alive: Duration,
    pub max_connections_per_worker: usize,
    pub workers: usize,
    /// Largest page of `GET /api/endpoints`.
    pub max_page: usize,
    /// Largest batch of `POST /api/endpoints/bulk`.
    pub max_bulk: usize,
    /// How long a Docker API request waits for the agent to open its tunnel (then 504).
    pub tunnel_wait: Duration,
    /// How long an engine connection (a tunnel stream) is kept idle for the next Docker call
    /// to the same environment. An idle one keeps its tunnel open on the agent's side.
    pub engine_idle: Duration,
    /// Lease of the embedded gateway's tunnel locations and registration.
    pub gateway_lease: Duration,
    /// Connections of the public ports (API and embedded gateway share them): all, per
    /// source, and those that proved nothing yet (no first request, no hello).
    pub admission: gateway::admission::AdmissionLimits,
    /// A new connection must send its first byte within this.
    pub first_byte_timeout: Duration,
    /// TLS handshake plus the first request head must arrive within this.
    pub first_request_timeout: Duration,
    /// Each chunk of an agent's request body must follow the one before (or the head)
    /// within this.
    pub agent_body_timeout: Duration,
    /// Bytes buffered at once, process-wide, for agents' first bodies that proved nothing
    /// yet (an upload's proof is its last byte); see `front::budget`.
    pub pending_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            heartbeat_flush: Duration::from_secs(1),
            actor_mailbox: 64,
            held_per_env: 1024,
            actor_idle: Duration::from_secs(600),
            negative_cache: 10_000,
            keep_alive: Duration::from_secs(120),
            max_connections_per_worker: 100_000,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_page: 1000,
            max_bulk: 1000,
            tunnel_wait: Duration::from_secs(15),
            engine_idle: Duration::from_secs(5),
            gateway_lease: Duration::from_secs(15),
            admission: gateway::admission::AdmissionLimits::from_process(),
            first_byte_timeout: gateway::FIRST_BYTE_TIMEOUT,
            first_request_timeout: Duration::from_secs(10),
            agent_body_timeout: Duration::from_secs(10),
            pending_body_bytes: crate::front::DEFAULT_PENDING_BODY_BYTES,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        let redis = self.redis_url.as_deref().map(store::redis::redact_url);
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("public_url", &self.public_url)
            .field("tunnel_public_addr", &self.tunnel_public_addr)
            .field("tunnel_addr", &self.tunnel_addr)
            .field("embedded_gateway", &self.embedded_gateway)
            .field("redis_url", &redis)
            .field("redis_prefix", &self.redis_prefix)
            .field("tls", &self.tls)
            .field("admin_api_key", &redacted(&self.admin_api_key))
            .field("agent_secret", &redacted(&self.agent_secret))
            .field("agent_image", &self.agent_image)
            .field("limits", &self.limits)
            .field("allocator_stats", &self.allocator_stats.is_some())
            .field("thread_cache", &self.thread_cache.is_some())
            .finish()
    }
}

impl Config {
    /// A configuration with every default, for tests and `main`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            public_url: None,
            tunnel_public_addr: None,
            tunnel_addr: SocketAddr::from(([0, 0, 0, 0], 8000)),
            embedded_gateway: true,
            redis_url: None,
            redis_prefix: "edgeplane:".into(),
            tls: TlsSource::SelfSigned,
            admin_api_key: None,
            agent_secret: None,
            agent_image: format!("edgeplane/edge-agent:{}", env!("CARGO_PKG_VERSION")),
            limits: Limits::default(),
            allocator_stats: None,
            thread_cache: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_secrets() {
        let mut c = Config::new("/tmp/x".into());
        c.admin_api_key = Some("admin-key-123".into());
        c.agent_secret = Some("agent-secret-456".into());
        c.redis_url = Some("redis://user:hunter2@redis:6379/0".into());
        let text = format!("{c:?}");
        for secret in ["admin-key-123", "agent-secret-456", "hunter2"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("redis:6379"));
    }
}
