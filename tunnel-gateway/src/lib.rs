//! edgeplane tunnel gateway (cluster mode): terminates agents' reverse TLS tunnels, records
//! their locations in the shared Redis store, and serves control-plane replicas' dial
//! sessions. The gateway itself is the `gateway` crate; this one adds the process around it:
//! TLS material from files, the Redis store, and a plain-HTTP admin listener (`/metrics`,
//! `/healthz`, `/readyz`). It knows neither the control plane nor HTTP routes beyond those.
//!
//! [`prepare`] does everything that can fail at start (certificate, Redis, listeners), so the
//! binary can report it in one line; [`Prepared::serve`] runs until the shutdown future
//! resolves, then closes every tunnel, releases their locations and unregisters.

use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gateway::admission::{Admission, AdmissionLimits};
use gateway::tls::{self, TlsError};
use gateway::{Gateway, GatewayConfig};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder as _, Registry, TextEncoder};
use store::redis::RedisStore;
use store::{SharedTunnelStore, StoreError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The control plane's default Redis key prefix (both must agree to share state).
pub const DEFAULT_REDIS_PREFIX: &str = "edgeplane:";

/// Gateway process configuration: the flags of CONTRACT.md plus this binary's own.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub redis_url: String,
    pub redis_prefix: String,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub metrics_addr: SocketAddr,
    /// Unique per process.
    pub id: String,
    /// `host:port` agents connect to.
    pub public_addr: String,
    /// `host:port` control-plane replicas connect to.
    pub dial_addr: String,
    pub lease: Duration,
    pub max_tunnels: usize,
    /// Connections of the tunnel port: all, per source, pending.
    pub admission: AdmissionLimits,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("redis_url", &redact_url(&self.redis_url))
            .field("redis_prefix", &self.redis_prefix)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("metrics_addr", &self.metrics_addr)
            .field("id", &self.id)
            .field("public_addr", &self.public_addr)
            .field("dial_addr", &self.dial_addr)
            .field("lease", &self.lease)
            .field("max_tunnels", &self.max_tunnels)
            .finish()
    }
}

pub use store::redis::redact_url;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    #[error("redis store at {url}: {source}")]
    Store { url: String, source: StoreError },
    #[error("{0}")]
    Gateway(#[from] gateway::GatewayError),
    #[error("cannot listen on --metrics-addr {addr}: {source}")]
    MetricsListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// This machine's host name, if it has one.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// Default gateway id: `<hostname>-<6 hex chars>`.
pub fn default_id() -> String {
    format!(
        "{}-{}",
        hostname().unwrap_or_else(|| "gateway".to_owned()),
        gateway::random_suffix()
    )
}

/// Default public address: the listen address, with an unspecified IP replaced by this
/// machine's host name (if it resolves), else 127.0.0.1.
pub fn default_public_addr(listen: SocketAddr) -> String {
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    let port = listen.port();
    let host = hostname()
        .filter(|h| {
            (h.as_str(), port)
                .to_socket_addrs()
                .is_ok_and(|mut a| a.next().is_some())
        })
        .unwrap_or_else(|| "127.0.0.1".to_owned());
    format!("{host}:{port}")
}

/// Everything bound and connected, ready to serve.
pub struct Prepared {
    pub gateway: Arc<Gateway>,
    pub store: SharedTunnelStore,
    /// SHA-256 of the certificate (DER): the fingerprint in join keys.
    pub fingerprint: [u8; 32],
    pub metrics_addr: SocketAddr,
    registry: Registry,
    metrics_listener: TcpListener,
}

/// Loads the certificate, connects to Redis, binds the tunnel and metrics listeners.
pub async fn prepare(config: Config) -> Result<Prepared, StartError> {
    let material = tls::load(&config.tls_cert, &config.tls_key)?;
    let store: SharedTunnelStore = Arc::new(
        RedisStore::connect(&config.redis_url, &config.redis_prefix)
            .await
            .map_err(|source| StartError::Store {
                url: redact_url(&config.redis_url),
                source,
            })?,
    );
    // Fail at start, not at the first dial session, if the store cannot serve.
    store
        .cluster_secret()
        .await
        .map_err(|source| StartError::Store {
            url: redact_url(&config.redis_url),
            source,
        })?;
    let registry = Registry::new();
    match gateway::metrics::ProcessCollector::new("tunnel-gateway") {
        Ok(c) => {
            if let Err(e) = registry.register(Box::new(c)) {
                tracing::warn!(error = %e, "process metrics not registered");
            }
        }
        Err(e) => tracing::warn!(error = %e, "process metrics not registered"),
    }
    let gw_config = GatewayConfig::new(
        config.id.clone(),
        config.listen,
        config.public_addr.clone(),
        config.dial_addr.clone(),
        material.server_config,
    )
    .with_lease(config.lease)
    .with_max_tunnels(config.max_tunnels)
    .with_admission(Admission::new(config.admission));
    let gateway = Gateway::bind(gw_config, Arc::clone(&store), &registry).await?;
    let metrics_listener = TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| StartError::MetricsListen {
            addr: config.metrics_addr,
            source,
        })?;
    let metrics_addr =
        metrics_listener
            .local_addr()
            .map_err(|source| StartError::MetricsListen {
                addr: config.metrics_addr,
                source,
            })?;
    Ok(Prepared {
        gateway,
        store,
        fingerprint: material.fingerprint,
        metrics_addr,
        registry,
        metrics_listener,
    })
}

