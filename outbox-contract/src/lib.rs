//! What a contracts crate needs, and nothing more: the event and service traits, validation,
//! route specs and the catalog, schema export and the compatibility check, and the wire
//! envelope. No database, broker or async runtime: a crate of event structs that depends on
//! this one compiles serde, serde_json, schemars and regex, and no C.
//!
//! Applications depend on [`outbox-runtime`](https://docs.rs/outbox-runtime), which re-exports
//! everything here at the same paths, and adds the stores, the relay and the consumers.
//!
//! ```
//! use outbox_contract::{OutboxEvent, OutboxService};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, schemars::JsonSchema, OutboxEvent)]
//! #[outbox(event_type = "ledger.entry.posted", version = 1, service = "ledger", key = account)]
//! pub struct EntryPosted {
//!     #[outbox(validate(non_empty))]
//!     pub account: String,
//!     pub cents: i64,
//! }
//!
//! #[derive(OutboxService)]
//! #[outbox(service = "ledger")]
//! pub enum LedgerEvents {
//!     EntryPosted(EntryPosted),
//! }
//!
//! let event = LedgerEvents::decode("ledger.entry.posted", 1, br#"{"account":"a-1","cents":5}"#);
//! assert!(matches!(event, Ok(LedgerEvents::EntryPosted(_))));
//! ```
#![warn(missing_docs)]
#![warn(clippy::print_stdout, clippy::print_stderr)]

mod constraint;
pub mod envelope;
pub mod error;
pub mod event;
pub mod route;
pub mod schema;
pub mod service;
pub mod validate;

#[doc(hidden)]
pub mod __private;

pub use error::Error;
pub use event::{Listed, OutboxEvent};
pub use route::{Catalog, RouteConfig, ServiceRoute};
pub use service::{Dispatch, HandlerError, OutboxService, Rejection};
pub use validate::{Validate, Violation, Violations};

/// `#[derive(OutboxEvent)]`: an event contract. See [`trait@OutboxEvent`].
#[cfg(feature = "derive")]
pub use outbox_derive::ContractOutboxEvent as OutboxEvent;
/// `#[derive(OutboxService)]`: a service's events, route and handler trait.
/// See [`trait@OutboxService`].
#[cfg(feature = "derive")]
pub use outbox_derive::ContractOutboxService as OutboxService;
/// `#[derive(Validate)]`: validation for a struct nested in a payload. See [`trait@Validate`].
#[cfg(feature = "derive")]
pub use outbox_derive::ContractValidate as Validate;
