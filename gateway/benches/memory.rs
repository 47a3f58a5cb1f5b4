//! Gateway memory per open idle tunnel (goal: <= 32 KiB).
//!
//!     cargo build --release -p tunnel-gateway
//!     cargo bench -p edgeplane-gateway --bench memory [-- --tunnels 2000 --settle 12]
//!
//! Starts a throwaway `redis-server` and the real `tunnel-gateway` binary (the release build,
//! which `cargo bench` of this crate does not build by itself) with a self-signed certificate
//! and a short lease, then acts as N agents from this process: for each, a one-time grant is
//! put in Redis the way the control plane does (`put_tunnel_grant` with the SHA-256 of the
//! token), and the agent's own handshake code
//! connects (TCP + TLS pinned to the certificate, `Hello::Agent`, `Accepted`), runs yamux as
//! the server, opens the control stream and answers the gateway's pings. The gateway's
//! `VmRSS` is read before any tunnel, at N/2 and at N open idle tunnels, each after a settling
//! time longer than `DEAD_AFTER`, so every tunnel still open has exchanged pings (a silent one
//! is closed by both sides) and lease renewals have run. The figure is the slope between N/2
//! and N; the all-in figure from 0 is printed too, with this process's RSS per simulated agent
//! for information. The last line on stdout is one JSON object with every figure.
//!
//! Both sides hold one socket per tunnel: N is limited to 18,000 (open-file limit 20,000).

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use proto::mux::{self, ControlEnd, Inbound, Mode, Opener};
use proto::tunnel::{CloseReason, Hello, DEAD_AFTER};
use sha2::{Digest as _, Sha256};
use store::prelude::*;
use store::redis::RedisStore;
use store::TunnelGrant;
use testkit::{GatewayArgs, GatewayProcess, RedisServer, TestCert};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const DEFAULT_TUNNELS: usize = 2_000;
/// Both processes hold one socket per tunnel, plus a few (Redis, listeners, runtime).
const MAX_TUNNELS: usize = 18_000;
/// Settling time before each sample: longer than `DEAD_AFTER` (10 s), so a tunnel still open
/// then has had pings answered, and a few lease renewals have run.
const DEFAULT_SETTLE: Duration = Duration::from_secs(12);
/// Tunnel handshakes in flight at once (the gateway drops connections above 1,024).
const CONNECT_CONCURRENCY: usize = 64;
/// The gateway's lease (renewals every third of it): short, so renewals run during the bench.
const LEASE: &str = "3s";
/// Grants live this long in the store, as the control plane's.
const GRANT_TTL: Duration = Duration::from_secs(30);
const PREFIX: &str = "edgeplane:";
/// How long the gateway may take to report every tunnel open after the last handshake.
const OPEN_WITHIN: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    if !testkit::bench::measuring() {
        return ExitCode::SUCCESS;
    }
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("memory bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("memory bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memory bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Options {
    tunnels: usize,
    settle: Duration,
}

impl Options {
    /// `--tunnels N` (or `EDGEPLANE_BENCH_TUNNELS`), `--settle SECS`; cargo's `--bench` is
    /// ignored.
    fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Self> {
        let mut tunnels = match std::env::var("EDGEPLANE_BENCH_TUNNELS") {
            Ok(v) => v
                .parse()
                .with_context(|| format!("EDGEPLANE_BENCH_TUNNELS={v:?}"))?,
            Err(_) => DEFAULT_TUNNELS,
        };
        let mut settle = DEFAULT_SETTLE;
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--bench" => {}
                "--tunnels" => {
                    let v = args.next().context("--tunnels needs a value")?;
                    tunnels = v.parse().with_context(|| format!("--tunnels {v:?}"))?;
                }
                "--settle" => {
                    let v = args.next().context("--settle needs a value (seconds)")?;
                    settle =
                        Duration::from_secs(v.parse().with_context(|| format!("--settle {v:?}"))?);
                }
                other => bail!("unknown argument {other:?} (use --tunnels N, --settle SECS)"),
            }
        }
        if !(2..=MAX_TUNNELS).contains(&tunnels) {
            bail!(
                "--tunnels {tunnels}: between 2 and {MAX_TUNNELS} (both processes hold one socket \
                 per tunnel; the open-file limit is 20,000)"
            );
        }
        if settle <= DEAD_AFTER {
            eprintln!(
                "note: --settle {settle:?} is not longer than DEAD_AFTER ({DEAD_AFTER:?}): tunnels \
                 are not proven to exchange pings"
            );
        }
        Ok(Self { tunnels, settle })
    }
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    testkit::bench::rss_bytes(pid)
        .map(|b| b / 1024)
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// `GET path` on a plain-HTTP listener: status and body.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("timed out")??;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("not an HTTP answer")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of an unlabelled metric (or the sum over its labels).
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if key == name || key.starts_with(&format!("{name}{{")) {
            let v: f64 = value.parse().ok()?;
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// The gateway process and where to watch it.
struct Gateway {
    process: GatewayProcess,
    pid: u32,
    addr: String,
    metrics: SocketAddr,
}

impl Gateway {
    async fn metrics_text(&self) -> anyhow::Result<String> {
        let (status, body) = http_get(self.metrics, "/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body)
    }

    async fn tunnels_open(&self) -> anyhow::Result<u64> {
        let text = self.metrics_text().await?;
        // A gauge of whole tunnels.
        Ok(metric(&text, "edgeplane_gateway_tunnels_open").unwrap_or(0.0) as u64)
    }

    async fn wait_open(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + OPEN_WITHIN;
        loop {
            let open = self.tunnels_open().await?;
            if open == n as u64 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the gateway holds {open} tunnels, expected {n}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn start_gateway(redis_url: &str, cert: &TestCert) -> Gateway {
    let process = GatewayProcess::start(&GatewayArgs {
        id: "bench-gw".to_owned(),
        port: 0,
        redis_url: redis_url.to_owned(),
        redis_prefix: PREFIX.to_owned(),
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        lease: LEASE.to_owned(),
        rust_log: "warn".to_owned(),
    })
    .await;
    let pid = process.pid();
    eprintln!(
        "gateway (pid {pid}) ready on {}, lease {LEASE}",
        process.listen
    );
    Gateway {
        pid,
        addr: process.listen.to_string(),
        metrics: process.metrics,
        process,
    }
}

/// One simulated agent's open tunnel: the session stays up while this is kept.
struct AgentTunnel {
    _opener: Opener,
    _inbound: Inbound,
    stop: CancellationToken,
}

/// Control streams that ended (should stay 0 while the tunnels are idle).
#[derive(Default)]
struct Ends {
    ended: AtomicUsize,
}

/// Opens one tunnel as agent `env` would: grant in the store, handshake, yamux, control stream.
async fn open_tunnel(
    store: &RedisStore,
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    env: u64,
    ends: Arc<Ends>,
) -> anyhow::Result<AgentTunnel> {
    let edge_id = uuid::Uuid::new_v4();
    let mut token = [0u8; 32];
    token[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    token[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    let token_hash: [u8; 32] = Sha256::digest(token).into();
    let grant = TunnelGrant {
        env,
        edge_id,
        expires_ms: proto::clock::now_ms() + GRANT_TTL.as_millis() as u64,
    };
    store
        .put_tunnel_grant(&token_hash, &grant, GRANT_TTL)
        .await
        .context("put_tunnel_grant")?;
    let hello = Hello::Agent {
        endpoint_id: env,
        edge_id,
        token,
    };
    let established = edge_agent::tunnel::handshake(addr, None, tls, &hello)
        .await
        .with_context(|| format!("tunnel of environment {env}"))?;
    let mux::Session { opener, inbound } = mux::spawn(established.stream, Mode::Server);
    let control = opener
        .open()
        .await
        .with_context(|| format!("control stream of environment {env}"))?;
    let stop = CancellationToken::new();
    let child_stop = stop.clone();
    tokio::spawn(async move {
        let end = mux::control_responder(control, child_stop, CloseReason::Shutdown).await;
        if end != ControlEnd::Local {
            ends.ended.fetch_add(1, Ordering::Relaxed);
            eprintln!("control stream of environment {env} ended: {end:?}");
        }
    });
    Ok(AgentTunnel {
        _opener: opener,
        _inbound: inbound,
        stop,
    })
}

/// Opens tunnels for environments `range`, [`CONNECT_CONCURRENCY`] at a time.
async fn open_tunnels(
    store: &Arc<RedisStore>,
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    range: std::ops::Range<u64>,
    ends: &Arc<Ends>,
    into: &mut Vec<AgentTunnel>,
) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut set = JoinSet::new();
    for env in range {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let (store, addr, tls, ends) = (
            Arc::clone(store),
            addr.to_owned(),
            Arc::clone(tls),
            Arc::clone(ends),
        );
        set.spawn(async move {
            let t = open_tunnel(&store, &addr, &tls, env, ends).await;
            drop(permit);
            t
        });
        // Collect finished ones as we go, so an early failure stops the bench early.
        while let Some(done) = set.try_join_next() {
            into.push(done??);
        }
    }
    while let Some(done) = set.join_next().await {
        into.push(done??);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    tunnels: usize,
    gateway_kib: u64,
    bench_kib: u64,
}

async fn sample(gw: &Gateway, tunnels: usize, settle: Duration) -> anyhow::Result<Sample> {
    gw.wait_open(tunnels).await?;
    tokio::time::sleep(settle).await;
    // Still all open after the settling time: every one of them answered pings.
    gw.wait_open(tunnels).await?;
    let s = Sample {
        tunnels,
        gateway_kib: rss_kib(gw.pid)?,
        bench_kib: rss_kib(std::process::id())?,
    };
    eprintln!(
        "{:>6} tunnels: gateway VmRSS {} KiB, bench VmRSS {} KiB",
        s.tunnels, s.gateway_kib, s.bench_kib
    );
    Ok(s)
}

fn per_tunnel(from: Sample, to: Sample, rss: impl Fn(Sample) -> u64) -> f64 {
    let d = rss(to) as f64 - rss(from) as f64;
    let n = (to.tunnels - from.tunnels) as f64;
    (d / n * 100.0).round() / 100.0
}

async fn run(options: Options) -> anyhow::Result<()> {
    let redis = RedisServer::start();
    let redis_url = redis.url();
    let cert = TestCert::generate();
    let gw = start_gateway(&redis_url, &cert).await;
    let result = measure(&gw, &redis_url, cert.fingerprint, options).await;
    if result.is_err() {
        eprintln!("gateway log tail:\n{}", tail(gw.process.log_path()));
    }
    result
}

async fn measure(
    gw: &Gateway,
    redis_url: &str,
    fingerprint: [u8; 32],
    options: Options,
) -> anyhow::Result<()> {
    let n = options.tunnels;
    let half = n / 2;
    let store = Arc::new(
        RedisStore::connect(redis_url, PREFIX)
            .await
            .context("cannot connect to redis")?,
    );
    let tls = edge_agent::tls::tunnel_config(fingerprint)?;
    let ends = Arc::new(Ends::default());
    let mut tunnels = Vec::with_capacity(n);

    // A short settle: the gateway registered and renewed once, nothing else runs.
    let before = sample(gw, 0, Duration::from_secs(3)).await?;
    let opening = Instant::now();
    open_tunnels(
        &store,
        &gw.addr,
        &tls,
        1..half as u64 + 1,
        &ends,
        &mut tunnels,
    )
    .await?;
    let first_open_secs = opening.elapsed().as_secs_f64();
    let mid = sample(gw, half, options.settle).await?;
    let opening = Instant::now();
    open_tunnels(
        &store,
        &gw.addr,
        &tls,
        half as u64 + 1..n as u64 + 1,
        &ends,
        &mut tunnels,
    )
    .await?;
    let second_open_secs = opening.elapsed().as_secs_f64();
    let full = sample(gw, n, options.settle).await?;

    let ended = ends.ended.load(Ordering::Relaxed);
    let metrics = gw.metrics_text().await?;
    let closes = metric(&metrics, "edgeplane_gateway_tunnel_closes_total").unwrap_or(0.0);
    let renew_failures =
        metric(&metrics, "edgeplane_gateway_lease_renew_failures_total").unwrap_or(0.0);
    if ended > 0 || closes > 0.0 {
        bail!("{ended} control streams ended, gateway counted {closes} closes: tunnels were not idle and open");
    }

    let slope = per_tunnel(mid, full, |s| s.gateway_kib);
    let all_in = per_tunnel(before, full, |s| s.gateway_kib);
    let bench_slope = per_tunnel(mid, full, |s| s.bench_kib);
    let bench_all_in = per_tunnel(before, full, |s| s.bench_kib);
    println!(
        "gateway memory per open idle tunnel: {slope} KiB (slope {half}..{n}), {all_in} KiB all-in \
         from 0 (goal <= 32 KiB); bench process per simulated agent: {bench_slope} KiB (slope), \
         {bench_all_in} KiB all-in"
    );
    let json = serde_json::json!({
        "bench": "gateway_memory_per_idle_tunnel",
        "tunnels": n,
        "settle_secs": options.settle.as_secs(),
        "lease": LEASE,
        "gateway_rss_kib": {"0": before.gateway_kib, "half": mid.gateway_kib, "full": full.gateway_kib},
        "gateway_kib_per_tunnel_slope": slope,
        "gateway_kib_per_tunnel_all_in": all_in,
        "goal_kib_per_tunnel": 32,
        "bench_rss_kib": {"0": before.bench_kib, "half": mid.bench_kib, "full": full.bench_kib},
        "bench_kib_per_agent_slope": bench_slope,
        "bench_kib_per_agent_all_in": bench_all_in,
        "open_secs": {"first_half": (first_open_secs * 100.0).round() / 100.0, "second_half": (second_open_secs * 100.0).round() / 100.0},
        "tunnel_closes": closes,
        "lease_renew_failures": renew_failures,
    });
    println!("{json}");

    // Say goodbye like agents shutting down; the gateway is killed when dropped anyway.
    for t in &tunnels {
        t.stop.cancel();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}
