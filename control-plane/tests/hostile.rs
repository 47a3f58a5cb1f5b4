#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hostile clients of the public ports of an in-process control plane (API and embedded
//! gateway): connections that send nothing, heads that trickle, bodies that stall, one source
//! hoarding connections. Each must cost little and briefly, while agents and admins from other
//! sources are served throughout. (The attack bench does the same at scale against the real
//! binaries: `control-plane/benches/attack`.)

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use gateway::admission::AdmissionLimits;
use serde_json::json;
use testkit::hostile::{answer_within, closed_within, connect_from, tls_from};
use testkit::{ControlPlane, ADMIN_KEY};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use uuid::Uuid;

const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// How long any one thing we wait for may take.
const WAIT: Duration = Duration::from_secs(20);

fn api_addr(cp: &ControlPlane) -> SocketAddr {
    let url = url::Url::parse(&cp.url).unwrap();
    SocketAddr::from(([127, 0, 0, 1], url.port().unwrap()))
}

async fn admin_get_ok(cp: &ControlPlane) {
    let r = testkit::http()
        .get(cp.api("/api/endpoints"))
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Sends a byte every 200 ms until the server closes the connection; panics if it is still
/// reading after 20 s.
async fn trickle_until_closed<S: tokio::io::AsyncWrite + Unpin>(stream: &mut S, what: &str) {
    for _ in 0..100 {
        if stream.write_all(b"X").await.is_err() || stream.flush().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what} trickled for 20 s was still being read");
}

#[actix_web::test]
async fn a_source_hoarding_connections_is_refused_while_others_are_served() {
    let cp = ControlPlane::start_with(|c| {
        c.limits.admission = AdmissionLimits {
            max_connections: 1_000,
            max_per_source: 50,
            max_pending: 100,
            max_pending_per_source: 4,
        };
        c.limits.first_byte_timeout = Duration::from_secs(120);
        c.limits.first_request_timeout = Duration::from_secs(120);
    })
    .await;
    let api = api_addr(&cp);
    let tunnel = cp.tunnel_addr.expect("embedded gateway");

    // The attacker's source holds its pending places: two idle TCP connections on each port
    // (one admission for the process's public ports).
    let mut held = Vec::new();
    for addr in [api, api, tunnel, tunnel] {
        held.push(connect_from(ATTACKER, addr).await.unwrap());
    }
    testkit::eventually(WAIT, "four pending connections", || async {
        (cp.metric("edgeplane_connections_pending").await >= 4.0).then_some(())
    })
    .await;
    // Its next ones are dropped at once, on either port.
    for addr in [api, tunnel] {
        let mut next = connect_from(ATTACKER, addr).await.unwrap();
        assert!(
            closed_within(&mut next, WAIT).await.is_some(),
            "a fifth pending connection of one source was kept"
        );
    }
    testkit::eventually(WAIT, "the refusals counted", || async {
        let api = cp
            .metric("edgeplane_api_connections_refused_total{reason=\"source_pending\"}")
            .await;
        let tunnel = cp
            .metric("edgeplane_gateway_connections_refused_total{reason=\"source_pending\"}")
            .await;
        (api == 1.0 && tunnel == 1.0).then_some(())
    })
    .await;

    // Meanwhile admins and agents from another source are served.
    admin_get_ok(&cp).await;
    let (id, token) = testkit::create_env(&cp.url, json!({"name": "kiosk"})).await;
    let mut agent =
        edge_agent::PollClient::new(&token, edge_agent::PollOptions::new(Uuid::new_v4())).unwrap();
    agent.checkin().await.unwrap();
    assert_eq!(cp.get_env(id).await["status"], "up");

    // Gone, the attacker's connections give their places back: it is admitted again.
    drop(held);
    testkit::eventually(WAIT, "no pending connections left", || async {
        (cp.metric("edgeplane_connections_pending").await == 0.0).then_some(())
    })
    .await;
    let mut again = tls_from(ATTACKER, api).await.unwrap();
    again
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = answer_within(&mut again, WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    cp.stop().await;
}

#[actix_web::test]
async fn a_head_proves_nothing_so_stalled_bodies_stay_within_the_pending_bound() {
    // The attack that took 1.7 GB: complete heads announcing 1 MiB bodies, then one byte (to
    // the snapshot route, which takes bodies that large).
    let cp = ControlPlane::start_with(|c| {
        c.limits.admission = AdmissionLimits {
            max_connections: 1_000,
            max_per_source: 500,
            max_pending: 100,
            max_pending_per_source: 4,
        };
        c.limits.agent_body_timeout = Duration::from_secs(120);
    })
    .await;
    let api = api_addr(&cp);
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\n\r\n0",
        proto::snapshot::SNAPSHOT_PATH,
        proto::snapshot::MAX_UPLOAD_FRAME,
    );
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut tls = tls_from(ATTACKER, api).await.unwrap();
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        held.push(tls);
    }
    // Still pending, all four; the fifth is not even admitted.
    testkit::eventually(WAIT, "four pending", || async {
        (cp.metric("edgeplane_connections_pending").await == 4.0).then_some(())
    })
    .await;
    let mut fifth = connect_from(ATTACKER, api).await.unwrap();
    assert!(closed_within(&mut fifth, WAIT).await.is_some());

    // An admin and an agent are served, and their connections, proved, are not pending.
    admin_get_ok(&cp).await;
    let (id, token) = testkit::create_env(&cp.url, json!({"name": "kiosk"})).await;
    let mut agent =
        edge_agent::PollClient::new(&token, edge_agent::PollOptions::new(Uuid::new_v4())).unwrap();
    agent.checkin().await.unwrap();
    assert_eq!(cp.get_env(id).await["status"], "up");
    assert_eq!(cp.metric("edgeplane_connections_pending").await, 4.0);
    // (The agent keeps its connection: four pending and at least the agent's, proved.)
    assert!(cp.metric("edgeplane_connections_open").await >= 5.0);
    drop(held);
    cp.stop().await;
}

