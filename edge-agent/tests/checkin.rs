//! The check-in client and the agent loop against the fake control plane (real TLS, real
//! proofs, real sockets on 127.0.0.1).

use std::net::IpAddr;
use std::time::Duration;

use edge_agent::{CheckinError, Config, PollClient, PollOptions, RefusalCode, RetryClass};
use proto::wire::EdgeStatus;
use testkit::fake::{wait_until, FakeControlPlane};
use uuid::Uuid;

async fn fake() -> FakeControlPlane {
    FakeControlPlane::start().await.expect("fake control plane")
}

fn client(token: &proto::JoinToken, edge_id: Uuid) -> PollClient {
    PollClient::new(token, PollOptions::new(edge_id)).expect("client")
}

#[tokio::test]
async fn keep_alive_checkins_send_only_host_and_content_length() {
    let cp = fake().await;
    let (id, token) = cp.create_env(7);
    let edge_id = Uuid::new_v4();
    let mut c = client(&token, edge_id);

    let first = c.checkin().await.expect("first check-in");
    assert_eq!(first.status, EdgeStatus::Idle);
    assert_eq!(first.interval, Duration::from_secs(7));
    let handshake = first.connection.expect("first check-in connects");
    assert!(handshake.handshake_bytes > 500, "{handshake:?}");
    let after_first = c.counters().snapshot();

    let second = c.checkin().await.expect("second check-in");
    assert_eq!(
        second.connection, None,
        "second check-in reuses the connection"
    );
    let after_second = c.counters().snapshot();
    let poll_bytes = after_second.total() - after_first.total();
    // A kept-alive poll is a few hundred bytes of TLS records, not a handshake.
    assert!(poll_bytes < 400, "one poll cost {poll_bytes} bytes");

    let seen = cp.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.header_names, ["host", "content-length"]);
        assert_eq!(s.connection, 1);
    }
    assert_eq!(seen[0].status, 200, "a new process gets the full answer");
    assert_eq!(seen[1].status, 204, "nothing new: no body");
    let (r1, r2) = (
        seen[0].request.clone().expect("decoded"),
        seen[1].request.clone().expect("decoded"),
    );
    assert_eq!(r1.edge_id, Some(edge_id));
    assert_eq!(
        r2.edge_id, None,
        "steady check-ins leave the Edge ID out (the MAC covers it)"
    );
    assert_eq!(r1.endpoint_id, id);
    let info = r1.agent.expect("first check-in carries agent info");
    assert_eq!(info.platform, proto::wire::Platform::Docker);
    assert!(
        r2.agent.is_none(),
        "later check-ins leave the agent info out"
    );
    assert!(r2.timestamp_lo > r1.timestamp_lo);
    assert!(
        seen[1].body_len <= 32,
        "check-in body is {} bytes",
        seen[1].body_len
    );
    assert_eq!(cp.env(id).and_then(|e| e.edge_id), Some(edge_id));
    assert_eq!(c.connects(), 1);
}

#[tokio::test]
async fn clock_skew_is_corrected_and_retried_once() {
    let cp = fake().await;
    let (_, token) = cp.create_env(5);
    cp.set_clock_offset_ms(10 * 60 * 1000);
    let mut c = client(&token, Uuid::new_v4());
    let outcome = c.checkin().await.expect("corrected check-in");
    assert!(outcome.clock_corrected);
    let offset = c.clock_offset_ms();
    assert!((offset - 600_000).abs() < 5_000, "offset {offset}");
    let seen = cp.seen();
    assert_eq!(
        seen.iter().map(|s| s.status).collect::<Vec<_>>(),
        [401, 200]
    );
    // The retry after an error carries the agent info again.
    assert!(seen[1]
        .request
        .as_ref()
        .and_then(|r| r.agent.as_ref())
        .is_some());
    // Once corrected, later check-ins go straight through.
    c.checkin().await.expect("next check-in");
    assert_eq!(cp.seen().len(), 3);
}

#[tokio::test]
async fn persistent_clock_skew_is_retried_only_once() {
    let cp = fake().await;
    let (_, token) = cp.create_env(5);
    let skew = r#"{"message":"skew","code":"clock_skew","serverTimeMs":1}"#;
    cp.script_answer(401, skew);
    cp.script_answer(401, skew);
    let mut c = client(&token, Uuid::new_v4());
    let err = c.checkin().await.expect_err("still skewed");
    assert!(matches!(
        err,
        CheckinError::Refused {
            status: 401,
            code: RefusalCode::ClockSkew,
            ..
        }
    ));
    assert_eq!(cp.seen().len(), 2);
}

