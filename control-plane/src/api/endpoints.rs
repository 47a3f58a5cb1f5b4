//! `/api/endpoints`: environments.

use std::collections::HashSet;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use proto::clock::now_ms;
use proto::token::{JoinSecret, JoinToken};
use serde::{Deserialize, Deserializer, Serialize};
use store::{Change, Collection, EdgeMode, Environment, NewEnvironment, Settings};
use uuid::Uuid;

use super::{json, ApiError, AppState, Json};
use crate::directory::Query;
use crate::fleet::{liveness, Intervals, Liveness, TunnelState};

/// Longest name, in characters (before surrounding blanks are trimmed).
pub(crate) const MAX_NAME: usize = 255;
pub(crate) const MAX_CHECKIN_INTERVAL: u32 = 3600;
pub(crate) const MAX_ASYNC_INTERVAL: u32 = 86_400;
pub(crate) const MAX_ENV_VARS: usize = 64;
/// Longest `envVars` entry.
pub(crate) const MAX_ENV_VAR: usize = 128;

/// The environment as the API shows it.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct EnvView {
    pub id: u64,
    pub name: String,
    pub mode: EdgeMode,
    pub edge_id: Option<Uuid>,
    pub edge_key: String,
    pub status: Liveness,
    pub last_check_in: Option<String>,
    /// Effective intervals (override or default), seconds.
    pub checkin_interval: u32,
    pub ping_interval: u32,
    pub snapshot_interval: u32,
    pub command_interval: u32,
    pub group_id: Option<u64>,
    pub tag_ids: Vec<u64>,
    pub env_vars: Vec<String>,
    /// Values for edge stacks' `${NAME}`s.
    pub variables: std::collections::BTreeMap<String, String>,
    pub allow_self_signed: bool,
    pub created_at: String,
    pub tunnel: TunnelView,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct TunnelView {
    pub state: TunnelState,
    /// The gateway holding the open tunnel.
    pub gateway: Option<String>,
    pub epoch: Option<u64>,
    /// When it opened (RFC 3339).
    pub since: Option<String>,
}

