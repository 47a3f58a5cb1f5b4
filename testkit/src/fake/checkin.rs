//! The agent's routes of the fake: check-ins on the three routes with the real proof,
//! freshness, replay and Edge ID binding rules (held ones wait until a tunnel is wanted or the
//! interval is nearly over), sealed one-time tunnel credentials, and snapshot uploads.

use std::time::Duration;

use proto::codec::{self, MAX_CONTROL_FRAME};
use proto::proof::{self, ProofKey, Route};
use proto::seal::SealKey;
use proto::snapshot::{SnapshotUpload, MAX_UPLOAD_FRAME};
use proto::wire::{CheckinAnswer, CheckinRequest, EdgeStatus, TunnelCredentials};
use proto::RefusalCode;
use tokio::time::Instant;

use super::server::{json_error, HttpRequest, Response, Shared};
use super::{lock, unix_now_ms, IssuedTunnel, SeenCheckin, SeenUpload, State};

/// Uploads kept for assertions (the oldest go first).
const MAX_KEPT_UPLOADS: usize = 256;
/// Accepted timestamps remembered per environment for replay detection.
const MAX_RECENT: usize = 256;
/// Held check-ins are answered this long before the agent's interval ends.
const HOLD_MARGIN: Duration = Duration::from_millis(250);
/// Lifetime of the credentials the fake issues.
const CREDENTIALS_TTL_MS: u64 = 60_000;

/// How a check-in route is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Plain,
    Held,
    AskTunnel,
}

impl Kind {
    /// The route the MAC of a check-in of this kind covers.
    fn route(self) -> Route {
        match self {
            Kind::Plain => Route::Checkin,
            Kind::Held => Route::Held,
            Kind::AskTunnel => Route::Tunnel,
        }
    }
}

pub(super) fn checkin_kind(shared: &Shared, req: &HttpRequest) -> Option<Kind> {
    if req.method != "POST" {
        return None;
    }
    match req.path.as_str() {
        proto::wire::CHECKIN_PATH => Some(Kind::Plain),
        proto::wire::HELD_CHECKIN_PATH if !lock(&shared.state).no_held => Some(Kind::Held),
        proto::tunnel::TUNNEL_REQUEST_PATH => Some(Kind::AskTunnel),
        _ => None,
    }
}

pub(super) async fn checkin(
    shared: &Shared,
    req: &HttpRequest,
    connection: u64,
    kind: Kind,
) -> Response {
    let parsed = proof::open::<CheckinRequest>(&req.body, MAX_CONTROL_FRAME);
    let mut seen = SeenCheckin {
        header_names: req.headers.iter().map(|(n, _)| n.clone()).collect(),
        body_len: req.body.len(),
        request: parsed.as_ref().ok().map(|(r, _)| r.clone()),
        connection,
        status: 0,
        path: req.path.clone(),
    };
    let decided = {
        let mut st = lock(&shared.state);
        checkin_answer(&mut st, parsed, kind)
    };
    let answer = match decided {
        Decided::Now(answer) => answer,
        Decided::Hold {
            env,
            for_,
            idle_answer,
        } => hold(shared, env, for_, idle_answer).await,
    };
    seen.status = answer.0;
    let mut st = lock(&shared.state);
    st.seen_count += 1;
    if !st.no_recording {
        st.seen.push(seen);
    }
    answer
}

/// What to answer a verified check-in.
enum Decided {
    Now(Response),
    /// Idle for now: answer `idle_answer` after `for_`, unless a tunnel is wanted first.
    Hold {
        env: u64,
        for_: Duration,
        idle_answer: Response,
    },
}

async fn hold(shared: &Shared, env: u64, for_: Duration, idle_answer: Response) -> Response {
    let deadline = Instant::now() + for_;
    loop {
        let woken = shared.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        {
            let mut st = lock(&shared.state);
            if let Some(answer) = tunnel_answer_if_wanted(&mut st, env) {
                return answer;
            }
        }
        if tokio::time::timeout_at(deadline, woken).await.is_err() {
            return idle_answer;
        }
    }
}

/// A `Required` answer with fresh credentials, when the environment wants a tunnel.
fn tunnel_answer_if_wanted(st: &mut State, id: u64) -> Option<Response> {
    let env = st.envs.get_mut(&id)?;
    if !(env.required || env.want_tunnel) {
        return None;
    }
    env.want_tunnel = false;
    let interval_secs = env.interval_secs;
    Some(tunnel_answer(st, id, interval_secs, None))
}

