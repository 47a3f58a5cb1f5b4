//! The web console's files under `/ui` (CONTRACT.md), embedded in the binary at build time
//! (`build.rs` reads `ui/dist`, built from `ui/src`; a test checks the two match). The page
//! talks to the admin API with a session cookie (`api::console`); this module serves bytes.
//!
//! Every answer may be revalidated (`ETag`, `Cache-Control: no-cache`: file names carry no
//! hash, so a new binary's files are picked up at once), and the page is locked down: scripts
//! and styles only from here, no framing, no referrer.

use std::collections::HashMap;
use std::sync::LazyLock;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use sha2::{Digest as _, Sha256};

mod files {
    include!(concat!(env!("OUT_DIR"), "/ui_assets.rs"));
}

/// The policy of every console answer: the page loads nothing from elsewhere (it must work on
/// a closed network), and the terminal's WebSocket goes back to this server.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; font-src 'self'; connect-src 'self'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

struct Asset {
    body: &'static [u8],
    etag: String,
    content_type: &'static str,
}

static ASSETS: LazyLock<HashMap<&'static str, Asset>> = LazyLock::new(|| {
    files::ASSETS
        .iter()
        .map(|&(name, body)| {
            let digest = Sha256::digest(body);
            let asset = Asset {
                body,
                etag: format!("\"{}\"", hex::encode(&digest[..12])),
                content_type: content_type(name),
            };
            (name, asset)
        })
        .collect()
});

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// Registers `/`, `/ui` and `/ui/{file}`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/")
            .route(web::get().to(to_console))
            .route(web::head().to(to_console)),
    )
    .service(
        web::resource("/ui")
            .route(web::get().to(to_console))
            .route(web::head().to(to_console)),
    )
    .service(
        web::resource("/ui/{file:.*}")
            .route(web::get().to(file))
            .route(web::head().to(file)),
    );
}

async fn to_console() -> HttpResponse {
    HttpResponse::Found()
        .insert_header((header::LOCATION, "/ui/"))
        .finish()
}

async fn file(req: HttpRequest, path: web::Path<String>) -> HttpResponse {
    let name = path.into_inner();
    let name = if name.is_empty() {
        "index.html"
    } else {
        name.as_str()
    };
    let Some(asset) = ASSETS.get(name) else {
        return actix_web::ResponseError::error_response(&crate::error::ApiError::NotFound(
            format!("no console file {name:?}"),
        ));
    };
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',')
                .any(|t| t.trim() == asset.etag || t.trim() == "*")
        });
    let mut res = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    res.insert_header((header::ETAG, asset.etag.clone()))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"));
    if fresh {
        return res.finish();
    }
    res.content_type(asset.content_type).body(asset.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_script_are_embedded() {
        for name in ["index.html", "app.js", "app.css"] {
            let a = ASSETS
                .get(name)
                .unwrap_or_else(|| panic!("{name} embedded"));
            assert!(!a.body.is_empty());
        }
        let index = std::str::from_utf8(ASSETS["index.html"].body).expect("utf-8");
        assert!(
            index.contains("/ui/app.js"),
            "the page loads its script from /ui"
        );
        assert!(
            !index.contains("http://") && !index.contains("https://"),
            "nothing from elsewhere: {index}"
        );
    }
}
