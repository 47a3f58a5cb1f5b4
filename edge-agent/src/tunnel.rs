//! The reverse tunnel: opened on the control plane's request, carries the operator's Docker API
//! connections to the local engine, closes itself when idle and comes back by itself when it
//! drops while wanted.
//!
//! * [`handshake`]: TCP (3 s) and TLS pinned to the join token's fingerprint, then the
//!   one-time credentials in a [`Hello::Agent`] and the gateway's [`HelloAnswer`], all within
//!   [`HANDSHAKE_TIMEOUT`].
//! * `serve`: yamux (the agent is the server): the agent opens the control stream and answers
//!   pings on it; every stream the gateway opens is connected to `DOCKER_HOST` and answered
//!   with a [`StreamOpen`] frame, then piped both ways (half-close included). No stream for
//!   `EDGE_INACTIVITY_TIMEOUT` ([`Inactivity`]): a snapshot goes home, then the tunnel closes
//!   with [`CloseReason::Inactive`].
//! * `supervise`: takes credentials from the main loop, opens tunnels, and when one is lost
//!   (not closed on purpose) asks for fresh credentials on the tunnel request route with
//!   jittered backoff ([`Reconnect`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::mux::{self, read_frame, write_frame, ControlEnd, Mode, MuxStream, Session};
use proto::seal::{SealError, SealKey};
use proto::tunnel::{
    CloseReason, Control, Hello, HelloAnswer, HelloRefusal, StreamOpen, StreamRefusal, DEAD_AFTER,
    HANDSHAKE_TIMEOUT,
};
use proto::wire::{EdgeStatus, SealedCredentials};
use rand::Rng;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::docker::{self, DockerHost};
use crate::home::Home;
use crate::retry::{Backoff, LogDecision, LogThrottle};

/// TCP connect to one gateway.
pub const GATEWAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Connecting a stream to the engine.
pub const ENGINE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect step after repeated losses or failures; doubles up to [`RECONNECT_CAP`].
pub const RECONNECT_BASE: Duration = Duration::from_millis(200);
pub const RECONNECT_CAP: Duration = Duration::from_secs(10);
/// A tunnel that stayed up this long was stable: the next loss reconnects at once again.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// A lost tunnel is asked for again for at least this long (or the inactivity timeout, if
/// longer: by then nobody is waiting for it), then the agent waits for the control plane.
pub const RECOVERY_MIN_WINDOW: Duration = Duration::from_secs(60);
/// How long closing (the `Closing` frame, the session's GoAway) may take.
/// Copy buffers of a Docker stream. Answers (logs, exports, `docker cp` out) are the bulk
/// direction: 64 KiB reads from the engine need a third fewer CPU-seconds per GB than tokio's
/// default 8 KiB (`cargo bench -p control-plane --bench tunnel`, hops `agent_copy_*`).
const FROM_ENGINE_BUFFER: usize = 64 * 1024;
const TO_ENGINE_BUFFER: usize = 16 * 1024;
/// Between yamux and TLS, so consecutive frames leave as full TLS records in one `write`.
const TUNNEL_WRITE_BUFFER: usize = 64 * 1024;

const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest engine error text put into a stream refusal.
const MAX_REFUSAL_CHARS: usize = 1000;

/// What a tunnel needs to know, fixed for the agent's life.
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    pub endpoint_id: u64,
    pub edge_id: Uuid,
    /// Opens the sealed credentials (join secret + Edge ID).
    pub seal: SealKey,
    /// The join token's tunnel address: used when credentials name no gateway.
    pub default_gateway: String,
    /// Pinned to the join token's fingerprint ([`crate::tls::tunnel_config`]).
    pub tls: Arc<rustls::ClientConfig>,
    pub docker: DockerHost,
    pub inactivity_timeout: Duration,
}

