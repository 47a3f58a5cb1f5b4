//! `/api/endpoints/{id}/docker/{path}`: the Docker Engine API of one environment, through its
//! tunnel.
//!
//! Served by hyper, not actix: Docker's attach and exec hijack the HTTP connection (`Upgrade:
//! tcp` with a request body, then raw bytes both ways), which actix cannot hand over.
//! [`crate::front`] routes a TLS connection here when its first request is for a Docker path;
//! the docker CLI opens a fresh connection for every hijack, and points all its calls at one
//! base path, so its connections are Docker connections from the first byte.
//!
//! Per request: check the admin key; refuse unknown and async environments (from memory once
//! a call went there: [`Fleet::edge_mode`]); ensure the tunnel (wanted on every replica,
//! bounded wait, 504 with the reason when the agent does not come); take an idle engine
//! connection through that tunnel ([`engine_pool`]) or open a stream through the local or a
//! remote gateway; send the request with hyper's client over it, streaming both bodies; on
//! `101` splice the two upgraded connections.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway::admission::Ticket;
use gateway::{Dialer, OpenError, TunnelStream};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use proto::clock::now_ms;
use proto::tunnel::{decode_body, frame_len, StreamOpen, MAX_TUNNEL_FRAME};
use store::{EdgeMode, EnvId, TunnelLocation};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::auth::AdminKeys;
use crate::engine_pool::{self, EngineBody};
use crate::error::{ApiError, ProxyError};
use crate::fleet::{liveness, Fleet, Liveness, TunnelError};
use crate::metrics::Metrics;
use crate::session::Credentials;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

const PREFIX: &str = "/api/endpoints/";

/// `Some((id, rest))` for `/api/endpoints/{id}/docker{rest}` where rest is empty or starts
/// with `/`.
pub fn docker_path(path: &str) -> Option<(EnvId, &str)> {
    let tail = path.strip_prefix(PREFIX)?;
    let (id, rest) = tail.split_once('/')?;
    let id: EnvId = id.parse().ok()?;
    let rest = rest.strip_prefix("docker")?;
    (rest.is_empty() || rest.starts_with('/')).then_some((id, rest))
}

/// The engine-side request target: the path after `/docker` (or `/`) and the query.
pub fn engine_target(rest: &str, query: Option<&str>) -> String {
    let path = if rest.is_empty() { "/" } else { rest };
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    }
}

pub struct DockerProxy {
    pub fleet: Arc<Fleet>,
    pub admin: AdminKeys,
    pub metrics: Arc<Metrics>,
    /// Streams through this process's gateway (embedded mode) or dial sessions to others.
    pub dialer: Arc<Dialer>,
    /// How long a request waits for the agent to open its tunnel.
    pub wait: Duration,
    /// How long an engine connection is kept idle for the next call ([`engine_pool`]).
    pub engine_idle: Duration,
    /// The API's workers, where the embedded gateway's tunnels run (`None` without one): a
    /// call that wakes a tunnel asks for it on its own thread.
    pub workers: Option<Arc<crate::workers::Workers>>,
}

