//! The agent lane: a connection whose first request goes to an agent route (`/edge/*`) is
//! served here, without actix, for as long as it carries agent requests.
//!
//! Why: an agent keeps one connection for its whole life and has a check-in pending on it
//! almost all the time (held for up to its interval). Served by actix, each such connection
//! held two 8 KiB dispatcher buffers, the request with its header map and the handler's
//! future: about two thirds of a held agent's memory (`docs/benchmarks.md`). Here a held
//! connection holds its TLS state, the check-in's own future and nothing else: the request is
//! parsed from a buffer that is given back as soon as it is empty, and the answer is written
//! from a few bytes.
//!
//! What it serves is what `api::agent` serves for actix too ([`crate::api::serve_agent`]),
//! byte for byte the same answers. A request for any other route hands the connection back
//! to the front with what was read ([`LaneEnd::Handoff`]), and actix or hyper serve it from
//! there; so does anything this strict parser does not take (HTTP/1.0, `Expect`, a method
//! other than `POST`, a malformed head), and actix answers it as before.
//!
//! Deadlines are the front's: after an answer the next head must start within the keep-alive
//! time and be complete within the head time of its first byte; each read of a body within
//! the agent body time, the whole within [`AGENT_BODY_TOTAL`]. While a request is served the
//! lane watches the connection: an agent that goes away takes its held check-in with it at
//! once, instead of leaving it held for the rest of the interval.

use std::cell::RefCell;
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::web;
use bytes::Bytes;
use gateway::admission::Ticket;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::time::Instant;

use super::Deadlines;
use crate::api::{AgentAnswer, AgentRoute, AppState, AGENT_BODY_TOTAL};
use crate::error::ApiError;

/// A head longer than this is not the lane's (actix refuses it with its own limits).
const MAX_HEAD: usize = super::io::SNIFF_LIMIT;
/// Header lines the lane parses; an agent sends two (`host`, `content-length`).
const MAX_HEADERS: usize = 32;
/// Read room reserved for the next request head: a check-in (head and body) is ~100 bytes.
const HEAD_RESERVE: usize = 256;
/// A buffer larger than this is given back once the request in it was served (an upload).
const KEEP_CAPACITY: usize = 4096;

/// What the lane needs, shared by a worker's connections.
pub(super) struct Lane {
    pub state: web::Data<AppState>,
    pub deadlines: Deadlines,
    pub timed_out: prometheus::IntCounterVec,
    /// The server is stopping: a held check-in is answered at once (`204`, nothing new) and
    /// every connection closed after its answer, so a restart takes a moment instead of the
    /// longest hold, and the agents, answered, come back on their own schedules (spread over
    /// an interval) instead of all at once after an error.
    pub stopping: tokio_util::sync::CancellationToken,
}

/// How a connection left the lane.
#[derive(Debug)]
pub(super) enum LaneEnd<S> {
    /// Closed: by the peer, after an answer with `connection: close`, or at a deadline.
    Closed,
    /// A request the lane does not serve arrived: the front hands the connection to actix or
    /// hyper with these bytes (that request and whatever followed it) in front.
    Handoff(S, Vec<u8>),
}

/// The request at the start of a buffer, as the lane sees it.
#[derive(Debug)]
enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// An agent request: its route, the head's length, the body's length, and whether the
    /// client asked to close after it.
    Agent {
        route: AgentRoute,
        head: usize,
        body: usize,
        close: bool,
    },
    /// Refused as the route would refuse it (chunked, too large): answered, then closed.
    Refused(ApiError),
    /// Not the lane's: actix (or hyper) serves it.
    Other,
}