/// Why a tunnel could not be opened through one gateway. Each names the gateway and says
/// whether another gateway could help ([`TunnelError::try_next`]).
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("gateway address {addr:?} is not host:port")]
    BadAddress { addr: String },
    #[error("cannot connect to gateway {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("gateway {addr} did not accept the connection within {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("gateway {addr} presented a certificate whose fingerprint does not match EDGE_KEY")]
    FingerprintMismatch { addr: String },
    #[error("tls handshake with gateway {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("tunnel handshake with gateway {addr} failed: {detail}")]
    Handshake { addr: String, detail: String },
    #[error("gateway {addr} did not complete the tunnel handshake within {timeout:?}")]
    HandshakeTimeout { addr: String, timeout: Duration },
    #[error("gateway refused the tunnel credentials ({code:?}): {message}")]
    Refused {
        addr: String,
        code: HelloRefusal,
        message: String,
    },
}

impl TunnelError {
    /// The gateway this is about.
    pub fn gateway(&self) -> &str {
        match self {
            Self::BadAddress { addr }
            | Self::Connect { addr, .. }
            | Self::ConnectTimeout { addr, .. }
            | Self::FingerprintMismatch { addr }
            | Self::Tls { addr, .. }
            | Self::Handshake { addr, .. }
            | Self::HandshakeTimeout { addr, .. }
            | Self::Refused { addr, .. } => addr,
        }
    }

    /// Whether the same credentials may work on another gateway: not once a gateway judged
    /// them (they are unknown, used, expired, or someone else's everywhere).
    pub fn try_next(&self) -> bool {
        !matches!(
            self,
            Self::Refused {
                code: HelloRefusal::BadCredentials | HelloRefusal::Mismatch,
                ..
            }
        )
    }

    /// A fixed label for log throttling.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadAddress { .. } => "bad_address",
            Self::Connect { .. } => "connect",
            Self::ConnectTimeout { .. } => "connect_timeout",
            Self::FingerprintMismatch { .. } => "fingerprint_mismatch",
            Self::Tls { .. } => "tls",
            Self::Handshake { .. } => "handshake",
            Self::HandshakeTimeout { .. } => "handshake_timeout",
            Self::Refused { .. } => "refused",
        }
    }
}

/// A gateway accepted the credentials; the multiplexer starts on `stream`.
#[derive(Debug)]
pub struct Established {
    pub stream: TlsStream<TcpStream>,
    pub gateway_id: String,
    pub epoch: u64,
    pub addr: String,
}

/// The TLS server name for `host:port` (any valid name works: the certificate is pinned).
fn server_name(addr: &str) -> Option<ServerName<'static>> {
    let host = match addr.strip_prefix('[') {
        Some(rest) => rest.split_once(']')?.0,
        None => addr.rsplit_once(':')?.0,
    };
    if host.is_empty() {
        return None;
    }
    ServerName::try_from(host.to_owned()).ok()
}

/// Opens a tunnel connection to the gateway at `addr` (`host:port`) and presents `hello`.
/// `tls` must pin the gateway certificate ([`crate::tls::tunnel_config`]): on a mismatch
/// nothing is sent after the TLS handshake.
pub async fn handshake(
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    hello: &Hello,
) -> Result<Established, TunnelError> {
    let name = server_name(addr).ok_or_else(|| TunnelError::BadAddress {
        addr: addr.to_owned(),
    })?;
    let tcp = match tokio::time::timeout(GATEWAY_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) => {
            return Err(TunnelError::Connect {
                addr: addr.to_owned(),
                source,
            })
        }
        Err(_) => {
            return Err(TunnelError::ConnectTimeout {
                addr: addr.to_owned(),
                timeout: GATEWAY_CONNECT_TIMEOUT,
            })
        }
    };
    let _ = tcp.set_nodelay(true);
    let exchange = async {
        let mut stream = TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| {
                if crate::tls::is_certificate_rejection(&source) {
                    TunnelError::FingerprintMismatch {
                        addr: addr.to_owned(),
                    }
                } else {
                    TunnelError::Tls {
                        addr: addr.to_owned(),
                        source,
                    }
                }
            })?;
        let failed = |detail: String| TunnelError::Handshake {
            addr: addr.to_owned(),
            detail,
        };
        write_frame(&mut stream, hello)
            .await
            .map_err(|e| failed(format!("sending the hello: {e}")))?;
        let answer: HelloAnswer = read_frame(&mut stream)
            .await
            .map_err(|e| failed(format!("reading the answer: {e}")))?;
        match answer {
            HelloAnswer::Accepted { gateway_id, epoch } => Ok(Established {
                stream,
                gateway_id: docker::one_line(&gateway_id, 100),
                epoch,
                addr: addr.to_owned(),
            }),
            HelloAnswer::Refused { code, message } => Err(TunnelError::Refused {
                addr: addr.to_owned(),
                code,
                message: docker::one_line(&message, 200),
            }),
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err(TunnelError::HandshakeTimeout {
            addr: addr.to_owned(),
            timeout: HANDSHAKE_TIMEOUT,
        }),
    }
}

