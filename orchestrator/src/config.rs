//! The orchestrator's configuration: flags with environment variables and defaults.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use saga_runtime::config::{parse_millis, parse_secret, DatabaseConfig, KafkaConfig, OutboxConfig, TelemetryConfig};
use saga_runtime::retention::RetentionConfig;
use secrecy::SecretString;

#[derive(Debug, Parser)]
#[command(name = "saga-orchestrator", version, about = "Saga orchestrator with durable state in Postgres")]
pub(crate) struct Config {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    /// Address of the HTTP API.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080", global = true)]
    pub(crate) http_addr: SocketAddr,
    /// Address of the Prometheus metrics endpoint.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9090", global = true)]
    pub(crate) metrics_addr: SocketAddr,
    /// Kafka consumer group of the orchestrator replicas.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "saga-orchestrator-group", global = true)]
    pub(crate) kafka_group_id: String,
    /// How long a process's registration lives without renewal before another process adopts
    /// the commands it held in memory (milliseconds; ADR 28). Below the steps' timeouts, so that
    /// a crashed process's commands are sent again before their deadline.
    #[arg(long, env = "HANDOFF_LEASE_MS", default_value = "3000", value_parser = parse_lease, global = true)]
    pub(crate) handoff_lease: Duration,
    /// How long past its deadline a step may wait to be timed out while replies that could answer
    /// it may still wait unconsumed in Kafka (milliseconds; ADR 29): a partition of the replies
    /// topic that nobody has applied up to the deadline (a rebalance after a crash takes the
    /// consumer's session timeout, 45 s by default). 0: a deadline fires at its time.
    #[arg(long, env = "REPLY_DEADLINE_MAX_WAIT_MS", default_value = "120000", value_parser = parse_millis, global = true)]
    pub(crate) reply_deadline_max_wait: Duration,
    /// How often the timer loop looks for sagas whose deadline or backoff has passed (milliseconds).
    #[arg(long, env = "TIMER_INTERVAL_MS", default_value = "100", value_parser = parse_millis, global = true)]
    pub(crate) timer_interval: Duration,
    /// Most due sagas the timer loop handles in one transaction.
    #[arg(long, env = "TIMER_BATCH_SIZE", default_value_t = 200, global = true)]
    pub(crate) timer_batch_size: i64,
    /// How often ended sagas are counted into the stats rollup behind `GET /api/v1/sagas/stats`
    /// (milliseconds; ADR 20). Until counted they are counted live, so this is cost, not accuracy.
    #[arg(long, env = "STATS_ROLLUP_INTERVAL_MS", default_value = "1000", value_parser = parse_millis, global = true)]
    pub(crate) stats_rollup_interval: Duration,
    /// Most ended sagas counted into the stats rollup in one transaction.
    #[arg(long, env = "STATS_ROLLUP_BATCH_SIZE", default_value_t = 5000,
          value_parser = clap::value_parser!(i64).range(1..=1_000_000), global = true)]
    pub(crate) stats_rollup_batch_size: i64,
    /// The bound of sagas in flight (RUNNING or COMPENSATING) per saga type: a default, then
    /// overrides, e.g. `500,order-fulfilment=2000`. At the bound, start requests wait in Kafka and
    /// `POST /api/v1/sagas` answers 429.
    #[arg(long, env = "SAGA_MAX_IN_FLIGHT", default_value = "500", value_parser = crate::admission::parse_limits, global = true)]
    pub(crate) max_in_flight: crate::admission::Limits,
    /// Input fields shown as "[redacted]" in API output, comma separated.
    #[arg(
        long,
        env = "REDACT_FIELDS",
        default_value = "payment_token,shipping_address,card_number",
        value_delimiter = ',',
        global = true
    )]
    pub(crate) redact_fields: Vec<String>,
    /// API bearer tokens, `name:scope:secret` separated by commas; scope `read` (queries) or
    /// `admin` (actions and queries). The name is the actor in the audit log.
    #[arg(
        long,
        env = "API_TOKENS",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true,
        value_parser = parse_secret,
        global = true
    )]
    pub(crate) api_tokens: SecretString,
    /// Serve the API without authentication (local development only).
    #[arg(long, env = "AUTH_DISABLED", default_value_t = false, action = clap::ArgAction::Set, global = true)]
    pub(crate) auth_disabled: bool,
    /// A directory of saga definition documents (*.json) to load besides the built-in ones.
    #[arg(long, env = "SAGA_DEFINITIONS_DIR", global = true)]
    pub(crate) definitions_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub(crate) database: DatabaseConfig,
    #[command(flatten)]
    pub(crate) kafka: KafkaConfig,
    #[command(flatten)]
    pub(crate) outbox: OutboxConfig,
    #[command(flatten)]
    pub(crate) telemetry: TelemetryConfig,
    #[command(flatten)]
    pub(crate) keep: crate::retention::Keep,
    #[command(flatten)]
    pub(crate) retention: RetentionConfig,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the orchestrator (the default).
    Serve,
    /// Create the database if it does not exist, apply every migration and exit, whatever
    /// `DATABASE_MIGRATE` says (a Kubernetes Job before a rollout).
    Migrate,
    /// Create the Kafka topics of every loaded saga definition and exit.
    CreateTopics,
    /// Print the loaded saga definitions as JSON and exit.
    Definitions,
}

/// A lease of 300 ms to 10 minutes: renewed every third of it, so shorter would renew too often.
fn parse_lease(text: &str) -> Result<Duration, String> {
    let lease = parse_millis(text)?;
    if !(Duration::from_millis(300)..=Duration::from_secs(600)).contains(&lease) {
        return Err(format!("{text} ms is not between 300 ms and 10 minutes"));
    }
    Ok(lease)
}
