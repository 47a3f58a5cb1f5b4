//! `/api/endpoints/{id}/commands`: commands queued for async environments.
//!
//! The JSON form is flat (`{"type": "containerStop", "target": "web", "timeoutSecs": 10}`);
//! it becomes a [`proto::async_mode::Action`], checked before it is queued, so a command that
//! could never run is refused here with a clear message rather than failing on the device.
//!
//! Ids are per environment, strictly increasing and never reused, with gaps: a command's id
//! is its queue time in ms × 1000 (one more than the newest when that is not above it; see
//! `store::next_command_id`). An environment keeps its unfinished commands (at most
//! `store::MAX_UNFINISHED_COMMANDS_PER_ENV`, then queueing is `409`) and its newest
//! `store::KEEP_FINISHED_COMMANDS_PER_ENV` finished ones; older finished ones are dropped when
//! a command is queued.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use proto::async_mode::Action;
use proto::clock::now_ms;
use serde::{Deserialize, Serialize};
use store::{CommandState, EdgeMode, StoreError, StoredCommand};

use super::endpoints::{parse_num, rfc3339};
use super::{json, ApiError, AppState, Json};

/// Command types, as the API names them.
pub(crate) const TYPES: [&str; 9] = [
    "containerStart",
    "containerStop",
    "containerRestart",
    "containerKill",
    "containerRemove",
    "imageRemove",
    "volumeRemove",
    "stackRemove",
    "stackDeploy",
];

/// `POST` body.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewCommand {
    #[serde(rename = "type")]
    kind: String,
    target: String,
    force: Option<bool>,
    timeout_secs: Option<u32>,
    signal: Option<String>,
    /// For `stackDeploy`: the compose file (YAML text).
    compose: Option<String>,
}

impl NewCommand {
    fn into_action(self) -> Result<Action, ApiError> {
        let NewCommand {
            kind,
            target,
            force,
            timeout_secs,
            signal,
            compose,
        } = self;
        let unused = |field: &str, given: bool| {
            if given {
                Err(ApiError::BadRequest(format!(
                    "{field} does not apply to a {kind} command"
                )))
            } else {
                Ok(())
            }
        };
        if kind != "stackDeploy" {
            unused("compose", compose.is_some())?;
        }
        let action = match kind.as_str() {
            "stackDeploy" => {
                unused("force", force.is_some())?;
                unused("timeoutSecs", timeout_secs.is_some())?;
                unused("signal", signal.is_some())?;
                let compose = compose.ok_or_else(|| {
                    ApiError::BadRequest(
                        "stackDeploy needs compose: the compose file as a string".to_owned(),
                    )
                })?;
                // The stack's name is the body's (400); the compose file is a string the
                // document cannot check further, so what is wrong in it is a 422.
                Action::StackRemove {
                    stack: target.clone(),
                }
                .validate()
                .map_err(|e| ApiError::BadRequest(format!("{kind}: {e}")))?;
                let services = super::compose::parse(&compose).map_err(ApiError::Unprocessable)?;
                let action = Action::StackDeploy {
                    stack: target,
                    services,
                };
                action
                    .validate()
                    .map_err(|e| ApiError::Unprocessable(format!("{kind}: {e}")))?;
                return Ok(action);
            }
            "containerStart" | "stackRemove" => {
                unused("force", force.is_some())?;
                unused("timeoutSecs", timeout_secs.is_some())?;
                unused("signal", signal.is_some())?;
                if kind == "containerStart" {
                    Action::ContainerStart { container: target }
                } else {
                    Action::StackRemove { stack: target }
                }
            }
            "containerStop" | "containerRestart" => {
                unused("force", force.is_some())?;
                unused("signal", signal.is_some())?;
                if kind == "containerStop" {
                    Action::ContainerStop {
                        container: target,
                        timeout_secs,
                    }
                } else {
                    Action::ContainerRestart {
                        container: target,
                        timeout_secs,
                    }
                }
            }
            "containerKill" => {
                unused("force", force.is_some())?;
                unused("timeoutSecs", timeout_secs.is_some())?;
                Action::ContainerKill {
                    container: target,
                    signal,
                }
            }
            "containerRemove" | "imageRemove" | "volumeRemove" => {
                unused("timeoutSecs", timeout_secs.is_some())?;
                unused("signal", signal.is_some())?;
                let force = force.unwrap_or(false);
                match kind.as_str() {
                    "containerRemove" => Action::ContainerRemove {
                        container: target,
                        force,
                    },
                    "imageRemove" => Action::ImageRemove {
                        image: target,
                        force,
                    },
                    _ => Action::VolumeRemove {
                        volume: target,
                        force,
                    },
                }
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown command type {other:?}; one of {}",
                    TYPES.join(", ")
                )))
            }
        };
        action
            .validate()
            .map_err(|e| ApiError::BadRequest(format!("{kind}: {e}")))?;
        Ok(action)
    }
}

/// A command as the API shows it.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct CommandView {
    id: u64,
    #[serde(rename = "type")]
    kind: &'static str,
    target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    force: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_secs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signal: Option<String>,
    /// For `stackDeploy`: the services deployed.
    #[serde(skip_serializing_if = "Option::is_none")]
    services: Option<Vec<String>>,
    state: CommandState,
    created_at: String,
    sent_at: Option<String>,
    finished_at: Option<String>,
    error: Option<String>,
}