/// Tries the gateways of `gateways` in order (empty: `default`) until one accepts.
async fn open_any(
    settings: &TunnelSettings,
    gateways: &[String],
    token: [u8; 32],
) -> Result<Established, Vec<TunnelError>> {
    let hello = Hello::Agent {
        endpoint_id: settings.endpoint_id,
        edge_id: settings.edge_id,
        token,
    };
    let fallback = [settings.default_gateway.clone()];
    let gateways = if gateways.is_empty() {
        &fallback[..]
    } else {
        gateways
    };
    let mut errors = Vec::new();
    for addr in gateways {
        match handshake(addr, &settings.tls, &hello).await {
            Ok(established) => return Ok(established),
            Err(e) => {
                let next = e.try_next();
                errors.push(e);
                if !next {
                    break;
                }
            }
        }
    }
    Err(errors)
}

/// When an open tunnel counts as idle: no stream open for the timeout. Pure; time is passed in.
#[derive(Debug, Clone)]
pub struct Inactivity {
    timeout: Duration,
    open: usize,
    idle_since: Option<Instant>,
}

impl Inactivity {
    pub fn new(timeout: Duration, now: Instant) -> Self {
        Self {
            timeout,
            open: 0,
            idle_since: Some(now),
        }
    }

    pub fn opened(&mut self) {
        self.open += 1;
        self.idle_since = None;
    }

    pub fn closed(&mut self, now: Instant) {
        self.open = self.open.saturating_sub(1);
        if self.open == 0 {
            self.idle_since = Some(now);
        }
    }

    pub fn open_streams(&self) -> usize {
        self.open
    }

    /// When the tunnel becomes idle, if no stream opens before; `None` while streams are open.
    pub fn deadline(&self) -> Option<Instant> {
        self.idle_since.map(|t| t + self.timeout)
    }

    pub fn is_idle(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }
}

/// Reconnect pacing after a lost tunnel: at once after a stable tunnel, then jittered
/// exponential backoff ([`RECONNECT_BASE`] doubling to [`RECONNECT_CAP`]) while tunnels keep
/// dropping early or attempts keep failing.
#[derive(Debug, Clone)]
pub struct Reconnect {
    backoff: Backoff,
    losses: u32,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            backoff: Backoff::new(RECONNECT_BASE),
            losses: 0,
        }
    }
}

impl Reconnect {
    /// A tunnel that had been up for `up_for` was lost: the delay before asking again.
    pub fn on_lost<R: Rng + ?Sized>(&mut self, up_for: Duration, rng: &mut R) -> Duration {
        if up_for >= STABLE_AFTER {
            self.backoff.reset();
            self.losses = 0;
        }
        self.losses = self.losses.saturating_add(1);
        if self.losses == 1 {
            Duration::ZERO
        } else {
            self.backoff.next_delay(RECONNECT_CAP, rng)
        }
    }

