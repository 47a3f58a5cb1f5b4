//! The tunnel side by side with a peer: edgeplane (the `control-plane` binary with its
//! embedded gateway, and the `edge-agent` binary) and rathole (a Rust reverse tunnel; server
//! and client binaries, TLS transport), in one run on loopback, in front of the same small
//! HTTP engine (the tunnel bench's, on a thread of this process).
//!
//!     scripts/tunnel-vs-rathole        # builds rathole when missing, then runs this
//!     RATHOLE=/path/to/rathole cargo bench -p control-plane --bench tunnel_peer
//!
//! - small requests: sequential `GET /_ping` on one kept-alive connection each: directly to
//!   the engine (HTTP), through rathole's visitor port (HTTP; rathole carries it over TLS), and
//!   through edgeplane (HTTPS to the control plane, then the tunnel), interleaved so all see
//!   the same machine; the overhead is each p50 less the direct p50. CPU per request: the
//!   tunnel's processes (control plane and agent; rathole's server and client) over the loop,
//!   divided by the requests (each process serves only its side's requests). Then the API
//!   front alone: `GET` of an unknown environment's `_ping` (404) on its own kept-alive
//!   connection, as many, latency and the control plane's CPU.
//! - bulk: one `GET /bulk?bytes=N` at a time through each, alternating, the best of the runs
//!   (MB/s) and the tunnel processes' CPU per GB.
//! - what the agent's side leaves behind: sockets in `TIME_WAIT` towards the engine's port.
//!
//! Settings (`PEER_<NAME>` or `--name value`): `PINGS` (20000), `BYTES` (1073741824),
//! `BULK_RUNS` (3). Prints a summary and, as the last line, one JSON object with every figure
//! (also written to `bench-results/tunnel-peer.json`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::agent::AgentProcess;
use testkit::bench::{cpu_seconds, get_ms as ping};
use testkit::stats::{round3, summary};
use testkit::{free_port, CpProcess, ADMIN_KEY};

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

fn cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_seconds(*p).unwrap_or(0.0)).sum()
}

/// Sockets in `TIME_WAIT` with `port` as their remote port (IPv4, from `/proc/net/tcp`).
fn time_wait_towards(port: u16) -> usize {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return 0;
    };
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2].ends_with(&want) && f[3] == "06"
        })
        .count()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// rathole's server and client with TLS transport (a self-signed certificate for
/// `localhost`, as PKCS#12 for its native-tls), forwarding `visitor` to `engine`.
fn start_rathole(bin: &str, dir: &Path, engine: SocketAddr, visitor: u16) -> (Killed, Killed) {
    let (key, cert, p12) = (
        dir.join("key.pem"),
        dir.join("cert.pem"),
        dir.join("id.p12"),
    );
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]));
    run(Command::new("openssl").args([
        "pkcs12",
        "-export",
        "-out",
        p12.to_str().unwrap(),
        "-inkey",
        key.to_str().unwrap(),
        "-in",
        cert.to_str().unwrap(),
        "-passout",
        "pass:bench",
    ]));
    let control = free_port();
    let server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\n\
         [server.transport]\ntype = \"tls\"\n\
         [server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"bench\"\n\
         [server.services.engine]\ntoken = \"bench-token\"\nbind_addr = \"127.0.0.1:{visitor}\"\n",
        p12.display()
    );
    let client = format!(
        "[client]\nremote_addr = \"localhost:{control}\"\n\
         [client.transport]\ntype = \"tls\"\n\
         [client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n\
         [client.services.engine]\ntoken = \"bench-token\"\nlocal_addr = \"{engine}\"\n",
        cert.display()
    );
    std::fs::write(dir.join("server.toml"), server).unwrap();
    std::fs::write(dir.join("client.toml"), client).unwrap();
    let spawn = |mode: &str, file: &str, log: &str| {
        Killed(
            Command::new(bin)
                .arg(mode)
                .arg(dir.join(file))
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(log)).unwrap())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start {bin}: {e} (scripts/tunnel-vs-rathole builds it)")
                }),
        )
    };
    let s = spawn("--server", "server.toml", "server.log");
    let c = spawn("--client", "client.toml", "client.log");
    (s, c)
}

