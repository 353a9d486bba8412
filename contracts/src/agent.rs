//! Service `agent`: chat history, token usage, agent state and timeline persistence.

use chrono::{DateTime, Utc};
use outbox_contract::{OutboxEvent, OutboxService};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The user.
    User,
    /// The assistant.
    Assistant,
    /// A system prompt.
    System,
    /// A tool's output.
    Tool,
}

/// Persist one chat message after the reply streamed out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(
    event_type = "chat.history.persist.requested",
    version = 1,
    service = "agent",
    key = conversation_id
)]
pub struct ChatHistoryPersistRequested {
    /// The owner.
    #[outbox(validate(range(min = 1)))]
    pub user_id: u64,
    /// The chat.
    #[outbox(validate(non_empty, length(max = 36)))]
    pub conversation_id: String,
    /// Who wrote the message.
    pub role: Role,
    /// The message text.
    pub message: String,
    /// Deep-reasoning text, when the model produced some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Seconds spent reasoning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_duration_seconds: Option<u32>,
    /// The retry group, when this message regenerates an earlier one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_group_id: Option<String>,
    /// The page within the retry group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_index: Option<u32>,
    /// Tokens used by this turn.
    pub tokens_consumed: u64,
}

/// Add tokens to a user's usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(
    event_type = "chat.token.usage.adjust.requested",
    version = 1,
    service = "agent",
    key = conversation_id,
    aggregate = user_conversation()
)]
pub struct ChatTokenUsageAdjustRequested {
    /// The user being charged.
    #[outbox(validate(range(min = 1)))]
    pub user_id: u64,
    /// The chat.
    #[outbox(validate(non_empty))]
    pub conversation_id: String,
    /// Tokens to add; positive.
    #[outbox(validate(range(min = 1)))]
    pub tokens_delta: i64,
    /// Why, for the audit trail.
    #[outbox(validate(length(max = 200)))]
    pub reason: String,
    /// When the adjustment was requested.
    pub triggered_at: DateTime<Utc>,
}

impl ChatTokenUsageAdjustRequested {
    /// `{user_id}:{conversation_id}`.
    pub fn user_conversation(&self) -> String {
        format!("{}:{}", self.user_id, self.conversation_id)
    }
}

/// Save the agent's state so that a conversation can resume after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(
    event_type = "agent.state.snapshot.persist",
    version = 1,
    service = "agent",
    key = conversation_id
)]
pub struct AgentStateSnapshotPersist {
    /// The chat; snapshots are upserted by it.
    #[outbox(validate(non_empty))]
    pub conversation_id: String,
    /// The owner.
    #[outbox(validate(range(min = 1)))]
    pub user_id: u64,
    /// The runtime phase, empty when none.
    #[outbox(validate(length(max = 64)))]
    pub phase: String,
    /// The snapshot itself.
    pub snapshot: serde_json::Value,
}

/// What a timeline entry shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimelineKind {
    /// Text the user typed.
    UserText,
    /// Text the assistant wrote.
    AssistantText,
    /// A tool invocation.
    ToolCall,
    /// A tool's answer.
    ToolResult,
    /// A request for the user's confirmation.
    ConfirmRequest,
    /// A business card.
    BusinessCard,
    /// A schedule finished.
    ScheduleCompleted,
    /// A summary of the model's reasoning.
    ThinkingSummary,
}

/// Append one entry to a conversation's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(
    event_type = "agent.timeline.persist.requested",
    version = 1,
    service = "agent",
    key = conversation_id
)]
pub struct AgentTimelinePersistRequested {
    /// The owner.
    #[outbox(validate(range(min = 1)))]
    pub user_id: u64,
    /// The chat.
    #[outbox(validate(non_empty, length(max = 36)))]
    pub conversation_id: String,
    /// Position in the conversation, from 1.
    #[outbox(validate(range(min = 1)))]
    pub seq: i64,
    /// What the entry shows.
    pub kind: TimelineKind,
    /// The message role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Plain-text body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Structured body of card entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// Tokens tied to the entry.
    #[serde(default)]
    pub tokens_consumed: u64,
}

/// The events service `agent` consumes.
#[derive(Debug, Clone, PartialEq, OutboxService)]
#[outbox(service = "agent")]
pub enum AgentEvents {
    /// A chat message to store.
    ChatHistoryPersistRequested(ChatHistoryPersistRequested),
    /// Token usage to adjust.
    ChatTokenUsageAdjustRequested(ChatTokenUsageAdjustRequested),
    /// Agent state to snapshot.
    AgentStateSnapshotPersist(AgentStateSnapshotPersist),
    /// A timeline entry to append.
    AgentTimelinePersistRequested(AgentTimelinePersistRequested),
}
