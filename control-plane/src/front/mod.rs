//! The HTTPS front of the API port: TLS, then one look at the first request head decides who
//! serves the connection — hyper (see [`crate::docker_proxy`]) when it is a Docker hijack
//! (`attach`, `exec start`: `Upgrade: tcp`, then raw bytes both ways, which actix cannot hand
//! over), actix-web for everything else (agents' check-ins, the admin API, and every other
//! Docker call). actix's own server cannot do this split, so the
//! actix app runs here on `actix-server` + `actix-http` the way `HttpServer` would run it.

use std::net::TcpListener;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_http::HttpService;
use actix_server::Server;
use actix_service::{
    fn_factory, fn_service, map_config, IntoServiceFactory, Service, ServiceFactory,
    ServiceFactoryExt,
};
use actix_web::body::MessageBody as _;
use actix_web::dev::{AppConfig, ServiceResponse};
use actix_web::App;
use budget::BodyBudget;
use gateway::admission::{Admission, Refused, Ticket};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::api::AppState;
use crate::config::Limits;
use crate::docker_proxy::DockerProxy;
use crate::error::ApiError;

mod budget;
mod io;
mod lane;

pub use budget::DEFAULT_PENDING_BODY_BYTES;
pub use io::{HeadClock, Prefixed, Timed};

/// A graceful stop waits this long for open connections, and for Docker calls through the
/// embedded gateway's tunnels before it closes them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A connection's TLS stream, once the handshake is done. Boxed: it is over a kilobyte, and
/// moved from stage to stage, each of which would otherwise keep a slot of that size in its
/// future for the connection's life.
type Tls = Box<tokio_rustls::server::TlsStream<TcpStream>>;

/// The stream actix serves: TLS, the sniffed head put back, the next heads' deadlines.
type ApiStream = Timed<Prefixed<Tls>>;

/// A connection's admission ticket, in its requests' connection data: whatever authenticates
/// a request marks it proved ([`proved`]), and only then the connection stops counting as
/// pending. A complete request head proves nothing: a head announcing a body, then silence,
/// is the cheapest way to hold a connection.
#[derive(Clone)]
pub struct Proof(Arc<Ticket>);

/// The request `req` proved itself (a valid admin key, an agent's verified proof): its
/// connection is no longer pending.
pub fn proved(req: &actix_web::HttpRequest) {
    if let Some(Proof(ticket)) = req.conn_data::<Proof>() {
        ticket.proved();
    }
}

/// The front's own series (registered by [`crate::metrics::Metrics`]).
#[derive(Clone)]
pub struct FrontMetrics {
    /// Connections dropped at once by admission, by reason.
    pub refused: prometheus::IntCounterVec,
    /// Connections let go at a deadline, by stage: `first_byte`, `first_request`,
    /// `next_request`.
    pub timed_out: prometheus::IntCounterVec,
    /// Bytes buffered now for first bodies that proved nothing yet (see [`budget`]).
    pub pending_body_bytes: prometheus::IntGauge,
    /// Such bodies refused (`full`) or let go for a faster one (`slowest`).
    pub pending_bodies_dropped: prometheus::IntCounterVec,
}

