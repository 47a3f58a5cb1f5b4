#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The web console's server side against an in-process control plane: the embedded files
//! under `/ui`, signing in for a session cookie, the CSRF token that changing requests need
//! (on actix's routes and on the Docker proxy's own connections alike), the exec WebSocket's
//! origin check, `405` with `Allow`, and the metrics that exist from the start.

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{http, ControlPlane, ADMIN_KEY};

/// Signs in: the cookie (`name=value`) and the CSRF token.
async fn sign_in(cp: &ControlPlane) -> (String, String) {
    let r = http()
        .post(cp.api("/api/auth/session"))
        .json(&json!({"apiKey": ADMIN_KEY}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let set = r
        .headers()
        .get("set-cookie")
        .expect("a cookie")
        .to_str()
        .unwrap()
        .to_owned();
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/api"] {
        assert!(set.contains(attribute), "{attribute} in {set}");
    }
    assert_eq!(r.headers()["cache-control"], "no-store");
    let body: Value = r.json().await.unwrap();
    let csrf = body["csrfToken"].as_str().expect("csrfToken").to_owned();
    assert!(body["expiresAt"].is_string(), "{body}");
    assert!(!set.contains(ADMIN_KEY), "the key is not the cookie");
    let cookie = set.split(';').next().unwrap().to_owned();
    (cookie, csrf)
}

/// The headers of a WebSocket handshake (RFC 6455's sample key).
fn websocket_handshake() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("connection", HeaderValue::from_static("Upgrade"));
    h.insert("upgrade", HeaderValue::from_static("websocket"));
    h.insert("sec-websocket-version", HeaderValue::from_static("13"));
    h.insert(
        "sec-websocket-key",
        HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
    );
    h
}

fn with(cookie: &str, csrf: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("cookie", HeaderValue::from_str(cookie).unwrap());
    if let Some(t) = csrf {
        h.insert("x-csrf-token", HeaderValue::from_str(t).unwrap());
    }
    h
}

