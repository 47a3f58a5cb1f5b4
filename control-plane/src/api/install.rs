//! Install commands and manifests that carry the join token.
//!
//! What the agent keeps and where:
//!
//! - **Its state is keyed by environment.** The agent persists its Edge ID (when none is
//!   given) and async mode's command journal in `EDGE_DATA_DIR` (`/data`). Docker, swarm and
//!   Nomad mount a named volume there, `edgeplane_agent_<environment id>`: a second
//!   environment on the same host, or the same host enrolled again as a new environment, starts
//!   with an empty data dir instead of inheriting another agent's journal (commands it would
//!   never run, results it would post to the wrong environment).
//! - **One Edge ID per environment, wherever all its agents run.** Swarm (`--mode global`)
//!   and Nomad (`type = "system"`) run one agent per node, all in the one environment; the
//!   server hands the tunnel to one of them. They must present the same Edge ID, so the
//!   command sets `EDGE_ID` for all of them: the environment's own (bound, or pre-assigned at
//!   creation), else a fresh UUID generated now, which the first check-in binds. The plain
//!   Docker command sets `EDGE_ID` only when the environment has one; otherwise the agent
//!   generates its own once and keeps it in its volume.
//! - **Kubernetes: the Edge ID in an immutable Secret.** A pod must come back with the same
//!   Edge ID after it is rescheduled, on any node, or the server refuses it as an impostor
//!   (`edge_id_mismatch`). The manifest creates the Secret `edgeplane-agent-<id>-edge-id`
//!   (the environment's Edge ID, or one generated now) and the Deployment reads `EDGE_ID`
//!   from it. A Secret lives in the cluster's API, so it follows the pod to every node and
//!   needs no storage; a PersistentVolumeClaim would need a default StorageClass (many edge
//!   clusters have none, and the pod would stay pending), and the usual node-local volumes
//!   (local-path, hostPath) pin the pod to one node, so a node loss would strand it. The
//!   Secret is `immutable`: re-applying a manifest fetched again before the first check-in
//!   (with another generated ID) fails on that Secret, naming it, instead of silently
//!   changing the ID under a running agent; `kubectl -n edgeplane delete secret
//!   edgeplane-agent-<id>-edge-id` re-keys it on purpose. Once the environment is bound,
//!   every manifest carries the bound ID, so re-applying changes nothing. The data dir stays
//!   an `emptyDir`: only async mode's journal lives there, so a rescheduled async agent
//!   forgets the commands it ran whose results were not acknowledged yet (delivery is at
//!   least once, so such a command may run again); operators who want the journal kept
//!   replace the `emptyDir` with a claim of their storage class.

use actix_web::http::header::ACCEPT;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use store::Environment;
use uuid::Uuid;

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

/// A variable passed to the agent.
#[derive(Clone)]
enum Value {
    Literal(String),
    /// Passed through from the host.
    Host,
}

/// What goes into every variant.
struct Parts<'a> {
    image: &'a str,
    /// `EDGE_KEY` first; `EDGE_ID` is not among them (see [`Parts::vars`]).
    vars: Vec<(String, Value)>,
    /// `edgeplane-agent-<id>`: container, service, job and Deployment name.
    name: String,
    /// The data volume of this environment's agents: `edgeplane_agent_<id>`.
    volume: String,
    /// The environment's Edge ID: bound, or pre-assigned at creation.
    edge_id: Option<Uuid>,
}

impl Parts<'_> {
    /// The Edge ID all agents of a multi-node install share: the environment's own, else a
    /// fresh one, which the first check-in binds.
    fn shared_edge_id(&self) -> Uuid {
        self.edge_id.unwrap_or_else(Uuid::new_v4)
    }

    /// The variables, with `EDGE_ID` right after `EDGE_KEY` when there is one.
    fn vars(&self, edge_id: Option<Uuid>) -> Vec<(String, Value)> {
        let mut vars = self.vars.clone();
        if let Some(id) = edge_id {
            vars.insert(1, ("EDGE_ID".into(), Value::Literal(id.to_string())));
        }
        vars
    }
}

fn parts<'a>(state: &'a AppState, env: &Environment) -> Result<Parts<'a>, ApiError> {
    let mut vars = vec![("EDGE_KEY".into(), Value::Literal(state.join_token(env)?))];
    if env.mode == store::EdgeMode::Async {
        vars.push(("EDGE_ASYNC".into(), Value::Literal("1".into())));
    }
    if env.allow_self_signed {
        vars.push(("EDGE_INSECURE_POLL".into(), Value::Literal("1".into())));
    }
    if let Some(s) = &state.agent_secret {
        vars.push(("AGENT_SECRET".into(), Value::Literal(s.clone())));
    }
    for v in &env.env_vars {
        vars.push((v.clone(), Value::Host));
    }
    Ok(Parts {
        image: &state.agent_image,
        vars,
        name: format!("edgeplane-agent-{}", env.id),
        volume: format!("edgeplane_agent_{}", env.id),
        edge_id: env.edge_id,
    })
}

