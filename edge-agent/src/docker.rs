//! The local engine (`DOCKER_HOST`): where tunnel streams are connected to, and a small Docker
//! Engine API client that takes snapshots of it and runs async-mode commands on it.
//!
//! The client is deliberately tolerant: engines differ (Podman's Docker API returns `null` for
//! some lists and leaves fields out), and a field it cannot read becomes empty rather than
//! failing the snapshot.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full, Limited};
use hyper::header::HOST;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use proto::async_mode::{Action, ServiceSpec};
use proto::snapshot::{Container, EngineInfo, Image, Network, Snapshot, Volume};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Largest engine answer read (a big engine's container list is a few MiB).
pub const MAX_ENGINE_ANSWER: usize = 32 * 1024 * 1024;
/// Connecting to the engine.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One engine API request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Default port of `tcp://host` without one (Docker's plain-text port).
const DEFAULT_TCP_PORT: u16 = 2375;

/// Where the engine listens, parsed from `DOCKER_HOST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerHost {
    /// `unix:///path/to/docker.sock`
    Unix(PathBuf),
    /// `tcp://host:port` (plain text; `http://` is taken as a synonym)
    Tcp { host: String, port: u16 },
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{value:?} is not usable: {why} (expected unix:///path/to/docker.sock or tcp://host:port)")]
pub struct DockerHostError {
    pub value: String,
    pub why: &'static str,
}

impl DockerHost {
    pub fn parse(raw: &str) -> Result<Self, DockerHostError> {
        let raw = raw.trim();
        let bad = |why| DockerHostError {
            value: raw.to_owned(),
            why,
        };
        if let Some(path) = raw.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad("the socket path must be absolute"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let rest = raw
            .strip_prefix("tcp://")
            .or_else(|| raw.strip_prefix("http://"))
            .ok_or_else(|| {
                if raw.starts_with("https://") || raw.starts_with("ssh://") {
                    bad("TLS and SSH engine connections are not supported")
                } else {
                    bad("unknown scheme")
                }
            })?;
        let url = url::Url::parse(&format!("http://{rest}")).map_err(|_| bad("bad host:port"))?;
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        // `Url` keeps IPv6 brackets; `TcpStream::connect((host, port))` wants them off.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Self::Tcp {
            host,
            port: url.port().unwrap_or(DEFAULT_TCP_PORT),
        })
    }

    /// Connects to the engine within `timeout`.
    pub async fn connect(&self, timeout: Duration) -> io::Result<EngineStream> {
        let connect = async {
            match self {
                Self::Unix(path) => UnixStream::connect(path).await.map(EngineStream::Unix),
                Self::Tcp { host, port } => {
                    let tcp = TcpStream::connect((host.as_str(), *port)).await?;
                    tcp.set_nodelay(true)?;
                    Ok(EngineStream::Tcp(tcp))
                }
            }
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            )),
        }
    }
}

impl std::fmt::Display for DockerHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

