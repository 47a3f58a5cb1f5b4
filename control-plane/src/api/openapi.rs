//! `GET /api/openapi.json`: an OpenAPI 3.1 document rendered from the route tables
//! ([`super::ROUTES`], [`super::SESSION_ROUTES`]) and the schemas below, so routes and
//! document cannot drift. The schemas say what the handlers accept, exactly: a request that
//! fits them is served (or refused for what it names: 404, 409, 422), one that does not is
//! refused with 400 (or 413 past a size); `openapi_conformance` holds the server to it both
//! ways with a property-based tester.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use actix_web::{web, HttpResponse};
use serde_json::{json, Map, Value};

use super::routes::{Answer, Body, Param, Route, Schema, DEPLOY_STATUSES, ROUTES, SESSION_ROUTES};
use super::{commands, compose, edge_groups, edge_stacks, endpoints, AppState};
use crate::config::Limits;

const INFO: &str = "\
The admin REST API of edgeplane's control plane (JSON over HTTPS).

Authentication: the admin key in `X-API-Key`, or the web console's session cookie (from \
`POST /api/auth/session`) with, on requests other than GET, HEAD and OPTIONS, the session's \
CSRF token in `X-CSRF-Token`.

Every error answers `{\"message\": \"...\"}` (and `code` where one is defined) with its status:
- 400: the request does not fit this document (a parameter or body field of the wrong type, \
out of range, missing or unknown, or a body that is not JSON);
- 401: no valid admin key or session; 403: a session without its CSRF token;
- 404: what the path names does not exist (a path id that is not a number names nothing);
- 405: a method the path does not serve, with `Allow` listing those it does;
- 409: the request conflicts with the current state of what it changes;
- 413: a JSON body over 4 MiB, or more items than one call takes;
- 422: the request fits this document, but names something that does not exist (a group, a tag, \
an edge group, an environment) or carries a compose file that does not check out;
- 503: the store is unavailable (or a change could not be passed to the other replicas), or a \
tunnel is busy; `Retry-After` says when to come back;
- 500: stored data that cannot be read.

Integers may be written as any JSON number without a fractional part (`5` or `5.0`). Names are \
trimmed of surrounding white space; lengths count characters.";

pub fn build(limits: &Limits) -> Value {
    let mut paths = Map::new();
    for (route, admin) in ROUTES
        .iter()
        .map(|r| (r, true))
        .chain(SESSION_ROUTES.iter().map(|r| (r, false)))
    {
        let entry = paths
            .entry(route.path.to_owned())
            .or_insert_with(|| json!({}));
        entry[route.method.to_lowercase()] = operation(route, admin, limits);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "edgeplane control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": INFO,
        },
        "security": [{"apiKey": []}],
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                    "description": "The admin key (`<data-dir>/admin-api-key`, or EDGEPLANE_ADMIN_API_KEY)"},
                "session": {"type": "apiKey", "in": "cookie", "name": crate::session::COOKIE,
                    "description": "The web console's session, set by POST /api/auth/session (HttpOnly, Secure, SameSite=Strict)"},
                "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token",
                    "description": "The session's CSRF token (the csrfToken of POST or GET /api/auth/session); with the session cookie, every request but GET, HEAD and OPTIONS carries it"}
            },
            "headers": {
                "X-Total-Count": {"required": true, "description": "How many items the list holds in all (matching its filters)",
                    "schema": {"type": "integer", "minimum": 0}},
                "Retry-After": {"required": true, "description": "Seconds to wait before asking again",
                    "schema": {"type": "integer", "minimum": 0}}
            },
            "responses": {
                "MethodNotAllowed": {
                    "description": "A method the path does not serve (any path of this document)",
                    "headers": {"Allow": {"required": true, "description": "The methods the path serves",
                        "schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
                }
            },
            "schemas": schemas(limits)
        },
        "paths": paths
    })
}

fn operation(route: &Route, admin: bool, limits: &Limits) -> Value {
    let mut op = json!({
        "operationId": route.operation,
        "summary": route.summary,
        "tags": [tag(route.path)],
    });
    let mut parameters: Vec<Value> = path_parameters(route.path);
    parameters.extend(route.query.iter().map(|p| parameter("query", p, limits)));
    parameters.extend(route.headers.iter().map(|p| parameter("header", p, limits)));
    if !parameters.is_empty() {
        op["parameters"] = Value::Array(parameters);
    }
    match route.body {
        Body::None => {}
        Body::Json { schema, required } => {
            op["requestBody"] = json!({
                "required": required,
                "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
            });
        }
        Body::Raw => {
            op["requestBody"] = json!({
                "required": false,
                "description": "Whatever the engine's API takes, passed through as it is",
                "content": {"*/*": {"schema": {}}}
            });
        }
    }
    let mut responses = answer(route);
    for (status, why) in refusals(route, admin) {
        responses.insert(status.to_string(), error_response(status, &why));
    }
    op["responses"] = Value::Object(responses);
    op["security"] = if admin {
        if matches!(route.method, "GET" | "HEAD" | "OPTIONS") {
            json!([{"apiKey": []}, {"session": []}])
        } else {
            json!([{"apiKey": []}, {"session": [], "csrf": []}])
        }
    } else {
        json!([])
    };
    let links = links(route);
    if !links.is_empty() {
        if let Some(created) = op["responses"]["201"].as_object_mut() {
            created.insert("links".into(), Value::Object(links));
        }
    }
    op
}

