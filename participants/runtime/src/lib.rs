//! The runtime every service on the saga bus shares: typed configuration, telemetry, the Postgres
//! pool and migrations, Kafka clients, the transactional outbox and its relay, the at-least-once
//! batch consumer, health endpoints, and the participant command loop.
//!
//! The orchestrator uses it for the outbox and Kafka plumbing; participants also use its
//! [`participant`] loop, so a participant service only writes its business logic.

/// Every service allocates through jemalloc: with glibc's malloc, allocation and its
/// consolidation took 6 % of the whole machine's CPU at 400 sagas/s (docs/performance.md), in
/// the many short-lived buffers of messages, rows and JSON.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts: its sampling heap profiler on from the start (an
/// allocation sampled every 512 KiB on average), so that `GET /debug/pprof/heap`
/// ([`telemetry::serve_profiles`]) shows what is live however long ago it was allocated. The
/// `MALLOC_CONF` environment variable overrides it (`prof_active:false` turns sampling off).
// Unsafe only in that the symbol name is chosen by hand: jemalloc reads this one at start-up.
#[allow(non_upper_case_globals, unsafe_code)]
#[export_name = "malloc_conf"]
pub static malloc_conf: &[u8] = b"prof:true,prof_active:true,lg_prof_sample:19\0";

pub mod config;
pub mod consumer;
pub mod db;
pub mod dead_letter;
pub mod failures;
pub mod faults;
pub mod health;
pub mod kafka;
pub mod openapi;
pub mod outbox;
pub mod participant;
pub mod progress;
pub mod retention;
pub mod shutdown;
pub mod supervisor;
pub mod telemetry;
pub mod trace;

pub use tokio_util::sync::CancellationToken;