/// A connection to the engine, over whichever transport `DOCKER_HOST` names.
#[derive(Debug)]
pub enum EngineStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AsyncRead for EngineStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for EngineStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    /// Half-closes (the engine sees end of input, and may keep writing).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why a snapshot could not be taken. Each says which engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot connect to DOCKER_HOST {host}: {source}")]
    Connect { host: String, source: io::Error },
    #[error("engine http exchange failed on {path}: {source}")]
    Http {
        path: &'static str,
        source: hyper::Error,
    },
    #[error("engine did not answer {path} within {timeout:?}")]
    Timeout {
        path: &'static str,
        timeout: Duration,
    },
    #[error("engine answered {path} with {status}: {message}")]
    Status {
        path: &'static str,
        status: StatusCode,
        message: String,
    },
    #[error("engine answer to {path} is larger than {MAX_ENGINE_ANSWER} bytes")]
    TooLarge { path: &'static str },
    #[error("engine answer to {path} is not JSON: {detail}")]
    Json { path: &'static str, detail: String },
}

/// A small Docker Engine API client: one connection per snapshot, a few `GET`s on it.
#[derive(Debug, Clone)]
pub struct DockerClient {
    host: DockerHost,
}

/// The calls a snapshot makes, in order.
const SNAPSHOT_PATHS: [&str; 6] = [
    "/version",
    "/info",
    "/containers/json?all=1",
    "/images/json",
    "/volumes",
    "/networks",
];

impl DockerClient {
    pub fn new(host: DockerHost) -> Self {
        Self { host }
    }

    pub fn host(&self) -> &DockerHost {
        &self.host
    }

    /// Takes a snapshot of the engine, stamped `taken_ms`.
    pub async fn snapshot(&self, taken_ms: u64) -> Result<Snapshot, DockerError> {
        let stream =
            self.host
                .connect(CONNECT_TIMEOUT)
                .await
                .map_err(|source| DockerError::Connect {
                    host: self.host.to_string(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| DockerError::Http {
                path: SNAPSHOT_PATHS[0],
                source,
            })?;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "engine connection closed");
            }
        });
        let mut answers = Vec::with_capacity(SNAPSHOT_PATHS.len());
        let mut failure = None;
        for path in SNAPSHOT_PATHS {
            match tokio::time::timeout(REQUEST_TIMEOUT, get_json(&mut sender, path)).await {
                Ok(Ok(value)) => answers.push(value),
                Ok(Err(e)) => {
                    failure = Some(e);
                    break;
                }
                Err(_) => {
                    failure = Some(DockerError::Timeout {
                        path,
                        timeout: REQUEST_TIMEOUT,
                    });
                    break;
                }
            }
        }
        drop(sender);
        driver.abort();
        if let Some(e) = failure {
            return Err(e);
        }
        let [version, info, containers, images, volumes, networks] =
            <[Value; 6]>::try_from(answers).map_err(|_| DockerError::Json {
                path: "/version",
                detail: "missing answers".to_owned(),
            })?;
        let mut snap = map_snapshot(&EngineAnswers {
            version,
            info,
            containers,
            images,
            volumes,
            networks,
        });
        snap.taken_ms = taken_ms;
        Ok(snap)
    }
}

/// How long a command may take on the engine (a stop waits for the container's timeout).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

