//! The benchmark's scale mode (`scripts/bench --preload N`): fills the orchestrator's tables with
//! N finished order sagas shaped like the real ones (their row, five attempts and six history
//! entries each, 95 % COMPLETED and 5 % FAILED by a declined card, with the same JSON the engine
//! writes), then times the on-call queries of the API against them.
//!
//! The rows are generated in Postgres (`generate_series`), not sent through the services: 10
//! million sagas through the system would take the better part of a day on two cores.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// The steps of the order saga as a finished saga records them: per outcome (`declined`), the
/// attempt in sequence `seq`, and the history entry that finished it (version `seq + 2`).
const PLAN: &str = "plan (declined, seq, step_index, step_name, kind, action, participant, status, error_code,
                          error_message, to_status) AS (VALUES
    (false, 0, 0, 'verify_order',      'ACTION', 'verify_order',      'order',      'SUCCEEDED', NULL, NULL, 'RUNNING'),
    (false, 1, 1, 'reserve_inventory', 'ACTION', 'reserve_inventory', 'inventory',  'SUCCEEDED', NULL, NULL, 'RUNNING'),
    (false, 2, 2, 'charge_payment',    'ACTION', 'charge_payment',    'payment',    'SUCCEEDED', NULL, NULL, 'RUNNING'),
    (false, 3, 3, 'create_shipment',   'ACTION', 'create_shipment',   'fulfilment', 'SUCCEEDED', NULL, NULL, 'RUNNING'),
    (false, 4, 4, 'approve_order',     'ACTION', 'approve_order',     'order',      'SUCCEEDED', NULL, NULL, 'COMPLETED'),
    (true,  0, 0, 'verify_order',      'ACTION', 'verify_order',      'order',      'SUCCEEDED', NULL, NULL, 'RUNNING'),
    (true,  1, 1, 'reserve_inventory', 'ACTION', 'reserve_inventory', 'inventory',  'SUCCEEDED', NULL, NULL, 'RUNNING'),
    (true,  2, 2, 'charge_payment',    'ACTION', 'charge_payment',    'payment',    'FAILED',
        'PAYMENT_DECLINED', 'the card was declined', 'COMPENSATING'),
    (true,  3, 1, 'reserve_inventory', 'COMPENSATION', 'release_inventory', 'inventory', 'SUCCEEDED', NULL, NULL,
        'COMPENSATING'),
    (true,  4, 0, 'verify_order',      'COMPENSATION', 'reject_order', 'order', 'SUCCEEDED', NULL, NULL, 'FAILED'))";

/// Saga `i` of the preload: its times, ids and order. `$1..$2` is the range of `i`, `$3` the
/// creation time of saga 0 and `$4` the seconds between two sagas.
const SAGAS: &str = "g AS (
    SELECT i, (i % 20 = 3) AS declined, 'SKU-' || (i % 40) AS sku, 1 + (i % 3)::int AS quantity,
           $3::timestamptz + make_interval(secs => i * $4::float8) AS created,
           md5('saga' || i) AS h, md5('order' || i) AS o
    FROM generate_series($1::bigint, $2::bigint) AS i
), s AS (
    SELECT g.*,
           (lpad(to_hex((extract(epoch FROM created) * 1000)::bigint), 12, '0') || '7' || substr(h, 1, 3) || '8'
               || substr(h, 4, 15))::uuid AS id,
           (lpad(to_hex((extract(epoch FROM created) * 1000)::bigint), 12, '0') || '7' || substr(o, 1, 3) || '8'
               || substr(o, 4, 15))::uuid AS order_id
    FROM g
)";

