//! The chaos run: a steady stream of orders with a mix of outcomes for a given number of
//! minutes, while orchestrator replicas and participants are SIGKILLed and restarted, the Apache
//! Kafka broker is paused or SIGKILLed and restarted, and Postgres is restarted at random; then the faults stop, the system drains, and
//! the invariants I1–I6 are checked over every saga. Prints the figures; exits 1 on any
//! violation. Run it with `scripts/chaos [minutes]`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use saga_e2e::faults::{self, Expect, Kind};
use saga_e2e::{Options, System, SERVICES};

const PARTICIPANTS: [&str; 4] = ["order", "inventory", "payment", "fulfilment"];
const ORCHESTRATORS: [&str; 2] = ["orchestrator", "orchestrator#2"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let minutes: f64 = args.first().map(|m| m.parse()).transpose().context("minutes must be a number")?.unwrap_or(10.0);
    let rate: f64 = args.get(1).map(|r| r.parse()).transpose().context("rate must be a number")?.unwrap_or(5.0);
    let restart_postgres = std::env::var("CHAOS_RESTART_POSTGRES").map(|v| v != "0").unwrap_or(true);
    started_at();
    println!("chaos: {minutes} min, {rate} orders/s, two orchestrator replicas, a private broker");

    // Consumer sessions of 6 s (the test default), so that a killed replica's partitions move
    // within seconds. Some broker pauses outlast them, and every member then rejoins its group.
    let options = Options::default().fault_definitions().private_broker();
    let system = System::start_with(options).await?;
    system.spawn("orchestrator#2")?;
    system.wait_ready("orchestrator#2", Duration::from_secs(60)).await?;
    let skus = ["CHAOS-A", "CHAOS-B", "CHAOS-C"];
    let before = faults::stock_up(&system, &skus, 1_000_000).await?;
    println!("system {} ready; logs in target/debug/e2e-logs/{}", system.run_id, system.run_id);

    let count = (minutes * 60.0 * rate).round() as usize;
    let injected: Mutex<BTreeMap<&'static str, u32>> = Mutex::new(BTreeMap::new());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let kind = |i: usize| match i % 20 {
        3 | 13 => Kind::Declined,
        7 => Kind::BadAddress,
        17 => Kind::RefundFailsThrice,
        _ => Kind::Good,
    };
    let load = async {
        let placed = faults::place_many(&system, "chaos", count, rate, &skus, kind).await;
        stop.send_replace(true);
        placed
    };
    let chaos = async {
        let mut stopped = stopped;
        loop {
            let (wait, pick, down) = {
                let mut rng = rand::rng();
                (rng.random_range(4.0..12.0), rng.random_range(0..100u32), rng.random_range(1.0..4.0))
            };
            // Faults stop with the orders: the wait ends early when the last order is placed.
            if tokio::time::timeout(Duration::from_secs_f64(wait), stopped.wait_for(|stop| *stop)).await.is_ok() {
                break;
            }
            let fault = match pick {
                0..=24 => kill(&system, ORCHESTRATORS[(pick % 2) as usize], down, "kill_orchestrator").await,
                25..=49 => kill(&system, PARTICIPANTS[(pick % 4) as usize], down, "kill_participant").await,
                // From under a second to 8 s: some outlast the consumers' 6 s sessions.
                50..=64 => pause_broker(&system, down * 2.0).await,
                65..=79 => kill_broker(&system, down).await,
                _ if restart_postgres => restart_postgres_server().await,
                _ => system
                    .database_outage(
                        if pick % 2 == 0 { "orchestrator" } else { "payment" },
                        Duration::from_secs_f64(down),
                    )
                    .await
                    .map(|_| "database_outage"),
            };
            match fault {
                Ok(kind) => {
                    *injected.lock().unwrap().entry(kind).or_default() += 1;
                    println!("[{:>6.1} s] fault: {kind}", started_at().elapsed().as_secs_f64());
                }
                Err(error) => println!("a fault could not be injected: {error:#}"),
            }
        }
    };
    let (placed, ()) = tokio::join!(load, chaos);
    let placed = placed?;
    // Everything back up, then drain.
    for service in SERVICES.iter().copied().chain(["orchestrator#2"]) {
        if !system.running().contains(&service) {
            system.spawn(service)?;
        }
    }
    // Drain is timed from here: the last order placed and the fault in hand (if any) over.
    let quiet = Instant::now();
    let load_ended = started_at().elapsed().as_secs_f64();
    let drained = faults::settle(&system, &placed, Duration::from_secs(600)).await;
    let drain = quiet.elapsed();
    // What on-call does next: a compensation whose retries ran out during an outage parked its
    // saga NEEDS_ATTENTION; one bulk retry must finish every such saga, and only then are the
    // invariants checked (no saga may stay parked).
    let parked = operator_retry(&system).await?;
    let drained = match drained {
        Ok(_) if parked > 0 => faults::settle(&system, &placed, Duration::from_secs(300)).await,
        other => other,
    };
    let expect = Expect { min_good_completed: 0.9, ..Expect::default() };
    let report = faults::check(&system, &placed, &before, &expect).await?;
    println!();
    println!("sagas started            {}", report.started);
    println!("  completed              {}", report.completed);
    println!("  failed (compensated)   {}", report.failed);
    println!("  needing attention      {} (parked before the operator's bulk retry: {parked})", report.needs_attention);
    println!("dead letters             {}", report.dead_letters);
    println!("faults injected          {}", injected.lock().unwrap().values().sum::<u32>());
    for (kind, n) in injected.lock().unwrap().iter() {
        println!("  {kind:<22} {n}");
    }
    println!(
        "time to drain            {:.1} s after the last order and fault ({load_ended:.1} s)",
        drain.as_secs_f64()
    );
    println!("invariant violations     {}", report.violations.len());
    for violation in &report.violations {
        println!("  {violation}");
    }
    if let Err(error) = drained {
        println!("not drained: {error:#}");
    }
    let clean = report.violations.is_empty();
    system.stop().await?;
    std::process::exit(if clean { 0 } else { 1 });
}