/// Parses the request at the start of `buf` (strictly: `httparse`).
fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        // Too long, too many headers, malformed: actix answers it as it always did.
        Ok(httparse::Status::Partial) | Err(_) => return Parsed::Other,
    };
    let (Some("POST"), Some(1), Some(target)) = (req.method, req.version, req.path) else {
        return Parsed::Other;
    };
    let Some(route) = AgentRoute::of(target.split('?').next().unwrap_or(target)) else {
        return Parsed::Other;
    };
    let (mut length, mut chunked, mut close) = (None, false, false);
    for h in req.headers.iter() {
        let value = || std::str::from_utf8(h.value).ok().map(str::trim);
        if h.name.eq_ignore_ascii_case("content-length") {
            let Some(n) = value().and_then(|v| v.parse::<usize>().ok()) else {
                return Parsed::Other;
            };
            if length.is_some_and(|l| l != n) {
                return Parsed::Other;
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= value()
                .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        } else if h.name.eq_ignore_ascii_case("expect") || h.name.eq_ignore_ascii_case("upgrade") {
            return Parsed::Other;
        }
    }
    match crate::api::announced_body(route.body_limit(), length, chunked) {
        Ok(body) => Parsed::Agent {
            route,
            head,
            body,
            close,
        },
        Err(e) => Parsed::Refused(e),
    }
}

/// Serves agent requests on `io`, starting with the one at the start of `buf` (its head,
/// and its body when the front read it), until the connection closes or carries a request
/// for another route.
pub(super) async fn serve<S>(
    mut io: S,
    mut buf: Vec<u8>,
    lane: &Lane,
    ticket: &Ticket,
) -> LaneEnd<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let d = lane.deadlines;
    let timed_out = |stage: &str| lane.timed_out.with_label_values(&[stage]).inc();
    loop {
        // The head: at once for the first request (the front read it); after an answer, it
        // must start within the keep-alive time and end within the head time of its start.
        let mut due = Instant::now() + d.keep_alive;
        let mut started = false;
        let (route, head, body, close) = loop {
            match parse(&buf) {
                Parsed::Agent {
                    route,
                    head,
                    body,
                    close,
                } => break (route, head, body, close),
                Parsed::Other => return LaneEnd::Handoff(io, buf),
                Parsed::Refused(e) => {
                    Box::pin(answer_and_close(&mut io, &Err(e))).await;
                    return LaneEnd::Closed;
                }
                Parsed::Partial => {}
            }
            if !started && !buf.is_empty() {
                started = true;
                due = due.min(Instant::now() + d.first_request);
            }
            if buf.capacity() - buf.len() < HEAD_RESERVE / 2 {
                buf.reserve(HEAD_RESERVE);
            }
            let read = tokio::select! {
                () = lane.stopping.cancelled(), if buf.is_empty() => return LaneEnd::Closed,
                r = tokio::time::timeout_at(due, io.read_buf(&mut buf)) => r,
            };
            match read {
                Ok(Ok(0) | Err(_)) => return LaneEnd::Closed,
                Ok(Ok(_)) => {}
                Err(_) => {
                    timed_out("next_request");
                    return LaneEnd::Closed;
                }
            }
        };
        // The body (already in, as a rule: it comes with its head): each read within the body
        // time, the whole within its total.
        let whole = head + body;
        if buf.len() < whole {
            let read = Box::pin(super::io::read_to_len(
                &mut io,
                std::mem::take(&mut buf),
                whole,
                None,
                d.agent_body,
                AGENT_BODY_TOTAL,
            ));
            match read.await {
                Ok(whole_read) if whole_read.len() == whole => buf = whole_read,
                Ok(_) => return LaneEnd::Closed,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    timed_out("agent_body");
                    let why = ApiError::RequestTimeout(format!("agent request body {e}"));
                    Box::pin(answer_and_close(&mut io, &Err(why))).await;
                    return LaneEnd::Closed;
                }
                Err(_) => return LaneEnd::Closed,
            }
        }
        let frame = Bytes::copy_from_slice(&buf[head..whole]);
        buf.drain(..whole);
        if buf.is_empty() {
            // Nothing pipelined (an agent never pipelines): hold no buffer while served.
            buf = Vec::new();
        } else if buf.capacity() > KEEP_CAPACITY {
            buf.shrink_to(KEEP_CAPACITY);
        }

        let answer = serve_watching(&mut io, &mut buf, lane, ticket, route, frame).await;
        let Some(answer) = answer else {
            return LaneEnd::Closed;
        };
        // A connection whose request proved nothing gets no other answer (as on actix).
        let last =
            close || ticket.is_pending() || matches!(&answer, Err(e) if e.closes_connection());
        if last {
            Box::pin(answer_and_close(&mut io, &answer)).await;
            return LaneEnd::Closed;
        }
        if write_answer(&mut io, &answer, false).await.is_err() {
            return LaneEnd::Closed;
        }
    }
}

