//! Tunnel sessions: yamux over one connection, driven by one task, with bounded queues; tunnel
//! frames read and written with size limits; and the control stream's liveness check.
//!
//! Used alike by the agent (yamux server: it accepts the Docker streams), the gateways and the
//! embedded gateway of the control plane (yamux client: they open them), and the control
//! plane's dial sessions to separate gateways.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub use yamux::Mode;

use crate::tunnel::{
    decode_body, encode_frame, frame_len, CloseReason, Control, FrameError, DEAD_AFTER,
    PING_INTERVAL,
};

/// One multiplexed stream, as a tokio byte pipe. yamux announces a new stream with its first
/// frame, so **the side that opens a stream must write first**; the peer does not see it
/// before.
///
/// It also ends when its session ends: yamux 0.14 does not wake a stream's pending reader or
/// writer when the connection is closed locally (`Connection::poll_close` drops the stream
/// table without marking the streams closed), so a stream of a session this process closed
/// would wait forever. Once the session is over and the stream has nothing more to give,
/// reads see EOF and writes a broken pipe.
pub struct MuxStream {
    inner: Compat<yamux::Stream>,
    session_end: Pin<Box<WaitForCancellationFutureOwned>>,
    session_ended: bool,
}

impl MuxStream {
    fn new(stream: yamux::Stream, done: &CancellationToken) -> Self {
        Self {
            inner: stream.compat(),
            session_end: Box::pin(done.clone().cancelled_owned()),
            session_ended: false,
        }
    }

    fn session_ended(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.session_ended && self.session_end.as_mut().poll(cx).is_ready() {
            self.session_ended = true;
        }
        self.session_ended
    }
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxStream")
            .field("session_ended", &self.session_ended)
            .finish_non_exhaustive()
    }
}

fn session_closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the tunnel session closed")
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending if this.session_ended(cx) => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending if this.session_ended(cx) => Poll::Ready(Err(session_closed())),
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending if this.session_ended(cx) => Poll::Ready(Err(session_closed())),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending if this.session_ended(cx) => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

/// Streams one session may carry at once (each may buffer up to a 256 KiB window, grown by
/// yamux's auto-tuning within the connection-wide limit below).
pub const MAX_STREAMS: usize = 256;
/// Upper bound of all receive windows of one session together.
const MAX_CONNECTION_WINDOW: usize = 256 * 1024 * MAX_STREAMS;
/// Largest frame body this side sends. yamux's default is 16 KiB, and its reader allocates
/// each body zeroed (`vec![0; len]`): at 16 KiB that is jemalloc's smallest large size class,
/// zeroed by returning the pages to the kernel (`madvise`, with a TLB shootdown across the
/// process's threads) and faulting them back in on the copy: a sixth of the control plane's
/// CPU in a bulk download through a tunnel. 14 KiB is its largest small size class, taken from
/// a slab and zeroed by `memset`; a frame and its header also fit one TLS record.
pub const FRAME_BODY: usize = 14 * 1024;
/// Accepted streams waiting for the application; more are refused (reset) at once.
const INBOUND_QUEUE: usize = 64;
/// Open requests waiting for the driver.
const OPEN_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error("tunnel session is closed")]
    Closed,
    #[error("tunnel session is busy (too many pending stream opens)")]
    Busy,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    #[error("connection closed")]
    Eof,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads one tunnel frame: the 2-byte length is checked against the limit before the body is
/// read or allocated.
pub async fn read_frame<R, T>(r: &mut R) -> Result<T, ReadFrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut prefix = [0u8; 2];
    r.read_exact(&mut prefix).await.map_err(eof)?;
    let len = frame_len(prefix)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(eof)?;
    Ok(decode_body(&body)?)
}

fn eof(e: io::Error) -> ReadFrameError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ReadFrameError::Eof
    } else {
        ReadFrameError::Io(e)
    }
}

/// Writes one tunnel frame and flushes it.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = encode_frame(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    w.write_all(&frame).await?;
    w.flush().await
}

type OpenRequest = oneshot::Sender<Result<MuxStream, MuxError>>;

