//! The tunnel end to end: the real agent (`edge_agent::run`) against the fake control plane, a
//! minimal tunnel gateway written here (TLS with an rcgen certificate, `proto::mux` client
//! side, the gateway's roles: verify the hello's token, open streams writing the request first,
//! read `StreamOpen`, ping the control stream) and a fake engine on a unix socket.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use edge_agent::Config;
use parking_lot::{Mutex, MutexGuard};
use proto::mux::{self, read_frame, write_frame, ControlEnd, Mode, MuxStream, Opener};
use proto::tunnel::{CloseReason, Hello, HelloAnswer, HelloRefusal, StreamOpen, StreamRefusal};
use proto::JoinToken;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use testkit::fake::{wait_until, FakeControlPlane};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(20);

/// Runs a test body with a bound, so nothing hangs.
async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(Duration::from_secs(90), body)
        .await
        .expect("test timed out");
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

// ---------------------------------------------------------------------------------------------
// Log capture: the agent's log lines are part of what it promises (one clear line per problem).

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LogWriter(self.0.clone())
    }
}

impl Logs {
    /// Captures this thread's log lines (tests run on a current-thread runtime, so the
    /// agent's tasks log here too).
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (logs, guard)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.0)).into_owned()
    }

    fn count(&self, needle: &str) -> usize {
        self.text().lines().filter(|l| l.contains(needle)).count()
    }
}

// ---------------------------------------------------------------------------------------------
// A fake engine: Docker API answers over HTTP/1.1 on a unix socket, and `POST /echo`, which
// upgrades the connection and echoes until end of input, then says "bye" (like an attached
// `docker exec -i`, whose output continues after stdin closed).

struct FakeEngine {
    socket: PathBuf,
    task: JoinHandle<()>,
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeEngine {
    fn start(dir: &Path) -> Self {
        let socket = dir.join("docker.sock");
        let listener = UnixListener::bind(&socket).expect("bind engine socket");
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(engine_connection(conn));
            }
        });
        Self { socket, task }
    }

    fn docker_host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.ok()? == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).ok()
}

