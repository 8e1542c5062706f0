//! Configuration shared by every service. Each option is a flag with an environment variable and
//! a default; `--help` on any binary documents them all.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use secrecy::{ExposeSecret, SecretString};

/// Postgres settings.
#[derive(Debug, Clone, Args)]
pub struct DatabaseConfig {
    /// Postgres connection URL of this service's own database. TLS: add `sslmode=require`, or
    /// `sslmode=verify-full&sslrootcert=/path/ca.pem` (client certificates: `sslcert`, `sslkey`).
    /// Its password is never logged or shown.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_parser = parse_secret)]
    pub database_url: SecretString,
    /// Largest number of pooled connections (runbook 004's `DB_MAX_OPEN_CONNS` is read as this).
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub database_max_connections: u32,
    /// Connections the pool keeps open while idle, at most `DATABASE_MAX_CONNECTIONS` (runbook
    /// 004's `DB_MAX_IDLE_CONNS` is read as this).
    #[arg(long, env = "DATABASE_MIN_CONNECTIONS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub database_min_connections: u32,
    /// Create the database if it does not exist and apply migrations at start-up.
    #[arg(long, env = "DATABASE_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub database_migrate: bool,
}

/// Kafka settings. Anything librdkafka accepts can be passed through the `*_PROPERTIES` options.
#[derive(Debug, Clone, Args)]
pub struct KafkaConfig {
    /// Bootstrap servers (librdkafka `bootstrap.servers`).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Prefix put before every topic name, to run several isolated systems on one cluster.
    #[arg(long, env = "KAFKA_TOPIC_PREFIX", default_value = "")]
    pub kafka_topic_prefix: String,
    /// Extra librdkafka properties for every client, as `key=value` pairs separated by commas,
    /// e.g. `security.protocol=SASL_SSL,sasl.mechanism=SCRAM-SHA-512,sasl.username=saga,ssl.ca.location=/etc/kafka/ca.pem`.
    /// Values of keys naming a password, secret or key are never logged or shown.
    #[arg(long, env = "KAFKA_PROPERTIES", default_value = "", hide_env_values = true, value_parser = parse_properties)]
    pub kafka_properties: Properties,
    /// Extra librdkafka properties for consumers only (e.g. `session.timeout.ms=10000`).
    #[arg(long, env = "KAFKA_CONSUMER_PROPERTIES", default_value = "", hide_env_values = true, value_parser = parse_properties)]
    pub kafka_consumer_properties: Properties,
    /// Extra librdkafka properties for producers only (e.g. `linger.ms=10`).
    #[arg(long, env = "KAFKA_PRODUCER_PROPERTIES", default_value = "", hide_env_values = true, value_parser = parse_properties)]
    pub kafka_producer_properties: Properties,
    /// SASL password (librdkafka `sasl.password`), kept apart from KAFKA_PROPERTIES so that it can
    /// come from a secret store on its own. Never logged or shown.
    #[arg(long, env = "KAFKA_SASL_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub kafka_sasl_password: Option<SecretString>,
    /// How long start-up waits for a broker to answer (milliseconds). Settings a broker refuses
    /// (credentials, certificates, security protocol) end the start-up at once, with the reason.
    #[arg(long, env = "KAFKA_CONNECT_TIMEOUT_MS", default_value = "30000", value_parser = parse_millis)]
    pub kafka_connect_timeout: Duration,
    /// Create the topics this service uses when they are missing (turn off where topics are managed
    /// elsewhere). Either way its consumer waits up to 30 s for the broker to list the topics it
    /// consumes, then the service stops, naming those missing.
    #[arg(long, env = "KAFKA_CREATE_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub kafka_create_topics: bool,
    /// Partitions of topics this service creates.
    #[arg(long, env = "KAFKA_TOPIC_PARTITIONS", default_value_t = 3)]
    pub kafka_topic_partitions: i32,
    /// Replication factor of topics this service creates.
    #[arg(long, env = "KAFKA_TOPIC_REPLICATION", default_value_t = 1)]
    pub kafka_topic_replication: i32,
    /// How long the dead-letter topics this service creates keep a message (`retention.ms`), e.g.
    /// `14d`; `off` leaves the broker's default. Set when the topic is created.
    #[arg(long, env = "KAFKA_DEAD_LETTER_RETENTION", default_value = "14d", value_parser = crate::retention::parse_keep)]
    pub kafka_dead_letter_retention: crate::retention::Keep,
    /// Most messages consumed and applied in one database transaction.
    #[arg(long, env = "KAFKA_BATCH_SIZE", default_value_t = 200, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub kafka_batch_size: usize,
    /// How long a consumer waits for a batch to fill once its first message arrived, e.g.
    /// `100ms` (at most `10s`); `0` applies whatever is ready at once. Larger batches cost
    /// fewer transactions per message and add up to this much latency.
    #[arg(long, env = "KAFKA_BATCH_TIMEOUT", default_value = "0", value_parser = parse_batch_timeout)]
    pub kafka_batch_timeout: Duration,
    /// Times one consumed message may fail to apply, while the database answers, before it is
    /// dead-lettered to `<topic>.dlq` (failures while the database is away do not count).
    #[arg(long, env = "CONSUMER_MAX_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub consumer_max_failures: u32,
    /// How long (milliseconds) a consumer may be out of its group while a broker answers, or
    /// receive nothing while messages wait on its partitions, before it is replaced by a new one
    /// that joins the group afresh (`saga_consumer_rejoins_total`); 0 never replaces it. Longer
    /// than a rebalance takes: the session timeout plus the members' time to rejoin.
    #[arg(long, env = "CONSUMER_STALL_TIMEOUT_MS", default_value = "60000", value_parser = parse_millis)]
    pub consumer_stall_timeout: Duration,
}

