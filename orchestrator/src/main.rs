//! The saga orchestrator. `main` only wires the parts together.

mod admission;
mod config;
mod dead_letters;
mod engine;
mod http;
mod inbound;
mod lease;
mod metrics;
mod retention;
mod stats;
mod store;
mod timers;
mod watermarks;
mod writes;

use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};
use saga_defs::contract::{commands_topic, EVENTS_TOPIC, REPLIES_TOPIC, START_REQUESTS_TOPIC};
use saga_defs::Registry;
use saga_runtime::{consumer, db, dead_letter, health, kafka, outbox, shutdown, supervisor, telemetry};
use secrecy::ExposeSecret;

use crate::config::{Command, Config};

fn orchestrator_migrations() -> sqlx::migrate::Migrator {
    sqlx::migrate!("../migrations/orchestrator")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut command = saga_runtime::config::with_runbook_aliases(Config::command()).mut_arg("database_url", |a| {
        a.default_value("postgres://postgres@127.0.0.1:5432/saga_orchestrator").required(false)
    });
    let config = Config::from_arg_matches(&command.get_matches_mut()).unwrap_or_else(|e| e.exit());
    if let Err(message) = config.outbox.check() {
        command.error(clap::error::ErrorKind::ArgumentConflict, message).exit();
    }
    telemetry::init_logs(&config.telemetry);
    saga_runtime::config::log_runbook_aliases();
    saga_runtime::faults::setup()?;
    let registry = Arc::new(load_definitions(config.definitions_dir.as_deref())?);
    let result = match config.command {
        None | Some(Command::Serve) => serve(config, registry).await,
        Some(Command::Migrate) => {
            db::migrate(&config.database, migrations()).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Some(Command::CreateTopics) => {
            kafka::check_connection(&config.kafka).await?;
            kafka::ensure_topics(&config.kafka, &topics(&config, &registry)).await
        }
        Some(Command::Definitions) => {
            let all: Vec<_> = registry.all().collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
            Ok(())
        }
    };
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "orchestrator stopped");
    }
    result
}

/// The built-in definitions plus the `*.json` documents of `dir`.
fn load_definitions(dir: Option<&std::path::Path>) -> anyhow::Result<Registry> {
    let mut documents = Vec::new();
    if let Some(dir) = dir {
        let entries =
            std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("SAGA_DEFINITIONS_DIR {}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                documents.push((path.display().to_string(), text));
            }
        }
        documents.sort();
    }
    Ok(Registry::embedded_with(documents.iter().map(|(file, text)| (file.as_str(), text.as_str())))?)
}

fn migrations() -> Vec<sqlx::migrate::Migrator> {
    vec![db::outbox_migrations(), orchestrator_migrations()]
}

/// Every topic the loaded definitions need.
fn topics(config: &Config, registry: &Registry) -> Vec<String> {
    let mut names: Vec<String> = registry.participants().iter().map(|p| commands_topic(p)).collect();
    names.extend([REPLIES_TOPIC, START_REQUESTS_TOPIC].map(String::from));
    // Every consumed topic has its dead-letter topic.
    let dead_letters: Vec<String> = names.iter().map(|n| dead_letter::topic_of(n)).collect();
    names.extend(dead_letters);
    names.push(EVENTS_TOPIC.to_owned());
    names.iter().map(|n| config.kafka.topic(n)).collect()
}

