//! `/api/endpoints/{id}/docker/{path}` on actix: every Docker call but hijacks (those arrive
//! on their own connection and are served by [`crate::docker_proxy`] directly). Bodies stream
//! both ways; nothing is buffered whole.

use actix_web::http::header::{HeaderName as AxName, HeaderValue as AxValue};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::{BodyDataStream, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use crate::docker_proxy::{copy_headers, engine_target, is_upgrade, DockerProxy, Toward};
use crate::error::ApiError;

/// Whether `path` is one of the Docker proxy's (`/api/endpoints/{id}/docker...`).
pub fn is_docker_path(path: &str) -> bool {
    crate::docker_proxy::docker_path(path).is_some()
}

pub async fn proxy(
    proxy: web::Data<DockerProxy>,
    req: HttpRequest,
    payload: web::Payload,
    path: web::Path<(u64, String)>,
) -> Result<HttpResponse, ApiError> {
    let answer = forward(&proxy, req, payload, path).await;
    let status = match &answer {
        Ok(res) => res.status().as_u16(),
        Err(e) => e.status(),
    };
    proxy
        .metrics
        .docker_requests
        .with_label_values(&[crate::metrics::status_class(status)])
        .inc();
    answer
}

async fn forward(
    proxy: &DockerProxy,
    req: HttpRequest,
    payload: web::Payload,
    path: web::Path<(u64, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, rest) = path.into_inner();
    let target = engine_target(&rest, Some(req.query_string()).filter(|q| !q.is_empty()));
    let mut headers = HeaderMap::with_capacity(req.headers().len());
    for (name, value) in req.headers() {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            headers.append(n, v);
        }
    }
    if is_upgrade(&headers) {
        return Err(ApiError::Misdirected(
            "a Docker hijack (attach, exec start) must be the first request of its connection; \
             the docker CLI does this by itself"
                .into(),
        ));
    }
    let method = hyper::Method::from_bytes(req.method().as_str().as_bytes())
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let body = StreamBody::new(payload.map(|chunk| {
        chunk
            .map(Frame::data)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }));
    let answer = proxy.exchange(id, method, &target, &headers, body).await?;
    let (parts, body) = answer.into_parts();
    let status = actix_web::http::StatusCode::from_u16(parts.status.as_u16())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut res = HttpResponse::build(status);
    let mut kept = HeaderMap::new();
    copy_headers(&parts.headers, &mut kept, false, Toward::Operator);
    // actix frames the body itself: a length the engine announced is kept as the body's size
    // (never as a second header next to chunked encoding).
    let length = kept
        .remove(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));
    for (name, value) in &kept {
        if let (Ok(n), Ok(v)) = (
            AxName::from_bytes(name.as_str().as_bytes()),
            AxValue::from_bytes(value.as_bytes()),
        ) {
            res.append_header((n, v));
        }
    }
    if !has_body(status) {
        // 204, 304 and 1xx carry no body: no framing may follow the head (a chunked
        // terminator there is read by the client as the start of an unsolicited next
        // response, and corrupts the connection's next exchange). HEAD is actix's to handle:
        // it keeps the length and sends no body.
        return Ok(res.finish());
    }
    let stream = BodyDataStream::new(body).map(|r: Result<Bytes, hyper::Error>| {
        r.map_err(|e| actix_web::error::ErrorBadGateway(e.to_string()))
    });
    Ok(match length {
        Some(n) => res.body(actix_web::body::SizedStream::new(n, stream)),
        None => res.streaming(stream),
    })
}

/// Whether an answer with `status` can have a body at all (RFC 9110 6.4.1: never 1xx, 204
/// and 304).
fn has_body(status: actix_web::http::StatusCode) -> bool {
    use actix_web::http::StatusCode;
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::StatusCode;

    #[test]
    fn bodiless_answers_are_known() {
        assert!(!has_body(StatusCode::NO_CONTENT));
        assert!(!has_body(StatusCode::NOT_MODIFIED));
        assert!(!has_body(StatusCode::SWITCHING_PROTOCOLS));
        assert!(has_body(StatusCode::OK));
        assert!(has_body(StatusCode::CREATED));
    }
}