/// Operations grouped by the collection they belong to.
fn tag(path: &str) -> &'static str {
    let rest = path.trim_start_matches("/api/");
    match rest.split('/').next().unwrap_or_default() {
        "endpoints" if path.contains("/docker/") || path.contains("/exec/") => "docker",
        "endpoints" => "environments",
        "groups" | "tags" => "groups and tags",
        "edge_groups" => "edge groups",
        "edge_stacks" => "edge stacks",
        "auth" => "session",
        _ => "settings",
    }
}

/// The `{name}`s of a path template.
pub fn placeholders(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}

fn id_schema() -> Value {
    json!({"type": "integer", "minimum": 0, "maximum": u64::MAX})
}

fn path_parameters(path: &str) -> Vec<Value> {
    placeholders(path)
        .map(|name| {
            let (schema, description) = path_parameter(name);
            json!({"name": name, "in": "path", "required": true, "description": description, "schema": schema})
        })
        .collect()
}

/// The schema and description of a path parameter, by name.
pub fn path_parameter(name: &str) -> (Value, &'static str) {
    match name {
        "id" => (id_schema(), "the id of what the path names"),
        "n" => (
            json!({"type": "integer", "minimum": 1, "maximum": u32::MAX}),
            "the version",
        ),
        "execId" => (
            json!({"type": "string", "pattern": "^[A-Za-z0-9]{1,128}$"}),
            "the exec's id (as the engine answered its creation)",
        ),
        "path" => (
            json!({"type": "string"}),
            "the Docker Engine API path after `/docker/`, such as `containers/json` or \
             `v1.43/containers/web/logs`. It may hold slashes, sent as they are (an OpenAPI path \
             parameter cannot: clients that percent-encode them reach the same route, and the \
             engine gets the path as sent). The query string goes to the engine unchanged",
        ),
        _ => (json!({"type": "string"}), ""),
    }
}

fn parameter(place: &str, p: &Param, limits: &Limits) -> Value {
    let mut v = json!({
        "name": p.name,
        "in": place,
        "required": p.required,
        "description": p.description,
        "schema": query_schema(p.schema, limits),
    });
    if matches!(p.schema, Schema::EnumList(_) | Schema::U64List) {
        v["style"] = json!("form");
        v["explode"] = json!(false);
    }
    v
}

fn query_schema(s: Schema, limits: &Limits) -> Value {
    match s {
        Schema::U64 => id_schema(),
        Schema::Int { min, max } => json!({"type": "integer", "minimum": min, "maximum": max}),
        Schema::Limit => {
            json!({"type": "integer", "minimum": 1, "maximum": limits.max_page, "default": 100})
        }
        Schema::Text => json!({"type": "string"}),
        Schema::Pattern(pattern) => json!({"type": "string", "pattern": pattern}),
        Schema::Enum { values, default } => {
            let mut v = json!({"type": "string", "enum": values});
            if let Some(d) = default {
                v["default"] = json!(d);
            }
            v
        }
        Schema::EnumList(values) => {
            json!({"type": "array", "minItems": 1, "items": {"type": "string", "enum": values}})
        }
        Schema::U64List => json!({"type": "array", "items": id_schema()}),
    }
}

