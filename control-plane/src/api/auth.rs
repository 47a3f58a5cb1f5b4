//! Admin API keys: stored as SHA-256 hashes, compared in constant time.

use std::sync::{Arc, RwLock};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

pub const HEADER: &str = "x-api-key";

/// The accepted key hashes, refreshed from the store on change.
#[derive(Clone, Default)]
pub struct AdminKeys(Arc<RwLock<Vec<[u8; 32]>>>);

impl AdminKeys {
    pub fn hash(key: &str) -> [u8; 32] {
        Sha256::digest(key.as_bytes()).into()
    }

    pub fn replace(&self, hashes: Vec<[u8; 32]>) {
        if let Ok(mut g) = self.0.write() {
            *g = hashes;
        }
    }

    /// Constant-time over each stored hash; every hash is compared (no early exit).
    pub fn accepts(&self, key: &str) -> bool {
        let h = Self::hash(key);
        let Ok(g) = self.0.read() else { return false };
        g.iter()
            .fold(false, |ok, stored| ok | bool::from(stored.ct_eq(&h)))
    }
}

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
        Ok(()) => Ok(next.call(req).await?.map_into_left_body()),
        Err(e) => {
            let (req, _) = req.into_parts();
            let res = actix_web::ResponseError::error_response(&e);
            Ok(ServiceResponse::new(req, res).map_into_right_body())
        }
    }
}
