use outbox_runtime::OutboxEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// Every mistake is reported in one build, not one per build.
#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "Feishu", version = 0, service = "Notification", colour = "red")]
pub struct FeishuRequested {
    #[outbox(validate(length()))]
    pub user_id: u64,
}

fn main() {}
