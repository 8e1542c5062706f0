//! Supervision of a service's background tasks (consumer, outbox relay, timers, gauges).
//!
//! A background task runs until shutdown. One that ends before that — it returned, or it
//! panicked — leaves a process that looks alive and does no work, which is worse than a crash.
//! So the first task to end early is recorded in [`TaskHealth`] (`/health` and `/ready` then
//! answer 503 naming it, so that a load balancer stops sending traffic), and
//! [`Supervisor::watch`] returns it so that the service shuts down and exits non-zero, for its
//! supervisor (Kubernetes, systemd) to restart it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use metrics::{counter, describe_counter};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const TASK_FAILURES: &str = "saga_background_task_failures_total";

pub(crate) fn describe_metrics() {
    describe_counter!(TASK_FAILURES, "Background tasks that ended before shutdown (the process then exits), by task");
}

/// A background task that ended before shutdown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("background task {task:?} stopped: {reason}")]
pub struct TaskDied {
    pub task: &'static str,
    pub reason: String,
}

/// The first background task that died, shared with the health endpoints.
#[derive(Debug, Clone, Default)]
pub struct TaskHealth(Arc<Mutex<Option<TaskDied>>>);

impl TaskHealth {
    /// The first task that died, if any.
    pub fn died(&self) -> Option<TaskDied> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, died: &TaskDied) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(died.clone());
        }
    }
}

/// Runs named background tasks until shutdown, and notices any that ends before it.
pub struct Supervisor {
    /// Each task ends with its name and, if it panicked, the panic's message.
    tasks: JoinSet<(&'static str, Option<String>)>,
    health: TaskHealth,
    shutdown: CancellationToken,
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

impl Supervisor {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self { tasks: JoinSet::new(), health: TaskHealth::default(), shutdown }
    }

    /// What the health endpoints read.
    pub fn health(&self) -> TaskHealth {
        self.health.clone()
    }

    /// Runs `task` under `name`. It is expected to run until the shutdown token is cancelled.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(async move {
            let run = async move {
                // Fault injection: `FAILPOINTS='task.panic=return(timers)'` makes the task named
                // `timers` panic three seconds after it started.
                if crate::faults::fail::eval("task.panic", |arg| arg).flatten().is_some_and(|arg| arg == name) {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    panic!("fault injection: task {name} panics");
                }
                task.await
            };
            match AssertUnwindSafe(run).catch_unwind().await {
                Ok(()) => (name, None),
                Err(panic) => (name, Some(panic_message(panic.as_ref()))),
            }
        });
    }

    /// Waits until a task ends. Before shutdown that is a failure: it is recorded, counted and
    /// returned. Returns `Ok` once shutdown was asked for (or if there are no tasks).
    pub async fn watch(&mut self) -> Result<(), TaskDied> {
        let ended = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(()),
            ended = self.tasks.join_next() => ended,
        };
        let Some(ended) = ended else { return Ok(()) };
        if self.shutdown.is_cancelled() {
            return Ok(());
        }
        let died = match ended {
            Ok((task, None)) => TaskDied { task, reason: "it returned before shutdown".to_owned() },
            Ok((task, Some(message))) => TaskDied { task, reason: format!("it panicked: {message}") },
            // Only an abort cancels a task, and only `stop` aborts.
            Err(error) => TaskDied { task: "unknown", reason: error.to_string() },
        };
        self.health.record(&died);
        counter!(TASK_FAILURES, "task" => died.task).increment(1);
        tracing::error!(task = died.task, reason = %died.reason, "a background task stopped; the service will exit");
        Err(died)
    }

    /// Waits up to `grace` for every task to finish after shutdown was asked for.
    pub async fn stop(mut self, grace: Duration) {
        self.shutdown.cancel();
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "background tasks did not stop in time");
            self.tasks.abort_all();
        }
    }
}

/// How long a service whose background task died keeps answering 503 on `/ready` before it
/// shuts down, so that load balancers and probes see why it is leaving.
pub const EXIT_DELAY_AFTER_TASK_DIED: Duration = Duration::from_secs(2);

/// Most time between the start of a shutdown and the process's exit, whatever hangs (a broker
/// or a database that does not answer); Kubernetes' default grace period is 30 s.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(9);

/// Serves HTTP and supervises the background tasks until a shutdown signal or a task's death,
/// then shuts down within [`SHUTDOWN_DEADLINE`]. Returns the task's death as an error, so the
/// process exits non-zero.
pub async fn serve_until_stopped(
    mut supervisor: Supervisor,
    http_addr: std::net::SocketAddr,
    router: axum::Router,
    pool: sqlx::PgPool,
) -> anyhow::Result<()> {
    let shutdown = supervisor.shutdown.clone();
    // TCP_NODELAY: a response written in two segments (head, then body) must not wait for the
    // client's delayed ACK (Nagle), which added ~40 ms to every answer.
    let listener = axum::serve::ListenerExt::tap_io(
        tokio::net::TcpListener::bind(http_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {http_addr}: {e}"))?,
        |tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        },
    );
    tracing::info!(addr = %http_addr, "serving HTTP");
    let http_shutdown = CancellationToken::new();
    let graceful = http_shutdown.clone();
    let mut http =
        tokio::spawn(
            async move { axum::serve(listener, router).with_graceful_shutdown(graceful.cancelled_owned()).await },
        );
    let mut outcome: anyhow::Result<()> = Ok(());
    tokio::select! {
        watched = supervisor.watch() => {
            if let Err(died) = watched {
                tokio::time::sleep(EXIT_DELAY_AFTER_TASK_DIED).await;
                outcome = Err(died.into());
            }
        }
        served = &mut http => {
            outcome = match served {
                Ok(Ok(())) => Err(anyhow::anyhow!("the HTTP server stopped")),
                Ok(Err(error)) => Err(anyhow::anyhow!("the HTTP server failed: {error}")),
                Err(error) => Err(anyhow::anyhow!("the HTTP server stopped: {error}")),
            };
        }
    }
    crate::shutdown::exit_by(SHUTDOWN_DEADLINE, if outcome.is_ok() { 0 } else { 1 });
    shutdown.cancel();
    http_shutdown.cancel();
    supervisor.stop(Duration::from_secs(6)).await;
    if !http.is_finished() && tokio::time::timeout(Duration::from_secs(1), &mut http).await.is_err() {
        http.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), pool.close()).await;
    outcome
}
