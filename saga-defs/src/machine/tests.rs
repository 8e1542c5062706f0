//! Table-driven tests of every transition of the saga state machine, on the shipped order saga:
//! 0 verify_order, 1 reserve_inventory, 2 charge_payment (3 attempts), 3 create_shipment,
//! 4 approve_order (no compensation, retried until it succeeds).

use chrono::{TimeZone, Utc};
use serde_json::json;

use super::*;
use crate::contract::ORDER_FULFILMENT;
use crate::definition::Registry;

fn def() -> SagaDefinition {
    Registry::embedded().unwrap().latest(ORDER_FULFILMENT).unwrap().clone()
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
}

fn at_ms(ms: i64) -> DateTime<Utc> {
    t0() + ChronoDuration::milliseconds(ms)
}

fn clock() -> Clock {
    Clock { now: t0(), random: 0.0 }
}

const STEPS: [&str; 5] = ["verify_order", "reserve_inventory", "charge_payment", "create_shipment", "approve_order"];

fn state(status: SagaStatus, step_index: usize, kind: StepKind, attempt: u32, waiting: Waiting) -> SagaState {
    SagaState { status, step_index, kind, attempt, first_attempt: 1, waiting, failure: None, attention: None }
}

fn awaiting(status: SagaStatus, step_index: usize, kind: StepKind, attempt: u32) -> SagaState {
    state(status, step_index, kind, attempt, Waiting::Reply { deadline: at_ms(10_000) })
}

fn ok(step: usize, kind: StepKind, attempt: u32) -> SagaEvent {
    SagaEvent::Reply(StepReply {
        step: StepName::parse(STEPS[step]).unwrap(),
        kind,
        attempt,
        outcome: ReplyOutcome::Succeeded { output: json!({"ok": true}) },
    })
}

fn failed(step: usize, kind: StepKind, attempt: u32, code: &str, retryable: bool) -> SagaEvent {
    SagaEvent::Reply(StepReply {
        step: StepName::parse(STEPS[step]).unwrap(),
        kind,
        attempt,
        outcome: ReplyOutcome::Failed { error: StepError { code: code.into(), message: "m".into(), retryable } },
    })
}

use SagaStatus::{Compensating as COMP, Completed as DONE, Failed as FAILED, NeedsAttention as ATTN, Running as RUN};
use StepKind::{Action as A, Compensation as C};

/// What a transition must produce: status, step, kind, attempt, waiting, and the command sent
/// (action name and attempt) if any.
struct Expect {
    status: SagaStatus,
    step: usize,
    kind: StepKind,
    attempt: u32,
    waiting: Waiting,
    command: Option<(&'static str, u32)>,
    finished: Option<&'static str>,
    failure_code: Option<&'static str>,
    attention_code: Option<&'static str>,
}

fn expect(status: SagaStatus, step: usize, kind: StepKind, attempt: u32, waiting: Waiting) -> Expect {
    Expect {
        status,
        step,
        kind,
        attempt,
        waiting,
        command: None,
        finished: None,
        failure_code: None,
        attention_code: None,
    }
}

impl Expect {
    fn sends(mut self, action: &'static str, attempt: u32) -> Self {
        self.command = Some((action, attempt));
        self
    }
    fn ends(mut self, outcome: &'static str) -> Self {
        self.finished = Some(outcome);
        self
    }
    fn failure(mut self, code: &'static str) -> Self {
        self.failure_code = Some(code);
        self
    }
    fn attention(mut self, code: &'static str) -> Self {
        self.attention_code = Some(code);
        self
    }
}

fn reply_wait() -> Waiting {
    Waiting::Reply { deadline: at_ms(10_000) }
}

fn outcome_label(outcome: &AttemptOutcome) -> &'static str {
    match outcome {
        AttemptOutcome::Succeeded { .. } => "succeeded",
        AttemptOutcome::Failed(_) => "failed",
        AttemptOutcome::TimedOut => "timed_out",
        AttemptOutcome::Abandoned => "abandoned",
    }
}

