//! The OpenAPI 3.1 document a participant serves at `/api/v1/openapi.json`: its own routes, plus
//! `/health`, `/ready` and the document itself, which every service has. Participants write their
//! paths as JSON next to their handlers; the schemathesis run in `scripts/test` checks the
//! document against what the service does, every constraint included.

use serde_json::{json, Value};

/// Text that holds a character other than whitespace and no NUL: the services trim what Rust
/// calls whitespace (Unicode White_Space), spelled out because a schema's `\s` is ECMAScript's,
/// which differs (U+0085 is not in it, U+FEFF is).
pub const SOME_TEXT: &str =
    "^[^\\x00]*[^\\x00\\x09-\\x0d\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000][^\\x00]*$";

/// A string of 1 to `max` characters with something other than whitespace, and no NUL.
pub fn text(max: usize) -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": max, "pattern": SOME_TEXT})
}

/// A problem+json response.
pub fn problem(description: &str) -> Value {
    json!({"description": description,
           "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
}

/// A JSON response with `schema`.
pub fn json_response(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

/// The whole document: `paths` and `schemas` of the service's own routes, and the shared ones.
pub fn document(service: &str, description: &str, paths: Value, schemas: Value) -> Value {
    let status = json!({"type": "object", "properties": {"status": {"type": "string"}, "service": {"type": "string"}},
                        "required": ["status", "service"]});
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": service, "version": env!("CARGO_PKG_VERSION"), "description": description},
        "paths": {
            "/health": {"get": {"summary": "Liveness: 503 once a background task has died (the process then exits)",
                "responses": {"200": json_response("Alive", status.clone()), "503": json_response("A background task died", status.clone())}}},
            "/ready": {"get": {"summary": "Readiness: Postgres and the broker reachable, every background task running",
                "responses": {"200": json_response("Ready", status.clone()), "503": json_response("Not ready, with the checks that failed", status)}}},
            "/api/v1/openapi.json": {"get": {"summary": "This document",
                "responses": {"200": json_response("The OpenAPI 3.1 document", json!({"type": "object"}))}}},
        },
        "components": {"schemas": {
            "Problem": {"type": "object", "description": "RFC 9457 problem details",
                "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                               "detail": {"type": "string"}},
                "required": ["type", "title", "status", "detail"]},
        }},
    });
    if let (Some(all), Some(own)) = (doc["paths"].as_object_mut(), paths.as_object()) {
        all.extend(own.clone());
    }
    if let (Some(all), Some(own)) = (doc["components"]["schemas"].as_object_mut(), schemas.as_object()) {
        all.extend(own.clone());
    }
    doc
}