fn started_at() -> &'static Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now)
}

/// Retries every NEEDS_ATTENTION saga through the API, as on-call would after the faults, in
/// bulk retries of at most 500; returns how many there were.
async fn operator_retry(system: &System) -> anyhow::Result<u64> {
    let mut total = 0;
    loop {
        let body = serde_json::json!({"limit": 500, "reason": "chaos: faults over, retrying what parked"});
        let (code, result) = system.api_post("/api/v1/sagas/bulk-retry", &body, None).await?;
        anyhow::ensure!(code == 200, "bulk retry answered {code}: {result}");
        let retried = result["retried"].as_u64().context("bulk retry: no count")?;
        total += retried;
        if retried < 500 {
            return Ok(total);
        }
    }
}

/// SIGKILLs a service and restarts it after `down` seconds.
async fn kill(system: &System, service: &'static str, down: f64, kind: &'static str) -> anyhow::Result<&'static str> {
    system.kill(service).await?;
    tokio::time::sleep(Duration::from_secs_f64(down)).await;
    system.spawn(service)?;
    Ok(kind)
}

async fn pause_broker(system: &System, seconds: f64) -> anyhow::Result<&'static str> {
    system.signal("broker", "STOP")?;
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    system.signal("broker", "CONT")?;
    Ok("pause_broker")
}

/// SIGKILLs the broker and starts it again on its log after `down` seconds.
async fn kill_broker(system: &System, down: f64) -> anyhow::Result<&'static str> {
    system.kill_broker().await?;
    tokio::time::sleep(Duration::from_secs_f64(down)).await;
    system.restart_broker().await?;
    Ok("kill_broker")
}

/// Restarts the local Postgres server (`pg_ctlcluster <version> main restart -m fast`).
async fn restart_postgres_server() -> anyhow::Result<&'static str> {
    let clusters = tokio::process::Command::new("pg_lsclusters").arg("-h").output().await?;
    let listing = String::from_utf8_lossy(&clusters.stdout);
    let line = listing.lines().next().context("pg_lsclusters lists no cluster")?;
    let mut fields = line.split_whitespace();
    let (version, name) = (fields.next().context("version")?, fields.next().context("cluster")?);
    let status = tokio::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, name, "restart", "-m", "fast"])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "pg_ctlcluster {version} {name} restart failed");
    Ok("restart_postgres")
}