#[test]
fn starting_a_saga_sends_the_first_action_with_its_deadline() {
    let t = start(&def(), clock());
    assert_eq!(t.next, awaiting(RUN, 0, A, 1));
    assert_eq!(t.commands.len(), 1);
    assert_eq!(t.commands[0].action, "verify_order");
    assert_eq!(t.commands[0].participant, "order");
    assert_eq!(t.commands[0].deadline, at_ms(10_000));
    assert!(t.finished.is_none());
}

#[test]
fn every_transition_of_the_order_saga() {
    let late = Clock { now: at_ms(10_001), random: 0.0 };
    let comp_pending = |step, attempt| {
        let mut s = awaiting(COMP, step, C, attempt);
        s.failure = Some(FailureInfo {
            step: StepName::parse("charge_payment").unwrap(),
            code: "PAYMENT_DECLINED".into(),
            message: "m".into(),
        });
        s
    };
    let cases: Vec<(&str, SagaState, SagaEvent, Clock, Expect)> = vec![
        (
            "a step succeeds: the next step's action is sent",
            awaiting(RUN, 0, A, 1),
            ok(0, A, 1),
            clock(),
            expect(RUN, 1, A, 1, reply_wait()).sends("reserve_inventory", 1).ends("succeeded"),
        ),
        (
            "a retried step succeeds: the next step starts at attempt 1",
            awaiting(RUN, 2, A, 3),
            ok(2, A, 3),
            clock(),
            expect(RUN, 3, A, 1, reply_wait()).sends("create_shipment", 1).ends("succeeded"),
        ),
        (
            "the shipment succeeds: the order is approved",
            awaiting(RUN, 3, A, 1),
            ok(3, A, 1),
            clock(),
            expect(RUN, 4, A, 1, reply_wait()).sends("approve_order", 1).ends("succeeded"),
        ),
        (
            "the last step succeeds: the saga is completed",
            awaiting(RUN, 4, A, 1),
            ok(4, A, 1),
            clock(),
            expect(DONE, 4, A, 1, Waiting::Nothing).ends("succeeded"),
        ),
        (
            "the first step is refused: nothing to undo, the saga fails at once",
            awaiting(RUN, 0, A, 1),
            failed(0, A, 1, "ORDER_NOT_FOUND", false),
            clock(),
            expect(FAILED, 0, A, 1, Waiting::Nothing).ends("failed").failure("ORDER_NOT_FOUND"),
        ),
        (
            "no stock: the order is rejected (verify_order compensated)",
            awaiting(RUN, 1, A, 1),
            failed(1, A, 1, "INVENTORY_UNAVAILABLE", false),
            clock(),
            expect(COMP, 0, C, 1, reply_wait())
                .sends("reject_order", 1)
                .ends("failed")
                .failure("INVENTORY_UNAVAILABLE"),
        ),
        (
            "a declined card: the reservation is released first",
            awaiting(RUN, 2, A, 1),
            failed(2, A, 1, "PAYMENT_DECLINED", false),
            clock(),
            expect(COMP, 1, C, 1, reply_wait())
                .sends("release_inventory", 1)
                .ends("failed")
                .failure("PAYMENT_DECLINED"),
        ),
        (
            "an undeliverable address: the charge is refunded first",
            awaiting(RUN, 3, A, 1),
            failed(3, A, 1, "INVALID_ADDRESS", false),
            clock(),
            expect(COMP, 2, C, 1, reply_wait()).sends("refund_payment", 1).ends("failed").failure("INVALID_ADDRESS"),
        ),
        (
            "a transient failure with attempts left waits for the backoff",
            awaiting(RUN, 2, A, 1),
            failed(2, A, 1, "PAYMENT_GATEWAY_TIMEOUT", true),
            clock(),
            expect(RUN, 2, A, 1, Waiting::Retry { at: at_ms(200) }).ends("failed"),
        ),
        (
            "the backoff grows with the attempt number",
            awaiting(RUN, 2, A, 2),
            failed(2, A, 2, "PAYMENT_GATEWAY_TIMEOUT", true),
            clock(),
            expect(RUN, 2, A, 2, Waiting::Retry { at: at_ms(400) }).ends("failed"),
        ),
        (
            "a transient failure on the last attempt compensates like a refusal",
            awaiting(RUN, 2, A, 3),
            failed(2, A, 3, "PAYMENT_GATEWAY_TIMEOUT", true),
            clock(),
            expect(COMP, 1, C, 1, reply_wait())
                .sends("release_inventory", 1)
                .ends("failed")
                .failure("PAYMENT_GATEWAY_TIMEOUT"),
        ),
        (
            "a backoff that ran out sends the next attempt",
            state(RUN, 2, A, 1, Waiting::Retry { at: at_ms(200) }),
            SagaEvent::TimerFired,
            Clock { now: at_ms(200), random: 0.0 },
            expect(RUN, 2, A, 2, Waiting::Reply { deadline: at_ms(10_200) }).sends("charge_payment", 2),
        ),
        (
            "no reply before the deadline is retried",
            awaiting(RUN, 2, A, 1),
            SagaEvent::TimerFired,
            late,
            expect(RUN, 2, A, 1, Waiting::Retry { at: at_ms(10_201) }).ends("timed_out"),
        ),
        (
            "no reply on the last attempt compensates that step too, since it may have acted",
            awaiting(RUN, 2, A, 3),
            SagaEvent::TimerFired,
            late,
            expect(COMP, 2, C, 1, Waiting::Reply { deadline: at_ms(20_001) })
                .sends("refund_payment", 1)
                .ends("timed_out")
                .failure("STEP_TIMEOUT"),
        ),
        (
            "a compensation succeeds: the one below it runs",
            comp_pending(1, 1),
            ok(1, C, 1),
            clock(),
            expect(COMP, 0, C, 1, reply_wait()).sends("reject_order", 1).ends("succeeded").failure("PAYMENT_DECLINED"),
        ),
        (
            "the last compensation succeeds: the saga has failed cleanly",
            comp_pending(0, 2),
            ok(0, C, 2),
            clock(),
            expect(FAILED, 0, C, 2, Waiting::Nothing).ends("succeeded").failure("PAYMENT_DECLINED"),
        ),
        (
            "a failed compensation is retried even when the error says it is not retryable",
            comp_pending(1, 1),
            failed(1, C, 1, "DB_DOWN", false),
            clock(),
            expect(COMP, 1, C, 1, Waiting::Retry { at: at_ms(200) }).ends("failed").failure("PAYMENT_DECLINED"),
        ),
        (
            "a compensation that fails on its last attempt needs attention",
            comp_pending(1, 10),
            failed(1, C, 10, "DB_DOWN", true),
            clock(),
            expect(ATTN, 1, C, 10, Waiting::Nothing).ends("failed").failure("PAYMENT_DECLINED").attention("DB_DOWN"),
        ),
        (
            "a compensation that times out on its last attempt needs attention",
            comp_pending(2, 10),
            SagaEvent::TimerFired,
            late,
            expect(ATTN, 2, C, 10, Waiting::Nothing)
                .ends("timed_out")
                .failure("PAYMENT_DECLINED")
                .attention("STEP_TIMEOUT"),
        ),
        (
            "a compensation's backoff ran out: it is sent again",
            state(COMP, 1, C, 4, Waiting::Retry { at: at_ms(0) }),
            SagaEvent::TimerFired,
            clock(),
            expect(COMP, 1, C, 5, reply_wait()).sends("release_inventory", 5),
        ),
        (
            "a step retried until it succeeds keeps retrying past any count",
            awaiting(RUN, 4, A, 1000),
            failed(4, A, 1000, "DB_DOWN", true),
            clock(),
            expect(RUN, 4, A, 1000, Waiting::Retry { at: at_ms(30_000) }).ends("failed"),
        ),
        (
            "a refusal of the last step undoes every compensatable step before it",
            awaiting(RUN, 4, A, 1),
            failed(4, A, 1, "ORDER_CANCELLED", false),
            clock(),
            expect(COMP, 3, C, 1, reply_wait()).sends("cancel_shipment", 1).ends("failed").failure("ORDER_CANCELLED"),
        ),
    ];
    for (name, before, event, clock, want) in cases {
        let t = apply(&def(), &before, &event, clock).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.next.status, want.status, "{name}: status");
        assert_eq!(
            (t.next.step_index, t.next.kind, t.next.attempt),
            (want.step, want.kind, want.attempt),
            "{name}: position"
        );
        assert_eq!(t.next.waiting, want.waiting, "{name}: waiting");
        let sent: Vec<(&str, u32)> = t.commands.iter().map(|c| (c.action.as_str(), c.attempt)).collect();
        assert_eq!(sent, want.command.into_iter().collect::<Vec<_>>(), "{name}: commands");
        assert_eq!(t.finished.as_ref().map(|f| outcome_label(&f.outcome)), want.finished, "{name}: finished attempt");
        assert_eq!(t.next.failure.as_ref().map(|f| f.code.as_str()), want.failure_code, "{name}: failure");
        assert_eq!(t.next.attention.as_ref().map(|f| f.code.as_str()), want.attention_code, "{name}: attention");
    }
}