/// Builds the API server. `app` makes one actix `App` per worker; `state` serves agents'
/// connections without it ([`lane`]). Every connection is
/// admitted by `admission` first (dropped at once over its bounds), must send its first byte
/// within `first_byte_timeout` and finish TLS and its first request head within
/// `first_request_timeout`; only then it stops counting as pending. Every later request head
/// of a kept-alive connection is due as [`HeadClock`] says. Each worker registers itself in
/// `workers` as it starts.
#[allow(clippy::too_many_arguments)]
pub fn api_server<F, T, B>(
    app: F,
    state: actix_web::web::Data<AppState>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: &Limits,
    proxy: Arc<DockerProxy>,
    admission: Arc<Admission>,
    metrics: FrontMetrics,
    stopping: tokio_util::sync::CancellationToken,
    workers: Arc<crate::workers::Workers>,
) -> std::io::Result<Server>
where
    F: Fn() -> App<T> + Send + Clone + 'static,
    T: actix_service::ServiceFactory<
            actix_web::dev::ServiceRequest,
            Config = (),
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    B: actix_web::body::MessageBody + 'static,
{
    let keep_alive = limits.keep_alive;
    let acceptor = TlsAcceptor::from(tls);
    let deadlines = Deadlines {
        first_byte: limits.first_byte_timeout,
        first_request: limits.first_request_timeout,
        agent_body: limits.agent_body_timeout,
        keep_alive,
    };
    let lane = Arc::new(lane::Lane {
        state,
        deadlines,
        timed_out: metrics.timed_out.clone(),
        stopping,
    });
    // One budget for the process: actix's workers are threads of it.
    let bodies = BodyBudget::new(
        limits.pending_body_bytes,
        metrics.pending_body_bytes.clone(),
        metrics.pending_bodies_dropped.clone(),
    );
    // actix's own bound per worker stays at ours (which is process-wide) or below.
    let per_worker = limits
        .max_connections_per_worker
        .min(admission.limits().max_connections);
    Server::build()
        .workers(limits.workers)
        .backlog(4096)
        .max_concurrent_connections(per_worker)
        // A graceful stop waits for open connections (kept-alive agents, held check-ins,
        // hijacked Docker sessions), then closes them.
        .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
        .disable_signals()
        .listen("api", listener, move || {
            let stopping = lane.stopping.clone();
            // Each request marks its connection's clock: served from its head on, its next
            // head due once it is answered.
            let app = actix_service::apply_fn_factory(
                map_config(
                    app()
                        .into_factory()
                        .map_err(|e: actix_web::Error| e.error_response()),
                    |_| AppConfig::default(),
                ),
                move |req: actix_http::Request, app| {
                    let clock = req.conn_data::<Rc<HeadClock>>().cloned();
                    if let Some(clock) = &clock {
                        clock.serving();
                    }
                    let proof = req.conn_data::<Proof>().cloned();
                    let answer = app.call(req);
                    let stopping = stopping.clone();
                    async move {
                        let answer = answer.await;
                        // A connection whose request proved nothing (asked once the handler
                        // is done) gets no other: kept alive, it would hold its dispatcher's
                        // buffers for the keep-alive time on anyone's behalf. Nor does any
                        // once the server is stopping.
                        let unproved = proof.is_some_and(|Proof(t)| t.is_pending());
                        let last = |head: &mut actix_http::ResponseHead| {
                            if unproved || stopping.is_cancelled() {
                                head.set_connection_type(actix_http::ConnectionType::Close);
                            }
                        };
                        // Answered once the whole body is out (a Docker log stream may run
                        // for hours), not when the handler returns.
                        match answer {
                            Ok(res) => {
                                let mut res = actix_http::Response::from(res);
                                last(res.head_mut());
                                Ok(res.map_body(|_, body| io::Answered::new(body, clock)))
                            }
                            Err(mut res) => {
                                last(res.head_mut());
                                Err(res.map_body(|_, body| io::Answered::new(body, clock).boxed()))
                            }
                        }
                    }
                },
            );
            let h1 = HttpService::<ApiStream, _, _, _, _>::build()
                .keep_alive(keep_alive)
                .client_request_timeout(Duration::from_secs(5))
                // As actix-web's `HttpServer` does: linger a second after an early answer (a
                // 413 for a body still arriving) so the client reads it instead of a reset.
                .client_disconnect_timeout(Duration::from_secs(1))
                .h1_allow_half_closed(true)
                .on_connect_ext(|io: &ApiStream, ext| {
                    ext.insert(Rc::clone(io.clock()));
                    ext.insert(Proof(Arc::clone(io.ticket())));
                })
                .h1(app);
            let acceptor = acceptor.clone();
            let proxy = Arc::clone(&proxy);
            let admission = Arc::clone(&admission);
            let metrics = metrics.clone();
            let bodies = Arc::clone(&bodies);
            let lane = Arc::clone(&lane);
            let workers = Arc::clone(&workers);
            fn_factory(move || {
                // On the worker's thread, as it starts its services.
                workers.register_current();
                let h1 = h1.new_service(());
                let acceptor = acceptor.clone();
                let proxy = Arc::clone(&proxy);
                let admission = Arc::clone(&admission);
                let metrics = metrics.clone();
                let bodies = Arc::clone(&bodies);
                let lane = Arc::clone(&lane);
                async move {
                    let h1 = Rc::new(h1.await.map_err(|e| {
                        tracing::error!(error = ?e, "cannot start the api service");
                    })?);
                    Ok::<_, ()>(fn_service(move |tcp: TcpStream| {
                        let h1 = Rc::clone(&h1);
                        let acceptor = acceptor.clone();
                        let proxy = Arc::clone(&proxy);
                        let admitted = tcp
                            .peer_addr()
                            .map_err(|_| Refused::Full)
                            .and_then(|peer| admission.admit(peer.ip()));
                        let metrics = metrics.clone();
                        let bodies = Arc::clone(&bodies);
                        let lane = Arc::clone(&lane);
                        async move {
                            match admitted {
                                Ok(ticket) => {
                                    let conn = Conn {
                                        acceptor,
                                        proxy,
                                        ticket,
                                        deadlines,
                                        metrics,
                                        bodies,
                                        lane,
                                    };
                                    serve(tcp, h1, conn).await;
                                }
                                Err(why) => {
                                    metrics.refused.with_label_values(&[why.label()]).inc();
                                    tracing::debug!(
                                        reason = why.label(),
                                        "api connection not admitted: dropped"
                                    );
                                }
                            }
                            Ok::<_, ()>(())
                        }
                    }))
                }
            })
        })
        .map(|b| b.run())
}

