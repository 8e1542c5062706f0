//! The saga state machine: pure functions from (definition, state, event, clock) to the next state
//! and the commands to send. No I/O: the orchestrator persists the result and the commands in one
//! transaction.

use chrono::{DateTime, Duration as ChronoDuration, Utc};

use crate::contract::codes;
use crate::definition::{RetryPolicy, SagaDefinition};
use crate::ids::StepName;
use crate::messages::{FailureInfo, ReplyOutcome, StepError};
use crate::status::{SagaStatus, StepKind};

/// What the saga is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// A reply to the current attempt, until the deadline.
    Reply { deadline: DateTime<Utc> },
    /// The moment to send the next attempt.
    Retry { at: DateTime<Utc> },
    /// Nothing: the saga is terminal.
    Nothing,
}

/// The durable state of one saga, as far as the state machine needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaState {
    pub status: SagaStatus,
    /// Index of the step being executed (RUNNING) or compensated (COMPENSATING).
    pub step_index: usize,
    pub kind: StepKind,
    /// Attempt number of the current command, 1-based.
    pub attempt: u32,
    /// The attempt at which the current retry budget began: 1, or the attempt an operator's
    /// retry sent. The step's retry policy counts attempts from here.
    pub first_attempt: u32,
    pub waiting: Waiting,
    /// The forward failure that made the saga compensate.
    pub failure: Option<FailureInfo>,
    /// Why the saga needs a human, when it does.
    pub attention: Option<FailureInfo>,
}

impl SagaState {
    /// When the timer loop must fire [`SagaEvent::TimerFired`] for this saga.
    pub fn wake_at(&self) -> Option<DateTime<Utc>> {
        match self.waiting {
            Waiting::Reply { deadline } => Some(deadline),
            Waiting::Retry { at } => Some(at),
            Waiting::Nothing => None,
        }
    }
}

/// The current time and a random number in [0, 1) for jitter, supplied by the caller.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now: DateTime<Utc>,
    pub random: f64,
}

/// A participant's answer, as the state machine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReply {
    pub step: StepName,
    pub kind: StepKind,
    pub attempt: u32,
    pub outcome: ReplyOutcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SagaEvent {
    Reply(StepReply),
    /// The saga's `wake_at` has passed: a reply deadline or a retry backoff ran out.
    TimerFired,
    /// An operator re-drives the saga from where it stopped: the failed compensation, the step
    /// that is stuck, or the action a non-compensatable step blocked. It gets a fresh retry budget.
    Retry,
    /// An operator stops a running saga; every step it may have done is compensated.
    Abort {
        reason: String,
    },
}

/// A command to send to a participant.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCommand {
    pub step_index: usize,
    pub step: StepName,
    pub participant: String,
    pub kind: StepKind,
    pub action: String,
    pub attempt: u32,
    pub deadline: DateTime<Utc>,
}

/// How an attempt ended, for the step history.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    Succeeded {
        output: serde_json::Value,
    },
    Failed(StepError),
    TimedOut,
    /// An operator's retry or abort gave up waiting for this attempt.
    Abandoned,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FinishedAttempt {
    pub step_index: usize,
    pub step: StepName,
    pub kind: StepKind,
    pub attempt: u32,
    pub outcome: AttemptOutcome,
}

/// The result of applying an event: the next state, the attempt that ended (if any) and the
/// commands to send. The caller persists all three atomically.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub next: SagaState,
    pub finished: Option<FinishedAttempt>,
    pub commands: Vec<StepCommand>,
}

/// Why an event does not apply. None of these change anything; the orchestrator counts them.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransitionError {
    #[error("saga is {0} and takes no more events")]
    Terminal(SagaStatus),
    #[error("reply for {got_step}/{got_kind} attempt {got_attempt} does not answer the pending command ({expected})")]
    UnexpectedReply { got_step: String, got_kind: StepKind, got_attempt: u32, expected: String },
    #[error("timer fired before the saga's wake-up time")]
    NotDue,
    #[error("saga state points at step {0}, which its definition does not have")]
    UnknownStep(usize),
    #[error("cannot {action} a {status} saga: {why}")]
    NotAllowed { action: &'static str, status: SagaStatus, why: String },
}