impl DockerProxy {
    /// Serves one client connection (HTTP/1.1 with upgrades) until it closes.
    pub async fn serve_connection<IO>(self: Arc<Self>, io: IO, ticket: Option<Arc<Ticket>>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |req| {
            let proxy = Arc::clone(&self);
            let ticket = ticket.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, ticket.as_deref()).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "docker proxy connection ended with an error");
        }
    }

    async fn handle(&self, req: Request<Incoming>, ticket: Option<&Ticket>) -> Response<ProxyBody> {
        let started = Instant::now();
        let mut res = match self.forward(req, ticket).await {
            Ok(res) => res,
            Err(e) => error_response(e),
        };
        // As on actix's side (`front`): a connection whose request proved nothing gets no
        // other.
        if ticket.is_some_and(Ticket::is_pending) {
            res.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
        }
        self.metrics
            .docker_requests
            .with_label_values(&[crate::metrics::status_class(res.status().as_u16())])
            .inc();
        for (name, value) in crate::api_headers() {
            if !res.headers().contains_key(name) {
                res.headers_mut()
                    .insert(name, hyper::header::HeaderValue::from_static(value));
            }
        }
        tracing::debug!(status = res.status().as_u16(), elapsed = ?started.elapsed(), "docker proxy request");
        res
    }

    /// The hijack-capable path: one hyper request (the first of a connection whose first
    /// request asked for an upgrade).
    /// `ticket`: the connection's admission, marked proved once the admin key checks out.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        ticket: Option<&Ticket>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Some((id, rest)) = docker_path(req.uri().path()) else {
            return Err(ProxyError::Misdirected);
        };
        let target = engine_target(rest, req.uri().query());
        let headers = req.headers();
        let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or(""));
        let cookies: Vec<&str> = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let credentials = Credentials::read(text, &cookies, req.method().as_str());
        self.admin.authorize(&credentials, now_ms())?;
        // A browser's page could open a WebSocket here with the cookie (any page of the same
        // site sends it); Docker's own WebSocket routes check no origin. Hijacks are the docker
        // CLI's, which sends the key.
        if is_upgrade(req.headers()) && !credentials.has_key() {
            return Err(crate::session::Refused::KeyRequired.into());
        }
        if let Some(ticket) = ticket {
            ticket.proved();
        }
        let upgrade = is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let mut res = self
            .exchange(id, parts.method, &target, &parts.headers, body)
            .await?;

        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return Err(ProxyError::BadGateway(
                    "the engine switched protocols on a request that did not ask to".into(),
                ));
            };
            let engine_upgrade = hyper::upgrade::on(&mut res);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, engine_upgrade) {
                    Ok((client, engine)) => {
                        let mut client = TokioIo::new(client);
                        let mut engine = TokioIo::new(engine);
                        if let Err(e) =
                            tokio::io::copy_bidirectional(&mut client, &mut engine).await
                        {
                            tracing::debug!(error = %e, "hijacked docker connection ended");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "docker upgrade failed"),
                }
            });
            let (parts, _) = res.into_parts();
            let mut back = Response::from_parts(parts, empty());
            *back.version_mut() = hyper::Version::HTTP_11;
            return Ok(back);
        }

        let (parts, body) = res.into_parts();
        let mut back = Response::builder().status(parts.status);
        if let Some(h) = back.headers_mut() {
            copy_headers(&parts.headers, h, false, Toward::Operator);
        }
        back.body(body.boxed())
            .map_err(|e| ProxyError::BadGateway(e.to_string()))
    }

    /// Sends one request to the engine of environment `id` through its tunnel (opened on
    /// demand) and returns the engine's answer, its body still streaming. The caller has
    /// checked the admin key. With `Connection: Upgrade` in `headers` the answer may be `101`;
    /// the engine side of the upgrade is then `hyper::upgrade::on(&mut answer)`.
    ///
    /// A call other than an upgrade goes over an idle engine connection of this thread's
    /// [`engine_pool`] when one is there for the tunnel's epoch, and its connection goes back
    /// there once the answer is read. A kept connection that turns out dead before the request
    /// left is replaced by a new one; after, only a request without a body that changes
    /// nothing (`GET`, `HEAD`) is sent again.
    pub async fn exchange<B>(
        &self,
        id: EnvId,
        method: hyper::Method,
        target: &str,
        headers: &HeaderMap,
        body: B,
    ) -> Result<Response<Incoming>, ProxyError>
    where
        B: hyper::body::Body<Data = Bytes> + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match self.fleet.edge_mode(id).await? {
            None => return Err(ProxyError::NotFound(id)),
            Some(EdgeMode::Async) => return Err(ProxyError::Async(id)),
            Some(EdgeMode::Standard) => {}
        }
        let upgrade = is_upgrade(headers);
        let bodiless = has_no_body(headers);
        let resendable =
            !upgrade && matches!(method, hyper::Method::GET | hyper::Method::HEAD) && bodiless;
        let request = |body: EngineBody| {
            let mut out = Request::builder()
                .method(method.clone())
                .uri(target)
                .version(hyper::Version::HTTP_11);
            if let Some(h) = out.headers_mut() {
                copy_headers(headers, h, upgrade, Toward::Engine);
                h.insert(header::HOST, HeaderValue::from_static("docker"));
            }
            out.body(body)
                .map_err(|e| ProxyError::BadRequest(e.to_string()))
        };
        // Framing says there is no body: none is sent, whatever the caller's stream would say
        // (an actix payload's unknown length would go out chunked).
        let mut out = request(if bodiless {
            empty_body()
        } else {
            Box::pin(body.map_err(Into::into))
        })?;

        let wake = Instant::now();
        if let Some(workers) = &self.workers {
            if !self.dialer.has_local_tunnel(id) {
                workers.want_tunnel_here(id);
            }
        }
        let loc = self
            .fleet
            .ensure_tunnel(id, self.wait, None)
            .await
            .map_err(|e| self.tunnel_error(id, e))?;
        if !upgrade {
            if let Some(mut sender) =
                engine_pool::take(id, loc.epoch, self.engine_idle, &self.metrics.engine_idle)
            {
                self.metrics
                    .tunnel_wait_seconds
                    .observe(wake.elapsed().as_secs_f64());
                self.metrics.engine_connections_reused.inc();
                match sender.try_send_request(out).await {
                    Ok(res) => {
                        self.give_back(id, loc.epoch, sender);
                        return Ok(res);
                    }
                    Err(mut e) => match e.take_message() {
                        // It never left: send it on a new connection.
                        Some(unsent) => out = unsent,
                        None if resendable => out = request(empty_body())?,
                        None => return Err(from_hyper(id, &loc, e.into_error())),
                    },
                }
            }
        }
        let (loc, stream) = self.connect(id, loc).await?;
        self.metrics
            .tunnel_wait_seconds
            .observe(wake.elapsed().as_secs_f64());
        self.metrics.engine_connections_opened.inc();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(Opened::new(stream)))
                .await
                .map_err(|e| from_hyper(id, &loc, e))?;
        // Local: the request body may be actix's (not `Send`); both fronts run on actix
        // workers.
        actix_rt::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "tunnel stream to the engine ended with an error");
            }
        });
        let res = sender
            .send_request(out)
            .await
            .map_err(|e| from_hyper(id, &loc, e))?;
        if !upgrade && res.status() != StatusCode::SWITCHING_PROTOCOLS {
            self.give_back(id, loc.epoch, sender);
        }
        Ok(res)
    }

    fn give_back(&self, id: EnvId, epoch: u64, sender: SendRequest<EngineBody>) {
        if !self.engine_idle.is_zero() {
            engine_pool::give_back(
                id,
                epoch,
                sender,
                self.engine_idle,
                self.metrics.engine_idle.clone(),
            );
        }
    }

    /// A stream to the agent of `id` through the tunnel at `loc`; if that gateway turns out
    /// dead or no longer holds it, waits for a newer tunnel once.
    async fn connect(
        &self,
        id: EnvId,
        loc: TunnelLocation,
    ) -> Result<(TunnelLocation, TunnelStream), ProxyError> {
        match self.open(&loc).await {
            Ok(s) => Ok((loc, s)),
            // The tunnel is fine, only full: waiting for a new one would not help.
            Err(OpenError::Busy) => Err(ProxyError::Busy(format!(
                "the tunnel of environment {id} (through gateway {}) carries too many streams at once; try again",
                loc.gateway_id
            ))),
            Err(e) => {
                tracing::info!(env = id, gateway = %loc.gateway_id, epoch = loc.epoch, error = %e,
                    "tunnel location is stale; waiting for a new tunnel");
                let fresh = self
                    .fleet
                    .ensure_tunnel(id, self.wait, Some(loc.epoch))
                    .await
                    .map_err(|e| self.tunnel_error(id, e))?;
                let s = self.open(&fresh).await.map_err(|e| {
                    ProxyError::BadGateway(format!(
                        "cannot open a stream to environment {id} through gateway {}: {e}",
                        fresh.gateway_id
                    ))
                })?;
                Ok((fresh, s))
            }
        }
    }

    async fn open(&self, loc: &TunnelLocation) -> Result<TunnelStream, OpenError> {
        self.dialer.open_stream(loc).await
    }

    fn tunnel_error(&self, id: EnvId, e: TunnelError) -> ProxyError {
        match e {
            TunnelError::Store(e) => ProxyError::Store(e),
            TunnelError::Timeout(wait) => {
                let last = self.fleet.stats.last_checkin_ms(id);
                let now = now_ms();
                let seen = match last {
                    None => "it has not checked in with this replica".to_owned(),
                    Some(t) => format!(
                        "its last check-in here was {} s ago ({})",
                        now.saturating_sub(t) / 1000,
                        match liveness(Some(t), 5, now) {
                            Liveness::Up => "up",
                            _ => "down",
                        }
                    ),
                };
                ProxyError::Timeout(format!(
                    "the agent of environment {id} did not open its tunnel within {} s; {seen}",
                    wait.as_secs()
                ))
            }
        }
    }
}

pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    }) && h.contains_key(header::UPGRADE)
}

/// Which way headers go through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toward {
    /// The operator's request, to the engine (a device, which may be compromised).
    Engine,
    /// The engine's answer, to the operator (in a browser: on the console's origin).
    Operator,
}

/// Copies end-to-end headers; hop-by-hop ones stay behind (hyper frames bodies itself).
/// Toward the engine, nothing that proves or reveals the operator passes: the API key, the
/// console's cookie and CSRF token, where the browser was. Toward the operator, nothing that
/// would act on the console's origin in a browser passes: cookies, site data, CORS, a policy
/// of the engine's own, refreshes and links. `Connection: Upgrade` and `Upgrade` pass for
/// hijacks.
pub fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, upgrade: bool, toward: Toward) {
    const HOP: [&str; 7] = [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ];
    const TO_ENGINE_NEVER: [&str; 6] = [
        "x-api-key",
        "cookie",
        "x-csrf-token",
        "origin",
        "referer",
        "authorization",
    ];
    const TO_OPERATOR_NEVER: [&str; 6] = [
        "set-cookie",
        "clear-site-data",
        "content-security-policy",
        "content-security-policy-report-only",
        "refresh",
        "link",
    ];
    for (name, value) in from {
        let n = name.as_str();
        if HOP.contains(&n) || n == "host" {
            continue;
        }
        let refused = match toward {
            Toward::Engine => TO_ENGINE_NEVER.contains(&n) || n.starts_with("sec-fetch-"),
            Toward::Operator => TO_OPERATOR_NEVER.contains(&n) || n.starts_with("access-control-"),
        };
        if refused {
            continue;
        }
        if (n == "connection" || n == "upgrade") && !upgrade {
            continue;
        }
        to.append(HeaderName::clone(name), value.clone());
    }
}