/// A connection's deadlines: before it proved anything, and between its requests.
#[derive(Clone, Copy)]
struct Deadlines {
    first_byte: Duration,
    first_request: Duration,
    /// Between two reads of an agent's first body (the whole within
    /// [`crate::api::AGENT_BODY_TOTAL`]).
    agent_body: Duration,
    keep_alive: Duration,
}

/// What serving one admitted connection needs.
struct Conn {
    acceptor: TlsAcceptor,
    proxy: Arc<DockerProxy>,
    ticket: Ticket,
    deadlines: Deadlines,
    metrics: FrontMetrics,
    bodies: Arc<BodyBudget>,
    lane: Arc<lane::Lane>,
}

async fn serve<S>(tcp: TcpStream, h1: Rc<S>, conn: Conn)
where
    S: Service<(ApiStream, Option<std::net::SocketAddr>)>,
    S::Error: std::fmt::Debug,
{
    // Small answers must leave at once (Nagle would hold them for the peer's delayed ACK).
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().ok();
    // A client that connects and sends nothing is let go soon: a TLS client speaks first.
    let mut one = [0u8; 1];
    let first_byte = tokio::select! {
        () = conn.ticket.evicted() => return,
        r = tokio::time::timeout(conn.deadlines.first_byte, tcp.peek(&mut one)) => r,
    };
    match first_byte {
        Ok(Ok(n)) if n > 0 => {}
        Ok(_) => return,
        Err(_) => {
            conn.metrics
                .timed_out
                .with_label_values(&["first_byte"])
                .inc();
            tracing::debug!(peer = ?peer, "nothing sent within the first-byte timeout");
            return;
        }
    }
    // Boxed, here and below: a connection's task is as large as its future's largest state,
    // and TLS, hyper and actix's dispatcher each hold kilobytes inline. A connection that
    // has sent nothing (the cheapest to open by the thousand) holds only the small future
    // that waits for its first byte; each later stage allocates what it needs when it
    // starts, and gives it back when it ends: the handshake's and the first request's state
    // is gone before the connection settles down to serve requests for hours.
    let Some(first) = Box::pin(first_request(tcp, peer, &conn)).await else {
        return;
    };
    // Agents' requests are served by the lane; actix (or hyper) gets the connection only if
    // another route follows. The lane's future is the one a held agent's connection keeps
    // for hours: it owns the stream and little else.
    let (tls, head) = if first.agent {
        match Box::pin(lane::serve(first.tls, first.head, &conn.lane, &conn.ticket)).await {
            lane::LaneEnd::Closed => return,
            lane::LaneEnd::Handoff(tls, rest) => (tls, rest),
        }
    } else {
        (first.tls, first.head)
    };
    Box::pin(serve_other(tls, head, peer, h1, conn)).await;
}

/// A connection whose TLS and first request are in.
struct First {
    tls: Tls,
    /// The first request head, and for an agent route its whole body.
    head: Vec<u8>,
    /// The first request goes to an agent route (and was read whole).
    agent: bool,
}