async fn serve(config: Config, registry: Arc<Registry>) -> anyhow::Result<()> {
    let auth = http::auth::Auth::from_config(config.api_tokens.expose_secret(), config.auth_disabled)?;
    match &auth {
        http::auth::Auth::Disabled => tracing::warn!(
            "AUTH_DISABLED=true: the API answers without a token; never do this outside local development"
        ),
        tokens => tracing::info!(?tokens, "API tokens loaded"),
    }
    telemetry::serve_metrics(config.metrics_addr)?;
    let profiles = telemetry::bind_profiles(config.telemetry.profile_addr.0).await?;
    let export = saga_runtime::trace::Export::from_env("saga-orchestrator")?;
    crate::metrics::describe();
    stats::describe();
    crate::metrics::register_saga_types(registry.all().map(|d| d.name.to_string()));
    for definition in registry.all() {
        tracing::info!(saga_type = %definition.name, version = definition.version, steps = definition.steps.len(), "loaded saga definition");
    }
    let pool = db::connect(&config.database, migrations()).await?;
    kafka::check_connection(&config.kafka).await?;
    let all_topics = topics(&config, &registry);
    kafka::ensure_topics(&config.kafka, &all_topics).await?;
    let producer = kafka::producer(&config.kafka, "saga-orchestrator")?;
    let replies_topic = config.kafka.topic(REPLIES_TOPIC);
    let start_topic = config.kafka.topic(START_REQUESTS_TOPIC);
    let subscription = [replies_topic.clone(), start_topic.clone()];
    // How far the replies are applied, for the timer loop's reply deadlines (ADR 29).
    let progress = Arc::new(saga_runtime::progress::Progress::new([replies_topic.clone()]));
    let consumer =
        kafka::consumer_with_progress(&config.kafka, &config.kafka_group_id, &subscription, Some(progress.clone()))?;
    let engine = Arc::new(engine::Engine::new(registry.clone(), config.kafka.kafka_topic_prefix.clone()));
    let shutdown = shutdown::on_signal();
    let mut supervisor = supervisor::Supervisor::new(shutdown.clone());
    if let Some(listener) = profiles {
        supervisor.spawn("heap-profile", telemetry::serve_profiles(listener, shutdown.clone()));
    }
    lease::describe();
    // The registration behind the commands handed off from memory (ADR 28).
    let relay = if config.outbox.outbox_publish_on_commit {
        let relay = lease::register(&pool).await?;
        tracing::info!(relay, lease_ms = config.handoff_lease.as_millis() as u64, "registered");
        supervisor
            .spawn("lease", lease::run(pool.clone(), engine.clone(), relay, config.handoff_lease, shutdown.clone()));
        Some(relay)
    } else {
        None
    };
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
    watermarks::describe();
    let gate = Arc::new(watermarks::Gate::new(config.reply_deadline_max_wait));
    supervisor.spawn(
        "reply-watermarks",
        watermarks::run(
            pool.clone(),
            progress.clone(),
            Arc::new(kafka::reader(&config.kafka, "saga-orchestrator-watermarks")?),
            replies_topic.clone(),
            gate.clone(),
            shutdown.clone(),
        ),
    );
    supervisor.spawn(
        "timers",
        timers::run(
            pool.clone(),
            engine.clone(),
            gate,
            config.timer_interval,
            config.timer_batch_size,
            shutdown.clone(),
        ),
    );
    let admission =
        Arc::new(admission::Admission::new(config.max_in_flight.clone(), registry.all().map(|d| d.name.to_string())));
    supervisor.spawn("admission", admission.clone().run(pool.clone(), shutdown.clone()));
    let inbound = inbound::Inbound {
        pool: pool.clone(),
        engine: engine.clone(),
        replies_topic,
        start_topic: start_topic.clone(),
        admission: admission.clone(),
        handoff,
        relay,
    };
    let settings = config.kafka.consumer_settings();
    let consumer_shutdown = shutdown.clone();
    let (kafka_config, group) = (config.kafka.clone(), config.kafka_group_id.clone());
    supervisor.spawn("consumer", async move {
        let remake = || kafka::consumer_with_progress(&kafka_config, &group, &subscription, Some(progress.clone()));
        consumer::run(consumer, remake, settings, &inbound, consumer_shutdown).await;
    });

    let dead_letter_topics = all_topics.into_iter().filter(|t| t.ends_with(".dlq")).collect();
    let dead_letters = dead_letters::DeadLetters::new(config.kafka.clone(), dead_letter_topics, producer.clone());
    let start_queue = Arc::new(http::StartQueue {
        reader: Arc::new(kafka::backlog_reader(&config.kafka, &config.kafka_group_id)?),
        topic: start_topic,
    });
    supervisor.spawn(
        "saga-gauges",
        timers::sample_gauges(
            pool.clone(),
            config.database.database_max_connections,
            start_queue.clone(),
            Duration::from_secs(5),
            shutdown.clone(),
        ),
    );
    supervisor.spawn(
        "stats-rollup",
        stats::run(pool.clone(), config.stats_rollup_interval, config.stats_rollup_batch_size, shutdown.clone()),
    );
    let retention_status = saga_runtime::retention::SharedStatus::default();
    let retention_policies = retention::policies(&config.keep);
    supervisor.spawn(
        "retention",
        saga_runtime::retention::run(
            pool.clone(),
            retention_policies.clone(),
            config.retention.clone(),
            retention_status.clone(),
            shutdown.clone(),
        ),
    );
    let state = http::AppState {
        pool: pool.clone(),
        engine: engine.clone(),
        redact: Arc::new(config.redact_fields.clone()),
        dead_letters: Arc::new(dead_letters),
        admission,
        start_queue,
        retention: Arc::new(http::Retention {
            policies: retention_policies,
            status: retention_status,
            config: config.retention.clone(),
            dead_letter_topics: config.kafka.kafka_dead_letter_retention.0,
        }),
    };
    let readiness =
        health::Readiness { service: "saga-orchestrator", pool: pool.clone(), producer, tasks: supervisor.health() };
    let router = health::finish(http::router(state, auth).merge(health::router(readiness)));
    let served = supervisor::serve_until_stopped(supervisor, config.http_addr, router, pool.clone()).await;
    if let Some(relay) = relay {
        // Its commands still held in memory go to the outbox for the next process's relay (the
        // ones delivered already are published twice, which participants deduplicate). If this
        // fails, another process adopts them once the lease lapses.
        match lease::release(&pool, &engine, relay).await {
            Ok(()) => tracing::info!(relay, "registration released"),
            Err(error) => tracing::warn!(%error, relay, "releasing the registration; the lease recovers it"),
        }
    }
    export.shutdown().await;
    served
}
