//! Service `active-scheduler`: proactive schedule triggers.

use chrono::{DateTime, Utc};
use outbox_contract::{OutboxEvent, OutboxService, Violations};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Why the scheduler acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TriggerType {
    /// An important and urgent task is due.
    ImportantUrgentTask,
    /// The user has not reported back on a finished item.
    UnfinishedFeedback,
}

/// Who asked. (The Go system also knew `api_dry_run`, which it always rejected: a dry run
/// never becomes an event, so it is not a value here.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TriggerSource {
    /// The due-job scanner.
    WorkerDueJob,
    /// The API.
    ApiTrigger,
    /// User feedback.
    UserFeedback,
}

/// What the trigger is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TargetType {
    /// The task pool.
    TaskPool,
    /// A schedule event.
    ScheduleEvent,
    /// A task item.
    TaskItem,
}

/// A proactive schedule trigger fired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(
    event_type = "active_schedule.triggered",
    version = 1,
    service = "active-scheduler",
    key = user_id,
    aggregate = trigger_id,
    validate = Self::check_mock_time
)]
pub struct ActiveScheduleTriggered {
    /// The trigger record.
    #[outbox(validate(non_empty, length(max = 64)))]
    pub trigger_id: String,
    /// The user to act for.
    #[outbox(validate(range(min = 1)))]
    pub user_id: u64,
    /// Why.
    pub trigger_type: TriggerType,
    /// Who asked.
    pub source: TriggerSource,
    /// What about.
    pub target_type: TargetType,
    /// Which entity.
    #[outbox(validate(range(min = 1)))]
    pub target_id: u64,
    /// The user feedback that caused it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_id: Option<String>,
    /// The caller's idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[outbox(validate(length(max = 128)))]
    pub idempotency_key: Option<String>,
    /// A simulated "now", for tests of the schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock_now: Option<DateTime<Utc>>,
    /// Must be true when `mock_now` is set.
    #[serde(default)]
    pub is_mock_time: bool,
    /// When the trigger was requested.
    pub requested_at: DateTime<Utc>,
    /// Source-specific extra data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// The producer's trace id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl ActiveScheduleTriggered {
    /// A simulated time must be flagged, so that nobody mistakes a test trigger for a real one.
    fn check_mock_time(&self) -> Result<(), Violations> {
        let mut v = Violations::new();
        if self.mock_now.is_some() && !self.is_mock_time {
            v.push(
                "is_mock_time",
                "mock_time",
                "must be true when `mock_now` is set",
            );
        }
        v.into_result()
    }
}

/// The events service `active-scheduler` consumes.
#[derive(Debug, Clone, PartialEq, OutboxService)]
#[outbox(service = "active-scheduler")]
pub enum ActiveSchedulerEvents {
    /// A trigger to act on.
    Triggered(ActiveScheduleTriggered),
}