/// What a step's successful attempt returns, as the participants answer.
const OUTPUT: &str = "CASE p.kind || ':' || p.step_name
    WHEN 'ACTION:verify_order' THEN '{\"status\": \"APPROVAL_PENDING\"}'::jsonb
    WHEN 'ACTION:reserve_inventory' THEN jsonb_build_object('reserved', jsonb_build_object(s.sku, s.quantity))
    WHEN 'ACTION:charge_payment' THEN jsonb_build_object('currency', 'USD', 'charged_cents', 1999 * s.quantity)
    WHEN 'ACTION:create_shipment' THEN jsonb_build_object('tracking_number', 'TRK-' || replace(s.id::text, '-', ''))
    WHEN 'ACTION:approve_order' THEN '{\"status\": \"APPROVED\"}'::jsonb
    WHEN 'COMPENSATION:reserve_inventory' THEN jsonb_build_object('released', jsonb_build_object(s.sku, s.quantity))
    WHEN 'COMPENSATION:verify_order' THEN '{\"code\": \"PAYMENT_DECLINED\", \"rejected\": true}'::jsonb
END";

/// Inserts sagas `first..=last` (their rows, attempts and history) in one transaction.
async fn insert_chunk(pool: &PgPool, first: i64, last: i64, base: DateTime<Utc>, spacing: f64) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let instances = format!(
        "WITH {SAGAS}
         INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, business_key,
             input, outputs, status, step_index, step_name, step_kind, attempt, waiting, wake_at, failure_step,
             failure_code, failure_reason, version, created_at, updated_at, ended_at)
         SELECT id, 'order-fulfilment', 1, 'order:' || order_id, h || o, order_id::text,
             jsonb_build_object('items', jsonb_build_array(jsonb_build_object('sku', sku, 'quantity', quantity,
                 'unit_price_cents', 1999)), 'currency', 'USD', 'order_id', order_id,
                 'customer_id', 'customer-' || (i % 100000), 'total_cents', 1999 * quantity,
                 'payment_token', CASE WHEN declined THEN 'tok_declined' ELSE 'tok_visa' END,
                 'shipping_address', jsonb_build_object('city', 'Springfield', 'name', NULL, 'line1', '1 Main St',
                     'line2', NULL, 'country', 'US', 'postal_code', '62701')),
             CASE WHEN declined THEN jsonb_build_object('verify_order', '{{\"status\": \"APPROVAL_PENDING\"}}'::jsonb,
                     'reserve_inventory', jsonb_build_object('reserved', jsonb_build_object(sku, quantity)))
                 ELSE jsonb_build_object('verify_order', '{{\"status\": \"APPROVAL_PENDING\"}}'::jsonb,
                     'reserve_inventory', jsonb_build_object('reserved', jsonb_build_object(sku, quantity)),
                     'charge_payment', jsonb_build_object('currency', 'USD', 'charged_cents', 1999 * quantity),
                     'create_shipment', jsonb_build_object('tracking_number', 'TRK-' || replace(id::text, '-', '')),
                     'approve_order', '{{\"status\": \"APPROVED\"}}'::jsonb) END,
             CASE WHEN declined THEN 'FAILED' ELSE 'COMPLETED' END,
             CASE WHEN declined THEN 0 ELSE 4 END,
             CASE WHEN declined THEN 'verify_order' ELSE 'approve_order' END,
             CASE WHEN declined THEN 'COMPENSATION' ELSE 'ACTION' END,
             1, 'NOTHING', NULL,
             CASE WHEN declined THEN 'charge_payment' END,
             CASE WHEN declined THEN 'PAYMENT_DECLINED' END,
             CASE WHEN declined THEN 'the card was declined' END,
             6, created, created + interval '80 ms', created + interval '80 ms'
         FROM s"
    );
    let attempts = format!(
        "WITH {SAGAS}, {PLAN}
         INSERT INTO saga_step_attempts (saga_id, step_index, step_name, kind, attempt, status, error_code,
             error_message, output, started_at, deadline_at, finished_at)
         SELECT s.id, p.step_index, p.step_name, p.kind, 1, p.status, p.error_code, p.error_message,
             CASE WHEN p.status = 'SUCCEEDED' THEN {OUTPUT} END,
             s.created + p.seq * interval '16 ms', s.created + p.seq * interval '16 ms' + interval '10 s',
             s.created + (p.seq + 1) * interval '16 ms'
         FROM s JOIN plan p ON p.declined = s.declined"
    );
    let history = format!(
        "WITH {SAGAS}, {PLAN}
         INSERT INTO saga_history (saga_id, version, from_status, to_status, trigger, summary, detail, recorded_at)
         SELECT s.id, v.version,
             CASE WHEN v.version > 1 THEN coalesce(done_before.to_status, 'RUNNING') END,
             coalesce(done.to_status, 'RUNNING'),
             CASE WHEN v.version = 1 THEN 'STARTED' ELSE 'REPLY' END,
             concat_ws('; ',
                 CASE WHEN v.version = 1 THEN 'started order-fulfilment v1' ELSE
                     done.step_name || ' ' || lower(done.kind) || ' attempt 1 '
                     || CASE WHEN done.status = 'SUCCEEDED' THEN 'succeeded'
                        ELSE 'failed: ' || done.error_code || ' (' || done.error_message || ')' END END,
                 CASE WHEN next.seq IS NOT NULL THEN 'sent ' || next.step_name || ' ' || lower(next.kind)
                     || ' attempt 1 to ' || next.participant END,
                 CASE WHEN done.to_status IN ('COMPLETED', 'FAILED') THEN 'saga ' || done.to_status
                      WHEN done.to_status = 'COMPENSATING' AND done.status = 'FAILED' THEN 'compensating' END),
             jsonb_build_object(
                 'commands', CASE WHEN next.seq IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(jsonb_build_object(
                     'kind', next.kind, 'step', next.step_name, 'action', next.action, 'attempt', 1,
                     'deadline', s.created + next.seq * interval '16 ms' + interval '10 s',
                     'participant', next.participant)) END,
                 'finished', CASE WHEN done.seq IS NULL THEN NULL ELSE jsonb_build_object('kind', done.kind,
                     'step', done.step_name, 'attempt', 1, 'outcome', done.status,
                     'error', CASE WHEN done.error_code IS NULL THEN NULL ELSE jsonb_build_object('code',
                         done.error_code, 'message', done.error_message, 'retryable', false) END) END,
                 'retry_at', NULL,
                 'message_id', CASE WHEN v.version = 1 THEN NULL ELSE md5(s.h || v.version)::uuid END),
             s.created + (v.version - 1) * interval '16 ms'
         FROM s CROSS JOIN generate_series(1, 6) AS v(version)
         LEFT JOIN plan done ON done.declined = s.declined AND done.seq = v.version - 2
         LEFT JOIN plan done_before ON done_before.declined = s.declined AND done_before.seq = v.version - 3
         LEFT JOIN plan next ON next.declined = s.declined AND next.seq = v.version - 1"
    );
    for sql in [&instances, &attempts, &history] {
        sqlx::query(sql).bind(first).bind(last).bind(base).bind(spacing).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Fills the orchestrator's tables with `count` finished sagas created `1 / rate` seconds apart,
/// the last one `rate`-spacing before `end`, in chunks of `chunk` sagas per transaction. Prints
/// progress; returns how long it took.
pub async fn preload(pool: &PgPool, count: i64, rate: f64, end: DateTime<Utc>, chunk: i64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let spacing = 1.0 / rate;
    let base = end - chrono::Duration::from_std(Duration::from_secs_f64(count as f64 * spacing))?;
    let mut first = 0;
    let mut reported = 0;
    while first < count {
        let last = (first + chunk).min(count) - 1;
        insert_chunk(pool, first, last, base, spacing).await.with_context(|| format!("sagas {first}..={last}"))?;
        first = last + 1;
        if first - reported >= 1_000_000 || first == count {
            reported = first;
            let elapsed = started.elapsed().as_secs_f64();
            println!("preload: {first} sagas in {elapsed:.0} s ({:.0}/s)", first as f64 / elapsed);
        }
    }
    Ok(started.elapsed())
}

/// Sizes of the orchestrator's largest tables with their indexes, in bytes.
pub async fn table_sizes(pool: &PgPool) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT relname::text, pg_total_relation_size(relid) FROM pg_stat_user_tables
         WHERE relname IN ('saga_instances', 'saga_step_attempts', 'saga_history', 'saga_stats', 'outbox')
         ORDER BY 2 DESC",
    )
    .fetch_all(pool)
    .await?)
}

