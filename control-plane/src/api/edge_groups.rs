//! `/api/edge_groups`: the sets of environments edge stacks target. Static groups list their
//! environments (kept by the store, which drops a deleted environment from every group in the
//! same step); dynamic groups select by tags, `any` or `all` of them, and their members are
//! computed from the directory's index by tag, so they follow tag changes without any action.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use store::{Change, Collection, EdgeGroup, EnvId, TagMatch};

use super::endpoints::{page_views, PageQuery};
use super::{json, ApiError, AppState, Json};

/// Longest name, in characters.
pub(crate) const MAX_NAME: usize = 255;
/// Tags a dynamic group may select by.
pub(crate) const MAX_TAGS: usize = 64;
/// Environments a static group may list (the body limit allows about this many).
pub const MAX_STATIC_MEMBERS: usize = 100_000;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/edge_groups")
            .route(web::get().to(list))
            .route(web::post().to(create)),
    )
    .service(
        web::resource("/edge_groups/{id}")
            .route(web::get().to(get))
            .route(web::patch().to(patch))
            .route(web::delete().to(delete)),
    )
    .route("/edge_groups/{id}/environments", web::get().to(members));
}

/// An edge group as the API shows it.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct GroupView {
    pub id: u64,
    pub name: String,
    pub dynamic: bool,
    /// Dynamic groups: the tags that select members.
    pub tag_ids: Vec<u64>,
    #[serde(rename = "match")]
    pub tag_match: TagMatch,
    /// Static groups: the members.
    pub environment_ids: Vec<EnvId>,
}

impl From<EdgeGroup> for GroupView {
    fn from(g: EdgeGroup) -> Self {
        Self {
            id: g.id,
            name: g.name,
            dynamic: g.dynamic,
            tag_ids: g.tag_ids,
            tag_match: g.tag_match,
            environment_ids: g.environment_ids,
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupBody {
    name: Option<String>,
    dynamic: Option<bool>,
    tag_ids: Option<Vec<u64>>,
    #[serde(rename = "match")]
    tag_match: Option<TagMatch>,
    environment_ids: Option<Vec<EnvId>>,
}

impl GroupBody {
    /// What is wrong with the body whatever group it changes (400): a blank or long name,
    /// lists over their bounds (as sent, before duplicates are dropped), and a kind it sets
    /// that its own lists contradict. On create, an absent `dynamic` is static.
    fn check(&self, creating: bool) -> Result<(), ApiError> {
        let bad = |m: String| Err(ApiError::BadRequest(m));
        if let Some(name) = &self.name {
            if name.chars().count() > MAX_NAME || name.trim().is_empty() {
                return bad(format!("name must be 1..={MAX_NAME} characters, not blank"));
            }
        }
        let tags = self.tag_ids.as_ref().map(Vec::len);
        let members = self.environment_ids.as_ref().map(Vec::len);
        if tags.is_some_and(|n| n > MAX_TAGS) {
            return bad(format!("a dynamic group selects by 1..={MAX_TAGS} tagIds"));
        }
        if members.is_some_and(|n| n > MAX_STATIC_MEMBERS) {
            return bad(format!(
                "a static group lists at most {MAX_STATIC_MEMBERS} environmentIds"
            ));
        }
        let dynamic = if creating {
            Some(self.dynamic.unwrap_or(false))
        } else {
            self.dynamic
        };
        match dynamic {
            Some(true) => {
                if tags == Some(0) || (creating && tags.is_none()) {
                    return bad(format!("a dynamic group selects by 1..={MAX_TAGS} tagIds"));
                }
                if members.is_some_and(|n| n > 0) {
                    return bad(
                        "a dynamic group has no environmentIds: its tags select its members".into(),
                    );
                }
            }
            Some(false) if tags.is_some_and(|n| n > 0) => {
                return bad("a static group has no tagIds: it lists its environmentIds".into());
            }
            Some(false) | None => {}
        }
        Ok(())
    }

    /// `base` with this body's fields applied; a group that changes kind drops what belonged
    /// to the other kind unless the body sets it. The body must have passed [`Self::check`];
    /// what still does not fit is the group's kind (409 on a change).
    fn apply(self, mut g: EdgeGroup) -> Result<EdgeGroup, ApiError> {
        if let Some(name) = self.name {
            name.trim().clone_into(&mut g.name);
        }
        if let Some(dynamic) = self.dynamic {
            if dynamic != g.dynamic {
                g.tag_ids.clear();
                g.environment_ids.clear();
            }
            g.dynamic = dynamic;
        }
        if let Some(mut tags) = self.tag_ids {
            tags.sort_unstable();
            tags.dedup();
            g.tag_ids = tags;
        }
        if let Some(m) = self.tag_match {
            g.tag_match = m;
        }
        if let Some(mut ids) = self.environment_ids {
            ids.sort_unstable();
            ids.dedup();
            g.environment_ids = ids;
        }
        if g.dynamic {
            if g.tag_ids.is_empty() {
                return Err(ApiError::Conflict(format!(
                    "edge group {} is dynamic: it selects by 1..={MAX_TAGS} tagIds",
                    g.id
                )));
            }
            if !g.environment_ids.is_empty() {
                return Err(ApiError::Conflict(format!(
                    "edge group {} is dynamic: it has no environmentIds, its tags select its members",
                    g.id
                )));
            }
        } else if !g.tag_ids.is_empty() {
            return Err(ApiError::Conflict(format!(
                "edge group {} is static: it has no tagIds, it lists its environmentIds",
                g.id
            )));
        }
        Ok(g)
    }
}

/// Refuses tags and environments that do not exist, naming them (the store also drops
/// environments deleted meanwhile, so a group never lists one that is gone).
async fn check_references(state: &AppState, g: &EdgeGroup) -> Result<(), ApiError> {
    if !g.tag_ids.is_empty() {
        let tags = state.store.list_named(Collection::Tags).await?;
        let unknown: Vec<u64> = g
            .tag_ids
            .iter()
            .copied()
            .filter(|t| !tags.iter().any(|n| n.id == *t))
            .collect();
        if !unknown.is_empty() {
            return Err(ApiError::Unprocessable(format!(
                "unknown tagIds: {unknown:?}"
            )));
        }
    }
    let mut unknown = Vec::new();
    for chunk in g.environment_ids.chunks(1000) {
        let found = state.store.get_environments(chunk).await?;
        unknown.extend(
            chunk
                .iter()
                .zip(found)
                .filter(|(_, e)| e.is_none())
                .map(|(id, _)| *id)
                .take(20),
        );
        if unknown.len() >= 20 {
            break;
        }
    }
    if !unknown.is_empty() {
        unknown.truncate(20);
        return Err(ApiError::Unprocessable(format!(
            "unknown environmentIds: {unknown:?}"
        )));
    }
    Ok(())
}

async fn create(
    state: web::Data<AppState>,
    Json(body): Json<GroupBody>,
) -> Result<HttpResponse, ApiError> {
    if body.name.is_none() {
        return Err(ApiError::BadRequest("name is required".into()));
    }
    body.check(true)?;
    let blank = EdgeGroup {
        id: 0,
        name: String::new(),
        dynamic: body.dynamic.unwrap_or(false),
        tag_ids: Vec::new(),
        tag_match: TagMatch::Any,
        environment_ids: Vec::new(),
    };
    let group = body.apply(blank)?;
    check_references(&state, &group).await?;
    let created = state.store.create_edge_group(&group).await?;
    state.publish(Change::EdgeStacks).await?;
    tracing::info!(
        group = created.id,
        dynamic = created.dynamic,
        "edge group created"
    );
    Ok(json(StatusCode::CREATED, &GroupView::from(created)))
}

async fn existing(state: &AppState, id: u64) -> Result<EdgeGroup, ApiError> {
    state
        .store
        .edge_group(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("edge group {id} does not exist")))
}

async fn get(state: web::Data<AppState>, id: web::Path<u64>) -> Result<HttpResponse, ApiError> {
    Ok(json(
        StatusCode::OK,
        &GroupView::from(existing(&state, *id).await?),
    ))
}

async fn patch(
    state: web::Data<AppState>,
    id: web::Path<u64>,
    Json(body): Json<GroupBody>,
) -> Result<HttpResponse, ApiError> {
    body.check(false)?;
    let group = body.apply(existing(&state, *id).await?)?;
    check_references(&state, &group).await?;
    let updated = state
        .store
        .update_edge_group(&group)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("edge group {} does not exist", group.id)))?;
    state.publish(Change::EdgeStacks).await?;
    Ok(json(StatusCode::OK, &GroupView::from(updated)))
}

