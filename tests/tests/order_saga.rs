//! The order saga end to end: real orchestrator and participant processes, real Postgres, real
//! broker. Each test runs its own isolated system.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use saga_e2e::{order_body, System};
use serde_json::{json, Value};

const SETTLE: Duration = Duration::from_secs(90);

/// Places an order and waits for its saga to end; returns (order id, saga).
async fn run_order(system: &System, key: &str, body: &Value) -> anyhow::Result<(String, Value)> {
    let (status, order) = system.place_order(key, body).await?;
    assert_eq!(status, 201, "order accepted: {order}");
    assert_eq!(order["status"], "PENDING");
    let saga = system.wait_terminal(order["saga_id"].as_str().unwrap(), SETTLE).await?;
    Ok((order["id"].as_str().unwrap().to_owned(), saga))
}

async fn count(pool: &sqlx::PgPool, sql: &str, id: &str) -> i64 {
    let id: uuid::Uuid = id.parse().unwrap();
    sqlx::query_scalar(sql).bind(id).fetch_one(pool).await.unwrap()
}

/// (step, kind, status) of every attempt, in the order they were sent.
fn attempts(saga: &Value) -> Vec<(String, String, String)> {
    let mut all: Vec<(String, String, String, String)> = saga["steps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|step| {
            step["attempts"].as_array().unwrap().iter().map(|a| {
                (
                    a["started_at"].as_str().unwrap().to_owned(),
                    step["name"].as_str().unwrap().to_owned(),
                    a["kind"].as_str().unwrap().to_owned(),
                    a["status"].as_str().unwrap().to_owned(),
                )
            })
        })
        .collect();
    all.sort();
    all.into_iter().map(|(_, step, kind, status)| (step, kind, status)).collect()
}

fn compensations(saga: &Value) -> Vec<String> {
    attempts(saga).into_iter().filter(|(_, kind, _)| kind == "COMPENSATION").map(|(step, _, _)| step).collect()
}

#[tokio::test]
async fn a_good_order_completes_with_stock_taken_once_one_charge_and_one_shipment() -> anyhow::Result<()> {
    let system = System::start().await?;
    system.set_stock("SKU-HAPPY", 10).await?;
    let (order_id, saga) = run_order(&system, "happy-1", &order_body("SKU-HAPPY", 3, "tok_visa", "62701")).await?;

    assert_eq!(saga["status"], "COMPLETED", "{saga:#}");
    assert_eq!(saga["business_key"], order_id.as_str());
    assert!(saga["failure"].is_null());
    let steps: Vec<&str> = saga["steps"].as_array().unwrap().iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert_eq!(steps, ["SUCCEEDED"; 5]);
    assert_eq!(system.stock("SKU-HAPPY").await?, 7);
    let order = system.order(&order_id).await?;
    assert_eq!(order["status"], "APPROVED");

    let saga_id = saga["id"].as_str().unwrap();
    let payment = system.pool("payment").await?;
    assert_eq!(
        count(&payment, "SELECT count(*) FROM ledger WHERE saga_id = $1 AND entry_type = 'CHARGE'", saga_id).await,
        1
    );
    let charged: i64 =
        sqlx::query_scalar("SELECT amount_cents FROM payments WHERE saga_id = $1 AND status = 'CHARGED'")
            .bind(saga_id.parse::<uuid::Uuid>()?)
            .fetch_one(&payment)
            .await?;
    assert_eq!(charged, 3 * 1250);
    let fulfilment = system.pool("fulfilment").await?;
    assert_eq!(
        count(&fulfilment, "SELECT count(*) FROM shipments WHERE saga_id = $1 AND status = 'CREATED'", saga_id).await,
        1
    );
    assert_eq!(saga["history"].as_array().unwrap().len(), 6, "start + one transition per step");
    system.stop().await
}

#[tokio::test]
async fn a_declined_card_releases_the_stock_and_rejects_the_order_in_reverse_order() -> anyhow::Result<()> {
    let system = System::start().await?;
    system.set_stock("SKU-DECLINE", 10).await?;
    let (order_id, saga) =
        run_order(&system, "declined-1", &order_body("SKU-DECLINE", 4, "tok_declined", "62701")).await?;

    assert_eq!(saga["status"], "FAILED", "{saga:#}");
    assert_eq!(saga["failure"]["step"], "charge_payment");
    assert_eq!(saga["failure"]["code"], "PAYMENT_DECLINED");
    assert_eq!(compensations(&saga), ["reserve_inventory", "verify_order"], "compensated in reverse order");
    assert_eq!(system.stock("SKU-DECLINE").await?, 10, "stock back to where it was");
    let order = system.order(&order_id).await?;
    assert_eq!(order["status"], "REJECTED");
    assert_eq!(order["rejection"]["code"], "PAYMENT_DECLINED");
    let payment = system.pool("payment").await?;
    assert_eq!(
        count(&payment, "SELECT count(*) FROM ledger WHERE saga_id = $1", saga["id"].as_str().unwrap()).await,
        0
    );
    let summaries: Vec<&str> =
        saga["history"].as_array().unwrap().iter().map(|h| h["summary"].as_str().unwrap()).collect();
    let release = summaries.iter().position(|s| s.contains("sent release_inventory")).expect("release in history");
    let reject = summaries.iter().position(|s| s.contains("sent reject_order")).expect("reject in history");
    assert!(release < reject, "history shows the release before the rejection: {summaries:#?}");
    system.stop().await
}