#[actix_web::test]
async fn trickled_uploads_past_the_pending_body_budget_make_room_for_a_faster_one() {
    // Anonymous until its last byte (the proof is the body), an upload may take 1 MiB: the
    // bytes all such bodies hold at once are bounded. Four tricklers fill the budget.
    const BUDGET: usize = 256 * 1024;
    let cp = ControlPlane::start_with(|c| {
        c.limits.pending_body_bytes = BUDGET;
        c.limits.agent_body_timeout = Duration::from_secs(120);
    })
    .await;
    let api = api_addr(&cp);
    let head = |len: usize| {
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {len}\r\n\r\n",
            proto::snapshot::SNAPSHOT_PATH,
        )
    };
    let held = "edgeplane_api_pending_body_bytes";
    let mut tricklers = Vec::new();
    for _ in 0..4 {
        let mut tls = tls_from(ATTACKER, api).await.unwrap();
        tls.write_all(head(proto::snapshot::MAX_UPLOAD_FRAME).as_bytes())
            .await
            .unwrap();
        tls.write_all(&[0u8; 60 * 1024]).await.unwrap();
        tls.flush().await.unwrap();
        tricklers.push(tls);
    }
    // Each holds 64 KiB (its buffer doubles from 4 KiB, charged before it grows).
    testkit::eventually(WAIT, "the budget full", || async {
        (cp.metric(held).await == BUDGET as f64).then_some(())
    })
    .await;

    // A faster upload on a fresh connection: refused while the tricklers are young, then
    // read whole (and refused by the handler as the garbage it is, not as 503) once the
    // slowest of them had its time and was let go for it.
    let body = vec![7u8; 20 * 1024];
    let status = testkit::eventually(WAIT, "a faster upload read whole", || {
        let (head, body) = (head(body.len()), body.clone());
        async move {
            let mut tls = tls_from(Ipv4Addr::LOCALHOST, api).await.ok()?;
            tls.write_all(head.as_bytes()).await.ok()?;
            tls.write_all(&body).await.ok()?;
            tls.flush().await.ok()?;
            let answer = answer_within(&mut tls, WAIT).await;
            let status = answer.split(' ').nth(1)?.to_owned();
            if status == "503" {
                assert!(answer.contains("\"busy\""), "{answer}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return None;
            }
            Some(status)
        }
    })
    .await;
    assert!(status == "400" || status == "401", "{status}");
    assert!(
        cp.metric("edgeplane_api_pending_bodies_dropped_total{why=\"slowest\"}")
            .await
            >= 1.0
    );
    // The trickler let go was told so.
    let mut told = 0;
    for tls in &mut tricklers {
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), tls.read(&mut [0u8; 1])).await
        {
            told += usize::from(n > 0);
        }
    }
    assert!(told >= 1, "no trickler got its 503");
    assert!(cp.metric(held).await <= BUDGET as f64);
    admin_get_ok(&cp).await;
    drop(tricklers);
    testkit::eventually(WAIT, "every byte back", || async {
        (cp.metric(held).await == 0.0).then_some(())
    })
    .await;
    cp.stop().await;
}

