//! Async-mode commands run as engine API calls ([`DockerClient::execute`]): container
//! actions and removals (304, already in the wanted state, counts as done), stacks removed by
//! their compose label and deployed as compose-named containers (`container_spec`).

use bytes::Bytes;
use hyper::{Method, StatusCode};
use proto::async_mode::{Action, ServiceSpec};
use serde_json::Value;

use super::{one_line, DockerClient, COMMAND_TIMEOUT};

impl DockerClient {
    /// Runs one async-mode command; `Err` holds the engine's message (or why it could not be
    /// asked), one line. "Already started" and "already stopped" count as done.
    pub async fn execute(&self, action: &Action) -> Result<(), String> {
        match tokio::time::timeout(COMMAND_TIMEOUT, self.execute_inner(action)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the engine did not finish within {}s",
                COMMAND_TIMEOUT.as_secs()
            )),
        }
    }

    async fn execute_inner(&self, action: &Action) -> Result<(), String> {
        let timeout = |t: &Option<u32>| t.map(|t| format!("?t={t}")).unwrap_or_default();
        let (method, path) = match action {
            Action::ContainerStart { container } => {
                (Method::POST, format!("/containers/{container}/start"))
            }
            Action::ContainerStop {
                container,
                timeout_secs,
            } => (
                Method::POST,
                format!("/containers/{container}/stop{}", timeout(timeout_secs)),
            ),
            Action::ContainerRestart {
                container,
                timeout_secs,
            } => (
                Method::POST,
                format!("/containers/{container}/restart{}", timeout(timeout_secs)),
            ),
            Action::ContainerKill { container, signal } => (
                Method::POST,
                format!(
                    "/containers/{container}/kill{}",
                    signal
                        .as_ref()
                        .map(|s| format!("?signal={s}"))
                        .unwrap_or_default()
                ),
            ),
            Action::ContainerRemove { container, force } => (
                Method::DELETE,
                format!("/containers/{container}?force={force}"),
            ),
            Action::ImageRemove { image, force } => {
                (Method::DELETE, format!("/images/{image}?force={force}"))
            }
            Action::VolumeRemove { volume, force } => {
                (Method::DELETE, format!("/volumes/{volume}?force={force}"))
            }
            Action::StackRemove { stack } => return self.remove_stack(stack).await,
            Action::StackDeploy { stack, services } => {
                return self.deploy_stack(stack, services).await
            }
        };
        let (status, body) = self.call(method, &path).await?;
        // 304: already in the wanted state (start, stop).
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            Ok(())
        } else {
            Err(engine_message(status, &body))
        }
    }

    /// Removes a compose project's containers (forced), then its networks.
    async fn remove_stack(&self, stack: &str) -> Result<(), String> {
        let filter = |kind: &str| {
            let json = serde_json::json!({
                "label": [format!("{}={stack}", proto::snapshot::COMPOSE_PROJECT_LABEL)]
            })
            .to_string();
            let encoded: String = url::form_urlencoded::byte_serialize(json.as_bytes()).collect();
            format!("/{kind}?all=1&filters={encoded}")
        };
        let list = |body: &Bytes, key: &str| -> Vec<String> {
            serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|c| c.get(key).and_then(Value::as_str).map(str::to_owned))
                .collect()
        };
        let (status, body) = self.call(Method::GET, &filter("containers/json")).await?;
        if !status.is_success() {
            return Err(engine_message(status, &body));
        }
        let containers = list(&body, "Id");
        if containers.is_empty() {
            return Err(format!("no containers of stack {stack:?} on this engine"));
        }
        for id in containers {
            let (status, body) = self
                .call(Method::DELETE, &format!("/containers/{id}?force=true"))
                .await?;
            if !status.is_success() && status != StatusCode::NOT_FOUND {
                return Err(engine_message(status, &body));
            }
        }
        let (status, body) = self.call(Method::GET, &filter("networks")).await?;
        if status.is_success() {
            for id in list(&body, "Id") {
                // Best effort: a network still used elsewhere stays.
                let _ = self.call(Method::DELETE, &format!("/networks/{id}")).await;
            }
        }
        Ok(())
    }

    /// Creates (replacing any of the same name) and starts one container per service, named
    /// and labelled as compose names and labels its own (`{stack}-{service}-1`), so the
    /// snapshot shows the stack and `stackRemove` removes it. A missing image is pulled.
    async fn deploy_stack(&self, stack: &str, services: &[ServiceSpec]) -> Result<(), String> {
        for s in services {
            let name = format!("{stack}-{}-1", s.name);
            let (status, body) = self
                .call(Method::DELETE, &format!("/containers/{name}?force=true"))
                .await?;
            if !status.is_success() && status != StatusCode::NOT_FOUND {
                return Err(format!(
                    "service {}: {}",
                    s.name,
                    engine_message(status, &body)
                ));
            }
            let spec = container_spec(stack, s);
            let create = format!("/containers/create?name={name}");
            let (mut status, mut body) = self.call_with(Method::POST, &create, Some(&spec)).await?;
            if status == StatusCode::NOT_FOUND {
                let image: String =
                    url::form_urlencoded::byte_serialize(s.image.as_bytes()).collect();
                let (pulled, pull_body) = self
                    .call(Method::POST, &format!("/images/create?fromImage={image}"))
                    .await?;
                if !pulled.is_success() {
                    return Err(format!(
                        "service {}: image {} is not on the device and could not be pulled: {}",
                        s.name,
                        s.image,
                        engine_message(pulled, &pull_body)
                    ));
                }
                (status, body) = self.call_with(Method::POST, &create, Some(&spec)).await?;
            }
            if !status.is_success() {
                return Err(format!(
                    "service {}: {}",
                    s.name,
                    engine_message(status, &body)
                ));
            }
            let (status, body) = self
                .call(Method::POST, &format!("/containers/{name}/start"))
                .await?;
            if !status.is_success() && status != StatusCode::NOT_MODIFIED {
                return Err(format!(
                    "service {}: {}",
                    s.name,
                    engine_message(status, &body)
                ));
            }
        }
        Ok(())
    }
}

