//! Service `memory`: long-term memory extraction.

use chrono::{DateTime, Utc};
use outbox_contract::{OutboxEvent, OutboxService};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent::Role;

/// Extract long-term memories from a message the user wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(
    event_type = "memory.extract.requested",
    version = 1,
    service = "memory",
    key = conversation_id
)]
pub struct MemoryExtractRequested {
    /// The owner.
    #[outbox(validate(range(min = 1)))]
    pub user_id: u64,
    /// The chat.
    #[outbox(validate(non_empty))]
    pub conversation_id: String,
    /// The assistant, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assistant_id: Option<String>,
    /// The chat message the text comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_message_id: Option<u64>,
    /// Who wrote the text.
    pub source_role: Role,
    /// The text; the producer truncates it to 1500 characters.
    #[outbox(validate(non_empty, length(max = 1500)))]
    pub source_text: String,
    /// When the text was written.
    pub occurred_at: DateTime<Utc>,
    /// Dedupe key of the memory job: `memory_extract_<user>_<16 hex>`.
    #[outbox(validate(regex = r"memory_extract_[0-9]+_[0-9a-f]{16}"))]
    pub idempotency_key: String,
}

/// The events service `memory` consumes.
#[derive(Debug, Clone, PartialEq, OutboxService)]
#[outbox(service = "memory")]
pub enum MemoryEvents {
    /// Memories to extract.
    MemoryExtractRequested(MemoryExtractRequested),
}
