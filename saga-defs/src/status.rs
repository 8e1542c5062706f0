use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The status of a saga instance. Stored as text in `saga_instances.status`: part of the durable contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SagaStatus {
    /// Executing its steps forwards.
    Running,
    /// A step failed; undoing the completed steps in reverse order.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// A step failed and every completed step was compensated.
    Failed,
    /// The saga cannot finish on its own (a compensation kept failing); a human must look.
    NeedsAttention,
}

impl SagaStatus {
    pub const ALL: [SagaStatus; 5] = [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Failed,
        SagaStatus::NeedsAttention,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            SagaStatus::Running => "RUNNING",
            SagaStatus::Compensating => "COMPENSATING",
            SagaStatus::Completed => "COMPLETED",
            SagaStatus::Failed => "FAILED",
            SagaStatus::NeedsAttention => "NEEDS_ATTENTION",
        }
    }

    /// Terminal statuses: the saga does nothing more on its own.
    pub fn is_terminal(&self) -> bool {
        matches!(self, SagaStatus::Completed | SagaStatus::Failed | SagaStatus::NeedsAttention)
    }
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status string that is not one of [`SagaStatus::ALL`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown saga status {0:?}; valid statuses are RUNNING, COMPENSATING, COMPLETED, FAILED, NEEDS_ATTENTION")]
pub struct UnknownStatus(pub String);

impl FromStr for SagaStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SagaStatus::ALL.into_iter().find(|status| status.as_str() == s).ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// Whether a command asks a participant to do a step's action or to undo it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StepKind {
    Action,
    Compensation,
}

impl StepKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            StepKind::Action => "ACTION",
            StepKind::Compensation => "COMPENSATION",
        }
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown step kind {0:?}; valid kinds are ACTION, COMPENSATION")]
pub struct UnknownStepKind(pub String);

impl FromStr for StepKind {
    type Err = UnknownStepKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ACTION" => Ok(StepKind::Action),
            "COMPENSATION" => Ok(StepKind::Compensation),
            other => Err(UnknownStepKind(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_through_its_stored_name() {
        for status in SagaStatus::ALL {
            assert_eq!(status.as_str().parse::<SagaStatus>().unwrap(), status);
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
    }

    #[test]
    fn an_unknown_status_lists_the_valid_ones() {
        let err = "IN_PROGRESS".parse::<SagaStatus>().unwrap_err();
        assert!(err.to_string().contains("NEEDS_ATTENTION"));
    }
}
