//! The end-to-end harness: runs the real orchestrator and participant binaries as processes
//! against the real Postgres and broker. Each [`System`] gets its own databases, topic prefix and
//! consumer groups, so tests run side by side without seeing each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::process::{Child, Command};
use uuid::Uuid;

pub mod bench;
pub mod faults;
pub mod scale;

pub const SERVICES: [&str; 6] = ["orchestrator", "order", "inventory", "payment", "fulfilment", "notification"];

/// The orchestrator's API tokens in tests: `admin` (what [`System::http`] sends) and `reader`.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const READ_TOKEN: &str = "test-read-token-0123456789";

/// How to start a [`System`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Services not started (to simulate a participant that never answers).
    pub skip: Vec<&'static str>,
    /// Extra environment for one service: (service, name, value).
    pub env: Vec<(&'static str, String, String)>,
    /// Run an Apache Kafka broker of this system's own (that a test may pause, kill and restart)
    /// instead of the shared one.
    pub private_broker: bool,
    /// Extra listeners of the private broker, (bound, advertised): e.g.
    /// (`SASL_SSL://127.0.0.1:9094`, `SASL_SSL://localhost:9094`).
    pub broker_listeners: Vec<(String, String)>,
    /// Extra `key=value` properties of the private broker (TLS, SASL).
    pub broker_properties: Vec<String>,
    /// SCRAM credentials the private broker is formatted with (`SCRAM-SHA-512=[name=u,password=p]`).
    pub broker_scram: Vec<String>,
    /// The Postgres server of this system's databases, as (URL without a database, query string
    /// such as `?sslmode=verify-full&sslrootcert=ca.pem`); the shared one unless set.
    pub postgres: Option<(String, String)>,
}

impl Options {
    pub fn skip(mut self, service: &'static str) -> Self {
        self.skip.push(service);
        self
    }

    pub fn env(mut self, service: &'static str, name: &str, value: impl Into<String>) -> Self {
        self.env.push((service, name.to_owned(), value.into()));
        self
    }

    /// Loads extra saga definitions into the orchestrator from `tests/definitions/`.
    pub fn test_definitions(self) -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("definitions");
        self.env("orchestrator", "SAGA_DEFINITIONS_DIR", dir.display().to_string())
    }

    /// Loads `tests/definitions/fault/`: the order saga v2, with 5 s timeouts and short
    /// backoffs, which new sagas then use.
    pub fn fault_definitions(self) -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("definitions").join("fault");
        self.env("orchestrator", "SAGA_DEFINITIONS_DIR", dir.display().to_string())
    }

    pub fn private_broker(mut self) -> Self {
        self.private_broker = true;
        self
    }
}

/// The executable behind a service name; `orchestrator#2` is a second orchestrator replica.
fn base_service(service: &str) -> &str {
    service.split('#').next().unwrap_or(service)
}

/// The server of `TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432`) and its
/// query, if any, which every database's URL gets too: `...:5432?sslmode=disable`, or
/// `postgres://postgres@localhost?host=/var/run/postgresql` for the Unix socket.
fn default_postgres() -> (String, String) {
    let url = std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
    match url.split_once('?') {
        Some((base, query)) => (base.trim_end_matches('/').to_owned(), format!("?{query}")),
        None => (url.trim_end_matches('/').to_owned(), String::new()),
    }
}

/// The URL of the database `name` on the server of `TEST_POSTGRES_URL`.
pub fn postgres_url(name: &str) -> String {
    let (base, query) = default_postgres();
    format!("{base}/{name}{query}")
}

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// The consumer group protocol the services under test use: `classic` unless
/// `TEST_GROUP_PROTOCOL=consumer` (KIP-848) is set.
pub fn group_protocol() -> String {
    std::env::var("TEST_GROUP_PROTOCOL").unwrap_or_else(|_| "classic".to_owned())
}

/// The services' consumer settings in tests, unless `KAFKA_CONSUMER_PROPERTIES` is set: a member
/// that dies loses its partitions after 6 s (the least Apache Kafka allows by default), and one
/// whose loop stops polling leaves its group after 10 s. Under the new protocol the broker sets
/// session and heartbeat (scripts/kafka.d/run-broker) and librdkafka refuses them here.
pub fn consumer_properties() -> String {
    if let Ok(properties) = std::env::var("KAFKA_CONSUMER_PROPERTIES") {
        return properties;
    }
    if group_protocol() == "consumer" {
        "group.protocol=consumer,max.poll.interval.ms=10000".to_owned()
    } else {
        "session.timeout.ms=6000,heartbeat.interval.ms=1000,max.poll.interval.ms=10000".to_owned()
    }
}

