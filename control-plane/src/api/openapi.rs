//! `GET /api/openapi.json`, generated from [`super::ROUTES`] so it cannot drift from the
//! route table.

use actix_web::{web, HttpResponse};
use serde_json::{json, Map, Value};

use super::{AppState, ROUTES};

fn schemas() -> Value {
    let interval = json!({"type": "integer", "minimum": 0});
    json!({
        "Error": {"type": "object", "required": ["message"], "properties": {
            "message": {"type": "string"}, "code": {"type": "string"}}},
        "Environment": {"type": "object", "properties": {
            "id": {"type": "integer"}, "name": {"type": "string"},
            "mode": {"type": "string", "enum": ["standard", "async"]},
            "edgeId": {"type": ["string", "null"], "format": "uuid"},
            "edgeKey": {"type": "string", "description": "join token (EDGE_KEY)"},
            "status": {"type": "string", "enum": ["up", "down", "never"]},
            "lastCheckIn": {"type": ["string", "null"], "format": "date-time"},
            "checkinInterval": interval, "pingInterval": interval,
            "snapshotInterval": interval, "commandInterval": interval,
            "groupId": {"type": ["integer", "null"]},
            "tagIds": {"type": "array", "items": {"type": "integer"}},
            "envVars": {"type": "array", "items": {"type": "string"}},
            "allowSelfSigned": {"type": "boolean"},
            "createdAt": {"type": "string", "format": "date-time"},
            "tunnel": {"type": "object", "properties": {
                "state": {"type": "string", "enum": ["closed", "requested", "open"]},
                "gateway": {"type": ["string", "null"]}}}}},
        "CreateEnvironment": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
            "name": {"type": "string"}, "mode": {"type": "string", "enum": ["standard", "async"]},
            "checkinInterval": {"type": "integer", "minimum": 1, "maximum": 3600},
            "pingInterval": interval, "snapshotInterval": interval, "commandInterval": interval,
            "groupId": {"type": "integer"}, "tagIds": {"type": "array", "items": {"type": "integer"}},
            "edgeId": {"type": "string", "format": "uuid"},
            "envVars": {"type": "array", "items": {"type": "string"}},
            "variables": {"type": "object", "maxProperties": 128, "additionalProperties": {"type": "string", "maxLength": 4096}, "description": "values for edge stacks' ${NAME}s"},
            "allowSelfSigned": {"type": "boolean"}}},
        "Named": {"type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"}}},
        "EdgeGroup": {"type": "object", "properties": {
            "id": {"type": "integer"}, "name": {"type": "string"}, "dynamic": {"type": "boolean"},
            "tagIds": {"type": "array", "items": {"type": "integer"}},
            "match": {"type": "string", "enum": ["any", "all"]},
            "environmentIds": {"type": "array", "items": {"type": "integer"}}}},
        "EdgeStack": {"type": "object", "properties": {
            "id": {"type": "integer"}, "name": {"type": "string"}, "version": {"type": "integer"},
            "edgeGroupIds": {"type": "array", "items": {"type": "integer"}},
            "variables": {"type": "object", "additionalProperties": {"type": "string"}},
            "createdAt": {"type": "string", "format": "date-time"}}},
        "EdgeStackBody": {"type": "object", "additionalProperties": false, "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,57}$", "description": "required on create; cannot change"},
            "compose": {"type": "string", "maxLength": 65536, "description": "the compose file; on PUT, a new one makes the next version"},
            "edgeGroupIds": {"type": "array", "minItems": 1, "maxItems": 64, "items": {"type": "integer"}},
            "variables": {"type": "object", "maxProperties": 128, "additionalProperties": {"type": "string", "maxLength": 4096}, "description": "substituted for ${NAME}; names starting with EDGE_ are set per environment"},
            "baseVersion": {"type": "integer", "minimum": 1, "description": "PUT with compose: the version it was edited from (409 if another came first)"},
            "rollout": {"$ref": "#/components/schemas/Rollout"}}},
        "Rollout": {"type": "object", "additionalProperties": false, "description": "how the new version goes out (default: as the previous one; at first all at once)", "properties": {
            "batchSize": {"type": "integer", "minimum": 1, "description": "environments in the first batch; absent: all at once"},
            "batchGrowth": {"type": "string", "enum": ["fixed", "double"]},
            "waitSecs": {"type": "integer", "minimum": 0, "maximum": 86400, "description": "between a batch settling and the next"},
            "batchTimeoutSecs": {"type": "integer", "minimum": 1, "maximum": 86400, "description": "after it, a batch's silent environments count as not yet (default 600)"},
            "failureThreshold": {"type": "number", "minimum": 0, "description": "below 1: the share of released environments that may fail; from 1: how many"},
            "onFailure": {"type": "string", "enum": ["pause", "rollback", "continue"]}}},
        "Rollback": {"type": "object", "additionalProperties": false, "properties": {
            "version": {"type": "integer", "minimum": 1, "description": "default: the version the current rollout started from, else the one before the newest"}}},
        "EdgeGroupBody": {"type": "object", "additionalProperties": false, "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 255},
            "dynamic": {"type": "boolean", "description": "by tags (true) or a list of environments (false, the default)"},
            "tagIds": {"type": "array", "maxItems": 64, "items": {"type": "integer"}, "description": "dynamic groups: 1 to 64 tags"},
            "match": {"type": "string", "enum": ["any", "all"], "description": "dynamic groups: any (default) or all of the tags, over each environment's tags"},
            "environmentIds": {"type": "array", "maxItems": 100000, "items": {"type": "integer"}, "description": "static groups: existing environments"}}},
        "Settings": {"type": "object", "properties": {
            "checkinInterval": interval, "pingInterval": interval,
            "snapshotInterval": interval, "commandInterval": interval}}
    })
}