/// One on-call query of the API, and the latencies it was answered in.
pub struct Query {
    pub name: &'static str,
    pub path: String,
}

/// The queries on-call and dashboards send: the list under each filter, one saga, and the stats
/// over the windows a dashboard shows. `ids` and `orders` are sagas and order ids known to exist.
pub fn on_call_queries(now: DateTime<Utc>, ids: &[String], orders: &[String], round: usize) -> Vec<Query> {
    let hour_ago = (now - chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let pick = |list: &[String]| list.get(round % list.len().max(1)).cloned().unwrap_or_default();
    vec![
        Query { name: "list, newest 50", path: "/api/v1/sagas?limit=50".into() },
        Query { name: "list FAILED", path: "/api/v1/sagas?status=FAILED&limit=50".into() },
        Query {
            name: "list FAILED at charge_payment",
            path: "/api/v1/sagas?status=FAILED&failed_step=charge_payment&limit=50".into(),
        },
        Query { name: "list by failure code", path: "/api/v1/sagas?failure_code=PAYMENT_DECLINED&limit=50".into() },
        Query { name: "list by order id", path: format!("/api/v1/sagas?business_key={}", pick(orders)) },
        Query {
            name: "list created in the last hour",
            path: format!("/api/v1/sagas?created_after={hour_ago}&limit=50"),
        },
        Query { name: "list NEEDS_ATTENTION", path: "/api/v1/sagas?status=NEEDS_ATTENTION&limit=50".into() },
        Query { name: "list stuck for 10m", path: "/api/v1/sagas?stuck_for=10m&limit=50".into() },
        Query { name: "list past deadline", path: "/api/v1/sagas?past_deadline=true&limit=50".into() },
        Query { name: "one saga", path: format!("/api/v1/sagas/{}", pick(ids)) },
        Query { name: "stats, last 15m", path: "/api/v1/sagas/stats?window=15m".into() },
        Query { name: "stats, last hour", path: "/api/v1/sagas/stats?window=1h".into() },
        Query { name: "stats, last 24h", path: "/api/v1/sagas/stats?window=24h".into() },
        Query { name: "stats, last 7d", path: "/api/v1/sagas/stats?window=7d".into() },
    ]
}

/// Random sagas and order ids from the table, to look up.
pub async fn sample_keys(pool: &PgPool, count: i64) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT id::text, business_key FROM saga_instances TABLESAMPLE SYSTEM (1) WHERE business_key IS NOT NULL LIMIT $1",
    )
    .bind(count)
    .fetch_all(pool)
    .await?;
    let rows = if rows.len() as i64 >= count.min(10) {
        rows
    } else {
        sqlx::query_as(
            "SELECT id::text, business_key FROM saga_instances WHERE business_key IS NOT NULL ORDER BY random() LIMIT $1",
        )
        .bind(count)
        .fetch_all(pool)
        .await?
    };
    Ok(rows.into_iter().unzip())
}

