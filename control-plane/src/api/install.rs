//! Install commands and manifests that carry the join token.

use actix_web::http::header::ACCEPT;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use store::Environment;

use super::{ApiError, AppState};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallQuery {
    platform: Option<String>,
}

#[derive(Serialize)]
struct InstallView {
    platform: &'static str,
    command: String,
}

/// What goes into every variant.
struct Parts<'a> {
    image: &'a str,
    /// (name, value) pairs; `None` means "pass through from the host".
    vars: Vec<(String, Option<String>)>,
    name: String,
}

fn parts<'a>(state: &'a AppState, env: &Environment) -> Result<Parts<'a>, ApiError> {
    let mut vars: Vec<(String, Option<String>)> =
        vec![("EDGE_KEY".into(), Some(state.join_token(env)?))];
    if env.mode == store::EdgeMode::Async {
        vars.push(("EDGE_ASYNC".into(), Some("1".into())));
    }
    if env.allow_self_signed {
        vars.push(("EDGE_INSECURE_POLL".into(), Some("1".into())));
    }
    if let Some(s) = &state.agent_secret {
        vars.push(("AGENT_SECRET".into(), Some(s.clone())));
    }
    for v in &env.env_vars {
        vars.push((v.clone(), None));
    }
    Ok(Parts {
        image: &state.agent_image,
        vars,
        name: format!("edgeplane-agent-{}", env.id),
    })
}

/// Single-quotes for POSIX shells.
fn sh(v: &str) -> String {
    format!("'{}'", v.replace('\'', r"'\''"))
}

fn docker(p: &Parts<'_>, swarm: bool) -> String {
    let mut lines = if swarm {
        vec![
            "docker network create --driver overlay edgeplane_agent_network 2>/dev/null || true".to_owned(),
            format!("docker service create --name {} --mode global --network edgeplane_agent_network \\", p.name),
            "  --mount type=bind,src=/var/run/docker.sock,dst=/var/run/docker.sock \\".to_owned(),
            "  --mount type=volume,src=edgeplane_agent_data,dst=/data \\".to_owned(),
        ]
    } else {
        vec![
            format!("docker run -d --name {} --restart always \\", p.name),
            "  -v /var/run/docker.sock:/var/run/docker.sock \\".to_owned(),
            "  -v edgeplane_agent_data:/data \\".to_owned(),
        ]
    };
    for (k, v) in &p.vars {
        match v {
            Some(v) => lines.push(format!("  -e {k}={} \\", sh(v))),
            None => lines.push(format!("  -e {k} \\")),
        }
    }
    lines.push(format!("  {}", p.image));
    lines.join("\n")
}

fn kubernetes(p: &Parts<'_>) -> String {
    let mut env = String::new();
    for (k, v) in &p.vars {
        let value = match v {
            Some(v) => serde_json::to_string(v).unwrap_or_default(),
            // Host variables cannot be read from a manifest: the operator fills them in.
            None => format!("\"${{{k}}}\""),
        };
        env.push_str(&format!(
            "            - name: {k}\n              value: {value}\n"
        ));
    }
    format!(
        "# kubectl apply -f - <<'EOF'\n\
apiVersion: v1\nkind: Namespace\nmetadata:\n  name: edgeplane\n---\n\
apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: edgeplane-agent\n  namespace: edgeplane\n---\n\
apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: edgeplane-agent\n\
roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: cluster-admin\n\
subjects:\n  - kind: ServiceAccount\n    name: edgeplane-agent\n    namespace: edgeplane\n---\n\
apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: edgeplane\n\
spec:\n  replicas: 1\n  strategy:\n    type: Recreate\n  selector:\n    matchLabels:\n      app: edgeplane-agent\n\
  template:\n    metadata:\n      labels:\n        app: edgeplane-agent\n    spec:\n      serviceAccountName: edgeplane-agent\n\
      containers:\n        - name: agent\n          image: {image}\n          env:\n{env}\
          volumeMounts:\n            - name: data\n              mountPath: /data\n\
      volumes:\n        - name: data\n          emptyDir: {{}}\n",
        name = p.name,
        image = p.image,
    )
}

fn nomad(p: &Parts<'_>) -> String {
    let mut env = String::new();
    for (k, v) in &p.vars {
        let value = match v {
            Some(v) => serde_json::to_string(v).unwrap_or_default(),
            None => format!("\"${{env.{k}}}\""),
        };
        env.push_str(&format!("        {k} = {value}\n"));
    }
    format!(
        "job \"{name}\" {{\n  type = \"system\"\n  group \"agent\" {{\n    task \"agent\" {{\n      driver = \"docker\"\n\
      config {{\n        image = \"{image}\"\n        volumes = [\"/var/run/docker.sock:/var/run/docker.sock\", \"edgeplane_agent_data:/data\"]\n      }}\n\
      env {{\n{env}      }}\n    }}\n  }}\n}}\n",
        name = p.name,
        image = p.image,
    )
}

pub async fn install(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<u64>,
    q: web::Query<InstallQuery>,
) -> Result<HttpResponse, ApiError> {
    let env = state.load(*id).await?;
    let p = parts(&state, &env)?;
    let (platform, command) = match q.platform.as_deref().unwrap_or("docker") {
        "docker" => ("docker", docker(&p, false)),
        "swarm" => ("swarm", docker(&p, true)),
        "kubernetes" => ("kubernetes", kubernetes(&p)),
        "nomad" => ("nomad", nomad(&p)),
        other => {
            return Err(ApiError::BadRequest(format!(
                "platform={other:?} is not one of docker, swarm, kubernetes, nomad"
            )))
        }
    };
    let wants_text = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/plain"));
    Ok(if wants_text {
        HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body(command + "\n")
    } else {
        HttpResponse::Ok().json(InstallView { platform, command })
    })
}
