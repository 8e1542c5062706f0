//! The benchmark: `scripts/bench [options]`. Starts its own system (the orchestrator and the four
//! participants, release build) on the local Postgres and Apache Kafka, places orders open-loop
//! at fixed rates (95 % good, 5 % declined cards), steps the rate up until the backlog grows, then
//! runs at half of the saturation rate. Per rate it prints and writes (JSON) throughput, end-to-end
//! latency (HDR histogram, from each order's scheduled time, so a slow driver cannot hide queueing),
//! the orchestrator's step overhead, per-step round trips, commits and WAL bytes per saga, CPU and
//! memory per process and messages through the broker. Then, in the same run, the Postgres ceiling:
//! pgbench of the orchestrator's own SQL for a whole saga, and of one step-like transaction.
//!
//! A measurement, not a test: run it alone on an otherwise idle machine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::Parser;
use hdrhistogram::Histogram;
use saga_e2e::bench::{self, Buckets, PgCounters, Usage, Watched};
use saga_e2e::faults::{self, Kind};
use saga_e2e::scale;
use saga_e2e::{Options, System, SERVICES};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(about = "Open-loop benchmark of the order saga on the real services, Postgres and Kafka")]
struct Args {
    /// Rates (orders/s) to step through until one saturates.
    #[arg(long, value_delimiter = ',', default_value = "100,200,300,400,500,600,800")]
    rates: Vec<f64>,
    /// Seconds of arrivals per rate while searching.
    #[arg(long, default_value_t = 20.0)]
    step_seconds: f64,
    /// Seconds of arrivals at half the saturation rate (0: no such run).
    #[arg(long, default_value_t = 30.0)]
    half_seconds: f64,
    /// Instead of the search: one run at this rate (orders/s) for --seconds.
    #[arg(long)]
    at: Option<f64>,
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench/bench.json")]
    json: PathBuf,
    /// Seconds of each pgbench run; 0 skips them.
    #[arg(long, default_value_t = 15)]
    pgbench_seconds: u32,
    /// pgbench's clients.
    #[arg(long, default_value_t = 4)]
    pgbench_clients: u32,
    /// Extra environment for every service, NAME=VALUE (e.g. LOG_LEVEL=warn), or for one,
    /// SERVICE:NAME=VALUE (e.g. orchestrator:KAFKA_BATCH_SIZE=500), to measure a setting.
    #[arg(long = "env")]
    env: Vec<String>,
    /// Leave the notification service out (no saga waits for it): the system of issue 13's
    /// targets, the orchestrator and the four participants.
    #[arg(long)]
    without_notification: bool,
    /// Instead of the search: hold this many sagas in flight (the payment service stopped, every
    /// timeout an hour), measuring the orchestrator's memory, then let them all finish.
    #[arg(long)]
    hold: Option<usize>,
    /// Orders per second while filling up for --hold.
    #[arg(long, default_value_t = 400.0)]
    hold_rate: f64,
    /// With --hold: SIGKILL the orchestrator once this many sagas are in flight, restart it, and
    /// check that they all resume.
    #[arg(long)]
    kill_at: Option<usize>,
    /// Instead of the search: measure at --at (default 400) orders/s for --seconds on the empty
    /// tables, then fill the orchestrator's tables with this many finished sagas and measure
    /// again; the API's on-call queries are timed throughout (see docs/performance.md).
    #[arg(long)]
    preload: Option<i64>,
    /// The rate (sagas/s) the preloaded sagas were created at, ending now: it sets how many fall
    /// in the stats' windows (400/s: 10 million over the last 7 hours).
    #[arg(long, default_value_t = 400.0)]
    preload_rate: f64,
    /// Sagas per transaction while preloading.
    #[arg(long, default_value_t = 20_000)]
    preload_chunk: i64,
    /// An experiment: after the preload, only ANALYZE the three saga tables and keep autovacuum
    /// off them for the run, so that their free-space map stays empty and new rows go to the end
    /// of the tables (docs/performance.md: where the difference goes).
    #[arg(long)]
    preload_without_vacuum: bool,
    /// Rounds of the on-call queries sent one after another on an idle system, per table size.
    #[arg(long, default_value_t = 30)]
    query_rounds: usize,
    /// Seconds of arrivals at 50 orders/s before anything is measured: connections, topics'
    /// leaders, the broker's JIT, the tables' first pages, plans and statistics. A fresh system's
    /// first half-minute is slower and noisier than what follows (docs/performance.md); give 30
    /// or more when comparing two builds at a first rate.
    #[arg(long, default_value_t = 5.0)]
    warm_up_seconds: f64,
    /// After the warm-up, at most this many more seconds of it, in 20 s rounds, until the
    /// broker's JIT compiler takes less than a tenth of its CPU in a round. A broker started a
    /// minute before spends a third to a half of its CPU compiling, for two to three minutes at
    /// 60 orders/s (docs/performance.md, 2026-12-06); a run on it measures its compiler. 0: no
    /// such wait (a run on a cold broker then says so).
    #[arg(long, default_value_t = 300.0)]
    broker_warm_up_max_seconds: f64,
}

/// Everything counted at one moment.
struct Snapshot {
    at: Instant,
    wall: DateTime<Utc>,
    usage: BTreeMap<String, Usage>,
    machine: Option<bench::MachineTime>,
    pg: PgCounters,
    broker_messages: i64,
    /// The outbox dwell histogram of each service.
    dwell: BTreeMap<&'static str, Buckets>,
    /// The consumer delivery histogram of each service (every topic it consumes).
    delivery: BTreeMap<&'static str, Buckets>,
    batch: Buckets,
}

const DWELL: &str = "saga_outbox_dwell_seconds";
const BATCH: &str = "saga_consumer_batch_duration_seconds";
const DELIVERY: &str = "saga_consumer_delivery_seconds";

struct Bench {
    system: System,
    pool: PgPool,
    watched: Watched,
    skus: Vec<String>,
    sequence: std::sync::atomic::AtomicUsize,
}