impl KafkaConfig {
    /// The consumer's batching and dead-lettering settings.
    pub fn consumer_settings(&self) -> crate::consumer::Settings {
        crate::consumer::Settings {
            batch_size: self.kafka_batch_size,
            batch_wait: self.kafka_batch_timeout,
            max_failures: self.consumer_max_failures,
            stall_timeout: self.consumer_stall_timeout,
            probe_budget: self.probe_budget(),
        }
    }

    /// How long a starvation probe may wait for the broker's answers. The probe's requests share
    /// the consumer's connection, where the broker answers in order: behind a fetch that waits
    /// up to `fetch.wait.max.ms` for messages (librdkafka's default 500 ms), which an idle
    /// consumer always has in flight. Two seconds more than that wait.
    pub fn probe_budget(&self) -> Duration {
        let fetch_wait = self
            .kafka_consumer_properties
            .get("fetch.wait.max.ms")
            .or_else(|| self.kafka_properties.get("fetch.wait.max.ms"))
            .and_then(|ms| ms.trim().parse::<u64>().ok())
            .unwrap_or(500);
        Duration::from_millis(fetch_wait) + Duration::from_secs(2)
    }

    /// The full name of a topic, with the configured prefix.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.kafka_topic_prefix, name)
    }
}

/// Outbox relay settings.
#[derive(Debug, Clone, Args)]
pub struct OutboxConfig {
    /// Most outbox rows published in one batch.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = 500)]
    pub outbox_batch_size: i64,
    /// How often the relay looks at the outbox when no notification arrives (milliseconds).
    #[arg(long, env = "OUTBOX_POLL_INTERVAL_MS", default_value = "1000", value_parser = parse_millis)]
    pub outbox_poll_interval: Duration,
    /// Publish on commit: the consumers hand what they just committed to the relay, which
    /// publishes it at once instead of reading it back from the table.
    #[arg(long, env = "OUTBOX_PUBLISH_ON_COMMIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub outbox_publish_on_commit: bool,
    /// How old a handed-off row must be before the relay's sweep publishes it (a crash or a failed
    /// publish left it), in milliseconds.
    #[arg(long, env = "OUTBOX_HANDOFF_GRACE_MS", default_value = "2000", value_parser = parse_millis)]
    pub outbox_handoff_grace: Duration,
    /// How long the relay gathers the rows the broker acknowledged before deleting them in one
    /// statement and one commit (milliseconds; at most half the hand-off grace, so that the sweep
    /// never publishes a row that is only waiting for its delete).
    #[arg(long, env = "OUTBOX_DELETE_LINGER_MS", default_value = "200", value_parser = parse_millis)]
    pub outbox_delete_linger: Duration,
}

impl OutboxConfig {
    /// What the settings cannot be together: a delete that lingers more than half the grace period
    /// would let the sweep publish again rows the broker already acknowledged.
    pub fn check(&self) -> Result<(), String> {
        if self.outbox_delete_linger * 2 > self.outbox_handoff_grace {
            return Err(format!(
                "OUTBOX_DELETE_LINGER_MS ({} ms) must be at most half of OUTBOX_HANDOFF_GRACE_MS ({} ms)",
                self.outbox_delete_linger.as_millis(),
                self.outbox_handoff_grace.as_millis()
            ));
        }
        Ok(())
    }
}