impl TransitionError {
    /// A short, bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            TransitionError::Terminal(_) => "terminal",
            TransitionError::UnexpectedReply { .. } => "unexpected_reply",
            TransitionError::NotDue => "not_due",
            TransitionError::UnknownStep(_) => "unknown_step",
            TransitionError::NotAllowed { .. } => "not_allowed",
        }
    }
}

/// The first transition of a new saga: send the first step's action.
pub fn start(definition: &SagaDefinition, clock: Clock) -> Transition {
    let state = SagaState {
        status: SagaStatus::Running,
        step_index: 0,
        kind: StepKind::Action,
        attempt: 1,
        first_attempt: 1,
        waiting: Waiting::Nothing,
        failure: None,
        attention: None,
    };
    send(definition, state, 0, StepKind::Action, 1, None, clock).expect("a validated definition has at least one step")
}

/// Applies one event to a saga.
pub fn apply(
    definition: &SagaDefinition,
    state: &SagaState,
    event: &SagaEvent,
    clock: Clock,
) -> Result<Transition, TransitionError> {
    match event {
        SagaEvent::Retry => return retry(definition, state, clock),
        SagaEvent::Abort { reason } => return abort(definition, state, reason, clock),
        SagaEvent::Reply(_) | SagaEvent::TimerFired => {}
    }
    if state.status.is_terminal() {
        return Err(TransitionError::Terminal(state.status));
    }
    let step = definition.step(state.step_index).ok_or(TransitionError::UnknownStep(state.step_index))?;
    match event {
        SagaEvent::Reply(reply) => {
            let pending = matches!(state.waiting, Waiting::Reply { .. })
                && reply.step == step.name
                && reply.kind == state.kind
                && reply.attempt == state.attempt;
            if !pending {
                return Err(TransitionError::UnexpectedReply {
                    got_step: reply.step.to_string(),
                    got_kind: reply.kind,
                    got_attempt: reply.attempt,
                    expected: match state.waiting {
                        Waiting::Reply { .. } => format!("{}/{} attempt {}", step.name, state.kind, state.attempt),
                        _ => "no reply is awaited".to_owned(),
                    },
                });
            }
            match &reply.outcome {
                ReplyOutcome::Succeeded { output } => {
                    let finished = finished(state, &step.name, AttemptOutcome::Succeeded { output: output.clone() });
                    on_success(definition, state, finished, clock)
                }
                ReplyOutcome::Failed { error } => {
                    let finished = finished(state, &step.name, AttemptOutcome::Failed(error.clone()));
                    on_failure(definition, state, finished, error.retryable, clock)
                }
            }
        }
        SagaEvent::TimerFired => {
            let due = state.wake_at().is_some_and(|at| at <= clock.now);
            if !due {
                return Err(TransitionError::NotDue);
            }
            match state.waiting {
                Waiting::Reply { .. } => {
                    let finished = finished(state, &step.name, AttemptOutcome::TimedOut);
                    on_failure(definition, state, finished, true, clock)
                }
                Waiting::Retry { .. } => {
                    send(definition, state.clone(), state.step_index, state.kind, state.attempt + 1, None, clock)
                }
                Waiting::Nothing => Err(TransitionError::NotDue),
            }
        }
        SagaEvent::Retry | SagaEvent::Abort { .. } => unreachable!("handled above"),
    }
}

/// An operator's retry: sends the current step (action or compensation) again at once, with the
/// next attempt number (so late replies to earlier attempts are recognised as stale) and a fresh
/// retry budget. The participant's idempotency key is (saga, step, kind), so an attempt that did
/// act before is answered from its record instead of acting twice.
fn retry(definition: &SagaDefinition, state: &SagaState, clock: Clock) -> Result<Transition, TransitionError> {
    let refuse = |why: &str| TransitionError::NotAllowed { action: "retry", status: state.status, why: why.to_owned() };
    let step = definition.step(state.step_index).ok_or(TransitionError::UnknownStep(state.step_index))?;
    let mut next = state.clone();
    let finished = match state.status {
        SagaStatus::Completed => return Err(refuse("every step succeeded; there is nothing to retry")),
        SagaStatus::Failed => {
            return Err(refuse("it failed and every completed step was compensated; start a new saga instead"))
        }
        SagaStatus::NeedsAttention => {
            next.attention = None;
            next.status = match state.kind {
                StepKind::Compensation => SagaStatus::Compensating,
                StepKind::Action => {
                    next.failure = None;
                    SagaStatus::Running
                }
            };
            None
        }
        SagaStatus::Running | SagaStatus::Compensating => match state.waiting {
            Waiting::Reply { .. } => Some(finished(state, &step.name, AttemptOutcome::Abandoned)),
            _ => None,
        },
    };
    let attempt = state.attempt + 1;
    let mut transition = send(definition, next, state.step_index, state.kind, attempt, finished, clock)?;
    transition.next.first_attempt = attempt;
    Ok(transition)
}

