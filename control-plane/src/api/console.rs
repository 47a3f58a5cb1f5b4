//! The web console's API: signing in and out (`/api/auth/session`, a session cookie in place
//! of the admin key: [`crate::session`]) and the browser's exec terminal (a WebSocket that does
//! Docker's hijack through the tunnel for it).

use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::Full;
use hyper::header::{self as hheader, HeaderMap, HeaderValue};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::endpoints::rfc3339;
use super::AppState;
use crate::docker_proxy::DockerProxy;
use crate::error::{ApiError, ProxyError};
use crate::session::{self, Refused, Session};

/// Registers the sign-in routes; outside the admin check (they are how one gets past it).
pub fn configure_session(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/auth/session")
            .route(web::post().to(sign_in))
            .route(web::get().to(current))
            .route(web::delete().to(sign_out)),
    );
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignIn {
    api_key: String,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionView {
    csrf_token: String,
    expires_at: String,
}

fn answer(s: &Session, set_cookie: Option<String>) -> HttpResponse {
    let mut res = HttpResponse::Ok();
    res.insert_header((header::CACHE_CONTROL, "no-store"));
    if let Some(c) = set_cookie {
        res.insert_header((header::SET_COOKIE, c));
    }
    res.json(SessionView {
        csrf_token: s.csrf.clone(),
        expires_at: rfc3339(s.expires_ms),
    })
}

/// A sign-in body is a key in JSON: anything longer is refused before it is read whole.
const SIGN_IN_LIMIT: usize = 1024;
/// The whole body must arrive within this: the route is open to anyone, and a connection
/// that trickles a body would otherwise be held while it is "served".
const SIGN_IN_BODY_TIME: Duration = Duration::from_secs(10);

/// The sign-in body, at most [`SIGN_IN_LIMIT`] bytes within [`SIGN_IN_BODY_TIME`].
async fn sign_in_body(mut payload: web::Payload) -> Result<SignIn, ApiError> {
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
            if body.len() + chunk.len() > SIGN_IN_LIMIT {
                return Err(ApiError::PayloadTooLarge(format!(
                    "a sign-in body is at most {SIGN_IN_LIMIT} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    let body = tokio::time::timeout(SIGN_IN_BODY_TIME, read)
        .await
        .map_err(|_| {
            ApiError::RequestTimeout("the sign-in body did not arrive in time".into())
        })??;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    super::body::from_json(value)
}

/// `POST /api/auth/session`: the admin key for a session cookie.
async fn sign_in(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = sign_in_body(payload).await?;
    let now = proto::clock::now_ms();
    let s = state
        .admin
        .open_session(&body.api_key, now)
        .ok_or(Refused::InvalidKey)?;
    crate::front::proved(&req);
    tracing::info!("console session opened");
    Ok(answer(&s, Some(session::set_cookie(&s, now))))
}

/// `GET /api/auth/session`: whether the cookie still stands for a session, and its CSRF
/// token (a reloaded page has forgotten it).
async fn current(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let cookies: Vec<&str> = req
        .headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .collect();
    let token = session::cookie(&cookies, session::COOKIE).ok_or(Refused::Missing)?;
    let s = state
        .admin
        .session(token, proto::clock::now_ms())
        .ok_or(Refused::InvalidSession)?;
    crate::front::proved(&req);
    Ok(answer(&s, None))
}

/// `DELETE /api/auth/session`: the browser forgets its cookie. (Sessions are not stored, so
/// one copied out of the browser stays valid until it expires or the admin key changes.)
async fn sign_out() -> HttpResponse {
    HttpResponse::NoContent()
        .insert_header((header::SET_COOKIE, session::clear_cookie()))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish()
}
/// A ping this often keeps proxies (and the front's idle deadline) from closing a quiet shell.
const PING_EVERY: Duration = Duration::from_secs(20);
/// Terminal output read at most this much at a time (one frame).
const READ_CHUNK: usize = 16 * 1024;
/// A frame from the browser larger than this closes the socket (keystrokes and pastes are
/// small; actix-ws's own limit is 64 KiB).
const MAX_INPUT_FRAME: usize = 64 * 1024;

#[derive(serde::Deserialize)]
pub struct ExecPath {
    id: u64,
    exec: String,
}

/// `GET /api/endpoints/{id}/exec/{execId}/ws`: the terminal of an exec created through the
/// Docker proxy (`Tty: true`), as a WebSocket.
///
/// A browser sends the session cookie with a WebSocket handshake whatever page opened it, and
/// cannot add a CSRF header to it: a handshake from a browser must come from a page of this
/// server (`Origin`), or it is refused.
pub async fn exec_ws(
    proxy: web::Data<DockerProxy>,
    req: HttpRequest,
    payload: web::Payload,
    path: web::Path<ExecPath>,
) -> Result<HttpResponse, ApiError> {
    let ExecPath { id, exec } = path.into_inner();
    if exec.is_empty() || exec.len() > 128 || !exec.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ApiError::BadRequest(format!("invalid exec id {exec:?}")));
    }
    // A WebSocket handshake, or nothing is started (a plain GET, an image's request, with
    // the cookie, must not start a process).
    let h = req.headers();
    let upgrade = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade
        || !h.contains_key(header::SEC_WEBSOCKET_KEY)
        || !h.contains_key(header::SEC_WEBSOCKET_VERSION)
    {
        return Err(ApiError::BadRequest(
            "this route is a WebSocket: open it with a WebSocket handshake".into(),
        ));
    }
    same_origin(&req)?;
    // Starts the exec before the handshake is answered, so an unknown exec or a missing
    // tunnel is an HTTP error the page can show, not a socket that opens and closes.
    let mut headers = HeaderMap::new();
    headers.insert(hheader::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(hheader::UPGRADE, HeaderValue::from_static("tcp"));
    headers.insert(
        hheader::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    const START: &[u8] = br#"{"Detach":false,"Tty":true}"#;
    // The proxy sends a body only where the framing announces one.
    headers.insert(hheader::CONTENT_LENGTH, HeaderValue::from(START.len()));
    let body = Full::new(Bytes::from_static(START));
    let mut answer = proxy
        .exchange(
            id,
            hyper::Method::POST,
            &format!("/exec/{exec}/start"),
            &headers,
            body,
        )
        .await?;
    if answer.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        let status = answer.status();
        let text = http_body_util::BodyExt::collect(answer.into_body())
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&text).into_owned());
        return Err(match status.as_u16() {
            404 => ApiError::NotFound(format!("exec {exec}: {message}")),
            409 => ApiError::Conflict(format!("exec {exec}: {message}")),
            _ => ProxyError::BadGateway(format!(
                "the engine answered {status} to starting exec {exec}: {message}"
            ))
            .into(),
        });
    }
    let engine = hyper::upgrade::on(&mut answer);
    let (response, mut session, incoming) = actix_ws::handle(&req, payload)
        .map_err(|e| ApiError::BadRequest(format!("not a WebSocket handshake: {e}")))?;
    let mut incoming = incoming.max_frame_size(MAX_INPUT_FRAME);
    actix_rt::spawn(async move {
        let engine = match engine.await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, "exec upgrade failed");
                let _ = session.close(None).await;
                return;
            }
        };
        let (mut from_engine, mut to_engine) = tokio::io::split(TokioIo::new(engine));
        let mut buf = vec![0u8; READ_CHUNK];
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let reason = loop {
            tokio::select! {
                read = from_engine.read(&mut buf) => match read {
                    Ok(0) => break "the shell ended",
                    Ok(n) => {
                        if session.binary(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            break "the browser went away";
                        }
                    }
                    Err(_) => break "the tunnel closed",
                },
                msg = incoming.next() => match msg {
                    Some(Ok(actix_ws::Message::Binary(b))) => {
                        if to_engine.write_all(&b).await.is_err() { break "the tunnel closed"; }
                    }
                    Some(Ok(actix_ws::Message::Text(t))) => {
                        if to_engine.write_all(t.as_bytes()).await.is_err() { break "the tunnel closed"; }
                    }
                    Some(Ok(actix_ws::Message::Ping(p))) => {
                        if session.pong(&p).await.is_err() { break "the browser went away"; }
                    }
                    Some(Ok(actix_ws::Message::Close(_))) | None => break "the browser closed",
                    Some(Ok(_)) => {}
                    Some(Err(_)) => break "the browser sent an invalid frame",
                },
                _ = ping.tick() => {
                    if session.ping(b"").await.is_err() { break "the browser went away"; }
                }
            }
        };
        tracing::debug!(environment = id, reason, "exec terminal closed");
        let _ = to_engine.shutdown().await;
        let _ = session
            .close(Some(actix_ws::CloseReason {
                code: actix_ws::CloseCode::Normal,
                description: Some(reason.to_owned()),
            }))
            .await;
    });
    Ok(response)
}

/// Refuses a handshake whose `Origin` is not this server (cross-site WebSocket hijacking: the
/// cookie would go along with another site's handshake).
fn same_origin(req: &HttpRequest) -> Result<(), ApiError> {
    // A program with the key need not say where it comes from; a request with only the
    // cookie must (browsers always send Origin with a WebSocket handshake).
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        if req.headers().contains_key(crate::auth::HEADER) {
            return Ok(());
        }
        return Err(ApiError::Forbidden(
            "a WebSocket opened with the session cookie must say its Origin".into(),
        ));
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let expected = format!("https://{host}");
    if origin.as_bytes().eq_ignore_ascii_case(expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "a WebSocket from origin {:?} is refused: only pages of this server ({expected}) may open one",
            origin.to_str().unwrap_or("?")
        )))
    }
}
