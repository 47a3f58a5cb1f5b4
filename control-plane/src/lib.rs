//! edgeplane control plane. See `docs/ARCHITECTURE.md` for the code map.
//!
//! [`prepare`] opens the store, loads TLS material and bootstraps the admin key;
//! [`Prepared::serve`] runs the HTTPS API and the plain-HTTP metrics listener until the
//! shutdown future resolves. `main.rs` only parses flags and calls these two.

#[macro_use]
mod macros;

pub mod api;
pub mod auth;
pub mod bootstrap;
pub mod config;
pub mod directory;
pub mod docker_proxy;
pub mod engine_pool;
pub mod error;
pub mod fleet;
pub mod front;
pub mod metrics;
pub mod rollout;
pub mod session;
pub mod stack_vars;
pub mod targets;
pub mod tls;
pub mod ui;
pub mod workers;

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;

use actix_web::{web, App, HttpResponse, HttpServer};
use gateway::admission::Admission;
use gateway::{Dialer, Gateway, GatewayConfig};
use proto::clock::now_ms;
use serde::Deserialize;
use store::{Change, SharedStore};
use tokio_util::sync::CancellationToken;

use crate::api::{AppState, PublicInfo};
use crate::bootstrap::AdminKeySource;
use crate::config::{Config, TlsSource};
use crate::docker_proxy::DockerProxy;
use crate::fleet::Fleet;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error("cannot listen: {0}")]
    Listen(std::io::Error),
    #[error("server failed: {0}")]
    Server(std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("embedded tunnel gateway: {0}")]
    Gateway(#[from] gateway::GatewayError),
}

/// The sockets to serve on (bound by the caller, so tests can use port 0).
pub struct Listeners {
    pub api: TcpListener,
    pub metrics: TcpListener,
    /// The embedded gateway's listener; `None` binds `--tunnel-addr` (when the embedded
    /// gateway runs at all).
    pub tunnel: Option<TcpListener>,
}

/// Everything ready to serve.
pub struct Prepared {
    pub config: Config,
    pub store: SharedStore,
    pub public: PublicInfo,
    pub admin_key_source: AdminKeySource,
    pub cert_path: std::path::PathBuf,
    admin: api::AdminKeys,
    tls: Arc<rustls::ServerConfig>,
    listeners: Listeners,
}

/// Opens the store: the embedded one in the data dir, or Redis, waiting while it cannot be
/// reached (see [`connect_redis`]); `metrics` answers readiness probes meanwhile.
pub async fn open_store(config: &Config, metrics: &TcpListener) -> Result<SharedStore, RunError> {
    bootstrap::private_dir(&config.data_dir).map_err(|source| RunError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    Ok(match &config.redis_url {
        Some(url) => Arc::new(connect_redis(url, &config.redis_prefix, metrics).await?),
        None => Arc::new(store::embedded::EmbeddedStore::open(&config.data_dir)?),
    })
}

/// [`open_store`], then [`prepare_on`].
pub async fn prepare(config: Config, listeners: Listeners) -> Result<Prepared, RunError> {
    let store = open_store(&config, &listeners.metrics).await?;
    prepare_on(config, store, listeners).await
}

/// Loads TLS material and bootstraps the admin key on an open store. A binary binds its API
/// port only now (after [`open_store`]): a process sharing the port with others
/// (`--reuse-port`) must not take connections it cannot serve while it waits for Redis.
pub async fn prepare_on(
    config: Config,
    store: SharedStore,
    listeners: Listeners,
) -> Result<Prepared, RunError> {
    let api_addr = listeners.api.local_addr().map_err(RunError::Listen)?;
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| bootstrap::default_public_url(api_addr))
        .trim_end_matches('/')
        .to_owned();
    let public_host = bootstrap::url_host(&public_url)
        .ok_or_else(|| RunError::Config(format!("--public-url {public_url:?} has no host")))?;
    let tunnel_port = match &listeners.tunnel {
        Some(l) => l.local_addr().map_err(RunError::Listen)?.port(),
        None => config.tunnel_addr.port(),
    };
    let tunnel_addr = match &config.tunnel_public_addr {
        Some(a) => a.clone(),
        None if public_host.contains(':') => format!("[{public_host}]:{tunnel_port}"),
        None => format!("{public_host}:{tunnel_port}"),
    };
    let tls = tls::load(
        &config.tls,
        &config.data_dir,
        std::slice::from_ref(&public_host),
    )?;
    match (&config.tls, &config.redis_url) {
        (TlsSource::Files { .. }, _) => tracing::info!("using the given api certificate"),
        (TlsSource::SelfSigned, Some(_)) => tracing::warn!(
            cert = %tls.cert_path.display(),
            "cluster mode with a generated certificate: every replica must serve the same \
             certificate (its fingerprint is in join keys); pass the same --tls-cert/--tls-key to all"
        ),
        (TlsSource::SelfSigned, None) => {}
    }
    let (admin, admin_key_source) =
        bootstrap::admin_key(&store, config.admin_api_key.as_deref(), &config.data_dir).await?;
    // Console sessions are signed with the API's private key mixed in: every replica serving
    // this address has it, a copy of the store does not.
    match std::fs::read(tls::paths(&config.tls, &config.data_dir).1) {
        Ok(key) => admin.set_session_pepper(&key),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot read the API's private key again: console sessions hold on this replica only"
        ),
    }
    let public = PublicInfo {
        api_url: public_url,
        tunnel_addr,
        tunnel_fingerprint: tls.fingerprint,
    };
    // Join tokens must parse at the agent: check the parts once, here, with the agent's parser.
    proto::JoinToken::parse(
        &proto::JoinToken {
            api_url: public.api_url.clone(),
            tunnel_addr: public.tunnel_addr.clone(),
            tunnel_fingerprint: public.tunnel_fingerprint,
            endpoint_id: 1,
            secret: proto::token::JoinSecret::generate(),
        }
        .encode(),
    )
    .map_err(|e| {
        RunError::Config(format!(
            "public addresses do not make a valid join token: {e}"
        ))
    })?;
    Ok(Prepared {
        config,
        store,
        public,
        admin_key_source,
        cert_path: tls.cert_path,
        admin,
        tls: tls.server_config,
        listeners,
    })
}

