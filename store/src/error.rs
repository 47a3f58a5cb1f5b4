//! [`StoreError`]: what can go wrong with shared state, with its cause kept as a `source`.

use std::fmt;

/// The underlying error of a failed store call (a redb, Redis, I/O or JSON error).
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Display` names the cause after the context (`store backend unavailable: redis
/// subscribe: Connection refused`), so a log line or an API answer that prints only the error
/// still says what failed underneath; `source()` gives the cause itself to code that needs it.
/// The binaries print errors on one line, never the chain, so nothing is said twice.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or failed; a retry may help.
    #[error("store backend unavailable: {}", Detail(.context, .source))]
    Unavailable {
        context: String,
        #[source]
        source: Option<Cause>,
    },
    /// Stored data could not be read back; a retry will not help.
    #[error("store data is corrupt: {}", Detail(.context, .source))]
    Corrupt {
        context: String,
        #[source]
        source: Option<Cause>,
    },
    /// A uniqueness rule or a bound was broken (e.g. a second group with the same name).
    #[error("{0}")]
    Conflict(String),
}

impl StoreError {
    /// Unavailable for a reason of our own (a timeout, a vanished key), with no other cause.
    pub fn unavailable(context: impl Into<String>) -> Self {
        Self::Unavailable {
            context: context.into(),
            source: None,
        }
    }

    /// Unavailable because `cause` failed while doing `context`.
    pub fn unavailable_by(context: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Self::Unavailable {
            context: context.into(),
            source: Some(cause.into()),
        }
    }

    /// Corrupt, as found by our own checks.
    pub fn corrupt(context: impl Into<String>) -> Self {
        Self::Corrupt {
            context: context.into(),
            source: None,
        }
    }

    /// Corrupt because `cause` could not read (or write) what `context` names.
    pub fn corrupt_by(context: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Self::Corrupt {
            context: context.into(),
            source: Some(cause.into()),
        }
    }

    /// The error without its kind: the context and the cause (`redis subscribe: Connection
    /// refused`), for messages that name the kind in their own words.
    pub fn detail(&self) -> String {
        match self {
            Self::Unavailable { context, source } | Self::Corrupt { context, source } => {
                Detail(context, source).to_string()
            }
            Self::Conflict(message) => message.clone(),
        }
    }

    /// Whether trying again soon may succeed (the backend may come back; corrupt data and
    /// broken rules stay as they are).
    pub fn retry_may_help(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// `context: cause`, or either alone when the other is empty or missing.
struct Detail<'a>(&'a str, &'a Option<Cause>);

impl fmt::Display for Detail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            ("", Some(cause)) => write!(f, "{cause}"),
            (context, Some(cause)) => write!(f, "{context}: {cause}"),
            (context, None) => f.write_str(context),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn the_cause_is_kept_and_named() {
        let io = std::io::Error::other("connection refused");
        let e = StoreError::unavailable_by("redis GET settings", io);
        assert_eq!(
            e.to_string(),
            "store backend unavailable: redis GET settings: connection refused"
        );
        assert_eq!(
            e.source().map(ToString::to_string).as_deref(),
            Some("connection refused")
        );
        assert!(e.retry_may_help());
        assert_eq!(e.detail(), "redis GET settings: connection refused");
        // A backend's own error needs no context of ours.
        let e = StoreError::unavailable_by("", std::io::Error::other("broken pipe"));
        assert_eq!(e.to_string(), "store backend unavailable: broken pipe");
        let e = StoreError::corrupt("settings: not JSON");
        assert_eq!(e.to_string(), "store data is corrupt: settings: not JSON");
        assert!(e.source().is_none());
        assert!(!e.retry_may_help());
        assert!(!StoreError::Conflict("taken".into()).retry_may_help());
    }
}