/// `Required` with credentials sealed for the environment's bound agent.
fn tunnel_answer(
    st: &mut State,
    id: u64,
    interval_secs: u32,
    server_time_ms: Option<u64>,
) -> Response {
    let Some(env) = st.envs.get(&id) else {
        return json_error(
            404,
            RefusalCode::UnknownEnvironment.as_str(),
            "no such environment",
        );
    };
    let Some(edge_id) = env.edge_id else {
        return json_error(
            400,
            RefusalCode::EdgeIdRequired.as_str(),
            "send the Edge ID",
        );
    };
    let creds = TunnelCredentials {
        token: rand::random(),
        expires_ms: unix_now_ms() + CREDENTIALS_TTL_MS,
        gateways: st.gateways.clone(),
    };
    let Ok(mut sealed) = SealKey::derive(&env.secret, &edge_id).seal(&creds) else {
        return json_error(500, "internal", "seal failed");
    };
    if st.corrupt_credentials {
        if let Some(b) = sealed.ciphertext.first_mut() {
            *b ^= 1;
        }
    }
    st.issued.push(IssuedTunnel {
        endpoint_id: id,
        edge_id,
        token: creds.token,
        expires_ms: creds.expires_ms,
    });
    let answer = CheckinAnswer {
        status: EdgeStatus::Required,
        interval_secs,
        server_time_ms,
        tunnel: Some(sealed),
        desired: None,
    };
    match codec::encode(&answer) {
        Ok(bytes) => (200, "application/octet-stream", bytes),
        Err(_) => json_error(500, "internal", "encode failed"),
    }
}

