//! The API port's first reads and stream wrappers: the first request head (and an agent's
//! body) read by the front, [`Prefixed`] puts them back, [`Timed`] bounds how long a kept-alive connection may take over its next request
//! head ([`HeadClock`]).

use std::cell::Cell;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BodySize, MessageBody};
use bytes::{Buf, Bytes};
use gateway::admission::Ticket;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::budget::{Exhausted, Share};
use crate::error::ApiError;

/// A request head longer than this is not sniffed further (it goes to actix, which refuses
/// it with its own limits).
pub(super) const SNIFF_LIMIT: usize = 16 * 1024;

/// Reads until the first request's head is complete (or the limit, or EOF). An agent's
/// check-in head arrives in one TLS record, so this is one read in practice.
pub(super) async fn read_request_head<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    loop {
        if head_end(&buf).is_some() || buf.len() >= SNIFF_LIMIT {
            return Ok(buf);
        }
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            if buf.is_empty() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
            }
            return Ok(buf);
        }
    }
}

/// Where the request head at the start of `buf` ends (after its blank line).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// A connection's first request head as the front sniffs it (possibly cut short: only the
/// lines that arrived): the request target's path and the header lines. The one parser of
/// the front's routing decisions; actix and hyper parse the request again, strictly.
struct SniffedHead<'a> {
    path: &'a str,
    headers: std::str::Split<'a, &'static str>,
}

impl<'a> SniffedHead<'a> {
    /// `None` when `head` is not UTF-8 or has no request line with a target.
    fn parse(head: &'a [u8]) -> Option<Self> {
        let text = std::str::from_utf8(head).ok()?;
        let mut lines = text.split("\r\n");
        let mut start = lines.next()?.split(' ');
        let (_method, target) = (start.next()?, start.next()?);
        let path = target.split('?').next()?;
        Some(Self {
            path,
            headers: lines,
        })
    }

    /// Header names (trimmed) and values (untrimmed), in order; lines without a colon (the
    /// blank line that ends the head, a line cut short) are skipped.
    fn headers(self) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.headers
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim(), value))
    }
}

/// How many bytes the first request in `buf` takes, head and body, when it goes to an agent
/// route: the front reads that body itself, or refuses it at once as the route would (too
/// large for [`crate::api::body_limit`], chunked). `None` for every other route, and for a
/// head actix refuses on its own (a length that is not a number, two lengths).
///
/// Why: a stalled body held in actix costs a connection ~36 KiB (its dispatcher's two 8 KiB
/// buffers, the request, the handler waiting on the payload) against ~14 KiB for one still
/// sending its head; buffered here it costs what arrived.
pub(super) fn agent_request_len(buf: &[u8]) -> Option<Result<usize, ApiError>> {
    let end = head_end(buf)?;
    let head = SniffedHead::parse(&buf[..end])?;
    let limit = crate::api::body_limit(head.path)?;
    let (mut length, mut chunked) = (None, false);
    for (name, value) in head.headers() {
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = value.trim().parse::<usize>().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
    }
    Some(crate::api::announced_body(limit, length, chunked).map(|body| end + body))
}

