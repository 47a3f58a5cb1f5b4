//! The HTTPS API: the agent check-in route and the admin REST API (every admin route behind
//! `X-API-Key`). Routes are declared once in [`ROUTES`] (`routes.rs`), with their parameters,
//! bodies, answers and refusals: the OpenAPI document is rendered from it alone, `Allow`
//! answers from it, and the tests prove every route in it is served and checks
//! authentication.

mod agent;
mod auth;
mod body;
mod catalog;
mod commands;
pub(crate) mod compose;
mod console;
mod docker;
mod edge_groups;
mod edge_stacks;
mod endpoints;
mod install;
mod openapi;
mod routes;

use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpResponse};
use store::SharedStore;

pub use crate::auth::AdminKeys;
pub use crate::error::ApiError;
pub use agent::{
    announced_body, body_limit, serve as serve_agent, AgentAnswer, AgentRoute, AGENT_BODY_TOTAL,
};
pub(crate) use body::{from_json, Json};
pub use routes::{Answer, Body, Param, Route, Schema, ROUTES, SESSION_ROUTES};

use crate::config::Limits;
use crate::fleet::Fleet;
use crate::metrics::Metrics;

/// What agents are told: where to call and what to pin.
#[derive(Clone, Debug)]
pub struct PublicInfo {
    pub api_url: String,
    pub tunnel_addr: String,
    pub tunnel_fingerprint: [u8; 32],
}

pub struct AppState {
    pub store: SharedStore,
    pub fleet: Arc<Fleet>,
    pub directory: Arc<crate::directory::Directory>,
    pub metrics: Arc<Metrics>,
    pub admin: AdminKeys,
    pub public: PublicInfo,
    pub agent_secret: Option<String>,
    pub agent_image: String,
    pub limits: Limits,
}

/// Registers every route on an actix app.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(4 * 1024 * 1024)
            // `curl -d '{...}'` sends a form content type: the body is JSON all the same.
            .content_type_required(false)
            .error_handler(|e, _| {
                use actix_web::error::JsonPayloadError as E;
                match e {
                    E::Overflow { limit } | E::OverflowKnownLength { limit, .. } => {
                        ApiError::PayloadTooLarge(format!("JSON body larger than {limit} bytes"))
                    }
                    e => ApiError::BadRequest(format!("invalid JSON body: {e}")),
                }
                .into()
            }),
    )
    .app_data(
        web::QueryConfig::default()
            .error_handler(|e, _| ApiError::BadRequest(format!("invalid query: {e}")).into()),
    )
    .app_data(web::PathConfig::default().error_handler(|e, req| {
        // `PATCH /api/endpoints/bulk` reaches `/endpoints/{id}`'s PATCH, whose id does not
        // parse: the path is another route's, which does not serve the method.
        match method_not_allowed(req) {
            Some(res) => actix_web::error::InternalError::from_response(e, res).into(),
            None => ApiError::NotFound(format!("invalid path parameter: {e}")).into(),
        }
    }))
    .configure(agent::configure)
    .configure(console::configure_session)
    .configure(crate::ui::configure)
    .service(
        web::scope("/api")
            .wrap(from_fn(auth::require_admin_key))
            // Outermost: counts refusals by the key check too, and only admin requests.
            .wrap(from_fn(count_requests))
            // First: the busiest route, and every pattern tried before a match is a regex
            // run (patterns with a segment are; their paths never overlap this one's).
            .route(
                "/endpoints/{id}/docker{tail:(/.*)?}",
                // The methods the document lists (TRACE and the like answer 405).
                web::route()
                    .guard(actix_web::guard::fn_guard(|ctx| {
                        docker_methods().any(|m| m == ctx.head().method.as_str())
                    }))
                    .to(docker::proxy),
            )
            .service(
                web::resource("/endpoints")
                    .route(web::get().to(endpoints::list))
                    .route(web::post().to(endpoints::create)),
            )
            .route("/endpoints/bulk", web::post().to(endpoints::create_bulk))
            .route("/endpoints/summary", web::get().to(endpoints::summary))
            .service(
                web::resource("/endpoints/{id}")
                    .route(web::get().to(endpoints::get))
                    .route(web::patch().to(endpoints::patch))
                    .route(web::delete().to(endpoints::delete)),
            )
            .route(
                "/endpoints/{id}/association",
                web::post().to(endpoints::reset_association),
            )
            .route("/endpoints/{id}/install", web::get().to(install::install))
            .route(
                "/endpoints/{id}/exec/{exec}/ws",
                web::get().to(console::exec_ws),
            )
            .route(
                "/endpoints/{id}/snapshot",
                web::get().to(endpoints::snapshot),
            )
            .service(
                web::resource("/endpoints/{id}/commands")
                    .route(web::get().to(commands::list))
                    .route(web::post().to(commands::queue)),
            )
            .configure(catalog::configure)
            .configure(edge_groups::configure)
            .configure(edge_stacks::configure)
            .route("/openapi.json", web::get().to(openapi::document))
            .default_service(web::to(not_found)),
    )
    .default_service(web::to(not_found));
}

