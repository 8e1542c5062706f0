//! Property-based tests of the state machine: random sequences of replies (fresh, duplicated,
//! stale, reordered, never sent), timers (due and early), retries and aborts, applied to the
//! shipped order saga. Whatever arrives:
//! - COMPLETED and FAILED take no more events; NEEDS_ATTENTION is left only by an operator's retry;
//! - an event that does not apply changes nothing (the engine then writes nothing and the
//!   saga's version stays), and one that applies yields exactly one new state (one version);
//! - no two commands ever share (step, kind, attempt), so a late reply is never mistaken;
//! - compensations succeed in strictly decreasing step order, at most once per step, and only
//!   for steps whose action was sent; a FAILED saga compensated every step whose action succeeded.

use std::collections::BTreeSet;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::contract::ORDER_FULFILMENT;
use crate::definition::Registry;

/// What the generator asks for; interpreted against the saga's state at that point.
#[derive(Debug, Clone)]
enum Move {
    /// A reply to the pending command: 0 success, 1 business failure, 2 transient failure.
    ReplyPending(u8),
    /// The same reply again, or a reply to an earlier command (a duplicate or a stale answer).
    ReplyEarlier {
        pick: usize,
        outcome: u8,
    },
    /// A reply to a command never sent.
    ReplyNeverSent {
        step: usize,
        compensation: bool,
        attempt: u32,
    },
    /// The timer, when due.
    TimerDue,
    /// The timer, before the saga's wake-up time.
    TimerEarly,
    Retry,
    Abort,
}

fn moves() -> impl Strategy<Value = Move> {
    prop_oneof![
        6 => (0u8..3).prop_map(Move::ReplyPending),
        2 => (any::<usize>(), 0u8..3).prop_map(|(pick, outcome)| Move::ReplyEarlier { pick, outcome }),
        1 => (0usize..6, any::<bool>(), 0u32..6)
            .prop_map(|(step, compensation, attempt)| Move::ReplyNeverSent { step, compensation, attempt }),
        2 => Just(Move::TimerDue),
        1 => Just(Move::TimerEarly),
        1 => Just(Move::Retry),
        1 => Just(Move::Abort),
    ]
}

fn outcome(code: u8) -> ReplyOutcome {
    match code {
        0 => ReplyOutcome::Succeeded { output: json!({"ok": true}) },
        1 => {
            ReplyOutcome::Failed { error: StepError { code: "REFUSED".into(), message: "no".into(), retryable: false } }
        }
        _ => {
            ReplyOutcome::Failed { error: StepError { code: "BUSY".into(), message: "later".into(), retryable: true } }
        }
    }
}

fn reply(definition: &SagaDefinition, step: usize, kind: StepKind, attempt: u32, code: u8) -> SagaEvent {
    SagaEvent::Reply(StepReply { step: definition.steps[step].name.clone(), kind, attempt, outcome: outcome(code) })
}

/// What the test remembers of a saga's life.
#[derive(Default)]
struct Record {
    /// Every command sent: (step, kind, attempt).
    sent: Vec<(usize, StepKind, u32)>,
    /// Steps whose action succeeded, in order.
    succeeded: Vec<usize>,
    /// Steps whose compensation succeeded, in order.
    compensated: Vec<usize>,
    /// Transitions that applied (the engine's version, less the start's).
    applied: u64,
}

