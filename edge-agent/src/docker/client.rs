//! The engine API client: [`DockerClient`] takes a snapshot (a few `GET`s on one
//! connection, [`DockerError`] saying which failed) and sends single requests on fresh
//! connections for the commands.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full, Limited};
use hyper::header::HOST;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use proto::snapshot::Snapshot;
use serde_json::Value;

use super::snapshot::{map_snapshot, EngineAnswers};
use super::{one_line, DockerHost, CONNECT_TIMEOUT, MAX_ENGINE_ANSWER, REQUEST_TIMEOUT};

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

impl DockerClient {
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
    ) -> Result<(StatusCode, Bytes), String> {
        self.call_with(method, path, None).await
    }

    /// One request on a fresh engine connection, with an optional JSON body: status and
    /// (bounded) body.
    pub(super) async fn call_with(
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
