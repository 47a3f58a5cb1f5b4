//! The tunnel gateway, as a library: terminates agents' reverse TLS tunnels, records where
//! each tunnel is in the shared store, and opens Docker streams through them. Used embedded in
//! the control plane (single node) and by the `tunnel-gateway` binary (cluster mode).
//!
//! # Serving side: [`Gateway`]
//!
//! ```text
//! let gw = Gateway::bind(GatewayConfig::new(id, listen, public_addr, dial_addr, tls), store, &registry).await?;
//! tokio::spawn(Arc::clone(&gw).run(shutdown.clone()));
//! let stream = gw.open_stream(env, epoch).await?;   // a TunnelStream to the agent
//! ```
//!
//! * [`Gateway::bind`] binds the listener at once (so "address in use" shows at start) and
//!   registers the `edgeplane_gateway_*` metrics into the given registry;
//!   [`Gateway::bind_std`] takes a listener the caller bound. A port of 0 in `public_addr` /
//!   `dial_addr` is replaced by the bound port (tests, ephemeral ports).
//! * [`Gateway::run`] accepts connections and keeps leases alive until its token is
//!   cancelled; then it closes every tunnel, releases their locations and unregisters the
//!   gateway (waiting up to 15 s for that). Runtime-agnostic: it only uses `tokio::spawn`.
//! * [`Gateway::open_stream`], [`Gateway::open_tunnels`], [`Gateway::tunnel_epoch`],
//!   [`Gateway::metrics`] serve the embedding process and tests.
//! * Every connection is admitted first ([`admission`]): bounds of all connections and of
//!   those that proved nothing yet, each also per source; over them it is dropped at once. A
//!   connection must send its first byte within `first_byte_timeout`, then finish TLS and send
//!   its [`Hello`](proto::tunnel::Hello) within `handshake_timeout`.
//! * `Hello::Agent`: the one-time grant is taken from the store (`take_tunnel_grant`), checked
//!   (environment, Edge ID, expiry), the location claimed (`claim_tunnel`, new epoch), the
//!   agent answered `Accepted`; yamux starts (the gateway is the client), the agent opens the
//!   control stream, and the gateway pings it (`control_pinger`). `Change::TunnelOpened` is
//!   published. A newer tunnel of the same environment replaces an older one.
//! * A tunnel ends when its control stream ends (agent inactive or gone, silence), when its
//!   lease is lost or could not be renewed for a whole lease, or at shutdown: its location is
//!   released (unless another epoch owns it now) and `Change::TunnelClosed` is published.
//! * `Hello::Dial`: a control-plane replica proving the cluster secret opens a dial session
//!   (the replica is the yamux client); each of its streams starts with a
//!   [`DialRequest`](proto::tunnel::DialRequest) and is spliced onto a new stream of the
//!   agent's tunnel, or answered `StreamOpen::Refused{NoTunnel}`.
//! * Every `lease / 3` the gateway renews its tunnels' locations and its own registration.
//!
//! # Client side: [`Dialer`]
//!
//! A control-plane replica reaches a tunnel held by another gateway process through
//! [`Dialer::open_stream`]: one persistent TLS + yamux session per gateway `dial_addr`,
//! opened lazily, the gateway certificate pinned to the fingerprint in join keys, reopened
//! once when found dead. [`Dialer::with_local`] lets the embedded gateway serve its own
//! tunnels without a network hop.
//!
//! # Stream contract
//!
//! Both [`Gateway::open_stream`] and [`Dialer::open_stream`] return a [`TunnelStream`] that is
//! **not yet announced to the agent** (yamux announces a stream with its first frame): the
//! caller writes first (the HTTP request), then reads one tunnel frame,
//! [`StreamOpen`](proto::tunnel::StreamOpen) (`proto::mux::read_frame`): the agent's answer, or
//! the gateway's `Refused{NoTunnel}` on a dial session; after `StreamOpen::Ok` the stream is
//! a raw byte pipe to the agent's engine.
//!
//! A `TunnelStream` also ends (EOF / broken pipe) when its session ends, even when this side
//! closed the session: yamux alone would leave such a stream's reader waiting forever.
//!
//! # Metrics
//!
//! `edgeplane_gateway_tunnels_open`, `edgeplane_gateway_handshakes_total{kind, result}`
//! (kind: `agent`, `dial`, `unknown`; result: `accepted`, `bad_credentials`, `mismatch`,
//! `unavailable`, `not_authorized`, `malformed`, `timeout`, `tls_error`, `overloaded`),
//! `edgeplane_gateway_dial_sessions_open`, `edgeplane_gateway_streams_open`,
//! `edgeplane_gateway_streams_total`, `edgeplane_gateway_tunnel_closes_total{reason}`
//! (`inactive`, `agent_shutdown`, `agent_gone`, `silent`, `lease_lost`, `lease_unrenewed`,
//! `replaced`, `shutdown`, `no_control_stream`), `edgeplane_gateway_lease_renew_failures_total`.
//!
//! Must never know: byte layouts (those are `proto`'s), store key names, HTTP.

