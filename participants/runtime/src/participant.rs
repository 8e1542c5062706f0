//! The participant runtime: consumes a participant's commands, runs its business logic once per
//! `(saga, step, kind)` and replies through the outbox, all in one transaction per batch.
//!
//! - A redelivered command finds its stored outcome and replays the reply; nothing runs twice.
//! - A transient failure (`retryable`) is not stored, so the orchestrator's retry runs it again.
//! - A compensation that arrives before its action (or without one) succeeds as a no-op, and
//!   leaves a tombstone so that a late action is refused instead of acting after its undo.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use metrics::{counter, describe_counter};
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use saga_defs::contract::{
    codes, commands_topic, HEADER_MESSAGE_TYPE, HEADER_SCHEMA_VERSION, MESSAGE_TYPE_COMMAND, MESSAGE_TYPE_REPLY,
    SCHEMA_VERSION,
};
use saga_defs::{CommandEnvelope, ReplyEnvelope, ReplyOutcome, StepError, StepKind};
use sqlx::migrate::Migrator;
use sqlx::{Acquire, PgConnection, PgPool};

use clap::{CommandFactory, FromArgMatches, Parser};

use crate::config::{DatabaseConfig, KafkaConfig, OutboxConfig, TelemetryConfig};
use crate::consumer::{BatchHandler, Record};
use crate::dead_letter;
use crate::outbox::{self, OutboxMessage};

/// What a participant's business logic decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done; the output is passed to later steps and compensations.
    Done(serde_json::Value),
    /// A business refusal (no stock, declined card): final, stored, and the saga compensates.
    Refused(StepError),
    /// A transient failure (gateway timeout): nothing was done, nothing is stored, and the
    /// orchestrator may try again.
    Transient(StepError),
}

/// A participant's business logic. `handle` runs inside a savepoint of the batch transaction:
/// whatever it writes is kept only when it returns `Done`.
pub trait Participant: Send + Sync + 'static {
    /// The participant's name as saga definitions use it (`inventory`, `payment`, ...).
    const NAME: &'static str;

    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        command: &'a CommandEnvelope,
    ) -> impl Future<Output = sqlx::Result<Outcome>> + Send + 'a;
}

const COMMANDS: &str = "participant_commands_total";
const REJECTED: &str = "participant_commands_rejected_total";

fn describe_metrics() {
    describe_counter!(
        COMMANDS,
        "Commands handled, by action, kind and result (succeeded, refused, transient, replayed)"
    );
    describe_counter!(
        REJECTED,
        "Messages on the commands topic that could not be read as a command (and were dead-lettered), by reason"
    );
}