pub(crate) fn rfc3339(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl AppState {
    /// Applies a stored change here, then tells every replica about it. Retried, because a lost
    /// notification leaves other replicas on the old record (an old key keeps working there)
    /// until their next resync; if it still fails the admin is told so.
    pub(crate) async fn publish(&self, change: Change) -> Result<(), ApiError> {
        // Read-your-writes on this replica: when the admin gets the answer, the old key no
        // longer works here. Other replicas follow on the notification (the echo reloads
        // this replica once more, which is harmless).
        self.fleet.apply(&change).await;
        self.directory.note(&change);
        let mut last = None;
        for attempt in 0..3u32 {
            match self.store.publish(change.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "cannot publish a change notification");
                    last = Some(e);
                    tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await;
                }
            }
        }
        Err(ApiError::Unavailable(format!(
            "the change was saved, but other replicas could not be notified ({}); they pick it up at their next resync",
            last.map_or_else(String::new, |e| e.to_string())
        )))
    }

    pub(crate) fn join_token(&self, env: &Environment) -> Result<String, ApiError> {
        let secret = JoinSecret::from_text(&env.join_secret)
            .map_err(|e| ApiError::Internal(format!("environment {}: {e}", env.id)))?;
        Ok(JoinToken {
            api_url: self.public.api_url.clone(),
            tunnel_addr: self.public.tunnel_addr.clone(),
            tunnel_fingerprint: self.public.tunnel_fingerprint,
            endpoint_id: env.id,
            secret,
        }
        .encode())
    }

    /// Last check-in: the newer of the stored heartbeat (any replica, written behind) and
    /// what this replica saw itself (not yet written).
    fn last_seen(&self, id: u64, stored: Option<u64>) -> Option<u64> {
        match (stored, self.fleet.stats.last_checkin_ms(id)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// `last` is the merged last check-in ([`Self::last_seen`]).
    fn view(
        &self,
        env: &Environment,
        settings: &Settings,
        last: Option<u64>,
        now: u64,
    ) -> Result<EnvView, ApiError> {
        let iv = Intervals::of(env, settings);
        Ok(EnvView {
            id: env.id,
            name: env.name.clone(),
            mode: env.mode,
            edge_id: env.edge_id,
            edge_key: self.join_token(env)?,
            status: liveness(last, iv.liveness(env.mode), now),
            last_check_in: last.map(rfc3339),
            checkin_interval: iv.checkin,
            ping_interval: iv.ping,
            snapshot_interval: iv.snapshot,
            command_interval: iv.command,
            group_id: env.group_id,
            tag_ids: env.tag_ids.clone(),
            env_vars: env.env_vars.clone(),
            variables: env.variables.clone(),
            allow_self_signed: env.allow_self_signed,
            created_at: rfc3339(env.created_at_ms),
            tunnel: {
                let (state, loc) = self.fleet.tunnel_state(env.id, now);
                TunnelView {
                    state,
                    gateway: loc.as_ref().map(|l| l.gateway_id.clone()),
                    epoch: loc.as_ref().map(|l| l.epoch),
                    since: loc.as_ref().map(|l| rfc3339(l.since_ms)),
                }
            },
        })
    }

    pub(crate) async fn load(&self, id: u64) -> Result<Environment, ApiError> {
        self.store
            .get_environment(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("environment {id} does not exist")))
    }

    async fn view_one(&self, env: &Environment) -> Result<EnvView, ApiError> {
        let settings = self.store.settings().await?;
        let hb = self.store.heartbeats(&[env.id]).await?;
        let last = self.last_seen(env.id, hb.first().copied().flatten());
        self.view(env, &settings, last, now_ms())
    }

    /// The view of `id` read in an order that keeps it consistent: check-ins first, then the
    /// environment. A first check-in is recorded only after its binding is stored, so a view
    /// that says `up` also shows the Edge ID (read the other way round, a binding landing
    /// between the two reads showed `up` with no Edge ID).
    async fn view_by_id(&self, id: u64) -> Result<EnvView, ApiError> {
        let settings = self.store.settings().await?;
        let hb = self.store.heartbeats(&[id]).await?;
        let last = self.last_seen(id, hb.first().copied().flatten());
        let env = self.load(id).await?;
        self.view(&env, &settings, last, now_ms())
    }
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateBody {
    name: String,
    #[serde(default)]
    mode: EdgeMode,
    checkin_interval: Option<u32>,
    ping_interval: Option<u32>,
    snapshot_interval: Option<u32>,
    command_interval: Option<u32>,
    group_id: Option<u64>,
    #[serde(default)]
    tag_ids: Vec<u64>,
    #[serde(default, deserialize_with = "hyphenated")]
    edge_id: Option<Uuid>,
    #[serde(default)]
    env_vars: Vec<String>,
    /// Values for edge stacks' `${NAME}`s.
    #[serde(default)]
    variables: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    allow_self_signed: bool,
}

/// A UUID written as the document's `uuid` format has it, hyphenated (`8-4-4-4-12` hex
/// digits); `null` is none. (The `uuid` crate also reads the simple, braced and URN forms.)
fn hyphenated<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Uuid>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    if text.len() != 36 {
        return Err(serde::de::Error::custom(format!(
            "{text:?} is not a hyphenated UUID"
        )));
    }
    Uuid::try_parse(&text)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a UUID: {e}")))
}

/// `Some(None)` for an explicit `null`, `None` when absent.
fn double<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchBody {
    name: Option<String>,
    mode: Option<EdgeMode>,
    #[serde(default, deserialize_with = "double")]
    checkin_interval: Option<Option<u32>>,
    #[serde(default, deserialize_with = "double")]
    ping_interval: Option<Option<u32>>,
    #[serde(default, deserialize_with = "double")]
    snapshot_interval: Option<Option<u32>>,
    #[serde(default, deserialize_with = "double")]
    command_interval: Option<Option<u32>>,
    #[serde(default, deserialize_with = "double")]
    group_id: Option<Option<u64>>,
    tag_ids: Option<Vec<u64>>,
    env_vars: Option<Vec<String>>,
    variables: Option<std::collections::BTreeMap<String, String>>,
    allow_self_signed: Option<bool>,
}