fn run(moves: &[Move]) -> Result<(), TestCaseError> {
    let definition = Registry::embedded().unwrap().latest(ORDER_FULFILMENT).unwrap().clone();
    let mut now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let started = start(&definition, Clock { now, random: 0.5 });
    let mut record = Record::default();
    record.sent.extend(started.commands.iter().map(|c| (c.step_index, c.kind, c.attempt)));
    let mut state = started.next;
    for m in moves {
        now += ChronoDuration::milliseconds(10);
        let pending = match state.waiting {
            Waiting::Reply { .. } => Some((state.step_index, state.kind, state.attempt)),
            _ => None,
        };
        let (event, clock_at) = match m {
            Move::ReplyPending(code) => match pending {
                Some((step, kind, attempt)) => (reply(&definition, step, kind, attempt, *code), now),
                None => continue,
            },
            Move::ReplyEarlier { pick, outcome } => {
                let (step, kind, attempt) = record.sent[pick % record.sent.len()];
                (reply(&definition, step, kind, attempt, *outcome), now)
            }
            Move::ReplyNeverSent { step, compensation, attempt } => {
                let kind = if *compensation { StepKind::Compensation } else { StepKind::Action };
                let step = step % definition.steps.len();
                if record.sent.contains(&(step, kind, *attempt)) {
                    continue;
                }
                (reply(&definition, step, kind, *attempt, 0), now)
            }
            Move::TimerDue => match state.wake_at() {
                Some(at) => {
                    now = now.max(at);
                    (SagaEvent::TimerFired, now)
                }
                None => (SagaEvent::TimerFired, now),
            },
            Move::TimerEarly => match state.wake_at() {
                Some(at) if at > now => (SagaEvent::TimerFired, now),
                _ => continue,
            },
            Move::Retry => (SagaEvent::Retry, now),
            Move::Abort => (SagaEvent::Abort { reason: "test".into() }, now),
        };
        let before = state.clone();
        let result = apply(&definition, &state, &event, Clock { now: clock_at, random: 0.5 });
        let Ok(transition) = result else {
            // Refused: nothing changes, so the engine writes nothing and keeps the version.
            continue;
        };
        record.applied += 1;
        // Ended sagas take no more events; NEEDS_ATTENTION is left only by an operator's retry.
        prop_assert!(
            !matches!(before.status, SagaStatus::Completed | SagaStatus::Failed),
            "a {} saga took {event:?}",
            before.status
        );
        if before.status == SagaStatus::NeedsAttention {
            prop_assert_eq!(&event, &SagaEvent::Retry, "only a retry leaves NEEDS_ATTENTION");
        }
        if let Some(finished) = &transition.finished {
            prop_assert_eq!(
                Some((finished.step_index, finished.kind, finished.attempt)),
                pending,
                "only the pending attempt can finish"
            );
            if let AttemptOutcome::Succeeded { .. } = finished.outcome {
                match finished.kind {
                    StepKind::Action => record.succeeded.push(finished.step_index),
                    StepKind::Compensation => {
                        let step = finished.step_index;
                        prop_assert!(!record.compensated.contains(&step), "step {step} compensated twice");
                        prop_assert!(
                            record.compensated.last().is_none_or(|last| *last > step),
                            "compensations out of order: {:?} then {step}",
                            record.compensated
                        );
                        prop_assert!(
                            record.sent.iter().any(|(s, k, _)| *s == step && *k == StepKind::Action),
                            "step {step} compensated without its action ever being sent"
                        );
                        record.compensated.push(step);
                    }
                }
            }
        }
        for command in &transition.commands {
            let key = (command.step_index, command.kind, command.attempt);
            prop_assert!(!record.sent.contains(&key), "command {key:?} sent twice");
            prop_assert!(
                record.sent.iter().all(|(s, k, a)| !(*s == key.0 && *k == key.1) || *a < key.2),
                "attempt numbers of {key:?} do not rise"
            );
            record.sent.push(key);
        }
        if transition.next.status == SagaStatus::Failed {
            let undone: BTreeSet<usize> = record.compensated.iter().copied().collect();
            for step in &record.succeeded {
                prop_assert!(
                    undone.contains(step),
                    "FAILED without compensating step {step}: {:?}",
                    record.compensated
                );
            }
        }
        state = transition.next;
    }
    prop_assert!(record.applied <= moves.len() as u64);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn whatever_arrives_the_saga_keeps_its_promises(moves in prop::collection::vec(moves(), 1..80)) {
        run(&moves)?;
    }
}
