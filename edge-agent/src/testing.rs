//! A fake control plane for tests of the agent and the load test (feature `test-support`).
//!
//! It speaks just enough of the real contract: the check-in routes (`/edge/c` answered at
//! once, `/edge/h` held until a tunnel is wanted or the interval is nearly over, `/edge/t`
//! always answered with tunnel credentials) with the real proof, freshness, replay and Edge ID
//! binding rules and the JSON error codes; sealed one-time tunnel credentials; snapshot uploads
//! (`/edge/s`, verified, decompressed and kept); and the admin routes the load test uses
//! (`POST /api/endpoints/bulk`, `DELETE /api/endpoints/{id}`), over TLS with a self-signed
//! certificate whose fingerprint goes into the join tokens it issues (tests may serve a tunnel
//! gateway with the same certificate, as a single node does). The HTTP side is a deliberately
//! small hand-written HTTP/1.1 server, so tests also see exactly which headers a client sends.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proto::codec::{self, MAX_CONTROL_FRAME};
use proto::proof::{self, ProofKey};
use proto::seal::SealKey;
use proto::snapshot::{Snapshot, SnapshotUpload, MAX_UPLOAD_FRAME};
use proto::token::JoinSecret;
use proto::wire::{CheckinAnswer, CheckinRequest, EdgeStatus, TunnelCredentials};
use proto::JoinToken;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::clock::unix_now_ms;
use crate::tls::fingerprint;

/// One environment of the fake.
#[derive(Debug, Clone)]
pub struct FakeEnv {
    pub secret: JoinSecret,
    pub edge_id: Option<Uuid>,
    pub last_timestamp_ms: u64,
    pub interval_secs: u32,
    /// Every check-in answers `Required` (with fresh credentials) while set.
    pub required: bool,
    /// The next check-in answers `Required` with credentials, once (a held one at once).
    pub want_tunnel: bool,
    pub checkins: u64,
    /// Timestamps of accepted check-ins within the freshness window: an exact repeat is a
    /// replay (as on the real server; requests of one agent may arrive out of order over
    /// several connections).
    pub recent_timestamps: VecDeque<u64>,
}

/// Credentials the fake issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedTunnel {
    pub endpoint_id: u64,
    pub edge_id: Uuid,
    pub token: [u8; 32],
    pub expires_ms: u64,
}

/// A snapshot upload the fake accepted.
#[derive(Debug, Clone)]
pub struct SeenUpload {
    pub endpoint_id: u64,
    pub at: Instant,
    pub snapshot: Snapshot,
    /// Size of the signed upload frame.
    pub frame_len: usize,
}

/// A check-in as the fake saw it.
#[derive(Debug, Clone)]
pub struct SeenCheckin {
    /// Header names in the order received, lowercased.
    pub header_names: Vec<String>,
    pub body_len: usize,
    pub request: Option<CheckinRequest>,
    /// Which accepted connection carried it (1-based).
    pub connection: u64,
    /// The status answered.
    pub status: u16,
    /// The route it was posted to.
    pub path: String,
}

#[derive(Debug, Default)]
struct State {
    envs: HashMap<u64, FakeEnv>,
    next_id: u64,
    seen: Vec<SeenCheckin>,
    scripted: VecDeque<(u16, String)>,
    clock_offset_ms: i64,
    agent_secret: Option<String>,
    connections: u64,
    deleted: Vec<u64>,
    url: String,
    fingerprint: [u8; 32],
    /// Keep every check-in in `seen` (tests); off for long runs, where only the count grows.
    no_recording: bool,
    seen_count: u64,
    /// Put into every credential; empty: the agent uses its join token's tunnel address.
    gateways: Vec<String>,
    /// `false`: behave like a server without held check-ins (`/edge/h` is unknown: 404).
    no_held: bool,
    issued: Vec<IssuedTunnel>,
    uploads: Vec<SeenUpload>,
    /// Seal credentials so that the agent cannot open them (as with a wrong key).
    corrupt_credentials: bool,
}

/// Uploads kept for assertions (the oldest go first).
const MAX_KEPT_UPLOADS: usize = 256;
/// Accepted timestamps remembered per environment for replay detection.
const MAX_RECENT: usize = 256;
/// Held check-ins are answered this long before the agent's interval ends.
const HOLD_MARGIN: Duration = Duration::from_millis(250);
/// Lifetime of the credentials the fake issues.
const CREDENTIALS_TTL_MS: u64 = 60_000;