impl Bench {
    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut dwell = BTreeMap::new();
        let mut delivery = BTreeMap::new();
        let mut batch = Buckets::default();
        for service in self.system.running() {
            let text = self.system.http.get(self.system.metrics_url(service)).send().await?.text().await?;
            dwell.insert(service, Buckets::parse(&text, DWELL));
            delivery.insert(service, Buckets::parse(&text, DELIVERY));
            if service == "orchestrator" {
                batch = Buckets::parse(&text, BATCH);
            }
        }
        Ok(Snapshot {
            at: Instant::now(),
            wall: Utc::now(),
            usage: self.watched.sample(),
            machine: bench::MachineTime::now(),
            pg: bench::pg_counters(&self.pool).await?,
            broker_messages: bench::broker_messages(&self.system.brokers, &self.system.topic_prefix()).await?,
            dwell,
            delivery,
            batch,
        })
    }

    /// Warms the system at 50 orders/s in rounds of 20 s while the broker's JIT compiler takes
    /// more than [`COLD_BROKER_JIT_SHARE`] of its CPU, for at most `max_seconds` of rounds.
    /// `warm_up` is the run before, if any: a broker it found warm needs no round.
    async fn warm_the_broker(&self, warm_up: Option<Value>, max_seconds: f64) -> anyhow::Result<()> {
        const ROUND_SECONDS: f64 = 20.0;
        let mut last = warm_up;
        let mut warmed = 0.0;
        loop {
            if let Some(run) = &last {
                let Some(share) = run["processes"]["kafka"]["jit_share"].as_f64() else {
                    return Ok(()); // no broker on this machine, or no JIT to watch
                };
                if share <= COLD_BROKER_JIT_SHARE {
                    return Ok(());
                }
                println!(
                    "warming the broker: its JIT compiler took {:.0} % of its CPU in the last {:.0} s",
                    share * 100.0,
                    run["wall_seconds"].as_f64().unwrap_or(0.0)
                );
            }
            if warmed + ROUND_SECONDS > max_seconds {
                return Ok(());
            }
            last = Some(self.run("broker warm-up", 50.0, ROUND_SECONDS).await?);
            warmed += ROUND_SECONDS;
        }
    }

    /// Sagas the orchestrator ended (completed, failed or parked) since it started, from its
    /// counters: the backlog sampled each second costs the system nothing that way (a count in
    /// SQL of the run's ended sagas read 5,700 pages a second by the end of a minute at 300/s,
    /// 3 % of Postgres's time counted against the system under test).
    async fn ended(&self) -> anyhow::Result<i64> {
        let text = self.system.http.get(self.system.metrics_url("orchestrator")).send().await?.text().await?;
        let ended: f64 = text
            .lines()
            .filter(|line| {
                ["saga_completed_total{", "saga_failed_total{", "saga_needs_attention_total{"]
                    .iter()
                    .any(|name| line.starts_with(name))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        Ok(ended as i64)
    }

    /// Places `rate` orders a second for `seconds`, each at its scheduled moment whatever the
    /// others do, waits until every saga ended, and measures.
    async fn run(&self, label: &str, rate: f64, seconds: f64) -> anyhow::Result<Value> {
        let count = (rate * seconds).round() as usize;
        let broker_up = self.watched.single.get("kafka").and_then(|pid| bench::uptime_seconds(*pid));
        let before = self.snapshot().await?;
        // Each order's scheduled moment, on the wall clock the database's timestamps use.
        let (started, started_wall) = (Instant::now(), Utc::now());
        let first = self.sequence.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        let mut tasks = Vec::with_capacity(count);
        for n in 0..count {
            let offset = Duration::from_secs_f64(n as f64 / rate);
            let scheduled = started_wall + chrono::Duration::from_std(offset)?;
            let (i, system) = (first + n, &self.system);
            let sku = self.skus[i % self.skus.len()].clone();
            let kind = if i % 20 == 3 { Kind::Declined } else { Kind::Good };
            tasks.push(async move {
                tokio::time::sleep_until((started + offset).into()).await;
                let placed = faults::place(system, &format!("bench-{i}"), kind, &sku, 1 + (i % 3) as i64).await;
                let answered = Utc::now();
                placed.map(|p| (p.saga_id, scheduled, answered))
            });
        }
        // Every second while the run lasts: memory (its peak is reported), each process's CPU and
        // the machine's time (what ran in the seconds of the slowest sagas) and, while arrivals
        // last, the backlog: orders scheduled so far minus sagas of this run ended so far. (Four
        // readings a second cost the driver half as much CPU again, on the cores it measures.)
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let ended_before = self.ended().await?;
        let sampler = async {
            let mut peak: BTreeMap<String, u64> = BTreeMap::new();
            let mut backlog: Vec<(f64, i64)> = Vec::new();
            let mut ticks: Vec<bench::Tick> = Vec::new();
            let mut stop = stop_rx.clone();
            loop {
                let mut tick = bench::Tick { at: started.elapsed().as_secs_f64(), ..Default::default() };
                for (name, usage) in self.watched.sample() {
                    let entry = peak.entry(name.clone()).or_default();
                    *entry = (*entry).max(usage.memory_bytes);
                    tick.cpu_seconds.insert(name, usage.cpu_seconds);
                }
                tick.machine = bench::MachineTime::now();
                ticks.push(tick);
                let t = started.elapsed().as_secs_f64();
                if t <= seconds {
                    if let Ok(ended) = self.ended().await {
                        let scheduled = ((t * rate).floor() as i64).min(count as i64);
                        backlog.push((t, scheduled - (ended - ended_before)));
                    }
                }
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            (peak, backlog, ticks)
        };
        let placing = async {
            let placed: Vec<(Uuid, DateTime<Utc>, DateTime<Utc>)> =
                futures::future::join_all(tasks).await.into_iter().collect::<anyhow::Result<_>>()?;
            let placed_in = started.elapsed();
            let arrivals_end = started_wall + chrono::Duration::from_std(Duration::from_secs_f64(seconds))?;
            let ids: Vec<Uuid> = placed.iter().map(|(id, _, _)| *id).collect();
            // The backlog when arrivals stop: sagas of this run not yet ended.
            let ended: i64 =
                sqlx::query_scalar("SELECT count(*) FROM saga_instances WHERE id = ANY($1) AND ended_at IS NOT NULL")
                    .bind(&ids)
                    .fetch_one(&self.pool)
                    .await?;
            let backlog = count as i64 - ended;
            // Throughput while arrivals lasted, after a two-second warm-up.
            let window_start = started_wall + chrono::Duration::seconds(2);
            let (completed, failed): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE status = 'COMPLETED'), count(*) FILTER (WHERE status = 'FAILED')
                 FROM saga_instances WHERE ended_at >= $1 AND ended_at < $2",
            )
            .bind(window_start)
            .bind(arrivals_end)
            .fetch_one(&self.pool)
            .await?;
            let window = (seconds - 2.0).max(1.0);
            let drained = self.drain(&ids).await?;
            stop_tx.send_replace(true);
            anyhow::Ok((placed, placed_in, backlog, completed as f64 / window, failed as f64 / window, drained))
        };
        let (result, (peak, backlog_series, ticks)) = tokio::join!(placing, sampler);
        let (placed, placed_in, backlog, completed_per_s, failed_per_s, drained) = result?;
        // Backends report their counters at most once a second.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let after = self.snapshot().await?;
        let ids: Vec<Uuid> = placed.iter().map(|(id, _, _)| *id).collect();
        let sagas = placed.len() as f64;
        let mut answer = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
        for (_, scheduled, answered) in &placed {
            answer.saturating_record((*answered - *scheduled).num_microseconds().unwrap_or(i64::MAX).max(1) as u64);
        }

        let ends: Vec<(Uuid, String, DateTime<Utc>, DateTime<Utc>)> =
            sqlx::query_as("SELECT id, status, created_at, ended_at FROM saga_instances WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_all(&self.pool)
                .await?;
        let scheduled: BTreeMap<Uuid, DateTime<Utc>> = placed.iter().map(|(id, at, _)| (*id, *at)).collect();
        let mut e2e = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
        // From the order's scheduled time to its saga's row: the order API, its outbox, the
        // start-requests topic and the orchestrator's intake.
        let mut start = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
        let mut statuses: BTreeMap<String, i64> = BTreeMap::new();
        // Each saga's end-to-end latency by its scheduled moment's offset in the run.
        let mut samples: Vec<(f64, u64)> = Vec::with_capacity(ends.len());
        for (id, status, created_at, ended_at) in &ends {
            *statuses.entry(status.clone()).or_default() += 1;
            let micros = |at: DateTime<Utc>| (at - scheduled[id]).num_microseconds().unwrap_or(i64::MAX).max(1) as u64;
            e2e.saturating_record(micros(*ended_at));
            start.saturating_record(micros(*created_at));
            let offset = (scheduled[id] - started_wall).num_microseconds().unwrap_or(0) as f64 / 1e6;
            samples.push((offset, micros(*ended_at)));
        }
        let e2e_by_second = bench::by_second(&samples)?;
        let worst_seconds = bench::worst_seconds(&samples, e2e.value_at_quantile(0.99), 5);
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let hops: Vec<(String, String, f64, f64)> = sqlx::query_as(
            "SELECT step_name, kind,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)) * 1000,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)) * 1000
             FROM saga_step_attempts WHERE saga_id = ANY($1) AND finished_at IS NOT NULL
             GROUP BY step_name, kind, step_index ORDER BY kind, step_index",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let wall = (after.at - before.at).as_secs_f64();
        let overhead = after.dwell["orchestrator"].since(&before.dwell["orchestrator"]);
        let batch = after.batch.since(&before.batch);
        let q_ms = |b: &Buckets, q: f64| b.quantile(q).map(|s| s * 1000.0);
        let processes: BTreeMap<String, Value> = after
            .usage
            .iter()
            .map(|(name, usage)| {
                let earlier = before.usage.get(name);
                let cpu = usage.cpu_seconds - earlier.map_or(0.0, |u| u.cpu_seconds);
                let mut process = json!({
                    "cpu_seconds": cpu,
                    "cores": cpu / wall,
                    "cpu_ms_per_saga": cpu * 1000.0 / sagas,
                    "peak_memory_mb": peak.get(name).copied().unwrap_or(usage.memory_bytes) as f64 / 1e6,
                });
                // A JVM's JIT compiler threads, within its CPU: a broker still compiling its hot
                // paths is not the broker of an hour later.
                if let Some(jit) = usage.jit_cpu_seconds {
                    let jit = jit - earlier.and_then(|u| u.jit_cpu_seconds).unwrap_or(0.0);
                    process["jit_cpu_seconds"] = json!(jit);
                    process["jit_share"] = json!(if cpu > 0.0 { jit / cpu } else { 0.0 });
                }
                (name.clone(), process)
            })
            .collect();
        // Each service's p50 and p99 of one of its histograms between the two snapshots.
        let by_service = |after: &BTreeMap<&'static str, Buckets>, before: &BTreeMap<&'static str, Buckets>| {
            after
                .iter()
                .map(|(service, buckets)| {
                    let since = buckets.since(&before[service]);
                    (*service, json!({"p50_ms": q_ms(&since, 0.5), "p99_ms": q_ms(&since, 0.99)}))
                })
                .collect::<BTreeMap<&str, Value>>()
        };
        let outbox_dwell = by_service(&after.dwell, &before.dwell);
        let delivery = by_service(&after.delivery, &before.delivery);
        // Saturated: fewer sagas end than orders arrive, or the backlog grows through the second
        // half of the arrivals (its least-squares slope, beyond 2 % of the rate).
        let backlog_slope = bench::backlog_slope(&backlog_series, seconds);
        let saturated = completed_per_s + failed_per_s < 0.95 * rate || bench::backlog_grows(backlog_slope, rate);
        Ok(json!({
            "label": label,
            "broker_up_seconds": broker_up,
            "offered_per_s": rate,
            "seconds": seconds,
            "orders": placed.len(),
            "placed_in_s": placed_in.as_secs_f64(),
            "completed_per_s": completed_per_s,
            "failed_per_s": failed_per_s,
            "backlog_at_end": backlog,
            "backlog_series": backlog_series,
            "backlog_slope_per_s": backlog_slope,
            "saturated": saturated,
            "drained_in_s": drained.as_secs_f64(),
            "statuses": statuses,
            "e2e_ms": {"p50": ms(&e2e, 0.5), "p90": ms(&e2e, 0.9), "p99": ms(&e2e, 0.99), "p99_9": ms(&e2e, 0.999), "max": e2e.max() as f64 / 1000.0},
            "e2e_by_second": e2e_by_second,
            "e2e_worst_seconds": worst_seconds.iter().map(|(second, slow, max)| {
                // From the second their orders were scheduled in to when the slowest could end.
                let during = bench::during(&ticks, *second as f64, *second as f64 + 1.0 + max / 1000.0);
                json!({"second": second, "above_p99": slow, "max_ms": max, "during": during})
            }).collect::<Vec<_>>(),
            "order_api_ms": {"p50": ms(&answer, 0.5), "p99": ms(&answer, 0.99)},
            "start_ms": {"p50": ms(&start, 0.5), "p99": ms(&start, 0.99)},
            "step_overhead_ms": {"p50": q_ms(&overhead, 0.5), "p99": q_ms(&overhead, 0.99), "observations": overhead.count()},
            "orchestrator_batch_ms": {"p50": q_ms(&batch, 0.5), "p99": q_ms(&batch, 0.99), "batches": batch.count()},
            "outbox_dwell_ms": outbox_dwell,
            "delivery_ms": delivery,
            "round_trip_ms": hops.iter().map(|(step, kind, p50, p99)| json!({"step": step, "kind": kind, "p50": p50, "p99": p99})).collect::<Vec<_>>(),
            "commits_per_saga": (after.pg.commits - before.pg.commits) as f64 / sagas,
            "wal_bytes_per_saga": (after.pg.wal_bytes - before.pg.wal_bytes) as f64 / sagas,
            "wal_full_page_images_per_saga": (after.pg.wal_fpi - before.pg.wal_fpi) as f64 / sagas,
            "checkpoints": after.pg.checkpoints - before.pg.checkpoints,
            "broker_messages_per_s": (after.broker_messages - before.broker_messages) as f64 / wall,
            "broker_messages_per_saga": (after.broker_messages - before.broker_messages) as f64 / sagas,
            "wall_seconds": wall,
            "processes": processes,
            // The whole machine: how busy it was, and what the hypervisor took.
            "machine": match (&after.machine, &before.machine) {
                (Some(after), Some(before)) => after.since(before, wall),
                _ => Value::Null,
            },
            "from": before.wall,
        }))
    }

    /// `run`, while the on-call queries go to the API one after another, timed.
    async fn run_with_queries(
        &self,
        label: &str,
        rate: f64,
        seconds: f64,
    ) -> anyhow::Result<(Value, scale::Latencies)> {
        let (ids, orders) = scale::sample_keys(&self.pool, 200).await?;
        let base = self.system.url("orchestrator", "");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let running = async {
            let run = self.run(label, rate, seconds).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            run
        };
        let querying = async {
            let mut latencies = scale::Latencies::default();
            let mut round = 0;
            // A round a second: a few dashboards and an engineer, not a load test of the API.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let next = tokio::time::Instant::now() + Duration::from_secs(1);
                let queries = scale::on_call_queries(Utc::now(), &ids, &orders, round);
                latencies.round(&self.system.http, &base, &queries).await;
                round += 1;
                tokio::time::sleep_until(next).await;
            }
            latencies
        };
        let (run, latencies) = tokio::join!(running, querying);
        Ok((run?, latencies))
    }

    /// The on-call queries on an otherwise idle system, `rounds` times each.
    async fn idle_queries(&self, rounds: usize) -> anyhow::Result<scale::Latencies> {
        let (ids, orders) = scale::sample_keys(&self.pool, 200).await?;
        let base = self.system.url("orchestrator", "");
        let mut latencies = scale::Latencies::default();
        for round in 0..rounds {
            let queries = scale::on_call_queries(Utc::now(), &ids, &orders, round);
            latencies.round(&self.system.http, &base, &queries).await;
        }
        Ok(latencies)
    }

    /// Waits until every saga of `ids` has ended; how long after the call.
    async fn drain(&self, ids: &[Uuid]) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let open: i64 =
                sqlx::query_scalar("SELECT count(*) FROM saga_instances WHERE id = ANY($1) AND ended_at IS NULL")
                    .bind(ids)
                    .fetch_one(&self.pool)
                    .await?;
            let missing: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM unnest($1::uuid[]) AS w(id) WHERE NOT EXISTS (SELECT 1 FROM saga_instances s WHERE s.id = w.id)",
            )
            .bind(ids)
            .fetch_one(&self.pool)
            .await?;
            if open + missing == 0 {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(1800) {
                bail!("{} sagas not ended 30 minutes after the last arrival", open + missing);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn line(run: &Value) -> String {
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.0}"));
    let f1 = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
    let p = &run["processes"];
    format!(
        "{:>7} {:>8} {:>7} {:>7} {:>8} {:>8} {:>9} {:>6} {:>6} {:>8} {:>7} {:>5} {:>5} {:>5} {:>5} {}",
        f(&run["offered_per_s"]),
        f1(&(run["completed_per_s"].as_f64().unwrap_or(0.0) + run["failed_per_s"].as_f64().unwrap_or(0.0)).into()),
        f(&run["e2e_ms"]["p50"]),
        f(&run["e2e_ms"]["p99"]),
        f(&run["e2e_ms"]["p99_9"]),
        f1(&run["step_overhead_ms"]["p50"]),
        f1(&run["step_overhead_ms"]["p99"]),
        f1(&run["commits_per_saga"]),
        f(&(run["wal_bytes_per_saga"].as_f64().unwrap_or(0.0) / 1024.0).into()),
        f(&run["backlog_at_end"]),
        f(&run["broker_messages_per_s"]),
        f1(&p["orchestrator"]["cores"]),
        f1(&p["postgres"]["cores"]),
        f1(&p["kafka"]["cores"]),
        f1(&(["order", "inventory", "payment", "fulfilment"]
            .iter()
            .map(|s| p[*s]["cores"].as_f64().unwrap_or(0.0))
            .sum::<f64>())
        .into()),
        [(run["saturated"].as_bool() == Some(true)).then_some("saturated"), cold_broker(run).map(|_| "cold broker")]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", "),
    )
}

const HEADER: &str = "   rate  ended/s  e2e50  e2e99 e2e99.9  ovh50ms  ovh99ms  com/s  WALk  backlog   msg/s  orch    pg kafka parts\n\
                      (ord/s)             (ms)   (ms)    (ms)                    saga  /saga  at end         cores cores cores cores";

/// pgbench against a scratch database holding the orchestrator's schema: a whole saga's
/// orchestrator SQL (scripts/bench.d/saga.sql) and one step-like transaction (step.sql).
async fn pgbench(system: &System, seconds: u32, clients: u32) -> anyhow::Result<Value> {
    let pgbench = glob_pgbench().context("pgbench not found under /usr/lib/postgresql")?;
    let url = system.database_url("orchestrator");
    let dir = saga_e2e::workspace_root().join("scripts/bench.d");
    let pool = system.pool("orchestrator").await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_sample AS
         SELECT row_number() OVER (ORDER BY id) AS k, id FROM (SELECT id FROM saga_instances LIMIT 1000) s",
    )
    .execute(&pool)
    .await?;
    pool.close().await;
    let mut out = serde_json::Map::new();
    for (name, script) in [("saga", "saga.sql"), ("step", "step.sql")] {
        let output = tokio::process::Command::new(&pgbench)
            .args(["-n", "-M", "prepared", "-T", &seconds.to_string(), "-c", &clients.to_string(), "-j", "2"])
            .arg("-f")
            .arg(dir.join(script))
            .arg(&url)
            .output()
            .await?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!("pgbench {script}: {}{}", text, String::from_utf8_lossy(&output.stderr));
        }
        let tps = text
            .lines()
            .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok()))
            .context("no tps in pgbench's output")?;
        let latency = text.lines().find_map(|l| {
            l.strip_prefix("latency average = ").and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        });
        out.insert(
            name.into(),
            json!({"per_second": tps, "latency_ms": latency, "script": format!("scripts/bench.d/{script}")}),
        );
    }
    Ok(Value::Object(out))
}