/// Applies batches of commands for one participant.
pub struct CommandHandler<P> {
    pub pool: PgPool,
    /// Publish on commit (see [`outbox::Handoff`]); `None`: the relay reads the replies back.
    pub handoff: Option<outbox::Handoff>,
    pub participant: P,
    /// The service's name (`payment-service`), recorded on its dead letters.
    pub service: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BadCommand {
    #[error("message type {0:?} is not {MESSAGE_TYPE_COMMAND:?}")]
    WrongType(String),
    #[error("schema version {0:?} is not supported (this build reads {SCHEMA_VERSION})")]
    WrongSchema(String),
    #[error("empty payload")]
    Empty,
    #[error("not a valid command: {0}")]
    Invalid(#[from] serde_json::Error),
    #[error("the command holds a value that cannot be stored: {0}")]
    Unstorable(saga_defs::storable::Unstorable),
}

impl BadCommand {
    fn label(&self) -> &'static str {
        match self {
            BadCommand::WrongType(_) => "message_type",
            BadCommand::WrongSchema(_) => "schema_version",
            BadCommand::Empty => "empty",
            BadCommand::Invalid(_) => "invalid_json",
            BadCommand::Unstorable(_) => "unstorable",
        }
    }
}

/// Reads a command from a record, checking its type and schema headers when present.
pub fn parse_command(record: &Record) -> Result<CommandEnvelope, BadCommand> {
    if let Some(kind) = record.header(HEADER_MESSAGE_TYPE) {
        if kind != MESSAGE_TYPE_COMMAND {
            return Err(BadCommand::WrongType(kind.to_owned()));
        }
    }
    if let Some(version) = record.header(HEADER_SCHEMA_VERSION) {
        if version != SCHEMA_VERSION.to_string() {
            return Err(BadCommand::WrongSchema(version.to_owned()));
        }
    }
    let payload = record.payload.as_deref().ok_or(BadCommand::Empty)?;
    let value: serde_json::Value = serde_json::from_slice(payload)?;
    saga_defs::storable::check(&value).map_err(BadCommand::Unstorable)?;
    let command: CommandEnvelope = serde_json::from_value(value)?;
    if command.schema_version != SCHEMA_VERSION {
        return Err(BadCommand::WrongSchema(command.schema_version.to_string()));
    }
    Ok(command)
}

impl<P: Participant> BatchHandler for CommandHandler<P> {
    async fn handle(&self, records: &[Record]) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        let mut messages = Vec::with_capacity(records.len());
        let mut rejected = Vec::new();
        let parsed: Vec<Result<CommandEnvelope, BadCommand>> = records.iter().map(parse_command).collect();
        // The batch's dedupe records in one statement, and its new ones in one more at the end.
        let keys: Vec<&CommandEnvelope> = parsed.iter().filter_map(|c| c.as_ref().ok()).collect();
        let mut processed = Processed::load(&mut tx, &keys).await?;
        for (record, command) in records.iter().zip(parsed) {
            let command = match command {
                Ok(command) => command,
                Err(error) => {
                    let reason = dead_letter::Reason::new(error.label(), &error);
                    messages.push(dead_letter::message(&self.service, record, &reason));
                    rejected.push((record.topic.as_str(), error.label()));
                    continue;
                }
            };
            let started = std::time::SystemTime::now();
            let reply = self.process(&mut tx, &command, &mut processed).await?;
            // The reply continues the command's trace, as a span of its own.
            let trace = crate::trace::Context::from_record(record, Some(command.saga_id.as_uuid()));
            let fallback = trace.parent.child_of_message(reply.message_id);
            let handled = crate::trace::span(Some(&trace.parent), SpanKind::Consumer, started, fallback, || {
                let name = format!("{} {}", command.kind.as_str().to_lowercase(), command.action);
                let attributes = vec![
                    KeyValue::new("saga.id", command.saga_id.to_string()),
                    KeyValue::new("saga.step", command.step.to_string()),
                    KeyValue::new("saga.attempt", i64::from(command.attempt)),
                ];
                (name.into(), attributes)
            });
            tracing::debug!(
                saga_id = %command.saga_id, trace_id = %trace.trace_id(), correlation_id = trace.correlation(),
                step = %command.step, kind = command.kind.as_str(), attempt = command.attempt, "command handled"
            );
            let mut message = OutboxMessage::new(command.reply_to.clone(), command.saga_id, MESSAGE_TYPE_REPLY, &reply);
            message.headers = trace.headers(handled);
            messages.push(message);
        }
        processed.store(&mut tx).await?;
        let handed = outbox::insert_then_hand_off(&mut tx, self.handoff.as_ref(), messages).await?.since(started);
        crate::crash_point!("participant.after_handle");
        tx.commit().await?;
        handed.send();
        for (topic, label) in rejected {
            counter!(REJECTED, "reason" => label).increment(1);
            dead_letter::count(topic, label);
        }
        Ok(())
    }

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn service(&self) -> &str {
        &self.service
    }
}

