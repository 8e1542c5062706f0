//! Kafka clients built from [`KafkaConfig`]: our defaults first, then the pass-through properties,
//! so every librdkafka setting can be overridden.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;

use secrecy::ExposeSecret;

use crate::config::KafkaConfig;
use crate::progress::Progress;

fn base(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka_brokers)
        // After a broker restart, reconnect within a second (the Java client's default) rather
        // than librdkafka's 10 s backoff, which held every saga up for seconds after the broker
        // was back.
        .set("reconnect.backoff.max.ms", "1000");
    set_all(&mut client, &config.kafka_properties);
    if let Some(password) = &config.kafka_sasl_password {
        client.set("sasl.password", password.expose_secret());
    }
    client
}

/// Applies pass-through properties last, so they override our defaults.
fn set_all(client: &mut ClientConfig, properties: &crate::config::Properties) {
    for (key, value) in properties.iter() {
        client.set(key, value);
    }
}

/// An idempotent producer (`enable.idempotence=true`, `acks=all`).
pub fn producer(config: &KafkaConfig, client_id: &str) -> Result<FutureProducer, KafkaError> {
    let mut client = base(config);
    client
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // 1 ms, not librdkafka's 5: every hop of a saga waits for it, and on two cores the
        // smaller batches cost no throughput (docs/performance.md, 2026-12-03 evening).
        .set("linger.ms", "1")
        .set("message.timeout.ms", "30000");
    set_all(&mut client, &config.kafka_producer_properties);
    client.create()
}

/// The consumer lag gauge, from librdkafka's statistics (`statistics.interval.ms`, 5 s unless
/// overridden): messages between the partition's end and the group's committed offset.
pub const CONSUMER_LAG: &str = "kafka_consumer_lag";

/// Reports each assigned partition's lag as `kafka_consumer_lag{group, topic, partition}`, and
/// logs rebalances and failed commits.
pub struct LagContext {
    group: String,
    /// The partitions whose lag this member has reported.
    reported: Mutex<BTreeSet<(String, i32)>>,
    /// What the last statistics report said of this member's place in its group.
    report: Mutex<Option<GroupReport>>,
    /// Where each report goes to tell how far the partitions are applied, if anywhere.
    progress: Option<Arc<Progress>>,
}

impl LagContext {
    fn new(group: &str, progress: Option<Arc<Progress>>) -> Self {
        Self { group: group.to_owned(), reported: Mutex::new(BTreeSet::new()), report: Mutex::new(None), progress }
    }

    /// The last statistics report's view of this member in its group (none before the first).
    pub fn group_report(&self) -> Option<GroupReport> {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record_group_report(&self, statistics: &Statistics) {
        let Some(cgrp) = &statistics.cgrp else { return };
        let report = GroupReport {
            state: format!("{}/{}", cgrp.state, cgrp.join_state),
            in_group: cgrp.state == "up" && cgrp.join_state == "steady",
            assigned: cgrp.assignment_size.max(0) as usize,
            broker_up: statistics.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP"),
            at: Instant::now(),
        };
        let mut last = self.report.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref().is_none_or(|l| l.state != report.state) {
            tracing::debug!(group = %self.group, state = %report.state, assigned = report.assigned, "consumer group state");
        }
        *last = Some(report);
    }
}

/// One statistics report's view of a consumer in its group (librdkafka's `cgrp` and brokers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupReport {
    /// librdkafka's group state and join state, e.g. `up/steady`.
    pub state: String,
    /// A member that takes part in its group: state `up`, join state `steady`.
    pub in_group: bool,
    /// Partitions assigned to this member.
    pub assigned: usize,
    /// Whether a connection to some broker is up.
    pub broker_up: bool,
    /// When the report arrived.
    pub at: Instant,
}

/// One partition of a statistics report: topic, partition, assigned to this member (librdkafka's
/// `desired`), and its lag (-1 when not known).
type PartitionReport = (String, i32, bool, i64);

fn partition_reports(statistics: &Statistics) -> Vec<PartitionReport> {
    statistics
        .topics
        .iter()
        .flat_map(|(topic, stats)| {
            stats.partitions.values().map(|p| (topic.clone(), p.partition, p.desired, p.consumer_lag))
        })
        .collect()
}

