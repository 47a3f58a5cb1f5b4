//! [`Gateway`]: the tunnel listener, its admission of connections (`crate::admission`), the
//! first-byte deadline, the handshake itself
//! (TLS, then the hello), the tunnels it holds and their clean-up, and shutdown. What follows
//! a hello lives beside it: `agent.rs` (an agent's tunnel), `serve_dial.rs` (a replica's dial
//! session), `lease.rs` (renewing locations and the registration).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use proto::mux::{self, Opener, ReadFrameError};
use proto::tunnel::{Hello, HelloAnswer, HelloRefusal};
use store::{Change, EnvId, SharedTunnelStore, StoreError};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OnceCell, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, AdmissionLimits, Ticket};
use crate::agent::AgentHello;
use crate::metrics::{kind, result, GatewayMetrics, GaugeGuard};
use crate::{
    with_port, ConnectionTask, GatewayConfig, GatewayError, OpenError, Socket, TunnelStream,
    STORE_TIMEOUT,
};

/// Shortest lease accepted (renewals run every third of it).
const MIN_LEASE: Duration = Duration::from_millis(150);
/// Bound of small writes to a peer (hello answers, refusals).
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a stream on a tunnel may wait for yamux (too many unacknowledged streams).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for tunnels to close and release their locations.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why a tunnel ended: the log text, the metric label, and whether its location is released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EndReason {
    /// The agent closed it: no stream for its inactivity timeout.
    Inactive,
    /// The agent is shutting down.
    AgentShutdown,
    /// The control stream or the connection ended without a word.
    AgentGone,
    /// Nothing heard on the control stream for `DEAD_AFTER`.
    Silent,
    /// The store says another epoch (or nobody) holds the location now.
    LeaseLost,
    /// Renewals failed for a whole lease: the location has expired in the store.
    LeaseUnrenewed,
    /// A newer tunnel of the same environment arrived here.
    Replaced,
    /// The gateway is stopping.
    Shutdown,
    /// Accepted, but the agent opened no control stream in time.
    NoControlStream,
}

impl EndReason {
    /// Every reason, so each series exists (at 0) from the start.
    pub(crate) const ALL: [Self; 9] = [
        Self::Inactive,
        Self::AgentShutdown,
        Self::AgentGone,
        Self::Silent,
        Self::LeaseLost,
        Self::LeaseUnrenewed,
        Self::Replaced,
        Self::Shutdown,
        Self::NoControlStream,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Inactive => "inactive",
            Self::AgentShutdown => "agent_shutdown",
            Self::AgentGone => "agent_gone",
            Self::Silent => "silent",
            Self::LeaseLost => "lease_lost",
            Self::LeaseUnrenewed => "lease_unrenewed",
            Self::Replaced => "replaced",
            Self::Shutdown => "shutdown",
            Self::NoControlStream => "no_control_stream",
        }
    }

    /// Whether this gateway still owns the location (so it must release it).
    fn releases(self) -> bool {
        !matches!(self, Self::LeaseLost | Self::Replaced)
    }
}

/// A tunnel held by this gateway.
pub(crate) struct Tunnel {
    pub(crate) epoch: u64,
    pub(crate) opener: Opener,
    pub(crate) streams: Arc<Semaphore>,
    pub(crate) stop: CancellationToken,
    pub(crate) reason: Arc<OnceLock<EndReason>>,
    /// When the location was last known to be leased in the store (claim or renewal start).
    pub(crate) renewed: Instant,
}

impl Tunnel {
    /// Asks the tunnel's task to end for `reason` (the first reason given wins).
    pub(crate) fn close(&self, reason: EndReason) {
        let _ = self.reason.set(reason);
        self.stop.cancel();
    }
}

/// Counts running connection tasks so shutdown can wait for them.
#[derive(Default)]
struct Tasks {
    count: AtomicUsize,
    idle: Notify,
}

struct TaskGuard(Arc<Tasks>);

impl Tasks {
    fn enter(self: &Arc<Self>) -> TaskGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        TaskGuard(Arc::clone(self))
    }

    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

enum HandshakeFailure {
    Tls(std::io::Error),
    Hello(ReadFrameError),
}