async fn engine_connection(mut conn: UnixStream) {
    while let Some(head) = read_head(&mut conn).await {
        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
        if path == "/echo" {
            let _ = conn
                .write_all(b"HTTP/1.1 101 UPGRADED\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
                .await;
            let (mut rd, mut wr) = conn.split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
            let _ = wr.write_all(b"bye\n").await;
            let _ = wr.shutdown().await;
            return;
        }
        let body = match path.as_str() {
            "/version" => {
                r#"{"Version":"1.0-fake","ApiVersion":"1.41","Os":"linux","Arch":"amd64","Components":[{"Name":"Fake Engine"}]}"#
            }
            "/info" => r#"{"NCPU":4,"MemTotal":1024,"OperatingSystem":"fake","Labels":null}"#,
            "/containers/json?all=1" => {
                r#"[{"Id":"c1","Names":["/one"],"State":"running","Labels":null,"Ports":null}]"#
            }
            "/images/json" => r#"[{"Id":"i1","RepoTags":null}]"#,
            "/volumes" => r#"{"Volumes":null,"Warnings":null}"#,
            "/networks" => "[]",
            _ => r#"{"message":"page not found"}"#,
        };
        let status = if body.contains("page not found") {
            "404 Not Found"
        } else {
            "200 OK"
        };
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if conn.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        if head.to_ascii_lowercase().contains("connection: close") {
            let _ = conn.shutdown().await;
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal tunnel gateway.

/// How the gateway answers hellos.
#[derive(Clone)]
enum Policy {
    /// Consume the token at the fake control plane, as a real gateway does at the store.
    Verify(Arc<FakeControlPlane>),
    Refuse(HelloRefusal, &'static str),
}

struct GwSession {
    opener: Opener,
    kill: CancellationToken,
    control_end: Arc<Mutex<Option<(ControlEnd, Instant)>>>,
    opened: Instant,
}

#[derive(Default)]
struct GwState {
    tls_failed: u64,
    hellos: Vec<Hello>,
    sessions: Vec<GwSession>,
}

struct Gateway {
    addr: SocketAddr,
    state: Arc<Mutex<GwState>>,
    task: JoinHandle<()>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
        for s in &lock(&self.state).sessions {
            s.kill.cancel();
        }
    }
}

/// A TLS stream that can be cut like a dead network: reads and writes fail at once, and the
/// connection is dropped without any goodbye.
struct Killable<S> {
    inner: S,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    dead: bool,
}

impl<S> Killable<S> {
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        if self.dead {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "killed",
            ))
        } else {
            Ok(())
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Killable<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Killable<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

fn own_certificate() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["gateway.test".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

impl Gateway {
    async fn start(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
        policy: Policy,
    ) -> Self {
        let config = rustls::ServerConfig::builder_with_provider(edge_agent::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gateway");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(GwState::default()));
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    tokio::spawn(gateway_connection(
                        tcp,
                        acceptor.clone(),
                        policy.clone(),
                        state.clone(),
                    ));
                }
            }
        });
        Self { addr, state, task }
    }

    fn state(&self) -> MutexGuard<'_, GwState> {
        lock(&self.state)
    }

    fn sessions(&self) -> usize {
        self.state().sessions.len()
    }

    async fn wait_sessions(&self, n: usize) {
        assert!(
            wait_until(LIMIT, || self.sessions() >= n).await,
            "no tunnel #{n} at the gateway"
        );
    }

    fn control_end(&self, i: usize) -> Option<(ControlEnd, Instant)> {
        *lock(&self.state().sessions[i].control_end)
    }

    fn kill(&self, i: usize) {
        self.state().sessions[i].kill.cancel();
    }

    /// Opens a Docker stream on tunnel `i`, writes `request` (which announces the stream) and
    /// reads the agent's `StreamOpen`.
    async fn stream(&self, i: usize, request: &[u8]) -> (MuxStream, StreamOpen) {
        let opener = self.state().sessions[i].opener.clone();
        let mut s = opener.open().await.expect("open stream");
        s.write_all(request).await.expect("write request");
        s.flush().await.expect("flush");
        let open: StreamOpen = tokio::time::timeout(LIMIT, read_frame(&mut s))
            .await
            .expect("StreamOpen in time")
            .expect("StreamOpen");
        (s, open)
    }
}

async fn gateway_connection(
    tcp: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    policy: Policy,
    state: Arc<Mutex<GwState>>,
) {
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        lock(&state).tls_failed += 1;
        return;
    };
    let Ok(Ok(hello)) = tokio::time::timeout(LIMIT, read_frame::<_, Hello>(&mut tls)).await else {
        return;
    };
    lock(&state).hellos.push(hello.clone());
    let answer = match (&policy, &hello) {
        (Policy::Refuse(code, message), _) => HelloAnswer::Refused {
            code: *code,
            message: (*message).to_owned(),
        },
        (
            Policy::Verify(cp),
            Hello::Agent {
                endpoint_id,
                edge_id,
                token,
            },
        ) => match cp.consume_token(token) {
            Some(issued) if issued.endpoint_id == *endpoint_id && issued.edge_id == *edge_id => {
                HelloAnswer::Accepted {
                    gateway_id: "gw-test".to_owned(),
                    epoch: lock(&state).sessions.len() as u64 + 1,
                }
            }
            Some(_) => HelloAnswer::Refused {
                code: HelloRefusal::Mismatch,
                message: "credentials of another agent".to_owned(),
            },
            None => HelloAnswer::Refused {
                code: HelloRefusal::BadCredentials,
                message: "unknown, used or expired token".to_owned(),
            },
        },
        (Policy::Verify(_), Hello::Dial { .. }) => HelloAnswer::Refused {
            code: HelloRefusal::NotAuthorized,
            message: "no dial sessions here".to_owned(),
        },
    };
    let accepted = matches!(answer, HelloAnswer::Accepted { .. });
    if write_frame(&mut tls, &answer).await.is_err() || !accepted {
        return;
    }
    let kill = CancellationToken::new();
    let io = Killable {
        inner: tls,
        killed: Box::pin(kill.clone().cancelled_owned()),
        dead: false,
    };
    let mut session = mux::spawn(io, Mode::Client);
    // The agent opens the control stream (and writes first).
    let Ok(Some(control)) = tokio::time::timeout(LIMIT, session.inbound.recv()).await else {
        return;
    };
    let control_end = Arc::new(Mutex::new(None));
    lock(&state).sessions.push(GwSession {
        opener: session.opener.clone(),
        kill: kill.clone(),
        control_end: control_end.clone(),
        opened: Instant::now(),
    });
    let end = mux::control_pinger(control, kill.clone()).await;
    *lock(&control_end) = Some((end, Instant::now()));
    // Keep the session's inbound queue alive until it ends.
    session.opener.closed().await;
    drop(session);
}

