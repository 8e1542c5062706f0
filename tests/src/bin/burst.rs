//! The burst: `scripts/burst [seconds=30] [orders-per-second=1000]`. Starts its own system on the
//! local Postgres and Kafka, places orders open-loop at a fixed rate far beyond what the system
//! completes (95 % good, 5 % declined cards), prints a line a second while the backlog drains,
//! then checks what issue 12 promises of overload: every saga COMPLETED or FAILED by its business
//! rule, no timed-out attempt, no compensation but for the declined cards, and the invariants
//! I1–I6. Exits 1 on any violation. A measurement, not a test: run it alone.

use std::time::{Duration, Instant};

use anyhow::Context;
use saga_e2e::faults::{self, Expect, Kind};
use saga_e2e::{Options, System};
use serde_json::Value;

#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    running: i64,
    compensating: i64,
    completed: i64,
    failed: i64,
    needs_attention: i64,
    timed_out_attempts: i64,
}

async fn sample(pool: &sqlx::PgPool) -> anyhow::Result<Sample> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM saga_instances GROUP BY status").fetch_all(pool).await?;
    let get = |s: &str| rows.iter().find(|(status, _)| status == s).map(|(_, n)| *n).unwrap_or(0);
    let timed_out: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_step_attempts WHERE status = 'TIMED_OUT'")
        .fetch_one(pool)
        .await?;
    Ok(Sample {
        running: get("RUNNING"),
        compensating: get("COMPENSATING"),
        completed: get("COMPLETED"),
        failed: get("FAILED"),
        needs_attention: get("NEEDS_ATTENTION"),
        timed_out_attempts: timed_out,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds: f64 = args.first().map(|s| s.parse()).transpose().context("seconds must be a number")?.unwrap_or(30.0);
    let rate: f64 = args.get(1).map(|r| r.parse()).transpose().context("rate must be a number")?.unwrap_or(1000.0);
    let count = (seconds * rate).round() as usize;
    println!(
        "burst: {count} orders over {seconds} s ({rate}/s), 95 % good, 5 % declined; services from {}",
        saga_e2e::bin_dir().display()
    );
    let system = System::start_with(Options::default()).await?;
    let skus = ["BURST-A", "BURST-B", "BURST-C", "BURST-D"];
    let before = faults::stock_up(&system, &skus, 100_000_000).await?;
    let pool = system.pool("orchestrator").await?;
    println!("system {} ready; logs in {}/e2e-logs/{}", system.run_id, saga_e2e::bin_dir().display(), system.run_id);

    let kind = |i: usize| if i % 20 == 3 { Kind::Declined } else { Kind::Good };
    let started = Instant::now();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let load = async {
        let placed = faults::place_many(&system, "burst", count, rate, &skus, kind).await;
        let took = started.elapsed();
        done_tx.send_replace(true);
        (placed, took)
    };
    let monitor = async {
        let mut timeline: Vec<(f64, Sample)> = Vec::new();
        let mut last = Sample::default();
        println!(
            "{:>6} {:>9} {:>9} {:>12} {:>9} {:>9} {:>7} {:>11} {:>9}",
            "t (s)", "running", "compens.", "completed/s", "completed", "failed", "attn", "timed out", "waiting"
        );
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = sample(&pool).await.unwrap_or(last);
            let (_, stats) = system.api_get("/api/v1/sagas/stats?window=1h").await.unwrap_or((0, Value::Null));
            let t = started.elapsed().as_secs_f64();
            println!(
                "{t:>6.0} {:>9} {:>9} {:>12} {:>9} {:>9} {:>7} {:>11} {:>9}",
                now.running,
                now.compensating,
                now.completed - last.completed,
                now.completed,
                now.failed,
                now.needs_attention,
                now.timed_out_attempts,
                stats["start_requests_waiting"].as_i64().map_or("?".to_owned(), |n| n.to_string()),
            );
            timeline.push((t, now));
            last = now;
            let ended = now.completed + now.failed + now.needs_attention;
            if *done_rx.borrow() && ended as usize >= count && now.running + now.compensating == 0 {
                return timeline;
            }
            if t > seconds + 1800.0 {
                println!("not drained after 30 minutes");
                return timeline;
            }
        }
    };
    let ((placed, took), timeline) = tokio::join!(load, monitor);
    let placed = placed?;
    let drained = started.elapsed();
    let report = faults::check(&system, &placed, &before, &Expect::default()).await?;
    let last = timeline.last().map(|(_, s)| *s).unwrap_or_default();
    let spurious: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM saga_instances WHERE status <> 'COMPLETED' AND coalesce(failure_code, '') <> 'PAYMENT_DECLINED'",
    )
    .fetch_one(&pool)
    .await?;
    let compensated_good = placed.iter().filter(|p| p.kind == Kind::Good).count() as i64 - last.completed;
    // Completions per second while the backlog drained: from the first second with a completion
    // to the last one, and the best ten-second stretch.
    let completions: Vec<(f64, i64)> = timeline.iter().map(|(t, s)| (*t, s.completed + s.failed)).collect();
    let first = completions.iter().find(|(_, n)| *n > 0).copied().unwrap_or((0.0, 0));
    let end = completions.last().copied().unwrap_or((0.0, 0));
    let mean = (end.1 - first.1) as f64 / (end.0 - first.0).max(1.0);
    let best =
        completions.windows(11).map(|w| (w[10].1 - w[0].1) as f64 / (w[10].0 - w[0].0).max(1.0)).fold(0.0, f64::max);
    println!();
    println!(
        "orders accepted:            {} in {:.1} s ({:.0}/s)",
        placed.len(),
        took.as_secs_f64(),
        placed.len() as f64 / took.as_secs_f64()
    );
    println!("drained:                    {:.1} s after the first order", drained.as_secs_f64());
    println!("sagas:                      {report}");
    println!("ended per second:           {mean:.0} on average while draining, {best:.0} at best over 10 s");
    println!("timed-out attempts:         {}", last.timed_out_attempts);
    println!("spurious compensations:     {spurious} (sagas not completed, other than declined cards)");
    println!("good orders not completed:  {compensated_good}");
    let mut violations = report.violations.clone();
    if last.timed_out_attempts > 0 {
        violations.push(format!("{} attempts timed out", last.timed_out_attempts));
    }
    if spurious > 0 {
        violations.push(format!("{spurious} sagas compensated or parked without a business reason"));
    }
    system.stop().await?;
    if violations.is_empty() {
        println!("burst: no violation");
        Ok(())
    } else {
        println!("burst: {} violation(s):\n  {}", violations.len(), violations.join("\n  "));
        std::process::exit(1);
    }
}
