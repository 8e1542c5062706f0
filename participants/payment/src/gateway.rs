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

use std::collections::HashMap;

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

/// The gateway's answers for a batch's new commands, asked for together
/// ([`saga_runtime::participant::Participant::prepare`]): charges and refunds by saga.
#[derive(Debug, Default)]
pub(crate) struct Answers {
    pub(crate) charges: HashMap<Uuid, Answer>,
    pub(crate) refunds: HashMap<Uuid, bool>,
}

/// Calls the simulated gateway once for each of a batch's charges (saga, token), in one
/// statement: one round trip and one commit for the batch instead of one each, one after another.
pub(crate) async fn authorize_all(pool: &PgPool, charges: &[(Uuid, &str)]) -> sqlx::Result<HashMap<Uuid, Answer>> {
    let calls = count_calls(pool, "calls", charges).await?;
    Ok(first_of_each(charges).filter_map(|(saga, token)| Some((saga, decide(token, *calls.get(&saga)?)))).collect())
}

/// [`authorize_all`] for refunds: true where the gateway answered.
pub(crate) async fn refund_all(pool: &PgPool, refunds: &[(Uuid, &str)]) -> sqlx::Result<HashMap<Uuid, bool>> {
    let calls = count_calls(pool, "refund_calls", refunds).await?;
    Ok(first_of_each(refunds)
        .filter_map(|(saga, token)| Some((saga, refund_answered(token, *calls.get(&saga)?))))
        .collect())
}

/// Each saga's first (saga, token): a saga is called once per batch.
fn first_of_each<'c, 't>(calls: &'c [(Uuid, &'t str)]) -> impl Iterator<Item = (Uuid, &'t str)> + 'c {
    let mut seen = std::collections::HashSet::new();
    calls.iter().copied().filter(move |(saga, _)| seen.insert(*saga))
}

/// Adds one call to `column` (`calls` or `refund_calls`) of each saga, in the sagas' order (a
/// fixed lock order), and returns each saga's count after it.
async fn count_calls(pool: &PgPool, column: &'static str, calls: &[(Uuid, &str)]) -> sqlx::Result<HashMap<Uuid, u32>> {
    let mut sagas: Vec<Uuid> = calls.iter().map(|(saga, _)| *saga).collect();
    sagas.sort();
    sagas.dedup();
    if sagas.is_empty() {
        return Ok(HashMap::new());
    }
    let (charges, refunds) = if column == "calls" { (1, 0) } else { (0, 1) };
    let rows: Vec<(Uuid, i32)> = sqlx::query_as(&format!(
        "INSERT INTO gateway_calls (saga_id, calls, refund_calls)
         SELECT saga_id, {charges}, {refunds} FROM UNNEST($1::uuid[]) AS t (saga_id)
         ON CONFLICT (saga_id) DO UPDATE SET {column} = gateway_calls.{column} + 1
         RETURNING saga_id, {column}"
    ))
    .bind(&sagas)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(saga, n)| (saga, n as u32)).collect())
}

/// Calls the simulated gateway for a saga's refund; true when it answered.
pub(crate) async fn refund(pool: &PgPool, saga_id: Uuid, token: &str) -> sqlx::Result<bool> {
    Ok(refund_all(pool, &[(saga_id, token)]).await?.remove(&saga_id).unwrap_or(false))
}

/// Calls the simulated gateway for a saga's charge.
pub(crate) async fn authorize(pool: &PgPool, saga_id: Uuid, token: &str) -> sqlx::Result<Answer> {
    Ok(authorize_all(pool, &[(saga_id, token)]).await?.remove(&saga_id).unwrap_or(Answer::TimedOut))
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