#[tokio::test]
async fn a_replay_refusal_is_signed_again_once() {
    // Another node of the swarm signed the same frame in the same millisecond: sign anew.
    let cp = fake().await;
    let (_, token) = cp.create_env(5);
    let replay = r#"{"message":"this request was already seen (replay)","code":"replay"}"#;
    let mut c = client(&token, Uuid::new_v4());
    c.checkin().await.expect("first");
    cp.script_answer(401, replay);
    c.checkin().await.expect("signed again");
    let seen = cp.seen();
    assert_eq!(
        seen.iter().map(|s| s.status).collect::<Vec<_>>(),
        [200, 401, 204],
        "the one signed again is answered as unchanged"
    );
    let request = |i: usize| seen[i].request.as_ref().expect("a decoded request");
    assert!(
        request(2).timestamp_lo > request(1).timestamp_lo,
        "a fresh timestamp: {} then {}",
        request(1).timestamp_lo,
        request(2).timestamp_lo
    );
    // A collision is not an error that calls for the agent info again: the request is
    // signed anew as it was (a held check-in with agent info would not be held).
    assert!(request(0).agent.is_some(), "the first check-in carries it");
    assert!(
        request(1).agent.is_none() && request(2).agent.is_none(),
        "signed again without it"
    );
    // A first check-in that collides: signed again, still with the agent info.
    let (_, other) = cp.create_env(5);
    let mut fresh = client(&other, Uuid::new_v4());
    cp.script_answer(401, replay);
    let before = cp.seen().len();
    fresh.checkin().await.expect("signed again");
    let seen = cp.seen();
    let (refused, taken) = (&seen[before], &seen[before + 1]);
    assert_eq!((refused.status, taken.status), (401, 200));
    assert!(
        [refused, taken]
            .iter()
            .all(|s| s.request.as_ref().is_some_and(|r| r.agent.is_some())),
        "both carry the agent info"
    );
    // Twice in a row is not a collision: refused.
    cp.script_answer(401, replay);
    cp.script_answer(401, replay);
    let err = c.checkin().await.expect_err("replayed twice");
    assert!(matches!(
        err,
        CheckinError::Refused {
            code: RefusalCode::Replay,
            ..
        }
    ));
    assert_eq!(cp.seen().len(), 7);
    // That was an error: the next check-in carries the agent info.
    c.checkin().await.expect("after the error");
    let last = cp.seen().pop().and_then(|s| s.request).expect("request");
    assert!(last.agent.is_some(), "first check-in after an error");
}

#[tokio::test]
async fn another_edge_id_is_refused_until_the_association_is_reset() {
    let cp = fake().await;
    let (id, token) = cp.create_env(5);
    client(&token, Uuid::new_v4())
        .checkin()
        .await
        .expect("first agent binds");
    let mut intruder = client(&token, Uuid::new_v4());
    let err = intruder.checkin().await.expect_err("refused");
    assert_eq!(err.kind(), "edge_id_mismatch");
    assert_eq!(err.retry_class(), RetryClass::Refused);
    assert!(matches!(err, CheckinError::Refused { status: 403, .. }));

    cp.reset_association(id);
    intruder.checkin().await.expect("accepted after reset");
    let last = cp.seen().pop().and_then(|s| s.request).expect("request");
    assert!(
        last.agent.is_some(),
        "first check-in after an error carries agent info"
    );
}

#[tokio::test]
async fn dead_keep_alive_connection_is_replaced_without_an_error() {
    let cp = fake().await;
    let (_, token) = cp.create_env(5);
    let mut c = client(&token, Uuid::new_v4());
    c.checkin().await.expect("first");
    for round in 2..=6 {
        cp.close_connections();
        // Whether or not the close has reached our side yet, the client must cope: a dead
        // connection found before sending, or one that dies under the request, is replaced.
        let outcome = c.checkin().await.expect("check-in on a new connection");
        assert!(outcome.connection.is_some());
        assert_eq!(cp.connections(), round);
    }
}

#[tokio::test]
async fn certificate_must_match_the_token_unless_insecure() {
    let cp = fake().await;
    let (_, mut token) = cp.create_env(5);
    token.tunnel_fingerprint = [0xaa; 32];
    let err = client(&token, Uuid::new_v4())
        .checkin()
        .await
        .expect_err("unknown self-signed certificate");
    assert_eq!(err.kind(), "tls", "{err}");

    let mut options = PollOptions::new(Uuid::new_v4());
    options.insecure = true;
    PollClient::new(&token, options)
        .expect("client")
        .checkin()
        .await
        .expect("insecure accepts it");
}

#[tokio::test]
async fn wrong_agent_secret_is_a_refusal() {
    let cp = fake().await;
    cp.set_agent_secret(Some("right"));
    let (_, token) = cp.create_env(5);
    let mut options = PollOptions::new(Uuid::new_v4());
    options.agent_secret = Some("wrong".into());
    let mut c = PollClient::new(&token, options).expect("client");
    let err = c.checkin().await.expect_err("refused");
    assert_eq!(err.kind(), "bad_proof");

    let mut options = PollOptions::new(Uuid::new_v4());
    options.agent_secret = Some("right".into());
    PollClient::new(&token, options)
        .expect("client")
        .checkin()
        .await
        .expect("accepted with the right secret");
}