impl Prepared {
    /// Serves tunnels and the admin listener until `shutdown` resolves, then stops gracefully.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let stop = CancellationToken::new();
        let gateway = tokio::spawn(Arc::clone(&self.gateway).run(stop.clone()));
        let admin = tokio::spawn(serve_admin(
            self.metrics_listener,
            self.registry,
            Arc::clone(&self.store),
            stop.clone(),
        ));
        shutdown.await;
        tracing::info!("shutting down");
        stop.cancel();
        let _ = gateway.await;
        let _ = admin.await;
    }
}

/// Loads config, prepares and serves until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    prepare(config).await?.serve(shutdown).await;
    Ok(())
}

/// The plain-HTTP admin listener: `/metrics`, `/healthz`, `/readyz`.
async fn serve_admin(
    listener: TcpListener,
    registry: Registry,
    store: SharedTunnelStore,
    stop: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let store = Arc::clone(&store);
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                let store = Arc::clone(&store);
                async move { Ok::<_, Infallible>(admin_response(&req, &registry, &store).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "metrics connection ended with an error");
                    }
                }
                () = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

async fn admin_response(
    req: &Request<Incoming>,
    registry: &Registry,
    store: &SharedTunnelStore,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != hyper::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match tokio::time::timeout(Duration::from_secs(5), store.ping()).await {
            Ok(Ok(())) => text(StatusCode::OK, "ready\n".into()),
            Ok(Err(e)) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("store not ready: {e}\n"),
            ),
            Err(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "store not ready: ping timed out\n".into(),
            ),
        },
        "/metrics" => {
            let mut buf = Vec::new();
            match TextEncoder::new().encode(&registry.gather(), &mut buf) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, String::new());
                    *r.body_mut() = Full::new(Bytes::from(buf));
                    if let Ok(v) = "text/plain; version=0.0.4".parse() {
                        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
                    }
                    r
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode metrics: {e}\n"),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_addr_defaults() {
        assert_eq!(
            default_public_addr("10.1.2.3:8000".parse().unwrap_or_else(|_| unreachable!())),
            "10.1.2.3:8000"
        );
        let d = default_public_addr("0.0.0.0:8123".parse().unwrap_or_else(|_| unreachable!()));
        assert!(d.ends_with(":8123") && !d.starts_with("0.0.0.0"), "{d}");
    }

    #[test]
    fn ids_are_unique_and_urls_redacted() {
        assert_ne!(default_id(), default_id());
        assert_eq!(
            redact_url("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://:redacted@127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("redis://127.0.0.1/"), "redis://127.0.0.1/");
    }
}
