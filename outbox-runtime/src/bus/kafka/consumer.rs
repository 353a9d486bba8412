//! A member of a consumer group: rdkafka's `StreamConsumer`, with offsets stored by hand after
//! each message is settled and committed by librdkafka every 500 ms.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::KafkaConfig;
use crate::bus::{Position, Receive, Received};
use crate::error::Error;

/// A member of a Kafka consumer group. See [`Receive`].
pub struct KafkaReceiver {
    consumer: Arc<StreamConsumer>,
    topics: Vec<String>,
}

impl std::fmt::Debug for KafkaReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaReceiver").finish_non_exhaustive()
    }
}

impl KafkaReceiver {
    pub(super) fn new(config: &KafkaConfig, group: &str, topics: &[String]) -> Result<Self, Error> {
        let consumer: StreamConsumer = config
            .client(&[
                ("group.id", group),
                ("enable.auto.commit", "true"),
                ("auto.commit.interval.ms", "500"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                // An outbox consumer favours latency: some Kafka-protocol brokers (tansu) hold
                // a fetch for the whole wait even when data is there.
                ("fetch.wait.max.ms", "100"),
            ])
            .create()?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names)?;
        Ok(Self {
            consumer: Arc::new(consumer),
            topics: topics.to_vec(),
        })
    }
}

impl Receive for KafkaReceiver {
    async fn recv(&self) -> Result<Received, Error> {
        let m = self.consumer.recv().await?;
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Received {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
        })
    }

    fn store_offset(&self, topic: &str, partition: i32, offset: i64) -> Result<(), Error> {
        Ok(self.consumer.store_offset(topic, partition, offset)?)
    }

    fn assigned(&self) -> usize {
        self.consumer.assignment().map_or(0, |a| a.count())
    }

    async fn commit(&self) -> Result<(), Error> {
        // A synchronous commit waits for the coordinator: off the tokio workers.
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
        Ok(())
    }

    async fn positions(&self) -> Result<Vec<Position>, Error> {
        // Metadata, committed offsets and watermarks wait for the broker: off the tokio
        // workers.
        let (consumer, topics) = (self.consumer.clone(), self.topics.clone());
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(5);
            let mut list = TopicPartitionList::new();
            for topic in &topics {
                let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
                for t in metadata.topics() {
                    for p in t.partitions() {
                        list.add_partition(topic, p.id());
                    }
                }
            }
            let committed = consumer.committed_offsets(list, timeout)?;
            let mut out = Vec::new();
            for e in committed.elements() {
                let (low, end) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout)?;
                let committed = match e.offset() {
                    Offset::Offset(at) => at,
                    _ => low,
                };
                out.push(Position {
                    topic: e.topic().to_owned(),
                    partition: e.partition(),
                    committed,
                    end,
                });
            }
            Ok::<_, Error>(out)
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
    }

    async fn rejoin(&self) -> Result<(), Error> {
        // Unsubscribing leaves the group (librdkafka sends LeaveGroup); subscribing again joins
        // it as a new member, and the coordinator forms a new generation for every member.
        let (consumer, topics) = (self.consumer.clone(), self.topics.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "offset commit before leaving the group");
            }
            consumer.unsubscribe();
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer.subscribe(&names)
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
        Ok(())
    }
}
