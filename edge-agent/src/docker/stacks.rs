//! Edge stacks as engine API calls, the way compose does them: the project `edge_<name>`,
//! its networks and named volumes as `<project>_<name>`, one container per service named
//! `<project>-<service>-1`, compose's labels on all of them (so `docker compose ls` and the
//! snapshot see the stack), and a container replaced only when its configuration changed
//! (the `com.docker.compose.config-hash` label).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use proto::snapshot::{COMPOSE_PROJECT_LABEL, COMPOSE_SERVICE_LABEL};
use proto::stacks::{Condition, DesiredStack, PullPolicy, StackService};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::commands::{container_spec, engine_message};
use super::DockerClient;

/// The label of a container's configuration digest (compose's own name for it).
pub const CONFIG_HASH_LABEL: &str = "com.docker.compose.config-hash";
/// The stack version a container was created for.
pub const VERSION_LABEL: &str = "io.edgeplane.stack.version";
const NETWORK_LABEL: &str = "com.docker.compose.network";
const VOLUME_LABEL: &str = "com.docker.compose.volume";
/// How long a dependent service waits for its dependencies' conditions.
const DEPENDENCY_WAIT: Duration = Duration::from_secs(300);
/// How long one image pull may take.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// Where a stack's containers stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StackHealth {
    /// Every container runs (and is healthy where it has a healthcheck).
    Up,
    /// Still starting (a healthcheck not passed yet).
    Starting(String),
    /// A container exited, died, restarts or is unhealthy: why.
    Failed(String),
}

fn url_part(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A name in a path: image references keep their `/` and `:` (engines route on them), what
/// else is not plain is escaped.
fn path_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "/:._-@".contains(c) {
                c.to_string()
            } else {
                url_part(&c.to_string())
            }
        })
        .collect()
}

fn project_filter(project: &str) -> String {
    let json = json!({ "label": [format!("{COMPOSE_PROJECT_LABEL}={project}")] }).to_string();
    url_part(&json)
}

