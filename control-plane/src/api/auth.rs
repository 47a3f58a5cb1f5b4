//! The admin-key check of the actix API: every `/api` route goes through it.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;

use super::{ApiError, AppState};
use crate::auth::HEADER;

pub async fn require_admin_key(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::EitherBody<impl MessageBody>>, actix_web::Error> {
    let verdict = match req.headers().get(HEADER) {
        None => Err(ApiError::Unauthorized("missing X-API-Key header")),
        Some(v) => {
            let ok = v
                .to_str()
                .ok()
                .zip(req.app_data::<web::Data<AppState>>())
                .is_some_and(|(key, state)| state.admin.accepts(key));
            if ok {
                Ok(())
            } else {
                Err(ApiError::Unauthorized("invalid API key"))
            }
        }
    };
    match verdict {
        Ok(()) => {
            crate::front::proved(req.request());
            Ok(next.call(req).await?.map_into_left_body())
        }
        Err(e) => {
            let (req, _) = req.into_parts();
            let res = actix_web::ResponseError::error_response(&e);
            Ok(ServiceResponse::new(req, res).map_into_right_body())
        }
    }
}
