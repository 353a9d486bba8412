use outbox_runtime::OutboxEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "notification.feishu.requested", version = 1, service = "notification", key = usr_id)]
pub struct FeishuRequested {
    pub user_id: u64,
    pub text: String,
}

fn main() {}