fn glob_pgbench() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> =
        std::fs::read_dir("/usr/lib/postgresql").ok()?.flatten().map(|e| e.path()).collect();
    versions.sort();
    versions.into_iter().rev().map(|v| v.join("bin/pgbench")).find(|p| p.exists())
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned());
    let memory = procfs::Current::current().map(|m: procfs::Meminfo| m.mem_total).ok();
    let sys = |path: &str| std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned());
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory_gb": memory.map(|b| b as f64 / 1e9),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
        // What an idle core does: on a virtual machine whose idle cores halt at once (cpuidle's
        // haltpoll with guest_halt_poll_ns 0), every wake-up is a trip through the hypervisor,
        // and a saga at a low rate costs several times the CPU it does at a high one
        // (docs/performance.md, 2026-12-06, sixteenth session).
        "cpuidle": {
            "driver": sys("/sys/devices/system/cpu/cpuidle/current_driver"),
            "governor": sys("/sys/devices/system/cpu/cpuidle/current_governor_ro")
                .or_else(|| sys("/sys/devices/system/cpu/cpuidle/current_governor")),
            "guest_halt_poll_ns": sys("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
        },
        // How the services reach Postgres (socket, TCP, TLS): it moves the figures by a quarter.
        "postgres_url": std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned()),
    })
}