/// Opens streams on a session; cheap to clone.
#[derive(Clone, Debug)]
pub struct Opener {
    requests: mpsc::Sender<OpenRequest>,
    close: CancellationToken,
    done: CancellationToken,
}

impl Opener {
    /// Opens a new outbound stream.
    pub async fn open(&self) -> Result<MuxStream, MuxError> {
        let (tx, rx) = oneshot::channel();
        self.requests.try_send(tx).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => MuxError::Busy,
            mpsc::error::TrySendError::Closed(_) => MuxError::Closed,
        })?;
        rx.await.map_err(|_| MuxError::Closed)?
    }

    /// Asks the driver to close the session (a yamux GoAway, then the connection).
    pub fn close(&self) {
        self.close.cancel();
    }

    /// Completes once the session has ended, for whatever reason.
    pub async fn closed(&self) {
        self.done.cancelled().await;
    }

    pub fn is_closed(&self) -> bool {
        self.done.is_cancelled()
    }
}

/// A running session: open streams through [`Session::opener`], accept the peer's streams
/// from [`Session::inbound`].
pub struct Session {
    pub opener: Opener,
    pub inbound: Inbound,
}

/// The peer's streams, in the order they were opened.
///
/// Queued boxed: tokio's channel allocates its slots in blocks of 32 up front, and a gateway
/// keeps this queue for a tunnel's whole life while taking only the control stream from it;
/// 32 pointers instead of 32 streams saves ~3.6 KiB per tunnel.
#[derive(Debug)]
pub struct Inbound(mpsc::Receiver<Box<MuxStream>>);

impl Inbound {
    /// The next stream the peer opened; `None` once the session has ended.
    pub async fn recv(&mut self) -> Option<MuxStream> {
        self.0.recv().await.map(|s| *s)
    }
}

/// Like [`spawn`], with a write buffer of `capacity` bytes between yamux and `io`.
///
/// yamux writes a frame's 12-byte header and its body separately, and flushes after every
/// frame; over TLS that is two records and two `write`s per frame. Buffered, with yamux's
/// flushes put off until it has nothing more to do ([`Deferred`]), the frames of one turn of
/// the session leave together: a bulk answer in writes of `capacity` instead of one per
/// frame. The agent uses it for its one tunnel. Not for gateways: the buffer is allocated for
/// the session's life.
pub fn spawn_buffered<T>(io: T, mode: Mode, capacity: usize) -> Session
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, flush) = Deferred::new(tokio::io::BufWriter::with_capacity(capacity, io));
    start(io, mode, Some(flush))
}

/// Like [`spawn`], with a write buffer that exists only while it holds bytes
/// ([`Coalesce`]): a frame's header and body, and frames yamux writes in a row, leave as one
/// TLS record and one `write`, and an idle session keeps no buffer. For gateways, which hold
/// many idle tunnels.
pub fn spawn_coalescing<T>(io: T, mode: Mode, capacity: usize) -> Session
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, flush) = Deferred::new(Coalesce::new(io, capacity));
    start(io, mode, Some(flush))
}

/// The session driver's flush of a [`Deferred`] buffer: ready with whether yamux should get
/// another turn (a write was refused since the last flush).
type Flush = Box<dyn FnMut(&mut Context<'_>) -> Poll<io::Result<bool>> + Send>;

/// A write buffer shared by yamux, which writes into it and whose flushes do nothing, and by
/// the session's driver, which flushes it once yamux has nothing more to do (see [`drive`]).
/// Both use it from the driver's task, one after the other.
struct Deferred<W>(Arc<parking_lot::Mutex<Shared<W>>>);

struct Shared<W> {
    inner: W,
    /// A write was refused (the buffer full, the socket too): yamux holds on to that frame
    /// until it is polled again.
    refused: bool,
}

impl<W: AsyncWrite + Unpin + Send + 'static> Deferred<W> {
    fn new(inner: W) -> (Self, Flush) {
        let shared = Arc::new(parking_lot::Mutex::new(Shared {
            inner,
            refused: false,
        }));
        let mine = Arc::clone(&shared);
        let flush: Flush = Box::new(move |cx| {
            let mut s = mine.lock();
            let flushed = Pin::new(&mut s.inner).poll_flush(cx);
            flushed.map_ok(|()| std::mem::take(&mut s.refused))
        });
        (Self(shared), flush)
    }
}