impl DockerClient {
    /// Runs one async-mode command; `Err` holds the engine's message (or why it could not be
    /// asked), one line. "Already started" and "already stopped" count as done.
    pub async fn execute(&self, action: &Action) -> Result<(), String> {
        match tokio::time::timeout(COMMAND_TIMEOUT, self.execute_inner(action)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the engine did not finish within {}s",
                COMMAND_TIMEOUT.as_secs()
            )),
        }
    }

    async fn execute_inner(&self, action: &Action) -> Result<(), String> {
        let timeout = |t: &Option<u32>| t.map(|t| format!("?t={t}")).unwrap_or_default();
        let (method, path) = match action {
            Action::ContainerStart { container } => {
                (Method::POST, format!("/containers/{container}/start"))
            }
            Action::ContainerStop {
                container,
                timeout_secs,
            } => (
                Method::POST,
                format!("/containers/{container}/stop{}", timeout(timeout_secs)),
            ),
            Action::ContainerRestart {
                container,
                timeout_secs,
            } => (
                Method::POST,
                format!("/containers/{container}/restart{}", timeout(timeout_secs)),
            ),
            Action::ContainerKill { container, signal } => (
                Method::POST,
                format!(
                    "/containers/{container}/kill{}",
                    signal
                        .as_ref()
                        .map(|s| format!("?signal={s}"))
                        .unwrap_or_default()
                ),
            ),
            Action::ContainerRemove { container, force } => (
                Method::DELETE,
                format!("/containers/{container}?force={force}"),
            ),
            Action::ImageRemove { image, force } => {
                (Method::DELETE, format!("/images/{image}?force={force}"))
            }
            Action::VolumeRemove { volume, force } => {
                (Method::DELETE, format!("/volumes/{volume}?force={force}"))
            }
            Action::StackRemove { stack } => return self.remove_stack(stack).await,
            Action::StackDeploy { stack, services } => {
                return self.deploy_stack(stack, services).await
            }
        };
        let (status, body) = self.call(method, &path).await?;
        // 304: already in the wanted state (start, stop).
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            Ok(())
        } else {
            Err(engine_message(status, &body))
        }
    }

    /// Removes a compose project's containers (forced), then its networks.
    async fn remove_stack(&self, stack: &str) -> Result<(), String> {
        let filter = |kind: &str| {
            let json = serde_json::json!({
                "label": [format!("{}={stack}", proto::snapshot::COMPOSE_PROJECT_LABEL)]
            })
            .to_string();
            let encoded: String = url::form_urlencoded::byte_serialize(json.as_bytes()).collect();
            format!("/{kind}?all=1&filters={encoded}")
        };
        let list = |body: &Bytes, key: &str| -> Vec<String> {
            serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|c| c.get(key).and_then(Value::as_str).map(str::to_owned))
                .collect()
        };
        let (status, body) = self.call(Method::GET, &filter("containers/json")).await?;
        if !status.is_success() {
            return Err(engine_message(status, &body));
        }
        let containers = list(&body, "Id");
        if containers.is_empty() {
            return Err(format!("no containers of stack {stack:?} on this engine"));
        }
        for id in containers {
            let (status, body) = self
                .call(Method::DELETE, &format!("/containers/{id}?force=true"))
                .await?;
            if !status.is_success() && status != StatusCode::NOT_FOUND {
                return Err(engine_message(status, &body));
            }
        }
        let (status, body) = self.call(Method::GET, &filter("networks")).await?;
        if status.is_success() {
            for id in list(&body, "Id") {
                // Best effort: a network still used elsewhere stays.
                let _ = self.call(Method::DELETE, &format!("/networks/{id}")).await;
            }
        }
        Ok(())
    }

    /// Creates (replacing any of the same name) and starts one container per service, named
    /// and labelled as compose names and labels its own (`{stack}-{service}-1`), so the
    /// snapshot shows the stack and `stackRemove` removes it. A missing image is pulled.
    async fn deploy_stack(&self, stack: &str, services: &[ServiceSpec]) -> Result<(), String> {
        for s in services {
            let name = format!("{stack}-{}-1", s.name);
            let (status, body) = self
                .call(Method::DELETE, &format!("/containers/{name}?force=true"))
                .await?;
            if !status.is_success() && status != StatusCode::NOT_FOUND {
                return Err(format!(
                    "service {}: {}",
                    s.name,
                    engine_message(status, &body)
                ));
            }
            let spec = container_spec(stack, s);
            let create = format!("/containers/create?name={name}");
            let (mut status, mut body) = self.call_with(Method::POST, &create, Some(&spec)).await?;
            if status == StatusCode::NOT_FOUND {
                let image: String =
                    url::form_urlencoded::byte_serialize(s.image.as_bytes()).collect();
                let (pulled, pull_body) = self
                    .call(Method::POST, &format!("/images/create?fromImage={image}"))
                    .await?;
                if !pulled.is_success() {
                    return Err(format!(
                        "service {}: image {} is not on the device and could not be pulled: {}",
                        s.name,
                        s.image,
                        engine_message(pulled, &pull_body)
                    ));
                }
                (status, body) = self.call_with(Method::POST, &create, Some(&spec)).await?;
            }
            if !status.is_success() {
                return Err(format!(
                    "service {}: {}",
                    s.name,
                    engine_message(status, &body)
                ));
            }
            let (status, body) = self
                .call(Method::POST, &format!("/containers/{name}/start"))
                .await?;
            if !status.is_success() && status != StatusCode::NOT_MODIFIED {
                return Err(format!(
                    "service {}: {}",
                    s.name,
                    engine_message(status, &body)
                ));
            }
        }
        Ok(())
    }

    async fn call(&self, method: Method, path: &str) -> Result<(StatusCode, Bytes), String> {
        self.call_with(method, path, None).await
    }

    /// One request on a fresh engine connection, with an optional JSON body: status and
    /// (bounded) body.
    async fn call_with(
        &self,
        method: Method,
        path: &str,
        json: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), String> {
        let stream = self
            .host
            .connect(CONNECT_TIMEOUT)
            .await
            .map_err(|e| format!("cannot connect to DOCKER_HOST {}: {e}", self.host))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("engine connection failed: {e}"))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let result = async {
            let body = json.map(|j| Bytes::from(j.to_string())).unwrap_or_default();
            let mut req = Request::new(Full::new(body));
            if json.is_some() {
                req.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
            }
            *req.method_mut() = method;
            *req.uri_mut() = hyper::Uri::try_from(path)
                .map_err(|e| format!("cannot form the engine request {path:?}: {e}"))?;
            req.headers_mut()
                .insert(HOST, hyper::header::HeaderValue::from_static("docker"));
            let response = sender
                .send_request(req)
                .await
                .map_err(|e| format!("engine request failed: {e}"))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ENGINE_ANSWER)
                .collect()
                .await
                .map_err(|e| format!("engine answer unreadable: {e}"))?
                .to_bytes();
            Ok((status, body))
        }
        .await;
        driver.abort();
        result
    }
}

