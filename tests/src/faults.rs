//! The fault-injection suite's tools: a stream of orders with a mix of outcomes, waiting for
//! every saga to settle, and the invariants I1–I6 checked over every saga of a run, straight from
//! each service's database, the broker's lag and the dead-letter topics.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use uuid::Uuid;

use crate::System;

/// What an order is built to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Completes.
    Good,
    /// The card is declined: stock released, order rejected.
    Declined,
    /// Charged, then the address is refused: refunded, released, rejected.
    BadAddress,
    /// Like `BadAddress`, but the first three refunds time out (then one succeeds).
    RefundFailsThrice,
    /// Like `BadAddress`, but every refund times out: the saga needs attention.
    RefundFailsForever,
}

impl Kind {
    fn token_and_postal_code(self) -> (&'static str, &'static str) {
        match self {
            Kind::Good => ("tok_visa", "62701"),
            Kind::Declined => ("tok_declined", "62701"),
            Kind::BadAddress => ("tok_visa", "00000"),
            Kind::RefundFailsThrice => ("tok_refund_fails_3", "00000"),
            Kind::RefundFailsForever => ("tok_refund_fails_forever", "00000"),
        }
    }

    /// The usual mix: mostly good orders, some declined, some undeliverable.
    pub fn mix(i: usize) -> Kind {
        match i % 10 {
            7 => Kind::Declined,
            9 => Kind::BadAddress,
            _ => Kind::Good,
        }
    }
}

/// An order that was accepted, and the saga it started.
#[derive(Debug, Clone)]
pub struct Placed {
    pub key: String,
    pub kind: Kind,
    pub order_id: Uuid,
    pub saga_id: Uuid,
    pub sku: String,
    pub quantity: i64,
    pub total_cents: i64,
}

pub const UNIT_PRICE_CENTS: i64 = 1250;

/// Sets the stock of `skus` and returns it, for I2.
pub async fn stock_up(system: &System, skus: &[&str], units: i64) -> anyhow::Result<BTreeMap<String, i64>> {
    let mut before = BTreeMap::new();
    for sku in skus {
        system.set_stock(sku, units).await?;
        before.insert((*sku).to_owned(), units);
    }
    Ok(before)
}