fn reference(schema: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{schema}")})
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

/// The route's answers when it succeeds.
fn answer(route: &Route) -> Map<String, Value> {
    let mut out = Map::new();
    let mut put = |status: &str, v: Value| {
        out.insert(status.to_owned(), v);
    };
    match route.answer {
        Answer::One(status, schema) => put(
            &status.to_string(),
            json!({"description": "the answer", "content": json_content(reference(schema))}),
        ),
        Answer::Many(status, schema) => put(
            &status.to_string(),
            json!({"description": "the answer", "content": json_content(json!({"type": "array", "items": reference(schema)}))}),
        ),
        Answer::Page(schema) => put(
            "200",
            json!({
                "description": "a page, in order",
                "headers": {"X-Total-Count": {"$ref": "#/components/headers/X-Total-Count"}},
                "content": json_content(json!({"type": "array", "items": reference(schema)}))
            }),
        ),
        Answer::NoContent => put("204", json!({"description": "done"})),
        Answer::Install => put(
            "200",
            json!({
                "description": "the install command or manifest: JSON, or the text alone when Accept names text/plain",
                "content": {
                    "application/json": {"schema": reference("InstallAnswer")},
                    "text/plain": {"schema": {"type": "string"}}
                }
            }),
        ),
        Answer::ComposeFile => put(
            "200",
            json!({"description": "the compose file (YAML)", "content": {"application/yaml": {"schema": {"type": "object", "required": ["services"]}}}}),
        ),
        Answer::Docker => put(
            "default",
            json!({
                "description": "the engine's answer, passed through: any status, headers and body (streams stream)",
                "content": {"*/*": {"schema": {}}}
            }),
        ),
        Answer::WebSocket => put(
            "101",
            json!({
                "description": "the WebSocket: the terminal's output as binary frames; input as binary or text frames",
                "headers": {
                    "Upgrade": {"required": true, "schema": {"type": "string", "const": "websocket"}},
                    "Sec-WebSocket-Accept": {"required": true, "schema": {"type": "string"}}
                }
            }),
        ),
        Answer::Document => put(
            "200",
            json!({
                "description": "this document",
                "content": json_content(json!({"type": "object", "required": ["openapi", "info", "paths"]}))
            }),
        ),
        Answer::SignedIn => put(
            "200",
            json!({
                "description": "signed in: the session's CSRF token and expiry",
                "headers": {"Set-Cookie": {"required": true, "description": "the session cookie",
                    "schema": {"type": "string"}}},
                "content": json_content(reference("Session"))
            }),
        ),
        Answer::SignedOut => put(
            "204",
            json!({
                "description": "signed out",
                "headers": {"Set-Cookie": {"required": true, "description": "the session cookie, cleared",
                    "schema": {"type": "string"}}}
            }),
        ),
    }
    out
}

/// Every refusal a route can answer, with when: those of its kind, then its own (which say
/// more where both name a status).
fn refusals(route: &Route, admin: bool) -> BTreeMap<u16, String> {
    let mut out = BTreeMap::new();
    let mut add = |status: u16, why: &str| {
        out.insert(status, why.to_owned());
    };
    let has_body = matches!(route.body, Body::Json { .. });
    if has_body || !route.query.is_empty() || !route.headers.is_empty() {
        add(
            400,
            "the request does not fit this document: a parameter or body field of the wrong type, \
             out of range, missing or unknown, or a body that is not JSON",
        );
    }
    if admin {
        add(401, "no valid X-API-Key, and no valid session cookie");
        if !matches!(route.method, "GET" | "HEAD" | "OPTIONS") {
            add(
                403,
                "signed in with the session cookie, without the session's X-CSRF-Token",
            );
        }
    }
    if route.path.contains('{') {
        add(
            404,
            "what the path names does not exist (a path id that is not a number names nothing)",
        );
    }
    if has_body {
        add(413, "a JSON body over 4 MiB");
    }
    let stored = admin && !matches!(route.answer, Answer::Document);
    if stored {
        add(
            503,
            "the store is unavailable, or the change is saved but other replicas could not be told",
        );
        if !matches!(route.answer, Answer::Docker | Answer::WebSocket) {
            add(500, "stored data that cannot be read");
        }
    }
    for (status, why) in route.refusals {
        add(*status, why);
    }
    out
}

fn error_response(status: u16, why: &str) -> Value {
    let mut v = json!({
        "description": why,
        "content": json_content(reference("Error")),
    });
    if status == 503 {
        v["headers"] = json!({"Retry-After": {"$ref": "#/components/headers/Retry-After"}});
    }
    v
}

/// Where a created object goes next: the operations on its path, its id from the answer
/// (and an edge stack's version for `{n}`). Not the Docker proxy and the exec terminal: a new
/// environment has no agent, and a call through its tunnel waits for one (a tester following
/// links would wait out the tunnel's deadline on each).
fn links(route: &Route) -> Map<String, Value> {
    let mut out = Map::new();
    let Answer::One(201, _) = route.answer else {
        return out;
    };
    let prefix = format!("{}/{{id}}", route.path);
    for target in ROUTES {
        let under = target.path == prefix || target.path.starts_with(&format!("{prefix}/"));
        if !under || matches!(target.answer, Answer::Docker | Answer::WebSocket) {
            continue;
        }
        let mut parameters = Map::new();
        let mut complete = true;
        for name in placeholders(target.path) {
            match (name, route.answer) {
                ("id", _) => {
                    parameters.insert("id".into(), json!("$response.body#/id"));
                }
                ("n", Answer::One(_, "EdgeStack")) => {
                    parameters.insert("n".into(), json!("$response.body#/version"));
                }
                _ => complete = false,
            }
        }
        if complete {
            out.insert(
                target.operation.to_owned(),
                json!({"operationId": target.operation, "parameters": parameters}),
            );
        }
    }
    out
}

/// A character class of what Rust's `char::is_whitespace` (and so `str::trim`) calls white
/// space, negated: a name must hold one character outside it.
fn not_blank() -> &'static str {
    static PATTERN: OnceLock<String> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let blank: String = ('\0'..=char::MAX).filter(|c| c.is_whitespace()).collect();
        format!("[^{blank}]")
    })
}