#[test]
fn events_that_do_not_apply_are_refused_without_a_change() {
    let cases: Vec<(&str, SagaState, SagaEvent, Clock, &str)> = vec![
        ("a reply to a completed saga", state(DONE, 4, A, 1, Waiting::Nothing), ok(4, A, 1), clock(), "terminal"),
        ("a reply to a failed saga", state(FAILED, 0, C, 1, Waiting::Nothing), ok(0, C, 1), clock(), "terminal"),
        (
            "a timer on a saga that needs attention",
            state(ATTN, 1, C, 10, Waiting::Nothing),
            SagaEvent::TimerFired,
            clock(),
            "terminal",
        ),
        ("a reply for an older attempt", awaiting(RUN, 2, A, 2), ok(2, A, 1), clock(), "unexpected_reply"),
        (
            "a duplicate of the reply that moved the saga on",
            awaiting(RUN, 1, A, 1),
            ok(0, A, 1),
            clock(),
            "unexpected_reply",
        ),
        (
            "an action reply while compensating that step",
            awaiting(COMP, 1, C, 1),
            ok(1, A, 1),
            clock(),
            "unexpected_reply",
        ),
        (
            "a reply during a backoff",
            state(RUN, 2, A, 1, Waiting::Retry { at: at_ms(200) }),
            ok(2, A, 1),
            clock(),
            "unexpected_reply",
        ),
        ("a timer before the deadline", awaiting(RUN, 2, A, 1), SagaEvent::TimerFired, clock(), "not_due"),
        ("a state beyond the definition", awaiting(RUN, 9, A, 1), ok(0, A, 1), clock(), "unknown_step"),
    ];
    for (name, before, event, clock, label) in cases {
        let err = apply(&def(), &before, &event, clock).expect_err(name);
        assert_eq!(err.label(), label, "{name}: {err}");
    }
}