fn empty_body() -> EngineBody {
    Box::pin(Empty::new().map_err(|never| match never {}))
}

/// Whether a request with `headers` has no body (HTTP/1.1 framing: neither a length above 0
/// nor a transfer coding).
fn has_no_body(headers: &HeaderMap) -> bool {
    !headers.contains_key(header::TRANSFER_ENCODING)
        && headers
            .get(header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// A failed exchange with the agent: its refusal to reach the engine (which travels as the
/// source of hyper's I/O error), or the tunnel failing under the request.
fn from_hyper(id: EnvId, loc: &TunnelLocation, e: hyper::Error) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            if let Some(r) = io.get_ref().and_then(|r| r.downcast_ref::<Refused>()) {
                return ProxyError::EngineUnreachable(format!("environment {id}: {}", r.0));
            }
        }
        source = s.source();
    }
    ProxyError::BadGateway(format!(
        "environment {id}: the tunnel (gateway {}, epoch {}) failed during the request: {e}",
        loc.gateway_id, loc.epoch
    ))
}

/// The hyper server's form of an error answer (actix has its own, from the same table).
fn error_response(e: ProxyError) -> Response<ProxyBody> {
    let e = ApiError::from(e);
    let mut res = Response::new(
        Full::new(Bytes::from(e.body()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *res.status_mut() = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if e.closes_connection() {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(secs) = e.retry_after() {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    res
}

/// The agent's refusal of a stream (it could not reach its engine).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// A tunnel stream whose first frame is the agent's [`StreamOpen`]: reads consume and check
/// it before passing the engine's bytes through; writes pass at once (the request is sent
/// without waiting a round trip for the agent's answer).
struct Opened<S> {
    inner: S,
    head: Vec<u8>,
    open: bool,
}

impl<S> Opened<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            head: Vec::with_capacity(16),
            open: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Opened<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while !this.open {
            let need = if this.head.len() < 2 {
                2
            } else {
                let len = frame_len([this.head[0], this.head[1]])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                2 + len
            };
            if this.head.len() == need && need > 2 {
                let msg: StreamOpen = decode_body(&this.head[2..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                match msg {
                    StreamOpen::Ok => {
                        this.open = true;
                        this.head = Vec::new();
                        break;
                    }
                    StreamOpen::Refused { message, .. } => {
                        return Poll::Ready(Err(io::Error::other(Refused(message))));
                    }
                }
            }
            let mut byte = [0u8; MAX_TUNNEL_FRAME];
            let want = need - this.head.len();
            let mut rb = ReadBuf::new(&mut byte[..want]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the tunnel stream closed before the agent answered",
                    )))
                }
                Poll::Ready(Ok(())) => this.head.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

write_through!(Opened);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_engine_never_sees_the_operators_credentials() {
        let from = headers(&[
            ("x-api-key", "k"),
            ("cookie", "edgeplane_session=v1.1.2.3"),
            ("x-csrf-token", "t"),
            ("origin", "https://cp"),
            ("referer", "https://cp/ui/"),
            ("sec-fetch-site", "same-origin"),
            ("authorization", "Basic x"),
            ("content-type", "application/json"),
            ("x-registry-auth", "r"),
        ]);
        let mut to = HeaderMap::new();
        copy_headers(&from, &mut to, false, Toward::Engine);
        let names: Vec<&str> = to.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-registry-auth"]);
    }

    #[test]
    fn the_operators_browser_never_gets_what_would_act_on_its_origin() {
        let from = headers(&[
            ("set-cookie", "edgeplane_session=junk; Path=/api/endpoints"),
            ("clear-site-data", "\"cookies\""),
            ("access-control-allow-origin", "*"),
            ("content-security-policy", "default-src *"),
            ("refresh", "0;url=https://evil"),
            ("link", "<https://evil>; rel=preload"),
            ("content-type", "text/html"),
            ("docker-experimental", "false"),
        ]);
        let mut to = HeaderMap::new();
        copy_headers(&from, &mut to, false, Toward::Operator);
        let names: Vec<&str> = to.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type", "docker-experimental"]);
    }

    #[test]
    fn docker_paths() {
        assert_eq!(docker_path("/api/endpoints/7/docker"), Some((7, "")));
        assert_eq!(
            docker_path("/api/endpoints/7/docker/v1.41/containers/json"),
            Some((7, "/v1.41/containers/json"))
        );
        assert_eq!(docker_path("/api/endpoints/7/dockerx"), None);
        assert_eq!(docker_path("/api/endpoints/x/docker/_ping"), None);
        assert_eq!(docker_path("/api/endpoints/7"), None);
        assert_eq!(docker_path("/edge/c"), None);
        assert_eq!(engine_target("", None), "/");
        assert_eq!(engine_target("/_ping", Some("a=1")), "/_ping?a=1");
    }

    #[tokio::test]
    async fn the_stream_status_is_consumed_before_the_engine_bytes() {
        let (mut agent, cp) = tokio::io::duplex(1024);
        let mut frame = proto::tunnel::encode_frame(&StreamOpen::Ok).unwrap();
        frame.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        agent.write_all(&frame).await.unwrap();
        drop(agent);
        let mut opened = Opened::new(cp);
        let mut out = String::new();
        opened.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "HTTP/1.1 200 OK\r\n");

        let (mut agent, cp) = tokio::io::duplex(1024);
        let frame = proto::tunnel::encode_frame(&StreamOpen::Refused {
            code: proto::tunnel::StreamRefusal::EngineUnreachable,
            message: "cannot connect to DOCKER_HOST".into(),
        })
        .unwrap();
        agent.write_all(&frame).await.unwrap();
        let err = Opened::new(cp).read_u8().await.unwrap_err();
        assert!(err.to_string().contains("DOCKER_HOST"), "{err}");
    }
}
