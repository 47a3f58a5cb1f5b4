//! The admin check of the actix API: every `/api` route goes through it. A request proves
//! itself with the admin key (`X-API-Key`) or with the web console's session cookie (and, for
//! a method that changes something, the session's CSRF token): [`crate::session`].

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;

use super::{ApiError, AppState};
use crate::session::{Credentials, Refused};

pub async fn require_admin_key(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::EitherBody<impl MessageBody>>, actix_web::Error> {
    let verdict = match req.app_data::<web::Data<AppState>>() {
        Some(state) => check(req.request(), state),
        None => Err(Refused::Missing),
    };
    match verdict {
        Ok(()) => {
            crate::front::proved(req.request());
            Ok(next.call(req).await?.map_into_left_body())
        }
        Err(e) => {
            let (req, _) = req.into_parts();
            let res = actix_web::ResponseError::error_response(&ApiError::Auth(e));
            Ok(ServiceResponse::new(req, res).map_into_right_body())
        }
    }
}

/// The request's credentials against the accepted admin keys.
pub fn check(req: &actix_web::HttpRequest, state: &AppState) -> Result<(), Refused> {
    let headers = req.headers();
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or(""));
    let cookies: Vec<&str> = headers
        .get_all(actix_web::http::header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .collect();
    let credentials = Credentials::read(text, &cookies, req.method().as_str());
    state.admin.authorize(&credentials, proto::clock::now_ms())
}