fn main() {
    if !testkit::bench::measuring() {
        return;
    }
    let given = testkit::bench::settings("PEER_");
    let pings = testkit::bench::number(&given, "pings", 20000) as usize;
    let bytes = testkit::bench::number(&given, "bytes", 1 << 30);
    let bulk_runs = testkit::bench::number(&given, "bulk_runs", 3) as usize;
    let rathole = std::env::var("RATHOLE").unwrap_or_else(|_| "rathole".to_owned());
    let _ = testkit::api::http(); // installs the TLS provider

    let engine = testkit::mini_engine::start();
    let dir = tempfile::tempdir().unwrap();
    let visitor = free_port();
    let (rs, rc) = start_rathole(&rathole, dir.path(), engine, visitor);
    let rathole_pids = [rs.0.id(), rc.0.id()];

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let out = rt.block_on(async move {
        let cp_dir = dir.path().join("cp");
        std::fs::create_dir_all(&cp_dir).unwrap();
        let cp = CpProcess::spawn(&cp_dir, &[]).await;
        let (id, key) = testkit::api::create_env_key(
            &cp.url,
            json!({"name": "peer-bench", "checkinInterval": 5}),
        )
        .await;
        let agent = AgentProcess::standard(
            &key,
            uuid::Uuid::new_v4(),
            &format!("tcp://{engine}"),
            "5m",
        );
        let ours = [cp.pid(), agent.pid()];

        let via_ours = format!("{}/api/endpoints/{id}/docker/_ping", cp.url);
        let via_rathole = format!("http://127.0.0.1:{visitor}/_ping");
        let direct_url = format!("http://{engine}/_ping");
        let missing = format!("{}/api/endpoints/999999/docker/_ping", cp.url);
        let (c_ours, c_rathole, c_direct, c_front) = (client(), client(), client(), client());
        // Both tunnels up: the agent checked in and opens its tunnel on the first call; rathole's
        // client connected its control channel.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok_ours = c_ours
                .get(&via_ours)
                .header("X-API-Key", ADMIN_KEY)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            let ok_rathole = c_rathole
                .get(&via_rathole)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok_ours && ok_rathole {
                break;
            }
            assert!(Instant::now() < deadline, "tunnels not up (edgeplane {ok_ours}, rathole {ok_rathole})");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for _ in 0..300 {
            ping(&c_direct, &direct_url, 200).await;
            ping(&c_ours, &via_ours, 200).await;
            ping(&c_rathole, &via_rathole, 200).await;
            ping(&c_front, &missing, 404).await;
        }

        let engine_port = engine.port();
        let tw_before = time_wait_towards(engine_port);
        let (mut d, mut o, mut r) = (Vec::new(), Vec::new(), Vec::new());
        let (o0, r0) = (cpu(&ours), cpu(&rathole_pids));
        let (cp0, agent0) = (cpu(&ours[..1]), cpu(&ours[1..]));
        let started = Instant::now();
        for _ in 0..pings {
            d.push(ping(&c_direct, &direct_url, 200).await);
            o.push(ping(&c_ours, &via_ours, 200).await);
            r.push(ping(&c_rathole, &via_rathole, 200).await);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let (o_cpu, r_cpu) = (cpu(&ours) - o0, cpu(&rathole_pids) - r0);
        let per_request = |s: f64| round3(s / pings as f64 * 1e6);
        let cpu_split = json!({
            "control_plane": per_request(cpu(&ours[..1]) - cp0),
            "agent": per_request(cpu(&ours[1..]) - agent0),
        });
        let time_wait = time_wait_towards(engine_port).saturating_sub(tw_before);
        // The API front alone, on its own (its CPU is not the tunnel's).
        let mut f = Vec::new();
        let f0 = cpu(&ours[..1]);
        for _ in 0..pings {
            f.push(ping(&c_front, &missing, 404).await);
        }
        let front_cpu_us = round3((cpu(&ours[..1]) - f0) / pings as f64 * 1e6);
        let (ds, os, rs_, fs) = (summary(&d), summary(&o), summary(&r), summary(&f));
        let p50 = |v: &Value| v["p50_ms"].as_f64().unwrap();
        let over_ours = round3((p50(&os) - p50(&ds)) * 1e3);
        let over_rathole = round3((p50(&rs_) - p50(&ds)) * 1e3);
        let cpu_ours_us = round3(o_cpu / pings as f64 * 1e6);
        let cpu_rathole_us = round3(r_cpu / pings as f64 * 1e6);
        println!("small requests: {pings} sequential GET /_ping each, interleaved, {elapsed:.1} s");
        println!("  direct to the engine:  p50 {} ms, p99 {} ms", ds["p50_ms"], ds["p99_ms"]);
        println!(
            "  through edgeplane:     p50 {} ms, p99 {} ms (+{over_ours} µs p50), CPU {cpu_ours_us} µs per request (control plane {}, agent {})",
            os["p50_ms"], os["p99_ms"], cpu_split["control_plane"], cpu_split["agent"]
        );
        println!(
            "  through rathole:       p50 {} ms, p99 {} ms (+{over_rathole} µs p50), CPU {cpu_rathole_us} µs per request",
            rs_["p50_ms"], rs_["p99_ms"]
        );
        println!(
            "  edgeplane's API front alone (404, on its own): p50 {} ms, p99 {} ms, CPU {front_cpu_us} µs per request",
            fs["p50_ms"], fs["p99_ms"]
        );
        println!("  sockets left in TIME_WAIT towards the engine: {time_wait}");

        // Bulk, alternating; the best run of each.
        let bulk_ours = format!("{}/api/endpoints/{id}/docker/bulk?bytes={bytes}", cp.url);
        let bulk_rathole = format!("http://127.0.0.1:{visitor}/bulk?bytes={bytes}");
        let (mut best_o, mut best_r): ((f64, f64), (f64, f64)) = ((0.0, 0.0), (0.0, 0.0));
        for _ in 0..bulk_runs {
            for (url, c, pids, best) in [
                (&bulk_ours, &c_ours, &ours[..], &mut best_o),
                (&bulk_rathole, &c_rathole, &rathole_pids[..], &mut best_r),
            ] {
                let c0 = cpu(pids);
                let (n, took) = testkit::bench::get_to_end(c, url).await;
                let secs = took.as_secs_f64();
                assert_eq!(n, bytes);
                let mbps = n as f64 / secs / 1e6;
                let cpu_per_gb = (cpu(pids) - c0) / (n as f64 / 1e9);
                if mbps > best.0 {
                    *best = (mbps, cpu_per_gb);
                }
            }
        }
        println!(
            "bulk ({} MiB, best of {bulk_runs}): edgeplane {:.0} MB/s ({:.2} CPU-s/GB), rathole {:.0} MB/s ({:.2} CPU-s/GB)",
            bytes >> 20,
            best_o.0,
            best_o.1,
            best_r.0,
            best_r.1
        );
        let ratios = json!({
            "overhead_p50": round3(over_ours / over_rathole),
            "cpu_per_request": round3(cpu_ours_us / cpu_rathole_us),
            "bulk": round3(best_o.0 / best_r.0),
        });
        println!(
            "ratios edgeplane/rathole: overhead p50 {}x (goal <= 1.5), CPU per request {}x (goal <= 2), bulk {}x (goal >= 1)",
            ratios["overhead_p50"], ratios["cpu_per_request"], ratios["bulk"]
        );
        let metric = |name: &'static str| {
            let url = cp.metrics_url.clone();
            async move { testkit::api::metric(&url, name).await }
        };
        let reused = metric("edgeplane_docker_engine_connections_total{how=\"reused\"}").await;
        let opened = metric("edgeplane_docker_engine_connections_total{how=\"opened\"}").await;
        drop(agent);
        cp.stop();
        json!({
            "pings": pings,
            "direct": ds, "edgeplane": os, "rathole": rs_, "edgeplane_front_404": fs, "edgeplane_front_404_cpu_us": front_cpu_us,
            "overhead_p50_us": {"edgeplane": over_ours, "rathole": over_rathole},
            "cpu_per_request_us": {"edgeplane": cpu_ours_us, "rathole": cpu_rathole_us},
            "edgeplane_cpu_per_request_us": cpu_split,
            "time_wait_towards_engine": time_wait,
            "engine_connections": {"opened": opened, "reused": reused},
            "bulk_bytes": bytes,
            "bulk_mb_s": {"edgeplane": round3(best_o.0), "rathole": round3(best_r.0)},
            "bulk_cpu_s_per_gb": {"edgeplane": round3(best_o.1), "rathole": round3(best_r.1)},
            "ratios": ratios,
        })
    });
    drop((rs, rc));
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results");
    let _ = std::fs::create_dir_all(&results);
    let _ = std::fs::write(results.join("tunnel-peer.json"), format!("{out}\n"));
    println!("{out}");
}
