use outbox_runtime::{HandlerError, OutboxEvent, OutboxService};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, JsonSchema, OutboxEvent)]
#[outbox(event_type = "task.urgency.promote.requested", version = 1, service = "task")]
pub struct UrgencyPromoteRequested {
    pub user_id: u64,
}

// The one mistake: no `service`. The handler impl and the catalog call below must not add
// errors of their own.
#[derive(OutboxService)]
pub enum TaskEvents {
    UrgencyPromoteRequested(UrgencyPromoteRequested),
}

struct H;

impl TaskEventsHandler<()> for H {
    async fn urgency_promote_requested(&self, _: &mut (), _: UrgencyPromoteRequested) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn main() {
    let _ = outbox_runtime::Catalog::builder(outbox_runtime::RouteConfig::new()).service::<TaskEvents>();
}
