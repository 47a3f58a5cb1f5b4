//! Phase 4: the tunnel's layers alone, one byte pipe each.

use super::*;

pub(crate) type Tls = (
    std::sync::Arc<rustls::ServerConfig>,
    std::sync::Arc<rustls::ClientConfig>,
);

/// The same TLS configurations as the tunnel: the control plane's server side, the agent's
/// pinned client side.
pub(crate) fn tunnel_tls(dir: &Path) -> Tls {
    std::fs::create_dir_all(dir).expect("tls dir");
    let material = control_plane::tls::load(
        &control_plane::config::TlsSource::SelfSigned,
        dir,
        &["127.0.0.1".to_owned()],
    )
    .expect("tls material");
    let mut server = (*material.server_config).clone();
    server.alpn_protocols = Vec::new();
    let client = edge_agent::tls::tunnel_config(material.fingerprint).expect("tunnel tls");
    (std::sync::Arc::new(server), client)
}

/// The multiplexer of a hop.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Mux {
    None,
    /// `proto::mux`, exactly as the product runs it.
    Product,
    /// yamux 0.14 with other knobs, driven by [`spawn_custom_mux`].
    Custom {
        split_send: usize,
        /// Let stream windows grow past 256 KiB (yamux's auto-tuning, no connection cap).
        grow_window: bool,
        /// A write buffer between yamux and TLS, so a frame's header and body leave as one
        /// TLS record and one `write`.
        write_buffer: Option<usize>,
    },
}

/// What the "agent" side sends.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Source {
    /// `write_all` of 256 KiB chunks of zeros.
    Zeros,
    /// The engine's answer to `GET /bulk`, copied with `copy_bidirectional_with_sizes` and
    /// this buffer size (the agent uses `copy_bidirectional`: 8 KiB).
    Engine { copy_buffer: usize },
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct HopCfg {
    pub(crate) name: &'static str,
    pub(crate) what: &'static str,
    pub(crate) tls: bool,
    /// A read buffer under TLS (both sides): rustls reads the socket 4 KiB at a time.
    pub(crate) read_buffer: Option<usize>,
    pub(crate) mux: Mux,
    pub(crate) source: Source,
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// CPU time of the calling thread so far.
pub(crate) fn own_cpu() -> Duration {
    let ns = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// A yamux connection on its own task with `cfg`. The client side opens one stream, the
/// server side accepts the first; either is handed back, and the connection is driven until
/// it ends.
pub(crate) fn spawn_custom_mux<T: Io>(
    io: T,
    mode: yamux::Mode,
    cfg: yamux::Config,
) -> tokio::sync::oneshot::Receiver<yamux::Stream> {
    use tokio_util::compat::TokioAsyncReadCompatExt as _;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut conn = yamux::Connection::new(io.compat(), cfg, mode);
        let mut tx = Some(tx);
        let client = matches!(mode, yamux::Mode::Client);
        std::future::poll_fn(|cx| {
            if client && tx.is_some() {
                if let std::task::Poll::Ready(r) = conn.poll_new_outbound(cx) {
                    match (r, tx.take()) {
                        (Ok(stream), Some(tx)) => {
                            let _ = tx.send(stream);
                        }
                        _ => return std::task::Poll::Ready(()),
                    }
                }
            }
            loop {
                match conn.poll_next_inbound(cx) {
                    std::task::Poll::Ready(Some(Ok(stream))) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(stream);
                        }
                    }
                    std::task::Poll::Ready(_) => return std::task::Poll::Ready(()),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        })
        .await;
    });
    rx
}

pub(crate) fn custom_config(split_send: usize, grow_window: bool) -> yamux::Config {
    let mut cfg = yamux::Config::default();
    // As proto::mux: 256 streams, each guaranteed 256 KiB; growing needs room above that.
    cfg.set_max_num_streams(256);
    cfg.set_max_connection_receive_window(if grow_window {
        None
    } else {
        Some(256 * 1024 * 256)
    });
    cfg.set_split_send_size(split_send);
    cfg
}

/// A multiplexed stream over `io` on the side `mode` (client: opens it; server: accepts it),
/// plus whatever keeps its session alive.
pub(crate) async fn mux_stream(
    io: Box<dyn Io>,
    mux: Mux,
    client: bool,
) -> (Box<dyn Io>, Box<dyn Send>) {
    match mux {
        Mux::None => unreachable!("no mux"),
        Mux::Product => {
            let mode = if client {
                proto::mux::Mode::Client
            } else {
                proto::mux::Mode::Server
            };
            let mut session = proto::mux::spawn(io, mode);
            let stream = if client {
                session.opener.open().await.expect("open stream")
            } else {
                session.inbound.recv().await.expect("inbound stream")
            };
            (Box::new(stream), Box::new(session.opener))
        }
        Mux::Custom {
            split_send,
            grow_window,
            write_buffer,
        } => {
            use tokio_util::compat::FuturesAsyncReadCompatExt as _;
            let mode = if client {
                yamux::Mode::Client
            } else {
                yamux::Mode::Server
            };
            let cfg = custom_config(split_send, grow_window);
            let rx = match write_buffer {
                Some(n) => spawn_custom_mux(tokio::io::BufWriter::with_capacity(n, io), mode, cfg),
                None => spawn_custom_mux(io, mode, cfg),
            };
            let stream = rx.await.expect("custom mux stream");
            (Box::new(stream.compat()), Box::new(()))
        }
    }
}