#[tokio::test]
async fn an_order_without_stock_fails_at_the_reservation_and_never_reaches_payment() -> anyhow::Result<()> {
    let system = System::start().await?;
    system.set_stock("SKU-SCARCE", 1).await?;
    let (order_id, saga) = run_order(&system, "scarce-1", &order_body("SKU-SCARCE", 5, "tok_visa", "62701")).await?;

    assert_eq!(saga["status"], "FAILED", "{saga:#}");
    assert_eq!(saga["failure"]["step"], "reserve_inventory");
    assert_eq!(saga["failure"]["code"], "INVENTORY_UNAVAILABLE");
    assert_eq!(compensations(&saga), ["verify_order"]);
    assert_eq!(system.stock("SKU-SCARCE").await?, 1);
    assert_eq!(system.order(&order_id).await?["status"], "REJECTED");
    let payment = system.pool("payment").await?;
    let saga_id = saga["id"].as_str().unwrap();
    assert_eq!(count(&payment, "SELECT count(*) FROM processed_commands WHERE saga_id = $1", saga_id).await, 0);
    assert_eq!(count(&payment, "SELECT count(*) FROM gateway_calls WHERE saga_id = $1", saga_id).await, 0);
    system.stop().await
}

#[tokio::test]
async fn an_undeliverable_address_refunds_the_charge_releases_the_stock_and_rejects_the_order() -> anyhow::Result<()> {
    let system = System::start().await?;
    system.set_stock("SKU-ADDR", 10).await?;
    let (order_id, saga) = run_order(&system, "addr-1", &order_body("SKU-ADDR", 2, "tok_visa", "00000")).await?;

    assert_eq!(saga["status"], "FAILED", "{saga:#}");
    assert_eq!(saga["failure"]["step"], "create_shipment");
    assert_eq!(saga["failure"]["code"], "INVALID_ADDRESS");
    assert_eq!(compensations(&saga), ["charge_payment", "reserve_inventory", "verify_order"]);
    assert_eq!(system.stock("SKU-ADDR").await?, 10);
    let order = system.order(&order_id).await?;
    assert_eq!(order["status"], "REJECTED");
    assert_eq!(order["rejection"]["code"], "INVALID_ADDRESS");
    let payment = system.pool("payment").await?;
    let saga_id = saga["id"].as_str().unwrap();
    assert_eq!(
        count(&payment, "SELECT count(*) FROM ledger WHERE saga_id = $1 AND entry_type = 'REFUND'", saga_id).await,
        1
    );
    assert_eq!(
        count(&payment, "SELECT coalesce(sum(amount_cents), 0)::bigint FROM ledger WHERE saga_id = $1", saga_id).await,
        0
    );
    assert_eq!(
        count(&payment, "SELECT count(*) FROM payments WHERE saga_id = $1 AND status = 'REFUNDED'", saga_id).await,
        1
    );
    system.stop().await
}

#[tokio::test]
async fn a_gateway_that_times_out_twice_is_retried_and_charges_once() -> anyhow::Result<()> {
    let system = System::start().await?;
    system.set_stock("SKU-RETRY", 10).await?;
    let (_, saga) = run_order(&system, "retry-1", &order_body("SKU-RETRY", 1, "tok_timeout_2", "62701")).await?;

    assert_eq!(saga["status"], "COMPLETED", "{saga:#}");
    let charge: Vec<(String, String, String)> =
        attempts(&saga).into_iter().filter(|(step, _, _)| step == "charge_payment").collect();
    let statuses: Vec<&str> = charge.iter().map(|(_, _, status)| status.as_str()).collect();
    assert_eq!(statuses, ["FAILED", "FAILED", "SUCCEEDED"], "three attempts recorded");
    let payment_step = &saga["steps"][2];
    assert_eq!(payment_step["attempts"][0]["error_code"], "PAYMENT_GATEWAY_TIMEOUT");
    let payment = system.pool("payment").await?;
    let saga_id = saga["id"].as_str().unwrap();
    assert_eq!(count(&payment, "SELECT count(*) FROM ledger WHERE saga_id = $1", saga_id).await, 1, "one charge");
    assert_eq!(count(&payment, "SELECT calls::bigint FROM gateway_calls WHERE saga_id = $1", saga_id).await, 3);
    system.stop().await
}

