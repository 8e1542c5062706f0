//! Dead letters for on-call: list what every consumer of the system dead-lettered, and replay
//! it to its source topic once the cause is fixed. A dead letter is replayed once; replaying it
//! again needs `force`. Every replay is recorded with who and why.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Principal, Scope};
use super::error::Problem;
use super::operations::{parse_body, reason_unless_dry_run};
use super::params::{self, MAX_LIMIT};
use super::{ApiError, AppState};
use crate::dead_letters::{self, DeadLetter, Raw};

const DEFAULT_LIMIT: i64 = 50;

/// Which dead letters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct ListParams {
    /// One dead-letter topic (`saga-replies.dlq`, or its source `saga-replies`); default all.
    topic: Option<String>,
    /// Only this reason (`invalid_json`, `unknown_saga`, `keeps_failing`, ...).
    reason: Option<String>,
    /// Only those not replayed yet (`false`) or only those replayed (`true`).
    replayed: Option<bool>,
    /// Most dead letters to return, newest first, 1 to 500 (default 50).
    limit: Option<i64>,
}

/// Dead letters, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeadLetterPage {
    /// The dead-letter topics read.
    topics: Vec<String>,
    count: usize,
    items: Vec<DeadLetter>,
}

struct Selection {
    topics: Vec<String>,
    reason: Option<String>,
    replayed: Option<bool>,
}

impl AppState {
    fn topics_named(&self, topic: Option<&str>) -> Result<Vec<String>, ApiError> {
        match topic {
            None => Ok(self.dead_letters.topics().to_vec()),
            Some(name) => self.dead_letters.resolve(name.trim()).map(|t| vec![t]).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "no dead-letter topic {name:?}; the topics are: {}",
                    self.dead_letters.topics().join(", ")
                ))
            }),
        }
    }

    async fn select(&self, selection: &Selection, limit: i64) -> Result<Vec<Raw>, ApiError> {
        // Read more than asked when filtering, so a filter does not hide older matches.
        let read = if selection.reason.is_some() || selection.replayed.is_some() { MAX_LIMIT } else { limit };
        let mut letters = self.dead_letters.list(selection.topics.clone(), read).await?;
        let mut conn = self.pool.acquire().await?;
        dead_letters::attach_replays(&mut conn, &mut letters).await?;
        letters.retain(|l| {
            selection.reason.as_deref().is_none_or(|r| l.view.reason.as_deref() == Some(r))
                && selection.replayed.is_none_or(|r| l.view.replayed.is_some() == r)
        });
        letters.truncate(limit as usize);
        Ok(letters)
    }
}

/// List dead letters of every consumer (orchestrator and participants), newest first, with
/// where each came from, why, its original payload and headers, and whether it was replayed.
#[utoipa::path(
    get, path = "/api/v1/dead-letters", operation_id = "list_dead_letters", tag = "dead-letters",
    params(ListParams),
    responses(
        (status = 200, body = DeadLetterPage),
        (status = 400, description = "Unknown topic, bad limit", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeadLetterPage>, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::BadRequest(format!("{}; allowed: topic, reason, replayed (true/false), limit", e.body_text()))
    })?;
    let limit = match query.limit {
        Some(limit) => params::parse_limit(&limit.to_string())?,
        None => DEFAULT_LIMIT,
    };
    let topics = state.topics_named(query.topic.as_deref())?;
    let selection = Selection { topics: topics.clone(), reason: query.reason, replayed: query.replayed };
    let mut items: Vec<DeadLetter> = state.select(&selection, limit).await?.into_iter().map(|l| l.view).collect();
    if principal.scope < Scope::Admin {
        for item in &mut items {
            redact_payload(item, &state.redact);
        }
    }
    Ok(Json(DeadLetterPage { topics, count: items.len(), items }))
}

/// What a read-scope token sees of a dead letter's payload: as the saga detail shows an input,
/// with the sensitive fields (`REDACT_FIELDS`, at any depth) as "[redacted]". A payload that is
/// not JSON cannot be redacted field by field, so it is not shown at all.
fn redact_payload(item: &mut DeadLetter, fields: &[String]) {
    item.payload = item.payload.take().map(|text| match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(value) => super::sagas::redact(&value, fields).to_string(),
        Err(_) => "[redacted: not JSON; an admin token shows it]".to_owned(),
    });
    if item.payload_base64.take().is_some() {
        item.payload = Some("[redacted: not UTF-8; an admin token shows it]".to_owned());
    }
}

/// What to replay: some dead letters by id, or all not yet replayed (of a topic, of a reason).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplayBody {
    /// Dead letters by id (`topic/partition@offset`, as listed). Not with `all`.
    #[serde(default)]
    ids: Vec<String>,
    /// Every dead letter not replayed yet (at most 500), optionally of one `topic` and `reason_code`.
    #[serde(default)]
    all: bool,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    reason_code: Option<String>,
    /// Replay even those replayed before.
    #[serde(default)]
    force: bool,
    /// Only show what would be replayed.
    #[serde(default)]
    dry_run: bool,
    /// Why, for the record (1 to 1000 characters); required unless dry_run.
    #[serde(default)]
    reason: Option<String>,
}

