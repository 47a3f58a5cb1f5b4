//! The HTTPS front of the API port: TLS, then one look at the first request head decides who
//! serves the connection — hyper (see [`crate::docker_proxy`]) when it is a Docker hijack
//! (`attach`, `exec start`: `Upgrade: tcp`, then raw bytes both ways, which actix cannot hand
//! over), actix-web for everything else (agents' check-ins, the admin API, and every other
//! Docker call). actix's own server cannot do this split, so the
//! actix app runs here on `actix-server` + `actix-http` the way `HttpServer` would run it.

use std::io;
use std::net::TcpListener;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::HttpService;
use actix_server::Server;
use actix_service::{
    fn_factory, fn_service, map_config, IntoServiceFactory, Service, ServiceFactory,
    ServiceFactoryExt,
};
use actix_web::dev::{AppConfig, ServiceResponse};
use actix_web::App;
use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::Limits;
use crate::docker_proxy::{is_docker_hijack, DockerProxy};

/// TLS handshake plus the first request head must arrive within this.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head longer than this is not sniffed further (it goes to actix, which refuses
/// it with its own limits).
const SNIFF_LIMIT: usize = 16 * 1024;

/// Builds the API server. `app` makes one actix `App` per worker.
pub fn api_server<F, T, B>(
    app: F,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: &Limits,
    proxy: Arc<DockerProxy>,
) -> io::Result<Server>
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
    Server::build()
        .workers(limits.workers)
        .backlog(4096)
        .max_concurrent_connections(limits.max_connections_per_worker)
        // A graceful stop waits this long for open connections (kept-alive agents, held
        // check-ins, hijacked Docker sessions), then closes them.
        .shutdown_timeout(10)
        .disable_signals()
        .listen("api", listener, move || {
            let h1 = HttpService::<Prefixed<_>, _, _, _, _>::build()
                .keep_alive(keep_alive)
                .client_request_timeout(Duration::from_secs(5))
                // As actix-web's `HttpServer` does: linger a second after an early answer (a
                // 413 for a body still arriving) so the client reads it instead of a reset.
                .client_disconnect_timeout(Duration::from_secs(1))
                .h1_allow_half_closed(true)
                .h1(map_config(
                    app()
                        .into_factory()
                        .map_err(|e: actix_web::Error| e.error_response()),
                    |_| AppConfig::default(),
                ));
            let acceptor = acceptor.clone();
            let proxy = Arc::clone(&proxy);
            fn_factory(move || {
                let h1 = h1.new_service(());
                let acceptor = acceptor.clone();
                let proxy = Arc::clone(&proxy);
                async move {
                    let h1 = Rc::new(h1.await.map_err(|e| {
                        tracing::error!(error = ?e, "cannot start the api service");
                    })?);
                    Ok::<_, ()>(fn_service(move |tcp: TcpStream| {
                        let h1 = Rc::clone(&h1);
                        let acceptor = acceptor.clone();
                        let proxy = Arc::clone(&proxy);
                        async move {
                            serve(tcp, acceptor, h1, proxy).await;
                            Ok::<_, ()>(())
                        }
                    }))
                }
            })
        })
        .map(|b| b.run())
}

async fn serve<S>(tcp: TcpStream, acceptor: TlsAcceptor, h1: Rc<S>, proxy: Arc<DockerProxy>)
where
    S: Service<(
        Prefixed<tokio_rustls::server::TlsStream<TcpStream>>,
        Option<std::net::SocketAddr>,
    )>,
    S::Error: std::fmt::Debug,
{
    // Small answers must leave at once (Nagle would hold them for the peer's delayed ACK).
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().ok();
    let first = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, async {
        let mut tls = acceptor.accept(tcp).await?;
        let head = read_request_head(&mut tls).await?;
        Ok::<_, io::Error>((tls, head))
    })
    .await;
    let (tls, head) = match first {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::debug!(peer = ?peer, error = %e, "connection closed before its first request");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = ?peer, "no request within the first-request timeout");
            return;
        }
    };
    let docker = is_docker_hijack(&head);
    let io = Prefixed::new(head, tls);
    if docker {
        proxy.serve_connection(io).await;
    } else if let Err(e) = h1.call((io, peer)).await {
        tracing::debug!(peer = ?peer, error = ?e, "api connection ended with an error");
    }
}

/// Reads until the first request's head is complete (or the limit, or EOF). An agent's
/// check-in head arrives in one TLS record, so this is one read in practice.
async fn read_request_head<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Bytes> {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