/// What no route took: `405` with `Allow` for a known path asked with another method (routes
/// declared with `.route()` fall through to here rather than answer it themselves), else
/// `404`.
async fn not_found(req: actix_web::HttpRequest) -> HttpResponse {
    if let Some(res) = method_not_allowed(&req) {
        return res;
    }
    actix_web::ResponseError::error_response(&ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

/// `405` with `Allow` when the request's path is a route's that does not serve its method.
fn method_not_allowed(req: &actix_web::HttpRequest) -> Option<HttpResponse> {
    let allowed = allowed_methods(req.path());
    if allowed.is_empty() || allowed.contains(&req.method().as_str()) {
        return None;
    }
    Some(
        HttpResponse::MethodNotAllowed()
            .insert_header((actix_web::http::header::ALLOW, allowed.join(", ")))
            .json(serde_json::json!({
                "message": format!("method {} is not allowed on {}", req.method(), req.path())
            })),
    )
}

/// The methods a path answers (the `Allow` header of a 405), from the route tables.
pub fn allowed_methods(path: &str) -> Vec<&'static str> {
    let matching: Vec<&Route> = ROUTES
        .iter()
        .chain(SESSION_ROUTES)
        .filter(|r| template_matches(r.path, path))
        .collect();
    // The most specific template wins, as in the router: `/api/endpoints/summary` over
    // `/api/endpoints/{id}`.
    let placeholders = |t: &str| t.matches('{').count();
    let fewest = matching.iter().map(|r| placeholders(r.path)).min();
    let mut methods: Vec<&'static str> = matching
        .iter()
        .filter(|r| Some(placeholders(r.path)) == fewest)
        .map(|r| r.method)
        .collect();
    if AgentRoute::of(path).is_some() {
        methods.push("POST");
    }
    if path == "/" || path == "/ui" || path.starts_with("/ui/") {
        methods.extend(["GET", "HEAD"]);
    }
    if docker::is_docker_path(path) {
        // Any path under it, with or without a tail.
        methods = docker_methods().collect();
    }
    methods.sort_unstable();
    methods.dedup();
    methods
}

/// The methods the Docker proxy serves (every one the engine's API uses).
fn docker_methods() -> impl Iterator<Item = &'static str> {
    ROUTES.iter().filter(|r| r.is_docker()).map(|r| r.method)
}

/// `/api/endpoints/{id}` matches `/api/endpoints/7`: each `{name}` one non-empty segment.
fn template_matches(template: &str, path: &str) -> bool {
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(ts), Some(ps)) if ts.starts_with('{') && ts.ends_with('}') && !ps.is_empty() => {}
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return false,
        }
    }
}

/// Counts admin requests by status class (for the aggregate metrics).
pub async fn count_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .map(|s| Arc::clone(&s.metrics));
    let res = next.call(req).await?;
    if let Some(m) = metrics {
        m.admin_requests
            .with_label_values(&[crate::metrics::status_class(res.status().as_u16())])
            .inc();
    }
    Ok(res)
}

/// Gives bodiless error answers produced by the framework itself (405 for a known path with
/// another method, for instance) the `{"message"}` body every error has.
pub fn json_errors<B: MessageBody + 'static>(
    res: ServiceResponse<B>,
) -> actix_web::Result<actix_web::middleware::ErrorHandlerResponse<B>> {
    use actix_web::middleware::ErrorHandlerResponse;
    let status = res.status();
    let has_body = res
        .headers()
        .contains_key(actix_web::http::header::CONTENT_TYPE);
    if has_body {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let message = match status {
        actix_web::http::StatusCode::METHOD_NOT_ALLOWED => {
            format!(
                "method {} is not allowed on {}",
                res.request().method(),
                res.request().path()
            )
        }
        other => other.canonical_reason().unwrap_or("error").to_owned(),
    };
    let (req, _) = res.into_parts();
    let mut body = HttpResponse::build(status);
    if status == actix_web::http::StatusCode::METHOD_NOT_ALLOWED {
        body.insert_header((
            actix_web::http::header::ALLOW,
            allowed_methods(req.path()).join(", "),
        ));
    }
    let body = body.json(serde_json::json!({ "message": message }));
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, body).map_into_right_body(),
    ))
}

/// A page of a small collection read whole (edge groups, edge stacks), each item shown as
/// `V`, with the total in `X-Total-Count`.
pub(crate) fn paged<T, V: From<T> + serde::Serialize>(
    all: Vec<T>,
    q: &endpoints::PageQuery,
    max_page: usize,
) -> Result<HttpResponse, ApiError> {
    let (start, limit) = q.bounds(max_page)?;
    let total = all.len();
    let page: Vec<V> = all
        .into_iter()
        .skip(start)
        .take(limit)
        .map(V::from)
        .collect();
    Ok(HttpResponse::Ok()
        .insert_header(("X-Total-Count", total.to_string()))
        .json(page))
}

/// JSON helper with the right status.
pub(crate) fn json<T: serde::Serialize>(
    status: actix_web::http::StatusCode,
    body: &T,
) -> HttpResponse {
    HttpResponse::build(status).json(body)
}
