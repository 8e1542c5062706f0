//! Runbook 004's commands against what we run (docs/operations.md has the whole table): the
//! settings it changes with `kubectl set env` take effect under its names, and the heap profile
//! it fetches from `localhost:6060/debug/pprof/heap` is served.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use saga_e2e::faults::{self, Kind};
use saga_e2e::{free_port, Options, System};

#[tokio::test]
async fn the_runbooks_settings_take_effect_under_its_names_and_its_heap_profile_is_served() -> anyhow::Result<()> {
    let profile_port = free_port();
    let options = Options::default()
        // "kubectl set env deployment/saga-orchestrator DB_MAX_OPEN_CONNS=25 DB_MAX_IDLE_CONNS=5"
        .env("orchestrator", "DB_MAX_OPEN_CONNS", "3")
        .env("orchestrator", "DB_MAX_IDLE_CONNS", "2")
        // "kubectl set env deployment/saga-orchestrator KAFKA_BATCH_SIZE=1000 KAFKA_BATCH_TIMEOUT=100ms"
        .env("orchestrator", "KAFKA_BATCH_SIZE", "1000")
        .env("orchestrator", "KAFKA_BATCH_TIMEOUT", "100ms")
        .env("payment", "KAFKA_BATCH_TIMEOUT", "100ms")
        .env("orchestrator", "PROFILE_ADDR", format!("127.0.0.1:{profile_port}"));
    let system = System::start_with(options).await?;
    faults::stock_up(&system, &["RUNBOOK-A"], 100).await?;
    let mut placed = Vec::new();
    for i in 0..6 {
        let kind = if i == 0 { Kind::Declined } else { Kind::Good };
        placed.push(faults::place(&system, &format!("runbook-{i}"), kind, "RUNBOOK-A", 1).await?);
    }
    faults::settle(&system, &placed, Duration::from_secs(90)).await?;

    // The pool's gauges are sampled every 5 s.
    let started = Instant::now();
    loop {
        let max = system.metric("orchestrator", "database_connections{state=\"max\"}").await?;
        let open = system.metric("orchestrator", "database_connections{state=\"open\"}").await?;
        if max == 3.0 && open >= 2.0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(15) {
            bail!("DB_MAX_OPEN_CONNS=3 and DB_MAX_IDLE_CONNS=2 did not take effect: max {max}, open {open}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let response = system.http.get(format!("http://127.0.0.1:{profile_port}/debug/pprof/heap")).send().await?;
    ensure!(response.status() == 200, "heap profile: {}", response.status());
    let body = response.bytes().await?;
    ensure!(body.len() > 100 && body[..2] == [0x1f, 0x8b], "not a gzipped pprof profile: {} bytes", body.len());
    system.stop().await
}
