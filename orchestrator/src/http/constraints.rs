//! What the server enforces, written into the OpenAPI document, so that a schema-driven client
//! (or fuzzer) never sends a request the document calls valid and gets refused. utoipa derives
//! shapes from the Rust types; the rules the handlers check by hand (ranges, lengths, formats,
//! required-unless) are added here, next to the constants they come from. The schemathesis run in
//! `scripts/test` holds this to its word.

use serde_json::{json, Value};

use super::operations::MAX_REASON_LEN;
use super::params::{MAX_LIMIT, MAX_VALUE_LEN};
use super::sagas::MAX_KEY_LEN;

/// What the document's enums list: known only when the server starts.
pub(crate) struct Known {
    pub(crate) saga_types: Vec<String>,
    /// Every name `?topic=` accepts: dead-letter topics and their sources, with and without the
    /// topic prefix.
    pub(crate) dead_letter_topics: Vec<String>,
}

use saga_runtime::openapi::SOME_TEXT;

fn text(max: usize) -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": max, "pattern": SOME_TEXT})
}

fn time() -> Value {
    json!({"type": "string", "format": "date-time"})
}

/// 90s, 15m, 2h, 1d: a positive whole number of one unit, at most 366 days (the server also
/// takes humantime's other spellings, such as `1h 30m`).
fn duration() -> Value {
    json!({"type": "string", "example": "15m",
           "pattern": r"^(?:[1-9][0-9]{0,6}s|[1-9][0-9]{0,4}m|[1-9][0-9]{0,2}h|(?:[1-9][0-9]?|[12][0-9]{2}|3[0-5][0-9]|36[0-6])d)$"})
}

fn limit() -> Value {
    json!({"type": "integer", "format": "int64", "minimum": 1, "maximum": MAX_LIMIT})
}

/// The schema of a query, path or header parameter, by name.
fn parameter(name: &str, known: &Known) -> Option<Value> {
    Some(match name {
        "topic" => json!({"type": "string", "enum": known.dead_letter_topics}),
        // The dead letters' reason filter: any label; an unknown one matches nothing.
        "reason" => json!({"type": "string", "pattern": r"^[^\x00]*$"}),
        "cursor" => json!({"type": "string", "pattern": super::params::CURSOR_PATTERN}),
        "id" => json!({"type": "string", "format": "uuid"}),
        "limit" => limit(),
        "created_after" | "created_before" | "updated_after" | "updated_before" | "from" | "to" => time(),
        "stuck_for" | "window" => duration(),
        "saga_type" | "failed_step" | "failure_code" | "business_key" | "name" => text(MAX_VALUE_LEN),
        "status" => {
            json!({"type": "string", "enum": ["RUNNING", "COMPENSATING", "COMPLETED", "FAILED", "NEEDS_ATTENTION"]})
        }
        "Idempotency-Key" => json!({"type": "string", "minLength": 1, "maxLength": MAX_KEY_LEN,
                                    "pattern": r#"^[ -~]*[!#-~][ -~]*$"#}),
        _ => return None,
    })
}

/// Any JSON value Postgres stores and gives back: no NUL in a string or a key.
fn storable_value() -> Value {
    let no_nul = json!({"pattern": r"^[^\x00]*$"});
    let any = json!({"$ref": "#/components/schemas/StorableValue"});
    json!({"anyOf": [
        {"type": ["null", "boolean", "number"]},
        {"type": "string", "pattern": r"^[^\x00]*$"},
        {"type": "array", "items": any},
        {"type": "object", "propertyNames": no_nul, "additionalProperties": any},
    ]})
}

/// Properties of request bodies, by schema and property name.
fn property(schema: &str, name: &str, known: &Known) -> Option<Value> {
    Some(match (schema, name) {
        ("ActionBody" | "BulkRetryBody" | "ReplayBody", "reason") => text(MAX_REASON_LEN),
        ("BulkRetryBody", "limit") => limit(),
        ("StartBody", "saga_type") => json!({"type": "string", "enum": known.saga_types}),
        ("StartBody", "input") => json!({"type": "object", "propertyNames": {"pattern": r"^[^\x00]*$"},
                                         "additionalProperties": {"$ref": "#/components/schemas/StorableValue"}}),
        ("StartBody", "business_key") => json!({"type": ["string", "null"], "maxLength": MAX_VALUE_LEN,
                                                 "pattern": r"^[^\x00]*$"}),
        ("FilterSpec", "status") => {
            json!({"type": "array", "items": parameter("status", known).expect("status")})
        }
        ("FilterSpec", n) => parameter(n, known)?,
        ("ReplayBody", "ids") => {
            let topics: Vec<String> = known.dead_letter_topics.iter().map(|t| regex_escape(t)).collect();
            let id = format!("^({})/[0-9]{{1,9}}@[0-9]{{1,18}}$", topics.join("|"));
            json!({"type": "array", "maxItems": MAX_LIMIT, "items": {"type": "string", "pattern": id}})
        }
        ("ReplayBody", "topic") => {
            let mut names: Vec<Value> = known.dead_letter_topics.iter().map(|t| json!(t)).collect();
            names.push(Value::Null);
            json!({"enum": names})
        }
        ("ReplayBody", "reason_code") => json!({"type": ["string", "null"], "pattern": r"^[^\x00]*$"}),
        _ => return None,
    })
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c.to_string() } else { format!("\\{c}") })
        .collect()
}