pub(crate) async fn write_zeros(w: &mut Box<dyn Io>, bytes: u64) {
    let zeros = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let k = (left as usize).min(CHUNK);
        w.write_all(&zeros[..k]).await.expect("hop write");
        left -= k as u64;
    }
    w.shutdown().await.expect("hop shutdown");
}

pub(crate) struct HopResult {
    pub(crate) bytes: u64,
    pub(crate) elapsed: Duration,
    pub(crate) writer_cpu: Duration,
    pub(crate) reader_cpu: Duration,
}

/// One byte pipe through `cfg`'s layers: the "agent" side (TLS client, yamux server) sends,
/// the "gateway" side (TLS server, yamux client, opener of the stream) reads to the end. Each
/// side on its own thread and current-thread runtime. The time runs from the opener's first
/// write (or the TCP accept) to the last byte read.
pub(crate) fn hop(cfg: HopCfg, bytes: u64, tls: &Tls, engine: SocketAddr) -> HopResult {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind hop");
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let client_tls = tls.1.clone();
    let server_tls = tls.0.clone();
    let agent = on_thread("hop-agent", move || async move {
        let cpu0 = own_cpu();
        let tcp = TcpStream::connect(addr).await.expect("connect hop");
        tcp.set_nodelay(true).unwrap();
        let tcp: Box<dyn Io> = match cfg.read_buffer {
            Some(n) => Box::new(tokio::io::BufReader::with_capacity(n, tcp)),
            None => Box::new(tcp),
        };
        let io: Box<dyn Io> = if cfg.tls {
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            Box::new(
                tokio_rustls::TlsConnector::from(client_tls)
                    .connect(name, tcp)
                    .await
                    .expect("tls connect"),
            )
        } else {
            tcp
        };
        let (mut stream, _session) = match cfg.mux {
            Mux::None => (io, Box::new(()) as Box<dyn Send>),
            mux => mux_stream(io, mux, false).await,
        };
        match cfg.source {
            Source::Zeros => {
                if !matches!(cfg.mux, Mux::None) {
                    let mut one = [0u8; 1];
                    stream.read_exact(&mut one).await.expect("opener's byte");
                }
                write_zeros(&mut stream, bytes).await;
            }
            Source::Engine { copy_buffer } => {
                let mut engine = TcpStream::connect(engine).await.expect("connect engine");
                engine.set_nodelay(true).unwrap();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut engine, copy_buffer, copy_buffer) => {}
                    _ = &mut done_rx => return own_cpu() - cpu0,
                }
            }
        }
        let _ = done_rx.await;
        own_cpu() - cpu0
    });
    let gateway = on_thread("hop-gateway", move || async move {
        let cpu0 = own_cpu();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (tcp, _) = listener.accept().await.expect("accept hop");
        tcp.set_nodelay(true).unwrap();
        let mut t0 = Instant::now();
        let tcp: Box<dyn Io> = match cfg.read_buffer {
            Some(n) => Box::new(tokio::io::BufReader::with_capacity(n, tcp)),
            None => Box::new(tcp),
        };
        let io: Box<dyn Io> = if cfg.tls {
            Box::new(
                tokio_rustls::TlsAcceptor::from(server_tls)
                    .accept(tcp)
                    .await
                    .expect("tls accept"),
            )
        } else {
            tcp
        };
        let (mut stream, session) = match cfg.mux {
            Mux::None => (io, Box::new(()) as Box<dyn Send>),
            mux => {
                let (mut stream, session) = mux_stream(io, mux, true).await;
                t0 = Instant::now();
                match cfg.source {
                    Source::Engine { .. } => {
                        let req = format!(
                            "GET /bulk?bytes={bytes} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
                        );
                        stream.write_all(req.as_bytes()).await.expect("request");
                    }
                    Source::Zeros => stream.write_all(b"x").await.expect("opener writes first"),
                }
                stream.flush().await.expect("flush");
                (stream, session)
            }
        };
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0u64;
        loop {
            let k = stream.read(&mut buf).await.expect("hop read");
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        let elapsed = t0.elapsed();
        let _ = done_tx.send(());
        drop(session);
        (n, elapsed, own_cpu() - cpu0)
    });
    let (n, elapsed, reader_cpu) = gateway.join().expect("gateway side");
    let writer_cpu = agent.join().expect("agent side");
    HopResult {
        bytes: n,
        elapsed,
        writer_cpu,
        reader_cpu,
    }
}