#[test]
fn a_failure_after_a_step_without_compensation_needs_attention() {
    let text = r#"{"name":"pivot","version":1,"steps":[
        {"name":"a","participant":"p","action":"a","timeout_ms":100,
         "retry":{"max_attempts":1,"initial_backoff_ms":1,"max_backoff_ms":1},
         "compensation":{"action":"undo_a","timeout_ms":100,"retry":{"max_attempts":1,"initial_backoff_ms":1,"max_backoff_ms":1}}},
        {"name":"pivot","participant":"p","action":"pivot","timeout_ms":100,"retry":{"max_attempts":1,"initial_backoff_ms":1,"max_backoff_ms":1}},
        {"name":"after","participant":"p","action":"after","timeout_ms":100,"retry":{"max_attempts":null,"initial_backoff_ms":1,"max_backoff_ms":1}}]}"#;
    let definition = SagaDefinition::from_json("pivot.json", text).unwrap();
    let event = SagaEvent::Reply(StepReply {
        step: StepName::parse("after").unwrap(),
        kind: A,
        attempt: 1,
        outcome: ReplyOutcome::Failed { error: StepError::business("NO", "refused") },
    });
    let t = apply(&definition, &awaiting(RUN, 2, A, 1), &event, clock()).unwrap();
    assert_eq!(t.next.status, ATTN);
    assert_eq!(t.next.attention.unwrap().code, codes::NOT_COMPENSATABLE);
    assert!(t.commands.is_empty());

    // The pivot itself failing is an ordinary failure: undo the step before it.
    let pivot_refused = SagaEvent::Reply(StepReply {
        step: StepName::parse("pivot").unwrap(),
        kind: A,
        attempt: 1,
        outcome: ReplyOutcome::Failed { error: StepError::business("NO", "refused") },
    });
    let t = apply(&definition, &awaiting(RUN, 1, A, 1), &pivot_refused, clock()).unwrap();
    assert_eq!(t.next.status, COMP);
    assert_eq!(t.commands[0].action, "undo_a");
}

