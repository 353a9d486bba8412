//! The reference event contracts: the services and events of the Go system this project
//! replaces (its `backend/shared/events` and the agent-side payloads), declared once in Rust.
//!
//! An event's service is the service that consumes it; other services write into that
//! service's outbox inside their own transactions (active-scheduler writes
//! `notification.feishu.requested`; llm writes `credit.charge.requested`).
//!
//! Versions are integers here. On the wire the Go system wrote "1" for some events and "v1" for
//! others; both decode to 1.

pub mod active_scheduler;
pub mod agent;
pub mod memory;
pub mod notification;
pub mod samples;
pub mod task;
pub mod token_store;

pub use active_scheduler::{ActiveSchedulerEvents, ActiveSchedulerEventsHandler};
pub use agent::{AgentEvents, AgentEventsHandler};
pub use memory::{MemoryEvents, MemoryEventsHandler};
pub use notification::{NotificationEvents, NotificationEventsHandler};
pub use task::{TaskEvents, TaskEventsHandler};
pub use token_store::{TokenStoreEvents, TokenStoreEventsHandler};

/// The topic and group prefix the Go system used.
pub const PREFIX: &str = "smartflow";

/// The route table of every reference service, with the Go system's prefix.
pub fn catalog() -> Result<outbox_contract::Catalog, outbox_contract::Error> {
    let config = outbox_contract::RouteConfig::new().prefix(PREFIX)?;
    Ok(outbox_contract::Catalog::builder(config)
        .service::<AgentEvents>()?
        .service::<MemoryEvents>()?
        .service::<TaskEvents>()?
        .service::<ActiveSchedulerEvents>()?
        .service::<NotificationEvents>()?
        .service::<TokenStoreEvents>()?
        .build())
}

/// Shared field checks.
pub mod checks {
    /// In-app links are relative paths under `/assistant/`: never an absolute or
    /// protocol-relative URL, which could send a user off-site.
    pub fn in_app_link(url: &str) -> Result<(), &'static str> {
        if url.contains("://") || url.starts_with("//") {
            return Err("must be an in-app path, not an absolute URL");
        }
        if !url.starts_with("/assistant/") {
            return Err("must start with `/assistant/`");
        }
        Ok(())
    }

    /// Ids in a list must all be positive.
    pub fn positive_ids(ids: &[u64]) -> Result<(), &'static str> {
        if ids.contains(&0) {
            return Err("ids must be positive");
        }
        Ok(())
    }
}
