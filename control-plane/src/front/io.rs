//! The API port's stream wrappers: [`Prefixed`] puts back the first request head the front
//! sniffed, [`Timed`] bounds how long a kept-alive connection may take over its next request
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

/// A request head longer than this is not sniffed further (it goes to actix, which refuses
/// it with its own limits).
const SNIFF_LIMIT: usize = 16 * 1024;

/// Reads until the first request's head is complete (or the limit, or EOF). An agent's
/// check-in head arrives in one TLS record, so this is one read in practice.
pub(super) async fn read_request_head<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Bytes> {
    let mut buf = Vec::with_capacity(512);
    loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() >= SNIFF_LIMIT {
            return Ok(Bytes::from(buf));
        }
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            if buf.is_empty() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
            }
            return Ok(Bytes::from(buf));
        }
    }
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
        }
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
        if let Some(due) = this.clock.due() {
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
