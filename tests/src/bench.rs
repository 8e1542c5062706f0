//! What the benchmark (`scripts/bench`, `src/bin/bench.rs`) measures besides the sagas
//! themselves: CPU and memory of every process (the services, Kafka, Postgres, the driver) from
//! `/proc`, Postgres's commits and WAL, the messages through the broker, and quantiles of the
//! services' Prometheus histograms between two scrapes, and whether a run's backlog grows.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use procfs::process::Process;
use sqlx::PgPool;

/// The processes the benchmark watches, by name.
#[derive(Debug, Clone)]
pub struct Watched {
    /// Single processes: the services, the broker, the driver itself.
    pub single: BTreeMap<String, i32>,
}

/// CPU seconds used so far, and memory now, of one watched name.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Usage {
    pub cpu_seconds: f64,
    /// Resident memory now; for Postgres the proportional set size of all its processes (shared
    /// buffers counted once).
    pub memory_bytes: u64,
    /// Of the CPU seconds, those of a JVM's JIT compiler threads (none for other processes). A
    /// broker's JIT compiles its hot paths for minutes after it starts, on the cores the system
    /// under test uses: on 2026-12-06 it was a third to a half of the broker's CPU for the first
    /// two to three minutes at 60 orders/s (docs/performance.md).
    pub jit_cpu_seconds: Option<f64>,
}

fn ticks() -> f64 {
    procfs::ticks_per_second() as f64
}

/// CPU seconds (user + system) and resident bytes of one process.
fn usage_of(pid: i32) -> anyhow::Result<Usage> {
    let process = Process::new(pid)?;
    let stat = process.stat()?;
    let status = process.status()?;
    Ok(Usage {
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks(),
        memory_bytes: status.vmrss.unwrap_or(0) * 1024,
        jit_cpu_seconds: jit_cpu_seconds(&process),
    })
}

/// Whether a thread's name (`comm`, 15 bytes at most) is one of HotSpot's JIT compiler threads
/// ("C2 CompilerThread0" reads "C2 CompilerThre").
fn is_jit_thread(comm: &str) -> bool {
    comm.starts_with("C1 CompilerThre") || comm.starts_with("C2 CompilerThre")
}

/// The CPU seconds of a process's JIT compiler threads, if it has any (a HotSpot JVM). Counts
/// the threads alive now: a compiler thread the JVM retired took its time with it (HotSpot
/// keeps at least one of each kind, and on two cores it has no more).
fn jit_cpu_seconds(process: &Process) -> Option<f64> {
    let mut jit = None;
    for task in process.tasks().ok()?.flatten() {
        if let Ok(stat) = task.stat() {
            if is_jit_thread(&stat.comm) {
                *jit.get_or_insert(0.0) += (stat.utime + stat.stime) as f64 / ticks();
            }
        }
    }
    jit
}

/// The seconds since a process started.
pub fn uptime_seconds(pid: i32) -> Option<f64> {
    use procfs::Current as _;
    let start = Process::new(pid).ok()?.stat().ok()?.starttime;
    let boot = procfs::Uptime::current().ok()?.uptime;
    Some(boot - start as f64 / ticks())
}

/// Postgres as a whole: every `postgres` process (the postmaster, its helpers and the backends);
/// CPU includes backends that have exited (the postmaster's reaped children). Memory is each
/// process's private resident memory (`RssAnon`) plus the shared memory and the mapped files
/// once, as much as the process that maps most of them has resident (`RssShmem`, `RssFile`): the
/// kernel's counters in `/proc/PID/status`, cheap to read. (Their proportional set sizes,
/// `smaps_rollup`, walk every process's page tables, shared buffers included: read every ten
/// seconds, that walk put a bump of a few hundred milliseconds into the sagas' latency at each
/// reading, docs/performance.md.)
fn postgres_usage() -> anyhow::Result<Usage> {
    let mut usage = Usage::default();
    let mut pids = Vec::new();
    let (mut shared, mut files) = (0u64, 0u64);
    for process in procfs::process::all_processes()?.flatten() {
        if let Ok(stat) = process.stat() {
            if stat.comm == "postgres" {
                pids.push((process.pid, stat.ppid));
                usage.cpu_seconds += (stat.utime + stat.stime) as f64 / ticks();
                if let Ok(status) = process.status() {
                    usage.memory_bytes += status.rssanon.unwrap_or(0) * 1024;
                    shared = shared.max(status.rssshmem.unwrap_or(0) * 1024);
                    files = files.max(status.rssfile.unwrap_or(0) * 1024);
                }
            }
        }
    }
    usage.memory_bytes += shared + files;
    // The postmaster: a postgres process whose parent is not one.
    let postgres: Vec<i32> = pids.iter().map(|(pid, _)| *pid).collect();
    for (pid, ppid) in &pids {
        if !postgres.contains(ppid) {
            let stat = Process::new(*pid)?.stat()?;
            usage.cpu_seconds += (stat.cutime + stat.cstime) as f64 / ticks();
        }
    }
    Ok(usage)
}

