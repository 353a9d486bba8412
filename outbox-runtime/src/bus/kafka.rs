//! Kafka through rdkafka: an idempotent producer (`acks=all`, so a retried send is neither lost
//! nor duplicated in the log) with the `murmur2_random` partitioner (the Java client's, so that
//! one key lands on one partition whatever the client), and topic creation through the admin
//! API, because brokers may not auto-create topics.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::error::Error;

/// How to reach the brokers and what topics to create.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port,host:port`.
    pub brokers: String,
    /// Any librdkafka property (`security.protocol`, `sasl.mechanisms`, `ssl.ca.location`, ...),
    /// applied to every client after the defaults, so it can override them.
    pub properties: BTreeMap<String, String>,
    /// Partitions of topics this process creates.
    pub partitions: i32,
    /// Replication factor of topics this process creates.
    pub replication: i32,
    /// How long to wait for a topic to be ready before giving up.
    pub topic_timeout: Duration,
    /// How long one publish may take before it counts as failed (the Go system used 10 s).
    pub publish_timeout: Duration,
}

impl KafkaConfig {
    /// Defaults for `brokers`: 3 partitions, replication 1, 30 s topic wait, 10 s publish
    /// timeout.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            properties: BTreeMap::new(),
            partitions: 3,
            replication: 1,
            topic_timeout: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
        }
    }

    /// Sets a librdkafka property.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// A client configuration: the brokers, then `defaults`, then the user's properties.
    pub(crate) fn client(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

/// One record to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The topic.
    pub topic: String,
    /// The message key.
    pub key: Option<String>,
    /// The value.
    pub value: Vec<u8>,
    /// The headers.
    pub headers: Vec<(&'static str, String)>,
}

impl Outgoing {
    fn record(&self) -> FutureRecord<'_, str, [u8]> {
        let mut h = rdkafka::message::OwnedHeaders::new_with_capacity(self.headers.len());
        for (k, v) in &self.headers {
            h = h.insert(rdkafka::message::Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&self.topic)
            .payload(&self.value[..])
            .headers(h);
        if let Some(k) = &self.key {
            record = record.key(k.as_str());
        }
        record
    }
}

/// What became of one record of [`KafkaBus::send_all`].
#[derive(Debug)]
pub enum Sent {
    /// The broker acknowledged it.
    Acked {
        /// Its partition.
        partition: i32,
        /// Its offset there.
        offset: i64,
    },
    /// It was not delivered.
    Failed(Error),
    /// Not handed to the producer, because an earlier record of its topic and key in the same
    /// call was refused.
    HeldBack,
}

impl Sent {
    /// The partition and offset of an acknowledged record; the error otherwise.
    pub fn into_result(self) -> Result<(i32, i64), Error> {
        match self {
            Sent::Acked { partition, offset } => Ok((partition, offset)),
            Sent::Failed(e) => Err(e),
            Sent::HeldBack => Err(Error::HeldBack),
        }
    }
}

/// Why an error means no retry can deliver the record: the dead-letter reason, or `None` for
/// an error worth retrying. A record larger than the producer's or the broker's
/// `message.max.bytes` stays too large however often it is sent.
pub fn permanent_failure(error: &Error) -> Option<&'static str> {
    match error {
        Error::Kafka(e)
            if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) =>
        {
            Some("message_too_large")
        }
        _ => None,
    }
}

enum Waiting {
    Delivery(rdkafka::producer::DeliveryFuture),
    Refused(Error),
    HeldBack,
}

/// A connected producer and admin client.
pub struct KafkaBus {
    config: KafkaConfig,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("brokers", &self.config.brokers)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Connects a producer and an admin client.
    pub fn new(config: KafkaConfig) -> Result<Self, Error> {
        let timeout = config.publish_timeout.as_millis().to_string();
        let producer = config
            .client(&[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("partitioner", "murmur2_random"),
                ("linger.ms", "2"),
                ("message.timeout.ms", &timeout),
            ])
            .create()?;
        let admin = config.client(&[]).create()?;
        Ok(Self {
            config,
            producer,
            admin,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// The producer.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Creates the topics that do not exist, with the configured partitions and replication,
    /// and waits until each has its partitions, at most the configured topic timeout.
    pub async fn ensure_topics(&self, topics: &[String]) -> Result<(), Error> {
        if topics.is_empty() {
            return Ok(());
        }
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    self.config.partitions,
                    TopicReplication::Fixed(self.config.replication),
                )
            })
            .collect();
        let opts = AdminOptions::new()
            .operation_timeout(Some(self.config.topic_timeout))
            .request_timeout(Some(self.config.topic_timeout));
        for result in self.admin.create_topics(&new, &opts).await? {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(Error::TopicCreate {
                        topic,
                        reason: code.to_string(),
                    });
                }
            }
        }
        let deadline = Instant::now() + self.config.topic_timeout;
        for topic in topics {
            loop {
                let ready = self
                    .producer
                    .client()
                    .fetch_metadata(Some(topic), Timeout::After(Duration::from_secs(5)))
                    .ok()
                    .is_some_and(|m| {
                        m.topics().iter().any(|t| {
                            t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                        })
                    });
                if ready {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(Error::TopicNotReady {
                        topic: topic.clone(),
                        waited: self.config.topic_timeout,
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Sends records together and waits for every acknowledgement: one outcome per record, in
    /// order. Records of one partition keep their order (the producer is idempotent).
    ///
    /// A key's records stay in order through failures too: once the producer refuses a record
    /// (too large, say), later records of the same topic and key are not handed to it and come
    /// back [`Sent::HeldBack`], so no later record of a key reaches the broker before an
    /// earlier one that failed.
    pub async fn send_all(&self, records: &[Outgoing]) -> Vec<Sent> {
        let mut refused: HashSet<(&str, Option<&str>)> = HashSet::new();
        let mut waiting = Vec::with_capacity(records.len());
        for r in records {
            let key = (r.topic.as_str(), r.key.as_deref());
            if r.key.is_some() && refused.contains(&key) {
                waiting.push(Waiting::HeldBack);
                continue;
            }
            let mut record = r.record();
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        waiting.push(Waiting::Delivery(delivery));
                        break;
                    }
                    // The local queue is full: wait for deliveries to drain it, then retry.
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                        back,
                    )) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        refused.insert(key);
                        waiting.push(Waiting::Refused(Error::Kafka(e)));
                        break;
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(waiting.len());
        for w in waiting {
            out.push(match w {
                Waiting::Delivery(delivery) => match delivery.await {
                    Ok(Ok(d)) => Sent::Acked {
                        partition: d.partition,
                        offset: d.offset,
                    },
                    Ok(Err((e, _))) => Sent::Failed(Error::Kafka(e)),
                    Err(_) => Sent::Failed(Error::Kafka(rdkafka::error::KafkaError::Canceled)),
                },
                Waiting::Refused(e) => Sent::Failed(e),
                Waiting::HeldBack => Sent::HeldBack,
            });
        }
        out
    }

    /// Sends one record and waits for the broker's acknowledgement.
    pub async fn send(&self, record: &Outgoing) -> Result<(i32, i64), Error> {
        match self
            .producer
            .send(record.record(), Timeout::After(self.config.publish_timeout))
            .await
        {
            Ok(d) => Ok((d.partition, d.offset)),
            Err((e, _)) => Err(Error::Kafka(e)),
        }
    }
}