/// The lag samples one statistics report gives: each partition this member is assigned with a
/// known lag, and 0 for each partition it reported before and is no longer assigned. librdkafka
/// keeps a revoked partition in its statistics with the lag it had when it was revoked; reporting
/// that would show a lag that nobody will ever consume away. An assigned partition whose lag is
/// not known yet (-1) keeps its last sample.
fn lag_samples(report: Vec<PartitionReport>, reported: &mut BTreeSet<(String, i32)>) -> Vec<(String, i32, i64)> {
    let mut samples = Vec::new();
    let mut assigned = BTreeSet::new();
    // Partition -1 is librdkafka's internal unassigned queue.
    for (topic, partition, _, lag) in report.into_iter().filter(|&(_, partition, desired, _)| partition >= 0 && desired)
    {
        assigned.insert((topic.clone(), partition));
        if lag >= 0 {
            reported.insert((topic.clone(), partition));
            samples.push((topic, partition, lag));
        }
    }
    reported.retain(|(topic, partition)| {
        let still = assigned.contains(&(topic.clone(), *partition));
        if !still {
            samples.push((topic.clone(), *partition, 0));
        }
        still
    });
    samples
}

impl ClientContext for LagContext {
    fn stats(&self, statistics: Statistics) {
        self.record_group_report(&statistics);
        if let Some(progress) = &self.progress {
            progress.observe(&statistics, chrono::Utc::now());
        }
        let samples =
            lag_samples(partition_reports(&statistics), &mut self.reported.lock().unwrap_or_else(|e| e.into_inner()));
        for (topic, partition, lag) in samples {
            metrics::gauge!(CONSUMER_LAG, "group" => self.group.clone(), "topic" => topic, "partition" => partition.to_string())
                .set(lag as f64);
        }
    }
}

impl ConsumerContext for LagContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let describe = |list: &TopicPartitionList| {
            list.elements().iter().map(|e| format!("{}/{}", e.topic(), e.partition())).collect::<Vec<_>>().join(", ")
        };
        match rebalance {
            Rebalance::Assign(list) => {
                tracing::info!(group = %self.group, partitions = %describe(list), "partitions assigned")
            }
            Rebalance::Revoke(list) => {
                tracing::info!(group = %self.group, partitions = %describe(list), "partitions revoked")
            }
            Rebalance::Error(error) => tracing::warn!(group = %self.group, %error, "rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            // Retried by the next auto-commit; a revoked partition's new owner resumes from the
            // last committed offset and its handlers deduplicate.
            tracing::warn!(group = %self.group, %error, offsets = offsets.count(), "committing offsets failed");
        }
    }
}

/// The consumer every service uses.
pub type GroupConsumer = StreamConsumer<LagContext>;

/// A consumer that stores offsets only when told to (`enable.auto.offset.store=false`): the
/// caller stores an offset after the transaction that applied the message has committed, and the
/// stored offsets are committed in the background.
pub fn consumer(config: &KafkaConfig, group_id: &str, topics: &[String]) -> Result<GroupConsumer, KafkaError> {
    consumer_with_progress(config, group_id, topics, None)
}