impl<W: AsyncRead + Unpin> AsyncRead for Deferred<W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().inner).poll_read(cx, buf)
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Deferred<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = self.0.lock();
        let wrote = Pin::new(&mut s.inner).poll_write(cx, data);
        if wrote.is_pending() {
            s.refused = true;
        }
        wrote
    }

    /// Put off: the driver flushes once yamux is done for now.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.lock().inner).poll_shutdown(cx)
    }
}

/// A write buffer allocated when bytes arrive and released once they are written out (on
/// flush, or when the next write would not fit). Writes of `capacity` bytes or more pass
/// through once the buffer is empty. Reads pass through.
#[derive(Debug)]
pub struct Coalesce<W> {
    inner: W,
    buf: Vec<u8>,
    /// How much of `buf` is written out already.
    written: usize,
    capacity: usize,
}

impl<W> Coalesce<W> {
    pub fn new(inner: W, capacity: usize) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
            capacity,
        }
    }

    /// Bytes held, not yet written out.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<W: AsyncWrite + Unpin> Coalesce<W> {
    /// Writes out what is held, then lets the buffer go.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Coalesce<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.buffered() + data.len() > this.capacity {
            match this.poll_drain(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other.map(|r| r.map(|()| 0)),
            }
        }
        if data.len() >= this.capacity {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        // Grown as needed, not reserved whole: a small call's frames take a few hundred
        // bytes, and an allocation of the whole capacity (and its release at every flush) is
        // an allocator's slow path.
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Coalesce<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Starts a yamux session over `io` on a new tokio task. The session ends when the peer closes
/// or fails, or on [`Opener::close`]; then every stream fails and [`Opener::closed`] completes.
pub fn spawn<T>(io: T, mode: Mode) -> Session
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    start(io, mode, None)
}

fn start<T>(io: T, mode: Mode, flush: Option<Flush>) -> Session
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut config = yamux::Config::default();
    // In this order: each setter asserts window >= streams * 256 KiB.
    config.set_max_num_streams(MAX_STREAMS);
    config.set_max_connection_receive_window(Some(MAX_CONNECTION_WINDOW));
    config.set_split_send_size(FRAME_BODY);
    let conn = yamux::Connection::new(io.compat(), config, mode);
    let (req_tx, req_rx) = mpsc::channel(OPEN_QUEUE);
    let (in_tx, in_rx) = mpsc::channel(INBOUND_QUEUE);
    let close = CancellationToken::new();
    let done = CancellationToken::new();
    tokio::spawn(drive(
        conn,
        req_rx,
        in_tx,
        close.clone(),
        done.clone(),
        flush,
    ));
    Session {
        opener: Opener {
            requests: req_tx,
            close,
            done,
        },
        inbound: Inbound(in_rx),
    }
}