/// A running fake control plane; stops when dropped.
#[derive(Debug)]
pub struct FakeControlPlane {
    pub addr: SocketAddr,
    /// `https://127.0.0.1:<port>`
    pub url: String,
    /// SHA-256 of its certificate, as it goes into join tokens.
    pub fingerprint: [u8; 32],
    pub api_key: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
    close_all: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Drop for FakeControlPlane {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Errors starting the fake (tests unwrap them).
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
}

impl FakeControlPlane {
    /// Starts on `127.0.0.1:0` with a fresh self-signed certificate.
    pub async fn start() -> Result<Self, FakeError> {
        let key = rcgen::KeyPair::generate()?;
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?;
        let cert_der: CertificateDer<'static> = cert.der().clone();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone()], key_der)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let key_der = key.serialize_der();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let url = format!("https://127.0.0.1:{}", addr.port());
        let state = Arc::new(Mutex::new(State {
            next_id: 1,
            url: url.clone(),
            fingerprint: fingerprint(&cert_der),
            ..State::default()
        }));
        let api_key = Uuid::new_v4().simple().to_string();
        let (close_all, close_rx) = watch::channel(0u64);
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(accept_loop(
            listener,
            acceptor,
            Arc::new(Shared {
                state: state.clone(),
                api_key: api_key.clone(),
                wake: wake.clone(),
            }),
            close_rx,
        ));
        Ok(Self {
            addr,
            url,
            fingerprint: fingerprint(&cert_der),
            api_key,
            cert_der,
            key_der,
            state,
            wake,
            close_all,
            task,
        })
    }

    /// The certificate (its fingerprint is in the join tokens): a test gateway serving it is
    /// accepted by agents, as a single node serves API and tunnels with one certificate.
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// The certificate's private key (PKCS#8 DER).
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Creates an environment and returns its id and join token.
    pub fn create_env(&self, interval_secs: u32) -> (u64, JoinToken) {
        create_env(&self.state, &self.url, self.fingerprint, interval_secs)
    }

    /// The server clock runs `offset_ms` ahead of the local one.
    pub fn set_clock_offset_ms(&self, offset_ms: i64) {
        self.state().clock_offset_ms = offset_ms;
    }

    pub fn set_agent_secret(&self, secret: Option<&str>) {
        self.state().agent_secret = secret.map(str::to_owned);
    }

    /// The next check-in (whatever it holds) gets this status and JSON body.
    pub fn script_answer(&self, status: u16, json: &str) {
        self.state().scripted.push_back((status, json.to_owned()));
    }

    pub fn set_required(&self, id: u64, required: bool) {
        if let Some(env) = self.state().envs.get_mut(&id) {
            env.required = required;
        }
        self.wake.notify_waiters();
    }

    /// An operator wants the tunnel: the next check-in (a held one at once) answers
    /// `Required` with fresh credentials, once.
    pub fn want_tunnel(&self, id: u64) {
        if let Some(env) = self.state().envs.get_mut(&id) {
            env.want_tunnel = true;
        }
        self.wake.notify_waiters();
    }

    /// The gateways every credential names from now on (empty: the token's tunnel address).
    pub fn set_gateways(&self, gateways: Vec<String>) {
        self.state().gateways = gateways;
    }

    /// `false`: answer `/edge/h` with 404 like a server that predates held check-ins.
    pub fn set_held_supported(&self, on: bool) {
        self.state().no_held = !on;
    }

    /// `true`: credentials are sealed so that no agent can open them.
    pub fn set_corrupt_credentials(&self, on: bool) {
        self.state().corrupt_credentials = on;
    }

    /// Every credential issued so far.
    pub fn issued(&self) -> Vec<IssuedTunnel> {
        self.state().issued.clone()
    }

    /// Consumes an issued token, as a gateway does: the credentials it belonged to, once.
    pub fn consume_token(&self, token: &[u8; 32]) -> Option<IssuedTunnel> {
        let mut st = self.state();
        let pos = st.issued.iter().position(|t| &t.token == token)?;
        let issued = st.issued.remove(pos);
        (issued.expires_ms >= unix_now_ms()).then_some(issued)
    }

