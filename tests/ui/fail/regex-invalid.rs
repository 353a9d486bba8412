use outbox_runtime::OutboxEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "notification.feishu.requested", version = 1, service = "notification")]
pub struct FeishuRequested {
    #[outbox(validate(regex = "[a-z]{2}(-[A-Z]{2}"))]
    pub locale: String,
}

fn main() {}
