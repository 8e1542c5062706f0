//! The `inventory` participant: reserve_inventory (all items or none) and release_inventory.

use std::collections::BTreeMap;

use saga_defs::contract::codes;
use saga_defs::{CommandEnvelope, StepError};
use saga_runtime::participant::{input, unknown_action, Outcome, Participant};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgConnection;

pub(crate) struct Inventory;

#[derive(Deserialize)]
struct Item {
    sku: String,
    quantity: i64,
}

#[derive(Deserialize)]
struct Order {
    items: Vec<Item>,
}

impl Participant for Inventory {
    const NAME: &'static str = "inventory";

    async fn handle(&self, conn: &mut PgConnection, command: &CommandEnvelope) -> sqlx::Result<Outcome> {
        let saga_id = command.saga_id.as_uuid();
        match command.action.as_str() {
            "reserve_inventory" => {
                let order = match input::<Order>(command) {
                    Ok(order) => order,
                    Err(refusal) => return Ok(refusal),
                };
                if let Some(item) = order.items.iter().find(|i| i.quantity <= 0) {
                    return Ok(Outcome::Refused(StepError::business(
                        codes::INVALID_COMMAND,
                        format!("{}: quantity must be 1 or more, not {}", item.sku, item.quantity),
                    )));
                }
                // One line per SKU, in SKU order, so concurrent reservations lock rows in the same order.
                let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
                for item in &order.items {
                    *wanted.entry(item.sku.as_str()).or_default() += item.quantity;
                }
                for (sku, quantity) in &wanted {
                    let taken = sqlx::query(
                        "UPDATE stock SET available = available - $2, updated_at = now() WHERE sku = $1 AND available >= $2",
                    )
                    .bind(sku)
                    .bind(quantity)
                    .execute(&mut *conn)
                    .await?;
                    if taken.rows_affected() == 0 {
                        let available: Option<i64> = sqlx::query_scalar("SELECT available FROM stock WHERE sku = $1")
                            .bind(sku)
                            .fetch_optional(&mut *conn)
                            .await?;
                        let message = match available {
                            Some(n) => format!("{sku}: {quantity} wanted, {n} available"),
                            None => format!("{sku}: unknown SKU"),
                        };
                        // The runtime rolls back the reservations made so far: all or nothing.
                        return Ok(Outcome::Refused(StepError::business(codes::INVENTORY_UNAVAILABLE, message)));
                    }
                    sqlx::query(
                        "INSERT INTO reservations (saga_id, sku, quantity, status) VALUES ($1, $2, $3, 'RESERVED')",
                    )
                    .bind(saga_id)
                    .bind(sku)
                    .bind(quantity)
                    .execute(&mut *conn)
                    .await?;
                }
                Ok(Outcome::Done(json!({"reserved": wanted})))
            }
            "release_inventory" => {
                let mut released: Vec<(String, i64)> = sqlx::query_as(
                    "UPDATE reservations SET status = 'RELEASED', released_at = now()
                     WHERE saga_id = $1 AND status = 'RESERVED' RETURNING sku, quantity",
                )
                .bind(saga_id)
                .fetch_all(&mut *conn)
                .await?;
                released.sort();
                for (sku, quantity) in &released {
                    sqlx::query("UPDATE stock SET available = available + $2, updated_at = now() WHERE sku = $1")
                        .bind(sku)
                        .bind(quantity)
                        .execute(&mut *conn)
                        .await?;
                }
                let released: BTreeMap<String, i64> = released.into_iter().collect();
                Ok(Outcome::Done(json!({"released": released})))
            }
            _ => Ok(unknown_action(command)),
        }
    }
}