    /// An attempt to get the tunnel back failed: the delay before the next one.
    pub fn on_failure<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        self.backoff.next_delay(RECONNECT_CAP, rng)
    }
}

/// Why an open tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Closed on purpose after `EDGE_INACTIVITY_TIMEOUT` without streams.
    Inactive,
    /// Closed because the agent shuts down.
    Shutdown,
    /// Ended otherwise: the agent asks for it again.
    Lost(LostReason),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LostReason {
    #[error("gateway silent for {0:?}")]
    Silent(Duration),
    #[error("control stream ended")]
    ControlEnded,
    #[error("gateway is closing ({0:?})")]
    GatewayClosing(CloseReason),
    #[error("session ended")]
    SessionEnded,
    #[error("could not open the control stream: {0}")]
    ControlOpen(String),
}

fn lost(end: ControlEnd) -> LostReason {
    match end {
        ControlEnd::Silent => LostReason::Silent(DEAD_AFTER),
        ControlEnd::PeerClosing(reason) => LostReason::GatewayClosing(reason),
        ControlEnd::Ended | ControlEnd::Local => LostReason::ControlEnded,
    }
}

/// The agent's side of the control stream. Like [`proto::mux::control_responder`], but the
/// close reason is chosen when stopping (idle or shutdown), through `stop`.
async fn respond<S>(stream: S, mut stop: watch::Receiver<Option<CloseReason>>) -> ControlEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    // The opener writes first: this announces the stream to the gateway.
    if write_frame(&mut wr, &Control::Pong(0)).await.is_err() {
        return ControlEnd::Ended;
    }
    let (msg_tx, mut msg_rx) = mpsc::channel::<Option<Control>>(4);
    // Reads happen in their own future so a half-read frame is never cancelled.
    let reader = async move {
        loop {
            let msg = read_frame::<_, Control>(&mut rd).await.ok();
            let end = msg.is_none();
            if msg_tx.send(msg).await.is_err() || end {
                break;
            }
        }
        std::future::pending::<ControlEnd>().await
    };
    let writer = async {
        let deadline = tokio::time::sleep(DEAD_AFTER);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                // The guard of the watch value must not live across an await: copy it out.
                reason = async {
                    match stop.wait_for(Option::is_some).await {
                        Ok(reason) => *reason,
                        Err(_) => None,
                    }
                } => {
                    if let Some(reason) = reason {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            write_frame(&mut wr, &Control::Closing(reason)),
                        )
                        .await;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
                    return ControlEnd::Local;
                }
                () = &mut deadline => return ControlEnd::Silent,
                msg = msg_rx.recv() => match msg {
                    Some(Some(Control::Ping(n))) => {
                        deadline.as_mut().reset(Instant::now() + DEAD_AFTER);
                        if write_frame(&mut wr, &Control::Pong(n)).await.is_err() {
                            return ControlEnd::Ended;
                        }
                    }
                    Some(Some(Control::Pong(_))) => {
                        deadline.as_mut().reset(Instant::now() + DEAD_AFTER);
                    }
                    Some(Some(Control::Closing(reason))) => return ControlEnd::PeerClosing(reason),
                    Some(None) | None => return ControlEnd::Ended,
                },
            }
        }
    };
    tokio::select! {
        end = writer => end,
        end = reader => end,
    }
}

