//! `/api/v1/saga-definitions`: the loaded saga definitions with their versions and steps.

use axum::extract::{Path, State};
use axum::Json;
use saga_defs::SagaDefinition;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::Problem;
use super::{ApiError, AppState};

/// A loaded saga definition.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DefinitionView {
    name: String,
    version: u32,
    /// Whether new sagas of this type run this version.
    latest: bool,
    description: String,
    /// The steps in order, each with its participant, action, timeout, retry policy and
    /// compensation, as in the definition document.
    #[schema(value_type = Vec<Object>)]
    steps: serde_json::Value,
}

fn view(definition: &SagaDefinition, latest: bool) -> DefinitionView {
    DefinitionView {
        name: definition.name.to_string(),
        version: definition.version,
        latest,
        description: definition.description.clone(),
        steps: serde_json::to_value(&definition.steps).unwrap_or_default(),
    }
}

/// Every loaded definition.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DefinitionList {
    items: Vec<DefinitionView>,
}

/// The loaded saga definitions, every version.
#[utoipa::path(
    get, path = "/api/v1/saga-definitions", operation_id = "list_saga_definitions", tag = "definitions",
    responses((status = 200, body = DefinitionList)),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn list(State(state): State<AppState>) -> Json<DefinitionList> {
    let registry = state.engine.registry();
    let items = registry
        .all()
        .map(|d| view(d, registry.latest(d.name.as_str()).is_some_and(|l| l.version == d.version)))
        .collect();
    Json(DefinitionList { items })
}

/// The versions of one saga type, newest first.
#[utoipa::path(
    get, path = "/api/v1/saga-definitions/{name}", operation_id = "get_saga_definition", tag = "definitions",
    params(("name" = String, Path, description = "The saga type")),
    responses(
        (status = 200, body = DefinitionList),
        (status = 404, description = "No such saga type", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<DefinitionList>, ApiError> {
    let registry = state.engine.registry();
    let latest = registry.latest(&name).map(|d| d.version);
    let mut items: Vec<DefinitionView> =
        registry.all().filter(|d| d.name.as_str() == name).map(|d| view(d, Some(d.version) == latest)).collect();
    if items.is_empty() {
        let known: Vec<String> = registry.all().map(|d| d.name.to_string()).collect();
        return Err(ApiError::NotFound(format!("no saga type {name:?}; loaded: {}", known.join(", "))));
    }
    items.reverse();
    Ok(Json(DefinitionList { items }))
}
