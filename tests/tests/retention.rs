//! Retention, against the real services, Postgres and Kafka: finished sagas (with their
//! attempts, history and audit), operator idempotency records, dead-letter replay records and the
//! participants' dedupe records go once past their age, and not before; sagas needing attention
//! and sagas in flight stay; the append-only tables still refuse anyone else's delete; a metric,
//! the API and `sagactl retention` say what is kept; dead-letter topics are created with their
//! retention.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use saga_e2e::faults::{self, Kind};
use saga_e2e::{Options, System, READ_TOKEN, SERVICES};
use uuid::Uuid;

const KEEP: Duration = Duration::from_secs(4);

fn options() -> Options {
    let mut options = Options::default();
    for service in SERVICES {
        options = options
            .env(service, "RETENTION_INTERVAL", "200ms")
            // Two rows a transaction: every policy needs several batches.
            .env(service, "RETENTION_BATCH_SIZE", "2")
            .env(service, "RETENTION_BATCH_PAUSE", "10ms")
            .env(service, "DEDUPE_RETENTION", "4s");
    }
    options.env("orchestrator", "SAGA_RETENTION", "4s").env("orchestrator", "OPERATOR_REQUEST_RETENTION", "4s").env(
        "orchestrator",
        "DEAD_LETTER_REPLAY_RETENTION",
        "4s",
    )
}

/// A saga written straight into the table: `status` since `age` ago, with one history entry.
async fn insert_saga(pool: &sqlx::PgPool, status: &str, age: chrono::Duration) -> anyhow::Result<Uuid> {
    let id = Uuid::new_v4();
    let at = Utc::now() - age;
    let (wake_at, ended_at) = match status {
        "RUNNING" => (Some(Utc::now() + chrono::Duration::days(1)), None),
        _ => (None, Some(at)),
    };
    sqlx::query(
        "INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, input, status,
             step_index, step_name, step_kind, attempt, waiting, wake_at, created_at, updated_at, ended_at,
             attention_step, attention_code, attention_reason)
         VALUES ($1, 'order-fulfilment', 1, $1::text, 'h', '{}', $2, 2, 'charge_payment', 'COMPENSATION', 10,
             CASE WHEN $2 = 'RUNNING' THEN 'REPLY' ELSE 'NOTHING' END, $3, $4, $4, $5,
             CASE WHEN $2 = 'NEEDS_ATTENTION' THEN 'charge_payment' END,
             CASE WHEN $2 = 'NEEDS_ATTENTION' THEN 'STEP_TIMEOUT' END,
             CASE WHEN $2 = 'NEEDS_ATTENTION' THEN 'refund kept timing out' END)",
    )
    .bind(id)
    .bind(status)
    .bind(wake_at)
    .bind(at)
    .bind(ended_at)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO saga_history (saga_id, version, to_status, trigger, summary, recorded_at)
         VALUES ($1, 1, $2, 'STARTED', 'written by the retention test', $3)",
    )
    .bind(id)
    .bind(status)
    .bind(at)
    .execute(pool)
    .await?;
    Ok(id)
}

async fn count(pool: &sqlx::PgPool, sql: &str, ids: &[Uuid]) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).bind(ids).fetch_one(pool).await?)
}

