//! Every error the control plane answers with, mapped to its status and machine-readable code
//! in one table ([`ApiError::status`], [`ApiError::code`]): the admin API, the agent routes
//! (whose codes are `proto`'s [`RefusalCode`]s, shared with the agent) and the Docker proxy,
//! served by actix or by the hyper server for hijacked connections alike. Every error body is
//! `{"message": "...", "code": "..."}` (the code only where one is defined).

use actix_web::{HttpResponse, ResponseError};
use proto::RefusalCode;
use serde::Serialize;
use store::{EnvId, StoreError};

use crate::fleet::{CheckinError, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// The admin key or the console's session (and its CSRF token) did not check out.
    #[error(transparent)]
    Auth(#[from] crate::session::Refused),
    /// Authenticated, but not allowed from where it came (a WebSocket from another origin).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Well-formed, but it cannot be done with what is stored (a variable without a value).
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A body sent without `Content-Length` where one is required (agent routes).
    #[error("{0}")]
    LengthRequired(String),
    /// A request (body) that did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// Overloaded or the store is down: 503 with `retry-after`.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{}", agent_message(.0))]
    Agent(AgentRefusal),
    /// A request on the wrong kind of connection (see `front`).
    #[error("{0}")]
    Misdirected(String),
    /// The Docker proxy's errors, with codes of their own.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

/// Agent-facing refusals with their wire code.
#[derive(Debug, Clone, Copy)]
pub enum AgentRefusal {
    Refused(Refusal),
    UnknownEnvironment(u64),
}

impl AgentRefusal {
    pub fn code(&self) -> RefusalCode {
        match self {
            Self::Refused(r) => r.code(),
            Self::UnknownEnvironment(_) => RefusalCode::UnknownEnvironment,
        }
    }
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

/// Why a Docker API call through the tunnel failed; each says where.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("this connection carries the Docker API; open a new connection for other routes")]
    Misdirected,
    #[error(transparent)]
    Auth(#[from] crate::session::Refused),
    #[error("environment {0} does not exist")]
    NotFound(EnvId),
    #[error("environment {0} is in async mode: it has no tunnel; queue commands with POST /api/endpoints/{0}/commands")]
    Async(EnvId),
    #[error("{0}")]
    BadRequest(String),
    /// The agent did not open its tunnel in time.
    #[error("{0}")]
    Timeout(String),
    /// The tunnel or its gateway failed.
    #[error("{0}")]
    BadGateway(String),
    /// The tunnel, or this replica's sessions to its gateway, carry as many streams as they
    /// may right now.
    #[error("{0}")]
    Busy(String),
    /// The agent could not reach its engine.
    #[error("{0}")]
    EngineUnreachable(String),
    #[error("store unavailable: {0}")]
    Store(#[from] StoreError),
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
    /// The status code of every error: the one table.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::Auth(r) => auth_status(*r),
            Self::Forbidden(_) => 403,
            Self::NotFound(_) => 404,
            Self::Conflict(_) => 409,
            Self::Unprocessable(_) => 422,
            Self::PayloadTooLarge(_) => 413,
            Self::LengthRequired(_) => 411,
            Self::RequestTimeout(_) => 408,
            Self::Unavailable(_) => 503,
            Self::Internal(_) => 500,
            Self::Misdirected(_) => 421,
            Self::Agent(r) => match r.code() {
                RefusalCode::UnknownEnvironment => 404,
                RefusalCode::EdgeIdMismatch => 403,
                RefusalCode::WrongMode => 409,
                RefusalCode::EdgeIdRequired | RefusalCode::BadRequest => 400,
                RefusalCode::BadProof
                | RefusalCode::AgentSecretMismatch
                | RefusalCode::ClockSkew
                | RefusalCode::Replay
                | RefusalCode::Other(_) => 401,
                RefusalCode::Busy => 503,
                RefusalCode::Misdirected => 421,
            },
            Self::Proxy(e) => match e {
                ProxyError::Misdirected => 421,
                ProxyError::Auth(r) => auth_status(*r),
                ProxyError::NotFound(_) => 404,
                ProxyError::Async(_) => 409,
                ProxyError::BadRequest(_) => 400,
                ProxyError::Timeout(_) => 504,
                ProxyError::BadGateway(_) | ProxyError::EngineUnreachable(_) => 502,
                ProxyError::Store(_) | ProxyError::Busy(_) => 503,
            },
        }
    }

    /// The machine-readable code of every error that has one: agent-facing codes are
    /// [`RefusalCode`]s; the Docker proxy's are its own.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::Agent(r) => Some(r.code().kind()),
            Self::BadRequest(_) => Some(RefusalCode::BadRequest.kind()),
            Self::Unavailable(_) => Some(RefusalCode::Busy.kind()),
            Self::Misdirected(_) => Some(RefusalCode::Misdirected.kind()),
            Self::Proxy(e) => Some(match e {
                ProxyError::Misdirected => RefusalCode::Misdirected.kind(),
                ProxyError::Auth(r) => auth_code(*r),
                ProxyError::NotFound(_) => "not_found",
                ProxyError::Async(_) => "async_environment",
                ProxyError::BadRequest(_) => RefusalCode::BadRequest.kind(),
                ProxyError::Timeout(_) => "tunnel_timeout",
                ProxyError::BadGateway(_) => "tunnel_failed",
                ProxyError::Busy(_) => "tunnel_busy",
                ProxyError::EngineUnreachable(_) => "engine_unreachable",
                ProxyError::Store(_) => "store_unavailable",
            }),
            Self::Auth(r) => Some(auth_code(*r)),
            Self::Forbidden(_) => Some("forbidden"),
            Self::NotFound(_)
            | Self::Conflict(_)
            | Self::Unprocessable(_)
            | Self::PayloadTooLarge(_)
            | Self::LengthRequired(_)
            | Self::RequestTimeout(_)
            | Self::Internal(_) => None,
        }
    }

    /// Seconds to come back after: every 503 says when (load shedding, a busy tunnel, a
    /// store that is down).
    pub fn retry_after(&self) -> Option<u32> {
        matches!(
            self,
            Self::Unavailable(_) | Self::Proxy(ProxyError::Busy(_) | ProxyError::Store(_))
        )
        .then_some(1)
    }

    /// Whether the connection must close after this answer (the wrong kind of connection).
    pub fn closes_connection(&self) -> bool {
        matches!(self, Self::Proxy(ProxyError::Misdirected))
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        let server_time_ms = match self {
            Self::Agent(AgentRefusal::Refused(Refusal::ClockSkew { server_time_ms })) => {
                Some(*server_time_ms)
            }
            _ => None,
        };
        serde_json::to_string(&ErrorBody {
            message: self.to_string(),
            code: self.code(),
            server_time_ms,
        })
        .unwrap_or_else(|_| r#"{"message":"error"}"#.to_owned())
    }
}

fn auth_status(r: crate::session::Refused) -> u16 {
    if r.forbidden() {
        403
    } else {
        401
    }
}

fn auth_code(r: crate::session::Refused) -> &'static str {
    if r.forbidden() {
        "csrf"
    } else {
        "unauthorized"
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> actix_web::http::StatusCode {
        actix_web::http::StatusCode::from_u16(self.status())
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        if let Some(secs) = self.retry_after() {
            res.insert_header(("retry-after", secs.to_string()));
        }
        res.content_type("application/json").body(self.body())
    }
}

/// At most one line a second for failures that come once per request: a store that is down
/// fails every request at once, and a line for each (49,000 a minute under load) would bury
/// the log and cost the CPU the rest needs. The next line says how many were left out.
struct Throttle {
    second: std::sync::atomic::AtomicU64,
    quiet: std::sync::atomic::AtomicU64,
}

impl Throttle {
    const fn new() -> Self {
        Self {
            second: std::sync::atomic::AtomicU64::new(0),
            quiet: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` when this one may be written.
    fn admit(&self) -> Option<u64> {
        self.admit_at(proto::clock::now_ms() / 1000)
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let last = self.second.load(Ordering::Relaxed);
        if last != now
            && self
                .second
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.quiet.swap(0, Ordering::Relaxed));
        }
        self.quiet.fetch_add(1, Ordering::Relaxed);
        None
    }
}

static STORE_UNAVAILABLE: Throttle = Throttle::new();
static CHECKIN_STORE_FAILED: Throttle = Throttle::new();

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => ApiError::Conflict(m),
            e @ StoreError::Unavailable { .. } => {
                if let Some(left_out) = STORE_UNAVAILABLE.admit() {
                    tracing::warn!(error = %e.detail(), left_out, "store unavailable");
                }
                ApiError::Unavailable(format!("store unavailable: {}", e.detail()))
            }
            e @ StoreError::Corrupt { .. } => {
                tracing::error!(error = %e.detail(), "store data corrupt");
                ApiError::Internal(format!("store data corrupt: {}", e.detail()))
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
                if let Some(left_out) = CHECKIN_STORE_FAILED.admit() {
                    tracing::warn!(error = %e, left_out, "check-in failed on the store");
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_refusals_carry_their_wire_code_and_status() {
        let cases = [
            (Refusal::BadProof, 401, "bad_proof"),
            (Refusal::AgentSecretMismatch, 401, "agent_secret_mismatch"),
            (Refusal::ClockSkew { server_time_ms: 7 }, 401, "clock_skew"),
            (Refusal::Replay, 401, "replay"),
            (Refusal::EdgeIdMismatch, 403, "edge_id_mismatch"),
            (Refusal::WrongMode, 409, "wrong_mode"),
            (Refusal::EdgeIdRequired, 400, "edge_id_required"),
        ];
        for (refusal, status, code) in cases {
            let e = ApiError::Agent(AgentRefusal::Refused(refusal));
            assert_eq!((e.status(), e.code()), (status, Some(code)), "{refusal:?}");
            // The agent reads the same code back.
            assert_eq!(RefusalCode::parse(code), refusal.code());
        }
        let unknown = ApiError::Agent(AgentRefusal::UnknownEnvironment(3));
        assert_eq!(
            (unknown.status(), unknown.code()),
            (404, Some("unknown_environment"))
        );
        let skew = ApiError::Agent(AgentRefusal::Refused(Refusal::ClockSkew {
            server_time_ms: 7,
        }));
        assert!(
            skew.body().contains(r#""serverTimeMs":7"#),
            "{}",
            skew.body()
        );
    }

    #[test]
    fn a_throttled_line_is_written_once_a_second_and_counts_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.admit_at(100), Some(0));
        assert_eq!(t.admit_at(100), None);
        assert_eq!(t.admit_at(100), None);
        assert_eq!(t.admit_at(101), Some(2));
        assert_eq!(t.admit_at(101), None);
        assert_eq!(t.admit_at(105), Some(1));
    }

    #[test]
    fn busy_says_when_to_come_back() {
        let e = ApiError::Unavailable("later".into());
        assert_eq!(
            (e.status(), e.code(), e.retry_after()),
            (503, Some("busy"), Some(1))
        );
        assert_eq!(e.body(), r#"{"message":"later","code":"busy"}"#);
        assert_eq!(ApiError::NotFound("x".into()).code(), None);
    }

    #[test]
    fn proxy_errors_keep_their_codes() {
        let e = ApiError::from(ProxyError::Timeout("late".into()));
        assert_eq!((e.status(), e.code()), (504, Some("tunnel_timeout")));
        let e = ApiError::from(ProxyError::Misdirected);
        assert_eq!((e.status(), e.code()), (421, Some("misdirected")));
        assert!(e.closes_connection());
        let e = ApiError::from(ProxyError::Busy("full".into()));
        assert_eq!(
            (e.status(), e.code(), e.retry_after()),
            (503, Some("tunnel_busy"), Some(1))
        );
        let e = ApiError::from(ProxyError::Store(StoreError::Conflict("x".into())));
        assert_eq!(
            (e.status(), e.code(), e.retry_after()),
            (503, Some("store_unavailable"), Some(1))
        );
    }
}
