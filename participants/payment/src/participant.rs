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

/// A charge the gateway is to be asked about: its input read and checked.
fn charge(command: &CommandEnvelope) -> Result<Charge, Outcome> {
    let charge = input::<Charge>(command)?;
    if charge.total_cents < 0 {
        return Err(Outcome::Refused(StepError::business(
            codes::INVALID_COMMAND,
            format!("total_cents must be 0 or more, not {}", charge.total_cents),
        )));
    }
    Ok(charge)
}

fn refund_token(command: &CommandEnvelope) -> &str {
    command.input.get("payment_token").and_then(|t| t.as_str()).unwrap_or_default()
}

impl Participant for Payments {
    const NAME: &'static str = "payment";
    type Prepared = gateway::Answers;

    /// The batch's charges and refunds asked of the gateway together, one call for each kind.
    async fn prepare(&self, commands: &[&CommandEnvelope]) -> sqlx::Result<gateway::Answers> {
        let charges: Vec<(Uuid, Charge)> = commands
            .iter()
            .filter(|c| c.action == "charge_payment")
            .filter_map(|c| Some((c.saga_id.as_uuid(), charge(c).ok()?)))
            .collect();
        let charges: Vec<(Uuid, &str)> =
            charges.iter().map(|(saga, charge)| (*saga, charge.payment_token.as_str())).collect();
        let refunds: Vec<(Uuid, &str)> = commands
            .iter()
            .filter(|c| c.action == "refund_payment")
            .map(|c| (c.saga_id.as_uuid(), refund_token(c)))
            .collect();
        Ok(gateway::Answers {
            charges: gateway::authorize_all(&self.gateway, &charges).await?,
            refunds: gateway::refund_all(&self.gateway, &refunds).await?,
        })
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        command: &CommandEnvelope,
        prepared: &mut gateway::Answers,
    ) -> sqlx::Result<Outcome> {
        let saga_id = command.saga_id.as_uuid();
        match command.action.as_str() {
            "charge_payment" => {
                let charge = match charge(command) {
                    Ok(charge) => charge,
                    Err(refusal) => return Ok(refusal),
                };
                let answer = match prepared.charges.remove(&saga_id) {
                    Some(answer) => answer,
                    None => gateway::authorize(&self.gateway, saga_id, &charge.payment_token).await?,
                };
                match answer {
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
                let answered = match prepared.refunds.remove(&saga_id) {
                    Some(answered) => answered,
                    None => gateway::refund(&self.gateway, saga_id, refund_token(command)).await?,
                };
                if !answered {
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

#[cfg(test)]
mod tests {
    use saga_defs::contract::SCHEMA_VERSION;
    use saga_runtime::db::test_url as url;
    use sqlx::{Connection, Executor, PgPool};

    use super::*;

    fn command(action: &str, kind: &str, token: &str) -> CommandEnvelope {
        serde_json::from_value(json!({
            "schema_version": SCHEMA_VERSION, "message_id": Uuid::new_v4(), "saga_id": Uuid::now_v7(),
            "saga_type": "order_saga", "step": "charge_payment", "kind": kind, "action": action, "attempt": 1,
            "reply_to": "replies", "deadline": "2030-01-01T00:00:00Z",
            "input": {"order_id": Uuid::new_v4(), "total_cents": 1250, "currency": "EUR", "payment_token": token},
        }))
        .unwrap()
    }

    /// A batch's charges and refunds are asked of the gateway once, together, before any is
    /// handled; each command then uses its answer and calls nothing itself (the gateway's pool is
    /// closed by then). A command not prepared still calls the gateway.
    #[tokio::test]
    async fn a_batch_asks_the_gateway_once_and_each_command_uses_its_answer() {
        let name = format!("sagatest_payment_{}", &Uuid::new_v4().simple().to_string()[..10]);
        let mut admin = sqlx::PgConnection::connect(&url("postgres")).await.expect("Postgres is running");
        admin.execute(format!("CREATE DATABASE \"{name}\"").as_str()).await.unwrap();
        let pool = PgPool::connect(&url(&name)).await.unwrap();
        sqlx::migrate!("../../migrations/payment").run(&pool).await.unwrap();
        let payments = Payments { gateway: pool.clone() };

        let commands = [
            command("charge_payment", "ACTION", "tok_visa"),
            command("charge_payment", "ACTION", "tok_declined"),
            command("charge_payment", "ACTION", "tok_timeout_1"),
            command("refund_payment", "COMPENSATION", "tok_refund_fails_1"),
            command("refund_payment", "COMPENSATION", "tok_visa"),
        ];
        let batch: Vec<&CommandEnvelope> = commands.iter().collect();
        let mut prepared = payments.prepare(&batch).await.unwrap();
        let calls: Vec<(i32, i32)> =
            sqlx::query_as("SELECT calls, refund_calls FROM gateway_calls WHERE saga_id = ANY($1) ORDER BY saga_id")
                .bind(commands.iter().map(|c| c.saga_id.as_uuid()).collect::<Vec<_>>())
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(calls, [(1, 0), (1, 0), (1, 0), (0, 1), (0, 1)]);

        pool.close().await;
        let mut conn = sqlx::PgConnection::connect(&url(&name)).await.unwrap();
        let mut outcomes = Vec::new();
        for command in &commands {
            outcomes.push(match payments.handle(&mut conn, command, &mut prepared).await.unwrap() {
                Outcome::Done(output) => format!("done {output}"),
                Outcome::Refused(error) | Outcome::Transient(error) => error.code.to_string(),
            });
        }
        assert_eq!(
            outcomes,
            [
                r#"done {"charged_cents":1250,"currency":"EUR"}"#,
                codes::PAYMENT_DECLINED,
                codes::PAYMENT_GATEWAY_TIMEOUT,
                codes::PAYMENT_GATEWAY_TIMEOUT,
                r#"done {"refunded_cents":0}"#,
            ]
        );
        // Nothing left prepared: a command handled again calls the gateway itself (whose pool is
        // closed here).
        assert!(payments.handle(&mut conn, &commands[2], &mut prepared).await.is_err());

        conn.close().await.unwrap();
        admin.execute(format!("DROP DATABASE \"{name}\" WITH (FORCE)").as_str()).await.unwrap();
    }
}
