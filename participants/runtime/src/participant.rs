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
use sqlx::{Executor, PgConnection, PgPool};

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

    /// What [`Participant::prepare`] hands to the batch's commands; `()` for a participant that
    /// calls nothing outside its database.
    type Prepared: Default + Send;

    /// Runs once per batch, before its commands are handled one by one, with the commands that
    /// will be handled: each new command of the batch once, in order (not those answered
    /// before, whose replies are replayed). What a command needs from another system (a card
    /// gateway's answer) is asked for here for the whole batch, in one call or in calls made at
    /// once, instead of one call after another while the batch's transaction waits: at half
    /// saturation the payment service's calls one by one were the slowest hop of the saga
    /// (docs/performance.md, 2026-12-06, sixteenth session).
    ///
    /// `handle` must still do itself what it does not find prepared (a command handled again in
    /// the same batch after a transient failure). A batch that fails is applied again and
    /// prepared again, so a call made here may be repeated, as one made from `handle` may be.
    fn prepare<'a>(
        &'a self,
        commands: &'a [&'a CommandEnvelope],
    ) -> impl Future<Output = sqlx::Result<Self::Prepared>> + Send + 'a {
        let _ = commands;
        async { Ok(Self::Prepared::default()) }
    }

    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        command: &'a CommandEnvelope,
        prepared: &'a mut Self::Prepared,
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
        // The batch opens with the first command's savepoint, in the same round trip.
        let mut tx = self.pool.begin_with(Savepoint::BEGIN).await?;
        let mut savepoint = Savepoint::Clean;
        let mut messages = Vec::with_capacity(records.len());
        let mut rejected = Vec::new();
        let parsed: Vec<Result<CommandEnvelope, BadCommand>> = records.iter().map(parse_command).collect();
        // The batch's dedupe records in one statement, and its new ones in one more at the end.
        let keys: Vec<&CommandEnvelope> = parsed.iter().filter_map(|c| c.as_ref().ok()).collect();
        let mut processed = Processed::load(&mut tx, &keys).await?;
        let mut prepared = self.participant.prepare(&processed.to_handle(&keys)).await?;
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
            let reply = self.process(&mut tx, &mut savepoint, &command, &mut processed, &mut prepared).await?;
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
        let records = processed.store()?;
        let handed =
            outbox::insert_then_hand_off_with(&mut tx, self.handoff.as_ref(), messages, records).await?.since(started);
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
        savepoint: &mut Savepoint,
        command: &CommandEnvelope,
        processed: &mut Processed,
        prepared: &mut P::Prepared,
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

        savepoint.mark(conn).await?;
        inject_faults(command)?;
        let outcome = self.participant.handle(conn, command, prepared).await?;
        let (reply_outcome, keep, result) = match outcome {
            Outcome::Done(output) => (ReplyOutcome::Succeeded { output }, true, "succeeded"),
            Outcome::Refused(error) => (ReplyOutcome::Failed { error }, false, "refused"),
            Outcome::Transient(error) => {
                (ReplyOutcome::Failed { error: StepError { retryable: true, ..error } }, false, "transient")
            }
        };
        if keep {
            *savepoint = Savepoint::Passed;
        } else {
            savepoint.undo(conn).await?;
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

/// Where the batch's transaction can be rolled back to: the state before the command being
/// handled, so that a refusal or a transient failure undoes what its handler wrote and keeps the
/// batch's other commands. One savepoint, moved forward in one round trip only when a command
/// that kept its writes is followed by another that runs (the commit releases the last), instead
/// of a savepoint opened and released around every command: two round trips each.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Savepoint {
    /// Nothing was written since the savepoint: the next command can use it as it is.
    Clean,
    /// A command's writes are kept after it: the next one needs a savepoint of its own.
    Passed,
}

impl Savepoint {
    /// Opens the batch's transaction with its first savepoint.
    const BEGIN: &'static str = "BEGIN; SAVEPOINT command";

    /// Makes the savepoint the state before the command about to run.
    async fn mark(&mut self, conn: &mut PgConnection) -> sqlx::Result<()> {
        if *self == Savepoint::Passed {
            conn.execute("RELEASE SAVEPOINT command; SAVEPOINT command").await?;
            *self = Savepoint::Clean;
        }
        Ok(())
    }

