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

pub mod config;
pub mod consumer;
pub mod db;
pub mod dead_letter;
pub mod faults;
pub mod health;
pub mod kafka;
pub mod openapi;
pub mod outbox;
pub mod participant;
pub mod retention;
pub mod shutdown;
pub mod supervisor;
pub mod telemetry;

pub use tokio_util::sync::CancellationToken;
