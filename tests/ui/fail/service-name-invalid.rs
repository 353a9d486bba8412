use outbox_runtime::OutboxEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "credit.charge.requested", version = 1, service = "token_store")]
pub struct CreditChargeRequested {
    pub user_id: u64,
}

fn main() {}
