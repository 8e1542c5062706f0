//! Liveness under hostile input, panics and dying tasks: one bad thing stays one bad thing.
//! Each test is one finding of issue 12, against the real services, Postgres and Kafka.

use std::time::Duration;

use anyhow::Context;
use saga_e2e::{charge_input, order_body, Options, System, READ_TOKEN};
use serde_json::{json, Value};
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(60);

/// Sends `body` as it is (so that numbers and escapes reach the server exactly as written).
async fn raw(
    system: &System,
    method: &str,
    url: String,
    body: impl Into<String>,
    key: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    let mut request =
        system.http.request(method.parse()?, url).header("content-type", "application/json").body(body.into());
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap_or("").to_owned());
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status >= 400 {
        assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{status} {body}");
    }
    Ok((status, body))
}

fn assert_refused(what: &str, (status, body): (u16, Value), mentions: &str) {
    assert_eq!(status, 400, "{what}: {body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(mentions), "{what}: detail {detail:?} should mention {mentions:?}");
}

#[tokio::test]
async fn unstorable_input_is_refused_and_a_saga_stored_unreadable_is_parked_while_the_others_complete(
) -> anyhow::Result<()> {
    let system = System::start_with(Options::default().test_definitions()).await?;
    system.set_stock("SKU-L", 1000).await?;
    let sagas = system.url("orchestrator", "/api/v1/sagas");

    // What Postgres cannot store and give back is refused at the door, with where it is.
    let beyond = r#"{"saga_type": "ops-fast", "input": {"n": 1e400}}"#;
    assert_refused("beyond the doubles", raw(&system, "POST", sagas.clone(), beyond, Some("beyond")).await?, "number");
    let nul = r#"{"saga_type": "ops-fast", "input": {"note": "a\u0000b"}, "business_key": "n"}"#;
    assert_refused("NUL in the input", raw(&system, "POST", sagas.clone(), nul, Some("nul")).await?, "NUL");
    let nul_key = r#"{"saga_type": "ops-fast", "input": {}, "business_key": "order\u0000"}"#;
    assert_refused("NUL in the business key", raw(&system, "POST", sagas.clone(), nul_key, Some("nk")).await?, "NUL");
    let nul_query = system.url("orchestrator", "/api/v1/sagas?business_key=a%00b");
    assert_refused("NUL in a query parameter", raw(&system, "GET", nul_query, "", None).await?, "business_key");
    let retry = system.url("orchestrator", &format!("/api/v1/sagas/{}/retry", Uuid::new_v4()));
    let reason = r#"{"reason": "fixed\u0000"}"#;
    assert_refused("NUL in a retry reason", raw(&system, "POST", retry, reason, Some("r1")).await?, "NUL");
    let mut order = order_body("SKU-L", 1, "tok_visa", "12345");
    order["customer_id"] = json!("c\u{0}1");
    let orders = system.url("order", "/api/v1/orders");
    assert_refused(
        "NUL in a customer id",
        raw(&system, "POST", orders.clone(), order.to_string(), Some("o1")).await?,
        "/customer_id",
    );
    let mut order = order_body("SKU-L", 1, "tok_visa", "12345");
    order["items"][0]["sku"] = json!("SKU\u{0}");
    assert_refused("NUL in a SKU", raw(&system, "POST", orders, order.to_string(), Some("o2")).await?, "/items/0/sku");
    let stock = system.url("inventory", "/api/v1/stock/SKU%00X");
    assert_refused("NUL in a path", raw(&system, "PUT", stock, r#"{"available": 1}"#, None).await?, "NUL");
    // Any double is read back as it was sent, the largest included.
    let fine = r#"{"saga_type": "ops-slow", "input": {"items": [], "n": 1.7976931348623157e308,
                   "m": -2.5e-7, "k": 18446744073709551615, "l": 6.755072567434262e201}}"#;
    let (status, started) = raw(&system, "POST", sagas.clone(), fine, Some("fine")).await?;
    assert_eq!(status, 201, "{started}");
    let back = system.saga(started["id"].as_str().context("id")?).await?;
    assert_eq!(back["input"]["n"].as_f64(), Some(f64::MAX));
    assert_eq!(back["input"]["m"].as_f64(), Some(-2.5e-7));
    assert_eq!(back["input"]["k"], json!(18446744073709551615u64));
    assert_eq!(back["input"]["l"].as_f64(), Some(6.755072567434262e201));
    // Unknown methods do not become metric labels.
    raw(&system, "FOOBAR", sagas.clone(), "", None).await?;

    // A saga whose stored input cannot be read (a number beyond the doubles, written by hand or
    // by an older build): it wakes up in the timer loop, which parks it and goes on.
    let victim = system.start_saga("ops-fast", &charge_input("SKU-L", 1, "tok_visa"), "victim").await?;
    system.wait_status(&victim, "COMPLETED", SETTLE).await?;
    let pool = system.pool("orchestrator").await?;
    let changed = sqlx::query(
        "UPDATE saga_instances SET input = '{\"n\": 1e400}'::jsonb, status = 'RUNNING',
             waiting = 'REPLY', wake_at = now(), ended_at = NULL WHERE id = $1::uuid",
    )
    .bind(&victim)
    .execute(&pool)
    .await?;
    assert_eq!(changed.rows_affected(), 1);
    // Orders that need the timer loop: the gateway times out once, and the retry waits a backoff.
    let mut placed = Vec::new();
    for i in 0..6 {
        let token = if i % 2 == 0 { "tok_timeout_1" } else { "tok_visa" };
        let (status, order) = system.place_order(&format!("live-{i}"), &order_body("SKU-L", 1, token, "12345")).await?;
        assert_eq!(status, 201, "{order}");
        placed.push(order["saga_id"].as_str().context("saga_id")?.to_owned());
    }
    for saga in &placed {
        let ended = system.wait_terminal(saga, SETTLE).await?;
        assert_eq!(ended["status"], "COMPLETED", "{ended:#}");
    }
    let parked = system.wait_status(&victim, "NEEDS_ATTENTION", SETTLE).await?;
    assert_eq!(parked["attention"]["code"], "UNPROCESSABLE_SAGA", "{parked:#}");
    assert!(parked["input"]["unreadable"].is_string(), "the detail says why the input is not shown: {parked:#}");
    let history = parked["history"].as_array().context("history")?;
    assert!(history.last().context("entry")?["summary"].as_str().unwrap_or("").contains("could not be processed"));

    // Every read path still answers, and acting on the saga is a conflict, not a server error.
    let (status, list) = system.api_get("/api/v1/sagas?limit=100").await?;
    assert_eq!(status, 200, "{list}");
    assert!(list["items"].as_array().context("items")?.iter().any(|s| s["id"] == victim.as_str()));
    let (status, _) = system.api_get("/api/v1/sagas/stats?window=1h").await?;
    assert_eq!(status, 200);
    let (code, out, err) =
        system.sagactl(Some(saga_e2e::ADMIN_TOKEN), &["list", "--status", "NEEDS_ATTENTION"]).await?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&victim[..8]), "{out}");
    let retry = json!({"reason": "try again"});
    let (status, refused) = system.api_post(&format!("/api/v1/sagas/{victim}/retry"), &retry, Some("rv")).await?;
    assert_eq!(status, 409, "{refused}");
    let parked_count =
        system.metric("orchestrator", "saga_unprocessable_total{saga_type=\"ops-fast\",trigger=\"timer\"}").await?;
    assert_eq!(parked_count, 1.0);
    let metrics = system.http.get(system.metrics_url("orchestrator")).send().await?.text().await?;
    assert!(!metrics.contains("FOOBAR"), "an unknown method became a label");
    assert!(metrics.contains("method=\"OTHER\""), "unknown methods are counted as OTHER");
    system.stop().await
}