#[tokio::test]
async fn what_is_past_its_age_goes_in_batches_and_nothing_else_does() -> anyhow::Result<()> {
    let system = System::start_with(options()).await?;
    let pool = system.pool("orchestrator").await?;
    let day = chrono::Duration::days(2);
    let parked = insert_saga(&pool, "NEEDS_ATTENTION", day).await?;
    let in_flight = insert_saga(&pool, "RUNNING", day).await?;
    sqlx::query(
        "INSERT INTO operator_requests (idempotency_key, request_hash, status_code, response, actor, created_at)
         VALUES ('old-request', 'h', 200, '{}', 'tester', now() - interval '2 days')",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO dead_letter_replays (dlq_topic, dlq_partition, dlq_offset, source_topic, actor, reason, replayed_at)
         VALUES ('x.dlq', 0, 0, 'x', 'tester', 'test', now() - interval '2 days')",
    )
    .execute(&pool)
    .await?;

    // Real sagas: good orders and declined cards (compensated), all finished within a second
    // or two of each other.
    system.set_stock("SKU-RET", 1000).await?;
    let kind = |i: usize| if i % 4 == 1 { Kind::Declined } else { Kind::Good };
    let placed = faults::place_many(&system, "ret", 12, 50.0, &["SKU-RET"], kind).await?;
    let ids: Vec<Uuid> = placed.iter().map(|p| p.saga_id).collect();

    // Watch every saga until it is gone: none may go before it has been finished for KEEP.
    let mut ended: BTreeMap<Uuid, DateTime<Utc>> = BTreeMap::new();
    let mut gone: BTreeMap<Uuid, DateTime<Utc>> = BTreeMap::new();
    let started = Instant::now();
    while gone.len() < ids.len() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "{} of {} sagas still there after 90 s",
            ids.len() - gone.len(),
            ids.len()
        );
        let rows: Vec<(Uuid, Option<DateTime<Utc>>)> =
            sqlx::query_as("SELECT id, ended_at FROM saga_instances WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_all(&pool)
                .await?;
        let now = Utc::now();
        for (id, at) in &rows {
            if let Some(at) = at {
                ended.insert(*id, *at);
            }
            anyhow::ensure!(!gone.contains_key(id), "saga {id} came back");
        }
        for id in &ids {
            if !rows.iter().any(|(r, _)| r == id) && ended.contains_key(id) {
                gone.entry(*id).or_insert(now);
            }
        }
        // Sagas that finished less than KEEP ago (with a margin for this loop's clock) are there.
        for (id, at) in &ended {
            if now - *at < chrono::Duration::from_std(KEEP)? - chrono::Duration::milliseconds(300) {
                anyhow::ensure!(!gone.contains_key(id), "saga {id} deleted {} after it ended", now - *at);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let statuses: Vec<Kind> = placed.iter().map(|p| p.kind).collect();
    assert!(statuses.contains(&Kind::Declined), "a compensated saga is among those deleted");

    // Their attempts, history and audit went with them; the saga needing attention and the one
    // in flight stay, with their history.
    for table in ["saga_step_attempts", "saga_history", "saga_audit"] {
        let left = count(&pool, &format!("SELECT count(*) FROM {table} WHERE saga_id = ANY($1)"), &ids).await?;
        assert_eq!(left, 0, "{table} rows of deleted sagas");
    }
    let kept = [parked, in_flight];
    assert_eq!(count(&pool, "SELECT count(*) FROM saga_instances WHERE id = ANY($1)", &kept).await?, 2);
    assert_eq!(count(&pool, "SELECT count(*) FROM saga_history WHERE saga_id = ANY($1)", &kept).await?, 2);

    // Operator idempotency records and replay records past their age are gone.
    let requests: i64 =
        sqlx::query_scalar("SELECT count(*) FROM operator_requests WHERE idempotency_key = 'old-request'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(requests, 0, "old operator request");
    let replays: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letter_replays").fetch_one(&pool).await?;
    assert_eq!(replays, 0, "old replay record");

    // Anyone else's delete is still refused.
    let refused = sqlx::query("DELETE FROM saga_history WHERE saga_id = $1").bind(parked).execute(&pool).await;
    let error = refused.expect_err("saga_history is append-only").to_string();
    assert!(error.contains("append-only"), "{error}");

    // The participants' dedupe records go too.
    let payment = system.pool("payment").await?;
    let started = Instant::now();
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_commands").fetch_one(&payment).await?;
        if left == 0 {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "{left} dedupe records still there");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Counted, and shown.
    let deleted = system.metric("orchestrator", "saga_retention_deleted_total{table=\"saga_instances\"}").await?;
    assert!(deleted >= ids.len() as f64, "saga_retention_deleted_total says {deleted}");
    let history = system.metric("orchestrator", "saga_retention_deleted_total{table=\"saga_history\"}").await?;
    assert!(history > deleted, "history rows deleted: {history}");
    let dedupe = system.metric("payment", "saga_retention_deleted_total{table=\"processed_commands\"}").await?;
    assert!(dedupe >= 12.0, "payment dedupe records deleted: {dedupe}");
    let (code, out, err) = system.sagactl(Some(READ_TOKEN), &["retention"]).await?;
    assert_eq!(code, 0, "{err}");
    for expected in
        ["saga_instances", "operator_requests", "dead_letter_replays", "4s", "Dead-letter topics keep messages 14days"]
    {
        assert!(out.contains(expected), "sagactl retention should show {expected:?}:\n{out}");
    }
    let (status, view) = system.api_get("/api/v1/retention").await?;
    assert_eq!(status, 200, "{view}");
    let sagas = &view["policies"][0];
    assert_eq!(sagas["policy"], "saga_instances");
    assert_eq!(sagas["keep_seconds"], 4);
    assert!(sagas["deleted_since_start"]["saga_instances"].as_u64().unwrap_or(0) >= ids.len() as u64, "{view}");
    assert!(view["last_run"].is_string(), "{view}");

    // The dead-letter topics were created keeping messages 14 days (KAFKA_DEAD_LETTER_RETENTION).
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &system.brokers).create()?;
    let topic = format!("{}saga-replies.dlq", system.topic_prefix());
    let configs = admin.describe_configs([&ResourceSpecifier::Topic(&topic)], &AdminOptions::new()).await?;
    let config = configs.into_iter().next().context("no answer")??;
    let retention = config.get("retention.ms").and_then(|e| e.value.clone());
    assert_eq!(retention.as_deref(), Some("1209600000"), "retention.ms of {topic}");

    system.stop().await
}