    /// Undoes what was written since the savepoint, which stays (Postgres keeps a savepoint
    /// rolled back to).
    async fn undo(&mut self, conn: &mut PgConnection) -> sqlx::Result<()> {
        conn.execute("ROLLBACK TO SAVEPOINT command").await?;
        *self = Savepoint::Clean;
        Ok(())
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

    /// The batch's commands that will be handled, each once, in order: not those with a stored
    /// outcome, nor an action after its compensation in the batch (which leaves a tombstone for
    /// it), as [`CommandHandler::process`] will decide.
    fn to_handle<'c>(&self, commands: &[&'c CommandEnvelope]) -> Vec<&'c CommandEnvelope> {
        let mut seen = std::collections::HashSet::new();
        commands
            .iter()
            .copied()
            .filter(|c| {
                let (saga, step) = (c.saga_id.as_uuid(), c.step.to_string());
                if c.kind == StepKind::Compensation {
                    seen.insert((saga, step.clone(), "ACTION"));
                }
                let key = (saga, step, c.kind.as_str());
                !self.known.contains_key(&key) && seen.insert(key)
            })
            .collect()
    }

    /// Records an outcome; a tombstone only where no record exists.
    fn record(&mut self, key: (uuid::Uuid, String, &'static str), outcome: ReplyOutcome, tombstone: bool) {
        if tombstone && self.known.contains_key(&key) {
            return;
        }
        self.known.insert(key.clone(), outcome.clone());
        self.new.push((key, outcome, tombstone));
    }

    /// The new records, as writes that go with the batch's outbox insert: no round trip of their
    /// own. Within a batch a record and a tombstone never share a key (`record` keeps a tombstone
    /// only where no record is known), so the two inserts cannot meet in the one statement.
    fn store(self) -> sqlx::Result<Option<outbox::Also>> {
        let mut also = outbox::Also::default();
        for (name, tombstones) in [("records", false), ("tombstones", true)] {
            let rows: Vec<_> = self.new.iter().filter(|(_, _, t)| *t == tombstones).collect();
            if rows.is_empty() {
                continue;
            }
            // A record written meanwhile by someone else fails the batch (which is then applied
            // again and replays it); a tombstone gives way to it.
            let conflict = if tombstones { " ON CONFLICT DO NOTHING" } else { "" };
            let sql = format!(
                "INSERT INTO processed_commands (saga_id, step, kind, outcome)
                 SELECT * FROM UNNEST({}::uuid[], {}::text[], {}::text[], {}::jsonb[]){conflict}",
                also.params().add(rows.iter().map(|((id, _, _), _, _)| *id).collect::<Vec<_>>())?,
                also.params().add(rows.iter().map(|((_, step, _), _, _)| step.as_str()).collect::<Vec<_>>())?,
                also.params().add(rows.iter().map(|((_, _, kind), _, _)| *kind).collect::<Vec<_>>())?,
                also.params().add(rows.iter().map(|(_, outcome, _)| sqlx::types::Json(outcome)).collect::<Vec<_>>())?,
            );
            also.cte(name, &sql);
        }
        Ok((!also.is_empty()).then_some(also))
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
        let mut command = crate::config::with_runbook_aliases(<Self as CommandFactory>::command())
            .name(defaults.name)
            .about(defaults.about)
            .mut_arg("http_addr", |a| a.default_value(defaults.http_addr).required(false))
            .mut_arg("metrics_addr", |a| a.default_value(defaults.metrics_addr).required(false))
            .mut_arg("profile_addr", |a| a.default_value(defaults.profile_addr))
            .mut_arg("database_url", |a| a.default_value(defaults.database_url).required(false));
        let matches = command.get_matches_mut();
        let config = <Self as FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        if let Err(message) = config.outbox.check() {
            command.error(clap::error::ErrorKind::ArgumentConflict, message).exit();
        }
        config
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

#[cfg(test)]
mod tests {
    use sqlx::{Connection, Executor};

    use super::*;
    use crate::db::test_url as url;

    /// Writes two rows for its command, then answers what the command's input says. Records the
    /// sagas each batch prepared, and whether each command handled found itself prepared.
    #[derive(Default)]
    struct Scripted {
        prepared: std::sync::Mutex<Vec<Vec<uuid::Uuid>>>,
        handled: std::sync::Mutex<Vec<(uuid::Uuid, bool)>>,
    }

    impl Participant for Scripted {
        const NAME: &'static str = "scripted";
        type Prepared = std::collections::HashSet<uuid::Uuid>;

        async fn prepare(&self, commands: &[&CommandEnvelope]) -> sqlx::Result<Self::Prepared> {
            let sagas: Vec<uuid::Uuid> = commands.iter().map(|c| c.saga_id.as_uuid()).collect();
            self.prepared.lock().unwrap().push(sagas.clone());
            Ok(sagas.into_iter().collect())
        }

        async fn handle(
            &self,
            conn: &mut PgConnection,
            command: &CommandEnvelope,
            prepared: &mut Self::Prepared,
        ) -> sqlx::Result<Outcome> {
            let saga = command.saga_id.as_uuid();
            self.handled.lock().unwrap().push((saga, prepared.remove(&saga)));
            sqlx::query("INSERT INTO written (saga_id, n) VALUES ($1, 1), ($1, 2)")
                .bind(command.saga_id.as_uuid())
                .execute(&mut *conn)
                .await?;
            let error = StepError::business("NO", "scripted");
            Ok(match command.input["answer"].as_str() {
                Some("done") => Outcome::Done(serde_json::json!({"done": true})),
                Some("refused") => Outcome::Refused(error),
                _ => Outcome::Transient(error),
            })
        }
    }

    fn record(saga: uuid::Uuid, answer: &str, offset: i64) -> Record {
        command(saga, "ACTION", answer, offset)
    }

    fn command(saga: uuid::Uuid, kind: &str, answer: &str, offset: i64) -> Record {
        let command = serde_json::json!({
            "schema_version": SCHEMA_VERSION, "message_id": uuid::Uuid::new_v4(), "saga_id": saga,
            "saga_type": "order_saga", "step": "scripted_step", "kind": kind, "action": "act", "attempt": 1,
            "reply_to": "replies", "input": {"answer": answer}, "deadline": "2030-01-01T00:00:00Z",
        });
        Record {
            topic: "commands".into(),
            partition: 0,
            offset,
            key: Some(saga.to_string()),
            payload: Some(serde_json::to_vec(&command).unwrap()),
            headers: Vec::new(),
        }
    }

    /// A fresh database with the runtime's tables, a `written` table and a handler on it.
    async fn scratch() -> (PgConnection, String, PgPool, CommandHandler<Scripted>) {
        let name = format!("sagatest_participant_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let mut admin = PgConnection::connect(&url("postgres")).await.expect("Postgres is running");
        admin.execute(format!("CREATE DATABASE \"{name}\"").as_str()).await.unwrap();
        let pool = PgPool::connect(&url(&name)).await.unwrap();
        for mut migrations in [crate::db::outbox_migrations(), crate::db::participant_migrations()] {
            migrations.set_ignore_missing(true);
            migrations.run(&pool).await.unwrap();
        }
        pool.execute("CREATE TABLE written (saga_id uuid, n int)").await.unwrap();
        let handler = CommandHandler {
            pool: pool.clone(),
            handoff: None,
            participant: Scripted::default(),
            service: "test".into(),
        };
        (admin, name, pool, handler)
    }

    /// In one batch, a refusal or a transient failure undoes only what its own handler wrote:
    /// the commands before and after it keep theirs, whatever the order of outcomes.
    #[tokio::test]
    async fn a_refused_command_undoes_its_own_writes_and_no_other() {
        let (mut admin, name, pool, handler) = scratch().await;

        let answers = ["done", "refused", "done", "done", "transient", "refused", "done", "transient"];
        let sagas: Vec<uuid::Uuid> = answers.iter().map(|_| uuid::Uuid::now_v7()).collect();
        let records: Vec<Record> =
            answers.iter().zip(&sagas).zip(0..).map(|((answer, saga), offset)| record(*saga, answer, offset)).collect();
        handler.handle(&records).await.unwrap();

        let written: Vec<(uuid::Uuid, i64)> =
            sqlx::query_as("SELECT saga_id, count(*) FROM written GROUP BY saga_id").fetch_all(&pool).await.unwrap();
        let written: std::collections::HashMap<_, _> = written.into_iter().collect();
        let stored: Vec<uuid::Uuid> =
            sqlx::query_scalar("SELECT saga_id FROM processed_commands").fetch_all(&pool).await.unwrap();
        let replies: Vec<serde_json::Value> =
            sqlx::query_scalar("SELECT convert_from(raw_payload, 'UTF8')::jsonb FROM outbox ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(replies.len(), answers.len());
        for ((answer, saga), reply) in answers.iter().zip(&sagas).zip(&replies) {
            let expected = if *answer == "done" { 2 } else { 0 };
            assert_eq!(written.get(saga).copied().unwrap_or(0), expected, "rows kept for the {answer} command");
            assert_eq!(stored.contains(saga), *answer != "transient", "dedupe record of the {answer} command");
            let status = if *answer == "done" { "SUCCEEDED" } else { "FAILED" };
            assert_eq!(reply["outcome"]["status"], status, "reply to the {answer} command");
            assert_eq!(reply["saga_id"], saga.to_string());
        }

        // Redelivered, the batch replays the stored replies; only the transient commands run
        // again (and fail again, undoing their writes again).
        handler.handle(&records).await.unwrap();
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM written").fetch_one(&pool).await.unwrap();
        assert_eq!(rows, 2 * 4);
        let replayed: Vec<bool> = sqlx::query_scalar(
            "SELECT (convert_from(raw_payload, 'UTF8')::jsonb->>'replayed')::bool FROM outbox ORDER BY id OFFSET $1",
        )
        .bind(answers.len() as i64)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(replayed, answers.iter().map(|a| *a != "transient").collect::<Vec<_>>());
        pool.close().await;
        admin.execute(format!("DROP DATABASE \"{name}\" WITH (FORCE)").as_str()).await.unwrap();
    }

    /// A compensation that arrives before its action (in the same batch or an earlier one)
    /// leaves a tombstone, stored in the batch's one statement with its records: the action then
    /// answers ALREADY_COMPENSATED without running. An action already done gets no tombstone.
    #[tokio::test]
    async fn a_compensation_before_its_action_keeps_the_action_from_running() {
        let (mut admin, name, pool, handler) = scratch().await;
        let [early, done_first, late]: [uuid::Uuid; 3] = std::array::from_fn(|_| uuid::Uuid::now_v7());
        handler
            .handle(&[
                command(early, "COMPENSATION", "done", 0),
                command(early, "ACTION", "done", 1),
                command(done_first, "ACTION", "done", 2),
                command(done_first, "COMPENSATION", "done", 3),
                command(late, "COMPENSATION", "done", 4),
            ])
            .await
            .unwrap();
        handler.handle(&[command(late, "ACTION", "done", 5)]).await.unwrap();

        let stored: Vec<(uuid::Uuid, String, Option<String>)> = sqlx::query_as(
            "SELECT saga_id, kind, outcome->'error'->>'code' FROM processed_commands ORDER BY saga_id, kind",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let tombstone = Some(codes::ALREADY_COMPENSATED.to_string());
        let mut expected: Vec<(uuid::Uuid, String, Option<String>)> = vec![
            (early, "ACTION".into(), tombstone.clone()),
            (early, "COMPENSATION".into(), None),
            (done_first, "ACTION".into(), None),
            (done_first, "COMPENSATION".into(), None),
            (late, "ACTION".into(), tombstone.clone()),
            (late, "COMPENSATION".into(), None),
        ];
        expected.sort();
        assert_eq!(stored, expected);
        // Only the compensations and the action done first ran their handler.
        let written: i64 = sqlx::query_scalar("SELECT count(*) FROM written").fetch_one(&pool).await.unwrap();
        assert_eq!(written, 2 * 4);
        let replies: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT payload->>'saga_id', payload->'outcome'->>'status', payload->'outcome'->'error'->>'code'
             FROM (SELECT id, convert_from(raw_payload, 'UTF8')::jsonb AS payload FROM outbox) o ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let refused = |saga: uuid::Uuid| (saga.to_string(), "FAILED".to_string(), tombstone.clone());
        let ok = |saga: uuid::Uuid| (saga.to_string(), "SUCCEEDED".to_string(), None);
        assert_eq!(replies, vec![ok(early), refused(early), ok(done_first), ok(done_first), ok(late), refused(late)]);
        // The action after its compensation was never prepared: it was not going to run.
        assert_eq!(handler.participant.prepared.lock().unwrap()[0], [early, done_first, done_first, late]);
        pool.close().await;
        admin.execute(format!("DROP DATABASE \"{name}\" WITH (FORCE)").as_str()).await.unwrap();
    }

    /// A batch prepares each command it will handle once, before handling any: not those
    /// answered before (replayed), nor a second copy of one in the same batch; and each command
    /// handled finds what was prepared for it, except a copy handled again after a transient
    /// failure, which must do without.
    #[tokio::test]
    async fn a_batch_prepares_the_commands_it_will_handle_once_each() {
        let (mut admin, name, pool, handler) = scratch().await;
        let [done, transient, fresh]: [uuid::Uuid; 3] = std::array::from_fn(|_| uuid::Uuid::now_v7());
        handler.handle(&[record(done, "done", 0)]).await.unwrap();
        handler
            .handle(&[
                record(done, "done", 1),
                record(transient, "transient", 2),
                record(fresh, "done", 3),
                record(transient, "transient", 4),
                record(fresh, "done", 5),
            ])
            .await
            .unwrap();

        let prepared = handler.participant.prepared.lock().unwrap().clone();
        assert_eq!(prepared, [vec![done], vec![transient, fresh]]);
        // The second copy of `fresh` replays its reply; the second of `transient` runs again.
        let handled = handler.participant.handled.lock().unwrap().clone();
        assert_eq!(handled, [(done, true), (transient, true), (fresh, true), (transient, false)]);
        pool.close().await;
        admin.execute(format!("DROP DATABASE \"{name}\" WITH (FORCE)").as_str()).await.unwrap();
    }
}
