//! The check-in client: one persistent HTTP/1.1 connection (TLS over TCP) to the control
//! plane, and one call, [`PollClient::checkin`], used by the agent loop and by the load test.
//!
//! Bytes matter on metered links, so a check-in sends only `host` and `content-length` headers
//! and a signed binary body of a few dozen bytes, over a kept-alive connection with
//! TCP_NODELAY (without it every request would stall ~40 ms behind delayed ACKs).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_LENGTH, HOST, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use proto::async_mode::{
    AsyncAnswer, AsyncRequest, CommandResult, SnapshotReport, ASYNC_PATH, MAX_ASYNC_ANSWER,
    MAX_ASYNC_FRAME,
};
use proto::codec::{self, CodecError, MAX_CONTROL_FRAME};
use proto::proof::{self, ProofKey};
use proto::snapshot::{SnapshotUpload, MAX_UPLOAD_FRAME, SNAPSHOT_PATH};
use proto::tunnel::TUNNEL_REQUEST_PATH;
use proto::wire::{
    AgentInfo, CheckinAnswer, CheckinRequest, EdgeStatus, Platform, SealedCredentials,
    CHECKIN_PATH, HELD_CHECKIN_PATH,
};
use proto::JoinToken;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use uuid::Uuid;

use crate::clock::SharedClock;
use crate::tls::{self, TlsSetupError};

/// Interval assumed before the server has told us one (the control plane's default).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Slack on top of the interval before a check-in counts as timed out (the server may hold a
/// check-in open for up to one interval).
pub const TIMEOUT_SLACK: Duration = Duration::from_secs(10);
/// Patience for an answer that should come at once (plain check-ins, tunnel requests) grows
/// with the interval up to this: with long intervals (up to an hour) a silently dead
/// connection must not hang the agent as long. Held check-ins are held for up to the whole
/// interval and wait for it plus [`TIMEOUT_SLACK`]: their next one is due then anyway.
pub const MAX_HOLD: Duration = Duration::from_secs(60);
/// A snapshot upload gets this long.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest error body read (they are small JSON objects).
const MAX_ERROR_BODY: usize = 4 * 1024;
/// Longest server message kept for errors and logs.
const MAX_MESSAGE_CHARS: usize = 200;

/// Bytes read from and written to the TCP socket(s) of a client: TLS records, i.e. the TCP
/// payload, not the HTTP bytes inside. Share one between clients to get a total.
#[derive(Debug, Default)]
pub struct ByteCounters {
    read: AtomicU64,
    written: AtomicU64,
}

/// A snapshot of [`ByteCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ByteCount {
    pub read: u64,
    pub written: u64,
}

impl ByteCount {
    pub fn total(self) -> u64 {
        self.read + self.written
    }
}

impl ByteCounters {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn snapshot(&self) -> ByteCount {
        ByteCount {
            read: self.read.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
        }
    }
}

/// An I/O stream that adds every byte it moves to shared [`ByteCounters`].
#[derive(Debug)]
pub struct CountingStream<S> {
    inner: S,
    counters: Arc<ByteCounters>,
}

impl<S> CountingStream<S> {
    pub fn new(inner: S, counters: Arc<ByteCounters>) -> Self {
        Self { inner, counters }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountingStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let n = buf.filled().len().saturating_sub(before);
            this.counters.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountingStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            this.counters.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            this.counters.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Why a check-in refusal happened, from the `code` of the server's JSON error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalCode {
    /// 401: our timestamp is too far from the server clock.
    ClockSkew,
    /// 401: the request proof does not verify (wrong join secret).
    BadProof,
    /// 401: `AGENT_SECRET` differs from the control plane's.
    AgentSecretMismatch,
    /// 401: the same request was seen before.
    Replay,
    /// 403: the environment is bound to another Edge ID.
    EdgeIdMismatch,
    /// 404: no such environment (deleted, or the key belongs elsewhere).
    UnknownEnvironment,
    /// 400: the environment is unbound and the check-in did not carry the Edge ID.
    EdgeIdRequired,
    /// 400: the server could not read the request (version mismatch?).
    BadRequest,
    /// 409: the environment is in the other mode (standard vs async, `EDGE_ASYNC`).
    WrongMode,
    /// Any other code (or none).
    Other(String),
}

impl RefusalCode {
    pub fn parse(code: &str) -> Self {
        match code {
            "clock_skew" => Self::ClockSkew,
            "bad_proof" => Self::BadProof,
            "agent_secret_mismatch" => Self::AgentSecretMismatch,
            "replay" => Self::Replay,
            "edge_id_mismatch" => Self::EdgeIdMismatch,
            "unknown_environment" => Self::UnknownEnvironment,
            "bad_request" => Self::BadRequest,
            "edge_id_required" => Self::EdgeIdRequired,
            "wrong_mode" => Self::WrongMode,
            other => Self::Other(other.to_owned()),
        }
    }