/// Serves one Docker stream: connect to the engine, say how that went, then pipe.
/// `engine_down` is shared by the streams of one tunnel: an unreachable engine is logged once
/// until it is reachable again (the operator sees every refusal anyway).
async fn serve_stream(mut stream: MuxStream, docker: DockerHost, engine_down: Arc<AtomicBool>) {
    let mut engine = match docker.connect(ENGINE_CONNECT_TIMEOUT).await {
        Ok(engine) => {
            engine_down.store(false, Ordering::Relaxed);
            engine
        }
        Err(e) => {
            let message = docker::one_line(
                &format!("cannot connect to DOCKER_HOST {docker}: {e}"),
                MAX_REFUSAL_CHARS,
            );
            if engine_down.swap(true, Ordering::Relaxed) {
                debug!("{message}");
            } else {
                warn!("{message}");
            }
            let refusal = StreamOpen::Refused {
                code: StreamRefusal::EngineUnreachable,
                message,
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                let _ = write_frame(&mut stream, &refusal).await;
                let _ = stream.shutdown().await;
            })
            .await;
            return;
        }
    };
    if write_frame(&mut stream, &StreamOpen::Ok).await.is_err() {
        return;
    }
    // Each direction ends on its own (end of input is passed on as a half-close, so
    // `docker exec -i` can close stdin while output keeps flowing); then both are shut.
    if let Err(e) = tokio::io::copy_bidirectional_with_sizes(
        &mut stream,
        &mut engine,
        TO_ENGINE_BUFFER,
        FROM_ENGINE_BUFFER,
    )
    .await
    {
        debug!(error = %e, "docker stream ended with an error");
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = stream.shutdown().await;
        let _ = engine.shutdown().await;
    })
    .await;
}

async fn join_opt<T>(handle: &mut Option<JoinHandle<T>>) {
    match handle {
        Some(h) => {
            let _ = h.await;
        }
        None => std::future::pending().await,
    }
}

/// Runs an accepted tunnel until it is idle, lost, or the agent shuts down.
async fn serve(
    established: Established,
    settings: Arc<TunnelSettings>,
    home: Arc<Home>,
    shutdown: CancellationToken,
) -> TunnelEnd {
    let Session {
        opener,
        mut inbound,
    } = mux::spawn_buffered(established.stream, Mode::Server, TUNNEL_WRITE_BUFFER);
    let control = match opener.open().await {
        Ok(stream) => stream,
        Err(e) => {
            opener.close();
            return TunnelEnd::Lost(LostReason::ControlOpen(e.to_string()));
        }
    };
    let (stop_tx, stop_rx) = watch::channel(None);
    let control = respond(control, stop_rx);
    tokio::pin!(control);
    let mut streams = JoinSet::new();
    let mut idle = Inactivity::new(settings.inactivity_timeout, Instant::now());
    // The snapshot sent before an idle close, and whether a stream opened meanwhile.
    let mut snapshot: Option<JoinHandle<()>> = None;
    let mut busy_since_snapshot = false;
    let engine_down = Arc::new(AtomicBool::new(false));
    let end = loop {
        let deadline = idle.deadline();
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break TunnelEnd::Shutdown,
            end = &mut control => break TunnelEnd::Lost(lost(end)),
            stream = inbound.recv() => match stream {
                Some(stream) => {
                    idle.opened();
                    busy_since_snapshot = true;
                    streams.spawn(serve_stream(
                        stream,
                        settings.docker.clone(),
                        engine_down.clone(),
                    ));
                }
                None => break TunnelEnd::Lost(LostReason::SessionEnded),
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => idle.closed(Instant::now()),
            () = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            }, if snapshot.is_none() && deadline.is_some() => {
                // Idle: the snapshot goes home first, while streams are still served.
                busy_since_snapshot = false;
                let home = home.clone();
                snapshot = Some(tokio::spawn(async move {
                    home.send_snapshot_logged("idle").await;
                }));
            }
            () = join_opt(&mut snapshot), if snapshot.is_some() => {
                snapshot = None;
                if !busy_since_snapshot && idle.is_idle(Instant::now()) {
                    break TunnelEnd::Inactive;
                }
            }
        }
    };
    let reason = match end {
        TunnelEnd::Inactive => Some(CloseReason::Inactive),
        TunnelEnd::Shutdown => Some(CloseReason::Shutdown),
        TunnelEnd::Lost(_) => None,
    };
    if let Some(reason) = reason {
        let _ = stop_tx.send(Some(reason));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut control).await;
    }
    if let Some(h) = snapshot {
        h.abort();
    }
    opener.close();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, opener.closed()).await;
    streams.abort_all();
    if end == TunnelEnd::Inactive {
        info!(
            "tunnel closed after {} without streams",
            humantime::format_duration(settings.inactivity_timeout)
        );
    }
    end
}