// ---------------------------------------------------------------------------------------------
// The agent under test.

struct Agent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<Result<(), edge_agent::AgentError>>,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start(token: &JoinToken, docker_host: &str, inactivity: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config::from_args(edge_agent::Args {
            edge_key: Some(token.encode()),
            data_dir: Some(dir.path().to_owned()),
            docker_host: Some(docker_host.to_owned()),
            inactivity_timeout: Some(inactivity.to_owned()),
            ..Default::default()
        })
        .expect("config");
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(edge_agent::run(config, async {
            let _ = stop_rx.await;
        }));
        Self {
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("agent stops promptly")
            .expect("task")
            .expect("clean exit");
    }
}

/// The fake control plane and a gateway serving its certificate (as a single node does).
async fn setup(interval_secs: u32) -> (Arc<FakeControlPlane>, u64, JoinToken, Gateway) {
    let cp = Arc::new(FakeControlPlane::start().await.expect("fake control plane"));
    let (id, token) = cp.create_env(interval_secs);
    let gw = Gateway::start(
        cp.certificate(),
        cp.private_key(),
        Policy::Verify(cp.clone()),
    )
    .await;
    cp.set_gateways(vec![gw.addr.to_string()]);
    (cp, id, token, gw)
}

async fn bound(cp: &FakeControlPlane, id: u64) {
    assert!(
        wait_until(LIMIT, || cp.env(id).is_some_and(|e| e.edge_id.is_some())).await,
        "agent did not check in"
    );
}

const ECHO: &[u8] =
    b"POST /echo HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n";
const VERSION: &[u8] = b"GET /version HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n";

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn docker_streams_are_piped_both_ways_with_half_close() {
    bounded(async {
        let (logs, _guard) = Logs::capture();
        let (cp, id, token, gw) = setup(2).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = FakeEngine::start(dir.path());
        let agent = Agent::start(&token, &engine.docker_host(), "60s");
        bound(&cp, id).await;
        cp.want_tunnel(id);
        gw.wait_sessions(1).await;
        assert_eq!(logs.count("tunnel open"), 1, "{}", logs.text());

        // An upgraded connection: input ends (half-close) while output continues.
        let (mut s, open) = gw.stream(0, ECHO).await;
        assert_eq!(open, StreamOpen::Ok);
        let head = read_head(&mut s).await.expect("upgrade answer");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        s.write_all(b"ping\n").await.expect("write");
        let mut echoed = [0u8; 5];
        s.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(&echoed, b"ping\n");
        s.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.expect("rest");
        assert_eq!(
            rest, b"bye\n",
            "output after the half-close arrives, then the end"
        );

        // A plain API call; several streams at once.
        let mut answers = Vec::new();
        for _ in 0..3 {
            answers.push(gw.stream(0, VERSION).await);
        }
        for (mut s, open) in answers {
            assert_eq!(open, StreamOpen::Ok);
            let mut answer = String::new();
            s.read_to_string(&mut answer).await.expect("answer");
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(answer.contains("1.0-fake"), "{answer}");
        }

        // Shutdown closes the tunnel with a reason.
        agent.stop().await;
        assert!(
            wait_until(LIMIT, || gw.control_end(0).is_some()).await,
            "control stream did not end"
        );
        assert_eq!(
            gw.control_end(0).map(|(e, _)| e),
            Some(ControlEnd::PeerClosing(CloseReason::Shutdown))
        );
        assert!(!logs.text().contains("tunnel lost"), "{}", logs.text());
    })
    .await;
}

