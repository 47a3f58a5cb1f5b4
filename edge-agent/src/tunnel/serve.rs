//! Serving an accepted tunnel: yamux with the agent as the server, the agent's side of the
//! control stream (pings answered, the close reason chosen when stopping), every stream the
//! gateway opens piped to `DOCKER_HOST` (half-close honoured), and the close after
//! `EDGE_INACTIVITY_TIMEOUT` without streams, once a snapshot went home.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::mux::{self, read_frame, write_frame, ControlEnd, Mode, MuxStream, Session};
use proto::tunnel::{CloseReason, Control, StreamOpen, StreamRefusal, DEAD_AFTER};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Established, LostReason, TunnelEnd, TunnelSettings, CLOSE_TIMEOUT, ENGINE_CONNECT_TIMEOUT,
};
use crate::docker::{self, DockerHost};
use crate::home::Home;

/// Copy buffers of a Docker stream. Answers (logs, exports, `docker cp` out) are the bulk
/// direction: 64 KiB reads from the engine need a third fewer CPU-seconds per GB than tokio's
/// default 8 KiB (`cargo bench -p control-plane --bench tunnel`, hops `agent_copy_*`).
const FROM_ENGINE_BUFFER: usize = 64 * 1024;
const TO_ENGINE_BUFFER: usize = 16 * 1024;
/// Between yamux and TLS, so consecutive frames leave as full TLS records in one `write`.
const TUNNEL_WRITE_BUFFER: usize = 64 * 1024;
/// Longest engine error text put into a stream refusal.
const MAX_REFUSAL_CHARS: usize = 1000;

/// When an open tunnel counts as idle: no stream open for the timeout. Pure; time is passed in.
#[derive(Debug, Clone)]
pub struct Inactivity {
    timeout: Duration,
    open: usize,
    idle_since: Option<Instant>,
}

impl Inactivity {
    pub fn new(timeout: Duration, now: Instant) -> Self {
        Self {
            timeout,
            open: 0,
            idle_since: Some(now),
        }
    }

    pub fn opened(&mut self) {
        self.open += 1;
        self.idle_since = None;
    }

    pub fn closed(&mut self, now: Instant) {
        self.open = self.open.saturating_sub(1);
        if self.open == 0 {
            self.idle_since = Some(now);
        }
    }

    pub fn open_streams(&self) -> usize {
        self.open
    }

    /// When the tunnel becomes idle, if no stream opens before; `None` while streams are open.
    pub fn deadline(&self) -> Option<Instant> {
        self.idle_since.map(|t| t + self.timeout)
    }

    pub fn is_idle(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }
}

fn lost(end: ControlEnd) -> LostReason {
    match end {
        ControlEnd::Silent => LostReason::Silent(DEAD_AFTER),
        ControlEnd::PeerClosing(reason) => LostReason::GatewayClosing(reason),
        ControlEnd::Ended | ControlEnd::Local => LostReason::ControlEnded,
    }
}

/// The agent's side of the control stream. Like [`proto::mux::control_responder`], but the
/// close reason is chosen when stopping (idle or shutdown), through `stop`.
async fn respond<S>(stream: S, mut stop: watch::Receiver<Option<CloseReason>>) -> ControlEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    // The opener writes first: this announces the stream to the gateway.
    if write_frame(&mut wr, &Control::Pong(0)).await.is_err() {
        return ControlEnd::Ended;
    }
    let (msg_tx, mut msg_rx) = mpsc::channel::<Option<Control>>(4);
    // Reads happen in their own future so a half-read frame is never cancelled.
    let reader = async move {
        loop {
            let msg = read_frame::<_, Control>(&mut rd).await.ok();
            let end = msg.is_none();
            if msg_tx.send(msg).await.is_err() || end {
                break;
            }
        }
        std::future::pending::<ControlEnd>().await
    };
    let writer = async {
        let deadline = tokio::time::sleep(DEAD_AFTER);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                // The guard of the watch value must not live across an await: copy it out.
                reason = async {
                    match stop.wait_for(Option::is_some).await {
                        Ok(reason) => *reason,
                        Err(_) => None,
                    }
                } => {
                    if let Some(reason) = reason {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            write_frame(&mut wr, &Control::Closing(reason)),
                        )
                        .await;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
                    return ControlEnd::Local;
                }
                () = &mut deadline => return ControlEnd::Silent,
                msg = msg_rx.recv() => match msg {
                    Some(Some(Control::Ping(n))) => {
                        deadline.as_mut().reset(Instant::now() + DEAD_AFTER);
                        if write_frame(&mut wr, &Control::Pong(n)).await.is_err() {
                            return ControlEnd::Ended;
                        }
                    }
                    Some(Some(Control::Pong(_))) => {
                        deadline.as_mut().reset(Instant::now() + DEAD_AFTER);
                    }
                    Some(Some(Control::Closing(reason))) => return ControlEnd::PeerClosing(reason),
                    Some(None) | None => return ControlEnd::Ended,
                },
            }
        }
    };
    tokio::select! {
        end = writer => end,
        end = reader => end,
    }
}