async fn drive<T>(
    mut conn: yamux::Connection<T>,
    mut requests: mpsc::Receiver<OpenRequest>,
    inbound: mpsc::Sender<Box<MuxStream>>,
    close: CancellationToken,
    done: CancellationToken,
    mut flush: Option<Flush>,
) where
    T: futures_util::AsyncRead + futures_util::AsyncWrite + Unpin,
{
    let mut pending: Option<OpenRequest> = None;
    let mut closing = false;
    let cancelled = close.cancelled();
    tokio::pin!(cancelled);
    let result = poll_fn(|cx| {
        if !closing && cancelled.as_mut().poll(cx).is_ready() {
            closing = true;
        }
        if closing {
            return conn.poll_close(cx);
        }
        // Outbound: serve open requests one at a time (yamux may hold one back while too
        // many of our new streams are unacknowledged).
        loop {
            let req = match pending.take() {
                Some(req) => req,
                None => match requests.poll_recv(cx) {
                    Poll::Ready(Some(req)) => req,
                    Poll::Ready(None) | Poll::Pending => break,
                },
            };
            if req.is_closed() {
                continue;
            }
            match conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => {
                    let _ = req.send(Ok(MuxStream::new(stream, &done)));
                }
                Poll::Ready(Err(e)) => {
                    let _ = req.send(Err(MuxError::Closed));
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    pending = Some(req);
                    break;
                }
            }
        }
        // Inbound: this is also what drives the connection's I/O.
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    // A full queue (or nobody accepting) refuses the stream: dropping it
                    // resets it, and the peer sees an error instead of a hang.
                    let _ = inbound.try_send(Box::new(MuxStream::new(stream, &done)));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    // yamux is done for now: what it wrote leaves together. If that
                    // cannot all go now, the socket wakes this task; if it did and yamux
                    // holds a frame the full buffer refused, yamux gets another turn.
                    if let Some(flush) = flush.as_mut() {
                        match flush(cx) {
                            Poll::Ready(Err(e)) => {
                                return Poll::Ready(Err(yamux::ConnectionError::Io(e)))
                            }
                            Poll::Ready(Ok(true)) => cx.waker().wake_by_ref(),
                            Poll::Ready(Ok(false)) | Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "tunnel session ended with an error");
    }
    // Pending and queued open requests fail when their senders drop with `requests`.
    done.cancel();
}

/// How a control stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlEnd {
    /// The peer said it closes on purpose.
    PeerClosing(CloseReason),
    /// The stream ended or failed (peer gone, session closed).
    Ended,
    /// Nothing heard for [`DEAD_AFTER`].
    Silent,
    /// This side asked to close (and told the peer).
    Local,
}

/// The serving side of a control stream: pings every [`PING_INTERVAL`]; ends when the peer is
/// silent for [`DEAD_AFTER`], leaves, or when `stop` fires.
pub async fn control_pinger<S>(stream: S, stop: CancellationToken) -> ControlEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    control_loop(stream, stop, Some(PING_INTERVAL), None).await
}

/// The agent's side of a control stream (which the agent opens): announces the stream with a
/// `Pong(0)`, answers pings; ends when the serving side is silent for [`DEAD_AFTER`] or
/// leaves. When `stop` fires it sends `Closing(reason)` first.
pub async fn control_responder<S>(
    stream: S,
    stop: CancellationToken,
    reason: CloseReason,
) -> ControlEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    control_loop(stream, stop, None, Some(reason)).await
}

