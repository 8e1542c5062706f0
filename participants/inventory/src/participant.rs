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

/// Most units of one SKU one reservation may take. With [`crate::http::MAX_AVAILABLE`], no sum
/// of stock and released reservations can come near `i64::MAX`.
pub(crate) const MAX_QUANTITY: i64 = 1_000_000;

/// One line per SKU, in SKU order (so concurrent reservations lock rows in the same order), or
/// why the items cannot be reserved.
fn wanted(items: &[Item]) -> Result<BTreeMap<&str, i64>, String> {
    let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
    for item in items {
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            return Err(format!("{}: quantity must be from 1 to {MAX_QUANTITY}, not {}", item.sku, item.quantity));
        }
        let line = wanted.entry(item.sku.as_str()).or_default();
        *line = line
            .checked_add(item.quantity)
            .filter(|total| *total <= MAX_QUANTITY)
            .ok_or_else(|| format!("{}: more than {MAX_QUANTITY} units in one order", item.sku))?;
    }
    Ok(wanted)
}

impl Participant for Inventory {
    const NAME: &'static str = "inventory";
    type Prepared = ();

    async fn handle(&self, conn: &mut PgConnection, command: &CommandEnvelope, _: &mut ()) -> sqlx::Result<Outcome> {
        let saga_id = command.saga_id.as_uuid();
        match command.action.as_str() {
            "reserve_inventory" => {
                let order = match input::<Order>(command) {
                    Ok(order) => order,
                    Err(refusal) => return Ok(refusal),
                };
                let wanted = match wanted(&order.items) {
                    Ok(wanted) => wanted,
                    Err(why) => return Ok(Outcome::Refused(StepError::business(codes::INVALID_COMMAND, why))),
                };
                for (sku, quantity) in &wanted {
                    // Taken from the stock and recorded as reserved in one statement, or neither.
                    let taken = sqlx::query(
                        "WITH taken AS (
                             UPDATE stock SET available = available - $2, updated_at = now()
                             WHERE sku = $1 AND available >= $2 RETURNING sku
                         )
                         INSERT INTO reservations (saga_id, sku, quantity, status)
                         SELECT $3, sku, $2, 'RESERVED' FROM taken",
                    )
                    .bind(sku)
                    .bind(quantity)
                    .bind(saga_id)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn item(sku: &str, quantity: i64) -> Item {
        Item { sku: sku.to_owned(), quantity }
    }

    #[test]
    fn lines_of_one_sku_are_added_up() {
        let items = [item("B", 2), item("A", 1), item("B", 3)];
        let wanted = wanted(&items).unwrap();
        assert_eq!(wanted.into_iter().collect::<Vec<_>>(), vec![("A", 1), ("B", 5)]);
    }

    #[test]
    fn huge_or_non_positive_quantities_are_refused_without_overflowing() {
        for items in [
            vec![item("A", i64::MAX), item("A", i64::MAX)],
            vec![item("A", MAX_QUANTITY), item("A", 1)],
            vec![item("A", 0)],
            vec![item("A", -5)],
            vec![item("A", i64::MIN)],
        ] {
            assert!(wanted(&items).is_err());
        }
    }
}