#[tokio::test]
async fn the_same_order_placed_twice_with_one_key_is_one_order_and_one_saga() -> anyhow::Result<()> {
    let system = System::start().await?;
    system.set_stock("SKU-TWICE", 10).await?;
    let body = order_body("SKU-TWICE", 1, "tok_visa", "62701");
    let (first_status, first) = system.place_order("twice-1", &body).await?;
    let (second_status, second) = system.place_order("twice-1", &body).await?;
    assert_eq!((first_status, second_status), (201, 200));
    assert_eq!(first["id"], second["id"]);
    assert_eq!(first["saga_id"], second["saga_id"]);

    let (reused_status, reused) =
        system.place_order("twice-1", &order_body("SKU-TWICE", 2, "tok_visa", "62701")).await?;
    assert_eq!(reused_status, 422, "same key, different body: {reused}");
    assert_eq!(reused["type"], "https://saga-orchestrator.dev/problems/idempotency-key-reused");
    // Nor a start request for a saga of an order that was not placed (the relay would publish
    // it after its hand-off grace: it would still be in the outbox now).
    let orders = system.pool("order").await?;
    let strays: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE message_key <> $1")
        .bind(first["saga_id"].as_str())
        .fetch_one(&orders)
        .await?;
    assert_eq!(strays, 0, "start requests written for the second and third placements");

    let saga = system.wait_terminal(first["saga_id"].as_str().unwrap(), SETTLE).await?;
    assert_eq!(saga["status"], "COMPLETED");
    let sagas: Value = system
        .http
        .get(system.url("orchestrator", &format!("/api/v1/sagas?business_key={}", first["id"].as_str().unwrap())))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(sagas["count"], 1, "one saga for the order: {sagas:#}");
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE idempotency_key = 'twice-1'").fetch_one(&orders).await?;
    assert_eq!(n, 1);
    assert_eq!(system.stock("SKU-TWICE").await?, 9, "stock taken once");
    system.stop().await
}

#[tokio::test]
async fn sagas_in_flight_when_the_orchestrator_is_killed_all_finish_after_a_restart_with_nothing_applied_twice(
) -> anyhow::Result<()> {
    let system = System::start().await?;
    system.set_stock("SKU-KILL", 1000).await?;
    let mut sagas = Vec::new();
    for i in 0..24 {
        let (token, postal) = match i % 6 {
            0 => ("tok_declined", "62701"),
            1 => ("tok_timeout_1", "62701"),
            2 => ("tok_visa", "00000"),
            _ => ("tok_visa", "62701"),
        };
        let (status, order) =
            system.place_order(&format!("kill-{i}"), &order_body("SKU-KILL", 2, token, postal)).await?;
        assert_eq!(status, 201);
        sagas.push(order["saga_id"].as_str().unwrap().to_owned());
    }
    // Let the sagas get going, then kill the orchestrator without any warning.
    let started = std::time::Instant::now();
    let in_flight_at_kill = loop {
        let in_flight: Value = system
            .http
            .get(system.url("orchestrator", "/api/v1/sagas?status=RUNNING,COMPENSATING&limit=100"))
            .send()
            .await?
            .json()
            .await?;
        let n = in_flight["count"].as_u64().unwrap_or(0);
        if n >= 5 || started.elapsed() > Duration::from_secs(30) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(in_flight_at_kill > 0, "the kill must hit sagas in flight");
    system.kill("orchestrator").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    system.spawn("orchestrator")?;
    system.wait_ready("orchestrator", Duration::from_secs(60)).await?;

    let mut completed = 0;
    for id in &sagas {
        let saga = system.wait_terminal(id, SETTLE).await?;
        let status = saga["status"].as_str().unwrap();
        assert!(status == "COMPLETED" || status == "FAILED", "{id}: {status}");
        if status == "COMPLETED" {
            completed += 1;
        }
    }
    assert_eq!(completed, 16, "the 16 orders with a good card and address completed (a gateway timeout is retried)");
    assert_eq!(
        system.stock("SKU-KILL").await?,
        1000 - 2 * completed,
        "stock taken once per completed saga, none leaked"
    );

    let payment = system.pool("payment").await?;
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT saga_id FROM ledger WHERE entry_type = 'CHARGE' GROUP BY saga_id HAVING count(*) > 1) d",
    )
    .fetch_one(&payment)
    .await?;
    assert_eq!(doubled, 0, "no saga charged twice");
    let net: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(amount_cents), 0)::bigint FROM ledger").fetch_one(&payment).await?;
    assert_eq!(net, completed * 2 * 1250, "charges less refunds equal the completed orders' totals");
    let fulfilment = system.pool("fulfilment").await?;
    let shipped: i64 =
        sqlx::query_scalar("SELECT count(*) FROM shipments WHERE status = 'CREATED'").fetch_one(&fulfilment).await?;
    assert_eq!(shipped, completed);
    system.stop().await
}