/// Existing group and tag ids, loaded once per request.
struct Known {
    groups: HashSet<u64>,
    tags: HashSet<u64>,
}

impl Known {
    async fn load(state: &AppState) -> Result<Self, ApiError> {
        let ids = |v: Vec<store::Named>| v.into_iter().map(|n| n.id).collect();
        Ok(Self {
            groups: ids(state.store.list_named(Collection::Groups).await?),
            tags: ids(state.store.list_named(Collection::Tags).await?),
        })
    }
}

/// A name as sent: at most [`MAX_NAME`] characters, not blank; stored trimmed.
pub(crate) fn check_name(name: &str) -> Result<String, ApiError> {
    if name.chars().count() > MAX_NAME {
        return Err(ApiError::BadRequest(format!(
            "name is longer than {MAX_NAME} characters"
        )));
    }
    let name = name.trim();
    if name.is_empty() {
        return Err(ApiError::BadRequest("name must not be blank".into()));
    }
    Ok(name.to_owned())
}

/// Checks an environment: its fields first (400), then what they name (422).
fn validate(env: &Environment, known: &Known) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::BadRequest(m));
    if let Some(i) = env.checkin_interval {
        if !(1..=MAX_CHECKIN_INTERVAL).contains(&i) {
            return bad(format!(
                "checkinInterval must be 1..={MAX_CHECKIN_INTERVAL} seconds, got {i}"
            ));
        }
    }
    for (field, v) in [
        ("pingInterval", env.ping_interval),
        ("snapshotInterval", env.snapshot_interval),
        ("commandInterval", env.command_interval),
    ] {
        if let Some(i) = v {
            if i > MAX_ASYNC_INTERVAL {
                return bad(format!(
                    "{field} must be 0..={MAX_ASYNC_INTERVAL} seconds (0 turns it off), got {i}"
                ));
            }
        }
    }
    if env.env_vars.len() > MAX_ENV_VARS {
        return bad(format!("at most {MAX_ENV_VARS} envVars"));
    }
    for v in &env.env_vars {
        let ok = !v.is_empty()
            && v.len() <= MAX_ENV_VAR
            && v.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return bad(format!("envVars entry {v:?} is not a valid variable name"));
        }
    }
    super::edge_stacks::check_variables(&env.variables)?;
    let missing = |m: String| Err(ApiError::Unprocessable(m));
    if let Some(g) = env.group_id {
        if !known.groups.contains(&g) {
            return missing(format!("groupId {g} does not exist"));
        }
    }
    for t in &env.tag_ids {
        if !known.tags.contains(t) {
            return missing(format!("tagId {t} does not exist"));
        }
    }
    Ok(())
}

fn new_environment(b: CreateBody, known: &Known) -> Result<NewEnvironment, ApiError> {
    let mut tag_ids = b.tag_ids;
    tag_ids.sort_unstable();
    tag_ids.dedup();
    let new = NewEnvironment {
        name: check_name(&b.name)?,
        mode: b.mode,
        checkin_interval: b.checkin_interval,
        ping_interval: b.ping_interval,
        snapshot_interval: b.snapshot_interval,
        command_interval: b.command_interval,
        group_id: b.group_id,
        tag_ids,
        env_vars: b.env_vars,
        variables: b.variables,
        allow_self_signed: b.allow_self_signed,
        join_secret: JoinSecret::generate().to_text(),
        edge_id: b.edge_id,
        created_at_ms: now_ms(),
    };
    validate(&new.clone().into_environment(0), known)?;
    Ok(new)
}