/// Single-quotes for POSIX shells.
fn sh(v: &str) -> String {
    format!("'{}'", v.replace('\'', r"'\''"))
}

fn docker(p: &Parts<'_>, swarm: bool) -> String {
    let (mut lines, edge_id) = if swarm {
        (
            vec![
                "docker network create --driver overlay edgeplane_agent_network 2>/dev/null || true".to_owned(),
                format!("docker service create --name {} --mode global --network edgeplane_agent_network \\", p.name),
                "  --mount type=bind,src=/var/run/docker.sock,dst=/var/run/docker.sock \\".to_owned(),
                format!("  --mount type=volume,src={},dst=/data \\", p.volume),
            ],
            Some(p.shared_edge_id()),
        )
    } else {
        (
            vec![
                format!("docker run -d --name {} --restart always \\", p.name),
                "  -v /var/run/docker.sock:/var/run/docker.sock \\".to_owned(),
                format!("  -v {}:/data \\", p.volume),
            ],
            p.edge_id,
        )
    };
    for (k, v) in p.vars(edge_id) {
        match v {
            Value::Literal(v) => lines.push(format!("  -e {k}={} \\", sh(&v))),
            Value::Host => lines.push(format!("  -e {k} \\")),
        }
    }
    lines.push(format!("  {}", p.image));
    lines.join("\n")
}

/// A YAML (and HCL) double-quoted string.
fn quoted(v: &str) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn kubernetes(p: &Parts<'_>) -> String {
    let secret = format!("{}-edge-id", p.name);
    let mut env = String::new();
    for (i, (k, v)) in p.vars(None).into_iter().enumerate() {
        let value = match v {
            Value::Literal(v) => quoted(&v),
            // Host variables cannot be read from a manifest: the operator fills them in.
            Value::Host => format!("\"${{{k}}}\""),
        };
        env.push_str(&format!(
            "            - name: {k}\n              value: {value}\n"
        ));
        if i == 0 {
            // Right after EDGE_KEY, as in the other variants.
            env.push_str(&format!(
                r#"            - name: EDGE_ID
              valueFrom:
                secretKeyRef:
                  name: {secret}
                  key: edge-id
"#
            ));
        }
    }
    // A raw string: a `\` line continuation would eat the indentation YAML depends on.
    format!(
        r#"# Save as {name}.yaml, then: kubectl apply -f {name}.yaml
apiVersion: v1
kind: Namespace
metadata:
  name: edgeplane
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: edgeplane-agent
  namespace: edgeplane
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: edgeplane-agent
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: cluster-admin
subjects:
  - kind: ServiceAccount
    name: edgeplane-agent
    namespace: edgeplane
---
# The Edge ID, kept by the cluster: a pod rescheduled onto any node comes back with it.
# Immutable, so it never changes under a bound agent; delete it to re-key on purpose.
apiVersion: v1
kind: Secret
metadata:
  name: {secret}
  namespace: edgeplane
type: Opaque
immutable: true
stringData:
  edge-id: {edge_id}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: edgeplane
spec:
  replicas: 1
  strategy:
    type: Recreate
  selector:
    matchLabels:
      app: edgeplane-agent
  template:
    metadata:
      labels:
        app: edgeplane-agent
    spec:
      serviceAccountName: edgeplane-agent
      containers:
        - name: agent
          image: {image}
          env:
{env}          volumeMounts:
            - name: data
              mountPath: /data
      volumes:
        - name: data
          emptyDir: {{}}
"#,
        name = p.name,
        image = quoted(p.image),
        edge_id = quoted(&p.shared_edge_id().to_string()),
    )
}

fn nomad(p: &Parts<'_>) -> String {
    let mut env = String::new();
    for (k, v) in p.vars(Some(p.shared_edge_id())) {
        let value = match v {
            Value::Literal(v) => quoted(&v),
            Value::Host => format!("\"${{env.{k}}}\""),
        };
        env.push_str(&format!("        {k} = {value}\n"));
    }
    format!(
        r#"job "{name}" {{
  type = "system"
  group "agent" {{
    task "agent" {{
      driver = "docker"
      config {{
        image = {image}
        volumes = ["/var/run/docker.sock:/var/run/docker.sock", "{volume}:/data"]
      }}
      env {{
{env}      }}
    }}
  }}
}}
"#,
        name = p.name,
        image = quoted(p.image),
        volume = p.volume,
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
