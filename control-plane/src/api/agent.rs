//! The agent-facing check-in route. No admin key: the request proves the join secret.

use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt as _;
use proto::codec::{self, MAX_CONTROL_FRAME};
use proto::wire::{CheckinAnswer, CheckinRequest};

use super::error::ApiError;
use super::AppState;

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

pub async fn checkin(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let timer = state.metrics.checkin_seconds.start_timer();
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
    let answer = state.fleet.checkin(req, body).await?;
    if answer.unchanged {
        // Nothing new: no body, no content-length (204 has none). Saves ~16 bytes per poll.
        timer.observe_duration();
        return Ok(HttpResponse::NoContent().reason("").finish());
    }
    let bytes = codec::encode(&CheckinAnswer {
        status: answer.status,
        interval_secs: answer.interval_secs,
        server_time_ms: answer.server_time_ms,
        tunnel: None,
    })
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    timer.observe_duration();
    // No content-type and an empty reason phrase (RFC 9112 allows it; clients ignore it): the
    // agent knows what it asked for, and every byte is metered.
    Ok(HttpResponse::Ok().reason("").body(bytes))
}
