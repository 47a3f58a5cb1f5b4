//! `/api/edge_stacks`: compose files, versioned, targeted at edge groups. Every new compose
//! file is a new version (kept, listable; the newest [`store::MAX_STACK_VERSIONS`]); a new
//! version is a compare-and-set on the one it follows, so two admins' concurrent edits
//! never overwrite each other silently. (Delivery to the agents, statuses and rollouts are
//! built on these records.)

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use proto::clock::now_ms;
use serde::{Deserialize, Serialize};
use store::{
    BatchGrowth, Change, EdgeStack, OnFailure, Rollout, RolloutConfig, RolloutState, StackVersion,
};

use super::compose::check_stack_file;
use super::endpoints::{page_bounds, parse_num, rfc3339, PageQuery};
use super::{json, ApiError, AppState, Json};

/// Longest stack name: the compose project on the device is `edge_<name>`.
pub(crate) const MAX_NAME: usize = 58;
pub(crate) const MAX_GROUPS: usize = 64;
pub(crate) const MAX_VARIABLES: usize = 128;
/// Longest variable name.
pub(crate) const MAX_VARIABLE_NAME: usize = 128;
/// Longest variable value, in characters.
pub(crate) const MAX_VALUE: usize = 4096;
/// Longest rollout wait and batch timeout.
pub(crate) const MAX_ROLLOUT_SECS: u32 = 86_400;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/edge_stacks")
            .route(web::get().to(list))
            .route(web::post().to(create)),
    )
    .service(
        web::resource("/edge_stacks/{id}")
            .route(web::get().to(get))
            .route(web::put().to(update))
            .route(web::delete().to(delete)),
    )
    .route("/edge_stacks/{id}/versions", web::get().to(versions))
    .route("/edge_stacks/{id}/status", web::get().to(statuses))
    .route("/edge_stacks/{id}/file", web::get().to(file))
    .route("/edge_stacks/{id}/versions/{n}", web::get().to(version))
    .route(
        "/edge_stacks/{id}/rollout/pause",
        web::post().to(|s, id| control(s, id, Control::Pause)),
    )
    .route(
        "/edge_stacks/{id}/rollout/resume",
        web::post().to(|s, id| control(s, id, Control::Resume)),
    )
    .route(
        "/edge_stacks/{id}/rollout/abort",
        web::post().to(|s, id| control(s, id, Control::Abort)),
    )
    .route("/edge_stacks/{id}/rollback", web::post().to(rollback));
}

/// A rollout as the API shows it.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct RolloutView {
    state: RolloutState,
    /// The version the rollout brings its environments to (the counts are of it).
    target_version: u32,
    /// The version environments not released yet keep (0: none).
    from_version: u32,
    batch: u32,
    /// Environments released to the target version so far.
    released: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_batch_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    config: RolloutConfig,
    updated_at: String,
}

impl From<&Rollout> for RolloutView {
    fn from(r: &Rollout) -> Self {
        Self {
            state: r.state,
            target_version: r.to_version,
            from_version: r.from_version,
            batch: r.batch,
            released: r.released,
            next_batch_at: r.next_batch_ms.map(rfc3339),
            reason: r.reason.clone(),
            config: r.config.clone(),
            updated_at: rfc3339(r.updated_ms),
        }
    }
}

/// The version a stack's counts are about: its rollout's target, or its newest version.
fn counted_version(stack: &EdgeStack, rollout: Option<&Rollout>) -> u32 {
    rollout.map_or(stack.version, |r| r.to_version)
}

/// Checks a rollout's settings.
fn check_rollout(c: &RolloutConfig) -> Result<(), ApiError> {
    let bad = |m: &str| Err(ApiError::BadRequest(format!("rollout: {m}")));
    if c.batch_size == Some(0) {
        return bad("batchSize must be at least 1 (leave it out for all at once)");
    }
    if !c.failure_threshold.is_finite() || c.failure_threshold < 0.0 {
        return bad("failureThreshold must be a share from 0 to 1 or a count");
    }
    if c.wait_secs > MAX_ROLLOUT_SECS {
        return bad("waitSecs is at most 86400");
    }
    if c.batch_timeout_secs == 0 || c.batch_timeout_secs > MAX_ROLLOUT_SECS {
        return bad("batchTimeoutSecs must be 1..=86400");
    }
    Ok(())
}