/// The local Postgres's Unix socket, where Debian's server listens.
const LOCAL_SOCKET: &str = "/var/run/postgresql/.s.PGSQL.5432";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // As scripts/bench does (scripts/lib.sh `local_postgres_url`): the local server's Unix socket
    // when it is there, so that a run of this binary on its own (an A/B of two builds) measures
    // what scripts/bench measures, not TCP with TLS (which the sixth session's pairs did unawares).
    if std::env::var_os("TEST_POSTGRES_URL").is_none() && std::path::Path::new(LOCAL_SOCKET).exists() {
        std::env::set_var("TEST_POSTGRES_URL", "postgres://postgres@localhost:5432?host=/var/run/postgresql");
    }
    eprintln!("Postgres: {}", saga_e2e::postgres_url(""));
    let mut options = Options::default();
    for setting in &args.env {
        let (name, value) = setting.split_once('=').context("--env takes NAME=VALUE or SERVICE:NAME=VALUE")?;
        let (services, name) = match name.split_once(':') {
            Some((service, name)) => {
                let service = SERVICES
                    .iter()
                    .find(|s| **s == service)
                    .with_context(|| format!("--env {setting}: {service} is not one of {SERVICES:?}"))?;
                (vec![*service], name)
            }
            None => (SERVICES.to_vec(), name),
        };
        for service in services {
            options = options.env(service, name, value);
        }
    }
    // Which system the figures are of: issue 13's targets are for the orchestrator and the four
    // participants; the notification service is a sixth process on the same two cores, which the
    // default run includes, as the demo does (docs/performance.md, seventeenth session).
    let measured = if args.without_notification {
        options = options.skip("notification");
        "the orchestrator and the four participants (issue 13's system)"
    } else {
        "the orchestrator, the four participants and the notification service (issue 13's targets: --without-notification)"
    };
    println!("bench: {measured}; services from {}", saga_e2e::bin_dir().display());
    if let Some(hold) = args.hold {
        return hold_in_flight(&args, options, hold).await;
    }
    let system = System::start_with(options).await?;
    let skus: Vec<String> = (0..8).map(|i| format!("BENCH-{i}")).collect();
    let sku_refs: Vec<&str> = skus.iter().map(String::as_str).collect();
    faults::stock_up(&system, &sku_refs, 1_000_000_000).await?;
    let pool = system.pool("orchestrator").await?;
    let mut single: BTreeMap<String, i32> = BTreeMap::new();
    for service in system.running() {
        single.insert(service.to_owned(), system.pid(service)? as i32);
    }
    single.insert("driver".into(), std::process::id() as i32);
    if let Some(pid) = bench::kafka_pid() {
        single.insert("kafka".into(), pid);
    }
    let bench = Bench { system, pool, watched: Watched { single }, skus, sequence: Default::default() };
    println!(
        "system {} ready; logs in {}/e2e-logs/{}",
        bench.system.run_id,
        saga_e2e::bin_dir().display(),
        bench.system.run_id
    );
    // A warm-up, measured by nobody (`--warm-up-seconds`).
    let warm_up =
        if args.warm_up_seconds > 0.0 { Some(bench.run("warm-up", 50.0, args.warm_up_seconds).await?) } else { None };
    bench.warm_the_broker(warm_up, args.broker_warm_up_max_seconds).await?;
    if let Some(count) = args.preload {
        return scale(&args, bench, count).await;
    }

    let mut runs = Vec::new();
    println!("{HEADER}");
    let mut saturation = None;
    if let Some(rate) = args.at {
        let run = bench.run("sustained", rate, args.seconds).await?;
        println!("{}", line(&run));
        runs.push(run);
    } else {
        let mut last_good: Option<f64> = None;
        for &rate in &args.rates {
            let run = bench.run("search", rate, args.step_seconds).await?;
            println!("{}", line(&run));
            let saturated = run["saturated"].as_bool() == Some(true);
            runs.push(run);
            if saturated {
                // One more point between the last rate that kept up and this one.
                if let Some(good) = last_good {
                    let middle = ((good + rate) / 2.0_f64).round();
                    let run = bench.run("search", middle, args.step_seconds).await?;
                    println!("{}", line(&run));
                    if run["saturated"].as_bool() != Some(true) {
                        last_good = Some(middle);
                    }
                    runs.push(run);
                }
                saturation = last_good;
                break;
            }
            last_good = Some(rate);
            saturation = last_good;
        }
        if let Some(rate) = saturation {
            let half = (rate / 2.0).round();
            if args.half_seconds > 0.0 {
                println!(
                    "saturation: {rate:.0} orders/s (the highest rate without a growing backlog); now {half:.0}/s for {} s",
                    args.half_seconds
                );
                let run = bench.run("half-saturation", half, args.half_seconds).await?;
                println!("{}", line(&run));
                runs.push(run);
            } else {
                println!("saturation: {rate:.0} orders/s (the highest rate without a growing backlog)");
            }
        }
    }
    // Stop the services, then measure Postgres alone on the same tables.
    for service in bench.system.running() {
        bench.system.kill(service).await?;
    }
    let pg = if args.pgbench_seconds > 0 {
        let pg = pgbench(&bench.system, args.pgbench_seconds, args.pgbench_clients).await?;
        println!(
            "postgres ceiling (pgbench, {} clients, {} s each): the orchestrator's SQL of a whole saga {:.0}/s; one step-like transaction {:.0}/s",
            args.pgbench_clients, args.pgbench_seconds, pg["saga"]["per_second"].as_f64().unwrap_or(0.0), pg["step"]["per_second"].as_f64().unwrap_or(0.0)
        );
        pg
    } else {
        Value::Null
    };
    for run in &runs {
        print_detail(run);
    }
    let report = json!({
        "at": Utc::now(),
        "machine": machine(),
        "git": git_revision(),
        "args": format!("{args:?}"),
        "saturation_per_s": saturation,
        "runs": runs,
        "pgbench": pg,
    });
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    println!("report: {}", args.json.display());
    bench.system.stop().await?;
    Ok(())
}

