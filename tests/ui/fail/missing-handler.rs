use outbox_runtime::{OutboxEvent, OutboxService};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "notification.feishu.requested", version = 1, service = "notification", key = user_id)]
pub struct FeishuRequested {
    pub user_id: u64,
}

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "notification.email.requested", version = 1, service = "notification", key = user_id)]
pub struct EmailRequested {
    pub user_id: u64,
}

#[derive(OutboxService)]
#[outbox(service = "notification")]
pub enum NotificationEvents {
    FeishuRequested(FeishuRequested),
    EmailRequested(EmailRequested),
}

struct Notifier;

impl NotificationEventsHandler<()> for Notifier {
    async fn feishu_requested(&self, _: &mut (), _: FeishuRequested) -> Result<(), outbox_runtime::HandlerError> {
        Ok(())
    }
}

fn main() {}