/// The broker's JVM, if one runs on this machine.
pub fn kafka_pid() -> Option<i32> {
    procfs::process::all_processes().ok()?.flatten().find_map(|p| {
        let cmdline = p.cmdline().ok()?;
        cmdline.iter().any(|a| a == "kafka.Kafka").then_some(p.pid)
    })
}

impl Watched {
    /// The usage of everything watched, with `postgres` added.
    pub fn sample(&self) -> BTreeMap<String, Usage> {
        let mut out: BTreeMap<String, Usage> =
            self.single.iter().filter_map(|(name, pid)| Some((name.clone(), usage_of(*pid).ok()?))).collect();
        if let Ok(usage) = postgres_usage() {
            out.insert("postgres".into(), usage);
        }
        out
    }
}

/// The whole machine's time so far, from `/proc/stat`, in seconds summed over its cores: busy
/// (user, nice, system, interrupts), idle (with I/O wait), and stolen by the hypervisor; and the
/// context switches of every process. What the watched processes do not account for (the
/// kernel's work for nobody in particular, the other tenants of a virtual machine's host) shows
/// up here.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MachineTime {
    pub busy: f64,
    pub idle: f64,
    pub steal: f64,
    pub context_switches: u64,
}

impl MachineTime {
    pub fn now() -> Option<Self> {
        use procfs::CurrentSI as _;
        let stat = procfs::KernelStats::current().ok()?;
        let (t, some) = (&stat.total, |v: Option<u64>| v.unwrap_or(0) as f64 / ticks());
        Some(Self {
            busy: (t.user + t.nice + t.system) as f64 / ticks() + some(t.irq) + some(t.softirq),
            idle: t.idle as f64 / ticks() + some(t.iowait),
            steal: some(t.steal),
            context_switches: stat.ctxt,
        })
    }

    /// From `earlier` to `self`, over `wall` seconds: cores busy, idle and stolen, and context
    /// switches a second.
    pub fn since(&self, earlier: &Self, wall: f64) -> serde_json::Value {
        let cores = |now: f64, then: f64| (now - then) / wall;
        serde_json::json!({
            "busy_cores": cores(self.busy, earlier.busy),
            "idle_cores": cores(self.idle, earlier.idle),
            "steal_cores": cores(self.steal, earlier.steal),
            "context_switches_per_s": self.context_switches_per_s(earlier, wall),
        })
    }

    /// Context switches a second from `earlier` to `self`, over `wall` seconds.
    pub fn context_switches_per_s(&self, earlier: &Self, wall: f64) -> f64 {
        self.context_switches.saturating_sub(earlier.context_switches) as f64 / wall
    }
}

/// Postgres's counters: transactions committed (every database) and WAL written, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct PgCounters {
    pub commits: i64,
    pub wal_bytes: i64,
    /// Full-page images written to the WAL (the first change of a page after a checkpoint).
    pub wal_fpi: i64,
    /// Checkpoints, timed and requested.
    pub checkpoints: i64,
}