/// Logging and metrics settings.
#[derive(Debug, Clone, Args)]
pub struct TelemetryConfig {
    /// Log format: `json` (for log shippers) or `text` (for people).
    #[arg(long, env = "LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,
    /// Log filter in `tracing` syntax (also read from RUST_LOG).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Where the heap profile is served (`GET /debug/pprof/heap`, pprof format, from jemalloc's
    /// sampling profiler); `off` serves none. Loopback by default: reach it from inside the pod
    /// (`kubectl exec ... -- curl localhost:6060/debug/pprof/heap`) or by port-forward.
    #[arg(long, env = "PROFILE_ADDR", default_value = "127.0.0.1:6060", value_parser = parse_optional_addr)]
    pub profile_addr: OptionalAddr,
}

/// A listening address, or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

fn parse_optional_addr(text: &str) -> Result<OptionalAddr, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(OptionalAddr(None));
    }
    text.parse()
        .map(|addr| OptionalAddr(Some(addr)))
        .map_err(|e| format!("{text:?} is neither an address such as 127.0.0.1:6060 nor off: {e}"))
}

/// A parsed list of librdkafka properties. The values of sensitive keys (see [`is_sensitive`])
/// are held as secrets: `Debug` shows them as `[REDACTED]`.
#[derive(Clone, Default)]
pub struct Properties(BTreeMap<String, SecretString>);

impl Properties {
    /// Every property, in key order, with its value exposed (to hand to librdkafka).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(key, value)| (key.as_str(), value.expose_secret()))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.expose_secret())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(key, value)| (key, if is_sensitive(key) { "[REDACTED]" } else { value })))
            .finish()
    }
}

/// Whether a librdkafka property holds a secret: `sasl.password`, `ssl.key.password`,
/// `ssl.keystore.password`, `ssl.key.pem`, `sasl.oauthbearer.client.secret`, ...
pub fn is_sensitive(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "ssl.key.pem", "sasl.oauthbearer.config", "sasl.jaas"].iter().any(|word| key.contains(word))
}

/// Parses `key=value,key=value`. Values may not contain commas; set such properties one per
/// option instead. An error names the key, never a value.
pub fn parse_properties(text: &str) -> Result<Properties, String> {
    let mut properties = BTreeMap::new();
    for (index, pair) in text.split(',').map(str::trim).filter(|p| !p.is_empty()).enumerate() {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("entry {} is not key=value (e.g. session.timeout.ms=10000)", index + 1))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("entry {} has an empty key", index + 1));
        }
        properties.insert(key.to_owned(), SecretString::from(value.trim().to_owned()));
    }
    Ok(Properties(properties))
}

/// A secret from the command line or the environment.
pub fn parse_secret(text: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(text.to_owned()))
}

/// Parses a whole number of milliseconds.
/// `0`, or a duration such as `100ms` or `1s`, up to 10 s.
fn parse_batch_timeout(text: &str) -> Result<Duration, String> {
    let duration = if text.trim() == "0" {
        Duration::ZERO
    } else {
        humantime::parse_duration(text.trim()).map_err(|e| format!("{text:?} is not a duration such as 100ms: {e}"))?
    };
    if duration > Duration::from_secs(10) {
        return Err(format!("{text:?} is longer than 10s"));
    }
    Ok(duration)
}

/// Runbook 004 (written for a Go service) sets these variables; each is read as ours when ours
/// is not set: `(runbook's name, ours, the argument it sets)`.
pub const RUNBOOK_ALIASES: [(&str, &str, &str); 2] = [
    ("DB_MAX_OPEN_CONNS", "DATABASE_MAX_CONNECTIONS", "database_max_connections"),
    ("DB_MAX_IDLE_CONNS", "DATABASE_MIN_CONNECTIONS", "database_min_connections"),
];

/// Applies [`RUNBOOK_ALIASES`] to a command line parser: an alias's value becomes the default of
/// the argument it names, so that our own variable or flag still wins, and is checked like it.
pub fn with_runbook_aliases(mut command: clap::Command) -> clap::Command {
    for (alias, _, argument) in RUNBOOK_ALIASES {
        if let Ok(value) = std::env::var(alias) {
            let value: &'static str = Box::leak(value.into_boxed_str());
            command = command.mut_arg(argument, |a| a.default_value(value));
        }
    }
    command
}

/// Logs which of [`RUNBOOK_ALIASES`] were read (after the logs are set up).
pub fn log_runbook_aliases() {
    for (alias, ours, _) in RUNBOOK_ALIASES {
        if let Ok(value) = std::env::var(alias) {
            if std::env::var_os(ours).is_some() {
                tracing::warn!(alias, ours, "{alias} is ignored: {ours} is set too");
            } else {
                tracing::info!(alias, ours, value, "{alias} read as {ours}");
            }
        }
    }
}

