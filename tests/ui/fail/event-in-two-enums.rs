// An event is handled by one service's enum: a second enum listing it would give one event
// two handlers and two routes.
use outbox_runtime::{OutboxEvent, OutboxService};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "notification.feishu.requested", version = 1, service = "notification")]
pub struct FeishuRequested {
    pub user_id: u64,
}

#[derive(OutboxService)]
#[outbox(service = "notification")]
pub enum NotificationEvents {
    FeishuRequested(FeishuRequested),
}

#[derive(OutboxService)]
#[outbox(service = "notification")]
pub enum MoreNotificationEvents {
    Feishu(FeishuRequested),
}

fn main() {}
