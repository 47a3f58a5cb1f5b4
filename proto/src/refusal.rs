//! Why a server refused an agent's request: the machine-readable `code` of the JSON error body
//! (`{"message": "...", "code": "bad_proof"}`). Spelled here once, for the control plane that
//! sends it and the agent (and the load test) that reads it; the HTTP status that goes with
//! each code is the control plane's business (its error table).

use std::fmt;

/// Declares the known codes once: each variant with its doc and its spelling, so the enum,
/// [`RefusalCode::KNOWN`] and [`RefusalCode::kind`] cannot disagree.
macro_rules! refusal_codes {
    ($($(#[doc = $doc:literal])+ $variant:ident => $code:literal,)+) => {
        /// The code of a refusal. [`RefusalCode::Other`] keeps a code this version does not
        /// know (a newer server), so nothing is lost in parsing.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum RefusalCode {
            $($(#[doc = $doc])+ $variant,)+
            /// Any other code.
            Other(String),
        }

        impl RefusalCode {
            /// Every code this version knows, for tables and tests.
            pub const KNOWN: &'static [RefusalCode] = &[$(Self::$variant,)+];

            /// A fixed label (metrics, error counts); unknown codes share one.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Self::$variant => $code,)+
                    Self::Other(_) => "refused_other",
                }
            }
        }
    };
}

refusal_codes! {
    /// The request timestamp is too far from the server clock (the answer carries it).
    ClockSkew => "clock_skew",
    /// The request proof does not verify (wrong join secret).
    BadProof => "bad_proof",
    /// The proof verifies without `AGENT_SECRET`: the agent's differs from the server's.
    AgentSecretMismatch => "agent_secret_mismatch",
    /// The same request was seen before.
    Replay => "replay",
    /// The environment is bound to another Edge ID.
    EdgeIdMismatch => "edge_id_mismatch",
    /// No such environment (deleted, or the key belongs elsewhere).
    UnknownEnvironment => "unknown_environment",
    /// The environment is unbound and the request did not carry the Edge ID.
    EdgeIdRequired => "edge_id_required",
    /// The server could not read the request (version mismatch?).
    BadRequest => "bad_request",
    /// The environment is in the other mode (standard vs async, `EDGE_ASYNC`).
    WrongMode => "wrong_mode",
    /// The server sheds load; retry after `retry-after`.
    Busy => "busy",
    /// The request came on a connection that carries something else (a Docker hijack).
    Misdirected => "misdirected",
}

/// How a refused request should be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// Nothing changes by itself: only an operator can fix it (a new key, a reset
    /// association, the right mode or secret). Retry calmly.
    Operator,
    /// The sender can fix it at once: correct its clock, send its Edge ID, send a new request.
    Correctable,
    /// The server is overloaded: retry later.
    Later,
}

impl RefusalCode {
    /// The code as it travels; [`RefusalCode::Other`] keeps its own text.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Other(code) => code,
            known => known.kind(),
        }
    }

    /// Reads a code; an unknown one becomes [`RefusalCode::Other`].
    pub fn parse(code: &str) -> Self {
        Self::KNOWN
            .iter()
            .find(|known| known.kind() == code)
            .cloned()
            .unwrap_or_else(|| Self::Other(code.to_owned()))
    }

    pub fn retry_class(&self) -> RetryClass {
        match self {
            Self::ClockSkew | Self::Replay | Self::EdgeIdRequired | Self::Misdirected => {
                RetryClass::Correctable
            }
            Self::Busy => RetryClass::Later,
            Self::BadProof
            | Self::AgentSecretMismatch
            | Self::EdgeIdMismatch
            | Self::UnknownEnvironment
            | Self::BadRequest
            | Self::WrongMode
            | Self::Other(_) => RetryClass::Operator,
        }
    }

    /// What an operator of the agent can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            Self::ClockSkew => "the clock is off and could not be corrected",
            Self::BadProof => "the EDGE_KEY does not match the environment's current key; reinstall with the key shown by the control plane",
            Self::AgentSecretMismatch => "AGENT_SECRET differs from the control plane's",
            Self::Replay => "a check-in was repeated; this clears by itself",
            Self::EdgeIdMismatch => "the environment is bound to another Edge ID; reset its association in the control plane, or set EDGE_ID to the bound one",
            Self::UnknownEnvironment => "the environment does not exist (deleted?); reinstall with a new key",
            Self::BadRequest => "the control plane could not read the check-in; check that agent and server versions match",
            Self::EdgeIdRequired => "the next check-in carries the Edge ID",
            Self::WrongMode => "the environment's mode differs from the agent's: set EDGE_ASYNC=1 for an async environment, unset it for a standard one",
            Self::Busy => "the control plane is overloaded; this clears by itself",
            Self::Misdirected => "the request went to a connection that carries something else; a new connection fixes it",
            Self::Other(_) => "see the server message",
        }
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(code) if !code.is_empty() => f.write_str(code),
            other => f.write_str(other.kind()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_code_parses_back_to_itself() {
        for code in RefusalCode::KNOWN {
            assert_eq!(&RefusalCode::parse(code.as_str()), code);
            assert_eq!(code.to_string(), code.as_str());
        }
        let mut spellings: Vec<&str> = RefusalCode::KNOWN.iter().map(RefusalCode::kind).collect();
        spellings.sort_unstable();
        spellings.dedup();
        assert_eq!(
            spellings.len(),
            RefusalCode::KNOWN.len(),
            "two codes spelled alike"
        );
    }

    #[test]
    fn unknown_codes_are_kept() {
        let code = RefusalCode::parse("from_the_future");
        assert_eq!(code, RefusalCode::Other("from_the_future".into()));
        assert_eq!(code.as_str(), "from_the_future");
        assert_eq!(code.kind(), "refused_other");
        assert_eq!(code.to_string(), "from_the_future");
        assert_eq!(
            RefusalCode::Other(String::new()).to_string(),
            "refused_other"
        );
        assert_eq!(code.retry_class(), RetryClass::Operator);
    }

    #[test]
    fn retry_classes() {
        assert_eq!(RefusalCode::Busy.retry_class(), RetryClass::Later);
        assert_eq!(
            RefusalCode::ClockSkew.retry_class(),
            RetryClass::Correctable
        );
        assert_eq!(
            RefusalCode::EdgeIdMismatch.retry_class(),
            RetryClass::Operator
        );
    }
}
