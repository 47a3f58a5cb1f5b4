//! Phases 2 and 3: the proxy's overhead per small request, and bulk throughput.

use super::*;

pub(crate) async fn overhead_phase(
    s: &Settings,
    cp: &ControlPlane,
    engine: SocketAddr,
    id: u64,
) -> Value {
    let proxied = client(1);
    let direct = client(1);
    let front = client(1);
    let via_tunnel = format!("{}/api/endpoints/{id}/docker/_ping", cp.url);
    let missing = format!("{}/api/endpoints/999999/docker/_ping", cp.url);
    let to_engine = format!("http://{engine}/_ping");
    use testkit::bench::get_ms as ping;
    // Warm-up: the first proxied ping opens the tunnel; connections and caches get warm.
    for _ in 0..200 {
        ping(&proxied, &via_tunnel, 200).await;
        ping(&direct, &to_engine, 200).await;
        ping(&front, &missing, 404).await;
    }
    let mut p = Vec::with_capacity(s.pings);
    let mut d = Vec::with_capacity(s.pings);
    let mut f = Vec::with_capacity(s.pings);
    let started = Instant::now();
    for _ in 0..s.pings {
        // Interleaved, so both series see the same machine.
        d.push(ping(&direct, &to_engine, 200).await);
        p.push(ping(&proxied, &via_tunnel, 200).await);
        f.push(ping(&front, &missing, 404).await);
    }
    let elapsed = started.elapsed();
    let (ps, ds, fs) = (summary(&p), summary(&d), summary(&f));
    let diff50 = round3(ps["p50_ms"].as_f64().unwrap() - ds["p50_ms"].as_f64().unwrap());
    let diff99 = round3(ps["p99_ms"].as_f64().unwrap() - ds["p99_ms"].as_f64().unwrap());
    println!(
        "proxy overhead: {} sequential GET _ping each, interleaved, {:.1} s",
        s.pings,
        elapsed.as_secs_f64()
    );
    println!("  through the tunnel (HTTPS, kept alive): {}", line(&ps));
    println!("  directly to the engine (HTTP, kept alive): {}", line(&ds));
    println!(
        "  API front only (HTTPS, unknown environment, 404): {}",
        line(&fs)
    );
    println!("  overhead: p50 +{diff50} ms, p99 +{diff99} ms");
    json!({
        "proxied": ps, "direct": ds, "front_404": fs,
        "p50_overhead_ms": diff50, "p99_overhead_ms": diff99,
    })
}

// ---------------------------------------------------------------------------------------------
// Phase 3: throughput

pub(crate) async fn throughput_phase(
    s: &Settings,
    cp: &ControlPlane,
    engine: SocketAddr,
    id: u64,
) -> Value {
    let c = client(1);
    let via_tunnel = format!(
        "{}/api/endpoints/{id}/docker/bulk?bytes={}",
        cp.url, s.bytes
    );
    let to_engine = format!("http://{engine}/bulk?bytes={}", s.bytes);
    // Warm: tunnel open, connection up.
    let _ = testkit::bench::get_to_end(
        &c,
        &format!("{}/api/endpoints/{id}/docker/bulk?bytes=1048576", cp.url),
    )
    .await;
    let mut direct = Vec::new();
    let mut proxied = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..s.bulk_runs {
        let (n, t) = testkit::bench::get_to_end(&c, &to_engine).await;
        assert_eq!(n, s.bytes, "direct body length");
        direct.push(mb_per_s(n, t));
        let before = thread_cpu();
        let (n, t) = testkit::bench::get_to_end(&c, &via_tunnel).await;
        let after = thread_cpu();
        assert_eq!(n, s.bytes, "proxied body length");
        proxied.push(mb_per_s(n, t));
        cpu.push((t.as_secs_f64(), cpu_delta(&before, &after)));
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    println!(
        "throughput: GET /bulk of {} bytes, one stream, {} runs",
        s.bytes, s.bulk_runs
    );
    println!(
        "  through the tunnel: {:?} MB/s (best {})",
        proxied,
        best(&proxied)
    );
    println!(
        "  directly to the engine: {:?} MB/s (best {})",
        direct,
        best(&direct)
    );
    let (wall, threads) = cpu.last().cloned().unwrap_or_default();
    let total: f64 = threads.iter().map(|(_, c)| c).sum();
    println!("  CPU during the last proxied transfer ({wall:.2} s wall, {total:.2} CPU-s in all):");
    for (name, secs) in threads.iter().take(10) {
        println!(
            "    {name:<28} {secs:>6.2} s  ({:>3.0} % of wall)",
            secs / wall * 100.0
        );
    }
    json!({
        "proxied_mb_s": proxied, "direct_mb_s": direct,
        "proxied_best_mb_s": best(&proxied), "direct_best_mb_s": best(&direct),
        "last_proxied_wall_s": round3(wall),
        "last_proxied_cpu_s_by_thread": threads.iter().map(|(n, c)| (n.clone(), round3(*c))).collect::<BTreeMap<_, _>>(),
        "last_proxied_cpu_s_total": round3(total),
    })
}