pub(crate) fn hop_configs() -> Vec<HopCfg> {
    const KIB: usize = 1024;
    let plain = |name, what, tls, read_buffer, mux, source| HopCfg {
        name,
        what,
        tls,
        read_buffer,
        mux,
        source,
    };
    let custom = |split_send, grow_window, write_buffer| Mux::Custom {
        split_send,
        grow_window,
        write_buffer,
    };
    let engine8 = Source::Engine {
        copy_buffer: 8 * KIB,
    };
    let engine64 = Source::Engine {
        copy_buffer: 64 * KIB,
    };
    let zeros = Source::Zeros;
    let rb = Some(64 * KIB);
    vec![
        plain("tcp", "TCP", false, None, Mux::None, zeros),
        plain(
            "tls",
            "TLS 1.3 (the tunnel's configs)",
            true,
            None,
            Mux::None,
            zeros,
        ),
        plain(
            "tls_read_buffer",
            "TLS over a 64 KiB read buffer",
            true,
            rb,
            Mux::None,
            zeros,
        ),
        plain(
            "yamux_tcp",
            "proto::mux over TCP",
            false,
            None,
            Mux::Product,
            zeros,
        ),
        plain(
            "yamux_tls",
            "proto::mux over TLS (the tunnel)",
            true,
            None,
            Mux::Product,
            zeros,
        ),
        plain(
            "agent_copy_8k",
            "engine -> agent copy 8 KiB (as now) -> tunnel",
            true,
            None,
            Mux::Product,
            engine8,
        ),
        plain(
            "agent_copy_64k",
            "engine -> agent copy 64 KiB -> tunnel",
            true,
            None,
            Mux::Product,
            engine64,
        ),
        plain(
            "custom_same",
            "yamux as proto::mux, own driver (control)",
            true,
            None,
            custom(16 * KIB, false, None),
            zeros,
        ),
        plain(
            "custom_write_buffer",
            "+ 64 KiB write buffer under yamux",
            true,
            None,
            custom(16 * KIB, false, Some(64 * KIB)),
            zeros,
        ),
        plain(
            "custom_split_64k",
            "+ 64 KiB yamux frames",
            true,
            None,
            custom(64 * KIB, false, None),
            zeros,
        ),
        plain(
            "custom_grow_window",
            "+ growing stream windows",
            true,
            None,
            custom(16 * KIB, true, None),
            zeros,
        ),
        plain(
            "combined_copy_64k",
            "copy 64 KiB, frames 64 KiB, both buffers",
            true,
            rb,
            custom(64 * KIB, false, Some(64 * KIB)),
            engine64,
        ),
    ]
}

pub(crate) fn hops_phase(s: &Settings, dir: &Path, engine: SocketAddr) -> Value {
    let tls = tunnel_tls(dir);
    let mut out = serde_json::Map::new();
    println!(
        "hops: one stream of {} bytes through each layer alone (writer = agent side, reader = gateway side, each on its own thread)",
        s.hop_bytes
    );
    let configs: Vec<HopCfg> = hop_configs()
        .into_iter()
        .filter(|c| s.hops.is_empty() || s.hops.iter().any(|h| h == c.name))
        .collect();
    // Runs interleaved (all variants, then again), so a burst of other load on the machine
    // does not hit one variant only; the best run is reported.
    let mut runs: Vec<Vec<(HopResult, f64)>> = configs.iter().map(|_| Vec::new()).collect();
    for _ in 0..s.hop_runs {
        for (cfg, results) in configs.iter().zip(runs.iter_mut()) {
            let engine_before = thread_cpu();
            let r = hop(*cfg, s.hop_bytes, &tls, engine);
            let engine_cpu: f64 = cpu_delta(&engine_before, &thread_cpu())
                .iter()
                .filter(|(t, _)| t.starts_with("engine#"))
                .map(|(_, c)| c)
                .sum();
            results.push((r, engine_cpu));
        }
    }
    for (cfg, results) in configs.iter().zip(runs) {
        let rates: Vec<f64> = results
            .iter()
            .map(|(r, _)| mb_per_s(r.bytes, r.elapsed))
            .collect();
        let (best_i, _) = rates
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("one run");
        let (r, engine_cpu) = &results[best_i];
        let rate = rates[best_i];
        let per_gb = |d: Duration| d.as_secs_f64() / (r.bytes as f64 / 1e9);
        println!(
            "  {:<20} {:<46} best {rate:>7.1} MB/s of {:?}; CPU-s per GB: writer {:.2}, reader {:.2}, engine {:.2}",
            cfg.name,
            cfg.what,
            rates,
            per_gb(r.writer_cpu),
            per_gb(r.reader_cpu),
            engine_cpu / (r.bytes as f64 / 1e9),
        );
        out.insert(
            cfg.name.to_owned(),
            json!({
                "what": cfg.what, "best_mb_s": rate, "runs_mb_s": rates,
                "bytes": r.bytes,
                "writer_cpu_s_per_gb": round3(per_gb(r.writer_cpu)),
                "reader_cpu_s_per_gb": round3(per_gb(r.reader_cpu)),
                "engine_cpu_s_per_gb": round3(engine_cpu / (r.bytes as f64 / 1e9)),
            }),
        );
    }
    Value::Object(out)
}