/// The engine's `POST /containers/create` body for one service of a stack.
fn container_spec(stack: &str, s: &ServiceSpec) -> Value {
    let mut labels: serde_json::Map<String, Value> = s
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    for (k, v) in [
        (proto::snapshot::COMPOSE_PROJECT_LABEL, stack),
        (proto::snapshot::COMPOSE_SERVICE_LABEL, s.name.as_str()),
        ("com.docker.compose.container-number", "1"),
        ("com.docker.compose.oneoff", "False"),
    ] {
        labels.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    let mut exposed = serde_json::Map::new();
    let mut bindings = serde_json::Map::new();
    for p in &s.ports {
        let key = format!("{}/{}", p.container_port, p.protocol);
        exposed.insert(key.clone(), serde_json::json!({}));
        if let Some(host) = p.host_port {
            bindings.insert(
                key,
                serde_json::json!([{
                    "HostIp": p.host_ip.clone().unwrap_or_default(),
                    "HostPort": host.to_string(),
                }]),
            );
        }
    }
    let mut spec = serde_json::json!({
        "Image": s.image,
        "Env": s.environment,
        "Labels": labels,
        "ExposedPorts": exposed,
        "HostConfig": {
            "PortBindings": bindings,
            "Binds": s.volumes,
            "RestartPolicy": {"Name": s.restart.clone().unwrap_or_else(|| "no".to_owned())},
        },
    });
    if let Some(cmd) = &s.command {
        spec["Cmd"] = serde_json::json!(cmd);
    }
    if let Some(ep) = &s.entrypoint {
        spec["Entrypoint"] = serde_json::json!(ep);
    }
    spec
}

/// The engine's `{"message"}` (or its raw answer), one line.
fn engine_message(status: StatusCode, body: &[u8]) -> String {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    format!(
        "engine answered {}: {}",
        status.as_u16(),
        one_line(message.trim(), 300)
    )
}

async fn get_json(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &'static str,
) -> Result<Value, DockerError> {
    let http = |source| DockerError::Http { path, source };
    sender.ready().await.map_err(http)?;
    let mut req = Request::new(Empty::new());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = hyper::Uri::from_static(path);
    req.headers_mut()
        .insert(HOST, hyper::header::HeaderValue::from_static("docker"));
    let response = sender.send_request(req).await.map_err(http)?;
    let status = response.status();
    let body = match Limited::new(response.into_body(), MAX_ENGINE_ANSWER)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return Err(match e.downcast::<hyper::Error>() {
                Ok(e) => http(*e),
                Err(_) => DockerError::TooLarge { path },
            })
        }
    };
    if !status.is_success() {
        let message = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(DockerError::Status {
            path,
            status,
            message: one_line(&message, 200),
        });
    }
    serde_json::from_slice(&body).map_err(|e| DockerError::Json {
        path,
        detail: e.to_string(),
    })
}