    /// Snapshot uploads accepted for `id`, oldest first.
    pub fn uploads(&self, id: u64) -> Vec<SeenUpload> {
        self.state()
            .uploads
            .iter()
            .filter(|u| u.endpoint_id == id)
            .cloned()
            .collect()
    }

    /// The last snapshot accepted for `id`.
    pub fn last_snapshot(&self, id: u64) -> Option<Snapshot> {
        self.uploads(id).pop().map(|u| u.snapshot)
    }

    /// Forgets the bound Edge ID (the admin's "reset association").
    pub fn reset_association(&self, id: u64) {
        if let Some(env) = self.state().envs.get_mut(&id) {
            env.edge_id = None;
        }
    }

    pub fn env(&self, id: u64) -> Option<FakeEnv> {
        self.state().envs.get(&id).cloned()
    }

    pub fn env_count(&self) -> usize {
        self.state().envs.len()
    }

    pub fn deleted(&self) -> Vec<u64> {
        self.state().deleted.clone()
    }

    /// Stops keeping check-ins in [`Self::seen`] (long runs would grow without bound).
    pub fn set_recording(&self, on: bool) {
        self.state().no_recording = !on;
    }

    /// Check-ins answered so far.
    pub fn seen_count(&self) -> u64 {
        self.state().seen_count
    }

    pub fn seen(&self) -> Vec<SeenCheckin> {
        self.state().seen.clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state().connections
    }

    /// Closes every open connection (as an idle timeout or a restart would).
    pub fn close_connections(&self) {
        self.close_all.send_modify(|g| *g += 1);
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread may poison the lock; the state is still fine for the others.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn create_env(
    state: &Mutex<State>,
    url: &str,
    fp: [u8; 32],
    interval_secs: u32,
) -> (u64, JoinToken) {
    let mut st = lock(state);
    let id = st.next_id;
    st.next_id += 1;
    let secret = JoinSecret::generate();
    st.envs.insert(
        id,
        FakeEnv {
            secret: secret.clone(),
            edge_id: None,
            last_timestamp_ms: 0,
            interval_secs,
            required: false,
            want_tunnel: false,
            checkins: 0,
            recent_timestamps: VecDeque::new(),
        },
    );
    let token = JoinToken {
        api_url: url.to_owned(),
        tunnel_addr: "127.0.0.1:1".to_owned(),
        tunnel_fingerprint: fp,
        endpoint_id: id,
        secret,
    };
    (id, token)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    close_rx: watch::Receiver<u64>,
) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let mut close_rx = close_rx.clone();
        let connection = {
            let mut st = lock(&shared.state);
            st.connections += 1;
            st.connections
        };
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            close_rx.mark_unchanged();
            tokio::select! {
                _ = serve(stream, &shared, connection, peer) => {}
                _ = close_rx.changed() => {}
            }
        });
    }
}

struct Shared {
    state: Arc<Mutex<State>>,
    api_key: String,
    /// Wakes held check-ins when a tunnel is wanted.
    wake: Arc<Notify>,
}

struct HttpRequest {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Option<HttpRequest> {
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let path = request_line.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if len > MAX_UPLOAD_FRAME + 1024 {
        return None;
    }
    let body_start = head_end + 4;
    while buf.len() < body_start + len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[body_start..body_start + len].to_vec();
    buf.drain(..body_start + len);
    Some(HttpRequest {
        method,
        path,
        headers,
        body,
    })
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    shared: &Shared,
    connection: u64,
    _peer: SocketAddr,
) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf).await {
        let (status, content_type, body) = match checkin_kind(shared, &req) {
            Some(kind) => checkin(shared, &req, connection, kind).await,
            None => route(shared, &req),
        };
        let head = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
            reason(status),
            body.len()
        );
        if stream.write_all(head.as_bytes()).await.is_err()
            || stream.write_all(&body).await.is_err()
            || stream.flush().await.is_err()
        {
            return;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Other",
    }
}

fn json_error(status: u16, code: &str, message: &str) -> (u16, &'static str, Vec<u8>) {
    let body = serde_json::json!({"message": message, "code": code});
    (status, "application/json", body.to_string().into_bytes())
}