impl From<StoredCommand> for CommandView {
    fn from(c: StoredCommand) -> Self {
        let state = c.state();
        let (force, timeout_secs, signal) = match &c.action {
            Action::ContainerStop { timeout_secs, .. }
            | Action::ContainerRestart { timeout_secs, .. } => (None, *timeout_secs, None),
            Action::ContainerKill { signal, .. } => (None, None, signal.clone()),
            Action::ContainerRemove { force, .. }
            | Action::ImageRemove { force, .. }
            | Action::VolumeRemove { force, .. } => (Some(*force), None, None),
            Action::ContainerStart { .. }
            | Action::StackRemove { .. }
            | Action::StackDeploy { .. } => (None, None, None),
        };
        Self {
            id: c.id,
            kind: c.action.kind(),
            target: c.action.target().to_owned(),
            force,
            timeout_secs,
            signal,
            services: match &c.action {
                Action::StackDeploy { services, .. } => {
                    Some(services.iter().map(|s| s.name.clone()).collect())
                }
                _ => None,
            },
            state,
            created_at: rfc3339(c.created_ms),
            sent_at: c.sent_ms.map(rfc3339),
            finished_at: c.finished_ms.map(rfc3339),
            error: c.error,
        }
    }
}

/// `POST /api/endpoints/{id}/commands`: `201` with the queued command.
pub async fn queue(
    state: web::Data<AppState>,
    id: web::Path<u64>,
    Json(body): Json<NewCommand>,
) -> Result<HttpResponse, ApiError> {
    let id = *id;
    let env = state.load(id).await?;
    if env.mode != EdgeMode::Async {
        return Err(ApiError::Conflict(format!(
            "environment {id} is in standard mode: commands are for async environments; \
             use the Docker API at /api/endpoints/{id}/docker instead"
        )));
    }
    let action = body.into_action()?;
    let cmd = match state.store.queue_command(id, &action, now_ms()).await {
        Ok(Some(cmd)) => cmd,
        Ok(None) => {
            return Err(ApiError::NotFound(format!(
                "environment {id} does not exist"
            )))
        }
        Err(StoreError::Conflict(m)) => return Err(ApiError::Conflict(m)),
        Err(e) => return Err(e.into()),
    };
    tracing::info!(
        env = id,
        command = cmd.id,
        kind = action.kind(),
        "command queued"
    );
    state
        .metrics
        .async_commands
        .with_label_values(&["queued"])
        .inc();
    Ok(json(StatusCode::CREATED, &CommandView::from(cmd)))
}

#[derive(Deserialize, Debug)]
pub struct ListQuery {
    start: Option<String>,
    limit: Option<String>,
}

/// `GET /api/endpoints/{id}/commands?start=&limit=`: newest (highest id) first, `start`
/// counting commands, not ids; `X-Total-Count` is how many are kept.
pub async fn list(
    state: web::Data<AppState>,
    id: web::Path<u64>,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = *id;
    state.load(id).await?;
    let max_page = state.limits.max_page as u64;
    let start = q
        .start
        .as_deref()
        .map(|v| parse_num("start", v))
        .transpose()?
        .unwrap_or(0);
    let limit = q
        .limit
        .as_deref()
        .map(|v| parse_num("limit", v))
        .transpose()?
        .unwrap_or(100);
    if limit == 0 || limit > max_page {
        return Err(ApiError::BadRequest(format!(
            "query parameter limit must be 1..={max_page}, got {limit}"
        )));
    }
    let (page, total) = state.store.list_commands(id, start, limit).await?;
    let views: Vec<CommandView> = page.into_iter().map(CommandView::from).collect();
    Ok(HttpResponse::Ok()
        .insert_header(("X-Total-Count", total.to_string()))
        .json(views))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(body: &str) -> Result<Action, String> {
        let c: NewCommand = serde_json::from_str(body).map_err(|e| e.to_string())?;
        c.into_action().map_err(|e| e.to_string())
    }

    #[test]
    fn the_flat_form_becomes_an_action() {
        assert_eq!(
            parse(r#"{"type":"containerStop","target":"web","timeoutSecs":5}"#),
            Ok(Action::ContainerStop {
                container: "web".into(),
                timeout_secs: Some(5)
            })
        );
        assert_eq!(
            parse(r#"{"type":"volumeRemove","target":"data"}"#),
            Ok(Action::VolumeRemove {
                volume: "data".into(),
                force: false
            })
        );
    }

    #[test]
    fn mistakes_are_refused_with_a_reason() {
        let e = parse(r#"{"type":"reboot","target":"x"}"#).unwrap_err();
        assert!(e.contains("unknown command type \"reboot\""), "{e}");
        assert!(e.contains("containerStop"), "{e}");
        let e = parse(r#"{"type":"containerStart","target":"x","force":true}"#).unwrap_err();
        assert!(e.contains("force does not apply"), "{e}");
        let e = parse(r#"{"type":"containerStart","target":""}"#).unwrap_err();
        assert!(e.contains("must not be empty"), "{e}");
        let e = parse(r#"{"type":"containerStart","target":"../x"}"#).unwrap_err();
        assert!(e.contains("not a valid name"), "{e}");
        assert!(parse(r#"{"type":"containerStart","target":"x","colour":1}"#).is_err());
    }
}
