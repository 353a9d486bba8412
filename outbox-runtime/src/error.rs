//! The crate's error type.

use outbox_contract::envelope::MAX_EVENT_ID_LEN;

/// What can go wrong when configuring or running the outbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A catalog or route configuration that cannot be built: an invalid name, an event type
    /// of two services, two enums of one service, two services sharing a table or topic.
    #[error(transparent)]
    Contract(#[from] outbox_contract::Error),
    /// An event that breaks its contract's validation rules; nothing was written.
    #[error("refusing to store an invalid `{event_type}` v{version} event: {violations}")]
    InvalidEvent {
        /// The event type.
        event_type: &'static str,
        /// The version.
        version: u32,
        /// Every broken rule.
        violations: outbox_contract::Violations,
    },
    /// An event of a service the outbox was not built with.
    #[error(
        "service `{service}` is not in this outbox's catalog; add it with `Catalog::builder(..).service::<...>()`"
    )]
    UnknownService {
        /// The service.
        service: String,
    },
    /// A service's table exists with another layout than this version's outbox table (the Go
    /// system's table, say): migrating would leave it as it is and every relay query would
    /// fail. Nothing was changed.
    #[error(
        "table `{table}` of service `{service}` is not an outbox table of this version: {}",
        mismatch(missing, foreign)
    )]
    TableMismatch {
        /// The service.
        service: String,
        /// The table.
        table: String,
        /// Columns the outbox reads and writes that the table does not have.
        missing: Vec<String>,
        /// Columns the table requires (NOT NULL, no default) that the outbox does not write.
        foreign: Vec<String>,
    },
    /// A service's table made by an older version, which lacks columns this version's relay
    /// and consumers write: [`crate::store::Outbox::migrate`] (or `outbox migrate`) adds
    /// them. Nothing was changed.
    #[error(
        "table `{table}` of service `{service}` was made by an older version and has no column {}; run `outbox migrate` (or `Outbox::migrate`), which adds it",
        missing.join(", ")
    )]
    TableOutdated {
        /// The service.
        service: String,
        /// The table.
        table: String,
        /// The columns `migrate` adds.
        missing: Vec<String>,
    },
    /// A write-ahead-log service ([`crate::store::OutboxBuilder::wal`]) on a database whose
    /// `wal_level` is not `logical`: its events could not be read back.
    #[error(
        "service `{service}` relays from the write-ahead log, which needs wal_level = logical; this server has wal_level = {found}. Run `ALTER SYSTEM SET wal_level = logical;` as a superuser and restart PostgreSQL (and keep `max_replication_slots` and `max_wal_senders` above 0)"
    )]
    WalLevel {
        /// The service.
        service: String,
        /// The server's `wal_level`.
        found: String,
    },
    /// A write-ahead-log service on a database that has no logical decoding.
    #[error("relaying from the write-ahead log needs PostgreSQL; this is {backend}")]
    WalUnsupported {
        /// The database.
        backend: &'static str,
    },
    /// A service declared both write-ahead-log and Go-routed.
    #[error(
        "service `{service}` cannot both relay from the write-ahead log and be served by the Go system"
    )]
    WalAndGo {
        /// The service.
        service: String,
    },
    /// A write-ahead-log service whose replication slot does not exist: events written
    /// before the slot existed are not in it, so the relay does not create it on the fly.
    #[error(
        "replication slot `{slot}` of service `{service}` does not exist; run `outbox migrate` (Outbox::migrate) before the service writes events"
    )]
    WalSlotMissing {
        /// The service.
        service: String,
        /// The slot.
        slot: String,
    },
    /// A write-ahead-log service whose replication slot PostgreSQL invalidated because it held
    /// more WAL than `max_slot_wal_keep_size` allows: nothing more can be read from it, so the
    /// relay stops rather than go on as if no event were waiting.
    #[error(
        "replication slot `{slot}` of service `{service}` was invalidated by PostgreSQL (it held more WAL than max_slot_wal_keep_size allows): nothing more can be read from it, so events the service wrote after the slot's last confirmed position may never have been published, and none written from now on will be. Drop it (SELECT pg_drop_replication_slot('{slot}')) and run `outbox migrate` (Outbox::migrate), which makes it again from then on"
    )]
    WalSlotLost {
        /// The service.
        service: String,
        /// The slot.
        slot: String,
    },
    /// The replication stream a relay reads a write-ahead-log service's slot through could
    /// not start or broke (the relay tries again; the reason says what to fix when it can).
    #[error("replication stream of slot `{slot}` (service `{service}`): {reason}")]
    WalStream {
        /// The service.
        service: String,
        /// The slot.
        slot: String,
        /// What went wrong.
        reason: String,
    },
    /// A consumer that records applied events in the producer's rows
    /// ([`crate::consumer::Dedupe::OutboxRow`]) for a write-ahead-log service, whose events
    /// have no row.
    #[error(
        "service `{service}` relays from the write-ahead log, so its events have no outbox row: its consumers must use `Dedupe::Inbox` (a consumer with its own database)"
    )]
    WalNeedsInbox {
        /// The service.
        service: String,
    },
    /// A Go operation on a service with no Go route ([`crate::store::GoRoute`]).
    #[error(
        "service `{service}` has no Go route; declare its Go table with `OutboxBuilder::go_route` (or `go_routes` in the CLI's config)"
    )]
    NoGoRoute {
        /// The service.
        service: String,
    },
    /// A Go route on a database the Go system did not run on.
    #[error("Go routes need MySQL or MariaDB, where the Go system's tables are; this is {backend}")]
    GoUnsupported {
        /// The database.
        backend: &'static str,
    },
    /// A consumer group with members of another system (the Go consumers of the same group
    /// name): joining would take part of their partitions.
    #[error(
        "consumer group `{group}` has members that are not outbox consumers ({}); a consumer beside them would take part of their partitions: stop them first, or allow it with `ConsumerConfig::allow_foreign_members`",
        members.join(", ")
    )]
    ForeignMembers {
        /// The group.
        group: String,
        /// The foreign members, as `client id@host`.
        members: Vec<String>,
    },
    /// A service's table is not in the database (dropped, or never migrated): its relay
    /// stops rather than fail every round unseen.
    #[error("table `{table}` of service `{service}` is not there; run `outbox migrate`")]
    TableMissing {
        /// The service.
        service: String,
        /// The table.
        table: String,
    },
    /// An event whose (event type, version) this outbox's catalog routes to another service
    /// than the one the event declares: storing it in either table would be wrong.
    #[error(
        "`{event_type}` v{version} declares service `{service}`, but this outbox routes it to service `{routed}`; an event type belongs to one service"
    )]
    EventOfAnotherService {
        /// The event type.
        event_type: &'static str,
        /// The version.
        version: u32,
        /// The service the event declares.
        service: &'static str,
        /// The service the catalog routes the (event type, version) to.
        routed: String,
    },
    /// An event whose enum is not in this outbox's catalog (its service was added by name
    /// only, so the outbox has its table but not its routes).
    #[error(
        "outbox route not registered: `{event_type}` v{version} is listed in `{listed_in}`, which this outbox's catalog does not have; add it with `Catalog::builder(..).service::<{listed_in}>()`"
    )]
    RouteNotRegistered {
        /// The event type.
        event_type: &'static str,
        /// The version.
        version: u32,
        /// The service the event names.
        service: &'static str,
        /// The enum that lists the event.
        listed_in: &'static str,
    },
    /// An event id longer than an inbox record holds ([`MAX_EVENT_ID_LEN`] characters); cutting
    /// it would let two events share one record.
    #[error(
        "event id of {len} characters is longer than the {max} an inbox record holds",
        max = MAX_EVENT_ID_LEN
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
    /// A record not sent, because an earlier record of its key in the same batch failed; it is
    /// sent after that one.
    #[error("held back behind an earlier record of its key that failed")]
    HeldBack,
    /// A record larger than the bus takes; no retry can send it.
    #[error("a record of {size} bytes for `{topic}` is larger than the {max} bytes the bus takes")]
    MessageTooLarge {
        /// The topic.
        topic: String,
        /// The record's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A publish to a topic that does not exist.
    #[error("topic `{topic}` does not exist")]
    UnknownTopic {
        /// The topic.
        topic: String,
    },
    /// An offset stored for a partition this consumer no longer has (the group moved it).
    #[error("partition {partition} of `{topic}` is not assigned to this consumer")]
    NotAssigned {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
    },
    /// The bus failed.
    #[error("bus error: {0}")]
    Bus(String),
    /// A task of the runtime panicked or was cancelled.
    #[error("runtime task failed: {0}")]
    Task(String),
}

fn mismatch(missing: &[String], foreign: &[String]) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("it has no column {}", missing.join(", ")));
    }
    if !foreign.is_empty() {
        parts.push(format!(
            "it requires {}, which the outbox does not write",
            foreign.join(", ")
        ));
    }
    parts.join("; ")
}