pub async fn pg_counters(pool: &PgPool) -> anyhow::Result<PgCounters> {
    // Backends report their counters at most once a second; the caller waits before sampling.
    let commits: i64 = sqlx::query_scalar("SELECT sum(xact_commit)::bigint FROM pg_stat_database")
        .fetch_one(pool)
        .await
        .context("pg_stat_database")?;
    let wal_bytes: i64 = sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
        .fetch_one(pool)
        .await
        .context("pg_current_wal_lsn")?;
    let (wal_fpi, checkpoints): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT wal_fpi FROM pg_stat_wal), (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter)",
    )
    .fetch_one(pool)
    .await
    .context("pg_stat_wal")?;
    Ok(PgCounters { commits, wal_bytes, wal_fpi, checkpoints })
}

/// Messages on every topic of `prefix`: the sum of the partitions' high watermarks.
pub async fn broker_messages(brokers: &str, prefix: &str) -> anyhow::Result<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (brokers, prefix) = (brokers.to_owned(), prefix.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create()?;
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(None, timeout)?;
        let mut total = 0;
        for topic in metadata.topics().iter().filter(|t| t.name().starts_with(&prefix)) {
            for partition in topic.partitions() {
                let (low, high) = consumer.fetch_watermarks(topic.name(), partition.id(), timeout)?;
                total += high - low.min(high);
            }
        }
        Ok(total)
    })
    .await?
}

/// A Prometheus histogram's cumulative buckets, `(le, count)`, summed over its label sets.
#[derive(Debug, Clone, Default)]
pub struct Buckets(pub Vec<(f64, f64)>);

impl Buckets {
    /// Reads `<name>_bucket` samples from an exposition text.
    pub fn parse(text: &str, name: &str) -> Self {
        let prefix = format!("{name}_bucket{{");
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with(&prefix)) {
            let Some((labels, value)) = line.rsplit_once(' ') else { continue };
            let Some(le) = labels.split("le=\"").nth(1).and_then(|rest| rest.split('"').next()) else { continue };
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
            let (Ok(count), false) = (value.parse::<f64>(), le.is_nan()) else { continue };
            by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += count;
        }
        let mut buckets: Vec<(f64, f64)> = by_le.into_values().collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Buckets(buckets)
    }

    /// The observations between two scrapes.
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .map(|(le, count)| {
                    let before = earlier.0.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c);
                    (*le, count - before)
                })
                .collect(),
        )
    }

    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |(_, c)| *c)
    }

    /// The quantile `q`, interpolated within its bucket as PromQL's `histogram_quantile` does;
    /// `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for (le, count) in &self.0 {
            if *count >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let within = (rank - lower.1) / (count - lower.1).max(f64::MIN_POSITIVE);
                return Some(lower.0 + (le - lower.0) * within);
            }
            lower = (*le, *count);
        }
        Some(lower.0)
    }
}

/// How fast a run's backlog (orders scheduled so far minus sagas ended so far, sampled each
/// second as `(seconds since the start, backlog)`) grows over the second half of its `seconds` of
/// arrivals, in sagas per second: the least-squares slope, which fits through the noise that a
/// latency of a few hundred milliseconds puts on every sample. 0 with fewer than three samples.
pub fn backlog_slope(series: &[(f64, i64)], seconds: f64) -> f64 {
    let half: Vec<(f64, f64)> =
        series.iter().filter(|(t, _)| *t >= seconds / 2.0 && *t <= seconds).map(|(t, b)| (*t, *b as f64)).collect();
    if half.len() < 3 {
        return 0.0;
    }
    linreg::linear_regression_of(&half).map_or(0.0, |(slope, _)| slope)
}

/// Whether a backlog growing at `slope` sagas a second means the system does not keep up with
/// `rate` orders a second: it grows by more than 2 % of the arrivals (and at least one saga a
/// second). A system that keeps up has a slope near 0 whatever its latency; one that ends a
/// fraction f of the arrivals has a slope of (1 - f) times the rate.
pub fn backlog_grows(slope: f64, rate: f64) -> bool {
    slope > (0.02 * rate).max(1.0)
}

/// End-to-end latency of the sagas scheduled in one second of a run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Second {
    /// Whole seconds since the run's first scheduled order.
    pub second: u64,
    pub sagas: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Sagas' end-to-end latencies (microseconds) grouped by the second their order was scheduled
