#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The admin REST API against an in-process control plane on the embedded store.

use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{http, ControlPlane, ADMIN_KEY};

async fn post(cp: &ControlPlane, path: &str, body: Value) -> (StatusCode, Value) {
    testkit::api::admin_json(&http(), reqwest::Method::POST, &cp.api(path), &body).await
}

async fn get(cp: &ControlPlane, path: &str) -> (StatusCode, Value, Option<String>) {
    let r = http()
        .get(cp.api(path))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let total = r
        .headers()
        .get("x-total-count")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, r.json().await.unwrap_or(Value::Null), total)
}

fn message(v: &Value) -> &str {
    v["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {v}"))
}

/// A route's path with its placeholders filled in.
fn concrete(path: &str) -> String {
    path.replace("{id}", "1")
        .replace("{n}", "1")
        .replace("{execId}", "abc")
        .replace("{path}", "_ping")
}

#[actix_web::test]
async fn every_admin_route_requires_the_key() {
    let cp = ControlPlane::start().await;
    let client = http();
    assert!(control_plane::api::ROUTES.len() >= 19);
    for route in control_plane::api::ROUTES {
        let url = cp.api(&concrete(route.path));
        let method = reqwest::Method::from_bytes(route.method.as_bytes()).unwrap();
        for key in [None, Some("wrong"), Some("")] {
            let mut req = client.request(method.clone(), &url);
            if let Some(k) = key {
                req = req.header("X-API-Key", k);
            }
            let r = req.send().await.unwrap();
            assert_eq!(
                r.status(),
                StatusCode::UNAUTHORIZED,
                "{} {} with key {key:?}",
                route.method,
                route.path
            );
            if method == reqwest::Method::HEAD {
                continue;
            }
            let body: Value = r.json().await.unwrap();
            assert!(message(&body).contains("API key") || message(&body).contains("X-API-Key"));
        }
    }
    // Unknown admin paths are refused before they are routed, too.
    let r = client.get(cp.api("/api/nope")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    cp.stop().await;
}

/// The route tables, the router and the OpenAPI document agree: every route of the tables is
/// served (with the key, never 405 nor "no route"), and the document lists exactly the tables.
#[actix_web::test]
async fn the_route_tables_the_router_and_the_document_agree() {
    let cp = ControlPlane::start().await;
    let client = http();
    let routes: Vec<&control_plane::api::Route> = control_plane::api::ROUTES
        .iter()
        .chain(control_plane::api::SESSION_ROUTES)
        .collect();
    for route in &routes {
        let method = reqwest::Method::from_bytes(route.method.as_bytes()).unwrap();
        let r = client
            .request(method.clone(), cp.api(&concrete(route.path)))
            .header("X-API-Key", ADMIN_KEY)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{} {} is not served: {body}",
            route.method,
            route.path
        );
        assert!(
            !body["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("no route"),
            "{} {} is not served: {body}",
            route.method,
            route.path
        );
    }
    let (status, doc, _) = get(&cp, "/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let n: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    assert_eq!(n, routes.len());
    for route in &routes {
        let op = &doc["paths"][route.path][route.method.to_lowercase()];
        assert_eq!(
            op["operationId"], route.operation,
            "{} {}",
            route.method, route.path
        );
        let security = op["security"].as_array().unwrap();
        assert_eq!(
            security.is_empty(),
            control_plane::api::SESSION_ROUTES
                .iter()
                .any(|s| std::ptr::eq(s, *route)),
            "{} {}: only the sign-in routes need no credentials",
            route.method,
            route.path
        );
    }
    cp.stop().await;
}

#[actix_web::test]
async fn create_get_patch_delete() {
    let cp = ControlPlane::start().await;
    let (status, env) = post(
        &cp,
        "/api/endpoints",
        json!({"name": "kiosk-1", "checkinInterval": 7}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    let id = env["id"].as_u64().unwrap();
    assert_eq!(env["name"], "kiosk-1");
    assert_eq!(env["mode"], "standard");
    assert_eq!(env["status"], "never");
    assert_eq!(env["edgeId"], Value::Null);
    assert_eq!(env["lastCheckIn"], Value::Null);
    assert_eq!(env["checkinInterval"], 7);
    assert_eq!(env["tunnel"]["state"], "closed");
    let token = proto::JoinToken::parse(env["edgeKey"].as_str().unwrap()).unwrap();
    assert_eq!(token.endpoint_id, id);
    assert_eq!(token.api_url, cp.url);

    let (status, got, _) = get(&cp, &format!("/api/endpoints/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["edgeKey"], env["edgeKey"]);

    let r = http()
        .patch(cp.api(&format!("/api/endpoints/{id}")))
        .header("X-API-Key", ADMIN_KEY)
        .json(&json!({"name": "kiosk-one", "checkinInterval": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let patched: Value = r.json().await.unwrap();
    assert_eq!(patched["name"], "kiosk-one");
    assert_eq!(
        patched["checkinInterval"], 5,
        "null falls back to the default"
    );

    // A pre-assigned Edge ID is bound from the start.
    let edge = uuid::Uuid::new_v4();
    let (status, pre) = post(
        &cp,
        "/api/endpoints",
        json!({"name": "pre", "edgeId": edge}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(pre["edgeId"], edge.to_string());

    let r = http()
        .delete(cp.api(&format!("/api/endpoints/{id}")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (status, body, _) = get(&cp, &format!("/api/endpoints/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(message(&body).contains("does not exist"));
    cp.stop().await;
}

#[actix_web::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let cp = ControlPlane::start().await;
    let client = http();
    let cases: Vec<(&str, &str, Option<&str>, StatusCode, &str)> = vec![
        (
            "POST",
            "/api/endpoints",
            Some("{not json"),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "bogus": 1}"#),
            StatusCode::BAD_REQUEST,
            "bogus",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "  "}"#),
            StatusCode::BAD_REQUEST,
            "name",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "checkinInterval": 0}"#),
            StatusCode::BAD_REQUEST,
            "checkinInterval",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "groupId": 99}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "groupId 99",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "tagIds": [5]}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "tagId 5",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "edgeId": "not-a-uuid"}"#),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "mode": "turbo"}"#),
            StatusCode::BAD_REQUEST,
            "invalid JSON",
        ),
        (
            "POST",
            "/api/endpoints",
            Some(r#"{"name": "x", "envVars": ["A B"]}"#),
            StatusCode::BAD_REQUEST,
            "envVars",
        ),
        (
            "POST",
            "/api/endpoints/bulk",
            Some("[]"),
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            "GET",
            "/api/endpoints/999",
            None,
            StatusCode::NOT_FOUND,
            "999",
        ),
        (
            "GET",
            "/api/endpoints/abc",
            None,
            StatusCode::NOT_FOUND,
            "path",
        ),
        (
            "PATCH",
            "/api/endpoints/999",
            Some(r#"{"name": "y"}"#),
            StatusCode::NOT_FOUND,
            "999",
        ),
        (
            "DELETE",
            "/api/endpoints/999",
            None,
            StatusCode::NOT_FOUND,
            "999",
        ),
        (
            "POST",
            "/api/endpoints/999/association",
            None,
            StatusCode::NOT_FOUND,
            "999",
        ),
        (
            "GET",
            "/api/endpoints?limit=0",
            None,
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "GET",
            "/api/endpoints?limit=abc",
            None,
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "GET",
            "/api/endpoints?start=-1",
            None,
            StatusCode::BAD_REQUEST,
            "start",
        ),
        (
            "GET",
            "/api/endpoints?status=sideways",
            None,
            StatusCode::BAD_REQUEST,
            "status",
        ),
        (
            "GET",
            "/api/endpoints?mode=x",
            None,
            StatusCode::BAD_REQUEST,
            "mode",
        ),
        (
            "GET",
            "/api/endpoints?tagIds=1,x",
            None,
            StatusCode::BAD_REQUEST,
            "tagIds",
        ),
        (
            "PUT",
            "/api/endpoints/1",
            Some("{}"),
            StatusCode::METHOD_NOT_ALLOWED,
            "not allowed",
        ),
        (
            "GET",
            "/api/endpoints/1/install?platform=docker",
            None,
            StatusCode::NOT_FOUND,
            "environment 1",
        ),
        (
            "PATCH",
            "/api/settings",
            Some(r#"{"checkinInterval": 0}"#),
            StatusCode::BAD_REQUEST,
            "checkinInterval",
        ),
        (
            "POST",
            "/api/groups",
            Some(r#"{"name": ""}"#),
            StatusCode::BAD_REQUEST,
            "name",
        ),
    ];
    for (method, path, body, want, needle) in cases {
        let mut req = client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                cp.api(path),
            )
            .header("X-API-Key", ADMIN_KEY);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), want, "{method} {path} {body:?}");
        let v: Value = r.json().await.unwrap();
        assert!(
            message(&v).contains(needle),
            "{method} {path}: message {:?} lacks {needle:?}",
            message(&v)
        );
    }
    // curl -d sends a form content type; the body is read as JSON anyway (README, banner).
    let r = client
        .post(cp.api("/api/groups"))
        .header("X-API-Key", ADMIN_KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"name": "from-curl"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // A JSON body over the admin limit: 413 with a message.
    let huge = format!(r#"{{"name": "{}"}}"#, "x".repeat(5 * 1024 * 1024));
    let r = client
        .post(cp.api("/api/endpoints"))
        .header("X-API-Key", ADMIN_KEY)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = r.json().await.unwrap();
    assert!(message(&v).contains("larger than"), "{v}");
    // Oversized bulk.
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"name": format!("e{i}")}))
        .collect();
    let (status, body) = post(&cp, "/api/endpoints/bulk", Value::Array(many)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    // Unknown list parameters (Portainer clients send sort/order) are ignored.
    let (status, _, _) = get(&cp, "/api/endpoints?sort=Name&order=1").await;
    assert_eq!(status, StatusCode::OK);
    // Nothing was created by any of it.
    let (_, list, total) = get(&cp, "/api/endpoints").await;
    assert_eq!(total.as_deref(), Some("0"), "{list}");
    cp.stop().await;
}

#[actix_web::test]
async fn paging_filters_and_total_count() {
    let cp = ControlPlane::start().await;
    let (_, group) = post(&cp, "/api/groups", json!({"name": "stores"})).await;
    let (_, tag) = post(&cp, "/api/tags", json!({"name": "eu"})).await;
    let (gid, tid) = (group["id"].as_u64().unwrap(), tag["id"].as_u64().unwrap());
    let items: Vec<Value> = (0..25)
        .map(|i| {
            if i % 5 == 0 {
                json!({"name": format!("pos-{i:02}"), "groupId": gid, "tagIds": [tid]})
            } else if i % 2 == 0 {
                json!({"name": format!("sign-{i:02}"), "mode": "async"})
            } else {
                json!({"name": format!("kiosk-{i:02}")})
            }
        })
        .collect();
    let (status, created) = post(&cp, "/api/endpoints/bulk", Value::Array(items)).await;
    assert_eq!(status, StatusCode::CREATED);
    let created = created.as_array().unwrap();
    assert_eq!(created.len(), 25);
    let ids: Vec<u64> = created.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase in order");

    let (_, page, total) = get(&cp, "/api/endpoints?start=20&limit=10").await;
    assert_eq!(total.as_deref(), Some("25"));
    assert_eq!(page.as_array().unwrap().len(), 5);
    assert_eq!(page[0]["id"].as_u64(), Some(ids[20]));
    let (_, page, total) = get(&cp, "/api/endpoints?limit=3").await;
    assert_eq!(total.as_deref(), Some("25"));
    assert_eq!(page.as_array().unwrap().len(), 3);

    let (_, _, total) = get(&cp, "/api/endpoints?search=POS").await;
    assert_eq!(total.as_deref(), Some("5"));
    let (_, _, total) = get(&cp, &format!("/api/endpoints?groupId={gid}")).await;
    assert_eq!(total.as_deref(), Some("5"));
    let (_, _, total) = get(&cp, &format!("/api/endpoints?tagIds={tid}")).await;
    assert_eq!(total.as_deref(), Some("5"));
    let (_, page, total) = get(&cp, "/api/endpoints?mode=async&limit=100").await;
    assert_eq!(total.as_deref(), Some("10"));
    assert!(page
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["mode"] == "async"));
    let (_, _, total) = get(&cp, "/api/endpoints?status=never").await;
    assert_eq!(total.as_deref(), Some("25"));
    let (_, _, total) = get(&cp, "/api/endpoints?status=up,down").await;
    assert_eq!(total.as_deref(), Some("0"));

    // A group in use cannot be deleted; a free one can.
    let r = http()
        .delete(cp.api(&format!("/api/groups/{gid}")))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let (_, spare) = post(&cp, "/api/tags", json!({"name": "spare"})).await;
    let r = http()
        .delete(cp.api(&format!("/api/tags/{}", spare["id"])))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (status, _) = post(&cp, "/api/tags", json!({"name": "eu"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "duplicate tag name");
    cp.stop().await;
}

/// The install command or manifest of `platform` for environment `id`.
async fn install(cp: &ControlPlane, id: u64, platform: &str) -> String {
    let (status, v, _) = get(
        cp,
        &format!("/api/endpoints/{id}/install?platform={platform}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{platform}: {v}");
    v["command"].as_str().unwrap().to_owned()
}

/// The Edge IDs a docker or swarm command sets (`-e EDGE_ID='...'`).
fn shell_edge_ids(cmd: &str) -> Vec<uuid::Uuid> {
    cmd.lines()
        .filter_map(|l| l.trim().strip_prefix("-e EDGE_ID='"))
        .map(|rest| rest.split('\'').next().unwrap().parse().unwrap())
        .collect()
}

/// A shell command must at least parse.
fn assert_shell_syntax(cmd: &str) {
    let out = std::process::Command::new("sh")
        .args(["-n", "-c", cmd])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Kubernetes manifest's documents, parsed.
fn yaml_documents(manifest: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(manifest)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .collect()
}

fn kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> &'a serde_yaml::Value {
    let mut of_kind = docs.iter().filter(|d| d["kind"].as_str() == Some(kind));
    let doc = of_kind.next().unwrap_or_else(|| panic!("no {kind}"));
    assert!(of_kind.next().is_none(), "more than one {kind}");
    doc
}

/// The Edge ID the manifest's Secret holds, after checking that the Deployment's agent reads
/// `EDGE_ID` from that Secret (and from nowhere else).
fn kubernetes_edge_id(manifest: &str) -> uuid::Uuid {
    let docs = yaml_documents(manifest);
    let kinds: Vec<_> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRoleBinding",
            "Secret",
            "Deployment"
        ]
    );
    for doc in &docs {
        assert!(doc["apiVersion"].is_string(), "{doc:?}");
        assert!(doc["metadata"]["name"].is_string(), "{doc:?}");
    }
    let secret = kind(&docs, "Secret");
    assert_eq!(secret["metadata"]["namespace"], "edgeplane");
    assert_eq!(secret["immutable"], true, "the Edge ID must never change");
    let secret_name = secret["metadata"]["name"].as_str().unwrap();
    let deployment = kind(&docs, "Deployment");
    assert_eq!(deployment["metadata"]["namespace"], "edgeplane");
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let template = &deployment["spec"]["template"];
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"],
        template["metadata"]["labels"]
    );
    let pod = &template["spec"];
    assert_eq!(pod["volumes"][0]["name"], "data");
    assert_eq!(
        pod["containers"][0]["volumeMounts"][0]["mountPath"],
        "/data"
    );
    let env = pod["containers"][0]["env"].as_sequence().expect(manifest);
    let edge_ids: Vec<_> = env.iter().filter(|e| e["name"] == "EDGE_ID").collect();
    assert_eq!(edge_ids.len(), 1, "{env:?}");
    let from = &edge_ids[0]["valueFrom"]["secretKeyRef"];
    assert_eq!(from["name"].as_str(), Some(secret_name));
    let key = from["key"].as_str().unwrap();
    secret["stringData"][key].as_str().unwrap().parse().unwrap()
}

#[actix_web::test]
async fn install_commands_keep_state_and_the_edge_id_per_environment() {
    let cp = ControlPlane::start().await;
    let (_, a) = post(&cp, "/api/endpoints", json!({"name": "a"})).await;
    let (_, b) = post(
        &cp,
        "/api/endpoints",
        json!({"name": "b", "envVars": ["SITE"]}),
    )
    .await;
    let pre = uuid::Uuid::new_v4();
    let (_, c) = post(&cp, "/api/endpoints", json!({"name": "c", "edgeId": pre})).await;
    let [a, b, c] = [a, b, c].map(|e| e["id"].as_u64().unwrap());

    // One data volume per environment: a second environment on the host, or the host
    // enrolled again, never inherits another agent's state.
    for id in [a, b, c] {
        let volume = format!("edgeplane_agent_{id}");
        let docker = install(&cp, id, "docker").await;
        assert!(
            docker.contains(&format!("  -v {volume}:/data \\\n")),
            "{docker}"
        );
        let swarm = install(&cp, id, "swarm").await;
        assert!(
            swarm.contains(&format!(
                "  --mount type=volume,src={volume},dst=/data \\\n"
            )),
            "{swarm}"
        );
        let nomad = install(&cp, id, "nomad").await;
        assert!(nomad.contains(&format!("\"{volume}:/data\"")), "{nomad}");
        for cmd in [&docker, &swarm, &nomad] {
            assert!(!cmd.contains("edgeplane_agent_data"), "{cmd}");
        }
        assert_shell_syntax(&docker);
        assert_shell_syntax(&swarm);
    }

    // Docker: the environment's Edge ID when it has one (pre-assigned or bound), else the
    // agent generates its own and keeps it in its volume.
    assert!(shell_edge_ids(&install(&cp, a, "docker").await).is_empty());
    assert_eq!(shell_edge_ids(&install(&cp, c, "docker").await), vec![pre]);

    // Swarm and Nomad run an agent on every node: all of them share one Edge ID, set in the
    // command, the environment's own or one generated now.
    assert_eq!(shell_edge_ids(&install(&cp, c, "swarm").await), vec![pre]);
    let swarm_a = shell_edge_ids(&install(&cp, a, "swarm").await);
    assert_eq!(swarm_a.len(), 1);
    assert_eq!(swarm_a[0].get_version_num(), 4);
    assert!(install(&cp, c, "nomad")
        .await
        .contains(&format!("        EDGE_ID = \"{pre}\"\n")));
    let nomad_a = install(&cp, a, "nomad").await;
    let line = nomad_a
        .lines()
        .find_map(|l| l.trim().strip_prefix("EDGE_ID = "))
        .unwrap();
    assert!(
        line.trim_matches('"').parse::<uuid::Uuid>().is_ok(),
        "{line}"
    );

    // Kubernetes: the Edge ID lives in an immutable Secret the Deployment reads, so a pod
    // rescheduled onto any node comes back with it.
    assert_eq!(
        kubernetes_edge_id(&install(&cp, c, "kubernetes").await),
        pre
    );
    let generated = kubernetes_edge_id(&install(&cp, a, "kubernetes").await);
    assert_eq!(generated.get_version_num(), 4);
    let manifest_b = install(&cp, b, "kubernetes").await;
    kubernetes_edge_id(&manifest_b);
    let docs = yaml_documents(&manifest_b);
    assert_eq!(
        kind(&docs, "Secret")["metadata"]["name"],
        format!("edgeplane-agent-{b}-edge-id").as_str()
    );
    let env = &kind(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"];
    let names: Vec<_> = env
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["EDGE_KEY", "EDGE_ID", "SITE"]);
    cp.stop().await;
}

#[actix_web::test]
async fn install_commands_carry_the_key_and_options() {
    let cp = ControlPlane::start_with(|c| c.agent_secret = Some("s3cret".into())).await;
    let (_, env) = post(
        &cp,
        "/api/endpoints",
        json!({"name": "k", "allowSelfSigned": true, "envVars": ["SITE_ID"]}),
    )
    .await;
    let id = env["id"].as_u64().unwrap();
    let key = env["edgeKey"].as_str().unwrap();
    for platform in ["docker", "swarm", "kubernetes", "nomad"] {
        let (status, v, _) = get(
            &cp,
            &format!("/api/endpoints/{id}/install?platform={platform}"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let cmd = v["command"].as_str().unwrap();
        assert!(cmd.contains(key), "{platform}: key missing");
        assert!(cmd.contains("EDGE_INSECURE_POLL"), "{platform}");
        assert!(
            cmd.contains("AGENT_SECRET") && cmd.contains("s3cret"),
            "{platform}"
        );
        assert!(cmd.contains("SITE_ID"), "{platform}");
    }
    let r = http()
        .get(cp.api(&format!("/api/endpoints/{id}/install")))
        .header("X-API-Key", ADMIN_KEY)
        .header("Accept", "text/plain")
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.starts_with("docker run -d"), "{text}");
    assert!(text.contains(&format!("-e EDGE_KEY='{key}'")));
    let (status, v, _) = get(
        &cp,
        &format!("/api/endpoints/{id}/install?platform=windows"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&v).contains("windows"));

    // Settings round trip.
    let r = http()
        .patch(cp.api("/api/settings"))
        .header("X-API-Key", ADMIN_KEY)
        .json(&json!({"checkinInterval": 9}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (_, s, _) = get(&cp, "/api/settings").await;
    assert_eq!(s["checkinInterval"], 9);
    assert_eq!(s["pingInterval"], 60);
    let (_, e, _) = get(&cp, &format!("/api/endpoints/{id}")).await;
    assert_eq!(e["checkinInterval"], 9);
    cp.stop().await;
}