/// Serves one request while watching the connection: `None` when the peer went away (or
/// was let go, still unproved) before the answer. Bytes that arrive meanwhile (a pipelined
/// request) are kept in `buf` for later.
async fn serve_watching<S>(
    io: &mut S,
    buf: &mut Vec<u8>,
    lane: &Lane,
    ticket: &Ticket,
    route: AgentRoute,
    frame: Bytes,
) -> Option<Result<AgentAnswer, ApiError>>
where
    S: AsyncRead + Unpin,
{
    // Boxed (by the route): allocated for the request's life only.
    let mut answer = crate::api::serve_agent(&lane.state, route, frame, || ticket.proved());
    // With bytes already waiting, or room left by a read that filled the buffer, the peer is
    // not watched (TLS may hold more): this answer comes when it comes.
    let mut watching = buf.is_empty();
    // (On a connection that proved itself: an unproved one is only let go.)
    let held = route == AgentRoute::Held;
    loop {
        tokio::select! {
            biased;
            a = &mut answer => return Some(a),
            () = ticket.evicted(), if ticket.is_pending() => return None,
            // Stopping: a held check-in's answer is nothing new, now.
            () = lane.stopping.cancelled(), if held => {
                return (!ticket.is_pending()).then_some(Ok(AgentAnswer::NoContent));
            }
            r = io.read_buf(buf), if watching => match r {
                Ok(0) | Err(_) => return None,
                Ok(_) => watching = false,
            },
        }
    }
}

