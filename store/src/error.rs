//! [`StoreError`]: what can go wrong with shared state, with its cause kept as a `source`.

use std::fmt;

/// The underlying error of a failed store call (a redb, Redis, I/O or JSON error).
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or failed; a retry may help.
    #[error("store backend unavailable: {context}{}", Suffix(.source))]
    Unavailable {
        context: String,
        #[source]
        source: Option<Cause>,
    },
    /// Stored data could not be read back; a retry will not help.
    #[error("store data is corrupt: {context}{}", Suffix(.source))]
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

    /// Whether trying again soon may succeed (the backend may come back; corrupt data and
    /// broken rules stay as they are).
    pub fn retry_may_help(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// `": <cause>"` when there is one: the message names the cause, so a log line that prints
/// only the error still says what failed underneath.
struct Suffix<'a>(&'a Option<Cause>);

impl fmt::Display for Suffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(cause) => write!(f, ": {cause}"),
            None => Ok(()),
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
        let e = StoreError::corrupt("settings: not JSON");
        assert_eq!(e.to_string(), "store data is corrupt: settings: not JSON");
        assert!(e.source().is_none());
        assert!(!e.retry_may_help());
        assert!(!StoreError::Conflict("taken".into()).retry_may_help());
    }
}
