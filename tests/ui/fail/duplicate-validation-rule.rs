use outbox_runtime::OutboxEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "notification.feishu.requested", version = 1, service = "notification")]
pub struct FeishuRequested {
    #[outbox(validate(length(max = 64), non_empty, length(min = 2)))]
    pub text: String,
}

fn main() {}