/// The scale measurement: throughput and the on-call queries' latencies on the (nearly) empty
/// tables, then again with `count` finished sagas in them.
async fn scale(args: &Args, bench: Bench, count: i64) -> anyhow::Result<()> {
    let rate = args.at.unwrap_or(400.0);
    let mut report = Vec::new();
    for (label, preload) in [("empty tables", 0), ("preloaded", count)] {
        if preload > 0 {
            println!("preloading {preload} finished sagas (created {:.0}/s, ending now)", args.preload_rate);
            let tables = "saga_instances, saga_step_attempts, saga_history";
            if args.preload_without_vacuum {
                for table in tables.split(", ") {
                    sqlx::raw_sql(&format!("ALTER TABLE {table} SET (autovacuum_enabled = false)"))
                        .execute(&bench.pool)
                        .await?;
                }
            }
            let took = scale::preload(&bench.pool, preload, args.preload_rate, Utc::now(), args.preload_chunk).await?;
            // The orchestrator counts the preloaded sagas into the stats rollup (ADR 20).
            let rollup = Instant::now();
            loop {
                let pending: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM saga_stats_pending").fetch_one(&bench.pool).await?;
                if pending == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let rollup = rollup.elapsed();
            // What autovacuum does by the time the tables hold this much.
            let vacuum = Instant::now();
            if args.preload_without_vacuum {
                sqlx::raw_sql(&format!("ANALYZE {tables}")).execute(&bench.pool).await?;
                sqlx::raw_sql("VACUUM (ANALYZE) saga_stats_pending, saga_stats").execute(&bench.pool).await?;
            } else {
                sqlx::raw_sql(&format!("VACUUM (ANALYZE) {tables}, saga_stats_pending, saga_stats"))
                    .execute(&bench.pool)
                    .await?;
            }
            // Written out, so that the run does not pay for the load's dirty pages.
            sqlx::raw_sql("CHECKPOINT").execute(&bench.pool).await?;
            println!(
                "preloaded in {:.0} s, rolled up {:.0} s later, vacuumed in {:.0} s; sizes: {}",
                took.as_secs_f64(),
                rollup.as_secs_f64(),
                vacuum.elapsed().as_secs_f64(),
                scale::table_sizes(&bench.pool)
                    .await?
                    .iter()
                    .map(|(table, bytes)| format!("{table} {:.2} GB", *bytes as f64 / 1e9))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let idle_before = bench.idle_queries(args.query_rounds).await?;
        println!("{HEADER}");
        let (run, during) = bench.run_with_queries(label, rate, args.seconds).await?;
        println!("{}", line(&run));
        println!(
            "WAL full-page images per saga {:.2}, checkpoints {}, orchestrator batch p50 {:.1} ms p99 {:.1} ms",
            run["wal_full_page_images_per_saga"].as_f64().unwrap_or(0.0),
            run["checkpoints"],
            run["orchestrator_batch_ms"]["p50"].as_f64().unwrap_or(0.0),
            run["orchestrator_batch_ms"]["p99"].as_f64().unwrap_or(0.0),
        );
        let finished: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_instances WHERE ended_at IS NOT NULL")
            .fetch_one(&bench.pool)
            .await?;
        let (idle, during) = (idle_before.summary(), during.summary());
        println!("{label}: {finished} finished sagas in the table");
        println!(
            "{:<32} {:>9} {:>9} {:>9} | under load {:>6} {:>9} {:>9}",
            "query (ms)", "idle p50", "p99", "max", "n", "p50", "p99"
        );
        for (name, q) in idle["queries"].as_object().into_iter().flatten() {
            let l = &during["queries"][name];
            let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
            println!(
                "{name:<32} {:>9} {:>9} {:>9} | {:>17} {:>9} {:>9}",
                f(&q["p50_ms"]),
                f(&q["p99_ms"]),
                f(&q["max_ms"]),
                l["count"],
                f(&l["p50_ms"]),
                f(&l["p99_ms"])
            );
        }
        for errors in [&idle["errors"], &during["errors"]] {
            if errors.as_array().is_some_and(|e| !e.is_empty()) {
                println!("answers other than 200: {errors}");
            }
        }
        report.push(json!({"label": label, "finished_sagas": finished, "run": run, "queries_idle": idle, "queries_under_load": during}));
    }
    let ended = |i: usize| {
        report[i]["run"]["completed_per_s"].as_f64().unwrap_or(0.0)
            + report[i]["run"]["failed_per_s"].as_f64().unwrap_or(0.0)
    };
    println!(
        "ended/s: {:.1} on empty tables, {:.1} with {count} finished sagas: {:.0} %",
        ended(0),
        ended(1),
        100.0 * ended(1) / ended(0).max(1e-9)
    );
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = json!({"at": Utc::now(), "machine": machine(), "git": git_revision(), "args": format!("{args:?}"), "scale": report});
    std::fs::write(&args.json, serde_json::to_string_pretty(&out)?)?;
    println!("report: {}", args.json.display());
    bench.system.stop().await?;
    Ok(())
}

/// What ran while the sagas of the run's worst second did, beside the run's averages: the
/// machine's cores busy and context switches a second, and the three processes whose cores rose
/// the most.
fn worst_second_line(run: &Value) -> Option<String> {
    let worst = run["e2e_worst_seconds"].get(0)?;
    let during = worst.get("during").filter(|d| !d.is_null())?;
    let average = |name: &str| run["processes"][name]["cores"].as_f64().unwrap_or(0.0);
    let number = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    // The processes whose most cores in a second rose the most above their run's average.
    let mut rose: Vec<(&String, f64)> = during["peak"]["cores_by_process"]
        .as_object()?
        .iter()
        .filter_map(|(name, most)| Some((name, most.as_f64()?)))
        .collect();
    rose.sort_by(|a, b| (b.1 - average(b.0)).total_cmp(&(a.1 - average(a.0))));
    let processes: Vec<String> = rose
        .iter()
        .take(3)
        .map(|(name, most)| {
            let cores = number(&during["cores_by_process"][name.as_str()]);
            format!("{name} {cores:.2} cores, at most {most:.2} (run {:.2})", average(name))
        })
        .collect();
    let (machine, whole) = (&during["machine"], &run["machine"]);
    Some(format!(
        "while the worst second's sagas ran ({:.1}-{:.1} s): the machine {:.2} cores busy (run {:.2}), {:.0} context switches/s, fewest {:.0} in a second (run {:.0}); {}",
        number(&during["from_s"]),
        number(&during["to_s"]),
        number(&machine["busy_cores"]),
        number(&whole["busy_cores"]),
        number(&machine["context_switches_per_s"]),
        number(&during["peak"]["fewest_context_switches_per_s"]),
        number(&whole["context_switches_per_s"]),
        processes.join(", ")
    ))
}

fn print_detail(run: &Value) {
    println!("\n{} at {} orders/s:", run["label"].as_str().unwrap_or(""), run["offered_per_s"]);
    println!(
        "  statuses {}; drained {:.1} s after the last arrival; the backlog grew {:.2} sagas/s in the arrivals' second half",
        run["statuses"],
        run["drained_in_s"].as_f64().unwrap_or(0.0),
        run["backlog_slope_per_s"].as_f64().unwrap_or(0.0)
    );
    println!("  end to end (ms) {}", run["e2e_ms"]);
    let worst: Vec<String> = run["e2e_worst_seconds"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| format!("{} s: {} (max {:.0} ms)", w["second"], w["above_p99"], w["max_ms"].as_f64().unwrap_or(0.0)))
        .collect();
    if !worst.is_empty() {
        println!("  sagas above the p99 by the second of their order: {}", worst.join(", "));
    }
    if let Some(line) = worst_second_line(run) {
        println!("  {line}");
    }
    println!(
        "  order placed to saga started (ms) {}; of which the order API's answer {}",
        run["start_ms"], run["order_api_ms"]
    );
    println!(
        "  orchestrator step overhead (ms) {}; its batches (ms) {}",
        run["step_overhead_ms"], run["orchestrator_batch_ms"]
    );
    println!("  outbox dwell by service (ms) {}", run["outbox_dwell_ms"]);
    println!("  delivery to each service's consumer (ms) {}", run["delivery_ms"]);
    for hop in run["round_trip_ms"].as_array().into_iter().flatten() {
        println!(
            "  round trip {:<22} {:<12} p50 {:>7.1} ms  p99 {:>7.1} ms",
            hop["step"].as_str().unwrap_or(""),
            hop["kind"].as_str().unwrap_or(""),
            hop["p50"].as_f64().unwrap_or(0.0),
            hop["p99"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "  per saga: {:.1} commits, {:.0} WAL bytes, {:.1} broker messages",
        run["commits_per_saga"].as_f64().unwrap_or(0.0),
        run["wal_bytes_per_saga"].as_f64().unwrap_or(0.0),
        run["broker_messages_per_saga"].as_f64().unwrap_or(0.0)
    );
    if let Some(processes) = run["processes"].as_object() {
        for (name, p) in processes {
            let jit = p["jit_cpu_seconds"].as_f64().map(|jit| format!("  of which JIT {jit:.1} s")).unwrap_or_default();
            println!(
                "  {:<13} cpu {:>7.1} s ({:.2} cores, {:>5.2} ms/saga)  peak memory {:>7.1} MB{jit}",
                name,
                p["cpu_seconds"].as_f64().unwrap_or(0.0),
                p["cores"].as_f64().unwrap_or(0.0),
                p["cpu_ms_per_saga"].as_f64().unwrap_or(0.0),
                p["peak_memory_mb"].as_f64().unwrap_or(0.0)
            );
        }
    }
    let machine = &run["machine"];
    if let Some(busy) = machine["busy_cores"].as_f64() {
        println!(
            "  the machine    busy {busy:.2} cores, idle {:.2}, stolen {:.3}; {:.0} context switches/s ({:.0} a saga)",
            machine["idle_cores"].as_f64().unwrap_or(0.0),
            machine["steal_cores"].as_f64().unwrap_or(0.0),
            machine["context_switches_per_s"].as_f64().unwrap_or(0.0),
            machine["context_switches_per_s"].as_f64().unwrap_or(0.0) * run["wall_seconds"].as_f64().unwrap_or(0.0)
                / run["orders"].as_f64().unwrap_or(1.0).max(1.0)
        );
    }
    if let Some(warning) = cold_broker(run) {
        println!("  {warning}");
    }
}

/// The share of the broker's CPU its JIT may take in a run before the run says that the broker
/// was not warm. Warm, it is a few per cent (docs/performance.md, 2026-12-06).
const COLD_BROKER_JIT_SHARE: f64 = 0.10;

/// A warning when the broker's JIT compiler took more than [`COLD_BROKER_JIT_SHARE`] of its CPU
/// in the run: a broker started minutes before is still compiling its hot paths, with CPU the
/// system under test would otherwise have, so the run's figures do not compare with a warm one's.
fn cold_broker(run: &Value) -> Option<String> {
    let kafka = &run["processes"]["kafka"];
    let share = kafka["jit_share"].as_f64()?;
    (share > COLD_BROKER_JIT_SHARE).then(|| {
        let up = run["broker_up_seconds"].as_f64().map(|s| format!(", up {s:.0} s at the start")).unwrap_or_default();
        format!(
            "warning: the broker's JIT compiler took {:.0} % of its CPU in this run ({:.2} of {:.2} cores{up}): it is \
             not warm yet, and its figures do not compare with a warm broker's (the benchmark waits for it \
             --broker-warm-up-max-seconds at most: give more)",
            share * 100.0,
            share * kafka["cores"].as_f64().unwrap_or(0.0),
            kafka["cores"].as_f64().unwrap_or(0.0),
        )
    })
}

fn git_revision() -> Option<String> {
    let output = std::process::Command::new("git").args(["describe", "--always", "--dirty"]).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The order saga as v2 with every timeout an hour: sagas held at a stopped participant wait
/// instead of timing out.
fn patient_definitions() -> anyhow::Result<PathBuf> {
    let source = saga_e2e::workspace_root().join("saga-defs/definitions/order-fulfilment.v1.json");
    let mut definition: Value = serde_json::from_str(&std::fs::read_to_string(source)?)?;
    definition["version"] = json!(2);
    fn patient(value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    if key == "timeout_ms" {
                        *v = json!(3_600_000);
                    } else {
                        patient(v);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(patient),
            _ => {}
        }
    }
    patient(&mut definition);
    let dir = saga_e2e::workspace_root().join("target/bench/patient-definitions");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("order-fulfilment.v2.json"), serde_json::to_string_pretty(&definition)?)?;
    Ok(dir)
}

/// Memory with many sagas in flight, and recovery: fills the system with `hold` sagas waiting at
/// a stopped payment service, optionally SIGKILLs and restarts the orchestrator on the way, then
/// lets them all finish and checks that none timed out.
async fn hold_in_flight(args: &Args, options: Options, hold: usize) -> anyhow::Result<()> {
    let options = options
        .env("orchestrator", "SAGA_DEFINITIONS_DIR", patient_definitions()?.display().to_string())
        .env("orchestrator", "SAGA_MAX_IN_FLIGHT", (hold * 2).to_string());
    let system = System::start_with(options).await?;
    let skus: Vec<String> = (0..8).map(|i| format!("HOLD-{i}")).collect();
    let sku_refs: Vec<&str> = skus.iter().map(String::as_str).collect();
    faults::stock_up(&system, &sku_refs, 1_000_000_000).await?;
    let pool = system.pool("orchestrator").await?;
    system.signal("payment", "STOP")?;
    println!("system {} ready; payment stopped; placing {hold} orders at {}/s", system.run_id, args.hold_rate);
    let started = Instant::now();
    let rss = |system: &System| -> f64 {
        system
            .pid("orchestrator")
            .ok()
            .and_then(|pid| procfs::process::Process::new(pid as i32).ok()?.status().ok()?.vmrss)
            .map_or(0.0, |kb| kb as f64 / 1024.0)
    };
    let waiting = |pool: &PgPool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM saga_instances WHERE status = 'RUNNING' AND step_name = 'charge_payment'",
            )
            .fetch_one(&pool)
            .await
        }
    };
    let mut killed: Option<Value> = None;
    let mut peak_rss: f64 = 0.0;
    let mut samples = Vec::new();
    let placed = {
        let placing = faults::place_many(&system, "hold", hold, args.hold_rate, &sku_refs, |i| {
            if i % 20 == 3 {
                Kind::Declined
            } else {
                Kind::Good
            }
        });
        tokio::pin!(placing);
        let placed = loop {
            tokio::select! {
                placed = &mut placing => break placed?,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    let (now, held) = (rss(&system), waiting(&pool).await.unwrap_or(-1));
                    peak_rss = peak_rss.max(now);
                    samples.push(json!({"t": started.elapsed().as_secs_f64(), "held": held, "orchestrator_rss_mb": now}));
                    println!("{:>6.0} s  held at payment {held:>7}  orchestrator RSS {now:>6.1} MB", started.elapsed().as_secs_f64());
                    if let (Some(at), None) = (args.kill_at, &killed) {
                        if held >= at as i64 {
                            system.kill("orchestrator").await?;
                            let restarted = Instant::now();
                            system.spawn("orchestrator")?;
                            system.wait_ready("orchestrator", Duration::from_secs(120)).await?;
                            let ready = restarted.elapsed().as_secs_f64();
                            println!("SIGKILLed the orchestrator with {held} held; ready again in {ready:.1} s");
                            killed = Some(json!({"held": held, "ready_again_s": ready}));
                        }
                    }
                }
            }
        };
        placed
    };
    // Every placed saga reaches the payment step (declined cards too: they are declined there).
    let filled = Instant::now();
    loop {
        let held = waiting(&pool).await?;
        if held as usize >= placed.len() || filled.elapsed() > Duration::from_secs(600) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held = waiting(&pool).await?;
    let rss_held = rss(&system);
    peak_rss = peak_rss.max(rss_held);
    println!("held: {held} sagas in flight at the payment step; orchestrator RSS {rss_held:.1} MB (peak so far {peak_rss:.1} MB)");
    system.signal("payment", "CONT")?;
    let released = Instant::now();
    let ids: Vec<Uuid> = placed.iter().map(|p| p.saga_id).collect();
    loop {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM saga_instances WHERE id = ANY($1) AND ended_at IS NULL")
                .bind(&ids)
                .fetch_one(&pool)
                .await?;
        let now = rss(&system);
        peak_rss = peak_rss.max(now);
        if open == 0 {
            break;
        }
        if released.elapsed() > Duration::from_secs(3600) {
            bail!("{open} sagas still in flight an hour after the payment service resumed");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let drained = released.elapsed().as_secs_f64();
    let statuses: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM saga_instances WHERE id = ANY($1) GROUP BY status ORDER BY status",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await?;
    let timed_out: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_step_attempts WHERE status = 'TIMED_OUT'")
        .fetch_one(&pool)
        .await?;
    let report = json!({
        "at": Utc::now(),
        "machine": machine(),
        "git": git_revision(),
        "held": held,
        "orchestrator_rss_mb_held": rss_held,
        "orchestrator_rss_mb_peak": peak_rss,
        "killed": killed,
        "drained_in_s": drained,
        "drain_per_s": held as f64 / drained,
        "statuses": statuses.iter().cloned().collect::<BTreeMap<String, i64>>(),
        "timed_out_attempts": timed_out,
        "samples": samples,
    });
    println!("drained {held} sagas in {drained:.0} s ({:.0}/s); statuses {}; timed-out attempts {timed_out}; orchestrator RSS peak {peak_rss:.1} MB", held as f64 / drained, report["statuses"]);
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    println!("report: {}", args.json.display());
    system.stop().await?;
    if timed_out > 0 || statuses.iter().any(|(s, _)| s != "COMPLETED" && s != "FAILED") {
        bail!("not every saga ended as its business rule says, or an attempt timed out");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(jit_share: Option<f64>) -> Value {
        let mut kafka = json!({"cores": 0.7, "cpu_seconds": 35.0});
        if let Some(share) = jit_share {
            kafka["jit_share"] = json!(share);
            kafka["jit_cpu_seconds"] = json!(35.0 * share);
        }
        json!({"broker_up_seconds": 130.0, "saturated": false, "processes": {"kafka": kafka}})
    }

    #[test]
    fn a_run_says_when_the_brokers_jit_took_more_than_a_tenth_of_its_cpu() {
        let cold = cold_broker(&run(Some(0.5))).expect("half the broker's CPU in its JIT is a cold broker");
        assert!(cold.contains("50 %") && cold.contains("0.35 of 0.70 cores") && cold.contains("up 130 s"), "{cold}");
        assert!(line(&run(Some(0.5))).ends_with("cold broker"), "{}", line(&run(Some(0.5))));
        // Warm: a few per cent (6 % four runs after a start, docs/performance.md).
        assert_eq!(cold_broker(&run(Some(0.06))), None);
        assert!(!line(&run(Some(0.06))).contains("cold"));
        // No JIT figure (no broker on this machine, or not a HotSpot JVM): nothing said.
        assert_eq!(cold_broker(&run(None)), None);
        let mut both = run(Some(0.2));
        both["saturated"] = json!(true);
        assert!(line(&both).ends_with("saturated, cold broker"), "{}", line(&both));
    }
}