fn parameters(path: &str, method: &str) -> Vec<Value> {
    let mut ps = Vec::new();
    if path.contains("{id}") {
        ps.push(
            json!({"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}),
        );
    }
    if path == "/api/endpoints" && method == "GET" {
        for (name, desc) in [
            ("start", "offset of the first item (default 0)"),
            ("limit", "page size, 1..=1000 (default 100)"),
            (
                "search",
                "case-insensitive substring of the name or Edge ID",
            ),
            ("status", "comma-separated: up, down, never"),
            ("mode", "standard or async"),
            ("groupId", "group id"),
            ("tagIds", "comma-separated tag ids; all must be present"),
        ] {
            ps.push(json!({"name": name, "in": "query", "required": false, "description": desc, "schema": {"type": "string"}}));
        }
    }
    if path.ends_with("/status") && method == "GET" {
        ps.push(json!({"name": "status", "in": "query", "required": false, "schema": {"type": "string", "enum": ["pending", "acknowledged", "imagesPulled", "deploying", "running", "error", "removing", "removed"]}}));
    }
    if path.ends_with("/file") {
        ps.push(json!({"name": "environmentId", "in": "query", "required": true, "schema": {"type": "integer"}}));
        ps.push(json!({"name": "version", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1}}));
    }
    if path.contains("{n}") {
        ps.push(
            json!({"name": "n", "in": "path", "required": true, "description": "version", "schema": {"type": "integer", "minimum": 1}}),
        );
    }
    if method == "GET"
        && (path == "/api/edge_groups"
            || path == "/api/edge_stacks"
            || path.ends_with("/environments")
            || path.ends_with("/status"))
    {
        for (name, desc) in [
            ("start", "offset of the first item (default 0)"),
            ("limit", "page size, 1..=1000 (default 100)"),
        ] {
            ps.push(json!({"name": name, "in": "query", "required": false, "description": desc, "schema": {"type": "integer", "minimum": 0}}));
        }
    }
    if path.ends_with("/install") {
        ps.push(json!({"name": "platform", "in": "query", "schema": {"type": "string", "enum": ["docker", "swarm", "kubernetes", "nomad"]}}));
    }
    ps
}

pub fn build() -> Value {
    let mut paths = Map::new();
    for r in ROUTES {
        let entry = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        let body_ref = match (r.path, r.method) {
            ("/api/endpoints", "POST") => {
                Some(json!({"$ref": "#/components/schemas/CreateEnvironment"}))
            }
            ("/api/endpoints/bulk", "POST") => Some(
                json!({"type": "array", "items": {"$ref": "#/components/schemas/CreateEnvironment"}}),
            ),
            ("/api/endpoints/{id}", "PATCH") => Some(json!({"type": "object"})),
            ("/api/settings", "PATCH" | "PUT") => {
                Some(json!({"$ref": "#/components/schemas/Settings"}))
            }
            ("/api/edge_stacks" | "/api/edge_stacks/{id}", "POST" | "PUT") => {
                Some(json!({"$ref": "#/components/schemas/EdgeStackBody"}))
            }
            ("/api/edge_stacks/{id}/rollback", "POST") => {
                Some(json!({"$ref": "#/components/schemas/Rollback"}))
            }
            ("/api/edge_groups" | "/api/edge_groups/{id}", "POST" | "PATCH") => {
                Some(json!({"$ref": "#/components/schemas/EdgeGroupBody"}))
            }
            (p, "POST" | "PATCH") if p.starts_with("/api/groups") => Some(
                json!({"type": "object", "additionalProperties": false, "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 255}, "tagIds": {"type": "array", "maxItems": 64, "items": {"type": "integer"}, "description": "tags the group's environments get as if their own (dynamic edge groups)"}}}),
            ),
            (p, "POST" | "PATCH") if p.starts_with("/api/tags") => Some(
                json!({"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}),
            ),
            _ => None,
        };
        let mut op = json!({
            "summary": r.summary,
            "parameters": parameters(r.path, r.method),
            "responses": {
                "2XX": {"description": "success"},
                "4XX": {"description": "refused", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        if let Some(schema) = body_ref {
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": schema}}});
        }
        entry[r.method.to_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "edgeplane control plane", "version": env!("CARGO_PKG_VERSION")},
        "security": [{"apiKey": []}],
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
            "schemas": schemas()
        },
        "paths": paths
    })
}

pub async fn document(_state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(build())
}