/// The digest of one service's configuration as it would be created.
pub fn config_hash(service: &StackService) -> String {
    let bytes = serde_json::to_vec(service).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Services in an order that starts every one after those it depends on (the control plane
/// refuses cycles; any left over come last, in name order).
fn start_order(stack: &DesiredStack) -> Vec<&StackService> {
    let services = &stack.spec.services;
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::with_capacity(services.len());
    while order.len() < services.len() {
        let before = order.len();
        for s in services {
            let name = s.container.name.as_str();
            if !done.contains(name)
                && s.depends_on
                    .iter()
                    .all(|d| done.contains(d.service.as_str()))
            {
                done.insert(name);
                order.push(s);
            }
        }
        if order.len() == before {
            order.extend(
                services
                    .iter()
                    .filter(|s| !done.contains(s.container.name.as_str())),
            );
            break;
        }
    }
    order
}

fn nanos(ms: u64) -> u64 {
    ms.saturating_mul(1_000_000)
}

impl DockerClient {
    async fn json_of(&self, path: &str) -> Result<Option<Value>, String> {
        let (status, body) = self.call(Method::GET, path).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(engine_message(status, &body));
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| format!("engine answer to {path} is not JSON: {e}"))
    }

    /// Makes sure every image the stack needs is on the device, as each service's pull
    /// policy says (`missing`, compose's default: pull only what is absent, so images loaded
    /// offline are used as they are).
    pub async fn ensure_images(&self, stack: &DesiredStack) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        for s in &stack.spec.services {
            let image = s.container.image.as_str();
            if !seen.insert((image, s.pull as u8)) {
                continue;
            }
            let present = self
                .json_of(&format!("/images/{}/json", path_part(image)))
                .await?
                .is_some();
            let pull = match s.pull {
                PullPolicy::Always => true,
                PullPolicy::Missing => !present,
                PullPolicy::Never if present => false,
                PullPolicy::Never => {
                    return Err(format!(
                        "service {}: image {image} is not on the device and pull_policy is never",
                        s.container.name
                    ))
                }
            };
            if pull {
                match tokio::time::timeout(PULL_TIMEOUT, self.pull(image)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        return Err(format!(
                            "service {}: image {image} could not be pulled: {e}",
                            s.container.name
                        ))
                    }
                    Err(_) => {
                        return Err(format!(
                            "service {}: pulling image {image} took more than {}s",
                            s.container.name,
                            PULL_TIMEOUT.as_secs()
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Pulls one image. The engine answers 200 and streams progress; a failure may come as
    /// an `error` line inside that stream.
    async fn pull(&self, image: &str) -> Result<(), String> {
        let (status, body) = self
            .call(
                Method::POST,
                &format!("/images/create?fromImage={}", url_part(image)),
            )
            .await?;
        if !status.is_success() {
            return Err(engine_message(status, &body));
        }
        if let Some(e) = stream_error(&body) {
            return Err(e);
        }
        Ok(())
    }

    /// Creates what the stack needs and replaces the containers whose configuration
    /// changed, in dependency order (waiting for `service_healthy` and
    /// `service_completed_successfully` conditions); removes containers of services the
    /// stack no longer has.
    pub async fn deploy_stack_spec(&self, stack: &DesiredStack) -> Result<(), String> {
        let project = stack.project();
        let uses_default = stack
            .spec
            .services
            .iter()
            .any(|s| s.networks.is_empty() && s.extras.network_mode.is_none());
        let mut networks: Vec<&str> = stack.spec.networks.iter().map(String::as_str).collect();
        if uses_default {
            networks.push("default");
        }
        for n in networks {
            self.ensure_network(&project, n).await?;
        }
        for v in &stack.spec.volumes {
            self.ensure_volume(&project, v).await?;
        }
        let wanted: BTreeSet<&str> = stack
            .spec
            .services
            .iter()
            .map(|s| s.container.name.as_str())
            .collect();
        // Services the stack no longer has go first (they may hold ports the new ones need).
        for (id, service) in self.project_containers(&project).await? {
            if !wanted.contains(service.as_str()) {
                self.remove_container(&id).await?;
            }
        }
        for s in start_order(stack) {
            for d in &s.depends_on {
                self.wait_for(&project, d.service.as_str(), d.condition)
                    .await
                    .map_err(|e| format!("service {}: {e}", s.container.name))?;
            }
            self.ensure_service(stack, s)
                .await
                .map_err(|e| format!("service {}: {e}", s.container.name))?;
        }
        Ok(())
    }

    async fn ensure_network(&self, project: &str, name: &str) -> Result<(), String> {
        let full = format!("{project}_{name}");
        if self
            .json_of(&format!("/networks/{}", url_part(&full)))
            .await?
            .is_some()
        {
            return Ok(());
        }
        let body = json!({
            "Name": full,
            "CheckDuplicate": true,
            "Labels": { COMPOSE_PROJECT_LABEL: project, NETWORK_LABEL: name },
        });
        let (status, answer) = self
            .call_with(Method::POST, "/networks/create", Some(&body))
            .await?;
        if status.is_success() || status == StatusCode::CONFLICT {
            Ok(())
        } else {
            Err(format!(
                "network {full}: {}",
                engine_message(status, &answer)
            ))
        }
    }

    async fn ensure_volume(&self, project: &str, name: &str) -> Result<(), String> {
        let full = format!("{project}_{name}");
        if self
            .json_of(&format!("/volumes/{}", url_part(&full)))
            .await?
            .is_some()
        {
            return Ok(());
        }
        let body = json!({
            "Name": full,
            "Labels": { COMPOSE_PROJECT_LABEL: project, VOLUME_LABEL: name },
        });
        let (status, answer) = self
            .call_with(Method::POST, "/volumes/create", Some(&body))
            .await?;
        if status.is_success() || status == StatusCode::CONFLICT {
            Ok(())
        } else {
            Err(format!(
                "volume {full}: {}",
                engine_message(status, &answer)
            ))
        }
    }

    /// The project's containers: (id, service).
    async fn project_containers(&self, project: &str) -> Result<Vec<(String, String)>, String> {
        let list = self
            .json_of(&format!(
                "/containers/json?all=1&filters={}",
                project_filter(project)
            ))
            .await?
            .unwrap_or(Value::Null);
        Ok(list
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|c| {
                let id = c.get("Id")?.as_str()?.to_owned();
                let service = c
                    .get("Labels")
                    .and_then(|l| l.get(COMPOSE_SERVICE_LABEL))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                Some((id, service))
            })
            .collect())
    }

    async fn remove_container(&self, id: &str) -> Result<(), String> {
        let (status, body) = self
            .call(Method::DELETE, &format!("/containers/{id}?force=true"))
            .await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(engine_message(status, &body))
        }
    }

    /// One service's container: kept when it has this configuration (started if it is
    /// not running), otherwise created anew and started.
    async fn ensure_service(&self, stack: &DesiredStack, s: &StackService) -> Result<(), String> {
        let project = stack.project();
        let name = format!("{project}-{}-1", s.container.name);
        let hash = config_hash(s);
        if let Some(existing) = self.json_of(&format!("/containers/{name}/json")).await? {
            let same = existing
                .pointer("/Config/Labels")
                .and_then(|l| l.get(CONFIG_HASH_LABEL))
                .and_then(Value::as_str)
                == Some(hash.as_str());
            if same {
                let running = existing
                    .pointer("/State/Running")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                return if running {
                    Ok(())
                } else {
                    self.start(&name).await
                };
            }
            self.remove_container(&name).await?;
        }
        let spec = service_spec(stack, s, &hash);
        let create = format!("/containers/create?name={}", url_part(&name));
        let (status, body) = self.call_with(Method::POST, &create, Some(&spec)).await?;
        if !status.is_success() {
            return Err(engine_message(status, &body));
        }
        // Further networks than the first are joined before the start.
        for n in s.networks.iter().skip(1) {
            let body = json!({
                "Container": name,
                "EndpointConfig": { "Aliases": [s.container.name] },
            });
            let (status, answer) = self
                .call_with(
                    Method::POST,
                    &format!("/networks/{}/connect", url_part(&format!("{project}_{n}"))),
                    Some(&body),
                )
                .await?;
            if !status.is_success() {
                return Err(format!("network {n}: {}", engine_message(status, &answer)));
            }
        }
        self.start(&name).await
    }

    async fn start(&self, name: &str) -> Result<(), String> {
        let (status, body) = self
            .call(Method::POST, &format!("/containers/{name}/start"))
            .await?;
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            Ok(())
        } else {
            Err(engine_message(status, &body))
        }
    }

    /// Waits until service `service` of `project` meets `condition`.
    async fn wait_for(
        &self,
        project: &str,
        service: &str,
        condition: Condition,
    ) -> Result<(), String> {
        if condition == Condition::Started {
            return Ok(());
        }
        let name = format!("{project}-{service}-1");
        let deadline = tokio::time::Instant::now() + DEPENDENCY_WAIT;
        loop {
            let state = self
                .json_of(&format!("/containers/{name}/json"))
                .await?
                .and_then(|c| c.get("State").cloned())
                .unwrap_or(Value::Null);
            let status = state.get("Status").and_then(Value::as_str).unwrap_or("");
            let exit = state.get("ExitCode").and_then(Value::as_i64).unwrap_or(-1);
            let health = state
                .pointer("/Health/Status")
                .and_then(Value::as_str)
                .unwrap_or("");
            match condition {
                Condition::Healthy if health == "healthy" => return Ok(()),
                Condition::Healthy if health == "unhealthy" => {
                    return Err(format!("depends on {service}, which is unhealthy"))
                }
                Condition::CompletedSuccessfully if status == "exited" && exit == 0 => {
                    return Ok(())
                }
                Condition::CompletedSuccessfully if status == "exited" => {
                    return Err(format!(
                        "depends on {service}, which exited with code {exit}"
                    ))
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "depends on {service}, which did not become {} within {}s",
                    match condition {
                        Condition::Healthy => "healthy",
                        _ => "complete",
                    },
                    DEPENDENCY_WAIT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// How the stack's containers are doing now.
    pub async fn stack_health(&self, stack: &DesiredStack) -> Result<StackHealth, String> {
        let project = stack.project();
        let mut waiting = None;
        for s in &stack.spec.services {
            let name = format!("{project}-{}-1", s.container.name);
            let Some(c) = self.json_of(&format!("/containers/{name}/json")).await? else {
                return Ok(StackHealth::Failed(format!(
                    "service {}: its container is gone",
                    s.container.name
                )));
            };
            let state = c.get("State").cloned().unwrap_or(Value::Null);
            let status = state.get("Status").and_then(Value::as_str).unwrap_or("");
            let health = state
                .pointer("/Health/Status")
                .and_then(Value::as_str)
                .unwrap_or("");
            let finished_ok = status == "exited"
                && state.get("ExitCode").and_then(Value::as_i64) == Some(0)
                && stack.spec.services.iter().any(|other| {
                    other.depends_on.iter().any(|d| {
                        d.service == s.container.name
                            && d.condition == Condition::CompletedSuccessfully
                    })
                });
            if finished_ok {
                continue;
            }
            match status {
                "running" => {}
                "created" => {
                    waiting = Some(format!("service {}: not started yet", s.container.name));
                    continue;
                }
                other => {
                    let exit = state.get("ExitCode").and_then(Value::as_i64).unwrap_or(-1);
                    let error = state
                        .get("Error")
                        .and_then(Value::as_str)
                        .filter(|e| !e.is_empty())
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default();
                    return Ok(StackHealth::Failed(format!(
                        "service {}: container is {other} (exit code {exit}){error}",
                        s.container.name
                    )));
                }
            }
            match health {
                "unhealthy" => {
                    return Ok(StackHealth::Failed(format!(
                        "service {}: unhealthy",
                        s.container.name
                    )))
                }
                "starting" => {
                    waiting = Some(format!(
                        "service {}: healthcheck not passed yet",
                        s.container.name
                    ))
                }
                _ => {}
            }
        }
        Ok(match waiting {
            Some(w) => StackHealth::Starting(w),
            None => StackHealth::Up,
        })
    }

    /// Removes a project's containers (forced) and networks; its volumes stay (as with
    /// `docker compose down`), so data survives a stack moving away and back.
    pub async fn remove_project(&self, project: &str) -> Result<(), String> {
        for (id, _) in self.project_containers(project).await? {
            self.remove_container(&id).await?;
        }
        let networks = self
            .json_of(&format!("/networks?filters={}", project_filter(project)))
            .await?
            .unwrap_or(Value::Null);
        for n in networks.as_array().map(Vec::as_slice).unwrap_or_default() {
            if let Some(id) = n.get("Id").and_then(Value::as_str) {
                let (status, body) = self
                    .call(Method::DELETE, &format!("/networks/{id}"))
                    .await?;
                if !status.is_success() && status != StatusCode::NOT_FOUND {
                    return Err(format!("network {id}: {}", engine_message(status, &body)));
                }
            }
        }
        Ok(())
    }
}

/// The first `error` of an engine's progress stream (JSON objects, one after another).
fn stream_error(body: &Bytes) -> Option<String> {
    serde_json::Deserializer::from_slice(body)
        .into_iter::<Value>()
        .filter_map(Result::ok)
        .find_map(|v| {
            v.get("error")
                .or_else(|| v.pointer("/errorDetail/message"))
                .and_then(Value::as_str)
                .map(|e| super::one_line(e, 300))
        })
}

/// The engine's `POST /containers/create` body for one service of an edge stack.
fn service_spec(stack: &DesiredStack, s: &StackService, hash: &str) -> Value {
    let project = stack.project();
    let mut service = s.container.clone();
    // Named volumes are the project's (`<project>_<name>`).
    let declared: BTreeSet<&str> = stack.spec.volumes.iter().map(String::as_str).collect();
    service.volumes = service
        .volumes
        .iter()
        .map(|v| match v.split_once(':') {
            Some((source, rest)) if declared.contains(source) => {
                format!("{project}_{source}:{rest}")
            }
            _ => v.clone(),
        })
        .collect();
    let mut spec = container_spec(&project, &service);
    spec["Labels"][CONFIG_HASH_LABEL] = json!(hash);
    spec["Labels"][VERSION_LABEL] = json!(stack.version.to_string());
    let network = match (&s.extras.network_mode, s.networks.first()) {
        (Some(mode), _) => mode.clone(),
        (None, Some(first)) => format!("{project}_{first}"),
        (None, None) => format!("{project}_default"),
    };
    spec["HostConfig"]["NetworkMode"] = json!(network);
    if s.extras.network_mode.is_none() {
        let mut endpoints = BTreeMap::new();
        endpoints.insert(network, json!({ "Aliases": [s.container.name] }));
        spec["NetworkingConfig"] = json!({ "EndpointsConfig": endpoints });
    }
    if let Some(h) = &s.healthcheck {
        spec["Healthcheck"] = json!({
            "Test": h.test,
            "Interval": nanos(h.interval_ms),
            "Timeout": nanos(h.timeout_ms),
            "Retries": h.retries,
            "StartPeriod": nanos(h.start_period_ms),
        });
    }
    let x = &s.extras;
    if let Some(u) = &x.user {
        spec["User"] = json!(u);
    }
    if let Some(w) = &x.working_dir {
        spec["WorkingDir"] = json!(w);
    }
    if let Some(h) = &x.hostname {
        spec["Hostname"] = json!(h);
    }
    if let Some(t) = x.stop_grace_secs {
        spec["StopTimeout"] = json!(t);
    }
    spec["HostConfig"]["Privileged"] = json!(x.privileged);
    if !x.devices.is_empty() {
        let devices: Vec<Value> = x
            .devices
            .iter()
            .map(|d| {
                let mut parts = d.splitn(3, ':');
                let host = parts.next().unwrap_or_default();
                let inside = parts.next().unwrap_or(host);
                let perms = parts.next().unwrap_or("rwm");
                json!({"PathOnHost": host, "PathInContainer": inside, "CgroupPermissions": perms})
            })
            .collect();
        spec["HostConfig"]["Devices"] = json!(devices);
    }
    spec
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proto::async_mode::ServiceSpec;
    use proto::stacks::{Dependency, StackSpec};

    use super::*;

    fn service(name: &str, deps: &[&str]) -> StackService {
        StackService {
            container: ServiceSpec {
                name: name.into(),
                image: "busybox".into(),
                volumes: vec!["data:/d".into(), "/srv:/s".into()],
                ..Default::default()
            },
            depends_on: deps
                .iter()
                .map(|d| Dependency {
                    service: (*d).into(),
                    condition: Condition::Started,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn stack() -> DesiredStack {
        DesiredStack {
            id: 1,
            name: "Shop".into(),
            version: 4,
            spec: StackSpec {
                services: vec![
                    service("proxy", &["app"]),
                    service("app", &["db"]),
                    service("db", &[]),
                ],
                networks: vec![],
                volumes: vec!["data".into()],
            },
        }
    }

    #[test]
    fn services_start_after_what_they_depend_on() {
        let s = stack();
        let order: Vec<&str> = start_order(&s)
            .iter()
            .map(|s| s.container.name.as_str())
            .collect();
        assert_eq!(order, vec!["db", "app", "proxy"]);
    }

    #[test]
    fn containers_carry_compose_names_labels_and_the_projects_volumes() {
        let s = stack();
        let spec = service_spec(&s, &s.spec.services[2], "abc");
        assert_eq!(spec["Labels"][COMPOSE_PROJECT_LABEL], "edge_shop");
        assert_eq!(spec["Labels"][COMPOSE_SERVICE_LABEL], "db");
        assert_eq!(spec["Labels"][CONFIG_HASH_LABEL], "abc");
        assert_eq!(spec["Labels"][VERSION_LABEL], "4");
        assert_eq!(spec["HostConfig"]["NetworkMode"], "edge_shop_default");
        assert_eq!(
            spec["HostConfig"]["Binds"],
            json!(["edge_shop_data:/d", "/srv:/s"])
        );
        // The hash follows the configuration, not the version.
        let mut other = s.spec.services[2].clone();
        assert_eq!(config_hash(&other), config_hash(&s.spec.services[2]));
        other.container.image = "busybox:2".into();
        assert_ne!(config_hash(&other), config_hash(&s.spec.services[2]));
    }

    #[test]
    fn a_pull_that_fails_inside_its_stream_is_an_error() {
        let ok = Bytes::from_static(b"{\"status\":\"Pulling\"}\n{\"status\":\"Done\"}\n");
        assert_eq!(stream_error(&ok), None);
        let bad = Bytes::from_static(
            b"{\"status\":\"Pulling\"}\n{\"errorDetail\":{\"message\":\"manifest unknown\"},\"error\":\"manifest unknown\"}\n",
        );
        assert_eq!(stream_error(&bad).as_deref(), Some("manifest unknown"));
    }
}