/// Places one order, retrying with the same idempotency key until the order service accepts it
/// (it may be away or its database may be, during a fault).
pub async fn place(system: &System, key: &str, kind: Kind, sku: &str, quantity: i64) -> anyhow::Result<Placed> {
    let (token, postal_code) = kind.token_and_postal_code();
    let body = crate::order_body(sku, quantity, token, postal_code);
    let started = Instant::now();
    loop {
        match system.place_order(key, &body).await {
            Ok((200 | 201, order)) => {
                return Ok(Placed {
                    key: key.to_owned(),
                    kind,
                    order_id: order["id"].as_str().context("order id")?.parse()?,
                    saga_id: order["saga_id"].as_str().context("saga id")?.parse()?,
                    sku: sku.to_owned(),
                    quantity,
                    total_cents: quantity * UNIT_PRICE_CENTS,
                })
            }
            Ok((status, body)) if status < 500 => bail!("order {key} refused: {status} {body}"),
            _ if started.elapsed() > Duration::from_secs(120) => bail!("order {key} not accepted within 120 s"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Places `count` orders, `per_second` of them a second, of the kinds `kind(i)`, spread over `skus`.
pub async fn place_many(
    system: &System,
    prefix: &str,
    count: usize,
    per_second: f64,
    skus: &[&str],
    kind: impl Fn(usize) -> Kind,
) -> anyhow::Result<Vec<Placed>> {
    let gap = Duration::from_secs_f64(1.0 / per_second.max(0.001));
    let mut pending = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let at = started + gap * i as u32;
        let (kind, sku) = (kind(i), skus[i % skus.len()]);
        let key = format!("{prefix}-{i}");
        pending.push(async move {
            tokio::time::sleep_until(at.into()).await;
            place(system, &key, kind, sku, 1 + (i % 3) as i64).await
        });
    }
    futures::future::join_all(pending).await.into_iter().collect()
}

/// Waits until every saga of `placed` has a terminal status; returns how long that took.
pub async fn settle(system: &System, placed: &[Placed], timeout: Duration) -> anyhow::Result<Duration> {
    let pool = system.pool("orchestrator").await?;
    let ids: Vec<Uuid> = placed.iter().map(|p| p.saga_id).collect();
    let started = Instant::now();
    loop {
        let open: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT id, status FROM unnest($1::uuid[]) AS wanted(id)
             LEFT JOIN saga_instances s USING (id)
             WHERE s.status IS NULL OR s.status IN ('RUNNING', 'COMPENSATING')",
        )
        .bind(&ids)
        .fetch_all(&pool)
        .await
        .map(|rows: Vec<(Uuid, Option<String>)>| {
            rows.into_iter().map(|(id, s)| (id, s.unwrap_or_else(|| "NOT STARTED".into()))).collect()
        })
        .unwrap_or_else(|_| vec![(Uuid::nil(), "database unreachable".into())]);
        if open.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!(
                "{} sagas not settled after {timeout:?}, e.g. {:?}{}",
                open.len(),
                &open[..open.len().min(5)],
                system.diagnostics().await
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What a scenario allows.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Kinds of order that may end NEEDS_ATTENTION (only where the scenario makes a compensation
    /// fail for good).
    pub attention_for: Vec<Kind>,
    /// The least share of `Good` orders that must complete, so a run where everything errored
    /// cannot pass.
    pub min_good_completed: f64,
    /// Dead letters the scenario itself injected.
    pub dead_letters: usize,
}

impl Default for Expect {
    fn default() -> Self {
        Self { attention_for: Vec::new(), min_good_completed: 0.9, dead_letters: 0 }
    }
}

/// The figures and violations of a run.
#[derive(Debug, Default)]
pub struct Report {
    pub started: usize,
    pub completed: usize,
    pub failed: usize,
    pub needs_attention: usize,
    pub dead_letters: usize,
    pub violations: Vec<String>,
}

impl Report {
    /// Fails with every violation, and the figures.
    pub fn assert_clean(&self) -> anyhow::Result<()> {
        if self.violations.is_empty() {
            return Ok(());
        }
        bail!("{} invariant violation(s) in {self}:\n  {}", self.violations.len(), self.violations.join("\n  "))
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sagas: {} completed, {} failed, {} needing attention; {} dead letters",
            self.started, self.completed, self.failed, self.needs_attention, self.dead_letters
        )
    }
}

/// Checks I1–I6 over every saga of `placed`. Call after [`settle`].
pub async fn check(
    system: &System,
    placed: &[Placed],
    stock_before: &BTreeMap<String, i64>,
    expect: &Expect,
) -> anyhow::Result<Report> {
    let mut report = Report { started: placed.len(), ..Report::default() };
    let v = &mut report.violations;
    let orchestrator = system.pool("orchestrator").await?;
    let ids: Vec<Uuid> = placed.iter().map(|p| p.saga_id).collect();
    let rows: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT id, status, version FROM saga_instances WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&orchestrator)
            .await?;
    let status: HashMap<Uuid, (String, i64)> = rows.into_iter().map(|(id, s, ver)| (id, (s, ver))).collect();

    // I1: every saga ended COMPLETED or FAILED, or NEEDS_ATTENTION where the scenario allows it.
    let mut good = (0usize, 0usize);
    for p in placed {
        let Some((s, _)) = status.get(&p.saga_id) else {
            v.push(format!("I1: order {} (saga {}) has no saga", p.key, p.saga_id));
            continue;
        };
        match s.as_str() {
            "COMPLETED" => report.completed += 1,
            "FAILED" => report.failed += 1,
            "NEEDS_ATTENTION" => {
                report.needs_attention += 1;
                if !expect.attention_for.contains(&p.kind) {
                    v.push(format!(
                        "I1: saga {} ({:?}) needs attention, which this scenario does not allow",
                        p.saga_id, p.kind
                    ));
                }
            }
            other => v.push(format!("I1: saga {} is still {other}", p.saga_id)),
        }
        let expected_end = match p.kind {
            Kind::Good => "COMPLETED",
            Kind::RefundFailsForever => "NEEDS_ATTENTION",
            _ => "FAILED",
        };
        if p.kind == Kind::Good {
            good.0 += 1;
            good.1 += usize::from(s == "COMPLETED");
        } else if s == "COMPLETED" {
            v.push(format!("I1: saga {} ({:?}) completed; it should have ended {expected_end}", p.saga_id, p.kind));
        }
    }
    if good.0 > 0 && (good.1 as f64) < expect.min_good_completed * good.0 as f64 {
        v.push(format!(
            "most sagas must complete: only {} of {} good orders did (at least {:.0}% expected)",
            good.1,
            good.0,
            expect.min_good_completed * 100.0
        ));
    }
    let ended = |p: &Placed| status.get(&p.saga_id).map(|(s, _)| s.as_str()).unwrap_or("");

    // I2: stock now = stock before − completed quantities (− what sagas needing attention still hold).
    let inventory = system.pool("inventory").await?;
    let reservations: Vec<(Uuid, String, i64, String)> =
        sqlx::query_as("SELECT saga_id, sku, quantity, status FROM reservations WHERE saga_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&inventory)
            .await?;
    let mut held: HashMap<Uuid, i64> = HashMap::new();
    for (saga, _, quantity, s) in &reservations {
        if s == "RESERVED" {
            *held.entry(*saga).or_default() += quantity;
        }
    }
    for (sku, before) in stock_before {
        let now: i64 =
            sqlx::query_scalar("SELECT available FROM stock WHERE sku = $1").bind(sku).fetch_one(&inventory).await?;
        let mut expected = *before;
        for p in placed.iter().filter(|p| &p.sku == sku) {
            match ended(p) {
                "COMPLETED" => expected -= p.quantity,
                "NEEDS_ATTENTION" => expected -= held.get(&p.saga_id).copied().unwrap_or(0),
                _ => {}
            }
        }
        if now != expected {
            v.push(format!("I2: {sku} has {now} units; expected {expected} (before {before})"));
        }
    }
    for p in placed {
        let holds = held.get(&p.saga_id).copied().unwrap_or(0);
        match ended(p) {
            "COMPLETED" if holds != p.quantity => {
                v.push(format!("I2: completed saga {} holds {holds} units, not {}", p.saga_id, p.quantity))
            }
            "FAILED" if holds != 0 => v.push(format!("I2: failed saga {} still holds {holds} units", p.saga_id)),
            _ => {}
        }
    }

    // I3: per order, charges − refunds = the total when completed, 0 when failed; one charge at most.
    let payment = system.pool("payment").await?;
    let ledger: Vec<(Uuid, i64, i64, i64)> = sqlx::query_as(
        "SELECT saga_id, sum(amount_cents)::bigint, count(*) FILTER (WHERE entry_type = 'CHARGE'),
                count(*) FILTER (WHERE entry_type = 'REFUND')
         FROM ledger WHERE saga_id = ANY($1) GROUP BY saga_id",
    )
    .bind(&ids)
    .fetch_all(&payment)
    .await?;
    let ledger: HashMap<Uuid, (i64, i64, i64)> = ledger.into_iter().map(|(s, net, c, r)| (s, (net, c, r))).collect();
    for p in placed {
        let (net, charges, refunds) = ledger.get(&p.saga_id).copied().unwrap_or((0, 0, 0));
        if charges > 1 || refunds > 1 {
            v.push(format!("I3/I4: saga {} has {charges} charges and {refunds} refunds", p.saga_id));
        }
        match ended(p) {
            "COMPLETED" if net != p.total_cents => {
                v.push(format!("I3: completed saga {} nets {net} cents, not {}", p.saga_id, p.total_cents))
            }
            "FAILED" if net != 0 => v.push(format!("I3: failed saga {} nets {net} cents, not 0", p.saga_id)),
            _ => {}
        }
    }

    // I4: each participant applied each (saga, step, action) at most once; effects match the end.
    let fulfilment = system.pool("fulfilment").await?;
    let shipments: HashMap<Uuid, String> =
        sqlx::query_as::<_, (Uuid, String)>("SELECT saga_id, status FROM shipments WHERE saga_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&fulfilment)
            .await?
            .into_iter()
            .collect();
    let order = system.pool("order").await?;
    let orders: HashMap<Uuid, String> =
        sqlx::query_as::<_, (Uuid, String)>("SELECT saga_id, status FROM orders WHERE saga_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&order)
            .await?
            .into_iter()
            .collect();
    for p in placed {
        let shipped = shipments.get(&p.saga_id).map(String::as_str);
        let order_status = orders.get(&p.saga_id).map(String::as_str).unwrap_or("missing");
        match ended(p) {
            "COMPLETED" => {
                if shipped != Some("CREATED") {
                    v.push(format!("I4: completed saga {} has shipment {shipped:?}", p.saga_id));
                }
                if order_status != "APPROVED" {
                    v.push(format!("I4: completed saga {}'s order is {order_status}", p.saga_id));
                }
            }
            "FAILED" => {
                if shipped == Some("CREATED") {
                    v.push(format!("I4: failed saga {} left a shipment", p.saga_id));
                }
                if order_status != "REJECTED" {
                    v.push(format!("I4: failed saga {}'s order is {order_status}", p.saga_id));
                }
            }
            _ => {}
        }
    }
    for service in ["order", "inventory", "payment", "fulfilment"] {
        let pool = system.pool(service).await?;
        let twice: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM processed_commands GROUP BY saga_id, step, kind HAVING count(*) > 1) d",
        )
        .fetch_one(&pool)
        .await?;
        if twice > 0 {
            v.push(format!("I4: {service} processed {twice} commands twice"));
        }
    }

    // I5: no saga left a terminal status (NEEDS_ATTENTION only by an operator's retry or abort);
    // its version rose by one per recorded transition.
    let history: Vec<(Uuid, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT saga_id, count(*), count(DISTINCT version), max(version),
                count(*) FILTER (WHERE from_status IN ('COMPLETED', 'FAILED')
                    OR (from_status = 'NEEDS_ATTENTION' AND trigger NOT IN ('RETRY', 'ABORT')))
         FROM saga_history WHERE saga_id = ANY($1) GROUP BY saga_id",
    )
    .bind(&ids)
    .fetch_all(&orchestrator)
    .await?;
    for (saga, entries, distinct, max, left_terminal) in history {
        let version = status.get(&saga).map(|(_, ver)| *ver).unwrap_or(-1);
        if entries != distinct || entries != max || max != version {
            v.push(format!("I5: saga {saga} is at version {version} with {entries} history entries ({distinct} distinct, max {max})"));
        }
        if left_terminal > 0 {
            v.push(format!("I5: saga {saga} left a terminal status {left_terminal} time(s)"));
        }
    }

    // I6: every message processed or dead-lettered: outboxes empty, lag back to 0, and exactly
    // the dead letters the scenario injected.
    let started = Instant::now();
    let mut pending = Vec::new();
    loop {
        pending.clear();
        for service in system.running() {
            let pool = system.pool(service).await?;
            let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&pool).await?;
            if outbox > 0 {
                pending.push(format!("{service} outbox holds {outbox}"));
            }
            let lag = system.total_lag(service).await?;
            if lag > 0.0 {
                pending.push(format!("{service} consumer lag is {lag}"));
            }
        }
        if pending.is_empty() || started.elapsed() > Duration::from_secs(45) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    v.extend(pending.into_iter().map(|p| format!("I6: {p} after 45 s")));
    let (code, letters) = system.api_get("/api/v1/dead-letters?limit=500").await?;
    report.dead_letters = letters["count"].as_u64().unwrap_or(0) as usize;
    if code != 200 {
        v.push(format!("I6: listing dead letters answered {code}: {letters}"));
    } else if report.dead_letters != expect.dead_letters {
        v.push(format!("I6: {} dead letters, expected {}: {letters:#}", report.dead_letters, expect.dead_letters));
    }
    Ok(report)
}
