//! The cluster mode's acceptance test: a control plane on Redis with no embedded gateway, two
//! real `tunnel-gateway` processes sharing one key prefix, and the edge agent serving
//! Podman's Docker API. A Docker API call goes through whichever gateway the agent reached;
//! killing that gateway (SIGKILL: no goodbye, its records only expire) and calling again
//! brings the tunnel back through the other one.
//!
//! Every process is owned by the cluster, which stops it on drop, so a failing assertion
//! leaves nothing behind; on failure the gateways' logs are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::api::{docker_get_with, http_with_timeout};
use testkit::{eventually, Cluster};

/// How long a proxied request waits for the agent's tunnel (`limits.tunnel_wait`).
const TUNNEL_WAIT: Duration = Duration::from_secs(10);
/// The whole failover (agent reconnecting through the other gateway, proxy retrying) must
/// complete within this.
const FAILOVER_BUDGET: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tunnel_fails_over_to_the_other_gateway() {
    testkit::init_tracing();
    let started = Instant::now();
    // Gateways register before the control plane serves, so the gateway list it hands out
    // with tunnel credentials holds both from the start (it refreshes that list every 2 s).
    let mut cluster = Cluster::new()
        .redis()
        .gateways(2)
        .engine()
        .agents(1)
        .configure(|c| c.limits.tunnel_wait = TUNNEL_WAIT)
        .start()
        .await;
    assert_eq!(cluster.live_gateway_ids().await, ["gw-0", "gw-1"]);
    eprintln!("[cluster] up after {:?}", started.elapsed());
    let id = cluster.env(0);
    let cp = &cluster.replicas[0];
    // Above two tunnel waits: a request that meets a stale location waits twice at most.
    let client = http_with_timeout(TUNNEL_WAIT * 2 + Duration::from_secs(10));

    // Through whichever gateway the agent reaches.
    let t0 = Instant::now();
    let (status, body) = docker_get_with(&client, &cp.url, id, "/_ping").await;
    assert_eq!((status, body.as_str()), (200, "OK"), "first _ping");
    eprintln!(
        "[cluster] first _ping (opening the tunnel) took {:?}",
        t0.elapsed()
    );
    let (status, body) = docker_get_with(&client, &cp.url, id, "/version").await;
    assert_eq!(status, 200, "version: {body}");
    let version: Value = serde_json::from_str(&body).expect("version JSON");
    assert!(
        version["Version"].as_str().is_some_and(|v| !v.is_empty()),
        "{version}"
    );
    let (state, first_gw, first_epoch) = cp.tunnel(id).await;
    assert_eq!(state, "open");
    let first_gw = first_gw.expect("the open tunnel names its gateway");
    let first_epoch = first_epoch.expect("the open tunnel has an epoch");
    assert!(
        first_gw == "gw-0" || first_gw == "gw-1",
        "unexpected gateway {first_gw}"
    );
    eprintln!("[cluster] tunnel open through {first_gw}, epoch {first_epoch}");

    // Kill that gateway without a goodbye; the other one must take over.
    let survivor_id = if first_gw == "gw-0" { "gw-1" } else { "gw-0" };
    cluster.gateway_mut(&first_gw).expect("that gateway").kill();
    let cp = &cluster.replicas[0];
    let killed_at = Instant::now();
    let deadline = killed_at + FAILOVER_BUDGET;
    // Expected: the first request succeeds (the proxy finds the location stale, waits for the
    // agent's newer tunnel and retries once). A 502/504 from racing the failover is tolerated
    // and retried; every attempt is recorded and printed.
    let mut attempts = Vec::new();
    loop {
        let t = Instant::now();
        let (status, body) = docker_get_with(&client, &cp.url, id, "/_ping").await;
        attempts.push(format!(
            "{status} after {:?}: {}",
            t.elapsed(),
            body.chars().take(300).collect::<String>()
        ));
        if status == 200 {
            assert_eq!(body, "OK");
            break;
        }
        assert!(
            matches!(status, 502 | 504 | 0),
            "unexpected answer during failover: {attempts:#?}"
        );
        assert!(
            Instant::now() < deadline,
            "no answer through {survivor_id} within {FAILOVER_BUDGET:?} of killing {first_gw}: {attempts:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "[cluster] after killing {first_gw}: _ping answered 200 in {:?}, {} attempt(s): {attempts:#?}",
        killed_at.elapsed(),
        attempts.len()
    );
    let (state, gw, epoch) = cp.tunnel(id).await;
    assert_eq!(state, "open");
    assert_eq!(gw.as_deref(), Some(survivor_id), "the tunnel moved");
    let epoch = epoch.expect("epoch");
    assert!(epoch > first_epoch, "epoch {epoch} after {first_epoch}");
    let (status, body) = docker_get_with(&client, &cp.url, id, "/version").await;
    assert_eq!(status, 200, "version after failover: {body}");
    // The dead gateway's registration expires with its lease.
    eventually(
        Duration::from_secs(10),
        "the killed gateway's registration expired",
        || async { (cluster.live_gateway_ids().await == [survivor_id]).then_some(()) },
    )
    .await;

    // Clean shutdown, in dependency order.
    let agent = cluster.agents.pop().expect("the agent");
    assert!(agent.stop().await, "the agent stops within 15 s");
    cluster.replicas.pop().expect("the replica").stop().await;
    let survivor = cluster.gateway_mut(survivor_id).expect("the survivor");
    assert!(
        survivor.stop(),
        "the surviving gateway stops on SIGTERM:\n{}",
        survivor.log()
    );
    eventually(Duration::from_secs(5), "no gateway registered", || async {
        cluster.live_gateway_ids().await.is_empty().then_some(())
    })
    .await;
    drop(cluster);
    eprintln!("[cluster] done in {:?}", started.elapsed());
}