#[test]
fn jitter_shortens_the_backoff_by_the_random_fraction() {
    let t = apply(
        &def(),
        &awaiting(RUN, 2, A, 1),
        &failed(2, A, 1, "PAYMENT_GATEWAY_TIMEOUT", true),
        Clock { now: t0(), random: 0.5 },
    )
    .unwrap();
    // 200 ms, less 20 % jitter times 0.5.
    assert_eq!(t.next.waiting, Waiting::Retry { at: at_ms(180) });
}

fn attention_on_compensation() -> SagaState {
    let mut s = state(ATTN, 1, C, 10, Waiting::Nothing);
    s.failure = Some(FailureInfo {
        step: StepName::parse("charge_payment").unwrap(),
        code: "PAYMENT_DECLINED".into(),
        message: "m".into(),
    });
    s.attention = Some(FailureInfo {
        step: StepName::parse("reserve_inventory").unwrap(),
        code: "STEP_TIMEOUT".into(),
        message: "m".into(),
    });
    s
}

#[test]
fn an_operator_retry_redrives_the_failed_compensation_with_a_fresh_budget() {
    let t = apply(&def(), &attention_on_compensation(), &SagaEvent::Retry, clock()).unwrap();
    assert_eq!(t.next.status, COMP);
    assert_eq!((t.next.step_index, t.next.kind, t.next.attempt, t.next.first_attempt), (1, C, 11, 11));
    assert_eq!(t.next.waiting, reply_wait());
    assert!(t.next.attention.is_none(), "the attention is cleared");
    assert_eq!(t.next.failure.as_ref().unwrap().code, "PAYMENT_DECLINED", "the forward failure is kept");
    assert_eq!(t.commands.len(), 1);
    assert_eq!((t.commands[0].action.as_str(), t.commands[0].attempt), ("release_inventory", 11));
    assert!(t.finished.is_none(), "no attempt was pending");

    // The renewed budget: attempt 11 failing is retried (10 more attempts allowed), not parked.
    let failure = failed(1, C, 11, "INVENTORY_DOWN", true);
    let after = apply(&def(), &t.next, &failure, clock()).unwrap();
    assert_eq!(after.next.status, COMP);
    assert!(matches!(after.next.waiting, Waiting::Retry { .. }));
    // And the 10th attempt of the new budget parks it again.
    let mut last = t.next.clone();
    last.attempt = 20;
    let parked = apply(&def(), &last, &failed(1, C, 20, "INVENTORY_DOWN", true), clock()).unwrap();
    assert_eq!(parked.next.status, ATTN);
}

