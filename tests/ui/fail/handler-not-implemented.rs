use outbox_runtime::{OutboxEvent, OutboxService};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "task.urgency.promote.requested", version = 1, service = "task")]
pub struct UrgencyPromoteRequested {
    pub user_id: u64,
}

#[derive(OutboxService)]
#[outbox(service = "task")]
pub enum TaskEvents {
    UrgencyPromoteRequested(UrgencyPromoteRequested),
}

struct NotAHandler;

// What a consumer requires of its handler: every event of the service handled.
fn consume<S: outbox_runtime::Dispatch<H, ()>, H>(_handler: H) {}

fn main() {
    consume::<TaskEvents, _>(NotAHandler);
}