/// The engine's `POST /containers/create` body for one service of a stack.
pub(super) fn container_spec(stack: &str, s: &ServiceSpec) -> Value {
    let mut labels: serde_json::Map<String, Value> = s
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    for (k, v) in [
        (proto::snapshot::COMPOSE_PROJECT_LABEL, stack),
        (proto::snapshot::COMPOSE_SERVICE_LABEL, s.name.as_str()),
        ("com.docker.compose.container-number", "1"),
        ("com.docker.compose.oneoff", "False"),
    ] {
        labels.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    let mut exposed = serde_json::Map::new();
    let mut bindings = serde_json::Map::new();
    for p in &s.ports {
        let key = format!("{}/{}", p.container_port, p.protocol);
        exposed.insert(key.clone(), serde_json::json!({}));
        if let Some(host) = p.host_port {
            bindings.insert(
                key,
                serde_json::json!([{
                    "HostIp": p.host_ip.clone().unwrap_or_default(),
                    "HostPort": host.to_string(),
                }]),
            );
        }
    }
    let mut spec = serde_json::json!({
        "Image": s.image,
        "Env": s.environment,
        "Labels": labels,
        "ExposedPorts": exposed,
        "HostConfig": {
            "PortBindings": bindings,
            "Binds": s.volumes,
            "RestartPolicy": {"Name": s.restart.clone().unwrap_or_else(|| "no".to_owned())},
        },
    });
    if let Some(cmd) = &s.command {
        spec["Cmd"] = serde_json::json!(cmd);
    }
    if let Some(ep) = &s.entrypoint {
        spec["Entrypoint"] = serde_json::json!(ep);
    }
    spec
}

/// The engine's `{"message"}` (or its raw answer), one line.
pub(super) fn engine_message(status: StatusCode, body: &[u8]) -> String {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    format!(
        "engine answered {}: {}",
        status.as_u16(),
        one_line(message.trim(), 300)
    )
}
