//! The agent-facing check-in route. No admin key: the request proves the join secret.

use actix_web::{web, HttpResponse};
use bytes::Bytes;
use proto::codec::{self, MAX_CONTROL_FRAME};
use proto::wire::{CheckinAnswer, CheckinRequest};

use super::error::ApiError;
use super::AppState;

pub async fn checkin(state: web::Data<AppState>, body: Bytes) -> Result<HttpResponse, ApiError> {
    let timer = state.metrics.checkin_seconds.start_timer();
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
