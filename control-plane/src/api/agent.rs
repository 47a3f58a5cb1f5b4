//! The agent-facing routes: check-ins (`/edge/c` plain, `/edge/h` held, `/edge/t` asking for
//! a tunnel), snapshot uploads (`/edge/s`) and async-mode ticks (`/edge/a`). No admin key:
//! every request proves the join secret.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt as _;
use proto::async_mode::{
    AsyncAnswer, AsyncIntervals, AsyncRequest, Command, SnapshotReport, MAX_ASYNC_ANSWER,
    MAX_ASYNC_FRAME, MAX_COMMANDS_PER_ANSWER,
};
use proto::clock::now_ms;
use proto::codec::{self, MAX_CONTROL_FRAME};
use proto::proof::Route;
use proto::snapshot::{DeltaError, Snapshot, SnapshotUpload, MAX_UPLOAD_FRAME};
use proto::stacks::{
    DesiredState, StackReport, StackSync, MAX_DESIRED_ANSWER, MAX_REPORT_FRAME, MAX_SYNC_FRAME,
};
use proto::wire::{CheckinAnswer, CheckinRequest};
use store::{EnvId, SnapshotPut, StoredSnapshot};

use super::AppState;
use crate::error::ApiError;
use crate::fleet::desired::EnvInputs;
use crate::fleet::{Checkin, CheckinKind};

pub fn configure(cfg: &mut web::ServiceConfig) {
    for route in AgentRoute::ALL {
        cfg.service(web::resource(route.path()).route(web::post().to(
            move |state: web::Data<AppState>, req: HttpRequest, payload: web::Payload| {
                actix_route(route, state, req, payload)
            },
        )));
    }
}

/// An agent route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentRoute {
    /// `/edge/c`: a check-in answered at once.
    Checkin,
    /// `/edge/h`: a check-in whose idle answer may be held.
    Held,
    /// `/edge/t`: a check-in asking for tunnel credentials.
    Tunnel,
    /// `/edge/s`: a snapshot upload.
    Snapshot,
    /// `/edge/a`: an async-mode tick.
    Async,
    /// `/edge/d`: the desired stacks, fetched.
    Desired,
    /// `/edge/r`: stack statuses, reported.
    Report,
}

impl AgentRoute {
    pub const ALL: [AgentRoute; 7] = [
        AgentRoute::Checkin,
        AgentRoute::Held,
        AgentRoute::Tunnel,
        AgentRoute::Snapshot,
        AgentRoute::Async,
        AgentRoute::Desired,
        AgentRoute::Report,
    ];

    /// The route at `path` (without its query), if it is an agent's.
    pub fn of(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.path() == path)
    }

    pub fn path(self) -> &'static str {
        match self {
            AgentRoute::Checkin => proto::wire::CHECKIN_PATH,
            AgentRoute::Held => proto::wire::HELD_CHECKIN_PATH,
            AgentRoute::Tunnel => proto::tunnel::TUNNEL_REQUEST_PATH,
            AgentRoute::Snapshot => proto::snapshot::SNAPSHOT_PATH,
            AgentRoute::Async => proto::async_mode::ASYNC_PATH,
            AgentRoute::Desired => proto::stacks::DESIRED_PATH,
            AgentRoute::Report => proto::stacks::STACK_REPORT_PATH,
        }
    }

    /// The largest body the route takes.
    pub fn body_limit(self) -> usize {
        match self {
            AgentRoute::Checkin | AgentRoute::Held | AgentRoute::Tunnel => MAX_CONTROL_FRAME,
            AgentRoute::Snapshot => MAX_UPLOAD_FRAME,
            AgentRoute::Async => MAX_ASYNC_FRAME,
            AgentRoute::Desired => proto::stacks::MAX_SYNC_FRAME,
            AgentRoute::Report => proto::stacks::MAX_REPORT_FRAME,
        }
    }
}

/// What an agent route answers when it succeeds.
#[derive(Debug, PartialEq, Eq)]
pub enum AgentAnswer {
    /// `204` with an empty reason phrase: nothing new.
    NoContent,
    /// `200` with an empty reason phrase and this body (no content type: the agent knows
    /// what it asked for, and every byte is metered).
    Body(Vec<u8>),
}

