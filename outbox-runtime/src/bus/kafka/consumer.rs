//! A member of a consumer group: rdkafka's `StreamConsumer`, with offsets stored by hand after
//! each message is settled and committed by librdkafka every 500 ms.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::KafkaConfig;
use crate::bus::{Position, Receive, Received};
use crate::error::Error;

/// The `client.id` of this framework's consumers, unless the configuration sets another: how
/// [`foreign_members`] tells them from the members of other systems in a group.
const CLIENT_ID: &str = "outbox-rs";

/// Whether a group member with `client_id` belongs to another system, when this framework's
/// consumers use `ours`. A member with no client id tells nothing: a coordinator may list a
/// member whose process died without one (tansu does, after a kill -9).
fn is_foreign(client_id: &str, ours: &str) -> bool {
    !client_id.is_empty() && client_id != ours
}

/// The members of `group` whose client id is not this framework's consumers' (a blocking
/// call: the group's description from its coordinator).
pub(super) fn foreign_members(config: &KafkaConfig, group: &str) -> Result<Vec<String>, Error> {
    let ours = config
        .properties
        .get("client.id")
        .map_or(CLIENT_ID, String::as_str);
    let client: BaseConsumer = config.client(&[]).create()?;
    let groups = client.fetch_group_list(Some(group), Duration::from_secs(10))?;
    Ok(groups
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .flat_map(|g| g.members())
        .filter(|m| is_foreign(m.client_id(), ours))
        .map(|m| format!("{}@{}", m.client_id(), m.client_host()))
        .collect())
}

/// A member of a Kafka consumer group. See [`Receive`].
pub struct KafkaReceiver {
    /// The current client: [`Receive::rejoin`] replaces it.
    consumer: std::sync::RwLock<Arc<StreamConsumer>>,
    config: KafkaConfig,
    group: String,
    topics: Vec<String>,
}

impl std::fmt::Debug for KafkaReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaReceiver").finish_non_exhaustive()
    }
}

impl KafkaReceiver {
    pub(super) fn new(config: &KafkaConfig, group: &str, topics: &[String]) -> Result<Self, Error> {
        let consumer = Self::client(config, group, topics)?;
        Ok(Self {
            consumer: std::sync::RwLock::new(Arc::new(consumer)),
            config: config.clone(),
            group: group.to_owned(),
            topics: topics.to_vec(),
        })
    }

    /// A new client in `group`, subscribed to `topics`.
    fn client(
        config: &KafkaConfig,
        group: &str,
        topics: &[String],
    ) -> Result<StreamConsumer, Error> {
        let consumer: StreamConsumer = config
            .client(&[
                ("client.id", CLIENT_ID),
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
        Ok(consumer)
    }

    fn current(&self) -> Arc<StreamConsumer> {
        self.consumer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Receive for KafkaReceiver {
    async fn recv(&self) -> Result<Received, Error> {
        let consumer = self.current();
        let m = consumer.recv().await?;
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
        Ok(self.current().store_offset(topic, partition, offset)?)
    }

    fn assigned(&self) -> usize {
        self.current().assignment().map_or(0, |a| a.count())
    }

    async fn commit(&self) -> Result<(), Error> {
        // A synchronous commit waits for the coordinator: off the tokio workers.
        let consumer = self.current();
        tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
        Ok(())
    }

    async fn positions(&self) -> Result<Vec<Position>, Error> {
        // Metadata, committed offsets and watermarks wait for the broker: off the tokio
        // workers.
        let (consumer, topics) = (self.current(), self.topics.clone());
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
        // A new client, on a new connection: a coordinator that stopped answering one
        // connection (tansu 0.6 holds a follower's SyncGroup while the leader it waits for is
        // dead, and the heartbeats queued behind it time out) is not asked again on it. The new
        // member's join makes the coordinator drop members whose session ran out and form a
        // new generation. Offsets stored since the last automatic commit (500 ms) are
        // delivered again and skipped as done.
        let fresh = Arc::new(Self::client(&self.config, &self.group, &self.topics)?);
        let old = std::mem::replace(
            &mut *self
                .consumer
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            fresh,
        );
        // Closing leaves the group and may wait for the coordinator: off the tokio workers,
        // and not waited for. A receive still holding the old client lets go of it first, so
        // that the close runs here.
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(old);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_foreign_only_by_a_client_id_of_its_own() {
        assert!(is_foreign("kafka-go", CLIENT_ID));
        assert!(is_foreign("rdkafka", CLIENT_ID));
        assert!(!is_foreign(CLIENT_ID, CLIENT_ID));
        // A dead member a coordinator lists without its client id.
        assert!(!is_foreign("", CLIENT_ID));
        assert!(!is_foreign("billing", "billing"));
    }
}
