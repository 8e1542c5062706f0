//! The `fulfilment` participant: create_shipment and the compensation cancel_shipment.

use saga_defs::contract::codes;
use saga_defs::{CommandEnvelope, StepError};
use saga_runtime::participant::{input, unknown_action, Outcome, Participant};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::address::{self, Address};

pub(crate) struct Fulfilment;

#[derive(Deserialize)]
struct Shipment {
    order_id: Uuid,
    shipping_address: Value,
}

impl Participant for Fulfilment {
    const NAME: &'static str = "fulfilment";
    type Prepared = ();

    async fn handle(&self, conn: &mut PgConnection, command: &CommandEnvelope, _: &mut ()) -> sqlx::Result<Outcome> {
        let saga_id = command.saga_id.as_uuid();
        match command.action.as_str() {
            "create_shipment" => {
                let shipment = match input::<Shipment>(command) {
                    Ok(shipment) => shipment,
                    Err(refusal) => return Ok(refusal),
                };
                let parsed: Address = match serde_json::from_value(shipment.shipping_address.clone()) {
                    Ok(a) => a,
                    Err(e) => {
                        return Ok(Outcome::Refused(StepError::business(
                            codes::INVALID_ADDRESS,
                            format!("unreadable address: {e}"),
                        )))
                    }
                };
                if let Err(reason) = address::check(&parsed) {
                    return Ok(Outcome::Refused(StepError::business(codes::INVALID_ADDRESS, reason)));
                }
                let tracking = format!("TRK-{}", saga_id.simple());
                sqlx::query(
                    "INSERT INTO shipments (saga_id, order_id, address, tracking_number, status) VALUES ($1, $2, $3, $4, 'CREATED')",
                )
                .bind(saga_id)
                .bind(shipment.order_id)
                .bind(&shipment.shipping_address)
                .bind(&tracking)
                .execute(conn)
                .await?;
                Ok(Outcome::Done(json!({"tracking_number": tracking})))
            }
            "cancel_shipment" => {
                let cancelled = sqlx::query(
                    "UPDATE shipments SET status = 'CANCELLED', cancelled_at = now() WHERE saga_id = $1 AND status = 'CREATED'",
                )
                .bind(saga_id)
                .execute(conn)
                .await?;
                Ok(Outcome::Done(json!({"cancelled": cancelled.rows_affected() == 1})))
            }
            _ => Ok(unknown_action(command)),
        }
    }
}