/// Engine text going into logs: one line, bounded.
pub(crate) fn one_line(raw: &str, max_chars: usize) -> String {
    raw.chars()
        .take(max_chars)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// The raw JSON answers a snapshot is made of.
#[derive(Debug, Clone, Default)]
pub struct EngineAnswers {
    /// `GET /version`
    pub version: Value,
    /// `GET /info`
    pub info: Value,
    /// `GET /containers/json?all=1`
    pub containers: Value,
    /// `GET /images/json`
    pub images: Value,
    /// `GET /volumes`
    pub volumes: Value,
    /// `GET /networks`
    pub networks: Value,
}

/// Maps engine answers into a normalised [`Snapshot`] (with `taken_ms` 0). Missing, `null` or
/// mistyped fields become empty values.
pub fn map_snapshot(a: &EngineAnswers) -> Snapshot {
    let mut snap = Snapshot {
        taken_ms: 0,
        engine: engine_info(&a.version, &a.info),
        containers: list(&a.containers).iter().map(container).collect(),
        images: list(&a.images).iter().map(image).collect(),
        volumes: list(field(&a.volumes, "Volumes"))
            .iter()
            .map(|v| Volume {
                name: text(v, "Name"),
                driver: text(v, "Driver"),
                mountpoint: text(v, "Mountpoint"),
            })
            .collect(),
        networks: list(&a.networks)
            .iter()
            .map(|n| Network {
                id: text(n, "Id"),
                name: text(n, "Name"),
                driver: text(n, "Driver"),
                scope: text(n, "Scope"),
            })
            .collect(),
        stacks: Vec::new(),
    };
    snap.normalise();
    snap
}

fn engine_info(version: &Value, info: &Value) -> EngineInfo {
    let components = list(field(version, "Components"));
    let component_names = || components.iter().map(|c| text(c, "Name"));
    // Podman names itself in its components ("Podman Engine"); Docker in its platform
    // ("Docker Engine - Community"), where Podman puts "linux/amd64/debian-12".
    let name = component_names()
        .find(|n| n.contains("Podman"))
        .or_else(|| Some(text(field(version, "Platform"), "Name")).filter(|n| !n.is_empty()))
        .or_else(|| component_names().find(|n| !n.is_empty()))
        .unwrap_or_default();
    let mut os = text(info, "OperatingSystem");
    let os_version = text(info, "OSVersion");
    if !os.is_empty() && !os_version.is_empty() && !os.contains(&os_version) {
        os = format!("{os} {os_version}");
    }
    let first = |a: String, b: String| if a.is_empty() { b } else { a };
    EngineInfo {
        name,
        version: first(text(version, "Version"), text(info, "ServerVersion")),
        api_version: text(version, "ApiVersion"),
        os: first(os, text(version, "Os")),
        arch: first(text(version, "Arch"), text(info, "Architecture")),
        kernel_version: first(text(version, "KernelVersion"), text(info, "KernelVersion")),
        cpus: u32::try_from(int(info, "NCPU").max(0)).unwrap_or(u32::MAX),
        memory_bytes: u64::try_from(int(info, "MemTotal").max(0)).unwrap_or(0),
    }
}

fn container(c: &Value) -> Container {
    Container {
        id: text(c, "Id"),
        names: list(field(c, "Names"))
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        image: text(c, "Image"),
        image_id: text(c, "ImageID"),
        command: text(c, "Command"),
        state: text(c, "State"),
        created: int(c, "Created"),
        labels: labels(field(c, "Labels")),
        ports: list(field(c, "Ports")).iter().map(port).collect(),
    }
}

/// `ip:public->private/type`, `public->private/type` without an address, `private/type`
/// when not published.
fn port(p: &Value) -> String {
    let private = int(p, "PrivatePort");
    let kind = Some(text(p, "Type"))
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "tcp".to_owned());
    let public = int(p, "PublicPort");
    if public == 0 {
        return format!("{private}/{kind}");
    }
    match text(p, "IP") {
        ip if ip.is_empty() => format!("{public}->{private}/{kind}"),
        ip if ip.contains(':') => format!("[{ip}]:{public}->{private}/{kind}"),
        ip => format!("{ip}:{public}->{private}/{kind}"),
    }
}