async fn delete(state: web::Data<AppState>, id: web::Path<u64>) -> Result<HttpResponse, ApiError> {
    let stacks: Vec<String> = state
        .store
        .list_edge_stacks()
        .await?
        .into_iter()
        .filter(|s| s.edge_group_ids.contains(&id))
        .map(|s| s.name)
        .collect();
    if !stacks.is_empty() {
        return Err(ApiError::Conflict(format!(
            "edge group {id} is targeted by edge stack(s) {stacks:?}; change them first"
        )));
    }
    if !state.store.delete_edge_group(*id).await? {
        return Err(ApiError::NotFound(format!(
            "edge group {id} does not exist"
        )));
    }
    state.publish(Change::EdgeStacks).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn list(
    state: web::Data<AppState>,
    q: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let groups = state.store.list_edge_groups().await?;
    super::paged::<_, GroupView>(groups, &q, state.limits.max_page)
}

/// A page of the group's current members, as environments (the list's view of each), and
/// how many there are in `X-Total-Count`.
async fn members(
    state: web::Data<AppState>,
    id: web::Path<u64>,
    q: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let (start, limit) = q.bounds(state.limits.max_page)?;
    let group = existing(&state, *id).await?;
    let settings = state.store.settings().await?;
    let page = if group.dynamic {
        state
            .directory
            .tagged(&group.tag_ids, group.tag_match, start, limit)
            .await?
    } else {
        let ids = &group.environment_ids;
        let items: Vec<EnvId> = ids.iter().copied().skip(start).take(limit).collect();
        let last = state.store.heartbeats(&items).await?;
        crate::directory::Page {
            total: ids.len(),
            items: items.into_iter().zip(last).collect(),
        }
    };
    let views = page_views(&state, &page, &settings).await?;
    Ok(HttpResponse::Ok()
        .insert_header(("X-Total-Count", page.total.to_string()))
        .json(views))
}