    /// A fixed label (metrics, error counts); unknown codes share one.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ClockSkew => "clock_skew",
            Self::BadProof => "bad_proof",
            Self::AgentSecretMismatch => "agent_secret_mismatch",
            Self::Replay => "replay",
            Self::EdgeIdMismatch => "edge_id_mismatch",
            Self::UnknownEnvironment => "unknown_environment",
            Self::BadRequest => "bad_request",
            Self::EdgeIdRequired => "edge_id_required",
            Self::WrongMode => "wrong_mode",
            Self::Other(_) => "refused_other",
        }
    }

    /// What an operator can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            Self::ClockSkew => "the clock is off and could not be corrected",
            Self::BadProof => "the EDGE_KEY does not match the environment's current key; reinstall with the key shown by the control plane",
            Self::AgentSecretMismatch => "AGENT_SECRET differs from the control plane's",
            Self::Replay => "a check-in was repeated; this clears by itself",
            Self::EdgeIdMismatch => "the environment is bound to another Edge ID; reset its association in the control plane, or set EDGE_ID to the bound one",
            Self::UnknownEnvironment => "the environment does not exist (deleted?); reinstall with a new key",
            Self::BadRequest => "the control plane could not read the check-in; check that agent and server versions match",
            Self::EdgeIdRequired => "the next check-in carries the Edge ID",
            Self::WrongMode => "the environment's mode differs from the agent's: set EDGE_ASYNC=1 for an async environment, unset it for a standard one",
            Self::Other(_) => "see the server message",
        }
    }
}

impl std::fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Other(code) if !code.is_empty() => f.write_str(code),
            other => f.write_str(other.kind()),
        }
    }
}

/// How a failed check-in should be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// The network or the server is in trouble: jittered exponential backoff.
    Backoff,
    /// The server refused us: retry calmly, an admin may fix it.
    Refused,
    /// The server is overloaded and may say when to come back.
    Busy(Option<Duration>),
}

/// A failed check-in. Each variant says where it failed; [`CheckinError::retry_class`] says
/// how (and whether soon) a retry can help.
#[derive(Debug, thiserror::Error)]
pub enum CheckinError {
    /// DNS: the API host name did not resolve. Retry helps when DNS or the network recovers.
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    /// TCP: connection refused, unreachable, out of ports. Retry helps when the server is back.
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    /// TLS: handshake failed or the certificate was rejected. A rejected certificate needs an
    /// operator (a certificate matching the join token, or a publicly trusted one).
    #[error("tls handshake with {host} failed: {source}")]
    Tls { host: String, source: io::Error },
    /// HTTP: the connection broke or the server spoke bad HTTP. Retry on a new connection.
    #[error("http exchange failed: {0}")]
    Http(#[source] hyper::Error),
    /// No complete answer in time. Retry on a new connection.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server refused this agent (401/403/404/400). Retrying helps only after an admin acts.
    #[error("check-in refused ({status} {code}): {message}; {hint}", hint = code.hint())]
    Refused {
        status: u16,
        code: RefusalCode,
        message: String,
        /// Server clock from a `clock_skew` refusal.
        server_time_ms: Option<u64>,
    },
    /// 503 / 429: the server sheds load. Retry later.
    #[error("server busy")]
    Busy { retry_after: Option<Duration> },
    /// Other 5xx. Retry later.
    #[error("server error {status}: {message}")]
    Server { status: u16, message: String },
    /// The answer did not make sense (wrong status, undecodable body). Likely a version mismatch.
    #[error("unexpected answer (status {status}): {detail}")]
    Protocol { status: u16, detail: String },
    /// The request could not be encoded: a bug on our side.
    #[error("cannot encode the check-in: {0}")]
    Encode(#[source] CodecError),
    /// The request is larger than the server accepts (a snapshot of a huge engine).
    #[error("request of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
}

impl CheckinError {
    pub fn retry_class(&self) -> RetryClass {
        match self {
            Self::Refused { .. } => RetryClass::Refused,
            Self::Busy { retry_after } => RetryClass::Busy(*retry_after),
            _ => RetryClass::Backoff,
        }
    }

    /// A fixed label for counting errors by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Resolve { .. } => "resolve",
            Self::Connect { .. } => "connect",
            Self::Tls { .. } => "tls",
            Self::Http(_) => "http",
            Self::Timeout(_) => "timeout",
            Self::Refused { code, .. } => code.kind(),
            Self::Busy { .. } => "busy",
            Self::Server { .. } => "server_error",
            Self::Protocol { .. } => "protocol",
            Self::Encode(_) => "encode",
            Self::TooLarge { .. } => "too_large",
        }
    }

    /// Whether the connection can no longer be trusted and must be re-established.
    fn breaks_connection(&self) -> bool {
        matches!(
            self,
            Self::Resolve { .. }
                | Self::Connect { .. }
                | Self::Tls { .. }
                | Self::Http(_)
                | Self::Timeout(_)
                | Self::Protocol { .. }
        )
    }
}