#[actix_web::test]
async fn the_console_is_served_from_the_binary() {
    let cp = ControlPlane::start().await;
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = client.get(cp.api("/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(r.headers()["location"], "/ui/");
    let r = client.get(cp.api("/ui")).send().await.unwrap();
    assert_eq!(r.headers()["location"], "/ui/");

    let r = client.get(cp.api("/ui/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let page = r.text().await.unwrap();
    assert!(page.contains("/ui/app.js"));

    let r = client.get(cp.api("/ui/app.js")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let etag = r.headers()["etag"].clone();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    assert!(r.bytes().await.unwrap().len() > 1000);
    let r = client
        .get(cp.api("/ui/app.js"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);

    let r = client.get(cp.api("/ui/nope.js")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = client.post(cp.api("/ui/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    cp.stop().await;
}

#[actix_web::test]
async fn a_session_stands_for_the_key_and_changes_need_its_csrf_token() {
    let cp = ControlPlane::start().await;
    let client = http();

    let r = client
        .post(cp.api("/api/auth/session"))
        .json(&json!({"apiKey": "wrong"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("set-cookie").is_none());
    let r = client
        .get(cp.api("/api/auth/session"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let (cookie, csrf) = sign_in(&cp).await;
    // Reading needs only the cookie.
    let r = client
        .get(cp.api("/api/endpoints"))
        .headers(with(&cookie, None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A reloaded page gets its token back.
    let r = client
        .get(cp.api("/api/auth/session"))
        .headers(with(&cookie, None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["csrfToken"], csrf.as_str());

    // Changing needs the token as well: refused without it, or with another.
    for token in [None, Some("0000"), Some(csrf.as_str())] {
        let r = client
            .post(cp.api("/api/endpoints"))
            .headers(with(&cookie, token))
            .json(&json!({"name": "from-the-console"}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        if token == Some(csrf.as_str()) {
            assert_eq!(status, StatusCode::CREATED, "{body}");
        } else {
            assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
            assert_eq!(body["code"], "csrf");
        }
    }
    let (_, list, _) = testkit::api::admin_get(&client, &cp.api("/api/endpoints")).await;
    assert_eq!(list.as_array().unwrap().len(), 1, "one created: {list}");

    // The Docker proxy takes the session too, on a connection of its own (its first request
    // is a Docker path, so hyper serves it): a read reaches the environment lookup, a change
    // without the token does not.
    let fresh = http();
    let r = fresh
        .get(cp.api("/api/endpoints/999/docker/_ping"))
        .headers(with(&cookie, None))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "unknown environment, past the check"
    );
    let r = http()
        .post(cp.api("/api/endpoints/999/docker/containers/x/stop"))
        .headers(with(&cookie, None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http()
        .get(cp.api("/api/endpoints/999/docker/_ping"))
        .header("cookie", "edgeplane_session=v1.1.2.3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // The terminal's WebSocket only from this server's pages.
    let r = client
        .get(cp.api("/api/endpoints/999/exec/abc123/ws"))
        .headers(with(&cookie, None))
        .header("origin", "https://evil.example")
        .headers(websocket_handshake())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Not a handshake: refused before anything reaches the engine (a plain GET, an image's
    // request, must not start a process); a handshake with the cookie and no Origin too.
    let r = client
        .get(cp.api("/api/endpoints/999/exec/abc123/ws"))
        .headers(with(&cookie, None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = client
        .get(cp.api("/api/endpoints/999/exec/abc123/ws"))
        .headers(with(&cookie, None))
        .headers(websocket_handshake())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Docker's own upgrades (attach, exec start, its WebSocket routes) take the key only:
    // a page of the same site could open them with the cookie.
    let r = http()
        .get(cp.api("/api/endpoints/999/docker/containers/x/attach/ws?stream=1"))
        .headers(with(&cookie, None))
        .header("origin", "https://evil.example")
        .headers(websocket_handshake())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Every API answer is data: not sniffed, not run, not framed, not cached; on the Docker
    // proxy's own connections too.
    for r in [
        client
            .get(cp.api("/api/endpoints"))
            .headers(with(&cookie, None))
            .send()
            .await
            .unwrap(),
        http()
            .get(cp.api("/api/endpoints/999/docker/_ping"))
            .headers(with(&cookie, None))
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert_eq!(r.headers()["cache-control"], "no-store");
        let csp = r.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.starts_with("sandbox"), "{csp}");
    }

    // A sign-in body is small: a large one is refused, not read.
    let r = client
        .post(cp.api("/api/auth/session"))
        .body(format!("{{\"apiKey\": \"{}\"}}", "k".repeat(4096)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // And strictly an object with the key.
    for body in [
        json!([ADMIN_KEY]),
        json!({"apiKey": ADMIN_KEY, "extra": 1}),
        json!({}),
    ] {
        let r = client
            .post(cp.api("/api/auth/session"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
        assert!(r.headers().get("set-cookie").is_none());
    }

    // Signing out drops the cookie.
    let r = client
        .delete(cp.api("/api/auth/session"))
        .headers(with(&cookie, Some(&csrf)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let set = r.headers()["set-cookie"].to_str().unwrap();
    assert!(set.contains("Max-Age=0"), "{set}");
    cp.stop().await;
}

#[actix_web::test]
async fn a_wrong_method_answers_405_with_allow() {
    let cp = ControlPlane::start().await;
    let client = http();
    for (method, path, allow) in [
        (reqwest::Method::PUT, "/api/endpoints", "GET, POST"),
        (reqwest::Method::POST, "/api/endpoints/summary", "GET"),
        (reqwest::Method::DELETE, "/api/settings", "GET, PATCH, PUT"),
        (reqwest::Method::GET, "/api/edge_stacks/1/rollback", "POST"),
        (reqwest::Method::GET, "/edge/c", "POST"),
        (
            reqwest::Method::PUT,
            "/api/auth/session",
            "DELETE, GET, POST",
        ),
    ] {
        let r = client
            .request(method.clone(), cp.api(path))
            .header("X-API-Key", ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(r.headers()["allow"], allow, "{method} {path}");
        let body: Value = r.json().await.unwrap();
        assert!(body["message"].as_str().unwrap().contains("not allowed"));
    }
    cp.stop().await;
}

#[actix_web::test]
async fn labelled_counters_and_process_series_exist_from_the_start() {
    let cp = ControlPlane::start().await;
    let text = http()
        .get(format!("{}/metrics", cp.metrics_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "edgeplane_store_errors_total{op=\"record_heartbeats\"} 0",
        "edgeplane_store_errors_total{op=\"put_tunnel_grant\"} 0",
        "edgeplane_docker_proxy_requests_total{class=\"5xx\"} 0",
        "edgeplane_api_requests_total{class=\"4xx\"} 0",
        "edgeplane_checkin_requests_total{result=\"bad_proof\"} 0",
        "edgeplane_api_connections_refused_total{reason=\"full\"} 0",
        "edgeplane_gateway_handshakes_total{kind=\"agent\",result=\"bad_credentials\"} 0",
        "edgeplane_gateway_tunnel_closes_total{reason=\"silent\"} 0",
        "edgeplane_async_snapshot_reports_total{kind=\"delta\",outcome=\"bad\"} 0",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "edgeplane_build_info{binary=\"control-plane\",version=",
    ] {
        assert!(text.contains(series), "{series} in\n{text}");
    }
    cp.stop().await;
}