/// Writes a stack's rollout over the one read (`expected` revision), then tells every
/// replica. A rollout moved meanwhile (by the controller) is a 409: read and ask again.
async fn put_rollout(
    state: &AppState,
    id: u64,
    expected: u64,
    rollout: &Rollout,
) -> Result<(), ApiError> {
    if !state.store.put_stack_rollout(id, expected, rollout).await? {
        return Err(ApiError::Conflict(format!(
            "the rollout of edge stack {id} changed meanwhile; read it and try again"
        )));
    }
    state.publish(Change::EdgeStacks).await
}

#[derive(Clone, Copy, Debug)]
enum Control {
    Pause,
    Resume,
    Abort,
}

/// `POST /rollout/pause|resume|abort`.
async fn control(
    state: web::Data<AppState>,
    id: web::Path<u64>,
    what: Control,
) -> Result<HttpResponse, ApiError> {
    let stack = existing(&state, *id).await?;
    let Some(r) = state.store.stack_rollout(stack.id).await? else {
        return Err(ApiError::Conflict(format!(
            "edge stack {} has no rollout",
            stack.id
        )));
    };
    let (from, to) = match what {
        Control::Pause => (&[RolloutState::Rolling][..], RolloutState::Paused),
        Control::Resume => (&[RolloutState::Paused][..], RolloutState::Rolling),
        Control::Abort => (
            &[RolloutState::Rolling, RolloutState::Paused][..],
            RolloutState::Aborted,
        ),
    };
    if !from.contains(&r.state) {
        return Err(ApiError::Conflict(format!(
            "the rollout of edge stack {} is {:?}; {what:?} applies to a rollout that is {from:?}",
            stack.id, r.state
        )));
    }
    let now = now_ms();
    let mut next = r.clone();
    next.state = to;
    next.updated_ms = now;
    match what {
        Control::Pause => next.reason = Some("paused by an operator".into()),
        Control::Abort => next.reason = Some("aborted by an operator".into()),
        Control::Resume => {
            // The failures it paused for are the operator's call now: only new ones count.
            next.tolerated_failures = state
                .store
                .stack_status_counts(stack.id)
                .await?
                .iter()
                .filter(|c| c.version == r.to_version && c.status == store::DeployStatus::Error)
                .map(|c| c.count)
                .sum();
            next.reason = None;
            // The batch starts its timeout again; a paused wait is over.
            next.batch_started_ms = now;
            if next.next_batch_ms.is_some() {
                next.next_batch_ms = Some(now);
            }
        }
    }
    put_rollout(&state, stack.id, r.revision, &next).await?;
    tracing::info!(stack = stack.id, state = ?to, "rollout changed by an operator");
    Ok(json(StatusCode::OK, &RolloutView::from(&next)))
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: Option<u32>,
}

/// `POST /rollback {"version": n}`: every target back to version `n` (default: the one the
/// current rollout started from, else the one before the newest), at once.
async fn rollback(
    state: web::Data<AppState>,
    id: web::Path<u64>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    // An empty body takes the default; anything else must be the body, exactly.
    let body: RollbackBody = if body.iter().all(u8::is_ascii_whitespace) {
        RollbackBody::default()
    } else {
        super::from_json(
            serde_json::from_slice(&body)
                .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?,
        )?
    };
    let stack = existing(&state, *id).await?;
    let current = state.store.stack_rollout(stack.id).await?;
    let version = match body.version {
        Some(v) => v,
        None => current
            .as_ref()
            .map(|r| r.from_version)
            .filter(|v| *v > 0 && current.as_ref().is_some_and(|r| r.to_version != *v))
            .unwrap_or(stack.version.saturating_sub(1)),
    };
    if version == 0
        || state
            .store
            .stack_version(stack.id, version)
            .await?
            .is_none()
    {
        return Err(ApiError::NotFound(format!(
            "edge stack {} keeps no version {version} to roll back to",
            stack.id
        )));
    }
    let next = crate::rollout::roll_back(
        current.as_ref(),
        version,
        format!("rollback to version {version} asked by an operator"),
        now_ms(),
    );
    put_rollout(
        &state,
        stack.id,
        current.as_ref().map_or(0, |r| r.revision),
        &next,
    )
    .await?;
    tracing::info!(stack = stack.id, version, "rollback");
    Ok(json(StatusCode::OK, &RolloutView::from(&next)))
}

/// An edge stack as the API shows it.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct StackView {
    pub id: u64,
    pub name: String,
    /// The newest version.
    pub version: u32,
    pub edge_group_ids: Vec<u64>,
    pub variables: BTreeMap<String, String>,
    pub created_at: String,
}

