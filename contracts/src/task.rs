//! Service `task`: task management.

use chrono::{DateTime, Utc};
use outbox_contract::{OutboxEvent, OutboxService};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Try to promote tasks into the urgent quadrant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(
    event_type = "task.urgency.promote.requested",
    version = 1,
    service = "task",
    key = user_id
)]
pub struct TaskUrgencyPromoteRequested {
    /// The tasks' owner.
    #[outbox(validate(range(min = 1)))]
    pub user_id: u64,
    /// The tasks to consider: at least one, at most 500, all positive.
    #[outbox(validate(non_empty, length(max = 500), custom = crate::checks::positive_ids))]
    pub task_ids: Vec<u64>,
    /// When the promotion was requested.
    pub triggered_at: DateTime<Utc>,
}

/// The events service `task` consumes.
#[derive(Debug, Clone, PartialEq, OutboxService)]
#[outbox(service = "task")]
pub enum TaskEvents {
    /// Tasks to promote.
    TaskUrgencyPromoteRequested(TaskUrgencyPromoteRequested),
}
