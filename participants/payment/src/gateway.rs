//! A deterministic stand-in for a card gateway. Tokens decide the answer:
//!
//! | token | answer |
//! | --- | --- |
//! | `tok_declined` (or any token starting `tok_decline`) | declined (`PAYMENT_DECLINED`) |
//! | `tok_timeout_N` | times out (`PAYMENT_GATEWAY_TIMEOUT`) on the first N calls for a saga, then approves |
//! | `tok_gateway_down` | always times out |
//! | `tok_refund_fails_N` | charges approved; the first N refunds for a saga time out |
//! | `tok_refund_fails_forever` | charges approved; every refund times out |
//! | anything else | approved |
//!
//! The count of calls is the gateway's own state, kept outside the participant's transaction
//! (a real gateway remembers calls whatever the caller rolls back).

use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    Approved,
    Declined,
    TimedOut,
}

/// What the gateway answers to the `call`-th call (1-based) with `token`.
pub(crate) fn decide(token: &str, call: u32) -> Answer {
    if token.starts_with("tok_decline") {
        return Answer::Declined;
    }
    if token == "tok_gateway_down" {
        return Answer::TimedOut;
    }
    if let Some(n) = token.strip_prefix("tok_timeout_").and_then(|n| n.parse::<u32>().ok()) {
        if call <= n {
            return Answer::TimedOut;
        }
    }
    Answer::Approved
}

/// Whether the `call`-th refund (1-based) with `token` is answered.
pub(crate) fn refund_answered(token: &str, call: u32) -> bool {
    if token == "tok_refund_fails_forever" {
        return false;
    }
    match token.strip_prefix("tok_refund_fails_").and_then(|n| n.parse::<u32>().ok()) {
        Some(n) => call > n,
        None => true,
    }
}

/// Calls the simulated gateway for a saga's refund; true when it answered.
pub(crate) async fn refund(pool: &PgPool, saga_id: Uuid, token: &str) -> sqlx::Result<bool> {
    let call: i32 = sqlx::query_scalar(
        "INSERT INTO gateway_calls (saga_id, calls, refund_calls) VALUES ($1, 0, 1)
         ON CONFLICT (saga_id) DO UPDATE SET refund_calls = gateway_calls.refund_calls + 1 RETURNING refund_calls",
    )
    .bind(saga_id)
    .fetch_one(pool)
    .await?;
    Ok(refund_answered(token, call as u32))
}

/// Calls the simulated gateway for a saga's charge.
pub(crate) async fn authorize(pool: &PgPool, saga_id: Uuid, token: &str) -> sqlx::Result<Answer> {
    let call: i32 = sqlx::query_scalar(
        "INSERT INTO gateway_calls (saga_id, calls) VALUES ($1, 1)
         ON CONFLICT (saga_id) DO UPDATE SET calls = gateway_calls.calls + 1 RETURNING calls",
    )
    .bind(saga_id)
    .fetch_one(pool)
    .await?;
    Ok(decide(token, call as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_decide_the_gateway_answer() {
        assert_eq!(decide("tok_visa", 1), Answer::Approved);
        assert_eq!(decide("tok_declined", 1), Answer::Declined);
        assert_eq!(decide("tok_decline_insufficient_funds", 3), Answer::Declined);
        assert_eq!(decide("tok_gateway_down", 99), Answer::TimedOut);
        let twice: Vec<Answer> = (1..=3).map(|call| decide("tok_timeout_2", call)).collect();
        assert_eq!(twice, [Answer::TimedOut, Answer::TimedOut, Answer::Approved]);
        assert_eq!(decide("tok_timeout_x", 1), Answer::Approved);
        assert_eq!(decide("tok_refund_fails_3", 1), Answer::Approved);
        let refunds: Vec<bool> = (1..=4).map(|call| refund_answered("tok_refund_fails_3", call)).collect();
        assert_eq!(refunds, [false, false, false, true]);
        assert!(!refund_answered("tok_refund_fails_forever", 1000));
        assert!(refund_answered("tok_visa", 1));
    }
}
