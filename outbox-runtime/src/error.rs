//! The crate's error type.

/// What can go wrong when configuring or running the outbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A table, topic, group or prefix name that is not allowed.
    #[error("invalid {what} `{name}`: {reason}")]
    InvalidName {
        /// `table`, `topic`, `group` or `prefix`.
        what: &'static str,
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// Two different services claim one event type.
    #[error(
        "event type `{event_type}` is declared by services `{first}` and `{second}`; an event type belongs to one service"
    )]
    EventOwnedTwice {
        /// The event type.
        event_type: String,
        /// The service that claimed it first.
        first: String,
        /// The service that claimed it again.
        second: String,
    },
    /// One service name registered twice with different routes.
    #[error("service `{service}` is registered twice with different routes")]
    DuplicateService {
        /// The service.
        service: String,
    },
    /// Two services resolve to the same table or topic.
    #[error(
        "services `{first}` and `{second}` both use {what} `{name}`; give one of them its own {what}"
    )]
    SharedRoute {
        /// `table` or `topic`.
        what: &'static str,
        /// The shared name.
        name: String,
        /// The service registered first.
        first: String,
        /// The service registered second.
        second: String,
    },
    /// An event that breaks its contract's validation rules; nothing was written.
    #[error("refusing to store an invalid `{event_type}` v{version} event: {violations}")]
    InvalidEvent {
        /// The event type.
        event_type: &'static str,
        /// The version.
        version: u32,
        /// Every broken rule.
        violations: crate::Violations,
    },
    /// An event of a service the outbox was not built with.
    #[error(
        "service `{service}` is not in this outbox's catalog; add it with `Catalog::builder(..).service::<...>()`"
    )]
    UnknownService {
        /// The service.
        service: String,
    },
    /// An event whose service's enum does not list its (event type, version).
    #[error(
        "outbox route not registered: `{event_type}` v{version} is not a variant of service `{service}`'s enum; add it there so that a consumer can handle it"
    )]
    RouteNotRegistered {
        /// The event type.
        event_type: &'static str,
        /// The version.
        version: u32,
        /// The service the event names.
        service: &'static str,
    },
    /// An event id longer than an inbox record holds ([`crate::envelope::MAX_EVENT_ID_LEN`]
    /// characters); cutting it would let two events share one record.
    #[error(
        "event id of {len} characters is longer than the {max} an inbox record holds",
        max = crate::envelope::MAX_EVENT_ID_LEN
    )]
    EventIdTooLong {
        /// Its length in characters.
        len: usize,
    },
    /// A payload that could not be serialised.
    #[error("cannot serialise the payload: {0}")]
    Encode(#[source] serde_json::Error),
    /// The database failed.
    #[cfg(feature = "store")]
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Kafka failed.
    #[cfg(feature = "kafka")]
    #[error("kafka error: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A topic could not be created.
    #[cfg(feature = "kafka")]
    #[error("cannot create topic `{topic}`: {reason}")]
    TopicCreate {
        /// The topic.
        topic: String,
        /// The broker's answer.
        reason: String,
    },
    /// A topic had no partitions within the wait.
    #[cfg(feature = "kafka")]
    #[error("topic `{topic}` was not ready after {waited:?}")]
    TopicNotReady {
        /// The topic.
        topic: String,
        /// How long this process waited.
        waited: std::time::Duration,
    },
}