type Response = (u16, &'static str, Vec<u8>);

/// How a check-in route is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Held,
    AskTunnel,
}

fn checkin_kind(shared: &Shared, req: &HttpRequest) -> Option<Kind> {
    if req.method != "POST" {
        return None;
    }
    match req.path.as_str() {
        proto::wire::CHECKIN_PATH => Some(Kind::Plain),
        proto::wire::HELD_CHECKIN_PATH if !lock(&shared.state).no_held => Some(Kind::Held),
        proto::tunnel::TUNNEL_REQUEST_PATH => Some(Kind::AskTunnel),
        _ => None,
    }
}

fn route(shared: &Shared, req: &HttpRequest) -> Response {
    if req.method == "POST" && req.path == proto::snapshot::SNAPSHOT_PATH {
        return upload(shared, req);
    }
    if req.method == "POST" && req.path == proto::wire::HELD_CHECKIN_PATH {
        // A server that predates held check-ins: no such route (no agent error code).
        let body = serde_json::json!({"message": "no route for POST /edge/h"});
        return (404, "application/json", body.to_string().into_bytes());
    }
    if req.header("x-api-key") != Some(shared.api_key.as_str()) {
        return json_error(401, "unauthorized", "missing or wrong X-API-Key");
    }
    if req.method == "POST" && req.path == "/api/endpoints/bulk" {
        return bulk_create(shared, req);
    }
    if req.method == "DELETE" {
        if let Some(id) = req
            .path
            .strip_prefix("/api/endpoints/")
            .and_then(|s| s.parse::<u64>().ok())
        {
            let mut st = lock(&shared.state);
            return if st.envs.remove(&id).is_some() {
                st.deleted.push(id);
                (204, "application/json", Vec::new())
            } else {
                json_error(404, "not_found", "no such environment")
            };
        }
    }
    json_error(404, "not_found", "no such route")
}

fn bulk_create(shared: &Shared, req: &HttpRequest) -> (u16, &'static str, Vec<u8>) {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct NewEnv {
        name: String,
        checkin_interval: Option<u32>,
    }
    let Ok(items) = serde_json::from_slice::<Vec<NewEnv>>(&req.body) else {
        return json_error(400, "bad_request", "expected a JSON array");
    };
    if items.len() > 1000 {
        return json_error(400, "bad_request", "at most 1000 environments per call");
    }
    let (url, fp) = {
        let st = lock(&shared.state);
        (st.url.clone(), st.fingerprint)
    };
    let out: Vec<serde_json::Value> = items
        .iter()
        .map(|item| {
            let (id, token) =
                create_env(&shared.state, &url, fp, item.checkin_interval.unwrap_or(5));
            serde_json::json!({"id": id, "name": item.name, "edgeKey": token.encode()})
        })
        .collect();
    (
        201,
        "application/json",
        serde_json::Value::Array(out).to_string().into_bytes(),
    )
}

async fn checkin(shared: &Shared, req: &HttpRequest, connection: u64, kind: Kind) -> Response {
    let parsed = proof::open::<CheckinRequest>(&req.body, MAX_CONTROL_FRAME);
    let mut seen = SeenCheckin {
        header_names: req.headers.iter().map(|(n, _)| n.clone()).collect(),
        body_len: req.body.len(),
        request: parsed.as_ref().ok().map(|(r, _)| r.clone()),
        connection,
        status: 0,
        path: req.path.clone(),
    };
    let decided = {
        let mut st = lock(&shared.state);
        checkin_answer(&mut st, parsed, kind)
    };
    let answer = match decided {
        Decided::Now(answer) => answer,
        Decided::Hold {
            env,
            for_,
            idle_answer,
        } => hold(shared, env, for_, idle_answer).await,
    };
    seen.status = answer.0;
    let mut st = lock(&shared.state);
    st.seen_count += 1;
    if !st.no_recording {
        st.seen.push(seen);
    }
    answer
}

/// What to answer a verified check-in.
enum Decided {
    Now(Response),
    /// Idle for now: answer `idle_answer` after `for_`, unless a tunnel is wanted first.
    Hold {
        env: u64,
        for_: Duration,
        idle_answer: Response,
    },
}