#[tokio::test]
async fn a_reply_delivered_twice_causes_one_transition() -> anyhow::Result<()> {
    // No order participant: the saga waits for the verify_order reply the test sends itself.
    let system = System::start_without(&["order"]).await?;
    let response = system
        .http
        .post(system.url("orchestrator", "/api/v1/sagas"))
        .header("Idempotency-Key", "dup-reply-1")
        .json(&json!({"saga_type": "order-fulfilment", "business_key": "dup", "input": {
            "order_id": uuid::Uuid::new_v4(), "items": [{"sku": "SKU-NONE", "quantity": 1, "unit_price_cents": 1}],
            "total_cents": 1, "currency": "USD", "payment_token": "tok_visa",
            "shipping_address": {"line1": "x", "city": "y", "postal_code": "1", "country": "US"}}}))
        .send()
        .await?;
    assert_eq!(response.status(), 201);
    let saga: Value = response.json().await?;
    let saga_id = saga["id"].as_str().unwrap().to_owned();
    assert_eq!(saga["current_step"]["name"], "verify_order");

    let reply = json!({
        "schema_version": 1, "message_id": uuid::Uuid::new_v4(), "command_id": uuid::Uuid::new_v4(),
        "saga_id": saga_id, "step": "verify_order", "kind": "ACTION", "attempt": 1, "participant": "order",
        "outcome": {"status": "SUCCEEDED", "output": {}}
    })
    .to_string();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into()))
        .create()?;
    let topic = format!("{}saga-replies", system.topic_prefix());
    let ignored_before = system.metric("orchestrator", "saga_replies_ignored_total{reason=\"duplicate\"}").await?;
    for _ in 0..2 {
        producer
            .send(FutureRecord::to(&topic).key(&saga_id).payload(&reply), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
    }
    let ignored = "saga_replies_ignored_total{reason=\"duplicate\"}";
    let (wanted, timeout) = (|n| n >= ignored_before + 1.0, Duration::from_secs(30));
    system.wait_metric("orchestrator", ignored, wanted, timeout, "the duplicate was never counted as ignored").await?;
    let saga = system.saga(&saga_id).await?;
    let verify: Vec<&Value> = saga["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["summary"].as_str().unwrap().contains("verify_order action attempt 1 succeeded"))
        .collect();
    assert_eq!(verify.len(), 1, "one transition for two copies of the reply: {:#}", saga["history"]);
    let actions = saga["steps"][0]["attempts"].as_array().unwrap().iter().filter(|a| a["kind"] == "ACTION").count();
    assert_eq!(actions, 1, "one verify_order action attempt");
    system.stop().await
}

#[tokio::test]
async fn concurrent_orders_for_scarce_stock_never_oversell() -> anyhow::Result<()> {
    let system = System::start().await?;
    system.set_stock("SKU-HOT", 5).await?;
    let body = order_body("SKU-HOT", 1, "tok_visa", "62701");
    let placed = futures_join(&system, &body, 12).await?;
    let mut completed = 0;
    let mut unavailable = 0;
    for saga_id in &placed {
        let saga = system.wait_terminal(saga_id, SETTLE).await?;
        match (saga["status"].as_str().unwrap(), saga["failure"]["code"].as_str()) {
            ("COMPLETED", _) => completed += 1,
            ("FAILED", Some("INVENTORY_UNAVAILABLE")) => unavailable += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!((completed, unavailable), (5, 7), "exactly the stock on hand was sold");
    assert_eq!(system.stock("SKU-HOT").await?, 0);
    system.stop().await
}

/// Places `n` orders at once; returns their saga ids.
async fn futures_join(system: &System, body: &Value, n: usize) -> anyhow::Result<Vec<String>> {
    let keys: Vec<String> = (0..n).map(|i| format!("hot-{i}")).collect();
    let mut handles = Vec::new();
    for key in &keys {
        handles.push(system.place_order(key, body));
    }
    let mut ids = Vec::new();
    for result in futures::future::join_all(handles).await {
        let (status, order) = result?;
        assert_eq!(status, 201);
        ids.push(order["saga_id"].as_str().unwrap().to_owned());
    }
    Ok(ids)
}