/// An operator's abort of a running saga: the current step may have acted, so it is compensated
/// with every step before it, in reverse order. Refused once a step without compensation (the
/// pivot) is done: such a saga can only go forward.
fn abort(
    definition: &SagaDefinition,
    state: &SagaState,
    reason: &str,
    clock: Clock,
) -> Result<Transition, TransitionError> {
    let refuse = |why: String| TransitionError::NotAllowed { action: "abort", status: state.status, why };
    match state.status {
        SagaStatus::Running => {}
        SagaStatus::Compensating => return Err(refuse("it is already compensating".to_owned())),
        SagaStatus::NeedsAttention => {
            return Err(refuse("a compensation needs a human; fix its cause and retry".to_owned()))
        }
        SagaStatus::Completed | SagaStatus::Failed => return Err(refuse("it has ended".to_owned())),
    }
    let step = definition.step(state.step_index).ok_or(TransitionError::UnknownStep(state.step_index))?;
    let undo_from = state.step_index + 1;
    if let Some(blocker) = definition.steps[..undo_from].iter().find(|s| s.compensation.is_none()) {
        return Err(refuse(format!(
            "step {} has no compensation, so the saga is past its pivot and can only go forward",
            blocker.name
        )));
    }
    let finished = match state.waiting {
        Waiting::Reply { .. } => Some(finished(state, &step.name, AttemptOutcome::Abandoned)),
        _ => None,
    };
    let mut next = state.clone();
    next.failure =
        Some(FailureInfo { step: step.name.clone(), code: codes::ABORTED.to_owned(), message: reason.to_owned() });
    compensate_below(definition, next, undo_from, finished, clock)
}

fn finished(state: &SagaState, step: &StepName, outcome: AttemptOutcome) -> FinishedAttempt {
    FinishedAttempt {
        step_index: state.step_index,
        step: step.clone(),
        kind: state.kind,
        attempt: state.attempt,
        outcome,
    }
}

fn on_success(
    definition: &SagaDefinition,
    state: &SagaState,
    finished: FinishedAttempt,
    clock: Clock,
) -> Result<Transition, TransitionError> {
    match state.kind {
        StepKind::Action => {
            let next = state.step_index + 1;
            if next < definition.steps.len() {
                send(definition, state.clone(), next, StepKind::Action, 1, Some(finished), clock)
            } else {
                Ok(end(state, SagaStatus::Completed, Some(finished)))
            }
        }
        StepKind::Compensation => compensate_below(definition, state.clone(), state.step_index, Some(finished), clock),
    }
}