/// Connects to Redis, waiting while it cannot be reached: a replica started while Redis is
/// down (or before it, as a whole cluster comes up) becomes ready when Redis does, instead of
/// exiting. Meanwhile its metrics listener answers `/healthz` 200 and `/readyz` 503 with the
/// reason, so an orchestrator sees a live replica that is not ready. An invalid URL fails at
/// once.
async fn connect_redis(
    url: &str,
    prefix: &str,
    metrics: &TcpListener,
) -> Result<store::redis::RedisStore, RunError> {
    store::redis::check_url(url).map_err(RunError::Config)?;
    let mut waiting: Option<tokio::task::JoinHandle<()>> = None;
    let mut delay = std::time::Duration::from_millis(250);
    let mut attempts = 0u64;
    let result = loop {
        match store::redis::RedisStore::connect(url, prefix).await {
            Ok(store) => break Ok(store),
            Err(e) if e.retry_may_help() => {
                attempts += 1;
                let reason = e.detail();
                // Once, then once a minute or so.
                if attempts == 1 || attempts.is_multiple_of(12) {
                    tracing::warn!(
                        redis = %store::redis::redact_url(url),
                        error = %reason,
                        attempts,
                        "waiting for redis"
                    );
                }
                if waiting.is_none() {
                    waiting = match metrics.try_clone() {
                        Ok(l) => Some(tokio::spawn(not_ready_yet(l, reason))),
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics listener not served while waiting");
                            None
                        }
                    };
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => break Err(e.into()),
        }
    };
    if let Some(w) = waiting {
        w.abort();
        let _ = w.await;
        if result.is_ok() {
            tracing::info!(attempts, "redis reachable: starting");
        }
    }
    result
}

/// Answers the metrics listener while the store is not there yet: `/healthz` 200 (the
/// process is alive), everything else 503 with `reason`.
async fn not_ready_yet(listener: TcpListener, reason: String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let reason = reason.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 1024];
            let n = tokio::time::timeout(std::time::Duration::from_secs(2), conn.read(&mut head))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            let live = head[..n].starts_with(b"GET /healthz ");
            let (status, body) = if live {
                ("200 OK", "ok\n".to_owned())
            } else {
                (
                    "503 Service Unavailable",
                    format!("waiting for the store: {reason}\n"),
                )
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(answer.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

impl Prepared {
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.listeners.metrics.local_addr().ok()
    }
}

#[derive(Deserialize)]
struct ShardQuery {
    shard: Option<u64>,
    shards: Option<u64>,
}

impl Prepared {
    /// Serves until `shutdown` resolves, then stops accepting, finishes in-flight requests
    /// and writes the last heartbeats.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        let Prepared {
            config,
            store,
            public,
            admin,
            tls,
            listeners,
            ..
        } = self;
        let metrics = Arc::new(Metrics::new());
        if let Some(read) = config.allocator_stats {
            metrics.watch_allocator(read);
        }
        let settings = store.settings().await?;
        let limits = config.limits.clone();
        let fleet = Fleet::new(
            Arc::clone(&store),
            &settings,
            config.agent_secret.clone(),
            Arc::clone(&metrics),
            limits.clone(),
        );
        let directory = directory::Directory::new(Arc::clone(&store), Arc::clone(&fleet));
        let state = web::Data::new(AppState {
            store: Arc::clone(&store),
            fleet: Arc::clone(&fleet),
            directory: Arc::clone(&directory),
            metrics: Arc::clone(&metrics),
            admin: admin.clone(),
            public,
            agent_secret: config.agent_secret.clone(),
            agent_image: config.agent_image.clone(),
            limits: limits.clone(),
        });

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let background = actix_rt::spawn(Arc::clone(&fleet).run_background(stop_rx.clone()));
        let directory_task = actix_rt::spawn(directory.run(stop_rx.clone()));
        let rollouts_task = actix_rt::spawn(rollout::run(state.clone(), stop_rx.clone()));
        let keys_task = actix_rt::spawn(watch_admin_keys(Arc::clone(&store), admin, stop_rx));

        // One admission for the process's public ports: one bound of connections below the
        // open-file limit, shared by the API and the embedded gateway.
        let admission = Admission::new(limits.admission);
        metrics.watch_admission(Arc::clone(&admission));

        // The embedded tunnel gateway (single node), on the certificate agents pin.
        let gateway_stop = CancellationToken::new();
        // Its tunnels run on the API's worker threads (see `workers`).
        let workers = Arc::new(workers::Workers::with_thread_cache(config.thread_cache));
        let gateway = if config.embedded_gateway {
            let listener = match listeners.tunnel {
                Some(l) => l,
                None => gateway::listen::bind(config.tunnel_addr).map_err(RunError::Listen)?,
            };
            let gw = GatewayConfig::new(
                format!("embedded-{}", gateway::random_suffix()),
                listener.local_addr().map_err(RunError::Listen)?,
                state.public.tunnel_addr.clone(),
                state.public.tunnel_addr.clone(),
                Arc::clone(&tls),
            )
            .with_lease(limits.gateway_lease)
            .with_first_byte_timeout(limits.first_byte_timeout)
            .with_admission(Arc::clone(&admission))
            .with_spawner(Arc::clone(&workers) as _);
            Some(
                Gateway::bind_std(gw, listener, Arc::clone(&store) as _, metrics.registry())
                    .await?,
            )
        } else {
            None
        };
        let gateway_task = gateway
            .clone()
            .map(|g| actix_rt::spawn(g.run(gateway_stop.clone())));
        let mut dialer = Dialer::new(state.public.tunnel_fingerprint, Arc::clone(&store) as _);
        if let Some(g) = &gateway {
            dialer = dialer.with_local(Arc::clone(g));
        }
        let proxy = Arc::new(DockerProxy {
            fleet: Arc::clone(&fleet),
            admin: state.admin.clone(),
            metrics: Arc::clone(&metrics),
            dialer: Arc::new(dialer),
            wait: limits.tunnel_wait,
            engine_idle: limits.engine_idle,
            workers: gateway.as_ref().map(|_| Arc::clone(&workers)),
        });

        let api_state = state.clone();
        let proxy_data = web::Data::from(Arc::clone(&proxy));
        // Agents' connections end at once when the server stops (see `front::lane`).
        let stopping = CancellationToken::new();
        let api = front::api_server(
            move || {
                App::new()
                    .app_data(api_state.clone())
                    .app_data(proxy_data.clone())
                    .wrap(
                        actix_web::middleware::ErrorHandlers::new()
                            .default_handler_client(api::json_errors)
                            .default_handler_server(api::json_errors),
                    )
                    .wrap(actix_web::middleware::from_fn(api_answer_headers))
                    .configure(api::configure)
            },
            state.clone(),
            listeners.api,
            Arc::clone(&tls),
            &limits,
            proxy,
            admission,
            metrics.front.clone(),
            stopping.clone(),
            workers,
        )
        .map_err(RunError::Listen)?;

        let m_state = state.clone();
        let metrics_server = HttpServer::new(move || {
            App::new()
                .app_data(m_state.clone())
                .route(
                    "/healthz",
                    web::get().to(|| async { HttpResponse::Ok().body("ok\n") }),
                )
                .route("/readyz", web::get().to(readyz))
                .route("/metrics", web::get().to(metrics_all))
                .route("/metrics/agents", web::get().to(metrics_agents))
        })
        .workers(1)
        .disable_signals()
        .listen(listeners.metrics)
        .map_err(RunError::Listen)?
        .run();

        let api_handle = api.handle();
        let metrics_handle = metrics_server.handle();
        let api_task = actix_rt::spawn(api);
        let metrics_task = actix_rt::spawn(metrics_server);
        tracing::info!(backend = store.backend(), "control plane serving");

        shutdown.await;
        tracing::info!("shutting down");
        // No new connections, then agents' connections told to come back later (a held
        // check-in answered now, `connection: close`), then the rest given their grace.
        api_handle.pause().await;
        stopping.cancel();
        // The embedded gateway's tunnels run on the API's workers and would end with them,
        // without a word to their agents: Docker calls through them are given the API's grace
        // to finish, then the gateway closes its tunnels, then the API stops.
        if let Some(g) = &gateway {
            let idle = metrics.engine_idle.clone();
            let calls = &g.metrics().streams_open;
            let drained = tokio::time::timeout(front::SHUTDOWN_GRACE, async {
                while calls.get() > idle.get() {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            });
            if drained.await.is_err() {
                tracing::warn!(
                    streams = calls.get() - idle.get(),
                    "docker calls through tunnels still running: cut"
                );
            }
        }
        gateway_stop.cancel();
        if let Some(t) = gateway_task {
            let _ = t.await;
        }
        api_handle.stop(true).await;
        metrics_handle.stop(true).await;
        let _ = stop_tx.send(true);
        let _ = background.await;
        let _ = keys_task.await;
        let _ = directory_task.await;
        let _ = rollouts_task.await;
        for t in [api_task, metrics_task] {
            if let Ok(Err(e)) = t.await {
                return Err(RunError::Server(e));
            }
        }
        Ok(())
    }
}

/// Headers every `/api` answer carries (the actix routes' and the Docker proxy's): an answer
/// is data, never a page. A browser does not sniff it into one, runs nothing from it and
/// frames it nowhere, even when an engine (a device, perhaps compromised) chose its content
/// type; and nothing of it is cached (join keys, snapshots).
pub fn api_headers() -> [(&'static str, &'static str); 3] {
    [
        ("x-content-type-options", "nosniff"),
        (
            "content-security-policy",
            "sandbox; default-src 'none'; frame-ancestors 'none'",
        ),
        ("cache-control", "no-store"),
    ]
}

/// Adds [`api_headers`] to `/api` answers that do not set their own.
async fn api_answer_headers(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    let is_api = req.path().starts_with("/api/");
    let mut res = next.call(req).await?;
    if is_api {
        for (name, value) in api_headers() {
            let name = actix_web::http::header::HeaderName::from_static(name);
            if !res.headers().contains_key(&name) {
                res.headers_mut().insert(
                    name,
                    actix_web::http::header::HeaderValue::from_static(value),
                );
            }
        }
    }
    Ok(res)
}

async fn watch_admin_keys(
    store: SharedStore,
    keys: api::AdminKeys,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut changes = store.subscribe();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            c = changes.recv() => match c {
                // Resync and Lagged: notifications may have been missed, so reload regardless.
                Ok(Change::AdminKeys | Change::Resync) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    match store.admin_key_hashes().await {
                        Ok(h) => keys.replace(h),
                        Err(e) => tracing::warn!(error = %e, "cannot reload admin keys"),
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.store.ping().await {
        Ok(()) => HttpResponse::Ok().body("ready\n"),
        Err(e) => HttpResponse::ServiceUnavailable().body(format!("store not ready: {e}\n")),
    }
}

async fn metrics_all(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render(&state.fleet.stats, now_ms()))
}

async fn metrics_agents(state: web::Data<AppState>, q: web::Query<ShardQuery>) -> HttpResponse {
    let shards = q.shards.unwrap_or(1).max(1);
    let shard = q.shard.unwrap_or(0);
    if shard >= shards {
        return HttpResponse::BadRequest().body(format!("shard must be < shards ({shards})\n"));
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(metrics::render_agents(&state.fleet.stats, shard, shards))
}