/// Required in the document although the server is more lenient: a reason unless dry_run (a
/// schema cannot say "unless"), so a schema-driven client always sends one.
const REQUIRED: &[(&str, &str)] = &[("BulkRetryBody", "reason"), ("ReplayBody", "reason")];

/// Adds the constraints, a 401 and a 403 problem to every operation (every route is behind a
/// token), and 503 to those that touch the database.
pub(crate) fn apply(doc: &mut Value, known: &Known) {
    let problem = |description: &str| json!({"description": description, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}});
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else { continue };
            for operation in item.values_mut().filter_map(Value::as_object_mut) {
                if let Some(parameters) = operation.get_mut("parameters").and_then(Value::as_array_mut) {
                    for p in parameters.iter_mut() {
                        let name = p["name"].as_str().unwrap_or_default().to_owned();
                        if let Some(schema) = parameter(&name, known) {
                            let nullable = p["required"] != json!(true);
                            p["schema"] = schema;
                            if nullable && name == "status" {
                                p["explode"] = json!(true);
                            }
                        }
                    }
                }
                if path == "/api/v1/openapi.json" {
                    continue;
                }
                let responses = operation.entry("responses").or_insert_with(|| json!({}));
                if let Some(responses) = responses.as_object_mut() {
                    responses.entry("400").or_insert_with(|| problem("Bad input"));
                    responses.insert("401".into(), problem("No token, or not a valid one"));
                    responses.insert("403".into(), problem("The token's scope does not allow this"));
                    responses.entry("503").or_insert_with(|| {
                        problem("Overloaded: no database connection was free in time; retry after Retry-After")
                    });
                }
            }
        }
    }
    if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
        schemas.insert("StorableValue".into(), storable_value());
        for (schema_name, schema) in schemas.iter_mut() {
            let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else { continue };
            for (name, property_schema) in properties.iter_mut() {
                if let Some(constrained) = property(schema_name, name, known) {
                    let description = property_schema.get("description").cloned();
                    *property_schema = constrained;
                    if let Some(description) = description {
                        property_schema["description"] = description;
                    }
                }
            }
            if schema_name == "ReplayBody" {
                // Either some ids (and neither topic nor reason_code), or all: true.
                schema["oneOf"] = json!([
                    {"required": ["all"], "properties": {"all": {"const": true}, "ids": {"maxItems": 0}}},
                    {"required": ["ids"], "properties": {"all": {"const": false}, "ids": {"minItems": 1},
                        "topic": {"type": "null"}, "reason_code": {"type": "null"}}},
                ]);
            }
            for (owner, name) in REQUIRED {
                if schema_name == owner {
                    let required =
                        schema.as_object_mut().expect("a schema object").entry("required").or_insert_with(|| json!([]));
                    if let Some(list) = required.as_array_mut() {
                        if !list.contains(&json!(name)) {
                            list.push(json!(name));
                        }
                    }
                }
            }
        }
    }
}
