//! The contract layer's error type: a catalog that cannot be built.

/// Why a [`Catalog`](crate::route::Catalog) or a [`RouteConfig`](crate::route::RouteConfig) was refused.
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
    /// Two `#[derive(OutboxService)]` enums claim one service. Each consumer is typed on one
    /// enum, so it would dead-letter the other enum's events as `unknown_event_type`.
    #[error(
        "service `{service}` is claimed by two enums, `{first}` and `{second}`; a service's events are the variants of one `#[derive(OutboxService)]` enum, so move them into one"
    )]
    ServiceClaimedTwice {
        /// The service.
        service: String,
        /// The enum registered first.
        first: &'static str,
        /// The enum registered second.
        second: &'static str,
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
