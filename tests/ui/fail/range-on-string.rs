use outbox_runtime::OutboxEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "notification.feishu.requested", version = 1, service = "notification")]
pub struct FeishuRequested {
    #[outbox(validate(range(min = 1, max = 10)))]
    pub user_id: String,
}

fn main() {}