/// The newest credentials from the main loop (older ones are useless once newer exist).
#[derive(Debug, Default)]
pub struct CredentialSlot {
    value: Mutex<Option<SealedCredentials>>,
    notify: Notify,
}

impl CredentialSlot {
    pub fn put(&self, sealed: SealedCredentials) {
        *self.value.lock().unwrap_or_else(|p| p.into_inner()) = Some(sealed);
        self.notify.notify_one();
    }

    pub async fn take(&self) -> SealedCredentials {
        loop {
            if let Some(v) = self.value.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return v;
            }
            self.notify.notified().await;
        }
    }
}

struct Current {
    task: JoinHandle<TunnelEnd>,
    opened: Instant,
}

struct Recovery {
    since: Instant,
    next_at: Instant,
    throttle: LogThrottle,
}

/// Owns the agent's tunnel: see the module docs.
struct Supervisor {
    settings: Arc<TunnelSettings>,
    home: Arc<Home>,
    shutdown: CancellationToken,
    current: Option<Current>,
    /// Tunnels replaced by a newer one: they run on until their gateway closes them (their
    /// location epoch is outdated) or they go idle; they are only awaited at shutdown.
    retired: JoinSet<()>,
    recovery: Option<Recovery>,
    reconnect: Reconnect,
}

/// Runs the tunnel side of the agent until `shutdown`; credentials come through `slot`.
pub async fn supervise(
    settings: TunnelSettings,
    home: Arc<Home>,
    slot: Arc<CredentialSlot>,
    shutdown: CancellationToken,
) {
    let mut s = Supervisor {
        settings: Arc::new(settings),
        home,
        shutdown: shutdown.clone(),
        current: None,
        retired: JoinSet::new(),
        recovery: None,
        reconnect: Reconnect::default(),
    };
    loop {
        let recover_at = s.recovery.as_ref().map(|r| r.next_at);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            end = wait_current(&mut s.current), if s.current.is_some() => {
                let end = end.unwrap_or(TunnelEnd::Lost(LostReason::SessionEnded));
                s.ended(end);
            }
            sealed = slot.take() => {
                if s.attempt(sealed, false).await {
                    s.recovery = None;
                }
            }
            () = async {
                match recover_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            }, if recover_at.is_some() => s.recover().await,
            Some(_) = s.retired.join_next(), if !s.retired.is_empty() => {}
        }
    }
    // Tunnels close themselves on the shutdown token (with `Closing(Shutdown)`).
    if let Some(c) = s.current.take() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT * 2, c.task).await;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT * 2, async {
        while s.retired.join_next().await.is_some() {}
    })
    .await;
}

async fn wait_current(current: &mut Option<Current>) -> Result<TunnelEnd, tokio::task::JoinError> {
    match current {
        Some(c) => (&mut c.task).await,
        None => std::future::pending().await,
    }
}

impl Supervisor {
    fn ended(&mut self, end: TunnelEnd) {
        let Some(current) = self.current.take() else {
            return;
        };
        if let TunnelEnd::Lost(reason) = end {
            warn!("tunnel lost ({reason}); asking for a new one");
            let now = Instant::now();
            let delay = self
                .reconnect
                .on_lost(now - current.opened, &mut rand::thread_rng());
            self.recovery = Some(Recovery {
                since: now,
                next_at: now + delay,
                throttle: LogThrottle::default(),
            });
        }
    }