#[actix_web::test]
async fn a_connection_that_proved_nothing_gets_one_answer() {
    let cp = ControlPlane::start().await;
    let api = api_addr(&cp);
    // Anonymous: answered, then closed (kept alive, it would hold actix's buffers for the
    // keep-alive time and stay pending).
    let mut tls = tls_from(ATTACKER, api).await.unwrap();
    tls.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut answer))
        .await
        .expect("closed after its answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    // A failed proof gets its refusal, and the same.
    let mut tls = tls_from(ATTACKER, api).await.unwrap();
    tls.write_all(b"GET /api/endpoints HTTP/1.1\r\nHost: x\r\nx-api-key: wrong\r\n\r\n")
        .await
        .unwrap();
    let answer = answer_within(&mut tls, WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    // The same on the hyper side (a Docker hijack's connection).
    let mut tls = tls_from(ATTACKER, api).await.unwrap();
    tls.write_all(
        b"POST /api/endpoints/1/docker/v1.41/exec/x/start HTTP/1.1\r\nHost: x\r\n\
          x-api-key: wrong\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    // (hyper closes without TLS's close_notify: an unexpected EOF, after the answer.)
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer))
        .await
        .expect("closed after its answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    // An agent's body without its length is refused before it is read.
    let mut tls = tls_from(ATTACKER, api).await.unwrap();
    tls.write_all(
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n0",
            proto::wire::CHECKIN_PATH
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let answer = answer_within(&mut tls, WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 411"), "{answer}");
    // A proved one stays open for more: two answers on one connection (the second asks to
    // close, so the answers end).
    let mut tls = tls_from(ATTACKER, api).await.unwrap();
    let get = |close: &str| {
        format!("GET /api/endpoints HTTP/1.1\r\nHost: x\r\nx-api-key: {ADMIN_KEY}\r\n{close}\r\n")
    };
    let both = format!("{}{}", get(""), get("Connection: close\r\n"));
    tls.write_all(both.as_bytes()).await.unwrap();
    let answers = answer_within(&mut tls, WAIT).await;
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");
    cp.stop().await;
}

#[actix_web::test]
async fn a_crowd_holding_every_pending_place_makes_room_for_newcomers() {
    // Many sources, each within its own bound, together hold every pending place.
    let cp = ControlPlane::start_with(|c| {
        c.limits.admission = AdmissionLimits {
            max_connections: 1_000,
            max_per_source: 500,
            max_pending: 8,
            max_pending_per_source: 4,
        };
        c.limits.first_byte_timeout = Duration::from_secs(120);
        c.limits.first_request_timeout = Duration::from_secs(120);
    })
    .await;
    let api = api_addr(&cp);
    let mut crowd = Vec::new();
    for source in [2, 3] {
        for _ in 0..4 {
            crowd.push(
                connect_from(Ipv4Addr::new(127, 0, 0, source), api)
                    .await
                    .unwrap(),
            );
        }
    }
    testkit::eventually(WAIT, "every pending place taken", || async {
        (cp.metric("edgeplane_connections_pending").await == 8.0).then_some(())
    })
    .await;
    // Once they had their time to prove themselves, a newcomer takes the place of the oldest
    // of the biggest holder: the admin is served, then an agent.
    testkit::eventually(WAIT, "the admin served", || async {
        testkit::http()
            .get(cp.api("/api/endpoints"))
            .header("x-api-key", ADMIN_KEY)
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
    let (id, token) = testkit::create_env(&cp.url, json!({"name": "kiosk"})).await;
    let mut agent =
        edge_agent::PollClient::new(&token, edge_agent::PollOptions::new(Uuid::new_v4())).unwrap();
    // (The admin's connection, proved, left a pending place free.)
    agent.checkin().await.unwrap();
    assert_eq!(cp.get_env(id).await["status"], "up");
    assert!(cp.metric("edgeplane_connections_evicted_total").await >= 1.0);
    // Those let go were closed, not just forgotten.
    let mut closed = 0;
    for tcp in &mut crowd {
        if closed_within(tcp, Duration::from_millis(100))
            .await
            .is_some()
        {
            closed += 1;
        }
    }
    assert!(closed >= 1, "{closed} of the crowd closed");
    cp.stop().await;
}

#[actix_web::test]
async fn silent_slow_and_stalled_clients_are_let_go_at_their_deadlines() {
    let cp = ControlPlane::start_with(|c| {
        c.limits.first_byte_timeout = Duration::from_millis(300);
        c.limits.first_request_timeout = Duration::from_secs(1);
        c.limits.agent_body_timeout = Duration::from_secs(1);
    })
    .await;
    let api = api_addr(&cp);
    let tunnel = cp.tunnel_addr.expect("embedded gateway");

    // Connects and sends nothing, on either port.
    for addr in [api, tunnel] {
        let mut tcp = connect_from(ATTACKER, addr).await.unwrap();
        assert!(closed_within(&mut tcp, WAIT).await.is_some(), "{addr}");
    }

    // Finishes TLS, then trickles a head that never ends.
    let mut tls = tls_from(ATTACKER, api).await.unwrap();
    tls.write_all(b"POST /edge/checkin HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    trickle_until_closed(&mut tls, "a head").await;

    // A whole head announcing a body that stalls: 408, and the connection is let go (by the
    // front, which reads an agent's first body before actix serves the connection)...
    let mut tls = tls_from(ATTACKER, api).await.unwrap();
    tls.write_all(
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: 1000\r\n\r\n0123456789",
            proto::wire::CHECKIN_PATH
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    let answer = answer_within(&mut tls, WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("stalled for 1 s"), "{answer}");

    // ... and by actix, on a connection that proved itself (an agent's later requests).
    let mut tls = tls_from(ATTACKER, api).await.unwrap();
    tls.write_all(
        format!(
            "GET /api/endpoints HTTP/1.1\r\nHost: x\r\nx-api-key: {ADMIN_KEY}\r\n\r\n\
             POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789",
            proto::wire::CHECKIN_PATH
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    let answers = answer_within(&mut tls, WAIT).await;
    assert!(answers.starts_with("HTTP/1.1 200"), "{answers}");
    assert!(answers.contains("HTTP/1.1 408"), "{answers}");

    // A kept-alive connection (proved: an unproved one gets one answer, then is closed)
    // whose second request trickles is let go too.
    let mut tls = tls_from(ATTACKER, api).await.unwrap();
    tls.write_all(
        format!(
            "GET /api/endpoints HTTP/1.1\r\nHost: x\r\nx-api-key: {ADMIN_KEY}\r\n\r\n\
             GET /healthz HTTP/1.1\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    trickle_until_closed(&mut tls, "a second head").await;

    // Each was let go by its own deadline, and counted so.
    for stage in ["first_byte", "first_request", "agent_body", "next_request"] {
        let n = cp
            .metric(&format!(
                "edgeplane_api_connections_timed_out_total{{stage=\"{stage}\"}}"
            ))
            .await;
        assert_eq!(n, 1.0, "{stage}");
    }

    // Nothing is left behind, and the next agent is served.
    testkit::eventually(WAIT, "every connection let go", || async {
        (cp.metric("edgeplane_connections_open").await <= 1.0).then_some(())
    })
    .await;
    admin_get_ok(&cp).await;
    cp.stop().await;
}
