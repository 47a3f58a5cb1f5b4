#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The tunnel gateway library against a minimal agent written here with `proto::mux` and
//! tokio-rustls: real TLS on loopback, the embedded store in a temp dir. Every test is bounded
//! by [`TEST_TIMEOUT`]; conditions are awaited by polling with a deadline, never by sleeping.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gateway::admission::{Admission, AdmissionCounts, AdmissionLimits};
use gateway::{
    pinned_client_config, Dialer, Gateway, GatewayConfig, OpenError, MAX_STREAMS_PER_SESSION,
};
use proto::mux::{self, ControlEnd, Mode, Opener};
use proto::tunnel::{CloseReason, Hello, HelloAnswer, HelloRefusal, StreamOpen, StreamRefusal};
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use store::embedded::EmbeddedStore;
use store::redis::RedisStore;
use store::{Change, EdgeMode, EnvId, NewEnvironment, SharedStore, TunnelGrant, TunnelLocation};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Upper bound of every test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound of any one condition we wait for.
const WAIT: Duration = Duration::from_secs(15);

fn now_ms() -> u64 {
    proto::clock::now_ms()
}

/// Runs a test body under [`TEST_TIMEOUT`].
async fn bounded(body: impl Future<Output = ()>) {
    testkit::bounded(TEST_TIMEOUT, body).await;
}

/// Polls `cond` until it holds, or panics after [`WAIT`].
async fn wait_for<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    testkit::until(WAIT, what, cond).await;
}

