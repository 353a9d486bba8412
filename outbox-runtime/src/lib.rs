#![doc = include_str!("../../README.md")]
#![warn(missing_docs)]
#![warn(clippy::print_stdout, clippy::print_stderr)]

#[cfg(feature = "runtime")]
pub mod bus;
#[cfg(feature = "runtime")]
pub mod consumer;
#[cfg(feature = "runtime")]
pub mod engine;
pub mod error;
#[cfg(feature = "runtime")]
pub mod relay;
#[cfg(feature = "store")]
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "store")]
pub mod trace;

// The contract layer, at the paths it has always had here: `outbox_runtime::event::ToKey`,
// `outbox_runtime::route::RouteConfig`, `outbox_runtime::schema::export`, ...
#[doc(inline)]
pub use outbox_contract::{envelope, event, route, schema, service, validate};

#[doc(hidden)]
pub use outbox_contract::__private;

/// The contract layer's own crate, for code that names it: a contracts crate depends on it
/// alone, and an application gets it here.
pub use outbox_contract as contract;

pub use error::Error;
// The traits by their modules' paths: the contract crate's root also holds its own derives
// (naming `::outbox_contract`), and this crate's derives, below, name `::outbox_runtime`.
pub use outbox_contract::event::{Listed, OutboxEvent};
pub use outbox_contract::route::{Catalog, RouteConfig, ServiceRoute};
pub use outbox_contract::service::{Dispatch, HandlerError, OutboxService, Rejection};
pub use outbox_contract::validate::{Validate, Violation, Violations};

#[cfg(feature = "kafka")]
pub use bus::KafkaConfig;
#[cfg(feature = "runtime")]
pub use bus::MemoryBus;
#[cfg(feature = "runtime")]
pub use consumer::{Call, ConsumerConfig, Context, Dedupe};
#[cfg(feature = "runtime")]
pub use engine::{Engine, Running};
#[cfg(feature = "runtime")]
pub use relay::{RelayConfig, WalRead};
#[cfg(feature = "store")]
pub use sqlx;
#[cfg(feature = "store")]
pub use store::{Outbox, Status};

/// `#[derive(OutboxEvent)]`: an event contract. See [`trait@OutboxEvent`].
#[cfg(feature = "derive")]
pub use outbox_derive::OutboxEvent;
/// `#[derive(OutboxService)]`: a service's events, route and handler trait.
/// See [`trait@OutboxService`].
#[cfg(feature = "derive")]
pub use outbox_derive::OutboxService;
/// `#[derive(Validate)]`: validation for a struct nested in a payload. See [`trait@Validate`].
#[cfg(feature = "derive")]
pub use outbox_derive::Validate;