/// [`serve`] once the first byte is in: TLS and the first request (an agent's body
/// included), or `None` when the connection was answered (refused) or went away.
async fn first_request(
    tcp: TcpStream,
    peer: Option<std::net::SocketAddr>,
    conn: &Conn,
) -> Option<First> {
    let Conn {
        acceptor,
        ticket,
        deadlines,
        metrics,
        bodies,
        ..
    } = conn;
    let timed_out = |stage: &str| metrics.timed_out.with_label_values(&[stage]).inc();
    let first = tokio::select! {
        () = ticket.evicted() => return None,
        r = tokio::time::timeout(deadlines.first_request, async {
            let mut tls = Box::new(acceptor.accept(tcp).await?);
            let head = io::read_request_head(&mut tls).await?;
            Ok::<_, std::io::Error>((tls, head))
        }) => r,
    };
    let (mut tls, head) = match first {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::debug!(peer = ?peer, error = %e, "connection closed before its first request");
            return None;
        }
        Err(_) => {
            timed_out("first_request");
            tracing::debug!(peer = ?peer, "no request within the first-request timeout");
            return None;
        }
    };
    // An agent's body is read here, before anything else serves the connection: what a
    // stalled one holds meanwhile is what arrived (see `io::agent_request_len`).
    let Some(first) = io::agent_request_len(&head) else {
        return Some(First {
            tls,
            head,
            agent: false,
        });
    };
    let len = match first {
        Ok(len) => len,
        Err(refused) => {
            lane::answer_and_close(&mut tls, &Err(refused)).await;
            return None;
        }
    };
    let share = bodies.share(tokio::time::Instant::now());
    let read = tokio::select! {
        () = ticket.evicted() => return None,
        () = share.evicted() => {
            let why = ApiError::Unavailable(
                "let go for a faster upload (the server holds as many pending request \
                 bodies as it may); send it again later"
                    .into(),
            );
            lane::answer_and_close(&mut tls, &Err(why)).await;
            return None;
        }
        r = io::read_to_len(
            &mut tls,
            head,
            len,
            Some(&share),
            deadlines.agent_body,
            crate::api::AGENT_BODY_TOTAL,
        ) => r,
    };
    let why = match read {
        Ok(whole) => {
            return Some(First {
                tls,
                head: whole,
                agent: true,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::OutOfMemory => {
            tracing::debug!(peer = ?peer, "agent request body refused: pending body budget spent");
            ApiError::Unavailable(e.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            timed_out("agent_body");
            tracing::debug!(peer = ?peer, error = %e, "agent request body not in time");
            ApiError::RequestTimeout(format!("agent request body {e}"))
        }
        Err(e) => {
            tracing::debug!(peer = ?peer, error = %e, "connection closed in its first body");
            return None;
        }
    };
    lane::answer_and_close(&mut tls, &Err(why)).await;
    None
}

/// Serves a connection with hyper (a Docker hijack) or actix, from the request at the start
/// of `head` on.
async fn serve_other<S>(
    tls: Tls,
    head: Vec<u8>,
    peer: Option<std::net::SocketAddr>,
    h1: Rc<S>,
    conn: Conn,
) where
    S: Service<(ApiStream, Option<std::net::SocketAddr>)>,
    S::Error: std::fmt::Debug,
{
    let Conn {
        proxy,
        ticket,
        deadlines,
        metrics,
        lane,
        ..
    } = conn;
    // Still pending: a complete request proves nothing. The request that authenticates (an
    // admin key, an agent's proof) marks the ticket; until then the connection counts
    // against the pending bounds, and is dropped with them.
    let ticket = Arc::new(ticket);
    let docker = io::is_docker_hijack(&head);
    let io = Prefixed::new(head.into(), tls);
    if docker {
        Box::pin(proxy.serve_connection(io, Some(ticket))).await;
    } else {
        let clock = HeadClock::new(deadlines.keep_alive, deadlines.first_request);
        let on_timeout = metrics.timed_out.with_label_values(&["next_request"]);
        let io = Timed::new(io, clock, ticket, on_timeout).until(&lane.stopping);
        if let Err(e) = Box::pin(h1.call((io, peer))).await {
            tracing::debug!(peer = ?peer, error = ?e, "api connection ended with an error");
        }
    }
}
