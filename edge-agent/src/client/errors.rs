//! Why a check-in failed: [`CheckinError`] (where it failed, and with [`RetryClass`] how a
//! retry can help), the server's refusal codes, and the mapping of the control plane's error
//! answers.

use std::io;
use std::time::Duration;

use hyper::StatusCode;
use proto::codec::CodecError;

use crate::tls::TlsSetupError;

/// Longest server message kept for errors and logs.
const MAX_MESSAGE_CHARS: usize = 200;

/// Why a check-in refusal happened, from the `code` of the server's JSON error: the codes are
/// `proto`'s, spelled once for the control plane and the agent.
pub use proto::RefusalCode;

/// How a failed check-in should be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// The network or the server is in trouble: jittered exponential backoff.
    Backoff,
    /// The server refused us: retry calmly, an admin may fix it.
    Refused,
    /// The server is overloaded and may say when to come back.
    Busy(Option<Duration>),
}

/// A failed check-in. Each variant says where it failed; [`CheckinError::retry_class`] says
/// how (and whether soon) a retry can help.
#[derive(Debug, thiserror::Error)]
pub enum CheckinError {
    /// DNS: the API host name did not resolve. Retry helps when DNS or the network recovers.
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    /// TCP: connection refused, unreachable, out of ports. Retry helps when the server is back.
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    /// TLS: handshake failed or the certificate was rejected. A rejected certificate needs an
    /// operator (a certificate matching the join token, or a publicly trusted one).
    #[error("tls handshake with {host} failed: {source}")]
    Tls { host: String, source: io::Error },
    /// HTTP: the connection broke or the server spoke bad HTTP. Retry on a new connection.
    #[error("http exchange failed: {0}")]
    Http(#[source] hyper::Error),
    /// No complete answer in time. Retry on a new connection.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server refused this agent (401/403/404/400). Retrying helps only after an admin acts.
    #[error("check-in refused ({status} {code}): {message}; {hint}", hint = code.hint())]
    Refused {
        status: u16,
        code: RefusalCode,
        message: String,
        /// Server clock from a `clock_skew` refusal.
        server_time_ms: Option<u64>,
    },
    /// 503 / 429: the server sheds load. Retry later.
    #[error("server busy")]
    Busy { retry_after: Option<Duration> },
    /// Other 5xx. Retry later.
    #[error("server error {status}: {message}")]
    Server { status: u16, message: String },
    /// The answer did not make sense (wrong status, undecodable body). Likely a version mismatch.
    #[error("unexpected answer (status {status}): {detail}")]
    Protocol { status: u16, detail: String },
    /// The request could not be encoded: a bug on our side.
    #[error("cannot encode the check-in: {0}")]
    Encode(#[source] CodecError),
    /// The request is larger than the server accepts (a snapshot of a huge engine).
    #[error("request of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
}

impl CheckinError {
    pub fn retry_class(&self) -> RetryClass {
        match self {
            Self::Refused { code, .. } => match code.retry_class() {
                proto::refusal::RetryClass::Later => RetryClass::Busy(None),
                // The correctable ones (clock, Edge ID) are corrected at once by the client;
                // a refusal that reaches the caller waits like the others.
                proto::refusal::RetryClass::Correctable | proto::refusal::RetryClass::Operator => {
                    RetryClass::Refused
                }
            },
            Self::Busy { retry_after } => RetryClass::Busy(*retry_after),
            _ => RetryClass::Backoff,
        }
    }

    /// A fixed label for counting errors by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Resolve { .. } => "resolve",
            Self::Connect { .. } => "connect",
            Self::Tls { .. } => "tls",
            Self::Http(_) => "http",
            Self::Timeout(_) => "timeout",
            Self::Refused { code, .. } => code.kind(),
            Self::Busy { .. } => "busy",
            Self::Server { .. } => "server_error",
            Self::Protocol { .. } => "protocol",
            Self::Encode(_) => "encode",
            Self::TooLarge { .. } => "too_large",
        }
    }

