//! The chaos service's one event. Its handler writes one effect row per application; a payload
//! marked `always_fail` makes the handler fail every time, so that event goes dead with
//! `max_attempts`.

use outbox_runtime::{OutboxEvent, OutboxService};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The service name, in routes and dead-letter checks.
pub(crate) const SERVICE: &str = "chaos";

/// One numbered tick of a writer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "chaos.tick.recorded", version = 1, service = "chaos", key = key)]
pub(crate) struct TickRecorded {
    /// The writer's sequence number (its business row's key).
    #[outbox(validate(range(min = 1)))]
    pub(crate) seq: u64,
    /// The message key: a few keys, so that per-key order is exercised.
    #[outbox(validate(non_empty, length(max = 32)))]
    pub(crate) key: String,
    /// The handler fails on this event every time.
    #[serde(default)]
    pub(crate) always_fail: bool,
}

/// The events of service `chaos`.
#[derive(Debug, OutboxService)]
#[outbox(service = "chaos")]
pub(crate) enum ChaosEvents {
    /// A tick.
    TickRecorded(TickRecorded),
}
