//! The `payment` participant: charge_payment and the compensation refund_payment.

use saga_defs::contract::codes;
use saga_defs::{CommandEnvelope, StepError};
use saga_runtime::participant::{input, unknown_action, Outcome, Participant};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::gateway::{self, Answer};

pub(crate) struct Payments {
    pub(crate) gateway: sqlx::PgPool,
}

#[derive(Deserialize)]
struct Charge {
    order_id: Uuid,
    total_cents: i64,
    currency: String,
    payment_token: String,
}

impl Participant for Payments {
    const NAME: &'static str = "payment";

    async fn handle(&self, conn: &mut PgConnection, command: &CommandEnvelope) -> sqlx::Result<Outcome> {
        let saga_id = command.saga_id.as_uuid();
        match command.action.as_str() {
            "charge_payment" => {
                let charge = match input::<Charge>(command) {
                    Ok(charge) => charge,
                    Err(refusal) => return Ok(refusal),
                };
                if charge.total_cents < 0 {
                    return Ok(Outcome::Refused(StepError::business(
                        codes::INVALID_COMMAND,
                        format!("total_cents must be 0 or more, not {}", charge.total_cents),
                    )));
                }
                match gateway::authorize(&self.gateway, saga_id, &charge.payment_token).await? {
                    Answer::Declined => {
                        return Ok(Outcome::Refused(StepError::business(
                            codes::PAYMENT_DECLINED,
                            "the card was declined",
                        )))
                    }
                    Answer::TimedOut => {
                        return Ok(Outcome::Transient(StepError::transient(
                            codes::PAYMENT_GATEWAY_TIMEOUT,
                            "the payment gateway did not answer in time",
                        )))
                    }
                    Answer::Approved => {}
                }
                // The payment and its ledger entry in one statement.
                sqlx::query(
                    "WITH charged AS (
                         INSERT INTO payments (saga_id, order_id, amount_cents, currency, status)
                         VALUES ($1, $2, $3, $4, 'CHARGED')
                     )
                     INSERT INTO ledger (saga_id, order_id, entry_type, amount_cents) VALUES ($1, $2, 'CHARGE', $3)",
                )
                .bind(saga_id)
                .bind(charge.order_id)
                .bind(charge.total_cents)
                .bind(&charge.currency)
                .execute(&mut *conn)
                .await?;
                Ok(Outcome::Done(json!({"charged_cents": charge.total_cents, "currency": charge.currency})))
            }
            "refund_payment" => {
                let token = command.input.get("payment_token").and_then(|t| t.as_str()).unwrap_or_default();
                if !gateway::refund(&self.gateway, saga_id, token).await? {
                    return Ok(Outcome::Transient(StepError::transient(
                        codes::PAYMENT_GATEWAY_TIMEOUT,
                        "the payment gateway did not answer the refund in time",
                    )));
                }
                let refunded: Option<(Uuid, i64)> = sqlx::query_as(
                    "UPDATE payments SET status = 'REFUNDED', refunded_at = now()
                     WHERE saga_id = $1 AND status = 'CHARGED' RETURNING order_id, amount_cents",
                )
                .bind(saga_id)
                .fetch_optional(&mut *conn)
                .await?;
                let Some((order_id, amount)) = refunded else {
                    // Never charged (or already refunded): nothing to undo.
                    return Ok(Outcome::Done(json!({"refunded_cents": 0})));
                };
                sqlx::query(
                    "INSERT INTO ledger (saga_id, order_id, entry_type, amount_cents) VALUES ($1, $2, 'REFUND', $3)",
                )
                .bind(saga_id)
                .bind(order_id)
                .bind(-amount)
                .execute(&mut *conn)
                .await?;
                Ok(Outcome::Done(json!({"refunded_cents": amount})))
            }
            _ => Ok(unknown_action(command)),
        }
    }
}