pub async fn create(
    state: web::Data<AppState>,
    Json(body): Json<CreateBody>,
) -> Result<HttpResponse, ApiError> {
    let known = Known::load(&state).await?;
    let new = new_environment(body, &known)?;
    let created = state.store.create_environments(vec![new]).await?;
    let env = created
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Internal("store created nothing".into()))?;
    state.publish(Change::Environment(env.id)).await?;
    tracing::info!(env = env.id, name = %env.name, "environment created");
    let settings = state.store.settings().await?;
    Ok(json(
        StatusCode::CREATED,
        &state.view(&env, &settings, None, now_ms())?,
    ))
}

pub async fn create_bulk(
    state: web::Data<AppState>,
    Json(bodies): Json<Vec<CreateBody>>,
) -> Result<HttpResponse, ApiError> {
    if bodies.is_empty() {
        return Err(ApiError::BadRequest("bulk body is an empty list".into()));
    }
    if bodies.len() > state.limits.max_bulk {
        return Err(ApiError::PayloadTooLarge(format!(
            "bulk body has {} environments, at most {} per call",
            bodies.len(),
            state.limits.max_bulk
        )));
    }
    let known = Known::load(&state).await?;
    let news = bodies
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            new_environment(b, &known).map_err(|e| match e {
                ApiError::Unprocessable(m) => ApiError::Unprocessable(format!("item {i}: {m}")),
                e => ApiError::BadRequest(format!("item {i}: {e}")),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let created = state.store.create_environments(news).await?;
    for env in &created {
        state.publish(Change::Environment(env.id)).await?;
    }
    tracing::info!(count = created.len(), "environments created in bulk");
    let settings = state.store.settings().await?;
    let now = now_ms();
    let views = created
        .iter()
        .map(|e| state.view(e, &settings, None, now))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(json(StatusCode::CREATED, &views))
}

pub async fn get(state: web::Data<AppState>, id: web::Path<u64>) -> Result<HttpResponse, ApiError> {
    Ok(json(StatusCode::OK, &state.view_by_id(*id).await?))
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct SnapshotQuery {
    section: Option<String>,
}

/// `GET /api/endpoints/{id}/snapshot[?section=...]`: the latest snapshot as JSON, with when
/// the agent took it and when it arrived.
pub async fn snapshot(
    state: web::Data<AppState>,
    id: web::Path<u64>,
    q: web::Query<SnapshotQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = *id;
    state.load(id).await?;
    let stored = state.store.snapshot(id).await?.ok_or_else(|| {
        ApiError::NotFound(format!(
            "environment {id} has no snapshot yet (its agent sends one when it first connects)"
        ))
    })?;
    let snap = proto::snapshot::decompress(&stored.body)
        .map_err(|e| ApiError::Internal(format!("stored snapshot of environment {id}: {e}")))?;
    // Serialised straight from the snapshot: a `serde_json::Value` tree of it would take
    // several times its size again.
    let body = match q.section.as_deref() {
        None => SnapshotBody::Whole(&snap),
        Some(section) => {
            let part = match section {
                "engine" => Section::Engine(&snap.engine),
                "containers" => Section::Containers(&snap.containers),
                "images" => Section::Images(&snap.images),
                "volumes" => Section::Volumes(&snap.volumes),
                "networks" => Section::Networks(&snap.networks),
                "stacks" => Section::Stacks(&snap.stacks),
                other => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown section {other:?}; one of engine, containers, images, volumes, \
                         networks, stacks"
                    )))
                }
            };
            SnapshotBody::Section(std::iter::once((section, part)).collect())
        }
    };
    Ok(json(
        StatusCode::OK,
        &SnapshotView {
            environment_id: id,
            taken_at: rfc3339(stored.taken_ms),
            received_at: rfc3339(stored.received_ms),
            snapshot: body,
        },
    ))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SnapshotView<'a> {
    environment_id: u64,
    taken_at: String,
    received_at: String,
    snapshot: SnapshotBody<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum SnapshotBody<'a> {
    Whole(&'a proto::snapshot::Snapshot),
    Section(std::collections::BTreeMap<&'a str, Section<'a>>),
}

