//! The message bus, behind two traits: [`Publish`] (what the relay needs) and [`Receive`]
//! (what a consumer needs: partitions, offsets, commits), tied together by [`Bus`].
//!
//! Two implementations: [`KafkaBus`] (rdkafka, with its producer, consumer and admin client in
//! modules of their own, as rdkafka lays them out) and [`MemoryBus`], an in-process bus with the
//! Kafka semantics the outbox relies on (a key's partition by the same murmur2 rule, order per
//! partition, committed offsets per consumer group, redelivery from the committed offset after a
//! consumer restarts, partitions shared among a group's members). The in-memory bus is for unit
//! tests and for testing handlers (see the `testing` feature); never for production.

use std::future::Future;

use crate::error::Error;

#[cfg(feature = "kafka")]
mod kafka;
mod memory;

#[cfg(feature = "kafka")]
pub use kafka::{KafkaBus, KafkaConfig, KafkaReceiver};
pub use memory::{MemoryBus, MemoryReceiver, partition_for};

/// One record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// What became of one record of [`Publish::send_all`].
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

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// Its key.
    pub key: Option<Vec<u8>>,
    /// Its value.
    pub payload: Option<Vec<u8>>,
    /// Its headers, in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Received {
    /// The first header called `name`, when it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok())
    }

    /// The key as text (lossy), when there is one.
    pub fn key_str(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }
}

/// Publishing: what a relay needs of a bus.
pub trait Publish: Send + Sync + 'static {
    /// Sends records together and waits for every acknowledgement: one outcome per record, in
    /// order. Records of one partition keep their order, and a key's records stay in order
    /// through failures: once a record is refused, later records of the same topic and key in
    /// this call are not sent and come back [`Sent::HeldBack`].
    fn send_all(&self, records: &[Outgoing]) -> impl Future<Output = Vec<Sent>> + Send;

    /// Sends one record and waits for its acknowledgement: its partition and offset.
    fn send(&self, record: &Outgoing) -> impl Future<Output = Result<(i32, i64), Error>> + Send {
        async move {
            match self.send_all(std::slice::from_ref(record)).await.pop() {
                Some(sent) => sent.into_result(),
                None => Err(Error::HeldBack),
            }
        }
    }

    /// Makes the topics that do not exist yet, and waits until each can be used.
    fn ensure_topics(&self, topics: &[String]) -> impl Future<Output = Result<(), Error>> + Send;
}

/// Receiving: what a consumer needs of a bus. A receiver is one member of a consumer group.
pub trait Receive: Send + Sync + 'static {
    /// The next message of this member's partitions.
    fn recv(&self) -> impl Future<Output = Result<Received, Error>> + Send;

    /// Marks a message as done: the group's committed offset of its partition moves past it
    /// (at the next commit). Fails when the partition is no longer this member's.
    fn store_offset(&self, topic: &str, partition: i32, offset: i64) -> Result<(), Error>;

    /// How many partitions this member has now.
    fn assigned(&self) -> usize;

    /// Commits the stored offsets now (a consumer does it before it stops).
    fn commit(&self) -> impl Future<Output = Result<(), Error>> + Send;

    /// Leaves the group and joins it again (after committing what is stored), so that the
    /// group rebalances: the way out of a coordinator that left some partitions to nobody.
    fn rejoin(&self) -> impl Future<Output = Result<(), Error>> + Send;

    /// The group's committed offset and the log's end on every partition of this member's
    /// topics, its own and the other members'.
    fn positions(&self) -> impl Future<Output = Result<Vec<Position>, Error>> + Send;
}

/// Where a consumer group is on one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The group's next offset to read (the log's start when it committed none).
    pub committed: i64,
    /// The log's end: the next offset to be written.
    pub end: i64,
}

/// A bus: publishing, and members of consumer groups.
pub trait Bus: Publish {
    /// A member of a consumer group.
    type Receiver: Receive;

    /// A new member of `group`, reading `topics` from the group's committed offsets (from the
    /// start where the group has none).
    fn receiver(&self, group: &str, topics: &[String]) -> Result<Self::Receiver, Error>;

    /// The members of `group` now that are not consumers of this framework (the Go system's,
    /// another tool's), each as `client id@host`; empty where the bus cannot tell.
    fn foreign_members(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<Vec<String>, Error>> + Send {
        let _ = group;
        async { Ok(Vec::new()) }
    }
}

/// Why an error means no retry can deliver the record: the dead-letter reason, or `None` for
/// an error worth retrying. A record larger than the producer's or the broker's
/// `message.max.bytes` stays too large however often it is sent.
pub fn permanent_failure(error: &Error) -> Option<&'static str> {
    match error {
        Error::MessageTooLarge { .. } => Some("message_too_large"),
        #[cfg(feature = "kafka")]
        Error::Kafka(e)
            if e.rdkafka_error_code()
                == Some(rdkafka::error::RDKafkaErrorCode::MessageSizeTooLarge) =>
        {
            Some("message_too_large")
        }
        _ => None,
    }
}