/// `scripts/kafka.d/run-broker`, which runs one Apache Kafka broker from the cached jars.
fn run_broker_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka.d/run-broker")
}

/// Where cargo put the binaries: next to this test executable's `deps/` folder.
/// The workspace's root directory (this crate's parent).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate is in the workspace").to_path_buf()
}

pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SAGA_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // A test runs from target/<profile>/deps/, the chaos runner from target/<profile>/.
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("target/<profile>");
    if dir.ends_with("deps") {
        dir.parent().expect("target/<profile>").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The executable of a service (`orchestrator`, `payment`, ...).
pub fn binary(service: &str) -> PathBuf {
    let service = base_service(service);
    let name = match service {
        "orchestrator" => "saga-orchestrator".to_owned(),
        "notification" => "saga-notification".to_owned(),
        participant => format!("saga-participant-{participant}"),
    };
    bin_dir().join(name)
}

/// A port for a service to listen on. Not from the kernel's ephemeral range: a port found free
/// with `bind(0)` and released can be handed out again, to the next `bind(0)` or to an outgoing
/// connection, before the service binds it (seen: two services of one system given one port).
/// So: a random port below that range, never one this process handed out before, not claimed by
/// another live test process (tests run two at a time, ADR 32), and free now.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    static RANGE: std::sync::LazyLock<(u16, u16)> = std::sync::LazyLock::new(|| {
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32768);
        if ephemeral_low > 12_000 {
            (10_000, ephemeral_low)
        } else {
            (ephemeral_low / 2, ephemeral_low)
        }
    });
    let (low, high) = *RANGE;
    let mut handed_out = HANDED_OUT.lock().expect("port registry");
    for _ in 0..1000 {
        let port = rand::random_range(low..high);
        if !handed_out.contains(&port) && claim_port(port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free port in {low}..{high} after 1000 tries");
}

/// Claims `port` for this process among the test processes of the machine: a file named after it
/// in a shared directory, created only if absent, holding the claimant's pid. A claim whose process
/// is gone is stale and taken over. Claims last as long as their process.
fn claim_port(port: u16) -> bool {
    let dir = std::env::temp_dir().join("saga-e2e-ports");
    let path = dir.join(port.to_string());
    let me = std::process::id().to_string();
    for _ in 0..2 {
        let _ = std::fs::create_dir_all(&dir);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut file) => return std::io::Write::write_all(&mut file, me.as_bytes()).is_ok(),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                if owner == me {
                    return true;
                }
                let alive = !owner.is_empty() && std::path::Path::new("/proc").join(owner.trim()).exists();
                if alive {
                    return false;
                }
                // Stale (its process ended), or being written this instant: taken over only
                // when it names a process that is gone.
                if owner.is_empty() || std::fs::remove_file(&path).is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

/// A system's own Apache Kafka broker.
struct Broker {
    /// Its configuration and log, kept across restarts.
    dir: PathBuf,
    port: u16,
    controller_port: u16,
    /// Listeners besides PLAINTEXT, (bound, advertised).
    listeners: Vec<(String, String)>,
    properties: Vec<String>,
    scram: Vec<String>,
    child: Option<Child>,
}

/// How many times a broker log says the broker has started.
fn count_started(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log).map(|text| text.matches("Kafka Server started").count()).unwrap_or(0)
}

struct Process {
    http_port: u16,
    metrics_port: u16,
    child: Option<Child>,
}

/// A message read back from a topic.
#[derive(Debug, Clone)]
pub struct TopicMessage {
    pub partition: i32,
    pub offset: i64,
    /// Its Kafka timestamp (the producer's, or the broker's append with `LogAppendTime`).
    pub timestamp: Option<chrono::DateTime<chrono::Utc>>,
    pub key: Option<String>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

impl TopicMessage {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        self.payload.as_deref().and_then(|p| serde_json::from_slice(p).ok()).unwrap_or(Value::Null)
    }
}

/// A whole running system.
pub struct System {
    pub run_id: String,
    processes: Mutex<BTreeMap<&'static str, Process>>,
    /// The broker address this system's services use.
    pub brokers: String,
    /// This system's own broker, when it has one.
    broker: Mutex<Option<Broker>>,
    /// Postgres of this system's databases: a URL without a database, and a query string.
    postgres: (String, String),
    /// Sends the admin token to every service.
    pub http: reqwest::Client,
    log_dir: PathBuf,
    env: Vec<(&'static str, String, String)>,
}

impl System {
    /// Starts every service and waits until each is ready.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_without(&[]).await
    }

    /// Starts every service except `skip` (to simulate a participant that never answers).
    pub async fn start_without(skip: &[&'static str]) -> anyhow::Result<Self> {
        Self::start_with(Options { skip: skip.to_vec(), ..Options::default() }).await
    }

    pub async fn start_with(options: Options) -> anyhow::Result<Self> {
        let skip = options.skip.clone();
        let run_id = format!("t{}", &Uuid::new_v4().simple().to_string()[..10]);
        let log_dir = bin_dir().join("e2e-logs").join(&run_id);
        std::fs::create_dir_all(&log_dir)?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {ADMIN_TOKEN}").parse()?);
        let http = reqwest::Client::builder().default_headers(headers).build()?;
        let mut system = System {
            run_id,
            processes: Mutex::new(BTreeMap::new()),
            brokers: brokers(),
            broker: Mutex::new(None),
            postgres: options.postgres.clone().unwrap_or_else(default_postgres),
            http,
            log_dir,
            env: options.env,
        };
        if options.private_broker {
            let broker = Broker {
                dir: system.log_dir.join("kafka"),
                port: free_port(),
                controller_port: free_port(),
                listeners: options.broker_listeners.clone(),
                properties: options.broker_properties.clone(),
                scram: options.broker_scram.clone(),
                child: None,
            };
            system.brokers = format!("127.0.0.1:{}", broker.port);
            *system.broker.lock().unwrap_or_else(|e| e.into_inner()) = Some(broker);
            system.start_broker_process().await?;
        }
        for service in SERVICES {
            system
                .processes()
                .insert(service, Process { http_port: free_port(), metrics_port: free_port(), child: None });
        }
        // The orchestrator first: it creates the databases' neighbours' topics too.
        for service in SERVICES.iter().filter(|s| !skip.contains(s)) {
            system.spawn(service)?;
        }
        for service in SERVICES.iter().filter(|s| !skip.contains(s)) {
            system.wait_ready(service, Duration::from_secs(90)).await?;
        }
        Ok(system)
    }

    fn processes(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Process>> {
        self.processes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn database_url(&self, service: &str) -> String {
        let (base, query) = &self.postgres;
        format!("{base}/sagatest_{}_{}{query}", self.run_id, base_service(service))
    }

    /// The URL of the `postgres` database of this system's server, for administration.
    fn admin_url(&self) -> String {
        let (base, query) = &self.postgres;
        format!("{base}/postgres{query}")
    }

    /// Starts the private broker's process and waits until it says it has started.
    async fn start_broker_process(&self) -> anyhow::Result<()> {
        let log_path = self.log_dir.join("kafka.log");
        let started_lines = count_started(&log_path);
        {
            let mut broker = self.broker.lock().unwrap_or_else(|e| e.into_inner());
            let broker = broker.as_mut().context("this system has no broker of its own")?;
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
            let (bound, advertised): (Vec<&str>, Vec<&str>) =
                broker.listeners.iter().map(|(b, a)| (b.as_str(), a.as_str())).unzip();
            let child = Command::new(run_broker_script())
                .arg(&broker.dir)
                .arg(format!("127.0.0.1:{}", broker.port))
                .arg(broker.controller_port.to_string())
                .args(&broker.properties)
                .env("KAFKA_EXTRA_LISTENERS", bound.join(","))
                .env("KAFKA_EXTRA_ADVERTISED_LISTENERS", advertised.join(","))
                .env("KAFKA_FORMAT_SCRAM", broker.scram.join("\n"))
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .context("cannot run scripts/kafka.d/run-broker")?;
            broker.child = Some(child);
        }
        let started = Instant::now();
        while count_started(&log_path) == started_lines {
            if started.elapsed() > Duration::from_secs(120) {
                bail!("the private broker did not start within 120 s; see {}", log_path.display());
            }
            let exited = {
                let mut broker = self.broker.lock().unwrap_or_else(|e| e.into_inner());
                broker.as_mut().and_then(|b| b.child.as_mut()).is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
            };
            if exited {
                bail!("the private broker exited while starting; see {}", log_path.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// SIGKILLs the private broker: no controlled shutdown; its log stays on disk.
    pub async fn kill_broker(&self) -> anyhow::Result<()> {
        let child = self.broker.lock().unwrap_or_else(|e| e.into_inner()).as_mut().and_then(|b| b.child.take());
        let mut child = child.context("the private broker is not running")?;
        child.start_kill()?;
        child.wait().await?;
        Ok(())
    }

    /// Starts the private broker again on the log it had (after [`System::kill_broker`]).
    pub async fn restart_broker(&self) -> anyhow::Result<()> {
        self.start_broker_process().await
    }

    /// The pid of a service's process (or of the private broker, as `broker`).
    pub fn pid(&self, service: &str) -> anyhow::Result<u32> {
        let pid = if service == "broker" {
            self.broker.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|b| b.child.as_ref()?.id())
        } else {
            self.processes().get(service).and_then(|p| p.child.as_ref()).and_then(Child::id)
        };
        pid.with_context(|| format!("{service} is not running"))
    }

    /// Sends a signal (`STOP`, `CONT`, `TERM`, ...) to a service or to the private `broker`.
    pub fn signal(&self, service: &str, signal: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid(service)?.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {service} failed");
        }
        Ok(())
    }

    /// Sends SIGTERM and waits for the process to exit; returns how long it took and its exit status.
    pub async fn terminate(&self, service: &str) -> anyhow::Result<(Duration, std::process::ExitStatus)> {
        self.signal(service, "TERM")?;
        let started = Instant::now();
        let mut child = self.processes().get_mut(service).and_then(|p| p.child.take()).context("not running")?;
        let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .context("no exit within 60 s of SIGTERM")??;
        Ok((started.elapsed(), status))
    }

    /// Makes a service's database unreachable for `outage`: new connections are refused and
    /// open ones are cut, as a Postgres restart does to its clients (without disturbing other
    /// tests sharing the server).
    pub async fn database_outage(&self, service: &str, outage: Duration) -> anyhow::Result<()> {
        let admin = PgPoolOptions::new().max_connections(1).connect(&self.admin_url()).await?;
        let name = format!("sagatest_{}_{}", self.run_id, base_service(service));
        sqlx::query(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false")).execute(&admin).await?;
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(&name)
            .execute(&admin)
            .await?;
        tokio::time::sleep(outage).await;
        sqlx::query(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true")).execute(&admin).await?;
        Ok(())
    }

    pub fn topic_prefix(&self) -> String {
        format!("{}.", self.run_id)
    }

    /// Starts (or restarts) one service's process.
    pub fn spawn(&self, service: &'static str) -> anyhow::Result<()> {
        let database_url = self.database_url(service);
        let topic_prefix = self.topic_prefix();
        let group = format!("{}-{}", self.run_id, base_service(service));
        let mut processes = self.processes();
        processes.entry(service).or_insert_with(|| Process {
            http_port: free_port(),
            metrics_port: free_port(),
            child: None,
        });
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.log_dir.join(format!("{service}.log")))?;
        let process = processes.get_mut(service).context("unknown service")?;
        let mut command = Command::new(binary(service));
        command
            .env("DATABASE_URL", database_url)
            .env("KAFKA_BROKERS", &self.brokers)
            .env("KAFKA_TOPIC_PREFIX", topic_prefix)
            .env("KAFKA_GROUP_ID", group)
            .env("KAFKA_CONSUMER_PROPERTIES", consumer_properties())
            // A consumer that librdkafka leaves stuck is replaced within the tests' waits (three
            // of their 6 s sessions), and every test then also checks the watch never replaces a
            // healthy one (a replacement is logged as an ERROR).
            .env("CONSUMER_STALL_TIMEOUT_MS", "20000")
            .env("HTTP_ADDR", format!("127.0.0.1:{}", process.http_port))
            .env("METRICS_ADDR", format!("127.0.0.1:{}", process.metrics_port))
            // Many systems run side by side: no service may take the default 606x port.
            .env("PROFILE_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("LOG_FORMAT", "text")
            .env("NO_COLOR", "1")
            .env("API_TOKENS", format!("admin:admin:{ADMIN_TOKEN},reader:read:{READ_TOKEN}"))
            .envs(
                self.env
                    .iter()
                    .filter(|(s, _, _)| *s == base_service(service) || *s == service)
                    .map(|(_, k, v)| (k, v)),
            )
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        process.child = Some(command.spawn().with_context(|| {
            format!(
                "cannot start {} (build the binaries first: cargo build --workspace --bins)",
                binary(service).display()
            )
        })?);
        Ok(())
    }

    /// Kills a service with SIGKILL: no shutdown, no final offset commit.
    pub async fn kill(&self, service: &str) -> anyhow::Result<()> {
        let child = self.processes().get_mut(service).context("unknown service")?.child.take();
        if let Some(mut child) = child {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// Runs `sagactl` against this system's orchestrator with `token`; (exit code, stdout, stderr).
    pub async fn sagactl(&self, token: Option<&str>, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let mut command = Command::new(bin_dir().join("sagactl"));
        command.env("SAGA_API_URL", self.url("orchestrator", "")).env_remove("SAGA_API_TOKEN").args(args);
        if let Some(token) = token {
            command.env("SAGA_API_TOKEN", token);
        }
        let output = command.output().await.context("running sagactl (build it: cargo build --workspace --bins)")?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// The services whose process is running.
    pub fn running(&self) -> Vec<&'static str> {
        self.processes().iter().filter(|(_, p)| p.child.is_some()).map(|(s, _)| *s).collect()
    }

    /// The sum of a service's `kafka_consumer_lag` samples (0 before the first report).
    pub async fn total_lag(&self, service: &str) -> anyhow::Result<f64> {
        let text = self.http.get(self.metrics_url(service)).send().await?.text().await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("kafka_consumer_lag{"))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum())
    }

    /// Waits until a service's process exits on its own; returns how long that took and its status.
    pub async fn wait_exit(
        &self,
        service: &str,
        timeout: Duration,
    ) -> anyhow::Result<(Duration, std::process::ExitStatus)> {
        let started = Instant::now();
        let mut child = self.processes().get_mut(service).and_then(|p| p.child.take()).context("not running")?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => Ok((started.elapsed(), status?)),
            Err(_) => {
                self.processes().get_mut(service).context("unknown service")?.child = Some(child);
                bail!("{service} still running after {timeout:?}")
            }
        }
    }

    /// Whether a service's process has exited (crashed) since it was started.
    pub fn has_exited(&self, service: &str) -> bool {
        let mut processes = self.processes();
        match processes.get_mut(service).and_then(|p| p.child.as_mut()) {
            Some(child) => matches!(child.try_wait(), Ok(Some(_))),
            None => false,
        }
    }

    /// Sets (or replaces) an environment variable for a service's next start.
    pub fn set_env(&mut self, service: &'static str, name: &str, value: impl Into<String>) {
        self.env.retain(|(s, k, _)| !(*s == service && k == name));
        self.env.push((service, name.to_owned(), value.into()));
    }

    /// Every message now on one of this system's topics (name without the prefix), in partition
    /// and offset order: (key, payload, headers).
    pub async fn read_topic(&self, topic: &str) -> anyhow::Result<Vec<TopicMessage>> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        let topic = format!("{}{topic}", self.topic_prefix());
        let brokers = self.brokers.clone();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", "e2e-reader")
                .set("enable.auto.commit", "false")
                .create()?;
            let timeout = Duration::from_secs(10);
            let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
            let mut list = rdkafka::TopicPartitionList::new();
            let mut ends = BTreeMap::new();
            for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
                let (low, high) = consumer.fetch_watermarks(&topic, partition.id(), timeout)?;
                if high > low {
                    list.add_partition_offset(&topic, partition.id(), rdkafka::Offset::Offset(low))?;
                    ends.insert(partition.id(), high);
                }
            }
            let mut out = Vec::new();
            if ends.is_empty() {
                return Ok(out);
            }
            consumer.assign(&list)?;
            let started = Instant::now();
            while !ends.is_empty() && started.elapsed() < Duration::from_secs(30) {
                if let Some(message) = consumer.poll(Duration::from_millis(200)) {
                    let message = message?;
                    let headers = message
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|x| {
                                    (
                                        x.key.to_owned(),
                                        String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    out.push(TopicMessage {
                        partition: message.partition(),
                        offset: message.offset(),
                        timestamp: message.timestamp().to_millis().and_then(chrono::DateTime::from_timestamp_millis),
                        key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        payload: message.payload().map(<[u8]>::to_vec),
                        headers,
                    });
                    if ends.get(&message.partition()).is_some_and(|end| message.offset() + 1 >= *end) {
                        ends.remove(&message.partition());
                    }
                }
            }
            out.sort_by_key(|m| (m.partition, m.offset));
            Ok(out)
        })
        .await?
    }

    /// Creates topics of this system (names without the prefix), three partitions each, as an
    /// operator would where the services do not create their own (`KAFKA_CREATE_TOPICS=false`).
    pub async fn create_topics(&self, names: &[&str]) -> anyhow::Result<()> {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", &self.brokers).create()?;
        let names: Vec<String> = names.iter().map(|n| format!("{}{n}", self.topic_prefix())).collect();
        let topics: Vec<NewTopic<'_>> = names.iter().map(|n| NewTopic::new(n, 3, TopicReplication::Fixed(1))).collect();
        for result in admin.create_topics(&topics, &AdminOptions::new()).await? {
            result.map_err(|(topic, code)| anyhow::anyhow!("cannot create {topic}: {code}"))?;
        }
        Ok(())
    }

    /// Deletes every topic (those named with its prefix) and consumer group of this system.
    pub async fn delete_topics(&self) -> anyhow::Result<()> {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", &self.brokers).create()?;
        let prefix = self.topic_prefix();
        let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(10))?;
        let topics: Vec<String> =
            metadata.topics().iter().map(|t| t.name().to_owned()).filter(|t| t.starts_with(&prefix)).collect();
        if !topics.is_empty() {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            admin.delete_topics(&names, &AdminOptions::new()).await?;
        }
        // And its consumer groups, which would otherwise linger on the broker (empty).
        let groups: Vec<String> = SERVICES.iter().map(|s| format!("{}-{s}", self.run_id)).collect();
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        admin.delete_groups(&groups, &AdminOptions::new()).await?;
        Ok(())
    }

    /// Publishes a raw message to one of this system's topics (name without the prefix).
    pub async fn publish(
        &self,
        topic: &str,
        key: &str,
        payload: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &self.brokers).create()?;
        let mut owned = OwnedHeaders::new();
        for (name, value) in headers {
            owned = owned.insert(Header { key: name, value: Some(*value) });
        }
        let topic = format!("{}{topic}", self.topic_prefix());
        let mut record = FutureRecord::<str, [u8]>::to(&topic).key(key).headers(owned);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
        Ok(())
    }

    pub fn metrics_url(&self, service: &str) -> String {
        format!("http://127.0.0.1:{}/metrics", self.processes()[service].metrics_port)
    }

    pub fn url(&self, service: &str, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.processes()[service].http_port, path)
    }

    pub async fn wait_ready(&self, service: &str, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Ok(response) = self.http.get(self.url(service, "/ready")).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if started.elapsed() > timeout {
                bail!("{service} not ready after {timeout:?}; see {}", self.log_dir.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Scrapes one metric sample (exact name and labels as printed) from a service.
    pub async fn metric(&self, service: &str, sample: &str) -> anyhow::Result<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.processes()[service].metrics_port);
        let text = self.http.get(url).send().await?.text().await?;
        Ok(text
            .lines()
            .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or(0.0))
    }

    /// Scrapes `sample` from `service` every 100 ms until `wanted` holds for it, and returns it;
    /// after `timeout`, an error saying `what` was awaited, with [`Self::diagnostics`].
    pub async fn wait_metric(
        &self,
        service: &str,
        sample: &str,
        wanted: impl Fn(f64) -> bool,
        timeout: Duration,
        what: &str,
    ) -> anyhow::Result<f64> {
        let started = Instant::now();
        loop {
            let value = self.metric(service, sample).await?;
            if wanted(value) {
                return Ok(value);
            }
            if started.elapsed() > timeout {
                bail!(
                    "{what}: {service}'s {} still {value} after {timeout:?}{}",
                    sample.trim(),
                    self.diagnostics().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What a failed wait should print, since CI keeps nothing else: per service, whether its
    /// process runs, its outbox backlog and the last warnings, errors and rebalances of its log;
    /// then the last lines of the private broker's log, if any.
    pub async fn diagnostics(&self) -> String {
        let mut out = String::new();
        for service in SERVICES {
            let backlog = match self.pool(service).await {
                Ok(pool) => sqlx::query_as::<_, (i64, i64, Option<f64>)>(
                    "SELECT count(*), count(*) FILTER (WHERE handed_off),
                            EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM outbox",
                )
                .fetch_one(&pool)
                .await
                .map(|(n, handed, oldest)| {
                    format!("{n} rows ({handed} handed off), oldest {:.1} s", oldest.unwrap_or(0.0))
                })
                .unwrap_or_else(|e| format!("unreadable: {e}")),
                Err(e) => format!("unreachable: {e}"),
            };
            let process = match self.processes().get_mut(service).and_then(|p| p.child.as_mut()).map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => format!("exited ({status})"),
                Some(Ok(None)) => "running".to_owned(),
                Some(Err(e)) => format!("unknown ({e})"),
                None => "not started".to_owned(),
            };
            out.push_str(&format!(
                "\n--- {service}: {process}; outbox {backlog}; last warnings, errors and rebalances:\n"
            ));
            let log = std::fs::read_to_string(self.log_dir.join(format!("{service}.log"))).unwrap_or_default();
            let noteworthy: Vec<&str> = log
                .lines()
                .filter(|l| {
                    [" WARN ", " ERROR ", "panicked", "partitions assigned", "partitions revoked"]
                        .iter()
                        .any(|mark| l.contains(mark))
                })
                .collect();
            for line in &noteworthy[noteworthy.len().saturating_sub(16)..] {
                out.push_str(&format!("  {}\n", line.chars().take(400).collect::<String>()));
            }
        }
        out.push_str(&format!("--- a fresh client, now: {}\n", self.fresh_client_probe().await));
        if let Ok(log) = std::fs::read_to_string(self.log_dir.join("kafka.log")) {
            let lines: Vec<&str> = log.lines().collect();
            out.push_str("--- private broker, last lines:\n");
            for line in &lines[lines.len().saturating_sub(8)..] {
                out.push_str(&format!("  {}\n", line.chars().take(300).collect::<String>()));
            }
        }
        out
    }

    /// Whether the broker answers a client that was not there before: metadata, each partition's
    /// watermarks (ListOffsets) and a fetch of the newest message of the start-request topic, each
    /// timed. When the services' clients wait for answers that never come, this tells whether the
    /// broker or their connections are at fault.
    async fn fresh_client_probe(&self) -> String {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let topic = format!("{}saga-start-requests", self.topic_prefix());
        let brokers = self.brokers.clone();
        let probe = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", "e2e-probe")
                .set("enable.auto.commit", "false")
                .create()?;
            let timeout = Duration::from_secs(5);
            let started = Instant::now();
            let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
            let mut out = format!("metadata in {:?}", started.elapsed());
            let mut newest = None;
            for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
                let started = Instant::now();
                match consumer.fetch_watermarks(&topic, partition.id(), timeout) {
                    Ok((low, high)) => {
                        out.push_str(&format!(
                            "; {topic}/{} offsets {low}..{high} in {:?}",
                            partition.id(),
                            started.elapsed()
                        ));
                        if high > low {
                            newest = Some((partition.id(), high - 1));
                        }
                    }
                    Err(e) => out.push_str(&format!(
                        "; {topic}/{} no offsets after {:?}: {e}",
                        partition.id(),
                        started.elapsed()
                    )),
                }
            }
            if let Some((partition, offset)) = newest {
                let mut list = rdkafka::TopicPartitionList::new();
                list.add_partition_offset(&topic, partition, rdkafka::Offset::Offset(offset))?;
                consumer.assign(&list)?;
                let started = Instant::now();
                let fetched = loop {
                    match consumer.poll(Duration::from_millis(200)) {
                        Some(Ok(_)) => {
                            break format!(
                                "fetched offset {offset} of partition {partition} in {:?}",
                                started.elapsed()
                            )
                        }
                        Some(Err(e)) => break format!("fetch failed after {:?}: {e}", started.elapsed()),
                        None if started.elapsed() > timeout => break format!("nothing fetched in {timeout:?}"),
                        None => {}
                    }
                };
                out.push_str(&format!("; {fetched}"));
            }
            Ok(out)
        });
        match probe.await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => format!("failed: {e}"),
            Err(e) => format!("panicked: {e}"),
        }
    }

    pub async fn pool(&self, service: &str) -> anyhow::Result<PgPool> {
        Ok(PgPoolOptions::new().max_connections(2).connect(&self.database_url(service)).await?)
    }

    pub async fn set_stock(&self, sku: &str, available: i64) -> anyhow::Result<()> {
        let response = self
            .http
            .put(self.url("inventory", &format!("/api/v1/stock/{sku}")))
            .json(&json!({"available": available}))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("setting stock failed: {}", response.text().await?);
        }
        Ok(())
    }

    pub async fn stock(&self, sku: &str) -> anyhow::Result<i64> {
        let body: Value =
            self.http.get(self.url("inventory", &format!("/api/v1/stock/{sku}"))).send().await?.json().await?;
        body["available"].as_i64().context("no available count")
    }

    /// Places an order; returns the HTTP status and body.
    /// Where a service's log is (`<service>.log`).
    pub fn log_path(&self, service: &str) -> PathBuf {
        self.log_dir.join(format!("{service}.log"))
    }

    pub async fn place_order(&self, key: &str, order: &Value) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(self.url("order", "/api/v1/orders"))
            .header("Idempotency-Key", key)
            .json(order)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    pub async fn saga(&self, id: &str) -> anyhow::Result<Value> {
        let response = self.http.get(self.url("orchestrator", &format!("/api/v1/sagas/{id}"))).send().await?;
        if !response.status().is_success() {
            bail!("GET saga {id}: {}", response.status());
        }
        Ok(response.json().await?)
    }

    /// Waits until a saga has a terminal status, and returns it.
    pub async fn wait_terminal(&self, saga_id: &str, timeout: Duration) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            if let Ok(saga) = self.saga(saga_id).await {
                if matches!(saga["status"].as_str(), Some("COMPLETED" | "FAILED" | "NEEDS_ATTENTION")) {
                    return Ok(saga);
                }
                if started.elapsed() > timeout {
                    bail!(
                        "saga {saga_id} still {} after {timeout:?}: {saga:#}{}",
                        saga["status"],
                        self.diagnostics().await
                    );
                }
            } else if started.elapsed() > timeout {
                bail!("saga {saga_id} never appeared within {timeout:?}{}", self.diagnostics().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET on the orchestrator's API with the admin token: (status, body).
    pub async fn api_get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let response = self.http.get(self.url("orchestrator", path)).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// POST on the orchestrator's API with the admin token and an optional Idempotency-Key.
    pub async fn api_post(&self, path: &str, body: &Value, key: Option<&str>) -> anyhow::Result<(u16, Value)> {
        let mut request = self.http.post(self.url("orchestrator", path)).json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Starts a saga through the API; returns its id.
    pub async fn start_saga(&self, saga_type: &str, input: &Value, key: &str) -> anyhow::Result<String> {
        let body = json!({"saga_type": saga_type, "input": input, "business_key": key});
        let (status, saga) = self.api_post("/api/v1/sagas", &body, Some(key)).await?;
        if status != 201 {
            bail!("starting a {saga_type} saga: {status} {saga}");
        }
        Ok(saga["id"].as_str().context("saga id")?.to_owned())
    }

    /// Waits until a saga has `status`, and returns it.
    pub async fn wait_status(&self, saga_id: &str, status: &str, timeout: Duration) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            let saga = self.saga(saga_id).await?;
            if saga["status"] == status {
                return Ok(saga);
            }
            if started.elapsed() > timeout {
                bail!("saga {saga_id} is {} and not {status} after {timeout:?}: {saga:#}", saga["status"]);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn order(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self.http.get(self.url("order", &format!("/api/v1/orders/{id}"))).send().await?.json().await?)
    }

    /// Stops every process and drops the run's databases.
    /// Everything `service` logged in this run, across its restarts.
    pub fn log(&self, service: &str) -> String {
        std::fs::read_to_string(self.log_dir.join(format!("{service}.log"))).unwrap_or_default()
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let running: Vec<&'static str> = self.processes().keys().copied().collect();
        for service in running {
            self.kill(service).await?;
        }
        let broker = self.broker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut child) = broker.and_then(|b| b.child) {
            child.start_kill()?;
            child.wait().await?;
        } else {
            // The shared broker outlives this system: its topics go with it.
            if let Err(error) = self.delete_topics().await {
                eprintln!("deleting the topics of {}: {error:#}", self.run_id);
            }
        }
        let admin = PgPoolOptions::new().max_connections(1).connect(&self.admin_url()).await?;
        for service in SERVICES {
            let name = format!("sagatest_{}_{}", self.run_id, service);
            sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&admin).await?;
        }
        Ok(())
    }
}

/// The input of the test sagas in `tests/definitions/` (reserve stock, then charge).
pub fn charge_input(sku: &str, quantity: i64, token: &str) -> Value {
    json!({
        "order_id": Uuid::new_v4(),
        "items": [{"sku": sku, "quantity": quantity}],
        "total_cents": 1250 * quantity,
        "currency": "USD",
        "payment_token": token,
    })
}

/// An order body for tests.
pub fn order_body(sku: &str, quantity: i64, token: &str, postal_code: &str) -> Value {
    json!({
        "customer_id": "customer-1",
        "items": [{"sku": sku, "quantity": quantity, "unit_price_cents": 1250}],
        "currency": "USD",
        "payment_token": token,
        "shipping_address": {"line1": "1 Main St", "city": "Springfield", "postal_code": postal_code, "country": "US"}
    })
}

#[cfg(test)]
mod tests {
    use super::claim_port;

    /// A port claimed by a live process is not handed out here; one whose claimant is gone is.
    #[test]
    fn a_port_claimed_by_another_live_process_is_refused_and_a_stale_claim_taken_over() {
        let dir = std::env::temp_dir().join("saga-e2e-ports");
        std::fs::create_dir_all(&dir).unwrap();
        // Ports above the range free_port uses, so that no test process claims them meanwhile.
        let (live, stale, fresh) = (65_001, 65_002, 65_003);
        std::fs::write(dir.join(live.to_string()), "1").unwrap(); // init: alive while the machine is
        std::fs::write(dir.join(stale.to_string()), "4194999").unwrap(); // above pid_max: no such process
        let _ = std::fs::remove_file(dir.join(fresh.to_string()));
        assert!(!claim_port(live), "held by a live process");
        assert!(claim_port(stale), "its claimant is gone");
        assert!(claim_port(fresh), "never claimed");
        assert!(claim_port(fresh), "this process's own claim");
        assert_eq!(std::fs::read_to_string(dir.join(stale.to_string())).unwrap(), std::process::id().to_string());
        for port in [live, stale, fresh] {
            let _ = std::fs::remove_file(dir.join(port.to_string()));
        }
    }
}