/// [`consumer`], whose statistics reports also go to `progress`, every second unless
/// `statistics.interval.ms` says otherwise: the time a partition is known to be applied up to lags
/// its reports by about one interval.
pub fn consumer_with_progress(
    config: &KafkaConfig,
    group_id: &str,
    topics: &[String],
    progress: Option<Arc<Progress>>,
) -> Result<GroupConsumer, KafkaError> {
    let mut client = base(config);
    client
        .set("group.id", group_id)
        .set("client.id", group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", if progress.is_some() { "1000" } else { "5000" });
    if !uses_consumer_group_protocol(config) {
        // Under the classic protocol a rebalance moves only the partitions that change hands.
        client.set("partition.assignment.strategy", "cooperative-sticky");
    }
    set_all(&mut client, &config.kafka_consumer_properties);
    let consumer: GroupConsumer = client.create_with_context(LagContext::new(group_id, progress))?;
    await_topics(consumer.client(), topics, TOPICS_VISIBLE_WITHIN)?;
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// How long a consumer waits for the topics it subscribes to to be listed by the broker.
const TOPICS_VISIBLE_WITHIN: Duration = Duration::from_secs(30);

/// Waits until the broker lists every topic of `topics` with a leader for each of its
/// partitions, through the client's own metadata, so that its first group join sees them.
///
/// A topic that was just created (by this service, or by another starting at the same time) is
/// not in every broker's metadata at once. A consumer that subscribes before it is listed joins
/// its group without it and looks again only at its next metadata refresh
/// (`topic.metadata.refresh.interval.ms`, five minutes by default): meanwhile nothing published
/// to that topic is consumed, and nothing says so. A topic still not listed after `within` is
/// an error naming it.
pub(crate) fn await_topics<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topics: &[String],
    within: Duration,
) -> KafkaResult<()> {
    let deadline = Instant::now() + within;
    let mut missing: Vec<&String> = topics.iter().collect();
    let mut missing_before = 0;
    loop {
        let mut still = Vec::new();
        for topic in missing {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(100), Duration::from_secs(5));
            let listed = client.fetch_metadata(Some(topic), left).is_ok_and(|metadata| {
                metadata.topics().iter().any(|t| {
                    t.name() == topic
                        && t.error().is_none()
                        && !t.partitions().is_empty()
                        && t.partitions().iter().all(|p| p.error().is_none() && p.leader() >= 0)
                })
            });
            if !listed {
                still.push(topic);
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let names: Vec<&str> = still.iter().map(|t| t.as_str()).collect();
            return Err(KafkaError::Subscription(format!(
                "the broker does not list the topic(s) {} after {} s: create them (or set KAFKA_CREATE_TOPICS=true)",
                names.join(", "),
                within.as_secs()
            )));
        }
        if still.len() != missing_before {
            tracing::info!(topics = ?still, "waiting for the broker to list the topics to subscribe to");
        }
        missing_before = still.len();
        missing = still;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether the consumers use the new consumer group protocol (KIP-848, `group.protocol=consumer`).
/// The broker then owns assignment, session and heartbeat, and librdkafka refuses a consumer
/// that sets `partition.assignment.strategy`, `session.timeout.ms` or `heartbeat.interval.ms`.
pub fn uses_consumer_group_protocol(config: &KafkaConfig) -> bool {
    config
        .kafka_consumer_properties
        .get("group.protocol")
        .or_else(|| config.kafka_properties.get("group.protocol"))
        .is_some_and(|protocol| protocol.eq_ignore_ascii_case("consumer"))
}

/// Creates the topics that do not exist yet; existing ones are left as they are.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[String]) -> anyhow::Result<()> {
    if !config.kafka_create_topics || topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = base(config).create()?;
    let dead_letter_retention = config.kafka_dead_letter_retention.0.map(|keep| keep.as_millis().to_string());
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| {
            let topic = NewTopic::new(
                name,
                config.kafka_topic_partitions,
                TopicReplication::Fixed(config.kafka_topic_replication),
            );
            match &dead_letter_retention {
                Some(ms) if name.ends_with(crate::dead_letter::SUFFIX) => topic.set("retention.ms", ms),
                _ => topic,
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(topic) => tracing::info!(topic, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Records the errors librdkafka reports while [`check_connection`] waits for a broker.
#[derive(Default)]
struct StartupContext {
    errors: Mutex<Vec<(Option<RDKafkaErrorCode>, String)>>,
    /// Connections the broker closed before answering the first request (ApiVersion).
    closed_unanswered: std::sync::atomic::AtomicU32,
}

/// How many connections closed by the broker before it answered anything make a protocol
/// mismatch: a broker that is merely away refuses the connection instead, and one shutting down
/// closes a connection once, not every time. (librdkafka logs a repeated failure once more, as
/// "N identical error(s) suppressed", then falls silent: two lines is what a mismatch gives.)
const CLOSED_UNANSWERED_LIMIT: u32 = 2;

/// Whether a librdkafka log line says the broker closed the connection before it answered the
/// first request: what a plaintext client sees at a TLS or SASL listener.
fn closed_before_answering(message: &str) -> bool {
    message.contains("in state APIVERSION_QUERY")
        && (message.contains("connection closed by peer")
            || message.contains("Disconnected while requesting ApiVersion"))
}

impl rdkafka::producer::ProducerContext for StartupContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

impl ClientContext for StartupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        if closed_before_answering(message) {
            self.closed_unanswered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        DefaultClientContext.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "connecting to Kafka");
        self.errors.lock().unwrap_or_else(|e| e.into_inner()).push((error.rdkafka_error_code(), reason.to_owned()));
    }
}

/// Whether an error librdkafka reported means the client's settings do not fit the broker's,
/// which no retry cures: refused credentials, a failed TLS handshake (untrusted or wrong
/// certificate, a TLS client at a plaintext listener, a client certificate the broker refused:
/// OpenSSL's reason), or a plaintext client at a TLS listener (librdkafka's own diagnosis names
/// `security.protocol`).
fn is_misconfiguration(code: Option<RDKafkaErrorCode>, reason: &str) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::SSL
                | RDKafkaErrorCode::UnsupportedSASLMechanism
                | RDKafkaErrorCode::IllegalSASLState
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
        )
    ) || ["security.protocol", "SSL routines", "SSL handshake", "certificate"]
        .iter()
        .any(|words| reason.contains(words))
}

/// Waits until a broker answers a metadata request, at most `kafka_connect_timeout`. Fails at
/// once, with librdkafka's reason, when the broker refuses the client's security settings; so a
/// wrong password, an untrusted certificate or the wrong protocol ends the start-up with a clear
/// error instead of a service that retries for ever while looking alive.
pub async fn check_connection(config: &KafkaConfig) -> anyhow::Result<()> {
    let client: rdkafka::producer::BaseProducer<StartupContext> = base(config)
        .set("client.id", "startup-check")
        .create_with_context(StartupContext::default())
        .map_err(|e| anyhow::anyhow!("the Kafka settings are not valid: {e}"))?;
    let brokers = config.kafka_brokers.clone();
    let timeout = config.kafka_connect_timeout;
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut last_error = "no answer".to_owned();
        loop {
            let attempt = client.client().fetch_metadata(None, Duration::from_millis(500));
            // Errors reach the context only while the client's queue is served.
            client.poll(Duration::from_millis(100));
            let errors = std::mem::take(&mut *client.context().errors.lock().unwrap_or_else(|e| e.into_inner()));
            if let Some((_, reason)) = errors.last() {
                last_error = reason.clone();
            }
            if let Some((_, reason)) = errors.iter().find(|(code, reason)| is_misconfiguration(*code, reason)) {
                anyhow::bail!("Kafka at {brokers} refused this client's settings: {reason}");
            }
            let closed = client.context().closed_unanswered.load(std::sync::atomic::Ordering::Relaxed);
            if attempt.is_err() && closed >= CLOSED_UNANSWERED_LIMIT {
                anyhow::bail!(
                    "Kafka at {brokers} refused this client's settings: the broker closed {closed} connections before \
                     answering; is it a TLS or SASL listener? (set security.protocol in KAFKA_PROPERTIES)"
                );
            }
            match attempt {
                Ok(metadata) if !metadata.brokers().is_empty() => return Ok(()),
                outcome if started.elapsed() >= timeout => {
                    let error =
                        outcome.err().map_or_else(|| "a metadata answer without brokers".to_owned(), |e| e.to_string());
                    anyhow::bail!("no Kafka broker at {brokers} answered within {timeout:?}: {error} ({last_error})");
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await?
}

/// Asks the cluster for its metadata: true when a broker answered within `timeout`.
pub async fn broker_reachable(producer: &FutureProducer, timeout: Duration) -> bool {
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout).is_ok()).await.unwrap_or(false)
}

/// A consumer of the group `group` that never joins it: it only reads the group's committed
/// offsets and the partitions' ends, for [`group_backlog`]. Create it once and keep it.
pub fn backlog_reader(config: &KafkaConfig, group: &str) -> Result<BaseConsumer, KafkaError> {
    let mut client = base(config);
    set_all(&mut client, &config.kafka_consumer_properties);
    client.set("group.id", group).set("enable.auto.commit", "false");
    client.create()
}

/// How many messages of `topic` the reader's consumer group has not consumed yet, over all
/// partitions: each partition's end less the group's committed offset (its start, when the group
/// committed nothing). Asks the brokers; for stats endpoints and gauges, not hot paths.
pub async fn group_backlog(
    reader: std::sync::Arc<BaseConsumer>,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<i64> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
        let metadata = reader.fetch_metadata(Some(&topic), timeout)?;
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        let mut list = TopicPartitionList::new();
        for partition in &partitions {
            list.add_partition(&topic, *partition);
        }
        let committed = reader.committed_offsets(list, timeout)?;
        let mut backlog = 0;
        for partition in partitions {
            let (low, high) = reader.fetch_watermarks(&topic, partition, timeout)?;
            let position = committed
                .find_partition(&topic, partition)
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0)
                .unwrap_or(low);
            backlog += (high - position.max(low)).max(0);
        }
        Ok(backlog)
    })
    .await?
}

