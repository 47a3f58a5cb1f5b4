//! A fake control plane for tests of the agent and the load test (`testkit::fake`).
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
//!
//! * This module: the handle ([`FakeControlPlane`]) with its knobs, what it records
//!   ([`SeenCheckin`], [`SeenUpload`], [`IssuedTunnel`]), and the shared state.
//! * `server`: the HTTP/1.1 server: TLS connections, reading requests, routing, and the admin
//!   routes.
//! * `checkin`: the agent's routes: check-ins (proof, freshness, replay, binding, held
//!   answers, sealed tunnel credentials) and snapshot uploads.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edge_agent::tls::fingerprint;
use parking_lot::{Mutex, MutexGuard};
use proto::clock::now_ms as unix_now_ms;
use proto::snapshot::Snapshot;
use proto::token::JoinSecret;
use proto::wire::CheckinRequest;
use proto::JoinToken;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

mod checkin;
mod server;

use server::{accept_loop, Shared};

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
        let config = rustls::ServerConfig::builder_with_provider(edge_agent::tls::provider())
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
    state.lock()
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