/// What a replay did to one dead letter.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReplayItem {
    id: String,
    /// replayed, would_replay, or skipped.
    result: &'static str,
    /// Where it was (or would be) published, or why it was skipped.
    detail: String,
}

/// The outcome of a replay.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReplayResult {
    dry_run: bool,
    replayed: usize,
    skipped: usize,
    items: Vec<ReplayItem>,
}

/// Re-publish dead letters to their source topics (without the dlq-* headers, with
/// dlq-replayed-from), once the cause is fixed. Each replay is recorded; a dead letter already
/// replayed is skipped unless `force`.
#[utoipa::path(
    post, path = "/api/v1/dead-letters/replay", operation_id = "replay_dead_letters", tag = "dead-letters",
    request_body = ReplayBody,
    responses(
        (status = 200, body = ReplayResult),
        (status = 400, description = "Bad ids, topic or reason", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No dead letter at one of the ids", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["admin"]))
)]
pub(crate) async fn replay(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> Result<Json<ReplayResult>, ApiError> {
    let body: ReplayBody = parse_body(
        &body,
        "{\"ids\": [\"topic/partition@offset\"]} or {\"all\": true, \"topic\"?, \"reason_code\"?}, \
         with \"reason\", \"force\"?, \"dry_run\"?",
    )?;
    let reason = reason_unless_dry_run(body.reason.as_deref(), body.dry_run)?;
    let mut letters = match (body.all, body.ids.is_empty()) {
        (true, true) => {
            let selection = Selection {
                topics: state.topics_named(body.topic.as_deref())?,
                reason: body.reason_code.clone(),
                replayed: (!body.force).then_some(false),
            };
            state.select(&selection, MAX_LIMIT).await?
        }
        (false, false) if body.topic.is_none() && body.reason_code.is_none() => {
            if body.ids.len() > MAX_LIMIT as usize {
                return Err(ApiError::BadRequest(format!("at most {MAX_LIMIT} ids at once")));
            }
            let mut wanted = Vec::with_capacity(body.ids.len());
            let mut ids: Vec<&str> = body.ids.iter().map(|id| id.trim()).collect();
            ids.sort_unstable();
            ids.dedup();
            for id in &ids {
                let (topic, partition, offset) = dead_letters::parse_id(id).ok_or_else(|| {
                    ApiError::BadRequest(format!("{id:?} is not a dead letter id (topic/partition@offset)"))
                })?;
                wanted.push((state.topics_named(Some(&topic))?.remove(0), partition, offset));
            }
            let mut found = Vec::with_capacity(wanted.len());
            let mut missing = Vec::new();
            for (id, letter) in ids.iter().zip(state.dead_letters.get_many(wanted).await?) {
                match letter {
                    Some(letter) => found.push(letter),
                    None => missing.push((*id).to_owned()),
                }
            }
            if !missing.is_empty() {
                return Err(ApiError::NotFound(format!("no dead letter at {}", missing.join(", "))));
            }
            let mut conn = state.pool.acquire().await?;
            dead_letters::attach_replays(&mut conn, &mut found).await?;
            found
        }
        _ => {
            return Err(ApiError::BadRequest(
                "give either ids, or all: true (optionally with topic and reason_code), not both".into(),
            ))
        }
    };
    letters.sort_by_key(|l| (l.view.topic.clone(), l.view.partition, l.view.offset));
    let mut items = Vec::with_capacity(letters.len());
    for letter in &letters {
        let id = letter.view.id.clone();
        let item = |result, detail| ReplayItem { id: id.clone(), result, detail };
        let Some(source) = letter.view.source_topic.clone() else {
            items.push(item("skipped", "it has no dlq-source-topic header".to_owned()));
            continue;
        };
        if let (Some(before), false) = (&letter.view.replayed, body.force) {
            items.push(item(
                "skipped",
                format!("already replayed at {} by {}; use force to replay again", before.replayed_at, before.actor),
            ));
            continue;
        }
        if body.dry_run {
            items.push(item("would_replay", format!("to {source}")));
            continue;
        }
        // Recorded only if the broker acknowledged the publish.
        let mut tx = state.pool.begin().await?;
        dead_letters::record_replay(&mut tx, &letter.view, &source, &principal.name, &reason).await?;
        let published = state.dead_letters.publish(letter).await?;
        tx.commit().await?;
        tracing::info!(id, to = published, actor = principal.name, reason, "replayed a dead letter");
        items.push(item("replayed", format!("to {published}")));
    }
    let replayed = items.iter().filter(|i| i.result != "skipped").count();
    Ok(Json(ReplayResult {
        dry_run: body.dry_run,
        replayed: if body.dry_run { 0 } else { replayed },
        skipped: items.len() - replayed,
        items,
    }))
}