async fn hold(shared: &Shared, env: u64, for_: Duration, idle_answer: Response) -> Response {
    let deadline = Instant::now() + for_;
    loop {
        let woken = shared.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        {
            let mut st = lock(&shared.state);
            if let Some(answer) = tunnel_answer_if_wanted(&mut st, env) {
                return answer;
            }
        }
        if tokio::time::timeout_at(deadline, woken).await.is_err() {
            return idle_answer;
        }
    }
}

/// A `Required` answer with fresh credentials, when the environment wants a tunnel.
fn tunnel_answer_if_wanted(st: &mut State, id: u64) -> Option<Response> {
    let env = st.envs.get_mut(&id)?;
    if !(env.required || env.want_tunnel) {
        return None;
    }
    env.want_tunnel = false;
    let interval_secs = env.interval_secs;
    Some(tunnel_answer(st, id, interval_secs, None))
}

/// `Required` with credentials sealed for the environment's bound agent.
fn tunnel_answer(
    st: &mut State,
    id: u64,
    interval_secs: u32,
    server_time_ms: Option<u64>,
) -> Response {
    let Some(env) = st.envs.get(&id) else {
        return json_error(404, "unknown_environment", "no such environment");
    };
    let Some(edge_id) = env.edge_id else {
        return json_error(400, "edge_id_required", "send the Edge ID");
    };
    let creds = TunnelCredentials {
        token: rand::random(),
        expires_ms: unix_now_ms() + CREDENTIALS_TTL_MS,
        gateways: st.gateways.clone(),
    };
    let Ok(mut sealed) = SealKey::derive(&env.secret, &edge_id).seal(&creds) else {
        return json_error(500, "internal", "seal failed");
    };
    if st.corrupt_credentials {
        if let Some(b) = sealed.ciphertext.first_mut() {
            *b ^= 1;
        }
    }
    st.issued.push(IssuedTunnel {
        endpoint_id: id,
        edge_id,
        token: creds.token,
        expires_ms: creds.expires_ms,
    });
    let answer = CheckinAnswer {
        status: EdgeStatus::Required,
        interval_secs,
        server_time_ms,
        tunnel: Some(sealed),
    };
    match codec::encode(&answer) {
        Ok(bytes) => (200, "application/octet-stream", bytes),
        Err(_) => json_error(500, "internal", "encode failed"),
    }
}