/// The tunnel gateway; see the module docs.
pub struct Gateway {
    pub(crate) config: GatewayConfig,
    acceptor: TlsAcceptor,
    listener: Mutex<Option<TcpListener>>,
    local_addr: SocketAddr,
    pub(crate) store: SharedTunnelStore,
    pub(crate) metrics: GatewayMetrics,
    tunnels: Mutex<HashMap<EnvId, Tunnel>>,
    /// Who may hold a connection (pending and total bounds, per source).
    admission: Arc<Admission>,
    /// Cancelled when `run` is told to stop; every tunnel's stop token is a child of it.
    pub(crate) stop: CancellationToken,
    tasks: Arc<Tasks>,
    secret: OnceCell<[u8; 32]>,
}

impl Gateway {
    /// Binds the listener now (so "address in use" is reported at start) and registers the
    /// `edgeplane_gateway_*` metrics into `registry`. A port of 0 in `public_addr` or
    /// `dial_addr` is replaced by the bound port.
    pub async fn bind(
        config: GatewayConfig,
        store: SharedTunnelStore,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Self>, GatewayError> {
        check(&config)?;
        let listen_error = |source| GatewayError::Listen {
            addr: config.listen,
            source,
        };
        let listener = crate::listen::bind(config.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(TcpListener::from_std)
            .map_err(listen_error)?;
        Self::with_listener(config, listener, store, registry)
    }

    /// [`Gateway::bind`] on a listener the caller bound already (`config.listen` is then
    /// only informative). Must be called within a tokio runtime.
    pub async fn bind_std(
        config: GatewayConfig,
        listener: std::net::TcpListener,
        store: SharedTunnelStore,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Self>, GatewayError> {
        check(&config)?;
        let addr = listener.local_addr().unwrap_or(config.listen);
        let listener = listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener))
            .map_err(|source| GatewayError::Listen { addr, source })?;
        Self::with_listener(config, listener, store, registry)
    }

    fn with_listener(
        mut config: GatewayConfig,
        listener: TcpListener,
        store: SharedTunnelStore,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Self>, GatewayError> {
        let local_addr = listener
            .local_addr()
            .map_err(|source| GatewayError::Listen {
                addr: config.listen,
                source,
            })?;
        config.listen = local_addr;
        config.public_addr = with_port(&config.public_addr, local_addr.port());
        config.dial_addr = with_port(&config.dial_addr, local_addr.port());
        // The API configuration offers http/1.1; agents and dial sessions send no ALPN.
        let mut tls = (*config.tls).clone();
        tls.alpn_protocols = Vec::new();
        config.tls = Arc::new(tls);
        let metrics = GatewayMetrics::register(registry)?;
        let admission = config
            .admission
            .clone()
            .unwrap_or_else(|| Admission::new(AdmissionLimits::from_process()));
        Ok(Arc::new(Self {
            acceptor: TlsAcceptor::from(Arc::clone(&config.tls)),
            config,
            listener: Mutex::new(Some(listener)),
            local_addr,
            store,
            metrics,
            tunnels: Mutex::new(HashMap::new()),
            admission,
            stop: CancellationToken::new(),
            tasks: Arc::new(Tasks::default()),
            secret: OnceCell::new(),
        }))
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The configuration in effect (ports filled in, ALPN cleared).
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    pub fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }

    /// Who may hold a connection to this gateway's port.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    pub(crate) fn store(&self) -> &SharedTunnelStore {
        &self.store
    }

    /// Cancelled when the gateway stops; every tunnel's stop token is a child of it.
    pub(crate) fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Resolves when the gateway stops.
    pub(crate) async fn stopping(&self) {
        self.stop.cancelled().await;
    }

    /// Registers `tunnel` for `env` unless a newer epoch of it is here already (then `false`);
    /// an older one is closed as replaced.
    pub(crate) fn insert_tunnel(&self, env: EnvId, tunnel: Tunnel) -> bool {
        let mut map = self.tunnels();
        if map.get(&env).is_some_and(|old| old.epoch > tunnel.epoch) {
            return false;
        }
        if let Some(old) = map.insert(env, tunnel) {
            old.close(EndReason::Replaced);
        }
        self.update_gauge(&map);
        true
    }

    pub fn open_tunnels(&self) -> usize {
        self.tunnels().len()
    }

    /// The epoch of `env`'s tunnel if this gateway holds one.
    pub fn tunnel_epoch(&self, env: EnvId) -> Option<u64> {
        self.tunnels().get(&env).map(|t| t.epoch)
    }

    pub(crate) fn tunnels(&self) -> MutexGuard<'_, HashMap<EnvId, Tunnel>> {
        self.tunnels.lock()
    }