#[tokio::test]
async fn busy_and_server_errors_keep_the_connection() {
    let cp = fake().await;
    let (_, token) = cp.create_env(5);
    let mut c = client(&token, Uuid::new_v4());
    cp.script_answer(503, r#"{"message":"busy","code":"busy"}"#);
    let err = c.checkin().await.expect_err("busy");
    assert_eq!(err.kind(), "busy");
    cp.script_answer(500, "not json");
    let err = c.checkin().await.expect_err("500");
    assert!(
        matches!(err, CheckinError::Server { status: 500, ref message } if message == "not json")
    );
    c.checkin().await.expect("fine again");
    assert_eq!(cp.connections(), 1);
}

#[tokio::test]
async fn unknown_environment() {
    let cp = fake().await;
    let (_, mut token) = cp.create_env(5);
    token.endpoint_id = 999;
    let err = client(&token, Uuid::new_v4())
        .checkin()
        .await
        .expect_err("404");
    assert!(matches!(
        err,
        CheckinError::Refused {
            status: 404,
            code: RefusalCode::UnknownEnvironment,
            ..
        }
    ));
}

#[tokio::test]
async fn binds_the_requested_local_address() {
    let cp = fake().await;
    let (_, token) = cp.create_env(5);
    let mut options = PollOptions::new(Uuid::new_v4());
    options.local_addr = Some(IpAddr::from([127, 0, 0, 2]));
    let mut c = PollClient::new(&token, options).expect("client");
    c.checkin().await.expect("check-in from 127.0.0.2");
}

#[tokio::test]
async fn agent_runs_persists_its_id_and_stops_on_shutdown() {
    let cp = fake().await;
    let (id, token) = cp.create_env(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::from_args(edge_agent::Args {
        edge_key: Some(token.encode()),
        data_dir: Some(dir.path().to_owned()),
        ..Default::default()
    })
    .expect("config");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(edge_agent::run(config, async {
        let _ = stop_rx.await;
    }));
    assert!(
        wait_until(Duration::from_secs(10), || cp
            .env(id)
            .is_some_and(|e| e.checkins >= 2))
        .await,
        "agent did not check in twice"
    );
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(5), agent)
        .await
        .expect("agent stops promptly")
        .expect("task")
        .expect("clean exit");
    let persisted = std::fs::read_to_string(dir.path().join("edge_id")).expect("edge_id file");
    let persisted = Uuid::parse_str(persisted.trim()).expect("uuid");
    assert_eq!(cp.env(id).and_then(|e| e.edge_id), Some(persisted));
}

#[tokio::test(start_paused = true)]
async fn silent_server_times_out_after_interval_plus_slack() {
    // Accepts TCP, then says nothing: the TLS handshake never completes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let token = proto::JoinToken {
        api_url: format!("https://127.0.0.1:{port}"),
        tunnel_addr: "127.0.0.1:1".into(),
        tunnel_fingerprint: [0; 32],
        endpoint_id: 1,
        secret: proto::token::JoinSecret::generate(),
    };
    let mut c = client(&token, Uuid::new_v4());
    let started = tokio::time::Instant::now();
    let err = c.checkin().await.expect_err("times out");
    assert!(
        matches!(err, CheckinError::Timeout(d) if d == Duration::from_secs(15)),
        "{err}"
    );
    assert_eq!(err.retry_class(), RetryClass::Backoff);
    assert!(started.elapsed() >= Duration::from_secs(15));
    hold.abort();
}

#[tokio::test]
async fn siblings_share_the_clock_and_upload_snapshots() {
    let cp = fake().await;
    let (id, token) = cp.create_env(5);
    let mut main = client(&token, Uuid::new_v4());
    main.checkin().await.expect("binds");
    let mut side = main.sibling();
    // Interleaved requests over two connections: every timestamp is new, none is a replay.
    for _ in 0..5 {
        main.checkin().await.expect("main");
        side.checkin().await.expect("side");
    }
    let asked = side
        .checkin_via(edge_agent::CheckinRoute::AskTunnel)
        .await
        .expect("tunnel request");
    assert_eq!(asked.status, EdgeStatus::Required);
    assert!(asked.tunnel.is_some(), "credentials come with it");
    let stamps: Vec<u32> = cp
        .seen()
        .iter()
        .filter_map(|s| s.request.as_ref().map(|r| r.timestamp_lo))
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
    assert_eq!(cp.connections(), 2);

    let mut snap = proto::snapshot::Snapshot {
        taken_ms: 42,
        ..Default::default()
    };
    snap.engine.name = "Test Engine".into();
    snap.normalise();
    let body = proto::snapshot::compress(&snap).expect("compress");
    side.upload_snapshot(&body).await.expect("upload");
    assert_eq!(cp.last_snapshot(id), Some(snap));

    // Another agent's upload is refused.
    let mut intruder = client(&token, Uuid::new_v4());
    let err = intruder.upload_snapshot(&body).await.expect_err("refused");
    assert_eq!(err.kind(), "edge_id_mismatch");
    assert_eq!(cp.uploads(id).len(), 1);
}
