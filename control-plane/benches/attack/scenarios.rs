//! The attacks, each as the anonymous client of issue 10 would run it: from many loopback
//! sources (127.0.0.2 and up, so per-source bounds alone do not stop them), holding as many
//! connections as it can and opening a new one whenever the server lets one go.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use proto::proof::{self, ProofKey, Route};
use proto::snapshot::SnapshotUpload;
use proto::token::JoinSecret;
use proto::wire::CheckinRequest;
use proto::JoinToken;
use testkit::hostile::{closed_within, connect_from, tls_over};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Every scenario, in the order they run.
pub const ALL: &[&str] = &[
    "idle_tcp_api",
    "idle_tcp_tunnel",
    "unfinished_tls_api",
    "unfinished_tls_tunnel",
    "slow_head",
    "stalled_body",
    "trickled_upload",
    "oversized_body",
    "garbage_env",
    "bomb",
];

/// What the attacks aim at.
pub struct Target {
    pub url: String,
    pub api: SocketAddr,
    pub tunnel: SocketAddr,
    pub token: JoinToken,
    /// The real agent's Edge ID (a bomb signed with the real key is the agent's own).
    pub edge_id: Uuid,
}

/// What an attack did.
#[derive(Default)]
pub struct Tally {
    /// Connections it opened.
    pub connects: AtomicU64,
    /// Of those, how many the server closed while the attack held them.
    pub closed: AtomicU64,
    /// Answers to its requests, by status (0: no answer).
    pub answers: Mutex<BTreeMap<u16, u64>>,
}

impl Tally {
    fn answered(&self, status: u16) {
        *self.answers.lock().entry(status).or_default() += 1;
    }
}

/// Sizes: connections held at once per connection attack, and the sources they come from.
#[derive(Clone, Copy)]
pub struct Sizes {
    pub connections: usize,
    pub sources: u8,
    pub floods: usize,
}

fn source(sizes: Sizes, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % usize::from(sizes.sources)) as u8)
}

/// Runs `name` until `stop`.
pub async fn run(
    name: String,
    target: Arc<Target>,
    sizes: Sizes,
    stop: CancellationToken,
    tally: Arc<Tally>,
) {
    let (api, tunnel) = (target.api, target.tunnel);
    match name.as_str() {
        "idle_tcp_api" => hold(api, sizes, stop, tally, idle).await,
        "idle_tcp_tunnel" => hold(tunnel, sizes, stop, tally, idle).await,
        "unfinished_tls_api" => hold(api, sizes, stop, tally, unfinished_tls).await,
        "unfinished_tls_tunnel" => hold(tunnel, sizes, stop, tally, unfinished_tls).await,
        "slow_head" => hold(api, sizes, stop, tally, slow_head).await,
        "stalled_body" => hold(api, sizes, stop, tally, stalled_body).await,
        "trickled_upload" => hold(api, sizes, stop, tally, trickled_upload).await,
        "oversized_body" => hold(api, sizes, stop, tally, oversized_body).await,
        "garbage_env" => flood(target, sizes, stop, tally, garbage_frames).await,
        "bomb" => flood(target, sizes, stop, tally, bombs).await,
        other => panic!("no scenario {other:?}; known: {ALL:?}"),
    }
}