/// Whether a connection's first request head (request line and headers, possibly cut) is a
/// Docker hijack: a Docker path with `Connection: Upgrade` and an `Upgrade` header. Only
/// those connections go to hyper; everything else, Docker calls included, is actix's.
pub(super) fn is_docker_hijack(head: &[u8]) -> bool {
    let Some(head) = SniffedHead::parse(head) else {
        return false;
    };
    if crate::docker_proxy::docker_path(head.path).is_none() {
        return false;
    }
    let (mut connection_upgrade, mut upgrade) = (false, false);
    for (name, value) in head.headers() {
        if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    connection_upgrade && upgrade
}

/// Reads on until `buf` holds `len` bytes, or the stream ends (the request is then incomplete
/// and whoever parses it says so). Memory grows with what arrives (doubling, never past
/// `len`), each step charged to `share` (if any: a connection that proved itself has none)
/// before it is allocated; when the budget refuses, an error of kind
/// [`io::ErrorKind::OutOfMemory`]. Each read must come within `idle` of the one
/// before and the whole within `total`; past either, an error of kind
/// [`io::ErrorKind::TimedOut`].
pub(super) async fn read_to_len<R: AsyncRead + Unpin>(
    r: &mut R,
    mut buf: Vec<u8>,
    len: usize,
    share: Option<&Share>,
    idle: Duration,
    total: Duration,
) -> io::Result<Vec<u8>> {
    let stalled = |what: String| io::Error::new(io::ErrorKind::TimedOut, what);
    let refused = |e: Exhausted| io::Error::new(io::ErrorKind::OutOfMemory, e);
    let read = async {
        let charge = |bytes: usize| match share {
            Some(share) => share.grow(bytes, Instant::now()).map_err(refused),
            None => Ok(()),
        };
        charge(buf.capacity())?;
        while buf.len() < len {
            if buf.len() == buf.capacity() {
                let grown = (buf.capacity() * 2).max(4096).min(len);
                charge(grown - buf.capacity())?;
                buf.reserve_exact(grown - buf.len());
            }
            let want = (len - buf.len()) as u64;
            let n = tokio::time::timeout(idle, (&mut *r).take(want).read_buf(&mut buf))
                .await
                .map_err(|_| stalled(format!("stalled for {} s", idle.as_secs())))??;
            if n == 0 {
                break;
            }
        }
        Ok(buf)
    };
    tokio::time::timeout(total, read)
        .await
        .map_err(|_| stalled(format!("not complete within {} s", total.as_secs())))?
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    head: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(head: Bytes, inner: S) -> Self {
        Self { head, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.head.has_remaining() {
            let n = self.head.len().min(buf.remaining());
            buf.put_slice(&self.head[..n]);
            self.head.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

write_through!(Prefixed);

/// When the next request head of a kept-alive connection is due.
///
/// actix's `client_request_timeout` covers a connection's first request only; after that,
/// its keep-alive timer stops at the first byte of the next request, and nothing bounds the
/// rest of that head. A client that completed one request (any anonymous one can: a 404 is
/// enough) could then send one byte, or trickle a head, and hold the connection and its
/// buffer for ever. So: once a request is answered, the next head must be complete within
/// the keep-alive time, and within the head time of its first byte arriving. While a request
/// is served (a held check-in waits minutes) nothing is due.
pub struct HeadClock {
    phase: Cell<Phase>,
    idle: Duration,
    head: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// A request's head is complete and it is being served.
    Serving,
    /// The last request was answered; the next head is due by `due`. `started`: a byte of it
    /// arrived (so `due` is at most the head time after that).
    Waiting { due: Instant, started: bool },
}

impl HeadClock {
    /// A connection whose first head was read already (by the front's sniff): serving.
    pub fn new(idle: Duration, head: Duration) -> Rc<Self> {
        Rc::new(Self {
            phase: Cell::new(Phase::Serving),
            idle,
            head,
        })
    }

    /// A request head is complete: it is being served.
    pub fn serving(&self) {
        self.phase.set(Phase::Serving);
    }

    /// The request served was answered, at `now`.
    pub fn answered(&self, now: Instant) {
        self.phase.set(Phase::Waiting {
            due: now + self.idle,
            started: false,
        });
    }

    /// Bytes arrived at `now`: the first ones after an answer start the head's own clock.
    fn bytes_arrived(&self, now: Instant) {
        if let Phase::Waiting {
            due,
            started: false,
        } = self.phase.get()
        {
            self.phase.set(Phase::Waiting {
                due: due.min(now + self.head),
                started: true,
            });
        }
    }

    fn due(&self) -> Option<Instant> {
        match self.phase.get() {
            Phase::Serving => None,
            Phase::Waiting { due, .. } => Some(due),
        }
    }
}

/// A response body that tells its connection's [`HeadClock`] the request is answered when it
/// is dropped: written out in full, or abandoned with the connection.
pub struct Answered {
    body: actix_web::body::BoxBody,
    clock: Option<Rc<HeadClock>>,
}

impl Answered {
    pub fn new<B: MessageBody + 'static>(body: B, clock: Option<Rc<HeadClock>>) -> Self {
        Self {
            body: body.boxed(),
            clock,
        }
    }
}

impl Drop for Answered {
    fn drop(&mut self) {
        if let Some(clock) = &self.clock {
            clock.answered(Instant::now());
        }
    }
}

impl MessageBody for Answered {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.body).poll_next(cx)
    }
}

/// A stream whose reads fail (`TimedOut`, so actix closes the connection) once its
/// [`HeadClock`] says the next request head is overdue.
/// It also carries the connection's admission ticket, which the first request that proves
/// itself (an admin key, an agent's proof) marks.
pub struct Timed<S> {
    inner: S,
    clock: Rc<HeadClock>,
    ticket: Arc<Ticket>,
    /// While the ticket is pending: completes if it is let go for a newer connection.
    evicted: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    sleep: Option<Pin<Box<Sleep>>>,
    on_timeout: prometheus::IntCounter,
    /// Completes when the server stops: a connection waiting for its next request head ends
    /// then (one being served finishes first; its answer says `connection: close`). Polled on
    /// every read, whatever the phase, so that its waker is in place when it fires.
    stopping: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    stopped: bool,
}

impl<S> Timed<S> {
    pub fn new(
        inner: S,
        clock: Rc<HeadClock>,
        ticket: Arc<Ticket>,
        on_timeout: prometheus::IntCounter,
    ) -> Self {
        let evicted = ticket
            .is_pending()
            .then(|| Box::pin(ticket.evicted_owned()));
        Self {
            inner,
            clock,
            ticket,
            evicted,
            sleep: None,
            on_timeout,
            stopping: None,
            stopped: false,
        }
    }

    /// Ends the connection between requests once `stopping` is cancelled (the server stops:
    /// kept-alive admin connections go at once instead of after the stop's grace).
    pub fn until(mut self, stopping: &tokio_util::sync::CancellationToken) -> Self {
        self.stopping = Some(Box::pin(stopping.clone().cancelled_owned()));
        self
    }

    pub fn clock(&self) -> &Rc<HeadClock> {
        &self.clock
    }

    pub fn ticket(&self) -> &Arc<Ticket> {
        &self.ticket
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Timed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(evicted) = &mut this.evicted {
            // (An evicted ticket is no longer pending either: look at the eviction first.)
            if evicted.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "let go, still unproved, for a newer connection",
                )));
            }
            if !this.ticket.is_pending() {
                // Proved: it can no longer be let go.
                this.evicted = None;
            }
        }
        if let Some(stopping) = &mut this.stopping {
            if stopping.as_mut().poll(cx).is_ready() {
                this.stopping = None;
                this.stopped = true;
            }
        }
        if let Some(due) = this.clock.due() {
            if this.stopped {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the server is stopping",
                )));
            }
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if sleep.deadline() != due {
                sleep.as_mut().reset(due);
            }
            if sleep.as_mut().poll(cx).is_ready() {
                this.on_timeout.inc();
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the next request head did not arrive in time",
                )));
            }
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.bytes_arrived(Instant::now());
        }
        read
    }
}