/// in (seconds since the run's start): whether a run's tail is spread evenly or comes from a few
/// seconds in which something else ran (a checkpoint, an autovacuum, a rebalance).
pub fn by_second(samples: &[(f64, u64)]) -> anyhow::Result<Vec<Second>> {
    let mut seconds: BTreeMap<u64, hdrhistogram::Histogram<u64>> = BTreeMap::new();
    for &(offset, micros) in samples {
        let second = offset.max(0.0).floor() as u64;
        let histogram = match seconds.entry(second) {
            std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::btree_map::Entry::Vacant(entry) => {
                entry.insert(hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)?)
            }
        };
        histogram.saturating_record(micros.max(1));
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    Ok(seconds
        .into_iter()
        .map(|(second, h)| Second {
            second,
            sagas: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        })
        .collect())
}

/// The seconds holding the most of a run's slowest sagas (those above its overall p99), worst
/// first: `(second, slow sagas in it, its max)`.
pub fn worst_seconds(samples: &[(f64, u64)], p99_micros: u64, keep: usize) -> Vec<(u64, usize, f64)> {
    let mut slow: BTreeMap<u64, (usize, u64)> = BTreeMap::new();
    for &(offset, micros) in samples.iter().filter(|(_, micros)| *micros > p99_micros) {
        let entry = slow.entry(offset.max(0.0).floor() as u64).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(micros);
    }
    let mut worst: Vec<(u64, usize, f64)> =
        slow.into_iter().map(|(second, (count, max))| (second, count, max as f64 / 1000.0)).collect();
    worst.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    worst.truncate(keep);
    worst
}

/// One reading of a run's per-second series: seconds since the run's start, the CPU seconds each
/// watched process has used so far, and the whole machine's time so far.
#[derive(Debug, Clone, Default)]
pub struct Tick {
    pub at: f64,
    pub cpu_seconds: BTreeMap<String, f64>,
    pub machine: Option<MachineTime>,
}