impl From<EdgeStack> for StackView {
    fn from(s: EdgeStack) -> Self {
        Self {
            id: s.id,
            name: s.name,
            version: s.version,
            edge_group_ids: s.edge_group_ids,
            variables: s.variables,
            created_at: rfc3339(s.created_ms),
        }
    }
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct VersionView {
    version: u32,
    created_at: String,
    /// Only when one version is asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    compose: Option<String>,
}

impl VersionView {
    fn of(v: StackVersion, with_file: bool) -> Self {
        Self {
            version: v.version,
            created_at: rfc3339(v.created_ms),
            compose: with_file.then_some(v.compose),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StackBody {
    name: Option<String>,
    compose: Option<String>,
    /// On `PUT` with a new compose: the version it was edited from. Given, the new version
    /// is refused (409) when another came first; absent, it follows the newest.
    base_version: Option<u32>,
    edge_group_ids: Option<Vec<u64>>,
    variables: Option<BTreeMap<String, String>>,
    /// How the new version goes out (default: as the previous one did; at first, all at
    /// once).
    rollout: Option<RolloutBody>,
}

/// [`RolloutConfig`] as a body carries it: the same fields and defaults, and no others (the
/// stored form takes unknown fields, for records written by a newer version).
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RolloutBody {
    #[serde(default)]
    batch_size: Option<u32>,
    #[serde(default)]
    batch_growth: BatchGrowth,
    #[serde(default)]
    wait_secs: u32,
    #[serde(default = "default_batch_timeout")]
    batch_timeout_secs: u32,
    #[serde(default)]
    failure_threshold: f64,
    #[serde(default)]
    on_failure: OnFailure,
}

fn default_batch_timeout() -> u32 {
    RolloutConfig::default().batch_timeout_secs
}

impl From<RolloutBody> for RolloutConfig {
    fn from(b: RolloutBody) -> Self {
        Self {
            batch_size: b.batch_size,
            batch_growth: b.batch_growth,
            wait_secs: b.wait_secs,
            batch_timeout_secs: b.batch_timeout_secs,
            failure_threshold: b.failure_threshold,
            on_failure: b.on_failure,
        }
    }
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "name {name:?} must be 1..={MAX_NAME} of a-z, 0-9, '-' and '_', starting with a letter or digit (the compose project is edge_<name>)"
        )))
    }
}

/// Variables of a stack or an environment: names of letters, digits and `_` (not starting
/// with a digit, not `EDGE_*`: those are set per environment), values of at most 4 KiB.
pub(crate) fn check_variables(vars: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if vars.len() > MAX_VARIABLES {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_VARIABLES} variables"
        )));
    }
    for (k, v) in vars {
        let name_ok = k
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(ApiError::BadRequest(format!(
                "variable name {k:?} must be letters, digits and '_', not starting with a digit"
            )));
        }
        if k.starts_with("EDGE_") {
            return Err(ApiError::BadRequest(format!(
                "variable {k}: names starting with EDGE_ are set per environment"
            )));
        }
        if k.len() > MAX_VARIABLE_NAME {
            return Err(ApiError::BadRequest(format!(
                "variable name {k:?} is longer than {MAX_VARIABLE_NAME} characters"
            )));
        }
        if v.chars().count() > MAX_VALUE {
            return Err(ApiError::BadRequest(format!(
                "variable {k}: value longer than {MAX_VALUE} characters"
            )));
        }
        // Substituted into YAML as text: a line break or control character could change
        // the file's structure, not just a value.
        if v.chars().any(char::is_control) {
            return Err(ApiError::BadRequest(format!(
                "variable {k}: the value holds a line break or control character"
            )));
        }
    }
    Ok(())
}

/// The groups a stack targets: 1 to [`MAX_GROUPS`] as sent (400), each existing (422).
async fn check_groups(state: &AppState, groups: &[u64]) -> Result<Vec<u64>, ApiError> {
    if groups.is_empty() || groups.len() > MAX_GROUPS {
        return Err(ApiError::BadRequest(format!(
            "edgeGroupIds must name 1..={MAX_GROUPS} edge groups"
        )));
    }
    let mut groups = groups.to_vec();
    groups.sort_unstable();
    groups.dedup();
    let known = state.store.list_edge_groups().await?;
    let unknown: Vec<u64> = groups
        .iter()
        .copied()
        .filter(|g| !known.iter().any(|k| k.id == *g))
        .collect();
    if !unknown.is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "unknown edgeGroupIds: {unknown:?}"
        )));
    }
    Ok(groups)
}