#[test]
fn an_operator_retry_of_a_stuck_step_abandons_the_pending_attempt_and_sends_the_next() {
    let t = apply(&def(), &awaiting(RUN, 2, A, 1), &SagaEvent::Retry, clock()).unwrap();
    assert_eq!((t.next.status, t.next.step_index, t.next.kind, t.next.attempt), (RUN, 2, A, 2));
    assert_eq!(t.finished.as_ref().map(|f| (&f.outcome, f.attempt)), Some((&AttemptOutcome::Abandoned, 1)));
    assert_eq!((t.commands[0].action.as_str(), t.commands[0].attempt), ("charge_payment", 2));
    // A late reply to the abandoned attempt is stale.
    assert_eq!(apply(&def(), &t.next, &ok(2, A, 1), clock()).unwrap_err().label(), "unexpected_reply");

    // During a backoff, nothing is pending: the next attempt goes out now.
    let backing_off = state(COMP, 0, C, 3, Waiting::Retry { at: at_ms(5_000) });
    let t = apply(&def(), &backing_off, &SagaEvent::Retry, clock()).unwrap();
    assert!(t.finished.is_none());
    assert_eq!((t.commands[0].action.as_str(), t.commands[0].attempt), ("reject_order", 4));
}

#[test]
fn an_operator_retry_of_a_blocked_action_runs_it_again() {
    let mut s = state(ATTN, 3, A, 1, Waiting::Nothing);
    s.failure =
        Some(FailureInfo { step: StepName::parse("create_shipment").unwrap(), code: "X".into(), message: "m".into() });
    s.attention = s.failure.clone();
    let t = apply(&def(), &s, &SagaEvent::Retry, clock()).unwrap();
    assert_eq!((t.next.status, t.next.attempt), (RUN, 2));
    assert!(t.next.failure.is_none() && t.next.attention.is_none());
    assert_eq!(t.commands[0].action, "create_shipment");
}

#[test]
fn an_operator_abort_compensates_the_current_step_and_everything_before_it() {
    let reason = SagaEvent::Abort { reason: "customer called".into() };
    let t = apply(&def(), &awaiting(RUN, 2, A, 1), &reason, clock()).unwrap();
    assert_eq!(t.next.status, COMP);
    assert_eq!((t.commands[0].action.as_str(), t.commands[0].attempt), ("refund_payment", 1));
    let failure = t.next.failure.as_ref().unwrap();
    assert_eq!(
        (failure.step.as_str(), failure.code.as_str(), failure.message.as_str()),
        ("charge_payment", "ABORTED", "customer called")
    );
    assert_eq!(t.finished.as_ref().map(|f| &f.outcome), Some(&AttemptOutcome::Abandoned));

    // Aborting the first step rejects the order.
    let t = apply(&def(), &awaiting(RUN, 0, A, 1), &reason, clock()).unwrap();
    assert_eq!(t.commands[0].action, "reject_order");
}

#[test]
fn operator_actions_the_state_does_not_allow_are_refused() {
    let reason = || SagaEvent::Abort { reason: "r".into() };
    let cases: Vec<(&str, SagaState, SagaEvent)> = vec![
        ("retry a completed saga", state(DONE, 4, A, 1, Waiting::Nothing), SagaEvent::Retry),
        ("retry a failed saga", state(FAILED, 0, C, 1, Waiting::Nothing), SagaEvent::Retry),
        ("abort a completed saga", state(DONE, 4, A, 1, Waiting::Nothing), reason()),
        ("abort a failed saga", state(FAILED, 0, C, 1, Waiting::Nothing), reason()),
        ("abort a compensating saga", awaiting(COMP, 1, C, 1), reason()),
        ("abort a saga that needs attention", attention_on_compensation(), reason()),
        ("abort past the pivot", awaiting(RUN, 4, A, 1), reason()),
    ];
    for (name, before, event) in cases {
        let err = apply(&def(), &before, &event, clock()).expect_err(name);
        assert_eq!(err.label(), "not_allowed", "{name}: {err}");
    }
}