    /// Opens `sealed` and tries its gateways; `true` when a tunnel opened. In recovery
    /// (`quiet`), repeated failures are logged once per kind.
    async fn attempt(&mut self, sealed: SealedCredentials, quiet: bool) -> bool {
        let creds = match self.settings.seal.open(&sealed) {
            Ok(creds) => creds,
            Err(SealError::Open) => {
                warn!("could not open tunnel credentials: they were not sealed for this EDGE_KEY and Edge ID");
                return false;
            }
            Err(e) => {
                warn!("could not open tunnel credentials: {e}");
                return false;
            }
        };
        let result = tokio::select! {
            () = self.shutdown.cancelled() => return false,
            result = open_any(&self.settings, &creds.gateways, creds.token) => result,
        };
        drop(creds);
        match result {
            Ok(established) => {
                info!(
                    gateway = %established.gateway_id,
                    epoch = established.epoch,
                    addr = %established.addr,
                    "tunnel open"
                );
                let task = tokio::spawn(serve(
                    established,
                    self.settings.clone(),
                    self.home.clone(),
                    self.shutdown.child_token(),
                ));
                let new = Current {
                    task,
                    opened: Instant::now(),
                };
                if let Some(old) = self.current.replace(new) {
                    debug!("a newer tunnel replaces the open one");
                    self.retired.spawn(async move {
                        let _ = old.task.await;
                    });
                }
                true
            }
            Err(errors) => {
                for e in errors {
                    let log = match (quiet, self.recovery.as_mut()) {
                        (true, Some(r)) => !matches!(
                            r.throttle.failure(e.kind(), std::time::Instant::now()),
                            LogDecision::Quiet
                        ),
                        _ => true,
                    };
                    if log {
                        warn!(gateway = %e.gateway(), "{e}");
                    }
                }
                false
            }
        }
    }

    /// One step of getting a lost tunnel back: ask for credentials, try them.
    async fn recover(&mut self) {
        let window = self.settings.inactivity_timeout.max(RECOVERY_MIN_WINDOW);
        if self
            .recovery
            .as_ref()
            .is_some_and(|r| r.since.elapsed() > window)
        {
            warn!(
                "could not restore the tunnel within {}; waiting for the control plane to ask again",
                humantime::format_duration(window)
            );
            self.recovery = None;
            return;
        }
        let answer = tokio::select! {
            () = self.shutdown.cancelled() => return,
            answer = self.home.ask_tunnel() => answer,
        };
        match answer {
            Ok(outcome) => match (outcome.status, outcome.tunnel) {
                (EdgeStatus::Required, Some(sealed)) => {
                    if self.attempt(sealed, true).await {
                        self.recovery = None;
                        return;
                    }
                }
                _ => {
                    info!("the control plane does not want the tunnel any more");
                    self.recovery = None;
                    return;
                }
            },
            Err(e) => {
                if let Some(r) = self.recovery.as_mut() {
                    if !matches!(
                        r.throttle.failure(e.kind(), std::time::Instant::now()),
                        LogDecision::Quiet
                    ) {
                        warn!(kind = e.kind(), "tunnel request failed: {e}");
                    }
                }
            }
        }
        let delay = self.reconnect.on_failure(&mut rand::thread_rng());
        if let Some(r) = self.recovery.as_mut() {
            r.next_at = Instant::now() + delay;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[tokio::test(start_paused = true)]
    async fn inactivity_counts_from_the_last_stream() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(300);
        let mut idle = Inactivity::new(timeout, t0);
        assert_eq!(idle.deadline(), Some(t0 + timeout));
        assert!(!idle.is_idle(t0 + timeout - Duration::from_millis(1)));
        assert!(idle.is_idle(t0 + timeout));

        // Any open stream is activity, however long it stays open.
        idle.opened();
        idle.opened();
        assert_eq!(idle.deadline(), None);
        assert!(!idle.is_idle(t0 + timeout * 10));
        let t1 = t0 + Duration::from_secs(1000);
        idle.closed(t1);
        assert_eq!(idle.open_streams(), 1);
        assert_eq!(idle.deadline(), None);
        let t2 = t1 + Duration::from_secs(5);
        idle.closed(t2);
        assert_eq!(idle.deadline(), Some(t2 + timeout));
        // Unbalanced closes do not underflow.
        idle.closed(t2);
        assert_eq!(idle.open_streams(), 0);
    }

    #[test]
    fn reconnect_is_immediate_after_a_stable_tunnel_then_backs_off() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut r = Reconnect::default();
        assert_eq!(
            r.on_lost(Duration::from_secs(3600), &mut rng),
            Duration::ZERO
        );
        // Failures back off within the doubling ceilings, up to the cap.
        let mut ceiling = RECONNECT_BASE;
        for _ in 0..20 {
            let d = r.on_failure(&mut rng);
            assert!(d <= ceiling && d <= RECONNECT_CAP, "{d:?} > {ceiling:?}");
            ceiling = (ceiling * 2).min(RECONNECT_CAP);
        }
        // A tunnel that drops early again does not reset the pace...
        let d = r.on_lost(Duration::from_secs(2), &mut rng);
        assert!(d <= RECONNECT_CAP);
        // ...one that stayed up for a while does.
        assert_eq!(r.on_lost(STABLE_AFTER, &mut rng), Duration::ZERO);
        let d = r.on_failure(&mut rng);
        assert!(d <= RECONNECT_BASE, "{d:?}");
    }