/// Writes `answer` with `connection: close`, shuts the connection down and lingers while
/// the peer still sends (closing on unread bytes resets the connection, and the peer may
/// lose the answer): a second in all.
pub(super) async fn answer_and_close<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    answer: &Result<AgentAnswer, ApiError>,
) {
    let write = async {
        write_answer(io, answer, true).await?;
        io.shutdown().await?;
        let mut sink = [0u8; 512];
        while io.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

async fn write_answer<S: AsyncWrite + Unpin>(
    io: &mut S,
    answer: &Result<AgentAnswer, ApiError>,
    close: bool,
) -> io::Result<()> {
    let bytes = with_http_date(|date| render(answer, close, date));
    io.write_all(&bytes).await?;
    io.flush().await
}

/// The answer's bytes, as actix writes them for the same routes: an empty reason phrase
/// for `204` and `200` (every byte is metered), `date` (RFC 9110 asks for it), JSON errors
/// with their `retry-after`.
fn render(answer: &Result<AgentAnswer, ApiError>, close: bool, date: &str) -> Vec<u8> {
    use std::fmt::Write as _;
    let error_body;
    let (status, reason, body, error): (u16, &str, &[u8], _) = match answer {
        Ok(AgentAnswer::NoContent) => (204, "", &[], None),
        Ok(AgentAnswer::Body(b)) => (200, "", b, None),
        Err(e) => {
            error_body = e.body();
            let reason = actix_web::http::StatusCode::from_u16(e.status())
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            (e.status(), reason, error_body.as_bytes(), Some(e))
        }
    };
    let mut head = String::with_capacity(128);
    let _ = write!(head, "HTTP/1.1 {status} {reason}\r\n");
    if status != 204 {
        let _ = write!(head, "content-length: {}\r\n", body.len());
    }
    if let Some(e) = error {
        head.push_str("content-type: application/json\r\n");
        if let Some(s) = e.retry_after() {
            let _ = write!(head, "retry-after: {s}\r\n");
        }
    }
    if close {
        head.push_str("connection: close\r\n");
    }
    let _ = write!(head, "date: {date}\r\n\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Runs `f` with `date` in HTTP's format, formatted once a second per thread.
fn with_http_date<R>(f: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        f(&d.1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(buf: &[u8]) -> (AgentRoute, usize, usize, bool) {
        match parse(buf) {
            Parsed::Agent {
                route,
                head,
                body,
                close,
            } => (route, head, body, close),
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn agent_requests_are_parsed_strictly_and_the_rest_is_handed_over() {
        let head = "POST /edge/h HTTP/1.1\r\nhost: cp\r\ncontent-length: 23\r\n\r\n";
        assert_eq!(
            agent(head.as_bytes()),
            (AgentRoute::Held, head.len(), 23, false)
        );
        // With its body and the next request behind it: the head's length is the head's.
        let two = format!("{head}{}{head}", "x".repeat(23));
        assert_eq!(agent(two.as_bytes()).1, head.len());
        // A query, header case, a token list asking to close, no length (an empty body).
        let r = "POST /edge/c?x=1 HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n";
        assert_eq!(agent(r.as_bytes()), (AgentRoute::Checkin, r.len(), 0, true));
        for (path, route) in [
            ("/edge/t", AgentRoute::Tunnel),
            ("/edge/s", AgentRoute::Snapshot),
            ("/edge/a", AgentRoute::Async),
        ] {
            let r = format!("POST {path} HTTP/1.1\r\ncontent-length: 5\r\n\r\n");
            assert_eq!(agent(r.as_bytes()).0, route);
        }
        // Cut short: more to read (a head longer than the limit is not the lane's).
        assert!(matches!(
            parse(b"POST /edge/c HTTP/1.1\r\nhos"),
            Parsed::Partial
        ));
        assert!(matches!(parse(b""), Parsed::Partial));
        let long = format!("POST /edge/c HTTP/1.1\r\nx: {}", "a".repeat(MAX_HEAD));
        assert!(matches!(parse(long.as_bytes()), Parsed::Other));
        // Refused as the route would: chunked (411), over the route's limit (413).
        let chunked = "POST /edge/c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(matches!(parse(chunked.as_bytes()), Parsed::Refused(e) if e.status() == 411));
        let big = format!(
            "POST /edge/c HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
            proto::codec::MAX_CONTROL_FRAME + 1
        );
        assert!(matches!(parse(big.as_bytes()), Parsed::Refused(e) if e.status() == 413));
        // Actix's (or hyper's): other routes and methods, HTTP/1.0, `Expect`, an upgrade,
        // lengths that are not one number, garbage.
        for other in [
            "GET /api/endpoints HTTP/1.1\r\n\r\n",
            "POST /api/endpoints HTTP/1.1\r\ncontent-length: 2\r\n\r\n",
            "GET /edge/c HTTP/1.1\r\n\r\n",
            "POST /edge/c HTTP/1.0\r\ncontent-length: 2\r\n\r\n",
            "POST /edge/c HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n",
            "POST /edge/c HTTP/1.1\r\nupgrade: tcp\r\n\r\n",
            "POST /edge/c HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
            "POST /edge/c HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
            "POST /edge/c\r\n\r\n",
            "\u{1}\u{2}\u{3}\r\n\r\n",
        ] {
            assert!(
                matches!(parse(other.as_bytes()), Parsed::Other),
                "{other:?}"
            );
        }
    }

    #[test]
    fn answers_are_written_as_actix_writes_them() {
        let date = "Sun, 06 Dec 2026 08:00:00 GMT";
        let text = |a, close| String::from_utf8(render(&a, close, date)).unwrap();
        assert_eq!(
            text(Ok(AgentAnswer::NoContent), false),
            format!("HTTP/1.1 204 \r\ndate: {date}\r\n\r\n")
        );
        assert_eq!(
            text(Ok(AgentAnswer::Body(b"abc".to_vec())), true),
            format!("HTTP/1.1 200 \r\ncontent-length: 3\r\nconnection: close\r\ndate: {date}\r\n\r\nabc")
        );
        let busy = ApiError::Unavailable("later".into());
        let body = busy.body();
        assert_eq!(
            text(Err(busy), false),
            format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\ncontent-type: \
                 application/json\r\nretry-after: 1\r\ndate: {date}\r\n\r\n{body}",
                body.len()
            )
        );
        // The date of this second, as HTTP writes it.
        let now = with_http_date(str::to_owned);
        assert!(httpdate::parse_http_date(&now).is_ok(), "{now}");
    }
}
