#![doc = include_str!("../../README.md")]
#![warn(missing_docs)]
#![warn(clippy::print_stdout, clippy::print_stderr)]

#[cfg(feature = "kafka")]
pub mod bus;
#[cfg(feature = "kafka")]
pub mod consumer;
#[cfg(feature = "kafka")]
pub mod envelope;
pub mod error;
pub mod event;
#[cfg(feature = "kafka")]
pub mod relay;
pub mod route;
#[cfg(feature = "kafka")]
pub mod runtime;
pub mod schema;
pub mod service;
#[cfg(feature = "store")]
pub mod store;
#[cfg(feature = "store")]
pub mod trace;
pub mod validate;

#[doc(hidden)]
pub mod __private;

pub use error::Error;
pub use event::OutboxEvent;
pub use route::{Catalog, RouteConfig, ServiceRoute};
pub use service::{Dispatch, HandlerError, OutboxService, Rejection};
pub use validate::{Validate, Violation, Violations};

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