fn checkin_answer(
    st: &mut State,
    parsed: Result<(CheckinRequest, proof::Unverified<'_>), proto::CodecError>,
    kind: Kind,
) -> Decided {
    if let Some((status, json)) = st.scripted.pop_front() {
        return Decided::Now((status, "application/json", json.into_bytes()));
    }
    let Ok((request, unverified)) = parsed else {
        return Decided::Now(json_error(400, "bad_request", "undecodable check-in"));
    };
    let server_now = unix_now_ms().saturating_add_signed(st.clock_offset_ms);
    let agent_secret = st.agent_secret.clone();
    let Some(env) = st.envs.get_mut(&request.endpoint_id) else {
        return Decided::Now(json_error(
            404,
            "unknown_environment",
            "no such environment",
        ));
    };
    // Steady requests omit the Edge ID; the MAC covers the bound one.
    let Some(claimed) = request.edge_id.or(env.edge_id) else {
        return Decided::Now(json_error(400, "edge_id_required", "send the Edge ID"));
    };
    let timestamp_ms =
        proto::wire::request_timestamp(request.timestamp_lo, request.timestamp_hi, server_now);
    if !unverified.verify(
        &ProofKey::derive(&env.secret, agent_secret.as_deref()),
        &claimed,
        timestamp_ms,
    ) {
        return Decided::Now(json_error(
            401,
            "bad_proof",
            "request proof does not verify",
        ));
    }
    if proof::check_freshness(timestamp_ms, server_now).is_err() {
        let body = serde_json::json!({
            "message": "timestamp too far from server time",
            "code": "clock_skew",
            "serverTimeMs": server_now,
        });
        return Decided::Now((401, "application/json", body.to_string().into_bytes()));
    }
    // Binding before replay: a second agent must hear "another Edge ID", whatever its clock.
    if env.edge_id.is_some_and(|bound| bound != claimed) {
        return Decided::Now(json_error(
            403,
            "edge_id_mismatch",
            "environment is bound to another Edge ID",
        ));
    }
    if env.recent_timestamps.contains(&timestamp_ms) {
        return Decided::Now(json_error(401, "replay", "this request was seen before"));
    }
    env.edge_id = Some(claimed);
    env.last_timestamp_ms = env.last_timestamp_ms.max(timestamp_ms);
    env.recent_timestamps.push_back(timestamp_ms);
    while env.recent_timestamps.len() > MAX_RECENT
        || env
            .recent_timestamps
            .front()
            .is_some_and(|&t| t + proof::FRESHNESS_WINDOW_MS < env.last_timestamp_ms)
    {
        env.recent_timestamps.pop_front();
    }
    env.checkins += 1;
    let skew = i128::from(timestamp_ms) - i128::from(server_now);
    let server_time_ms = (skew.abs() > 1000).then_some(server_now);
    let interval_secs = env.interval_secs;
    let wanted = env.required || env.want_tunnel || kind == Kind::AskTunnel;
    if wanted {
        env.want_tunnel = false;
        return Decided::Now(tunnel_answer(
            st,
            request.endpoint_id,
            interval_secs,
            server_time_ms,
        ));
    }
    let idle_answer = if skew.abs() <= 1000
        && interval_secs == request.interval_secs
        && request.agent.is_none()
    {
        (204, "application/octet-stream", Vec::new())
    } else {
        let answer = CheckinAnswer {
            status: EdgeStatus::Idle,
            interval_secs,
            server_time_ms,
            tunnel: None,
        };
        match codec::encode(&answer) {
            Ok(bytes) => (200, "application/octet-stream", bytes),
            Err(_) => json_error(500, "internal", "encode failed"),
        }
    };
    if kind == Kind::Held {
        return Decided::Hold {
            env: request.endpoint_id,
            for_: Duration::from_secs(u64::from(request.interval_secs)).saturating_sub(HOLD_MARGIN),
            idle_answer,
        };
    }
    Decided::Now(idle_answer)
}

/// `/edge/s`: verified like the real server (bound Edge ID, proof, freshness), decompressed
/// within bounds, kept for assertions.
fn upload(shared: &Shared, req: &HttpRequest) -> Response {
    let mut st = lock(&shared.state);
    if let Some((status, json)) = st.scripted.pop_front() {
        return (status, "application/json", json.into_bytes());
    }
    let Ok((upload, _)) = proof::open::<SnapshotUpload>(&req.body, MAX_UPLOAD_FRAME) else {
        return json_error(400, "bad_request", "undecodable snapshot upload");
    };
    let server_now = unix_now_ms().saturating_add_signed(st.clock_offset_ms);
    let agent_secret = st.agent_secret.clone();
    let Some(env) = st.envs.get(&upload.endpoint_id) else {
        return json_error(404, "unknown_environment", "no such environment");
    };
    match env.edge_id {
        None => return json_error(400, "edge_id_required", "check in first"),
        Some(bound) if bound != upload.edge_id => {
            return json_error(
                403,
                "edge_id_mismatch",
                "environment is bound to another Edge ID",
            )
        }
        Some(_) => {}
    }
    if !proof::verify(
        &req.body,
        &ProofKey::derive(&env.secret, agent_secret.as_deref()),
        &upload.edge_id,
        upload.timestamp_ms,
    ) {
        return json_error(401, "bad_proof", "request proof does not verify");
    }
    if proof::check_freshness(upload.timestamp_ms, server_now).is_err() {
        let body = serde_json::json!({
            "message": "timestamp too far from server time",
            "code": "clock_skew",
            "serverTimeMs": server_now,
        });
        return (401, "application/json", body.to_string().into_bytes());
    }
    let Ok(snapshot) = proto::snapshot::decompress(&upload.body) else {
        return json_error(400, "bad_request", "snapshot does not decompress");
    };
    st.uploads.push(SeenUpload {
        endpoint_id: upload.endpoint_id,
        at: Instant::now(),
        snapshot,
        frame_len: req.body.len(),
    });
    if st.uploads.len() > MAX_KEPT_UPLOADS {
        st.uploads.remove(0);
    }
    (204, "application/octet-stream", Vec::new())
}

/// Waits until `cond` holds, polling every 10 ms, for at most `limit`.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}
