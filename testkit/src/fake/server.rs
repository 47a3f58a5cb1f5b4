//! The fake's HTTP side: a deliberately small hand-written HTTP/1.1 server over TLS
//! (accepting, reading requests, answering), the routing, and the admin routes the load test
//! uses.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use proto::snapshot::MAX_UPLOAD_FRAME;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use super::checkin::{checkin, checkin_kind, upload};
use super::{create_env, lock, State};

pub(super) async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    close_rx: watch::Receiver<u64>,
) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let mut close_rx = close_rx.clone();
        let connection = {
            let mut st = lock(&shared.state);
            st.connections += 1;
            st.connections
        };
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            close_rx.mark_unchanged();
            tokio::select! {
                _ = serve(stream, &shared, connection, peer) => {}
                _ = close_rx.changed() => {}
            }
        });
    }
}

pub(super) struct Shared {
    pub(super) state: Arc<Mutex<State>>,
    pub(super) api_key: String,
    /// Wakes held check-ins when a tunnel is wanted.
    pub(super) wake: Arc<Notify>,
}

pub(super) struct HttpRequest {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Option<HttpRequest> {
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let path = request_line.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if len > MAX_UPLOAD_FRAME + 1024 {
        return None;
    }
    let body_start = head_end + 4;
    while buf.len() < body_start + len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[body_start..body_start + len].to_vec();
    buf.drain(..body_start + len);
    Some(HttpRequest {
        method,
        path,
        headers,
        body,
    })
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    shared: &Shared,
    connection: u64,
    _peer: SocketAddr,
) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf).await {
        let (status, content_type, body) = match checkin_kind(shared, &req) {
            Some(kind) => checkin(shared, &req, connection, kind).await,
            None => route(shared, &req),
        };
        let head = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
            reason(status),
            body.len()
        );
        if stream.write_all(head.as_bytes()).await.is_err()
            || stream.write_all(&body).await.is_err()
            || stream.flush().await.is_err()
        {
            return;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Other",
    }
}

pub(super) fn json_error(status: u16, code: &str, message: &str) -> (u16, &'static str, Vec<u8>) {
    let body = serde_json::json!({"message": message, "code": code});
    (status, "application/json", body.to_string().into_bytes())
}

pub(super) type Response = (u16, &'static str, Vec<u8>);

fn route(shared: &Shared, req: &HttpRequest) -> Response {
    if req.method == "POST" && req.path == proto::snapshot::SNAPSHOT_PATH {
        return upload(shared, req);
    }
    if req.method == "POST" && req.path == proto::wire::HELD_CHECKIN_PATH {
        // A server that predates held check-ins: no such route (no agent error code).
        let body = serde_json::json!({"message": "no route for POST /edge/h"});
        return (404, "application/json", body.to_string().into_bytes());
    }
    if req.header("x-api-key") != Some(shared.api_key.as_str()) {
        return json_error(401, "unauthorized", "missing or wrong X-API-Key");
    }
    if req.method == "POST" && req.path == "/api/endpoints/bulk" {
        return bulk_create(shared, req);
    }
    if req.method == "DELETE" {
        if let Some(id) = req
            .path
            .strip_prefix("/api/endpoints/")
            .and_then(|s| s.parse::<u64>().ok())
        {
            let mut st = lock(&shared.state);
            return if st.envs.remove(&id).is_some() {
                st.deleted.push(id);
                (204, "application/json", Vec::new())
            } else {
                json_error(404, "not_found", "no such environment")
            };
        }
    }
    json_error(404, "not_found", "no such route")
}

fn bulk_create(shared: &Shared, req: &HttpRequest) -> (u16, &'static str, Vec<u8>) {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct NewEnv {
        name: String,
        checkin_interval: Option<u32>,
    }
    let Ok(items) = serde_json::from_slice::<Vec<NewEnv>>(&req.body) else {
        return json_error(400, "bad_request", "expected a JSON array");
    };
    if items.len() > 1000 {
        return json_error(400, "bad_request", "at most 1000 environments per call");
    }
    let (url, fp) = {
        let st = lock(&shared.state);
        (st.url.clone(), st.fingerprint)
    };
    let out: Vec<serde_json::Value> = items
        .iter()
        .map(|item| {
            let (id, token) =
                create_env(&shared.state, &url, fp, item.checkin_interval.unwrap_or(5));
            serde_json::json!({"id": id, "name": item.name, "edgeKey": token.encode()})
        })
        .collect();
    (
        201,
        "application/json",
        serde_json::Value::Array(out).to_string().into_bytes(),
    )
}