    /// Whether the connection can no longer be trusted and must be re-established (the
    /// server, or the way to it, went away).
    pub fn breaks_connection(&self) -> bool {
        matches!(
            self,
            Self::Resolve { .. }
                | Self::Connect { .. }
                | Self::Tls { .. }
                | Self::Http(_)
                | Self::Timeout(_)
                | Self::Protocol { .. }
        )
    }
}

/// Why a [`PollClient`](super::PollClient) could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("api url {0:?} is not usable: {1}")]
    ApiUrl(String, &'static str),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

/// The JSON error body of the control plane.
#[derive(Debug, Default, serde::Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: String,
    #[serde(default, rename = "serverTimeMs")]
    server_time_ms: Option<u64>,
}

/// Maps a non-200 answer to an error. Public for tests of the mapping.
pub fn error_from_answer(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> CheckinError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let message = match &parsed {
        Some(b) => clean_message(&b.message),
        None => clean_message(&String::from_utf8_lossy(body)),
    };
    let code = parsed.as_ref().map(|b| b.code.as_str()).unwrap_or("");
    let server_time_ms = parsed.as_ref().and_then(|b| b.server_time_ms);
    match status.as_u16() {
        503 | 429 => CheckinError::Busy { retry_after },
        s @ 500..=599 => CheckinError::Server { status: s, message },
        s @ 400..=499 => CheckinError::Refused {
            status: s,
            code: RefusalCode::parse(code),
            message,
            server_time_ms,
        },
        s => CheckinError::Protocol {
            status: s,
            detail: format!("unexpected status: {message}"),
        },
    }
}

/// Server text goes into logs: keep it short and on one line.
fn clean_message(raw: &str) -> String {
    raw.chars()
        .take(MAX_MESSAGE_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_mapping() {
        let e = error_from_answer(
            StatusCode::UNAUTHORIZED,
            None,
            br#"{"message":"clock off","code":"clock_skew","serverTimeMs":1234}"#,
        );
        assert!(matches!(
            &e,
            CheckinError::Refused { status: 401, code: RefusalCode::ClockSkew, server_time_ms: Some(1234), message } if message == "clock off"
        ));
        assert_eq!(e.kind(), "clock_skew");
        assert_eq!(e.retry_class(), RetryClass::Refused);

        let e = error_from_answer(
            StatusCode::FORBIDDEN,
            None,
            br#"{"message":"bound to another","code":"edge_id_mismatch"}"#,
        );
        assert_eq!(e.kind(), "edge_id_mismatch");
        assert!(e.to_string().contains("reset its association"));

        for (code, kind) in [
            ("bad_proof", "bad_proof"),
            ("agent_secret_mismatch", "agent_secret_mismatch"),
            ("replay", "replay"),
            ("unknown_environment", "unknown_environment"),
            ("bad_request", "bad_request"),
            ("whatever", "refused_other"),
        ] {
            let body = format!(r#"{{"message":"m","code":"{code}"}}"#);
            let e = error_from_answer(StatusCode::NOT_FOUND, None, body.as_bytes());
            assert_eq!(e.kind(), kind);
        }

        let e = error_from_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(Duration::from_secs(3)),
            b"{}",
        );
        assert_eq!(
            e.retry_class(),
            RetryClass::Busy(Some(Duration::from_secs(3)))
        );
        let e = error_from_answer(StatusCode::BAD_GATEWAY, None, b"<html>\nbad\n</html>");
        assert!(
            matches!(&e, CheckinError::Server { status: 502, message } if !message.contains('\n'))
        );
        assert_eq!(e.retry_class(), RetryClass::Backoff);
        let e = error_from_answer(StatusCode::FOUND, None, b"");
        assert_eq!(e.kind(), "protocol");
    }

    #[test]
    fn server_messages_are_bounded_and_single_line() {
        let long = "x\r\n".repeat(1000);
        let m = clean_message(&long);
        assert!(m.chars().count() <= MAX_MESSAGE_CHARS);
        assert!(!m.contains('\n'));
    }
}
