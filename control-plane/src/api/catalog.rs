//! `/api/groups`, `/api/tags` (named collections) and `/api/settings`.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use store::{Change, Collection};

use super::{json, ApiError, AppState};

pub fn configure(cfg: &mut web::ServiceConfig) {
    for (path, coll) in [("/groups", Collection::Groups), ("/tags", Collection::Tags)] {
        cfg.service(
            web::resource(path)
                .app_data(web::Data::new(coll))
                .route(web::get().to(list))
                .route(web::post().to(create)),
        )
        .service(
            web::resource(format!("{path}/{{id}}"))
                .app_data(web::Data::new(coll))
                .route(web::patch().to(rename))
                .route(web::delete().to(delete)),
        );
    }
    cfg.service(
        web::resource("/settings")
            .route(web::get().to(get_settings))
            .route(web::patch().to(patch_settings))
            .route(web::put().to(patch_settings)),
    );
}

fn noun(c: Collection) -> &'static str {
    match c {
        Collection::Groups => "group",
        Collection::Tags => "tag",
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameBody {
    name: String,
}

fn clean_name(n: &str) -> Result<String, ApiError> {
    let n = n.trim();
    if n.is_empty() || n.len() > 255 {
        return Err(ApiError::BadRequest("name must be 1..=255 bytes".into()));
    }
    Ok(n.to_owned())
}

async fn list(
    state: web::Data<AppState>,
    coll: web::Data<Collection>,
) -> Result<HttpResponse, ApiError> {
    Ok(json(StatusCode::OK, &state.store.list_named(**coll).await?))
}

async fn create(
    state: web::Data<AppState>,
    coll: web::Data<Collection>,
    body: web::Json<NameBody>,
) -> Result<HttpResponse, ApiError> {
    let named = state
        .store
        .create_named(**coll, &clean_name(&body.name)?)
        .await?;
    Ok(json(StatusCode::CREATED, &named))
}

async fn rename(
    state: web::Data<AppState>,
    coll: web::Data<Collection>,
    id: web::Path<u64>,
    body: web::Json<NameBody>,
) -> Result<HttpResponse, ApiError> {
    let named = state
        .store
        .rename_named(**coll, *id, &clean_name(&body.name)?)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{} {} does not exist", noun(**coll), id)))?;
    Ok(json(StatusCode::OK, &named))
}

async fn delete(
    state: web::Data<AppState>,
    coll: web::Data<Collection>,
    id: web::Path<u64>,
) -> Result<HttpResponse, ApiError> {
    let id = *id;
    let users = state
        .store
        .list_environments()
        .await?
        .iter()
        .filter(|e| match **coll {
            Collection::Groups => e.group_id == Some(id),
            Collection::Tags => e.tag_ids.contains(&id),
        })
        .count();
    if users > 0 {
        return Err(ApiError::Conflict(format!(
            "{} {id} is used by {users} environment(s); change them first",
            noun(**coll)
        )));
    }
    if **coll == Collection::Tags {
        // A dynamic edge group selecting by it would silently select less (or nothing).
        let groups: Vec<String> = state
            .store
            .list_edge_groups()
            .await?
            .into_iter()
            .filter(|g| g.dynamic && g.tag_ids.contains(&id))
            .map(|g| g.name)
            .collect();
        if !groups.is_empty() {
            return Err(ApiError::Conflict(format!(
                "tag {id} selects the members of edge group(s) {groups:?}; change them first"
            )));
        }
    }
    if !state.store.delete_named(**coll, id).await? {
        return Err(ApiError::NotFound(format!(
            "{} {id} does not exist",
            noun(**coll)
        )));
    }
    Ok(HttpResponse::NoContent().finish())
}

async fn get_settings(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    Ok(json(StatusCode::OK, &state.store.settings().await?))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SettingsPatch {
    checkin_interval: Option<u32>,
    ping_interval: Option<u32>,
    snapshot_interval: Option<u32>,
    command_interval: Option<u32>,
}

async fn patch_settings(
    state: web::Data<AppState>,
    body: web::Json<SettingsPatch>,
) -> Result<HttpResponse, ApiError> {
    let mut s = state.store.settings().await?;
    if let Some(v) = body.checkin_interval {
        if !(1..=3600).contains(&v) {
            return Err(ApiError::BadRequest(format!(
                "checkinInterval must be 1..=3600 seconds, got {v}"
            )));
        }
        s.checkin_interval = v;
    }
    for (field, v, slot) in [
        ("pingInterval", body.ping_interval, &mut s.ping_interval),
        (
            "snapshotInterval",
            body.snapshot_interval,
            &mut s.snapshot_interval,
        ),
        (
            "commandInterval",
            body.command_interval,
            &mut s.command_interval,
        ),
    ] {
        if let Some(v) = v {
            if v > 86_400 {
                return Err(ApiError::BadRequest(format!(
                    "{field} must be 0..=86400 seconds (0 turns it off), got {v}"
                )));
            }
            *slot = v;
        }
    }
    state.store.put_settings(&s).await?;
    state.publish(Change::Settings).await?;
    Ok(json(StatusCode::OK, &s))
}