pub mod admission;
mod agent;
mod dial;
mod lease;
pub mod listen;
pub mod metrics;
mod serve_dial;
mod server;
mod socket;
mod stream;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use admission::Admission;

pub use agent::{check_grant, GrantRefusal};
pub use dial::{Dialer, MAX_DIAL_SESSIONS};
pub use metrics::GatewayMetrics;
pub use server::Gateway;
pub use socket::Socket;
pub use stream::TunnelStream;
pub use tls::pinned_client_config;

use store::{EnvId, StoreError};

/// Default lease of tunnel locations and of the gateway registration.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);
/// Default bound of tunnels one gateway holds.
pub const DEFAULT_MAX_TUNNELS: usize = 100_000;
/// How long a new connection may stay silent before it is dropped (an agent's ClientHello
/// follows its connect at once; this is for the clients that connect and send nothing).
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(3);
/// Streams one tunnel (or dial session) carries at once. yamux fails the whole session when
/// asked for a stream beyond `proto::mux::MAX_STREAMS`, so we stop a margin below it (the
/// control stream, streams being dropped).
pub const MAX_STREAMS_PER_SESSION: usize = proto::mux::MAX_STREAMS - 16;
/// How long the first frame of a dial stream may take.
pub const DIAL_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connect timeout of dial sessions.
pub const DIAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound of one store call made by the gateway (handshake, renewal, release).
pub const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// Configuration of one gateway. [`GatewayConfig::new`] fills in the defaults.
#[derive(Clone)]
pub struct GatewayConfig {
    /// Unique per gateway process (it owns tunnel locations under this id).
    pub id: String,
    pub listen: SocketAddr,
    /// `host:port` agents connect to (registered in the store).
    pub public_addr: String,
    /// `host:port` control-plane replicas connect to (the same listener).
    pub dial_addr: String,
    /// The certificate whose SHA-256 (DER) fingerprint is in join keys. The gateway uses a
    /// copy without ALPN (agents send none).
    pub tls: Arc<rustls::ServerConfig>,
    /// Lease of tunnel locations and of the registration; renewed every `lease / 3`.
    pub lease: Duration,
    /// Over this many tunnels, new agents are refused with `HelloRefusal::Unavailable`.
    pub max_tunnels: usize,
    /// TLS handshake plus hello (and the agent's control stream after `Accepted`) must
    /// arrive within this.
    pub handshake_timeout: Duration,
    /// The first byte of a new connection must arrive within this.
    pub first_byte_timeout: Duration,
    /// Who may hold a connection; `None`: bounds of its own from the process's open-file
    /// limit. A process with several public ports (the control plane with its embedded
    /// gateway) shares one.
    pub admission: Option<Arc<Admission>>,
    /// Where accepted connections run; `None`: `tokio::spawn` on the accepting runtime.
    pub spawner: Option<Arc<dyn Spawn>>,
}

/// A connection's future and where it may run: it re-registers its socket with the runtime
/// that polls it, so any runtime of the process will do.
pub type ConnectionTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Places accepted connections on runtimes of the embedding process. The control plane puts
/// each tunnel on one of its API worker threads, so a Docker call served there drives the
/// tunnel's session without waking another thread, and the tunnels' TLS is spread over the
/// workers instead of all on the thread that accepts.
pub trait Spawn: Send + Sync {
    /// Runs `task` (an accepted connection) somewhere, or hands it back when there is nowhere
    /// to run it (the caller then spawns it itself).
    fn spawn(&self, task: ConnectionTask) -> Result<(), ConnectionTask>;

    /// Runs `task`, the rest of environment `env`'s tunnel once its hello is in, where calls
    /// to it are best served; hands it back when that is here (the caller runs it on).
    fn spawn_tunnel(&self, env: EnvId, task: ConnectionTask) -> Result<(), ConnectionTask>;
}