pub fn parse_millis(text: &str) -> Result<Duration, String> {
    text.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| format!("{text:?} is not a whole number of milliseconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_timeout_is_zero_or_a_duration_up_to_ten_seconds() {
        assert_eq!(parse_batch_timeout("0"), Ok(Duration::ZERO));
        assert_eq!(parse_batch_timeout("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_batch_timeout(" 2s "), Ok(Duration::from_secs(2)));
        assert!(parse_batch_timeout("11s").unwrap_err().contains("longer than 10s"));
        assert!(parse_batch_timeout("100").is_err(), "a bare number has no unit");
        assert!(parse_batch_timeout("soon").is_err());
    }

    #[test]
    fn the_outbox_delete_lingers_at_most_half_the_hand_off_grace() {
        #[derive(Debug, clap::Parser)]
        struct Probe {
            #[command(flatten)]
            outbox: OutboxConfig,
        }
        use clap::Parser;
        let parse = |args: &[&str]| Probe::try_parse_from(args).unwrap().outbox;
        assert_eq!(parse(&["probe"]).check(), Ok(()), "the defaults");
        assert_eq!(parse(&["probe", "--outbox-delete-linger", "1000"]).check(), Ok(()));
        let error = parse(&["probe", "--outbox-delete-linger", "1001"]).check().unwrap_err();
        assert!(error.contains("OUTBOX_DELETE_LINGER_MS (1001 ms)"), "{error}");
        let short = parse(&["probe", "--outbox-handoff-grace", "300", "--outbox-delete-linger", "200"]);
        assert!(short.check().is_err(), "a shorter grace period than the default's");
    }

    /// The runbook's names set our defaults; our own variable still wins (each test runs in a
    /// process of its own under nextest, so the environment is this test's).
    #[test]
    fn the_runbooks_variables_are_read_as_ours_unless_ours_are_set() {
        #[derive(Debug, clap::Parser)]
        struct Probe {
            #[command(flatten)]
            database: DatabaseConfig,
        }
        use clap::{CommandFactory, FromArgMatches};
        let parse = |args: &[&str]| {
            let matches = with_runbook_aliases(Probe::command()).try_get_matches_from(args).unwrap();
            Probe::from_arg_matches(&matches).unwrap().database
        };
        std::env::set_var("DB_MAX_OPEN_CONNS", "25");
        std::env::set_var("DB_MAX_IDLE_CONNS", "5");
        let db = parse(&["probe", "--database-url", "postgres://x@h/db"]);
        assert_eq!((db.database_max_connections, db.database_min_connections), (25, 5));
        std::env::set_var("DATABASE_MAX_CONNECTIONS", "7");
        let db = parse(&["probe", "--database-url", "postgres://x@h/db"]);
        assert_eq!(db.database_max_connections, 7, "ours wins over the runbook's");
        let db = parse(&["probe", "--database-url", "postgres://x@h/db", "--database-max-connections", "9"]);
        assert_eq!(db.database_max_connections, 9, "a flag wins over both");
        std::env::set_var("DB_MAX_IDLE_CONNS", "many");
        let refused = with_runbook_aliases(Probe::command()).try_get_matches_from([
            "probe",
            "--database-url",
            "postgres://x@h/db",
        ]);
        assert!(refused.is_err(), "the runbook's value is checked like ours");
    }

    #[test]
    fn properties_parse_from_comma_separated_pairs() {
        let p = parse_properties("session.timeout.ms=2000, heartbeat.interval.ms = 500,").unwrap();
        assert_eq!(p.get("session.timeout.ms").unwrap(), "2000");
        assert_eq!(p.get("heartbeat.interval.ms").unwrap(), "500");
        assert!(parse_properties("").unwrap().is_empty());
        assert!(parse_properties("no-equals-sign").unwrap_err().contains("key=value"));
        assert!(parse_properties("=x").unwrap_err().contains("empty key"));
    }

    #[test]
    fn secret_properties_never_show_in_debug_output_or_errors() {
        let p = parse_properties(
            "security.protocol=SASL_SSL,sasl.username=saga,sasl.password=hunter2-pw,ssl.key.password=k3y-pw,\
             sasl.oauthbearer.client.secret=oauth-s3cret",
        )
        .unwrap();
        let shown = format!("{p:?}");
        for secret in ["hunter2-pw", "k3y-pw", "oauth-s3cret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("SASL_SSL") && shown.contains("saga"), "non-secret values stay visible: {shown}");
        assert_eq!(p.get("sasl.password"), Some("hunter2-pw"), "librdkafka still gets the value");
        let error = parse_properties("sasl.username=saga,hunter2-pw").unwrap_err();
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn milliseconds_must_be_whole_numbers() {
        assert_eq!(parse_millis("250").unwrap(), Duration::from_millis(250));
        assert!(parse_millis("1.5").is_err());
        assert!(parse_millis("-1").is_err());
    }
}
