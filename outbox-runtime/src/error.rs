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
}