/// A plain consumer outside any group, for reading topics by offset (dead letters): it never
/// joins a group or commits, and reports the end of each partition.
pub fn reader(config: &KafkaConfig, client_id: &str) -> Result<rdkafka::consumer::BaseConsumer, KafkaError> {
    let mut client = base(config);
    set_all(&mut client, &config.kafka_consumer_properties);
    client
        .set("group.id", client_id)
        .set("client.id", client_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true");
    client.create()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every producer's polling thread polls in windows of 100 ms. rdkafka 0.39 rounded the last
    /// part of a millisecond of a window down to no wait at all, and spun through it: a hundredth
    /// of a core per producer, idle or not (vendor/rdkafka/PATCHED.md). The patched copy waits.
    #[test]
    fn a_poll_waits_through_the_last_part_of_a_millisecond_instead_of_spinning() {
        let producer: rdkafka::producer::BaseProducer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:1").create().unwrap();
        // This thread's time on a CPU, in nanoseconds (Linux).
        let on_cpu = || -> u64 {
            let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("Linux's schedstat");
            stat.split_whitespace().next().and_then(|ns| ns.parse().ok()).expect("nanoseconds on a CPU")
        };
        let before = on_cpu();
        for _ in 0..200 {
            producer.poll(Duration::from_micros(900));
        }
        let spent = Duration::from_nanos(on_cpu() - before);
        // Spinning, 200 polls of 0.9 ms take ~180 ms of CPU; waiting, a few.
        assert!(spent < Duration::from_millis(60), "200 polls of 0.9 ms took {spent:?} of CPU");
    }

    #[test]
    fn refused_settings_are_told_apart_from_a_broker_that_is_away() {
        let refused = [
            (Some(RDKafkaErrorCode::Authentication), "SASL authentication error: Authentication failed"),
            (Some(RDKafkaErrorCode::SSL), "SSL handshake failed: certificate verify failed"),
            (
                Some(RDKafkaErrorCode::BrokerTransportFailure),
                "Disconnected while requesting ApiVersion: might be caused by incorrect security.protocol configuration",
            ),
            (
                Some(RDKafkaErrorCode::BrokerTransportFailure),
                "ssl://localhost:9095/bootstrap: Receive failed: error:0A000412:SSL routines::sslv3 alert bad certificate",
            ),
        ];
        for (code, reason) in refused {
            assert!(is_misconfiguration(code, reason), "{reason}");
        }
        let away = [
            (
                Some(RDKafkaErrorCode::BrokerTransportFailure),
                "Connect to ipv4#127.0.0.1:9092 failed: Connection refused",
            ),
            (Some(RDKafkaErrorCode::AllBrokersDown), "1/1 brokers are down"),
        ];
        for (code, reason) in away {
            assert!(!is_misconfiguration(code, reason), "{reason}");
        }
    }

    #[test]
    fn a_connection_closed_before_the_first_answer_is_told_apart_from_other_disconnects() {
        assert!(closed_before_answering(
            "localhost:9094/bootstrap: Disconnected: connection closed by peer: receive 0 after POLLIN (after 24ms in state APIVERSION_QUERY)"
        ));
        assert!(!closed_before_answering(
            "127.0.0.1:9092/1: Disconnected: connection reset by peer (after 3152ms in state UP)"
        ));
        assert!(!closed_before_answering(
            "Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after 0ms in state CONNECT)"
        ));
    }

    fn report(parts: &[(&str, i32, bool, i64)]) -> Vec<PartitionReport> {
        parts.iter().map(|&(t, p, d, l)| (t.to_owned(), p, d, l)).collect()
    }

    #[test]
    fn a_revoked_partition_stops_reporting_its_last_lag() {
        let mut reported = BTreeSet::new();
        let first = lag_samples(
            report(&[("replies", 0, true, 3), ("replies", 1, true, 1), ("replies", -1, false, 0)]),
            &mut reported,
        );
        assert_eq!(first, vec![("replies".to_owned(), 0, 3), ("replies".to_owned(), 1, 1)]);

        // Partition 1 moved to another member; librdkafka still lists it with its old lag.
        let second = lag_samples(report(&[("replies", 0, true, 0), ("replies", 1, false, 1)]), &mut reported);
        assert_eq!(second, vec![("replies".to_owned(), 0, 0), ("replies".to_owned(), 1, 0)]);

        // Said once: a partition given away is not reported again until it comes back.
        let third = lag_samples(report(&[("replies", 0, true, 0), ("replies", 1, false, 1)]), &mut reported);
        assert_eq!(third, vec![("replies".to_owned(), 0, 0)]);
        let back = lag_samples(report(&[("replies", 1, true, 2)]), &mut reported);
        assert_eq!(back, vec![("replies".to_owned(), 1, 2), ("replies".to_owned(), 0, 0)]);
    }

    #[test]
    fn an_assigned_partition_with_an_unknown_lag_keeps_its_last_sample() {
        let mut reported = BTreeSet::new();
        lag_samples(report(&[("commands", 0, true, 4)]), &mut reported);
        let unknown = lag_samples(report(&[("commands", 0, true, -1)]), &mut reported);
        assert!(unknown.is_empty(), "{unknown:?}");
        assert!(reported.contains(&("commands".to_owned(), 0)));
    }
}