fn image(i: &Value) -> Image {
    Image {
        id: text(i, "Id"),
        tags: list(field(i, "RepoTags"))
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "<none>:<none>")
            .map(str::to_owned)
            .collect(),
        size: int(i, "Size"),
        created: int(i, "Created"),
    }
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key).unwrap_or(&Value::Null)
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn int(v: &Value, key: &str) -> i64 {
    match v.get(key) {
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_u64().map(|u| i64::try_from(u).unwrap_or(i64::MAX)))
            .or_else(|| n.as_f64().map(|f| f as i64))
            .unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn docker_host_parsing() {
        assert_eq!(
            DockerHost::parse("unix:///var/run/docker.sock").unwrap(),
            DockerHost::Unix("/var/run/docker.sock".into())
        );
        assert_eq!(
            DockerHost::parse(" tcp://10.0.0.5:2376 ").unwrap(),
            DockerHost::Tcp {
                host: "10.0.0.5".into(),
                port: 2376
            }
        );
        assert_eq!(
            DockerHost::parse("tcp://engine").unwrap(),
            DockerHost::Tcp {
                host: "engine".into(),
                port: 2375
            }
        );
        let v6 = DockerHost::parse("tcp://[::1]:2375/").unwrap();
        assert_eq!(
            v6,
            DockerHost::Tcp {
                host: "::1".into(),
                port: 2375
            }
        );
        assert_eq!(v6.to_string(), "tcp://[::1]:2375");
        assert_eq!(
            DockerHost::parse("unix:///run/podman/podman.sock")
                .unwrap()
                .to_string(),
            "unix:///run/podman/podman.sock"
        );
        for bad in [
            "/var/run/docker.sock",
            "unix://relative.sock",
            "ssh://me@host",
            "https://host:2376",
            "tcp://",
            "npipe:////./pipe/docker_engine",
        ] {
            assert!(DockerHost::parse(bad).is_err(), "{bad}");
        }
        let err = DockerHost::parse("ssh://me@host").unwrap_err().to_string();
        assert!(err.contains("not supported"), "{err}");
    }

    #[test]
    fn podman_like_answers_with_nulls_map_cleanly() {
        let answers = EngineAnswers {
            version: json!({
                "Platform": {"Name": "linux/amd64/debian-12"},
                "Components": [{"Name": "Podman Engine", "Version": "4.3.1"}, {"Name": "Conmon"}],
                "Version": "4.3.1", "ApiVersion": "1.41", "Os": "linux", "Arch": "amd64",
                "KernelVersion": "6.1.0"
            }),
            info: json!({
                "NCPU": 2, "MemTotal": 25_276_063_744u64, "OperatingSystem": "debian",
                "OSVersion": "12", "Labels": null, "GenericResources": null
            }),
            containers: json!([
                {
                    "Id": "bbb", "Names": ["/web"], "Image": "busybox", "ImageID": "sha256:1",
                    "Command": "sleep 3600", "Created": 1_795_448_068, "State": "running",
                    "Ports": [{"PrivatePort": 80, "PublicPort": 8088, "Type": "tcp"}],
                    "Labels": {"com.docker.compose.project": "shop",
                               "com.docker.compose.service": "web"}
                },
                {
                    "Id": "aaa", "Names": null, "Image": null, "Command": null,
                    "Created": null, "State": "created", "Ports": null, "Labels": null,
                    "Mounts": null
                },
                {"Id": "ccc", "Ports": [
                    {"IP": "0.0.0.0", "PrivatePort": 53, "PublicPort": 5353, "Type": "udp"},
                    {"IP": "::", "PrivatePort": 53, "PublicPort": 5353, "Type": "udp"},
                    {"PrivatePort": 9000}
                ]},
                "not an object"
            ]),
            images: json!([
                {"Id": "sha256:2", "RepoTags": null, "Size": 10, "Created": 5},
                {"Id": "sha256:1", "RepoTags": ["<none>:<none>", "busybox:latest"],
                 "Size": 1_997_912, "Created": 1_795_448_057u64, "Labels": null}
            ]),
            volumes: json!({"Volumes": null, "Warnings": null}),
            networks: json!([
                {"Name": "podman", "Id": "2f25", "Driver": "bridge", "Scope": "local",
                 "Labels": null, "Containers": null}
            ]),
        };
        let snap = map_snapshot(&answers);
        assert_eq!(snap.engine.name, "Podman Engine");
        assert_eq!(snap.engine.version, "4.3.1");
        assert_eq!(snap.engine.api_version, "1.41");
        assert_eq!(snap.engine.os, "debian 12");
        assert_eq!(snap.engine.arch, "amd64");
        assert_eq!(snap.engine.kernel_version, "6.1.0");
        assert_eq!(snap.engine.cpus, 2);
        assert_eq!(snap.engine.memory_bytes, 25_276_063_744);

        let ids: Vec<_> = snap.containers.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            ["", "aaa", "bbb", "ccc"],
            "sorted; garbage entries are empty"
        );
        let aaa = &snap.containers[1];
        assert!(aaa.names.is_empty() && aaa.ports.is_empty() && aaa.labels.is_empty());
        assert_eq!(aaa.created, 0);
        let web = &snap.containers[2];
        assert_eq!(web.names, ["web"]);
        assert_eq!(web.ports, ["8088->80/tcp"]);
        assert_eq!(web.image_id, "sha256:1");
        assert_eq!(web.command, "sleep 3600");
        assert_eq!(
            snap.containers[3].ports,
            ["0.0.0.0:5353->53/udp", "9000/tcp", "[::]:5353->53/udp"]
        );
        assert_eq!(snap.stacks.len(), 1);
        assert_eq!(snap.stacks[0].name, "shop");
        assert_eq!(snap.stacks[0].running, 1);

        assert_eq!(snap.images.len(), 2);
        assert_eq!(snap.images[0].tags, ["busybox:latest"]);
        assert!(snap.images[1].tags.is_empty());
        assert!(snap.volumes.is_empty());
        assert_eq!(snap.networks[0].name, "podman");
        assert_eq!(snap.networks[0].scope, "local");
    }

    #[test]
    fn docker_answers_and_empty_answers() {
        let answers = EngineAnswers {
            version: json!({
                "Platform": {"Name": "Docker Engine - Community"},
                "Components": [{"Name": "Engine"}], "Version": "27.1.1"
            }),
            info: json!({"OperatingSystem": "Ubuntu 22.04.4 LTS", "OSVersion": "22.04",
                         "Architecture": "x86_64", "NCPU": -3}),
            volumes: json!({"Volumes": [
                {"Name": "b", "Driver": "local", "Mountpoint": "/v/b"},
                {"Name": "a", "Driver": "local", "Mountpoint": null}
            ]}),
            ..EngineAnswers::default()
        };
        let snap = map_snapshot(&answers);
        assert_eq!(snap.engine.name, "Docker Engine - Community");
        assert_eq!(snap.engine.os, "Ubuntu 22.04.4 LTS");
        assert_eq!(snap.engine.arch, "x86_64");
        assert_eq!(snap.engine.cpus, 0);
        assert_eq!(snap.volumes[0].name, "a");
        assert_eq!(snap.volumes[0].mountpoint, "");
        assert!(snap.containers.is_empty() && snap.images.is_empty());
        assert_eq!(map_snapshot(&EngineAnswers::default()), Snapshot::default());
    }
}
