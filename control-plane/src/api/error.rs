//! API errors, mapped to status codes in one place. Every error body is
//! `{"message": "..."}`; agent-facing errors add a machine-readable `code`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::fleet::{CheckinError, Refusal};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{}", agent_message(.0))]
    Agent(AgentRefusal),
    /// A request on the wrong kind of connection (see `front`).
    #[error("{0}")]
    Misdirected(String),
    /// The Docker proxy's own errors keep their status and code.
    #[error("{message}")]
    Proxy {
        status: u16,
        code: &'static str,
        message: String,
    },
}

/// Agent-facing refusals with their wire code.
#[derive(Debug, Clone, Copy)]
pub enum AgentRefusal {
    Refused(Refusal),
    UnknownEnvironment(u64),
}

fn agent_message(r: &AgentRefusal) -> String {
    match r {
        AgentRefusal::UnknownEnvironment(id) => format!("environment {id} does not exist"),
        AgentRefusal::Refused(r) => match r {
            Refusal::BadProof => "request proof does not verify: wrong join key (was the association reset?) or wrong AGENT_SECRET".into(),
            Refusal::AgentSecretMismatch => "AGENT_SECRET is missing or does not match the control plane's".into(),
            Refusal::ClockSkew { .. } => "request timestamp is outside the allowed window; correct the clock offset with serverTimeMs".into(),
            Refusal::Replay => "this request was already seen (replay)".into(),
            Refusal::EdgeIdMismatch => "environment is bound to another Edge ID; an admin can reset its association".into(),
            Refusal::WrongMode => "the environment's mode (standard or async) is not the agent's: set EDGE_ASYNC on the agent to match the environment".into(),
            Refusal::EdgeIdRequired => "environment is not bound yet: send the Edge ID with this check-in".into(),
        },
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody<'a> {
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_time_ms: Option<u64>,
}

impl ApiError {
    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::Agent(AgentRefusal::UnknownEnvironment(_)) => Some("unknown_environment"),
            ApiError::Agent(AgentRefusal::Refused(r)) => Some(match r {
                Refusal::BadProof => "bad_proof",
                Refusal::AgentSecretMismatch => "agent_secret_mismatch",
                Refusal::ClockSkew { .. } => "clock_skew",
                Refusal::Replay => "replay",
                Refusal::EdgeIdMismatch => "edge_id_mismatch",
                Refusal::WrongMode => "wrong_mode",
                Refusal::EdgeIdRequired => "edge_id_required",
            }),
            ApiError::BadRequest(_) => Some("bad_request"),
            ApiError::Unavailable(_) => Some("busy"),
            ApiError::Misdirected(_) => Some("misdirected"),
            ApiError::Proxy { code, .. } => Some(code),
            _ => None,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            ApiError::Proxy { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            ApiError::Agent(AgentRefusal::UnknownEnvironment(_)) => StatusCode::NOT_FOUND,
            ApiError::Agent(AgentRefusal::Refused(r)) => match r {
                Refusal::EdgeIdMismatch => StatusCode::FORBIDDEN,
                Refusal::WrongMode => StatusCode::CONFLICT,
                Refusal::EdgeIdRequired => StatusCode::BAD_REQUEST,
                _ => StatusCode::UNAUTHORIZED,
            },
        }
    }

    fn error_response(&self) -> HttpResponse {
        let server_time_ms = match self {
            ApiError::Agent(AgentRefusal::Refused(Refusal::ClockSkew { server_time_ms })) => {
                Some(*server_time_ms)
            }
            _ => None,
        };
        let mut res = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unavailable(_)) {
            res.insert_header(("retry-after", "1"));
        }
        res.json(ErrorBody {
            message: self.to_string(),
            code: self.code(),
            server_time_ms,
        })
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::Unavailable(m) => {
                tracing::warn!(error = %m, "store unavailable");
                ApiError::Unavailable(format!("store unavailable: {m}"))
            }
            StoreError::Corrupt(m) => {
                tracing::error!(error = %m, "store data corrupt");
                ApiError::Internal(format!("store data corrupt: {m}"))
            }
        }
    }
}

impl From<CheckinError> for ApiError {
    fn from(e: CheckinError) -> Self {
        match e {
            CheckinError::Refused(r) => ApiError::Agent(AgentRefusal::Refused(r)),
            CheckinError::UnknownEnvironment(id) => {
                ApiError::Agent(AgentRefusal::UnknownEnvironment(id))
            }
            CheckinError::Busy(id) => {
                ApiError::Unavailable(format!("environment {id} is busy, retry later"))
            }
            // Agents are not told the store's internals; the log has them.
            CheckinError::Store(e) => {
                tracing::warn!(error = %e, "check-in failed on the store");
                ApiError::Unavailable(
                    "the control plane cannot reach its store; retry later".into(),
                )
            }
            CheckinError::Broken { .. } => {
                tracing::error!(error = %e, "environment cannot be served");
                ApiError::Internal(e.to_string())
            }
        }
    }
}