fn on_failure(
    definition: &SagaDefinition,
    state: &SagaState,
    finished: FinishedAttempt,
    retryable: bool,
    clock: Clock,
) -> Result<Transition, TransitionError> {
    let step = &definition.steps[state.step_index];
    let policy: &RetryPolicy = match state.kind {
        StepKind::Action => &step.retry,
        StepKind::Compensation => {
            &step.compensation.as_ref().ok_or(TransitionError::UnknownStep(state.step_index))?.retry
        }
    };
    let (code, message) = match &finished.outcome {
        AttemptOutcome::Failed(error) => (error.code.clone(), error.message.clone()),
        AttemptOutcome::TimedOut | AttemptOutcome::Succeeded { .. } | AttemptOutcome::Abandoned => {
            (codes::STEP_TIMEOUT.to_owned(), format!("no reply within {} ms", timeout_ms(definition, state)))
        }
    };
    // Compensations must finish, so every compensation failure is retried while the policy allows.
    // Attempts count from the start of the current retry budget (an operator's retry renews it).
    let used = state.attempt.saturating_sub(state.first_attempt) + 1;
    let retry = (retryable || state.kind == StepKind::Compensation) && policy.allows_another(used);
    if retry {
        let delay = policy.backoff(used, clock.random);
        let mut next = state.clone();
        next.waiting = Waiting::Retry { at: clock.now + to_chrono(delay) };
        return Ok(Transition { next, finished: Some(finished), commands: vec![] });
    }
    let info = FailureInfo { step: step.name.clone(), code, message };
    match state.kind {
        StepKind::Compensation => {
            let mut next = end(state, SagaStatus::NeedsAttention, Some(finished));
            next.next.attention = Some(info);
            Ok(next)
        }
        StepKind::Action => {
            // A refusal means the step did nothing; a timeout means it may have acted, so it is
            // compensated too (a compensation of an action that never ran is a no-op).
            let timed_out = matches!(finished.outcome, AttemptOutcome::TimedOut);
            let undo_from = if timed_out { state.step_index + 1 } else { state.step_index };
            let mut next = state.clone();
            next.failure = Some(info.clone());
            if let Some(blocker) = definition.steps[..undo_from].iter().find(|s| s.compensation.is_none()) {
                let mut transition = end(&next, SagaStatus::NeedsAttention, Some(finished));
                transition.next.attention = Some(FailureInfo {
                    step: blocker.name.clone(),
                    code: codes::NOT_COMPENSATABLE.to_owned(),
                    message: format!(
                        "step {} failed with {} after step {}, which has no compensation",
                        info.step, info.code, blocker.name
                    ),
                });
                return Ok(transition);
            }
            compensate_below(definition, next, undo_from, Some(finished), clock)
        }
    }
}

fn timeout_ms(definition: &SagaDefinition, state: &SagaState) -> u64 {
    let step = &definition.steps[state.step_index];
    match (state.kind, &step.compensation) {
        (StepKind::Compensation, Some(c)) => c.timeout_ms,
        _ => step.timeout_ms,
    }
}

/// Compensates the highest step below `below` that has a compensation; ends FAILED when none is left.
fn compensate_below(
    definition: &SagaDefinition,
    mut state: SagaState,
    below: usize,
    finished: Option<FinishedAttempt>,
    clock: Clock,
) -> Result<Transition, TransitionError> {
    match (0..below).rev().find(|&i| definition.steps[i].compensation.is_some()) {
        Some(index) => {
            state.status = SagaStatus::Compensating;
            send(definition, state, index, StepKind::Compensation, 1, finished, clock)
        }
        None => Ok(end(&state, SagaStatus::Failed, finished)),
    }
}

fn end(state: &SagaState, status: SagaStatus, finished: Option<FinishedAttempt>) -> Transition {
    let mut next = state.clone();
    next.status = status;
    next.waiting = Waiting::Nothing;
    Transition { next, finished, commands: vec![] }
}

fn send(
    definition: &SagaDefinition,
    mut state: SagaState,
    step_index: usize,
    kind: StepKind,
    attempt: u32,
    finished: Option<FinishedAttempt>,
    clock: Clock,
) -> Result<Transition, TransitionError> {
    let step = definition.step(step_index).ok_or(TransitionError::UnknownStep(step_index))?;
    let (action, timeout_ms) = step.command(kind).ok_or(TransitionError::UnknownStep(step_index))?;
    let action = action.to_owned();
    let deadline = clock.now + ChronoDuration::milliseconds(timeout_ms as i64);
    if attempt == 1 {
        state.first_attempt = 1;
    }
    state.step_index = step_index;
    state.kind = kind;
    state.attempt = attempt;
    state.waiting = Waiting::Reply { deadline };
    let command = StepCommand {
        step_index,
        step: step.name.clone(),
        participant: step.participant.clone(),
        kind,
        action,
        attempt,
        deadline,
    };
    Ok(Transition { next: state, finished, commands: vec![command] })
}

fn to_chrono(duration: std::time::Duration) -> ChronoDuration {
    ChronoDuration::from_std(duration).unwrap_or(ChronoDuration::MAX)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod properties;