async fn control_loop<S>(
    stream: S,
    stop: CancellationToken,
    ping_every: Option<Duration>,
    closing_reason: Option<CloseReason>,
) -> ControlEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    if closing_reason.is_some() && write_frame(&mut wr, &Control::Pong(0)).await.is_err() {
        return ControlEnd::Ended;
    }
    let (msg_tx, mut msg_rx) = mpsc::channel::<Result<Control, ReadFrameError>>(4);
    // Reads happen in their own future so a half-read frame never gets cancelled by a tick.
    let reader = async move {
        loop {
            let msg = read_frame::<_, Control>(&mut rd).await;
            let end = msg.is_err();
            if msg_tx.send(msg).await.is_err() || end {
                break;
            }
        }
    };
    let writer = async {
        let mut seq = 0u64;
        let mut ticker = ping_every.map(|every| {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let deadline = tokio::time::sleep(DEAD_AFTER);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    if let Some(reason) = closing_reason {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            write_frame(&mut wr, &Control::Closing(reason)),
                        )
                        .await;
                    }
                    let _ = wr.shutdown().await;
                    return ControlEnd::Local;
                }
                () = &mut deadline => return ControlEnd::Silent,
                _ = async {
                    match ticker.as_mut() {
                        Some(t) => t.tick().await,
                        None => std::future::pending().await,
                    }
                } => {
                    seq += 1;
                    if write_frame(&mut wr, &Control::Ping(seq)).await.is_err() {
                        return ControlEnd::Ended;
                    }
                }
                msg = msg_rx.recv() => match msg {
                    Some(Ok(Control::Ping(n))) => {
                        deadline.as_mut().reset(tokio::time::Instant::now() + DEAD_AFTER);
                        if write_frame(&mut wr, &Control::Pong(n)).await.is_err() {
                            return ControlEnd::Ended;
                        }
                    }
                    Some(Ok(Control::Pong(_))) => {
                        deadline.as_mut().reset(tokio::time::Instant::now() + DEAD_AFTER);
                    }
                    Some(Ok(Control::Closing(reason))) => return ControlEnd::PeerClosing(reason),
                    Some(Err(_)) | None => return ControlEnd::Ended,
                },
            }
        }
    };
    // The reader reports its end through the channel, so the writer sees every frame first.
    let reader = async move {
        reader.await;
        std::future::pending::<ControlEnd>().await
    };
    tokio::select! {
        end = writer => end,
        end = reader => end,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::tunnel::StreamOpen;

    #[tokio::test]
    async fn streams_flow_both_ways_and_close_is_seen() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        flow_both_ways(spawn(a, Mode::Client), spawn(b, Mode::Server)).await;
    }

    /// Small frames (the opener's first frame, `StreamOpen`) must not wait in a write buffer.
    #[tokio::test]
    async fn buffered_sessions_flush_small_frames_and_bulk() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = spawn_buffered(a, Mode::Client, 64 * 1024);
        let server = spawn_buffered(b, Mode::Server, 64 * 1024);
        tokio::time::timeout(Duration::from_secs(20), flow_both_ways(client, server))
            .await
            .unwrap();
    }

    async fn flow_both_ways(client: Session, mut server: Session) {
        let echo = tokio::spawn(async move {
            while let Some(mut s) = server.inbound.recv().await {
                tokio::spawn(async move {
                    let hello: Control = read_frame(&mut s).await.unwrap();
                    assert_eq!(hello, Control::Ping(1));
                    write_frame(&mut s, &StreamOpen::Ok).await.unwrap();
                    let (mut r, mut w) = tokio::io::split(s);
                    tokio::io::copy(&mut r, &mut w).await.unwrap();
                    w.shutdown().await.unwrap();
                });
            }
        });
        for _ in 0..3 {
            let mut s = client.opener.open().await.unwrap();
            // The opener writes first: that is what announces the stream.
            write_frame(&mut s, &Control::Ping(1)).await.unwrap();
            let open: StreamOpen = read_frame(&mut s).await.unwrap();
            assert_eq!(open, StreamOpen::Ok);
            // More than one window each way, written and read at once.
            let payload = vec![7u8; 600_000];
            let (mut r, mut w) = tokio::io::split(s);
            let sent = payload.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&sent).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            writer.await.unwrap();
            assert_eq!(back, payload);
        }
        client.opener.close();
        client.opener.closed().await;
        echo.await.unwrap();
        assert!(matches!(client.opener.open().await, Err(MuxError::Closed)));
    }

    #[tokio::test]
    async fn oversized_and_garbage_frames_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
        assert!(matches!(
            read_frame::<_, Control>(&mut b).await,
            Err(ReadFrameError::Frame(FrameError::TooLarge { .. }))
        ));
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&[0, 3, 1, 200, 200]).await.unwrap();
        assert!(matches!(
            read_frame::<_, Control>(&mut b).await,
            Err(ReadFrameError::Frame(_))
        ));
        drop(a);
        assert!(matches!(
            read_frame::<_, Control>(&mut b).await,
            Err(ReadFrameError::Eof)
        ));
    }

    #[tokio::test]
    async fn streams_end_when_their_session_is_closed_here() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = spawn(a, Mode::Client);
        let mut server = spawn(b, Mode::Server);
        let mut s = client.opener.open().await.unwrap();
        write_frame(&mut s, &Control::Ping(1)).await.unwrap();
        let mut accepted = server.inbound.recv().await.unwrap();
        let _: Control = read_frame(&mut accepted).await.unwrap();
        // A reader waiting on the client's stream when the client closes its own session.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            s.read(&mut buf).await
        });
        tokio::task::yield_now().await;
        client.opener.close();
        let n = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the reader is woken")
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_noticed() {
        let (a, _b) = tokio::io::duplex(1024);
        let end = control_pinger(a, CancellationToken::new()).await;
        assert_eq!(end, ControlEnd::Silent);
    }

    #[tokio::test(start_paused = true)]
    async fn pings_keep_both_sides_alive_until_the_agent_closes() {
        let (a, b) = tokio::io::duplex(1024);
        let stop_gateway = CancellationToken::new();
        let stop_agent = CancellationToken::new();
        let gateway = tokio::spawn(control_pinger(a, stop_gateway.clone()));
        let agent = tokio::spawn(control_responder(
            b,
            stop_agent.clone(),
            CloseReason::Inactive,
        ));
        tokio::time::sleep(DEAD_AFTER * 5).await;
        assert!(!gateway.is_finished() && !agent.is_finished());
        stop_agent.cancel();
        assert_eq!(agent.await.unwrap(), ControlEnd::Local);
        assert_eq!(
            gateway.await.unwrap(),
            ControlEnd::PeerClosing(CloseReason::Inactive)
        );
    }
    /// Records each `write` it gets, taking at most `per_write` bytes of each.
    struct Writes {
        writes: Vec<Vec<u8>>,
        per_write: usize,
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = data.len().min(self.per_write);
            self.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn coalesced_writes_leave_together_and_the_buffer_goes_with_them() {
        let mut w = Coalesce::new(
            Writes {
                writes: Vec::new(),
                per_write: usize::MAX,
            },
            64,
        );
        w.write_all(b"header-12b").await.unwrap();
        w.write_all(b"body").await.unwrap();
        assert!(w.inner.writes.is_empty(), "held until flushed");
        w.flush().await.unwrap();
        assert_eq!(w.inner.writes, vec![b"header-12bbody".to_vec()]);
        assert_eq!(w.buf.capacity(), 0, "no buffer while idle");

        // Over the capacity: what is held goes first, then a large write passes through.
        w.write_all(b"small").await.unwrap();
        w.write_all(&[7u8; 100]).await.unwrap();
        assert_eq!(w.inner.writes.len(), 3);
        assert_eq!(w.inner.writes[1], b"small".to_vec());
        assert_eq!(w.inner.writes[2], vec![7u8; 100]);
    }

    #[tokio::test]
    async fn partial_writes_of_the_buffer_lose_nothing() {
        let mut w = Coalesce::new(
            Writes {
                writes: Vec::new(),
                per_write: 3,
            },
            64,
        );
        w.write_all(b"abcdefgh").await.unwrap();
        w.write_all(b"ij").await.unwrap();
        w.shutdown().await.unwrap();
        assert_eq!(w.inner.writes.concat(), b"abcdefghij".to_vec());
        assert_eq!(w.buffered(), 0);
    }

    /// Counts the writes that reach it.
    struct Counted {
        inner: tokio::io::DuplexStream,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let wrote = Pin::new(&mut self.inner).poll_write(cx, data);
            if wrote.is_ready() {
                self.writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            wrote
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// yamux flushes after every frame; a buffered session's frames of one turn still leave
    /// in one write (a bulk answer in a few large writes, not one per frame), and all of them.
    #[tokio::test]
    async fn buffered_sessions_send_the_frames_of_a_turn_in_one_write() {
        const BYTES: usize = 1 << 20;
        for coalescing in [false, true] {
            let (a, b) = tokio::io::duplex(4 * BYTES);
            let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counted = Counted {
                inner: b,
                writes: Arc::clone(&writes),
            };
            let client = spawn(a, Mode::Client);
            let mut server = if coalescing {
                spawn_coalescing(counted, Mode::Server, 64 * 1024)
            } else {
                spawn_buffered(counted, Mode::Server, 64 * 1024)
            };
            let mut ours = client.opener.open().await.unwrap();
            write_frame(&mut ours, &Control::Ping(1)).await.unwrap();
            let mut theirs = server.inbound.recv().await.unwrap();
            let _: Control = read_frame(&mut theirs).await.unwrap();

            let before = writes.load(std::sync::atomic::Ordering::Relaxed);
            let writer = tokio::spawn(async move {
                theirs.write_all(&vec![1u8; BYTES]).await.unwrap();
                theirs.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            ours.read_to_end(&mut got).await.unwrap();
            writer.await.unwrap();
            assert_eq!(got.len(), BYTES);
            assert!(got.iter().all(|b| *b == 1));
            let n = writes.load(std::sync::atomic::Ordering::Relaxed) - before;
            let frames = BYTES / FRAME_BODY;
            assert!(
                n * 3 <= frames,
                "coalescing {coalescing}: {n} writes for {frames} frames"
            );
        }
    }
}
