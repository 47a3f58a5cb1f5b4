#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Agents' connections served by the front's agent lane (without actix), over raw TLS: one
//! request after another on one connection, pipelined requests, a connection that turns to
//! the admin API, refusals, the deadline of the next head, and a held check-in let go the
//! moment its agent goes away.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use proto::proof::{self, ProofKey, Route};
use proto::wire::CheckinRequest;
use proto::JoinToken;
use serde_json::json;
use testkit::hostile::{closed_within, tls_from};
use testkit::{ControlPlane, ADMIN_KEY};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use uuid::Uuid;

/// How long any one thing we wait for may take.
const WAIT: Duration = Duration::from_secs(20);
const LOCAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

fn api_addr(cp: &ControlPlane) -> SocketAddr {
    let url = url::Url::parse(&cp.url).unwrap();
    SocketAddr::from(([127, 0, 0, 1], url.port().unwrap()))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One agent: its key, its Edge ID and a clock that never repeats a millisecond.
struct Agent {
    token: JoinToken,
    edge: Uuid,
    last_ms: u64,
}

impl Agent {
    async fn new(cp: &ControlPlane, interval: u32) -> Self {
        let (_, token) = testkit::api::create_env(
            &cp.url,
            json!({"name": format!("lane-{}", Uuid::new_v4()), "checkinInterval": interval}),
        )
        .await;
        Self {
            token,
            edge: Uuid::new_v4(),
            last_ms: 0,
        }
    }

    /// A signed check-in for `route`, as a whole HTTP/1.1 request to `path`.
    fn request(&mut self, route: Route, path: &str, interval: u32) -> Vec<u8> {
        let ts = now_ms().max(self.last_ms + 1);
        self.last_ms = ts;
        let req = CheckinRequest {
            endpoint_id: self.token.endpoint_id,
            edge_id: Some(self.edge),
            timestamp_lo: proto::wire::timestamp_lo(ts),
            timestamp_hi: Some((ts >> 32) as u32),
            interval_secs: interval,
            agent: None,
        };
        let key = ProofKey::derive(&self.token.secret, None);
        let body = proof::sign(&req, route, &key, &self.edge, ts).unwrap();
        let mut out = format!(
            "POST {path} HTTP/1.1\r\nhost: cp\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    fn checkin(&mut self) -> Vec<u8> {
        self.request(Route::Checkin, proto::wire::CHECKIN_PATH, 5)
    }
}

/// One HTTP/1.1 answer: status, head (lowercase), body.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Reads one answer (its body by `content-length`; none for 204).
async fn read_answer<S: AsyncRead + Unpin>(s: &mut S) -> Answer {
    read_answer_from(s, &mut Vec::new()).await
}

/// [`read_answer`], with what was read past it (pipelined answers) kept in `buf`.
async fn read_answer_from<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Answer {
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        read_more(s, buf).await;
    };
    let head = String::from_utf8(buf[..head_end].to_vec())
        .unwrap()
        .to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < head_end + len {
        read_more(s, buf).await;
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Answer { status, head, body }
}

async fn read_more<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 1024];
    let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
        .await
        .expect("an answer in time")
        .unwrap();
    assert!(
        n > 0,
        "closed before an answer: {:?}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&chunk[..n]);
}

/// A check-in answered: 200 with what changed, or 204 (nothing did).
fn assert_ok(a: impl std::borrow::Borrow<Answer>) {
    let a = a.borrow();
    assert!(a.status == 200 || a.status == 204, "{}", a.head);
}

#[actix_web::test]
async fn an_agents_connection_serves_request_after_request_then_the_admin_api() {
    let cp = ControlPlane::start().await;
    let mut agent = Agent::new(&cp, 5).await;
    let mut tls = tls_from(LOCAL, api_addr(&cp)).await.unwrap();

    // The first check-in binds.
    tls.write_all(&agent.checkin()).await.unwrap();
    let first = read_answer(&mut tls).await;
    assert_ok(&first);
    assert!(!first.head.contains("connection: close"), "{}", first.head);

    // Two more, pipelined in one write: two answers, in order, on the same connection. The
    // second is unchanged (the interval is current): 204 with an empty reason, a date and
    // nothing else.
    let mut two = agent.checkin();
    two.extend(agent.checkin());
    tls.write_all(&two).await.unwrap();
    let mut rest = Vec::new();
    for _ in 0..2 {
        let a = read_answer_from(&mut tls, &mut rest).await;
        assert_ok(&a);
        if a.status == 204 {
            assert!(a.head.starts_with("http/1.1 204 \r\ndate: "), "{}", a.head);
            assert!(!a.head.contains("content-length"), "{}", a.head);
        }
    }
    assert!(rest.is_empty());

    // A refusal on a proved connection is answered and the connection stays: a frame signed
    // for another route is `bad_proof`.
    let wrong = agent.request(Route::Held, proto::wire::CHECKIN_PATH, 5);
    tls.write_all(&wrong).await.unwrap();
    let refused = read_answer(&mut tls).await;
    assert_eq!(refused.status, 401, "{}", refused.head);
    assert!(
        String::from_utf8_lossy(&refused.body).contains("\"code\":\"bad_proof\""),
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert!(refused.head.contains("content-type: application/json"));
    assert!(
        !refused.head.contains("connection: close"),
        "{}",
        refused.head
    );

    // The same connection turns to the admin API: actix serves it from there.
    let get = format!(
        "GET /api/endpoints/{} HTTP/1.1\r\nhost: cp\r\nx-api-key: {ADMIN_KEY}\r\n\r\n",
        agent.token.endpoint_id
    );
    tls.write_all(get.as_bytes()).await.unwrap();
    let env = read_answer(&mut tls).await;
    assert_eq!(env.status, 200, "{}", env.head);
    let env: serde_json::Value = serde_json::from_slice(&env.body).unwrap();
    assert_eq!(env["edgeId"], json!(agent.edge.to_string()));
    assert_eq!(env["status"], json!("up"));
    cp.stop().await;
}

#[actix_web::test]
async fn what_the_lane_refuses_is_answered_and_closed() {
    let cp = ControlPlane::start().await;
    let mut agent = Agent::new(&cp, 5).await;

    // A chunked check-in on a proved connection: 411, then closed.
    let mut tls = tls_from(LOCAL, api_addr(&cp)).await.unwrap();
    tls.write_all(&agent.checkin()).await.unwrap();
    assert_ok(read_answer(&mut tls).await);
    tls.write_all(b"POST /edge/c HTTP/1.1\r\nhost: cp\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let a = read_answer(&mut tls).await;
    assert_eq!(a.status, 411, "{}", a.head);
    assert!(a.head.contains("connection: close"), "{}", a.head);
    assert!(closed_within(&mut tls, WAIT).await.is_some());

    // Over the route's limit: 413, then closed.
    let mut tls = tls_from(LOCAL, api_addr(&cp)).await.unwrap();
    tls.write_all(&agent.checkin()).await.unwrap();
    assert_ok(read_answer(&mut tls).await);
    let big = proto::codec::MAX_CONTROL_FRAME + 1;
    tls.write_all(format!("POST /edge/h HTTP/1.1\r\ncontent-length: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let a = read_answer(&mut tls).await;
    assert_eq!(a.status, 413, "{}", a.head);
    assert!(closed_within(&mut tls, WAIT).await.is_some());

    // The agent asks to close: answered, then closed.
    let mut tls = tls_from(LOCAL, api_addr(&cp)).await.unwrap();
    let mut req = agent.checkin();
    let at = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
    req.splice(at..at, b"connection: close\r\n".iter().copied());
    tls.write_all(&req).await.unwrap();
    let a = read_answer(&mut tls).await;
    assert_ok(&a);
    assert!(a.head.contains("connection: close"), "{}", a.head);
    assert!(closed_within(&mut tls, WAIT).await.is_some());

    // A first request that proves nothing gets its answer and no other.
    let mut tls = tls_from(LOCAL, api_addr(&cp)).await.unwrap();
    let mut stranger = Agent {
        edge: Uuid::new_v4(),
        ..Agent::new(&cp, 5).await
    };
    stranger.token.secret = proto::token::JoinSecret::generate();
    tls.write_all(&stranger.checkin()).await.unwrap();
    let a = read_answer(&mut tls).await;
    assert_eq!(a.status, 401, "{}", a.head);
    assert!(a.head.contains("connection: close"), "{}", a.head);
    assert!(closed_within(&mut tls, WAIT).await.is_some());
    cp.stop().await;
}

#[actix_web::test]
async fn the_next_head_is_due_within_its_deadlines() {
    let cp = ControlPlane::start_with(|c| {
        c.limits.keep_alive = Duration::from_secs(3);
        c.limits.first_request_timeout = Duration::from_secs(2);
    })
    .await;
    let mut agent = Agent::new(&cp, 5).await;
    let before = cp
        .metric("edgeplane_api_connections_timed_out_total{stage=\"next_request\"}")
        .await;

    // Nothing after an answer: closed at the keep-alive time.
    let mut tls = tls_from(LOCAL, api_addr(&cp)).await.unwrap();
    tls.write_all(&agent.checkin()).await.unwrap();
    assert_ok(read_answer(&mut tls).await);
    let idle = closed_within(&mut tls, WAIT).await.expect("closed");
    assert!(idle >= Duration::from_secs(2), "{idle:?}");

    // Half a head: closed at the head time after its first byte.
    let mut tls = tls_from(LOCAL, api_addr(&cp)).await.unwrap();
    tls.write_all(&agent.checkin()).await.unwrap();
    assert_ok(read_answer(&mut tls).await);
    tls.write_all(b"POST /edge/c HTTP/1.1\r\nhost")
        .await
        .unwrap();
    assert!(closed_within(&mut tls, WAIT).await.is_some());

    testkit::eventually(WAIT, "both counted", || async {
        let now = cp
            .metric("edgeplane_api_connections_timed_out_total{stage=\"next_request\"}")
            .await;
        (now - before >= 2.0).then_some(())
    })
    .await;
    cp.stop().await;
}

#[actix_web::test]
async fn a_held_check_in_is_let_go_with_its_connection() {
    let cp = ControlPlane::start().await;
    // A minute's interval: the hold would last 59.75 s.
    let mut agent = Agent::new(&cp, 60).await;
    // The connection that created the environment is closed by its client, but the server
    // counts it until it sees the close: wait for none to be open.
    let open_before = 0.0;
    testkit::eventually(WAIT, "no connection open", || async {
        (cp.metric("edgeplane_connections_open").await == open_before).then_some(())
    })
    .await;

    let mut tls = tls_from(LOCAL, api_addr(&cp)).await.unwrap();
    tls.write_all(&agent.request(Route::Checkin, proto::wire::CHECKIN_PATH, 60))
        .await
        .unwrap();
    assert_ok(read_answer(&mut tls).await);
    tls.write_all(&agent.request(Route::Held, proto::wire::HELD_CHECKIN_PATH, 60))
        .await
        .unwrap();
    testkit::eventually(WAIT, "the check-in held", || async {
        (cp.metric("edgeplane_fleet_held_checkins").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        cp.metric("edgeplane_connections_open").await,
        open_before + 1.0
    );

    // The agent goes away: its connection (and the hold with it) is let go at once, not at
    // the end of the hold.
    drop(tls);
    testkit::eventually(WAIT, "the connection let go", || async {
        (cp.metric("edgeplane_connections_open").await == open_before).then_some(())
    })
    .await;
    cp.stop().await;
}
