//! `/api/groups`, `/api/tags` (named collections; groups also carry tags, which count as
//! their environments' own for dynamic edge groups) and `/api/settings`.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use store::{Change, Collection};

use super::{json, ApiError, AppState, Json};

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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamedBody {
    name: Option<String>,
    /// Groups only: tags its environments get as if their own (dynamic edge groups).
    tag_ids: Option<Vec<u64>>,
}

/// A group or tag as the API shows it: a group with its tags.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct NamedView {
    id: u64,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag_ids: Option<Vec<u64>>,
}

/// Tags a group may carry.
pub(crate) const MAX_GROUP_TAGS: usize = 64;

/// Groups' tags may only name tags that exist (at most [`MAX_GROUP_TAGS`]).
async fn check_group_tags(
    state: &AppState,
    coll: Collection,
    tags: Option<&[u64]>,
) -> Result<(), ApiError> {
    let Some(tags) = tags else {
        return Ok(());
    };
    if coll == Collection::Tags {
        return Err(ApiError::BadRequest("a tag has no tagIds".into()));
    }
    if tags.len() > MAX_GROUP_TAGS {
        return Err(ApiError::BadRequest(format!(
            "a group has at most {MAX_GROUP_TAGS} tagIds"
        )));
    }
    let known = state.store.list_named(Collection::Tags).await?;
    let unknown: Vec<u64> = tags
        .iter()
        .copied()
        .filter(|t| !known.iter().any(|n| n.id == *t))
        .collect();
    if !unknown.is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "unknown tagIds: {unknown:?}"
        )));
    }
    Ok(())
}

/// A group's or tag's name: as an environment's ([`super::endpoints::check_name`]).
fn clean_name(n: &str) -> Result<String, ApiError> {
    super::endpoints::check_name(n)
}

async fn list(
    state: web::Data<AppState>,
    coll: web::Data<Collection>,
) -> Result<HttpResponse, ApiError> {
    let named = state.store.list_named(**coll).await?;
    let mut tags = match **coll {
        Collection::Groups => Some(state.store.group_tags().await?),
        Collection::Tags => None,
    };
    let views: Vec<NamedView> = named
        .into_iter()
        .map(|n| NamedView {
            tag_ids: tags.as_mut().map(|t| t.remove(&n.id).unwrap_or_default()),
            id: n.id,
            name: n.name,
        })
        .collect();
    Ok(json(StatusCode::OK, &views))
}

async fn create(
    state: web::Data<AppState>,
    coll: web::Data<Collection>,
    Json(body): Json<NamedBody>,
) -> Result<HttpResponse, ApiError> {
    let name = clean_name(
        body.name
            .as_deref()
            .ok_or_else(|| ApiError::BadRequest("name is required".into()))?,
    )?;
    check_group_tags(&state, **coll, body.tag_ids.as_deref()).await?;
    let named = state.store.create_named(**coll, &name).await?;
    let mut tag_ids = (**coll == Collection::Groups).then(Vec::new);
    if let Some(tags) = body.tag_ids.filter(|t| !t.is_empty()) {
        state.store.set_group_tags(named.id, &tags).await?;
        state.publish(Change::Catalog).await?;
        tag_ids = Some(sorted(tags));
    }
    let view = NamedView {
        id: named.id,
        name: named.name,
        tag_ids,
    };
    Ok(json(StatusCode::CREATED, &view))
}

fn sorted(mut tags: Vec<u64>) -> Vec<u64> {
    tags.sort_unstable();
    tags.dedup();
    tags
}

async fn rename(
    state: web::Data<AppState>,
    coll: web::Data<Collection>,
    id: web::Path<u64>,
    Json(body): Json<NamedBody>,
) -> Result<HttpResponse, ApiError> {
    let id = *id;
    let missing = || ApiError::NotFound(format!("{} {} does not exist", noun(**coll), id));
    let name = body.name.as_deref().map(clean_name).transpose()?;
    check_group_tags(&state, **coll, body.tag_ids.as_deref()).await?;
    let name = match name {
        Some(name) => {
            state
                .store
                .rename_named(**coll, id, &name)
                .await?
                .ok_or_else(missing)?
                .name
        }
        None => {
            state
                .store
                .list_named(**coll)
                .await?
                .into_iter()
                .find(|n| n.id == id)
                .ok_or_else(missing)?
                .name
        }
    };
    let tag_ids = match (**coll, body.tag_ids) {
        (Collection::Tags, _) => None,
        (Collection::Groups, Some(tags)) => {
            if !state.store.set_group_tags(id, &tags).await? {
                return Err(missing());
            }
            state.publish(Change::Catalog).await?;
            Some(sorted(tags))
        }
        (Collection::Groups, None) => Some(
            state
                .store
                .group_tags()
                .await?
                .remove(&id)
                .unwrap_or_default(),
        ),
    };
    Ok(json(StatusCode::OK, &NamedView { id, name, tag_ids }))
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
        let groups: Vec<u64> = state
            .store
            .group_tags()
            .await?
            .into_iter()
            .filter(|(_, tags)| tags.contains(&id))
            .map(|(g, _)| g)
            .collect();
        if !groups.is_empty() {
            return Err(ApiError::Conflict(format!(
                "tag {id} is a tag of group(s) {groups:?}; change them first"
            )));
        }
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
    if **coll == Collection::Groups {
        state.publish(Change::Catalog).await?;
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
    Json(body): Json<SettingsPatch>,
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
