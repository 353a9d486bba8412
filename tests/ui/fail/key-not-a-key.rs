use outbox_runtime::OutboxEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema)]
pub struct Recipient {
    pub user_id: u64,
}

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "notification.feishu.requested", version = 1, service = "notification", key = recipient)]
pub struct FeishuRequested {
    pub recipient: Recipient,
}

fn main() {}