/// How long an agent's request body may take in all, however steadily it arrives (a 1 MiB
/// upload over a 64 kbit/s link takes about two minutes).
pub const AGENT_BODY_TOTAL: Duration = Duration::from_secs(300);

/// The largest body each agent route takes. The front reads the first request of a
/// connection to one of these whole, within this, before anything else serves it
/// ([`crate::front`]); the handlers refuse more.
pub fn body_limit(path: &str) -> Option<usize> {
    AgentRoute::of(path).map(AgentRoute::body_limit)
}

/// The length of an agent request's body as its head announces it (`content_length`; none
/// and not `chunked` is an empty body), if it can be read: within the route's `limit`, and
/// not chunked (agents always send the length). The actix handlers and the front (for a
/// connection's first request) refuse alike.
pub fn announced_body(
    limit: usize,
    content_length: Option<usize>,
    chunked: bool,
) -> Result<usize, ApiError> {
    if chunked {
        return Err(ApiError::LengthRequired(
            "agent request body without a Content-Length".into(),
        ));
    }
    let n = content_length.unwrap_or(0);
    if n > limit {
        return Err(body_too_large(limit));
    }
    Ok(n)
}

fn body_too_large(limit: usize) -> ApiError {
    ApiError::PayloadTooLarge(format!("agent request body larger than {limit} bytes"))
}