    fn update_gauge(&self, tunnels: &HashMap<EnvId, Tunnel>) {
        self.metrics
            .tunnels_open
            .set(i64::try_from(tunnels.len()).unwrap_or(i64::MAX));
    }

    /// A new stream to the agent of `env` whose tunnel this gateway holds with `epoch`. Not
    /// yet announced to the agent: write the request first, then read its `StreamOpen`.
    pub async fn open_stream(&self, env: EnvId, epoch: u64) -> Result<TunnelStream, OpenError> {
        let (opener, streams) = match self.tunnels().get(&env) {
            Some(t) if t.epoch == epoch => (t.opener.clone(), Arc::clone(&t.streams)),
            _ => return Err(OpenError::NoTunnel),
        };
        let permit = streams.try_acquire_owned().map_err(|_| OpenError::Busy)?;
        let stream = tokio::time::timeout(OPEN_TIMEOUT, opener.open())
            .await
            .map_err(|_| OpenError::Busy)??;
        self.metrics.streams.inc();
        Ok(TunnelStream::new(
            stream,
            Some(permit),
            Some(GaugeGuard::new(&self.metrics.streams_open)),
        ))
    }

    /// Accepts connections and keeps leases alive until `shutdown` is cancelled; then closes
    /// every tunnel, releases their locations and unregisters the gateway. Returns at once if
    /// called a second time.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let listener = self.listener.lock().take();
        let Some(listener) = listener else {
            tracing::warn!(gateway = %self.config.id, "tunnel gateway is already running");
            return;
        };
        tracing::info!(
            gateway = %self.config.id,
            listen = %self.local_addr,
            public_addr = %self.config.public_addr,
            dial_addr = %self.config.dial_addr,
            "tunnel gateway serving"
        );
        let leases = tokio::spawn(Arc::clone(&self).lease_loop());
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => self.admit(tcp, peer),
                    Err(e) => {
                        tracing::warn!(error = %e, "tunnel listener cannot accept");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        }
                    }
                },
            }
        }
        drop(listener);
        self.stop_all(leases).await;
    }

    async fn stop_all(&self, leases: tokio::task::JoinHandle<()>) {
        tracing::info!(
            gateway = %self.config.id,
            tunnels = self.open_tunnels(),
            "tunnel gateway stopping: closing tunnels"
        );
        // Handshakes, dial sessions, the lease loop and every tunnel (child tokens) stop.
        self.stop.cancel();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.idle())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.tasks.count.load(Ordering::SeqCst),
                "tunnel gateway tasks did not end in time"
            );
        }
        let _ = leases.await;
        // Tunnels whose task did not finish in time: release what they held.
        let left: Vec<(EnvId, Tunnel)> = {
            let mut map = self.tunnels();
            let left = map.drain().collect();
            self.update_gauge(&map);
            left
        };
        for (env, t) in left {
            t.opener.close();
            self.release(env, t.epoch).await;
            self.publish(Change::TunnelClosed {
                env,
                epoch: t.epoch,
            })
            .await;
        }
        match store_call(self.store.unregister_gateway(&self.config.id)).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot unregister the gateway (its registration expires with its lease)")
            }
        }
        tracing::info!(gateway = %self.config.id, "tunnel gateway stopped");
    }

    pub(crate) fn spawn_tracked(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let guard = self.tasks.enter();
        tokio::spawn(async move {
            let _guard = guard;
            fut.await;
        });
    }

    /// A pending connection let go to make room for a newer one (see `Admission::admit_at`).
    fn evicted(&self, peer: SocketAddr) {
        self.metrics.handshake(kind::UNKNOWN, result::EVICTED);
        tracing::debug!(%peer, "pending connection let go for a newer one");
    }

    fn admit(self: &Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let ticket = match self.admission.admit(peer.ip()) {
            Ok(ticket) => ticket,
            Err(why) => {
                self.metrics.handshake(kind::UNKNOWN, result::OVERLOADED);
                self.metrics.refused(why.label());
                tracing::debug!(%peer, reason = why.label(), "tunnel connection not admitted: dropped");
                return;
            }
        };
        let gw = Arc::clone(self);
        let Some(spawner) = &self.config.spawner else {
            return self.spawn_tracked(gw.connection(tcp, peer, ticket));
        };
        // The socket moves to the runtime that will poll it.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot hand an accepted connection over");
                return;
            }
        };
        let guard = self.tasks.enter();
        let task: crate::ConnectionTask = Box::pin(async move {
            let _guard = guard;
            match TcpStream::from_std(tcp) {
                Ok(tcp) => gw.connection(tcp, peer, ticket).await,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot take an accepted connection over")
                }
            }
        });
        if let Err(task) = spawner.spawn(task) {
            tokio::spawn(task);
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, ticket: Ticket) {
        let _ = tcp.set_nodelay(true);
        // A client that connects and sends nothing is let go soon: an agent's ClientHello
        // follows its connect at once.
        let mut one = [0u8; 1];
        let first_byte = tokio::select! {
            () = self.stop.cancelled() => return,
            () = ticket.evicted() => return self.evicted(peer),
            r = tokio::time::timeout(self.config.first_byte_timeout, tcp.peek(&mut one)) => r,
        };
        match first_byte {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => {
                tracing::debug!(%peer, "connection closed before its tls handshake");
                return;
            }
            Err(_) => {
                self.metrics.handshake(kind::UNKNOWN, result::TIMEOUT);
                tracing::debug!(%peer, "nothing sent within the first-byte timeout: connection dropped");
                return;
            }
        }
        let handshake = async {
            let mut tls = self
                .acceptor
                .accept(Socket::new(tcp))
                .await
                .map_err(HandshakeFailure::Tls)?;
            let hello: Hello = mux::read_frame(&mut tls)
                .await
                .map_err(HandshakeFailure::Hello)?;
            Ok::<_, HandshakeFailure>((tls, hello))
        };
        // Boxed, here and for the long-lived branches below: the task allocation is as large
        // as the largest state of this future, and a tunnel lives for hours after its
        // handshake; the handshake's state is freed when it is done.
        let handshake = Box::pin(handshake);
        let outcome = tokio::select! {
            () = self.stop.cancelled() => return,
            () = ticket.evicted() => return self.evicted(peer),
            r = tokio::time::timeout(self.config.handshake_timeout, handshake) => r,
        };
        let (tls, hello) = match outcome {
            Ok(Ok(done)) => done,
            Err(_) => {
                self.metrics.handshake(kind::UNKNOWN, result::TIMEOUT);
                tracing::debug!(%peer, "tunnel handshake timed out: connection dropped");
                return;
            }
            Ok(Err(HandshakeFailure::Tls(e))) => {
                self.metrics.handshake(kind::UNKNOWN, result::TLS_ERROR);
                tracing::debug!(%peer, error = %e, "tunnel tls handshake failed: connection dropped");
                return;
            }
            Ok(Err(HandshakeFailure::Hello(e))) => {
                self.metrics.handshake(kind::UNKNOWN, result::MALFORMED);
                match e {
                    // Counted; at debug only, so garbage cannot flood the log.
                    ReadFrameError::Frame(_) => {
                        tracing::debug!(%peer, error = %e, "malformed tunnel hello: connection dropped");
                    }
                    ReadFrameError::Eof | ReadFrameError::Io(_) => {
                        tracing::debug!(%peer, error = %e, "connection ended before its tunnel hello");
                    }
                }
                return;
            }
        };
        match hello {
            Hello::Agent {
                endpoint_id,
                edge_id,
                token,
            } => {
                let hello = AgentHello {
                    env: endpoint_id,
                    edge_id,
                    token,
                };
                let Some(spawner) = self.config.spawner.clone() else {
                    return Box::pin(self.agent(tls, peer, hello, ticket)).await;
                };
                // The tunnel goes on to where calls to it are served, if that is elsewhere.
                let guard = self.tasks.enter();
                let mut tls = tls;
                let rest: ConnectionTask = Box::pin(async move {
                    let _guard = guard;
                    match tls.get_mut().0.rehome() {
                        Ok(()) => self.agent(tls, peer, hello, ticket).await,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "cannot move a tunnel connection")
                        }
                    }
                });
                if let Err(rest) = spawner.spawn_tunnel(endpoint_id, rest) {
                    rest.await;
                }
            }
            Hello::Dial { secret } => {
                Box::pin(self.dial_session(tls, peer, secret, ticket)).await;
            }
        }
    }

    /// Answers a refused hello and closes the connection.
    pub(crate) async fn refuse(
        &self,
        mut tls: TlsStream<Socket>,
        kind: &str,
        code: HelloRefusal,
        message: &str,
    ) {
        let label = match code {
            HelloRefusal::BadCredentials => result::BAD_CREDENTIALS,
            HelloRefusal::Mismatch => result::MISMATCH,
            HelloRefusal::NotAuthorized => result::NOT_AUTHORIZED,
            HelloRefusal::Unavailable => result::UNAVAILABLE,
        };
        self.metrics.handshake(kind, label);
        let answer = HelloAnswer::Refused {
            code,
            message: message.to_owned(),
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
            mux::write_frame(&mut tls, &answer).await?;
            tls.shutdown().await
        })
        .await;
    }

    /// Cleans up after a tunnel: map entry (if still this epoch), session, location, change.
    pub(crate) async fn tunnel_ended(
        &self,
        env: EnvId,
        epoch: u64,
        reason: EndReason,
        since: Instant,
        peer: SocketAddr,
        opener: Option<&Opener>,
    ) {
        {
            let mut map = self.tunnels();
            if map.get(&env).is_some_and(|t| t.epoch == epoch) {
                map.remove(&env);
                self.update_gauge(&map);
            }
        }
        if let Some(opener) = opener {
            opener.close();
        }
        self.metrics
            .tunnel_closes
            .with_label_values(&[reason.label()])
            .inc();
        if reason.releases() {
            self.release(env, epoch).await;
        }
        self.publish(Change::TunnelClosed { env, epoch }).await;
        tracing::info!(
            env,
            epoch,
            %peer,
            reason = reason.label(),
            open_for_s = since.elapsed().as_secs(),
            "tunnel closed"
        );
    }

    pub(crate) async fn release(&self, env: EnvId, epoch: u64) {
        match store_call(self.store.release_tunnel(env, epoch)).await {
            Ok(true) => {}
            Ok(false) => tracing::debug!(env, epoch, "tunnel location was already gone"),
            Err(e) => tracing::warn!(
                env,
                epoch,
                error = %e,
                "cannot release the tunnel location (it expires with its lease)"
            ),
        }
    }

    pub(crate) async fn publish(&self, change: Change) {
        if let Err(e) = store_call(self.store.publish(change)).await {
            tracing::warn!(error = %e, "cannot publish a tunnel change");
        }
    }

    pub(crate) async fn cluster_secret(&self) -> Result<[u8; 32], StoreError> {
        self.secret
            .get_or_try_init(|| store_call(self.store.cluster_secret()))
            .await
            .copied()
    }
}

fn check(config: &GatewayConfig) -> Result<(), GatewayError> {
    if config.lease < MIN_LEASE {
        return Err(GatewayError::Config(format!(
            "lease {:?} is shorter than {MIN_LEASE:?}",
            config.lease
        )));
    }
    if config.handshake_timeout.is_zero() {
        return Err(GatewayError::Config("handshake timeout is zero".into()));
    }
    if config.id.is_empty() {
        return Err(GatewayError::Config("gateway id is empty".into()));
    }
    Ok(())
}

/// A store call bounded by [`STORE_TIMEOUT`].
pub(crate) async fn store_call<T>(
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(STORE_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err(StoreError::unavailable("store call timed out")))
}