/// A compose file is a string the document cannot check further: one that does not check
/// out is a 422, naming what is wrong.
fn check_compose(compose: &str) -> Result<(), ApiError> {
    check_stack_file(compose).map_err(ApiError::Unprocessable)
}

async fn create(
    state: web::Data<AppState>,
    Json(body): Json<StackBody>,
) -> Result<HttpResponse, ApiError> {
    let (Some(name), Some(compose), Some(groups)) = (body.name, body.compose, body.edge_group_ids)
    else {
        return Err(ApiError::BadRequest(
            "name, compose and edgeGroupIds are required".into(),
        ));
    };
    // What the body says wrong first (400), then what it names (422).
    check_name(&name)?;
    let config = body.rollout.map(RolloutConfig::from).unwrap_or_default();
    check_rollout(&config)?;
    let variables = body.variables.unwrap_or_default();
    check_variables(&variables)?;
    if groups.is_empty() || groups.len() > MAX_GROUPS {
        return Err(ApiError::BadRequest(format!(
            "edgeGroupIds must name 1..={MAX_GROUPS} edge groups"
        )));
    }
    check_compose(&compose)?;
    let edge_group_ids = check_groups(&state, &groups).await?;
    let stack = EdgeStack {
        id: 0,
        name,
        edge_group_ids,
        variables,
        version: 0,
        created_ms: now_ms(),
    };
    let created = state.store.create_edge_stack(&stack, &compose).await?;
    // Version 1 goes out from nothing.
    let rollout = crate::rollout::start(config, 0, created.version, now_ms());
    state
        .store
        .put_stack_rollout(created.id, 0, &rollout)
        .await?;
    state.publish(Change::EdgeStacks).await?;
    tracing::info!(stack = created.id, name = %created.name, "edge stack created");
    Ok(json(StatusCode::CREATED, &StackView::from(created)))
}

async fn existing(state: &AppState, id: u64) -> Result<EdgeStack, ApiError> {
    state
        .store
        .edge_stack(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("edge stack {id} does not exist")))
}

/// One stack with where it stands: how many environments it targets, and for its newest
/// version how many are at each status (`pending`: targeted, nothing reported for it yet).
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct StackDetail {
    #[serde(flatten)]
    stack: StackView,
    targets: usize,
    counts: BTreeMap<&'static str, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollout: Option<RolloutView>,
}

async fn get(state: web::Data<AppState>, id: web::Path<u64>) -> Result<HttpResponse, ApiError> {
    let stack = existing(&state, *id).await?;
    let targeted = crate::targets::targeted_by(&state, &stack).await?;
    let reported = state.store.stack_status_counts(stack.id).await?;
    let rollout = state.store.stack_rollout(stack.id).await?;
    let counts = crate::targets::counts_for_version(
        targeted.len(),
        &reported,
        counted_version(&stack, rollout.as_ref()),
    );
    let detail = StackDetail {
        targets: targeted.len(),
        counts,
        rollout: rollout.as_ref().map(RolloutView::from),
        stack: StackView::from(stack),
    };
    Ok(json(StatusCode::OK, &detail))
}

#[derive(Deserialize, Debug)]
pub struct StatusQuery {
    status: Option<String>,
    start: Option<String>,
    limit: Option<String>,
}

/// One environment's status for a stack, as the API shows it.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct StatusView {
    environment_id: u64,
    status: &'static str,
    /// The version the status is about (`null` for `pending`: none reported).
    version: Option<u32>,
    error: Option<String>,
    updated_at: Option<String>,
}