fn schemas(limits: &Limits) -> Value {
    let id = id_schema();
    let ids = json!({"type": "array", "items": id});
    let count = json!({"type": "integer", "minimum": 0});
    let time = json!({"type": "string", "format": "date-time"});
    let time_or_null = json!({"type": ["string", "null"], "format": "date-time"});
    let name = json!({"type": "string", "maxLength": endpoints::MAX_NAME, "pattern": not_blank(),
        "description": "not blank; stored trimmed"});
    let name_or_null = json!({"type": ["string", "null"], "maxLength": endpoints::MAX_NAME,
        "pattern": not_blank(), "description": "not blank; stored trimmed (null: unchanged)"});
    let checkin = json!({"type": ["integer", "null"], "minimum": 1,
        "maximum": endpoints::MAX_CHECKIN_INTERVAL, "description": "seconds (null: the default)"});
    let async_interval = json!({"type": ["integer", "null"], "minimum": 0,
        "maximum": endpoints::MAX_ASYNC_INTERVAL, "description": "seconds, 0 turns it off (null: the default)"});
    let env_vars = json!({"type": "array", "maxItems": endpoints::MAX_ENV_VARS,
        "description": "names of host variables passed to the agent",
        "items": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$", "maxLength": endpoints::MAX_ENV_VAR}});
    let mode = json!({"type": "string", "enum": ["standard", "async"]});
    let status_counts = json!({"type": "object", "required": ["up", "down", "never"],
        "properties": {"up": count, "down": count, "never": count}});
    let u32_or_null =
        |min: u32| json!({"type": ["integer", "null"], "minimum": min, "maximum": u32::MAX});
    let stack_name = json!({"type": "string",
        "pattern": format!("^[a-z0-9][a-z0-9_-]{{0,{}}}$", edge_stacks::MAX_NAME - 1),
        "description": "the compose project on every device is edge_<name>"});
    let compose_file = json!({"type": "string", "maxLength": compose::MAX_COMPOSE_BYTES,
        "description": "the compose file (at most 65536 bytes of UTF-8): services with images, \
            depends_on naming services without a cycle, declared networks and named volumes; \
            ${VARIABLE}s substituted per environment. One that does not check out is a 422"});
    let edge_group_ids =
        json!({"type": "array", "minItems": 1, "maxItems": edge_stacks::MAX_GROUPS, "items": id});
    // Container, image and volume names as `Action::validate` takes them.
    let object_name = json!({"type": "string", "pattern": "^[A-Za-z0-9._:/@-]{1,256}$",
        "not": {"anyOf": [{"pattern": "^/"}, {"pattern": "(^|/)[.][.]?(/|$)"}]},
        "description": "a container, image or volume name or id: no leading slash, no . or .. segment"});
    let project = json!({"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,63}$"});
    let none = json!({"type": "null"});
    let command = |types: &[&str], target: &Value, extra: Value| {
        let mut props = json!({
            "type": {"type": "string", "enum": types},
            "target": target,
            "force": none, "timeoutSecs": none, "signal": none, "compose": none,
        });
        if let (Some(p), Some(e)) = (props.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                p.insert(k.clone(), v.clone());
            }
        }
        json!({"type": "object", "additionalProperties": false, "required": ["type", "target"], "properties": props})
    };
    let rollout_state = json!({"type": "string",
        "enum": ["idle", "rolling", "paused", "rollingBack", "done", "aborted"]});
    let batch_growth = json!({"type": "string", "enum": ["fixed", "double"]});
    let on_failure = json!({"type": "string", "enum": ["pause", "rollback", "continue"]});
    let stack_variables = json!({"anyOf": [{"type": "null"}, reference("Variables")]});
    let rollout_body = json!({"anyOf": [{"type": "null"}, reference("RolloutSettingsChange")]});
    let dynamic_is =
        |v: bool| json!({"required": ["dynamic"], "properties": {"dynamic": {"const": v}}});
    let edge_group_fields = |name: &Value| {
        json!({
            "name": name,
            "dynamic": {"type": ["boolean", "null"], "description": "by tags (true) or a list of environments (false)"},
            "tagIds": {"type": ["array", "null"], "maxItems": edge_groups::MAX_TAGS, "items": id,
                "description": "dynamic groups: the tags that select members"},
            "match": {"enum": ["any", "all", null], "description": "dynamic groups: any (the default) or all of the tags"},
            "environmentIds": {"type": ["array", "null"], "maxItems": edge_groups::MAX_STATIC_MEMBERS, "items": id,
                "description": "static groups: the members"}
        })
    };
    let needs_compose = |field: &str, ty: &str| {
        json!({"if": {"required": [field], "properties": {field: {"type": ty}}},
               "then": {"required": ["compose"], "properties": {"compose": {"type": "string"}}}})
    };
    let mut out = Map::new();
    out.insert("Error".into(), json!({"type": "object", "required": ["message"], "properties": {
            "message": {"type": "string"},
            "code": {"type": "string", "description": "where one is defined: bad_request, busy, \
                unauthorized, csrf, forbidden, misdirected, not_found, async_environment, \
                tunnel_timeout, tunnel_failed, tunnel_busy, engine_unreachable, store_unavailable"}}}));
    out.insert("Environment".into(), json!({"type": "object",
            "required": ["id", "name", "mode", "edgeId", "edgeKey", "status", "lastCheckIn",
                "checkinInterval", "pingInterval", "snapshotInterval", "commandInterval", "groupId",
                "tagIds", "envVars", "variables", "allowSelfSigned", "createdAt", "tunnel"],
            "properties": {
                "id": id, "name": {"type": "string"}, "mode": mode,
                "edgeId": {"type": ["string", "null"], "format": "uuid", "description": "null until an agent binds it"},
                "edgeKey": {"type": "string", "description": "the join token (EDGE_KEY)"},
                "status": {"type": "string", "enum": ["up", "down", "never"]},
                "lastCheckIn": time_or_null,
                "checkinInterval": count, "pingInterval": count, "snapshotInterval": count,
                "commandInterval": count,
                "groupId": {"type": ["integer", "null"], "minimum": 0},
                "tagIds": ids, "envVars": {"type": "array", "items": {"type": "string"}},
                "variables": {"type": "object", "additionalProperties": {"type": "string"}},
                "allowSelfSigned": {"type": "boolean"},
                "createdAt": time,
                "tunnel": {"type": "object", "required": ["state", "gateway", "epoch", "since"], "properties": {
                    "state": {"type": "string", "enum": ["closed", "requested", "open"]},
                    "gateway": {"type": ["string", "null"], "description": "the gateway holding the open tunnel"},
                    "epoch": {"type": ["integer", "null"], "minimum": 0},
                    "since": time_or_null}}}}));
    out.insert("NewEnvironment".into(), json!({"type": "object", "additionalProperties": false, "required": ["name"], "properties": {
            "name": name, "mode": {"type": "string", "enum": ["standard", "async"], "default": "standard"},
            "checkinInterval": checkin, "pingInterval": async_interval,
            "snapshotInterval": async_interval, "commandInterval": async_interval,
            "groupId": {"type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX},
            "tagIds": ids,
            "edgeId": {"type": ["string", "null"], "format": "uuid",
                "description": "a pre-assigned Edge ID (hyphenated), bound from the start"},
            "envVars": env_vars, "variables": reference("Variables"),
            "allowSelfSigned": {"type": "boolean", "description": "the agent accepts a self-signed API certificate"}}}));
    out.insert(
        "NewEnvironments".into(),
        json!({"type": "array", "minItems": 1, "maxItems": limits.max_bulk,
            "items": reference("NewEnvironment")}),
    );
    out.insert(
        "EnvironmentChange".into(),
        json!({"type": "object", "additionalProperties": false, "properties": {
            "name": name_or_null, "mode": {"enum": ["standard", "async", null]},
            "checkinInterval": checkin, "pingInterval": async_interval,
            "snapshotInterval": async_interval, "commandInterval": async_interval,
            "groupId": {"type": ["integer", "null"], "minimum": 0, "maximum": u64::MAX,
                "description": "null: in no group"},
            "tagIds": {"type": ["array", "null"], "items": id},
            "envVars": {"anyOf": [{"type": "null"}, env_vars]},
            "variables": {"anyOf": [{"type": "null"}, reference("Variables")]},
            "allowSelfSigned": {"type": ["boolean", "null"]}}}),
    );
    out.insert(
        "Variables".into(),
        json!({"type": "object", "maxProperties": edge_stacks::MAX_VARIABLES,
            "description": "values substituted for ${NAME} in edge stacks' compose files; names \
                starting with EDGE_ are set per environment",
            "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
                "maxLength": edge_stacks::MAX_VARIABLE_NAME, "not": {"pattern": "^EDGE_"}},
            "additionalProperties": {"type": "string", "maxLength": edge_stacks::MAX_VALUE,
                "not": {"pattern": "[\\x00-\\x1f\\x7f-\\x9f]"},
                "description": "no line break or other control character"}}),
    );
    out.insert("Summary".into(), json!({"type": "object", "required": ["total", "status", "mode", "groups", "recentlyDown"], "properties": {
            "total": count, "status": status_counts,
            "mode": {"type": "object", "required": ["standard", "async"],
                "properties": {"standard": count, "async": count}},
            "groups": {"type": "object", "description": "by group id (0: in no group)",
                "propertyNames": {"pattern": "^[0-9]+$"}, "additionalProperties": status_counts},
            "recentlyDown": {"type": "array", "description": "the environments that went down most recently, newest first",
                "items": {"type": "object", "required": ["id", "name", "lastCheckIn"], "properties": {
                    "id": id, "name": {"type": "string"}, "lastCheckIn": time}}}}}));
    out.insert("SnapshotAnswer".into(), json!({"type": "object", "required": ["environmentId", "takenAt", "receivedAt", "snapshot"], "properties": {
            "environmentId": id, "takenAt": time, "receivedAt": time,
            "snapshot": {"anyOf": [reference("Snapshot"), reference("SnapshotSection")]}}}));
    out.insert("Snapshot".into(), json!({"type": "object",
            "required": ["takenMs", "engine", "containers", "images", "volumes", "networks", "stacks"],
            "properties": {
                "takenMs": count, "engine": reference("Engine"),
                "containers": {"type": "array", "items": reference("Container")},
                "images": {"type": "array", "items": reference("Image")},
                "volumes": {"type": "array", "items": reference("Volume")},
                "networks": {"type": "array", "items": reference("Network")},
                "stacks": {"type": "array", "items": reference("ComposeStack")}}}));
    out.insert(
        "SnapshotSection".into(),
        json!({"type": "object", "minProperties": 1, "maxProperties": 1,
            "additionalProperties": false, "description": "the one section asked for",
            "properties": {
                "engine": reference("Engine"),
                "containers": {"type": "array", "items": reference("Container")},
                "images": {"type": "array", "items": reference("Image")},
                "volumes": {"type": "array", "items": reference("Volume")},
                "networks": {"type": "array", "items": reference("Network")},
                "stacks": {"type": "array", "items": reference("ComposeStack")}}}),
    );
    out.insert("Engine".into(), json!({"type": "object",
            "required": ["name", "version", "apiVersion", "os", "arch", "kernelVersion", "cpus", "memoryBytes"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                "apiVersion": {"type": "string"}, "os": {"type": "string"}, "arch": {"type": "string"},
                "kernelVersion": {"type": "string"}, "cpus": count, "memoryBytes": count}}));
    out.insert("Container".into(), json!({"type": "object",
            "required": ["id", "names", "image", "imageId", "command", "state", "created", "labels", "ports"],
            "properties": {"id": {"type": "string"}, "names": {"type": "array", "items": {"type": "string"}},
                "image": {"type": "string"}, "imageId": {"type": "string"}, "command": {"type": "string"},
                "state": {"type": "string"}, "created": {"type": "integer", "description": "seconds since the Unix epoch"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "ports": {"type": "array", "items": {"type": "string"}}}}));
    out.insert(
        "Image".into(),
        json!({"type": "object", "required": ["id", "tags", "size", "created"], "properties": {
            "id": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
            "size": {"type": "integer"}, "created": {"type": "integer"}}}),
    );
    out.insert("Volume".into(), json!({"type": "object", "required": ["name", "driver", "mountpoint"], "properties": {
            "name": {"type": "string"}, "driver": {"type": "string"}, "mountpoint": {"type": "string"}}}));
    out.insert(
        "Network".into(),
        json!({"type": "object", "required": ["id", "name", "driver", "scope"], "properties": {
            "id": {"type": "string"}, "name": {"type": "string"}, "driver": {"type": "string"},
            "scope": {"type": "string"}}}),
    );
    out.insert("ComposeStack".into(), json!({"type": "object", "required": ["name", "services", "containers", "running"], "properties": {
            "name": {"type": "string"}, "services": {"type": "array", "items": {"type": "string"}},
            "containers": count, "running": count}}));
    out.insert("Command".into(), json!({"type": "object",
            "required": ["id", "type", "target", "state", "createdAt", "sentAt", "finishedAt", "error"],
            "properties": {
                "id": id, "type": {"type": "string", "enum": commands::TYPES}, "target": {"type": "string"},
                "force": {"type": "boolean"}, "timeoutSecs": count, "signal": {"type": "string"},
                "services": {"type": "array", "items": {"type": "string"}, "description": "stackDeploy: the services deployed"},
                "state": {"type": "string", "enum": ["pending", "sent", "succeeded", "failed"]},
                "createdAt": time, "sentAt": time_or_null, "finishedAt": time_or_null,
                "error": {"type": ["string", "null"]}}}));
    out.insert("NewCommand".into(), json!({"description": "a command by type; the fields a type does not take are absent or null",
            "oneOf": [
                command(&["containerStart"], &object_name, json!({})),
                command(&["containerStop", "containerRestart"], &object_name,
                    json!({"timeoutSecs": {"type": ["integer", "null"], "minimum": 0, "maximum": 3600}})),
                command(&["containerKill"], &object_name,
                    json!({"signal": {"type": ["string", "null"], "pattern": "^[A-Za-z0-9]{1,16}$"}})),
                command(&["containerRemove", "imageRemove", "volumeRemove"], &object_name,
                    json!({"force": {"type": ["boolean", "null"]}})),
                command(&["stackRemove"], &project, json!({})),
                {"type": "object", "additionalProperties": false, "required": ["type", "target", "compose"],
                 "properties": {"type": {"type": "string", "enum": ["stackDeploy"]}, "target": project,
                    "force": none, "timeoutSecs": none, "signal": none,
                    "compose": {"type": "string", "description": "the compose file to deploy; one that does not check out is a 422"}}}
            ]}));
    out.insert("Group".into(), json!({"type": "object", "required": ["id", "name", "tagIds"], "properties": {
            "id": id, "name": {"type": "string"},
            "tagIds": {"type": "array", "items": id, "description": "tags its environments get as if their own (dynamic edge groups)"}}}));
    out.insert("NewGroup".into(), json!({"type": "object", "additionalProperties": false, "required": ["name"], "properties": {
            "name": name,
            "tagIds": {"type": ["array", "null"], "maxItems": super::catalog::MAX_GROUP_TAGS, "items": id}}}));
    out.insert("GroupChange".into(), json!({"type": "object", "additionalProperties": false, "properties": {
            "name": name_or_null,
            "tagIds": {"type": ["array", "null"], "maxItems": super::catalog::MAX_GROUP_TAGS, "items": id}}}));
    out.insert("Tag".into(), json!({"type": "object", "required": ["id", "name"], "properties": {"id": id, "name": {"type": "string"}}}));
    out.insert("NewTag".into(), json!({"type": "object", "additionalProperties": false, "required": ["name"], "properties": {
            "name": name, "tagIds": {"type": "null", "description": "a tag has none"}}}));
    out.insert(
        "TagChange".into(),
        json!({"type": "object", "additionalProperties": false, "properties": {
            "name": name_or_null, "tagIds": {"type": "null", "description": "a tag has none"}}}),
    );
    out.insert("EdgeGroup".into(), json!({"type": "object", "required": ["id", "name", "dynamic", "tagIds", "match", "environmentIds"],
            "properties": {"id": id, "name": {"type": "string"}, "dynamic": {"type": "boolean"},
                "tagIds": ids, "match": {"type": "string", "enum": ["any", "all"]}, "environmentIds": ids}}));
    out.insert("NewEdgeGroup".into(), json!({"type": "object", "additionalProperties": false, "required": ["name"],
            "properties": edge_group_fields(&name),
            "description": "dynamic: 1 to 64 tagIds and no environmentIds; static (dynamic false or absent): no tagIds",
            "if": dynamic_is(true),
            "then": {"required": ["tagIds"], "properties": {"tagIds": {"type": "array", "minItems": 1}, "environmentIds": {"maxItems": 0}}},
            "else": {"properties": {"tagIds": {"maxItems": 0}}}}));
    out.insert("EdgeGroupChange".into(), json!({"type": "object", "additionalProperties": false,
            "properties": edge_group_fields(&name_or_null),
            "allOf": [
                {"if": dynamic_is(true), "then": {"properties": {"tagIds": {"minItems": 1}, "environmentIds": {"maxItems": 0}}}},
                {"if": dynamic_is(false), "then": {"properties": {"tagIds": {"maxItems": 0}}}}
            ]}));
    out.insert("EdgeStack".into(), json!({"type": "object", "required": ["id", "name", "version", "edgeGroupIds", "variables", "createdAt"],
            "properties": {"id": id, "name": {"type": "string"}, "version": {"type": "integer", "minimum": 1},
                "edgeGroupIds": ids, "variables": {"type": "object", "additionalProperties": {"type": "string"}},
                "createdAt": time,
                "rollout": {"description": "in lists: the stack's rollout (null before it has one), without counts",
                    "oneOf": [reference("Rollout"), {"type": "null"}]}}}));
    out.insert("EdgeStackDetail".into(), json!({"allOf": [reference("EdgeStack"), {"type": "object", "required": ["targets", "counts"], "properties": {
            "targets": count,
            "counts": {"type": "object", "description": "environments at each status, for the version the rollout brings",
                "propertyNames": {"enum": DEPLOY_STATUSES}, "additionalProperties": count},
            "rollout": reference("Rollout")}}]}));
    out.insert("NewEdgeStack".into(), json!({"type": "object", "additionalProperties": false, "required": ["name", "compose", "edgeGroupIds"],
            "properties": {
                "name": stack_name, "compose": compose_file, "edgeGroupIds": edge_group_ids,
                "variables": stack_variables,
                "baseVersion": {"type": ["integer", "null"], "minimum": 0, "maximum": u32::MAX, "description": "ignored on create"},
                "rollout": rollout_body}}));
    out.insert("EdgeStackChange".into(), json!({"type": "object", "additionalProperties": false,
            "description": "rollout and baseVersion go with a new compose",
            "properties": {
                "name": {"anyOf": [{"type": "null"}, stack_name], "description": "the stack's own (a name cannot change)"},
                "compose": {"anyOf": [{"type": "null"}, compose_file], "description": "a new one makes the next version"},
                "edgeGroupIds": {"anyOf": [{"type": "null"}, edge_group_ids]},
                "variables": stack_variables,
                "baseVersion": merge(u32_or_null(1), json!({"description": "the version the compose was edited from (409 when another came first; absent: the newest)"})),
                "rollout": rollout_body},
            "allOf": [needs_compose("rollout", "object"), needs_compose("baseVersion", "integer")]}));
    out.insert("RolloutSettings".into(), json!({"type": "object",
            "required": ["batchSize", "batchGrowth", "waitSecs", "batchTimeoutSecs", "failureThreshold", "onFailure"],
            "properties": {"batchSize": {"type": ["integer", "null"], "minimum": 1}, "batchGrowth": batch_growth,
                "waitSecs": count, "batchTimeoutSecs": count, "failureThreshold": {"type": "number", "minimum": 0},
                "onFailure": on_failure}}));
    out.insert("RolloutSettingsChange".into(), json!({"type": "object", "additionalProperties": false,
            "description": "how the new version goes out (absent: as the previous one; at first, all at once)",
            "properties": {
                "batchSize": merge(u32_or_null(1), json!({"description": "environments in the first batch (null: all at once)"})),
                "batchGrowth": merge(batch_growth, json!({"default": "fixed"})),
                "waitSecs": {"type": "integer", "minimum": 0, "maximum": edge_stacks::MAX_ROLLOUT_SECS, "default": 0,
                    "description": "seconds between a batch settling and the next"},
                "batchTimeoutSecs": {"type": "integer", "minimum": 1, "maximum": edge_stacks::MAX_ROLLOUT_SECS, "default": 600,
                    "description": "after it, a batch's silent environments count as not yet"},
                "failureThreshold": {"type": "number", "minimum": 0, "default": 0,
                    "description": "below 1: the share of released environments that may fail; from 1: how many"},
                "onFailure": merge(on_failure, json!({"default": "pause"}))}}));
    out.insert("Rollout".into(), json!({"type": "object",
            "required": ["state", "targetVersion", "fromVersion", "batch", "released", "config", "updatedAt"],
            "properties": {"state": rollout_state, "targetVersion": count,
                "fromVersion": merge(count.clone(), json!({"description": "0: none"})),
                "batch": count, "released": count, "nextBatchAt": time, "reason": {"type": "string"},
                "config": reference("RolloutSettings"), "updatedAt": time}}));
    out.insert("Rollback".into(), json!({"type": "object", "additionalProperties": false, "properties": {
            "version": merge(u32_or_null(1), json!({"description": "default: the version the current rollout started from, else the one before the newest"}))}}));
    out.insert("StackStatus".into(), json!({"type": "object", "required": ["environmentId", "status", "version", "error", "updatedAt"],
            "properties": {"environmentId": id, "status": {"type": "string", "enum": DEPLOY_STATUSES},
                "version": {"type": ["integer", "null"], "minimum": 0, "description": "null for pending"},
                "error": {"type": ["string", "null"]}, "updatedAt": time_or_null}}));
    out.insert(
        "StackVersion".into(),
        json!({"type": "object", "required": ["version", "createdAt"], "properties": {
            "version": {"type": "integer", "minimum": 1}, "createdAt": time,
            "compose": {"type": "string", "description": "only when one version is asked for"}}}),
    );
    out.insert("Settings".into(), json!({"type": "object", "required": ["checkinInterval", "pingInterval", "snapshotInterval", "commandInterval"],
            "properties": {"checkinInterval": count, "pingInterval": count, "snapshotInterval": count, "commandInterval": count}}));
    out.insert("SettingsChange".into(), json!({"type": "object", "additionalProperties": false, "properties": {
            "checkinInterval": {"type": ["integer", "null"], "minimum": 1, "maximum": endpoints::MAX_CHECKIN_INTERVAL},
            "pingInterval": {"type": ["integer", "null"], "minimum": 0, "maximum": endpoints::MAX_ASYNC_INTERVAL},
            "snapshotInterval": {"type": ["integer", "null"], "minimum": 0, "maximum": endpoints::MAX_ASYNC_INTERVAL},
            "commandInterval": {"type": ["integer", "null"], "minimum": 0, "maximum": endpoints::MAX_ASYNC_INTERVAL}}}));
    out.insert(
        "InstallAnswer".into(),
        json!({"type": "object", "required": ["platform", "command"], "properties": {
            "platform": {"type": "string", "enum": ["docker", "swarm", "kubernetes", "nomad"]},
            "command": {"type": "string"}}}),
    );
    out.insert(
        "SignIn".into(),
        json!({"type": "object", "additionalProperties": false, "required": ["apiKey"],
        "description": "at most 1024 bytes of JSON in all",
        "properties": {"apiKey": {"type": "string", "maxLength": 1000}}}),
    );
    out.insert(
        "Session".into(),
        json!({"type": "object", "required": ["csrfToken", "expiresAt"], "properties": {
            "csrfToken": {"type": "string"}, "expiresAt": time}}),
    );
    Value::Object(out)
}

/// `a` with `b`'s fields added.
fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

pub async fn document(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(build(&state.limits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        build(&Limits::default())
    }

    #[test]
    fn every_reference_resolves() {
        let doc = doc();
        let text = doc.to_string();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("\"$ref\":\"#/") {
            let tail = &rest[at + 10..];
            let end = tail.find('"').unwrap_or(tail.len());
            let pointer = &tail[..end];
            assert!(
                doc.pointer(&format!("/{pointer}")).is_some(),
                "#/{pointer} does not resolve"
            );
            rest = &tail[end..];
        }
    }

    #[test]
    fn every_path_parameter_is_declared_and_known() {
        for r in ROUTES.iter().chain(SESSION_ROUTES) {
            for name in placeholders(r.path) {
                assert!(
                    !path_parameter(name).1.is_empty(),
                    "{} {}: no description of {{{name}}}",
                    r.method,
                    r.path
                );
            }
        }
        let doc = doc();
        for (path, item) in doc["paths"].as_object().unwrap_or(&Map::new()) {
            for (method, op) in item.as_object().unwrap_or(&Map::new()) {
                let declared: Vec<&str> = op["parameters"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .filter(|p| p["in"] == "path")
                            .filter_map(|p| p["name"].as_str())
                            .collect()
                    })
                    .unwrap_or_default();
                let wanted: Vec<&str> = placeholders(path).collect();
                assert_eq!(declared, wanted, "{method} {path}");
            }
        }
    }

    #[test]
    fn operation_ids_are_unique_and_every_route_is_there() {
        let mut seen = std::collections::HashSet::new();
        let doc = doc();
        for r in ROUTES.iter().chain(SESSION_ROUTES) {
            assert!(seen.insert(r.operation), "{} twice", r.operation);
            assert!(
                doc["paths"][r.path][r.method.to_lowercase()].is_object(),
                "{} {}",
                r.method,
                r.path
            );
        }
    }

    #[test]
    fn blank_is_what_trim_takes() {
        let class = not_blank();
        for c in [' ', '\t', '\n', '\u{3000}', '\u{85}', '\u{a0}'] {
            assert!(class.contains(c), "{c:?}");
        }
        assert!(!class.contains('\u{1c}'));
        assert_eq!(" \u{3000}x\u{85}".trim(), "x");
    }
}