#[tokio::test]
async fn missing_engine_socket_refuses_the_stream_naming_docker_host() {
    bounded(async {
        let (_logs, _guard) = Logs::capture();
        let (cp, id, token, gw) = setup(2).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = format!("unix://{}/missing.sock", dir.path().display());
        let agent = Agent::start(&token, &missing, "60s");
        bound(&cp, id).await;
        cp.want_tunnel(id);
        gw.wait_sessions(1).await;
        let (mut s, open) = gw.stream(0, VERSION).await;
        match open {
            StreamOpen::Refused { code, message } => {
                assert_eq!(code, StreamRefusal::EngineUnreachable);
                assert!(
                    message.starts_with(&format!("cannot connect to DOCKER_HOST {missing}: ")),
                    "{message}"
                );
            }
            StreamOpen::Ok => panic!("stream accepted without an engine"),
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
        // The tunnel itself stays up and serves the next stream the same way.
        let (_, again) = gw.stream(0, VERSION).await;
        assert!(matches!(again, StreamOpen::Refused { .. }));
        assert_eq!(gw.control_end(0), None);
        agent.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_gateway_with_another_certificate_gets_no_hello() {
    bounded(async {
        let (logs, _guard) = Logs::capture();
        let cp = Arc::new(FakeControlPlane::start().await.expect("fake"));
        let (id, token) = cp.create_env(1);
        let (cert, key) = own_certificate();
        let gw = Gateway::start(cert, key, Policy::Verify(cp.clone())).await;
        cp.set_gateways(vec![gw.addr.to_string()]);

        // The handshake alone: a precise error, and nothing sent after TLS.
        let err = edge_agent::tunnel::handshake(
            &gw.addr.to_string(),
            None,
            &edge_agent::tls::tunnel_config(token.tunnel_fingerprint).expect("tls"),
            &Hello::Agent {
                endpoint_id: id,
                edge_id: Uuid::new_v4(),
                token: [1; 32],
            },
        )
        .await
        .expect_err("fingerprint mismatch");
        assert_eq!(
            err.to_string(),
            format!(
                "gateway {} presented a certificate whose fingerprint does not match EDGE_KEY",
                gw.addr
            )
        );

        // The agent: one clear line, no hello, and it keeps polling.
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = Agent::start(
            &token,
            &format!("unix://{}/d.sock", dir.path().display()),
            "60s",
        );
        bound(&cp, id).await;
        cp.want_tunnel(id);
        assert!(
            wait_until(LIMIT, || gw.state().tls_failed >= 2).await,
            "agent did not try the gateway"
        );
        let line = format!(
            "gateway {} presented a certificate whose fingerprint does not match EDGE_KEY",
            gw.addr
        );
        assert!(
            wait_until(LIMIT, || logs.count(&line) == 1).await,
            "{}",
            logs.text()
        );
        assert!(gw.state().hellos.is_empty(), "a hello reached the impostor");
        let before = cp.env(id).map_or(0, |e| e.checkins);
        assert!(
            wait_until(LIMIT, || cp
                .env(id)
                .is_some_and(|e| e.checkins >= before + 2))
            .await,
            "agent stopped polling"
        );
        assert_eq!(gw.sessions(), 0);
        agent.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_refused_hello_is_one_clear_line_and_the_agent_keeps_polling() {
    bounded(async {
        let (logs, _guard) = Logs::capture();
        let cp = Arc::new(FakeControlPlane::start().await.expect("fake"));
        let (id, token) = cp.create_env(1);
        let gw = Gateway::start(
            cp.certificate(),
            cp.private_key(),
            Policy::Refuse(HelloRefusal::BadCredentials, "token unknown"),
        )
        .await;
        cp.set_gateways(vec![gw.addr.to_string()]);
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = Agent::start(
            &token,
            &format!("unix://{}/d.sock", dir.path().display()),
            "60s",
        );
        bound(&cp, id).await;
        cp.want_tunnel(id);
        assert!(
            wait_until(LIMIT, || !gw.state().hellos.is_empty()).await,
            "no hello"
        );
        match &gw.state().hellos[0] {
            Hello::Agent {
                endpoint_id, token, ..
            } => {
                assert_eq!(*endpoint_id, id);
                assert_eq!(cp.issued()[0].token, *token, "the token it was given");
            }
            other => panic!("unexpected hello {other:?}"),
        }
        let line = "gateway refused the tunnel credentials (BadCredentials): token unknown";
        assert!(
            wait_until(LIMIT, || logs.count(line) == 1).await,
            "{}",
            logs.text()
        );
        let before = cp.env(id).map_or(0, |e| e.checkins);
        assert!(
            wait_until(LIMIT, || cp
                .env(id)
                .is_some_and(|e| e.checkins >= before + 2))
            .await,
            "agent stopped polling"
        );
        assert_eq!(gw.sessions(), 0);
        // Refused credentials are not asked for again on the agent's own initiative.
        assert!(cp
            .seen()
            .iter()
            .all(|s| s.path != proto::tunnel::TUNNEL_REQUEST_PATH));
        agent.stop().await;
    })
    .await;
}

#[tokio::test]
async fn credentials_that_do_not_open_are_one_warning_and_polling_goes_on() {
    bounded(async {
        let (logs, _guard) = Logs::capture();
        let (cp, id, token, gw) = setup(1).await;
        cp.set_corrupt_credentials(true);
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = Agent::start(
            &token,
            &format!("unix://{}/d.sock", dir.path().display()),
            "60s",
        );
        bound(&cp, id).await;
        cp.want_tunnel(id);
        assert!(
            wait_until(LIMIT, || logs.count("could not open tunnel credentials")
                == 1)
            .await,
            "{}",
            logs.text()
        );
        let before = cp.env(id).map_or(0, |e| e.checkins);
        assert!(
            wait_until(LIMIT, || cp
                .env(id)
                .is_some_and(|e| e.checkins >= before + 2))
            .await,
            "agent stopped polling"
        );
        assert!(gw.state().hellos.is_empty() && gw.state().tls_failed == 0);
        // Good credentials work as usual afterwards.
        cp.set_corrupt_credentials(false);
        cp.want_tunnel(id);
        gw.wait_sessions(1).await;
        agent.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_idle_tunnel_sends_a_snapshot_then_closes_as_inactive() {
    bounded(async {
        let (logs, _guard) = Logs::capture();
        let (cp, id, token, gw) = setup(2).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = FakeEngine::start(dir.path());
        let agent = Agent::start(&token, &engine.docker_host(), "300ms");
        bound(&cp, id).await;
        // The first snapshot of the process comes by itself.
        assert!(
            wait_until(LIMIT, || !cp.uploads(id).is_empty()).await,
            "no startup snapshot: {}",
            logs.text()
        );
        let snap = cp.last_snapshot(id).expect("snapshot");
        assert_eq!(snap.engine.name, "Fake Engine");
        assert_eq!(snap.containers.len(), 1);
        assert_eq!(snap.containers[0].names, ["one"]);

        cp.want_tunnel(id);
        gw.wait_sessions(1).await;
        let opened = gw.state().sessions[0].opened;

        // An open stream is activity, however long it stays open.
        let (mut s, open) = gw.stream(0, ECHO).await;
        assert_eq!(open, StreamOpen::Ok);
        read_head(&mut s).await.expect("upgrade");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(gw.control_end(0), None, "closed while a stream was open");
        s.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.expect("rest");
        drop(s);

        assert!(
            wait_until(LIMIT, || gw.control_end(0).is_some()).await,
            "idle tunnel did not close"
        );
        let (end, closed_at) = gw.control_end(0).expect("end");
        assert_eq!(end, ControlEnd::PeerClosing(CloseReason::Inactive));
        let idle_uploads: Vec<_> = cp
            .uploads(id)
            .into_iter()
            .filter(|u| u.at > opened && u.at <= closed_at)
            .collect();
        assert_eq!(idle_uploads.len(), 1, "one snapshot before the idle close");
        assert!(
            wait_until(LIMIT, || logs
                .count("tunnel closed after 300ms without streams")
                == 1)
            .await,
            "{}",
            logs.text()
        );
        assert_eq!(logs.count("tunnel lost"), 0, "{}", logs.text());
        // Closed on purpose: the agent does not ask for it again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(cp
            .seen()
            .iter()
            .all(|s| s.path != proto::tunnel::TUNNEL_REQUEST_PATH));
        assert_eq!(gw.sessions(), 1);
        // When wanted again, it opens again.
        cp.want_tunnel(id);
        gw.wait_sessions(2).await;
        agent.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_tunnel_lost_while_in_use_is_asked_for_again_and_reopened() {
    bounded(async {
        let (logs, _guard) = Logs::capture();
        let (cp, id, token, gw) = setup(2).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = FakeEngine::start(dir.path());
        let agent = Agent::start(&token, &engine.docker_host(), "60s");
        bound(&cp, id).await;
        cp.want_tunnel(id);
        gw.wait_sessions(1).await;
        let (mut s, open) = gw.stream(0, ECHO).await;
        assert_eq!(open, StreamOpen::Ok);
        read_head(&mut s).await.expect("upgrade");

        // The gateway's connection dies under a stream in use.
        gw.kill(0);
        gw.wait_sessions(2).await;
        assert_eq!(logs.count("tunnel lost ("), 1, "{}", logs.text());
        assert!(logs.text().contains("asking for a new one"));
        let asked: Vec<_> = cp
            .seen()
            .into_iter()
            .filter(|s| s.path == proto::tunnel::TUNNEL_REQUEST_PATH)
            .collect();
        assert_eq!(asked.len(), 1, "one request for fresh credentials");
        assert_eq!(asked[0].status, 200);
        assert_eq!(cp.issued().len(), 0, "both tokens consumed");
        assert_eq!(logs.count("tunnel open"), 2);

        // The new tunnel works.
        let (mut s, open) = gw.stream(1, VERSION).await;
        assert_eq!(open, StreamOpen::Ok);
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.expect("answer");
        assert!(answer.contains("1.0-fake"), "{answer}");
        agent.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_held_checkin_brings_the_tunnel_at_once() {
    bounded(async {
        let (_logs, _guard) = Logs::capture();
        // A long interval: only the held check-in can make this fast.
        let (cp, id, token, gw) = setup(30).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = Agent::start(
            &token,
            &format!("unix://{}/d.sock", dir.path().display()),
            "60s",
        );
        bound(&cp, id).await;
        // The first check-in is answered at once; the held one follows at once.
        assert!(
            wait_until(LIMIT, || cp.env(id).is_some_and(|e| e.checkins >= 2)).await,
            "no held check-in"
        );
        let asked = Instant::now();
        cp.want_tunnel(id);
        gw.wait_sessions(1).await;
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "tunnel took {:?}",
            asked.elapsed()
        );
        let paths: Vec<_> = cp.seen().into_iter().map(|s| s.path).collect();
        assert_eq!(
            paths,
            [proto::wire::CHECKIN_PATH, proto::wire::HELD_CHECKIN_PATH],
            "a plain first check-in, then a held one that brought the tunnel"
        );
        agent.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_server_without_held_checkins_gets_plain_ones() {
    bounded(async {
        let (logs, _guard) = Logs::capture();
        let (cp, id, token, gw) = setup(1).await;
        cp.set_held_supported(false);
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = Agent::start(
            &token,
            &format!("unix://{}/d.sock", dir.path().display()),
            "60s",
        );
        assert!(
            wait_until(LIMIT, || cp.env(id).is_some_and(|e| e.checkins >= 3)).await,
            "agent did not keep checking in"
        );
        // The held route was tried once (the fake's 404 is not a check-in it records).
        assert!(cp
            .seen()
            .iter()
            .all(|s| s.path == proto::wire::CHECKIN_PATH && s.status != 404));
        assert_eq!(
            logs.count("the control plane does not hold check-ins"),
            1,
            "{}",
            logs.text()
        );
        // Tunnels still come (at the next check-in).
        cp.want_tunnel(id);
        gw.wait_sessions(1).await;
        agent.stop().await;
    })
    .await;
}