/// Serves one Docker stream: connect to the engine, say how that went, then pipe.
/// `engine_down` is shared by the streams of one tunnel: an unreachable engine is logged once
/// until it is reachable again (the operator sees every refusal anyway).
async fn serve_stream(mut stream: MuxStream, docker: DockerHost, engine_down: Arc<AtomicBool>) {
    let mut engine = match docker.connect(ENGINE_CONNECT_TIMEOUT).await {
        Ok(engine) => {
            engine_down.store(false, Ordering::Relaxed);
            engine
        }
        Err(e) => {
            let message = docker::one_line(
                &format!("cannot connect to DOCKER_HOST {docker}: {e}"),
                MAX_REFUSAL_CHARS,
            );
            if engine_down.swap(true, Ordering::Relaxed) {
                debug!("{message}");
            } else {
                warn!("{message}");
            }
            let refusal = StreamOpen::Refused {
                code: StreamRefusal::EngineUnreachable,
                message,
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                let _ = write_frame(&mut stream, &refusal).await;
                let _ = stream.shutdown().await;
            })
            .await;
            return;
        }
    };
    if write_frame(&mut stream, &StreamOpen::Ok).await.is_err() {
        return;
    }
    // Each direction ends on its own (end of input is passed on as a half-close, so
    // `docker exec -i` can close stdin while output keeps flowing); then both are shut.
    if let Err(e) = tokio::io::copy_bidirectional_with_sizes(
        &mut stream,
        &mut engine,
        TO_ENGINE_BUFFER,
        FROM_ENGINE_BUFFER,
    )
    .await
    {
        debug!(error = %e, "docker stream ended with an error");
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = stream.shutdown().await;
        let _ = engine.shutdown().await;
    })
    .await;
}

async fn join_opt<T>(handle: &mut Option<JoinHandle<T>>) {
    match handle {
        Some(h) => {
            let _ = h.await;
        }
        None => std::future::pending().await,
    }
}

/// Runs an accepted tunnel until it is idle, lost, or the agent shuts down.
pub(super) async fn serve(
    established: Established,
    settings: Arc<TunnelSettings>,
    home: Arc<Home>,
    shutdown: CancellationToken,
) -> TunnelEnd {
    let Session {
        opener,
        mut inbound,
    } = mux::spawn_buffered(established.stream, Mode::Server, TUNNEL_WRITE_BUFFER);
    let control = match opener.open().await {
        Ok(stream) => stream,
        Err(e) => {
            opener.close();
            return TunnelEnd::Lost(LostReason::ControlOpen(e.to_string()));
        }
    };
    let (stop_tx, stop_rx) = watch::channel(None);
    let control = respond(control, stop_rx);
    tokio::pin!(control);
    let mut streams = JoinSet::new();
    let mut idle = Inactivity::new(settings.inactivity_timeout, Instant::now());
    // The snapshot sent before an idle close, and whether a stream opened meanwhile.
    let mut snapshot: Option<JoinHandle<()>> = None;
    let mut busy_since_snapshot = false;
    let engine_down = Arc::new(AtomicBool::new(false));
    let end = loop {
        let deadline = idle.deadline();
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break TunnelEnd::Shutdown,
            end = &mut control => break TunnelEnd::Lost(lost(end)),
            stream = inbound.recv() => match stream {
                Some(stream) => {
                    idle.opened();
                    busy_since_snapshot = true;
                    streams.spawn(serve_stream(
                        stream,
                        settings.docker.clone(),
                        engine_down.clone(),
                    ));
                }
                None => break TunnelEnd::Lost(LostReason::SessionEnded),
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => idle.closed(Instant::now()),
            () = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            }, if snapshot.is_none() && deadline.is_some() => {
                // Idle: the snapshot goes home first, while streams are still served.
                busy_since_snapshot = false;
                let home = home.clone();
                snapshot = Some(tokio::spawn(async move {
                    home.send_snapshot_logged("idle").await;
                }));
            }
            () = join_opt(&mut snapshot), if snapshot.is_some() => {
                snapshot = None;
                if !busy_since_snapshot && idle.is_idle(Instant::now()) {
                    break TunnelEnd::Inactive;
                }
            }
        }
    };
    let reason = match end {
        TunnelEnd::Inactive => Some(CloseReason::Inactive),
        TunnelEnd::Shutdown => Some(CloseReason::Shutdown),
        TunnelEnd::Lost(_) => None,
    };
    if let Some(reason) = reason {
        let _ = stop_tx.send(Some(reason));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut control).await;
    }
    if let Some(h) = snapshot {
        h.abort();
    }
    opener.close();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, opener.closed()).await;
    streams.abort_all();
    if end == TunnelEnd::Inactive {
        info!(
            "tunnel closed after {} without streams",
            humantime::format_duration(settings.inactivity_timeout)
        );
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn inactivity_counts_from_the_last_stream() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(300);
        let mut idle = Inactivity::new(timeout, t0);
        assert_eq!(idle.deadline(), Some(t0 + timeout));
        assert!(!idle.is_idle(t0 + timeout - Duration::from_millis(1)));
        assert!(idle.is_idle(t0 + timeout));

        // Any open stream is activity, however long it stays open.
        idle.opened();
        idle.opened();
        assert_eq!(idle.deadline(), None);
        assert!(!idle.is_idle(t0 + timeout * 10));
        let t1 = t0 + Duration::from_secs(1000);
        idle.closed(t1);
        assert_eq!(idle.open_streams(), 1);
        assert_eq!(idle.deadline(), None);
        let t2 = t1 + Duration::from_secs(5);
        idle.closed(t2);
        assert_eq!(idle.deadline(), Some(t2 + timeout));
        // Unbalanced closes do not underflow.
        idle.closed(t2);
        assert_eq!(idle.open_streams(), 0);
    }
}