/// Latencies of each query, by name, and the answers that were not 200.
#[derive(Debug, Default)]
pub struct Latencies {
    pub by_query: std::collections::BTreeMap<&'static str, Vec<Duration>>,
    pub errors: Vec<String>,
}

impl Latencies {
    /// Sends every query once, one after another, recording how long each took.
    pub async fn round(&mut self, http: &reqwest::Client, base: &str, queries: &[Query]) {
        for query in queries {
            let started = Instant::now();
            let answer = http.get(format!("{base}{}", query.path)).send().await;
            let status = match answer {
                Ok(response) => {
                    let status = response.status();
                    let _ = response.bytes().await;
                    Some(status)
                }
                Err(_) => None,
            };
            self.by_query.entry(query.name).or_default().push(started.elapsed());
            if status != Some(reqwest::StatusCode::OK) {
                self.errors.push(format!("{} {}: {status:?}", query.name, query.path));
            }
        }
    }

    /// Per query: how many, p50, p99 and max in milliseconds.
    pub fn summary(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (name, samples) in &self.by_query {
            let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
            ms.sort_by(f64::total_cmp);
            let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
            out.insert(
                (*name).to_owned(),
                serde_json::json!({"count": ms.len(), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0)}),
            );
        }
        serde_json::json!({"queries": out, "errors": self.errors})
    }
}