#[tokio::test]
async fn a_participant_that_panics_on_one_command_dead_letters_it_and_goes_on() -> anyhow::Result<()> {
    let system = System::start_with(Options::default().test_definitions().env(
        "inventory",
        "FAILPOINTS",
        "participant.panic_on_input=return(PANIC-ME)",
    ))
    .await?;
    system.set_stock("SKU-P", 100).await?;
    let mut input = charge_input("SKU-P", 1, "tok_visa");
    input["note"] = json!("PANIC-ME");
    let bad = system.start_saga("ops-fast", &input, "panics").await?;
    let mut good = Vec::new();
    for i in 0..4 {
        good.push(system.start_saga("ops-fast", &charge_input("SKU-P", 1, "tok_visa"), &format!("before-{i}")).await?);
    }
    // The panicking command is dead-lettered with reason panic...
    let started = std::time::Instant::now();
    let panicked = loop {
        let letters = system.read_topic("inventory-commands.dlq").await?;
        if let Some(letter) = letters.into_iter().find(|l| l.header("dlq-reason") == Some("panic")) {
            break letter;
        }
        anyhow::ensure!(started.elapsed() < SETTLE, "no dead letter with reason panic");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(panicked.key.as_deref(), Some(bad.as_str()));
    assert!(panicked.header("dlq-error").unwrap_or("").contains("panicked"), "{:?}", panicked.header("dlq-error"));
    // ...and the consumer goes on: sagas started after the panic complete too.
    for i in 0..4 {
        good.push(system.start_saga("ops-fast", &charge_input("SKU-P", 1, "tok_visa"), &format!("after-{i}")).await?);
    }
    for saga in &good {
        let ended = system.wait_terminal(saga, SETTLE).await?;
        assert_eq!(ended["status"], "COMPLETED", "{ended:#}");
    }
    // The bad saga ends visibly: its reservation timed out and its release panics too.
    let ended = system.wait_terminal(&bad, SETTLE).await?;
    assert_eq!(ended["status"], "NEEDS_ATTENTION", "{ended:#}");
    assert!(!system.has_exited("inventory"));
    let ready = system.http.get(system.url("inventory", "/ready")).send().await?;
    assert_eq!(ready.status().as_u16(), 200);
    assert!(system.metric("inventory", "saga_consumer_panics_total").await? >= 1.0);
    assert_eq!(system.stock("SKU-P").await?, 100 - 8, "the eight good sagas hold their stock; the bad one holds none");
    system.stop().await
}

#[tokio::test]
async fn a_background_task_that_dies_makes_ready_503_and_the_process_exit_non_zero() -> anyhow::Result<()> {
    let mut system = System::start().await?;
    for (service, task) in [("orchestrator", "timers"), ("payment", "consumer")] {
        system.kill(service).await?;
        system.set_env(service, "FAILPOINTS", format!("task.panic=return({task})"));
        system.spawn(service)?;
        system.wait_ready(service, SETTLE).await?;
        // The task panics three seconds after it started.
        let started = std::time::Instant::now();
        let checks = loop {
            let response = system.http.get(system.url(service, "/ready")).send().await;
            if let Ok(response) = response {
                if response.status().as_u16() == 503 {
                    break response.json::<Value>().await?;
                }
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(20), "{service}: /ready never turned 503");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let tasks = checks["checks"]["tasks"].as_str().unwrap_or_default();
        assert!(tasks.contains(task) && tasks.contains("panicked"), "{service}: {checks}");
        let (took, status) = system.wait_exit(service, Duration::from_secs(15)).await?;
        assert_eq!(status.code(), Some(1), "{service} exits non-zero, for its supervisor to restart it");
        assert!(took < Duration::from_secs(12), "{service} took {took:?} to exit");
        system.set_env(service, "FAILPOINTS", "");
        system.spawn(service)?;
        system.wait_ready(service, SETTLE).await?;
    }
    // Restarted, the system works.
    system.set_stock("SKU-T", 5).await?;
    let (status, order) = system.place_order("after-restart", &order_body("SKU-T", 1, "tok_visa", "12345")).await?;
    assert_eq!(status, 201, "{order}");
    let ended = system.wait_terminal(order["saga_id"].as_str().context("saga_id")?, SETTLE).await?;
    assert_eq!(ended["status"], "COMPLETED");
    system.stop().await
}

#[tokio::test]
async fn dead_letters_are_redacted_for_a_read_token_and_whole_for_an_admin() -> anyhow::Result<()> {
    let system =
        System::start_with(Options { skip: vec!["order", "inventory", "payment", "fulfilment"], ..Options::default() })
            .await?;
    let start = json!({
        "schema_version": 1, "saga_id": Uuid::new_v4(), "saga_type": "no-such-saga", "idempotency_key": "k-1",
        "input": {"payment_token": "tok_secret_4242", "shipping_address": {"line1": "1 Secret Rd"}, "sku": "SKU-VISIBLE"}
    });
    let headers = [("message-type", "saga.start"), ("schema-version", "1")];
    system.publish("saga-start-requests", "k-1", Some(start.to_string().as_bytes()), &headers).await?;
    system.publish("saga-start-requests", "k-2", Some(b"not json tok_secret_4242"), &headers).await?;
    let url = system.url("orchestrator", "/api/v1/dead-letters");
    let started = std::time::Instant::now();
    let whole: Value = loop {
        let page: Value = system.http.get(&url).send().await?.json().await?;
        if page["count"].as_u64() == Some(2) {
            break page;
        }
        anyhow::ensure!(started.elapsed() < SETTLE, "the two dead letters never appeared: {page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(whole.to_string().matches("tok_secret_4242").count(), 2, "an admin sees everything: {whole}");
    let reader = reqwest::Client::new();
    let response = reader.get(&url).bearer_auth(READ_TOKEN).send().await?;
    assert_eq!(response.status().as_u16(), 200);
    let redacted: Value = response.json().await?;
    let text = redacted.to_string();
    assert!(!text.contains("tok_secret_4242") && !text.contains("Secret Rd"), "a reader sees secrets: {text}");
    assert!(text.contains("SKU-VISIBLE"), "what is not sensitive stays visible: {text}");
    assert!(text.contains("an admin token shows it"), "{text}");
    system.stop().await
}

#[tokio::test]
async fn stock_changes_and_huge_quantities_cannot_break_reservations() -> anyhow::Result<()> {
    let system = System::start_with(Options::default().test_definitions()).await?;
    let put = |available: &str| {
        let url = system.url("inventory", "/api/v1/stock/SKU-G");
        raw(&system, "PUT", url, format!("{{\"available\": {available}}}"), None)
    };
    assert_eq!(put("10000000000000").await?.0, 400, "above the bound");
    assert_eq!(put("9223372036854775807").await?.0, 400, "i64::MAX");
    assert_eq!(put("-1").await?.0, 400);
    assert_eq!(put("10").await?.0, 200);
    let adjust = |delta: i64| {
        let url = system.url("inventory", "/api/v1/stock/SKU-G/adjustments");
        raw(&system, "POST", url, format!("{{\"delta\": {delta}}}"), None)
    };
    let (status, body) = adjust(5).await?;
    assert_eq!((status, body["available"].as_i64()), (200, Some(15)), "{body}");
    let (status, body) = adjust(-100).await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(adjust(0).await?.0, 400);
    let (status, _) =
        raw(&system, "POST", system.url("inventory", "/api/v1/stock/NO-SUCH/adjustments"), r#"{"delta": 1}"#, None)
            .await?;
    assert_eq!(status, 404);

    // Quantities that would overflow a sum are refused as a business error: the saga fails.
    let mut input = charge_input("SKU-G", 1, "tok_visa");
    input["items"] = json!([{"sku": "SKU-G", "quantity": i64::MAX}, {"sku": "SKU-G", "quantity": i64::MAX}]);
    let saga = system.start_saga("ops-fast", &input, "overflow").await?;
    let ended = system.wait_terminal(&saga, SETTLE).await?;
    assert_eq!(ended["status"], "FAILED", "{ended:#}");
    assert_eq!(ended["failure"]["code"], "INVALID_COMMAND", "{ended:#}");
    // A negative total is refused by payment, and the reservation is released.
    let mut input = charge_input("SKU-G", 2, "tok_visa");
    input["total_cents"] = json!(-5);
    let saga = system.start_saga("ops-fast", &input, "negative").await?;
    let ended = system.wait_terminal(&saga, SETTLE).await?;
    assert_eq!(
        (ended["status"].as_str(), ended["failure"]["code"].as_str()),
        (Some("FAILED"), Some("INVALID_COMMAND"))
    );
    assert_eq!(system.stock("SKU-G").await?, 15);
    assert!(!system.has_exited("inventory") && !system.has_exited("payment"));
    system.stop().await
}

#[tokio::test]
async fn every_service_exits_within_ten_seconds_of_sigterm_with_the_broker_gone() -> anyhow::Result<()> {
    let system = System::start_with(Options::default().private_broker()).await?;
    system.set_stock("SKU-S", 10).await?;
    let (status, _) = system.place_order("s-1", &order_body("SKU-S", 1, "tok_visa", "12345")).await?;
    assert_eq!(status, 201);
    system.kill_broker().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for service in saga_e2e::SERVICES {
        let (took, status) = system.terminate(service).await?;
        assert!(took < Duration::from_secs(10), "{service} took {took:?} to exit after SIGTERM without a broker");
        eprintln!("{service}: exited in {took:?} with {status}");
    }
    system.stop().await
}

#[tokio::test]
async fn at_the_bound_start_requests_wait_in_kafka_and_run_as_sagas_finish() -> anyhow::Result<()> {
    // No payment service at first: ops-slow sagas wait at the charge (its timeout is minutes).
    let system = System::start_with(Options::default().test_definitions().skip("payment").env(
        "orchestrator",
        "SAGA_MAX_IN_FLIGHT",
        "500,ops-slow=3",
    ))
    .await?;
    system.set_stock("SKU-B", 100).await?;
    let mut sagas = Vec::new();
    for i in 0..3 {
        sagas.push(system.start_saga("ops-slow", &charge_input("SKU-B", 1, "tok_visa"), &format!("b-{i}")).await?);
    }
    // Once admission counts the three, the API refuses a fourth, politely.
    let started = std::time::Instant::now();
    loop {
        let (_, stats) = system.api_get("/api/v1/sagas/stats?window=1h").await?;
        if stats["admission"]["ops-slow"]["saturated"] == true {
            break;
        }
        anyhow::ensure!(started.elapsed() < SETTLE, "ops-slow never reached its bound: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = json!({"saga_type": "ops-slow", "input": charge_input("SKU-B", 1, "tok_visa")});
    let response = system
        .http
        .post(system.url("orchestrator", "/api/v1/sagas"))
        .header("Idempotency-Key", "b-3")
        .json(&body)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    // The same key as a saga already started still answers with that saga.
    let again = json!({"saga_type": "ops-slow", "input": charge_input("SKU-B", 1, "tok_visa"), "business_key": "b-0"});
    let (status, _) = system.api_post("/api/v1/sagas", &again, Some("b-0")).await?;
    assert_eq!(status, 422, "same key, other body: refused as before, not 429");
    // Start requests from Kafka wait there.
    for i in 0..5 {
        let request = json!({
            "schema_version": 1, "saga_id": Uuid::new_v4(), "saga_type": "ops-slow", "idempotency_key": format!("q-{i}"),
            "input": charge_input("SKU-B", 1, "tok_visa")
        });
        let headers = [("message-type", "saga.start"), ("schema-version", "1")];
        system
            .publish("saga-start-requests", &format!("q-{i}"), Some(request.to_string().as_bytes()), &headers)
            .await?;
        sagas.push(request["saga_id"].as_str().context("id")?.to_owned());
    }
    let started = std::time::Instant::now();
    let stats = loop {
        let (_, stats) = system.api_get("/api/v1/sagas/stats?window=1h").await?;
        if stats["start_requests_waiting"].as_i64() == Some(5) {
            break stats;
        }
        anyhow::ensure!(started.elapsed() < SETTLE, "the five start requests do not show as waiting: {stats}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(stats["admission"]["ops-slow"], json!({"in_flight": 3, "limit": 3, "saturated": true}), "{stats}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, running) = system.api_get("/api/v1/sagas?saga_type=ops-slow&limit=100").await?;
    assert_eq!(running["items"].as_array().context("items")?.len(), 3, "no saga past the bound: {running}");
    assert_eq!(system.metric("orchestrator", "saga_start_intake_paused{saga_type=\"ops-slow\"}").await?, 1.0);
    assert_eq!(system.metric("orchestrator", "saga_in_flight_limit{saga_type=\"ops-slow\"}").await?, 3.0);

    // The participant comes: every saga completes, the waiting ones three at a time.
    system.spawn("payment")?;
    for saga in &sagas {
        let ended = system.wait_terminal(saga, SETTLE).await?;
        assert_eq!(ended["status"], "COMPLETED", "{ended:#}");
        let attempts = ended["steps"].as_array().context("steps")?;
        assert!(attempts.iter().all(|s| s["attempts"].as_array().is_some_and(|a| a.len() <= 1)), "a retry: {ended:#}");
    }
    // Offsets are committed every few seconds: the backlog drains to 0 with the next commit.
    let started = std::time::Instant::now();
    loop {
        let (_, stats) = system.api_get("/api/v1/sagas/stats?window=1h").await?;
        if stats["start_requests_waiting"] == 0 {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(20), "the backlog stays: {stats}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The gauge follows the counts of sagas in flight, read again every 200 ms (admission::REFRESH).
    let paused = "saga_start_intake_paused{saga_type=\"ops-slow\"}";
    let (wanted, timeout) = (|paused| paused == 0.0, Duration::from_secs(10));
    system.wait_metric("orchestrator", paused, wanted, timeout, "intake still paused with nothing in flight").await?;
    system.stop().await
}

#[tokio::test]
async fn every_service_exits_within_ten_seconds_of_sigterm_with_its_database_gone() -> anyhow::Result<()> {
    let system = System::start().await?;
    system.set_stock("SKU-D", 10).await?;
    let (status, _) = system.place_order("d-1", &order_body("SKU-D", 1, "tok_visa", "12345")).await?;
    assert_eq!(status, 201);
    let outages = saga_e2e::SERVICES.map(|service| system.database_outage(service, Duration::from_secs(20)));
    let stops = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut took = Vec::new();
        for service in saga_e2e::SERVICES {
            took.push((service, system.terminate(service).await?.0));
        }
        anyhow::Ok(took)
    };
    let (outages, took) = tokio::join!(futures::future::join_all(outages), stops);
    for outage in outages {
        outage?;
    }
    for (service, took) in took? {
        assert!(took < Duration::from_secs(10), "{service} took {took:?} to exit after SIGTERM without its database");
    }
    system.stop().await
}