/// Receives changes until one matches, or panics after [`WAIT`].
async fn wait_change(
    changes: &mut broadcast::Receiver<Change>,
    what: &str,
    want: impl Fn(&Change) -> bool,
) -> Change {
    tokio::time::timeout(WAIT, async {
        loop {
            match changes.recv().await {
                Ok(c) if want(&c) => return c,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("change channel closed"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no change: {what}"))
}

/// The gateway's certificate: a test one, in the API's configuration (ALPN included, which
/// the gateway must drop).
struct Cert {
    server: Arc<rustls::ServerConfig>,
    fingerprint: [u8; 32],
}

fn cert() -> Cert {
    let test = testkit::TestCert::generate();
    Cert {
        server: test.server_config(),
        fingerprint: test.fingerprint,
    }
}

/// A gateway on 127.0.0.1:0, over an embedded store in a temp dir unless given a store.
struct Harness {
    _dir: Option<tempfile::TempDir>,
    store: SharedStore,
    gw: Arc<Gateway>,
    fingerprint: [u8; 32],
    shutdown: CancellationToken,
    run: Option<JoinHandle<()>>,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(|c| c).await
    }

    async fn start_with(tweak: impl FnOnce(GatewayConfig) -> GatewayConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let mut h = Self::on_store(store, &cert(), tweak).await;
        h._dir = Some(dir);
        h
    }

    async fn on_store(
        store: SharedStore,
        cert: &Cert,
        tweak: impl FnOnce(GatewayConfig) -> GatewayConfig,
    ) -> Self {
        let config = tweak(GatewayConfig::new(
            format!("gw-test-{}", gateway::random_suffix()),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            "127.0.0.1:0",
            "127.0.0.1:0",
            Arc::clone(&cert.server),
        ));
        let registry = prometheus::Registry::new();
        let gw = Gateway::bind(config, Arc::clone(&store) as _, &registry)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(Arc::clone(&gw).run(shutdown.clone()));
        Self {
            _dir: None,
            store,
            gw,
            fingerprint: cert.fingerprint,
            shutdown,
            run: Some(run),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.gw.local_addr()
    }

    async fn env(&self) -> EnvId {
        create_env(&self.store).await
    }

    async fn grant_until(&self, env: EnvId, edge_id: Uuid, expires_ms: u64) -> [u8; 32] {
        put_grant(&self.store, env, edge_id, expires_ms).await
    }

    async fn grant(&self, env: EnvId, edge_id: Uuid) -> [u8; 32] {
        self.grant_until(env, edge_id, now_ms() + 60_000).await
    }

    async fn location(&self, env: EnvId) -> Option<TunnelLocation> {
        location_in(&self.store, env).await
    }

    fn handshakes(&self, kind: &str, result: &str) -> u64 {
        self.gw
            .metrics()
            .handshakes
            .with_label_values(&[kind, result])
            .get()
    }

    fn closes(&self, reason: &str) -> u64 {
        self.gw
            .metrics()
            .tunnel_closes
            .with_label_values(&[reason])
            .get()
    }

    /// An agent with fresh credentials for a new environment, tunnel open.
    async fn open_tunnel(&self) -> (EnvId, TestAgent) {
        let env = self.env().await;
        let edge_id = Uuid::new_v4();
        let token = self.grant(env, edge_id).await;
        let agent = TestAgent::connect(self.addr(), self.fingerprint, env, edge_id, token)
            .await
            .expect_accepted();
        wait_for("the tunnel to be held", || async {
            self.gw.tunnel_epoch(env) == Some(agent.epoch)
        })
        .await;
        (env, agent)
    }

    async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(run) = self.run.take() {
            run.await.unwrap();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Creates an environment and returns its id.
async fn create_env(store: &SharedStore) -> EnvId {
    let created = store
        .create_environments(vec![NewEnvironment {
            name: format!("env-{}", Uuid::new_v4()),
            mode: EdgeMode::Standard,
            checkin_interval: None,
            ping_interval: None,
            snapshot_interval: None,
            command_interval: None,
            group_id: None,
            tag_ids: vec![],
            env_vars: vec![],
            variables: Default::default(),
            allow_self_signed: false,
            join_secret: "c2VjcmV0".into(),
            edge_id: None,
            created_at_ms: now_ms(),
        }])
        .await
        .unwrap();
    created[0].id
}

/// Stores one-time credentials for `env`/`edge_id` expiring at `expires_ms` (as the control
/// plane does when it answers "required"); returns the token.
async fn put_grant(store: &SharedStore, env: EnvId, edge_id: Uuid, expires_ms: u64) -> [u8; 32] {
    let token: [u8; 32] = rand::random();
    let hash: [u8; 32] = Sha256::digest(token).into();
    store
        .put_tunnel_grant(
            &hash,
            &TunnelGrant {
                env,
                edge_id,
                expires_ms,
            },
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    token
}

async fn location_in(store: &SharedStore, env: EnvId) -> Option<TunnelLocation> {
    store.tunnel_locations(&[env]).await.unwrap().remove(0)
}

/// What a test agent's hello got.
enum Outcome {
    Accepted(TestAgent),
    Refused(HelloRefusal, String),
}

impl Outcome {
    fn expect_accepted(self) -> TestAgent {
        match self {
            Outcome::Accepted(a) => a,
            Outcome::Refused(code, msg) => panic!("tunnel refused: {code:?}: {msg}"),
        }
    }

    fn expect_refused(self) -> (HelloRefusal, String) {
        match self {
            Outcome::Accepted(a) => panic!("tunnel accepted with epoch {}", a.epoch),
            Outcome::Refused(code, msg) => (code, msg),
        }
    }
}

/// A minimal agent: pinned TLS, `Hello::Agent`, yamux server, the control stream answered by
/// `control_responder`, and every Docker stream answered `StreamOpen::Ok` and echoed.
struct TestAgent {
    gateway_id: String,
    epoch: u64,
    opener: Opener,
    stop: CancellationToken,
    control: Option<JoinHandle<ControlEnd>>,
    echo: JoinHandle<()>,
}

async fn tls_connect(
    addr: SocketAddr,
    fingerprint: [u8; 32],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let connector = TlsConnector::from(pinned_client_config(fingerprint).unwrap());
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

impl TestAgent {
    async fn connect(
        addr: SocketAddr,
        fingerprint: [u8; 32],
        endpoint_id: EnvId,
        edge_id: Uuid,
        token: [u8; 32],
    ) -> Outcome {
        let mut tls = tls_connect(addr, fingerprint).await;
        mux::write_frame(
            &mut tls,
            &Hello::Agent {
                endpoint_id,
                edge_id,
                token,
            },
        )
        .await
        .unwrap();
        let answer: HelloAnswer = mux::read_frame(&mut tls).await.unwrap();
        let (gateway_id, epoch) = match answer {
            HelloAnswer::Accepted { gateway_id, epoch } => (gateway_id, epoch),
            HelloAnswer::Refused { code, message } => return Outcome::Refused(code, message),
        };
        let mux::Session {
            opener,
            mut inbound,
        } = mux::spawn(tls, Mode::Server);
        let control_stream = opener.open().await.unwrap();
        let stop = CancellationToken::new();
        let control = tokio::spawn(mux::control_responder(
            control_stream,
            stop.clone(),
            CloseReason::Inactive,
        ));
        let echo = tokio::spawn(async move {
            while let Some(stream) = inbound.recv().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(stream);
                    // The gateway side wrote first (that announced the stream); answer, echo.
                    if mux::write_frame(&mut w, &StreamOpen::Ok).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Outcome::Accepted(TestAgent {
            gateway_id,
            epoch,
            opener,
            stop,
            control: Some(control),
            echo,
        })
    }

    /// Closes the tunnel on purpose, as an idle agent does (`Closing(Inactive)`).
    async fn close_inactive(mut self) {
        self.stop.cancel();
        if let Some(control) = self.control.take() {
            assert_eq!(control.await.unwrap(), ControlEnd::Local);
        }
    }

    /// Vanishes: the connection goes away without a word on the control stream.
    fn vanish(self) {
        drop(self);
    }

    /// Waits until the gateway ends the session.
    async fn closed_by_gateway(&self) {
        tokio::time::timeout(WAIT, self.opener.closed())
            .await
            .expect("the gateway did not close the tunnel");
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(c) = &self.control {
            c.abort();
        }
        self.echo.abort();
        self.opener.close();
    }
}

/// Writes `request`, expects `StreamOpen::Ok`, then the echo of `request`.
async fn roundtrip<S>(stream: &mut S, request: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(request).await.unwrap();
    stream.flush().await.unwrap();
    let open: StreamOpen = mux::read_frame(stream).await.unwrap();
    assert_eq!(open, StreamOpen::Ok);
    let mut back = vec![0u8; request.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, request);
}

/// Reads until the peer closes; panics if it stays open for [`WAIT`].
async fn expect_closed<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the gateway kept the connection open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_grant_opens_a_tunnel_and_streams_flow_both_ways() {
    bounded(async {
        let h = Harness::start().await;
        let mut changes = h.store.subscribe();
        let env = h.env().await;
        let edge_id = Uuid::new_v4();
        let token = h.grant(env, edge_id).await;
        let agent = TestAgent::connect(h.addr(), h.fingerprint, env, edge_id, token)
            .await
            .expect_accepted();
        assert_eq!(agent.gateway_id, h.gw.id());
        let epoch = agent.epoch;

        let opened = wait_change(
            &mut changes,
            "TunnelOpened",
            |c| matches!(c, Change::TunnelOpened(l) if l.env == env),
        )
        .await;
        let loc = h.location(env).await.expect("a location in the store");
        assert_eq!(opened, Change::TunnelOpened(loc.clone()));
        assert_eq!(loc.gateway_id, h.gw.id());
        assert_eq!(loc.epoch, epoch);
        assert_eq!(loc.dial_addr, format!("127.0.0.1:{}", h.addr().port()));
        assert_eq!(h.gw.open_tunnels(), 1);
        assert_eq!(h.gw.tunnel_epoch(env), Some(epoch));
        assert_eq!(h.handshakes("agent", "accepted"), 1);
        assert_eq!(h.gw.metrics().tunnels_open.get(), 1);

        // A stream reaches the agent; bytes flow both ways, more than a window each way.
        let mut s = h.gw.open_stream(env, epoch).await.unwrap();
        roundtrip(&mut s, b"GET /_ping HTTP/1.1\r\n\r\n").await;
        let payload: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = tokio::io::split(s);
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert_eq!(back.len(), payload.len());
        assert!(back == payload);
        assert_eq!(h.gw.metrics().streams.get(), 1);
        drop(r);
        wait_for("the stream gauge to drop", || async {
            h.gw.metrics().streams_open.get() == 0
        })
        .await;

        // Several streams at once.
        let mut tasks = Vec::new();
        for i in 0..20u8 {
            let mut s = h.gw.open_stream(env, epoch).await.unwrap();
            tasks.push(tokio::spawn(async move {
                roundtrip(&mut s, &[i; 1000]).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }

        // Another epoch, or another environment: no tunnel.
        assert!(matches!(
            h.gw.open_stream(env, epoch + 1).await,
            Err(OpenError::NoTunnel)
        ));
        assert!(matches!(
            h.gw.open_stream(env + 1000, epoch).await,
            Err(OpenError::NoTunnel)
        ));
        drop(agent);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_expired_and_foreign_credentials_are_refused() {
    bounded(async {
        let h = Harness::start().await;
        let env = h.env().await;
        let other_env = h.env().await;
        let edge_id = Uuid::new_v4();

        // Used once: the second use is refused.
        let token = h.grant(env, edge_id).await;
        let agent = TestAgent::connect(h.addr(), h.fingerprint, env, edge_id, token)
            .await
            .expect_accepted();
        let (code, msg) = TestAgent::connect(h.addr(), h.fingerprint, env, edge_id, token)
            .await
            .expect_refused();
        assert_eq!(code, HelloRefusal::BadCredentials);
        assert!(msg.contains("already used"), "{msg}");

        // Unknown.
        let (code, _) = TestAgent::connect(h.addr(), h.fingerprint, env, edge_id, rand::random())
            .await
            .expect_refused();
        assert_eq!(code, HelloRefusal::BadCredentials);

        // Expired (by its own expiry, while the store still keeps it).
        let expired = h.grant_until(other_env, edge_id, now_ms() - 1_000).await;
        let (code, _) = TestAgent::connect(h.addr(), h.fingerprint, other_env, edge_id, expired)
            .await
            .expect_refused();
        assert_eq!(code, HelloRefusal::BadCredentials);

        // Another environment's credentials, and another Edge ID.
        let foreign = h.grant(other_env, edge_id).await;
        let (code, msg) = TestAgent::connect(h.addr(), h.fingerprint, env, edge_id, foreign)
            .await
            .expect_refused();
        assert_eq!(code, HelloRefusal::Mismatch);
        assert!(msg.contains("another environment"), "{msg}");
        let other_edge = h.grant(other_env, Uuid::new_v4()).await;
        let (code, _) = TestAgent::connect(h.addr(), h.fingerprint, other_env, edge_id, other_edge)
            .await
            .expect_refused();
        assert_eq!(code, HelloRefusal::Mismatch);

        assert_eq!(h.handshakes("agent", "bad_credentials"), 3);
        assert_eq!(h.handshakes("agent", "mismatch"), 2);
        assert_eq!(h.handshakes("agent", "accepted"), 1);
        // Nothing refused left a location behind; the accepted tunnel is unharmed.
        assert!(h.location(other_env).await.is_none());
        assert_eq!(h.location(env).await.unwrap().epoch, agent.epoch);
        let mut s = h.gw.open_stream(env, agent.epoch).await.unwrap();
        roundtrip(&mut s, b"still here").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_port_is_dropped_and_the_next_agent_is_served() {
    bounded(async {
        let h = Harness::start().await;

        // Not TLS at all: random bytes, then a plain-HTTP request.
        let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
        tcp.write_all(&[
            0x13, 0x37, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6,
        ])
        .await
        .unwrap();
        expect_closed(&mut tcp).await;
        let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")
            .await
            .unwrap();
        expect_closed(&mut tcp).await;

        // TLS, then an oversized hello prefix (refused before anything is read or allocated).
        let mut tls = tls_connect(h.addr(), h.fingerprint).await;
        tls.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
        tls.flush().await.unwrap();
        expect_closed(&mut tls).await;

        // TLS, then a well-sized frame of garbage.
        let mut tls = tls_connect(h.addr(), h.fingerprint).await;
        tls.write_all(&[0, 5, 1, 200, 200, 200, 200]).await.unwrap();
        tls.flush().await.unwrap();
        expect_closed(&mut tls).await;

        // TLS, then a hello cut short.
        let mut tls = tls_connect(h.addr(), h.fingerprint).await;
        tls.write_all(&[0, 60, 1, 0]).await.unwrap();
        tls.shutdown().await.unwrap();
        expect_closed(&mut tls).await;

        wait_for("the failures to be counted", || async {
            h.handshakes("unknown", "tls_error") == 2 && h.handshakes("unknown", "malformed") == 3
        })
        .await;

        // The gateway still serves the next good agent.
        let (env, agent) = h.open_tunnel().await;
        let mut s = h.gw.open_stream(env, agent.epoch).await.unwrap();
        roundtrip(&mut s, b"after the garbage").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_sends_a_hello_is_dropped() {
    bounded(async {
        let h = Harness::start_with(|c| c.with_handshake_timeout(Duration::from_millis(700))).await;
        // TCP only, no TLS.
        let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
        expect_closed(&mut tcp).await;
        // TLS, no hello.
        let mut tls = tls_connect(h.addr(), h.fingerprint).await;
        expect_closed(&mut tls).await;
        wait_for("the timeouts to be counted", || async {
            h.handshakes("unknown", "timeout") == 2
        })
        .await;

        // Accepted, but the agent never opens its control stream: dropped, location released.
        let mut changes = h.store.subscribe();
        let env = h.env().await;
        let edge_id = Uuid::new_v4();
        let token = h.grant(env, edge_id).await;
        let mut tls = tls_connect(h.addr(), h.fingerprint).await;
        mux::write_frame(
            &mut tls,
            &Hello::Agent {
                endpoint_id: env,
                edge_id,
                token,
            },
        )
        .await
        .unwrap();
        let answer: HelloAnswer = mux::read_frame(&mut tls).await.unwrap();
        let HelloAnswer::Accepted { epoch, .. } = answer else {
            panic!("refused: {answer:?}");
        };
        expect_closed(&mut tls).await;
        wait_change(&mut changes, "TunnelClosed", |c| {
            *c == Change::TunnelClosed { env, epoch }
        })
        .await;
        assert!(h.location(env).await.is_none());
        assert_eq!(h.closes("no_control_stream"), 1);
        assert_eq!(h.gw.open_tunnels(), 0);

        // A good agent is still served.
        let _ = h.open_tunnel().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_agent_closes_the_tunnel_and_releases_it() {
    bounded(async {
        let h = Harness::start().await;
        let (env, agent) = h.open_tunnel().await;
        let epoch = agent.epoch;
        assert!(h.location(env).await.is_some());
        let mut changes = h.store.subscribe();

        agent.vanish();
        wait_change(&mut changes, "TunnelClosed", |c| {
            *c == Change::TunnelClosed { env, epoch }
        })
        .await;
        assert!(h.location(env).await.is_none());
        assert_eq!(h.gw.open_tunnels(), 0);
        assert_eq!(h.gw.metrics().tunnels_open.get(), 0);
        assert_eq!(h.closes("agent_gone"), 1);
        assert!(matches!(
            h.gw.open_stream(env, epoch).await,
            Err(OpenError::NoTunnel)
        ));

        // An agent that closes on purpose (idle) is told apart.
        let (env, agent) = h.open_tunnel().await;
        let epoch = agent.epoch;
        agent.close_inactive().await;
        wait_change(&mut changes, "TunnelClosed", |c| {
            *c == Change::TunnelClosed { env, epoch }
        })
        .await;
        assert!(h.location(env).await.is_none());
        assert_eq!(h.closes("inactive"), 1);
        assert_eq!(h.gw.open_tunnels(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_tunnel_of_the_same_environment_replaces_the_old_one() {
    bounded(async {
        let h = Harness::start().await;
        let (env, first) = h.open_tunnel().await;
        let mut changes = h.store.subscribe();
        let edge_id = Uuid::new_v4();
        let token = h.grant(env, edge_id).await;
        let second = TestAgent::connect(h.addr(), h.fingerprint, env, edge_id, token)
            .await
            .expect_accepted();
        assert!(second.epoch > first.epoch);
        wait_change(&mut changes, "the old tunnel's TunnelClosed", |c| {
            *c == Change::TunnelClosed {
                env,
                epoch: first.epoch,
            }
        })
        .await;
        first.closed_by_gateway().await;
        assert_eq!(h.gw.open_tunnels(), 1);
        assert_eq!(h.gw.tunnel_epoch(env), Some(second.epoch));
        // The newer location stays (the replaced tunnel released nothing).
        assert_eq!(h.location(env).await.unwrap().epoch, second.epoch);
        assert_eq!(h.closes("replaced"), 1);
        let mut s = h.gw.open_stream(env, second.epoch).await.unwrap();
        roundtrip(&mut s, b"the new one").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_closes_the_tunnel_without_releasing_the_new_holder() {
    bounded(async {
        let h = Harness::start_with(|c| c.with_lease(Duration::from_millis(900))).await;
        let (env, agent) = h.open_tunnel().await;
        let mut changes = h.store.subscribe();
        // Leases are renewed: the location outlives several leases.
        wait_for("a few renewals", || async {
            h.gw.metrics().tunnels_open.get() == 1
                && h.store
                    .live_gateways()
                    .await
                    .unwrap()
                    .iter()
                    .any(|g| g.id == h.gw.id() && g.tunnels == 1)
        })
        .await;
        tokio::time::timeout(Duration::from_millis(2000), agent.closed_by_gateway())
            .await
            .expect_err("the tunnel must survive its renewals");
        assert_eq!(h.location(env).await.unwrap().epoch, agent.epoch);

        // Another gateway claims the environment: this one loses the lease at its next renewal.
        let other = h
            .store
            .claim_tunnel(
                env,
                "gw-other",
                "127.0.0.1:1",
                now_ms(),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert!(other.epoch > agent.epoch);
        wait_change(&mut changes, "TunnelClosed", |c| {
            *c == Change::TunnelClosed {
                env,
                epoch: agent.epoch,
            }
        })
        .await;
        agent.closed_by_gateway().await;
        assert_eq!(h.closes("lease_lost"), 1);
        assert_eq!(h.gw.open_tunnels(), 0);
        assert_eq!(h.location(env).await.unwrap(), other);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_its_tunnel_limit_the_gateway_refuses_without_burning_credentials() {
    bounded(async {
        let h = Harness::start_with(|c| c.with_max_tunnels(1)).await;
        let (_, first) = h.open_tunnel().await;
        let env = h.env().await;
        let edge_id = Uuid::new_v4();
        let token = h.grant(env, edge_id).await;
        let (code, _) = TestAgent::connect(h.addr(), h.fingerprint, env, edge_id, token)
            .await
            .expect_refused();
        assert_eq!(code, HelloRefusal::Unavailable);
        assert_eq!(h.handshakes("agent", "unavailable"), 1);
        first.vanish();
        wait_for("the first tunnel to close", || async {
            h.gw.open_tunnels() == 0
        })
        .await;
        // The same credentials still work.
        let _agent = TestAgent::connect(h.addr(), h.fingerprint, env, edge_id, token)
            .await
            .expect_accepted();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_dial_session_is_joined_by_another_one() {
    bounded(async {
        let h = Harness::start().await;
        let (env_a, _agent_a) = h.open_tunnel().await;
        let (env_b, _agent_b) = h.open_tunnel().await;
        let loc_a = h.location(env_a).await.unwrap();
        let loc_b = h.location(env_b).await.unwrap();
        let dialer = Dialer::new(h.fingerprint, Arc::clone(&h.store) as _);

        // One session carries as many streams as it may, all to one tunnel...
        let mut held = Vec::new();
        for _ in 0..MAX_STREAMS_PER_SESSION {
            held.push(dialer.open_stream(&loc_a).await.unwrap());
        }
        assert_eq!(dialer.open_sessions(), 1);
        // ...so streams to another tunnel of the same gateway go on a second session instead
        // of being refused as busy.
        for _ in 0..20 {
            let mut s = dialer.open_stream(&loc_b).await.unwrap();
            roundtrip(&mut s, b"on the second session").await;
        }
        assert_eq!(dialer.open_sessions(), 2);
        assert_eq!(h.handshakes("dial", "accepted"), 2);

        // Once the first has room again, the spare one goes with the next stream.
        drop(held);
        wait_for("the gateway to let go of the streams", || async {
            h.gw.metrics().streams_open.get() == 0
        })
        .await;
        let mut s = dialer.open_stream(&loc_b).await.unwrap();
        roundtrip(&mut s, b"on the first again").await;
        assert_eq!(dialer.open_sessions(), 1);
        assert_eq!(h.handshakes("dial", "accepted"), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialer_reaches_the_agent_through_the_gateway() {
    bounded(async {
        let h = Harness::start().await;
        let (env, agent) = h.open_tunnel().await;
        let loc = h.location(env).await.unwrap();
        let dialer = Dialer::new(h.fingerprint, Arc::clone(&h.store) as _);

        let mut s = dialer.open_stream(&loc).await.unwrap();
        roundtrip(&mut s, b"GET /containers/json HTTP/1.1\r\n\r\n").await;
        let mut s2 = dialer.open_stream(&loc).await.unwrap();
        roundtrip(&mut s2, b"second stream, same session").await;
        assert_eq!(dialer.open_sessions(), 1);
        assert_eq!(h.gw.metrics().dial_sessions_open.get(), 1);
        assert_eq!(h.handshakes("dial", "accepted"), 1);
        drop((s, s2));

        // A stale epoch: the gateway's own refusal is the first frame.
        let stale = TunnelLocation {
            epoch: loc.epoch + 7,
            ..loc.clone()
        };
        let mut s = dialer.open_stream(&stale).await.unwrap();
        match mux::read_frame::<_, StreamOpen>(&mut s).await.unwrap() {
            StreamOpen::Refused { code, .. } => assert_eq!(code, StreamRefusal::NoTunnel),
            StreamOpen::Ok => panic!("a stale epoch reached the agent"),
        }

        // A dead session is replaced: the gateway closes dial sessions only at shutdown, so
        // drop ours and check the next stream dials anew.
        dialer.discard_session(&loc.dial_addr);
        let mut s = dialer.open_stream(&loc).await.unwrap();
        roundtrip(&mut s, b"after a new session").await;
        assert_eq!(h.handshakes("dial", "accepted"), 2);

        // The embedded path: a dialer with the local gateway opens streams without a session.
        let local =
            Dialer::new(h.fingerprint, Arc::clone(&h.store) as _).with_local(Arc::clone(&h.gw));
        let mut s = local.open_stream(&loc).await.unwrap();
        roundtrip(&mut s, b"local").await;
        assert_eq!(local.open_sessions(), 0);

        // Another store means another cluster secret: refused.
        let other_dir = tempfile::tempdir().unwrap();
        let other: SharedStore = Arc::new(EmbeddedStore::open(other_dir.path()).unwrap());
        let stranger = Dialer::new(h.fingerprint, other);
        match stranger.open_stream(&loc).await {
            Err(e @ OpenError::Refused(_)) => {
                assert!(e.to_string().contains("NotAuthorized"), "{e}");
                assert!(!e.retry_may_help());
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(h.handshakes("dial", "not_authorized"), 1);

        // Wrong fingerprint: the gateway certificate is not accepted.
        let wrong = Dialer::new([7; 32], Arc::clone(&h.store) as _);
        match wrong.open_stream(&loc).await {
            Err(OpenError::GatewayUnreachable(msg)) => {
                assert!(msg.contains(&loc.dial_addr), "{msg}")
            }
            other => panic!("expected unreachable, got {other:?}"),
        }

        // Nobody listening.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let nowhere = closed.local_addr().unwrap().to_string();
        drop(closed);
        let gone = TunnelLocation {
            dial_addr: nowhere.clone(),
            ..loc.clone()
        };
        match dialer.open_stream(&gone).await {
            Err(OpenError::GatewayUnreachable(msg)) => assert!(msg.contains(&nowhere), "{msg}"),
            other => panic!("expected unreachable, got {other:?}"),
        }
        drop(agent);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialer_reconnects_to_a_restarted_gateway() {
    bounded(async {
        let mut h = Harness::start().await;
        let (env, _agent) = h.open_tunnel().await;
        let loc = h.location(env).await.unwrap();
        let dialer = Dialer::new(h.fingerprint, Arc::clone(&h.store) as _);
        let mut s = dialer.open_stream(&loc).await.unwrap();
        roundtrip(&mut s, b"before").await;
        drop(s);

        // The gateway stops: its dial session closes; a new gateway on the same port and
        // store serves a new tunnel of the same environment.
        let port = h.addr().port();
        let cert_server = h.gw.config().tls.clone();
        h.stop().await;
        wait_for("the dial session to close", || async {
            dialer.open_sessions() == 0
        })
        .await;
        let registry = prometheus::Registry::new();
        let gw2 = Gateway::bind(
            GatewayConfig::new(
                "gw-restarted",
                SocketAddr::from(([127, 0, 0, 1], port)),
                format!("127.0.0.1:{port}"),
                format!("127.0.0.1:{port}"),
                cert_server,
            ),
            Arc::clone(&h.store) as _,
            &registry,
        )
        .await
        .unwrap();
        let stop2 = CancellationToken::new();
        let run2 = tokio::spawn(Arc::clone(&gw2).run(stop2.clone()));
        let edge_id = Uuid::new_v4();
        let token = h.grant(env, edge_id).await;
        let agent = TestAgent::connect(gw2.local_addr(), h.fingerprint, env, edge_id, token)
            .await
            .expect_accepted();
        wait_for("the new tunnel", || async {
            gw2.tunnel_epoch(env) == Some(agent.epoch)
        })
        .await;
        let loc2 = h.location(env).await.unwrap();
        assert_eq!(loc2.dial_addr, loc.dial_addr);
        let mut s = dialer.open_stream(&loc2).await.unwrap();
        roundtrip(&mut s, b"after").await;
        drop(s);
        stop2.cancel();
        run2.await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_and_releases_everything() {
    bounded(async {
        let mut h = Harness::start().await;
        let (env1, a1) = h.open_tunnel().await;
        let (env2, a2) = h.open_tunnel().await;
        let loc = h.location(env1).await.unwrap();
        let dialer = Dialer::new(h.fingerprint, Arc::clone(&h.store) as _);
        let mut s = dialer.open_stream(&loc).await.unwrap();
        roundtrip(&mut s, b"x").await;
        wait_for("the registration", || async {
            h.store
                .live_gateways()
                .await
                .unwrap()
                .iter()
                .any(|g| g.id == h.gw.id())
        })
        .await;
        let mut changes = h.store.subscribe();

        h.stop().await;

        let mut expected = vec![
            Change::TunnelClosed {
                env: env1,
                epoch: a1.epoch,
            },
            Change::TunnelClosed {
                env: env2,
                epoch: a2.epoch,
            },
        ];
        while !expected.is_empty() {
            let c = wait_change(&mut changes, "TunnelClosed", |c| expected.contains(c)).await;
            expected.retain(|e| *e != c);
        }
        for (env, a) in [(env1, &a1), (env2, &a2)] {
            assert!(h.location(env).await.is_none());
            a.closed_by_gateway().await;
        }
        assert_eq!(h.closes("shutdown"), 2);
        assert_eq!(h.gw.open_tunnels(), 0);
        assert_eq!(h.gw.metrics().tunnels_open.get(), 0);
        assert!(!h
            .store
            .live_gateways()
            .await
            .unwrap()
            .iter()
            .any(|g| g.id == h.gw.id()));
        wait_for("the dial session to close", || async {
            dialer.open_sessions() == 0
        })
        .await;
        assert_eq!(h.gw.metrics().dial_sessions_open.get(), 0);
        // The listener is gone.
        assert!(TcpStream::connect(h.addr()).await.is_err());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_over_redis_with_two_gateways_and_a_replica() {
    let redis = testkit::RedisServer::start();
    bounded(async {
        let prefix = format!("gwtest-{}:", gateway::random_suffix());
        let open = || async {
            let store: SharedStore =
                Arc::new(RedisStore::connect(&redis.url(), &prefix).await.unwrap());
            store
        };
        let cert = cert();
        let lease = |c: GatewayConfig| c.with_lease(Duration::from_secs(3));
        let mut a = Harness::on_store(open().await, &cert, lease).await;
        let mut b = Harness::on_store(open().await, &cert, lease).await;
        // The control-plane replica: its own connection to the same Redis.
        let replica = open().await;
        let ids = [a.gw.id().to_owned(), b.gw.id().to_owned()];
        wait_for("both gateways registered", || async {
            let live = replica.live_gateways().await.unwrap();
            ids.iter().all(|id| live.iter().any(|g| &g.id == id))
        })
        .await;
        let mut changes = replica.subscribe();

        // The replica issues credentials; the agent reaches gateway A.
        let env = create_env(&replica).await;
        let edge_id = Uuid::new_v4();
        let token = put_grant(&replica, env, edge_id, now_ms() + 60_000).await;
        let agent = TestAgent::connect(a.addr(), cert.fingerprint, env, edge_id, token)
            .await
            .expect_accepted();
        let opened = wait_change(
            &mut changes,
            "TunnelOpened over pub/sub",
            |c| matches!(c, Change::TunnelOpened(l) if l.env == env),
        )
        .await;
        let loc = location_in(&replica, env).await.unwrap();
        assert_eq!(opened, Change::TunnelOpened(loc.clone()));
        assert_eq!(loc.gateway_id, a.gw.id());
        assert_eq!(loc.epoch, agent.epoch);

        // The replica dials gateway A and reaches the agent.
        let dialer = Dialer::new(cert.fingerprint, Arc::clone(&replica) as _);
        let mut s = dialer.open_stream(&loc).await.unwrap();
        roundtrip(&mut s, b"through gateway a").await;
        drop(s);

        // Credentials are one-time across gateways.
        let (code, _) = TestAgent::connect(b.addr(), cert.fingerprint, env, edge_id, token)
            .await
            .expect_refused();
        assert_eq!(code, HelloRefusal::BadCredentials);

        // The agent vanishes: released, announced.
        let epoch = agent.epoch;
        agent.vanish();
        wait_change(&mut changes, "TunnelClosed over pub/sub", |c| {
            *c == Change::TunnelClosed { env, epoch }
        })
        .await;
        assert!(location_in(&replica, env).await.is_none());

        // It comes back through gateway B, with a newer epoch.
        let token = put_grant(&replica, env, edge_id, now_ms() + 60_000).await;
        let agent = TestAgent::connect(b.addr(), cert.fingerprint, env, edge_id, token)
            .await
            .expect_accepted();
        assert!(agent.epoch > epoch);
        wait_change(
            &mut changes,
            "TunnelOpened on b",
            |c| matches!(c, Change::TunnelOpened(l) if l.env == env && l.gateway_id == b.gw.id()),
        )
        .await;
        let loc = location_in(&replica, env).await.unwrap();
        let mut s = dialer.open_stream(&loc).await.unwrap();
        roundtrip(&mut s, b"through gateway b").await;
        drop(s);

        // Both stop: nothing is left registered or located.
        a.stop().await;
        b.stop().await;
        agent.closed_by_gateway().await;
        assert!(location_in(&replica, env).await.is_none());
        let live = replica.live_gateways().await.unwrap();
        assert!(
            !live.iter().any(|g| ids.contains(&g.id)),
            "still registered: {live:?}"
        );
    })
    .await;
    drop(redis);
}

/// An idle TCP connection to `addr` from the loopback address `source` (127.0.0.0/8).
async fn idle_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    testkit::hostile::connect_from(source.into(), addr)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_at_its_pending_bound_is_refused_while_others_are_served() {
    bounded(async {
        let limits = AdmissionLimits {
            max_connections: 100,
            max_per_source: 50,
            max_pending: 20,
            max_pending_per_source: 3,
        };
        let admission = Admission::new(limits);
        let h = Harness::start_with(|c| {
            c.with_admission(Arc::clone(&admission))
                .with_first_byte_timeout(Duration::from_secs(60))
        })
        .await;
        let refused = || {
            h.gw.metrics()
                .refused
                .with_label_values(&["source_pending"])
                .get()
        };

        // One source holds its three pending places with connections that send nothing.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(idle_from([127, 0, 0, 2], h.addr()).await);
        }
        wait_for("three pending connections", || async {
            admission.counts().pending == 3
        })
        .await;
        // Its fourth is dropped at once, long before any deadline.
        let mut fourth = idle_from([127, 0, 0, 2], h.addr()).await;
        expect_closed(&mut fourth).await;
        assert_eq!(refused(), 1);

        // An agent from another source opens its tunnel meanwhile; once its hello is
        // accepted it no longer counts as pending.
        let (env, agent) = h.open_tunnel().await;
        let mut s = h.gw.open_stream(env, agent.epoch).await.unwrap();
        roundtrip(&mut s, b"served beside the idle ones").await;
        wait_for("the agent to count as proved", || async {
            admission.counts()
                == AdmissionCounts {
                    connections: 4,
                    pending: 3,
                    sources: 2,
                    evicted: 0,
                }
        })
        .await;

        // The idle connections gone, their source's places come back and the map forgets it.
        drop(held);
        wait_for("the idle ones to be forgotten", || async {
            admission.counts()
                == AdmissionCounts {
                    connections: 1,
                    pending: 0,
                    sources: 1,
                    evicted: 0,
                }
        })
        .await;
        let _again = idle_from([127, 0, 0, 2], h.addr()).await;
        wait_for("the source to be admitted again", || async {
            admission.counts().pending == 1
        })
        .await;
        assert_eq!(refused(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_dropped_at_the_first_byte_deadline() {
    bounded(async {
        let h = Harness::start_with(|c| {
            c.with_first_byte_timeout(Duration::from_millis(300))
                .with_handshake_timeout(Duration::from_secs(60))
        })
        .await;
        let mut tcp = TcpStream::connect(h.addr()).await.unwrap();
        expect_closed(&mut tcp).await;
        wait_for("the timeout to be counted", || async {
            h.handshakes("unknown", "timeout") == 1
        })
        .await;
        wait_for("its place to be given back", || async {
            h.gw.admission().counts().connections == 0
        })
        .await;
        // A client that speaks at once has the whole handshake deadline.
        let _ = h.open_tunnel().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_stream_given_up_before_its_first_byte_lets_go_of_the_tunnel() {
    bounded(async {
        let h = Harness::start().await;
        let (env, _agent) = h.open_tunnel().await;
        let loc = h.location(env).await.unwrap();
        let dialer = Dialer::new(h.fingerprint, Arc::clone(&h.store) as _);
        // Streams that sent their request and nothing else (a caller gone at once). The agent
        // never hears of them (yamux announces a stream with its first byte): the gateway
        // must not wait for the agent to close them.
        let mut given_up = Vec::new();
        for _ in 0..20 {
            given_up.push(dialer.open_stream(&loc).await.unwrap());
        }
        wait_for("the gateway to open them", || async {
            h.gw.metrics().streams_open.get() == 20
        })
        .await;
        drop(given_up);
        wait_for("the gateway to let go of them", || async {
            h.gw.metrics().streams_open.get() == 0
        })
        .await;
        // The tunnel still carries streams.
        let mut s = dialer.open_stream(&loc).await.unwrap();
        roundtrip(&mut s, b"after").await;
    })
    .await;
}
