//! The `order` participant: verify_order, approve_order and the compensation reject_order.

use saga_defs::contract::codes;
use saga_defs::{CommandEnvelope, StepError};
use saga_runtime::participant::{input, unknown_action, Outcome, Participant};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

pub(crate) struct Orders;

#[derive(Deserialize)]
struct OrderRef {
    order_id: Uuid,
}

impl Participant for Orders {
    const NAME: &'static str = "order";
    type Prepared = ();

    async fn handle(&self, conn: &mut PgConnection, command: &CommandEnvelope, _: &mut ()) -> sqlx::Result<Outcome> {
        let order = match input::<OrderRef>(command) {
            Ok(order) => order.order_id,
            Err(refusal) => return Ok(refusal),
        };
        match command.action.as_str() {
            "verify_order" => move_status(conn, order, "PENDING", "APPROVAL_PENDING").await,
            "approve_order" => move_status(conn, order, "APPROVAL_PENDING", "APPROVED").await,
            "reject_order" => {
                let (code, reason) = match &command.failure {
                    Some(f) => (f.code.clone(), format!("{} failed: {}", f.step, f.message)),
                    None => ("SAGA_FAILED".to_owned(), "the order saga failed".to_owned()),
                };
                let rejected = sqlx::query(
                    "UPDATE orders SET status = 'REJECTED', rejection_code = $2, rejection_reason = $3, updated_at = now()
                     WHERE id = $1 AND status IN ('PENDING', 'APPROVAL_PENDING')",
                )
                .bind(order)
                .bind(&code)
                .bind(&reason)
                .execute(conn)
                .await?;
                Ok(Outcome::Done(json!({"rejected": rejected.rows_affected() == 1, "code": code})))
            }
            _ => Ok(unknown_action(command)),
        }
    }
}

/// Moves an order from one status to the next; already there counts as done. The move is one
/// statement; the order is read only when it did not apply, to say why.
async fn move_status(conn: &mut PgConnection, order: Uuid, from: &str, to: &str) -> sqlx::Result<Outcome> {
    if advance(conn, order, from, to).await? {
        return Ok(Outcome::Done(json!({"status": to})));
    }
    // Locked: what it says stays true until the batch commits.
    let current: Option<String> = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1 FOR UPDATE")
        .bind(order)
        .fetch_optional(&mut *conn)
        .await?;
    match current.as_deref() {
        None => Ok(Outcome::Refused(StepError::business(codes::ORDER_NOT_FOUND, format!("no order {order}")))),
        Some(status) if status == to => Ok(Outcome::Done(json!({"status": to}))),
        // Committed in `from` since the update looked (an order written meanwhile).
        Some(status) if status == from => {
            advance(conn, order, from, to).await?;
            Ok(Outcome::Done(json!({"status": to})))
        }
        Some(status) => Ok(Outcome::Refused(StepError::business(
            "ORDER_NOT_PENDING",
            format!("order {order} is {status}, not {from}"),
        ))),
    }
}

async fn advance(conn: &mut PgConnection, order: Uuid, from: &str, to: &str) -> sqlx::Result<bool> {
    let moved = sqlx::query("UPDATE orders SET status = $3, updated_at = now() WHERE id = $1 AND status = $2")
        .bind(order)
        .bind(from)
        .bind(to)
        .execute(conn)
        .await?;
    Ok(moved.rows_affected() == 1)
}
