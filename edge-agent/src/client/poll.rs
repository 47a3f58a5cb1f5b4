//! [`PollClient`]: one agent's calls home on one kept-alive connection (opened by
//! `connection`): check-ins on the three routes, snapshot uploads and async-mode ticks,
//! signed, with the retries that help at once (clock skew, a dead kept-alive connection, a
//! lost binding, a server without held check-ins).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_LENGTH, HOST, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use proto::async_mode::{
    AsyncAnswer, AsyncRequest, CommandResult, SnapshotReport, MAX_ASYNC_ANSWER, MAX_ASYNC_FRAME,
};
use proto::codec::{self, MAX_CONTROL_FRAME};
use proto::proof::{self, ProofKey, Route};
use proto::snapshot::{SnapshotUpload, MAX_UPLOAD_FRAME};
use proto::wire::{
    AgentInfo, CheckinAnswer, CheckinRequest, EdgeStatus, Platform, SealedCredentials,
};
use proto::JoinToken;
use uuid::Uuid;

use super::connection::{is_dead_connection, Sender, Target};
use super::{
    error_from_answer, ByteCounters, CheckinError, NewConnection, RefusalCode, SetupError,
    DEFAULT_INTERVAL, MAX_ERROR_BODY, MAX_HOLD, TIMEOUT_SLACK, UPLOAD_TIMEOUT,
};
use crate::clock::SharedClock;
use crate::tls;
use proto::stacks::{
    DesiredState, StackReport, StackState, StackSync, MAX_DESIRED_ANSWER, MAX_REPORT_FRAME,
    MAX_SYNC_FRAME,
};

/// The result of a successful check-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckinOutcome {
    pub status: EdgeStatus,
    /// When to check in next.
    pub interval: Duration,
    /// Sealed one-time tunnel credentials, with `EdgeStatus::Required`.
    pub tunnel: Option<SealedCredentials>,
    /// Set when this check-in opened a new connection.
    pub connection: Option<NewConnection>,
    /// The server corrected our clock during this check-in.
    pub clock_corrected: bool,
    /// The digest of the stacks this environment should run, while the server has not heard
    /// us acknowledge it (see [`proto::stacks`]).
    pub desired: Option<u64>,
}

/// How to build a [`PollClient`]; start from [`PollOptions::new`].
#[derive(Debug, Clone)]
pub struct PollOptions {
    pub edge_id: Uuid,
    pub agent_secret: Option<String>,
    /// Accept any server certificate (`EDGE_INSECURE_POLL=1`).
    pub insecure: bool,
    /// Local address to bind before connecting (load tests spread agents over 127.0.0.0/8).
    pub local_addr: Option<IpAddr>,
    /// Where socket bytes are counted.
    pub counters: Arc<ByteCounters>,
    /// Sent on the first check-in and after errors.
    pub agent_info: AgentInfo,
    /// A TLS configuration to share between clients; `None` builds one from the token.
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
    /// Interval assumed until the server answers.
    pub initial_interval: Duration,
    /// Where timestamps come from; share one between the clients of one agent.
    pub clock: SharedClock,
}

impl PollOptions {
    pub fn new(edge_id: Uuid) -> Self {
        Self {
            edge_id,
            agent_secret: None,
            insecure: false,
            local_addr: None,
            counters: ByteCounters::new(),
            agent_info: agent_info(hostname()),
            tls_config: None,
            initial_interval: DEFAULT_INTERVAL,
            clock: SharedClock::new(),
        }
    }
}

/// This build's [`AgentInfo`] for a Docker host named `hostname`.
pub fn agent_info(hostname: String) -> AgentInfo {
    AgentInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        platform: Platform::Docker,
        hostname,
    }
}