/// A page of the stack's environments with their statuses (`?status=` one of them), by
/// environment id; `X-Total-Count` holds how many.
async fn statuses(
    state: web::Data<AppState>,
    id: web::Path<u64>,
    q: web::Query<StatusQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = q.into_inner();
    let (start, limit) = page_bounds(
        q.start.as_deref(),
        q.limit.as_deref(),
        state.limits.max_page,
    )?;
    let wanted = match q.status.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(name) => Some(
            store::DeployStatus::ALL
                .into_iter()
                .find(|s| crate::targets::status_name(*s) == name)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "query parameter status={name:?} must be one of pending, acknowledged, imagesPulled, deploying, running, error, removing, removed"
                    ))
                })?,
        ),
    };
    let stack = existing(&state, *id).await?;
    let counted = counted_version(&stack, state.store.stack_rollout(stack.id).await?.as_ref());
    let (items, total) = if wanted == Some(store::DeployStatus::Pending) {
        // Targeted, with nothing reported for the newest version (or a report of `pending`).
        let targeted = crate::targets::targeted_by(&state, &stack).await?;
        let (reported, _) = state
            .store
            .stack_statuses(stack.id, None, 0, u64::MAX)
            .await?;
        let settled: std::collections::HashSet<u64> = reported
            .iter()
            .filter(|s| s.version == counted && s.status != store::DeployStatus::Pending)
            .map(|s| s.env)
            .collect();
        let pending: Vec<u64> = targeted
            .into_iter()
            .filter(|e| !settled.contains(e))
            .collect();
        let total = pending.len() as u64;
        let page = pending
            .into_iter()
            .skip(start)
            .take(limit)
            .map(|env| StatusView {
                environment_id: env,
                status: "pending",
                version: None,
                error: None,
                updated_at: None,
            })
            .collect::<Vec<_>>();
        (page, total)
    } else {
        let (page, total) = state
            .store
            .stack_statuses(stack.id, wanted, start as u64, limit as u64)
            .await?;
        let page = page
            .into_iter()
            .map(|s| StatusView {
                environment_id: s.env,
                status: crate::targets::status_name(s.status),
                version: Some(s.version),
                error: s.error,
                updated_at: Some(rfc3339(s.updated_ms)),
            })
            .collect();
        (page, total)
    };
    Ok(HttpResponse::Ok()
        .insert_header(("X-Total-Count", total.to_string()))
        .json(items))
}

/// A new compose file makes the next version; new targets or variables apply to the stack
/// (and so to the newest version's deployment).
async fn update(
    state: web::Data<AppState>,
    id: web::Path<u64>,
    Json(body): Json<StackBody>,
) -> Result<HttpResponse, ApiError> {
    // What the body says wrong first (400), then what it cannot do to this stack (409) or
    // names (422).
    if let Some(name) = &body.name {
        check_name(name)?;
    }
    if let Some(vars) = &body.variables {
        check_variables(vars)?;
    }
    let rollout = body.rollout.map(RolloutConfig::from);
    if let Some(c) = &rollout {
        if body.compose.is_none() {
            return Err(ApiError::BadRequest(
                "rollout goes with a new compose (it says how that version goes out)".into(),
            ));
        }
        check_rollout(c)?;
    }
    if body.base_version.is_some() && body.compose.is_none() {
        return Err(ApiError::BadRequest(
            "baseVersion goes with a new compose".into(),
        ));
    }
    if let Some(g) = &body.edge_group_ids {
        if g.is_empty() || g.len() > MAX_GROUPS {
            return Err(ApiError::BadRequest(format!(
                "edgeGroupIds must name 1..={MAX_GROUPS} edge groups"
            )));
        }
    }
    let mut stack = existing(&state, *id).await?;
    if body.name.as_ref().is_some_and(|n| *n != stack.name) {
        return Err(ApiError::Conflict(
            "a stack's name cannot change (it names the compose project on every device)".into(),
        ));
    }
    if let Some(compose) = &body.compose {
        check_compose(compose)?;
    }
    let groups = match &body.edge_group_ids {
        Some(g) => Some(check_groups(&state, g).await?),
        None => None,
    };
    // The new version first: refused (another came first), nothing else changes either.
    if let Some(compose) = body.compose {
        let after = body.base_version.unwrap_or(stack.version);
        stack = state
            .store
            .add_stack_version(stack.id, after, &compose, now_ms())
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("edge stack {id} does not exist")))?;
        tracing::info!(
            stack = stack.id,
            version = stack.version,
            "edge stack version added"
        );
        // The new version goes out from what the environments settled on. The version is
        // stored: its rollout must follow, whatever the controller writes meanwhile.
        let mut attempts = 0;
        loop {
            let before = state.store.stack_rollout(stack.id).await?;
            let config = rollout
                .clone()
                .or_else(|| before.as_ref().map(|r| r.config.clone()))
                .unwrap_or_default();
            let from = crate::rollout::settled_version(before.as_ref(), stack.version - 1);
            let rollout = crate::rollout::start(config, from, stack.version, now_ms());
            let expected = before.as_ref().map_or(0, |r| r.revision);
            if state
                .store
                .put_stack_rollout(stack.id, expected, &rollout)
                .await?
            {
                break;
            }
            attempts += 1;
            if attempts >= 10 {
                return Err(ApiError::Conflict(format!(
                    "the rollout of edge stack {id} keeps changing; version {} is stored, send it again with baseVersion {}",
                    stack.version, stack.version
                )));
            }
        }
    }
    if groups.is_some() || body.variables.is_some() {
        if let Some(g) = groups {
            stack.edge_group_ids = g;
        }
        if let Some(v) = body.variables {
            stack.variables = v;
        }
        stack = state
            .store
            .update_edge_stack(&stack)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("edge stack {id} does not exist")))?;
    }
    state.publish(Change::EdgeStacks).await?;
    Ok(json(StatusCode::OK, &StackView::from(stack)))
}