/// Reads the body of an agent request, of at most its route's [`body_limit`]; larger ones are
/// refused before they are read (when announced) or as soon as they pass the limit, and a
/// chunked one at once (agents always send the length; the front reads an announced body
/// before actix gets the connection, so a stalled one costs little). Memory grows with
/// what arrives, never with what is announced. A sender that stalls is let go: each chunk
/// must follow the one before (or the head) within `idle`, and the whole body must arrive
/// within [`AGENT_BODY_TOTAL`].
async fn read_limited(
    req: &HttpRequest,
    mut payload: web::Payload,
    idle: Duration,
) -> Result<Bytes, ApiError> {
    /// What is reserved before anything arrives: a check-in's whole body.
    const FIRST_RESERVE: usize = 4 * 1024;
    let stalled = |why: String| ApiError::RequestTimeout(format!("agent request body {why}"));
    let limit = body_limit(req.path()).unwrap_or(MAX_CONTROL_FRAME);
    let too_large = || body_too_large(limit);
    // (actix refused a malformed length already.)
    let headers = req.headers();
    let announced = announced_body(
        limit,
        headers
            .get(actix_web::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok()),
        headers.contains_key(actix_web::http::header::TRANSFER_ENCODING),
    )?;
    let read = async {
        let mut body = web::BytesMut::with_capacity(announced.min(FIRST_RESERVE));
        loop {
            let next = tokio::time::timeout(idle, payload.next())
                .await
                .map_err(|_| stalled(format!("stalled for {} s", idle.as_secs())))?;
            let Some(chunk) = next else {
                return Ok(body.freeze());
            };
            let chunk =
                chunk.map_err(|e| ApiError::BadRequest(format!("agent request body: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
    };
    tokio::time::timeout(AGENT_BODY_TOTAL, read)
        .await
        .map_err(|_| {
            stalled(format!(
                "not complete within {} s",
                AGENT_BODY_TOTAL.as_secs()
            ))
        })?
}

/// An agent route served by actix (a connection whose first request went elsewhere; the
/// front's agent lane serves the others): the body read within bounds, then [`serve`].
async fn actix_route(
    route: AgentRoute,
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_limited(&req, payload, state.limits.agent_body_timeout).await?;
    let answer = serve(&state, route, body, || crate::front::proved(&req)).await?;
    Ok(match answer {
        AgentAnswer::NoContent => HttpResponse::NoContent().reason("").finish(),
        AgentAnswer::Body(bytes) => HttpResponse::Ok().reason("").body(bytes),
    })
}

/// Serves one agent request whose whole body is `body`: the one implementation behind the
/// actix routes and the front's agent lane. `proved` is called once the request proved
/// itself (its frame verified), before the answer is known. Boxed as the route's own
/// future: a held check-in keeps what it needs while it waits, not room for an async tick.
pub fn serve<'a>(
    state: &'a AppState,
    route: AgentRoute,
    body: Bytes,
    proved: impl FnOnce() + 'a,
) -> LocalBoxFuture<'a, Result<AgentAnswer, ApiError>> {
    match route {
        AgentRoute::Checkin => Box::pin(checkin(state, CheckinKind::Poll, body, proved)),
        AgentRoute::Held => Box::pin(checkin(state, CheckinKind::Held, body, proved)),
        AgentRoute::Tunnel => Box::pin(checkin(state, CheckinKind::AskTunnel, body, proved)),
        AgentRoute::Snapshot => Box::pin(upload_snapshot(state, body, proved)),
        AgentRoute::Async => Box::pin(async_tick(state, body, proved)),
        AgentRoute::Desired => Box::pin(desired(state, body, proved)),
        AgentRoute::Report => Box::pin(stack_report(state, body, proved)),
    }
}

async fn checkin(
    state: &AppState,
    kind: CheckinKind,
    body: Bytes,
    proved: impl FnOnce(),
) -> Result<AgentAnswer, ApiError> {
    // Held check-ins are timed by the hold, not by the server's work: not in the histogram.
    let timer = (kind != CheckinKind::Held).then(|| state.metrics.checkin_seconds.start_timer());
    let (checkin, _) =
        proto::proof::open::<CheckinRequest>(&body, MAX_CONTROL_FRAME).map_err(|e| {
            state
                .metrics
                .checkins
                .with_label_values(&["bad_request"])
                .inc();
            ApiError::BadRequest(format!("check-in body: {e}"))
        })?;
    let peer = codec::frame_version(&body).unwrap_or(1);
    // Boxed: the actor's part is over at once; a held check-in keeps only its hold.
    let checkin = Box::pin(state.fleet.checkin(kind, checkin, body, proved)).await?;
    let answer = match checkin {
        Checkin::Now(answer) => answer,
        Checkin::Held(hold) => hold.answer().await,
    };
    if answer.unchanged {
        // Nothing new: no body, no content-length (204 has none). Saves ~16 bytes per poll.
        if let Some(t) = timer {
            t.observe_duration();
        }
        return Ok(AgentAnswer::NoContent);
    }
    let bytes = codec::encode_for_peer(
        &CheckinAnswer {
            status: answer.status,
            interval_secs: answer.interval_secs,
            server_time_ms: answer.server_time_ms,
            tunnel: answer.tunnel,
            desired: answer.desired,
        },
        peer,
    )
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    if let Some(t) = timer {
        t.observe_duration();
    }
    Ok(AgentAnswer::Body(bytes))
}

/// A snapshot from the agent: verified like a check-in, decompressed within bounds, kept
/// unless a newer one is already stored. `204` when stored.
async fn upload_snapshot(
    state: &AppState,
    body: Bytes,
    proved: impl FnOnce(),
) -> Result<AgentAnswer, ApiError> {
    let (upload, _unverified) = proto::proof::open::<SnapshotUpload>(&body, MAX_UPLOAD_FRAME)
        .map_err(|e| ApiError::BadRequest(format!("snapshot upload: {e}")))?;
    let id = upload.endpoint_id;
    state
        .fleet
        .verify_upload(id, body.clone(), upload.edge_id, upload.timestamp_ms)
        .await?;
    proved();
    // Decoding proves the body is a well-formed snapshot before anything is stored.
    let snap = proto::snapshot::decompress(&upload.body)
        .map_err(|e| ApiError::BadRequest(format!("snapshot upload: {e}")))?;
    let stored = StoredSnapshot {
        taken_ms: snap.taken_ms,
        received_ms: now_ms(),
        body: upload.body,
    };
    match state.store.put_snapshot(id, &stored).await? {
        SnapshotPut::Stored => {
            tracing::debug!(env = id, bytes = body.len(), "snapshot stored");
        }
        // A late upload (retried after a newer one went through): nothing to do better.
        SnapshotPut::KeptNewer => {
            tracing::debug!(
                env = id,
                "snapshot older than the stored one: kept the stored"
            );
        }
        SnapshotPut::NoEnvironment => {
            return Err(ApiError::NotFound(format!(
                "environment {id} does not exist"
            )));
        }
    }
    Ok(AgentAnswer::NoContent)
}

/// An async-mode tick: verified like a check-in (proof, freshness, replay, binding; the
/// environment must be in async mode), then, in this order: command results are recorded,
/// the snapshot report is applied, and the commands after `done_through` are handed out.
/// A corrupt snapshot report is a 400 that leaves the stored snapshot as it was; one that
/// cannot be applied (unknown base) is answered with `need_full_snapshot`.
async fn async_tick(
    state: &AppState,
    body: Bytes,
    proved: impl FnOnce(),
) -> Result<AgentAnswer, ApiError> {
    let (tick, _unverified) =
        proto::proof::open::<AsyncRequest>(&body, MAX_ASYNC_FRAME).map_err(|e| {
            state
                .metrics
                .checkins
                .with_label_values(&["bad_request"])
                .inc();
            ApiError::BadRequest(format!("async request: {e}"))
        })?;
    let id = tick.checkin.endpoint_id;
    let peer = codec::frame_version(&body).unwrap_or(1);
    // The agent's clock (server-corrected): the one snapshot times are kept in.
    let request_ms = proto::wire::request_timestamp(
        tick.checkin.timestamp_lo,
        tick.checkin.timestamp_hi,
        now_ms(),
    );
    let answer = state
        .fleet
        .checkin(CheckinKind::Async, tick.checkin, body, proved)
        .await?
        .answer()
        .await;
    let now = now_ms();
    if !tick.results.is_empty() {
        state.store.finish_commands(id, &tick.results, now).await?;
        for r in &tick.results {
            let event = if r.error.is_none() {
                "result_ok"
            } else {
                "result_failed"
            };
            state
                .metrics
                .async_commands
                .with_label_values(&[event])
                .inc();
        }
        tracing::debug!(
            env = id,
            results = tick.results.len(),
            "command results recorded"
        );
    }
    let (snapshot_ack, need_full_snapshot) = match tick.snapshot {
        None => (None, false),
        Some(report) => {
            let kind = match &report {
                SnapshotReport::Full(_) => "full",
                SnapshotReport::Delta(_) => "delta",
                SnapshotReport::Unchanged { .. } => "unchanged",
            };
            let outcome = apply_report(state, id, report, request_ms, now).await;
            let label = match &outcome {
                Ok((_, true)) => "need_full",
                Ok((Some(_), false)) => "stored",
                Ok((None, false)) => "kept_newer",
                Err(_) => "bad",
            };
            state
                .metrics
                .async_snapshots
                .with_label_values(&[kind, label])
                .inc();
            outcome?
        }
    };
    let commands = match tick.done_through {
        None => Vec::new(),
        Some(after) => state
            .store
            .deliver_commands(id, after, MAX_COMMANDS_PER_ANSWER, now)
            .await?
            .into_iter()
            .map(|c| Command {
                id: c.id,
                action: c.action,
            })
            // Within the answer's size limit (a stack deploy can be 16 KiB); the rest stay
            // unfinished and go with the next answer.
            .scan(MAX_ASYNC_ANSWER - 1024, |budget, c| {
                let size = codec::encode(&c).map_or(usize::MAX, |f| f.len());
                (size <= *budget).then(|| {
                    *budget -= size;
                    c
                })
            })
            .collect(),
    };
    if !commands.is_empty() {
        state
            .metrics
            .async_commands
            .with_label_values(&["delivered"])
            .inc_by(commands.len() as u64);
    }
    let [ping, snapshot, command] = state.fleet.defaults.async_intervals();
    let bytes = codec::encode_for_peer(
        &AsyncAnswer {
            intervals: answer.async_intervals.unwrap_or(AsyncIntervals {
                ping,
                snapshot,
                command,
            }),
            server_time_ms: answer.server_time_ms,
            snapshot_ack,
            need_full_snapshot,
            commands,
            desired: answer.desired,
        },
        peer,
    )
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(AgentAnswer::Body(bytes))
}

/// The stacks the agent's environment should run, rendered for it (`/edge/d`): verified like
/// an upload, then each targeted stack's version read and rendered. A stack that cannot be
/// rendered for this environment (a variable it lacks) is left out and recorded as its
/// `error`, so the operator sees why; the rest go out.
async fn desired(
    state: &AppState,
    body: Bytes,
    proved: impl FnOnce(),
) -> Result<AgentAnswer, ApiError> {
    let (sync, _) = proto::proof::open::<StackSync>(&body, MAX_SYNC_FRAME)
        .map_err(|e| ApiError::BadRequest(format!("desired-state request: {e}")))?;
    let id = sync.endpoint_id;
    state
        .fleet
        .verify_signed(Route::Desired, id, &body, sync.edge_id, sync.timestamp_ms)
        .await?;
    proved();
    state.fleet.take_stack_request(id).await?;
    let env = state
        .store
        .get_environment(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("environment {id} does not exist")))?;
    let catalog = state.fleet.loaded_catalog(id)?;
    let inputs = EnvInputs::of(&env);
    let mut stacks = Vec::new();
    let mut failed = Vec::new();
    let targeting = catalog.targeting(&inputs);
    // Beyond what an agent takes: not delivered, and the operator told so.
    for (stack, version) in targeting.iter().skip(proto::stacks::MAX_STACKS_PER_ENV) {
        failed.push(proto::stacks::StackState {
            stack_id: stack.id,
            version: *version,
            phase: proto::stacks::Phase::Error,
            error: Some(format!(
                "not delivered: more than {} stacks target this environment (the first by id are)",
                proto::stacks::MAX_STACKS_PER_ENV
            )),
            at_ms: now_ms(),
        });
    }
    for (stack, version) in targeting
        .into_iter()
        .take(proto::stacks::MAX_STACKS_PER_ENV)
    {
        // The version the environment should run, else (it cannot be rendered for it) the
        // one its rollout started from, so a missing variable does not take down what runs.
        let fallback = catalog
            .rollout(stack.id)
            .map(|r| r.from_version)
            .filter(|v| *v > 0 && *v != version);
        let mut first_error = None;
        for v in std::iter::once(version).chain(fallback) {
            let compose = match catalog.file(stack.id, v) {
                Some(f) => f,
                None => match state.store.stack_version(stack.id, v).await? {
                    Some(found) => std::sync::Arc::from(found.compose),
                    // Deleted meanwhile: its notification is on its way.
                    None => continue,
                },
            };
            match catalog.render(&env, stack, v, &compose) {
                Ok(s) => {
                    stacks.push(s);
                    break;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            state
                .metrics
                .desired_fetches
                .with_label_values(&["render_error"])
                .inc();
            failed.push(proto::stacks::StackState {
                stack_id: stack.id,
                version,
                phase: proto::stacks::Phase::Error,
                error: Some(format!("cannot be rendered for this environment: {e}")),
                at_ms: now_ms(),
            });
        }
    }
    if !failed.is_empty() {
        state.fleet.record_statuses(id, &failed)?;
    }
    state
        .metrics
        .desired_fetches
        .with_label_values(&["ok"])
        .inc();
    let answer = DesiredState {
        digest: catalog.digest(&inputs),
        stacks,
    };
    let bytes = codec::encode(&answer).map_err(|e| ApiError::Internal(e.to_string()))?;
    if bytes.len() > MAX_DESIRED_ANSWER {
        return Err(ApiError::Unprocessable(format!(
            "environment {id}: its stacks take {} bytes, more than the {MAX_DESIRED_ANSWER} an agent reads",
            bytes.len()
        )));
    }
    Ok(AgentAnswer::Body(bytes))
}

/// Stack statuses from the agent (`/edge/r`), verified like an upload: the digest it carries
/// is acknowledged (check-ins stop announcing it) and the statuses are queued for the next
/// batch write. `204`.
async fn stack_report(
    state: &AppState,
    body: Bytes,
    proved: impl FnOnce(),
) -> Result<AgentAnswer, ApiError> {
    let (report, _) = proto::proof::open::<StackReport>(&body, MAX_REPORT_FRAME)
        .map_err(|e| ApiError::BadRequest(format!("stack report: {e}")))?;
    let id = report.sync.endpoint_id;
    state
        .fleet
        .verify_signed(
            Route::Report,
            id,
            &body,
            report.sync.edge_id,
            report.sync.timestamp_ms,
        )
        .await?;
    proved();
    state.fleet.take_stack_request(id).await?;
    // Only what the agent may speak of: the stacks its environment runs now, and the end
    // of those it ran (`removed`, which forgets its status). Another stack's counts, and so
    // its rollout, are not the agent's to move. Times from the future are the present.
    let ours = state.fleet.stacks_of(id).await?;
    let latest = now_ms() + proto::proof::FRESHNESS_WINDOW_MS;
    let statuses: Vec<_> = report
        .statuses
        .into_iter()
        .filter(|s| ours.contains(&s.stack_id) || s.phase == proto::stacks::Phase::Removed)
        .map(|mut s| {
            s.at_ms = s.at_ms.min(latest);
            s
        })
        .collect();
    state.fleet.record_statuses(id, &statuses)?;
    state.fleet.acknowledge(id, report.digest).await?;
    Ok(AgentAnswer::NoContent)
}

/// Applies a snapshot report: `(digest now held, full snapshot needed)`.
async fn apply_report(
    state: &AppState,
    id: EnvId,
    report: SnapshotReport,
    request_ms: u64,
    now: u64,
) -> Result<(Option<u64>, bool), ApiError> {
    let bad = |e: proto::snapshot::SnapshotError| ApiError::BadRequest(format!("snapshot: {e}"));
    let snap = match report {
        SnapshotReport::Full(bytes) => {
            let snap = proto::snapshot::decompress(&bytes).map_err(bad)?;
            return store_snapshot(state, id, &snap, Some(bytes), now).await;
        }
        SnapshotReport::Delta(bytes) => {
            // Decoded before anything else: a corrupt delta is the agent's error (400), an
            // unknown base is not.
            let delta = proto::snapshot::decompress_delta(&bytes).map_err(bad)?;
            let Some(base) = held_snapshot(state, id).await? else {
                return Ok((None, true));
            };
            match proto::snapshot::apply(&base, delta) {
                Ok(snap) => snap,
                Err(DeltaError::BaseMismatch { .. }) => return Ok((None, true)),
                Err(e) => {
                    tracing::warn!(env = id, error = %e, "snapshot delta not applied; full snapshot requested");
                    return Ok((None, true));
                }
            }
        }
        SnapshotReport::Unchanged { digest } => {
            let Some(mut held) = held_snapshot(state, id).await? else {
                return Ok((None, true));
            };
            if proto::snapshot::digest(&held).map_err(bad)? != digest {
                return Ok((None, true));
            }
            // Seen again: the same content, as of this request.
            held.taken_ms = held.taken_ms.max(request_ms);
            held
        }
    };
    store_snapshot(state, id, &snap, None, now).await
}

/// The stored snapshot, decoded; `None` when there is none or it cannot be read (a full one
/// replaces it).
async fn held_snapshot(state: &AppState, id: EnvId) -> Result<Option<Snapshot>, ApiError> {
    let Some(stored) = state.store.snapshot(id).await? else {
        return Ok(None);
    };
    match proto::snapshot::decompress(&stored.body) {
        Ok(s) => Ok(Some(s)),
        Err(e) => {
            tracing::warn!(env = id, error = %e, "stored snapshot unreadable; full snapshot requested");
            Ok(None)
        }
    }
}

async fn store_snapshot(
    state: &AppState,
    id: EnvId,
    snap: &Snapshot,
    compressed: Option<Vec<u8>>,
    now: u64,
) -> Result<(Option<u64>, bool), ApiError> {
    let internal = |e: proto::snapshot::SnapshotError| ApiError::Internal(e.to_string());
    let digest = proto::snapshot::digest(snap).map_err(internal)?;
    let body = match compressed {
        Some(b) => b,
        None => proto::snapshot::compress(snap).map_err(internal)?,
    };
    let stored = StoredSnapshot {
        taken_ms: snap.taken_ms,
        received_ms: now,
        body,
    };
    match state.store.put_snapshot(id, &stored).await? {
        SnapshotPut::Stored => Ok((Some(digest), false)),
        // The stored one was taken later (this report was late): not acknowledged, so the
        // agent's next delta is against a base the server really holds, or asks for a full.
        SnapshotPut::KeptNewer => Ok((None, false)),
        SnapshotPut::NoEnvironment => Err(ApiError::NotFound(format!(
            "environment {id} does not exist"
        ))),
    }
}
