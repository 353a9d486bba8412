//! Service `notification`: messages to users. Version 2 of the Feishu request sits beside
//! version 1, each with its own handler, while producers move over.

use chrono::{DateTime, Utc};
use outbox_contract::{OutboxEvent, OutboxService, Validate};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Send a user a Feishu message about a schedule preview (version 1: plain text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(
    event_type = "notification.feishu.requested",
    version = 1,
    service = "notification",
    key = user_id,
    aggregate = preview_id
)]
pub struct FeishuRequested {
    /// The notification record, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_id: Option<u64>,
    /// The recipient.
    #[outbox(validate(range(min = 1)))]
    pub user_id: u64,
    /// The trigger that caused it.
    pub trigger_id: String,
    /// The schedule preview to show.
    #[outbox(validate(non_empty))]
    pub preview_id: String,
    /// The trigger's type.
    pub trigger_type: String,
    /// The target's type.
    pub target_type: String,
    /// The target's id.
    pub target_id: u64,
    /// Dedupe key: `{user_id}:{trigger_type}:{requested_at rounded down to 30 min}`.
    #[outbox(validate(non_empty, length(max = 191)))]
    pub dedupe_key: String,
    /// The in-app link.
    #[outbox(validate(non_empty, custom = crate::checks::in_app_link))]
    pub target_url: String,
    /// The summary shown first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[outbox(validate(length(max = 2000)))]
    pub summary_text: Option<String>,
    /// Text for clients that cannot show cards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[outbox(validate(length(max = 2000)))]
    pub fallback_text: Option<String>,
    /// The producer's trace id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// When it was requested.
    pub requested_at: DateTime<Utc>,
}

/// Message urgency (version 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Deliver in the next batch.
    Normal,
    /// Deliver now, and ping.
    Urgent,
}

/// A message card (version 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Validate)]
pub struct Card {
    /// The title line.
    #[outbox(validate(non_empty, length(max = 100)))]
    pub title: String,
    /// The body, in Feishu's markdown subset.
    #[outbox(validate(non_empty, length(max = 4000)))]
    pub body: String,
    /// Buttons, at most 3.
    #[serde(default)]
    #[outbox(validate(length(max = 3), nested))]
    pub actions: Vec<CardAction>,
}

/// A button on a card (version 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Validate)]
pub struct CardAction {
    /// The button text.
    #[outbox(validate(non_empty, length(max = 20)))]
    pub label: String,
    /// Where it leads.
    #[outbox(validate(custom = crate::checks::in_app_link))]
    pub url: String,
}

/// Send a user a Feishu message (version 2: a card with buttons and a priority, in the user's
/// locale; the dedupe key is computed by the producer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(
    event_type = "notification.feishu.requested",
    version = 2,
    service = "notification",
    key = user_id,
    aggregate = preview_id
)]
pub struct FeishuRequestedV2 {
    /// The recipient.
    #[outbox(validate(range(min = 1)))]
    pub user_id: u64,
    /// The trigger that caused it.
    #[outbox(validate(non_empty))]
    pub trigger_id: String,
    /// The schedule preview to show.
    #[outbox(validate(non_empty))]
    pub preview_id: String,
    /// Dedupe key.
    #[outbox(validate(non_empty, length(max = 191)))]
    pub dedupe_key: String,
    /// The message.
    #[outbox(validate(nested))]
    pub card: Card,
    /// How urgent.
    pub priority: Priority,
    /// BCP 47 locale of the text.
    #[outbox(validate(regex = "[a-z]{2}(-[A-Z]{2})?"))]
    pub locale: String,
    /// When it was requested.
    pub requested_at: DateTime<Utc>,
}

/// The events service `notification` consumes.
#[derive(Debug, Clone, PartialEq, OutboxService)]
#[outbox(service = "notification")]
pub enum NotificationEvents {
    /// A plain-text message.
    FeishuRequested(FeishuRequested),
    /// A card message.
    FeishuRequestedV2(FeishuRequestedV2),
}