impl GatewayConfig {
    pub fn new(
        id: impl Into<String>,
        listen: SocketAddr,
        public_addr: impl Into<String>,
        dial_addr: impl Into<String>,
        tls: Arc<rustls::ServerConfig>,
    ) -> Self {
        Self {
            id: id.into(),
            listen,
            public_addr: public_addr.into(),
            dial_addr: dial_addr.into(),
            tls,
            lease: DEFAULT_LEASE,
            max_tunnels: DEFAULT_MAX_TUNNELS,
            handshake_timeout: proto::tunnel::HANDSHAKE_TIMEOUT,
            first_byte_timeout: FIRST_BYTE_TIMEOUT,
            admission: None,
            spawner: None,
        }
    }
}

impl GatewayConfig {
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    pub fn with_max_tunnels(mut self, max_tunnels: usize) -> Self {
        self.max_tunnels = max_tunnels;
        self
    }

    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    pub fn with_first_byte_timeout(mut self, timeout: Duration) -> Self {
        self.first_byte_timeout = timeout;
        self
    }

    pub fn with_admission(mut self, admission: Arc<Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    pub fn with_spawner(mut self, spawner: Arc<dyn Spawn>) -> Self {
        self.spawner = Some(spawner);
        self
    }
}

/// Six random lowercase hex characters, to make gateway ids unique per process
/// (`<hostname>-<suffix>`, `embedded-<suffix>`).
pub fn random_suffix() -> String {
    hex::encode(rand::random::<[u8; 3]>())
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("id", &self.id)
            .field("listen", &self.listen)
            .field("public_addr", &self.public_addr)
            .field("dial_addr", &self.dial_addr)
            .field("lease", &self.lease)
            .field("max_tunnels", &self.max_tunnels)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("first_byte_timeout", &self.first_byte_timeout)
            .field("admission", &self.admission.as_ref().map(|a| a.limits()))
            .field("spawner", &self.spawner.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("tunnel gateway cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("tunnel gateway metrics cannot be registered: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("invalid tunnel gateway configuration: {0}")]
    Config(String),
}

/// Why a stream to an agent could not be opened. Each says where it failed and whether a
/// retry can help ([`OpenError::retry_may_help`]).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The gateway holds no tunnel of the environment with that epoch (closed, or moved to
    /// another gateway / epoch): look the location up again, or ask the agent for a tunnel.
    #[error("no open tunnel of this environment on the gateway (closed or moved)")]
    NoTunnel,
    /// Connecting or handshaking with a separate gateway failed.
    #[error("tunnel gateway unreachable: {0}")]
    GatewayUnreachable(String),
    /// The gateway refused the dial session (wrong cluster secret, or it is unavailable).
    #[error("tunnel gateway refused the dial session: {0}")]
    Refused(String),
    /// The tunnel (or dial session) closed while the stream was being opened.
    #[error("the tunnel closed while a stream was being opened")]
    Closed,
    /// Too many streams are open on the tunnel (or dial session) right now.
    #[error("the tunnel is busy: too many streams open at once")]
    Busy,
    /// The store could not be read (cluster secret).
    #[error("tunnel gateway: {0}")]
    Store(#[from] StoreError),
}

impl OpenError {
    /// Whether trying again soon may succeed (after a fresh location lookup for `NoTunnel`).
    pub fn retry_may_help(&self) -> bool {
        match self {
            Self::NoTunnel | Self::GatewayUnreachable(_) | Self::Closed | Self::Busy => true,
            Self::Refused(_) => false,
            Self::Store(e) => e.retry_may_help(),
        }
    }
}

impl From<proto::mux::MuxError> for OpenError {
    fn from(e: proto::mux::MuxError) -> Self {
        match e {
            proto::mux::MuxError::Closed => Self::Closed,
            proto::mux::MuxError::Busy => Self::Busy,
        }
    }
}

/// `addr` with a port of 0 replaced by `port`; other addresses unchanged.
fn with_port(addr: &str, port: u16) -> String {
    match addr.rsplit_once(':') {
        Some((host, "0")) => format!("{host}:{port}"),
        _ => addr.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_is_replaced() {
        assert_eq!(with_port("127.0.0.1:0", 8000), "127.0.0.1:8000");
        assert_eq!(with_port("[::1]:0", 8000), "[::1]:8000");
        assert_eq!(with_port("gw.example:443", 8000), "gw.example:443");
        assert_eq!(with_port("gw.example:10", 8000), "gw.example:10");
    }

    #[test]
    fn retry_classes() {
        assert!(OpenError::NoTunnel.retry_may_help());
        assert!(!OpenError::Refused("x".into()).retry_may_help());
        assert!(!OpenError::Store(StoreError::corrupt("x")).retry_may_help());
    }
}
