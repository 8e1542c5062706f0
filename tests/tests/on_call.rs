//! The on-call surface end to end: queries, stats, retry, abort, bulk retry, audit, auth, errors
//! and the OpenAPI document, against real orchestrator and participant processes.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use saga_e2e::{charge_input, order_body, Options, System, READ_TOKEN};
use serde_json::{json, Value};

const SETTLE: Duration = Duration::from_secs(90);

fn ids(page: &Value) -> Vec<String> {
    page["items"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect()
}

async fn list(system: &System, query: &str) -> Vec<String> {
    let (status, page) = system.api_get(&format!("/api/v1/sagas?{query}")).await.unwrap();
    assert_eq!(status, 200, "{query}: {page}");
    ids(&page)
}

async fn sum(pool: &sqlx::PgPool, sql: &str, saga_id: &str) -> i64 {
    let id: uuid::Uuid = saga_id.parse().unwrap();
    sqlx::query_scalar(sql).bind(id).fetch_one(pool).await.unwrap()
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Places an order and waits for its saga to end; returns the saga id.
async fn order(system: &System, key: &str, body: &Value) -> String {
    let (status, order) = system.place_order(key, body).await.unwrap();
    assert_eq!(status, 201, "{order}");
    let id = order["saga_id"].as_str().unwrap().to_owned();
    system.wait_terminal(&id, SETTLE).await.unwrap();
    id
}

#[tokio::test]
async fn on_call_queries_filter_page_and_count_real_sagas() -> anyhow::Result<()> {
    let system = System::start_with(Options::default().test_definitions()).await?;
    system.set_stock("SKU-Q", 100).await?;
    system.set_stock("SKU-NONE", 0).await?;
    let good_1 = order(&system, "q-good-1", &order_body("SKU-Q", 1, "tok_visa", "12345")).await;
    let good_2 = order(&system, "q-good-2", &order_body("SKU-Q", 1, "tok_visa", "12345")).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let middle = now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let declined = order(&system, "q-declined", &order_body("SKU-Q", 1, "tok_declined", "12345")).await;
    let address = order(&system, "q-address", &order_body("SKU-Q", 1, "tok_visa", "00000")).await;
    let no_stock = order(&system, "q-nostock", &order_body("SKU-NONE", 1, "tok_visa", "12345")).await;
    let all: BTreeSet<String> = [&good_1, &good_2, &declined, &address, &no_stock].map(|s| s.to_string()).into();
    let failed: BTreeSet<String> = [&declined, &address, &no_stock].map(|s| s.to_string()).into();

    // The runbook's first command: recent failed sagas, each saying at which step and why.
    let (status, page) = system.api_get("/api/v1/sagas?status=FAILED&limit=10").await?;
    assert_eq!(status, 200);
    assert_eq!(ids(&page).into_iter().collect::<BTreeSet<_>>(), failed);
    for saga in page["items"].as_array().unwrap() {
        assert_eq!(saga["status"], "FAILED");
        assert!(saga["failure"]["step"].is_string() && saga["failure"]["code"].is_string(), "{saga}");
    }
    // The runbook's second: the failure counter, and the connection-pool gauges of its PromQL.
    let metrics = system.http.get(system.metrics_url("orchestrator")).send().await?.text().await?;
    assert!(metrics.lines().any(|l| l == "saga_failed_total{saga_type=\"order-fulfilment\"} 3"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "saga_created_total{saga_type=\"order-fulfilment\"} 5"), "{metrics}");
    for state in ["open", "max"] {
        let sample = format!("database_connections{{state=\"{state}\"}}");
        let value = system.metric("orchestrator", &sample).await?;
        assert!(value > 0.0, "{sample} = {value}");
    }

    // Consumer lag per topic partition, from librdkafka's statistics: back to zero once settled.
    let started = std::time::Instant::now();
    loop {
        let metrics = system.http.get(system.metrics_url("orchestrator")).send().await?.text().await?;
        let lags: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                l.starts_with("kafka_consumer_lag{") && l.contains("saga-replies") && l.contains("partition=\"")
            })
            .collect();
        if !lags.is_empty() && lags.iter().all(|l| l.ends_with(" 0")) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no settled lag gauge: {lags:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every filter.
    let set = |v: Vec<String>| v.into_iter().collect::<BTreeSet<String>>();
    assert_eq!(set(list(&system, "status=COMPLETED,failed").await), all);
    assert_eq!(set(list(&system, "status=COMPLETED&status=FAILED").await), all);
    assert_eq!(list(&system, "status=RUNNING").await, Vec::<String>::new());
    assert_eq!(list(&system, "failed_step=charge_payment").await, vec![declined.clone()]);
    assert_eq!(list(&system, "failed_step=reserve_inventory").await, vec![no_stock.clone()]);
    assert_eq!(list(&system, "failure_code=INVALID_ADDRESS").await, vec![address.clone()]);
    assert_eq!(list(&system, "failure_code=PAYMENT_DECLINED&status=FAILED").await, vec![declined.clone()]);
    assert_eq!(list(&system, "failure_code=PAYMENT_DECLINED&status=COMPLETED").await, Vec::<String>::new());
    let business_key = system.saga(&address).await?["business_key"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&business_key).is_ok(), "the order id: {business_key}");
    assert_eq!(list(&system, &format!("business_key={business_key}")).await, vec![address.clone()]);
    assert_eq!(set(list(&system, "saga_type=order-fulfilment").await), all);
    assert_eq!(list(&system, "saga_type=ops-fast").await, Vec::<String>::new());
    let middle_q = middle.replace('+', "%2B");
    assert_eq!(set(list(&system, &format!("created_after={middle_q}")).await), failed);
    assert_eq!(
        set(list(&system, &format!("created_before={middle_q}")).await),
        set(vec![good_1.clone(), good_2.clone()])
    );
    assert_eq!(set(list(&system, &format!("updated_after={middle_q}")).await), failed);
    assert_eq!(
        set(list(&system, &format!("updated_before={middle_q}")).await),
        set(vec![good_1.clone(), good_2.clone()])
    );
    assert_eq!(list(&system, "stuck_for=1s").await, Vec::<String>::new(), "nothing is unfinished");
    assert_eq!(list(&system, "past_deadline=true").await, Vec::<String>::new());
    // Values are bound parameters: SQL in a value is just a value that matches nothing.
    assert_eq!(list(&system, "business_key=x'%20OR%201=1%20--").await, Vec::<String>::new());

    // Keyset pagination: 2 + 2 + 1, newest first, no saga twice, the same order as one page.
    let whole = list(&system, "limit=500").await;
    assert_eq!(whole.first(), Some(&no_stock), "newest first");
    let mut paged = Vec::new();
    let mut query = "limit=2".to_owned();
    let mut sizes = Vec::new();
    loop {
        let (status, page) = system.api_get(&format!("/api/v1/sagas?{query}")).await?;
        assert_eq!(status, 200, "{page}");
        sizes.push(page["count"].as_u64().unwrap());
        paged.extend(ids(&page));
        match page["next"].as_str() {
            Some(cursor) => query = format!("limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(sizes, [2, 2, 1]);
    assert_eq!(paged, whole);
    // A cursor keeps its place under a filter too.
    let (_, first) = system.api_get("/api/v1/sagas?status=FAILED&limit=1").await?;
    let cursor = first["next"].as_str().unwrap();
    let (_, second) = system.api_get(&format!("/api/v1/sagas?status=FAILED&limit=2&cursor={cursor}")).await?;
    assert_eq!(second["next"], Value::Null);
    let mut both = ids(&first);
    both.extend(ids(&second));
    assert_eq!(both.into_iter().collect::<BTreeSet<_>>(), failed);

    // The detail says what was undone.
    let detail = system.saga(&address).await?;
    let undone: Vec<&str> =
        detail["compensations"].as_array().unwrap().iter().map(|c| c["step"].as_str().unwrap()).collect();
    assert_eq!(undone, ["charge_payment", "reserve_inventory", "verify_order"]);
    assert!(detail["compensations"].as_array().unwrap().iter().all(|c| c["status"] == "SUCCEEDED"));
    assert_eq!(detail["input"]["payment_token"], "[redacted]");

    // Stats over the last hour.
    let (status, stats) = system.api_get("/api/v1/sagas/stats?window=1h").await?;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["total"], 5);
    assert_eq!(
        stats["by_status"],
        json!({"RUNNING": 0, "COMPENSATING": 0, "COMPLETED": 2, "FAILED": 3, "NEEDS_ATTENTION": 0})
    );
    assert_eq!(stats["success_rate"], 0.4);
    let by_code: BTreeSet<(String, i64)> = stats["failures_by_code"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["key"].as_str().unwrap().to_owned(), c["count"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        by_code,
        [("INVALID_ADDRESS", 1), ("INVENTORY_UNAVAILABLE", 1), ("PAYMENT_DECLINED", 1)]
            .map(|(c, n)| (c.to_owned(), n))
            .into()
    );
    assert_eq!(stats["failures_by_step"].as_array().unwrap().len(), 3);
    let p = &stats["completed_duration_seconds"];
    let (p50, p99) = (p["p50"].as_f64().unwrap(), p["p99"].as_f64().unwrap());
    assert!(p50 > 0.0 && p50 <= p99, "{p}");
    let (_, none) = system.api_get("/api/v1/sagas/stats?saga_type=ops-fast").await?;
    assert_eq!((none["total"].clone(), none["success_rate"].clone()), (json!(0), Value::Null));
    let (_, before) = system.api_get(&format!("/api/v1/sagas/stats?from=2020-01-01T00:00:00Z&to={middle_q}")).await?;
    assert_eq!(before["total"], 2);

    // Definitions.
    let (status, defs) = system.api_get("/api/v1/saga-definitions").await?;
    assert_eq!(status, 200);
    let order_def = defs["items"].as_array().unwrap().iter().find(|d| d["name"] == "order-fulfilment").unwrap();
    assert_eq!((order_def["version"].clone(), order_def["latest"].clone()), (json!(1), json!(true)));
    let steps: Vec<&str> = order_def["steps"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(steps, ["verify_order", "reserve_inventory", "charge_payment", "create_shipment", "approve_order"]);
    assert!(defs["items"].as_array().unwrap().iter().any(|d| d["name"] == "ops-fast"));
    let (status, _) = system.api_get("/api/v1/saga-definitions/ops-slow").await?;
    assert_eq!(status, 200);
    let (status, missing) = system.api_get("/api/v1/saga-definitions/nope").await?;
    assert_eq!(status, 404, "{missing}");
    system.stop().await
}

/// Starts an orchestrator alone (no participant): enough for input validation and auth.
async fn orchestrator_only() -> anyhow::Result<System> {
    System::start_with(Options {
        skip: vec!["order", "inventory", "payment", "fulfilment"],
        ..Options::default().test_definitions()
    })
    .await
}

#[tokio::test]
async fn bad_input_is_refused_with_a_problem_that_says_what_is_allowed() -> anyhow::Result<()> {
    let system = orchestrator_only().await?;
    let saga = system.start_saga("ops-slow", &charge_input("SKU-X", 1, "tok_visa"), "bad-input-1").await?;
    let unknown = uuid::Uuid::now_v7();
    let big = "x".repeat(300 * 1024);
    // (method, path, body, status, type, words the detail must contain)
    type Case<'a> = (&'a str, String, Option<Value>, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "GET",
            "/api/v1/sagas?status=DONE".into(),
            None,
            400,
            "invalid-request",
            "RUNNING, COMPENSATING, COMPLETED, FAILED, NEEDS_ATTENTION",
        ),
        ("GET", "/api/v1/sagas?limit=-1".into(), None, 400, "invalid-request", "from 1 to 500"),
        ("GET", "/api/v1/sagas?limit=100000".into(), None, 400, "invalid-request", "from 1 to 500"),
        ("GET", "/api/v1/sagas?limit=ten".into(), None, 400, "invalid-request", "from 1 to 500"),
        ("GET", "/api/v1/sagas?cursor=garbage".into(), None, 400, "invalid-request", "cursor is not valid"),
        ("GET", "/api/v1/sagas?created_after=yesterday".into(), None, 400, "invalid-request", "RFC 3339"),
        ("GET", "/api/v1/sagas?stuck_for=forever".into(), None, 400, "invalid-request", "such as 90s, 15m"),
        ("GET", "/api/v1/sagas?past_deadline=maybe".into(), None, 400, "invalid-request", "true or false"),
        ("GET", "/api/v1/sagas?colour=red".into(), None, 400, "invalid-request", "allowed: status, saga_type"),
        ("GET", "/api/v1/sagas/not-a-uuid".into(), None, 400, "invalid-request", "not a saga id"),
        ("GET", format!("/api/v1/sagas/{unknown}"), None, 404, "not-found", "no saga"),
        ("GET", format!("/api/v1/sagas/{unknown}/audit"), None, 404, "not-found", "no saga"),
        ("GET", "/api/v1/sagas/stats?window=soon".into(), None, 400, "invalid-request", "positive duration"),
        ("GET", "/api/v1/sagas/stats?from=yesterday".into(), None, 400, "invalid-request", "RFC 3339"),
        ("GET", "/api/v1/sagas/stats?bucket=1m".into(), None, 400, "invalid-request", "window, from, to, saga_type"),
        ("POST", format!("/api/v1/sagas/{saga}/retry"), Some(json!({})), 400, "invalid-request", "reason"),
        (
            "POST",
            format!("/api/v1/sagas/{saga}/retry"),
            Some(json!({"reason": " "})),
            400,
            "invalid-request",
            "1 to 1000 characters",
        ),
        (
            "POST",
            format!("/api/v1/sagas/{saga}/abort"),
            Some(json!({"reason": "x", "force": true})),
            400,
            "invalid-request",
            "unknown field",
        ),
        ("POST", format!("/api/v1/sagas/{unknown}/abort"), Some(json!({"reason": "x"})), 404, "not-found", "no saga"),
        ("POST", "/api/v1/sagas/bulk-retry".into(), Some(json!({"reason": "x"})), 400, "invalid-request", "limit"),
        (
            "POST",
            "/api/v1/sagas/bulk-retry".into(),
            Some(json!({"reason": "x", "limit": 0})),
            400,
            "invalid-request",
            "from 1 to 500",
        ),
        (
            "POST",
            "/api/v1/sagas/bulk-retry".into(),
            Some(json!({"limit": 5})),
            400,
            "invalid-request",
            "reason is required",
        ),
        (
            "POST",
            "/api/v1/sagas/bulk-retry".into(),
            Some(json!({"limit": 5, "reason": "x", "filter": {"status": ["NOPE"]}})),
            400,
            "invalid-request",
            "NEEDS_ATTENTION",
        ),
        (
            "POST",
            "/api/v1/sagas".into(),
            Some(json!({"saga_type": "nope", "input": {}})),
            400,
            "invalid-request",
            "defined types",
        ),
        (
            "POST",
            "/api/v1/sagas".into(),
            Some(json!({"saga_type": "ops-slow", "input": big})),
            413,
            "payload-too-large",
            "larger than",
        ),
        ("DELETE", "/api/v1/sagas".into(), None, 405, "method-not-allowed", "allowed"),
        ("GET", "/api/v1/nothing-here".into(), None, 404, "not-found", "no such resource"),
    ];
    for (method, path, body, status, kind, words) in cases {
        let mut request = system
            .http
            .request(method.parse()?, system.url("orchestrator", &path))
            .header("Idempotency-Key", format!("bad-{}", uuid::Uuid::new_v4()));
        if let Some(body) = &body {
            request = request.json(body);
        }
        let response = request.send().await?;
        let what = format!("{method} {}", &path[..path.len().min(80)]);
        assert_eq!(response.status().as_u16(), status, "{what}");
        let content_type = response.headers()["content-type"].to_str()?.to_owned();
        assert_eq!(content_type, "application/problem+json", "{what}");
        let problem: Value = response.json().await?;
        assert_eq!(problem["status"], status, "{what}: {problem}");
        assert_eq!(problem["type"], format!("https://saga-orchestrator.dev/problems/{kind}"), "{what}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains(words), "{what}: {problem}");
    }
    // Nothing was changed by the refused requests.
    let after = system.saga(&saga).await?;
    assert_eq!((after["status"].clone(), after["version"].clone()), (json!("RUNNING"), json!(1)));
    let (_, audit) = system.api_get(&format!("/api/v1/sagas/{saga}/audit")).await?;
    assert_eq!(audit["entries"], json!([]));
    system.stop().await
}

#[tokio::test]
async fn only_a_valid_token_of_the_right_scope_gets_an_answer() -> anyhow::Result<()> {
    let system = orchestrator_only().await?;
    let saga = system.start_saga("ops-slow", &charge_input("SKU-X", 1, "tok_visa"), "auth-1").await?;
    let anonymous = reqwest::Client::new();
    let url = |path: &str| system.url("orchestrator", path);
    let abort = json!({"reason": "auth test"});

    // No token, or a wrong one: 401 with a challenge, as problem+json.
    for path in ["/api/v1/sagas", "/api/v1/sagas/stats", "/api/v1/saga-definitions", "/api/v1/openapi.json"] {
        let response = anonymous.get(url(path)).send().await?;
        assert_eq!(response.status(), 401, "{path}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer realm=\"saga-orchestrator\"");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
    }
    let response = anonymous.get(url("/api/v1/sagas")).bearer_auth("not-a-token-at-all-1234").send().await?;
    assert_eq!(response.status(), 401);
    let response = anonymous.post(url(&format!("/api/v1/sagas/{saga}/abort"))).json(&abort).send().await?;
    assert_eq!(response.status(), 401);

    // A read token reads, and is refused actions with 403.
    let response = anonymous.get(url("/api/v1/sagas?status=RUNNING")).bearer_auth(READ_TOKEN).send().await?;
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await?;
    assert_eq!(ids(&page), vec![saga.clone()]);
    for path in [format!("/api/v1/sagas/{saga}/abort"), format!("/api/v1/sagas/{saga}/retry")] {
        let response = anonymous.post(url(&path)).bearer_auth(READ_TOKEN).json(&abort).send().await?;
        assert_eq!(response.status(), 403, "{path}");
        let problem: Value = response.json().await?;
        assert!(problem["detail"].as_str().unwrap().contains("needs scope admin"), "{problem}");
    }
    assert_eq!(system.saga(&saga).await?["status"], "RUNNING", "refused actions changed nothing");

    // The admin token acts, and is the actor in the audit log.
    let (status, done) = system.api_post(&format!("/api/v1/sagas/{saga}/abort"), &abort, None).await?;
    assert_eq!(status, 200, "{done}");
    let (_, audit) = system.api_get(&format!("/api/v1/sagas/{saga}/audit")).await?;
    assert_eq!(audit["entries"][0]["actor"], "admin");

    // Health and readiness stay open; metrics are on their own port, without a token.
    for path in ["/health", "/ready"] {
        assert_eq!(anonymous.get(url(path)).send().await?.status(), 200, "{path}");
    }
    assert_eq!(anonymous.get(system.metrics_url("orchestrator")).send().await?.status(), 200);
    system.stop().await
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_every_route_answers() -> anyhow::Result<()> {
    let system = orchestrator_only().await?;
    let (status, doc) = system.api_get("/api/v1/openapi.json").await?;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{}", doc["openapi"]);
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| item.as_object().unwrap().keys().map(move |m| (m.to_uppercase(), path.clone())))
        .collect();
    let routes: BTreeSet<(String, String)> = [
        ("GET", "/api/v1/sagas"),
        ("POST", "/api/v1/sagas"),
        ("GET", "/api/v1/sagas/stats"),
        ("GET", "/api/v1/sagas/{id}"),
        ("POST", "/api/v1/sagas/{id}/retry"),
        ("POST", "/api/v1/sagas/{id}/abort"),
        ("GET", "/api/v1/sagas/{id}/audit"),
        ("POST", "/api/v1/sagas/bulk-retry"),
        ("GET", "/api/v1/saga-definitions"),
        ("GET", "/api/v1/saga-definitions/{name}"),
        ("GET", "/api/v1/dead-letters"),
        ("POST", "/api/v1/dead-letters/replay"),
        ("GET", "/api/v1/retention"),
        ("GET", "/api/v1/session"),
        ("GET", "/api/v1/openapi.json"),
    ]
    .map(|(m, p)| (m.to_owned(), p.to_owned()))
    .into();
    assert_eq!(documented, routes);
    // Every documented route exists on the server: none answers 404-for-the-route or 405.
    let saga = system.start_saga("ops-slow", &charge_input("SKU-X", 1, "tok_visa"), "openapi-1").await?;
    for (method, path) in &documented {
        let concrete = path.replace("{id}", &saga).replace("{name}", "ops-slow");
        let mut request = system.http.request(method.parse()?, system.url("orchestrator", &concrete));
        if method == "POST" {
            request = request.json(&json!({})).header("Idempotency-Key", format!("openapi-{}", uuid::Uuid::new_v4()));
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let unknown_route = status == 404 && body["detail"].as_str().is_some_and(|d| d.contains("no such resource"));
        assert!(!unknown_route && status != 405, "{method} {concrete}: {status} {body}");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(doc["components"]["schemas"]["SagaDetail"].is_object());
    system.stop().await
}

#[tokio::test]
async fn a_saga_that_needs_attention_is_retried_once_under_double_submission_and_finishes_compensating(
) -> anyhow::Result<()> {
    // No payment service: the charge times out, its refund times out twice, and the saga parks.
    let system = System::start_with(Options::default().test_definitions().skip("payment")).await?;
    system.set_stock("SKU-ATT", 10).await?;
    let saga = system.start_saga("ops-fast", &charge_input("SKU-ATT", 3, "tok_visa"), "att-1").await?;
    let parked = system.wait_status(&saga, "NEEDS_ATTENTION", SETTLE).await?;
    assert_eq!(parked["attention"]["step"], "charge_payment", "{parked:#}");
    assert_eq!(parked["attention"]["code"], "STEP_TIMEOUT");
    assert_eq!(system.stock("SKU-ATT").await?, 7, "the reservation is held: nothing claims it was undone");
    let (_, needing) = system.api_get("/api/v1/sagas?status=NEEDS_ATTENTION").await?;
    assert_eq!(ids(&needing), vec![saga.clone()]);

    // Abort is refused: the saga is already undoing; retry is what it needs.
    let (status, problem) =
        system.api_post(&format!("/api/v1/sagas/{saga}/abort"), &json!({"reason": "give up"}), None).await?;
    assert_eq!(status, 409, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("fix its cause and retry"), "{problem}");

    // The cause is fixed; the retry is clicked twice at once with one key: one action.
    system.spawn("payment")?;
    system.wait_ready("payment", SETTLE).await?;
    // Until it has caught up with the commands sent while it was away (its first fetch after
    // joining can take over half a second, longer than this saga's 600 ms timeout), so that the
    // retry's command is answered within its deadline.
    let payment = system.pool("payment").await?;
    let caught_up = std::time::Instant::now();
    while sum(&payment, "SELECT count(*) FROM processed_commands WHERE saga_id = $1 AND kind = 'COMPENSATION'", &saga)
        .await
        == 0
    {
        assert!(caught_up.elapsed() < SETTLE, "the payment service never handled the refunds sent while it was away");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let retry = json!({"reason": "payment service is back"});
    let path = format!("/api/v1/sagas/{saga}/retry");
    let (first, second) = tokio::join!(
        system.api_post(&path, &retry, Some("incident-42-retry")),
        system.api_post(&path, &retry, Some("incident-42-retry"))
    );
    let ((s1, b1), (s2, b2)) = (first?, second?);
    assert_eq!((s1, s2), (200, 200), "{b1} {b2}");
    assert_eq!(b1, b2, "the second submission replays the first response");
    assert_eq!(
        (b1["status_before"].clone(), b1["status_after"].clone()),
        (json!("NEEDS_ATTENTION"), json!("COMPENSATING"))
    );
    // The same key for another request is refused.
    let (status, _) = system.api_post(&path, &json!({"reason": "something else"}), Some("incident-42-retry")).await?;
    assert_eq!(status, 422);

    let done = system.wait_status(&saga, "FAILED", SETTLE).await?;
    assert_eq!(system.stock("SKU-ATT").await?, 10, "the stock is released");
    let net =
        sum(&payment, "SELECT coalesce(sum(amount_cents), 0)::bigint FROM ledger WHERE saga_id = $1", &saga).await;
    let charges =
        sum(&payment, "SELECT count(*) FROM ledger WHERE saga_id = $1 AND entry_type = 'CHARGE'", &saga).await;
    assert_eq!(net, 0, "whatever was charged was refunded");
    assert!(charges <= 1, "{charges} charges");
    // The refund was re-driven with the next attempt number.
    let refunds: Vec<(i64, String)> = done["steps"][1]["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "COMPENSATION")
        .map(|a| (a["attempt"].as_i64().unwrap(), a["status"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(refunds, [(1, "TIMED_OUT".to_owned()), (2, "TIMED_OUT".to_owned()), (3, "SUCCEEDED".to_owned())]);

    // One audit entry, and a FAILED saga cannot be retried.
    let (_, audit) = system.api_get(&format!("/api/v1/sagas/{saga}/audit")).await?;
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{audit:#}");
    let entry = &entries[0];
    assert_eq!(
        (&entry["action"], &entry["actor"], &entry["reason"], &entry["idempotency_key"]),
        (&json!("RETRY"), &json!("admin"), &json!("payment service is back"), &json!("incident-42-retry"))
    );
    assert_eq!((&entry["status_before"], &entry["status_after"]), (&json!("NEEDS_ATTENTION"), &json!("COMPENSATING")));
    assert_eq!(entry["version_after"].as_i64().unwrap(), entry["version_before"].as_i64().unwrap() + 1);
    let history = done["history"].as_array().unwrap();
    assert!(history.iter().any(|h| h["trigger"] == "RETRY"
        && h["summary"].as_str().unwrap().starts_with("retry by admin (payment service is back)")));
    let (status, problem) = system.api_post(&path, &json!({"reason": "again"}), Some("incident-42-retry-2")).await?;
    assert_eq!(status, 409, "{problem}");
    system.stop().await
}

#[tokio::test]
async fn a_stuck_saga_is_aborted_or_retried_and_nothing_is_applied_twice() -> anyhow::Result<()> {
    // No payment service and minute-long timeouts: sagas wait at the charge.
    let system = System::start_with(Options::default().test_definitions().skip("payment")).await?;
    system.set_stock("SKU-STUCK", 10).await?;
    let to_abort = system.start_saga("ops-slow", &charge_input("SKU-STUCK", 2, "tok_visa"), "stuck-abort").await?;
    let to_retry = system.start_saga("ops-slow", &charge_input("SKU-STUCK", 3, "tok_visa"), "stuck-retry").await?;
    for saga in [&to_abort, &to_retry] {
        let started = std::time::Instant::now();
        while system.saga(saga).await?["current_step"]["name"] != "charge_payment" {
            assert!(started.elapsed() < SETTLE, "never reached the charge");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stuck: BTreeSet<String> = list(&system, "stuck_for=1s").await.into_iter().collect();
    assert_eq!(stuck, [to_abort.clone(), to_retry.clone()].into());
    assert_eq!(system.stock("SKU-STUCK").await?, 5);

    let (status, aborted) = system
        .api_post(&format!("/api/v1/sagas/{to_abort}/abort"), &json!({"reason": "customer cancelled"}), None)
        .await?;
    assert_eq!(status, 200, "{aborted}");
    assert_eq!(
        (aborted["status_before"].clone(), aborted["status_after"].clone()),
        (json!("RUNNING"), json!("COMPENSATING"))
    );
    let (status, problem) =
        system.api_post(&format!("/api/v1/sagas/{to_abort}/abort"), &json!({"reason": "again"}), None).await?;
    assert_eq!(status, 409);
    assert!(problem["detail"].as_str().unwrap().contains("already compensating"), "{problem}");
    let (status, retried) =
        system.api_post(&format!("/api/v1/sagas/{to_retry}/retry"), &json!({"reason": "kick it"}), None).await?;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["status_after"], "RUNNING");

    // The payment service comes back and works through everything sent to it, old and new.
    system.spawn("payment")?;
    let aborted = system.wait_status(&to_abort, "FAILED", SETTLE).await?;
    let retried = system.wait_status(&to_retry, "COMPLETED", SETTLE).await?;
    assert_eq!(aborted["failure"]["code"], "ABORTED");
    assert_eq!(aborted["failure"]["reason"], "customer cancelled");
    assert_eq!(system.stock("SKU-STUCK").await?, 7, "the aborted saga's 2 are back; the retried saga keeps its 3");
    let payment = system.pool("payment").await?;
    let net = |id: String| {
        let payment = payment.clone();
        async move {
            sum(&payment, "SELECT coalesce(sum(amount_cents), 0)::bigint FROM ledger WHERE saga_id = $1", &id).await
        }
    };
    assert_eq!(net(to_abort.clone()).await, 0, "the aborted saga's charge, if any, was refunded");
    assert_eq!(net(to_retry.clone()).await, 3750, "charged exactly once");
    let charge_attempts: Vec<(i64, String)> = retried["steps"][1]["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["attempt"].as_i64().unwrap(), a["status"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(charge_attempts, [(1, "ABANDONED".to_owned()), (2, "SUCCEEDED".to_owned())]);

    // Ended sagas refuse both actions.
    for (saga, action) in [(&to_retry, "retry"), (&to_retry, "abort"), (&to_abort, "retry"), (&to_abort, "abort")] {
        let (status, problem) =
            system.api_post(&format!("/api/v1/sagas/{saga}/{action}"), &json!({"reason": "late"}), None).await?;
        assert_eq!(status, 409, "{action} {saga}: {problem}");
    }
    let (_, audit) = system.api_get(&format!("/api/v1/sagas/{to_abort}/audit")).await?;
    let actions: Vec<&str> =
        audit["entries"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["ABORT"]);
    system.stop().await
}

#[tokio::test]
async fn bulk_retry_shows_what_it_would_touch_and_retries_at_most_its_limit() -> anyhow::Result<()> {
    let system = System::start_with(Options::default().test_definitions().skip("payment")).await?;
    system.set_stock("SKU-BULK", 10).await?;
    let mut sagas = Vec::new();
    for i in 0..3 {
        let saga =
            system.start_saga("ops-fast", &charge_input("SKU-BULK", 1, "tok_visa"), &format!("bulk-{i}")).await?;
        system.wait_status(&saga, "NEEDS_ATTENTION", SETTLE).await?;
        sagas.push(saga);
    }
    let filter = json!({"saga_type": "ops-fast", "failed_step": "charge_payment"});

    let (status, dry) = system
        .api_post("/api/v1/sagas/bulk-retry", &json!({"filter": filter, "limit": 10, "dry_run": true}), None)
        .await?;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(
        (dry["matched"].clone(), dry["retried"].clone(), dry["bulk_id"].clone()),
        (json!(3), json!(0), Value::Null)
    );
    assert!(dry["items"].as_array().unwrap().iter().all(|i| i["result"] == "would_retry"), "{dry}");
    for saga in &sagas {
        let after = system.saga(saga).await?;
        assert_eq!(after["status"], "NEEDS_ATTENTION", "a dry run changes nothing");
        let (_, audit) = system.api_get(&format!("/api/v1/sagas/{saga}/audit")).await?;
        assert_eq!(audit["entries"], json!([]));
    }

    // With the payment service back, the limit bounds the run: the oldest two go first.
    system.spawn("payment")?;
    system.wait_ready("payment", SETTLE).await?;
    let body = json!({"filter": filter, "limit": 2, "reason": "payment is back"});
    let (status, first) = system.api_post("/api/v1/sagas/bulk-retry", &body, Some("bulk-key-1")).await?;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["retried"], 2);
    let touched: Vec<String> =
        first["items"].as_array().unwrap().iter().map(|i| i["saga_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(touched, sagas[..2]);
    let (_, replay) = system.api_post("/api/v1/sagas/bulk-retry", &body, Some("bulk-key-1")).await?;
    assert_eq!(replay, first, "the same key replays the response without retrying again");
    for saga in &sagas[..2] {
        system.wait_status(saga, "FAILED", SETTLE).await?;
        let (_, audit) = system.api_get(&format!("/api/v1/sagas/{saga}/audit")).await?;
        assert_eq!(audit["entries"].as_array().unwrap().len(), 1);
        assert_eq!(audit["entries"][0]["bulk_id"], first["bulk_id"]);
    }
    assert_eq!(system.saga(&sagas[2]).await?["status"], "NEEDS_ATTENTION", "beyond the limit: untouched");
    let (_, rest) = system
        .api_post("/api/v1/sagas/bulk-retry", &json!({"filter": filter, "limit": 10, "reason": "the rest"}), None)
        .await?;
    assert_eq!(rest["retried"], 1, "{rest}");
    system.wait_status(&sagas[2], "FAILED", SETTLE).await?;
    assert_eq!(system.stock("SKU-BULK").await?, 10);
    system.stop().await
}

#[tokio::test]
async fn a_saga_past_its_deadline_that_the_timer_has_not_moved_is_found_and_can_be_retried() -> anyhow::Result<()> {
    // A timer loop that looks only once every ten minutes: deadlines pass unhandled.
    let system = System::start_with(Options::default().test_definitions().skip("payment").env(
        "orchestrator",
        "TIMER_INTERVAL_MS",
        "600000",
    ))
    .await?;
    system.set_stock("SKU-LATE", 10).await?;
    let saga = system.start_saga("ops-fast", &charge_input("SKU-LATE", 1, "tok_visa"), "late-1").await?;
    let started = std::time::Instant::now();
    loop {
        if list(&system, "past_deadline=true").await == vec![saga.clone()] {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never listed as past its deadline");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(list(&system, "past_deadline=true&status=COMPENSATING").await, Vec::<String>::new());
    let (status, retried) =
        system.api_post(&format!("/api/v1/sagas/{saga}/retry"), &json!({"reason": "timer stalled"}), None).await?;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(list(&system, "past_deadline=true").await, Vec::<String>::new(), "a fresh deadline");
    system.stop().await
}

#[tokio::test]
async fn sagactl_lists_shows_counts_aborts_and_audits_with_exit_codes_scripts_can_trust() -> anyhow::Result<()> {
    use saga_e2e::ADMIN_TOKEN;
    let system = orchestrator_only().await?;
    // No participant runs: the saga waits at its first step.
    let saga = system.start_saga("ops-slow", &charge_input("SKU-CLI", 1, "tok_visa"), "cli-1").await?;
    let admin = Some(ADMIN_TOKEN);

    let (code, out, err) = system.sagactl(admin, &["list", "--status", "RUNNING", "--limit", "10"]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&saga) && out.contains("RUNNING") && out.contains("1 saga(s)"), "{out}");
    let (code, out, _) = system.sagactl(admin, &["--output", "json", "list", "--status", "RUNNING"]).await?;
    assert_eq!(code, 0);
    let page: Value = serde_json::from_str(&out)?;
    assert_eq!(ids(&page), vec![saga.clone()]);
    // The alerts' forms: what changed in the last hour, what has been running for a while.
    let (code, out, _) =
        system.sagactl(admin, &["--output", "json", "list", "--status", "RUNNING", "--since", "1h"]).await?;
    assert_eq!((code, ids(&serde_json::from_str(&out)?)), (0, vec![saga.clone()]));
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let (code, out, _) =
        system.sagactl(admin, &["--output", "json", "list", "--status", "RUNNING", "--since", "1s"]).await?;
    assert_eq!((code, ids(&serde_json::from_str(&out)?)), (0, Vec::<String>::new()), "not changed in the last second");
    let (code, out, _) = system.sagactl(admin, &["--output", "json", "list", "--stuck", "1h"]).await?;
    assert_eq!((code, ids(&serde_json::from_str(&out)?)), (0, Vec::<String>::new()), "started a moment ago");
    let (code, out, _) = system.sagactl(admin, &["show", &saga]).await?;
    assert_eq!(code, 0);
    assert!(out.contains("reserve_inventory") && out.contains("History") && out.contains("PENDING"), "{out}");
    let (code, out, _) = system.sagactl(admin, &["stats", "--window", "1h"]).await?;
    assert_eq!(code, 0);
    assert!(out.contains("total 1,"), "{out}");
    let (code, out, _) = system.sagactl(admin, &["definitions"]).await?;
    assert_eq!(code, 0);
    assert!(out.contains("order-fulfilment") && out.contains("verify_order -> reserve_inventory"), "{out}");

    // Acting: a read token is refused (5), the admin token acts, a second abort is refused (4).
    let (code, _, err) = system.sagactl(Some(READ_TOKEN), &["abort", &saga, "--reason", "cli"]).await?;
    assert_eq!(code, 5, "{err}");
    let (code, _, err) = system.sagactl(None, &["list"]).await?;
    assert_eq!(code, 5, "{err}");
    let (code, out, err) = system.sagactl(admin, &["abort", &saga, "--reason", "customer cancelled by phone"]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("RUNNING -> COMPENSATING"), "{out}");
    let (code, _, err) = system.sagactl(admin, &["abort", &saga, "--reason", "again"]).await?;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("already compensating"), "{err}");
    let (code, out, _) = system.sagactl(admin, &["audit", &saga]).await?;
    assert_eq!(code, 0);
    assert!(out.contains("ABORT") && out.contains("admin") && out.contains("customer cancelled by phone"), "{out}");
    let (code, out, _) =
        system.sagactl(admin, &["bulk-retry", "--status", "COMPENSATING", "--limit", "5", "--dry-run"]).await?;
    assert_eq!(code, 0);
    assert!(out.contains("dry run: matched 1, retried 0"), "{out}");

    // Not found (3), bad input (6), unreachable (7), bad command line (2).
    let (code, _, _) = system.sagactl(admin, &["show", &uuid::Uuid::now_v7().to_string()]).await?;
    assert_eq!(code, 3);
    let (code, _, err) = system.sagactl(admin, &["show", "not-a-uuid"]).await?;
    assert_eq!(code, 6, "{err}");
    let (code, _, err) = system.sagactl(admin, &["list", "--limit", "0"]).await?;
    assert_eq!(code, 6, "{err}");
    let (code, _, err) = system.sagactl(admin, &["--url", "http://127.0.0.1:9", "list"]).await?;
    assert_eq!(code, 7, "{err}");
    let (code, _, _) = system.sagactl(admin, &["retry", &saga]).await?;
    assert_eq!(code, 2, "--reason is required");
    system.stop().await
}
