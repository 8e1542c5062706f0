//! Message contracts on the wire, as JSON. Part of the durable contract: fields may be added
//! (readers ignore unknown ones) but not renamed or removed without a new schema version.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::contract::SCHEMA_VERSION;
use crate::ids::{SagaId, SagaType, StepName};
use crate::status::{SagaStatus, StepKind};

/// Why a saga is being undone, passed to compensations (the order uses it as the rejection reason).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureInfo {
    pub step: StepName,
    pub code: String,
    pub message: String,
}

/// A command from the orchestrator to a participant: do (or undo) one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandEnvelope {
    pub schema_version: u32,
    pub message_id: Uuid,
    pub saga_id: SagaId,
    pub saga_type: SagaType,
    pub step: StepName,
    pub kind: StepKind,
    /// The action (or compensation action) name from the definition.
    pub action: String,
    /// 1-based attempt number. Retries of one step keep the same idempotency key
    /// `(saga_id, step, kind)`; the attempt only tells which reply answers which command.
    pub attempt: u32,
    /// Topic to send the reply to.
    pub reply_to: String,
    /// The saga's input, as given when it was started.
    pub input: serde_json::Value,
    /// Outputs of the steps completed so far, by step name.
    #[serde(default)]
    pub outputs: serde_json::Value,
    /// For compensations: the failure that made the saga undo its steps.
    #[serde(default)]
    pub failure: Option<FailureInfo>,
    pub deadline: DateTime<Utc>,
}

/// Error reported by a participant. `retryable` tells the orchestrator whether to try again
/// (a transient problem such as a gateway timeout) or to compensate (a business refusal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

impl StepError {
    pub fn business(code: &str, message: impl Into<String>) -> Self {
        Self { code: code.to_owned(), message: message.into(), retryable: false }
    }
    pub fn transient(code: &str, message: impl Into<String>) -> Self {
        Self { code: code.to_owned(), message: message.into(), retryable: true }
    }
}

/// What happened to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReplyOutcome {
    Succeeded {
        #[serde(default)]
        output: serde_json::Value,
    },
    Failed {
        error: StepError,
    },
}

/// A participant's reply to one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyEnvelope {
    pub schema_version: u32,
    pub message_id: Uuid,
    /// The `message_id` of the command this answers.
    pub command_id: Uuid,
    pub saga_id: SagaId,
    pub step: StepName,
    pub kind: StepKind,
    pub attempt: u32,
    pub participant: String,
    pub outcome: ReplyOutcome,
    /// True when this reply was replayed from the participant's store for a redelivered command.
    #[serde(default)]
    pub replayed: bool,
}

impl ReplyEnvelope {
    pub fn answering(command: &CommandEnvelope, participant: &str, outcome: ReplyOutcome) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            message_id: Uuid::now_v7(),
            command_id: command.message_id,
            saga_id: command.saga_id,
            step: command.step.clone(),
            kind: command.kind,
            attempt: command.attempt,
            participant: participant.to_owned(),
            outcome,
            replayed: false,
        }
    }
}

/// A request, written through a service's outbox, to start a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartSagaRequest {
    pub schema_version: u32,
    /// The id the saga will have, chosen by the requester so it can link to it at once.
    pub saga_id: SagaId,
    pub saga_type: SagaType,
    /// Starting twice with one key starts one saga.
    pub idempotency_key: String,
    /// A business identifier to search by (the order id for the order saga).
    #[serde(default)]
    pub business_key: Option<String>,
    pub input: serde_json::Value,
}

/// What happened to a saga, as announced on `saga-events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LifecycleEventType {
    #[serde(rename = "saga.started")]
    Started,
    #[serde(rename = "saga.completed")]
    Completed,
    /// Failed and fully compensated.
    #[serde(rename = "saga.failed")]
    Failed,
    /// Parked for a human (a compensation that cannot succeed, a step that cannot be undone).
    #[serde(rename = "saga.needs_attention")]
    NeedsAttention,
}

impl LifecycleEventType {
    /// The event a transition into `status` announces, if any.
    pub fn entering(status: SagaStatus) -> Option<Self> {
        match status {
            SagaStatus::Completed => Some(Self::Completed),
            SagaStatus::Failed => Some(Self::Failed),
            SagaStatus::NeedsAttention => Some(Self::NeedsAttention),
            SagaStatus::Running | SagaStatus::Compensating => None,
        }
    }
}

/// A saga lifecycle event on the `saga-events` topic (keyed by saga id), for notifications and
/// downstream systems. Published through the orchestrator's outbox in the transaction of the
/// transition it announces, so it is never lost and never announces what did not happen.
/// Delivery is at least once: deduplicate by `event_id` (or by `saga_id` and `version`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaLifecycleEvent {
    pub schema_version: u32,
    pub event_id: Uuid,
    pub event_type: LifecycleEventType,
    pub saga_id: SagaId,
    pub saga_type: SagaType,
    pub definition_version: u32,
    #[serde(default)]
    pub business_key: Option<String>,
    pub status: SagaStatus,
    /// The saga's version after the transition this announces.
    pub version: i64,
    /// The failure that made it compensate (failed, needs attention).
    #[serde(default)]
    pub failure: Option<FailureInfo>,
    /// Why it needs a human (needs attention).
    #[serde(default)]
    pub attention: Option<FailureInfo>,
    pub occurred_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_outcome_is_tagged_by_status() {
        let ok = ReplyOutcome::Succeeded { output: serde_json::json!({"charge_id": "c1"}) };
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            serde_json::json!({"status": "SUCCEEDED", "output": {"charge_id": "c1"}})
        );
        let failed: ReplyOutcome = serde_json::from_value(serde_json::json!({
            "status": "FAILED",
            "error": {"code": "PAYMENT_DECLINED", "message": "card declined", "retryable": false}
        }))
        .unwrap();
        assert_eq!(failed, ReplyOutcome::Failed { error: StepError::business("PAYMENT_DECLINED", "card declined") });
    }

    #[test]
    fn lifecycle_events_are_named_for_their_terminal_status() {
        assert_eq!(LifecycleEventType::entering(SagaStatus::Running), None);
        assert_eq!(LifecycleEventType::entering(SagaStatus::Compensating), None);
        let named: Vec<serde_json::Value> = [SagaStatus::Completed, SagaStatus::Failed, SagaStatus::NeedsAttention]
            .into_iter()
            .map(|s| serde_json::to_value(LifecycleEventType::entering(s).unwrap()).unwrap())
            .collect();
        assert_eq!(named, ["saga.completed", "saga.failed", "saga.needs_attention"]);
    }
}
