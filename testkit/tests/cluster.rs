//! The test kit's own acceptance test, and the shape of a new cluster test: two replicas on
//! Redis, two gateway processes, a real agent and a real engine, in a few lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use testkit::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_docker_call_reaches_the_engine_through_either_replica() {
    let cluster = Cluster::new()
        .redis()
        .replicas(2)
        .gateways(2)
        .engine()
        .agents(1)
        .start()
        .await;
    let env = cluster.env(0);
    for cp in &cluster.replicas {
        assert_eq!(cp.docker_get(env, "/_ping").await, (200, "OK".to_owned()));
        let (state, gateway, _) = cp.tunnel(env).await;
        assert_eq!(state, "open", "both replicas see the one tunnel");
        assert!(cluster.gateway(&gateway.expect("a gateway")).is_some());
    }
    let (_, gw0, epoch0) = cluster.replica(0).tunnel(env).await;
    let (_, gw1, epoch1) = cluster.replica(1).tunnel(env).await;
    assert_eq!(
        (gw0, epoch0),
        (gw1, epoch1),
        "the replicas agree where it is"
    );
}