impl<P: Participant> CommandHandler<P> {
    #[tracing::instrument(skip_all, fields(saga_id = %command.saga_id, step = %command.step, kind = %command.kind, attempt = command.attempt))]
    async fn process(
        &self,
        conn: &mut PgConnection,
        command: &CommandEnvelope,
        processed: &mut Processed,
    ) -> sqlx::Result<ReplyEnvelope> {
        let name = P::NAME;
        let key = (command.saga_id.as_uuid(), command.step.to_string(), command.kind.as_str());
        if let Some(outcome) = processed.known.get(&key).cloned() {
            tracing::info!("duplicate command: replaying the stored reply");
            counter!(COMMANDS, "action" => command.action.clone(), "kind" => command.kind.as_str(), "result" => "replayed").increment(1);
            let mut reply = ReplyEnvelope::answering(command, name, outcome);
            reply.replayed = true;
            return Ok(reply);
        }

        let mut savepoint = conn.begin().await?;
        inject_faults(command)?;
        let outcome = self.participant.handle(&mut savepoint, command).await?;
        let (reply_outcome, keep, result) = match outcome {
            Outcome::Done(output) => (ReplyOutcome::Succeeded { output }, true, "succeeded"),
            Outcome::Refused(error) => (ReplyOutcome::Failed { error }, false, "refused"),
            Outcome::Transient(error) => {
                (ReplyOutcome::Failed { error: StepError { retryable: true, ..error } }, false, "transient")
            }
        };
        if keep {
            savepoint.commit().await?;
        } else {
            savepoint.rollback().await?;
        }
        counter!(COMMANDS, "action" => command.action.clone(), "kind" => command.kind.as_str(), "result" => result)
            .increment(1);
        tracing::info!(result, "handled command");

        if result != "transient" {
            processed.record(key, reply_outcome.clone(), false);
        }
        if command.kind == StepKind::Compensation {
            let tombstone = ReplyOutcome::Failed {
                error: StepError::business(
                    codes::ALREADY_COMPENSATED,
                    "this step was compensated before its action arrived",
                ),
            };
            processed.record((command.saga_id.as_uuid(), command.step.to_string(), "ACTION"), tombstone, true);
        }
        Ok(ReplyEnvelope::answering(command, name, reply_outcome))
    }
}