/// Why a [`PollClient`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("api url {0:?} is not usable: {1}")]
    ApiUrl(String, &'static str),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

/// The result of a successful check-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckinOutcome {
    pub status: EdgeStatus,
    /// When to check in next.
    pub interval: Duration,
    /// Sealed one-time tunnel credentials, with `EdgeStatus::Required`.
    pub tunnel: Option<SealedCredentials>,
    /// Set when this check-in opened a new connection.
    pub connection: Option<NewConnection>,
    /// The server corrected our clock during this check-in.
    pub clock_corrected: bool,
}

/// Facts about a freshly opened connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewConnection {
    /// TCP payload bytes (both directions) of the TLS handshake.
    pub handshake_bytes: u64,
}

/// How to build a [`PollClient`]; start from [`PollOptions::new`].
#[derive(Debug, Clone)]
pub struct PollOptions {
    pub edge_id: Uuid,
    pub agent_secret: Option<String>,
    /// Accept any server certificate (`EDGE_INSECURE_POLL=1`).
    pub insecure: bool,
    /// Local address to bind before connecting (load tests spread agents over 127.0.0.0/8).
    pub local_addr: Option<IpAddr>,
    /// Where socket bytes are counted.
    pub counters: Arc<ByteCounters>,
    /// Sent on the first check-in and after errors.
    pub agent_info: AgentInfo,
    /// A TLS configuration to share between clients; `None` builds one from the token.
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
    /// Interval assumed until the server answers.
    pub initial_interval: Duration,
    /// Where timestamps come from; share one between the clients of one agent.
    pub clock: SharedClock,
}

impl PollOptions {
    pub fn new(edge_id: Uuid) -> Self {
        Self {
            edge_id,
            agent_secret: None,
            insecure: false,
            local_addr: None,
            counters: ByteCounters::new(),
            agent_info: agent_info(hostname()),
            tls_config: None,
            initial_interval: DEFAULT_INTERVAL,
            clock: SharedClock::new(),
        }
    }
}

/// This build's [`AgentInfo`] for a Docker host named `hostname`.
pub fn agent_info(hostname: String) -> AgentInfo {
    AgentInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        platform: Platform::Docker,
        hostname,
    }
}

