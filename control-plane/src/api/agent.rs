//! The agent-facing routes: check-ins (`/edge/c` plain, `/edge/h` held, `/edge/t` asking for
//! a tunnel) and snapshot uploads (`/edge/s`). No admin key: every request proves the join
//! secret.

use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt as _;
use proto::codec::{self, MAX_CONTROL_FRAME};
use proto::snapshot::{SnapshotUpload, MAX_UPLOAD_FRAME};
use proto::wire::{CheckinAnswer, CheckinRequest};

use super::error::ApiError;
use super::AppState;
use crate::fleet::{now_ms, CheckinKind};
use crate::store::StoredSnapshot;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource(proto::wire::CHECKIN_PATH).route(web::post().to(checkin)))
        .service(web::resource(proto::wire::HELD_CHECKIN_PATH).route(web::post().to(held)))
        .service(
            web::resource(proto::tunnel::TUNNEL_REQUEST_PATH).route(web::post().to(ask_tunnel)),
        )
        .service(
            web::resource(proto::snapshot::SNAPSHOT_PATH).route(web::post().to(upload_snapshot)),
        );
}

/// Reads a body of at most `limit` bytes; larger ones are refused before they are read (when
/// announced) or as soon as they pass the limit.
async fn read_limited(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let too_large =
        || ApiError::PayloadTooLarge(format!("check-in body larger than {limit} bytes"));
    let announced = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = web::BytesMut::with_capacity(announced.unwrap_or(64).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("check-in body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

async fn checkin(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    answer(CheckinKind::Poll, state, req, payload).await
}

async fn held(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    answer(CheckinKind::Held, state, req, payload).await
}

async fn ask_tunnel(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    answer(CheckinKind::AskTunnel, state, req, payload).await
}

async fn answer(
    kind: CheckinKind,
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    // Held check-ins are timed by the hold, not by the server's work: not in the histogram.
    let timer = (kind != CheckinKind::Held).then(|| state.metrics.checkin_seconds.start_timer());
    let body = read_limited(&req, payload, MAX_CONTROL_FRAME).await?;
    let (req, _unverified) = proto::proof::open::<CheckinRequest>(&body, MAX_CONTROL_FRAME)
        .map_err(|e| {
            state
                .metrics
                .checkins
                .with_label_values(&["bad_request"])
                .inc();
            ApiError::BadRequest(format!("check-in body: {e}"))
        })?;
    let answer = state.fleet.checkin(kind, req, body).await?;
    if answer.unchanged {
        // Nothing new: no body, no content-length (204 has none). Saves ~16 bytes per poll.
        if let Some(t) = timer {
            t.observe_duration();
        }
        return Ok(HttpResponse::NoContent().reason("").finish());
    }
    let bytes = codec::encode(&CheckinAnswer {
        status: answer.status,
        interval_secs: answer.interval_secs,
        server_time_ms: answer.server_time_ms,
        tunnel: answer.tunnel,
    })
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    if let Some(t) = timer {
        t.observe_duration();
    }
    // No content-type and an empty reason phrase (RFC 9112 allows it; clients ignore it): the
    // agent knows what it asked for, and every byte is metered.
    Ok(HttpResponse::Ok().reason("").body(bytes))
}

/// A snapshot from the agent: verified like a check-in, decompressed within bounds, kept
/// unless a newer one is already stored. `204` when stored.
async fn upload_snapshot(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_limited(&req, payload, MAX_UPLOAD_FRAME).await?;
    let (upload, _unverified) = proto::proof::open::<SnapshotUpload>(&body, MAX_UPLOAD_FRAME)
        .map_err(|e| ApiError::BadRequest(format!("snapshot upload: {e}")))?;
    let id = upload.endpoint_id;
    state
        .fleet
        .verify_upload(id, body.clone(), upload.edge_id, upload.timestamp_ms)
        .await?;
    // Decoding proves the body is a well-formed snapshot before anything is stored.
    let snap = proto::snapshot::decompress(&upload.body)
        .map_err(|e| ApiError::BadRequest(format!("snapshot upload: {e}")))?;
    let stored = StoredSnapshot {
        taken_ms: snap.taken_ms,
        received_ms: now_ms(),
        body: upload.body,
    };
    if !state.store.put_snapshot(id, &stored).await? {
        return Err(ApiError::NotFound(format!(
            "environment {id} does not exist"
        )));
    }
    tracing::debug!(env = id, bytes = body.len(), "snapshot stored");
    Ok(HttpResponse::NoContent().reason("").finish())
}