#[derive(Serialize)]
#[serde(untagged)]
enum Section<'a> {
    Engine(&'a proto::snapshot::EngineInfo),
    Containers(&'a [proto::snapshot::Container]),
    Images(&'a [proto::snapshot::Image]),
    Volumes(&'a [proto::snapshot::Volume]),
    Networks(&'a [proto::snapshot::Network]),
    Stacks(&'a [proto::snapshot::Stack]),
}

pub async fn patch(
    state: web::Data<AppState>,
    id: web::Path<u64>,
    Json(p): Json<PatchBody>,
) -> Result<HttpResponse, ApiError> {
    let name = p.name.as_deref().map(check_name).transpose()?;
    let mut env = state.load(*id).await?;
    if let Some(v) = name {
        env.name = v;
    }
    if let Some(v) = p.mode {
        env.mode = v;
    }
    if let Some(v) = p.checkin_interval {
        env.checkin_interval = v;
    }
    if let Some(v) = p.ping_interval {
        env.ping_interval = v;
    }
    if let Some(v) = p.snapshot_interval {
        env.snapshot_interval = v;
    }
    if let Some(v) = p.command_interval {
        env.command_interval = v;
    }
    if let Some(v) = p.group_id {
        env.group_id = v;
    }
    if let Some(mut v) = p.tag_ids {
        v.sort_unstable();
        v.dedup();
        env.tag_ids = v;
    }
    if let Some(v) = p.env_vars {
        env.env_vars = v;
    }
    if let Some(v) = p.variables {
        env.variables = v;
    }
    if let Some(v) = p.allow_self_signed {
        env.allow_self_signed = v;
    }
    validate(&env, &Known::load(&state).await?)?;
    if !state.store.update_environment(&env).await? {
        return Err(ApiError::NotFound(format!(
            "environment {} does not exist",
            env.id
        )));
    }
    state.publish(Change::Environment(env.id)).await?;
    Ok(json(StatusCode::OK, &state.view_by_id(env.id).await?))
}

pub async fn delete(
    state: web::Data<AppState>,
    id: web::Path<u64>,
) -> Result<HttpResponse, ApiError> {
    let id = *id;
    if !state.store.delete_environment(id).await? {
        return Err(ApiError::NotFound(format!(
            "environment {id} does not exist"
        )));
    }
    state.publish(Change::EnvironmentDeleted(id)).await?;
    tracing::info!(env = id, "environment deleted");
    Ok(HttpResponse::NoContent().finish())
}

pub async fn reset_association(
    state: web::Data<AppState>,
    id: web::Path<u64>,
) -> Result<HttpResponse, ApiError> {
    let id = *id;
    let env = state
        .store
        .reset_association(id, JoinSecret::generate().to_text())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("environment {id} does not exist")))?;
    state.publish(Change::Environment(id)).await?;
    tracing::info!(env = id, "association reset; new join token issued");
    Ok(json(StatusCode::OK, &state.view_one(&env).await?))
}

/// Unknown parameters are ignored: clients written for Portainer send `sort`, `order` and
/// others we do not implement.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    start: Option<String>,
    limit: Option<String>,
    search: Option<String>,
    status: Option<String>,
    mode: Option<String>,
    group_id: Option<String>,
    tag_ids: Option<String>,
}

pub(crate) fn parse_num(field: &str, v: &str) -> Result<u64, ApiError> {
    v.trim().parse().map_err(|_| {
        ApiError::BadRequest(format!(
            "query parameter {field}={v:?} is not a non-negative integer"
        ))
    })
}

/// A page's `start` (default 0) and `limit` (default 100, at most `max_page`), validated.
pub(crate) fn page_bounds(
    start: Option<&str>,
    limit: Option<&str>,
    max_page: usize,
) -> Result<(usize, usize), ApiError> {
    let num = |field: &str, v: Option<&str>, default: u64| {
        v.map(|v| parse_num(field, v))
            .transpose()
            .map(|n| usize::try_from(n.unwrap_or(default)).unwrap_or(usize::MAX))
    };
    let start = num("start", start, 0)?;
    let limit = num("limit", limit, 100)?;
    if limit == 0 || limit > max_page {
        return Err(ApiError::BadRequest(format!(
            "query parameter limit must be 1..={max_page}, got {limit}"
        )));
    }
    Ok((start, limit))
}

/// `?start=&limit=` of a paged list.
#[derive(Deserialize, Debug)]
pub struct PageQuery {
    start: Option<String>,
    limit: Option<String>,
}

impl PageQuery {
    pub(crate) fn bounds(&self, max_page: usize) -> Result<(usize, usize), ApiError> {
        page_bounds(self.start.as_deref(), self.limit.as_deref(), max_page)
    }
}

/// The list's query, validated.
fn parse_query(q: ListQuery, max_page: usize) -> Result<Query, ApiError> {
    let (start, limit) = page_bounds(q.start.as_deref(), q.limit.as_deref(), max_page)?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            s.split(',')
                .map(|v| match v.trim() {
                    "up" => Ok(Liveness::Up),
                    "down" => Ok(Liveness::Down),
                    "never" => Ok(Liveness::Never),
                    other => Err(ApiError::BadRequest(format!(
                        "query parameter status={other:?} must be up, down or never"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let mode = match q.mode.as_deref().map(str::trim) {
        None => None,
        Some("standard") => Some(EdgeMode::Standard),
        Some("async") => Some(EdgeMode::Async),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "query parameter mode={other:?} must be standard or async"
            )))
        }
    };
    let group_id = q
        .group_id
        .as_deref()
        .map(|v| parse_num("groupId", v))
        .transpose()?;
    let tag_ids = match q.tag_ids.as_deref() {
        None | Some("") => vec![],
        Some(list) => list
            .split(',')
            .map(|v| parse_num("tagIds", v))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let search = q
        .search
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty());
    Ok(Query {
        start,
        limit,
        search,
        status,
        mode,
        group_id,
        tag_ids,
    })
}

pub async fn list(
    state: web::Data<AppState>,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = parse_query(q.into_inner(), state.limits.max_page)?;
    let settings = state.store.settings().await?;
    let page = state.directory.list(&query, &settings).await?;
    let views = page_views(&state, &page, &settings).await?;
    Ok(HttpResponse::Ok()
        .insert_header(("X-Total-Count", page.total.to_string()))
        .json(views))
}

/// The environments of a page, as the list shows them: only the page's records are read
/// (one deleted since the page was made is left out).
pub(crate) async fn page_views(
    state: &AppState,
    page: &crate::directory::Page,
    settings: &Settings,
) -> Result<Vec<EnvView>, ApiError> {
    let ids: Vec<u64> = page.items.iter().map(|(id, _)| *id).collect();
    let envs = state.store.get_environments(&ids).await?;
    let now = now_ms();
    let mut views = Vec::with_capacity(envs.len());
    for ((id, last), env) in page.items.iter().zip(envs) {
        if let Some(env) = env {
            let last = state.last_seen(*id, *last);
            views.push(state.view(&env, settings, last, now)?);
        }
    }
    Ok(views)
}

/// Counts of the whole fleet: by status, by mode, and by group (`0`: in no group) with
/// each group's statuses; and the environments that went down most recently.
pub async fn summary(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let settings = state.store.settings().await?;
    let summary = state.directory.summary(&settings).await?;
    let ids: Vec<u64> = summary.recently_down.iter().map(|(id, _)| *id).collect();
    let envs = state.store.get_environments(&ids).await?;
    let recently_down: Vec<_> = summary
        .recently_down
        .iter()
        .zip(envs)
        .filter_map(|((id, last), env)| {
            let env = env?;
            Some(serde_json::json!({"id": id, "name": env.name, "lastCheckIn": rfc3339(*last)}))
        })
        .collect();
    let mut body = serde_json::to_value(&summary).map_err(|e| ApiError::Internal(e.to_string()))?;
    body["recentlyDown"] = serde_json::json!(recently_down);
    Ok(HttpResponse::Ok().json(body))
}
