use outbox_runtime::OutboxEvent;

#[derive(OutboxEvent)]
#[outbox(event_type = "notification.feishu.requested", version = 1, service = "notification")]
pub union FeishuRequested {
    user_id: u64,
    code: i64,
}

fn main() {}