/// What the machine did from `from` to `to` seconds of a run, between the last reading at or
/// before `from` and the first at or after `to` (the edges of the series when the window runs
/// past them): over the whole window, cores busy, context switches a second and each process's
/// cores; and the extremes of its intervals between two readings (`peak`): the fewest context
/// switches a second, and each process's most cores. It puts the seconds that hold a run's
/// slowest sagas beside the run's averages: a process that took more than its share then, or a
/// machine that switched less for a moment (something ran without yielding, a collector's
/// pause). `None` without two readings around the window.
pub fn during(ticks: &[Tick], from: f64, to: f64) -> Option<serde_json::Value> {
    let first = ticks.iter().rposition(|t| t.at <= from).unwrap_or(0);
    let last = ticks.iter().position(|t| t.at >= to).unwrap_or(ticks.len().checked_sub(1)?);
    let window = ticks.get(first..=last)?;
    let cores = |a: &Tick, b: &Tick| -> BTreeMap<String, f64> {
        let wall = b.at - a.at;
        b.cpu_seconds
            .iter()
            .filter_map(|(name, now)| Some((name.clone(), (now - a.cpu_seconds.get(name)?) / wall)))
            .collect()
    };
    let (start, end) = (window.first()?, window.last()?);
    if end.at <= start.at {
        return None;
    }
    let mut most: BTreeMap<String, f64> = BTreeMap::new();
    let mut fewest_switches: Option<f64> = None;
    for pair in window.windows(2).filter(|pair| pair[1].at > pair[0].at) {
        for (name, c) in cores(&pair[0], &pair[1]) {
            let entry = most.entry(name).or_insert(c);
            *entry = entry.max(c);
        }
        if let (Some(a), Some(b)) = (&pair[0].machine, &pair[1].machine) {
            let rate = b.context_switches_per_s(a, pair[1].at - pair[0].at);
            fewest_switches = Some(fewest_switches.map_or(rate, |f| f.min(rate)));
        }
    }
    let mut out = serde_json::json!({
        "from_s": start.at,
        "to_s": end.at,
        "cores_by_process": cores(start, end),
        "peak": {"cores_by_process": most, "fewest_context_switches_per_s": fewest_switches},
    });
    if let (Some(now), Some(then)) = (&end.machine, &start.machine) {
        out["machine"] = now.since(then, end.at - start.at);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jvms_compiler_threads_are_told_by_their_names() {
        // /proc/PID/task/TID/comm of HotSpot's threads: 15 bytes of "C2 CompilerThread0".
        assert!(is_jit_thread("C2 CompilerThre"));
        assert!(is_jit_thread("C1 CompilerThre"));
        for other in ["GC Thread#0", "VM Thread", "data-plane-kafk", "java", "C2 Compiler"] {
            assert!(!is_jit_thread(other), "{other}");
        }
        // This test's own process is no JVM: no JIT figure rather than a zero.
        let me = Process::myself().unwrap();
        assert_eq!(jit_cpu_seconds(&me), None);
    }

    #[test]
    fn latencies_are_grouped_by_the_second_of_their_schedule_and_the_slow_ones_found() {
        let mut samples: Vec<(f64, u64)> = (0..300).map(|i| (i as f64 / 100.0, 100_000)).collect();
        // Second 1 holds the whole tail.
        samples.extend([(1.2, 900_000), (1.5, 800_000), (2.1, 400_000)]);
        let seconds = by_second(&samples).unwrap();
        assert_eq!(seconds.iter().map(|s| (s.second, s.sagas)).collect::<Vec<_>>(), [(0, 100), (1, 102), (2, 101)]);
        assert!((seconds[0].max_ms - 100.0).abs() < 0.1, "{seconds:?}");
        assert!((seconds[1].max_ms - 900.0).abs() < 1.0, "{seconds:?}");
        assert!((seconds[1].p50_ms - 100.0).abs() < 0.1);
        let worst = worst_seconds(&samples, 300_000, 5);
        assert_eq!(worst.len(), 2);
        assert_eq!((worst[0].0, worst[0].1), (1, 2));
        assert_eq!((worst[1].0, worst[1].1), (2, 1));
        assert!(worst_seconds(&samples, 1_000_000, 5).is_empty());
    }

    const TEXT: &str = r#"
# TYPE saga_outbox_dwell_seconds histogram
saga_outbox_dwell_seconds_bucket{le="0.001"} 10
saga_outbox_dwell_seconds_bucket{le="0.002"} 50
saga_outbox_dwell_seconds_bucket{le="0.005"} 90
saga_outbox_dwell_seconds_bucket{le="+Inf"} 100
saga_outbox_dwell_seconds_sum 0.3
saga_outbox_dwell_seconds_count 100
"#;

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let buckets = Buckets::parse(TEXT, "saga_outbox_dwell_seconds");
        assert_eq!(buckets.count(), 100.0);
        // Rank 50 is the top of the 0.002 bucket; rank 30 halfway through it.
        assert!((buckets.quantile(0.5).unwrap() - 0.002).abs() < 1e-12);
        assert!((buckets.quantile(0.3).unwrap() - 0.0015).abs() < 1e-12);
        // Beyond the last finite bucket: its bound, as histogram_quantile answers.
        assert_eq!(buckets.quantile(0.99), Some(0.005));
        let earlier = Buckets(vec![(0.001, 10.0), (0.002, 10.0), (0.005, 10.0), (f64::INFINITY, 10.0)]);
        let since = buckets.since(&earlier);
        assert_eq!(since.count(), 90.0);
        assert!((since.quantile(0.5).unwrap() - 0.002 - 0.003 * (5.0 / 40.0)).abs() < 1e-12);
        assert_eq!(Buckets::default().quantile(0.5), None);
    }

    /// A reading at `at` seconds: two processes' CPU seconds so far and the machine's.
    fn tick(at: f64, orchestrator: f64, kafka: f64, busy: f64, context_switches: u64) -> Tick {
        Tick {
            at,
            cpu_seconds: [("orchestrator".to_owned(), orchestrator), ("kafka".to_owned(), kafka)].into(),
            machine: Some(MachineTime { busy, idle: 0.0, steal: 0.0, context_switches }),
        }
    }

    #[test]
    fn what_ran_during_a_window_comes_from_the_readings_around_it() {
        // Readings a second apart, then two half a second apart: in the half second from 2.5 to 3
        // the broker took a whole core and the machine switched a tenth as often.
        let ticks = [
            tick(0.0, 0.0, 0.0, 0.0, 0),
            tick(1.0, 0.2, 0.3, 1.8, 40_000),
            tick(2.0, 0.4, 0.6, 3.6, 80_000),
            tick(2.5, 0.5, 0.75, 4.5, 100_000),
            tick(3.0, 0.5, 1.25, 5.45, 102_000),
        ];
        let window = during(&ticks, 2.2, 2.9).unwrap();
        assert_eq!((window["from_s"].as_f64(), window["to_s"].as_f64()), (Some(2.0), Some(3.0)));
        let round = |v: &serde_json::Value| (v.as_f64().unwrap() * 100.0).round() / 100.0;
        let cores = &window["cores_by_process"];
        assert_eq!((round(&cores["orchestrator"]), round(&cores["kafka"])), (0.1, 0.65));
        assert_eq!(round(&window["machine"]["busy_cores"]), 1.85);
        assert_eq!(window["machine"]["context_switches_per_s"].as_f64(), Some(22_000.0));
        // The extremes of the window's intervals: the broker's whole core, the orchestrator's most
        // in the first half second, and the fewest switches in the last.
        let peak = &window["peak"];
        assert_eq!(
            (round(&peak["cores_by_process"]["kafka"]), round(&peak["cores_by_process"]["orchestrator"])),
            (1.0, 0.2)
        );
        assert_eq!(peak["fewest_context_switches_per_s"].as_f64(), Some(4_000.0));
        // Over a longer window, from the reading at or before its start to the one at or after
        // its end.
        let wider = during(&ticks, 1.0, 2.1).unwrap();
        assert_eq!((wider["from_s"].as_f64(), wider["to_s"].as_f64()), (Some(1.0), Some(2.5)));
        assert_eq!(wider["peak"]["fewest_context_switches_per_s"].as_f64(), Some(40_000.0));
        // A window past the last reading uses the series' edges; one reading is not enough.
        assert_eq!(during(&ticks, 2.5, 9.0).unwrap()["to_s"].as_f64(), Some(3.0));
        assert!(during(&ticks[..1], 0.0, 1.0).is_none());
        assert!(during(&[], 0.0, 1.0).is_none());
    }

    /// A backlog sampled each second for `seconds`: `level` plus `growth` per second, plus the
    /// noise of sagas ending in bursts (a deterministic ± `noise`).
    fn series(seconds: u32, level: f64, growth: f64, noise: f64) -> Vec<(f64, i64)> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        (1..=seconds)
            .map(|t| {
                let t = f64::from(t);
                (t, (level + growth * t + rng.random_range(-noise..=noise)).round() as i64)
            })
            .collect()
    }

    #[test]
    fn a_backlog_grows_when_its_slope_does_not_when_its_noise_does() {
        // 120/s with a p99 around 0.5 s: the backlog wanders by ±40 around 40 sagas.
        let steady = series(40, 40.0, 0.0, 40.0);
        let slope = backlog_slope(&steady, 40.0);
        assert!(slope.abs() < 2.4, "{slope}");
        assert!(!backlog_grows(slope, 120.0));
        // One burst at the very end (which the middle-against-end rule read as growth) is not.
        let mut late_burst = steady.clone();
        late_burst.last_mut().unwrap().1 += 60;
        assert!(!backlog_grows(backlog_slope(&late_burst, 40.0), 120.0));
        // Ending 95 % of 120/s: 6 sagas a second more each second, through the same noise.
        let behind = series(40, 40.0, 6.0, 40.0);
        let slope = backlog_slope(&behind, 40.0);
        assert!((slope - 6.0).abs() < 2.0, "{slope}");
        assert!(backlog_grows(slope, 120.0));
        // Only the second half counts: a backlog that grew while the run warmed up, then held.
        let warmed: Vec<(f64, i64)> =
            (1..=40).map(|t| (f64::from(t), if t < 20 { i64::from(t) * 10 } else { 200 })).collect();
        assert!(!backlog_grows(backlog_slope(&warmed, 40.0), 120.0));
        // At 1/s, a saga in flight more or less is not growth.
        assert!(!backlog_grows(backlog_slope(&series(30, 0.0, 0.0, 1.0), 30.0), 1.0));
        assert_eq!(backlog_slope(&steady[..2], 40.0), 0.0);
    }
}
