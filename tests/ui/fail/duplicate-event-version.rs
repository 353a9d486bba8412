use outbox_runtime::{OutboxEvent, OutboxService};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "notification.feishu.requested", version = 1, service = "notification")]
pub struct FeishuRequested {
    pub user_id: u64,
}

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "notification.feishu.requested", version = 1, service = "notification")]
pub struct FeishuRequestedV2 {
    pub user_id: u64,
    pub locale: String,
}

#[derive(OutboxService)]
#[outbox(service = "notification")]
pub enum NotificationEvents {
    FeishuRequested(FeishuRequested),
    FeishuRequestedV2(FeishuRequestedV2),
}

fn main() {}
