use outbox_runtime::{OutboxEvent, OutboxService};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "credit.charge.requested", version = 1, service = "token-store")]
pub struct CreditChargeRequested {
    pub user_id: u64,
}

#[derive(OutboxService)]
#[outbox(service = "notification")]
pub enum NotificationEvents {
    CreditChargeRequested(CreditChargeRequested),
}

fn main() {}