write_through!(Timed);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    /// A share of a budget that never refuses.
    fn share() -> Share {
        super::super::budget::budget(usize::MAX).share(Instant::now())
    }

    #[test]
    fn only_a_docker_path_with_both_upgrade_headers_is_a_hijack() {
        assert!(is_docker_hijack(
            b"POST /api/endpoints/12/docker/v1.41/exec/abc/start HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
        ));
        // Cut short after its headers, and a token list.
        assert!(is_docker_hijack(
            b"POST /api/endpoints/1/docker/containers/x/attach?stream=1 HTTP/1.1\r\nconnection: keep-alive, upgrade\r\nupgrade: tcp"
        ));
        assert!(!is_docker_hijack(
            b"GET /api/endpoints/12/docker/_ping?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"
        ));
        assert!(!is_docker_hijack(
            b"POST /api/endpoints/12/docker/exec/abc/start HTTP/1.1\r\nConnection: Upgrade\r\n\r\n"
        ));
        assert!(!is_docker_hijack(
            b"POST /edge/c HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
        ));
        assert!(!is_docker_hijack(b"garbage"));
        assert!(!is_docker_hijack(b""));
        assert!(!is_docker_hijack(
            b"\xff\xfe /api/endpoints/1/docker HTTP/1.1\r\n"
        ));
    }

    #[test]
    fn the_front_reads_an_agent_body_announced_within_its_route_limit_and_refuses_the_rest() {
        let req = |target: &str, headers: &str| {
            format!("POST {target} HTTP/1.1\r\nHost: x\r\n{headers}\r\n")
        };
        let c = proto::wire::CHECKIN_PATH;
        let len = |r: &str| agent_request_len(r.as_bytes()).map(|r| r.map_err(|e| e.status()));
        let r = req(c, "Content-Length: 100\r\n");
        assert_eq!(len(&r), Some(Ok(r.len() + 100)));
        // Case and spaces as HTTP allows; a query; the same length twice.
        let r = req(
            &format!("{c}?x=1"),
            "content-length:  100 \r\nCONTENT-LENGTH: 100\r\n",
        );
        assert_eq!(len(&r), Some(Ok(r.len() + 100)));
        // Over the route's limit (a check-in's is 16 KiB, a snapshot's 1 MiB).
        let big = format!(
            "Content-Length: {}\r\n",
            proto::codec::MAX_CONTROL_FRAME + 1
        );
        assert_eq!(len(&req(c, &big)), Some(Err(413)));
        let r = req(proto::snapshot::SNAPSHOT_PATH, &big);
        assert_eq!(
            len(&r),
            Some(Ok(r.len() + proto::codec::MAX_CONTROL_FRAME + 1))
        );
        // No length: an empty body. Chunked, even with a length: 411.
        let r = req(c, "");
        assert_eq!(len(&r), Some(Ok(r.len())));
        for headers in [
            "Transfer-Encoding: chunked\r\n",
            "Content-Length: 10\r\nTransfer-Encoding: chunked\r\n",
        ] {
            assert_eq!(len(&req(c, headers)), Some(Err(411)), "{headers:?}");
        }
        // Not an agent route, a length that is not a number or two of them (actix answers
        // 400), no head end yet, not text: not the front's to read.
        for (target, headers) in [
            ("/api/endpoints", "Content-Length: 100\r\n"),
            (c, "Content-Length: -1\r\n"),
            (c, "Content-Length: 100\r\nContent-Length: 101\r\n"),
        ] {
            assert_eq!(len(&req(target, headers)), None, "{target} {headers:?}");
        }
        assert_eq!(len("POST /edge/c HTTP/1.1\r\nContent-Length: 1\r\n"), None);
        assert!(agent_request_len(&[0xff, b'\r', b'\n', b'\r', b'\n']).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_body_is_read_as_it_arrives_within_its_deadlines() {
        let (idle, total) = (Duration::from_secs(10), Duration::from_secs(300));
        // Arrives in pieces: read to the length and not a byte further (the next request).
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for piece in [&b"abc"[..], b"defg", b"hij-next request"] {
                tokio::time::sleep(Duration::from_secs(9)).await;
                client.write_all(piece).await.unwrap();
            }
            client
        });
        let got = read_to_len(
            &mut server,
            b"head".to_vec(),
            14,
            Some(&share()),
            idle,
            total,
        )
        .await
        .unwrap();
        assert_eq!(got, b"headabcdefghij");
        let mut rest = [0u8; 13];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"-next request");
        drop(writer.await.unwrap());

        // Stalls: let go at the idle deadline, with what arrived dropped.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"ab").await.unwrap();
        let t0 = Instant::now();
        let e = read_to_len(&mut server, Vec::new(), 10, Some(&share()), idle, total)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t0.elapsed(), idle);
        assert!(e.to_string().contains("stalled for 10 s"), "{e}");

        // Trickles, each byte in time: let go at the total deadline.
        let (mut client, mut server) = tokio::io::duplex(64);
        let trickle = tokio::spawn(async move {
            while client.write_all(b"x").await.is_ok() {
                tokio::time::sleep(Duration::from_secs(9)).await;
            }
        });
        let t0 = Instant::now();
        let e = read_to_len(&mut server, Vec::new(), 1000, Some(&share()), idle, total)
            .await
            .unwrap_err();
        assert_eq!(t0.elapsed(), total);
        assert!(e.to_string().contains("not complete within 300 s"), "{e}");
        drop(server);
        trickle.await.unwrap();

        // Ends early: what arrived, for the parser to refuse.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"ab").await.unwrap();
        drop(client);
        let got = read_to_len(&mut server, Vec::new(), 10, Some(&share()), idle, total)
            .await
            .unwrap();
        assert_eq!(got, b"ab");

        // Over its budget: refused before the buffer grows past it, charged as it grows.
        let (mut client, mut server) = tokio::io::duplex(64);
        let budget = super::super::budget::budget(8192);
        let share = budget.share(Instant::now());
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&[7u8; 20_000]).await;
        });
        let e = read_to_len(&mut server, Vec::new(), 20_000, Some(&share), idle, total)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::OutOfMemory, "{e}");
        assert_eq!(budget.used(), 8192, "4 KiB, then 8; 16 refused");
        drop((server, share));
        assert_eq!(budget.used(), 0);
        writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_after_an_answer_is_due_by_the_sooner_of_its_two_clocks() {
        let clock = HeadClock::new(Duration::from_secs(120), Duration::from_secs(10));
        assert_eq!(clock.due(), None, "the first request is being served");
        let t0 = Instant::now();
        clock.answered(t0);
        assert_eq!(clock.due(), Some(t0 + Duration::from_secs(120)));
        // A first byte 30 s later: ten more seconds for the rest of the head.
        let t1 = t0 + Duration::from_secs(30);
        clock.bytes_arrived(t1);
        assert_eq!(clock.due(), Some(t1 + Duration::from_secs(10)));
        // More bytes do not move it.
        clock.bytes_arrived(t1 + Duration::from_secs(5));
        assert_eq!(clock.due(), Some(t1 + Duration::from_secs(10)));
        // Complete: served without a deadline, however long.
        clock.serving();
        assert_eq!(clock.due(), None);
        clock.bytes_arrived(t1 + Duration::from_secs(500));
        assert_eq!(clock.due(), None);
        // A first byte just before the keep-alive ends gets no more than the keep-alive.
        let t2 = t1 + Duration::from_secs(600);
        clock.answered(t2);
        clock.bytes_arrived(t2 + Duration::from_secs(115));
        assert_eq!(clock.due(), Some(t2 + Duration::from_secs(120)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_is_answered_when_its_body_is_gone() {
        let clock = HeadClock::new(Duration::from_secs(120), Duration::from_secs(10));
        // A streaming answer (a Docker log) keeps the connection serving while it runs...
        let body = Answered::new(Bytes::from_static(b"log line"), Some(Rc::clone(&clock)));
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.due(), None);
        // ... and its end starts the wait for the next head.
        drop(body);
        assert_eq!(clock.due(), Some(Instant::now() + Duration::from_secs(120)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_a_connection_between_requests_not_one_being_served() {
        let (mut client, server) = tokio::io::duplex(64);
        let clock = HeadClock::new(Duration::from_secs(120), Duration::from_secs(10));
        let counter = prometheus::IntCounter::new("t", "t").expect("counter");
        let admission = gateway::admission::Admission::new(
            gateway::admission::AdmissionLimits::with_totals(10, None),
        );
        let ticket = Arc::new(admission.admit([127, 0, 0, 1].into()).expect("admitted"));
        let stopping = tokio_util::sync::CancellationToken::new();
        let mut timed = Timed::new(server, Rc::clone(&clock), ticket, counter).until(&stopping);
        let mut buf = [0u8; 64];
        // Being served (a held check-in, a log stream): the stop does not cut it.
        let stop_then_write = async {
            tokio::task::yield_now().await;
            stopping.cancel();
            client.write_all(b"more").await.expect("write");
        };
        let (got, ()) = tokio::join!(timed.read(&mut buf), stop_then_write);
        assert_eq!(&buf[..got.expect("read while serving")], b"more");
        // Answered: the next read fails at once, whatever the keep-alive says.
        clock.answered(Instant::now());
        let err = timed.read(&mut [0u8; 8]).await.expect_err("stopping");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test(start_paused = true)]
    async fn an_overdue_head_fails_the_read_and_is_counted() {
        let (client, server) = tokio::io::duplex(64);
        let clock = HeadClock::new(Duration::from_secs(120), Duration::from_secs(10));
        let counter = prometheus::IntCounter::new("t", "t").expect("counter");
        let admission = gateway::admission::Admission::new(
            gateway::admission::AdmissionLimits::with_totals(10, None),
        );
        let ticket = Arc::new(admission.admit([127, 0, 0, 1].into()).expect("admitted"));
        let mut timed = Timed::new(server, Rc::clone(&clock), ticket, counter.clone());
        clock.answered(Instant::now());
        let mut client = client;
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HT")
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        let n = timed.read(&mut buf).await.expect("the first bytes");
        assert_eq!(&buf[..n], b"GET / HT");
        // Nothing more: the read fails ten seconds after the first byte.
        let start = Instant::now();
        let err = timed.read(&mut buf).await.expect_err("overdue");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(counter.get(), 1);
    }
}
