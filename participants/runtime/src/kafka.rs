//! Kafka clients built from [`KafkaConfig`]: our defaults first, then the pass-through properties,
//! so every librdkafka setting can be overridden.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;

fn base(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka_brokers);
    set_all(&mut client, &config.kafka_properties);
    client
}

/// Applies pass-through properties last, so they override our defaults.
fn set_all(client: &mut ClientConfig, properties: &crate::config::Properties) {
    for (key, value) in properties {
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
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000");
    set_all(&mut client, &config.kafka_producer_properties);
    client.create()
}

/// The consumer lag gauge, from librdkafka's statistics (`statistics.interval.ms`, 5 s unless
/// overridden): messages between the partition's end and the group's committed offset.
pub const CONSUMER_LAG: &str = "kafka_consumer_lag";

/// Reports each assigned partition's lag as `kafka_consumer_lag{group, topic, partition}`.
pub struct LagContext {
    group: String,
}

impl ClientContext for LagContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in statistics.topics {
            for (partition, p) in stats.partitions {
                // Partition -1 is librdkafka's internal unassigned queue; -1 lag means unknown.
                if partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!(CONSUMER_LAG, "group" => self.group.clone(), "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for LagContext {}

/// The consumer every service uses.
pub type GroupConsumer = StreamConsumer<LagContext>;

/// A consumer that stores offsets only when told to (`enable.auto.offset.store=false`): the
/// caller stores an offset after the transaction that applied the message has committed, and the
/// stored offsets are committed in the background.
pub fn consumer(config: &KafkaConfig, group_id: &str, topics: &[String]) -> Result<GroupConsumer, KafkaError> {
    let mut client = base(config);
    client
        .set("group.id", group_id)
        .set("client.id", group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("statistics.interval.ms", "5000");
    set_all(&mut client, &config.kafka_consumer_properties);
    let consumer: GroupConsumer = client.create_with_context(LagContext { group: group_id.to_owned() })?;
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// Creates the topics that do not exist yet; existing ones are left as they are.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[String]) -> anyhow::Result<()> {
    if !config.kafka_create_topics || topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = base(config).create()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| {
            NewTopic::new(name, config.kafka_topic_partitions, TopicReplication::Fixed(config.kafka_topic_replication))
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

/// Asks the cluster for its metadata: true when a broker answered within `timeout`.
pub async fn broker_reachable(producer: &FutureProducer, timeout: Duration) -> bool {
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout).is_ok()).await.unwrap_or(false)
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
