//! The check-in client: one persistent HTTP/1.1 connection (TLS over TCP) to the control
//! plane, and one call, [`PollClient::checkin`], used by the agent loop and by the load test.
//!
//! Bytes matter on metered links, so a check-in sends only `host` and `content-length` headers
//! and a signed binary body of a few dozen bytes, over a kept-alive connection with
//! TCP_NODELAY (without it every request would stall ~40 ms behind delayed ACKs).
//!
//! * `poll`: [`PollClient`] and its options: the check-in, tunnel request, snapshot upload
//!   and async-mode calls, signed, retried once where that helps (clock skew, a kept-alive
//!   connection found dead, a lost binding).
//! * `connection`: where to connect (worked out once from the join token) and opening the
//!   connection: TCP (optionally from a chosen local address), TLS, the HTTP/1.1 handshake.
//! * `counting`: the stream wrapper that counts socket bytes ([`ByteCounters`]).
//! * `errors`: [`CheckinError`] with its [`RetryClass`], the server's refusal codes, and the
//!   mapping of error answers.

use std::time::Duration;

mod connection;
mod counting;
mod errors;
mod poll;

pub use connection::NewConnection;
pub use counting::{ByteCount, ByteCounters, CountingStream};
pub use errors::{error_from_answer, CheckinError, RefusalCode, RetryClass, SetupError};
pub use poll::{
    agent_info, hostname, AsyncTick, CheckinOutcome, CheckinRoute, PollClient, PollOptions,
};

/// Interval assumed before the server has told us one (the control plane's default).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Slack on top of the interval before a check-in counts as timed out (the server may hold a
/// check-in open for up to one interval).
pub const TIMEOUT_SLACK: Duration = Duration::from_secs(10);
/// Patience for an answer that should come at once (plain check-ins, tunnel requests) grows
/// with the interval up to this: with long intervals (up to an hour) a silently dead
/// connection must not hang the agent as long. Held check-ins are held for up to the whole
/// interval and wait for it plus [`TIMEOUT_SLACK`]: their next one is due then anyway.
pub const MAX_HOLD: Duration = Duration::from_secs(60);
/// A snapshot upload gets this long.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest error body read (they are small JSON objects).
const MAX_ERROR_BODY: usize = 4 * 1024;
