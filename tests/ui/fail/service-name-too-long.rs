use outbox_runtime::{OutboxEvent, OutboxService};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(OutboxService)]
#[outbox(service = "the-service-that-sends-every-kind-of-notification-there-is")]
pub enum NotificationEvents {
    FeishuRequested(FeishuRequested),
}

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "notification.feishu.requested", version = 1, service = "notification")]
pub struct FeishuRequested {
    pub user_id: u64,
}

fn main() {}