/// Holds `sizes.connections` connections to `addr`, each doing `what` with its stream, and
/// opens another whenever one ends.
async fn hold<F, Fut>(
    addr: SocketAddr,
    sizes: Sizes,
    stop: CancellationToken,
    tally: Arc<Tally>,
    what: F,
) where
    F: Fn(TcpStream) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..sizes.connections {
        let (stop, tally) = (stop.clone(), Arc::clone(&tally));
        let from = source(sizes, i);
        tasks.spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(tcp) = connect_from(from, addr).await {
                    tally.connects.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = what(tcp) => {
                            tally.closed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                // A sustained attacker, not a SYN flood: back at once, after a breath.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Sends nothing; returns when the server closes.
async fn idle(mut tcp: TcpStream) {
    let _ = closed_within(&mut tcp, Duration::from_secs(3600)).await;
}

/// The first bytes of a TLS ClientHello (record header, handshake header, version), then
/// nothing: a handshake that never finishes.
async fn unfinished_tls(mut tcp: TcpStream) {
    let partial = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    if tcp.write_all(&partial).await.is_ok() {
        let _ = closed_within(&mut tcp, Duration::from_secs(3600)).await;
    }
}

/// TLS, then a check-in head trickled a byte a second.
async fn slow_head(tcp: TcpStream) {
    let Ok(mut tls) = tls_over(tcp).await else {
        return;
    };
    let start = format!("POST {} HTTP/1.1\r\nHost: x\r\n", proto::wire::CHECKIN_PATH);
    if tls.write_all(start.as_bytes()).await.is_err() {
        return;
    }
    loop {
        if tls.write_all(b"X").await.is_err() || tls.flush().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// TLS, a complete head announcing a 1 MiB body, one byte of it, then nothing (the attack
/// that took 1.7 GB before issue 10). To the snapshot route, which takes bodies that large:
/// a check-in's route refuses the announcement at once.
async fn stalled_body(tcp: TcpStream) {
    let Ok(mut tls) = tls_over(tcp).await else {
        return;
    };
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\n\r\n0",
        proto::snapshot::SNAPSHOT_PATH,
        proto::snapshot::MAX_UPLOAD_FRAME,
    );
    if tls.write_all(head.as_bytes()).await.is_ok() && tls.flush().await.is_ok() {
        let _ = closed_within(&mut tls, Duration::from_secs(3600)).await;
    }
}

/// TLS, a head announcing 1 MiB to the upload route, then 32 KiB every 2 s (each in time for
/// the per-read deadline): anonymous until its last byte, each would hold a little more for
/// the five minutes a body may take (2,436 pending places, 1.2 GB after 30 s) but for the
/// process-wide budget of pending bodies.
async fn trickled_upload(tcp: TcpStream) {
    let Ok(mut tls) = tls_over(tcp).await else {
        return;
    };
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\n\r\n",
        proto::snapshot::SNAPSHOT_PATH,
        proto::snapshot::MAX_UPLOAD_FRAME,
    );
    if tls.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let chunk = [0u8; 32 * 1024];
    loop {
        if tls.write_all(&chunk).await.is_err() || tls.flush().await.is_err() {
            return;
        }
        // Reads (what the server answers) while it waits; done once the server closes.
        if closed_within(&mut tls, Duration::from_secs(2))
            .await
            .is_some()
        {
            return;
        }
    }
}

/// TLS, then a check-in's head announcing a 1 MiB body (over the route's 16 KiB), one byte of
/// it, and waiting: refused at once, so this is a flood of TLS handshakes, each with a
/// request and its refusal.
async fn oversized_body(tcp: TcpStream) {
    let Ok(mut tls) = tls_over(tcp).await else {
        return;
    };
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: 1048576\r\n\r\n0",
        proto::wire::CHECKIN_PATH,
    );
    if tls.write_all(head.as_bytes()).await.is_ok() && tls.flush().await.is_ok() {
        let _ = closed_within(&mut tls, Duration::from_secs(3600)).await;
    }
}

/// `sizes.floods` senders posting what `frames` makes, as fast as they are answered, each on
/// one kept-alive connection from its own source.
async fn flood<F>(
    target: Arc<Target>,
    sizes: Sizes,
    stop: CancellationToken,
    tally: Arc<Tally>,
    frames: F,
) where
    F: Fn(&Target, usize, usize) -> (&'static str, Vec<u8>) + Copy + Send + Sync + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..sizes.floods {
        let (stop, tally, target) = (stop.clone(), Arc::clone(&tally), Arc::clone(&target));
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(10))
            .local_address(std::net::IpAddr::V4(source(sizes, i)))
            .build()
            .expect("attack client");
        tasks.spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                let (path, body) = frames(&target, i, n);
                n += 1;
                let sent = client
                    .post(format!("{}{path}", target.url))
                    .body(body)
                    .send();
                let status = tokio::select! {
                    () = stop.cancelled() => return,
                    r = sent => match r {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => 0,
                    },
                };
                tally.answered(status);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

fn now_ms() -> u64 {
    proto::clock::now_ms()
}

/// Check-ins, held check-ins and uploads for the real agent's environment and Edge ID, fresh
/// and well formed, signed with a key that is not its own.
fn garbage_frames(target: &Target, _sender: usize, n: usize) -> (&'static str, Vec<u8>) {
    let wrong = ProofKey::derive(&JoinSecret::from_bytes([0x5a; 32]), None);
    let ts = now_ms();
    match n % 3 {
        2 => (
            proto::snapshot::SNAPSHOT_PATH,
            upload(target, &wrong, vec![0; 64]),
        ),
        k => {
            let req = CheckinRequest {
                endpoint_id: target.token.endpoint_id,
                edge_id: Some(target.edge_id),
                timestamp_lo: proto::wire::timestamp_lo(ts),
                timestamp_hi: Some((ts >> 32) as u32),
                interval_secs: 5,
                agent: None,
            };
            let route = if k == 0 { Route::Checkin } else { Route::Held };
            let frame = proof::sign(&req, route, &wrong, &target.edge_id, ts).expect("sign");
            (route.path(), frame)
        }
    }
}

fn upload(target: &Target, key: &ProofKey, body: Vec<u8>) -> Vec<u8> {
    let ts = now_ms();
    let upload = SnapshotUpload {
        endpoint_id: target.token.endpoint_id,
        edge_id: target.edge_id,
        timestamp_ms: ts,
        body,
    };
    proof::sign(&upload, Route::Snapshot, key, &target.edge_id, ts).expect("sign")
}

/// A zstd bomb: a few hundred bytes that decode (were nothing bounded) into a snapshot of
/// 1.5 million empty containers.
pub fn bomb_body() -> Vec<u8> {
    testkit::hostile::zstd_bomb(1_500_000)
}

/// Bombs: all but one sender without the key (refused by the proof, before anything is
/// decompressed); the first sends every fourth signed with the real key (the agent's own
/// mistake, one at a time: refused by the decoder's bounds before anything is built).
fn bombs(target: &Target, sender: usize, n: usize) -> (&'static str, Vec<u8>) {
    static BODY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let body = BODY.get_or_init(bomb_body).clone();
    let key = if sender == 0 && n.is_multiple_of(4) {
        ProofKey::derive(&target.token.secret, None)
    } else {
        ProofKey::derive(&JoinSecret::from_bytes([0x5a; 32]), None)
    };
    (proto::snapshot::SNAPSHOT_PATH, upload(target, &key, body))
}