/// A batch's dedupe records: those stored before it (read in one statement) and those it adds
/// (written in one statement before the batch commits, in the batch's transaction).
struct Processed {
    known: std::collections::HashMap<(uuid::Uuid, String, &'static str), ReplyOutcome>,
    /// New records: key, outcome, and whether it is a tombstone (kept only if no record exists).
    new: Vec<((uuid::Uuid, String, &'static str), ReplyOutcome, bool)>,
}

impl Processed {
    async fn load(conn: &mut PgConnection, commands: &[&CommandEnvelope]) -> sqlx::Result<Self> {
        let mut known = std::collections::HashMap::new();
        if !commands.is_empty() {
            // By saga id, the primary key's first column: an index lookup per saga (a join on all
            // three columns with UNNEST was planned as a scan of the table). A participant keeps
            // few records per saga; those of other steps are ignored.
            let mut sagas: Vec<uuid::Uuid> = commands.iter().map(|c| c.saga_id.as_uuid()).collect();
            sagas.sort();
            sagas.dedup();
            let rows: Vec<(uuid::Uuid, String, String, sqlx::types::Json<ReplyOutcome>)> =
                sqlx::query_as("SELECT saga_id, step, kind, outcome FROM processed_commands WHERE saga_id = ANY($1)")
                    .bind(&sagas)
                    .fetch_all(&mut *conn)
                    .await?;
            let wanted: std::collections::HashSet<(uuid::Uuid, &str)> =
                commands.iter().map(|c| (c.saga_id.as_uuid(), c.step.as_str())).collect();
            for (saga_id, step, kind, sqlx::types::Json(outcome)) in rows {
                let kind = if kind == StepKind::Compensation.as_str() { "COMPENSATION" } else { "ACTION" };
                if wanted.contains(&(saga_id, step.as_str())) {
                    known.insert((saga_id, step, kind), outcome);
                }
            }
        }
        Ok(Self { known, new: Vec::new() })
    }

    /// Records an outcome; a tombstone only where no record exists.
    fn record(&mut self, key: (uuid::Uuid, String, &'static str), outcome: ReplyOutcome, tombstone: bool) {
        if tombstone && self.known.contains_key(&key) {
            return;
        }
        self.known.insert(key.clone(), outcome.clone());
        self.new.push((key, outcome, tombstone));
    }

    async fn store(&mut self, conn: &mut PgConnection) -> sqlx::Result<()> {
        for tombstones in [false, true] {
            let rows: Vec<_> = self.new.iter().filter(|(_, _, t)| *t == tombstones).collect();
            if rows.is_empty() {
                continue;
            }
            // A record written meanwhile by someone else fails the batch (which is then applied
            // again and replays it); a tombstone gives way to it.
            let conflict = if tombstones { " ON CONFLICT DO NOTHING" } else { "" };
            sqlx::query(&format!(
                "INSERT INTO processed_commands (saga_id, step, kind, outcome)
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[]){conflict}"
            ))
            .bind(rows.iter().map(|((id, _, _), _, _)| *id).collect::<Vec<_>>())
            .bind(rows.iter().map(|((_, step, _), _, _)| step.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|((_, _, kind), _, _)| *kind).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, outcome, _)| sqlx::types::Json(outcome)).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
        }
        self.new.clear();
        Ok(())
    }
}

/// Fault injection for commands whose input contains MARKER, as a bug in business logic would
/// do: `FAILPOINTS='participant.panic_on_input=return(MARKER)'` panics while handling it, and
/// `participant.fail_on_input=return(MARKER)` fails its transaction every time.
fn inject_faults(command: &CommandEnvelope) -> sqlx::Result<()> {
    let marked = |point: &str| {
        crate::faults::fail::eval(point, |arg| arg).flatten().is_some_and(|m| command.input.to_string().contains(&m))
    };
    if marked("participant.panic_on_input") {
        panic!("fault injection: the input of saga {} is marked to panic", command.saga_id);
    }
    if marked("participant.fail_on_input") {
        return Err(sqlx::Error::Protocol(format!(
            "fault injection: the input of saga {} is marked to fail",
            command.saga_id
        )));
    }
    Ok(())
}

/// Reads the saga input a participant needs; a command without it is refused as invalid.
pub fn input<T: serde::de::DeserializeOwned>(command: &CommandEnvelope) -> Result<T, Outcome> {
    T::deserialize(&command.input).map_err(|e| {
        Outcome::Refused(StepError::business(
            codes::INVALID_COMMAND,
            format!("saga input lacks what {} needs: {e}", command.action),
        ))
    })
}

/// The refusal for an action this participant does not know.
pub fn unknown_action(command: &CommandEnvelope) -> Outcome {
    Outcome::Refused(StepError::business(codes::UNKNOWN_ACTION, format!("no action {:?} here", command.action)))
}

/// A participant service's configuration. Each service supplies its own defaults for the
/// addresses and the database (see [`Defaults`]).
#[derive(Debug, Clone, Parser)]
#[command(version)]
pub struct ServiceConfig {
    /// Address of the HTTP server (API, /health, /ready).
    #[arg(long, env = "HTTP_ADDR")]
    pub http_addr: SocketAddr,
    /// Address of the Prometheus metrics endpoint.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Kafka consumer group of this service's replicas (default: `<participant>-service`).
    #[arg(long, env = "KAFKA_GROUP_ID")]
    pub kafka_group_id: Option<String>,
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub outbox: OutboxConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
    /// How long a handled command's dedupe record is kept (e.g. `14d`); `off` keeps them forever.
    /// A command redelivered after its record is gone would act again: keep this longer than the
    /// commands topic keeps messages (Kafka's `retention.ms`, 7 days by default) plus the longest
    /// a saga may run.
    #[arg(long, env = "DEDUPE_RETENTION", default_value = "14d", value_parser = crate::retention::parse_keep)]
    pub dedupe_retention: crate::retention::Keep,
    #[command(flatten)]
    pub retention: crate::retention::RetentionConfig,
    #[command(subcommand)]
    pub command: Option<ServiceCommand>,
}

/// What a participant binary does; serving is the default.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ServiceCommand {
    /// Run the service (the default).
    Serve,
    /// Create the database if it does not exist, apply every migration and exit, whatever
    /// `DATABASE_MIGRATE` says: a Kubernetes Job before a rollout, with the replicas started with
    /// `DATABASE_MIGRATE=false` and no right to change the schema.
    Migrate,
}

/// A service's defaults.
pub struct Defaults {
    pub name: &'static str,
    pub about: &'static str,
    pub http_addr: &'static str,
    pub metrics_addr: &'static str,
    /// Where the heap profile is served (`PROFILE_ADDR`): loopback, one port per service so that
    /// the demo's five processes do not collide.
    pub profile_addr: &'static str,
    pub database_url: &'static str,
}

impl ServiceConfig {
    /// Parses flags and environment with the service's defaults.
    pub fn parse_with(defaults: Defaults) -> Self {
        let command = crate::config::with_runbook_aliases(<Self as CommandFactory>::command())
            .name(defaults.name)
            .about(defaults.about)
            .mut_arg("http_addr", |a| a.default_value(defaults.http_addr).required(false))
            .mut_arg("metrics_addr", |a| a.default_value(defaults.metrics_addr).required(false))
            .mut_arg("profile_addr", |a| a.default_value(defaults.profile_addr))
            .mut_arg("database_url", |a| a.default_value(defaults.database_url).required(false));
        let matches = command.get_matches();
        <Self as FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// What a service's HTTP routes may use.
#[derive(Clone)]
pub struct ApiContext {
    pub pool: PgPool,
    pub kafka: KafkaConfig,
    /// Publish on commit, as the consumer does: what a route commits to the outbox is handed to
    /// the relay ([`outbox::insert_for_handoff`]) instead of waiting for its sweep.
    pub handoff: Option<outbox::Handoff>,
}

/// A participant's own HTTP routes and the paths and schemas that document them (see
/// [`crate::openapi::document`]).
pub struct Api {
    pub router: Router,
    pub paths: serde_json::Value,
    pub schemas: serde_json::Value,
}

impl Api {
    /// No routes of its own: `/health`, `/ready` and the document only.
    pub fn none() -> Self {
        Api { router: Router::new(), paths: serde_json::json!({}), schemas: serde_json::json!({}) }
    }
}

/// Runs a participant service until SIGTERM or Ctrl-C: migrations, the command consumer, the
/// outbox relay, and HTTP (`/health`, `/ready`, `/api/v1/openapi.json` and the routes `api`
/// builds from the pool).
pub async fn run<P: Participant>(
    participant: impl FnOnce(PgPool) -> P,
    config: ServiceConfig,
    migrations: Migrator,
    api: impl FnOnce(ApiContext) -> Api,
) -> anyhow::Result<()> {
    let name = P::NAME;
    let dedupe = crate::retention::dedupe_policy(config.dedupe_retention.0);
    let service = Service {
        name,
        description: format!("The {name} participant of the order saga."),
        migrations: vec![crate::db::outbox_migrations(), crate::db::participant_migrations(), migrations],
        consumes: vec![commands_topic(name)],
        also_creates: vec![saga_defs::contract::REPLIES_TOPIC.to_owned()],
        retention: vec![dedupe],
        describe: describe_metrics,
    };
    run_service(
        service,
        config,
        |pool, handoff| CommandHandler {
            handoff,
            pool: pool.clone(),
            participant: participant(pool),
            service: format!("{name}-service"),
        },
        api,
    )
    .await
}

/// What sets one service apart for [`run_service`].
pub struct Service {
    /// `payment`: the service is `payment-service`, its consumer group by default too.
    pub name: &'static str,
    /// The first sentence of its API document.
    pub description: String,
    /// Its database's migration sets (the outbox's among them: dead letters go through it).
    pub migrations: Vec<Migrator>,
    /// Topics it consumes (without the prefix); each gets its dead-letter topic.
    pub consumes: Vec<String>,
    /// Topics it writes to and creates when topics are created (without the prefix).
    pub also_creates: Vec<String>,
    /// What the retention task deletes.
    pub retention: Vec<crate::retention::Policy>,
    /// Describes its own metrics, once the recorder is installed.
    pub describe: fn(),
}

/// Runs a consuming service until SIGTERM or Ctrl-C: the `migrate` command, or migrations, the
/// consumer of `service.consumes` applying batches with the handler `handler` makes, the outbox
/// relay, retention, the heap profile, and HTTP (`/health`, `/ready`,
/// `/api/v1/openapi.json` and the routes `api` builds). Every background task is supervised.
pub async fn run_service<H: BatchHandler + 'static>(
    service: Service,
    config: ServiceConfig,
    handler: impl FnOnce(PgPool, Option<outbox::Handoff>) -> H,
    api: impl FnOnce(ApiContext) -> Api,
) -> anyhow::Result<()> {
    let name = service.name;
    crate::telemetry::init_logs(&config.telemetry);
    crate::config::log_runbook_aliases();
    crate::faults::setup()?;
    if let Some(ServiceCommand::Migrate) = config.command {
        crate::db::migrate(&config.database, service.migrations).await?;
        tracing::info!(service = name, "migrations applied");
        return Ok(());
    }
    crate::telemetry::serve_metrics(config.metrics_addr)?;
    let profiles = crate::telemetry::bind_profiles(config.telemetry.profile_addr.0).await?;
    let export = crate::trace::Export::from_env(&format!("{name}-service"))?;
    (service.describe)();
    let pool = crate::db::connect(&config.database, service.migrations).await?;
    crate::kafka::check_connection(&config.kafka).await?;
    let subscription: Vec<String> = service.consumes.iter().map(|t| config.kafka.topic(t)).collect();
    let mut topics: Vec<String> = subscription.iter().flat_map(|t| [t.clone(), dead_letter::topic_of(t)]).collect();
    topics.extend(service.also_creates.iter().map(|t| config.kafka.topic(t)));
    crate::kafka::ensure_topics(&config.kafka, &topics).await?;
    let producer = crate::kafka::producer(&config.kafka, &format!("{name}-service"))?;
    let group = config.kafka_group_id.clone().unwrap_or_else(|| format!("{name}-service"));
    let consumer = crate::kafka::consumer(&config.kafka, &group, &subscription)?;
    let shutdown = crate::shutdown::on_signal();
    let mut supervisor = crate::supervisor::Supervisor::new(shutdown.clone());
    if let Some(listener) = profiles {
        supervisor.spawn("heap-profile", crate::telemetry::serve_profiles(listener, shutdown.clone()));
    }
    let (handoff, handoffs) = if config.outbox.outbox_publish_on_commit {
        let (handoff, handoffs) = outbox::Handoff::channel();
        (Some(handoff), Some(handoffs))
    } else {
        (None, None)
    };
    supervisor.spawn(
        "outbox-relay",
        outbox::run_relay(pool.clone(), producer.clone(), config.outbox.clone(), handoffs, shutdown.clone()),
    );
    supervisor
        .spawn("outbox-gauges", outbox::run_backlog_gauges(pool.clone(), Duration::from_secs(5), shutdown.clone()));
    supervisor.spawn(
        "retention",
        crate::retention::run(
            pool.clone(),
            service.retention,
            config.retention.clone(),
            crate::retention::SharedStatus::default(),
            shutdown.clone(),
        ),
    );
    let handler = handler(pool.clone(), handoff.clone());
    let settings = config.kafka.consumer_settings();
    let consumer_shutdown = shutdown.clone();
    let kafka = config.kafka.clone();
    supervisor.spawn("consumer", async move {
        let remake = || crate::kafka::consumer(&kafka, &group, &subscription);
        crate::consumer::run(consumer, remake, settings, &handler, consumer_shutdown).await;
    });

    let readiness =
        crate::health::Readiness { service: name, pool: pool.clone(), producer, tasks: supervisor.health() };
    let api = api(ApiContext { pool: pool.clone(), kafka: config.kafka.clone(), handoff });
    let title = format!("{name}-service");
    let description = format!("{} Errors are application/problem+json (RFC 9457).", service.description);
    let document = std::sync::Arc::new(crate::openapi::document(&title, &description, api.paths, api.schemas));
    let served = axum::routing::get(move || async move { axum::Json(document.as_ref().clone()) });
    let router =
        crate::health::finish(api.router.route("/api/v1/openapi.json", served).merge(crate::health::router(readiness)));
    let served = crate::supervisor::serve_until_stopped(supervisor, config.http_addr, router, pool).await;
    export.shutdown().await;
    served
}