/// The kernel's host name, or `unknown`.
pub fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Which route a check-in takes. All three carry the same signed [`CheckinRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckinRoute {
    /// `/edge/c`: the server answers at once.
    Plain,
    /// `/edge/h`: the server may hold an idle answer for up to the interval and answers the
    /// moment a tunnel is wanted. Servers that do not know the route get plain check-ins.
    Held,
    /// `/edge/t`: the agent lost a tunnel in use and asks for fresh credentials itself.
    AskTunnel,
}

impl CheckinRoute {
    /// The route the MAC of a check-in sent here covers.
    pub fn proof_route(self) -> Route {
        match self {
            CheckinRoute::Plain => Route::Checkin,
            CheckinRoute::Held => Route::Held,
            CheckinRoute::AskTunnel => Route::Tunnel,
        }
    }
}

/// What an async-mode tick carries (see [`PollClient::async_tick`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AsyncTick {
    pub snapshot: Option<SnapshotReport>,
    pub results: Vec<CommandResult>,
    pub done_through: Option<u64>,
}

/// A check-in client for one agent: one kept-alive connection, re-established on error.
#[derive(Debug)]
pub struct PollClient {
    endpoint_id: u64,
    edge_id: Uuid,
    key: ProofKey,
    pub(super) target: Target,
    pub(super) local_addr: Option<IpAddr>,
    pub(super) counters: Arc<ByteCounters>,
    agent_info: AgentInfo,
    conn: Option<Sender>,
    clock: SharedClock,
    send_agent_info: bool,
    interval: Duration,
    pub(super) connects: u64,
    /// Cleared when the server does not know the held check-in route (an older version).
    held_supported: bool,
}

/// A failed attempt, and whether it failed on a reused connection before any answer (the
/// server may have closed an idle keep-alive connection just as we used it).
struct AttemptError {
    error: CheckinError,
    stale_reuse: bool,
}

impl From<CheckinError> for AttemptError {
    fn from(error: CheckinError) -> Self {
        Self {
            error,
            stale_reuse: false,
        }
    }
}

/// One request to send: where, what, and how large a successful answer may be.
struct Prepared {
    uri: Uri,
    body: Vec<u8>,
    answer_limit: usize,
    /// Whether a kept-alive connection found dead before the answer is replaced at once:
    /// not for a held check-in, which was in flight for up to an interval, so its connection
    /// did not die idle under it; the server (or the way to it) went away, under every agent
    /// at once, and the agent's loop spreads the fleet's retries over an interval instead
    /// (`retry::after_failure`).
    replace_stale: bool,
}

/// A successful (2xx) answer.
struct RawAnswer {
    status: StatusCode,
    body: Bytes,
    connection: Option<NewConnection>,
}

impl PollClient {
    pub fn new(token: &JoinToken, options: PollOptions) -> Result<Self, SetupError> {
        let PollOptions {
            edge_id,
            agent_secret,
            insecure,
            local_addr,
            counters,
            agent_info,
            tls_config,
            initial_interval,
            clock,
        } = options;
        let target = Target::new(&token.api_url, || match tls_config {
            Some(c) => Ok(c),
            None => tls::client_config(token.tunnel_fingerprint, insecure),
        })?;
        Ok(Self {
            endpoint_id: token.endpoint_id,
            edge_id,
            key: ProofKey::derive(&token.secret, agent_secret.as_deref()),
            target,
            local_addr,
            counters,
            agent_info,
            conn: None,
            clock,
            send_agent_info: true,
            interval: initial_interval.max(Duration::from_secs(1)),
            connects: 0,
            held_supported: true,
        })
    }

    /// A new client for the same agent, on its own connection (opened on first use): same
    /// key, TLS configuration, byte counters and interval, and the same clock, so timestamps
    /// stay strictly increasing across both. For requests that must not wait behind a held
    /// check-in (tunnel requests, snapshot uploads).
    pub fn sibling(&self) -> Self {
        Self {
            endpoint_id: self.endpoint_id,
            edge_id: self.edge_id,
            key: self.key.clone(),
            target: self.target.clone(),
            local_addr: self.local_addr,
            counters: self.counters.clone(),
            agent_info: self.agent_info.clone(),
            conn: None,
            clock: self.clock.clone(),
            send_agent_info: true,
            interval: self.interval,
            connects: 0,
            held_supported: self.held_supported,
        }
    }

    pub fn edge_id(&self) -> Uuid {
        self.edge_id
    }

    pub fn endpoint_id(&self) -> u64 {
        self.endpoint_id
    }

    /// The interval the server asked for last (or the initial one).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Sets the interval this client reports (a sibling follows the main client's).
    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval.max(Duration::from_secs(1));
    }

    pub fn counters(&self) -> &Arc<ByteCounters> {
        &self.counters
    }

    /// How many connections this client has opened.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    pub fn clock_offset_ms(&self) -> i64 {
        self.clock.offset_ms()
    }

    /// The clock this client takes its timestamps from.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Whether held check-ins are still tried (cleared when the server does not know them).
    pub fn held_supported(&self) -> bool {
        self.held_supported
    }

    /// Closes the connection; the next check-in opens a new one.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// How long a request may take before it counts as timed out: a held check-in may be held
    /// for the whole interval; others are answered at once (the interval only adds patience,
    /// at most [`MAX_HOLD`]).
    pub fn timeout_for(&self, route: CheckinRoute) -> Duration {
        match route {
            CheckinRoute::Held => self.interval + TIMEOUT_SLACK,
            CheckinRoute::Plain | CheckinRoute::AskTunnel => {
                self.interval.min(MAX_HOLD) + TIMEOUT_SLACK
            }
        }
    }

    /// One plain check-in (answered at once); see [`PollClient::checkin_via`].
    pub async fn checkin(&mut self) -> Result<CheckinOutcome, CheckinError> {
        self.checkin_via(CheckinRoute::Plain).await
    }

    /// One check-in on `route`: connect if needed, send, read the answer. A `clock_skew`
    /// refusal is fixed and retried at once (once); a kept-alive connection found dead before
    /// answering is replaced at once (once; not under a held check-in, see
    /// `Prepared::replace_stale`); a `replay` refusal (this process never signs the
    /// same millisecond twice, so another node of the same swarm, one Edge ID and key, signed
    /// the same frame in the same millisecond) is signed again after a pause of 1-4 ms
    /// (once). Times out after [`PollClient::timeout_for`]. A server that does not know held
    /// check-ins (404 without an agent error code) gets a plain check-in at once, and only
    /// plain ones from then on.
    pub async fn checkin_via(
        &mut self,
        route: CheckinRoute,
    ) -> Result<CheckinOutcome, CheckinError> {
        let route = if route == CheckinRoute::Held && !self.held_supported {
            CheckinRoute::Plain
        } else {
            route
        };
        let result = self.call_checkin(route).await;
        if route == CheckinRoute::Held {
            if let Err(CheckinError::Refused {
                status: 404,
                code: RefusalCode::Other(_),
                ..
            }) = &result
            {
                self.held_supported = false;
                tracing::info!(
                    "the control plane does not hold check-ins (older version); polling instead"
                );
                return self.call_checkin(CheckinRoute::Plain).await;
            }
        }
        result
    }

    async fn call_checkin(&mut self, route: CheckinRoute) -> Result<CheckinOutcome, CheckinError> {
        let timeout = self.timeout_for(route);
        let (mut outcome, skew_fixed) = self
            .call(
                timeout,
                |c| c.prepare_checkin(route),
                |c, raw| c.read_checkin_answer(raw),
            )
            .await?;
        outcome.clock_corrected |= skew_fixed;
        Ok(outcome)
    }

    /// Uploads a [`proto::snapshot::compress`]ed snapshot to the snapshot route, signed like a
    /// check-in. Success is any 2xx (the control plane answers 204).
    pub async fn upload_snapshot(&mut self, compressed: &[u8]) -> Result<(), CheckinError> {
        self.call(
            UPLOAD_TIMEOUT,
            |c| c.prepare_upload(compressed),
            |_, _| Ok(()),
        )
        .await
        .map(|((), _)| ())
    }

    fn prepare_checkin(&mut self, route: CheckinRoute) -> Result<Prepared, CheckinError> {
        // The Edge ID travels with the first check-in and after errors, like the agent info;
        // in the steady state the MAC covers it and the server supplies the bound one.
        let timestamp_ms = self.clock.next_timestamp();
        let request = self.checkin_request(timestamp_ms);
        let body = self.sign(
            &request,
            route.proof_route(),
            timestamp_ms,
            MAX_CONTROL_FRAME,
        )?;
        Ok(Prepared {
            uri: self.target.checkin_uri(route).clone(),
            body,
            answer_limit: MAX_CONTROL_FRAME,
            replace_stale: route != CheckinRoute::Held,
        })
    }

    /// One async-mode tick (see [`proto::async_mode`]): the agent's report out, the server's
    /// intervals and commands back. Retried like a check-in; the request is rebuilt for each
    /// attempt (a fresh timestamp), so retries repeat the results, which the server takes once.
    pub async fn async_tick(&mut self, tick: &AsyncTick) -> Result<AsyncAnswer, CheckinError> {
        self.call(
            UPLOAD_TIMEOUT,
            |c| c.prepare_async(tick),
            |c, raw| c.read_async_answer(raw),
        )
        .await
        .map(|(answer, _)| answer)
    }

    fn prepare_async(&mut self, tick: &AsyncTick) -> Result<Prepared, CheckinError> {
        let timestamp_ms = self.clock.next_timestamp();
        let request = AsyncRequest {
            checkin: self.checkin_request(timestamp_ms),
            snapshot: tick.snapshot.clone(),
            results: tick.results.clone(),
            done_through: tick.done_through,
        };
        let body = self.sign(&request, Route::Async, timestamp_ms, MAX_ASYNC_FRAME)?;
        Ok(Prepared {
            uri: self.target.async_tick.clone(),
            body,
            answer_limit: MAX_ASYNC_ANSWER,
            replace_stale: true,
        })
    }

    fn read_async_answer(&mut self, raw: RawAnswer) -> Result<AsyncAnswer, CheckinError> {
        if raw.status != StatusCode::OK {
            return Err(CheckinError::Protocol {
                status: raw.status.as_u16(),
                detail: "unexpected status".to_owned(),
            });
        }
        let answer: AsyncAnswer =
            codec::decode(&raw.body, MAX_ASYNC_ANSWER).map_err(|e| CheckinError::Protocol {
                status: 200,
                detail: format!("undecodable answer: {e}"),
            })?;
        if let Some(server_ms) = answer.server_time_ms {
            self.clock.learn(server_ms);
        }
        if let Some(smallest) = answer.intervals.smallest() {
            self.interval = Duration::from_secs(u64::from(smallest));
        }
        Ok(answer)
    }

    /// Fetches the stacks this environment should run ([`proto::stacks::DESIRED_PATH`]).
    pub async fn fetch_desired(&mut self) -> Result<DesiredState, CheckinError> {
        self.call(
            UPLOAD_TIMEOUT,
            |c| {
                let sync = c.stack_sync();
                let body = c.sign(&sync, Route::Desired, sync.timestamp_ms, MAX_SYNC_FRAME)?;
                Ok(Prepared {
                    uri: c.target.desired.clone(),
                    body,
                    answer_limit: MAX_DESIRED_ANSWER,
                    replace_stale: true,
                })
            },
            |_, raw| {
                if raw.status != StatusCode::OK {
                    return Err(CheckinError::Protocol {
                        status: raw.status.as_u16(),
                        detail: "unexpected status".to_owned(),
                    });
                }
                codec::decode(&raw.body, MAX_DESIRED_ANSWER).map_err(|e| CheckinError::Protocol {
                    status: 200,
                    detail: format!("undecodable desired state: {e}"),
                })
            },
        )
        .await
        .map(|(state, _)| state)
    }

    /// Reports stack statuses, acknowledging the desired state `digest`
    /// ([`proto::stacks::STACK_REPORT_PATH`]). Success is any 2xx (the server answers 204).
    pub async fn report_stacks(
        &mut self,
        digest: u64,
        statuses: &[StackState],
    ) -> Result<(), CheckinError> {
        self.call(
            UPLOAD_TIMEOUT,
            |c| {
                let sync = c.stack_sync();
                let ts = sync.timestamp_ms;
                let report = StackReport {
                    sync,
                    digest,
                    statuses: statuses.to_vec(),
                };
                let body = c.sign(&report, Route::Report, ts, MAX_REPORT_FRAME)?;
                Ok(Prepared {
                    uri: c.target.report.clone(),
                    body,
                    answer_limit: MAX_ERROR_BODY,
                    replace_stale: true,
                })
            },
            |_, _| Ok(()),
        )
        .await
        .map(|((), _)| ())
    }

    fn stack_sync(&self) -> StackSync {
        StackSync {
            endpoint_id: self.endpoint_id,
            edge_id: self.edge_id,
            timestamp_ms: self.clock.next_timestamp(),
        }
    }

    fn prepare_upload(&mut self, compressed: &[u8]) -> Result<Prepared, CheckinError> {
        let timestamp_ms = self.clock.next_timestamp();
        let upload = SnapshotUpload {
            endpoint_id: self.endpoint_id,
            edge_id: self.edge_id,
            timestamp_ms,
            body: compressed.to_vec(),
        };
        let body = self.sign(&upload, Route::Snapshot, timestamp_ms, MAX_UPLOAD_FRAME)?;
        Ok(Prepared {
            uri: self.target.snapshot.clone(),
            body,
            answer_limit: MAX_ERROR_BODY,
            replace_stale: true,
        })
    }

    /// The check-in header every request carries: identity, timestamp, interval, and the
    /// agent's information on the first request of a process and after errors.
    fn checkin_request(&self, timestamp_ms: u64) -> CheckinRequest {
        CheckinRequest {
            endpoint_id: self.endpoint_id,
            edge_id: self.send_agent_info.then_some(self.edge_id),
            timestamp_lo: proto::wire::timestamp_lo(timestamp_ms),
            // The high bits go with the Edge ID, so a far-off clock is reported as skewed.
            timestamp_hi: self.send_agent_info.then_some((timestamp_ms >> 32) as u32),
            interval_secs: u32::try_from(self.interval.as_secs()).unwrap_or(u32::MAX),
            agent: self.send_agent_info.then(|| self.agent_info.clone()),
        }
    }

    /// A signed frame of `msg` for `route`, refused locally when it is over `limit` bytes.
    fn sign<T: serde::Serialize>(
        &self,
        msg: &T,
        route: Route,
        timestamp_ms: u64,
        limit: usize,
    ) -> Result<Vec<u8>, CheckinError> {
        let body = proof::sign(msg, route, &self.key, &self.edge_id, timestamp_ms)
            .map_err(CheckinError::Encode)?;
        if body.len() > limit {
            return Err(CheckinError::TooLarge {
                len: body.len(),
                limit,
            });
        }
        Ok(body)
    }

    fn read_checkin_answer(&mut self, raw: RawAnswer) -> Result<CheckinOutcome, CheckinError> {
        let RawAnswer {
            status,
            body,
            connection,
        } = raw;
        if status == StatusCode::NO_CONTENT {
            // Nothing new: idle, our interval is current, our clock is fine.
            return Ok(CheckinOutcome {
                status: EdgeStatus::Idle,
                interval: self.interval,
                tunnel: None,
                connection,
                clock_corrected: false,
                desired: None,
            });
        }
        if status != StatusCode::OK {
            return Err(CheckinError::Protocol {
                status: status.as_u16(),
                detail: "unexpected status".to_owned(),
            });
        }
        let answer: CheckinAnswer =
            codec::decode(&body, MAX_CONTROL_FRAME).map_err(|e| CheckinError::Protocol {
                status: 200,
                detail: format!("undecodable answer: {e}"),
            })?;
        let mut clock_corrected = false;
        if let Some(server_ms) = answer.server_time_ms {
            self.clock.learn(server_ms);
            clock_corrected = true;
        }
        self.interval = Duration::from_secs(u64::from(answer.interval_secs.max(1)));
        Ok(CheckinOutcome {
            status: answer.status,
            interval: self.interval,
            tunnel: answer.tunnel,
            connection,
            clock_corrected,
            desired: answer.desired,
        })
    }

    /// Sends a request built by `prepare` (again for each retry: a fresh timestamp) and reads
    /// its answer with `read`, with the retries described at [`PollClient::checkin_via`].
    /// Returns whether the clock was corrected on the way.
    async fn call<T>(
        &mut self,
        timeout: Duration,
        mut prepare: impl FnMut(&mut Self) -> Result<Prepared, CheckinError>,
        mut read: impl FnMut(&mut Self, RawAnswer) -> Result<T, CheckinError>,
    ) -> Result<(T, bool), CheckinError> {
        let mut skew_fixed = false;
        let mut stale_replaced = false;
        let mut id_resent = false;
        let mut replay_resigned = false;
        loop {
            let result = match prepare(self) {
                Ok(prepared) => match tokio::time::timeout(timeout, self.attempt(prepared)).await {
                    Ok(result) => result.and_then(|raw| read(self, raw).map_err(Into::into)),
                    Err(_) => Err(CheckinError::Timeout(timeout).into()),
                },
                Err(e) => Err(e.into()),
            };
            let AttemptError { error, stale_reuse } = match result {
                Ok(value) => {
                    self.send_agent_info = false;
                    return Ok((value, skew_fixed));
                }
                Err(e) => e,
            };
            // "The first check-in after any error" carries the agent info again, but not the
            // one signed again after a replay: that is another node of the swarm signing in
            // the same millisecond, not a sign the server lost us, and a held check-in with
            // agent info is answered at once instead of held.
            let collision = !replay_resigned
                && matches!(
                    error,
                    CheckinError::Refused {
                        code: RefusalCode::Replay,
                        ..
                    }
                );
            if !collision {
                self.send_agent_info = true;
            }
            if error.breaks_connection() {
                self.conn = None;
            }
            if stale_reuse && !stale_replaced {
                stale_replaced = true;
                continue;
            }
            // The server lost our binding (e.g. restored store) while we omitted the Edge ID:
            // the retry carries it (send_agent_info is set above).
            if let CheckinError::Refused {
                code: RefusalCode::EdgeIdRequired,
                ..
            } = &error
            {
                if !id_resent {
                    id_resent = true;
                    continue;
                }
            }
            if let CheckinError::Refused {
                code: RefusalCode::Replay,
                ..
            } = &error
            {
                if !replay_resigned {
                    replay_resigned = true;
                    let pause = rand::Rng::gen_range(&mut rand::thread_rng(), 1..=4);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    continue;
                }
            }
            if let CheckinError::Refused {
                code: RefusalCode::ClockSkew,
                server_time_ms: Some(server_ms),
                ..
            } = &error
            {
                if !skew_fixed {
                    skew_fixed = true;
                    self.clock.learn(*server_ms);
                    tracing::info!(
                        offset_ms = self.clock.offset_ms(),
                        "clock corrected from the server's clock_skew answer"
                    );
                    continue;
                }
            }
            return Err(error);
        }
    }

    async fn attempt(&mut self, prepared: Prepared) -> Result<RawAnswer, AttemptError> {
        // Take the connection out: if this future is dropped (timeout, shutdown) midway, the
        // half-used connection goes with it.
        let mut reusable = self.conn.take();
        if let Some(sender) = reusable.as_mut() {
            if sender.ready().await.is_err() {
                reusable = None;
            }
        }
        let (mut sender, connection) = match reusable {
            Some(sender) => (sender, None),
            None => {
                let (sender, info) = self.connect().await?;
                (sender, Some(info))
            }
        };
        let reused = connection.is_none();

        let Prepared {
            uri,
            body,
            answer_limit,
            replace_stale,
        } = prepared;
        let body_len = body.len();
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(HOST, self.target.authority.clone());
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body_len));

        let response = sender.send_request(req).await.map_err(|e| {
            let stale = reused && replace_stale && is_dead_connection(&e);
            AttemptError {
                error: CheckinError::Http(e),
                stale_reuse: stale,
            }
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let limit = if status.is_success() {
            answer_limit
        } else {
            MAX_ERROR_BODY
        };
        let body = match Limited::new(response.into_body(), limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                return Err(match e.downcast::<hyper::Error>() {
                    Ok(e) => CheckinError::Http(*e),
                    Err(_) => CheckinError::Protocol {
                        status: status.as_u16(),
                        detail: format!("answer body larger than {limit} bytes"),
                    },
                }
                .into())
            }
        };
        // The exchange is complete: the connection can serve the next request.
        self.conn = Some(sender);
        if status.is_success() {
            Ok(RawAnswer {
                status,
                body,
                connection,
            })
        } else {
            Err(error_from_answer(status, retry_after, &body).into())
        }
    }
}