async fn delete(state: web::Data<AppState>, id: web::Path<u64>) -> Result<HttpResponse, ApiError> {
    if !state.store.delete_edge_stack(*id).await? {
        return Err(ApiError::NotFound(format!(
            "edge stack {id} does not exist"
        )));
    }
    state.publish(Change::EdgeStacks).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// A stack in the list: with its rollout (`null` before it has one), so a screen of rollouts
/// in progress needs no call per stack; without counts, which take a pass over its targets.
#[derive(Serialize)]
struct ListedStack {
    #[serde(flatten)]
    stack: StackView,
    rollout: Option<RolloutView>,
}

async fn list(
    state: web::Data<AppState>,
    q: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let stacks = state.store.list_edge_stacks().await?;
    let rollouts: std::collections::HashMap<u64, Rollout> =
        state.store.stack_rollouts().await?.into_iter().collect();
    let listed: Vec<ListedStack> = stacks
        .into_iter()
        .map(|s| ListedStack {
            rollout: rollouts.get(&s.id).map(RolloutView::from),
            stack: StackView::from(s),
        })
        .collect();
    super::paged::<_, ListedStack>(listed, &q, state.limits.max_page)
}

/// The kept versions, newest first (without their files).
async fn versions(
    state: web::Data<AppState>,
    id: web::Path<u64>,
) -> Result<HttpResponse, ApiError> {
    existing(&state, *id).await?;
    let versions: Vec<VersionView> = state
        .store
        .stack_versions(*id)
        .await?
        .into_iter()
        .map(|v| VersionView::of(v, false))
        .collect();
    Ok(json(StatusCode::OK, &versions))
}

/// One kept version with its compose file.
async fn version(
    state: web::Data<AppState>,
    path: web::Path<(u64, u32)>,
) -> Result<HttpResponse, ApiError> {
    let (id, n) = path.into_inner();
    existing(&state, id).await?;
    let v = state
        .store
        .stack_version(id, n)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("edge stack {id} keeps no version {n}")))?;
    Ok(json(StatusCode::OK, &VersionView::of(v, true)))
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct FileQuery {
    environment_id: Option<String>,
    version: Option<String>,
}

/// The compose file of a version (the newest by default) as one environment gets it: its
/// variables substituted (`crate::stack_vars`). A value that cannot be had is a 422 naming it.
async fn file(
    state: web::Data<AppState>,
    id: web::Path<u64>,
    q: web::Query<FileQuery>,
) -> Result<HttpResponse, ApiError> {
    let stack = existing(&state, *id).await?;
    let env_id = q
        .environment_id
        .as_deref()
        .ok_or_else(|| ApiError::BadRequest("query parameter environmentId is required".into()))
        .and_then(|v| parse_num("environmentId", v))?;
    let version = match q.version.as_deref() {
        Some(v) => u32::try_from(parse_num("version", v)?)
            .map_err(|_| ApiError::BadRequest(format!("version {v} does not exist")))?,
        None => stack.version,
    };
    let env = state
        .store
        .get_environment(env_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("environment {env_id} does not exist")))?;
    let compose = state
        .store
        .stack_version(stack.id, version)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "edge stack {} keeps no version {version}",
                stack.id
            ))
        })?
        .compose;
    let rendered = state
        .fleet
        .catalog()
        .render_file(&env, &stack, &compose)
        .map_err(|e| ApiError::Unprocessable(format!("environment {env_id}: {e}")))?;
    Ok(HttpResponse::Ok()
        .content_type("application/yaml")
        .body(rendered))
}
