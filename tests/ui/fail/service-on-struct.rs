use outbox_runtime::OutboxService;

#[derive(OutboxService)]
#[outbox(service = "notification")]
pub struct NotificationEvents {
    pub user_id: u64,
}

fn main() {}