fn checkin_answer(
    st: &mut State,
    parsed: Result<(CheckinRequest, proof::Unverified<'_>), proto::CodecError>,
    kind: Kind,
) -> Decided {
    if let Some((status, json)) = st.scripted.pop_front() {
        return Decided::Now((status, "application/json", json.into_bytes()));
    }
    let Ok((request, unverified)) = parsed else {
        return Decided::Now(json_error(
            400,
            RefusalCode::BadRequest.as_str(),
            "undecodable check-in",
        ));
    };
    let server_now = unix_now_ms().saturating_add_signed(st.clock_offset_ms);
    let agent_secret = st.agent_secret.clone();
    let Some(env) = st.envs.get_mut(&request.endpoint_id) else {
        return Decided::Now(json_error(
            404,
            RefusalCode::UnknownEnvironment.as_str(),
            "no such environment",
        ));
    };
    // Steady requests omit the Edge ID; the MAC covers the bound one.
    let Some(claimed) = request.edge_id.or(env.edge_id) else {
        return Decided::Now(json_error(
            400,
            RefusalCode::EdgeIdRequired.as_str(),
            "send the Edge ID",
        ));
    };
    let timestamp_ms =
        proto::wire::request_timestamp(request.timestamp_lo, request.timestamp_hi, server_now);
    if !unverified.verify(
        kind.route(),
        &ProofKey::derive(&env.secret, agent_secret.as_deref()),
        &claimed,
        timestamp_ms,
    ) {
        return Decided::Now(json_error(
            401,
            RefusalCode::BadProof.as_str(),
            "request proof does not verify",
        ));
    }
    if proof::check_freshness(timestamp_ms, server_now).is_err() {
        let body = serde_json::json!({
            "message": "timestamp too far from server time",
            "code": RefusalCode::ClockSkew.as_str(),
            "serverTimeMs": server_now,
        });
        return Decided::Now((401, "application/json", body.to_string().into_bytes()));
    }
    // Binding before replay: a second agent must hear "another Edge ID", whatever its clock.
    if env.edge_id.is_some_and(|bound| bound != claimed) {
        return Decided::Now(json_error(
            403,
            RefusalCode::EdgeIdMismatch.as_str(),
            "environment is bound to another Edge ID",
        ));
    }
    if env.recent_timestamps.contains(&timestamp_ms) {
        return Decided::Now(json_error(
            401,
            RefusalCode::Replay.as_str(),
            "this request was seen before",
        ));
    }
    env.edge_id = Some(claimed);
    env.last_timestamp_ms = env.last_timestamp_ms.max(timestamp_ms);
    env.recent_timestamps.push_back(timestamp_ms);
    while env.recent_timestamps.len() > MAX_RECENT
        || env
            .recent_timestamps
            .front()
            .is_some_and(|&t| t + proof::FRESHNESS_WINDOW_MS < env.last_timestamp_ms)
    {
        env.recent_timestamps.pop_front();
    }
    env.checkins += 1;
    let skew = i128::from(timestamp_ms) - i128::from(server_now);
    let server_time_ms = (skew.abs() > 1000).then_some(server_now);
    let interval_secs = env.interval_secs;
    let wanted = env.required || env.want_tunnel || kind == Kind::AskTunnel;
    if wanted {
        env.want_tunnel = false;
        return Decided::Now(tunnel_answer(
            st,
            request.endpoint_id,
            interval_secs,
            server_time_ms,
        ));
    }
    let idle_answer = if skew.abs() <= 1000
        && interval_secs == request.interval_secs
        && request.agent.is_none()
    {
        (204, "application/octet-stream", Vec::new())
    } else {
        let answer = CheckinAnswer {
            status: EdgeStatus::Idle,
            interval_secs,
            server_time_ms,
            tunnel: None,
            desired: None,
        };
        match codec::encode(&answer) {
            Ok(bytes) => (200, "application/octet-stream", bytes),
            Err(_) => json_error(500, "internal", "encode failed"),
        }
    };
    if kind == Kind::Held {
        return Decided::Hold {
            env: request.endpoint_id,
            for_: Duration::from_secs(u64::from(request.interval_secs)).saturating_sub(HOLD_MARGIN),
            idle_answer,
        };
    }
    Decided::Now(idle_answer)
}

/// `/edge/s`: verified like the real server (bound Edge ID, proof, freshness), decompressed
/// within bounds, kept for assertions.
pub(super) fn upload(shared: &Shared, req: &HttpRequest) -> Response {
    let mut st = lock(&shared.state);
    if let Some((status, json)) = st.scripted.pop_front() {
        return (status, "application/json", json.into_bytes());
    }
    let Ok((upload, _)) = proof::open::<SnapshotUpload>(&req.body, MAX_UPLOAD_FRAME) else {
        return json_error(
            400,
            RefusalCode::BadRequest.as_str(),
            "undecodable snapshot upload",
        );
    };
    let server_now = unix_now_ms().saturating_add_signed(st.clock_offset_ms);
    let agent_secret = st.agent_secret.clone();
    let Some(env) = st.envs.get(&upload.endpoint_id) else {
        return json_error(
            404,
            RefusalCode::UnknownEnvironment.as_str(),
            "no such environment",
        );
    };
    match env.edge_id {
        None => return json_error(400, RefusalCode::EdgeIdRequired.as_str(), "check in first"),
        Some(bound) if bound != upload.edge_id => {
            return json_error(
                403,
                RefusalCode::EdgeIdMismatch.as_str(),
                "environment is bound to another Edge ID",
            )
        }
        Some(_) => {}
    }
    if !proof::verify(
        &req.body,
        Route::Snapshot,
        &ProofKey::derive(&env.secret, agent_secret.as_deref()),
        &upload.edge_id,
        upload.timestamp_ms,
    ) {
        return json_error(
            401,
            RefusalCode::BadProof.as_str(),
            "request proof does not verify",
        );
    }
    if proof::check_freshness(upload.timestamp_ms, server_now).is_err() {
        let body = serde_json::json!({
            "message": "timestamp too far from server time",
            "code": RefusalCode::ClockSkew.as_str(),
            "serverTimeMs": server_now,
        });
        return (401, "application/json", body.to_string().into_bytes());
    }
    let Ok(snapshot) = proto::snapshot::decompress(&upload.body) else {
        return json_error(
            400,
            RefusalCode::BadRequest.as_str(),
            "snapshot does not decompress",
        );
    };
    st.uploads.push(SeenUpload {
        endpoint_id: upload.endpoint_id,
        at: Instant::now(),
        snapshot,
        frame_len: req.body.len(),
    });
    if st.uploads.len() > MAX_KEPT_UPLOADS {
        st.uploads.remove(0);
    }
    (204, "application/octet-stream", Vec::new())
}
