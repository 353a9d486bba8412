use outbox_runtime::OutboxService;

pub struct FeishuRequested {
    pub user_id: u64,
}

#[derive(OutboxService)]
#[outbox(service = "notification")]
pub enum NotificationEvents {
    FeishuRequested(FeishuRequested),
}

fn main() {}