/// The kernel's host name, or `unknown`.
pub fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Which route a check-in takes. All three carry the same signed [`CheckinRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckinRoute {
    /// `/edge/c`: the server answers at once.
    Plain,
    /// `/edge/h`: the server may hold an idle answer for up to the interval and answers the
    /// moment a tunnel is wanted. Servers that do not know the route get plain check-ins.
    Held,
    /// `/edge/t`: the agent lost a tunnel in use and asks for fresh credentials itself.
    AskTunnel,
}

/// What an async-mode tick carries (see [`PollClient::async_tick`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AsyncTick {
    pub snapshot: Option<SnapshotReport>,
    pub results: Vec<CommandResult>,
    pub done_through: Option<u64>,
}

/// Where and how to connect, worked out once from the join token.
#[derive(Debug, Clone)]
struct Target {
    host: url::Host<String>,
    port: u16,
    /// `host[:port]` as the `host` header carries it.
    authority: HeaderValue,
    /// The agent routes under the API URL's path.
    checkin: Uri,
    held: Uri,
    ask_tunnel: Uri,
    snapshot: Uri,
    async_tick: Uri,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl Target {
    fn new(
        api_url: &str,
        tls_config: impl FnOnce() -> Result<Arc<rustls::ClientConfig>, TlsSetupError>,
    ) -> Result<Self, SetupError> {
        let bad = |why| SetupError::ApiUrl(api_url.to_owned(), why);
        let url = url::Url::parse(api_url).map_err(|_| bad("not a URL"))?;
        let host = url.host().ok_or_else(|| bad("no host"))?.to_owned();
        let port = url.port_or_known_default().ok_or_else(|| bad("no port"))?;
        let host_str = url.host_str().ok_or_else(|| bad("no host"))?;
        let authority = match url.port() {
            Some(p) => format!("{host_str}:{p}"),
            None => host_str.to_owned(),
        };
        let authority = HeaderValue::from_str(&authority).map_err(|_| bad("bad host"))?;
        let prefix = url.path().trim_end_matches('/');
        let route =
            |path: &str| Uri::try_from(format!("{prefix}{path}")).map_err(|_| bad("bad path"));
        let tls = match url.scheme() {
            "https" => {
                let name = match &host {
                    url::Host::Domain(d) => ServerName::try_from(d.clone())
                        .map_err(|_| bad("host is not a valid TLS server name"))?,
                    url::Host::Ipv4(ip) => ServerName::IpAddress(IpAddr::V4(*ip).into()),
                    url::Host::Ipv6(ip) => ServerName::IpAddress(IpAddr::V6(*ip).into()),
                };
                Some((tls_config()?, name))
            }
            "http" => None,
            _ => return Err(bad("scheme is neither https nor http")),
        };
        Ok(Self {
            host,
            port,
            authority,
            checkin: route(CHECKIN_PATH)?,
            held: route(HELD_CHECKIN_PATH)?,
            ask_tunnel: route(TUNNEL_REQUEST_PATH)?,
            snapshot: route(SNAPSHOT_PATH)?,
            async_tick: route(ASYNC_PATH)?,
            tls,
        })
    }

    fn checkin_uri(&self, route: CheckinRoute) -> &Uri {
        match route {
            CheckinRoute::Plain => &self.checkin,
            CheckinRoute::Held => &self.held,
            CheckinRoute::AskTunnel => &self.ask_tunnel,
        }
    }
}

type Sender = SendRequest<Full<Bytes>>;

/// A check-in client for one agent: one kept-alive connection, re-established on error.
#[derive(Debug)]
pub struct PollClient {
    endpoint_id: u64,
    edge_id: Uuid,
    key: ProofKey,
    target: Target,
    local_addr: Option<IpAddr>,
    counters: Arc<ByteCounters>,
    agent_info: AgentInfo,
    conn: Option<Sender>,
    clock: SharedClock,
    send_agent_info: bool,
    interval: Duration,
    connects: u64,
    /// Cleared when the server does not know the held check-in route (an older version).
    held_supported: bool,
}

/// A failed attempt, and whether it failed on a reused connection before any answer (the
/// server may have closed an idle keep-alive connection just as we used it).
struct AttemptError {
    error: CheckinError,
    stale_reuse: bool,
}

impl From<CheckinError> for AttemptError {
    fn from(error: CheckinError) -> Self {
        Self {
            error,
            stale_reuse: false,
        }
    }
}

/// One request to send: where, what, and how large a successful answer may be.
struct Prepared {
    uri: Uri,
    body: Vec<u8>,
    answer_limit: usize,
}

/// A successful (2xx) answer.
struct RawAnswer {
    status: StatusCode,
    body: Bytes,
    connection: Option<NewConnection>,
}

impl PollClient {
    pub fn new(token: &JoinToken, options: PollOptions) -> Result<Self, SetupError> {
        let PollOptions {
            edge_id,
            agent_secret,
            insecure,
            local_addr,
            counters,
            agent_info,
            tls_config,
            initial_interval,
            clock,
        } = options;
        let target = Target::new(&token.api_url, || match tls_config {
            Some(c) => Ok(c),
            None => tls::client_config(token.tunnel_fingerprint, insecure),
        })?;
        Ok(Self {
            endpoint_id: token.endpoint_id,
            edge_id,
            key: ProofKey::derive(&token.secret, agent_secret.as_deref()),
            target,
            local_addr,
            counters,
            agent_info,
            conn: None,
            clock,
            send_agent_info: true,
            interval: initial_interval.max(Duration::from_secs(1)),
            connects: 0,
            held_supported: true,
        })
    }

    /// A new client for the same agent, on its own connection (opened on first use): same
    /// key, TLS configuration, byte counters and interval, and the same clock, so timestamps
    /// stay strictly increasing across both. For requests that must not wait behind a held
    /// check-in (tunnel requests, snapshot uploads).
    pub fn sibling(&self) -> Self {
        Self {
            endpoint_id: self.endpoint_id,
            edge_id: self.edge_id,
            key: self.key.clone(),
            target: self.target.clone(),
            local_addr: self.local_addr,
            counters: self.counters.clone(),
            agent_info: self.agent_info.clone(),
            conn: None,
            clock: self.clock.clone(),
            send_agent_info: true,
            interval: self.interval,
            connects: 0,
            held_supported: self.held_supported,
        }
    }

    pub fn edge_id(&self) -> Uuid {
        self.edge_id
    }

    pub fn endpoint_id(&self) -> u64 {
        self.endpoint_id
    }

    /// The interval the server asked for last (or the initial one).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Sets the interval this client reports (a sibling follows the main client's).
    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval.max(Duration::from_secs(1));
    }

    pub fn counters(&self) -> &Arc<ByteCounters> {
        &self.counters
    }

    /// How many connections this client has opened.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    pub fn clock_offset_ms(&self) -> i64 {
        self.clock.offset_ms()
    }

    /// The clock this client takes its timestamps from.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Whether held check-ins are still tried (cleared when the server does not know them).
    pub fn held_supported(&self) -> bool {
        self.held_supported
    }

    /// Closes the connection; the next check-in opens a new one.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// How long a request may take before it counts as timed out: a held check-in may be held
    /// for the whole interval; others are answered at once (the interval only adds patience,
    /// at most [`MAX_HOLD`]).
    pub fn timeout_for(&self, route: CheckinRoute) -> Duration {
        match route {
            CheckinRoute::Held => self.interval + TIMEOUT_SLACK,
            CheckinRoute::Plain | CheckinRoute::AskTunnel => {
                self.interval.min(MAX_HOLD) + TIMEOUT_SLACK
            }
        }
    }

    /// One plain check-in (answered at once); see [`PollClient::checkin_via`].
    pub async fn checkin(&mut self) -> Result<CheckinOutcome, CheckinError> {
        self.checkin_via(CheckinRoute::Plain).await
    }

    /// One check-in on `route`: connect if needed, send, read the answer. A `clock_skew`
    /// refusal is fixed and retried at once (once); a kept-alive connection found dead before
    /// answering is replaced at once (once). Times out after [`PollClient::timeout_for`]. A
    /// server that does not know held check-ins (404 without an agent error code) gets a plain
    /// check-in at once, and only plain ones from then on.
    pub async fn checkin_via(
        &mut self,
        route: CheckinRoute,
    ) -> Result<CheckinOutcome, CheckinError> {
        let route = if route == CheckinRoute::Held && !self.held_supported {
            CheckinRoute::Plain
        } else {
            route
        };
        let result = self.call_checkin(route).await;
        if route == CheckinRoute::Held {
            if let Err(CheckinError::Refused {
                status: 404,
                code: RefusalCode::Other(_),
                ..
            }) = &result
            {
                self.held_supported = false;
                tracing::info!(
                    "the control plane does not hold check-ins (older version); polling instead"
                );
                return self.call_checkin(CheckinRoute::Plain).await;
            }
        }
        result
    }

    async fn call_checkin(&mut self, route: CheckinRoute) -> Result<CheckinOutcome, CheckinError> {
        let timeout = self.timeout_for(route);
        let (mut outcome, skew_fixed) = self
            .call(
                timeout,
                |c| c.prepare_checkin(route),
                |c, raw| c.read_checkin_answer(raw),
            )
            .await?;
        outcome.clock_corrected |= skew_fixed;
        Ok(outcome)
    }

    /// Uploads a [`proto::snapshot::compress`]ed snapshot to the snapshot route, signed like a
    /// check-in. Success is any 2xx (the control plane answers 204).
    pub async fn upload_snapshot(&mut self, compressed: &[u8]) -> Result<(), CheckinError> {
        self.call(
            UPLOAD_TIMEOUT,
            |c| c.prepare_upload(compressed),
            |_, _| Ok(()),
        )
        .await
        .map(|((), _)| ())
    }

    fn prepare_checkin(&mut self, route: CheckinRoute) -> Result<Prepared, CheckinError> {
        // The Edge ID travels with the first check-in and after errors, like the agent info;
        // in the steady state the MAC covers it and the server supplies the bound one.
        let timestamp_ms = self.clock.next_timestamp();
        let request = self.checkin_request(timestamp_ms);
        let body = self.sign(&request, timestamp_ms, MAX_CONTROL_FRAME)?;
        Ok(Prepared {
            uri: self.target.checkin_uri(route).clone(),
            body,
            answer_limit: MAX_CONTROL_FRAME,
        })
    }

    /// One async-mode tick (see [`proto::async_mode`]): the agent's report out, the server's
    /// intervals and commands back. Retried like a check-in; the request is rebuilt for each
    /// attempt (a fresh timestamp), so retries repeat the results, which the server takes once.
    pub async fn async_tick(&mut self, tick: &AsyncTick) -> Result<AsyncAnswer, CheckinError> {
        self.call(
            UPLOAD_TIMEOUT,
            |c| c.prepare_async(tick),
            |c, raw| c.read_async_answer(raw),
        )
        .await
        .map(|(answer, _)| answer)
    }

    fn prepare_async(&mut self, tick: &AsyncTick) -> Result<Prepared, CheckinError> {
        let timestamp_ms = self.clock.next_timestamp();
        let request = AsyncRequest {
            checkin: self.checkin_request(timestamp_ms),
            snapshot: tick.snapshot.clone(),
            results: tick.results.clone(),
            done_through: tick.done_through,
        };
        let body = self.sign(&request, timestamp_ms, MAX_ASYNC_FRAME)?;
        Ok(Prepared {
            uri: self.target.async_tick.clone(),
            body,
            answer_limit: MAX_ASYNC_ANSWER,
        })
    }

    fn read_async_answer(&mut self, raw: RawAnswer) -> Result<AsyncAnswer, CheckinError> {
        if raw.status != StatusCode::OK {
            return Err(CheckinError::Protocol {
                status: raw.status.as_u16(),
                detail: "unexpected status".to_owned(),
            });
        }
        let answer: AsyncAnswer =
            codec::decode(&raw.body, MAX_ASYNC_ANSWER).map_err(|e| CheckinError::Protocol {
                status: 200,
                detail: format!("undecodable answer: {e}"),
            })?;
        if let Some(server_ms) = answer.server_time_ms {
            self.clock.learn(server_ms);
        }
        if let Some(smallest) = answer.intervals.smallest() {
            self.interval = Duration::from_secs(u64::from(smallest));
        }
        Ok(answer)
    }

    fn prepare_upload(&mut self, compressed: &[u8]) -> Result<Prepared, CheckinError> {
        let timestamp_ms = self.clock.next_timestamp();
        let upload = SnapshotUpload {
            endpoint_id: self.endpoint_id,
            edge_id: self.edge_id,
            timestamp_ms,
            body: compressed.to_vec(),
        };
        let body = self.sign(&upload, timestamp_ms, MAX_UPLOAD_FRAME)?;
        Ok(Prepared {
            uri: self.target.snapshot.clone(),
            body,
            answer_limit: MAX_ERROR_BODY,
        })
    }

    /// The check-in header every request carries: identity, timestamp, interval, and the
    /// agent's information on the first request of a process and after errors.
    fn checkin_request(&self, timestamp_ms: u64) -> CheckinRequest {
        CheckinRequest {
            endpoint_id: self.endpoint_id,
            edge_id: self.send_agent_info.then_some(self.edge_id),
            timestamp_lo: proto::wire::timestamp_lo(timestamp_ms),
            // The high bits go with the Edge ID, so a far-off clock is reported as skewed.
            timestamp_hi: self.send_agent_info.then_some((timestamp_ms >> 32) as u32),
            interval_secs: u32::try_from(self.interval.as_secs()).unwrap_or(u32::MAX),
            agent: self.send_agent_info.then(|| self.agent_info.clone()),
        }
    }

    /// A signed frame of `msg`, refused locally when it is over `limit` bytes.
    fn sign<T: serde::Serialize>(
        &self,
        msg: &T,
        timestamp_ms: u64,
        limit: usize,
    ) -> Result<Vec<u8>, CheckinError> {
        let body = proof::sign(msg, &self.key, &self.edge_id, timestamp_ms)
            .map_err(CheckinError::Encode)?;
        if body.len() > limit {
            return Err(CheckinError::TooLarge {
                len: body.len(),
                limit,
            });
        }
        Ok(body)
    }

    fn read_checkin_answer(&mut self, raw: RawAnswer) -> Result<CheckinOutcome, CheckinError> {
        let RawAnswer {
            status,
            body,
            connection,
        } = raw;
        if status == StatusCode::NO_CONTENT {
            // Nothing new: idle, our interval is current, our clock is fine.
            return Ok(CheckinOutcome {
                status: EdgeStatus::Idle,
                interval: self.interval,
                tunnel: None,
                connection,
                clock_corrected: false,
            });
        }
        if status != StatusCode::OK {
            return Err(CheckinError::Protocol {
                status: status.as_u16(),
                detail: "unexpected status".to_owned(),
            });
        }
        let answer: CheckinAnswer =
            codec::decode(&body, MAX_CONTROL_FRAME).map_err(|e| CheckinError::Protocol {
                status: 200,
                detail: format!("undecodable answer: {e}"),
            })?;
        let mut clock_corrected = false;
        if let Some(server_ms) = answer.server_time_ms {
            self.clock.learn(server_ms);
            clock_corrected = true;
        }
        self.interval = Duration::from_secs(u64::from(answer.interval_secs.max(1)));
        Ok(CheckinOutcome {
            status: answer.status,
            interval: self.interval,
            tunnel: answer.tunnel,
            connection,
            clock_corrected,
        })
    }

    /// Sends a request built by `prepare` (again for each retry: a fresh timestamp) and reads
    /// its answer with `read`, with the retries described at [`PollClient::checkin_via`].
    /// Returns whether the clock was corrected on the way.
    async fn call<T>(
        &mut self,
        timeout: Duration,
        mut prepare: impl FnMut(&mut Self) -> Result<Prepared, CheckinError>,
        mut read: impl FnMut(&mut Self, RawAnswer) -> Result<T, CheckinError>,
    ) -> Result<(T, bool), CheckinError> {
        let mut skew_fixed = false;
        let mut stale_replaced = false;
        let mut id_resent = false;
        loop {
            let result = match prepare(self) {
                Ok(prepared) => match tokio::time::timeout(timeout, self.attempt(prepared)).await {
                    Ok(result) => result.and_then(|raw| read(self, raw).map_err(Into::into)),
                    Err(_) => Err(CheckinError::Timeout(timeout).into()),
                },
                Err(e) => Err(e.into()),
            };
            let AttemptError { error, stale_reuse } = match result {
                Ok(value) => {
                    self.send_agent_info = false;
                    return Ok((value, skew_fixed));
                }
                Err(e) => e,
            };
            // "The first check-in after any error" carries the agent info again.
            self.send_agent_info = true;
            if error.breaks_connection() {
                self.conn = None;
            }
            if stale_reuse && !stale_replaced {
                stale_replaced = true;
                continue;
            }
            // The server lost our binding (e.g. restored store) while we omitted the Edge ID:
            // the retry carries it (send_agent_info is set above).
            if let CheckinError::Refused {
                code: RefusalCode::EdgeIdRequired,
                ..
            } = &error
            {
                if !id_resent {
                    id_resent = true;
                    continue;
                }
            }
            if let CheckinError::Refused {
                code: RefusalCode::ClockSkew,
                server_time_ms: Some(server_ms),
                ..
            } = &error
            {
                if !skew_fixed {
                    skew_fixed = true;
                    self.clock.learn(*server_ms);
                    tracing::info!(
                        offset_ms = self.clock.offset_ms(),
                        "clock corrected from the server's clock_skew answer"
                    );
                    continue;
                }
            }
            return Err(error);
        }
    }

    async fn attempt(&mut self, prepared: Prepared) -> Result<RawAnswer, AttemptError> {
        // Take the connection out: if this future is dropped (timeout, shutdown) midway, the
        // half-used connection goes with it.
        let mut reusable = self.conn.take();
        if let Some(sender) = reusable.as_mut() {
            if sender.ready().await.is_err() {
                reusable = None;
            }
        }
        let (mut sender, connection) = match reusable {
            Some(sender) => (sender, None),
            None => {
                let (sender, info) = self.connect().await?;
                (sender, Some(info))
            }
        };
        let reused = connection.is_none();

        let Prepared {
            uri,
            body,
            answer_limit,
        } = prepared;
        let body_len = body.len();
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(HOST, self.target.authority.clone());
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body_len));

        let response = sender.send_request(req).await.map_err(|e| {
            let stale = reused && is_dead_connection(&e);
            AttemptError {
                error: CheckinError::Http(e),
                stale_reuse: stale,
            }
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let limit = if status.is_success() {
            answer_limit
        } else {
            MAX_ERROR_BODY
        };
        let body = match Limited::new(response.into_body(), limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                return Err(match e.downcast::<hyper::Error>() {
                    Ok(e) => CheckinError::Http(*e),
                    Err(_) => CheckinError::Protocol {
                        status: status.as_u16(),
                        detail: format!("answer body larger than {limit} bytes"),
                    },
                }
                .into())
            }
        };
        // The exchange is complete: the connection can serve the next request.
        self.conn = Some(sender);
        if status.is_success() {
            Ok(RawAnswer {
                status,
                body,
                connection,
            })
        } else {
            Err(error_from_answer(status, retry_after, &body).into())
        }
    }

    async fn connect(&mut self) -> Result<(Sender, NewConnection), CheckinError> {
        let tcp = self.connect_tcp().await?;
        self.connects += 1;
        // Bytes of this connection only: the counters may be shared with other clients.
        let stream_counters = ByteCounters::new();
        let stream = CountingStream::new(tcp, stream_counters.clone());
        let tee = CountingStream::new(stream, self.counters.clone());
        let sender = match &self.target.tls {
            Some((config, name)) => {
                let tls = TlsConnector::from(config.clone())
                    .connect(name.clone(), tee)
                    .await
                    .map_err(|source| CheckinError::Tls {
                        host: self.target.host.to_string(),
                        source,
                    })?;
                http_handshake(tls).await?
            }
            None => http_handshake(tee).await?,
        };
        Ok((
            sender,
            NewConnection {
                handshake_bytes: stream_counters.snapshot().total(),
            },
        ))
    }

    async fn connect_tcp(&self) -> Result<TcpStream, CheckinError> {
        let addrs: Vec<SocketAddr> = match &self.target.host {
            url::Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(*ip), self.target.port)],
            url::Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(*ip), self.target.port)],
            url::Host::Domain(name) => tokio::net::lookup_host((name.as_str(), self.target.port))
                .await
                .map_err(|source| CheckinError::Resolve {
                    host: name.clone(),
                    source,
                })?
                .collect(),
        };
        let mut last_err = None;
        for addr in addrs {
            match self.connect_addr(addr).await {
                Ok(stream) => return Ok(stream),
                Err(source) => last_err = Some((addr, source)),
            }
        }
        let (addr, source) = last_err.unwrap_or_else(|| {
            (
                SocketAddr::new(IpAddr::from([0, 0, 0, 0]), self.target.port),
                io::Error::new(io::ErrorKind::NotFound, "no address found"),
            )
        });
        Err(CheckinError::Connect {
            addr: addr.to_string(),
            source,
        })
    }

    async fn connect_addr(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(local) = self.local_addr.filter(|l| l.is_ipv4() == addr.is_ipv4()) {
            socket.bind(SocketAddr::new(local, 0))?;
        }
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Whether a send failed because the peer had already closed the kept-alive connection (idle
/// timeout, restart): then a fresh connection can carry the same check-in at once.
fn is_dead_connection(e: &hyper::Error) -> bool {
    if e.is_canceled() || e.is_closed() || e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            );
        }
        source = err.source();
    }
    false
}

async fn http_handshake<T>(io: T) -> Result<Sender, CheckinError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(CheckinError::Http)?;
    // The connection task ends when the sender is dropped or the peer goes away.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "check-in connection closed");
        }
    });
    Ok(sender)
}

/// The JSON error body of the control plane.
#[derive(Debug, Default, serde::Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: String,
    #[serde(default, rename = "serverTimeMs")]
    server_time_ms: Option<u64>,
}

/// Maps a non-200 answer to an error. Public for tests of the mapping.
pub fn error_from_answer(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> CheckinError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let message = match &parsed {
        Some(b) => clean_message(&b.message),
        None => clean_message(&String::from_utf8_lossy(body)),
    };
    let code = parsed.as_ref().map(|b| b.code.as_str()).unwrap_or("");
    let server_time_ms = parsed.as_ref().and_then(|b| b.server_time_ms);
    match status.as_u16() {
        503 | 429 => CheckinError::Busy { retry_after },
        s @ 500..=599 => CheckinError::Server { status: s, message },
        s @ 400..=499 => CheckinError::Refused {
            status: s,
            code: RefusalCode::parse(code),
            message,
            server_time_ms,
        },
        s => CheckinError::Protocol {
            status: s,
            detail: format!("unexpected status: {message}"),
        },
    }
}

/// Server text goes into logs: keep it short and on one line.
fn clean_message(raw: &str) -> String {
    raw.chars()
        .take(MAX_MESSAGE_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_mapping() {
        let e = error_from_answer(
            StatusCode::UNAUTHORIZED,
            None,
            br#"{"message":"clock off","code":"clock_skew","serverTimeMs":1234}"#,
        );
        assert!(matches!(
            &e,
            CheckinError::Refused { status: 401, code: RefusalCode::ClockSkew, server_time_ms: Some(1234), message } if message == "clock off"
        ));
        assert_eq!(e.kind(), "clock_skew");
        assert_eq!(e.retry_class(), RetryClass::Refused);

        let e = error_from_answer(
            StatusCode::FORBIDDEN,
            None,
            br#"{"message":"bound to another","code":"edge_id_mismatch"}"#,
        );
        assert_eq!(e.kind(), "edge_id_mismatch");
        assert!(e.to_string().contains("reset its association"));

        for (code, kind) in [
            ("bad_proof", "bad_proof"),
            ("agent_secret_mismatch", "agent_secret_mismatch"),
            ("replay", "replay"),
            ("unknown_environment", "unknown_environment"),
            ("bad_request", "bad_request"),
            ("whatever", "refused_other"),
        ] {
            let body = format!(r#"{{"message":"m","code":"{code}"}}"#);
            let e = error_from_answer(StatusCode::NOT_FOUND, None, body.as_bytes());
            assert_eq!(e.kind(), kind);
        }

        let e = error_from_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(3)),
            b"{}",
        );
        assert_eq!(
            e.retry_class(),
            RetryClass::Busy(Some(Duration::from_secs(3)))
        );
        let e = error_from_answer(StatusCode::BAD_GATEWAY, None, b"<html>\nbad\n</html>");
        assert!(
            matches!(&e, CheckinError::Server { status: 502, message } if !message.contains('\n'))
        );
        assert_eq!(e.retry_class(), RetryClass::Backoff);
        let e = error_from_answer(StatusCode::FOUND, None, b"");
        assert_eq!(e.kind(), "protocol");
    }

    #[test]
    fn server_messages_are_bounded_and_single_line() {
        let long = "x\r\n".repeat(1000);
        let m = clean_message(&long);
        assert!(m.chars().count() <= MAX_MESSAGE_CHARS);
        assert!(!m.contains('\n'));
    }

    #[test]
    fn target_from_urls() {
        let cfg = || tls::client_config([0; 32], false);
        let t = Target::new("https://cp.example.com:9443", cfg).unwrap();
        assert_eq!(t.authority, "cp.example.com:9443");
        assert_eq!(t.port, 9443);
        assert_eq!(t.checkin, proto::wire::CHECKIN_PATH);
        assert_eq!(t.checkin_uri(CheckinRoute::Held), HELD_CHECKIN_PATH);
        assert_eq!(t.checkin_uri(CheckinRoute::AskTunnel), TUNNEL_REQUEST_PATH);
        assert_eq!(t.snapshot, SNAPSHOT_PATH);
        assert!(t.tls.is_some());

        let t = Target::new("https://cp.example.com/prefix/", cfg).unwrap();
        assert_eq!(t.authority, "cp.example.com");
        assert_eq!(t.port, 443);
        assert_eq!(
            t.checkin,
            format!("/prefix{}", proto::wire::CHECKIN_PATH).as_str()
        );
        assert_eq!(t.snapshot, format!("/prefix{SNAPSHOT_PATH}").as_str());

        let t = Target::new("https://[::1]:9443", cfg).unwrap();
        assert_eq!(t.authority, "[::1]:9443");
        assert!(matches!(t.tls, Some((_, ServerName::IpAddress(_)))));

        let t = Target::new("http://127.0.0.1:8080", cfg).unwrap();
        assert!(t.tls.is_none());
        assert!(Target::new("ftp://x", cfg).is_err());
    }
}