    #[test]
    fn flapping_tunnels_back_off() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut r = Reconnect::default();
        let delays: Vec<_> = (0..10)
            .map(|_| r.on_lost(Duration::from_secs(1), &mut rng))
            .collect();
        assert_eq!(delays[0], Duration::ZERO);
        assert!(delays.iter().all(|d| *d <= RECONNECT_CAP));
        assert!(
            delays[1..].iter().any(|d| *d > RECONNECT_BASE),
            "{delays:?}"
        );
    }

    #[test]
    fn gateway_addresses_become_server_names() {
        assert!(matches!(
            server_name("gw.example.com:8000"),
            Some(ServerName::DnsName(_))
        ));
        assert!(matches!(
            server_name("127.0.0.1:8000"),
            Some(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("[::1]:8000"),
            Some(ServerName::IpAddress(_))
        ));
        assert!(server_name("no-port").is_none());
        assert!(server_name(":8000").is_none());
    }

    #[test]
    fn refusals_say_whether_another_gateway_can_help() {
        let refused = |code| TunnelError::Refused {
            addr: "gw:1".into(),
            code,
            message: "m".into(),
        };
        assert!(!refused(HelloRefusal::BadCredentials).try_next());
        assert!(!refused(HelloRefusal::Mismatch).try_next());
        assert!(refused(HelloRefusal::Unavailable).try_next());
        assert_eq!(
            refused(HelloRefusal::BadCredentials).to_string(),
            "gateway refused the tunnel credentials (BadCredentials): m"
        );
        let mismatch = TunnelError::FingerprintMismatch {
            addr: "gw:1".into(),
        };
        assert!(mismatch.try_next());
        assert_eq!(
            mismatch.to_string(),
            "gateway gw:1 presented a certificate whose fingerprint does not match EDGE_KEY"
        );
    }

    #[tokio::test]
    async fn the_slot_keeps_only_the_newest_credentials() {
        let slot = CredentialSlot::default();
        let sealed = |n| SealedCredentials {
            nonce: [n; 12],
            ciphertext: vec![n],
        };
        slot.put(sealed(1));
        slot.put(sealed(2));
        assert_eq!(slot.take().await, sealed(2));
        let slot = Arc::new(slot);
        let waiter = tokio::spawn({
            let slot = slot.clone();
            async move { slot.take().await }
        });
        tokio::task::yield_now().await;
        slot.put(sealed(3));
        assert_eq!(waiter.await.unwrap(), sealed(3));
    }
}
